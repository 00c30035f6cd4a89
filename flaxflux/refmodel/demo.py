"""The demo on the shipped reference model: convert it (bf16 and absmean 1.58-bit) with the real
converter, load the distilled 1.58-bit transformer (`flaxflux distill`, shipped beside it),
generate fixed prompts with each from the same noise, write a side-by-side grid PNG, and print
GenEval-mini verdicts and timings. `flaxflux demo` calls `run_demo`.

Sized for the 2-core CPU machine: 8 prompts x 3 variants at 128x128 and 28 steps (~1 min there).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import scenes
from . import DISTILLED_TRANSFORMER, SHIPPED_MODEL

O = scenes.ObjectSpec
P = scenes.PromptSpec
# One or two prompts of each GenEval category, in the evaluation's wording.
DEMO_PROMPTS: tuple[scenes.PromptSpec, ...] = (
    P("single_object", (O("circle"),)),
    P("colors", (O("triangle", "red"),)),
    P("colors", (O("square", "blue"),)),
    P("counting", (O("diamond", None, 3),)),
    P("two_object", (O("cross"), O("circle"))),
    P("position", (O("square"), O("triangle")), "left of"),
    P("position", (O("circle"), O("diamond")), "above"),
    P("color_attr", (O("circle", "yellow"), O("square", "purple"))),
)
DISTILLED = "1.58-bit distilled"
ABSMEAN = "1.58-bit absmean"


def _label(text: str, width: int, height: int = 14) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(img).text((2, 1), text, fill=(0, 0, 0))
    return np.asarray(img)


def grid(rows: Sequence[tuple[str, Sequence[np.ndarray]]], columns: Sequence[str], scale: int = 2) -> np.ndarray:
    """One row per prompt (its text above), one column per variant; images upscaled for viewing."""
    blocks = []
    cell = None
    for text, images in rows:
        ims = [np.kron(im, np.ones((scale, scale, 1), np.uint8)) for im in images]
        cell = ims[0].shape[1]
        gap = np.full((ims[0].shape[0], 4, 3), 255, np.uint8)
        line = np.concatenate([x for im in ims for x in (im, gap)][:-1], axis=1)
        blocks += [_label(text, line.shape[1]), line]
    gap = np.full((14, 4, 3), 255, np.uint8)
    header = np.concatenate([x for c in columns for x in (_label(c, cell), gap)][:-1], axis=1)
    return np.concatenate([header] + blocks, axis=0)


def run_demo(out_dir: str | Path = "out", model_dir: str | Path | None = None, *, steps: int = 28,
             guidance: float = 3.5, seed: int = 0, size: int = 128,
             prompts: Sequence[scenes.PromptSpec] = DEMO_PROMPTS, verbose: bool = True,
             distilled: str | Path | None = None) -> dict[str, Any]:
    """Convert, generate, grid, check. Returns {"png": path, "scores": {variant: {...}}, "seconds": {...}}.

    Variants: bf16; the distilled ternary transformer `distilled` (default: the shipped one, with
    the shipped model) over the bf16 folder's other components; absmean ternary (no distillation:
    what the paper's step must repair)."""
    import jax.numpy as jnp

    from .. import geneval_mini
    from ..convert import convert
    from ..pipeline import FluxPipeline, save_png

    say = print if verbose else (lambda *a, **k: None)
    model = Path(model_dir) if model_dir is not None else SHIPPED_MODEL
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"{model}: no reference model here (model_index.json missing); train and export one "
                                "with `python -m flaxflux.refmodel.train --out RUN --export "
                                f"{SHIPPED_MODEL}`")
    if distilled is None and model_dir is None and (DISTILLED_TRANSFORMER / "transformer").is_dir():
        distilled = DISTILLED_TRANSFORMER
    variants = [("bf16", "none", None)] + ([(DISTILLED, "none", Path(distilled))] if distilled else []) + [
        (ABSMEAN, "ternary", None)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = [p.text for p in prompts]
    seeds = [seed + i for i in range(len(prompts))]
    seconds: dict[str, dict[str, float]] = {}
    images: dict[str, list[np.ndarray]] = {}
    results: dict[str, Any] = {}
    for name, quantize, transformer in variants:
        t = {}
        t0 = time.perf_counter()
        folder = out / f"refmodel-{'bf16' if quantize == 'none' else 'ternary'}"
        if transformer is None:  # the distilled variant reuses the bf16 folder's other components
            convert(model, folder, quantize=quantize, force=True, progress=False)
        t["convert"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe = FluxPipeline.from_pretrained(folder, dtype=jnp.bfloat16, transformer=transformer)
        t["load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        arr = pipe(texts, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance, seed=seeds,
                   output_type="np", progress=False)
        t["generate (with compile)"] = time.perf_counter() - t0
        images[name] = [np.round(a * 255).astype(np.uint8) for a in arr]
        checks = [geneval_mini.check(im, p) for im, p in zip(images[name], prompts)]
        results[name] = {"scores": geneval_mini.score(checks), "passed": [c.passed for c in checks]}
        seconds[name] = {k: round(v, 2) for k, v in t.items()}
        say(f"{name:>18}: convert {t['convert']:.1f} s, load {t['load']:.1f} s, "
            f"{len(texts)} images x {steps} steps {t['generate (with compile)']:.1f} s (incl. compile)")
    from PIL import Image

    rows = []
    for i, p in enumerate(prompts):
        marks = " | ".join(f"{name}: {'ok' if results[name]['passed'][i] else 'miss'}" for name, *_ in variants)
        rows.append((f"{p.text}  [{marks}]", [images[name][i] for name, *_ in variants]))
    png = out / "demo.png"
    save_png(Image.fromarray(grid(rows, [name for name, *_ in variants])), png)
    say(f"\nGenEval-mini on the {len(prompts)} demo prompts (1 image each):")
    for name, *_ in variants:
        say(f"  {name:>18}: " + ", ".join(f"{k} {v:.2f}" for k, v in results[name]["scores"].items()))
    say(f"wrote {png}")
    return {"png": png, "scores": {k: v["scores"] for k, v in results.items()}, "seconds": seconds}
