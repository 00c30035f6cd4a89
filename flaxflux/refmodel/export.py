"""Write trained weights as a FLUX.1-dev diffusers folder (what ships, and what both pipelines load).

    model_index.json                       FluxPipeline, as FLUX.1-dev's
    transformer/config.json + diffusion_pytorch_model.safetensors   FluxTransformer2DModel, diffusers names
    text_encoder/config.json + model.safetensors                   CLIPTextModel (`text_model.` names, as FLUX's)
    text_encoder_2/config.json + model.safetensors                 T5EncoderModel
    vae/config.json + diffusion_pytorch_model.safetensors          AutoencoderKL
    tokenizer/ tokenizer_2/                                        CLIPTokenizer, T5TokenizerFast
    scheduler/scheduler_config.json                                FlowMatchEulerDiscreteScheduler
    refmodel.json                                                  recipe, seed, final losses (provenance;
                                                                   neither loader reads it)

Every tensor is bf16. Names come from the same tables the loaders read (flaxflux.naming for the
transformer, the T5 / CLIP / VAE tensor specs for the rest), so what is written is exactly what
loads back. The folder is built beside the target and renamed into place: a failed export
leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import naming
from ..clip import PREFIX as CLIP_PREFIX
from ..clip import clip_tensor_specs
from ..hf_loading import TensorSpec
from ..safetensors_io import SafetensorsWriter
from ..t5 import t5_tensor_specs
from ..vae import vae_tensor_specs
from ..model_folder import FLUX_MODEL_INDEX
from .config import SCHEDULER, Recipe
from .tokenizers import CLIP_DIR, T5_DIR

DIFFUSERS_VERSION = "0.30.0"  # the version FLUX.1-dev's own configs name (any later diffusers reads them)
SIZE_LIMIT_MB = 40.0
MODEL_INDEX = FLUX_MODEL_INDEX


def flat_params(params: nnx.State | Mapping) -> dict[str, np.ndarray]:
    """Dotted parameter path -> numpy array (fp32), as the loaders' tensor specs name targets."""
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
        out[".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = np.asarray(leaf, np.float32)
    return out


def bf16(a: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.bfloat16))  # round to nearest even, as torch's .to(bfloat16)


def hf_tensors(params: nnx.State, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Checkpoint name -> bf16 array, inverting `fill_module`'s specs (stacked layers split)."""
    flat = flat_params(params)
    out = {}
    for s in specs:
        if s.transform is not None:
            raise ValueError(f"{s.target}: specs with a layout transform cannot be exported")
        a = flat[s.target]
        stacked = a.ndim == len(s.shape) + 1  # scanned layers: one leading axis, even for one layer
        parts = list(a) if stacked else [a]
        if len(parts) != len(s.names):
            raise AssertionError(f"{s.target}: {len(parts)} layers for {len(s.names)} names")
        for name, part in zip(s.names, parts):
            if tuple(part.shape) != tuple(s.shape):
                raise AssertionError(f"{name}: {part.shape}, spec says {s.shape}")
            out[name] = bf16(part)
    return out


def transformer_tensors(params: nnx.State, recipe: Recipe) -> dict[str, np.ndarray]:
    """diffusers FluxTransformer2DModel names -> bf16 arrays (q/k/v split, final modulation swapped)."""
    flat = flat_params(params)
    out = {}
    for t in naming.tensors(recipe.sizes.transformer()):
        a = flat[t.internal]
        a = a[t.layer] if t.layer is not None else a
        for name, part in naming.bfl_to_diffusers(t, a).items():
            out[name] = bf16(part)
    return out


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    names = sorted(tensors)
    writer = SafetensorsWriter(path, [(n, "BF16", tuple(tensors[n].shape)) for n in names], {"format": "pt"})
    try:
        for n in names:
            writer.write(n, np.ascontiguousarray(tensors[n]))
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def clip_hf_config(recipe: Recipe, vocab_size: int) -> dict[str, Any]:
    import transformers

    c = recipe.sizes.clip(vocab_size)
    cfg = transformers.CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
        projection_dim=c.hidden_size, bos_token_id=0, eos_token_id=c.eos_token_id, pad_token_id=1,
        attention_dropout=0.0, dropout=0.0)
    d = cfg.to_dict()
    d["architectures"] = ["CLIPTextModel"]
    d["torch_dtype"] = d["dtype"] = "bfloat16"  # both spellings: older and newer transformers
    return d


