"""GenEval-mini quality benchmark: prompt fidelity of bf16 vs 1.58-bit (absmean ternary) FLUX.

GenEval's protocol in miniature: a fixed prompt set (scenes.evaluation_prompts: 64 prompts in each
of the six categories by default, 384 in all), 4 images per prompt from fixed seeds, each image
checked by geneval_mini.check; a category's score is its share of passing images, "overall" the
mean of the six (GenEval's aggregate).

Variants (--variants, comma separated):
  bf16               the model as shipped, converted with `flaxflux convert` (no quantization)
  ternary-tensor     `flaxflux convert --quantize ternary` (absmean, one scale per matrix: the paper's)
  ternary-channel    ... --granularity channel (one scale per output channel)
  NAME=PATH          any converted flaxflux folder or FLUX snapshot, e.g. a distilled ternary model;
                     a transformer-only folder (flaxflux/refmodel/distilled) takes the rest from --model
Default: bf16, both absmean variants and, for the shipped reference model, its shipped distilled
transformer ("distilled"): the three the distillation issue compares.

Every variant sees the same prompts and the same initial noise, so differences are the weights'.

    python benchmarks/quality.py --model flaxflux/refmodel/model                   # GPU: a few minutes
    python benchmarks/quality.py --model flaxflux/refmodel/model --limit 12 --images 1   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

BUILTIN = {"bf16": ("none", "tensor"), "ternary-tensor": ("ternary", "tensor"),
           "ternary-channel": ("ternary", "channel")}
DEFAULT_VARIANTS = "bf16,ternary-tensor,ternary-channel"
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "flaxflux" / "refmodel" / "model"
SHIPPED_DISTILLED = SHIPPED_MODEL.parent / "distilled"


def default_variants(model: str) -> str:
    """The built-in variants, plus the shipped distilled transformer when --model is the shipped
    reference model (it fits no other model)."""
    if Path(model).resolve() == SHIPPED_MODEL and (SHIPPED_DISTILLED / "transformer").is_dir():
        return f"{DEFAULT_VARIANTS},distilled={SHIPPED_DISTILLED}"
    return DEFAULT_VARIANTS


def load_converter():
    """flaxflux.convert.convert; in a checkout that is not pip-installed (the GPU machine), the
    top-level convert/ folder that installs as flaxflux.convert."""
    try:
        from flaxflux.convert import convert
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from convert import convert
    return convert


def transformer_only(path: str) -> bool:
    """A flaxflux folder holding only a transformer (flaxflux/refmodel/distilled)."""
    return (Path(path) / "transformer").is_dir() and not (Path(path) / "vae").is_dir()


def parse_variants(text: str) -> list[tuple[str, str | None]]:
    """[(name, path or None for a built-in conversion)]."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        if "=" in item:
            name, path = item.split("=", 1)
            if not Path(path).is_dir():
                raise SystemExit(f"--variants: {path} (variant {name!r}) is not a folder")
            out.append((name, path))
        elif item in BUILTIN:
            out.append((item, None))
        else:
            raise SystemExit(f"--variants: unknown variant {item!r} (built-in: {', '.join(BUILTIN)}; or NAME=PATH)")
    if not out:
        raise SystemExit("--variants: nothing to evaluate")
    return out


def prompt_set(per_category: int, images: int, limit: int | None, seed: int) -> tuple[list, list[int]]:
    """(PromptSpec per image, noise seed per image): each prompt `images` times with seeds
    seed + images * i + j, as GenEval samples several images per prompt."""
    from flaxflux import scenes

    prompts = scenes.evaluation_prompts(per_category, seed=0)
    if limit is not None:
        # an even share of every category, so a short run still covers all six
        by_cat = [[p for p in prompts if p.category == c] for c in scenes.CATEGORIES]
        prompts = [p for group in zip(*by_cat) for p in group][:limit]
    specs = [p for p in prompts for _ in range(images)]
    seeds = [seed + images * i + j for i in range(len(prompts)) for j in range(images)]
    return specs, seeds


def _check_one(args):
    from flaxflux import geneval_mini

    image, spec = args
    return geneval_mini.check(image, spec)


