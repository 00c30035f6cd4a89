"""Tokenizers read from FLUX-layout folders built here (no downloads): a sentencepiece T5 model
trained on a small corpus, and a hand-written byte-level BPE vocab + merges for CLIP."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from flaxflux.tokenization import load_clip_tokenizer, load_t5_tokenizer, load_tokenizers

import snapshots

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a red cat on the circle!", "A photo of a DOG in the city at night", "zebra, 42 x"]
CLIP_MERGES = snapshots.CLIP_MERGES


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """tokenizer/ (vocab.json, merges.txt, tokenizer_config.json) and tokenizer_2/ (spiece.model +
    what transformers writes), as in a FLUX.1-dev snapshot; and a folder with spiece.model alone."""
    root = tmp_path_factory.mktemp("flux")
    toks = snapshots.write_tokenizers(root)
    only_spm = root / "spm_only"
    only_spm.mkdir()
    (only_spm / "spiece.model").write_bytes(toks["spm"])
    return dict(root=root, vocab=toks["vocab"], spm=toks["spm"], spm_only=only_spm)


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
