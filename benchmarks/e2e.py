"""Full-size FLUX.1-dev on the GPU: compile time, 50-step latency, peak memory (transformer alone
and, with --pipeline, the whole text-to-image pipeline).

    python benchmarks/e2e.py                                    # all variants, 1024^2 and 512^2, batch 1 and 4
    python benchmarks/e2e.py --res 1024 --batch 1 --pipeline    # the issue's targets (1024^2, batch 1)
    python benchmarks/e2e.py --variants bf16 --res 1024 --batch 1 4 --repeats 3 --json out.json
    python benchmarks/e2e.py --smoke --pipeline --res 64 --batch 1 --steps 2 --repeats 1   # CPU check
    python benchmarks/e2e.py --variants bf16 --res 1024 --batch 1 --trace 20   # + GPU time by kernel

Weights are random (FLUX.1-dev's real ones cannot be downloaded here), generated on the device
tensor by tensor and fed through the real loader: the bf16 model through the dense codec, the
ternary one through quantize-on-load (each layer ternarized and packed as it arrives, so no bf16
copy of the model ever exists). Every (variant, resolution, batch) runs in its own process, so
its peak memory is its own. The transformer-alone measurement feeds random tensors of T5-XXL /
CLIP-L's shapes as prompt embeddings.

--pipeline then measures the whole pipeline in the same process, as a one-shot generation runs
it: the transformer is freed; full-size T5-XXL and CLIP-L (random weights, made on the device by
one jitted program per model, never on the host) encode random token ids; the text encoders are
freed (their arrays deleted, so their memory returns before denoising: the issue's "text
encoders run then freed"); the transformer is loaded again and the VAE made; the 50-step jitted
denoise loop runs through `sampler.run_denoise` as FluxPipeline calls it; the VAE decodes at the
full resolution. Every program (T5, CLIP, VAE decode; the denoise loop already is) is compiled
from shapes first, with nothing resident, so that compiling and autotuning do not add to a
stage's memory. JAX's peak_bytes_in_use is process-wide and cannot be reset, so the stages run
in that order and the peak (and bytes_in_use) is read after each: the value after the last stage
is the pipeline's peak. The transformer-alone stage before it never raises that value, since
the pipeline repeats its loading and denoising with more resident (VAE, prompt embeddings).
The transformer stays resident while the VAE decodes, as in FluxPipeline.

T5 runs in int8 (weight-only, FluxPipeline's t5_quantize="int8") and/or bf16 (--t5). With both,
int8 goes first through the whole flow; then the transformer and VAE are freed and bf16 T5
encodes again. bf16 T5's pipeline peak is the peak read after that: its encoder stage holds
more than int8's, and every other stage is the same as int8's.

--pipeline also reports what the peak consists of: resident bytes of every component (the
transformer's packed ternary codes + scales and its dense parameters, T5, CLIP, VAE) and the
temporary, argument and output bytes XLA assigned to each compiled program (denoise loop, T5,
CLIP, VAE decode) from `compiled.memory_analysis()`.

Each process runs one warm-up and --repeats timed 50-step runs of the transformer alone, and
one more with --pipeline (its time is the pipeline's denoise stage). On the CPU (--smoke: tiny
models of the same structure) the device keeps no memory statistics: they print as n/a, and the
bytes of the live arrays after each stage stand in as a check that freeing worked.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
import zlib

VARIANTS = ("bf16", "ternary", "ternary-a8")
T5_MODES = ("int8", "bf16")  # in the order they run (smaller first: see the module docstring)
T5_LEN, CLIP_LEN = 512, 77  # FLUX.1-dev's T5 sequence length; CLIP's positions


def flops_per_step(batch: int, res: int, txt_len: int = T5_LEN) -> float:
    """Matmul FLOPs of one FLUX.1-dev forward (linears + attention; modulations counted at M=1)."""
    d, mlp, l_img = 3072, 12288, (res // 16) ** 2
    l = l_img + txt_len
    double = 2 * (l_img + txt_len) * d * (3 * d + d + 2 * mlp) + 2 * 2 * (6 * d * d)
    single = 2 * l * d * (3 * d + mlp) + 2 * l * (d + mlp) * d + 2 * 3 * d * d
    attn = 4 * l * l * d
    return batch * (19 * (double + attn) + 38 * (single + attn))


def gb(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 1e9


def fmt(x: float | None, spec: str = ".2f") -> str:
    """A number, or n/a where the device gave none (the CPU has no memory statistics)."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# --- helpers that run in the child process (they import jax: the parent never does, so it holds
