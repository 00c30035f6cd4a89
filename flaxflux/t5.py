"""The T5 v1.1 encoder (FLUX's `text_encoder_2`, google/t5-v1_1-xxl) as a Flax NNX module.

Semantics kept from transformers' `T5EncoderModel`: RMS layer norm without mean or bias, no
1/sqrt(d) attention scaling, a bidirectional relative position bias computed from layer 0's
table and shared by every layer, gated-GELU (tanh approximation) feed-forward, final layer norm.

Numerics: the residual stream is fp32. transformers loads T5 with `wo` kept in fp32
(`_keep_in_fp32_modules`), which makes its residual stream fp32 after the first feed-forward;
here `wo` stays in the parameter dtype (the checkpoint is bf16 anyway) and accumulates into fp32,
the same product. Norm statistics, attention scores and softmax are fp32.

Layers are stacked on a leading axis and walked with `lax.scan`. The big matmuls (q, k, v, o,
wi_0, wi_1, wo) can hold int8 weights with a per-output-channel scale (`quantize="int8"`), which
halves T5-XXL's 9.5 GB; the embedding table stays in the parameter dtype.

Checkpoint: transformers names (`shared.weight`, `encoder.block.{i}.layer.0.SelfAttention.q.weight`,
...), as in a FLUX snapshot's `text_encoder_2/`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .layers import init_normal
from .hf_loading import (
    TensorSpec,
    activation,
    config_dict,
    dense,
    expected_shapes,
    fill_module,
    key_padding_bias,
    resolve_component,
    softmax_attention,
)
from .safetensors_io import TensorReader
from .transformer import scan_blocks

Array = jax.Array
SUBFOLDER = "text_encoder_2"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
QUANTIZE_MODES = (None, "int8")


@dataclass(frozen=True)
class T5Config:
    """Encoder sizes; defaults are FLUX's google/t5-v1_1-xxl."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def act_name(self) -> str:
        # transformers maps the legacy "gated-gelu" to gelu_new (tanh approximation)
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | str | Path) -> "T5Config":
        """From a transformers T5 config (dict, config.json path or folder); keys absent there take
        transformers' T5Config defaults, as transformers itself would."""
        d = config_dict(config)
        hf_defaults = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                           relative_attention_num_buckets=32, relative_attention_max_distance=128,
                           layer_norm_epsilon=1e-6, feed_forward_proj="relu")
        cfg = cls(**{k: d.get(k, v) for k, v in hf_defaults.items()})
        ff = cfg.feed_forward_proj.split("-")
        if len(ff) > 2 or (len(ff) == 2 and ff[0] != "gated"):
            raise ValueError(f"T5 config: feed_forward_proj {cfg.feed_forward_proj!r} is not 'ACT' or 'gated-ACT'")
        activation(cfg.act_name, "T5 config feed_forward_proj")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


T5_XXL = T5Config()


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(q_len, k_len) int32 bucket of (key position - query position), bidirectional.

    Half the buckets for each sign; within a half, distances below num_buckets/4 are exact, larger
    ones log-spaced up to max_distance, beyond which they share the last bucket. Float32 log, then
    truncation, as transformers computes it (the boundaries at powers of two depend on it)."""
    rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
    half = num_buckets // 2
    out = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.log(dist.astype(np.float32) / np.float32(max_exact))
        large = max_exact + (log_ratio / np.float32(math.log(max_distance / max_exact))
                             * np.float32(half - max_exact))
    large = np.minimum(np.where(dist < max_exact, 0, large).astype(np.int64), half - 1)
    out += np.where(dist < max_exact, dist, large)
    return out.astype(np.int32)


class T5Linear(nnx.Module):
    """Bias-free linear with PyTorch's (out, in) weight; with `quantize="int8"` the weight is int8
    and `scale` (out,) fp32 restores each output channel after the matmul."""

    def __init__(self, in_features: int, out_features: int, *, stack: tuple[int, ...], dtype: Any,
                 quantize: str | None, rngs: nnx.Rngs):
        shape = (*stack, out_features, in_features)
        if quantize == "int8":
            self.weight = nnx.Param(jnp.zeros(shape, jnp.int8))
            self.scale = nnx.Param(jnp.ones((*stack, out_features), jnp.float32))
        else:
            self.weight = nnx.Param(init_normal(rngs, shape, in_features**-0.5, dtype))
            self.scale = None

    def __call__(self, x: Array, out_dtype: Any = None) -> Array:
        out_dtype = out_dtype or x.dtype
        if self.scale is None:
            return dense(x, self.weight[...], out_dtype)
        # int8 values are exact in bf16, so the dot runs in x's dtype; the scale is applied in fp32
        y = dense(x, self.weight[...], jnp.float32) * self.scale[...]
        return y.astype(out_dtype)


def t5_rms_norm(h: Array, weight: Array, eps: float) -> Array:
    """T5 layer norm: x / rms(x) * w, no mean subtraction, no bias. Statistics in fp32; the
    normalized value is cast to the weight's dtype before the scale (as transformers does)."""
    hf = h.astype(jnp.float32)
    var = jnp.mean(hf * hf, axis=-1, keepdims=True)
    return (hf * jax.lax.rsqrt(var + eps)).astype(weight.dtype) * weight


