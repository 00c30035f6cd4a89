"""Packed ternary (1.58-bit) matmul: layout, jnp references, and backend dispatch."""

from __future__ import annotations

import jax

from .layout import (LAYOUT_NAME, LAYOUT_VERSION, TILE_K, layout_metadata, pack_ternary, pack_ternary_np,
                     padded_k, unpack_ternary, unpack_ternary_np)
from .reference import quantize_activations, ternary_matmul_a8_ref, ternary_matmul_ref

BACKENDS = ("xla",)


def choose_backend(backend: str = "auto") -> str:
    """The backend `ternary_matmul` runs for `backend` on the default device."""
    if backend == "auto":
        return "xla"
    if backend not in BACKENDS:
        raise ValueError(f"unknown ternary_matmul backend {backend!r}; choose from {('auto',) + BACKENDS}")
    return backend


def ternary_matmul(x: jax.Array, w_packed: jax.Array, scale: jax.Array, *, bias: jax.Array | None = None,
                   out_dtype=None, backend: str = "auto", interpret: bool = False,
                   activations: str = "native") -> jax.Array:
    """x (..., K) -> x @ (unpack(w_packed)[:K] * scale) + bias, shape (..., N).

    scale: scalar or (N,) fp32. activations="native" keeps x's dtype (weight-only);
    "int8" quantizes x per token (W1.58A8)."""
    if activations not in ("native", "int8"):
        raise ValueError(f"activations must be 'native' or 'int8', got {activations!r}")
    if padded_k(x.shape[-1]) != w_packed.shape[0] * 4:
        raise ValueError(f"x has K={x.shape[-1]} but the packed weight holds {w_packed.shape[0] * 4} rows "
                         f"(expected {padded_k(x.shape[-1])})")
    choose_backend(backend)
    fn = ternary_matmul_a8_ref if activations == "int8" else ternary_matmul_ref
    return fn(x, w_packed, scale, bias=bias, out_dtype=out_dtype)


__all__ = ["BACKENDS", "LAYOUT_NAME", "LAYOUT_VERSION", "TILE_K", "choose_backend", "layout_metadata",
           "pack_ternary", "pack_ternary_np", "padded_k", "quantize_activations", "ternary_matmul",
           "ternary_matmul_a8_ref", "ternary_matmul_ref", "unpack_ternary", "unpack_ternary_np"]