def check_all(images: Sequence[np.ndarray], specs: Sequence, workers: int) -> list:
    """geneval_mini.check of every image (in worker processes when workers > 1)."""
    jobs = list(zip(images, specs))
    if workers <= 1:
        return [_check_one(j) for j in jobs]
    with mp.get_context("spawn").Pool(workers) as pool:
        return pool.map(_check_one, jobs, chunksize=max(1, len(jobs) // (8 * workers)))


def generate(pipe, specs: Sequence, seeds: Sequence[int], *, size: int, steps: int, guidance: float,
             batch: int) -> tuple[list[np.ndarray], float]:
    """uint8 images for every (prompt, seed), in fixed-size batches (the last one padded, so one
    compile serves all); returns (images, seconds after the first batch's compile)."""
    out: list[np.ndarray] = []
    t_first = None
    t0 = time.perf_counter()
    for a in range(0, len(specs), batch):
        p = [s.text for s in specs[a:a + batch]]
        sd = list(seeds[a:a + batch])
        n = len(p)
        p += [p[-1]] * (batch - n)
        sd += [sd[-1]] * (batch - n)
        imgs = pipe(p, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance, seed=sd,
                    output_type="np", progress=False)
        out += [np.round(np.asarray(x) * 255.0).astype(np.uint8) for x in imgs[:n]]  # as a saved PNG holds it
        if t_first is None:
            t_first = time.perf_counter()
    steady = time.perf_counter() - t_first if len(specs) > batch else time.perf_counter() - t0
    return out, steady


def save_grid(images: Sequence[np.ndarray], path: Path, cols: int = 8) -> None:
    from PIL import Image

    images = list(images)[: 4 * cols]
    h, w = images[0].shape[:2]
    rows = -(-len(images) // cols)
    grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    Image.fromarray(grid).save(path)


def format_table(results: dict[str, dict]) -> str:
    from flaxflux.scenes import CATEGORIES

    cols = [*CATEGORIES, "overall"]
    lines = ["| variant | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['scores'].get(c, float('nan')):.3f}" for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the shipped model folder (diffusers FLUX layout)")
    p.add_argument("--variants", help="default: bf16, ternary-tensor, ternary-channel (and distilled, see above)")
    p.add_argument("--per-category", type=int, default=64, help="prompts per category (6 categories)")
    p.add_argument("--images", type=int, default=4, help="images per prompt")
    p.add_argument("--limit", type=int, help="evaluate only this many prompts (an even share of each category)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64, help="images per pipeline call")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--ternary-backend", default=None, help="pallas_kernels backend for ternary variants (default auto)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="checker processes")
    p.add_argument("--out", default="benchmarks/quality.json", help="JSON results")
    p.add_argument("--grids", help="folder for a sample grid PNG per variant")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from flaxflux import FluxPipeline, geneval_mini

    convert = load_converter()

    variants = parse_variants(args.variants or default_variants(args.model))
    specs, seeds = prompt_set(args.per_category, args.images, args.limit, args.seed)
    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[args.dtype]
    print(f"GenEval-mini: {len(specs) // args.images} prompts x {args.images} images, {args.size}px, "
          f"{args.steps} steps, guidance {args.guidance}, {args.dtype}, on {jax.devices()[0].device_kind}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="flaxflux-quality-") as tmp:
        for name, path in variants:
            t = time.perf_counter()
            if path is None:
                quantize, granularity = BUILTIN[name]
                path = str(Path(tmp) / name)
                convert(args.model, path, quantize=quantize, granularity=granularity, progress=False)
            t_convert = time.perf_counter() - t
            if transformer_only(path):  # e.g. the shipped distilled transformer: the rest from --model
                pipe = FluxPipeline.from_pretrained(args.model, dtype=dtype, transformer=path)
            else:
                pipe = FluxPipeline.from_pretrained(path, dtype=dtype)
            if args.ternary_backend and name != "bf16":
                pipe.set_ternary_options(backend=args.ternary_backend)
            t = time.perf_counter()
            batch = min(args.batch, len(specs))  # a short run compiles for what it needs
            images, steady = generate(pipe, specs, seeds, size=args.size, steps=args.steps, guidance=args.guidance,
                                      batch=batch)
            t_gen = time.perf_counter() - t
            t = time.perf_counter()
            checks = check_all(images, specs, args.workers)
            t_check = time.perf_counter() - t
            scores = geneval_mini.score(checks)
            n_after_first = max(len(images) - batch, 0) or len(images)
            results[name] = {
                "path": path if name not in BUILTIN else None, "scores": scores, "images": len(images),
                "seconds": {"convert": round(t_convert, 1), "generate": round(t_gen, 1), "check": round(t_check, 1)},
                "images_per_s": round(n_after_first / steady, 2) if steady > 0 else None,
                "failures": [{"prompt": c.prompt, "seed": s, "reason": c.reason}
                             for c, s in zip(checks, seeds) if not c.passed][:50],
            }
            print(f"{name}: overall {scores['overall']:.3f}  ({len(images)} images, generate {t_gen:.0f} s, "
                  f"check {t_check:.0f} s)")
            if args.grids:
                Path(args.grids).mkdir(parents=True, exist_ok=True)
                save_grid(images[:: args.images], Path(args.grids) / f"{name}.png")
            del pipe
    print()
    print(format_table(results))
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "grids", "workers")},
              "prompts": len(specs) // args.images, "device": jax.devices()[0].device_kind, "variants": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
