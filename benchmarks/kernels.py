"""Packed ternary matmul kernels vs XLA bf16 `jnp.dot`, at FLUX.1-dev's linear shapes.

One run prints, for M in {1, 256, 1536, 4608} and every FLUX (K, N): TFLOP/s and the ratio vs
XLA bf16 jnp.dot measured in the same run, for weight-only ternary and W1.58A8 (activation
quantization included; "a8kern" excludes it), the quantization pass alone ("q us", XLA), plus
relative errors vs the references (rows with M in --check-ms). With --backend auto (the default)
each call keeps ternary_matmul's own choice: on Hopper the weight-only M = 1 rows and the W1.58A8
M = 1 rows run the Pallas Triton GEMV (pallas_kernels/gemv.py), everything else the Mosaic GPU
kernel.

    PYTHONPATH=. python3 benchmarks/kernels.py                  # full table, backend auto
    python3 benchmarks/kernels.py --ms 4608 --sustain 2 --clocks   # steady power state, clocks
    python3 benchmarks/kernels.py --ms 4608 --shapes 3072x3072 --sweep int8   # mosaic_gpu tiles
    python3 benchmarks/kernels.py --ms 4608 --sweep bf16 --defaults-only       # default vs its twin
    python3 benchmarks/kernels.py --ms 4 --sweep bf16 --defaults-only --sum-in-kernel  # split-K sum in kernel
    python3 benchmarks/kernels.py --ms 4 --sweep bf16 --defaults-only --split-cluster  # split-K sum in a cluster
    python3 benchmarks/kernels.py --ms 4 --shapes 3072x3072 --timeline    # each op's kernels, us
    MOSAIC_GPU_DUMP_TO=/tmp/d python3 benchmarks/kernels.py --once --ms 4608 --shapes 3072x3072

Timing (METHOD.md): `time_op` runs the op inside a jitted fori_loop, once per distinct random
input set per iteration (sets exceed L2; optimization barriers stop XLA from merging or hoisting
the calls); per-op time = slope between 1 and 3 iterations (medians of 5), which cancels the
dispatch overhead. `--sustain S` times each op after S/3 s of back-to-back load, in the steady
power state a sampling loop runs in (an H100/H200 at its 700 W cap clocks each kernel
differently; `--clocks` prints the SM clock and power per op). Inputs are random (never zeros).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels as pk  # noqa: E402

FLUX_SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072),
               (3072, 18432)]
MS = [1, 256, 1536, 4608]
L2_BYTES = 60 << 20


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def time_op(fn, arg_sets, samples: int = 5, reps: tuple[int, int] = (1, 3), sustain: float = 0.0,
            window: list | None = None) -> float:
    """Seconds per call of fn(*args) on the device.

    One jitted program runs a loop of n iterations, each applying fn once to every distinct
    input set (sets exceed L2). An optimization barrier ties each iteration's inputs to the loop
    counter (so XLA can neither merge nor hoist the calls) and each output to a scalar carry
    (so nothing is dead and no output is copied). The per-call time is the slope between n=reps[0]
    and n=reps[1] (medians of `samples` runs), which cancels the fixed dispatch overhead.

    sustain > 0: the op first runs back to back for sustain/3 seconds, then the slope is taken
    from (lo, hi) pairs run back to back until `sustain` seconds have passed, hi scaled so a call
    lasts >= 20 ms. An H100 at its 700 W cap lowers its clocks within about a second of steady
    load, and by a different amount for each kernel (NOTES.md item 13); this measures that steady
    state, the one a 50-step sampling loop runs in. `window` receives (start, end) of the timed
    phase in time.time() seconds (for clock sampling)."""
    @jax.jit
    def run(n, sets):
        def body(i, c):
            for a in sets:
                a2, _ = lax.optimization_barrier((a, i))
                o = jax.tree.leaves(lax.optimization_barrier(fn(*a2)))[0]
                c = c + o.reshape(-1)[0].astype(jnp.float32)
            return c
        return lax.fori_loop(0, n, body, jnp.float32(0))

    def once(n):
        t0 = time.perf_counter()
        jax.block_until_ready(run(jnp.int32(n), arg_sets))
        return time.perf_counter() - t0

    lo, hi = reps
    once(lo)                                   # compile
    if sustain > 0:
        scale = max(1, int(0.02 / max(once(hi) / hi, 1e-7) / hi) + 1)
        lo, hi = lo * scale, hi * scale
        t_heat = time.time() + sustain / 3
        while time.time() < t_heat:
            once(hi)
        t_start, t_end = time.time(), time.time() + 2 * sustain / 3
        los, his = [], []
        while time.time() < t_end or len(los) < 3:
            los.append(once(lo))
            his.append(once(hi))
        d_lo, d_hi = statistics.median(los), statistics.median(his)
    else:
        t_start = time.time()
        d_lo = statistics.median([once(lo) for _ in range(samples)])
        d_hi = statistics.median([once(hi) for _ in range(samples)])
    if window is not None:
        window.append((t_start, time.time()))
    return max(d_hi - d_lo, 1e-9) / ((hi - lo) * len(arg_sets))


def kernel_times(fn, arg_sets) -> list[tuple[str, float, float]]:
    """The GPU kernels one call of fn runs: (name, launches per call, median us), from a
    jax.profiler trace of a short time_op run (empty where the trace has no GPU timeline, e.g. on
    CPU). This splits an op into its pieces (a kernel and an XLA sum of split-K partials, cuBLAS's
    or Triton's own split-K reduction) with the launch gaps left out."""
    import glob
    import tempfile
    lo, hi = 1, 2
    time_op(fn, arg_sets, samples=1, reps=(lo, hi))             # compile outside the trace
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        time_op(fn, arg_sets, samples=1, reps=(lo, hi))
        jax.profiler.stop_trace()
        path, = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        profile = jax.profiler.ProfileData.from_file(path)
        # With samples=1, time_op runs lo (its compile call) + lo + hi loop iterations, each
        # calling fn once per input set.
        return summarize_kernels(profile.planes, calls=(2 * lo + hi) * len(arg_sets))


def summarize_kernels(planes, calls: int) -> list[tuple[str, float, float]]:
    """(name, count / calls, median duration us) of the GPU planes' events, most frequent first;
    the few events that come fewer than once per call (the loop's own copies and compares) are
    left out. `calls`: how many calls of the op the trace holds."""
    durations: dict[str, list[float]] = {}
    for plane in planes:
        if "GPU" not in plane.name:
            continue
        for line in plane.lines:
            for e in line.events:
                durations.setdefault(e.name, []).append(e.duration_ns / 1e3)
    rows = [(name, len(d) / calls, statistics.median(d)) for name, d in durations.items() if len(d) >= calls]
    return sorted(rows, key=lambda r: -r[1])


class ClockSampler:
    """SM clock and board power sampled by `nvidia-smi` every 100 ms in a background thread."""

    def __init__(self) -> None:
        import atexit
        import subprocess
        import threading
        self.samples: list[tuple[float, float, float]] = []
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, text=True)
        except FileNotFoundError as e:
            raise SystemExit("--clocks needs nvidia-smi on PATH (an NVIDIA GPU machine)") from e
        atexit.register(self._proc.terminate)   # nvidia-smi -lms runs until stopped
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                mhz, watts = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), mhz, watts))

    def mean(self, t0: float, t1: float) -> tuple[float, float]:
        """Mean (SM MHz, W) over [t0, t1]; NaN if no sample fell inside."""
        sel = [(c, w) for t, c, w in self.samples if t0 <= t <= t1]
        if not sel:
            return float("nan"), float("nan")
        return statistics.mean(c for c, _ in sel), statistics.mean(w for _, w in sel)


