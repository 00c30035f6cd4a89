"""The CLIP text model (FLUX's `text_encoder`, openai/clip-vit-large-patch14's text tower) in NNX.

As transformers' `CLIPTextModel`: token + learned position embeddings, pre-norm causal
self-attention layers (scale 1/sqrt(head_dim)), MLP with the config's `hidden_act`
(quick_gelu for CLIP-L), final LayerNorm. The pooled output is the final hidden state at the
EOS position, found the way transformers finds it: configs with the legacy `eos_token_id == 2`
(openai's, FLUX's) take `argmax(input_ids)` (the EOT id is the largest id), others the first
position whose id equals `eos_token_id`. FLUX uses only the pooled output (768-d, no projection).

LayerNorm statistics and softmax are fp32; matmuls run in the parameter dtype.
Checkpoint: transformers names (`text_model.encoder.layers.{i}.self_attn.q_proj.weight`, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import init_normal
from .hf_loading import (
    NEG_INF,
    TensorSpec,
    activation,
    config_dict,
    dense,
    expected_shapes,
    fill_module,
    layer_norm,
    resolve_component,
    softmax_attention,
)
from .safetensors_io import TensorReader
from .transformer import scan_blocks

Array = jax.Array
SUBFOLDER = "text_encoder"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
LEGACY_EOS_ID = 2  # openai configs; transformers then pools at argmax(input_ids)
# FLUX's checkpoint (older transformers) names tensors "text_model.embeddings...", transformers 5
# saves "embeddings..."; both load (the prefix is stripped on reading).
PREFIX = "text_model."


@dataclass(frozen=True)
class CLIPTextConfig:
    """Text tower sizes; defaults are FLUX's CLIP-L (openai/clip-vit-large-patch14)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = LEGACY_EOS_ID

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | str | Path) -> "CLIPTextConfig":
        """From a transformers CLIPTextConfig (or a CLIPConfig's `text_config`); keys absent there
        take transformers' CLIPTextConfig defaults."""
        d = config_dict(config)
        if isinstance(d.get("text_config"), Mapping):
            d = dict(d["text_config"])
        hf_defaults = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                           num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                           layer_norm_eps=1e-5, eos_token_id=49407)
        cfg = cls(**{k: d.get(k, v) for k, v in hf_defaults.items()})
        if isinstance(cfg.eos_token_id, (list, tuple)) or cfg.eos_token_id is None:
            raise ValueError(f"CLIP config: eos_token_id must be one int, got {cfg.eos_token_id!r}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"CLIP config: hidden_size {cfg.hidden_size} is not a multiple of "
                             f"num_attention_heads {cfg.num_attention_heads}")
        activation(cfg.hidden_act, "CLIP config hidden_act")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CLIP_L = CLIPTextConfig()


