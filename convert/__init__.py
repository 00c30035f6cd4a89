"""`flaxflux convert`: FLUX checkpoints (diffusers snapshot or component folder, BFL single files)
into a flaxflux model folder, streaming, validated, optionally ternarized. Installed as
`flaxflux.convert` (the folder sits at the top level of the repository)."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from flaxflux.model_folder import find_root
from flaxflux.naming import strip_bfl_prefix
from flaxflux.safetensors_io import CheckpointError, read_header

from .core import FileHasher, Staging, Summary, timer
from .save import save_transformer
from .transformer import QUANTIZATIONS, convert_transformer

# Snapshot folders copied verbatim (small text/config files).
COPIED = ("tokenizer", "tokenizer_2", "scheduler")
# Snapshot components whose conversion arrives with their modules (text encoders, VAE).
NOT_YET = ("text_encoder", "text_encoder_2", "vae")


def detect_source(src: Path) -> tuple[str, Path]:
    """("snapshot" | "transformer", path) for a supported source, else a clear error."""
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    if src.is_file():
        names = {strip_bfl_prefix(n) for n in read_header(src)[0]}
        if "img_in.weight" in names:
            return "transformer", src
        if any(n.startswith(("decoder.", "encoder.")) for n in names):
            raise CheckpointError(f"{src}: a BFL autoencoder (ae.safetensors); VAE conversion is not available yet")
        raise CheckpointError(f"{src}: not a FLUX checkpoint (no img_in.weight among its tensors)")
    if find_root(src) is not None:
        raise CheckpointError(f"{src}: already a flaxflux model folder")
    if (src / "model_index.json").is_file():
        return "snapshot", src
    cfg = src / "config.json"
    if cfg.is_file():
        cls = json.loads(cfg.read_text()).get("_class_name")
        if cls == "FluxTransformer2DModel":
            return "transformer", src
        raise CheckpointError(f"{src}: component {cls!r} cannot be converted yet (transformer only for now)")
    raise CheckpointError(f"{src}: not a FLUX snapshot (model_index.json), component folder (config.json) "
                          "or BFL .safetensors file")


def convert(src: str | Path, out: str | Path, *, quantize: str = "none", granularity: str = "tensor",
            force: bool = False, progress: bool = True, config=None) -> Summary:
    """Convert `src` into the flaxflux folder `out` (written atomically). See the module docstring.

    config: the transformer's config (FluxConfig, or a diffusers config.json path / dict), needed
    only for BFL files whose RoPE axes are not FLUX.1's (inferred from shapes otherwise)."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    src, out = Path(src), Path(out)
    kind, path = detect_source(src)
    transformer_src = path / "transformer" if kind == "snapshot" else path
    if kind == "snapshot" and not transformer_src.is_dir():
        raise CheckpointError(f"{src}: snapshot has no transformer/ folder")
    source_files = [transformer_src] if transformer_src.is_file() else sorted(transformer_src.glob("*.safetensors"))
    elapsed = timer()
    summary = Summary()
    with Staging(out, force) as staging, tqdm(total=sum(f.stat().st_size for f in source_files), unit="B",
                                              unit_scale=True, desc="convert", disable=not progress) as bar:
        hasher = FileHasher(source_files)  # provenance hashes on the second core, meanwhile
        convert_transformer(transformer_src, staging, quantize, granularity, bar.update, summary, config)
        summary.components.append("transformer")
        skipped = []
        if kind == "snapshot":
            for name in COPIED:
                if (path / name).is_dir():
                    staging.copy_tree(path / name, name)
                    summary.components.append(name)
            staging.copy_file(path / "model_index.json", "model_index.json")
            skipped = [n for n in NOT_YET if (path / n).is_dir()]
        staging.commit({"components": summary.components, "quantization": quantize,
                        "source": {"path": str(src.resolve()), "sha256": hasher.join()},
                        "not_converted": skipped})
    summary.seconds = elapsed()
    if skipped:
        print(f"note: {', '.join(skipped)} not converted yet (their Flax modules are not in this version)")
    return summary


__all__ = ["QUANTIZATIONS", "Summary", "convert", "detect_source", "save_transformer"]
