"""Full-size FLUX.1-dev transformer on the GPU: compile time, 50-step latency, peak memory.

    python benchmarks/e2e.py                                    # all variants, 1024^2 and 512^2, batch 1
    python benchmarks/e2e.py --variants bf16 --res 1024 --batch 1 4 --repeats 3 --json out.json

Weights are random (FLUX.1-dev's real ones cannot be downloaded here), generated on the device
tensor by tensor and fed through the real loader: the bf16 model through the dense codec, the
ternary one through quantize-on-load (each layer ternarized and packed as it arrives, so no bf16
copy of the model ever exists). Every variant runs in its own process so its peak memory is its
own. Prompt embeddings are random tensors of T5-XXL / CLIP-L's shapes (the transformer alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib

VARIANTS = ("bf16", "ternary", "ternary-a8")


def flops_per_step(batch: int, res: int, txt_len: int = 512) -> float:
    """Matmul FLOPs of one FLUX.1-dev forward (linears + attention; modulations counted at M=1)."""
    d, mlp, l_img = 3072, 12288, (res // 16) ** 2
    l = l_img + txt_len
    double = 2 * (l_img + txt_len) * d * (3 * d + d + 2 * mlp) + 2 * 2 * (6 * d * d)
    single = 2 * l * d * (3 * d + mlp) + 2 * l * (d + mlp) * d + 2 * 3 * d * d
    attn = 4 * l * l * d
    return batch * (19 * (double + attn) + 38 * (single + attn))


def child(variant: str, res: int, batch: int, steps: int, repeats: int, smoke: bool = False,
          backend: str = "auto") -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from flaxflux import FLUX_DEV, sampler
    from flaxflux.loading import abstract_model, expected_tensors, load_from_source
    from flaxflux.ternary import count_parameters
    from flaxflux.transformer import FluxTransformer

    dev = jax.devices()[0]
    cfg = FLUX_DEV
    if smoke:  # the same code on a tiny transformer, to check the script on a CPU
        from flaxflux import FluxConfig
        cfg = FluxConfig(hidden_size=128, num_heads=2, depth=1, depth_single_blocks=2, axes_dim=(8, 28, 28))
    shapes = expected_tensors(abstract_model(lambda: FluxTransformer(cfg, rngs=nnx.Rngs(0)))[-1])

    class RandomSource:
        """FLUX.1-dev's tensors as random bf16 arrays made on the device, one at a time."""
        description = "random FLUX.1-dev weights"

        def keys(self):
            return list(shapes)

        def shape(self, name):
            return tuple(shapes[name].shape)

        def dtype_tag(self, name):
            return "BF16"

        def origin(self, name):
            return name

        def get(self, name):
            key = jax.random.fold_in(jax.random.key(0), zlib.crc32(name.encode()))
            x = jax.random.normal(key, shapes[name].shape, jnp.bfloat16) * jnp.bfloat16(0.02)
            return x + 1 if name.endswith(".scale") else x  # RMS norm scales near 1

    t0 = time.perf_counter()
    quant = None if variant == "bf16" else "ternary"
    model = load_from_source(RandomSource(), cfg, {"quantization": "none"}, jnp.bfloat16, quantize=quant)
    if quant:
        import pallas_kernels
        from flaxflux.ternary import set_ternary_options
        set_ternary_options(model, activations="int8" if variant == "ternary-a8" else "native", backend=backend)
        backend = f"{backend}->{pallas_kernels.choose_backend(backend)}"
    jax.block_until_ready(nnx.state(model))
    load_s = time.perf_counter() - t0
    weights = (dev.memory_stats() or {"bytes_in_use": float("nan")})["bytes_in_use"]  # None on CPU
    counts = count_parameters(model) if quant else None
    graphdef, state = nnx.split(model)
    del model

    h = w = res // 8
    rng = np.random.default_rng(0)

    def inputs(seed):
        r = np.random.default_rng(seed)
        return (sampler.initial_noise(seed, batch, h, w), sampler.image_ids(batch, h, w),
                jnp.asarray(r.standard_normal((batch, 512, 4096)), jnp.bfloat16),
                jnp.zeros((batch, 512, 3), jnp.float32), jnp.asarray(r.standard_normal((batch, 768)), jnp.bfloat16),
                jnp.full((batch,), 3.5, jnp.float32))

    sigmas = jnp.asarray(sampler.sigma_schedule(steps, (h // 2) * (w // 2)))
    args = inputs(1)
    t0 = time.perf_counter()
    compiled = sampler.denoise.lower(graphdef, state, *args, sigmas, progress=False).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(state, *args, sigmas))  # warm-up
    times = []
    for r in range(repeats):
        a = inputs(2 + r)
        jax.block_until_ready(a)
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(state, *a, sigmas))
        times.append(time.perf_counter() - t0)
    # A second prompt through the normal jitted entry point must not trace again.
    traces = sampler.TRACES["denoise"]
    jax.block_until_ready(sampler.denoise(graphdef, state, *inputs(10), sigmas))
    traces_first = sampler.TRACES["denoise"] - traces
    jax.block_until_ready(sampler.denoise(graphdef, state, *inputs(11), sigmas))
    retraced = sampler.TRACES["denoise"] - traces - traces_first
    stats = dev.memory_stats() or {"peak_bytes_in_use": float("nan")}
    med = float(np.median(times))
    return {"variant": variant, "backend": backend if quant else "xla", "res": res, "batch": batch, "steps": steps, "device": dev.device_kind,
            "jax": jax.__version__, "attention": os.environ.get("FLAXFLUX_ATTENTION", "auto"),
            "load_s": load_s, "compile_s": compile_s, "latency_s": med, "ms_per_step": 1e3 * med / steps,
            "tflops": flops_per_step(batch, res) * steps / med / 1e12, "runs_s": times,
            "weights_gb": weights / 1e9, "peak_gb": stats["peak_bytes_in_use"] / 1e9,
            "second_prompt_retraced": retraced, "ternary_params": counts and counts["ternary_params"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--res", nargs="+", type=int, default=[1024, 512])
    ap.add_argument("--batch", nargs="+", type=int, default=[1])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write all rows here")
    ap.add_argument("--smoke", action="store_true", help="tiny transformer (checks the script on a CPU)")
    ap.add_argument("--backends", nargs="+", default=["auto"], help="ternary_matmul backends to compare")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        v, res, batch, backend = args.child.split(",")
        print("RESULT " + json.dumps(child(v, int(res), int(batch), args.steps, args.repeats, args.smoke, backend)),
              flush=True)
        return 0
    rows = []
    jobs = [(v, res, batch, be) for v in args.variants for res in args.res for batch in args.batch
            for be in (args.backends if v != "bf16" else ["xla"])]
    for v, res, batch, be in jobs:
        cmd = [sys.executable, __file__, "--child", f"{v},{res},{batch},{be}", "--steps", str(args.steps),
               "--repeats", str(args.repeats)] + (["--smoke"] if args.smoke else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{v} {res} b{batch}: FAILED\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}", flush=True)
            continue
        row = json.loads(line[0][7:])
        rows.append(row)
        print(f"{v:>10} {row['backend']:>16} {res:>5}^2 b{batch}: {row['ms_per_step']:7.1f} ms/step  {row['latency_s']:6.2f} s/"
              f"{args.steps}  compile {row['compile_s']:5.1f} s  weights {row['weights_gb']:5.2f} GB  "
              f"peak {row['peak_gb']:5.2f} GB  retraced {row['second_prompt_retraced']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if rows:
        print(f"\n{rows[0]['device']}, jax {rows[0]['jax']}, {args.steps} steps, median of {args.repeats}")
        print("| variant | backend | res | batch | ms/step | 50-step s | vs bf16 | TFLOP/s | compile s | weights GB | peak GB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        base = {(r["res"], r["batch"]): r["latency_s"] for r in rows if r["variant"] == "bf16"}
        for r in rows:
            ratio = r["latency_s"] / base[(r["res"], r["batch"])] if (r["res"], r["batch"]) in base else float("nan")
            print(f"| {r['variant']} | {r['backend']} | {r['res']} | {r['batch']} | {r['ms_per_step']:.1f} | {r['latency_s']:.2f} | "
                  f"{ratio:.2f}x | {r['tflops']:.0f} | {r['compile_s']:.1f} | {r['weights_gb']:.2f} | {r['peak_gb']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
