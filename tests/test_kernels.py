"""Packed ternary matmul: layout, references, Pallas kernels (interpret mode on CPU, compiled on
GPU), dispatch. Random inputs everywhere (never zeros)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from pallas_kernels import layout
from pallas_kernels.triton import TritonConfig, ternary_matmul_triton

FLUX_SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072),
               (3072, 18432)]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "non-finite output"
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def problem(m, k, n, seed=0, dtype=jnp.bfloat16, lead=()):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((*lead, m, k)) * rng.uniform(0.5, 2.0, (*lead, m, 1)), dtype)
    w = rng.integers(-1, 2, (k, n)).astype(np.int8)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    return x, w, scale, bias


# --- layout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,n", [(256, 8), (300, 24), (1000, 3), (3072, 64)])
def test_pack_roundtrip_np_and_jnp_agree(k, n):
    w = np.random.default_rng(k).integers(-1, 2, (k, n)).astype(np.int8)
    p = layout.pack_ternary_np(w)
    assert p.shape == (layout.padded_k(k) // 4, n) and p.dtype == np.int8
    np.testing.assert_array_equal(np.asarray(layout.pack_ternary(jnp.asarray(w))), p)
    np.testing.assert_array_equal(layout.unpack_ternary_np(p, k), w)
    np.testing.assert_array_equal(np.asarray(layout.unpack_ternary(jnp.asarray(p), k)), w)
    assert (layout.unpack_ternary_np(p)[k:] == 0).all()   # padding decodes to weight 0


def test_layout_matches_its_definition():
    """tiles[t, n, j] bits 2p..2p+1 = w[t*TILE_K + p*SLAB + j, n] + 1 (layout.py docstring)."""
    k, n = 600, 5
    w = np.random.default_rng(1).integers(-1, 2, (k, n)).astype(np.int8)
    tiles = layout.pack_ternary_np(w).view(np.uint8).reshape(-1, n, layout.SLAB)
    wp = np.ones((layout.padded_k(k), n), np.int64)
    wp[:k] = w.astype(np.int64) + 1
    for t in range(tiles.shape[0]):
        for p in range(layout.PLANES):
            rows = t * layout.TILE_K + p * layout.SLAB + np.arange(layout.SLAB)
            np.testing.assert_array_equal((tiles[t].astype(np.int64) >> (2 * p)) & 3, wp[rows].T)


def test_pack_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        layout.pack_ternary_np(np.zeros((4,), np.int8))
    with pytest.raises(ValueError, match="tiles"):
        layout.unpack_ternary_np(np.zeros((3, 4), np.int8))


# --- references --------------------------------------------------------------------------------


def test_references_against_float64():
    x, w, scale, bias = problem(9, 300, 40, dtype=jnp.float32)
    wp = pk.pack_ternary(jnp.asarray(w))
    want = np.asarray(x, np.float64) @ w.astype(np.float64) * np.asarray(scale) + np.asarray(bias)
    assert rel(pk.ternary_matmul_ref(x, wp, scale, bias=bias), want) < 1e-6
    # W1.58A8: the int32 accumulation is exact, so the error is the activation quantization's.
    assert 1e-4 < rel(pk.ternary_matmul_a8_ref(x, wp, scale, bias=bias), want) < 1e-2
    codes, step = pk.quantize_activations(x)
    assert codes.dtype == jnp.int8 and int(jnp.max(jnp.abs(codes.astype(jnp.int32)))) == 127
    assert rel(codes.astype(jnp.float32) * step[:, None], x) < 1e-2


# --- Pallas Triton kernel, interpret mode (CPU) -------------------------------------------------


def _check_kernel(backend, m, k, n, dtype, activations, *, lead=(), seed=0, interpret=True, bias=True,
                  out_dtype=jnp.float32, scalar_scale=False):
    x, w, scale, b = problem(m, k, n, seed=seed, dtype=dtype, lead=lead)
    wp = pk.pack_ternary(jnp.asarray(w))
    if scalar_scale:
        scale = scale[0]
    b = b if bias else None
    got = pk.ternary_matmul(x, wp, scale, bias=b, out_dtype=out_dtype, backend=backend, interpret=interpret,
                            activations=activations)
    assert got.shape == (*lead, m, n) and got.dtype == out_dtype
    # A bf16 output alone carries ~1e-3 rounding error; compare against the reference rounded the
    # same way (a few elements may round the other way), and loosely against the fp32 reference.
    tol, ref_dtype = (2e-3, jnp.bfloat16) if out_dtype == jnp.bfloat16 else (2e-5, jnp.float32)
    ref = pk.ternary_matmul_ref(x, wp, scale, bias=b, out_dtype=jnp.float32)
    if activations == "native":
        # Exact weights: only fp32 accumulation order (and the bf16 hi/lo split of fp32 x) differ.
        assert rel(got, pk.ternary_matmul_ref(x, wp, scale, bias=b, out_dtype=ref_dtype)) < tol
        assert rel(got, ref) < 5e-3
    else:
        ref8 = pk.ternary_matmul_a8_ref(x, wp, scale, bias=b, out_dtype=ref_dtype)
        assert rel(got, ref8) < tol / 2
        # vs the bf16-activation reference: the int8 quantization error, ~7e-3 on Gaussian rows
        # (a statistic; a single token can land a little higher).
        assert rel(got, ref) < 1.5e-2


@pytest.mark.parametrize("m", [1, 7, 300])
@pytest.mark.parametrize("activations", ["native", "int8"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_triton_interpret_odd_m(m, activations, dtype):
    _check_kernel("triton", m, 600, 96, dtype, activations)   # K=600: not a multiple of TILE_K


@pytest.mark.parametrize("k,n", FLUX_SHAPES)
def test_triton_interpret_flux_shapes(k, n):
    _check_kernel("triton", 5, k, n, jnp.bfloat16, "native", seed=k + n)
    _check_kernel("triton", 3, k, n, jnp.bfloat16, "int8", seed=k + n + 1, out_dtype=jnp.bfloat16)


def test_triton_interpret_batched_scalar_scale_no_bias():
    _check_kernel("triton", 6, 512, 64, jnp.bfloat16, "native", lead=(2, 3), bias=False, scalar_scale=True)


def test_triton_interpret_configs():
    x, w, scale, b = problem(40, 768, 256, seed=3)
    wp = pk.pack_ternary(jnp.asarray(w))
    ref = pk.ternary_matmul_ref(x, wp, scale, bias=b, out_dtype=jnp.float32)
    for cfg in [TritonConfig(block_m=16, block_n=64), TritonConfig(block_m=32, block_n=256)]:
        got = ternary_matmul_triton(x, wp, scale, step=None, bias=b, out_dtype=jnp.float32, config=cfg,
                                    interpret=True)
        assert rel(got, ref) < 2e-5


# --- Pallas Triton GEMV (M <= 4, CUDA cores): interpret mode, its inline PTX, CUDA lowering -------


def _check_gemv(m, k, n, dtype, cfg, *, seed=0, bias=True, interpret=True):
    from pallas_kernels.gemv import ternary_gemv_triton
    x, w, scale, b = problem(m, k, n, seed=seed, dtype=jnp.float32)
    wp = pk.pack_ternary(jnp.asarray(w))
    b = b if bias else None
    if dtype == jnp.int8:
        codes, step = pk.quantize_activations(x)
        got = ternary_gemv_triton(codes, wp, scale, step=step, bias=b, out_dtype=jnp.float32, config=cfg,
                                  interpret=interpret)
        ref = pk.ternary_matmul_a8_ref(x, wp, scale, bias=b, out_dtype=jnp.float32)
    else:
        x = x.astype(dtype)
        got = ternary_gemv_triton(x, wp, scale, step=None, bias=b, out_dtype=jnp.float32, config=cfg,
                                  interpret=interpret)
        # The GEMV multiplies x as it is (fp32 products are exact): compare in fp32 throughout.
        ref = pk.ternary_matmul_ref(x.astype(jnp.float32), wp, scale, bias=b, out_dtype=jnp.float32)
    assert got.shape == (m, n)
    assert rel(got, ref) < 2e-6, (m, k, n, dtype, cfg)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.int8])
def test_gemv_interpret(m, dtype):
    from pallas_kernels.gemv import GemvConfig
    _check_gemv(m, 600, 96, dtype, None, seed=m)        # K % TILE_K != 0, block_n 32, split K: XLA adds bias
    _check_gemv(m, 768, 256, dtype, GemvConfig(block_n=64, k_splits=1, num_warps=2), seed=m + 1)   # bias in-kernel
    _check_gemv(m, 768, 256, dtype, GemvConfig(block_n=64, k_splits=1), seed=m + 2, bias=False)
    if dtype != jnp.int8:                                # the tensor-core float path
        _check_gemv(m, 600, 96, dtype, GemvConfig(block_n=32, k_splits=3, float_inner="mma"), seed=m + 3)


@pytest.mark.parametrize("m", [7, 16])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gemv_mma_interpret_up_to_16_tokens(m, dtype):
    from pallas_kernels.gemv import GemvConfig
    _check_gemv(m, 600, 96, dtype, GemvConfig(block_n=32, k_splits=3, float_inner="mma"), seed=m)
    _check_gemv(m, 768, 128, dtype, GemvConfig(block_n=64, k_splits=1, num_stages=2, float_inner="mma"), seed=m + 1)


def test_gemv_interpret_flux_shape():
    from pallas_kernels.gemv import GemvConfig
    _check_gemv(1, 3072, 3072, jnp.bfloat16, None, seed=9)
    _check_gemv(1, 15360, 3072, jnp.bfloat16, GemvConfig(block_n=128, k_splits=4), seed=10)


def test_gemv_config_errors():
    from pallas_kernels.gemv import GemvConfig, ternary_gemv_triton
    x, w, scale, _ = problem(1, 512, 96)
    wp = pk.pack_ternary(jnp.asarray(w))
    for cfg, msg in [(GemvConfig(block_n=48), "power of 2"), (GemvConfig(block_n=64), "multiple of block_n"),
                     (GemvConfig(block_n=32, k_splits=3), "k_splits=3")]:
        with pytest.raises(ValueError, match=msg):
            ternary_gemv_triton(x, wp, scale, step=None, bias=None, out_dtype=jnp.float32, config=cfg,
                                interpret=True)
    x17, *_ = problem(17, 512, 96)
    with pytest.raises(ValueError, match=r"\(mma\) takes 1\.\.16 rows"):
        ternary_gemv_triton(x17, wp, scale, step=None, bias=None, out_dtype=jnp.float32,
                            config=GemvConfig(block_n=32, float_inner="mma"), interpret=True)
    with pytest.raises(ValueError, match=r"\(fma\) takes 1\.\.4 rows"):
        ternary_gemv_triton(x17[:5], wp, scale, step=None, bias=None, out_dtype=jnp.float32, interpret=True)
    codes, step = pk.quantize_activations(x17[:5])
    with pytest.raises(ValueError, match=r"\(dp4a\) takes 1\.\.4 rows"):
        ternary_gemv_triton(codes, wp, scale, step=step, bias=None, out_dtype=jnp.float32, interpret=True)


def _emulate_ptx(asm, operands):
    """Run the GEMV's inline PTX in numpy, elementwise on 32-bit registers: the instructions it
    uses and nothing else. Returns the registers after the block (uint32)."""
    import struct
    regs = {f"${i}": np.asarray(v).view(np.uint32) for i, v in enumerate(operands)}
    f32 = lambda u: np.asarray(u, np.uint32).view(np.float32)

    def get(tok):
        if tok in regs:
            return regs[tok]
        if tok.startswith("0f"):
            return np.asarray(struct.unpack(">I", bytes.fromhex(tok[2:]))[0], np.uint32)
        return np.asarray(int(tok, 0), np.uint32)

    def byte(v, b, signed):
        u = ((v >> np.uint32(8 * b)) & np.uint32(255)).astype(np.int64)
        return u - 256 * (u >= 128) if signed else u

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        src = [get(a) for a in args[1:]]
        if op in ("mov.b32", "mov.f32"):
            r = src[0]
        elif op == "shr.u32":
            r = src[0] >> src[1]
        elif op == "lop3.b32":
            assert args[4] == "0xEA"   # (a & b) | c
            r = (src[0] & src[1]) | src[2]
        elif op == "fma.rn.f32":   # a * b is exact in float64; one rounding to fp32 (ties aside)
            r = (f32(src[0]).astype(np.float64) * f32(src[1]) + f32(src[2])).astype(np.float32).view(np.uint32)
        elif op == "fma.rn.bf16x2":   # per 16-bit half; the results here are exact small integers
            half = lambda u, i: ((u >> np.uint32(16 * i)) << np.uint32(16)).astype(np.uint32).view(np.float32)
            out = [(half(src[0], i).astype(np.float64) * half(src[1], i) + half(src[2], i)).astype(np.float32)
                   for i in range(2)]
            assert all(not (o.view(np.uint32) & np.uint32(0xFFFF)).any() for o in out)   # exact in bf16
            r = (out[0].view(np.uint32) >> np.uint32(16)) | (out[1].view(np.uint32) >> np.uint32(16) << np.uint32(16))
        elif op == "dp4a.u32.s32":   # c + sum of 4 (unsigned byte * signed byte), mod 2^32
            dot = sum(byte(src[0], b, False) * byte(src[1], b, True) for b in range(4))
            r = ((src[2].astype(np.int64) + dot) % (1 << 32)).astype(np.uint32)
        else:
            raise AssertionError(f"unexpected PTX instruction: {line}")
        regs[args[0]] = np.asarray(r, np.uint32)
    return regs


def _random_words(rng):
    codes = rng.integers(0, 3, (64, 4, 4)).astype(np.uint32)             # (element, byte b, plane p)
    return codes, sum(codes[:, b, p] << np.uint32(8 * b + 2 * p) for b in range(4) for p in range(4))


def test_gemv_fma_ptx_computes_the_word_dot_product():
    """The float path's PTX block: acc + sum over the word's 16 codes c * x, where the code of
    byte b, plane p sits at bits 8b + 2p (layout.py) and meets x_i, i = 4 * b + p (gemv._CODES)."""
    from pallas_kernels import gemv
    rng = np.random.default_rng(5)
    codes, words = _random_words(rng)
    xs = rng.standard_normal((16, 64)).astype(np.float32)
    acc = rng.standard_normal(64).astype(np.float32)
    got = _emulate_ptx(gemv._fma_asm(), [np.zeros(64, np.uint32), acc, words, *xs])["$0"].view(np.float32)
    assert [(b, p) for b, p, _ in gemv._CODES] == [(b, p) for b in range(4) for p in range(4)]
    want = acc.astype(np.float64) + sum(codes[:, b, p] * xs[4 * b + p].astype(np.float64)
                                        for b in range(4) for p in range(4))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gemv_dp4a_ptx_computes_the_word_dot_product():
    """The int8 path: `code_planes` puts plane p's codes of bytes b = 0..3 (bits 8b + 2p) in byte
    b, and the PTX block adds sum over the 16 codes c times byte b of x's word for plane p (signed)
    to an int32 accumulator."""
    from pallas_kernels import gemv
    rng = np.random.default_rng(6)
    codes, words = _random_words(rng)
    xb = rng.integers(-128, 128, (4, 64, 4)).astype(np.int8)             # (plane, element, byte)
    xw = xb.view(np.uint32).reshape(4, 64)                               # little-endian bytes
    acc = rng.integers(-2 ** 20, 2 ** 20, 64).astype(np.int32)
    planes = [np.asarray(c) for c in gemv.code_planes(jnp.asarray(words.view(np.int32)))]
    got = _emulate_ptx(gemv._dp4a_asm(), [np.zeros(64, np.uint32), acc, *planes, *xw])["$0"].view(np.int32)
    want = acc + sum(codes[:, b, p].astype(np.int64) * xb[p, :, b] for b in range(4) for p in range(4))
    np.testing.assert_array_equal(got, want)


def test_gemv_mma_pair_ptx_unpacks_two_weights():
    """The mma path's PTX block for (plane p, byte h): the word's codes at bits 8h + 2p and
    16 + 8h + 2p become the bf16 pair (w of byte h, w of byte h + 2), w = c - 1 (low half first);
    the interpret-mode twin gives the same weights from the int16 view (elements 2q, 2q + 1)."""
    from pallas_kernels import gemv
    rng = np.random.default_rng(7)
    codes, words = _random_words(rng)
    halves = jnp.asarray(words.view(np.int16).reshape(64, 2))
    bf16 = lambda u: (np.asarray(u, np.uint32) << np.uint32(16)).view(np.float32)
    for p, h in gemv._PAIRS:
        got = _emulate_ptx(gemv._pair_asm(8 * h + 2 * p), [np.zeros(64, np.uint32), words])["$0"]
        want = [codes[:, h, p].astype(np.float32) - 1, codes[:, h + 2, p].astype(np.float32) - 1]
        np.testing.assert_array_equal(bf16(got & np.uint32(0xFFFF)), want[0])
        np.testing.assert_array_equal(bf16(got >> np.uint32(16)), want[1])
        twin = np.asarray(gemv._pair_weights(halves, p, h, interpret=True).astype(jnp.float32))
        np.testing.assert_array_equal(twin, np.stack(want, axis=1))


def test_gemv_lowers_for_cuda():
    from pallas_kernels.gemv import ternary_gemv_triton
    for m, k, n, x_dtype in [(1, 3072, 21504, jnp.bfloat16), (1, 15360, 3072, jnp.bfloat16), (3, 600, 48, jnp.float32),
                             (2, 1024, 64, jnp.int8)]:
        x = jax.ShapeDtypeStruct((m, k), x_dtype)
        wp = jax.ShapeDtypeStruct((layout.padded_k(k) // 4, n), jnp.int8)
        vec = jax.ShapeDtypeStruct((n,), jnp.float32)
        step = jax.ShapeDtypeStruct((m,), jnp.float32) if x_dtype == jnp.int8 else None
        fn = lambda x, wp, s, st, b: ternary_gemv_triton(x, wp, s, step=st, bias=b, out_dtype=jnp.bfloat16)
        txt = jax.jit(fn).trace(x, wp, vec, step, vec).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in txt


def test_auto_dispatch_takes_the_gemv_for_few_tokens_on_hopper(monkeypatch):
    monkeypatch.setattr(pk, "_auto", lambda: ("mosaic_gpu", "Hopper"))
    monkeypatch.setattr(pk, "_triton_available", lambda: True)
    assert pk._resolve("auto", 3072, False, 1, "native") == "triton"
    assert pk._resolve("auto", 3072, False, 2, "native") == "mosaic_gpu"
    assert pk._resolve("auto", 3072, False, 4, "int8") == "triton"         # the GEMV's dp4a path
    assert pk._resolve("auto", 3072, False, 5, "int8") == "mosaic_gpu"
    assert pk._resolve("mosaic_gpu", 3072, False, 1, "native") == "mosaic_gpu"
    monkeypatch.setattr(pk, "_triton_available", lambda: False)
    assert pk._resolve("auto", 3072, False, 1, "native") == "mosaic_gpu"


# --- Mosaic GPU kernel: lowering for CUDA on the CPU machine ------------------------------------
# JAX 0.10's GPU interpreter cannot run register-operand wgmma, so on CPU the Mosaic GPU kernel is
# traced and lowered for CUDA (catching shape, layout and tiling errors); the GPU tests run it.


def _lower_mgpu(m, k, n, x_dtype, *, out_dtype=jnp.bfloat16, bias=True, config=None):
    from jax.sharding import AbstractDevice, AbstractMesh
    from pallas_kernels import mosaic_gpu as mg
    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    mesh = AbstractMesh((), (), abstract_device=dev)
    x = jax.ShapeDtypeStruct((m, k), x_dtype)
    wp = jax.ShapeDtypeStruct((layout.padded_k(k) // 4, n), jnp.int8)
    vec = jax.ShapeDtypeStruct((n,), jnp.float32)
    step = jax.ShapeDtypeStruct((m,), jnp.float32) if x_dtype == jnp.int8 else None

    def f(x, wp, s, st, b):
        return mg.ternary_matmul_mgpu(x, wp, s, step=st, bias=b, out_dtype=out_dtype, config=config)

    with jax.sharding.use_abstract_mesh(mesh):
        txt = jax.jit(f).trace(x, wp, vec, step, vec if bias else None).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in txt


@pytest.mark.parametrize("k,n", FLUX_SHAPES)
def test_mosaic_gpu_lowers_for_flux_shapes(k, n):
    for m in (1, 300, 4608):
        for x_dtype in (jnp.int8, jnp.bfloat16):
            _lower_mgpu(m, k, n, x_dtype)


def test_mosaic_bf16_unpack_constants():
    # _plane_bf16's bit recipe, emulated in numpy on every byte of valid codes (0-2, layout.py):
    # the mask keeps 0x43 and plane p's code bits of 0x4300 | byte, and one rounded bf16 fma
    # (exact here) gives code - 1.
    import ml_dtypes
    from pallas_kernels import mosaic_gpu as mg
    byte = np.arange(256, dtype=np.uint32)
    byte = byte[np.all([(byte >> (2 * p)) & 3 < 3 for p in range(4)], axis=0)]
    assert len(byte) == 81
    for p in range(4):
        mask, mul, add = mg.plane_bf16_constants(p)
        assert mask >> 16 == mask & 0xFFFF and mul >> 16 == mul & 0xFFFF and add >> 16 == add & 0xFFFF
        half = ((0x4300 | byte) & (mask & 0xFFFF)).astype(np.uint16).view(ml_dtypes.bfloat16)
        as_f32 = lambda b: np.array(b, np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)
        got = (half.astype(np.float64) * as_f32(mul & 0xFFFF) + as_f32(add & 0xFFFF)).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(got.astype(np.float32), ((byte >> (2 * p)) & 3).astype(np.float32) - 1)


def test_mosaic_gpu_lowers_odd_cases():
    from pallas_kernels.mosaic_gpu import MgpuConfig
    _lower_mgpu(7, 600, 256, jnp.float32, out_dtype=jnp.float32)          # K % TILE_K != 0, fp32 split
    _lower_mgpu(8, 1024, 512, jnp.int8, config=MgpuConfig(tile_m=8, stages=4, k_steps=2))   # 8-token tiles
    _lower_mgpu(33, 512, 128, jnp.int8, bias=False, config=MgpuConfig(tile_m=64, k_splits=2))
    _lower_mgpu(256, 1024, 512, jnp.bfloat16, config=MgpuConfig(tile_n=128, tile_m=128, stages=2))
    _lower_mgpu(300, 768, 256, jnp.bfloat16, config=MgpuConfig(tile_n=64, tile_m=128, stages=4, k_steps=2))
    _lower_mgpu(4608, 3072, 3072, jnp.int8, config=MgpuConfig(tile_n=64, tile_m=128, cluster=2))   # TMA multicast
    with pytest.raises(ValueError, match="cluster"):
        _lower_mgpu(256, 512, 384, jnp.int8, config=MgpuConfig(tile_n=64, tile_m=64, cluster=2))  # 384 % 256
    for bad in (dict(cluster=3), dict(cluster=2, tile_m=24)):
        with pytest.raises(ValueError, match="cluster"):
            MgpuConfig(**bad).check()
    _lower_mgpu(4608, 3072, 21504, jnp.bfloat16, config=MgpuConfig(tile_m=256, stages=4, k_steps=4))
    with pytest.raises(ValueError, match="k_steps"):
        MgpuConfig(k_steps=3).check()
    _lower_mgpu(4608, 3072, 3072, jnp.bfloat16, config=MgpuConfig(stages=4, k_steps=2, overlap=False, chain=True))
    _lower_mgpu(4608, 3072, 21504, jnp.bfloat16, config=MgpuConfig(tile_m=144, stages=2, epi_m=48, overlap=False,
                                                                   chain=True, pingpong=True))   # turn barriers
    for tile_m, epi_m in ((144, 48), (128, 64)):                        # 192-row CTAs
        _lower_mgpu(4608, 3072, 3072, jnp.bfloat16, config=MgpuConfig(
            tile_m=tile_m, stages=2, epi_m=epi_m, overlap=False, chain=True, compute_wgs=3))
    _lower_mgpu(300, 1024, 384, jnp.int8, config=MgpuConfig(tile_m=144, stages=3, epi_m=48, compute_wgs=3))
    _lower_mgpu(4608, 3072, 3072, jnp.int8, config=MgpuConfig(    # 384-row CTAs (the int8 sweep)
        tile_n=128, tile_m=128, stages=3, epi_m=32, grid_tile_width=8, compute_wgs=3))
    with pytest.raises(ValueError, match="tiling does not divide"):    # 640 % 192 != 0
        _lower_mgpu(300, 1024, 640, jnp.bfloat16, config=MgpuConfig(tile_m=144, stages=2, compute_wgs=3))
    for bad, msg in ((dict(compute_wgs=1), "compute_wgs"), (dict(compute_wgs=4), "compute_wgs"),
                     (dict(compute_wgs=3, pingpong=True), "pingpong")):
        with pytest.raises(ValueError, match=msg):
            MgpuConfig(**bad).check()
    with pytest.raises(ValueError, match="chain needs overlap=False"):
        MgpuConfig(overlap=True, chain=True).check()
    with pytest.raises(ValueError, match=r"chain needs the pipeline steps per tile \(3\)"):   # 3 K-tiles, 2 stages
        _lower_mgpu(4608, 768, 3072, jnp.bfloat16, config=MgpuConfig(stages=2, overlap=False, chain=True))
    # Split-K summed in the kernel (global semaphores, fp32 partials in a second output).
    for x_dtype, out_dtype in ((jnp.bfloat16, jnp.bfloat16), (jnp.int8, jnp.bfloat16), (jnp.float32, jnp.float32)):
        _lower_mgpu(4, 3072, 3072, x_dtype, out_dtype=out_dtype,
                    config=MgpuConfig(tile_m=16, stages=3, k_splits=4, sum_in_kernel=True))
    with pytest.raises(ValueError, match="sum_in_kernel needs k_splits >= 2"):
        MgpuConfig(sum_in_kernel=True).check()
    # Its epilogue stores the output's dtype, not fp32 partials, through shared memory.
    assert MgpuConfig(k_splits=2).epilogue_itemsize(2) == 4
    assert MgpuConfig(k_splits=2, sum_in_kernel=True).epilogue_itemsize(2) == 2
    # Split-K summed in a cluster: the splits of a tile send their partials to split 0's shared memory.
    for x_dtype, out_dtype in ((jnp.bfloat16, jnp.bfloat16), (jnp.int8, jnp.bfloat16), (jnp.float32, jnp.float32)):
        _lower_mgpu(4, 3072, 3072, x_dtype, out_dtype=out_dtype,
                    config=MgpuConfig(tile_m=16, stages=3, k_splits=4, split_cluster=True))
    _lower_mgpu(50, 3072, 18432, jnp.bfloat16, config=MgpuConfig(tile_m=64, stages=3, k_splits=3, split_cluster=True))
    for bad, msg in ((dict(split_cluster=True), "split_cluster needs 2 <= k_splits <= 8"),
                     (dict(k_splits=12, split_cluster=True), "split_cluster needs 2 <= k_splits <= 8"),
                     (dict(k_splits=2, split_cluster=True, cluster=2), "split_cluster excludes"),
                     (dict(k_splits=2, split_cluster=True, sum_in_kernel=True), "split_cluster excludes")):
        with pytest.raises(ValueError, match=msg):
            MgpuConfig(**bad).check()
    cfg = MgpuConfig(tile_m=16, k_splits=4, split_cluster=True)
    assert cfg.epilogue_itemsize(2) == 2 and cfg.reduces_splits()
    # Its 3 slots per warpgroup of 64 x 16 fp32 partials count against shared memory.
    assert cfg.smem_bytes(2, 2) - MgpuConfig(tile_m=16, k_splits=4).smem_bytes(2, 2) == 3 * 2 * 64 * 16 * 4


def _primitives(jaxpr) -> list[str]:
    """The primitives of a jaxpr, with those of the jit-ted functions it calls (jnp.pad is one);
    not those inside a kernel."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(str(eqn.primitive))
        if str(eqn.primitive) in ("jit", "pjit"):
            names += _primitives(eqn.params["jaxpr"].jaxpr)
    return names