# --- no GPU memory of its own) ------------------------------------------------------------------


def memory(dev) -> tuple[int | None, int | None]:
    """(bytes_in_use, peak_bytes_in_use) of the device; (None, None) where it keeps no statistics."""
    stats = dev.memory_stats()
    if not stats:
        return None, None
    return stats.get("bytes_in_use"), stats.get("peak_bytes_in_use")


def program_memory(compiled) -> dict[str, int]:
    """XLA's buffer assignment of a compiled program: temporaries (activations), arguments
    (weights + inputs, already resident when it runs), outputs. Empty where unavailable."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- some backends do not implement it
        return {}
    if m is None:
        return {}
    return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("temp", "argument", "output", "alias")
            if hasattr(m, f"{k}_size_in_bytes")}


def tree_bytes(tree) -> int:
    import jax

    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def free(tree) -> None:
    """Delete every array of a pytree now, whoever else still refers to it: its device memory
    returns at once instead of whenever the last Python reference goes away."""
    import jax

    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array) and not x.is_deleted():
            x.delete()


def random_init(model_fn):
    """(graphdef, abstract state, make) for a module with random weights made on the device: the
    abstract state (shapes and dtypes) compiles the module's programs; `make(seed)` runs one
    jitted program that writes every parameter in place, so no host copy exists (T5-XXL is
    9.5 GB in bf16). Values come from an integer hash of each element's index rather than
    jax.random: one elementwise fusion per parameter, so no temporaries beside the weights
    (threefry's took 2.9 GB beside bf16 T5's 9.5 on the CPU) and a fast compile (the VAE's ~250
    threefry fusions took 16 s). Weights uniform with std 0.02, int8 weights uniform over the
    int8 range, T5's int8 per-channel scales 1e-4, norm gains 1, biases 0: memory and speed do
    not depend on the values."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, abstract = nnx.split(nnx.eval_shape(model_fn))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    names = [tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path if getattr(k, "name", None) != "value")
             for path, _ in leaves]
    specs = [leaf for _, leaf in leaves]

    def hashed(shape: tuple[int, ...], salt: jax.Array) -> jax.Array:
        """uint32 per element: a multiply-xorshift hash of (flat index, salt)."""
        h = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape) * jnp.uint32(0x9E3779B1) + salt
        for mul, shift in ((0x85EBCA6B, 13), (0xC2B2AE35, 16)):
            h = (h ^ (h >> shift)) * jnp.uint32(mul)
        return h ^ (h >> 16)

    def leaf(path: tuple[str, ...], spec, salt: jax.Array) -> jax.Array:
        shape, dtype = tuple(spec.shape), spec.dtype
        if jnp.issubdtype(dtype, jnp.integer):
            return ((hashed(shape, salt) >> 24).astype(jnp.int32) - 128).astype(dtype)
        if path[-1] == "scale":
            return jnp.full(shape, 1e-4, dtype)
        if path[-1] == "bias":
            return jnp.zeros(shape, dtype)
        if any("norm" in p for p in path):
            return jnp.ones(shape, dtype)
        u = (hashed(shape, salt) >> 8).astype(jnp.float32) * (2.0 ** -24) - 0.5  # uniform [-0.5, 0.5)
        return (u * (0.02 * math.sqrt(12.0))).astype(dtype)

    @jax.jit
    def init(seed):
        return [leaf(p, s, (seed * jnp.uint32(0x27D4EB2F)) ^ jnp.uint32(zlib.crc32(".".join(p).encode())))
                for p, s in zip(names, specs)]

    def make(seed: int):
        return jax.tree_util.tree_unflatten(treedef, init(jnp.uint32(seed)))

    return graphdef, abstract, make


KERNEL_KINDS = (("attention", re.compile(r"fmha|flash|sdpa|attn", re.I)),
                ("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_", re.I)),
                ("copy", re.compile(r"memcpy|memset", re.I)),
                ("pallas", re.compile(r"pallas|mosaic|ternary", re.I)))


