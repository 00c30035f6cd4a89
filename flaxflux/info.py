"""`flaxflux info DIR`: what a flaxflux model folder holds, computed without loading weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from .config import FluxConfig
from .loading import abstract_model, model_factory
from .model_folder import COMPONENT_CONFIG, MANIFEST, ROOT_FILE, find_root, open_component
from .safetensors_io import CheckpointError, read_header


def _component_sizes(root: Path, components: list[str]) -> dict[str, dict[str, Any]]:
    """Per component: bytes on disk (its safetensors shards for weight components, else all its
    files, as manifest.json lists them), and for weight components parameters (tensor elements,
    from the shard headers), tensors and stored dtypes."""
    manifest = json.loads((root / MANIFEST).read_text()).get("files", {})
    out: dict[str, dict[str, Any]] = {}
    for name in components:
        entry: dict[str, Any] = {"bytes_on_disk": sum(e["bytes"] for rel, e in manifest.items()
                                                      if rel.startswith(name + "/"))}
        found = open_component(root, name, verify=False) if (root / name / COMPONENT_CONFIG).is_file() else None
        if found is not None:
            files, _ = found
            headers = [read_header(f)[0] for f in files]
            entry["bytes_on_disk"] = sum(f.stat().st_size for f in files)
            entry["parameters"] = sum(int(np.prod(e["shape"], dtype=np.int64)) for h in headers for e in h.values())
            entry["tensors"] = sum(len(h) for h in headers)
            entry["dtypes"] = sorted({e["dtype"] for h in headers for e in h.values()})
        out[name] = entry
    return out


def _flaxflux_component(root: Path, name: str) -> bool:
    cfg = root / name / COMPONENT_CONFIG
    return cfg.is_file() and json.loads(cfg.read_text()).get("flaxflux_component") == name


def describe(path: str | Path) -> dict[str, Any]:
    """Components (parameters and bytes on disk of each), format version, and the transformer's
    quantization, parameter counts and bytes (disk, memory, bf16)."""
    path = Path(path)
    root = find_root(path)
    if root is None:
        raise CheckpointError(f"{path}: not a flaxflux model folder (no {ROOT_FILE})")
    top = json.loads((root / ROOT_FILE).read_text())
    components = top.get("components", [])
    out: dict[str, Any] = {"path": str(root), "format_version": top["format_version"],
                           "components": components, "not_converted": top.get("not_converted", []),
                           "component_sizes": {}}
    # only flaxflux-written components hold weights; tokenizer/ and scheduler/ are copies
    weights = [c for c in components if _flaxflux_component(root, c)]
    sizes = _component_sizes(root, components)
    if "transformer" in weights:
        out["transformer"] = _describe_transformer(root)
        # the transformer's count is logical (a ternary folder stores 5 weights per byte)
        sizes["transformer"]["parameters"] = out["transformer"]["parameters"]
    out["component_sizes"] = sizes
    return out


def _describe_transformer(root: Path) -> dict[str, Any]:
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
    return {
        "config": cfg.to_dict(), "quantization": quant, "granularity": info.get("granularity"),
        "packing": info.get("packing"), "storage": info.get("storage"),
        "parameters": dense_params, "ternary_parameters": ternary, "bf16_parameters": dense_params - ternary,
        "bytes_on_disk": disk, "bytes_in_memory": memory, "bytes_bf16": bf16_bytes,
        "disk_ratio_vs_bf16": bf16_bytes / disk, "memory_ratio_vs_bf16": bf16_bytes / memory,
    }


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}" if unit == "GB" else f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_info(d: dict[str, Any]) -> str:
    lines = [f"{d['path']}  (flaxflux format v{d['format_version']})", "components:"]
    width = max((len(c) for c in d["components"]), default=0)
    for name in d["components"]:
        s = d["component_sizes"][name]
        params = f"{s['parameters']:>15,} parameters" if "parameters" in s else " " * 26
        dtypes = f"  {'/'.join(s['dtypes'])}" if "dtypes" in s else ""
        lines.append(f"  {name:<{width}}  {params}  {_bytes(s['bytes_on_disk']):>10} on disk{dtypes}")
    if d["not_converted"]:
        lines.append(f"not converted: {', '.join(d['not_converted'])}")
    t = d.get("transformer")
    if t is not None:
        lines += [
            f"transformer: quantization={t['quantization']}"
            + (f" granularity={t['granularity']} packing={t['packing']} storage={t['storage']}"
               if t["quantization"] != "none" else ""),
            f"  parameters: {t['parameters']:,} ({t['ternary_parameters']:,} ternary, "
            f"{t['bf16_parameters']:,} 16-bit)",
            f"  on disk:   {_bytes(t['bytes_on_disk'])}  ({t['disk_ratio_vs_bf16']:.2f}x smaller than bf16)",
            f"  in memory: {_bytes(t['bytes_in_memory'])}  ({t['memory_ratio_vs_bf16']:.2f}x smaller than bf16)",
            f"  bf16:      {_bytes(t['bytes_bf16'])}"]
    return "\n".join(lines)
