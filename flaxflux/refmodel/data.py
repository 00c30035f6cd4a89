"""Training data: seeded scene renders, cached as .npy.

Rendering one 128x128 scene takes ~1 ms of numpy; a GPU training step eats hundreds of images in
a few milliseconds, so the data is rendered once, in parallel, before training and kept as arrays
(on the GPU during training). Example i is a pure function of (seed, stream, i): its own numpy
Generator, so the data does not depend on how the work is split among processes.

- VAE stage: `render_images` -> uint8 (N, H, W, 3).
- Transformer stages: `render_examples` -> images + captions; the trainer encodes the images with
  the trained VAE into latents and stores (latents, caption index) with a table of the distinct
  captions (a few thousand), index 0 being "" (the unconditional prompt of caption dropout).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .. import scenes

VAE_STREAM = 1
TRAIN_STREAM = 2


def _render_range(args: tuple[int, int, int, int, int]) -> tuple[np.ndarray, list[str], list[str]]:
    seed, stream, start, stop, size = args
    images = np.empty((stop - start, size, size, 3), np.uint8)
    captions, categories = [], []
    for j, i in enumerate(range(start, stop)):
        img, cap, cat = scenes.sample_training_example(np.random.default_rng([seed, stream, i]), size=size)
        images[j] = img
        captions.append(cap)
        categories.append(cat)
    return images, captions, categories


def default_workers() -> int:
    return max(1, min(32, (os.cpu_count() or 1)))


def iter_examples(seed: int, stream: int, start: int, stop: int, size: int, workers: int | None = None,
                  chunk: int = 1024) -> Iterator[tuple[np.ndarray, list[str], list[str]]]:
    """Examples [start, stop) of a stream, in order, in chunks of up to `chunk`:
    (uint8 images (n, size, size, 3), captions, categories).

    workers > 1 renders in one pool of spawned processes (spawn, not fork: the parent holds a
    multithreaded JAX runtime, which fork does not survive reliably)."""
    workers = default_workers() if workers is None else workers
    jobs = [(seed, stream, a, min(a + chunk, stop), size) for a in range(start, stop, chunk)]
    if workers <= 1 or len(jobs) == 1:
        yield from map(_render_range, jobs)
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_render_range, jobs)  # imap keeps the order: captions line up with images


def render_examples(seed: int, stream: int, start: int, stop: int, size: int, workers: int | None = None
                    ) -> tuple[np.ndarray, list[str], list[str]]:
    """`iter_examples` gathered into one array."""
    workers = default_workers() if workers is None else workers
    chunk = max(16, min(1024, -(-(stop - start) // (4 * workers))))  # ~4 jobs per worker: balanced
    images = np.empty((stop - start, size, size, 3), np.uint8)
    captions: list[str] = []
    categories: list[str] = []
    offset = 0
    for imgs, caps, cats in iter_examples(seed, stream, start, stop, size, workers, chunk):
        images[offset:offset + len(imgs)] = imgs
        offset += len(imgs)
        captions += caps
        categories += cats
    return images, captions, categories


def render_images(seed: int, n: int, size: int, workers: int | None = None) -> np.ndarray:
    """The VAE's training images (a stream of its own)."""
    return render_examples(seed, VAE_STREAM, 0, n, size, workers)[0]


def caption_table(captions: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(distinct captions with "" first, index of each caption in it)."""
    table = [""] + sorted(set(captions) - {""})
    where = {c: i for i, c in enumerate(table)}
    return table, np.asarray([where[c] for c in captions], np.int32)


def tokenize_table(table: Sequence[str], clip_tok, t5_tok, t5_length: int, clip_length: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(T5 ids (U, t5_length), CLIP ids (U, clip_length)) int32, padded as the pipelines pad.

    CLIP is padded to `clip_length` (training runs CLIP on fewer positions than its 77: causal,
    pooled at the first EOS, so the result is the same); every caption must fit untruncated."""
    t5 = t5_tok(list(table), padding="max_length", max_length=t5_length, truncation=False, return_tensors="np")
    clip = clip_tok(list(table), padding="max_length", max_length=clip_length, truncation=False, return_tensors="np")
    t5_ids, clip_ids = np.asarray(t5["input_ids"], np.int32), np.asarray(clip["input_ids"], np.int32)
    if t5_ids.shape[1] != t5_length or clip_ids.shape[1] != clip_length:
        raise ValueError(f"captions longer than the T5 ({t5_length}) or CLIP ({clip_length}) training length")
    return t5_ids, clip_ids


def save_arrays(folder: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write .npy files and meta.json; meta.json last, as the marker that the set is complete."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        tmp = folder / f".{name}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, a)
        os.replace(tmp, folder / f"{name}.npy")
    tmp = folder / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, folder / "meta.json")


def load_arrays(folder: Path, names: Sequence[str]) -> tuple[dict[str, np.ndarray], dict] | None:
    """The arrays and meta saved by `save_arrays`, or None if the set is absent or incomplete."""
    if not (folder / "meta.json").is_file():
        return None
    return {n: np.load(folder / f"{n}.npy") for n in names}, json.loads((folder / "meta.json").read_text())


def calibration_prompts(n: int = 2048, seed: int = 20241224) -> list[str]:
    """Distillation prompts (the role Parti + T2I-CompBench play for the paper): n distinct
    seeded captions of the scenes world, none of them a GenEval-mini evaluation prompt, so the
    quality benchmark measures prompts the distillation never saw."""
    held_out = {scenes.caption(p) for p in scenes.evaluation_prompts()}
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(200 * n):
        c = scenes.caption(scenes.sample_prompt(rng))
        if c not in held_out and c not in seen:
            seen.add(c)
            out.append(c)
            if len(out) == n:
                return out
    raise ValueError(f"the scenes world has fewer than {n} distinct non-evaluation captions ({len(out)} found)")