def kernel_kind(name: str, hlo_op: str) -> str:
    for kind, pattern in KERNEL_KINDS:
        if pattern.search(name) or (kind == "pallas" and pattern.search(hlo_op)):
            return kind
    return "fusion/other"


def kernel_profile(run, steps: int, top: int) -> dict:
    """GPU time per denoising step by kernel, from one traced call of `run()`: where a step's
    milliseconds go (GEMMs, attention, Pallas kernels, XLA fusions) and how much of the wall
    time the GPU was idle. Reads the trace with jax.profiler.ProfileData (no xprof needed)."""
    import glob
    import tempfile

    import jax

    logdir = tempfile.mkdtemp(prefix="e2e_trace_")
    with jax.profiler.trace(logdir):
        t0 = time.perf_counter()
        run()
        wall_ns = (time.perf_counter() - t0) * 1e9
    path = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
    by_name: dict[tuple[str, str], list[float]] = {}
    busy, first, last = 0.0, math.inf, 0.0
    seen = [f"{plane.name}: {[line.name for line in plane.lines][:8]}" for plane in data.planes]
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):  # derived lines (XLA Ops / Modules) repeat the kernels
                continue
            for ev in line.events:
                stats = dict(ev.stats)
                key = (ev.name, str(stats.get("hlo_op", "")))
                acc = by_name.setdefault(key, [0, 0.0])
                acc[0] += 1
                acc[1] += ev.duration_ns
                busy += ev.duration_ns
                first, last = min(first, ev.start_ns), max(last, ev.end_ns)
    kinds: dict[str, float] = {}
    for (name, op), (_, ns) in by_name.items():
        kind = kernel_kind(name, op)
        kinds[kind] = kinds.get(kind, 0.0) + ns / steps / 1e6
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {"wall_ms_per_step": wall_ns / steps / 1e6, "gpu_busy_ms_per_step": busy / steps / 1e6,
            "gpu_span_ms_per_step": (last - first) / steps / 1e6 if last else 0.0, "kinds_ms_per_step": kinds,
            "planes": [] if busy else seen,  # what the trace held, where no GPU kernels were found
            "top": [{"kernel": n[:90], "hlo_op": op[:60], "calls_per_step": c / steps, "ms_per_step": ns / steps / 1e6}
                    for (n, op), (c, ns) in rows]}


def print_kernel_profile(row: dict) -> None:
    k = row["kernels"]
    print(f"\nGPU time per step, {row['variant']} ({row['backend']}) {row['res']}^2 b{row['batch']}: wall "
          f"{k['wall_ms_per_step']:.2f} ms, kernels busy {k['gpu_busy_ms_per_step']:.2f} ms, first-to-last kernel "
          f"{k['gpu_span_ms_per_step']:.2f} ms; by kind: "
          + ", ".join(f"{kind} {ms:.2f}" for kind, ms in sorted(k["kinds_ms_per_step"].items(), key=lambda x: -x[1])))
    print("| ms/step | calls/step | kind | kernel | hlo op |")
    print("|---|---|---|---|---|")
    for t in k["top"]:
        print(f"| {t['ms_per_step']:.3f} | {t['calls_per_step']:.0f} | {kernel_kind(t['kernel'], t['hlo_op'])} | "
              f"{t['kernel']} | {t['hlo_op']} |")


def jit_method(graphdef, method: str):
    """jax.jit of `module.method` over split state, as FluxPipeline compiles its components."""
    import jax
    from flax import nnx

    @jax.jit
    def fn(state, *args):
        return getattr(nnx.merge(graphdef, state), method)(*args)

    return fn


def component_configs(smoke: bool):
    """(T5, CLIP, VAE) configs: FLUX.1-dev's, or tiny ones whose output widths still fit the
    transformer (T5 d_model = context_in_dim 4096, CLIP width = vec_in_dim 768, 16 latent
    channels, 8x downsampling) for a CPU check."""
    from flaxflux.clip import CLIP_L, CLIPTextConfig
    from flaxflux.t5 import T5_XXL, T5Config
    from flaxflux.vae import FLUX_VAE, VAEConfig

    if not smoke:
        return T5_XXL, CLIP_L, FLUX_VAE
    return (T5Config(vocab_size=512, d_model=4096, d_kv=16, d_ff=256, num_layers=2, num_heads=4),
            CLIPTextConfig(vocab_size=512, hidden_size=768, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4),
            VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=8))


