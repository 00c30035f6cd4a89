"""Building blocks shared by the FLUX transformer (and later the text encoders / VAE).

Numerics follow BFL's reference: timestep features, RoPE, RMS and LayerNorm statistics in fp32;
matmuls in the parameter dtype (bf16 by default) with fp32 accumulation.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import TIMESTEP_DIM

Array = jax.Array


def init_normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: Any) -> Array:
    # Drawn directly in the parameter dtype: a full-size bf16 init never holds an fp32 copy.
    return (jax.random.normal(rngs.params(), shape, dtype=dtype) * jnp.asarray(std, dtype)).astype(dtype)


def dense(x: Array, weight: Array) -> Array:
    """x (..., K) @ weight(N, K)^T -> (..., N). Weights keep PyTorch's (out, in) layout, so a
    checkpoint converts without transposes; the dot contracts on weight's last axis."""
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jax.lax.dot_general(
        x, weight.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())), precision=precision
    )


class Linear(nnx.Module):
    """y = x W^T + b with W (out, in). `stack` prepends axes (one per scanned layer)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        stack: tuple[int, ...] = (),
        dtype: Any = jnp.bfloat16,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nnx.Param(init_normal(rngs, (*stack, out_features, in_features), in_features**-0.5, dtype))
        self.bias = nnx.Param(jnp.zeros((*stack, out_features), dtype)) if bias else None

    def __call__(self, x: Array) -> Array:
        y = dense(x, self.weight[...])
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class RMSNorm(nnx.Module):
    """RMS norm over the last axis with a learnable scale (BFL `RMSNorm`, eps 1e-6), fp32 math."""

    def __init__(self, dim: int, *, stack: tuple[int, ...] = (), dtype: Any = jnp.bfloat16, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.ones((*stack, dim), dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        """Returns fp32: the caller (RoPE) keeps computing in fp32."""
        xf = x.astype(jnp.float32)
        rrms = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return xf * rrms * self.scale[...].astype(jnp.float32)


def layer_norm(x: Array, eps: float = 1e-6) -> Array:
    """LayerNorm without affine parameters, statistics in fp32; returns fp32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return (xf - mean) * jax.lax.rsqrt(var + eps)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """(1 + scale) * LayerNorm(x) + shift in fp32, cast back to x's dtype (one fused XLA op)."""
    y = layer_norm(x) * (1.0 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)
    return y.astype(x.dtype)


def gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


@functools.lru_cache(maxsize=None)
def _timestep_freqs(half: int, max_period: float) -> np.ndarray:
    """exp(-ln(max_period) * j / half) as a constant table: the fp32 exponent formed in BFL's
    order, then exp in fp64 and rounded once. The angle is t * 1000 * freq with t * 1000 up to
    ~3500 (guidance), so one ulp in a frequency moves an angle by up to 4e-4; XLA's fp32 exp is
    one ulp off on 14 of FLUX's 128 frequencies, the correctly rounded table on 3."""
    e = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)) / np.float32(half)
    return np.exp(e.astype(np.float64)).astype(np.float32)


def timestep_embedding(t: Array, dim: int = TIMESTEP_DIM, max_period: float = 10_000.0,
                       time_factor: float = 1000.0) -> Array:
    """BFL's sinusoidal features of t in [0, 1] (scaled by 1000): [cos, sin], always fp32."""
    t = time_factor * jnp.asarray(t, jnp.float32)
    half = dim // 2
    freqs = jnp.asarray(_timestep_freqs(half, max_period))
    args = t[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class MLPEmbedder(nnx.Module):
    """Linear -> SiLU -> Linear (BFL `MLPEmbedder`: time_in, vector_in, guidance_in)."""

    def __init__(self, in_dim: int, hidden_dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.in_layer = Linear(in_dim, hidden_dim, dtype=dtype, rngs=rngs)
        self.out_layer = Linear(hidden_dim, hidden_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


def rope_frequencies(ids: Array, axes_dim: tuple[int, ...], theta: int) -> tuple[Array, Array]:
    """cos and sin tables (B, L, 1, head_dim/2) in fp32 for position ids (B, L, n_axes).

    Each axis i contributes axes_dim[i]/2 frequencies theta^(-2j/d); pairs are adjacent
    (x[2j], x[2j+1]) as in BFL and diffusers' `repeat_interleave_real=True`.
    """
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"position ids have {ids.shape[-1]} axes, the config has {len(axes_dim)} ({axes_dim})")
    pos = ids.astype(jnp.float32)
    angles = []
    for i, d in enumerate(axes_dim):
        omega = jnp.asarray(1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d), jnp.float32)
        angles.append(pos[..., i : i + 1] * omega)
    ang = jnp.concatenate(angles, axis=-1)[:, :, None, :]
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate adjacent pairs of x (B, L, H, D) in fp32; returns fp32."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], axis=-1)
    return out.reshape(x.shape)


def attention_implementation(dtype: Any) -> str:
    """cuDNN flash attention on GPU for 16-bit inputs, XLA otherwise.

    jax.nn.dot_product_attention's own default is XLA everywhere, so the choice is made here.
    FLAXFLUX_ATTENTION=xla|cudnn overrides (e.g. to compare the two on a GPU).
    """
    forced = os.environ.get("FLAXFLUX_ATTENTION")
    if forced:
        if forced not in ("xla", "cudnn"):
            raise ValueError(f"FLAXFLUX_ATTENTION must be 'xla' or 'cudnn', got {forced!r}")
        return forced
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return "xla"


def attention(q: Array, k: Array, v: Array, cos: Array, sin: Array) -> Array:
    """Joint attention with RoPE. q, k already RMS-normed (fp32); v in the activation dtype.
    Shapes (B, L, H, D) -> (B, L, H*D) in v's dtype."""
    dtype = v.dtype
    q = apply_rope(q, cos, sin).astype(dtype)
    k = apply_rope(k, cos, sin).astype(dtype)
    out = jax.nn.dot_product_attention(q, k, v, implementation=attention_implementation(dtype))
    return out.reshape(*out.shape[:2], -1)
