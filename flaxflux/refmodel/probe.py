"""GPU speed probe of the training recipe at the reference sizes: steps/s of every stage and the
projected wall time of the full run. Uses freshly rendered scenes (the real renderer and worker
pool), real tokenizers and caption ids, and random-init models (speed does not depend on weights).

    python -m flaxflux.refmodel.probe [--steps 200] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _timed_steps(step, state, args, n: int) -> tuple[float, float, object]:
    """(compile + first step seconds, steady steps/s over n steps, final state)."""
    import jax
    import jax.numpy as jnp

    t = time.perf_counter()
    state, loss = step(state, jnp.asarray(0, jnp.int32), *args)
    jax.block_until_ready(loss)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(1, n + 1):
        state, loss = step(state, jnp.asarray(i, jnp.int32), *args)
    float(loss)
    rate = n / (time.perf_counter() - t)
    if not jnp.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss}")
    return first, rate, state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="reference")
    p.add_argument("--steps", type=int, default=200, help="timed steps per stage (after the compile)")
    p.add_argument("--render", type=int, default=16384, help="images rendered for the throughput figure")
    p.add_argument("--extra-batch", type=int, nargs="*", default=[512], help="other transformer batches to time")
    p.add_argument("--budget", type=float, default=150.0, help="seconds after which the extra batches are skipped")
    p.add_argument("--skip-vae", action="store_true", help="time only the transformer stages (and sampling)")
    p.add_argument("--no-sample", action="store_true", help="skip the sampling-speed figure")
    p.add_argument("--nondeterministic", action="store_true",
                   help="leave XLA's deterministic GPU ops off (and the attention implementation to flaxflux)")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    if not args.nondeterministic:
        from .train import gpu_run_settings

        gpu_run_settings()  # as the recipe runs

    import jax
    import jax.numpy as jnp
    import numpy as np

    from . import data as datalib
    from . import tokenizers as toklib
    from . import train as T
    from .config import PRESETS

    r = PRESETS[args.preset]
    s = r.sizes
    dev = jax.devices()[0]
    info: dict = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
                  "cpus": os.cpu_count(), "preset": args.preset, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                  "attention": os.environ.get("FLAXFLUX_ATTENTION", "auto")}
    print(json.dumps(info), flush=True)
    wall0 = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        tok = toklib.build_tokenizers(tmp, t5_max_length=s.t5_max_length, clip_max_length=s.clip_max_length)
        vocab = T.Vocab(t5=T.t5_vocab_size(tok["t5"]), clip=tok["clip"])
        clip_tok, t5_tok = toklib.load(tmp)

    t = time.perf_counter()
    images, captions, _ = datalib.render_examples(r.seed, datalib.TRAIN_STREAM, 0, args.render, s.image_size)
    info["render_images_per_s"] = round(args.render / (time.perf_counter() - t), 1)
    print(f"render: {info['render_images_per_s']} img/s ({args.render} images, {os.cpu_count()} cpus, "
          "incl. pool start)", flush=True)

    if not args.skip_vae:
        m = T.models(r, vocab)
        vae = m["vae"]
        images_dev = jnp.asarray(images)
        vae_state = T.fresh_state(T.vae_layout(vae).ravel(vae.init(0)), r.vae)
        first, rate, vae_state = _timed_steps(T.vae_step_fn(vae, r.vae, r.vae_kl, r.vae_edge, r.seed), vae_state,
                                              (images_dev,), args.steps)
        info["vae"] = {"compile_s": round(first, 1), "steps_per_s": round(rate, 2), "batch": r.vae.batch}
        print(f"vae: compile {first:.1f} s, {rate:.2f} steps/s at batch {r.vae.batch}", flush=True)

        enc = T.encode_fn(vae)
        bs = 512
        chunk = images_dev[:bs]
        t = time.perf_counter()
        jax.block_until_ready(enc(vae_state["params"], chunk))
        enc_first = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(8):
            out = enc(vae_state["params"], chunk)
        np.asarray(out)
        info["encode_images_per_s"] = round(8 * bs / (time.perf_counter() - t), 1)
        print(f"encode: compile {enc_first:.1f} s, {info['encode_images_per_s']} img/s", flush=True)

    table, idx = datalib.caption_table(captions)
    t5_ids, clip_ids = datalib.tokenize_table(table, clip_tok, t5_tok, s.t5_max_length, s.clip_train_length)
    n = len(images)
    data = {"latents": jnp.asarray(np.random.default_rng(0).standard_normal((n, s.latent_size, s.latent_size, 16)),
                                   jnp.float16),
            "caption_idx": jnp.asarray(idx), "t5_ids": jnp.asarray(t5_ids), "clip_ids": jnp.asarray(clip_ids)}
    fm = T.flow_models(r, vocab)
    state = T.phase1_init(r, vocab)()
    first, rate, state = _timed_steps(T.flow_step_fn(fm, r), state, (data,), args.steps)
    info["transformer"] = {"compile_s": round(first, 1), "steps_per_s": round(rate, 2), "batch": r.transformer.batch}
    print(f"transformer: compile {first:.1f} s, {rate:.2f} steps/s at batch {r.transformer.batch}", flush=True)

    teacher = state["ema"]
    teacher_flat, flat = T.flow_layouts(fm)
    dstate = T.fresh_state(flat.ravel(teacher_flat.unravel(teacher)["transformer"]), r.distill)
    first, rate, dstate = _timed_steps(T.distill_step_fn(fm, r), dstate, (data, teacher), args.steps)
    info["distill"] = {"compile_s": round(first, 1), "steps_per_s": round(rate, 2), "batch": r.distill.batch}
    print(f"distill: compile {first:.1f} s, {rate:.2f} steps/s at batch {r.distill.batch}", flush=True)

    # sampling speed of the jitted pipeline path (benchmark planning): 28 Euler steps, batch 64
    from .. import sampler

    if not args.no_sample:
        flux = fm[0].module(teacher_flat.unravel(teacher)["transformer"])
        from flax import nnx

        gd, st = nnx.split(flux)
        b = 64
        lat = s.latent_size
        txt = jnp.zeros((b, s.t5_max_length, s.t5_d_model), jnp.bfloat16)
        args_ = (sampler.initial_noise(0, b, lat, lat), sampler.image_ids(b, lat, lat), txt,
                 jnp.zeros((b, s.t5_max_length, 3), jnp.float32), jnp.zeros((b, s.clip_hidden), jnp.bfloat16),
                 jnp.full((b,), 3.5, jnp.float32), jnp.asarray(sampler.sigma_schedule(28, s.image_tokens)))
        t = time.perf_counter()
        jax.block_until_ready(sampler.denoise(gd, st, *args_))
        sfirst = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(sampler.denoise(gd, st, *args_))
        info["sample_images_per_s_28_steps"] = round(b / (time.perf_counter() - t), 1)
        print(f"sampling: compile {sfirst:.1f} s, {info['sample_images_per_s_28_steps']} img/s (28 steps, batch {b})",
              flush=True)

    # a larger transformer batch, if the time allows: is the GPU busy enough at the recipe's?
    for b2 in args.extra_batch:
        if time.perf_counter() - wall0 > args.budget:
            print(f"skipping transformer batch {b2}: past the {args.budget} s budget", flush=True)
            continue

        r2 = dataclasses.replace(r, transformer=dataclasses.replace(r.transformer, batch=b2))
        first, rate, _ = _timed_steps(T.flow_step_fn(fm, r2), T.phase1_init(r, vocab)(), (data,), args.steps // 2)
        info[f"transformer_batch{b2}"] = {"compile_s": round(first, 1), "steps_per_s": round(rate, 2)}
        print(f"transformer batch {b2}: compile {first:.1f} s, {rate:.2f} steps/s "
              f"({rate * b2:.0f} samples/s vs {info['transformer']['steps_per_s'] * r.transformer.batch:.0f})",
              flush=True)

    # projection of the full recipe (compiles counted once; the run caches them across restarts)
    proj = {"render_s": (r.vae_images + r.train_examples) / info["render_images_per_s"]}
    if "vae" in info:
        proj["encode_s"] = r.train_examples / info["encode_images_per_s"]
        proj["vae_s"] = r.vae.steps / info["vae"]["steps_per_s"] + info["vae"]["compile_s"]
    proj["transformer_s"] = r.transformer.steps / info["transformer"]["steps_per_s"] + info["transformer"]["compile_s"]
    proj["distill_s"] = r.distill.steps / info["distill"]["steps_per_s"] + info["distill"]["compile_s"]
    proj["total_min"] = sum(proj.values()) / 60
    info["projection"] = {k: round(v, 1) for k, v in proj.items()}
    info["probe_wall_s"] = round(time.perf_counter() - wall0, 1)
    print(json.dumps(info, indent=2), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