class T5Block(nnx.Module):
    """Self-attention + feed-forward, both pre-norm with residual; `stack` = (num_layers,)."""

    def __init__(self, cfg: T5Config, *, stack: tuple[int, ...], dtype: Any, quantize: str | None,
                 rngs: nnx.Rngs):
        d, inner, ff = cfg.d_model, cfg.inner_dim, cfg.d_ff
        kw = dict(stack=stack, dtype=dtype, quantize=quantize, rngs=rngs)
        self.num_heads, self.d_kv, self.eps = cfg.num_heads, cfg.d_kv, cfg.layer_norm_epsilon
        self.act = activation(cfg.act_name, "T5 feed-forward")
        self.attn_norm = nnx.Param(jnp.ones((*stack, d), dtype))
        self.q = T5Linear(d, inner, **kw)
        self.k = T5Linear(d, inner, **kw)
        self.v = T5Linear(d, inner, **kw)
        self.o = T5Linear(inner, d, **kw)
        self.ff_norm = nnx.Param(jnp.ones((*stack, d), dtype))
        if cfg.is_gated:
            self.wi_0 = T5Linear(d, ff, **kw)
            self.wi_1 = T5Linear(d, ff, **kw)
            self.wi = None
        else:
            self.wi_0 = self.wi_1 = None
            self.wi = T5Linear(d, ff, **kw)
        self.wo = T5Linear(ff, d, **kw)

    def __call__(self, h: Array, bias: Array) -> Array:
        """h (B, L, D) fp32 residual stream; bias (B|1, H, L, L) fp32 (position bias + mask)."""
        dtype = self.attn_norm[...].dtype
        b, n = h.shape[:2]
        x = t5_rms_norm(h, self.attn_norm[...], self.eps)
        heads = lambda t: t.reshape(b, n, self.num_heads, self.d_kv)
        a = softmax_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), bias, scale=1.0)
        h = h + self.o(a.reshape(b, n, -1), jnp.float32)

        x = t5_rms_norm(h, self.ff_norm[...], self.eps)
        if self.wi is None:
            g = self.act(self.wi_0(x, jnp.float32)) * self.wi_1(x, jnp.float32)
        else:
            g = self.act(self.wi(x, jnp.float32))
        return h + self.wo(g.astype(dtype), jnp.float32)


