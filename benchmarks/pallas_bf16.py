"""What Pallas itself reaches: JAX's own Mosaic GPU bf16 matmul vs XLA bf16 at M = 4608.

    PYTHONPATH=. python3 benchmarks/pallas_bf16.py              # every FLUX shape, steady state
    python3 benchmarks/pallas_bf16.py --shapes 3072x21504 --sustain 0

The kernel is `jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu` as JAX ships it (Hopper only):
a plain bf16 GEMM with both operands TMA-loaded into shared memory, 2 compute warpgroups and a
persistent grid, the structure the ternary kernel shares. It does no unpacking, so its ratio to
XLA (cuBLAS) bounds what a weight-only ternary kernel built the same way can reach; the ternary
kernel's ratio is printed beside it (NOTES.md item 16). Timing, inputs and clocks as in
kernels.py (`time_op`, `--sustain`); each Pallas config is also checked against XLA's product.
"""

from __future__ import annotations

import argparse
import functools
import inspect

import jax
import jax.numpy as jnp

import kernels as kb   # benchmarks/kernels.py (the script's own folder); it puts the repo on sys.path
import pallas_kernels as pk

M = 4608


def stock_matmul(config, delay_release: int = 0):
    """x (M, K) @ w (K, N) by JAX's Hopper Pallas matmul kernel with a TuningConfig.
    delay_release=1 keeps one wgmma group in flight across pipeline steps."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    kw = dict(delay_release=delay_release) if "delay_release" in inspect.signature(hm.kernel).parameters else {}
    if delay_release and not kw:
        raise SystemExit("this JAX's hopper_matmul_mgpu.kernel has no delay_release")

    def f(a, b):
        (m, _), (_, n) = a.shape, b.shape
        call = plgpu.kernel(functools.partial(hm.kernel, config=config, **kw),
                            out_type=jax.ShapeDtypeStruct((m, n), a.dtype),
                            grid=(hm.get_num_sms(),), grid_names=("cluster_grid",), cluster=(1,),
                            cluster_names=("cluster",), num_threads=3, thread_name="wg",
                            compiler_params=plgpu.CompilerParams(
                                lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
        return call(a, b, None)
    return f


def configs() -> dict:
    """CTA tiles of 128 tokens x 256 features and 256 x 128 (2 warpgroups along N or M), 64-deep
    K steps, 4 stages, with and without a delayed release; and 128 x 128."""
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    dim = hm.MatmulDimension
    cfg = lambda tile_n, wg: hm.TuningConfig(tile_m=128, tile_n=tile_n, tile_k=64, max_concurrent_steps=4,
                                             grid_minor_dim=dim.N, grid_tile_width=4, wg_dimension=wg)
    return {"128x256": (cfg(128, dim.N), 0), "256x128": (cfg(128, dim.M), 0),
            "128x256 d1": (cfg(128, dim.N), 1), "256x128 d1": (cfg(128, dim.M), 1),
            "128x128": (cfg(64, dim.N), 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in kb.FLUX_SHAPES))
    ap.add_argument("--sustain", type=float, default=2.0)
    a = ap.parse_args()
    clocks = kb.ClockSampler()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, M = {M}, "
          f"ratios vs XLA bf16 (MHz: mean SM clock while timed)")
    for shape in a.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        ins = kb.make_inputs(M, k, n, kb.n_sets(M, k, n))
        dense = [(d["x"], d["w"].astype(jnp.bfloat16)) for d in ins]
        cells = []

        def timed(name, fn, args, err=None):
            window: list = []
            t = kb.time_op(fn, args, sustain=a.sustain, window=window)
            mhz, _ = clocks.mean(*window[0])
            cells.append((name, t, mhz, err))

        timed("xla", lambda x, w: jnp.dot(x, w), dense)
        timed("ternary wo", lambda x, wp, s: pk.ternary_matmul(x, wp, s), [(d["x"], d["wp"], d["scale"]) for d in ins])
        ref = jnp.dot(dense[0][0], dense[0][1], preferred_element_type=jnp.float32)
        for name, (cfg, delay) in configs().items():
            fn = stock_matmul(cfg, delay)
            got = fn(*dense[0]).astype(jnp.float32)
            timed("pallas " + name, fn, dense, float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)))
        base = cells[0][1]
        print(f"{k}->{n}: " + "; ".join(
            f"{name} {t * 1e6:.0f} us {base / t:.2f}x {mhz:.0f} MHz" + (f" err {err:.0e}" if err is not None else "")
            for name, t, mhz, err in cells), flush=True)


if __name__ == "__main__":
    main()
