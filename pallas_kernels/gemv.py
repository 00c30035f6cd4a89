"""Pallas Triton kernel for the packed ternary matmul at tiny M (a few tokens).

At M = 1 the product is a matrix-vector product: it reads every weight byte once and does 2 flops
per weight, so it is bound by how fast the weights stream and by the instructions spent per
weight. One program owns `block_n` output features and a range of K-tiles; per K-tile it loads
the (block_n, 64-byte) packed slab (contiguous in the layout, layout.py) as 32-bit words (int16
halves for "mma"). Three inner products, by activation type and `GemvConfig.float_inner`:

- bf16 / f16 / fp32 x, "fma" (the default for float x): per word one inline-PTX block turns
  each 2-bit code into the fp32 number c = w + 1 and multiply-adds c * x into an fp32
  accumulator (3 instructions per weight); sum_k x_k is subtracted once. Products are exact and
  sums fp32, as in the reference. Up to 4 tokens.
- bf16 / f16 / fp32 x, "mma" (opt-in; NOTES.md item 19): per pair of codes one inline-PTX block
  (shift, LOP3 with the bf16 exponent of 128, one bf16x2 FMA: 1.5 instructions per weight)
  makes two bf16 weights w = c - 1, and the tensor cores multiply them (`dot_general`) with x padded
  to 16 token rows (at M = 1 one row, the rest masked to zero in the kernel). Within a K-tile w
  and x take the same permutation of K (`_PAIRS`). Float x other than bf16 goes in as three
  bf16 parts (24 bits: exact), so products are exact and sums fp32. Up to 16 tokens.
- int8 x (W1.58A8 codes with a per-token step), "dp4a": `(word >> 2p) & 0x03030303` is the 4
  codes of K positions 4q .. 4q + 3 of plane p (unsigned bytes), which meet 4 consecutive int8
  codes of x, one 32-bit word of x: one dp4a (byte dot product) per 4 weights, about 0.7
  instructions per weight, summed exactly in int32 across K; the steps are applied once at the
  end. Up to 4 tokens.

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

# Tokens per call, by inner product: the CUDA-core paths hold one accumulator per token, the mma
# path pads x to MMA_ROWS token rows. Dispatch decides up to which M this kernel runs (GEMV_M in
# __init__.py).
MMA_ROWS = 16
MAX_M = {"mma": MMA_ROWS, "fma": 4, "dp4a": 4}


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """block_n: output features per program (a power of 2 >= 16); k_splits: programs along K
    (must divide the K-tiles); num_warps: warps per program; num_stages: Triton's software
    pipelining of the K-tile loop; float_inner: "mma" or "fma" for float x."""
    block_n: int = 128
    k_splits: int = 1
    num_warps: int = 4
    num_stages: int = 1
    float_inner: str = "fma"

    def check(self, n: int, k_tiles: int) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of 2 >= 16, got {self.block_n}")
        if n % self.block_n:
            raise ValueError(f"gemv needs N a multiple of block_n={self.block_n}, got N={n}")
        if self.k_splits < 1 or k_tiles % self.k_splits:
            raise ValueError(f"k_splits={self.k_splits} must divide the {k_tiles} K-tiles")


def inner_product(dtype: Any, cfg: "GemvConfig | None" = None) -> str:
    """The inner product that runs x of this dtype: "dp4a" for int8, else the config's float path."""
    return "dp4a" if jnp.dtype(dtype) == jnp.int8 else (cfg or GemvConfig()).float_inner


def supports(m: int, n: int, dtype: Any) -> bool:
    """Whether this kernel takes m rows of x of this dtype against N outputs (default config)."""
    return 1 <= m <= MAX_M[inner_product(dtype)] and n % 16 == 0