def child(variant: str, res: int, batch: int, steps: int, repeats: int, smoke: bool = False,
          backend: str = "auto", pipeline: bool = False, t5_modes: tuple[str, ...] = T5_MODES,
          trace: int = 0) -> dict:
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

    quant = None if variant == "bf16" else "ternary"

    def load_transformer():
        model = load_from_source(RandomSource(), cfg, {"quantization": "none"}, jnp.bfloat16, quantize=quant)
        if quant:
            from flaxflux.ternary import set_ternary_options
            set_ternary_options(model, activations="int8" if variant == "ternary-a8" else "native", backend=backend)
        return model

    t0 = time.perf_counter()
    model = load_transformer()
    label = "xla"
    if quant:
        import pallas_kernels
        label = f"{backend}->{pallas_kernels.choose_backend(backend)}"
    jax.block_until_ready(nnx.state(model))
    load_s = time.perf_counter() - t0
    weights, _ = memory(dev)
    counts = count_parameters(model)
    graphdef, state = nnx.split(model)
    del model

    h = w = res // 8

    def inputs(seed):
        r = np.random.default_rng(seed)
        return (sampler.initial_noise(seed, batch, h, w), sampler.image_ids(batch, h, w),
                jnp.asarray(r.standard_normal((batch, T5_LEN, cfg.context_in_dim)), jnp.bfloat16),
                jnp.zeros((batch, T5_LEN, 3), jnp.float32),
                jnp.asarray(r.standard_normal((batch, cfg.vec_in_dim)), jnp.bfloat16),
                jnp.full((batch,), 3.5, jnp.float32))

    sigmas = jnp.asarray(sampler.sigma_schedule(steps, (h // 2) * (w // 2)))
    args = inputs(1)
    t0 = time.perf_counter()
    # progress=False spelled out, as run_denoise passes it: jit keys its cache on how static
    # arguments are given, and a call leaving `progress` to its default would compile again.
    compiled = sampler.denoise.lower(graphdef, state, *args, sigmas, progress=False).compile()
    compile_s = time.perf_counter() - t0
    # Warm-up and timed runs go through the jitted entry point the pipeline uses (it finds the
    # program just compiled); every prompt after the first must not trace again.
    traces = sampler.TRACES["denoise"]
    jax.block_until_ready(sampler.run_denoise(graphdef, state, *args, sigmas))  # warm-up
    traces_first = sampler.TRACES["denoise"] - traces
    times = []
    for r in range(repeats):
        a = inputs(2 + r)
        jax.block_until_ready(a)
        t0 = time.perf_counter()
        jax.block_until_ready(sampler.run_denoise(graphdef, state, *a, sigmas))
        times.append(time.perf_counter() - t0)
    retraced = sampler.TRACES["denoise"] - traces - traces_first
    _, peak = memory(dev)
    med = float(np.median(times))
    row = {"variant": variant, "backend": label, "res": res, "batch": batch, "steps": steps,
           "device": dev.device_kind, "jax": jax.__version__, "attention": os.environ.get("FLAXFLUX_ATTENTION", "auto"),
           "load_s": load_s, "compile_s": compile_s, "latency_s": med, "ms_per_step": 1e3 * med / steps,
           "tflops": flops_per_step(batch, res) * steps / med / 1e12, "runs_s": times,
           "weights_gb": gb(weights), "peak_gb": gb(peak), "first_call_traced": traces_first,
           "second_prompt_retraced": retraced, "ternary_params": counts["ternary_params"] or None,
           "profile": {"weights": {"transformer ternary codes + scales": counts["ternary_bytes"],
                                   "transformer dense params": counts["other_bytes"]},
                       "programs": {"denoise": program_memory(compiled)}}}
    if trace:
        row["kernels"] = kernel_profile(
            lambda: jax.block_until_ready(sampler.run_denoise(graphdef, state, *args, sigmas)), steps, trace)
    if pipeline:
        free((args, a if repeats else None))  # the transformer-alone stage's random prompt embeddings
        row["pipeline"] = run_pipeline(dev, graphdef, state, load_transformer, res, batch, sigmas,
                                       smoke, t5_modes, row["profile"])
    return row


def run_pipeline(dev, graphdef, state, load_transformer, res: int, batch: int, sigmas,
                 smoke: bool, t5_modes: tuple[str, ...], profile: dict) -> dict:
    """The whole pipeline after the transformer-alone stage (see the module docstring). Frees
    `state` (the transformer's weights). Fills `profile`; returns the stages and peaks."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from flaxflux import sampler
    from flaxflux.clip import CLIPTextModel
    from flaxflux.t5 import T5Encoder
    from flaxflux.vae import AutoencoderKL

    t5_cfg, clip_cfg, vae_cfg = component_configs(smoke)
    stages: list[dict] = []

    def mark(stage: str, seconds: float | None = None) -> None:
        in_use, peak = memory(dev)
        # live_gb: the arrays Python still holds (a cross-check that freeing worked; CPU too)
        stages.append({"stage": stage, "s": seconds, "in_use_gb": gb(in_use), "peak_gb": gb(peak),
                       "live_gb": gb(tree_bytes(jax.live_arrays()))})

    mark("transformer alone")
    free(state)
    del state
    mark("free transformer")

    clip_graphdef, clip_abstract, make_clip = random_init(
        lambda: CLIPTextModel(clip_cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    t5s = {m: random_init(lambda m=m: T5Encoder(t5_cfg, dtype=jnp.bfloat16, quantize=None if m == "bf16" else m,
                                                rngs=nnx.Rngs(0))) for m in t5_modes}
    vae_graphdef, vae_abstract, make_vae = random_init(
        lambda: AutoencoderKL(vae_cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    t5_ids = jnp.asarray(rng.integers(0, t5_cfg.vocab_size, (batch, T5_LEN)), jnp.int32)
    clip_ids = jnp.asarray(rng.integers(0, clip_cfg.vocab_size, (batch, CLIP_LEN)), jnp.int32)
    h = w = res // vae_cfg.downscale
    img_ids = sampler.image_ids(batch, h, w)
    latents = sampler.initial_noise(0, batch, h, w)
    guidance = jnp.full((batch,), 3.5, jnp.float32)

    # Every program compiled first, from shapes alone, with almost nothing resident: compiling
    # (autotuning included) allocates device memory of its own, which should not land on top
    # of a stage's weights. A server compiles once too; the first call of a one-shot run would
    # compile inside each stage instead.
    weights, programs = profile["weights"], profile["programs"]
    compile_s = {}

    def compile_program(name: str, graphdef, method: str, *abstract):
        t0 = time.perf_counter()
        compiled = jit_method(graphdef, method).lower(*abstract).compile()
        compile_s[name] = time.perf_counter() - t0
        programs[name] = program_memory(compiled)
        return compiled

    t5_compiled = {m: compile_program(f"T5 {m} encode", t5s[m][0], "__call__", t5s[m][1], t5_ids) for m in t5_modes}
    clip_compiled = compile_program("CLIP encode", clip_graphdef, "__call__", clip_abstract, clip_ids)
    lat_shape = jax.ShapeDtypeStruct((batch, h, w, vae_cfg.latent_channels), jnp.float32)
    vae_compiled = compile_program("VAE decode", vae_graphdef, "decode", vae_abstract, lat_shape)
    mark("compile T5, CLIP, VAE decode", sum(compile_s.values()))

    out: dict = {"t5_modes": list(t5_modes), "peak_gb": {}, "encode": {}, "compile_s": compile_s}
    for i, mode in enumerate(t5_modes):
        if i:  # a later (larger) T5: encode again with nothing else resident
            free((tr_state, vae_state, txt, pooled))
            mark("free transformer + VAE")
        t0 = time.perf_counter()
        t5_state, clip_state = t5s[mode][2](1), make_clip(2)
        jax.block_until_ready((t5_state, clip_state))
        weights[f"T5-XXL ({mode})"] = tree_bytes(t5_state)
        weights["CLIP-L"] = tree_bytes(clip_state)
        mark(f"create T5 {mode} + CLIP", time.perf_counter() - t0)

        # As FluxPipeline.encode_prompt: the T5 sequence and CLIP's pooled output.
        t0 = time.perf_counter()
        t5_out = t5_compiled[mode](t5_state, t5_ids)
        _, clip_pooled = clip_compiled(clip_state, clip_ids)
        jax.block_until_ready((t5_out, clip_pooled))
        out["encode"][mode] = {"s": time.perf_counter() - t0}
        mark(f"encode (T5 {mode} + CLIP)", out["encode"][mode]["s"])
        free((t5_state, clip_state))
        del t5_state, clip_state
        mark(f"free text encoders ({mode})")
        if i:
            out["peak_gb"][mode] = stages[-1]["peak_gb"]
            free((t5_out, clip_pooled))
            continue
        txt, pooled = t5_out, clip_pooled

        # The transformer again (the same random weights; the graphdef, hence the compiled
        # denoise program, is the one from before), and the VAE.
        t0 = time.perf_counter()
        _, tr_state = nnx.split(load_transformer())
        vae_state = make_vae(3)
        jax.block_until_ready((tr_state, vae_state))
        weights["VAE"] = tree_bytes(vae_state)
        mark("load transformer + create VAE", time.perf_counter() - t0)

        # As FluxPipeline.__call__: the jitted sampler through run_denoise.
        traces = sampler.TRACES["denoise"]
        txt_ids = jnp.zeros((batch, txt.shape[1], 3), jnp.float32)
        t0 = time.perf_counter()
        z = sampler.run_denoise(graphdef, tr_state, latents, img_ids, txt, txt_ids, pooled, guidance, sigmas)
        jax.block_until_ready(z)
        out["denoise"] = {"s": time.perf_counter() - t0, "retraced": sampler.TRACES["denoise"] - traces}
        mark("denoise", out["denoise"]["s"])

        # As FluxPipeline.decode: unpack, the jitted VAE decode, then to [0, 1].
        t0 = time.perf_counter()
        lat = sampler.unpack_latents(jnp.asarray(z, jnp.float32), h, w)
        images = jnp.clip(vae_compiled(vae_state, lat) / 2 + 0.5, 0.0, 1.0)
        jax.block_until_ready(images)
        out["decode"] = {"s": time.perf_counter() - t0, "image_shape": list(images.shape)}
        mark("decode", out["decode"]["s"])
        out["peak_gb"][mode] = stages[-1]["peak_gb"]
        out["run_s"] = out["encode"][mode]["s"] + out["denoise"]["s"] + out["decode"]["s"]
        free((z, lat, images))
    out["stages"] = stages
    return out


# --- the parent: one child process per (variant, resolution, batch, backend), then the tables ---


def row_line(row: dict) -> str:
    line = (f"{row['variant']:>10} {row['backend']:>16} {row['res']:>5}^2 b{row['batch']}: "
            f"{row['ms_per_step']:7.1f} ms/step  {row['latency_s']:6.2f} s/{row['steps']}  "
            f"compile {row['compile_s']:5.1f} s  weights {fmt(row['weights_gb'])} GB  peak {fmt(row['peak_gb'])} GB  "
            f"retraced {row['second_prompt_retraced']}")
    p = row.get("pipeline")
    if p:
        peaks = "  ".join(f"T5 {m} {fmt(v)} GB" for m, v in p["peak_gb"].items())
        first = p["t5_modes"][0]
        line += (f"\n{'':>36}pipeline peak: {peaks}  (encode {p['encode'][first]['s']:.2f} s, "
                 f"denoise {p['denoise']['s']:.2f} s, decode {p['decode']['s']:.2f} s)")
    return line + f"  [process {row['child_s']:.0f} s]"


def ratio(x: float | None, base: float | None) -> str:
    return "" if x is None or not base else f" ({x / base:.2f}x)"


def print_tables(rows: list[dict], steps: int, repeats: int) -> None:
    r0 = rows[0]
    print(f"\n{r0['device']}, jax {r0['jax']}, {steps} steps, median of {repeats} after a warm-up; "
          "ratios (x) against bf16 at the same resolution and batch in this run")
    modes = [m for m in T5_MODES if any(m in r.get("pipeline", {}).get("peak_gb", {}) for r in rows)]
    head = ["variant", "backend", "res", "batch", "compile s", "ms/step", f"{steps}-step s", "vs bf16", "TFLOP/s",
            "transformer peak GB"] + [f"pipeline peak GB (T5 {m})" for m in modes]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    base = {(r["res"], r["batch"]): r for r in rows if r["variant"] == "bf16"}
    for r in rows:
        b = base.get((r["res"], r["batch"]))
        lat = f"{r['latency_s'] / b['latency_s']:.2f}x" if b else "n/a"
        cells = [r["variant"], r["backend"], str(r["res"]), str(r["batch"]), f"{r['compile_s']:.1f}",
                 f"{r['ms_per_step']:.1f}", f"{r['latency_s']:.2f}", lat, f"{r['tflops']:.0f}",
                 fmt(r["peak_gb"]) + (ratio(r["peak_gb"], b["peak_gb"]) if b else "")]
        for m in modes:
            v = r.get("pipeline", {}).get("peak_gb", {}).get(m)
            bv = b.get("pipeline", {}).get("peak_gb", {}).get(m) if b else None
            cells.append(fmt(v) + ratio(v, bv))
        print("| " + " | ".join(cells) + " |")

    piped = [r for r in rows if r.get("pipeline")]
    if not piped:
        return
    print("\nPipeline stage times, s (runs: the first after compiling, T5 "
          f"{piped[0]['pipeline']['t5_modes'][0]}; compiles: from shapes, before the stages ran):")
    print("| variant | res | batch | encode | denoise | decode | total | T5 compile | CLIP compile | VAE compile |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in piped:
        p = r["pipeline"]
        c = p["compile_s"]
        m = p["t5_modes"][0]
        print(f"| {r['variant']} | {r['res']} | {r['batch']} | {p['encode'][m]['s']:.2f} | {p['denoise']['s']:.2f} | "
              f"{p['decode']['s']:.2f} | {p['run_s']:.2f} | {c[f'T5 {m} encode']:.1f} | {c['CLIP encode']:.1f} | "
              f"{c['VAE decode']:.1f} |")

    # What the peak consists of, per resolution and batch, variants side by side.
    for res, batch in dict.fromkeys((r["res"], r["batch"]) for r in piped):
        group = [r for r in piped if (r["res"], r["batch"]) == (res, batch)]
        print(f"\nMemory profile, {res}x{res}, batch {batch}, GB. Resident weights (sum of their arrays' bytes); "
              "XLA's temporaries and outputs of each compiled program (memory_analysis); device bytes in use / "
              "peak so far [live arrays] after each stage, in the order they ran; estimates = bytes in use "
              "before a stage + its program's temporaries and outputs:")
        print("| | " + " | ".join(f"{r['variant']} ({r['backend']})" for r in group) + " |")
        print("|---|" + "---|" * len(group))

        def line(label: str, cells: list[str]) -> None:
            print(f"| {label} | " + " | ".join(cells) + " |")

        for k in PROFILE_WEIGHTS:
            if any(k in r["profile"]["weights"] for r in group):
                line(f"weights: {k}", [fmt(gb(r["profile"]["weights"].get(k)), ".3f") for r in group])
        for k in PROFILE_PROGRAMS:
            for part, name in (("temp", "temporaries"), ("output", "outputs")):
                if any(part in r["profile"]["programs"].get(k, {}) for r in group):
                    line(f"{k}: {name}", [fmt(gb(r["profile"]["programs"].get(k, {}).get(part)), ".3f")
                                          for r in group])
        line("transformer alone: weights + denoise temporaries + outputs",
             [fmt(gb(transformer_estimate(r)), ".3f") for r in group])
        line("transformer alone: measured peak", [fmt(r["peak_gb"], ".3f") for r in group])
        for i, st in enumerate(group[0]["pipeline"]["stages"]):
            line(f"after: {st['stage']}", [f"{fmt(s['in_use_gb'], '.3f')} / {fmt(s['peak_gb'], '.3f')} "
                                           f"[{fmt(s['live_gb'], '.3f')}]"
                                           for s in (r["pipeline"]["stages"][i] for r in group)])
        for label in stage_estimates(group[0]):
            line(f"estimate: {label}", [stage_estimates(r).get(label, "n/a") for r in group])
        for m in group[0]["pipeline"]["peak_gb"]:
            cells = []
            for r in group:
                peak = r["pipeline"]["peak_gb"][m]
                stages = r["pipeline"]["stages"]
                hit = next((s["stage"] for s in stages if peak is not None and s["peak_gb"] == peak), None)
                cells.append(f"{fmt(peak, '.3f')} ({hit})" if hit else fmt(peak, ".3f"))
            line(f"pipeline peak, T5 {m} (first reached after)", cells)


PROFILE_WEIGHTS = ("transformer ternary codes + scales", "transformer dense params", "T5-XXL (int8)", "T5-XXL (bf16)",
                   "CLIP-L", "VAE")
PROFILE_PROGRAMS = ("denoise", "T5 int8 encode", "T5 bf16 encode", "CLIP encode", "VAE decode")


def transformer_estimate(row: dict) -> float | None:
    """Transformer weights + the denoise program's temporaries and outputs, in bytes."""
    prog = row["profile"]["programs"].get("denoise", {})
    if "temp" not in prog:
        return None
    w = row["profile"]["weights"]
    return w["transformer ternary codes + scales"] + w["transformer dense params"] + prog["temp"] + prog["output"]


def stage_estimates(row: dict) -> dict[str, str]:
    """'resident + temporaries = total' (GB) for the stages that run a program: bytes in use
    after the stage before it, plus the program's temporaries and outputs."""
    stages = {s["stage"]: s for s in row["pipeline"]["stages"]}
    progs = row["profile"]["programs"]
    out = {}
    plan = [(f"encode (T5 {m} + CLIP)", f"create T5 {m} + CLIP", (f"T5 {m} encode", "CLIP encode"))
            for m in row["pipeline"]["t5_modes"]]
    plan += [("denoise", "load transformer + create VAE", ("denoise",)), ("decode", "denoise", ("VAE decode",))]
    for label, before, names in plan:
        resident = stages.get(before, {}).get("in_use_gb")
        # programs of one stage run one after the other: the largest one's buffers count
        extra = max((gb(progs[n]["temp"] + progs[n]["output"]) for n in names if "temp" in progs.get(n, {})),
                    default=None)
        out[label] = "n/a" if resident is None or extra is None else \
            f"{resident:.3f} + {extra:.3f} = {resident + extra:.3f}"
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--res", nargs="+", type=int, default=[1024, 512])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write all rows here (rewritten after every process, so a cut-off run keeps "
                                   "what finished)")
    ap.add_argument("--smoke", action="store_true", help="tiny models (checks the script on a CPU)")
    ap.add_argument("--backends", nargs="+", default=["auto"], help="ternary_matmul backends to compare")
    ap.add_argument("--pipeline", action="store_true",
                    help="also measure the whole pipeline (T5-XXL + CLIP-L, then the transformer, then the VAE)")
    ap.add_argument("--t5", nargs="+", default=list(T5_MODES), choices=T5_MODES,
                    help="T5 weights in the pipeline: int8 (weight-only) and/or bf16")
    ap.add_argument("--trace", type=int, default=0, metavar="N",
                    help="trace one more 50-step run and print GPU time per step by kernel kind and the N "
                         "costliest kernels")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    t5_modes = tuple(m for m in T5_MODES if m in args.t5)
    if args.child:
        v, res, batch, backend = args.child.split(",")
        row = child(v, int(res), int(batch), args.steps, args.repeats, args.smoke, backend, args.pipeline, t5_modes,
                    args.trace)
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    rows = []
    jobs = [(v, res, batch, be) for v in args.variants for res in args.res for batch in args.batch
            for be in (args.backends if v != "bf16" else ["xla"])]
    t_start = time.perf_counter()
    for v, res, batch, be in jobs:
        cmd = [sys.executable, __file__, "--child", f"{v},{res},{batch},{be}", "--steps", str(args.steps),
               "--repeats", str(args.repeats), "--t5", *t5_modes] + (["--smoke"] if args.smoke else []) \
            + (["--pipeline"] if args.pipeline else []) + ["--trace", str(args.trace)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{v} {res} b{batch}: FAILED\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}", flush=True)
            continue
        row = json.loads(line[0][7:])
        row["child_s"] = time.perf_counter() - t0
        rows.append(row)
        print(row_line(row), flush=True)
        if row.get("kernels"):
            print_kernel_profile(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
    if rows:
        print_tables(rows, args.steps, args.repeats)
    print(f"\n{len(rows)} of {len(jobs)} processes done in {time.perf_counter() - t_start:.0f} s")
    return 0 if len(rows) == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
