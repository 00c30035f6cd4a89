"""Mosaic GPU (Hopper, sm_90a) kernels for the packed ternary matmul.

Transposed product: out^T (N, M) = w^T (N, K) @ x^T (K, M). The packed weight tile (rows n,
64 bytes of K) is loaded from shared memory into registers, each 2-bit plane is unpacked there
(elementwise, see layout.py) straight into the wgmma A-operand layout, and x^T is the B operand
read from shared memory by the tensor cores. Weight-only: bf16 x bf16 -> f32. W1.58A8:
s8 x s8 -> s32 (exact). Scales (and bias) are applied in the epilogue, which stores the
transposed accumulator through shared memory with TMA.

Structure follows jax/experimental/pallas/ops/gpu/hopper_mixed_type_matmul_mgpu.py: a
persistent grid, 2 (or 3: weight-only at large M) compute warpgroups + 1 TMA warpgroup
(`emit_pipeline_warp_specialized`).
Lowering semantics are pinned to Lane (explicit register layouts) so JAX 0.10 and 0.11 agree.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .layout import PLANES, SLAB, TILE_K, kernel_operands, packed_tiles, sum_split_k

# wgmma tile constraints: A (weights) rows come in groups of 64 per warpgroup; B columns (tokens)
# a multiple of 8 and at most 256.
WG_ROWS = 64
MAX_TILE_M = 256
NUM_COMPUTE_WGS = 2   # the default number of compute warpgroups (MgpuConfig.compute_wgs)
SMEM_LIMIT = 232448   # bytes of shared memory a Hopper CTA can use
MAX_CLUSTER = 8       # CTAs per cluster that every Hopper GPU can launch (portable size)


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    """Tile configuration. tile_n: weight rows (output features) per compute warpgroup (a
    multiple of 64); tile_m: tokens per CTA (wgmma N); stages: pipeline depth; k_splits: split-K
    factor (for small M, where N/tile tiles cannot fill the GPU); sum_in_kernel: the last split
    of each tile adds the other splits' fp32 partials itself (global semaphores), so no XLA sum
    follows the kernel; split_cluster: a tile's k_splits CTAs form one cluster and send their
    partials to split 0's shared memory, which sums them (no XLA sum, no global semaphores)."""
    tile_n: int = 64
    tile_m: int = 128
    stages: int = 4
    k_splits: int = 1
    grid_minor_n: bool = True
    grid_tile_width: int = 4
    epi_m: int = 64            # tokens per epilogue store chunk (2 chunks in flight per warpgroup)
    overlap: bool = True       # keep one wgmma in flight while unpacking the next plane
    k_steps: int = 1           # pipeline steps per K-tile (1, 2 or 4): smaller stages, more of them
    cluster: int = 1           # CTAs per cluster along N; 2: they share each x tile by TMA multicast
    chain: bool = False        # one pipeline over all of a CTA's tiles: the next tile's loads start early
    pingpong: bool = False     # the 2 compute warpgroups take turns issuing each step's wgmmas (see _build)
    compute_wgs: int = NUM_COMPUTE_WGS   # compute warpgroups per CTA (CTA rows: compute_wgs * tile_n)
    sum_in_kernel: bool = False  # k_splits > 1: the last split sums the partials (else XLA does);
                                 # off: the semaphore zero-fill costs more (NOTES.md item 25)
    split_cluster: bool = False  # k_splits > 1: the splits of a tile are one cluster, summed in
                                 # split 0's shared memory; off: slower than the XLA sum (item 26)

    def check(self) -> None:
        if self.tile_n % WG_ROWS or self.tile_n <= 0:
            raise ValueError(f"tile_n must be a positive multiple of {WG_ROWS}, got {self.tile_n}")
        if self.tile_m % 8 or not 8 <= self.tile_m <= MAX_TILE_M:
            raise ValueError(f"tile_m must be a multiple of 8 in [8, {MAX_TILE_M}], got {self.tile_m}")
        if self.stages < 1 or self.k_splits < 1:
            raise ValueError(f"stages and k_splits must be >= 1, got {self.stages}, {self.k_splits}")
        if self.k_steps not in (1, 2, 4):
            raise ValueError(f"k_steps must be 1, 2 or 4, got {self.k_steps}")
        if self.cluster not in (1, 2):
            raise ValueError(f"cluster must be 1 or 2, got {self.cluster}")
        if self.cluster == 2 and self.tile_m % 16:
            raise ValueError(f"cluster=2 splits the x tile between 2 CTAs: tile_m must be a multiple of 16, "
                             f"got {self.tile_m}")
        if self.chain and self.overlap:
            raise ValueError("chain needs overlap=False (JAX chains pipelines only without delayed release)")
        if self.overlap and self.stages < 2:
            raise ValueError("overlap needs stages >= 2 (a stage stays in use one step longer)")
        # 4 (256-row CTAs of 64-row warpgroup tiles, 112 registers per thread) failed to compile
        # with 144-token tiles on the GPU (NOTES.md item 24).
        if self.compute_wgs not in (2, 3):
            raise ValueError(f"compute_wgs must be 2 or 3, got {self.compute_wgs}")
        if self.pingpong and self.compute_wgs != 2:
            raise ValueError(f"pingpong takes turns between 2 compute warpgroups, got compute_wgs={self.compute_wgs}")
        if self.sum_in_kernel and self.k_splits < 2:
            raise ValueError(f"sum_in_kernel needs k_splits >= 2, got {self.k_splits}")
        if self.split_cluster:
            # A portable cluster holds at most 8 CTAs; the cluster axis is taken by the splits.
            if not 2 <= self.k_splits <= MAX_CLUSTER:
                raise ValueError(f"split_cluster needs 2 <= k_splits <= {MAX_CLUSTER}, got {self.k_splits}")
            if self.cluster != 1 or self.sum_in_kernel:
                raise ValueError("split_cluster excludes cluster=2 (x multicast) and sum_in_kernel")

    def cta_n(self) -> int:
        """Weight rows (output features) per CTA."""
        return self.compute_wgs * self.tile_n

    def epilogue_itemsize(self, out_itemsize: int) -> int:
        """Bytes per element the epilogue stores through shared memory: fp32 partials where XLA
        sums the splits, else the output's."""
        return 4 if self.k_splits > 1 and not self.reduces_splits() else out_itemsize

    def reduces_splits(self) -> bool:
        """Whether the kernel itself adds the split-K partials (else an XLA sum follows)."""
        return self.k_splits > 1 and (self.sum_in_kernel or self.split_cluster)

    def step_k(self) -> int:
        return TILE_K // self.k_steps

    def epi_rows(self) -> int:
        return min(self.epi_m, self.tile_m)

    def smem_bytes(self, x_itemsize: int, out_itemsize: int) -> int:
        """Shared memory the kernel asks for (pipeline stages + epilogue buffers + barriers)."""
        stage = self.tile_m * self.step_k() * x_itemsize + self.cta_n() * SLAB
        epi = self.compute_wgs * 2 * self.epi_rows() * self.tile_n * out_itemsize
        red = (self.k_splits - 1) * self.compute_wgs * self.tile_n * self.tile_m * 4 if self.split_cluster else 0
        return self.stages * stage + epi + red + 1024


