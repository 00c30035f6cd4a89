"""The reference model's two tokenizers, built from the scene captions' vocabulary (no downloads).

- `tokenizer_2/` (T5): a unigram sentencepiece model trained on seeded scene captions, saved the
  way FLUX.1-dev's is (spiece.model beside transformers' tokenizer.json), with T5's special ids
  (pad 0, </s> 1, unk 2), no sentinel <extra_id_*> tokens (no span corruption is trained), and
  `model_max_length` = the T5 length both pipelines pad to.
- `tokenizer/` (CLIP): a byte-level BPE in CLIP's format (vocab.json + merges.txt: the 256 byte
  symbols, their `</w>` forms, the learned merges, then <|startoftext|> and <|endoftext|>, the
  largest id, as in CLIP-L), with merges learned on the vocabulary so that every caption word is
  one token.

Both are deterministic (single-threaded sentencepiece on a seeded corpus; BPE merges learned here
with fixed tie-breaking), and
`build_tokenizers` checks what the model relies on: every caption word is one CLIP token and at
most two T5 pieces (plurals split as "circle" + "s"), and the longest caption fits.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import scenes

CLIP_DIR = "tokenizer"
T5_DIR = "tokenizer_2"
T5_TARGET_VOCAB = 64  # an upper bound: sentencepiece keeps what the corpus supports (~50)


def caption_corpus(seed: int = 0, n: int = 4000) -> list[str]:
    """Seeded training captions plus every vocabulary word on its own (so each is seen)."""
    rng = np.random.default_rng([seed, 7])
    return [scenes.sample_prompt(rng).text for _ in range(n)] + list(scenes.VOCABULARY) * 5


def _spiece_model(corpus: Sequence[str]) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=T5_TARGET_VOCAB, hard_vocab_limit=False,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        num_threads=1, minloglevel=2)
    return buf.getvalue()


def learn_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges (CLIP style: the last symbol of a word carries `</w>`) that make every word one
    symbol. Each round merges the most frequent adjacent pair, ties broken by the pair itself, so
    the result is the same in every process (HF's trainer breaks ties by hash-map order)."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter(p for s in seqs for p in zip(s, s[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, s in enumerate(seqs):
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[k] = out


def _clip_bpe(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP vocab and merges with every word of `words` a single `word</w>` token."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())  # the 256 byte-level symbols (ascii letters are themselves)
    merges = learn_merges(words)
    vocab = {a: i for i, a in enumerate(alphabet)}
    vocab.update({a + "</w>": len(alphabet) + i for i, a in enumerate(alphabet)})
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def build_tokenizers(root: str | Path, *, t5_max_length: int, clip_max_length: int = 77, seed: int = 0
                     ) -> dict[str, int]:
    """Write `root/tokenizer/` (CLIP) and `root/tokenizer_2/` (T5). Returns the vocabulary sizes
    {"t5": ..., "clip": ...} and the longest caption in tokens {"t5_longest", "clip_longest"}."""
    import transformers

    root = Path(root)
    clip_dir, t5_dir = root / CLIP_DIR, root / T5_DIR
    clip_dir.mkdir(parents=True, exist_ok=True)
    t5_dir.mkdir(parents=True, exist_ok=True)

    vocab, merges = _clip_bpe(scenes.VOCABULARY)
    (clip_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (clip_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (clip_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": clip_max_length, "pad_token": "<|endoftext|>",
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, indent=2))

    model = _spiece_model(caption_corpus(seed))
    (t5_dir / "spiece.model").write_bytes(model)
    t5 = transformers.T5TokenizerFast.from_pretrained(str(t5_dir), extra_ids=0, model_max_length=t5_max_length,
                                                      local_files_only=True)
    t5.save_pretrained(str(t5_dir))
    (t5_dir / "spiece.model").write_bytes(model)  # FLUX's tokenizer_2/ keeps it beside tokenizer.json
    return check_tokenizers(root, t5_max_length=t5_max_length, clip_max_length=clip_max_length)


def load(root: str | Path) -> tuple[object, object]:
    """(CLIP, T5) transformers tokenizers of a folder holding tokenizer/ and tokenizer_2/."""
    import transformers

    root = Path(root)
    clip = transformers.CLIPTokenizer.from_pretrained(str(root / CLIP_DIR), local_files_only=True)
    t5 = transformers.T5TokenizerFast.from_pretrained(str(root / T5_DIR), local_files_only=True)
    return clip, t5


def check_tokenizers(root: str | Path, *, t5_max_length: int, clip_max_length: int = 77) -> dict[str, int]:
    """Verify the properties the model relies on; returns vocabulary sizes and longest captions."""
    clip, t5 = load(root)
    for word in scenes.VOCABULARY:
        pieces = clip(word)["input_ids"]
        if len(pieces) != 3:
            raise RuntimeError(f"CLIP tokenizer in {root}: {word!r} is not one token "
                               f"({clip.convert_ids_to_tokens(pieces)})")
        pieces = t5(word)["input_ids"]
        if len(pieces) > 4 or t5.unk_token_id in pieces:  # at most 3 pieces + </s>
            raise RuntimeError(f"T5 tokenizer in {root}: {word!r} -> {t5.convert_ids_to_tokens(pieces)}")
    if t5.model_max_length != t5_max_length or clip.model_max_length != clip_max_length:
        raise RuntimeError(f"tokenizers in {root}: model_max_length {t5.model_max_length} / {clip.model_max_length}, "
                           f"expected {t5_max_length} / {clip_max_length}")
    caps = all_captions()
    t5_longest = max(len(ids) for ids in t5(caps)["input_ids"])
    clip_longest = max(len(ids) for ids in clip(caps)["input_ids"])
    if t5_longest > t5_max_length:
        raise RuntimeError(f"the longest caption is {t5_longest} T5 tokens, over the {t5_max_length}-token length")
    if clip.convert_tokens_to_ids("<|endoftext|>") != len(clip) - 1:
        raise RuntimeError("CLIP's <|endoftext|> must be the largest id (pooling takes argmax(input_ids))")
    return {"t5": len(t5), "clip": len(clip), "t5_longest": t5_longest, "clip_longest": clip_longest}


def all_captions() -> list[str]:
    """Every caption the evaluation uses, plus the longest training forms (colors named everywhere)."""
    out = [p.text for c in scenes.CATEGORIES for p in scenes.geneval_prompts(c)]
    for c in ("two_object", "position", "counting"):
        for p in scenes.geneval_prompts(c):  # training names colors in these too: the longest captions
            objs = tuple(type(o)(o.shape, "orange" if o.color is None else o.color, o.count) for o in p.objects)
            out.append(type(p)(p.category, objs, p.relation).text)
    return out