def make_inputs(m: int, k: int, n: int, sets: int, seed: int = 0):
    key = jax.random.key(seed)
    out = []
    for i in range(sets):
        k1, k2, k3, key = jax.random.split(key, 4)
        x = jax.random.normal(k1, (m, k), jnp.bfloat16)
        w = jax.random.randint(k2, (k, n), -1, 2, jnp.int8)
        out.append(dict(x=x, w=w, wp=pk.pack_ternary(w),
                        scale=jax.random.uniform(k3, (n,), jnp.float32, 0.5, 1.5)))
    return out


def n_sets(m: int, k: int, n: int) -> int:
    """Distinct input sets per loop iteration: more bytes than L2 holds (for the ternary inputs),
    and >= ~0.3 ms of work so the loop's own per-iteration cost stays small."""
    per_call = m * k * 2 + k * n // 4
    by_bytes = -(-2 * L2_BYTES // per_call)
    by_time = -(-3e-4 // max(2.0 * m * k * n / 600e12, 5e-6))
    return int(min(48, max(4, by_bytes, by_time)))


def bench_shape(m: int, k: int, n: int, backend: str, check: bool, kernel_only: bool = True,
                xla_path: bool = False, sustain: float = 0.0, clocks: ClockSampler | None = None,
                requested: str | None = None, timeline: bool = False) -> dict:
    """requested: the backend argument passed to ternary_matmul ("auto" keeps its per-call choice,
    e.g. the GEMV at M = 1); backend: what it resolves to. The W1.58A8 kernel-only timing runs
    the kernel `requested` picks for int8 activations at this M."""
    requested = requested or backend
    sets = n_sets(m, k, n)
    ins = make_inputs(m, k, n, sets)
    res = dict(m=m, k=k, n=n, flop=2.0 * m * k * n)

    def timed(key, fn, args):
        window: list = []
        res[key] = time_op(fn, args, sustain=sustain, window=window)
        if timeline:
            res[key + "_kernels"] = kernel_times(fn, args)
        if clocks is not None:
            res[key + "_mhz"], res[key + "_w"] = clocks.mean(*window[0])

    # XLA bf16 baseline: the same x against a dense bf16 weight.
    dense = [(d["x"], (d["w"].astype(jnp.float32) * d["scale"]).astype(jnp.bfloat16)) for d in ins]
    timed("xla", lambda x, w: jnp.dot(x, w), dense)
    del dense
    wo = lambda x, wp, s: pk.ternary_matmul(x, wp, s, backend=requested)
    a8 = lambda x, wp, s: pk.ternary_matmul(x, wp, s, backend=requested, activations="int8")
    args = [(d["x"], d["wp"], d["scale"]) for d in ins]
    timed("wo", wo, args)
    timed("a8", a8, args)
    if xla_path:
        timed("wo_xla", lambda x, wp, s: pk.ternary_matmul(x, wp, s, backend="xla"), args)
    if kernel_only and backend != "xla":
        q = [(pk.quantize_activations(d["x"]), d["wp"], d["scale"]) for d in ins]
        a8_name = pk._resolve(requested, n, False, m, "int8")
        timed("a8k", lambda cs, wp, s: _a8_kernel(cs, wp, s, a8_name), q)
        timed("q", pk.quantize_activations, [(d["x"],) for d in ins])
    if check:
        d = ins[0]
        ref = pk.ternary_matmul_ref(d["x"], d["wp"], d["scale"], out_dtype=jnp.float32)
        got = pk.ternary_matmul(d["x"], d["wp"], d["scale"], backend=requested, out_dtype=jnp.float32)
        res["err_wo"] = _rel(got, ref)
        got8 = pk.ternary_matmul(d["x"], d["wp"], d["scale"], backend=requested, activations="int8",
                                 out_dtype=jnp.float32)
        res["err_a8"] = _rel(got8, ref)                        # vs bf16-activation reference
        ref8 = pk.ternary_matmul_a8_ref(d["x"], d["wp"], d["scale"], out_dtype=jnp.float32)
        res["err_a8_vs_a8ref"] = _rel(got8, ref8)
    return res


def _a8_kernel(codes_step, wp, s, backend):
    """The W1.58A8 kernel `backend` runs, from int8 codes (the quantization pass left out)."""
    codes, step = codes_step
    if backend == "mosaic_gpu":
        from pallas_kernels.mosaic_gpu import ternary_matmul_mgpu as fn
    elif codes.shape[0] <= pk.GEMV_M["int8"]:
        from pallas_kernels.gemv import ternary_gemv_triton as fn
    else:
        from pallas_kernels.triton import ternary_matmul_triton as fn
    return fn(codes, wp, s, step=step, bias=None, out_dtype=jnp.bfloat16)


def fmt_row(r: dict) -> str:
    tf = lambda t: r["flop"] / t / 1e12
    cells = [f"{r['k']:>5}->{r['n']:<5}", f"{r['m']:>5}", f"{r['xla'] * 1e6:9.1f}", f"{tf(r['xla']):7.1f}",
             f"{r['wo'] * 1e6:9.1f}", f"{tf(r['wo']):7.1f}", f"{r['xla'] / r['wo']:6.2f}x",
             f"{r['a8'] * 1e6:9.1f}", f"{tf(r['a8']):7.1f}", f"{r['xla'] / r['a8']:6.2f}x"]
    cells.append(f"{r['xla'] / r['a8k']:6.2f}x" if "a8k" in r else "      -")
    cells.append(f"{r['xla'] / r['wo_xla']:6.2f}x" if "wo_xla" in r else "      -")
    cells.append(f"{r['q'] * 1e6:7.1f}" if "q" in r else "      -")
    cells.append(f"{r['err_wo']:.1e}" if "err_wo" in r else "    -  ")
    cells.append(f"{r['err_a8']:.1e}" if "err_a8" in r else "    -  ")
    if "xla_mhz" in r:
        cells.append(" / ".join(f"{r[key + '_mhz']:4.0f}" for key in ("xla", "wo", "a8k") if key + "_mhz" in r))
        cells.append(" / ".join(f"{r[key + '_w']:3.0f}" for key in ("xla", "wo", "a8k") if key + "_w" in r))
    return " | ".join(cells)


HEADER = ("  K -> N    |     M |  xla us  | xla TF |  wo us   | wo TF  | wo/xla |  a8 us   | a8 TF  | a8/xla"
          " | a8kern | wo-xla |  q us   | err wo  | err a8")
CLOCK_HEADER = " | MHz xla / wo / a8kern | W xla / wo / a8kern"


def sweep(m: int, k: int, n: int, dtype: str, sustain: float = 0.0, defaults_only: bool = False,
          sum_in_kernel: bool = False, split_cluster: bool = False) -> None:
    """Time mosaic_gpu tile configurations for one problem (weight-only bf16 or int8 kernel);
    defaults_only: just the default and its twin (see below); sum_in_kernel: at M <= 64 also the
    default's tiles at every split count with the split-K sum inside the kernel (NOTES.md item 25);
    split_cluster: likewise with each tile's splits summed in one cluster's shared memory (item 26)."""
    from pallas_kernels import mosaic_gpu as mg
    sets = n_sets(m, k, n)
    ins = make_inputs(m, k, n, sets)
    t_w = k // pk.TILE_K
    base = time_op(lambda x, w: jnp.dot(x, w),
                   [(d["x"], d["w"].astype(jnp.bfloat16)) for d in ins], sustain=sustain)
    unpack = time_op(lambda x, wp, s: pk.ternary_matmul(x, wp, s, backend="xla"),
                     [(d["x"], d["wp"], d["scale"]) for d in ins], sustain=sustain)
    print(f"sweep {k}->{n} M={m} {dtype}: xla bf16 {base * 1e6:.1f} us ({2 * m * k * n / base / 1e12:.0f} TF); "
          f"xla unpack+dot {unpack * 1e6:.1f} us ({base / unpack:.2f}x)")
    if dtype == "int8":
        args = [(*pk.quantize_activations(d["x"]), d["wp"], d["scale"]) for d in ins]
    else:
        args = [(d["x"], None, d["wp"], d["scale"]) for d in ins]
    d = ins[0]
    ref = (pk.ternary_matmul_a8_ref if dtype == "int8" else pk.ternary_matmul_ref)(
        d["x"], d["wp"], d["scale"], out_dtype=jnp.float32)    # bf16 outputs below: error ~1e-3
    c = mg.MgpuConfig
    if m <= 64:
        # Split-K factors (CTAs per output tile: how many SMs stream the weights, and how evenly
        # the last round of the persistent grid fills), and chained pipelines across a CTA's
        # items (the next item's loads start during this one's epilogue).
        x_item = 1 if dtype == "int8" else 2
        tm = mg.small_m_tile(m, x_item)
        grid = [mg.fit_pipeline(mg.with_stages(c(tile_n=64, tile_m=tm, k_splits=ks), m, t_w, x_item), t_w)
                for ks in range(1, 13) if t_w % ks == 0]
        grid += [c(tile_n=64, tile_m=tm, stages=4, k_splits=ks, k_steps=4, overlap=False, chain=True)
                 for ks in (3, 6, 12)]
    elif m <= 2048:
        # Wave balance: each tile shape unsplit and with the smallest split-K factor that keeps
        # the last round of the persistent grid >= 85 % full (the partials cost an XLA pass).
        sms, x_item = mg.num_sms(), 1 if dtype == "int8" else 2
        grid = []
        for tn, tm in ((64, 64), (64, 128), (128, 128)):
            tiles = -(-m // tm) * (n // (2 * tn))
            ks_all = [ks for ks in range(2, 7) if t_w % ks == 0]
            fill = [ks for ks in ks_all if mg.round_fill(tiles * ks, sms) >= mg._SMALL_M_FILL]
            for ks in [1] + fill[:1]:
                cfg = mg.with_stages(c(tile_n=tn, tile_m=tm, k_splits=ks), m, t_w, x_item)
                grid.append(mg.fit_pipeline(cfg, t_w))
        grid = list(dict.fromkeys(grid))
    elif dtype == "int8":
        grid = [c(tile_n=128, tile_m=128, stages=st, epi_m=32, grid_tile_width=gw)
                for st, gw in ((4, 8), (4, 4), (4, 6), (4, 12), (4, 16), (3, 8), (3, 12))]
        grid += [c(tile_n=128, tile_m=128, stages=4, epi_m=32, grid_tile_width=8, grid_minor_n=False)]
        grid += [c(tile_n=64, tile_m=128, stages=4, grid_tile_width=gw) for gw in (8, 12, 16)]
        grid += [c(tile_n=128, tile_m=144, stages=3, epi_m=48, grid_tile_width=8),
                 c(tile_n=64, tile_m=144, stages=4, epi_m=48, grid_tile_width=8)]
        grid += [c(tile_n=128, tile_m=128, stages=4, epi_m=32, grid_tile_width=8, cluster=2),
                 c(tile_n=64, tile_m=128, stages=4, grid_tile_width=8, cluster=2)]
        grid += [c(tile_n=128, tile_m=128, stages=6, epi_m=32, grid_tile_width=8, k_steps=2),
                 c(tile_n=64, tile_m=128, stages=8, grid_tile_width=8, k_steps=2),
                 c(tile_n=128, tile_m=192, stages=4, epi_m=32, grid_tile_width=8, k_steps=2)]
        # 3 compute warpgroups (NOTES.md item 24 measured them for bf16; Open: not yet for int8)
        grid += [c(tile_n=64, tile_m=144, stages=3, epi_m=48, grid_tile_width=8, compute_wgs=3),
                 c(tile_n=64, tile_m=128, stages=4, grid_tile_width=8, compute_wgs=3),
                 c(tile_n=128, tile_m=128, stages=3, epi_m=32, grid_tile_width=8, compute_wgs=3)]
    else:
        grid = [c(tile_n=64, tile_m=128, stages=2, overlap=False),
                c(tile_n=64, tile_m=128, stages=2, overlap=False, chain=True),
                c(tile_n=64, tile_m=144, stages=2, overlap=False, chain=True, epi_m=48),
                c(tile_n=64, tile_m=128, stages=2, overlap=False, cluster=2),
                c(tile_n=64, tile_m=128, stages=4, k_steps=2), c(tile_n=64, tile_m=128, stages=4, k_steps=2,
                                                                  overlap=False),
                c(tile_n=64, tile_m=128, stages=3, k_steps=2),
                c(tile_n=128, tile_m=128, stages=3, epi_m=32, k_steps=2),
                c(tile_n=64, tile_m=64, stages=6, k_steps=2),
                c(tile_n=64, tile_m=256, stages=4, k_steps=4), c(tile_n=64, tile_m=256, stages=4, k_steps=4,
                                                                  overlap=False),
                # 3 compute warpgroups: 192-row CTAs (NOTES.md item 24)
                c(tile_n=64, tile_m=144, stages=2, overlap=False, chain=True, epi_m=48, compute_wgs=3),
                c(tile_n=64, tile_m=128, stages=2, overlap=False, chain=True, compute_wgs=3),
                c(tile_n=64, tile_m=144, stages=3, k_steps=2, overlap=False, chain=True, epi_m=48, compute_wgs=3)]
    dflt = mg.fit_pipeline(mg.default_config(m, n, t_w, jnp.int8 if dtype == "int8" else jnp.bfloat16,
                                             mg.num_sms()), t_w)
    if defaults_only:
        grid = []
    if dflt not in grid:
        grid.insert(0, dflt)
    # The default's twins: with 2 compute warpgroups, the other turn-taking choice (ping-pong,
    # NOTES.md item 23); with more, the same tiles on 2 warpgroups (item 24).
    if dflt.compute_wgs == 2:
        twin = dataclasses.replace(dflt, pingpong=not dflt.pingpong)
    else:
        twin = dataclasses.replace(dflt, compute_wgs=2)
    if twin not in grid:
        grid.insert(grid.index(dflt) + 1, twin)
    if sum_in_kernel and m <= 64:
        for ks in range(2, 13):
            if t_w % ks == 0:
                grid.append(mg.fit_pipeline(dataclasses.replace(dflt, k_splits=ks, sum_in_kernel=True), t_w))
    if split_cluster and m <= 64:
        for ks in range(2, mg.MAX_CLUSTER + 1):
            if t_w % ks == 0:
                grid.append(mg.fit_pipeline(dataclasses.replace(dflt, k_splits=ks, split_cluster=True, cluster=1), t_w))
    for cfg in grid:
        if m % cfg.tile_m and m > cfg.tile_m:
            continue
        if t_w % cfg.k_splits or n % (cfg.cta_n() * cfg.cluster):
            continue
        if cfg.chain and (t_w // cfg.k_splits * cfg.k_steps) % cfg.stages:
            continue
        try:
            t = time_op(lambda x, st, wp, s, cfg=cfg: mg.ternary_matmul_mgpu(
                x, wp, s, step=st, bias=None, out_dtype=jnp.bfloat16, config=cfg), args, samples=7, sustain=sustain)
        except Exception as e:  # noqa: BLE001 - report and go on (SMEM overflow etc.)
            if "shared memory" not in str(e):
                raise
            print(f"  {cfg}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        x0, st0, wp0, s0 = args[0]
        got = mg.ternary_matmul_mgpu(x0, wp0, s0, step=st0, bias=None, out_dtype=jnp.bfloat16, config=cfg)
        err = _rel(got, ref)
        print(f"  tn={cfg.tile_n} tm={cfg.tile_m} st={cfg.stages} w={cfg.grid_tile_width} "
              f"mn={int(cfg.grid_minor_n)} ks={cfg.k_splits} ov={int(cfg.overlap)} c={cfg.cluster} "
              f"kst={cfg.k_steps} chain={int(cfg.chain)} pp={int(cfg.pingpong)} wgs={cfg.compute_wgs}"
              f"{' sum=kernel' if cfg.sum_in_kernel else ''}{' sum=cluster' if cfg.split_cluster else ''}"
              f"{' (default)' if cfg == dflt else ''}: "
              f"{t * 1e6:8.1f} us {2 * m * k * n / t / 1e12:6.0f} TF  {base / t:5.2f}x  err {err:.1e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in FLUX_SHAPES))
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--check-ms", default="4608", help="M values whose rows also report errors")
    ap.add_argument("--xla-path", action="store_true", help="also time the xla backend (unpack + dot)")
    ap.add_argument("--sweep", default="", help="'int8' or 'bf16': tile sweep of the mosaic_gpu kernel")
    ap.add_argument("--defaults-only", action="store_true",
                    help="with --sweep: time only each default config and its twin (ping-pong, or 2 warpgroups)")
    ap.add_argument("--sum-in-kernel", action="store_true",
                    help="with --sweep, M <= 64: also the default's tiles at every split count, summed in the kernel")
    ap.add_argument("--split-cluster", action="store_true",
                    help="with --sweep, M <= 64: also the default's tiles at 2-8 splits, summed in a cluster")
    ap.add_argument("--once", action="store_true", help="run each kernel once (e.g. with MOSAIC_GPU_DUMP_TO)")
    ap.add_argument("--sustain", type=float, default=0.0,
                    help="seconds of back-to-back load per op, timed in its steady power state (see time_op)")
    ap.add_argument("--clocks", action="store_true", help="report mean SM clock and power per op (nvidia-smi)")
    ap.add_argument("--timeline", action="store_true",
                    help="also list each op's GPU kernels: launches per call, median us (jax.profiler)")
    a = ap.parse_args()
    ms = [int(v) for v in a.ms.split(",")]
    check_ms = {int(v) for v in a.check_ms.split(",") if v}
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, "
          f"{datetime.date.today().isoformat()}")
    print(f"backend: {pk.explain_backend(a.backend)}")
    if a.sweep:
        for k, n in shapes:
            for m in ms:
                sweep(m, k, n, a.sweep, a.sustain, a.defaults_only, a.sum_in_kernel, a.split_cluster)
        return
    backend = pk.choose_backend(a.backend)
    if a.once:
        for k, n in shapes:
            for m in ms:
                d = make_inputs(m, k, n, 1)[0]
                ref = pk.ternary_matmul_ref(d["x"], d["wp"], d["scale"], out_dtype=jnp.float32)
                for act in ("native", "int8"):
                    y = pk.ternary_matmul(d["x"], d["wp"], d["scale"], backend=backend, activations=act)
                    print(f"{k}->{n} M={m} {act}: rel err {_rel(y, ref):.1e}", flush=True)
        return
    clocks = ClockSampler() if a.clocks else None
    if a.sustain:
        print(f"timing: steady state, {a.sustain:g} s of back-to-back load per op")
    print(HEADER + (CLOCK_HEADER if clocks else ""), flush=True)
    rows = []
    for k, n in shapes:
        for m in ms:
            r = bench_shape(m, k, n, backend, check=not a.no_check and m in check_ms, xla_path=a.xla_path,
                            sustain=a.sustain, clocks=clocks, requested=a.backend, timeline=a.timeline)
            rows.append(r)
            print(fmt_row(r), flush=True)
            for key in ("xla", "wo", "a8", "a8k", "q"):
                if key + "_kernels" in r:
                    print(f"      {key:>3} kernels: " + (" + ".join(
                        f"{name[:40]} {per:g}x{us:.2f}" for name, per, us in r[key + "_kernels"]) or "(no GPU timeline)"))


if __name__ == "__main__":
    main()
