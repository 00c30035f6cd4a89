"""Tokenizers read from FLUX-layout folders built here (no downloads): a sentencepiece T5 model
trained on a small corpus, and a hand-written byte-level BPE vocab + merges for CLIP."""

from __future__ import annotations

import io
import json
import random
import warnings

import numpy as np
import pytest

from flaxflux.tokenization import load_clip_tokenizer, load_t5_tokenizer, load_tokenizers

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

WORDS = ("a red circle blue square green triangle cat dog photo of the on in with bright dark small "
         "large painting city night river mountain").split()
PROMPTS = ["a red cat on the circle!", "A photo of a DOG in the city at night", "zebra, 42 x"]
CLIP_MERGES = [("r", "e"), ("re", "d</w>"), ("c", "a"), ("ca", "t</w>"), ("t", "h"), ("th", "e</w>"),
               ("o", "n</w>"), ("c", "i"), ("ci", "r"), ("cir", "c"), ("circ", "l"), ("circl", "e</w>"),
               ("d", "o"), ("do", "g</w>")]


def _spiece_model() -> bytes:
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=48, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    return buf.getvalue()


def _clip_vocab() -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())  # the 256 byte-level symbols
    vocab = {a: i for i, a in enumerate(alphabet)}
    vocab.update({a + "</w>": len(alphabet) + i for i, a in enumerate(alphabet)})
    for a, b in CLIP_MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """tokenizer/ (vocab.json, merges.txt, tokenizer_config.json) and tokenizer_2/ (spiece.model +
    what transformers writes), as in a FLUX.1-dev snapshot."""
    root = tmp_path_factory.mktemp("flux")
    clip = root / "tokenizer"
    clip.mkdir()
    vocab = _clip_vocab()
    (clip / "vocab.json").write_text(json.dumps(vocab))
    (clip / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in CLIP_MERGES))
    (clip / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "<|endoftext|>",
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))

    model = _spiece_model()
    only_spm = root / "spm_only"
    only_spm.mkdir()
    (only_spm / "spiece.model").write_bytes(model)
    t5 = transformers.T5TokenizerFast.from_pretrained(str(only_spm), local_files_only=True)
    t5.save_pretrained(str(root / "tokenizer_2"))
    (root / "tokenizer_2" / "spiece.model").write_bytes(model)
    return dict(root=root, vocab=vocab, spm=model, spm_only=only_spm)


def _reference(tok, prompts, n):
    return tok(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="np")["input_ids"]


def test_clip_matches_transformers(snapshot):
    tok = load_clip_tokenizer(snapshot["root"])  # snapshot root -> tokenizer/
    ids = tok(PROMPTS)
    assert ids.shape == (3, 77) and ids.dtype == np.int32
    ref = transformers.CLIPTokenizer(vocab=snapshot["vocab"], merges=CLIP_MERGES)  # in memory, not the folder
    np.testing.assert_array_equal(ids, _reference(ref, PROMPTS, 77))
    bos, eos = snapshot["vocab"]["<|startoftext|>"], snapshot["vocab"]["<|endoftext|>"]
    assert (ids[:, 0] == bos).all() and (ids[:, -1] == eos).all()  # padded with <|endoftext|>
    assert list(ids[0, 1:5]) == [snapshot["vocab"][t] for t in ("a</w>", "red</w>", "cat</w>", "on</w>")]


def test_t5_matches_sentencepiece(snapshot):
    sp = spm.SentencePieceProcessor(model_proto=snapshot["spm"])
    for folder in (snapshot["root"] / "tokenizer_2", snapshot["spm_only"]):  # tokenizer.json, or spiece.model alone
        tok = load_t5_tokenizer(folder, max_length=32)
        ids = tok(PROMPTS)
        assert ids.shape == (3, 32)
        for row, p in zip(ids, PROMPTS):
            want = sp.encode(p) + [1]  # </s>
            np.testing.assert_array_equal(row, want + [0] * (32 - len(want)))  # <pad> = 0
    ref = transformers.T5TokenizerFast.from_pretrained(str(snapshot["root"] / "tokenizer_2"), local_files_only=True)
    np.testing.assert_array_equal(load_t5_tokenizer(snapshot["root"])(PROMPTS), _reference(ref, PROMPTS, 512))


def test_truncation_warns(snapshot):
    clip, t5 = load_tokenizers(snapshot["root"], t5_max_length=16)
    long = " ".join(["red cat"] * 60)  # 120 words
    with pytest.warns(UserWarning, match=r"CLIP tokenizer.*77-token limit.*prompt 1: 45 of 122"):
        ids = clip(["a dog", long])
    assert ids.shape == (2, 77) and ids[1, -1] == snapshot["vocab"]["<|endoftext|>"]
    n = t5.lengths(long)[0]
    with pytest.warns(UserWarning, match=rf"T5 tokenizer.*16-token limit.*prompt 0: {n - 16} of {n}"):
        ids = t5(long)
    assert ids.shape == (1, 16) and ids[0, -1] == 1  # the kept sequence still ends with </s>
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip("a red cat")  # no warning below the limit


def test_bad_input(snapshot, tmp_path):
    clip = load_clip_tokenizer(snapshot["root"] / "tokenizer")
    with pytest.raises(ValueError, match="empty list of prompts"):
        clip([])
    with pytest.raises(TypeError, match="strings"):
        clip(["ok", 3])
    with pytest.raises(FileNotFoundError, match="tokenizer_2"):
        load_t5_tokenizer(tmp_path)
