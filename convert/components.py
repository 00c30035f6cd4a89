"""The components that keep Hugging Face tensor names: CLIP text (`text_encoder/`), T5 encoder
(`text_encoder_2/`) and the VAE (`vae/`).

Each is validated against the same tensor specs its loader uses (flaxflux.clip / t5 / vae:
missing, unexpected, shape and dtype errors name the tensor and file), then planned and streamed
through `core.write_component`: stored names stay the source's transformers / diffusers names and
each tensor keeps its source dtype, so the copy is bit-exact. The component's config.json wraps
the source's HF config: {"flaxflux_component": name, "config": <HF config dict>, ...}, which the
loaders unwrap.

Tensors no loader reads are dropped, not copied: CLIP's `embeddings.position_ids` buffer (an
arange, saved by older transformers), a full T5 checkpoint's `decoder.*` and `lm_head.weight`,
and a tied embedding stored twice (`encoder.embed_tokens.weight` beside `shared.weight`; the
loader reads `shared.weight`).

BFL's ae.safetensors (encoder.down.{i}.block.{j}..., 1x1-conv attention) is stored under
diffusers names and layouts (attention weights (c, c, 1, 1) -> (c, c), a reshape: still bit-exact),
through the mapping flaxflux.vae already has, so every converted `vae/` looks the same.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from flaxflux import clip, t5, vae
from flaxflux.hf_loading import TensorSpec, check_tensors, config_dict
from flaxflux.model_folder import COMPONENT_CONFIG
from flaxflux.safetensors_io import CheckpointError, TensorReader, sharded_files

from .core import Planned, Prepared, shard_metadata

TRANSFORMER = "transformer"
# Components converted from a snapshot's folder of the same name, in the order they are written.
HF_COMPONENTS = (clip.SUBFOLDER, t5.SUBFOLDER, vae.SUBFOLDER)
# config.json `_class_name` (diffusers) or `architectures` (transformers) -> component. A full
# T5 checkpoint converts as its encoder (the decoder is dropped, as T5EncoderModel drops it).
CLASS_COMPONENTS = {
    "FluxTransformer2DModel": TRANSFORMER,
    "CLIPTextModel": clip.SUBFOLDER,
    "T5EncoderModel": t5.SUBFOLDER,
    "T5ForConditionalGeneration": t5.SUBFOLDER,
    "AutoencoderKL": vae.SUBFOLDER,
}
# The source files' names in each component folder (the loaders' own constants).
_SOURCE_FILES = {clip.SUBFOLDER: (clip.WEIGHTS_INDEX, clip.WEIGHTS), t5.SUBFOLDER: (t5.WEIGHTS_INDEX, t5.WEIGHTS),
                 vae.SUBFOLDER: (vae.WEIGHTS_INDEX, vae.WEIGHTS)}


def identify(config: Mapping[str, Any]) -> str | None:
    """The component a diffusers / transformers config.json describes, or None if unknown."""
    names = [config.get("_class_name")] + list(config.get("architectures") or [])
    found = {CLASS_COMPONENTS[n] for n in names if n in CLASS_COMPONENTS}
    return found.pop() if len(found) == 1 else None


@dataclasses.dataclass(frozen=True)
class _Route:
    out: str                                   # stored name (and shape) in the output
    shape: tuple[int, ...]
    src: str                                   # name in the source reader
    transform: Callable[[np.ndarray], np.ndarray] | None = None


def _prepare(component: str, reader: TensorReader, routes: list[_Route], hf_config: dict[str, Any],
             files: list[Path]) -> Prepared:
    plan = [Planned(r.out, reader.dtype_tag(r.src), r.shape, reader.nbytes(r.src), int(np.prod(r.shape)))
            for r in routes]
    by_name = {r.out: r for r in routes}

    def produce(p: Planned) -> np.ndarray:
        r = by_name[p.name]
        a = reader.get(r.src)
        return r.transform(a) if r.transform is not None else a

    config = {"flaxflux_component": component, "config": hf_config,
              "source_files": {f.name: f.stat().st_size for f in files}}
    return Prepared(component, plan, produce, shard_metadata(component, files), config, files)


def _same_names(reader: TensorReader, specs: list[TensorSpec], description: str,
                ignore: Callable[[str], bool]) -> list[_Route]:
    """Validate, then route every tensor a loader reads to itself (the name actually present:
    an alternate where the primary is absent)."""
    present = check_tensors(reader, specs, description, ignore)
    return [_Route(present[n], tuple(s.shape), present[n]) for s in specs for n in s.names]


def _hf_config(config: Mapping[str, Any] | str | Path) -> tuple[dict[str, Any], str]:
    """(HF config dict, where it came from: for error messages) of a dict or config.json path."""
    if isinstance(config, Mapping):
        return config_dict(config), "the config= dict"
    return config_dict(config), str(config)


def _parse(what: str, where: str, parse: Callable[[dict], Any], hf: dict) -> Any:
    try:
        return parse(hf)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: not a usable {what} config ({e})") from e


def prepare_component(component: str, folder: Path, config: Mapping[str, Any] | str | Path | None = None
                      ) -> Prepared:
    """Validate a `text_encoder/`, `text_encoder_2/` or `vae/` folder (config.json + safetensors
    [+ index]) fully and plan its output; nothing is written here. `config` overrides config.json."""
    if component not in HF_COMPONENTS:
        raise ValueError(f"component must be one of {HF_COMPONENTS}, got {component!r}")
    folder = Path(folder)
    if config is None and not (folder / COMPONENT_CONFIG).is_file():
        raise CheckpointError(f"{folder}: no {COMPONENT_CONFIG} (a {component}/ folder needs one)")
    hf, where = _hf_config(folder / COMPONENT_CONFIG if config is None else config)
    files = sharded_files(folder, *_SOURCE_FILES[component])
    if component == clip.SUBFOLDER:
        cfg = _parse("CLIP text", where, clip.CLIPTextConfig.from_hf, hf)
        reader = TensorReader(files)
        # FLUX's CLIP names carry `text_model.` (older transformers), transformers 5 writes none;
        # both are kept as stored (load_clip strips the prefix).
        prefix = clip.PREFIX if any(k.startswith(clip.PREFIX) for k in reader.keys()) else ""

        def ignore(name: str) -> bool:
            return clip._ignored(name[len(prefix):] if name.startswith(prefix) else name)

        routes = _same_names(reader, clip.clip_tensor_specs(cfg, prefix), str(folder), ignore)
    elif component == t5.SUBFOLDER:
        cfg = _parse("T5", where, t5.T5Config.from_hf, hf)
        reader = TensorReader(files)
        routes = _same_names(reader, t5.t5_tensor_specs(cfg), str(folder), t5._ignored)
    else:
        cfg = _parse("VAE", where, vae.VAEConfig.from_diffusers, hf)
        reader = TensorReader(files, strip=vae.BFL_PREFIXES)
        routes = _vae_routes(reader, cfg, str(folder))
    return _prepare(component, reader, routes, hf, files)


def _vae_routes(reader: TensorReader, cfg: vae.VAEConfig, description: str) -> list[_Route]:
    """Validate a VAE source (diffusers or BFL names) and route it to diffusers names and layouts."""
    naming = vae.detect_naming(reader.keys())
    source = vae.vae_tensor_specs(cfg, naming)
    present = check_tensors(reader, source, description)
    # Both namings list the same model parameters (`target`): pair them up through it.
    stored = {s.target: s for s in vae.vae_tensor_specs(cfg, "diffusers")}
    return [_Route(stored[s.target].names[0], tuple(stored[s.target].shape), present[s.names[0]], s.transform)
            for s in source]


def prepare_bfl_vae(path: Path, config: vae.VAEConfig | Mapping[str, Any] | str | Path | None = None) -> Prepared:
    """Validate a single-file VAE (BFL's ae.safetensors, optionally under a `first_stage_model.` /
    `vae.` prefix) and plan it as a diffusers-named `vae/`; nothing is written here.

    config: a VAEConfig or a diffusers config (dict / config.json path). Without one, the sizes are
    read from the tensor shapes and the rest (norm groups, scaling and shift factors) is FLUX.1's
    preset: FLUX.1's own ae.safetensors gives exactly the FLUX.1 VAE config, and any file gets the
    config `load_vae` would use for it."""
    path = Path(path)
    reader = TensorReader([path], strip=vae.BFL_PREFIXES)
    if isinstance(config, vae.VAEConfig):
        cfg, hf = config, config.to_diffusers()
    elif config is not None:
        hf, where = _hf_config(config)
        cfg = _parse("VAE", where, vae.VAEConfig.from_diffusers, hf)
    else:
        cfg = vae.infer_vae_config({k: reader.shape(k) for k in reader.keys()}, vae.detect_naming(reader.keys()))
        hf = cfg.to_diffusers()
    return _prepare(vae.SUBFOLDER, reader, _vae_routes(reader, cfg, f"VAE file {path}"), hf, [path])


__all__ = ["CLASS_COMPONENTS", "HF_COMPONENTS", "TRANSFORMER", "identify", "prepare_bfl_vae", "prepare_component"]