class Dense(nnx.Module):
    """y = x W^T + b, W (out, in) as in PyTorch; `stack` prepends the layer axis."""

    def __init__(self, in_f: int, out_f: int, *, stack: tuple[int, ...], dtype: Any, rngs: nnx.Rngs):
        self.weight = nnx.Param(init_normal(rngs, (*stack, out_f, in_f), in_f**-0.5, dtype))
        self.bias = nnx.Param(jnp.zeros((*stack, out_f), dtype))

    def __call__(self, x: Array) -> Array:
        return dense(x, self.weight[...]) + self.bias[...].astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, stack: tuple[int, ...], dtype: Any, eps: float):
        self.weight = nnx.Param(jnp.ones((*stack, dim), dtype))
        self.bias = nnx.Param(jnp.zeros((*stack, dim), dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        return layer_norm(x, self.weight[...], self.bias[...], self.eps).astype(self.weight[...].dtype)


class CLIPLayer(nnx.Module):
    """Pre-norm causal self-attention + MLP; `stack` = (num_hidden_layers,)."""

    def __init__(self, cfg: CLIPTextConfig, *, stack: tuple[int, ...], dtype: Any, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(stack=stack, dtype=dtype, rngs=rngs)
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.act = activation(cfg.hidden_act, "CLIP MLP")
        self.layer_norm1 = LayerNorm(d, stack=stack, dtype=dtype, eps=cfg.layer_norm_eps)
        self.q_proj = Dense(d, d, **kw)
        self.k_proj = Dense(d, d, **kw)
        self.v_proj = Dense(d, d, **kw)
        self.out_proj = Dense(d, d, **kw)
        self.layer_norm2 = LayerNorm(d, stack=stack, dtype=dtype, eps=cfg.layer_norm_eps)
        self.fc1 = Dense(d, f, **kw)
        self.fc2 = Dense(f, d, **kw)

    def __call__(self, h: Array, bias: Array) -> Array:
        b, n = h.shape[:2]
        x = self.layer_norm1(h)
        heads = lambda t: t.reshape(b, n, self.heads, self.head_dim)
        a = softmax_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), bias,
                              scale=self.head_dim**-0.5)
        h = h + self.out_proj(a.reshape(b, n, -1))
        x = self.layer_norm2(h)
        return h + self.fc2(self.act(self.fc1(x)))


class CLIPTextModel(nnx.Module):
    """`__call__(input_ids, attention_mask=None)` -> (last_hidden_state (B, L, D), pooled (B, D)),
    both in the parameter dtype."""

    def __init__(self, cfg: CLIPTextConfig = CLIP_L, *, dtype: Any = jnp.bfloat16, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.token_embedding = nnx.Param(init_normal(rngs, (cfg.vocab_size, d), 0.02, dtype))
        self.position_embedding = nnx.Param(init_normal(rngs, (cfg.max_position_embeddings, d), 0.01, dtype))
        self.layers = CLIPLayer(cfg, stack=(cfg.num_hidden_layers,), dtype=dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(d, stack=(), dtype=dtype, eps=cfg.layer_norm_eps)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> tuple[Array, Array]:
        """input_ids (B, L) int, L <= max_position_embeddings; attention_mask (B, L), 1 = attend,
        combined with the causal mask (FLUX passes none)."""
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected shape (batch, length), got {input_ids.shape}")
        b, n = input_ids.shape
        if n > cfg.max_position_embeddings:
            raise ValueError(f"input_ids: length {n} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        h = self.token_embedding[...][input_ids] + self.position_embedding[...][:n][None]
        keep = jnp.tril(jnp.ones((n, n), bool))[None, None]
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (b, n):
                raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} != input_ids {(b, n)}")
            keep = keep & (jnp.asarray(attention_mask)[:, None, None, :] > 0)
        bias = jnp.where(keep, 0.0, NEG_INF).astype(jnp.float32)
        h = scan_blocks(self.layers, h, lambda blk, c, _: blk(c, bias))
        h = self.final_layer_norm(h)
        return h, h[jnp.arange(b), self.eos_positions(input_ids)]

    def eos_positions(self, input_ids: Array) -> Array:
        """(B,) positions whose hidden state is pooled, as transformers chooses them."""
        if self.config.eos_token_id == LEGACY_EOS_ID:
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax((input_ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)


# ----------------------------------------------------------------------------- checkpoint

def clip_tensor_specs(cfg: CLIPTextConfig, prefix: str = PREFIX) -> list[TensorSpec]:
    """transformers tensor names of a CLIPTextModel and where each lands in `CLIPTextModel`."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_layer = lambda suffix: tuple(f"{prefix}encoder.layers.{i}.{suffix}" for i in range(L))
    specs = [
        TensorSpec((f"{prefix}embeddings.token_embedding.weight",), (cfg.vocab_size, d), "token_embedding"),
        TensorSpec((f"{prefix}embeddings.position_embedding.weight",), (cfg.max_position_embeddings, d),
                   "position_embedding"),
        TensorSpec((f"{prefix}final_layer_norm.weight",), (d,), "final_layer_norm.weight"),
        TensorSpec((f"{prefix}final_layer_norm.bias",), (d,), "final_layer_norm.bias"),
    ]
    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d), "self_attn.v_proj": (d, d),
              "self_attn.out_proj": (d, d), "mlp.fc1": (f, d), "mlp.fc2": (d, f)}
    for hf, (o, i) in shapes.items():
        ours = hf.split(".")[1]
        specs.append(TensorSpec(per_layer(f"{hf}.weight"), (o, i), f"layers.{ours}.weight"))
        specs.append(TensorSpec(per_layer(f"{hf}.bias"), (o,), f"layers.{ours}.bias"))
    for ln in ("layer_norm1", "layer_norm2"):
        for p in ("weight", "bias"):
            specs.append(TensorSpec(per_layer(f"{ln}.{p}"), (d,), f"layers.{ln}.{p}"))
    return specs


def clip_tensor_shapes(cfg: CLIPTextConfig = CLIP_L, prefix: str = PREFIX) -> dict[str, tuple[int, ...]]:
    """Expected tensor name -> shape of a `text_encoder/` checkpoint for `cfg` (FLUX's names;
    prefix="" gives the names transformers 5 writes)."""
    return expected_shapes(clip_tensor_specs(cfg, prefix))


def _ignored(name: str) -> bool:
    # older transformers saved the position_ids buffer; it is arange(max_positions), not a weight
    return name == "embeddings.position_ids"


def load_clip(path: str | Path | Sequence[str | Path], dtype: Any = jnp.bfloat16,
              config: CLIPTextConfig | Mapping[str, Any] | str | Path | None = None) -> CLIPTextModel:
    """Load the CLIP text model.

    path: a `text_encoder/` folder (config.json + model.safetensors [or shards + index]), a FLUX
    snapshot root, a flaxflux model folder, or a list of safetensors files with transformers
    names (then `config` is required). config: a CLIPTextConfig or a transformers config
    (dict / path). dtype: jnp.float32 for exact comparisons.
    """
    src = resolve_component(path, SUBFOLDER, WEIGHTS_INDEX, WEIGHTS)
    if isinstance(config, CLIPTextConfig):
        cfg = config
    elif config is not None:
        cfg = CLIPTextConfig.from_hf(config)
    elif src.config is not None:
        cfg = CLIPTextConfig.from_hf(src.config)
    else:
        raise ValueError(f"{src.description}: no config.json beside the weights; pass config=")
    reader = TensorReader(src.files, strip=(PREFIX,))
    return fill_module(lambda: CLIPTextModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)), reader,
                       clip_tensor_specs(cfg, prefix=""), src.description, ignore=_ignored)
