"""`flaxflux info DIR`: what a flaxflux model folder holds, computed without loading weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from .config import FluxConfig
from .loading import abstract_model, model_factory
from .model_folder import ROOT_FILE, find_root, open_component
from .safetensors_io import CheckpointError


def describe(path: str | Path) -> dict[str, Any]:
    """Components, format version, quantization, parameter counts and bytes (disk, memory, bf16)."""
    path = Path(path)
    root = find_root(path)
    if root is None:
        raise CheckpointError(f"{path}: not a flaxflux model folder (no {ROOT_FILE})")
    import json

    top = json.loads((root / ROOT_FILE).read_text())
    out: dict[str, Any] = {"path": str(root), "format_version": top["format_version"],
                           "components": top.get("components", []), "not_converted": top.get("not_converted", [])}
    files, info = open_component(root, "transformer", verify=False)
    cfg = FluxConfig.from_dict(info["config"])
    quant = info.get("quantization", "none")
    disk = sum(f.stat().st_size for f in files)
    ternary = 0
    model_fn, _ = model_factory(cfg, info, jnp.bfloat16)
    module, _, _, _, flat = abstract_model(model_fn)
    memory = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in flat.values())
    dense_params = sum(int(np.prod(v.shape)) for v in
                       abstract_model(model_factory(cfg, {"quantization": "none"})[0])[-1].values())
    if quant == "ternary":
        from .ternary import count_parameters

        ternary = count_parameters(module)["ternary_params"]
    bf16_bytes = 2 * dense_params
    out["transformer"] = {
        "config": cfg.to_dict(), "quantization": quant, "granularity": info.get("granularity"),
        "packing": info.get("packing"), "storage": info.get("storage"),
        "parameters": dense_params, "ternary_parameters": ternary, "bf16_parameters": dense_params - ternary,
        "bytes_on_disk": disk, "bytes_in_memory": memory, "bytes_bf16": bf16_bytes,
        "disk_ratio_vs_bf16": bf16_bytes / disk, "memory_ratio_vs_bf16": bf16_bytes / memory,
    }
    return out


def format_info(d: dict[str, Any]) -> str:
    t = d["transformer"]
    lines = [f"{d['path']}  (flaxflux format v{d['format_version']})",
             f"components: {', '.join(d['components'])}"
             + (f"   (not converted yet: {', '.join(d['not_converted'])})" if d["not_converted"] else ""),
             f"transformer: quantization={t['quantization']}"
             + (f" granularity={t['granularity']} packing={t['packing']} storage={t['storage']}"
                if t["quantization"] != "none" else ""),
             f"  parameters: {t['parameters']:,} ({t['ternary_parameters']:,} ternary, "
             f"{t['bf16_parameters']:,} 16-bit)",
             f"  on disk:   {t['bytes_on_disk'] / 1e9:.3f} GB  ({t['disk_ratio_vs_bf16']:.2f}x smaller than bf16)",
             f"  in memory: {t['bytes_in_memory'] / 1e9:.3f} GB  ({t['memory_ratio_vs_bf16']:.2f}x smaller than bf16)",
             f"  bf16:      {t['bytes_bf16'] / 1e9:.3f} GB"]
    return "\n".join(lines)
