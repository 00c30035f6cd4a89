"""The transformer component: a BFL file or diffusers folder -> flaxflux transformer/."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from flaxflux.config import FluxConfig
from flaxflux.loading import (abstract_model, check_source, expected_tensors, model_factory,
                              open_transformer)
from flaxflux.safetensors_io import TAGS
from flaxflux.ternary import TRITS

from .core import Planned, Prepared, Staging, Summary, shard_metadata

QUANTIZATIONS = ("none", "ternary")


def prepare_transformer(src_path: Path, quantize: str, granularity: str,
                        config: FluxConfig | Mapping[str, Any] | str | Path | None = None) -> Prepared:
    """Validate the source fully and plan `transformer/`; nothing is written here."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"--quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    src, cfg, info = open_transformer(src_path, config)
    if info.get("quantization", "none") != "none":
        raise ValueError(f"{src_path} is already a converted ({info['quantization']}) flaxflux folder")

    # All checks against the dense model first: nothing is written for a bad source.
    dense_fn, _ = model_factory(cfg, {"quantization": "none"}, jnp.bfloat16)
    dense = expected_tensors(abstract_model(dense_fn)[-1])
    check_source(src, dense)

    comp = {"quantization": quantize, "granularity": granularity} if quantize != "none" else {"quantization": "none"}
    model_fn, codec = model_factory(cfg, comp, jnp.bfloat16)
    stored = expected_tensors(abstract_model(model_fn)[-1], codec)
    plan = []
    for name, sds in stored.items():
        origin = codec.source_name(name)
        n_in = int(np.prod(dense[origin].shape))
        if name.endswith(TRITS):
            tag, params = "U8", n_in
        elif jnp.issubdtype(sds.dtype, jnp.floating) and origin == name:
            tag, params = src.dtype_tag(name), n_in  # dense tensors keep the source dtype: bit-exact
        else:
            tag, params = TAGS[np.dtype(sds.dtype)], int(np.prod(sds.shape))
        # Source bytes are counted once, on the tensor that reads them.
        read = src.nbytes(origin) if not name.endswith("weight_scale") else 0
        plan.append(Planned(name, tag, tuple(sds.shape), read, params))

    files = src.files()
    metadata = shard_metadata("transformer", files, quantization=quantize)
    if quantize == "ternary":
        metadata.update(granularity=granularity, storage="base3-5-per-byte", **pk.layout_metadata())
    component = {"flaxflux_component": "transformer", "config": cfg.to_dict(), **comp}
    if quantize == "ternary":
        component.update(storage="base3-5-per-byte", **pk.layout_metadata())
    component["source_files"] = {f.name: f.stat().st_size for f in files}
    return Prepared("transformer", plan, lambda p: codec.encode(p.name, src), metadata, component, files)


def convert_transformer(src_path: Path, staging: Staging, quantize: str, granularity: str,
                        progress: Callable[[int], None], summary: Summary,
                        config: FluxConfig | Mapping[str, Any] | str | Path | None = None) -> None:
    """Validate the source fully, then stream it into `transformer/`."""
    prepare_transformer(src_path, quantize, granularity, config).write(staging, progress, summary)


__all__ = ["QUANTIZATIONS", "convert_transformer", "prepare_transformer"]
