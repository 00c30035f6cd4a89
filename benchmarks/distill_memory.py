"""Memory plan for distilling FLUX.1-dev: per-device memory of the compiled train step.

    python benchmarks/distill_memory.py                          # meshes 1, 2, 4, 8; 1024^2 and 512^2
    python benchmarks/distill_memory.py --devices 8 --res 1024 --per-device-batch 1 2 --json plan.json

The train step of `flaxflux distill` (flaxflux.distill.build_trainer: the fp32 student with QAT
block linears, its AdamW state, the bf16 teacher, FSDP over one "data" axis, the batch split
along it, block activations recomputed in the backward pass) is lowered for the full-size
FLUX.1-dev transformer over abstract inputs (no weights exist anywhere) and compiled for a mesh
of forced CPU host devices; `memory_analysis()` of the compiled SPMD program gives the bytes one
device holds. The CPU compiler's buffer assignment stands in for the GPU's: the resident part
(arguments: parameter, optimizer and teacher shards, the batch) is exact; the temporaries
(activations, gathered weights, gradients) differ by the backends' fusion choices.

Per-device peak = arguments + temporaries + outputs - aliased (the donated train state is
updated in place, so its outputs reuse the arguments' buffers).

Estimated time per step, from two counts: compute = FLOPs of one step (teacher forward, student
forward, the remat recompute and the backward = 5 forwards' matmul FLOPs; benchmarks/e2e.py's
count) at the bf16 throughput the project's own forward reaches on the GPU (RESULTS.md: 523
TFLOP/s on an H100 at 1024^2); collectives = the bytes FSDP moves per device (the teacher's
layers gathered once, the student's fp32 layers gathered in the forward and again in the remat
backward, its fp32 gradients reduce-scattered, each (n-1)/n of the total) at an NCCL bus
bandwidth of 360 GB/s per H200 (NVLink 4: 450 GB/s each way). XLA overlaps the two when it can:
the step takes between max(compute, collectives) and their sum.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

MAX_DEVICES = 8
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={MAX_DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import flops_per_step  # noqa: E402
from flaxflux import distill as D  # noqa: E402
from flaxflux import sampler  # noqa: E402
from flaxflux.config import FLUX_DEV  # noqa: E402
from flaxflux.transformer import FluxTransformer  # noqa: E402

H200_GB = 141.0          # HBM per H200 (nvidia-smi: 143,771 MiB; JAX may use ~75-90 % by default)
FORWARD_TFLOPS = 523.0   # the project's bf16 FLUX.1-dev forward, H100, RESULTS.md (e2e.py)
FORWARDS_PER_STEP = 5    # teacher fwd + student fwd + remat recompute + backward (2 fwd)
BUS_GBPS = 360.0         # NCCL all-gather / reduce-scatter bus bandwidth assumed per H200
SCHEDULER = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
T5_LEN = 512


def plan(n_dev: int, res: int, per_device_batch: int, remat: bool = True) -> dict:
    mesh = D.make_mesh(jax.devices()[:n_dev])
    batch = per_device_batch * n_dev
    cfg = D.DistillConfig(batch=batch, remat=remat)
    teacher_gd, teacher_abs = nnx.split(nnx.eval_shape(lambda: FluxTransformer(FLUX_DEV, dtype=jnp.bfloat16,
                                                                                rngs=nnx.Rngs(0))))
    side = sampler.latent_size(res, res)
    tokens = (side[0] // 2) * (side[1] // 2)
    tr = D.build_trainer(teacher_gd, teacher_abs, cfg, side, sampler.shift_mu(tokens, SCHEDULER), mesh)
    teacher_in = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), teacher_abs,
                              tr.teacher_sh)
    shapes = {"idx": ((batch,), jnp.int32), "x0": ((batch, tokens, 64), jnp.bfloat16),
              "txt": ((batch, T5_LEN, FLUX_DEV.context_in_dim), jnp.bfloat16),
              "pooled": ((batch, FLUX_DEV.vec_in_dim), jnp.bfloat16), "g": ((batch,), jnp.float32),
              # on-policy rows (cfg.onpolicy > 0, the default)
              "xs": ((batch, tokens, 64), jnp.bfloat16), "ts": ((batch,), jnp.float32), "on": ((batch,), jnp.bool_)}
    shapes = {k: v for k, v in shapes.items() if k in tr.batch_sh}
    batch_in = {k: jax.ShapeDtypeStruct(s, dt, sharding=tr.batch_sh[k]) for k, (s, dt) in shapes.items()}
    t0 = time.perf_counter()
    lowered = tr.train.lower(tr.state_abs, teacher_in, batch_in)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    gb = lambda b: b / 1e9  # noqa: E731
    arg, tmp, out, alias = (gb(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "temp", "output", "alias"))

    def shard_bytes(tree) -> float:
        return gb(sum(jnp.dtype(x.dtype).itemsize * _prod(x.sharding.shard_shape(x.shape))
                      for x in jax.tree.leaves(tree)))

    n_params = sum(_prod(x.shape) for x in jax.tree.leaves(teacher_abs))
    # the student's rollouts for the on-policy rows, amortized: forwards per batch row and step
    rollout_fwd = cfg.rollouts() * cfg.sample_steps / cfg.rollout_every / batch if cfg.onpolicy > 0 else 0.0
    step_tflop = (FORWARDS_PER_STEP + rollout_fwd) * flops_per_step(per_device_batch, res, T5_LEN) / 1e12
    teacher_total = gb(sum(jnp.dtype(x.dtype).itemsize * _prod(x.shape) for x in jax.tree.leaves(teacher_abs)))
    student_total = gb(sum(jnp.dtype(x.dtype).itemsize * _prod(x.shape) for x in jax.tree.leaves(tr.state_abs["params"])))
    comm_gb = (teacher_total + 3 * student_total) * (n_dev - 1) / n_dev
    return {
        "devices": n_dev, "res": res, "per_device_batch": per_device_batch, "global_batch": batch, "remat": remat,
        "params": n_params, "compile_s": round(compile_s, 1), "rollout_forwards": rollout_fwd,
        "student_params_gb": shard_bytes(tr.state_abs["params"]), "opt_state_gb": shard_bytes(tr.state_abs["opt"]),
        "teacher_gb": shard_bytes(teacher_in), "batch_gb": shard_bytes(batch_in),
        "argument_gb": arg, "temp_gb": tmp, "output_gb": out, "alias_gb": alias,
        "peak_gb": arg + tmp + out - alias,
        "tflop_per_device": step_tflop, "compute_s": step_tflop / FORWARD_TFLOPS,
        "comm_gb": comm_gb, "comm_s": comm_gb / BUS_GBPS,
    }


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--res", nargs="+", type=int, default=[1024, 512])
    ap.add_argument("--per-device-batch", nargs="+", type=int, default=[1])
    ap.add_argument("--no-remat", action="store_true")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    if max(args.devices) > MAX_DEVICES:
        ap.error(f"at most {MAX_DEVICES} forced host devices")
    rows = []
    for res in args.res:
        for pdb in args.per_device_batch:
            for n in args.devices:
                r = plan(n, res, pdb, remat=not args.no_remat)
                rows.append(r)
                fits = "fits" if r["peak_gb"] <= H200_GB else "does NOT fit"
                print(f"{n} device(s) {res}^2 batch {pdb}/device: peak {r['peak_gb']:.1f} GB/device ({fits} in an "
                      f"H200's {H200_GB:.0f} GB)  [compile {r['compile_s']} s]", flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=2)
    print(f"\nFLUX.1-dev ({rows[0]['params'] / 1e9:.2f} B parameters), distill train step, FSDP over 'data', "
          f"remat {'on' if rows[0]['remat'] else 'off'}; GB per device from memory_analysis() of the compiled step "
          f"(jax {jax.__version__}, forced CPU devices)")
    print("| devices | res | batch / device | student fp32 | AdamW state | teacher bf16 | arguments | "
          "temporaries | peak | fits 141 GB H200 | TFLOP / device / step | compute s | collectives GB / s | "
          "est. s / step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['devices']} | {r['res']} | {r['per_device_batch']} | {r['student_params_gb']:.1f} | "
              f"{r['opt_state_gb']:.1f} | {r['teacher_gb']:.1f} | {r['argument_gb']:.1f} | {r['temp_gb']:.1f} | "
              f"**{r['peak_gb']:.1f}** | {'yes' if r['peak_gb'] <= H200_GB else 'no'} | {r['tflop_per_device']:.0f} | "
              f"{r['compute_s']:.2f} | {r['comm_gb']:.0f} / {r['comm_s']:.2f} | "
              f"{max(r['compute_s'], r['comm_s']):.2f}-{r['compute_s'] + r['comm_s']:.2f} |")
    print(f"\ncompute s: {FORWARDS_PER_STEP} + {rows[0]['rollout_forwards']:.2f} (the on-policy rollouts, amortized) "
          f"forwards' matmul FLOPs per device at {FORWARD_TFLOPS:.0f} TFLOP/s (the "
          f"project's bf16 forward on an H100); collectives: FSDP bytes per device at {BUS_GBPS:.0f} GB/s; "
          "est. s / step: from full overlap to none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