class T5Encoder(nnx.Module):
    """T5 encoder; `__call__(input_ids, attention_mask=None)` -> last_hidden_state (B, L, d_model)
    in the parameter dtype."""

    def __init__(self, cfg: T5Config = T5_XXL, *, dtype: Any = jnp.bfloat16, quantize: str | None = None,
                 rngs: nnx.Rngs):
        if quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = nnx.Param(init_normal(rngs, (cfg.vocab_size, cfg.d_model), 1.0, dtype))
        self.relative_attention_bias = nnx.Param(
            init_normal(rngs, (cfg.relative_attention_num_buckets, cfg.num_heads), cfg.d_model**-0.5, dtype))
        self.blocks = T5Block(cfg, stack=(cfg.num_layers,), dtype=dtype, quantize=quantize, rngs=rngs)
        self.final_layer_norm = nnx.Param(jnp.ones((cfg.d_model,), dtype))

    def position_bias(self, q_len: int, k_len: int) -> Array:
        """(1, H, q_len, k_len) fp32 from layer 0's table (shared by all layers)."""
        cfg = self.config
        buckets = relative_position_buckets(q_len, k_len, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        values = self.relative_attention_bias[...][jnp.asarray(buckets)]  # (q, k, H)
        return jnp.transpose(values, (2, 0, 1))[None].astype(jnp.float32)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """input_ids (B, L) int; attention_mask (B, L) with 1 = attend, or None (FLUX passes none:
        the padding tokens are attended to, as in BFL's and diffusers' pipelines)."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected shape (batch, length), got {input_ids.shape}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} != input_ids {input_ids.shape}")
        n = input_ids.shape[1]
        h = self.embed_tokens[...][input_ids].astype(jnp.float32)
        bias = self.position_bias(n, n)
        mask_bias = key_padding_bias(attention_mask)
        if mask_bias is not None:
            bias = bias + mask_bias
        h = scan_blocks(self.blocks, h, lambda blk, c, _: blk(c, bias))
        return t5_rms_norm(h, self.final_layer_norm[...], self.config.layer_norm_epsilon)


# ----------------------------------------------------------------------------- checkpoint

def _layer(i: int) -> str:
    return f"encoder.block.{i}.layer"


def t5_tensor_specs(cfg: T5Config) -> list[TensorSpec]:
    """transformers tensor names of a T5EncoderModel and where each lands in `T5Encoder`."""
    L, d, inner, ff = cfg.num_layers, cfg.d_model, cfg.inner_dim, cfg.d_ff
    per_layer = lambda suffix: tuple(f"{_layer(i)}.{suffix}" for i in range(L))
    specs = [
        TensorSpec(("shared.weight",), (cfg.vocab_size, d), "embed_tokens",
                   alternates=("encoder.embed_tokens.weight",)),
        TensorSpec((f"{_layer(0)}.0.SelfAttention.relative_attention_bias.weight",),
                   (cfg.relative_attention_num_buckets, cfg.num_heads), "relative_attention_bias"),
        TensorSpec(per_layer("0.layer_norm.weight"), (d,), "blocks.attn_norm"),
        TensorSpec(per_layer("1.layer_norm.weight"), (d,), "blocks.ff_norm"),
        TensorSpec(("encoder.final_layer_norm.weight",), (d,), "final_layer_norm"),
    ]
    for name, shape in (("q", (inner, d)), ("k", (inner, d)), ("v", (inner, d)), ("o", (d, inner))):
        specs.append(TensorSpec(per_layer(f"0.SelfAttention.{name}.weight"), shape, f"blocks.{name}.weight"))
    ffn = ("wi_0", "wi_1") if cfg.is_gated else ("wi",)
    for name in ffn:
        specs.append(TensorSpec(per_layer(f"1.DenseReluDense.{name}.weight"), (ff, d), f"blocks.{name}.weight"))
    specs.append(TensorSpec(per_layer("1.DenseReluDense.wo.weight"), (d, ff), "blocks.wo.weight"))
    return specs


def t5_tensor_shapes(cfg: T5Config = T5_XXL) -> dict[str, tuple[int, ...]]:
    """Expected tensor name -> shape of a `text_encoder_2/` checkpoint for `cfg` (the embedding
    may instead be stored as `encoder.embed_tokens.weight`)."""
    return expected_shapes(t5_tensor_specs(cfg))


def _ignored(name: str) -> bool:
    # transformers' T5EncoderModel drops a full T5 checkpoint's decoder (and LM head) on load
    return name.startswith("decoder.") or name == "lm_head.weight"


def load_t5(path: str | Path | Sequence[str | Path], dtype: Any = jnp.bfloat16,
            config: T5Config | Mapping[str, Any] | str | Path | None = None,
            quantize: str | None = None) -> T5Encoder:
    """Load the T5 encoder.

    path: a `text_encoder_2/` folder (config.json + model.safetensors or shards + index), a FLUX
    snapshot root, a flaxflux model folder, or a list of safetensors files with transformers names
    (then `config` is required). config: a T5Config, or a transformers config (dict / path).
    dtype: parameter and activation dtype (jnp.float32 for exact comparisons).
    quantize: None, or "int8" for int8 weight-only q/k/v/o/wi/wo (per-output-channel absmax).
    """
    src = resolve_component(path, SUBFOLDER, WEIGHTS_INDEX, WEIGHTS)
    if isinstance(config, T5Config):
        cfg = config
    elif config is not None:
        cfg = T5Config.from_hf(config)
    elif src.config is not None:
        cfg = T5Config.from_hf(src.config)
    else:
        raise ValueError(f"{src.description}: no config.json beside the weights; pass config=")
    reader = TensorReader(src.files)
    return fill_module(lambda: T5Encoder(cfg, dtype=dtype, quantize=quantize, rngs=nnx.Rngs(0)),
                       reader, t5_tensor_specs(cfg), src.description, ignore=_ignored)
