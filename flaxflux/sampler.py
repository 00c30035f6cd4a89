"""The flow-matching schedule, latent packing, and the jitted Euler sampling loop.

The whole denoising loop is one `jax.jit` (a `lax.fori_loop` over steps). Everything that
varies between calls -- prompt embeddings, latents, guidance, the sigma schedule -- is an
argument, so one compile serves every prompt, seed and guidance at a given resolution, batch
and step count. The latent state and the Euler update stay in fp32 (BFL's numerics); the model
sees latents in its own dtype.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# diffusers' FlowMatchEulerDiscreteScheduler config for FLUX.1-dev (scheduler_config.json);
# schnell's has use_dynamic_shifting false and shift 1.0.
DEFAULT_SCHEDULER = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15,
                     "use_dynamic_shifting": True, "shift": 3.0, "time_shift_type": "exponential"}
LATENT_CHANNELS = 16
PATCH = 2  # latents are packed in 2x2 patches: 16 channels -> 64 per token

# Trace counter: incremented only while `denoise` is being traced (tests count compiles with it).
TRACES = {"denoise": 0}


def read_scheduler_config(path: str | Path | None) -> dict[str, Any]:
    """The scheduler settings from a snapshot's scheduler/scheduler_config.json, or FLUX.1-dev's."""
    cfg = dict(DEFAULT_SCHEDULER)
    if path is not None and Path(path).is_file():
        try:
            cfg.update(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: unreadable scheduler config ({e})") from e
    return cfg


def shift_mu(image_seq_len: int, cfg: dict[str, Any]) -> float:
    """mu, linear in the image token count: base_shift at base_image_seq_len (256), max_shift at
    max_image_seq_len (4096); 1.15 for a 1024x1024 image."""
    x1, x2 = cfg["base_image_seq_len"], cfg["max_image_seq_len"]
    m = (cfg["max_shift"] - cfg["base_shift"]) / (x2 - x1)
    return image_seq_len * m + cfg["base_shift"] - m * x1


def time_shift(mu: float, t: Any) -> Any:
    """FLUX's exponential time shift t -> e^mu / (e^mu + (1/t - 1)) (numpy or jax t)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def training_times(key: jax.Array, batch: int, mu: float) -> jax.Array:
    """FLUX's training times: logit-normal, clipped away from 0 and 1 (1/t - 1 must stay
    finite), then shifted by mu."""
    t = jnp.clip(jax.nn.sigmoid(jax.random.normal(key, (batch,))), 1e-5, 1.0 - 1e-5)
    return time_shift(mu, t)


