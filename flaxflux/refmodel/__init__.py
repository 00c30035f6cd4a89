"""The reference model (issue 8): a small FLUX.1-dev trained by the project on the scenes world.

    python -m flaxflux.refmodel.train --out out/refmodel          # the recipe (train.py)
    python -m flaxflux.refmodel.probe                             # GPU speed probe of the recipe

Submodules: config (sizes, hyperparameters, scheduler), tokenizers, data, train, export, demo.
Kept import-light: rendering workers import this package.
"""

from __future__ import annotations

from pathlib import Path

# Where the trained model ships (diffusers FLUX.1-dev layout), inside the package.
SHIPPED_MODEL = Path(__file__).resolve().parent / "model"
# The shipped model's transformer after ternary distillation (`flaxflux distill`), saved alone as
# a flaxflux transformer folder; the other components are SHIPPED_MODEL's:
#   FluxPipeline.from_pretrained(SHIPPED_MODEL, transformer=DISTILLED_TRANSFORMER)
DISTILLED_TRANSFORMER = Path(__file__).resolve().parent / "distilled"


def demo(out_dir: str | Path = "out", model_dir: str | Path | None = None, **kwargs) -> dict:
    """`flaxflux demo`'s job on the shipped model (see demo.run_demo)."""
    from .demo import run_demo

    return run_demo(out_dir, model_dir=model_dir, **kwargs)


__all__ = ["DISTILLED_TRANSFORMER", "SHIPPED_MODEL", "demo"]
