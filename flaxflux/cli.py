"""`flaxflux` command line: convert, generate, info, demo, distill."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from flaxflux.convert import convert

    summary = convert(args.src, args.out, quantize=args.quantize, granularity=args.granularity,
                      force=args.force, progress=not args.no_progress, config=args.config)
    print("\n".join(summary.lines()))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from .pipeline import FluxPipeline, save_png

    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[args.dtype]
    pipe = FluxPipeline.from_pretrained(args.model, dtype=dtype)
    if args.activations != "native":
        pipe.set_ternary_options(activations=args.activations)
    images = pipe([args.prompt] * args.batch, height=args.height, width=args.width,
                  num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                  progress=not args.no_progress)
    out = Path(args.out)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for img, path in zip(images, paths):
        save_png(img, path)
        print(path)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import describe, format_info

    d = describe(args.dir)
    if args.json:
        import json

        print(json.dumps(d, indent=2))
    else:
        print(format_info(d))
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    import dataclasses

    from .distill import DistillConfig, OutOfTime, distill

    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    kw = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.guidance_range is not None:
        kw["guidance_range"] = tuple(args.guidance_range)
    if args.distributed:
        import jax

        jax.distributed.initialize()
    try:
        out = distill(args.teacher, args.prompts, args.out, DistillConfig(**kw), work=args.work, force=args.force,
                      time_limit_min=args.time_limit, progress=not args.no_progress)
    except OutOfTime as e:
        print(f"flaxflux distill: {e}", file=sys.stderr)
        return 3
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flaxflux", description="1.58-bit FLUX in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="convert a FLUX checkpoint into a flaxflux model folder")
    p.add_argument("src", help="FLUX snapshot folder, component folder, or BFL .safetensors file")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--quantize", choices=("none", "ternary"), default="none")
    p.add_argument("--granularity", choices=("tensor", "channel"), default="tensor",
                   help="ternary scale per tensor (the paper's setting) or per output channel")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--config", help="config.json of the one component converted (or of the transformer of a "
                   "snapshot): for BFL files whose shape the FLUX.1 presets do not describe")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_convert)
    p = sub.add_parser("generate", help="text to image with a flaxflux folder or FLUX snapshot")
    p.add_argument("--model", required=True, help="flaxflux model folder or diffusers FLUX snapshot")
    p.add_argument("--prompt", required=True)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--activations", choices=("native", "int8"), default="native",
                   help="ternary models: int8 per-token activations (W1.58A8)")
    p.add_argument("--out", required=True, help="PNG path (FILE-i.png for each image of a batch)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_generate)
    p = sub.add_parser("info", help="describe a flaxflux model folder")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("distill", help="distill a bf16 FLUX into a 1.58-bit one from its own outputs")
    p.add_argument("teacher", help="the bf16 teacher: flaxflux model folder or diffusers FLUX snapshot")
    p.add_argument("prompts", help="text file, one calibration prompt per line")
    p.add_argument("out", help="output: a ternary flaxflux model folder (written atomically at the end)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--granularity", choices=("tensor", "channel"))
    p.add_argument("--objective", choices=("velocity", "flow"),
                   help="velocity: match the teacher's velocity (default); flow: reflow on the teacher's samples")
    p.add_argument("--onpolicy", type=float,
                   help="fraction of each batch taken from the student's own sampling trajectories "
                        "(default 0.25; 0: the teacher's trajectories only)")
    p.add_argument("--rollout-every", type=int,
                   help="steps between refreshes of the student's trajectories (default 500)")
    p.add_argument("--rollout-samples", type=int,
                   help="samples the student rolls out per refresh (default 8 x batch)")
    p.add_argument("--size", type=int, help="image side (default: the scheduler's base resolution)")
    p.add_argument("--samples-per-prompt", type=int)
    p.add_argument("--sample-steps", type=int, help="teacher sampling steps for the teacher data")
    p.add_argument("--guidance-range", type=float, nargs=2)
    p.add_argument("--holdout", type=int, help="prompts kept out for the held-out velocity error")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--remat", action="store_true", default=None, help="recompute activations (large models)")
    p.add_argument("--work", help="work folder: teacher data, checkpoints, log (default OUT.work)")
    p.add_argument("--time-limit", type=float, help="minutes; checkpoint and exit 3 (rerun to continue)")
    p.add_argument("--distributed", action="store_true", help="multi-host: jax.distributed.initialize() first")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_distill)
    p = sub.add_parser("demo", help="run the embedded default job end to end")
    p.add_argument("--out", default="out", help="folder for the demo's outputs")
    p.set_defaults(func=_cmd_demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad input: one clear line, non-zero exit
        print(f"flaxflux {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
