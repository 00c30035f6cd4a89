"""FLUX's two tokenizers, read offline from a snapshot's `tokenizer/` (CLIP BPE: vocab.json +
merges.txt) and `tokenizer_2/` (T5: spiece.model / tokenizer.json) folders through transformers.

Both pad to a fixed length (CLIP 77, T5 512 by default: one compile per shape downstream) and
truncate longer prompts, with a `UserWarning` saying how many tokens were dropped; the kept
sequence still ends with the tokenizer's EOS, as FLUX's pipelines feed it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

CLIP_SUBFOLDER = "tokenizer"
T5_SUBFOLDER = "tokenizer_2"
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512


class PromptTokenizer:
    """A transformers tokenizer fixed to one padded length.

    `tok(prompts)` -> input_ids (B, max_length) int32 numpy array; `tok.lengths(prompts)` gives
    the untruncated token counts (special tokens included)."""

    def __init__(self, tokenizer: Any, max_length: int, name: str):
        if max_length < 2:
            raise ValueError(f"{name}: max_length must be at least 2, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.name = name

    @staticmethod
    def _as_list(prompts: str | Sequence[str], name: str) -> list[str]:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError(f"{name}: got an empty list of prompts; pass at least one string")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"{name}: prompts must be strings, got {', '.join(sorted(set(bad)))}")
        return prompts

    def lengths(self, prompts: str | Sequence[str]) -> list[int]:
        prompts = self._as_list(prompts, self.name)
        # verbose=False: transformers' own "longer than the maximum" log line; __call__ warns instead
        out = self.tokenizer(prompts, truncation=False, padding=False, verbose=False)
        return [len(ids) for ids in out["input_ids"]]

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        prompts = self._as_list(prompts, self.name)
        full = self.lengths(prompts)
        over = [(i, n) for i, n in enumerate(full) if n > self.max_length]
        if over:
            detail = ", ".join(f"prompt {i}: {n - self.max_length} of {n}" for i, n in over[:5])
            more = f" and {len(over) - 5} more prompts" if len(over) > 5 else ""
            warnings.warn(f"{self.name}: prompts longer than the {self.max_length}-token limit were truncated; "
                          f"tokens dropped: {detail}{more}", UserWarning, stacklevel=2)
        out = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="np")
        return np.asarray(out["input_ids"], dtype=np.int32)


def _folder(path: str | Path, subfolder: str, marker: tuple[str, ...]) -> Path:
    """The tokenizer folder itself, or `path/subfolder` of a snapshot (or flaxflux) root."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such tokenizer folder")
    if any((p / m).is_file() for m in marker):
        return p
    if (p / subfolder).is_dir():
        return p / subfolder
    raise FileNotFoundError(f"{p}: not a tokenizer folder (none of {', '.join(marker)}) and has no {subfolder}/")


def _load(cls_name: str, path: str | Path, subfolder: str, markers: tuple[str, ...], needs: str,
          max_length: int | None, name: str, default_length: int) -> PromptTokenizer:
    import transformers

    folder = _folder(path, subfolder, markers)
    try:
        tok = getattr(transformers, cls_name).from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{folder}: cannot load the {name} (needs {needs}): {e}") from e
    if max_length is None:
        # the folder's own model_max_length (transformers reports a huge number when unset),
        # capped at the FLUX default
        max_length = min(int(tok.model_max_length), default_length)
    return PromptTokenizer(tok, max_length, name)


def load_clip_tokenizer(path: str | Path, max_length: int = CLIP_MAX_LENGTH) -> PromptTokenizer:
    """CLIPTokenizer from a `tokenizer/` folder (vocab.json + merges.txt, or tokenizer.json) or a
    snapshot root. Local files only."""
    return _load("CLIPTokenizer", path, CLIP_SUBFOLDER, ("vocab.json", "tokenizer.json"),
                 "vocab.json + merges.txt or tokenizer.json", max_length, "CLIP tokenizer", CLIP_MAX_LENGTH)


def load_t5_tokenizer(path: str | Path, max_length: int | None = T5_MAX_LENGTH) -> PromptTokenizer:
    """T5TokenizerFast from a `tokenizer_2/` folder (spiece.model and/or tokenizer.json) or a
    snapshot root. Local files only. max_length=None: the folder's `model_max_length` (at most
    512), e.g. 32 for the project's reference model, whose transformer was trained at 32 tokens."""
    return _load("T5TokenizerFast", path, T5_SUBFOLDER, ("spiece.model", "tokenizer.json"),
                 "spiece.model or tokenizer.json", max_length, "T5 tokenizer", T5_MAX_LENGTH)


def load_tokenizers(root: str | Path, t5_max_length: int = T5_MAX_LENGTH,
                    clip_max_length: int = CLIP_MAX_LENGTH) -> tuple[PromptTokenizer, PromptTokenizer]:
    """(CLIP, T5) tokenizers of a FLUX snapshot (or flaxflux model folder) root."""
    root = Path(root)
    return (load_clip_tokenizer(root / CLIP_SUBFOLDER, clip_max_length),
            load_t5_tokenizer(root / T5_SUBFOLDER, t5_max_length))