def test_mosaic_gpu_reads_few_rows_without_a_padded_copy():
    # TMA zero-fills the rows of the last token tile past M, so the op pads x only to x_rows(M)
    # (rows in groups of 8 above 8), not to whole 16-token tiles, and the split-K partials have
    # that many rows per split; without split-K the op is the kernel alone (no copy of x before
    # it, no slice of the output after it).
    from jax.sharding import AbstractDevice, AbstractMesh
    from pallas_kernels import mosaic_gpu as mg
    assert [mg.x_rows(m) for m in (1, 4, 7, 8, 9, 16, 17, 300)] == [1, 4, 7, 8, 16, 16, 24, 304]
    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    for m, n, splits in ((4, 9216, False), (8, 9216, False), (4, 3072, True), (24, 3072, True)):
        x = jax.ShapeDtypeStruct((m, 3072), jnp.bfloat16)
        wp = jax.ShapeDtypeStruct((768, n), jnp.int8)
        vec = jax.ShapeDtypeStruct((n,), jnp.float32)

        def f(x, wp, s, b):
            return mg.ternary_matmul_mgpu(x, wp, s, step=None, bias=b, out_dtype=jnp.bfloat16)

        with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev)):
            prims = _primitives(jax.make_jaxpr(f)(x, wp, vec, vec).jaxpr)
        assert "pad" not in prims and "concatenate" not in prims, (m, n, prims)
        assert ("reduce_sum" in prims) == splits, (m, n, prims)
        # Split-K partials have x_rows(M) rows per split, not whole tiles: none to cut off here.
        assert "slice" not in prims, (m, n, prims)
        if not splits:
            assert prims == ["reshape", "custom_vmap_call"], (m, n, prims)    # reshape: the free tile view


