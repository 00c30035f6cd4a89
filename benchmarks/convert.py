"""Convert a full-size synthetic FLUX.1-dev transformer: peak RSS, throughput, output sizes.

    python benchmarks/convert.py --dir /tmp/fluxbench          # writes ~24 GB there, then converts

1. Writes FLUX.1-dev's transformer/ in the diffusers layout (config.json, three shards of at most
   9.98 GB, index) with random bf16 weights of the real shapes (skipped if already there).
2. Runs `flaxflux convert SRC OUT --quantize none` and `--quantize ternary` as child processes,
   each timed, with its peak RSS from the kernel's accounting (wait4's ru_maxrss).
3. Prints a table (and JSON with --json) with the sizes `flaxflux info` reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from flaxflux import FLUX_DEV, naming
from flaxflux.safetensors_io import SafetensorsWriter

SHARD_LIMIT = 9_980_000_000  # FLUX.1-dev's shards are 9.98 / 9.95 / 3.87 GB


def random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random bf16 weights of magnitude ~1e-3..3e-2 and random sign, drawn as bit patterns
    (16 random bits per value are ~10x faster than drawing normals and converting)."""
    r = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    exponent = (117 + ((r >> 7) & 3)).astype(np.uint16)  # 2^-10 .. 2^-7
    return ((r & 0x807F) | (exponent << 7)).view(ml_dtypes.bfloat16)


def write_synthetic(folder: Path, seed: int = 0) -> int:
    """FLUX.1-dev's diffusers transformer folder with random weights; returns bytes written."""
    if (folder / "diffusion_pytorch_model.safetensors.index.json").exists():
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    folder.mkdir(parents=True, exist_ok=True)
    from flaxflux.loading import abstract_model, expected_tensors
    from flaxflux.transformer import FluxTransformer
    from flax import nnx

    bfl_shapes = {k: v.shape for k, v in
                  expected_tensors(abstract_model(lambda: FluxTransformer(FLUX_DEV, rngs=nnx.Rngs(0)))[-1]).items()}
    shapes = {}
    for t in naming.tensors(FLUX_DEV):
        rows = bfl_shapes[t.bfl][0]
        parts = len(t.diffusers)
        if parts == 1:
            sizes = [rows]
        elif t.diffusers[-1].endswith(("proj_mlp.weight", "proj_mlp.bias")):
            h = FLUX_DEV.hidden_size
            sizes = [h, h, h, rows - 3 * h]
        else:
            sizes = [rows // parts] * parts
        for name, n in zip(t.diffusers, sizes):
            shapes[name] = (n, *bfl_shapes[t.bfl][1:])
    shards, size = [[]], 0
    for name in sorted(shapes):
        nbytes = 2 * int(np.prod(shapes[name]))
        if shards[-1] and size + nbytes > SHARD_LIMIT:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for k, names in enumerate(shards, start=1):
        fname = f"diffusion_pytorch_model-{k:05d}-of-{len(shards):05d}.safetensors"
        w = SafetensorsWriter(folder / fname, [(n, "BF16", shapes[n]) for n in names], {"format": "pt"})
        for n in names:
            w.write(n, random_bf16(rng, shapes[n]))
            weight_map[n] = fname
        w.close()
        total += w.nbytes
        print(f"wrote {fname}: {w.nbytes / 1e9:.2f} GB", flush=True)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({**FLUX_DEV.to_diffusers(), "_diffusers_version": "0.30.0"}))
    return total


def run_child(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS in bytes, exit code) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - t0, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/fluxbench", type=Path)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the converted folders")
    args = ap.parse_args()
    src = args.dir / "transformer"
    t0 = time.perf_counter()
    src_bytes = write_synthetic(src)
    print(f"source: {src_bytes / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s to prepare)", flush=True)
    rows = []
    for quant in ("none", "ternary"):
        out = args.dir / f"out-{quant}"
        shutil.rmtree(out, ignore_errors=True)
        # Drop the source from the page cache where we may (root): each run reads from disk alike.
        subprocess.run(["sh", "-c", "sync; echo 1 > /proc/sys/vm/drop_caches"], stderr=subprocess.DEVNULL)
        wall, rss, rc = run_child([sys.executable, "-m", "flaxflux.cli", "convert", str(src), str(out),
                                   "--quantize", quant, "--no-progress"])
        if rc:
            print(f"convert --quantize {quant} failed with exit code {rc}")
            return rc
        info = json.loads(subprocess.run([sys.executable, "-m", "flaxflux.cli", "info", str(out), "--json"],
                                         capture_output=True, text=True, check=True).stdout)["transformer"]
        rows.append({"quantize": quant, "seconds": wall, "peak_rss_gb": rss / 1e9,
                     "throughput_mb_s": src_bytes / wall / 1e6, "disk_gb": info["bytes_on_disk"] / 1e9,
                     "memory_gb": info["bytes_in_memory"] / 1e9, "disk_ratio": info["disk_ratio_vs_bf16"]})
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    machine = f"{platform.node()}: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    print(f"\nFLUX.1-dev transformer, {src_bytes / 1e9:.2f} GB bf16 source, {machine}")
    print("| --quantize | time (s) | input MB/s | peak RSS (GB) | on disk (GB) | x smaller | resident weights (GB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quantize']} | {r['seconds']:.0f} | {r['throughput_mb_s']:.0f} | {r['peak_rss_gb']:.2f} | "
              f"{r['disk_gb']:.3f} | {r['disk_ratio']:.2f} | {r['memory_gb']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"source_bytes": src_bytes, "machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
