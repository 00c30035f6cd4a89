"""Plain-jnp references for the packed ternary matmul (test oracles and the XLA backend)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .layout import unpack_ternary

# BitNet b1.58 per-token absmax: s = 127 / max|x| (clamped), codes round(x * s) in [-128, 127].
INT8_MAX = 127.0
ABSMAX_EPS = 1e-5


def _epilogue(y: jax.Array, scale: jax.Array, bias: jax.Array | None, out_dtype) -> jax.Array:
    y = y * jnp.asarray(scale, jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token (last axis) absmax int8 quantization: x ~= codes * step[..., None]."""
    xf = x.astype(jnp.float32)
    amax = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1, keepdims=True), ABSMAX_EPS)
    step = amax / INT8_MAX
    codes = jnp.clip(jnp.round(xf / step), -128, 127).astype(jnp.int8)
    return codes, step[..., 0]


def ternary_matmul_ref(x: jax.Array, w_packed: jax.Array, scale: jax.Array, *, bias=None,
                       out_dtype=None) -> jax.Array:
    """x (..., K) @ (unpack(w_packed)[:K] * scale) + bias, accumulated in fp32."""
    out_dtype = out_dtype or x.dtype
    w = unpack_ternary(w_packed, x.shape[-1])
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    y = jnp.dot(x, w.astype(x.dtype), precision=precision, preferred_element_type=jnp.float32)
    return _epilogue(y, scale, bias, out_dtype)


def ternary_matmul_a8_ref(x: jax.Array, w_packed: jax.Array, scale: jax.Array, *, bias=None,
                          out_dtype=None) -> jax.Array:
    """W1.58A8: int8 per-token activations x int8 ternary weights, int32 accumulation (exact),
    then step[m] * scale[n] in the epilogue."""
    out_dtype = out_dtype or x.dtype
    codes, step = quantize_activations(x)
    w = unpack_ternary(w_packed, x.shape[-1])
    acc = jax.lax.dot_general(codes, w, (((codes.ndim - 1,), (0,)), ((), ())),
                              preferred_element_type=jnp.int32)
    return _epilogue(acc.astype(jnp.float32) * step[..., None], scale, bias, out_dtype)