def test_mosaic_gpu_default_configs_fit_shared_memory():
    from pallas_kernels import mosaic_gpu as mg
    for k, n in FLUX_SHAPES:
        for m in (1, 7, 256, 300, 1536, 4608):
            for x_dtype, out_itemsize in itertools.product((jnp.int8, jnp.bfloat16), (2, 4)):
                cfg = mg.default_config(m, n, k // layout.TILE_K, x_dtype, out_itemsize=out_itemsize)
                cfg.check()
                out_item = cfg.epilogue_itemsize(out_itemsize)
                assert cfg.smem_bytes(jnp.dtype(x_dtype).itemsize, out_item) <= mg.SMEM_LIMIT, (m, k, n, cfg)
                assert n % cfg.cta_n() == 0 and (k // layout.TILE_K) % cfg.k_splits == 0
                steps = (k // layout.TILE_K) // cfg.k_splits * cfg.k_steps
                assert not cfg.chain or (steps % cfg.stages == 0 and not cfg.overlap), (m, k, n, cfg)
    # At M = 4608 the tiles fill the last wave of CTAs (144-token tiles at N = 3072: 5.8 waves, not
    # 6.5), and elsewhere the tiles divide M where a measured tile shape does (no partial tiles).
    for k, n in FLUX_SHAPES:
        for x_dtype in (jnp.int8, jnp.bfloat16):
            cfg = mg.default_config(4608, n, k // layout.TILE_K, x_dtype)
            waves = 4608 // cfg.tile_m * n // cfg.cta_n() / 132
            assert waves / -(-waves // 1) >= 0.95, (k, n, cfg, waves)
            # Weight-only runs 3 compute warpgroups there (192-row CTAs; NOTES.md item 24), with
            # 2 pipeline stages and an epilogue chunk that fit beside them for bf16 and fp32 output.
            if x_dtype == jnp.bfloat16:
                assert (cfg.compute_wgs, cfg.tile_m, cfg.stages, cfg.epi_m) == (3, 144, 2, 48), (k, n, cfg)
                assert mg.default_config(4608, n, k // layout.TILE_K, x_dtype, out_itemsize=4).epi_m == 16
            else:
                assert cfg.compute_wgs == 2
            for m in (256, 1536, 2048, 4096):                     # 3 warpgroups measured at M = 4608 only
                assert mg.default_config(m, n, k // layout.TILE_K, x_dtype).compute_wgs == 2, (m, k, n)
            for m in (1536, 4096):
                assert m % mg.default_config(m, n, k // layout.TILE_K, x_dtype).tile_m == 0, (m, k, n)
    # Large-M weight-only tiles chain their pipelines where the K steps divide into the stages.
    assert mg.default_config(4608, 3072, 12, jnp.bfloat16).chain
    assert not mg.default_config(4608, 3072, 3, jnp.bfloat16).chain          # 3 K-tiles, 2 stages
    # Small M with more weight tiles than SMs (N = 18432, 21504: 144, 168 tiles of 128 rows): split-K
    # fills the last round of CTAs to >= 85 % (unsplit, it ran 9-27 % full) while the fp32 partials
    # are small (M <= 8); from M = 16 on they are not, and it stays unsplit (W1.58A8 at M = 64 lost
    # 24-32 % split, NOTES.md item 22).
    for n in (18432, 21504):
        for x_dtype in (jnp.int8, jnp.bfloat16):
            for m in (1, 4, 8):
                cfg = mg.default_config(m, n, 12, x_dtype)
                items = n // (2 * cfg.tile_n) * cfg.k_splits
                assert cfg.k_splits > 1 and items / (-(-items // 132) * 132) >= 0.85, (m, n, cfg)
            for m in (16, 50, 64):
                assert mg.default_config(m, n, 12, x_dtype).k_splits == 1, (m, n)
    # Of the split counts that fill it, the fullest rounds (H100, NOTES.md item 28): 6 at N = 18432
    # (93.5 % full, against 87 % for 4); 3 at N = 21504 (as full as 6, and fewer partials).
    assert mg.default_config(4, 18432, 12, jnp.bfloat16).k_splits == 6
    assert mg.default_config(4, 21504, 12, jnp.bfloat16).k_splits == 3
    assert mg.default_config(8, 18432, 12, jnp.bfloat16).k_splits == 4      # 6 would make partials too big
    # Small M with fewer weight tiles than SMs (N = 3072: 24): as many splits as one round of CTAs
    # holds, >= 3 K-tiles each (H100, NOTES.md item 22: 3072 -> 3072 at M = 4 6.3 us with 4 splits
    # against 8.3 with 2; 15360 -> 3072 12.5 us with 5 against 14.3 with 4).
    for m in (1, 4, 50, 64):
        assert mg.default_config(m, 3072, 12, jnp.bfloat16).k_splits == 4, m
        assert mg.default_config(m, 3072, 60, jnp.bfloat16).k_splits == 5, m
        assert mg.default_config(m, 3072, 48, jnp.int8).k_splits == 4, m
    # bf16 x up to M = 8 takes 8-token tiles (H100, NOTES.md item 29: 3-10 % faster at M = 4); int8 x
    # (unmeasured at 8) and larger M keep multiples of 16.
    for m in (1, 4, 8):
        assert mg.default_config(m, 3072, 12, jnp.bfloat16).tile_m == 8, m
        assert mg.default_config(m, 3072, 12, jnp.int8).tile_m == 16, m
    assert mg.default_config(9, 3072, 12, jnp.bfloat16).tile_m == 16
    assert mg.default_config(50, 3072, 12, jnp.bfloat16).tile_m == 64
    # bf16 at M = 256 (H100 sweep, NOTES.md item 21): 128-token tiles at N = 9216 and 12288 (37-38 us
    # against 44 for 64-token ones), split-K 5 at 15360 -> 3072 (46 us against 59); 3072 -> 3072
    # keeps 64-token tiles (14 us against 20).
    pick = lambda k, n: mg.default_config(256, n, k // layout.TILE_K, jnp.bfloat16)
    assert pick(3072, 9216).tile_m == pick(3072, 12288).tile_m == 128
    assert (pick(15360, 3072).tile_m, pick(15360, 3072).k_splits) == (128, 5)
    assert (pick(3072, 3072).tile_m, pick(3072, 3072).k_splits) == (64, 1)


def test_mosaic_gpu_pipeline_never_deeper_than_the_k_loop():
    # The reference model's K = 256 is one K-tile: a 4-stage pipeline over 1 step faulted on the GPU.
    from pallas_kernels import mosaic_gpu as mg
    for k in (256, 512, 768, 1024, 1280, 3072):
        for m in (1, 64, 300, 6144):
            for x_dtype in (jnp.int8, jnp.bfloat16):
                k_tiles = k // layout.TILE_K
                cfg = mg.fit_pipeline(mg.default_config(m, 768, k_tiles, x_dtype), k_tiles)
                cfg.check()
                assert cfg.stages <= (k_tiles // cfg.k_splits) * (layout.TILE_K // cfg.step_k()), (k, m, cfg)


def test_mosaic_gpu_refuses_interpret():
    x, w, scale, _ = problem(4, 256, 128)
    with pytest.raises(NotImplementedError, match="interpret"):
        pk.ternary_matmul(x, pk.pack_ternary(jnp.asarray(w)), scale, backend="mosaic_gpu", interpret=True)


# --- dispatch and argument checks ---------------------------------------------------------------


def test_choose_backend():
    assert pk.choose_backend("xla") == "xla"
    assert pk.choose_backend("auto") in pk.BACKENDS
    assert pk.explain_backend().startswith(pk.choose_backend("auto") + ":")
    if jax.devices()[0].platform == "cpu":
        assert pk.choose_backend("auto") == "xla"
    with pytest.raises(ValueError, match="unknown ternary_matmul backend"):
        pk.choose_backend("cuda")


def test_argument_errors():
    x, w, scale, _ = problem(4, 512, 64)
    wp = pk.pack_ternary(jnp.asarray(w))
    with pytest.raises(ValueError, match="K=256"):
        pk.ternary_matmul(x[:, :256], wp, scale)
    with pytest.raises(ValueError, match="floating"):
        pk.ternary_matmul(x.astype(jnp.int32), wp, scale)
    with pytest.raises(ValueError, match="int8"):
        pk.ternary_matmul(x, wp.astype(jnp.int32), scale)
    with pytest.raises(ValueError, match="scale"):
        pk.ternary_matmul(x, wp, scale[:3])
    with pytest.raises(ValueError, match="bias"):
        pk.ternary_matmul(x, wp, scale, bias=scale[:5])
    with pytest.raises(ValueError, match="activations"):
        pk.ternary_matmul(x, wp, scale, activations="int4")


# --- compiled kernels on the GPU ----------------------------------------------------------------


def _gpu_backends():
    names = ["triton"]
    cc = getattr(jax.devices()[0], "compute_capability", None)
    if cc is not None and str(cc).startswith("9"):
        names.append("mosaic_gpu")
    return names


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 300])
def test_gpu_odd_m(m):
    for backend in _gpu_backends():
        for dtype in (jnp.bfloat16, jnp.float32):
            for act in ("native", "int8"):
                _check_kernel(backend, m, 600, 256, dtype, act,
                              interpret=False, seed=m)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", FLUX_SHAPES)
def test_gpu_flux_shapes(k, n):
    for backend in _gpu_backends():
        for m in ((1, 256, 1536) if backend == "mosaic_gpu" else (256,)):
            _check_kernel(backend, m, k, n, jnp.bfloat16, "native", interpret=False, seed=m + k)
            _check_kernel(backend, m, k, n, jnp.bfloat16, "int8", interpret=False, seed=m + n,
                          out_dtype=jnp.bfloat16)


# Every linear of the shipped reference model (hidden 256): K of one to five tiles.
REFMODEL_SHAPES = [(256, 768), (256, 256), (256, 1024), (1024, 256), (256, 1536), (256, 1792), (1280, 256)]


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", REFMODEL_SHAPES)
def test_gpu_small_model_shapes(k, n):
    for backend in _gpu_backends():
        for m in (64, 300, 6144):
            _check_kernel(backend, m, k, n, jnp.bfloat16, "native", interpret=False, seed=m + k)
            _check_kernel(backend, m, k, n, jnp.bfloat16, "int8", interpret=False, seed=m + n,
                          out_dtype=jnp.bfloat16)


def _check_mosaic_configs(m, k, n, seed, configs):
    """The Mosaic GPU kernel with explicit configs against the references (bf16 and int8 x)."""
    if "mosaic_gpu" not in _gpu_backends():
        pytest.skip("needs a Hopper GPU")
    from pallas_kernels.mosaic_gpu import ternary_matmul_mgpu
    x, w, scale, b = problem(m, k, n, seed=seed)
    wp = pk.pack_ternary(jnp.asarray(w))
    ref = pk.ternary_matmul_ref(x, wp, scale, bias=b, out_dtype=jnp.float32)
    codes, step = pk.quantize_activations(x)
    ref8 = pk.ternary_matmul_a8_ref(x, wp, scale, bias=b, out_dtype=jnp.float32)
    for cfg in configs:
        got = ternary_matmul_mgpu(x, wp, scale, step=None, bias=b, out_dtype=jnp.float32, config=cfg)
        assert rel(got, ref) < 2e-5, cfg
        got8 = ternary_matmul_mgpu(codes, wp, scale, step=step, bias=b, out_dtype=jnp.float32, config=cfg)
        assert rel(got8, ref8) < 1e-5, cfg


@pytest.mark.gpu
def test_gpu_mosaic_rows_past_m():
    # x, the output and each split-K partial keep x_rows(M) rows, not whole token tiles: TMA
    # zero-fills the loads and drops the stores past them. M around the multiples of 8 and of the
    # 16-token tiles, with split-K (3072 -> 3072: 4 splits up to M = 64; 3072 -> 21504: 3 splits
    # up to M = 8, fp32 partials) and without (3072 -> 9216: bf16 or fp32 stored by the kernel).
    if "mosaic_gpu" not in _gpu_backends():
        pytest.skip("needs a Hopper GPU")
    for m in (1, 4, 5, 8, 9, 15, 17, 63, 64, 65, 300):
        for k, n in ((3072, 3072), (3072, 9216)):
            for out_dtype in (jnp.float32, jnp.bfloat16):
                _check_kernel("mosaic_gpu", m, k, n, jnp.bfloat16, "native", interpret=False, seed=m + n,
                              out_dtype=out_dtype)
            _check_kernel("mosaic_gpu", m, k, n, jnp.bfloat16, "int8", interpret=False, seed=m, out_dtype=jnp.bfloat16)
    for m in (1, 4, 5, 8):
        for activations in ("native", "int8"):
            _check_kernel("mosaic_gpu", m, 3072, 21504, jnp.bfloat16, activations, interpret=False, seed=m,
                          out_dtype=jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", FLUX_SHAPES)
def test_gpu_mosaic_m4_defaults(k, n):
    # The small-M defaults (split counts by the round-fill rule, e.g. 6 splits at 3072 -> 18432)
    # at M = 4 on every FLUX shape, both activation kinds, fp32 and bf16 output.
    if "mosaic_gpu" not in _gpu_backends():
        pytest.skip("needs a Hopper GPU")
    for out_dtype in (jnp.float32, jnp.bfloat16):
        _check_kernel("mosaic_gpu", 4, k, n, jnp.bfloat16, "native", interpret=False, seed=k + n, out_dtype=out_dtype)
    _check_kernel("mosaic_gpu", 4, k, n, jnp.bfloat16, "int8", interpret=False, seed=n, out_dtype=jnp.bfloat16)


@pytest.mark.gpu
def test_gpu_mosaic_8_token_tiles():
    # 8-token tiles (the M <= 8 default), split and not, with pipeline steps of 1 or 2 planes.
    from pallas_kernels.mosaic_gpu import MgpuConfig
    _check_mosaic_configs(4, 3072, 3072, 12, [MgpuConfig(tile_m=8, stages=3, k_splits=ks) for ks in (1, 4)])
    _check_mosaic_configs(8, 1024, 512, 13, [
        MgpuConfig(tile_m=8, stages=4), MgpuConfig(tile_m=8, stages=4, k_steps=2),
        MgpuConfig(tile_m=8, stages=2, k_splits=2, overlap=False)])


@pytest.mark.gpu
def test_gpu_mosaic_sum_in_kernel():
    # The last split of each tile adds the others' partials (bias once, fp32 output). M = 4:
    # one work item per CTA, 2-12 splits; 512 x 2304 with 2 splits of 64 x 64 tiles: 288 items
    # on 132 SMs, so CTAs wait as last split after running other tiles' first splits.
    from pallas_kernels.mosaic_gpu import MgpuConfig
    _check_mosaic_configs(4, 3072, 3072, 7, [
        MgpuConfig(tile_m=16, stages=min(8, 12 // ks), k_splits=ks, overlap=ks < 12, sum_in_kernel=True)
        for ks in (2, 3, 4, 6, 12)])
    _check_mosaic_configs(512, 1024, 2304, 8, [
        MgpuConfig(tile_m=64, stages=2, k_splits=2, sum_in_kernel=True),
        MgpuConfig(tile_n=128, tile_m=128, stages=2, k_splits=2, epi_m=32, sum_in_kernel=True)])


@pytest.mark.gpu
def test_gpu_mosaic_split_cluster():
    # Split-K summed in split 0's shared memory (bias once, fp32 output). M = 4: 2-6 splits, one
    # tile per cluster; 3072 -> 18432: 144 tiles on 132 // 4 clusters, so each cluster reuses its
    # slots for several tiles; M = 50: 64-token tiles; 128-row warpgroup tiles.
    from pallas_kernels.mosaic_gpu import MgpuConfig
    _check_mosaic_configs(4, 3072, 3072, 9, [
        MgpuConfig(tile_m=16, stages=min(8, 12 // ks), k_splits=ks, split_cluster=True) for ks in (2, 3, 4, 6)])
    _check_mosaic_configs(4, 3072, 18432, 10, [MgpuConfig(tile_m=16, stages=3, k_splits=4, split_cluster=True)])
    _check_mosaic_configs(50, 1024, 2304, 11, [
        MgpuConfig(tile_m=64, stages=2, k_splits=2, split_cluster=True),
        MgpuConfig(tile_n=128, tile_m=64, stages=2, k_splits=2, epi_m=32, overlap=False, split_cluster=True)])


@pytest.mark.gpu
def test_gpu_mosaic_configs():
    from pallas_kernels.mosaic_gpu import MgpuConfig
    _check_mosaic_configs(512, 1024, 512, 5, [
        MgpuConfig(tile_n=64, tile_m=64, stages=3), MgpuConfig(tile_n=128, tile_m=128, stages=2, epi_m=32),
        MgpuConfig(tile_n=64, tile_m=64, stages=2, k_splits=2),
        MgpuConfig(tile_n=128, tile_m=64, stages=2, epi_m=32, overlap=False, grid_tile_width=8),
        MgpuConfig(tile_n=64, tile_m=128, stages=4, k_steps=2),
        MgpuConfig(tile_n=64, tile_m=64, stages=3, cluster=2),
        MgpuConfig(tile_n=128, tile_m=128, stages=2, epi_m=32, cluster=2),
        MgpuConfig(tile_n=64, tile_m=64, stages=2, k_splits=2, cluster=2),
        MgpuConfig(tile_n=64, tile_m=256, stages=4, k_steps=4, overlap=False),
        MgpuConfig(tile_n=64, tile_m=64, stages=2, overlap=False, chain=True),      # one tile per CTA
        MgpuConfig(tile_n=64, tile_m=64, stages=4, k_steps=2, overlap=False, chain=True)])


@pytest.mark.gpu
def test_gpu_mosaic_chained_pipelines():
    # 288 tiles on 132 SMs: CTAs run 2 or 3 tiles through one chained pipeline (START, STEADY, STOP).
    from pallas_kernels.mosaic_gpu import MgpuConfig
    _check_mosaic_configs(2048, 1024, 2304, 6, [
        MgpuConfig(tile_n=64, tile_m=128, stages=2, overlap=False, chain=True),
        MgpuConfig(tile_n=64, tile_m=128, stages=4, k_steps=2, overlap=False, chain=True),
        MgpuConfig(tile_n=64, tile_m=128, stages=2, k_splits=2, overlap=False, chain=True)])


@pytest.mark.gpu
def test_gpu_mosaic_144_token_tiles():
    # The M = 4608 defaults' tile shapes; M = 2000 pads to 14 tiles of 144 tokens, 1 or 2 per CTA.
    from pallas_kernels.mosaic_gpu import MgpuConfig
    _check_mosaic_configs(2000, 1024, 2304, 7, [
        MgpuConfig(tile_n=64, tile_m=144, stages=2, epi_m=48, overlap=False, chain=True),
        MgpuConfig(tile_n=128, tile_m=144, stages=2, epi_m=16, grid_tile_width=8)])   # f32 out: 2 stages fit


@pytest.mark.gpu
def test_gpu_mosaic_three_warpgroups():
    # 192-row CTAs (the M = 4608 weight-only default): N = 2304 has 12 CTA tiles of 192 rows,
    # M = 2000 pads to 14 tiles of 144 tokens (16 of 128), so CTAs run 1-2 tiles through chained
    # pipelines; fp32 output needs the smaller epilogue chunks. K = 1536: 6 K-tiles, so 12 half
    # steps chain through 3 stages, and 2 splits of 3 K-tiles.
    from pallas_kernels.mosaic_gpu import MgpuConfig
    _check_mosaic_configs(2000, 1536, 2304, 11, [
        MgpuConfig(tile_n=64, tile_m=144, stages=2, epi_m=16, overlap=False, chain=True, compute_wgs=3),
        MgpuConfig(tile_n=64, tile_m=128, stages=2, epi_m=32, overlap=False, chain=True, compute_wgs=3),
        MgpuConfig(tile_n=64, tile_m=144, stages=3, k_steps=2, epi_m=16, overlap=False, chain=True, compute_wgs=3),
        MgpuConfig(tile_n=64, tile_m=144, stages=2, epi_m=16, compute_wgs=3, k_splits=2)])
    # The defaults through ternary_matmul at M = 4608 (3 warpgroups for bf16 x), both output dtypes.
    for out_dtype in (jnp.bfloat16, jnp.float32):
        for activations in ("native", "int8"):
            _check_kernel("mosaic_gpu", 4608, 3072, 3072, jnp.bfloat16, activations, interpret=False, seed=13,
                          out_dtype=out_dtype)


@pytest.mark.gpu
def test_gpu_mosaic_int8_three_warpgroups():
    # W1.58A8 on 3 compute warpgroups with the stages with_stages fits (3-4 with one wgmma group
    # in flight, 2 without where fp32 output leaves less room), 64- and 128-row warpgroup tiles
    # (192- and 384-row CTAs; N = 2304 has 12 / 6), 144- and 128-token tiles over M = 2000 (a
    # partial last tile), both output dtypes.
    if "mosaic_gpu" not in _gpu_backends():
        pytest.skip("needs a Hopper GPU")
    from pallas_kernels.mosaic_gpu import MgpuConfig, fit_pipeline, ternary_matmul_mgpu, with_stages
    m, k, n = 2000, 1536, 2304
    x, w, scale, b = problem(m, k, n, seed=17)
    wp = pk.pack_ternary(jnp.asarray(w))
    codes, step = pk.quantize_activations(x)
    ref8 = pk.ternary_matmul_a8_ref(x, wp, scale, bias=b, out_dtype=jnp.float32)
    for tile_n, tile_m in ((64, 144), (64, 128), (128, 128)):
        for out_dtype in (jnp.float32, jnp.bfloat16):
            cfg = fit_pipeline(with_stages(MgpuConfig(tile_n=tile_n, tile_m=tile_m, compute_wgs=3), m, k // pk.TILE_K, 1,
                                           jnp.dtype(out_dtype).itemsize), k // pk.TILE_K)
            got = ternary_matmul_mgpu(codes, wp, scale, step=step, bias=b, out_dtype=out_dtype, config=cfg)
            assert rel(got, ref8) < (1e-5 if out_dtype == jnp.float32 else 4e-3), cfg


@pytest.mark.gpu
def test_gpu_auto_backend():
    want = "mosaic_gpu" if "mosaic_gpu" in _gpu_backends() else "triton"
    assert pk.choose_backend("auto") == want
    assert pk._resolve("auto", 3072, False, 1, "native") == "triton"   # the GEMV, on Hopper too
    assert pk._resolve("auto", 3072, False, 4, "int8") == "triton"


@pytest.mark.gpu
def test_gpu_gemv():
    from pallas_kernels.gemv import GemvConfig
    for m in (1, 2, 3, 4):
        for dtype in (jnp.bfloat16, jnp.float32, jnp.int8):
            _check_gemv(m, 600, 256, dtype, None, seed=m, interpret=False)
            _check_gemv(m, 1024, 512, dtype, GemvConfig(block_n=32, k_splits=2, num_warps=2), seed=m + 1,
                        bias=False, interpret=False)
            _check_gemv(m, 768, 256, dtype, GemvConfig(block_n=64, k_splits=1), seed=m + 2,   # bias in-kernel
                        interpret=False)
            if dtype != jnp.int8:
                _check_gemv(m, 600, 256, dtype, GemvConfig(block_n=64, k_splits=3, float_inner="mma"), seed=m + 3,
                            interpret=False)
    for m in (1, 7, 16):                                # the mma path's token range
        _check_gemv(m, 3072, 9216, jnp.bfloat16, GemvConfig(k_splits=12, float_inner="mma"), seed=m, interpret=False)
        _check_gemv(m, 768, 256, jnp.float32, GemvConfig(block_n=64, k_splits=1, num_stages=2, float_inner="mma"),
                    seed=m + 1, interpret=False)
    for k, n in FLUX_SHAPES:
        _check_gemv(1, k, n, jnp.bfloat16, None, seed=k + n, interpret=False)
        _check_gemv(4, k, n, jnp.int8, None, seed=k + n + 2, interpret=False)   # auto's W1.58A8 range
    for k, n in REFMODEL_SHAPES:
        _check_gemv(1, k, n, jnp.bfloat16, None, seed=k + n + 1, interpret=False)


@pytest.mark.gpu
def test_gpu_mosaic_pingpong():
    # Turn-taking warpgroups: a CTA's steps, tiles (64-row tiles: 288 on 132 SMs, 2-3 per CTA)
    # and pipelines keep the two turn barriers in phase, with and without chaining, k_steps,
    # split-K, overlap and 144-token tiles. Explicit configs are not fitted to the K loop or to
    # shared memory, so no config asks for more stages than its split has steps, nor for more
    # than fit with fp32 outputs (the 128 x 128 case: 2 stages; 3 need 312320 bytes).
    from pallas_kernels.mosaic_gpu import MgpuConfig
    _check_mosaic_configs(2048, 1024, 2304, 8, [
        MgpuConfig(tile_n=64, tile_m=128, stages=2, overlap=False, chain=True, pingpong=True),
        MgpuConfig(tile_n=64, tile_m=128, stages=2, overlap=False, pingpong=True),
        MgpuConfig(tile_n=64, tile_m=128, stages=4, k_steps=2, overlap=False, chain=True, pingpong=True),
        MgpuConfig(tile_n=64, tile_m=128, stages=2, k_splits=2, pingpong=True),     # 2 steps per split
        MgpuConfig(tile_n=128, tile_m=128, stages=2, epi_m=32, grid_tile_width=8, pingpong=True)])
    _check_mosaic_configs(2000, 1024, 2304, 9, [
        MgpuConfig(tile_n=64, tile_m=144, stages=2, epi_m=48, overlap=False, chain=True, pingpong=True),
        MgpuConfig(tile_n=128, tile_m=144, stages=2, epi_m=16, grid_tile_width=8, pingpong=True)])
    _check_mosaic_configs(4, 3072, 3072, 10, [MgpuConfig(tile_n=64, tile_m=16, stages=3, k_splits=4, pingpong=True)])
