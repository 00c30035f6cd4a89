"""The benchmark scripts run (tiny settings) and report what they claim to."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str):
    """benchmarks/<name>.py as a module under a private name. benchmarks/ stays off sys.path: its
    kernels.py would shadow the `kernels` package that transformers imports in this process."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


e2e = _bench("e2e")


@pytest.mark.parametrize("name, hlo_op, kind", [
    # kernel names from an H100 trace of the 1024^2 step (RESULTS.md)
    ("nvjet_sm90_tst_176x128_64x5_1x2_h_bz_TNN", "command_buffer_151", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1",
     "command_buffer_151", "attention"),
    ("memcpy128", "command_buffer_65", "copy"),
    ("kernel_mosaic_gpu_kernel", "command_buffer_129", "pallas"),
    ("input_concatenate_fusion_3", "command_buffer_151", "fusion/other"),
    ("triton_softmax_33", "command_buffer_151", "fusion/other"),
])
def test_kernel_kind(name, hlo_op, kind):
    assert e2e.kernel_kind(name, hlo_op) == kind


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_e2e_smoke_with_trace(tmp_path):
    out = tmp_path / "rows.json"
    proc = _run(["benchmarks/e2e.py", "--smoke", "--variants", "bf16", "--res", "64", "--batch", "1",
                 "--steps", "2", "--repeats", "1", "--trace", "5", "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (row,) = json.loads(out.read_text())
    assert row["second_prompt_retraced"] == 0
    k = row["kernels"]
    assert k["wall_ms_per_step"] > 0
    # the CPU trace has no GPU kernels: the row says so and lists what the trace held instead
    assert k["gpu_busy_ms_per_step"] == 0 and k["planes"]
    assert "GPU time per step" in proc.stdout


def test_quality_transformer_only_variant(tmp_path):
    """A transformer-only folder (the shipped distilled model) runs with the rest from --model."""
    out = tmp_path / "q.json"
    proc = _run(["benchmarks/quality.py", "--model", "flaxflux/refmodel/model", "--variants",
                 "d=flaxflux/refmodel/distilled", "--limit", "6", "--images", "1", "--steps", "4",
                 "--workers", "1", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    v = json.loads(out.read_text())["variants"]["d"]
    assert v["path"] == "flaxflux/refmodel/distilled" and v["images"] == 6


def test_quality_default_variants():
    """With the shipped reference model the default compares bf16, both absmean variants and the
    shipped distilled transformer; another model gets the built-in three only."""
    quality = _bench("quality")

    names = [n for n, _ in quality.parse_variants(quality.default_variants(str(ROOT / "flaxflux/refmodel/model")))]
    assert names == ["bf16", "ternary-tensor", "ternary-channel", "distilled"]
    names = [n for n, _ in quality.parse_variants(quality.default_variants(str(ROOT / "out" / "other")))]
    assert names == ["bf16", "ternary-tensor", "ternary-channel"]


def test_kernels_time_op_sustained():
    import jax.numpy as jnp
    import numpy as np
    kernels = _bench("kernels")
    rng = np.random.default_rng(0)
    small = [(jnp.asarray(rng.standard_normal((64, 64), np.float32)),)]
    big = [(jnp.asarray(rng.standard_normal((768, 768), np.float32)),)]
    window: list = []
    t_small = kernels.time_op(lambda a: a @ a, small, sustain=0.6, window=window)
    t_big = kernels.time_op(lambda a: a @ a, big, sustain=0.6)
    (t0, t1), = window
    assert t1 - t0 >= 0.4                      # the timed phase is the last 2/3 of the load
    assert 0 < t_small < t_big / 20            # 1728x the flops
    # The same input set twice per iteration: two calls, neither merged (CSE) nor dropped.
    t_twice = kernels.time_op(lambda a: a @ a, big * 2, sustain=0.6)
    assert 0.6 < t_twice / t_big < 1.6, (t_twice, t_big)


def test_kernels_summarize_kernels():
    from types import SimpleNamespace as NS
    kernels = _bench("kernels")
    ev = lambda name, us: NS(name=name, duration_ns=us * 1e3)
    gpu = NS(name="/device:GPU:0", lines=[
        NS(name="Stream #14", events=[ev("mosaic", 4.0), ev("sum", 1.0), ev("mosaic", 5.0), ev("sum", 1.5),
                                      ev("mosaic", 6.0), ev("sum", 2.0), ev("sum", 2.5), ev("memcpy", 9.0)]),
        NS(name="Stream #15", events=[ev("sum", 3.0), ev("sum", 3.5)])])
    host = NS(name="/host:CPU", lines=[NS(name="python", events=[ev("mosaic", 1.0)] * 9)])
    rows = kernels.summarize_kernels([host, gpu], calls=3)
    # sum: 6 events over 3 calls, median of 1.0-3.5; mosaic: 3 (GPU plane only); memcpy: < once a call
    assert rows == [("sum", 2.0, 2.25), ("mosaic", 1.0, 5.0)]


def test_kernels_table_on_cpu():
    out = _run(["benchmarks/kernels.py", "--ms", "16", "--shapes", "256x512", "--backend", "xla",
                "--sustain", "0.3"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "steady state, 0.3 s" in out.stdout
    row = [line for line in out.stdout.splitlines() if line.strip().startswith("256->512")]
    assert len(row) == 1 and row[0].count("x |") >= 2, out.stdout