def sigma_schedule(num_steps: int, image_seq_len: int, cfg: dict[str, Any] | None = None) -> np.ndarray:
    """(num_steps + 1,) float32 sigmas from 1 down to 0, shifted as FLUX.1 does.

    sigmas = linspace(1, 1/N, N) (BFL's first N points of linspace(1, 0, N+1)); dynamic shifting
    maps t -> e^mu / (e^mu + (1/t - 1)) (or mu / (mu + (1/t - 1)) for "linear"); without it,
    t -> shift t / (1 + (shift - 1) t). Computed in float32 as diffusers does; a final 0 appended."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    cfg = cfg or DEFAULT_SCHEDULER
    s = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if cfg.get("use_dynamic_shifting", False):
        mu = shift_mu(image_seq_len, cfg)
        if cfg.get("time_shift_type", "exponential") == "exponential":
            s = time_shift(mu, s)
        else:
            s = mu / (mu + (1 / s - 1))
    else:
        shift = cfg.get("shift", 1.0)
        s = shift * s / (1 + (shift - 1) * s)
    return np.append(np.asarray(s, np.float32), np.float32(0.0))


def latent_size(height: int, width: int, vae_scale: int = 8) -> tuple[int, int]:
    """Latent grid (h, w) for an image; height and width must be multiples of 2 * vae_scale."""
    mult = PATCH * vae_scale
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, (int, np.integer)) or v <= 0 or v % mult:
            raise ValueError(f"{name} must be a positive multiple of {mult} (2 x the VAE's downsampling "
                             f"factor {vae_scale}), got {v!r}")
    return height // vae_scale, width // vae_scale


def pack_latents(z: jax.Array) -> jax.Array:
    """(B, h, w, C) latents -> (B, h/2 * w/2, C*4) tokens; channel order c*4 + dy*2 + dx as in
    BFL / diffusers ("b c (h 2) (w 2) -> b (h w) (c 2 2)")."""
    b, h, w, c = z.shape
    z = z.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: jax.Array, h: int, w: int) -> jax.Array:
    """Inverse of `pack_latents`: (B, L, C*4) -> (B, h, w, C)."""
    b, _, c4 = x.shape
    c = c4 // 4
    x = x.reshape(b, h // 2, w // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h, w, c)


def image_ids(batch: int, h: int, w: int) -> jax.Array:
    """Position ids (B, h/2 * w/2, 3): [0, row, col] per latent token."""
    rows, cols = np.meshgrid(np.arange(h // 2), np.arange(w // 2), indexing="ij")
    ids = np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3).astype(np.float32)
    return jnp.broadcast_to(jnp.asarray(ids), (batch, *ids.shape))


def initial_noise(seed: int | jax.Array, batch: int, h: int, w: int) -> jax.Array:
    """Packed Gaussian latents (B, L, 64) in fp32 for a seed (JAX's PRNG, not torch's)."""
    key = seed if isinstance(seed, jax.Array) else jax.random.key(int(seed))
    return pack_latents(jax.random.normal(key, (batch, h, w, LATENT_CHANNELS), jnp.float32))


# --- progress: a host callback per step, to a bar set up by the caller --------------------------

_BAR: dict[str, Any] = {"bar": None}


def _tick(i) -> None:
    bar = _BAR["bar"]
    if bar is not None:  # callbacks may arrive out of order: move to the furthest step seen
        bar.update(max(0, int(i) + 1 - bar.n))


def step_modulations(model: nnx.Module, sigmas: jax.Array, y: jax.Array, guidance: jax.Array | None) -> dict:
    """The modulation vectors of every step, computed before the loop as one product per layer
    with M = steps x batch rows: the modulation weights (27% of FLUX.1-dev) are read once per
    image rather than once per step. Step axis: 1 for block mods (layers first), 0 for final."""
    steps, batch = sigmas.shape[0] - 1, y.shape[0]
    t = jnp.repeat(sigmas[:-1], batch)
    g = None if guidance is None else jnp.tile(guidance, steps)
    mods = model.modulations(model.embed_vector(t, jnp.tile(y, (steps, 1)), g))
    split = lambda m, axis: m.reshape(*m.shape[:axis], steps, batch, m.shape[-1])  # noqa: E731
    return {"double": tuple(split(m, 1) for m in mods["double"]), "single": split(mods["single"], 1),
            "final": split(mods["final"], 0)}


# XLA's GPU autotuner emits some of the transformer's dots as Triton GEMM fusions; with cuBLAS for
# all of them the bf16 FLUX.1-dev step at 1024^2 on an H100 took 139.1 ms instead of 141.0 in the
# same run (137.5-140.7 vs 141.0-143.7 across machines; benchmarks/RESULTS.md). Backends other
# than GPU ignore xla_gpu_* options.
DENOISE_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


@functools.partial(jax.jit, static_argnames=("graphdef", "progress"), compiler_options=DENOISE_COMPILER_OPTIONS)
def denoise(graphdef: nnx.GraphDef, state: nnx.State, latents: jax.Array, img_ids: jax.Array, txt: jax.Array,
            txt_ids: jax.Array, y: jax.Array, guidance: jax.Array, sigmas: jax.Array,
            progress: bool = False) -> jax.Array:
    """Run len(sigmas) - 1 Euler steps of the rectified flow from `latents` (B, L, 64) fp32.

    x <- x + (sigma_next - sigma) * v(x, sigma), v = the transformer's velocity; returns fp32."""
    TRACES["denoise"] += 1
    model = nnx.merge(graphdef, state)
    txt = txt.astype(model.dtype)
    mods = step_modulations(model, sigmas, y, guidance)

    def step(i, x):
        mods_i = {"double": tuple(m[:, i] for m in mods["double"]), "single": mods["single"][:, i],
                  "final": mods["final"][i]}
        v = model(img=x.astype(model.dtype), img_ids=img_ids, txt=txt, txt_ids=txt_ids, mods=mods_i)
        if progress:
            jax.debug.callback(_tick, i)
        return x + (sigmas[i + 1] - sigmas[i]) * v.astype(jnp.float32)

    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, step, latents.astype(jnp.float32))


def run_denoise(graphdef: nnx.GraphDef, state: nnx.State, latents, img_ids, txt, txt_ids, y, guidance, sigmas, *,
                progress: bool = False) -> jax.Array:
    """`denoise` with a tqdm bar (terminal or notebook) when `progress` is true."""
    if not progress:
        return denoise(graphdef, state, latents, img_ids, txt, txt_ids, y, guidance, sigmas, progress=False)
    from tqdm.auto import tqdm

    with tqdm(total=int(sigmas.shape[0]) - 1, desc="denoise", unit="step") as bar:
        _BAR["bar"] = bar
        try:
            out = denoise(graphdef, state, latents, img_ids, txt, txt_ids, y, guidance, sigmas, progress=True)
            out.block_until_ready()
            jax.effects_barrier()
        finally:
            _BAR["bar"] = None
    return out
