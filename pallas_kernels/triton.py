"""Pallas Triton kernels for the packed ternary matmul (GPUs without Mosaic GPU, e.g. Ampere).

The Pallas Triton backend is deprecated since JAX 0.11 (kept while JAX ships it). One program
computes a (BM, BN) output block, looping over K tiles: the packed tile (BN rows, 64 bytes) is
unpacked elementwise into four int8 planes (layout.py), each multiplied against the matching
64-wide K-slab of x with `dot_general` (int8 -> int32, or bf16 -> fp32); Triton places the
operands for the tensor cores. Scales and bias are applied before the single store.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .layout import PLANES, SLAB, TILE_K, kernel_operands, packed_tiles


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    block_m: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3


def default_config(m: int, n: int) -> TritonConfig:
    """Block sizes by M; block_n is the largest of 128/64/32/16 dividing N."""
    bn = next(b for b in (128, 64, 32, 16) if n % b == 0)
    if m <= 16:
        return TritonConfig(block_m=16, block_n=min(bn, 64), num_warps=4, num_stages=4)
    if m <= 64:
        return TritonConfig(block_m=64, block_n=min(bn, 64), num_warps=4, num_stages=4)
    return TritonConfig(block_m=128, block_n=bn, num_warps=8, num_stages=3)


def supports(n: int) -> bool:
    """Whether the Triton kernel tiles N (blocks must divide it: Pallas Triton on GPU does not
    mask a partial block's stores)."""
    return n % 16 == 0


def _kernel(x_ref, w_ref, s_ref, *rest, t_w: int, t_x: int, has_step: bool, has_bias: bool):
    rest = list(rest)
    step_ref = rest.pop(0) if has_step else None
    bias_ref = rest.pop(0) if has_bias else None
    (o_ref,) = rest
    is_int8 = x_ref.dtype == jnp.int8
    acc_dtype = jnp.int32 if is_int8 else jnp.float32
    bm, bn = o_ref.shape

    def body(t, acc):
        packed = w_ref[lax.rem(t, t_w)]                       # (bn, SLAB) int8, K contiguous
        for p in range(PLANES):
            codes = lax.shift_right_logical(packed, jnp.int8(2 * p)) & jnp.int8(3)
            w = codes - jnp.int8(1) if is_int8 else codes.astype(x_ref.dtype) - jnp.asarray(1, x_ref.dtype)
            x = x_ref[:, pl.ds(t * TILE_K + p * SLAB, SLAB)]    # (bm, SLAB)
            acc += lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=acc_dtype)
        return acc

    acc = lax.fori_loop(0, t_x, body, jnp.zeros((bm, bn), acc_dtype))
    y = acc.astype(jnp.float32) * s_ref[...][None, :]
    if has_step:
        y = y * step_ref[...][:, None]
    if has_bias:
        y = y + bias_ref[...][None, :]
    o_ref[...] = y.astype(o_ref.dtype)


@functools.lru_cache(maxsize=None)
def _build(m: int, n: int, t_w: int, t_x: int, out_dtype: str, has_step: bool, has_bias: bool,
           cfg: TritonConfig, interpret: bool):
    from jax.experimental.pallas import triton as pltriton

    bm, bn = cfg.block_m, cfg.block_n
    in_specs = [pl.BlockSpec((bm, t_x * TILE_K), lambda i, j: (i, 0)),
                pl.BlockSpec((t_w, bn, SLAB), lambda i, j: (0, j, 0)),
                pl.BlockSpec((bn,), lambda i, j: (j,))]
    if has_step:
        in_specs.append(pl.BlockSpec((bm,), lambda i, j: (i,)))
    if has_bias:
        in_specs.append(pl.BlockSpec((bn,), lambda i, j: (j,)))
    return pl.pallas_call(
        functools.partial(_kernel, t_w=t_w, t_x=t_x, has_step=has_step, has_bias=has_bias),
        out_shape=jax.ShapeDtypeStruct((m, n), jnp.dtype(out_dtype)),
        grid=(pl.cdiv(m, bm), pl.cdiv(n, bn)),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
    )


def ternary_matmul_triton(x2d: jax.Array, w_packed: jax.Array, scale: jax.Array, *, step: jax.Array | None,
                          bias: jax.Array | None, out_dtype: Any, config: TritonConfig | None = None,
                          interpret: bool = False) -> jax.Array:
    """Same contract as `mosaic_gpu.ternary_matmul_mgpu` (x2d int8 codes + step, bf16, or fp32
    split into bf16 hi + lo)."""
    m, k = x2d.shape
    w3 = packed_tiles(w_packed)
    t_w, n, _ = w3.shape
    if x2d.dtype == jnp.float32:
        hi = x2d.astype(jnp.bfloat16)
        parts = [hi, (x2d - hi.astype(jnp.float32)).astype(jnp.bfloat16)]
    elif x2d.dtype in (jnp.bfloat16, jnp.int8):
        parts = [x2d]
    else:
        raise ValueError(f"triton backend takes int8, bf16 or fp32 activations, got {x2d.dtype}")
    cfg = config or default_config(m, n)
    if n % cfg.block_n:
        raise ValueError(f"triton backend needs N a multiple of block_n={cfg.block_n}, got N={n}")
    # Whole blocks only: rows are padded (a partial block would store out of bounds on the GPU).
    mp = -(-m // cfg.block_m) * cfg.block_m
    args = kernel_operands(parts, m, k, mp, w3, scale, step)
    if bias is not None:
        args.append(bias.astype(jnp.float32))
    call = _build(mp, n, t_w, t_w * len(parts), str(jnp.dtype(out_dtype)), step is not None, bias is not None,
                  cfg, interpret)
    out = call(*args)
    return out[:m] if mp != m else out