def _load(ref, layout, optimized: bool = True):
    """plgpu.load across JAX versions (0.10 needs an explicit empty index; 0.11 deprecates it)."""
    if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:
        return plgpu.load(ref, (), layout=layout, optimized=optimized)
    return plgpu.load(ref, layout=layout, optimized=optimized)


def _swizzle_transforms(minor_bytes: int, itemsize: int) -> tuple[int, tuple]:
    swizzle = plgpu.find_swizzle(minor_bytes * 8)
    return swizzle, (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


# --- unpacking one 2-bit plane into a wgmma A operand ------------------------------------------
# Codes are w + 1 in {0, 1, 2} (layout.py). int8: per 32-bit register of 4 packed bytes,
#   t = (r >> 2p) & 0x03030303;  w = (t + 0x7f7f7f7f) ^ 0x80808080   (bytewise t - 1, no carries)
# bf16: each packed byte b goes once into a half 0x4300 | b (_spread_bf16); per plane a mask and
# one exact bf16 FMA make c - 1 (_plane_bf16).


def _plane_i8(packed, p: int):
    import jax.experimental.mosaic.gpu as mgpu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith

    layout = plgpu.Layout.WGMMA_8BIT

    @plgpu.inline_mgpu(arg_types=(layout,),
                       return_type=plgpu.ShapeDtypeStruct(packed.shape, jnp.int8, layout))
    def unpack(_, fa):
        i32 = ir.IntegerType.get_signless(32)
        c = lambda v: arith.constant(i32, v)
        regs = np.empty_like(fa.registers)
        for idx, reg in np.ndenumerate(fa.registers):
            r = mgpu.utils.bitcast(reg, i32)
            if p:
                r = arith.shrui(r, c(2 * p))
            r = arith.andi(r, c(0x03030303))
            r = arith.xori(arith.addi(r, c(0x7F7F7F7F)), c(0x80808080 - (1 << 32)))
            regs[idx] = mgpu.utils.bitcast(r, reg.type)
        return mgpu.FragmentedArray(_registers=regs, _layout=fa.layout, _is_signed=True)

    return unpack(packed)


def _spread_bf16(packed):
    """Each packed byte b (the 4 planes' codes of one K position) into the low byte of a bf16
    half 0x4300 | b: one byte permute per 2 weights, shared by the 4 planes (_plane_bf16)."""
    import jax.experimental.mosaic.gpu as mgpu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith

    layout = plgpu.Layout.WGMMA

    @plgpu.inline_mgpu(arg_types=(layout,),
                       return_type=plgpu.ShapeDtypeStruct(packed.shape, jnp.bfloat16, layout))
    def spread(_, fa):
        i16 = ir.IntegerType.get_signless(16)
        i32 = ir.IntegerType.get_signless(32)
        vec_ty = ir.VectorType.get((2,), ir.BF16Type.get())
        c = lambda v: arith.constant(i32, v)
        regs = np.empty_like(fa.registers)
        for idx, reg in np.ndenumerate(fa.registers):   # reg: vector<2xi8>, two consecutive k
            r = arith.extui(i32, mgpu.utils.bitcast(reg, i16))
            # bytes [b0, b1, 0, 0] -> [b0, 0x43, b1, 0x43]
            regs[idx] = mgpu.utils.bitcast(mgpu.utils.prmt(r, c(0x43), c(0x4140)), vec_ty)
        return mgpu.FragmentedArray(_registers=regs, _layout=fa.layout, _is_signed=None)

    return spread(packed)


def plane_bf16_constants(p: int) -> tuple[int, int, int]:
    """(mask, multiplier, addend) of _plane_bf16 for plane p, as 32-bit words of two bf16 halves."""
    bits = lambda v: int(np.array(v, dtype=jnp.bfloat16).view(np.uint16))
    half = lambda b: b | (b << 16)
    return half(0x4300 | (3 << 2 * p)), half(bits(4.0 ** -p)), half(bits(-(128 * 4.0 ** -p + 1)))


def _plane_bf16(spread, p: int):
    """Plane p's weights c - 1 from _spread_bf16's halves 0x4300 | b: masking keeps 0x43 and the
    code's bits, 0x4300 | (c << 2p), which is the bf16 number 128 + c 4^p (for p = 3, c = 2 the
    mantissa carries into the exponent: 0x4380 = 256, still 128 + 128; codes are 0-2 only). One
    exact bf16 FMA, x 4^-p - (128 4^-p + 1), makes c - 1: two instructions per 2 weights, where
    shift, and, prmt and subtract took four (NOTES.md item 29)."""
    import jax.experimental.mosaic.gpu as mgpu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm

    layout = plgpu.Layout.WGMMA
    mask, mul, add = plane_bf16_constants(p)

    @plgpu.inline_mgpu(arg_types=(layout,),
                       return_type=plgpu.ShapeDtypeStruct(spread.shape, jnp.bfloat16, layout))
    def unpack(_, fa):
        i32 = ir.IntegerType.get_signless(32)
        c = lambda v: arith.constant(i32, v - (1 << 32) if v >= 1 << 31 else v)
        regs = np.empty_like(fa.registers)
        for idx, reg in np.ndenumerate(fa.registers):
            r = arith.andi(mgpu.utils.bitcast(reg, i32), c(mask))
            r = llvm.inline_asm(i32, [r, c(mul), c(add)], "fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r")
            regs[idx] = mgpu.utils.bitcast(r, reg.type)
        return mgpu.FragmentedArray(_registers=regs, _layout=fa.layout, _is_signed=None)

    return unpack(spread)


# --- the kernel --------------------------------------------------------------------------------


def x_rows(m: int) -> int:
    """Rows x (and a non-split output) must have for the kernel, which itself runs whole tiles
    of tile_m tokens: TMA zero-fills the rows a load reads past the end and drops the rows a
    store writes past it, so x needs no copy padded to whole tiles. But Mosaic views a tiled
    array's rows in groups of 8 (a dimension smaller than its tile, or a multiple of it), so
    m > 8 is rounded up to a multiple of 8."""
    return m if m <= 8 else -(-m // 8) * 8


@functools.lru_cache(maxsize=None)
def _build(mx: int, mp: int, n: int, t_w: int, t_x: int, x_dtype: str, out_dtype: str, has_step: bool,
           has_bias: bool, cfg: MgpuConfig, num_sms: int):
    """A jitted callable (x, w3, scale[, step][, bias]) -> out for these static parameters.

    x (mx, t_x*TILE_K) x_dtype, mx = x_rows(M) <= mp, mp = M rounded up to whole tiles; w3
    (t_w, n, SLAB) int8 with t_x a multiple of t_w (the bf16 hi/lo split of fp32 inputs repeats
    the weights); scale (n,) f32; step (mp,) f32; bias (n,) f32. Returns (mx, n) out_dtype, or
    (k_splits, mx, n) f32 partial sums (scaled, no bias) when k_splits > 1 and not
    cfg.reduces_splits()."""
    x_dtype, out_dtype = jnp.dtype(x_dtype), jnp.dtype(out_dtype)
    is_int8 = x_dtype == jnp.int8
    tile_n, tile_m, splits = cfg.tile_n, cfg.tile_m, cfg.k_splits
    cta_n, wgs = cfg.cta_n(), cfg.compute_wgs
    cluster = cfg.cluster
    if n % (cta_n * cluster) or mp % tile_m or not mp - tile_m < mx <= mp or t_x % splits or t_x % t_w or tile_m % cfg.epi_rows():
        raise ValueError(f"mosaic_gpu tiling does not divide the problem: n={n} cta_n={cta_n} cluster={cluster} "
                         f"mx={mx} mp={mp} tile_m={tile_m} k_tiles={t_x} splits={splits} epi_m={cfg.epi_m}")
    m_iters, n_iters, k_per_split = mp // tile_m, n // (cta_n * cluster), t_x // splits
    if cfg.chain and (k_per_split * cfg.k_steps) % cfg.stages:
        raise ValueError(f"chain needs the pipeline steps per tile ({k_per_split * cfg.k_steps}) to be a multiple "
                         f"of stages ({cfg.stages})")
    acc_dtype = jnp.int32 if is_int8 else jnp.float32
    fold = cfg.sum_in_kernel
    dsm = cfg.split_cluster and splits > 1
    partials_out = splits > 1 and not cfg.reduces_splits()
    final_dtype = jnp.dtype(jnp.float32) if partials_out else out_dtype

    x_item = x_dtype.itemsize
    step_k = cfg.step_k()
    k_steps = cfg.k_steps                  # pipeline steps per weight K-tile
    planes_per_step = PLANES // k_steps
    _, x_transforms = _swizzle_transforms(step_k * x_item, x_item)
    # int8 B operand: the 64-element K-slab of a plane is one 64-byte swizzle atom; bf16: 128 bytes.
    if is_int8:
        x_transforms = (plgpu.TilingTransform((8, SLAB)), plgpu.SwizzleTransform(SLAB))
    w_transforms = (plgpu.TilingTransform((8, SLAB)), plgpu.SwizzleTransform(SLAB))
    out_item = final_dtype.itemsize
    out_swizzle = plgpu.find_swizzle(tile_n * out_item * 8)
    out_transforms = (plgpu.TilingTransform((8, out_swizzle // out_item)), plgpu.SwizzleTransform(out_swizzle))
    w_layout = plgpu.Layout.WGMMA_8BIT if is_int8 else plgpu.Layout.WGMMA
    epi_m = cfg.epi_rows()
    delay = 1 if cfg.overlap else 0

    def kernel(x_gmem, w_gmem, s_gmem, *rest, out_smem, turns=None, red_smem=None, red_in=None, red_done=None):
        rest = list(rest)
        step_gmem = rest.pop(0) if has_step else None
        bias_gmem = rest.pop(0) if has_bias else None
        out_gmem, *part_gmem = rest
        if fold:
            # One counter per (tile, compute warpgroup): the splits before the last each add 1 once
            # their partial is written; the last split waits for k_splits - 1 and takes them back
            # to 0. Pallas zero-fills these before every call.
            sems = pl.get_global(plgpu.SemaphoreType.REGULAR((m_iters * n_iters * wgs,)))

        def get_pipeline(body, compute_context, k0=0, state=None):
            # Weight K-tile index wraps around: the fp32 hi/lo split repeats the weights.
            w_map = lambda k: (lax.rem(lax.div(k, jnp.int32(k_steps)) + k0, jnp.int32(t_w)), 0, 0)
            return plgpu.emit_pipeline_warp_specialized(
                body,
                grid=(k_per_split * k_steps,),
                memory_registers=40,
                in_specs=[
                    plgpu.BlockSpec((None, cta_n, SLAB), w_map, transforms=w_transforms,
                                    memory_space=plgpu.SMEM, delay_release=delay),
                    # With a cluster, each CTA fetches half of the x tile and multicasts it to both.
                    plgpu.BlockSpec((tile_m, step_k), lambda k: (0, k + k0 * k_steps), transforms=x_transforms,
                                    memory_space=plgpu.SMEM, delay_release=delay,
                                    collective_axes=("cluster",) if cluster > 1 else ()),
                    # x has mx <= mp rows: the last tile's TMA loads zero-fill the rows past mx.
                ],
                wg_axis="wg",
                num_compute_wgs=wgs,
                max_concurrent_steps=cfg.stages,
                compute_context=compute_context,
                pipeline_state=state,
            )

        ignore = lambda *_, **__: None

        @functools.partial(pl.run_scoped,
                           allocs=get_pipeline(ignore, ignore).get_allocations(
                               w_gmem.at[:, :cta_n], x_gmem),   # only the block shapes count
                           collective_axes="wg")
        def _scope(allocs):
            wg = lax.axis_index("wg")
            if cfg.pingpong:
                # Turn-taking (CUTLASS's ping-pong, per pipeline step): warpgroup 0 issues step s's
                # wgmmas, then warpgroup 1 issues its own, then warpgroup 0 step s + 1. Each waits on
                # the other's barrier before its first wgmma of a step and arrives on its own after
                # its last, so the tensor cores run one warpgroup's wgmmas while the other drains,
                # releases the stage and unpacks. Measured on an H200 (NOTES.md item 23): +1-3 % for
                # weight-only at M = 4608 and K = 3072, 29-36 % more time for int8, slower at small
                # M; hence off by default. Warpgroup 1 arrives once here, as for a step -1, so that
                # warpgroup 0's first wait passes.
                pl.when(wg == 1)(lambda: plgpu.barrier_arrive(turns.at[1]))

            def wait_turn():     # warpgroup w waits for the other's barrier
                pl.when(wg == 0)(lambda: plgpu.barrier_wait(turns.at[1]))
                pl.when(wg == 1)(lambda: plgpu.barrier_wait(turns.at[0]))

            def end_turn():      # and arrives on its own (static indices: one branch each)
                pl.when(wg == 0)(lambda: plgpu.barrier_arrive(turns.at[0]))
                pl.when(wg == 1)(lambda: plgpu.barrier_arrive(turns.at[1]))

            # With split_cluster the grid runs clusters of the k_splits CTAs of one tile.
            @plgpu.nd_loop(((1 if dsm else splits) * m_iters * n_iters,), collective_axes="sm")
            def _loop(info):
                (lin,) = info.index
                if dsm:
                    split, rem = lax.axis_index("split"), lin
                else:
                    split = lax.div(lin, jnp.int32(m_iters * n_iters))
                    rem = lax.rem(lin, jnp.int32(m_iters * n_iters))
                m_idx, n_idx = plgpu.planar_snake(rem, (m_iters, n_iters), 1 if cfg.grid_minor_n else 0,
                                                  cfg.grid_tile_width)
                if cluster > 1:
                    n_idx = n_idx * cluster + lax.axis_index("cluster")
                k0 = split * k_per_split            # first x K-tile of this split
                m_sl = pl.ds(m_idx * tile_m, tile_m)
                n0 = n_idx * cta_n + wg * tile_n
                n_sl = pl.ds(n0, tile_n)

                def compute_context(eval_pipeline):
                    # Epilogue vectors are fetched before the main loop so their latency hides.
                    row = plgpu.Layout.WGMMA.reduce(1)
                    vecs = [_load(s_gmem.at[n_sl], row, False)]
                    if has_step:
                        vecs.append(_load(step_gmem.at[m_sl], plgpu.Layout.WGMMA.reduce(0), False))
                    if has_bias:
                        vecs.append(_load(bias_gmem.at[n_sl], row, False))

                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_n, tile_m), acc_dtype))
                    def _acc(acc_ref):
                        eval_pipeline(acc_ref)
                        _epilogue(acc_ref[...], vecs)

                def _epilogue(acc, vecs):
                    vecs = list(vecs)
                    y = acc.astype(jnp.float32) * lax.broadcast_in_dim(vecs.pop(0), acc.shape, [0])
                    if has_step:
                        y = y * lax.broadcast_in_dim(vecs.pop(0), acc.shape, [1])
                    if fold:
                        _fold_splits(y, vecs)
                    elif dsm:
                        _gather_splits(y, vecs)
                    else:
                        _store(y, vecs)

                def _gather_splits(y, vecs):
                    # Splits 1.. of the cluster store their partial into split 0's shared memory
                    # (st.async: the bytes land with a complete_tx on split 0's barrier for that
                    # slot); split 0 waits for each, adds them and stores the output.
                    # The barriers are a Python tuple (see the scratch below), hence one branch per
                    # split and warpgroup with a static index.
                    for s in range(1, splits):
                        for w in range(wgs):
                            pl.when(jnp.logical_and(split == s, wg == w))(functools.partial(
                                plgpu.async_store_smem, y, red_smem.at[(s - 1) * wgs + w],
                                red_in[(s - 1) * wgs + w], cluster_idx=0, cluster_dim="split"))

                    @pl.when(split == 0)
                    def _():
                        for w in range(wgs):
                            @pl.when(wg == w)
                            def _(w=w):
                                for s in range(splits - 1):
                                    plgpu.barrier_wait(red_in[s * wgs + w])
                        total = y
                        for s in range(splits - 1):
                            total = total + _load(red_smem.at[s * wgs + wg], plgpu.Layout.WGMMA)
                        _store(total, vecs)

                    # The cluster's next tile reuses the slots, and a sender must not exit while its
                    # stores are in flight: all wait until split 0 has read them (all CTAs of a
                    # cluster run the same tiles, so they agree on the count).
                    plgpu.barrier_arrive(red_done)
                    plgpu.barrier_wait(red_done)

                def _fold_splits(y, vecs):
                    # The last split is the last work item of its tile in every CTA's order (split is
                    # the outermost index and CTAs take items in increasing order), so a CTA waiting
                    # here has finished all its earlier splits: no wait cycle while the persistent
                    # grid's CTAs are all resident (one per SM).
                    sem = sems.at[(m_idx * n_iters + n_idx) * wgs + wg]
                    part_tile = lambda s: part_gmem[0].at[s, n_sl, pl.ds(m_idx * tile_m, tile_m)]
                    last = split == splits - 1

                    @pl.when(jnp.logical_not(last))
                    def _():
                        part_tile(split)[...] = y       # plain stores: the release below orders them
                        plgpu.semaphore_signal(sem, 1, memory_scope="gpu")

                    @pl.when(last)
                    def _():
                        plgpu.semaphore_wait(sem, splits - 1, memory_scope="gpu")
                        total = y
                        for s in range(splits - 1):
                            total = total + _load(part_tile(s), plgpu.Layout.WGMMA, False)
                        _store(total, vecs)

                def _store(y, vecs):
                    if has_bias:
                        y = y + lax.broadcast_in_dim(vecs.pop(0), y.shape, [0])
                    y = y.astype(final_dtype)
                    row0 = m_idx * tile_m
                    # Each split's partials are an (mx, n) slab of their own, so TMA drops the rows
                    # past mx of every split (at M = 4, 16-token tiles wrote 4x the rows read).
                    out_ref = out_gmem.at[split] if partials_out else out_gmem
                    # Store y^T in chunks of epi_m tokens through 2 shared-memory slots per warpgroup.
                    for c in range(tile_m // epi_m):
                        slot = c % 2
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # this slot's previous store
                        dst = plgpu.transpose_ref(out_smem.at[wg, slot], (1, 0))
                        dst[...] = plgpu.layout_cast(y[:, c * epi_m:(c + 1) * epi_m],
                                                     plgpu.Layout.WGMMA_TRANSPOSED)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(out_smem.at[wg, slot],
                                                out_ref.at[pl.ds(row0 + c * epi_m, epi_m), n_sl])

                def planes(first, w_smem, x_smem, acc_ref):
                    w_ref = w_smem.at[pl.ds(wg * tile_n, tile_n)]
                    packed = _load(w_ref, w_layout)
                    if not is_int8:
                        packed = _spread_bf16(packed)
                    for i in range(planes_per_step):
                        p = first + i
                        # Plain jnp shifts on int8 arrays do not lower (Mosaic GPU has no 8-bit
                        # pointwise arithmetic), so the unpack works on 32-bit registers.
                        if is_int8:
                            a = _plane_i8(packed, p)
                        else:
                            a = _plane_bf16(packed, p)
                        b = plgpu.transpose_ref(x_smem.at[:, pl.ds(i * SLAB, SLAB)], (1, 0))
                        if cfg.pingpong and i == 0:
                            wait_turn()
                        plgpu.wgmma(acc_ref, a, b)
                        if cfg.overlap:
                            plgpu.wgmma_wait(1)
                    if cfg.pingpong:
                        end_turn()
                    if not cfg.overlap:
                        plgpu.wgmma_wait(0)

                def mma_body(idxs, w_smem, x_smem, acc_ref):
                    if k_steps == 1:
                        planes(0, w_smem, x_smem, acc_ref)
                    else:
                        (k,) = idxs
                        sub = lax.rem(k, jnp.int32(k_steps))
                        for h in range(k_steps):
                            pl.when(sub == h)(functools.partial(planes, h * planes_per_step, w_smem, x_smem,
                                                                 acc_ref))
                    return acc_ref

                state = None
                if cfg.chain:
                    # Chained pipelines: the memory warpgroup fills the stages before the CTA's first
                    # tile only, then keeps loading the next tile's steps as stages free up, and waits
                    # for all stages to be consumed after the last tile. A CTA with one tile runs
                    # START and skips that wait, which only keeps the barriers in phase for a next
                    # pipeline; none follows.
                    pp = plgpu.PipelinePipeline
                    state = jnp.where(info.local_index == 0, jnp.int32(pp.START),
                                      jnp.where(info.local_index == info.num_local_steps - 1,
                                                jnp.int32(pp.STOP), jnp.int32(pp.STEADY)))
                w_src = w_gmem.at[:, pl.ds(n_idx * cta_n, cta_n)]
                get_pipeline(mma_body, compute_context, k0, state)(w_src, x_gmem.at[m_sl], allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    out_shape = (splits, mx, n) if partials_out else (mx, n)    # TMA drops stored rows past mx
    out_type = jax.ShapeDtypeStruct(out_shape, final_dtype)
    if fold:
        # The first k_splits - 1 splits' fp32 partials, transposed like the accumulator: whole tiles
        # (mp tokens), written and read by plain stores and loads, never read outside the kernel.
        out_type = (out_type, jax.ShapeDtypeStruct((splits - 1, n, mp), jnp.float32))
    cluster_kw = dict(cluster=(cluster,), cluster_names=("cluster",)) if cluster > 1 else {}
    scratch = dict(out_smem=plgpu.SMEM((wgs, 2, epi_m, tile_n), final_dtype, transforms=out_transforms))
    if cfg.pingpong:
        scratch["turns"] = plgpu.Barrier(num_arrivals=1, num_barriers=wgs)
    ctas_per_cluster = cluster
    if dsm:
        ctas_per_cluster = splits
        cluster_kw = dict(cluster=(splits,), cluster_names=("split",))
        # One fp32 (tile_n, tile_m) slot per sending split and warpgroup, each with its own barrier.
        _, red_transforms = _swizzle_transforms(tile_m * 4, 4)
        scratch["red_smem"] = plgpu.SMEM(((splits - 1) * wgs, tile_n, tile_m), jnp.float32,
                                         transforms=red_transforms)
        # One single barrier each, not one array: JAX's BarrierRef.remap_to_cluster (0.10-0.11)
        # adds a barrier's offset in the array twice, so the peer's expect_tx for index i > 0
        # lands on index 2i and the wait for i never ends (NOTES.md item 26).
        scratch["red_in"] = tuple(plgpu.Barrier(num_arrivals=1) for _ in range((splits - 1) * wgs))
        scratch["red_done"] = plgpu.ClusterBarrier(collective_axes=("split",), num_arrivals=wgs)
    call = plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(num_sms // ctas_per_cluster,),
        grid_names=("sm",),
        **cluster_kw,
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        scratch_types=scratch,
    )
    return call


def num_sms() -> int:
    """Streaming multiprocessors of the default device (or of an abstract mesh's device)."""
    mesh = jax.sharding.get_abstract_mesh()
    dev = getattr(mesh, "abstract_device", None)
    if dev is not None and getattr(dev, "num_cores", None):
        return int(dev.num_cores)
    core_count = getattr(jax.devices()[0], "core_count", None)
    return int(core_count) if core_count else 132


# Measured per-CTA-tile throughput (TFLOP/s over the whole H200 when every SM is busy; sweeps in
# NOTES.md): (tile_n, tile_m, compute warpgroups) -> rate. Used to pick tiles that also fill the
# last wave of CTAs. 144-token tiles cut M = 4608 into 32 rows of tiles: at N = 3072 that is 5.8
# waves instead of 6.5 (rates from wave-corrected times at N = 3072, NOTES.md item 16). bf16 with
# 3 compute warpgroups (192-row CTAs, NOTES.md item 24): 1.04-1.10x the 2-warpgroup rate per wave
# at M = 4608 on every shape; measured only there, so used only above _MID_M.
_RATE = {
    "int8": {(128, 128, 2): 1410.0, (64, 128, 2): 1330.0, (128, 144, 2): 1480.0, (64, 144, 2): 1350.0,
             (128, 64, 2): 960.0, (64, 64, 2): 900.0},
    "bf16": {(64, 128, 2): 620.0, (64, 144, 2): 640.0, (64, 64, 2): 480.0, (128, 128, 2): 480.0,
             (64, 144, 3): 680.0},
}
_SMALL_M = 64
# bf16 above _SMALL_M and up to _MID_M (fitted on H100 sweeps at M = 256 and 1536, NOTES.md item
# 21): each CTA work item also pays about one pipeline fill and epilogue, and split-K's XLA sum
# of fp32 partials moves about 1.4 TB/s. With those two terms the predicted time picks the fastest
# measured configuration in all eleven swept problems. Larger M and int8 keep the rate-only model
# their M = 4608 sweeps tuned.
_MID_M = 2048
_ITEM_OVERHEAD_S = 2.5e-6
_SPLIT_SUM_BYTES_PER_S = 1.4e12
# Small M: split-K where N / tile leaves the last round of CTAs this empty or emptier (H100 sweep at
# M = 4: N = 18432 and 21504 gained 10-12 %, NOTES.md item 21).
_SMALL_M_FILL = 0.85
# Small M with more tiles than SMs: split-K (for the fill) only while its fp32 partials (splits x
# rows x 4 bytes per output feature) are at most this share of the packed weight bytes (64 per
# feature per K-tile). H100 sweeps at N = 18432 / 21504 (NOTES.md items 21-22): M = 4, partials
# 6-8 % of the weights, 3-4 splits gained 10-12 %; M = 16, 25-33 %: bf16 +6 %, W1.58A8 -3 %;
# bf16 M = 50, 88-117 %: a tie; W1.58A8 M = 64, 100-133 %: -24 to -32 %.
_SMALL_M_PARTIAL_SHARE = 0.2


def round_fill(items: int, sms: int) -> float:
    """How full the persistent grid's rounds of CTA work items are on average (1.0: the last
    round is full too)."""
    return items / (-(-items // sms) * sms)


def _epilogue_chunk(tile_n: int, tile_m: int) -> int:
    """Tokens per epilogue store chunk: 64 (32 for 128-row warpgroup tiles, whose 2 slots would
    not fit beside the stages otherwise), or the next size that divides tile_m (8 always does)."""
    for e in (32 if tile_n == 128 else 64, 48, 16):
        if tile_m <= e or tile_m % e == 0:
            return e
    return 8


def small_m_tile(m: int, x_itemsize: int = 2) -> int:
    """Tokens per CTA tile at M <= 64: M rounded up to a multiple of 16, or for bf16 x up to M = 8
    the smallest wgmma N, 8 (H100, NOTES.md item 29: 3-10 % less time than 16-token tiles at
    M = 4; not measured for int8 x, which keeps 16)."""
    return 8 if m <= 8 and x_itemsize > 1 else -(-m // 16) * 16


def default_config(m: int, n: int, k_tiles: int, x_dtype: Any, sms: int = 132, out_itemsize: int = 2) -> MgpuConfig:
    """A tile configuration for an (m, n, k) problem (measured choices; see NOTES.md).

    M > 64: among the measured tile shapes that divide M (if any do), the one with the least
    predicted time ceil(tiles / SMs) * tile_work / rate, i.e. fast tiles that do not leave the
    last wave of CTAs half empty (at M = 4608: 144-token tiles, NOTES.md item 16); bf16 up to
    M = 2048 also weighs split-K (its XLA sum included) and a fixed cost per CTA work item
    (NOTES.md item 21). bf16 keeps one wgmma group in flight only where 3+ stages fit (measured:
    with 2 stages the delayed release starves the pipeline); otherwise it chains the pipelines of
    a CTA's tiles where the K steps allow (measured +2-4 % at K = 3072, NOTES.md item 15). bf16
    above M = 2048 may take 3 compute warpgroups (192-row CTAs; NOTES.md item 24).

    M <= 64: 64-row warpgroup tiles, 8- or 16-token tiles, deep pipelines and split-K: where N has
    fewer tiles than there are SMs, as many splits as one round of CTAs holds (so that enough
    CTAs stream the weights); where it has more, the count whose rounds of CTAs are fullest (at
    least 85 %), if their fp32 partials are small next to the weights (NOTES.md items 21-22, 28)."""
    x_item = jnp.dtype(x_dtype).itemsize
    kind = "int8" if x_item == 1 else "bf16"
    if m > _SMALL_M:
        fitted = kind == "bf16" and m <= _MID_M
        best = None
        # Tiles that divide M, where some do: a partial last tile computes rows nobody reads.
        dividing = any(m % tm == 0 for _, tm, _ in _RATE[kind])
        for (tile_n, tile_m, wgs), rate in _RATE[kind].items():
            cta_n = wgs * tile_n
            if n % cta_n or (dividing and m % tile_m) or (wgs != NUM_COMPUTE_WGS and m <= _MID_M):
                continue
            for splits in range(1, 9 if fitted else 2):
                if k_tiles % splits or (splits > 1 and k_tiles // splits < 4):
                    continue
                items = -(-m // tile_m) * (n // cta_n) * splits
                item_s = 2 * cta_n * tile_m * TILE_K * (k_tiles // splits) / (rate * 1e12 / sms)
                t = -(-items // sms) * (item_s + (_ITEM_OVERHEAD_S if fitted else 0.0))
                if splits > 1:
                    t += splits * m * n * 4 / _SPLIT_SUM_BYTES_PER_S
                if best is None or t < best[0]:
                    best = (t, tile_n, tile_m, wgs, splits)
        _, tile_n, tile_m, wgs, splits = best
    else:
        tile_m, tile_n, wgs = small_m_tile(m, x_item), 64, NUM_COMPUTE_WGS
        tiles = n // (NUM_COMPUTE_WGS * tile_n)
        ks_all = [ks for ks in range(2, k_tiles // 3 + 1) if k_tiles % ks == 0]   # >= 3 K-tiles each
        if tiles > sms:
            # More tiles than SMs: the last round of CTAs would run mostly empty. The split count
            # (>= 2 K-tiles each) whose rounds are fullest, fewer on a tie, while the partials
            # stay small (H100, NOTES.md item 28: 3072 -> 18432 at M = 4, 6 splits 19.4-19.6 us
            # against 20.4-20.6 for 4; 3072 -> 21504 keeps 3, as full as 6 and faster, item 21).
            fits = [ks for ks in range(2, k_tiles // 2 + 1) if k_tiles % ks == 0
                    and round_fill(tiles * ks, sms) >= _SMALL_M_FILL
                    and ks * x_rows(m) * 4 <= _SMALL_M_PARTIAL_SHARE * k_tiles * SLAB]
            splits = max(fits, key=lambda ks: (round_fill(tiles * ks, sms), -ks), default=1)
        else:
            # Fewer: as many CTAs stream the weights as one round holds (NOTES.md item 22: at
            # M = 4 and 50, 12-24 % less time than 2 or 4 splits, although at M = 50 the
            # partials outweigh the weights).
            splits = max((ks for ks in ks_all if tiles * ks <= sms), default=1)
    return with_stages(MgpuConfig(tile_n=tile_n, tile_m=tile_m, k_splits=splits, compute_wgs=wgs), m, k_tiles, x_item,
                       out_itemsize)


def with_stages(cfg: MgpuConfig, m: int, k_tiles: int, x_itemsize: int, out_itemsize: int = 2) -> MgpuConfig:
    """cfg's tiles and split-K with the measured pipeline choices: the deepest pipeline that fits
    shared memory (at most 4 stages above M = 64), one wgmma group in flight where 3+ stages fit,
    chained pipelines for bf16 with 2 stages where the K steps allow (see default_config)."""
    kind = "int8" if x_itemsize == 1 else "bf16"
    splits = cfg.k_splits
    out_item = cfg.epilogue_itemsize(out_itemsize)
    cfg = dataclasses.replace(cfg, stages=2, epi_m=_epilogue_chunk(cfg.tile_n, cfg.tile_m),
                              grid_tile_width=8 if kind == "int8" else 4, overlap=False, chain=False)

    def deepest(epi_m: int) -> MgpuConfig | None:
        for stages in (8, 6, 4, 3, 2):
            if m > _SMALL_M and stages > 4:
                continue
            cand = dataclasses.replace(cfg, stages=stages, overlap=stages >= 3, epi_m=epi_m)
            if cand.smem_bytes(x_itemsize, out_item) <= SMEM_LIMIT:
                return cand
        return None

    # Smaller epilogue chunks only where not even 2 stages fit beside the usual ones (3 compute
    # warpgroups with fp32 output: 3 x 2 slots of 48 x 64 fp32).
    chunks = [cfg.epi_m] + [e for e in (16, 8) if e < cfg.epi_m and cfg.tile_m % e == 0]
    cand = next((c for c in map(deepest, chunks) if c is not None), cfg)
    if kind == "bf16" and m > _SMALL_M and not cand.overlap and (k_tiles // splits) % cand.stages == 0:
        cand = dataclasses.replace(cand, chain=True)
    return cand


def fit_pipeline(cfg: MgpuConfig, k_tiles: int) -> MgpuConfig:
    """cfg with no more pipeline stages than the K loop has steps. Small models (K = 256: one
    K-tile) would otherwise ask the pipeline for more concurrent steps than it runs, which
    faulted on the GPU (CUDA_ERROR_LAUNCH_FAILED)."""
    steps = (k_tiles // cfg.k_splits) * (TILE_K // cfg.step_k())
    if cfg.stages <= steps:
        return cfg
    return dataclasses.replace(cfg, stages=steps, overlap=cfg.overlap and steps >= 3)   # chain stays valid


def supports(n: int) -> bool:
    """Whether the Mosaic GPU kernel tiles N (the weight's output features)."""
    return n % (NUM_COMPUTE_WGS * WG_ROWS) == 0


def ternary_matmul_mgpu(x2d: jax.Array, w_packed: jax.Array, scale: jax.Array, *, step: jax.Array | None,
                        bias: jax.Array | None, out_dtype: Any, config: MgpuConfig | None = None,
                        interpret: bool = False) -> jax.Array:
    """x2d (M, K) @ unpack(w_packed) with epilogue scales. x2d: int8 codes (with per-row `step`,
    W1.58A8), bf16, or fp32 (split into bf16 hi + lo, both multiplied: ~16-bit accuracy).
    scale, bias: (N,) fp32. Returns (M, N) out_dtype.

    interpret=True is refused: JAX 0.10's GPU interpreter has no register-operand or
    transposed-operand wgmma (CPU tests lower this kernel for CUDA instead; see tests)."""
    if interpret:
        raise NotImplementedError("the mosaic_gpu backend has no interpret mode (JAX's GPU interpreter lacks "
                                  "register-operand wgmma); use backend='triton' or 'xla' on CPU")
    m, k = x2d.shape
    w3 = packed_tiles(w_packed)
    t_w, n, _ = w3.shape
    if x2d.dtype == jnp.float32:
        hi = x2d.astype(jnp.bfloat16)
        lo = (x2d - hi.astype(jnp.float32)).astype(jnp.bfloat16)
        parts = [hi, lo]
    elif x2d.dtype in (jnp.bfloat16, jnp.int8):
        parts = [x2d]
    else:
        raise ValueError(f"mosaic_gpu backend takes int8, bf16 or fp32 activations, got {x2d.dtype}")
    if step is not None and x2d.dtype != jnp.int8:
        raise ValueError("step (per-token activation scale) goes with int8 activations only")
    t_x = t_w * len(parts)
    cfg = config or fit_pipeline(default_config(m, n, t_x, parts[0].dtype, num_sms(), jnp.dtype(out_dtype).itemsize),
                                 t_x)
    cfg.check()
    out_item = cfg.epilogue_itemsize(jnp.dtype(out_dtype).itemsize)
    if cfg.smem_bytes(parts[0].dtype.itemsize, out_item) > SMEM_LIMIT:
        raise ValueError(f"{cfg} needs {cfg.smem_bytes(parts[0].dtype.itemsize, out_item)} bytes of shared "
                         f"memory, more than {SMEM_LIMIT}")
    mp = -(-m // cfg.tile_m) * cfg.tile_m
    # x is not padded to whole tiles (a separate XLA copy that, with the output slice, cost 1.5-2.4 us
    # of 9.6-25.9 us per op at M = 4 on an H100, NOTES.md item 20), only to x_rows(m).
    mx = x_rows(m)
    args = kernel_operands(parts, m, k, mx, w3, scale, step, step_rows=mp)
    xs = args[0]
    use_bias = bias is not None and (cfg.k_splits == 1 or cfg.reduces_splits())
    if use_bias:
        args.append(bias.astype(jnp.float32))
    call = _build(mx, mp, n, t_w, t_x, str(xs.dtype), str(jnp.dtype(out_dtype)), step is not None, use_bias,
                  cfg, num_sms())
    out = call(*args)
    if cfg.sum_in_kernel:
        out = out[0]
    elif cfg.k_splits > 1 and not cfg.reduces_splits():
        return sum_split_k(out[:, :m] if mx != m else out, bias, out_dtype)
    return out[:m] if mx != m else out