def t5_hf_config(recipe: Recipe, vocab_size: int) -> dict[str, Any]:
    import transformers

    c = recipe.sizes.t5(vocab_size)
    cfg = transformers.T5Config(
        vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_layers=c.num_layers,
        num_decoder_layers=c.num_layers, num_heads=c.num_heads,
        relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance, dropout_rate=0.0,
        layer_norm_epsilon=c.layer_norm_epsilon, feed_forward_proj=c.feed_forward_proj, is_encoder_decoder=True,
        use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)
    d = cfg.to_dict()
    d["architectures"] = ["T5EncoderModel"]
    d["torch_dtype"] = d["dtype"] = "bfloat16"  # both spellings: older and newer transformers
    return d


def export(target: str | Path, *, recipe: Recipe, tokenizer_dir: Path, vocab: Any, vae_params: nnx.State,
           vae_factors: tuple[float, float], t5_params: nnx.State, clip_params: nnx.State,
           transformer_params: nnx.State, provenance: Mapping[str, Any] | None = None) -> Path:
    """Write the diffusers-layout folder at `target` (replacing it atomically). `vocab`: Vocab (t5, clip sizes)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    s = recipe.sizes
    try:
        _json(tmp / "model_index.json", MODEL_INDEX)
        _json(tmp / "scheduler" / "scheduler_config.json", {**SCHEDULER, "_diffusers_version": DIFFUSERS_VERSION})
        for name in (CLIP_DIR, T5_DIR):
            shutil.copytree(tokenizer_dir / name, tmp / name)

        _json(tmp / "transformer" / "config.json",
              {**s.transformer().to_diffusers(), "_diffusers_version": DIFFUSERS_VERSION})
        write_safetensors(tmp / "transformer" / "diffusion_pytorch_model.safetensors",
                          transformer_tensors(transformer_params, recipe))

        vae_cfg = s.vae(*vae_factors)
        _json(tmp / "vae" / "config.json", {**vae_cfg.to_diffusers(), "sample_size": s.image_size,
                                            "force_upcast": True, "_diffusers_version": DIFFUSERS_VERSION})
        write_safetensors(tmp / "vae" / "diffusion_pytorch_model.safetensors",
                          hf_tensors(vae_params, vae_tensor_specs(vae_cfg, "diffusers")))

        _json(tmp / "text_encoder" / "config.json", clip_hf_config(recipe, vocab.clip))
        write_safetensors(tmp / "text_encoder" / "model.safetensors",
                          hf_tensors(clip_params, clip_tensor_specs(s.clip(vocab.clip), prefix=CLIP_PREFIX)))

        _json(tmp / "text_encoder_2" / "config.json", t5_hf_config(recipe, vocab.t5))
        t5 = hf_tensors(t5_params, t5_tensor_specs(s.t5(vocab.t5)))
        # the encoder's embedding under both of its names, as transformers' own T5 checkpoints
        # hold it: loaders that tie it and loaders that do not both find it
        t5["encoder.embed_tokens.weight"] = t5["shared.weight"]
        write_safetensors(tmp / "text_encoder_2" / "model.safetensors", t5)
        if provenance is not None:
            _json(tmp / "refmodel.json", provenance)

        total = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 2**20
        if total > SIZE_LIMIT_MB:
            print(f"warning: the exported folder is {total:.1f} MiB, over the {SIZE_LIMIT_MB:.0f} MiB target")
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def folder_size_mb(folder: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 2**20
