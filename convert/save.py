"""Save an in-memory FluxTransformer (dense or ternary) as a flaxflux model folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

import pallas_kernels as pk
from flaxflux import naming
from flaxflux.loading import _flat_params, abstract_model, expected_tensors, model_factory
from flaxflux.model_folder import MANIFEST, ROOT_FILE
from flaxflux.safetensors_io import TAGS
from flaxflux.ternary import PACKED, TRITS, TernaryLinear, encode_trits_np, unpack_stacked
from flaxflux.transformer import FluxTransformer

from .core import Planned, Staging, Summary, shard_metadata, write_component


def _quantization(model: FluxTransformer) -> dict:
    grans = {layer.granularity for _, layer in nnx.iter_graph(model) if isinstance(layer, TernaryLinear)}
    if not grans:
        return {"quantization": "none"}
    if len(grans) > 1:
        raise ValueError(f"mixed ternary granularities {sorted(grans)} cannot be saved as one folder")
    return {"quantization": "ternary", "granularity": grans.pop()}


def save_transformer(model: FluxTransformer, out: str | Path, *, force: bool = False,
                     components_from: str | Path | None = None, source: dict | None = None) -> Summary:
    """Write `model` to `out` (atomically) in the same format `flaxflux convert` produces; loading
    it back with `load_transformer` gives the same parameters bit for bit.

    components_from: a flaxflux model folder whose other components (text encoders, VAE,
    tokenizers, scheduler, model_index.json) are copied beside the transformer, making `out` a
    whole pipeline folder. source: provenance recorded in flaxflux.json."""
    if components_from is not None:
        components_from = Path(components_from)
        if not (components_from / MANIFEST).is_file():
            raise FileNotFoundError(f"components_from={components_from}: not a flaxflux model folder "
                                    f"(no {MANIFEST}); convert it first with `flaxflux convert`")
    cfg = model.config
    comp = _quantization(model)
    model_fn, codec = model_factory(cfg, comp, model.dtype)
    stored = expected_tensors(abstract_model(model_fn)[-1], codec)
    flat = _flat_params(nnx.to_pure_dict(nnx.state(model)))
    where = {}  # stored/BFL name -> (NNX path, layer)
    for internal, (names, _) in naming.param_routes(flat).items():
        for i, name in enumerate(names):
            where[name] = (internal, i if naming.is_stacked(internal) else None)

    def produce(p: Planned) -> np.ndarray:
        if p.name.endswith(TRITS):
            internal, layer = where[p.name[: -len(TRITS)] + PACKED]
            packed = flat[internal] if layer is None else flat[internal][layer]
            k = codec.in_features[internal]
            return encode_trits_np(np.asarray(unpack_stacked(packed, k)))
        internal, layer = where[p.name]
        a = flat[internal] if layer is None else flat[internal][layer]
        return np.asarray(a)

    plan = []
    for name, sds in stored.items():
        n = int(np.prod(sds.shape))
        if name.endswith(TRITS):  # logical count: out x in codes (the last byte of a row is padded)
            n = sds.shape[0] * codec.in_features[where[name[: -len(TRITS)] + PACKED][0]]
        params = n
        plan.append(Planned(name, TAGS[np.dtype(sds.dtype)], tuple(sds.shape), 0, params))
    meta = shard_metadata("transformer", [], quantization=comp["quantization"])
    config = {"flaxflux_component": "transformer", "config": cfg.to_dict(), **comp}
    if comp["quantization"] == "ternary":
        meta.update(granularity=comp["granularity"], storage="base3-5-per-byte", **pk.layout_metadata())
        config.update(storage="base3-5-per-byte", **pk.layout_metadata())
    summary = Summary(components=["transformer"])
    with Staging(Path(out), force) as staging:
        write_component(staging, "transformer", plan, produce, meta, lambda n: None, summary)
        staging.write_json("transformer/config.json", config)
        if components_from is not None:
            for item in sorted(components_from.iterdir()):
                if item.name in ("transformer", MANIFEST, ROOT_FILE) or item.name.startswith("."):
                    continue
                if item.is_dir():
                    staging.copy_tree(item, item.name)
                    summary.components.append(item.name)
                else:
                    staging.copy_file(item, item.name)
        staging.commit({"components": summary.components, "quantization": comp["quantization"],
                        "source": {"in_memory_model": True, **(source or {})}, "not_converted": []})
    return summary
