"""Packed ternary (1.58-bit) matmul: layout, jnp references, and backend dispatch.

Backends: "mosaic_gpu" (Hopper, Pallas Mosaic GPU: wgmma with the unpacked weights as the
register operand), "triton" (Pallas Triton, for other CUDA GPUs while JAX ships it; up to GEMV_M
tokens its CUDA-core GEMV kernel, gemv.py), "xla" (unpack + dot; CPU, TPU and every fallback).
backend="auto" picks by device and JAX version, and on Hopper runs the few-token products the
Triton GEMV is faster at: weight-only M = 1 (1.4-2.0x over the Mosaic kernel, NOTES.md item 17)
and W1.58A8 M <= 4 (its dp4a path, 1.1-2.3x, item 18); `explain_backend()` says why.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from .layout import (LAYOUT_NAME, LAYOUT_VERSION, SLAB, TILE_K, layout_metadata, pack_ternary, pack_ternary_np,
                     padded_k, unpack_ternary, unpack_ternary_np)
from .reference import quantize_activations, ternary_matmul_a8_ref, ternary_matmul_ref

BACKENDS = ("xla", "triton", "mosaic_gpu")
# Tokens up to which the triton backend (and "auto" on Hopper) runs the GEMV kernel, by activation
# kind: measured crossovers against the Mosaic kernel (NOTES.md items 17, 18).
GEMV_M = {"native": 1, "int8": 4}


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _jax_version() -> tuple[int, ...]:
    return tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def _device_info() -> tuple[str, str, str | None]:
    """(platform, device kind, CUDA compute capability or None) of the default device."""
    d = jax.devices()[0]
    cc = getattr(d, "compute_capability", None)
    return d.platform, d.device_kind, (str(cc) if cc is not None else None)


def _auto() -> tuple[str, str]:
    platform, kind, cc = _device_info()
    if platform != "gpu":
        return "xla", f"default device is {platform} ({kind}): Pallas GPU kernels do not apply"
    if cc is None:   # ROCm devices report no CUDA compute capability
        return "xla", f"{kind} reports no CUDA compute capability (ROCm?): the kernels here are CUDA-only"
    major = int(cc.split(".")[0])
    if major == 9 and _jax_version() >= (0, 10):
        gemv = "; weight-only M = 1 and W1.58A8 M <= 4: Pallas Triton GEMV" if _triton_available() else ""
        return "mosaic_gpu", (f"{kind} (sm_{cc.replace('.', '')}) is Hopper: Mosaic GPU wgmma kernel "
                              f"(JAX {jax.__version__}){gemv}")
    if _triton_available():
        return "triton", (f"{kind} (compute capability {cc}) is not Hopper (the Mosaic GPU kernel uses "
                          f"sm_90a wgmma); JAX {jax.__version__} still ships Pallas Triton")
    return "xla", f"{kind} is not Hopper and this JAX ({jax.__version__}) has no Pallas Triton backend"


def choose_backend(backend: str = "auto") -> str:
    """The backend `ternary_matmul` runs for `backend` on the default device ("auto" resolves
    by device kind and JAX version; see `explain_backend`). Raises for an unknown name."""
    if backend == "auto":
        return _auto()[0]
    if backend not in BACKENDS:
        raise ValueError(f"unknown ternary_matmul backend {backend!r}; choose from {('auto',) + BACKENDS}")
    return backend


def explain_backend(backend: str = "auto") -> str:
    """One line: which backend `backend` resolves to on this device, and why."""
    if backend != "auto":
        return f"{choose_backend(backend)}: requested explicitly"
    name, why = _auto()
    return f"{name}: {why}"


def _check_args(x: jax.Array, w_packed: jax.Array, scale: jax.Array, bias: jax.Array | None) -> int:
    if x.ndim < 1:
        raise ValueError(f"x must have shape (..., K), got a scalar")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating array (bf16, f16 or f32), got dtype {x.dtype}")
    if w_packed.ndim != 2 or w_packed.dtype != jnp.int8:
        raise ValueError(f"w_packed must be a 2-D int8 array (K_pad/4, N) from pack_ternary, got "
                         f"{w_packed.dtype}{list(w_packed.shape)}")
    if padded_k(x.shape[-1]) != w_packed.shape[0] * 4:
        raise ValueError(f"x has K={x.shape[-1]} but the packed weight holds {w_packed.shape[0] * 4} rows "
                         f"(expected {padded_k(x.shape[-1])})")
    n = w_packed.shape[1]
    if jnp.ndim(scale) > 1 or jnp.size(scale) not in (1, n):
        raise ValueError(f"scale must be a scalar, (1,) or (N,)=({n},), got shape {jnp.shape(scale)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape (N,)=({n},), got {tuple(bias.shape)}")
    return n


def _resolve(backend: str, n: int, interpret: bool, m: int, activations: str) -> str:
    """The backend that runs this call: "auto" falls back (mosaic_gpu -> triton -> xla) when a
    kernel cannot tile N, and takes the Triton GEMV on Hopper up to GEMV_M tokens; an explicit
    backend that cannot tile N raises."""
    from . import gemv, mosaic_gpu, triton
    name = choose_backend(backend)
    if backend == "auto" and interpret:
        name = "triton" if _triton_available() else "xla"
    if (backend == "auto" and name == "mosaic_gpu" and m <= GEMV_M[activations] and _triton_available()
            and gemv.supports(m, n, jnp.int8 if activations == "int8" else jnp.bfloat16)):
        name = "triton"
    if name == "mosaic_gpu" and not mosaic_gpu.supports(n):
        if backend != "auto":
            raise ValueError(f"mosaic_gpu needs N a multiple of {2 * mosaic_gpu.WG_ROWS}, got N={n}")
        name = "triton" if _triton_available() else "xla"
    if name == "triton" and not triton.supports(n):
        if backend != "auto":
            raise ValueError(f"triton needs N a multiple of 16, got N={n}")
        name = "xla"
    return name


def ternary_matmul(x: jax.Array, w_packed: jax.Array, scale: jax.Array, *, bias: jax.Array | None = None,
                   out_dtype: Any = None, backend: str = "auto", interpret: bool = False,
                   activations: str = "native") -> jax.Array:
    """x (..., K) -> x @ (unpack(w_packed)[:K] * scale) + bias, shape (..., N).

    scale: scalar or (N,) fp32. activations="native" keeps x's dtype (weight-only);
    "int8" quantizes x per token (absmax, W1.58A8) and runs an int8 x int8 -> int32 matmul.
    interpret=True runs the Pallas kernel in interpret mode (CPU testing; triton backend)."""
    if activations not in ("native", "int8"):
        raise ValueError(f"activations must be 'native' or 'int8', got {activations!r}")
    n = _check_args(x, w_packed, scale, bias)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    lead, k = x.shape[:-1], x.shape[-1]
    m = math.prod(lead)
    name = _resolve(backend, n, interpret, m, activations)
    if name == "xla":
        fn = ternary_matmul_a8_ref if activations == "int8" else ternary_matmul_ref
        return fn(x, w_packed, scale, bias=bias, out_dtype=out_dtype)

    if m == 0:
        return jnp.zeros((*lead, n), out_dtype)
    x2d = x.reshape(m, k)
    step = None
    if activations == "int8":
        x2d, step = quantize_activations(x2d)
    elif x2d.dtype == jnp.float16:
        x2d = x2d.astype(jnp.float32)   # kernels take bf16 or fp32 (fp32: exact bf16 hi/lo split)
    scale_n = jnp.broadcast_to(jnp.asarray(scale, jnp.float32).reshape(-1), (n,))
    if name == "triton" and m <= GEMV_M[activations]:
        from .gemv import ternary_gemv_triton
        y = ternary_gemv_triton(x2d, w_packed, scale_n, step=step, bias=bias, out_dtype=out_dtype,
                                interpret=interpret)
    elif name == "triton":
        from .triton import ternary_matmul_triton
        y = ternary_matmul_triton(x2d, w_packed, scale_n, step=step, bias=bias, out_dtype=out_dtype,
                                  interpret=interpret)
    else:
        from .mosaic_gpu import ternary_matmul_mgpu
        y = ternary_matmul_mgpu(x2d, w_packed, scale_n, step=step, bias=bias, out_dtype=out_dtype,
                                interpret=interpret)
    return y.reshape(*lead, n)


__all__ = ["BACKENDS", "GEMV_M", "LAYOUT_NAME", "LAYOUT_VERSION", "SLAB", "TILE_K", "choose_backend", "explain_backend",
           "layout_metadata", "pack_ternary", "pack_ternary_np", "padded_k", "quantize_activations",
           "ternary_matmul", "ternary_matmul_a8_ref", "ternary_matmul_ref", "unpack_ternary", "unpack_ternary_np"]
