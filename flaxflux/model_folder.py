"""The flaxflux model folder: the converter's output and the fast path for loading.

    OUT/
      flaxflux.json        {"format": "flaxflux", "format_version": 1, "components": [...], "source": {...}}
      manifest.json        {"files": {"<relative path>": {"sha256": ..., "bytes": ...}}}
      transformer/
        config.json        {"flaxflux_component": "transformer", "config": {...FluxConfig...},
                            "quantization": "none" | "ternary", ...}
        model-0000k-of-0000n.safetensors   BFL tensor names; metadata: format version, quantization,
                                           packing layout, source file hashes
        model.safetensors.index.json
      text_encoder/ text_encoder_2/ vae/   HF tensor names, source dtype (a BFL ae.safetensors is
                                           stored under diffusers names); see convert/components.py
      tokenizer/ tokenizer_2/ scheduler/   copied from the source snapshot
      model_index.json                     copied, so the folder keeps the FLUX.1 snapshot shape

Loading verifies every file against manifest.json (sha256) unless verification is turned off
(`verify=False`, or FLAXFLUX_NO_VERIFY=1) for speed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from .safetensors_io import CheckpointError, read_json, sharded_files

FORMAT = "flaxflux"
FORMAT_VERSION = 1
ROOT_FILE = "flaxflux.json"
MANIFEST = "manifest.json"
COMPONENT_CONFIG = "config.json"
SHARD_INDEX = "model.safetensors.index.json"
SINGLE_SHARD = "model.safetensors"

# model_index.json of a FLUX.1 snapshot in the diffusers layout (which class loads each folder).
FLUX_MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "_diffusers_version": "0.30.0",  # the version FLUX.1-dev's own configs name
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_root(path: Path) -> Path | None:
    """The model folder that `path` is (or is a component of), or None for foreign folders."""
    for cand in (path, path.parent):
        if (cand / ROOT_FILE).is_file():
            info = read_json(cand / ROOT_FILE)
            if info.get("format") != FORMAT:
                raise CheckpointError(f"{cand / ROOT_FILE}: not a flaxflux model folder")
            if info.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(f"{cand / ROOT_FILE}: format version {info.get('format_version')} "
                                      f"is not supported (this flaxflux reads version {FORMAT_VERSION})")
            return cand
    return None


def verify_manifest(root: Path, component: str | None = None) -> None:
    """Check sizes and sha256 of the files listed in manifest.json (of one component, or all)."""
    manifest = read_json(root / MANIFEST)
    for rel, entry in manifest.get("files", {}).items():
        if component is not None and not rel.startswith(component + "/"):
            continue
        f = root / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in {root / MANIFEST} but missing")
        if f.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, manifest says {entry['bytes']} (truncated?)")
        if sha256_file(f) != entry["sha256"]:
            raise CheckpointError(f"{f}: sha256 does not match {root / MANIFEST} (corrupted file)")


def open_component(path: Path, name: str, verify: bool | None = None) -> tuple[list[Path], dict] | None:
    """(safetensors files, component config) of component `name` of a flaxflux folder, or None
    if `path` is not a flaxflux folder."""
    root = find_root(path)
    if root is None:
        return None
    comp = root / name
    cfg_path = comp / COMPONENT_CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{root}: flaxflux folder has no {name}/ component")
    info = read_json(cfg_path)
    if info.get("flaxflux_component") != name:
        raise CheckpointError(f"{cfg_path}: not a flaxflux {name} config")
    if verify is None:
        verify = os.environ.get("FLAXFLUX_NO_VERIFY", "") in ("", "0")
    if verify:
        verify_manifest(root, name)
    return sharded_files(comp, SHARD_INDEX, SINGLE_SHARD), info
