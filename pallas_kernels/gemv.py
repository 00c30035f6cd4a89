"""Pallas Triton kernel for the packed ternary matmul at tiny M (a few tokens): CUDA cores, no MMA.

At M = 1 the product is a matrix-vector product: it reads every weight byte once and does 2 flops
per weight, so it is bound by how fast the weights stream, not by tensor cores. One program owns
`block_n` output features and a range of K-tiles; per K-tile it loads the (block_n, 64-byte)
packed slab (contiguous in the layout, layout.py) as 32-bit words, turns each 2-bit code into
the fp32 number c = w + 1 and multiply-adds it into a (block_n, 16) fp32 accumulator per token
(one column per word). The -1 of the offset code is paid once at the end
(sum_k x_k w_k = sum_k x_k c_k - sum_k x_k), and the accumulator is reduced across its columns
once, after the K loop. Products c * x are exact and sums are fp32, as in the reference.

Split-K (`k_splits` programs along K; by default one K-tile each) gives every shape enough
programs to keep all SMs loading; XLA then sums the fp32 partials (scales applied in the kernel,
bias after the sum).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .layout import PLANES, SLAB, TILE_K, kernel_operands, packed_tiles, sum_split_k

# Tokens per call. The work per weight grows with M: at M = 2 the Mosaic MMA kernel was already
# faster on 2 of the 3 shapes measured, so dispatch uses this kernel for M = 1 (GEMV_M).
MAX_M = 4


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """block_n: output features per program (a power of 2 >= 16); k_splits: programs along K
    (must divide the K-tiles); num_warps: warps per program."""
    block_n: int = 128
    k_splits: int = 1
    num_warps: int = 4

    def check(self, n: int, k_tiles: int) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of 2 >= 16, got {self.block_n}")
        if n % self.block_n:
            raise ValueError(f"gemv needs N a multiple of block_n={self.block_n}, got N={n}")
        if self.k_splits < 1 or k_tiles % self.k_splits:
            raise ValueError(f"k_splits={self.k_splits} must divide the {k_tiles} K-tiles")


def supports(m: int, n: int) -> bool:
    """Whether this kernel takes an (m, n) problem."""
    return 1 <= m <= MAX_M and n % 16 == 0


def default_config(n: int, k_tiles: int) -> GemvConfig:
    """128 features per program (fewer where N needs it) and one K-tile per program: the fastest
    of the configurations swept at M = 1 on every FLUX shape (NOTES.md item 17). Each program
    then streams one 8 KB slab, and the FLUX shapes launch 288-2016 programs."""
    bn = next(b for b in (128, 64, 32, 16) if n % b == 0)
    return GemvConfig(block_n=bn, k_splits=k_tiles, num_warps=4)


# Codes to fp32 without a conversion instruction (int -> float runs at a quarter of the fp32
# rate on Hopper): a code c at bits s..s+1 of a 32-bit word, masked and OR-ed into the exponent
# of 2^23, is the float 2^23 + c * 2^s exactly (s <= 14); (that - 2^23) * 2^-s = c exactly, in
# one FMA. Words hold bytes j = 4q .. 4q + 3 (little-endian); the upper two bytes are reached
# through one shift by 16 per word. On the GPU each word is one inline-PTX block, 3 instructions
# per weight (LOP3, FMA, FMA): Triton on its own emits 5 (two LOP3, since a LOP3 takes one
# immediate, and no FMA contraction; NOTES.md item 17). Interpret mode runs the same arithmetic
# as jnp ops.
_MAGIC_BITS = 0x4B000000
WORDS = SLAB // 4           # 32-bit words per packed row of a K-tile
_CODES = [(b, p, 8 * (b % 2) + 2 * p) for b in range(4) for p in range(PLANES)]   # (byte, plane, bit)


def _f32_hex(v: float) -> str:
    import struct
    return "0f" + struct.pack(">f", v).hex().upper()


@functools.cache
def _word_asm() -> str:
    """PTX for acc + sum over a word's 16 codes c (= w + 1) of c * x_i, i in _CODES order:
    $0 out, $1 acc, $2 word, $3.. $18 the x values."""
    lines = ["{", ".reg .b32 hi, t, mg, mk;", ".reg .f32 a, c;", "mov.f32 a, $1;", "shr.u32 hi, $2, 16;",
             f"mov.b32 mg, {_MAGIC_BITS};"]
    for i, (b, _, sh) in enumerate(_CODES):
        lines += [f"mov.b32 mk, {3 << sh};",
                  f"lop3.b32 t, {'$2' if b < 2 else 'hi'}, mk, mg, 0xEA;",               # (w & mk) | mg
                  f"fma.rn.f32 c, t, {_f32_hex(2.0 ** -sh)}, {_f32_hex(-(2.0 ** (23 - sh)))};",   # = c
                  f"fma.rn.f32 a, c, ${3 + i}, a;"]
    return "\n".join(lines + ["mov.f32 $0, a;", "}"])


def _word_jnp(acc, words, xs):
    halves = (words, lax.shift_right_logical(words, jnp.int32(16)))
    for (b, _, sh), xv in zip(_CODES, xs):
        bits = (halves[b // 2] & jnp.int32(3 << sh)) | jnp.int32(_MAGIC_BITS)
        c = lax.bitcast_convert_type(bits, jnp.float32) * jnp.float32(2.0 ** -sh) - jnp.float32(2.0 ** (23 - sh))
        acc = acc + c * xv
    return acc


def _kernel(x_ref, w_ref, s_ref, *rest, m: int, steps: int, has_step: bool, has_bias: bool, interpret: bool):
    rest = list(rest)
    step_ref = rest.pop(0) if has_step else None
    bias_ref = rest.pop(0) if has_bias else None
    (o_ref,) = rest
    bn = w_ref.shape[1]

    def body(t, carry):
        accs, xsums = list(carry[0]), list(carry[1])
        words = w_ref[t]                                          # (bn, WORDS) int32
        for r in range(m):
            xs = []
            for b, p, _ in _CODES:                                # x[k] for k = p * SLAB + 4q + b
                # (1, WORDS) then reshape: JAX 0.10's interpreter rejects an integer row index
                # beside a strided slice.
                xv = x_ref[pl.ds(r, 1), pl.ds(t * TILE_K + p * SLAB + b, WORDS, stride=4)]
                xv = xv.reshape(WORDS).astype(jnp.float32)
                xsums[r] = xsums[r] + xv
                xs.append(jnp.broadcast_to(xv[None, :], (bn, WORDS)))
            if interpret:
                accs[r] = _word_jnp(accs[r], words, xs)
            else:
                from jax.experimental.pallas import triton as pltriton
                accs[r] = pltriton.elementwise_inline_asm(
                    _word_asm(), args=[accs[r], words, *xs], constraints="=f,f,r" + ",f" * len(xs), pack=1,
                    result_shape_dtypes=[jax.ShapeDtypeStruct((bn, WORDS), jnp.float32)])[0]
        return tuple(accs), tuple(xsums)

    init = (tuple(jnp.zeros((bn, WORDS), jnp.float32) for _ in range(m)),
            tuple(jnp.zeros((WORDS,), jnp.float32) for _ in range(m)))
    accs, xsums = lax.fori_loop(0, steps, body, init)
    scale = s_ref[...]
    for r in range(m):
        y = (jnp.sum(accs[r], axis=1) - jnp.sum(xsums[r])) * scale   # codes are w + 1
        if has_step:
            y = y * step_ref[r]
        if has_bias:
            y = y + bias_ref[...]
        o_ref[r, :] = y.astype(o_ref.dtype)


@functools.lru_cache(maxsize=None)
def _build(m: int, n: int, k_tiles: int, out_dtype: str, has_step: bool, has_bias: bool, cfg: GemvConfig,
           interpret: bool):
    from jax.experimental.pallas import triton as pltriton

    bn, splits = cfg.block_n, cfg.k_splits
    steps = k_tiles // splits
    in_specs = [pl.BlockSpec((m, steps * TILE_K), lambda j, s: (0, s)),
                pl.BlockSpec((steps, bn, WORDS), lambda j, s: (s, j, 0)),
                pl.BlockSpec((bn,), lambda j, s: (j,))]
    if has_step:
        in_specs.append(pl.BlockSpec((m,), lambda j, s: (0,)))
    if has_bias:
        in_specs.append(pl.BlockSpec((bn,), lambda j, s: (j,)))
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), jnp.dtype(out_dtype))
        out_spec = pl.BlockSpec((m, bn), lambda j, s: (0, j))
    else:
        out_shape = jax.ShapeDtypeStruct((splits, m, n), jnp.float32)
        out_spec = pl.BlockSpec((None, m, bn), lambda j, s: (s, 0, j))
    return pl.pallas_call(
        functools.partial(_kernel, m=m, steps=steps, has_step=has_step, has_bias=has_bias, interpret=interpret),
        out_shape=out_shape,
        grid=(n // bn, splits),
        in_specs=in_specs,
        out_specs=out_spec,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=interpret,
    )


def ternary_gemv_triton(x2d: jax.Array, w_packed: jax.Array, scale: jax.Array, *, step: jax.Array | None,
                        bias: jax.Array | None, out_dtype: Any, config: GemvConfig | None = None,
                        interpret: bool = False) -> jax.Array:
    """x2d (M <= MAX_M, K) @ unpack(w_packed) with epilogue scales; the contract of
    `mosaic_gpu.ternary_matmul_mgpu` (x2d: int8 codes with per-row `step`, bf16, or fp32, used
    as it is: the products are fp32). scale, bias: (N,) fp32. Returns (M, N) out_dtype."""
    m, k = x2d.shape
    if not 1 <= m <= MAX_M:
        raise ValueError(f"gemv takes 1..{MAX_M} rows of x, got {m}")
    if x2d.dtype not in (jnp.int8, jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"gemv takes int8, bf16, f16 or fp32 activations, got {x2d.dtype}")
    if step is not None and x2d.dtype != jnp.int8:
        raise ValueError("step (per-token activation scale) goes with int8 activations only")
    w3 = packed_tiles(w_packed)
    k_tiles, n, _ = w3.shape
    cfg = config or default_config(n, k_tiles)
    cfg.check(n, k_tiles)
    words = lax.bitcast_convert_type(w3.reshape(k_tiles, n, WORDS, 4), jnp.int32)   # (T, N, WORDS), free
    args = kernel_operands([x2d], m, k, m, words, scale, step)
    use_bias = bias is not None and cfg.k_splits == 1
    if use_bias:
        args.append(bias.astype(jnp.float32))
    call = _build(m, n, k_tiles, str(jnp.dtype(out_dtype)), step is not None, use_bias, cfg, interpret)
    out = call(*args)
    return sum_split_k(out, bias, out_dtype) if cfg.k_splits > 1 else out
