"""`flaxflux` command line: convert, info, demo (generate arrives with the sampler)."""

from __future__ import annotations

import argparse
import sys


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


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import describe, format_info

    d = describe(args.dir)
    if args.json:
        import json

        print(json.dumps(d, indent=2))
    else:
        print(format_info(d))
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
    p.add_argument("--config", help="diffusers transformer config.json for a BFL file of non-FLUX.1 shape")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_convert)
    p = sub.add_parser("info", help="describe a flaxflux model folder")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)
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