def default_config(n: int, k_tiles: int) -> GemvConfig:
    """128 features per program (fewer where N needs it) and one K-tile per program: the fastest
    of the configurations swept at M = 1 on every FLUX shape, for both inner products (NOTES.md
    items 17, 18: two tiles per program, software prefetch of the next tile, or Triton's pipeline
    were slower or mixed). Each program then streams one 8 KB slab, and the FLUX shapes launch
    288-2016 programs."""
    bn = next(b for b in (128, 64, 32, 16) if n % b == 0)
    return GemvConfig(block_n=bn, k_splits=k_tiles, num_warps=4)


# bf16 / fp32 x: codes to fp32 without a conversion instruction (int -> float runs at a quarter
# of the fp32 rate on Hopper): a code c at bits s..s+1 of a 32-bit word, masked and OR-ed into the
# exponent of 2^23, is the float 2^23 + c * 2^s exactly (s <= 14); (that - 2^23) * 2^-s = c
# exactly, in one FMA. Words hold bytes j = 4q .. 4q + 3 (little-endian); the upper two bytes
# are reached through one shift by 16 per word. On the GPU each word is one inline-PTX block,
# 3 instructions per weight (LOP3, FMA, FMA): Triton on its own emits 5 (two LOP3, since a LOP3
# takes one immediate, and no FMA contraction; NOTES.md item 17). Interpret mode runs the same
# arithmetic as jnp ops.
_MAGIC_BITS = 0x4B000000
WORDS = SLAB // 4           # 32-bit weight words per packed row of a K-tile (16 codes each)
TILE_WORDS = TILE_K // 4    # 32-bit words of int8 x per K-tile
_CODES = [(b, p, 8 * (b % 2) + 2 * p) for b in range(4) for p in range(PLANES)]   # (byte, plane, bit)
_CODE_MASK = 0x03030303     # the 4 codes of one plane in a word, one per byte
_ONES = 0x01010101


def _f32_hex(v: float) -> str:
    import struct
    return "0f" + struct.pack(">f", v).hex().upper()


@functools.cache
def _fma_asm() -> str:
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


