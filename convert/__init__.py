"""`flaxflux convert`: FLUX checkpoints (diffusers snapshot or component folder, BFL single files)
into a flaxflux model folder, streaming, validated, optionally ternarized. Installed as
`flaxflux.convert` (the folder sits at the top level of the repository)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from tqdm.auto import tqdm

from flaxflux.config import FluxConfig
from flaxflux.hf_loading import read_json
from flaxflux.model_folder import COMPONENT_CONFIG, find_root
from flaxflux.naming import strip_bfl_prefix
from flaxflux.safetensors_io import CheckpointError, read_header
from flaxflux.vae import BFL_PREFIXES as VAE_BFL_PREFIXES
from flaxflux.vae import SUBFOLDER as VAE
from flaxflux.vae import VAEConfig

from .components import CLASS_COMPONENTS, HF_COMPONENTS, TRANSFORMER, identify, prepare_bfl_vae, prepare_component
from .core import FileHasher, Prepared, Staging, Summary, timer
from .save import save_transformer
from .transformer import QUANTIZATIONS, prepare_transformer

# Snapshot folders copied verbatim (small text/config files).
COPIED = ("tokenizer", "tokenizer_2", "scheduler")
SNAPSHOT_INDEX = "model_index.json"


def detect_source(src: Path) -> tuple[str, Path]:
    """("snapshot" | a component name, path) for a supported source, else a clear error.

    A component is "transformer" (diffusers folder or BFL file), "text_encoder" (CLIP),
    "text_encoder_2" (T5) or "vae" (diffusers folder, or BFL's ae.safetensors)."""
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    if src.is_file():
        names = list(read_header(src)[0])
        if "img_in.weight" in {strip_bfl_prefix(n) for n in names}:
            return TRANSFORMER, src
        autoencoder = tuple(p + part for p in ("",) + VAE_BFL_PREFIXES for part in ("encoder.", "decoder."))
        if any(n.startswith(autoencoder) for n in names):
            return VAE, src
        raise CheckpointError(f"{src}: not a FLUX checkpoint (no img_in.weight, nor an autoencoder's "
                              "encoder.* / decoder.* among its tensors)")
    if find_root(src) is not None:
        raise CheckpointError(f"{src}: already a flaxflux model folder")
    if (src / SNAPSHOT_INDEX).is_file():
        return "snapshot", src
    cfg = src / COMPONENT_CONFIG
    if cfg.is_file():
        hf = read_json(cfg)
        component = identify(hf)
        if component is None:
            named = hf.get("_class_name") or hf.get("architectures")
            raise CheckpointError(f"{cfg}: component {named!r} cannot be converted (supported: "
                                  f"{', '.join(CLASS_COMPONENTS)})")
        return component, src
    raise CheckpointError(f"{src}: not a FLUX snapshot ({SNAPSHOT_INDEX}), component folder ({COMPONENT_CONFIG}) "
                          "or BFL .safetensors file")


def _check_snapshot_component(folder: Path, component: str) -> None:
    """A snapshot's <component>/config.json must describe that component (when it says at all)."""
    cfg = folder / COMPONENT_CONFIG
    found = identify(read_json(cfg)) if cfg.is_file() else None
    if found is not None and found != component:
        raise CheckpointError(f"{cfg}: describes a {found} component, but sits in {component}/")


def _prepare(kind: str, path: Path, quantize: str, granularity: str,
             config: FluxConfig | VAEConfig | Mapping[str, Any] | str | Path | None
             ) -> tuple[list[Prepared], list[str]]:
    """Validate every component of the source (headers and shapes only), before anything is
    written. Returns (prepared components in writing order, components the snapshot's
    model_index.json names but whose folder is absent)."""
    if kind == TRANSFORMER:
        return [prepare_transformer(path, quantize, granularity, config)], []
    if kind == VAE and path.is_file():
        return [prepare_bfl_vae(path, config)], []
    if kind != "snapshot":
        return [prepare_component(kind, path, config)], []
    if not (path / TRANSFORMER).is_dir():
        raise CheckpointError(f"{path}: snapshot has no {TRANSFORMER}/ folder")
    _check_snapshot_component(path / TRANSFORMER, TRANSFORMER)
    prepared = [prepare_transformer(path / TRANSFORMER, quantize, granularity, config)]
    listed = read_json(path / SNAPSHOT_INDEX)
    absent = []
    for name in HF_COMPONENTS:
        if (path / name).is_dir():
            _check_snapshot_component(path / name, name)
            prepared.append(prepare_component(name, path / name))
        elif listed.get(name) not in (None, [None, None]):
            absent.append(name)
    return prepared, absent


def convert(src: str | Path, out: str | Path, *, quantize: str = "none", granularity: str = "tensor",
            force: bool = False, progress: bool = True,
            config: FluxConfig | VAEConfig | Mapping[str, Any] | str | Path | None = None) -> Summary:
    """Convert `src` into the flaxflux folder `out` (written atomically). See the module docstring.

    src: a FLUX snapshot (every component present is converted: transformer, text_encoder,
    text_encoder_2, vae; tokenizers and scheduler are copied), one component folder (diffusers
    transformer or AutoencoderKL, transformers CLIPTextModel or T5EncoderModel), a BFL
    transformer file (flux1-dev.safetensors) or BFL autoencoder file (ae.safetensors).
    quantize: "ternary" packs the transformer's block linears; the other components are copied
    as stored (bit-exact, source dtype) either way.
    config: the config of the one component converted from a component folder or file
    (FluxConfig, VAEConfig, or an HF config.json path / dict), or of a snapshot's transformer.
    Needed only for BFL transformer files whose RoPE axes are not FLUX.1's (inferred from shapes
    otherwise); a BFL ae.safetensors without one gets sizes from its shapes and the rest from
    FLUX.1's VAE preset."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    src, out = Path(src), Path(out)
    kind, path = detect_source(src)
    elapsed = timer()
    summary = Summary()
    with Staging(out, force) as staging:  # first, so that an existing OUT fails before any work
        # every component is validated (names, shapes, dtypes) before the first one is written
        prepared, absent = _prepare(kind, path, quantize, granularity, config)
        source_files = [f for p in prepared for f in p.files]
        # provenance hashes on the second core, meanwhile; keyed by path within the source
        hasher = FileHasher(source_files, base=path if path.is_dir() else None)
        with tqdm(total=sum(f.stat().st_size for f in source_files), unit="B", unit_scale=True, desc="convert",
                  disable=not progress) as bar:
            for p in prepared:
                before = summary.bytes_in
                p.write(staging, bar.update, summary)
                # the bar counts whole files: headers and dropped tensors were passed over, not read
                bar.update(sum(f.stat().st_size for f in p.files) - (summary.bytes_in - before))
                summary.components.append(p.component)
        if kind == "snapshot":
            for name in COPIED:
                if (path / name).is_dir():
                    staging.copy_tree(path / name, name)
                    summary.components.append(name)
            staging.copy_file(path / SNAPSHOT_INDEX, SNAPSHOT_INDEX)
        # --quantize concerns the transformer only; every other component is stored as is
        quantization = quantize if TRANSFORMER in summary.components else "none"
        staging.commit({"components": summary.components, "quantization": quantization,
                        "source": {"path": str(src.resolve()), "sha256": hasher.join()},
                        "not_converted": absent})
    summary.seconds = elapsed()
    if quantization != quantize:
        print(f"note: --quantize {quantize} applies to the transformer; {src} has none, its components are "
              "stored as they are")
    if absent:
        print(f"note: {', '.join(absent)} named in {path / SNAPSHOT_INDEX} but absent from the snapshot; "
              "not converted")
    return summary


__all__ = ["QUANTIZATIONS", "Summary", "convert", "detect_source", "save_transformer"]