def _fma_jnp(acc, words, xs):
    """Interpret-mode twin of `_fma_asm`."""
    halves = (words, lax.shift_right_logical(words, jnp.int32(16)))
    for (b, _, sh), xv in zip(_CODES, xs):
        bits = (halves[b // 2] & jnp.int32(3 << sh)) | jnp.int32(_MAGIC_BITS)
        c = lax.bitcast_convert_type(bits, jnp.float32) * jnp.float32(2.0 ** -sh) - jnp.float32(2.0 ** (23 - sh))
        acc = acc + c * xv
    return acc


def code_planes(words: jax.Array) -> list[jax.Array]:
    """Per plane p, the word's 4 codes of K positions 4q .. 4q + 3 as unsigned bytes."""
    return [lax.shift_right_logical(words, jnp.int32(2 * p)) & jnp.int32(_CODE_MASK) for p in range(PLANES)]


@functools.cache
def _dp4a_asm() -> str:
    """PTX for $0 = $1 + sum over the 4 planes p of dp4a(codes $2+p (unsigned bytes), x word $6+p
    (signed bytes)). Inline PTX because Triton has no byte dot product."""
    lines = ["{", ".reg .b32 a;", "mov.b32 a, $1;"]
    lines += [f"dp4a.u32.s32 a, ${2 + p}, ${6 + p}, a;" for p in range(PLANES)]
    return "\n".join(lines + ["mov.b32 $0, a;", "}"])


def _dp4a_jnp(acc, codes, xw):
    """Interpret-mode twin of `_dp4a_asm`."""
    for c, xl in zip(codes, xw):
        for b in range(4):
            xb = lax.shift_right_logical(xl, jnp.int32(8 * b)) & 255
            acc = acc + (lax.shift_right_logical(c, jnp.int32(8 * b)) & 255) * ((xb ^ 128) - 128)
    return acc


# bf16 x (mma path): the word view is int16 halves, so Triton's pack=2 hands one inline-PTX block
# a whole 32-bit word (halves 2q, 2q + 1) and takes back two bf16 (elements 2q, 2q + 1). Block
# (p, h) (plane p, byte h of each half) takes the codes at bit 8h + 2p of both halves: element
# i = 2q + e is byte 4q + h + 2e of the tile row, K position p * SLAB + h + 2i: a stride-2 run of
# x. A masked code OR-ed into the exponent of 128 is the bf16 number 128 + c; one bf16x2 FMA
# turns it into c - 1 = w exactly.
HALVES = SLAB // 2          # int16 per packed row of a K-tile
_PAIR_MASK, _BF16_128, _BF16_ONE, _BF16_M129 = 0x00030003, 0x43004300, 0x3F803F80, 0xC301C301
_PAIRS = [(p, h) for p in range(PLANES) for h in range(2)]


@functools.cache
def _pair_asm(shift: int) -> str:
    """PTX: word $1 -> bf16 pair $0 = (w of byte h, w of byte h + 2), shift = 8h + 2p."""
    return "\n".join(["{", ".reg .b32 t, m, g, one, off;", f"shr.u32 t, $1, {shift};",
                      f"mov.b32 m, {_PAIR_MASK};", f"mov.b32 g, {_BF16_128};",
                      "lop3.b32 t, t, m, g, 0xEA;",                              # (t & m) | g
                      f"mov.b32 one, {_BF16_ONE};", f"mov.b32 off, {_BF16_M129};",
                      "fma.rn.bf16x2 $0, t, one, off;", "}"])


def _pair_weights(halves, p: int, h: int, interpret: bool):
    """(bn, HALVES) int16 -> (bn, HALVES) bf16 weights of block (p, h)."""
    shift = 8 * h + 2 * p
    if interpret:
        v = halves.astype(jnp.int32) & 0xFFFF
        return ((lax.shift_right_logical(v, jnp.int32(shift)) & 3) - 1).astype(jnp.bfloat16)
    from jax.experimental.pallas import triton as pltriton
    return pltriton.elementwise_inline_asm(_pair_asm(shift), args=[halves], constraints="=r,r", pack=2,
                                           result_shape_dtypes=[jax.ShapeDtypeStruct(halves.shape, jnp.bfloat16)])[0]


def _bf16_parts(xv):
    """x as a sum of bf16 parts: itself if bf16; fp32 as hi + mid + lo (exact: 3 x 8 bits)."""
    if xv.dtype == jnp.bfloat16:
        return [xv]
    parts, rest = [], xv
    for _ in range(3):
        part = rest.astype(jnp.bfloat16)
        parts.append(part)
        rest = rest - part.astype(jnp.float32)
    return parts


def _mma_tile(x_ref, t, halves, acc, mp: int, interpret: bool):
    """One K-tile, all tokens: acc (bn, MMA_ROWS) fp32 += w_tile^T x_tile^T through the tensor
    cores; x rows beyond mp (1 at M = 1) are zero."""
    row = lax.broadcasted_iota(jnp.int32, (MMA_ROWS, HALVES), 0)
    for p, h in _PAIRS:
        wt = _pair_weights(halves, p, h, interpret)
        xv = x_ref[pl.ds(0, mp), pl.ds(t * TILE_K + p * SLAB + h, HALVES, stride=2)]
        for part in _bf16_parts(xv):
            if mp < MMA_ROWS:
                part = jnp.where(row < mp, jnp.broadcast_to(part, (MMA_ROWS, HALVES)), jnp.zeros((), jnp.bfloat16))
            acc = acc + lax.dot_general(wt, part, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return acc


def _asm(text: str, args: list, out_dtype, constraints: str):
    from jax.experimental.pallas import triton as pltriton
    return pltriton.elementwise_inline_asm(text, args=args, constraints=constraints, pack=1,
                                           result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, out_dtype)])[0]


def _fma_tile(x_ref, r, t, words, acc, xsum, interpret):
    """One K-tile of one token, float x: returns (acc, xsum) with acc (bn, WORDS) fp32."""
    bn = words.shape[0]
    xs = []
    for b, p, _ in _CODES:                                        # x[k] for k = p * SLAB + 4q + b
        # (1, WORDS) then reshape: JAX 0.10's interpreter rejects an integer row index beside a
        # strided slice.
        xv = x_ref[pl.ds(r, 1), pl.ds(t * TILE_K + p * SLAB + b, WORDS, stride=4)]
        xv = xv.reshape(WORDS).astype(jnp.float32)
        xsum = xsum + xv
        xs.append(jnp.broadcast_to(xv[None, :], (bn, WORDS)))
    if interpret:
        return _fma_jnp(acc, words, xs), xsum
    return _asm(_fma_asm(), [acc, words, *xs], jnp.float32, "=f,f,r" + ",f" * len(xs)), xsum


def _dp4a_tile(x_ref, r, t, codes, acc, xsum, interpret):
    """One K-tile of one token, int8 x (as int32 words): returns (acc, xsum), both int32,
    acc (bn, WORDS) and xsum (1, WORDS) (sum over K of x via dp4a with all-ones codes)."""
    bn = codes[0].shape[0]
    xw = [x_ref[pl.ds(r, 1), pl.ds(t * TILE_WORDS + p * WORDS, WORDS)] for p in range(PLANES)]   # (1, WORDS)
    xb = [jnp.broadcast_to(v, (bn, WORDS)) for v in xw]
    ones = [jnp.full((1, WORDS), _ONES, jnp.int32)] * PLANES
    if interpret:
        return _dp4a_jnp(acc, codes, xb), _dp4a_jnp(xsum, ones, xw)
    cons = "=r" + ",r" * (1 + 2 * PLANES)
    return (_asm(_dp4a_asm(), [acc, *codes, *xb], jnp.int32, cons),
            _asm(_dp4a_asm(), [xsum, *ones, *xw], jnp.int32, cons))


def _kernel(x_ref, w_ref, s_ref, *rest, m: int, mp: int, steps: int, inner: str, has_bias: bool,
            interpret: bool):
    rest = list(rest)
    int8 = inner == "dp4a"
    step_ref = rest.pop(0) if int8 else None
    bias_ref = rest.pop(0) if has_bias else None
    (o_ref,) = rest
    bn = w_ref.shape[1]
    scale = s_ref[...]

    def finish(r, y):
        if int8:
            y = y.astype(jnp.float32) * step_ref[r]               # exact int32 until here
        y = y * scale
        if has_bias:
            y = y + bias_ref[...]
        o_ref[r, :] = y.astype(o_ref.dtype)

    if inner == "mma":
        acc = lax.fori_loop(0, steps, lambda t, a: _mma_tile(x_ref, t, w_ref[t], a, mp, interpret),
                            jnp.zeros((bn, MMA_ROWS), jnp.float32))
        col = lax.broadcasted_iota(jnp.int32, (bn, MMA_ROWS), 1)
        for r in range(m):
            finish(r, jnp.sum(jnp.where(col == r, acc, 0.0), axis=1))
        return

    acc_t = jnp.int32 if int8 else jnp.float32

    def body(t, carry):
        accs, xsums = list(carry[0]), list(carry[1])
        words = w_ref[t]                                          # (bn, WORDS) int32
        codes = code_planes(words) if int8 else None
        for r in range(m):
            if int8:
                accs[r], xsums[r] = _dp4a_tile(x_ref, r, t, codes, accs[r], xsums[r], interpret)
            else:
                accs[r], xsums[r] = _fma_tile(x_ref, r, t, words, accs[r], xsums[r], interpret)
        return tuple(accs), tuple(xsums)

    init = (tuple(jnp.zeros((bn, WORDS), acc_t) for _ in range(m)),
            tuple(jnp.zeros((1, WORDS) if int8 else (WORDS,), acc_t) for _ in range(m)))
    accs, xsums = lax.fori_loop(0, steps, body, init)
    for r in range(m):
        finish(r, jnp.sum(accs[r], axis=1) - jnp.sum(xsums[r]))  # codes are w + 1


@functools.lru_cache(maxsize=None)
def _build(m: int, mp: int, n: int, k_tiles: int, out_dtype: str, inner: str, has_bias: bool, cfg: GemvConfig,
           interpret: bool):
    from jax.experimental.pallas import triton as pltriton

    bn, splits = cfg.block_n, cfg.k_splits
    steps = k_tiles // splits
    row_len = HALVES if inner == "mma" else WORDS
    x_block = steps * (TILE_WORDS if inner == "dp4a" else TILE_K)
    in_specs = [pl.BlockSpec((mp, x_block), lambda j, s: (0, s)),
                pl.BlockSpec((steps, bn, row_len), lambda j, s: (s, j, 0)),
                pl.BlockSpec((bn,), lambda j, s: (j,))]
    if inner == "dp4a":
        in_specs.append(pl.BlockSpec((mp,), lambda j, s: (0,)))
    if has_bias:
        in_specs.append(pl.BlockSpec((bn,), lambda j, s: (j,)))
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), jnp.dtype(out_dtype))
        out_spec = pl.BlockSpec((m, bn), lambda j, s: (0, j))
    else:
        out_shape = jax.ShapeDtypeStruct((splits, m, n), jnp.float32)
        out_spec = pl.BlockSpec((None, m, bn), lambda j, s: (s, 0, j))
    return pl.pallas_call(
        functools.partial(_kernel, m=m, mp=mp, steps=steps, inner=inner, has_bias=has_bias, interpret=interpret),
        out_shape=out_shape,
        grid=(n // bn, splits),
        in_specs=in_specs,
        out_specs=out_spec,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
    )


def ternary_gemv_triton(x2d: jax.Array, w_packed: jax.Array, scale: jax.Array, *, step: jax.Array | None,
                        bias: jax.Array | None, out_dtype: Any, config: GemvConfig | None = None,
                        interpret: bool = False) -> jax.Array:
    """x2d (M, K) @ unpack(w_packed) with epilogue scales, M <= MAX_M of its inner product; the
    contract of `mosaic_gpu.ternary_matmul_mgpu` (x2d: int8 codes with per-row `step`, bf16, f16 or
    fp32, used as it is: float products are exact, int8 products exact). scale, bias: (N,) fp32.
    Returns (M, N) out_dtype."""
    m, k = x2d.shape
    if x2d.dtype not in (jnp.int8, jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"gemv takes int8, bf16, f16 or fp32 activations, got {x2d.dtype}")
    int8 = x2d.dtype == jnp.int8
    if (step is not None) != int8:
        raise ValueError("step (per-token activation scale) goes with int8 activations, and only with them")
    w3 = packed_tiles(w_packed)
    k_tiles, n, _ = w3.shape
    cfg = config or default_config(n, k_tiles)
    cfg.check(n, k_tiles)
    inner = inner_product(x2d.dtype, cfg)
    if not 1 <= m <= MAX_M[inner]:
        raise ValueError(f"gemv ({inner}) takes 1..{MAX_M[inner]} rows of x, got {m}")
    if inner == "mma":
        if x2d.dtype == jnp.float16:
            x2d = x2d.astype(jnp.float32)                          # split into bf16 parts in the kernel
        mp = 1 if m == 1 else MMA_ROWS
        w_view = lax.bitcast_convert_type(w3.reshape(k_tiles, n, HALVES, 2), jnp.int16)   # free
    else:
        mp = m
        w_view = lax.bitcast_convert_type(w3.reshape(k_tiles, n, WORDS, 4), jnp.int32)    # free
    args = kernel_operands([x2d], m, k, mp, w_view, scale, step)
    if int8:                                                      # 4 codes per 32-bit word, K order
        args[0] = lax.bitcast_convert_type(args[0].reshape(m, -1, 4), jnp.int32)
    use_bias = bias is not None and cfg.k_splits == 1
    if use_bias:
        args.append(bias.astype(jnp.float32))
    call = _build(m, mp, n, k_tiles, str(jnp.dtype(out_dtype)), inner, use_bias, cfg, interpret)
    out = call(*args)
    return sum_split_k(out, bias, out_dtype) if cfg.k_splits > 1 else out
