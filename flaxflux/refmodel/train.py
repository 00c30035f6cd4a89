"""Train the reference model: tokenizers -> VAE -> latent dataset -> transformer -> guidance distillation
-> export (diffusers FLUX.1-dev layout).

    python -m flaxflux.refmodel.train --out out/refmodel                 # everything, resumable
    python -m flaxflux.refmodel.train --out out/refmodel --time-limit 9  # stop cleanly after ~9 min;
                                                                        # the same command continues
    python -m flaxflux.refmodel.train --out out/refmodel --stage export --export flaxflux/refmodel/model

Stages (see config.Recipe for the numbers):

1. VAE: FLUX's AutoencoderKL at small width, trained on rendered scenes with L1 + L2 + an
   image-gradient L1 (sharp shape edges, no perceptual or adversarial loss: flat-colored shapes
   need neither) + a small KL on the posterior (sampled with the reparameterization trick, so the
   decoder tolerates latent noise). Scaling and shift factors are then measured on encoded
   images, as FLUX's 0.3611 / 0.1159 were: latents are unit-variance, zero-mean for the flow.
2. Data: seeded scenes rendered in parallel, encoded once with the trained VAE (posterior mean,
   scaled), cached as .npy with the caption table and its T5 / CLIP token ids.
3. Transformer (+ T5 and CLIP, trained jointly from random init): rectified flow,
   x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0; t ~ logit-normal(0, 1) shifted by
   the scheduler's mu at 64 tokens (config.SCHEDULER), so training and sampling weight the same
   noise levels; 10% of captions are replaced by "" so the model also learns the unconditional
   velocity. The guidance input is fed 1.0 throughout this phase ("no guidance").
   Why train the text encoders: with text position ids all zero in FLUX, which color belongs to
   which shape ("a red circle and a blue square") must be encoded by T5 itself; a random frozen
   T5 mixes tokens only weakly. Jointly trained small encoders are cheap, and they are frozen
   from here on.
4. Guidance distillation (how FLUX.1-dev's guidance input works): the phase-3 model (EMA weights)
   becomes a frozen teacher; a student initialised from it takes g ~ U[1, 5] as its guidance
   input and regresses v_uncond + g (v_cond - v_uncond) of the teacher, in one forward pass
   instead of classifier-free guidance's two.
5. Export: bf16 safetensors in the FLUX.1-dev diffusers layout (see export.py).

Numerics: fp32 master weights and optimizer state, bf16 forward/backward (the models run with
their bf16 graph over a bf16 cast of the fp32 weights), fp32 losses. AdamW with linear warmup and
cosine decay, gradient clipping at 1, EMA of the weights for the transformer stages.

Determinism and resumption: the batch, noise, t, caption dropout and guidance of step s are drawn
from jax.random.fold_in(key(seed), s) over data arrays that are themselves seeded, so a run is a
pure function of (recipe, seed). Orbax checkpoints (atomic: written to a temporary folder, then
renamed) hold params, optimizer state, EMA and the step; a resumed run continues bit-exactly (on
GPU with XLA's deterministic ops, which `main` turns on).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .. import sampler
from ..clip import CLIPTextModel
from ..t5 import T5Encoder
from ..transformer import FluxTransformer
from ..vae import AutoencoderKL
from ..checkpoints import Checkpoints
from . import data as datalib
from . import tokenizers as toklib
from .config import PRESETS, SCHEDULER, Recipe, Stage

COMPUTE = jnp.bfloat16
STAGES = ("tokenizers", "vae", "data", "transformer", "distill", "export")
# Compile the training steps with XLA's backend optimizations off: ~40% faster compiles on CPU
# for slower steps. For the CPU tests (a few steps each); read when a step function is made.
FAST_COMPILE = False


def _jit(fn: Callable) -> Callable:
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0} if FAST_COMPILE else None)


class OutOfTime(Exception):
    """The run's time limit was reached; a checkpoint was written and the same command continues."""


# ------------------------------------------------------------------------------------ models


@dataclasses.dataclass(frozen=True)
class Trainable:
    """A model as (bf16 compute graph, fp32 weights): `module(params)` gives the bf16 module whose
    weights are a cast of `params`, differentiable back to them."""

    graphdef: Any      # nnx.GraphDef of the model built with dtype=bfloat16
    # seed -> fp32 weights; left out of ==/hash so that equal graphs share compiled steps
    init: Callable[[int], nnx.State] = dataclasses.field(compare=False, hash=False)

    def module(self, params: nnx.State) -> nnx.Module:
        return nnx.merge(self.graphdef, jax.tree.map(lambda p: p.astype(COMPUTE), params))


def trainable(build: Callable[[Any, nnx.Rngs], nnx.Module]) -> Trainable:
    """`build(dtype, rngs)` -> module. The bf16 graph is traced abstractly (nothing allocated)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(COMPUTE, nnx.Rngs(0))))
    # The whole init is one compiled program (eager init compiles a sampler per weight shape),
    # with the seed traced (one compile for every seed) and XLA's RngBitGenerator as the key
    # type: its programs compile several times faster than threefry's on CPU.
    jitted = jax.jit(lambda seed: nnx.state(build(jnp.float32, nnx.Rngs(jax.random.key(seed, impl="rbg")))))

    def init(seed: int) -> nnx.State:
        return jitted(jnp.asarray(seed, jnp.uint32))

    return Trainable(graphdef, init)


@dataclasses.dataclass(frozen=True)
class Vocab:
    t5: int
    clip: int


@functools.lru_cache(maxsize=None)  # the same objects each time: their compiled inits are reused
def models(recipe: Recipe, vocab: Vocab, vae_factors: tuple[float, float] = (1.0, 0.0)) -> dict[str, Trainable]:
    s = recipe.sizes
    vae_cfg, t5_cfg, clip_cfg, flux_cfg = s.vae(*vae_factors), s.t5(vocab.t5), s.clip(vocab.clip), s.transformer()
    return {
        "vae": trainable(lambda dt, r: AutoencoderKL(vae_cfg, dtype=dt, rngs=r)),
        "t5": trainable(lambda dt, r: T5Encoder(t5_cfg, dtype=dt, rngs=r)),
        "clip": trainable(lambda dt, r: CLIPTextModel(clip_cfg, dtype=dt, rngs=r)),
        "transformer": trainable(lambda dt, r: FluxTransformer(flux_cfg, dtype=dt, rngs=r)),
    }


def t5_vocab_size(n_tokens: int) -> int:
    return -(-n_tokens // 8) * 8  # a multiple of 8: friendlier matmul shapes; extra rows are unused


@dataclasses.dataclass(frozen=True, eq=False)
class Flat:
    """A fixed layout between a pytree of fp32 weights and one flat vector.

    The optimizer, the EMA and the checkpoints work on the vector: one fused update instead of
    one per parameter tensor (XLA compiles the step several seconds faster on CPU and launches
    fewer kernels on GPU); the models see the pytree (static slices of the vector)."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def like(cls, tree: Any) -> "Flat":
        leaves, treedef = jax.tree.flatten(tree)
        return cls(treedef, tuple(tuple(int(d) for d in np.shape(x)) for x in leaves))

    @property
    def size(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes))

    def ravel(self, tree: Any) -> jax.Array:
        return _concat_leaves(jax.tree.leaves(tree))

    def unravel(self, vec: jax.Array) -> Any:
        out, o = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            out.append(vec[o:o + n].reshape(shape))
            o += n
        return jax.tree.unflatten(self.treedef, out)


@jax.jit
def _concat_leaves(leaves: list[jax.Array]) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])


# ------------------------------------------------------------------------------------ optimizer


def optimizer(stage: Stage) -> optax.GradientTransformation:
    """AdamW with linear warmup, cosine decay and global-norm clipping, on the flat weight vector
    (weight decay, if any, applies to every weight alike; the recipe uses none, as DiT does)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, stage.lr, max(1, stage.warmup),
                                                  max(stage.steps, stage.warmup + 1), stage.lr * stage.final_frac)
    return optax.chain(optax.clip_by_global_norm(stage.clip_norm),
                       optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=stage.weight_decay))


def ema_update(ema: jax.Array, params: jax.Array, decay: float, step: jax.Array) -> jax.Array:
    """EMA with the usual warmup (the average forgets its random start within the first steps)."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
    return ema + (1.0 - d) * (params - ema)


def apply_grads(opt: optax.GradientTransformation, state: dict, grads: jax.Array, stage: Stage, i: jax.Array) -> dict:
    updates, opt_state = opt.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "opt": opt_state}
    if "ema" in state:
        new["ema"] = ema_update(state["ema"], params, stage.ema, i)
    return new


def fresh_state(vec: jax.Array, stage: Stage) -> dict:
    state = {"params": vec, "opt": optimizer(stage).init(vec)}
    if stage.ema:
        state["ema"] = jnp.copy(vec)
    return state


# ------------------------------------------------------------------------------------ checkpoints


# ------------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class Run:
    """One training run's folder, recipe, clock and log."""

    out: Path
    recipe: Recipe
    deadline: float = math.inf           # time.monotonic() after which loops checkpoint and stop
    progress: bool = True
    workers: int | None = None
    stop_after: int | None = None        # tests: stop each stage's loop after this many steps
    log_every: int = 50                  # steps per loss record in log.jsonl (each costs a device sync)

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        saved = self.out / "recipe.json"
        mine = self.recipe.to_dict()
        if saved.is_file():
            theirs = json.loads(saved.read_text())
            if _jsonable(theirs) != _jsonable(mine):
                diff = sorted(k for k in set(mine) | set(theirs) if _jsonable(mine.get(k)) != _jsonable(theirs.get(k)))
                raise ValueError(f"{saved}: this folder was trained with another recipe (differs in {diff}); "
                                 "use a new --out folder or the same settings")
        else:
            _write_json(saved, mine)

    def log(self, **record: Any) -> None:
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps({"time": round(time.time(), 1), **record}) + "\n")

    def done(self, stage: str) -> dict | None:
        p = self.out / f"{stage}.done.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def mark_done(self, stage: str, info: dict) -> None:
        _write_json(self.out / f"{stage}.done.json", info)

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def train_loop(run: Run, name: str, stage: Stage, step_fn: Callable, init: Callable[[], dict], args: tuple) -> dict:
    """Run `state = step_fn(state, step, *args)` from the latest checkpoint (or `init()`) to stage.steps.

    state: {"params", "opt", "ema"?} pytree; step_fn returns (state, loss). Checkpoints every
    stage.ckpt_every steps, at the end, and when the time limit (or `stop_after`) stops the loop,
    which then raises OutOfTime."""
    from tqdm.auto import tqdm

    ckpt = Checkpoints(run.out / "ckpt" / name)
    try:
        start = ckpt.latest() or 0
        state = ckpt.restore(start, jax.eval_shape(init)) if start else init()
        losses: list[jax.Array] = []
        t0, n0 = time.perf_counter(), start
        saved = start
        stopped = False
        with tqdm(total=stage.steps, initial=start, desc=name, unit="step", disable=not run.progress,
                  dynamic_ncols=True) as bar:
            for step in range(start, stage.steps):
                state, loss = step_fn(state, jnp.asarray(step, jnp.int32), *args)
                losses.append(loss)
                done = step + 1
                if done % run.log_every == 0 or done == stage.steps:
                    mean = float(jnp.mean(jnp.stack(losses)))
                    rate = (done - n0) / (time.perf_counter() - t0)
                    run.log(stage=name, step=done, loss=mean, steps_per_s=round(rate, 2))
                    if not math.isfinite(mean):
                        raise FloatingPointError(f"{name}: loss is {mean} at step {done}")
                    bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
                    bar.update(len(losses))
                    losses = []
                stop = done < stage.steps and (
                    run.out_of_time() or (run.stop_after is not None and done - start >= run.stop_after))
                if done % stage.ckpt_every == 0 or done == stage.steps or stop:
                    ckpt.save(done, state)
                    saved = done
                if stop:
                    stopped = True
                    break
            bar.update(len(losses))
        if stopped:
            raise OutOfTime(f"{name}: stopped at step {done} of {stage.steps}; run the same command to continue")
        assert saved == stage.steps == ckpt.latest(), (saved, ckpt.latest())
        return state
    finally:
        ckpt.close()


def final_state(run: Run, name: str, stage: Stage, init: Callable[[], dict]) -> dict:
    """A finished stage's last checkpoint (`init`: the stage's state initializer, for its structure)."""
    ckpt = Checkpoints(run.out / "ckpt" / name)
    try:
        if ckpt.latest() != stage.steps:
            raise RuntimeError(f"{run.out}: stage {name} is not finished (checkpoint {ckpt.latest()} of {stage.steps})")
        return ckpt.restore(stage.steps, jax.eval_shape(init))
    finally:
        ckpt.close()


# ------------------------------------------------------------------------------------ stage 0: tokenizers


def stage_tokenizers(run: Run) -> Vocab:
    info = run.done("tokenizers")
    if info is None:
        s = run.recipe.sizes
        info = toklib.build_tokenizers(run.out / "tokenizers", t5_max_length=s.t5_max_length,
                                       clip_max_length=s.clip_max_length, seed=run.recipe.seed)
        if info["clip_longest"] > s.clip_train_length:
            raise ValueError(f"the longest caption is {info['clip_longest']} CLIP tokens; clip_train_length is "
                             f"{s.clip_train_length}")
        run.mark_done("tokenizers", info)
    return Vocab(t5=t5_vocab_size(info["t5"]), clip=info["clip"])


# ------------------------------------------------------------------------------------ stage 1: VAE


def to_unit(images_u8: jax.Array) -> jax.Array:
    return images_u8.astype(jnp.float32) / 127.5 - 1.0


@functools.lru_cache(maxsize=None)
def vae_layout(vae: Trainable) -> Flat:
    return Flat.like(jax.eval_shape(lambda: vae.init(0)))


@functools.lru_cache(maxsize=None)
def vae_step_fn(vae: Trainable, stage: Stage, kl: float, edge: float, seed: int) -> Callable:
    opt, flat = optimizer(stage), vae_layout(vae)

    def loss_fn(params, x, key):
        model = vae.module(params)
        mean, logvar = model.encode_moments(x)
        mean, logvar = mean.astype(jnp.float32), jnp.clip(logvar.astype(jnp.float32), -30.0, 20.0)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        rec = model.decode_raw(z).astype(jnp.float32)
        err = rec - x
        grad = lambda a, ax: jnp.diff(a, axis=ax)  # noqa: E731
        edge_l1 = jnp.mean(jnp.abs(grad(rec, 1) - grad(x, 1))) + jnp.mean(jnp.abs(grad(rec, 2) - grad(x, 2)))
        kl_term = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
        return jnp.mean(jnp.abs(err)) + jnp.mean(jnp.square(err)) + edge * edge_l1 + kl * kl_term

    @_jit
    def step(state, i, images):
        k_idx, k_flip, k_z = jax.random.split(jax.random.fold_in(jax.random.key(seed), i), 3)
        idx = jax.random.randint(k_idx, (stage.batch,), 0, images.shape[0])
        x = to_unit(images[idx])
        flip = jax.random.bernoulli(k_flip, 0.5, (stage.batch, 1, 1, 1))  # mirror images: free extra data
        x = jnp.where(flip, x[:, :, ::-1], x)
        loss, grads = jax.value_and_grad(loss_fn)(flat.unravel(state["params"]), x, k_z)
        return apply_grads(opt, state, flat.ravel(grads), stage, i), loss

    return step


@functools.lru_cache(maxsize=None)
def encode_fn(vae: Trainable) -> Callable:
    """Posterior means (unscaled), fp32, of uint8 images; weights as the flat vector."""
    flat = vae_layout(vae)

    @jax.jit
    def encode(vec, images_u8):
        mean, _ = vae.module(flat.unravel(vec)).encode_moments(to_unit(images_u8))
        return mean.astype(jnp.float32)

    return encode


def stage_vae(run: Run, vocab: Vocab) -> tuple[jax.Array, tuple[float, float]]:
    """Returns (the VAE's flat weights, (scaling_factor, shift_factor))."""
    r = run.recipe
    vae = models(r, vocab)["vae"]
    layout = vae_layout(vae)
    init = lambda: fresh_state(layout.ravel(vae.init(r.seed)), r.vae)  # noqa: E731
    info = run.done("vae")
    if info is not None:
        return final_state(run, "vae", r.vae, init)["params"], (info["scaling_factor"], info["shift_factor"])
    folder = run.out / "data" / "vae"
    cached = datalib.load_arrays(folder, ["images"])
    if cached is None:
        t = time.perf_counter()
        images = datalib.render_images(r.seed, r.vae_images, r.sizes.image_size, run.workers)
        datalib.save_arrays(folder, {"images": images}, {"n": len(images)})
        run.log(stage="vae-data", images=len(images), seconds=round(time.perf_counter() - t, 1))
    else:
        images = cached[0]["images"]
    images_dev = jnp.asarray(images)
    step = vae_step_fn(vae, r.vae, r.vae_kl, r.vae_edge, r.seed)
    state = train_loop(run, "vae", r.vae, step, init, (images_dev,))
    # FLUX-style latent normalization: one scale and shift over all channels and positions
    enc = encode_fn(vae)
    n = min(len(images), 4096)
    bs = min(256, n)
    means = np.concatenate([np.asarray(enc(state["params"], images_dev[a:a + bs])) for a in range(0, n - bs + 1, bs)])
    shift = float(means.mean())
    scale = float(1.0 / means.std())
    run.mark_done("vae", {"scaling_factor": scale, "shift_factor": shift, "latent_std": float(means.std()),
                          "latent_channel_std": [float(x) for x in means.std(axis=(0, 1, 2))]})
    return state["params"], (scale, shift)


# ------------------------------------------------------------------------------------ stage 2: latent dataset

TRAIN_ARRAYS = ("latents", "caption_idx", "t5_ids", "clip_ids")


def stage_data(run: Run, vocab: Vocab, vae_params: jax.Array, factors: tuple[float, float]) -> dict[str, np.ndarray]:
    """Render, encode and tokenize the transformer's training set (cached)."""
    r, s = run.recipe, run.recipe.sizes
    folder = run.out / "data" / "train"
    cached = datalib.load_arrays(folder, TRAIN_ARRAYS)
    if cached is not None:
        return cached[0]
    from tqdm.auto import tqdm

    t = time.perf_counter()
    enc = encode_fn(models(r, vocab)["vae"])
    scale, shift = factors
    n, size, lat = r.train_examples, s.image_size, s.latent_size
    latents = np.empty((n, lat, lat, 16), np.float16)
    captions: list[str] = []
    categories: list[str] = []
    enc_bs = 512  # a fixed encode batch (the last one padded): one compile
    pending: list[np.ndarray] = []
    done = 0

    def flush(final: bool) -> None:
        nonlocal pending, done
        images = np.concatenate(pending) if pending else np.zeros((0, size, size, 3), np.uint8)
        while len(images) >= enc_bs or (final and len(images)):
            chunk = images[:enc_bs]
            pad = enc_bs - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.uint8)])
            mean = np.asarray(enc(vae_params, jnp.asarray(chunk)))[: enc_bs - pad]
            latents[done:done + len(mean)] = scale * (mean - shift)
            done += len(mean)
            images = images[enc_bs:]
        pending = [images] if len(images) else []

    with tqdm(total=n, desc="data", unit="img", disable=not run.progress, dynamic_ncols=True) as bar:
        for images, caps, cats in datalib.iter_examples(r.seed, datalib.TRAIN_STREAM, 0, n, size, run.workers):
            captions += caps
            categories += cats
            pending.append(images)
            flush(final=False)
            bar.update(len(images))
        flush(final=True)
    assert done == n == len(captions), (done, n, len(captions))
    table, idx = datalib.caption_table(captions)
    clip_tok, t5_tok = toklib.load(run.out / "tokenizers")
    t5_ids, clip_ids = datalib.tokenize_table(table, clip_tok, t5_tok, s.t5_max_length, s.clip_train_length)
    if t5_ids.max() >= vocab.t5 or clip_ids.max() >= vocab.clip:
        raise RuntimeError("token ids beyond the encoders' vocabularies")
    cat_counts = {c: categories.count(c) for c in sorted(set(categories))}
    arrays = {"latents": latents, "caption_idx": idx, "t5_ids": t5_ids, "clip_ids": clip_ids}
    datalib.save_arrays(folder, arrays, {"n": n, "captions": table, "categories": cat_counts,
                                         # fp64 statistics: the cache is 16-bit, and a 16-bit sum overflows
                                         "latent_mean": float(latents.mean(dtype=np.float64)),
                                         "latent_std": float(latents.std(dtype=np.float64))})
    run.log(stage="data", examples=n, distinct_captions=len(table), seconds=round(time.perf_counter() - t, 1),
            latent_std=float(latents[:4096].std(dtype=np.float64)))
    return arrays


# ------------------------------------------------------------------------------------ stages 3-4: flow


def train_mu(recipe: Recipe) -> float:
    return sampler.shift_mu(recipe.sizes.image_tokens, SCHEDULER)


def flow_batch(key: jax.Array, data: dict, batch: int, mu: float, p_drop: float):
    """One batch of the rectified-flow objective: (x_t, t, target v = eps - x0, T5 ids, CLIP ids)."""
    k_idx, k_drop, k_t, k_eps = jax.random.split(key, 4)
    idx = jax.random.randint(k_idx, (batch,), 0, data["latents"].shape[0])
    x0 = sampler.pack_latents(data["latents"][idx].astype(jnp.float32))
    cap = data["caption_idx"][idx]
    cap = jnp.where(jax.random.uniform(k_drop, (batch,)) < p_drop, 0, cap)  # caption 0 is ""
    t = sampler.training_times(k_t, batch, mu)
    eps = jax.random.normal(k_eps, x0.shape)
    xt = (1.0 - t[:, None, None]) * x0 + t[:, None, None] * eps
    return xt, t, eps - x0, data["t5_ids"][cap], data["clip_ids"][cap]


def encode_text(t5: nnx.Module, clip: nnx.Module, t5_ids: jax.Array, clip_ids: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """(T5 sequence, pooled CLIP) for token ids, as the pipelines compute them."""
    return t5(t5_ids), clip(clip_ids)[1]


def velocity(flux: nnx.Module, xt: jax.Array, t: jax.Array, txt: jax.Array, pooled: jax.Array, guidance: jax.Array,
             side: int) -> jax.Array:
    b = xt.shape[0]
    return flux(img=xt.astype(COMPUTE), img_ids=sampler.image_ids(b, side, side), txt=txt,
                txt_ids=jnp.zeros((b, txt.shape[1], 3), jnp.float32), timesteps=t, y=pooled,
                guidance=guidance).astype(jnp.float32)


def flow_models(recipe: Recipe, vocab: Vocab) -> tuple[Trainable, Trainable, Trainable]:
    m = models(recipe, vocab)
    return m["transformer"], m["t5"], m["clip"]


@functools.lru_cache(maxsize=None)
def flow_layouts(m: tuple[Trainable, Trainable, Trainable]) -> tuple[Flat, Flat]:
    """(layout of phase 1's {"transformer", "t5", "clip"} weights, layout of the transformer's alone)."""
    flux_m, t5_m, clip_m = m
    tree = jax.eval_shape(lambda: {"transformer": flux_m.init(0), "t5": t5_m.init(0), "clip": clip_m.init(0)})
    return Flat.like(tree), Flat.like(tree["transformer"])


@functools.lru_cache(maxsize=None)
def flow_step_fn(m: tuple[Trainable, Trainable, Trainable], recipe: Recipe) -> Callable:
    """Phase 1: transformer, T5 and CLIP trained together on the rectified-flow loss."""
    flux_m, t5_m, clip_m = m
    stage, side, mu = recipe.transformer, recipe.sizes.latent_size, train_mu(recipe)
    opt, (flat, _) = optimizer(stage), flow_layouts(m)

    def loss_fn(params, xt, t, target, t5_ids, clip_ids):
        txt, pooled = encode_text(t5_m.module(params["t5"]), clip_m.module(params["clip"]), t5_ids, clip_ids)
        ones = jnp.ones((xt.shape[0],), jnp.float32)  # guidance input: 1 = "no guidance" in this phase
        v = velocity(flux_m.module(params["transformer"]), xt, t, txt, pooled, ones, side)
        return jnp.mean(jnp.square(v - target))

    @_jit
    def step(state, i, data):
        key = jax.random.fold_in(jax.random.key(recipe.seed + 1), i)
        batch = flow_batch(key, data, stage.batch, mu, recipe.caption_dropout)
        loss, grads = jax.value_and_grad(loss_fn)(flat.unravel(state["params"]), *batch)
        return apply_grads(opt, state, flat.ravel(grads), stage, i), loss

    return step


@functools.lru_cache(maxsize=None)
def distill_step_fn(m: tuple[Trainable, Trainable, Trainable], recipe: Recipe) -> Callable:
    """Phase 2: the student (transformer only) learns the teacher's guided velocity for a guidance input g."""
    flux_m, t5_m, clip_m = m
    stage, side, mu = recipe.distill, recipe.sizes.latent_size, train_mu(recipe)
    g_lo, g_hi = recipe.guidance_range
    opt, (teacher_flat, flat) = optimizer(stage), flow_layouts(m)

    def loss_fn(params, xt, t, target, txt, pooled, g):
        return jnp.mean(jnp.square(velocity(flux_m.module(params), xt, t, txt, pooled, g, side) - target))

    @_jit
    def step(state, i, data, teacher_vec):
        tp = teacher_flat.unravel(teacher_vec)  # frozen: fp32 EMA weights of phase 1, run in bf16
        key = jax.random.fold_in(jax.random.key(recipe.seed + 2), i)
        k_batch, k_g = jax.random.split(key)
        # the flow target is replaced by the teacher's guided velocity; caption dropout stays: an
        # empty prompt's target is then v_uncond for every g
        xt, t, _, t5_ids, clip_ids = flow_batch(k_batch, data, stage.batch, mu, recipe.caption_dropout)
        b = xt.shape[0]
        t5_all = jnp.concatenate([t5_ids, jnp.broadcast_to(data["t5_ids"][0], t5_ids.shape)])
        clip_all = jnp.concatenate([clip_ids, jnp.broadcast_to(data["clip_ids"][0], clip_ids.shape)])
        txt, pooled = encode_text(t5_m.module(tp["t5"]), clip_m.module(tp["clip"]), t5_all, clip_all)
        v = velocity(flux_m.module(tp["transformer"]), jnp.concatenate([xt, xt]), jnp.concatenate([t, t]), txt,
                     pooled, jnp.ones((2 * b,), jnp.float32), side)
        v_c, v_u = v[:b], v[b:]
        g = jax.random.uniform(k_g, (b,), minval=g_lo, maxval=g_hi)
        target = jax.lax.stop_gradient(v_u + g[:, None, None] * (v_c - v_u))
        txt, pooled = jax.lax.stop_gradient((txt[:b], pooled[:b]))
        loss, grads = jax.value_and_grad(loss_fn)(flat.unravel(state["params"]), xt, t, target, txt, pooled, g)
        return apply_grads(opt, state, flat.ravel(grads), stage, i), loss

    return step


def phase1_init(recipe: Recipe, vocab: Vocab) -> Callable[[], dict]:
    """Phase 1's initial train state, as a function (called only when no checkpoint exists)."""
    m = flow_models(recipe, vocab)
    flux_m, t5_m, clip_m = m

    def init() -> dict:
        params = {"transformer": flux_m.init(recipe.seed + 10), "t5": t5_m.init(recipe.seed + 11),
                  "clip": clip_m.init(recipe.seed + 12)}
        return fresh_state(flow_layouts(m)[0].ravel(params), recipe.transformer)

    return init


def stage_transformer(run: Run, vocab: Vocab, data: dict[str, np.ndarray] | None) -> jax.Array:
    """Returns phase 1's EMA weights {"transformer", "t5", "clip"} as one flat vector (fp32)."""
    r = run.recipe
    init = phase1_init(r, vocab)
    if run.done("transformer") is not None:
        return final_state(run, "transformer", r.transformer, init)["ema"]
    step = flow_step_fn(flow_models(r, vocab), r)
    state = train_loop(run, "transformer", r.transformer, step, init, (_device_data(data),))
    run.mark_done("transformer", {"steps": r.transformer.steps})
    return state["ema"]


def stage_distill(run: Run, vocab: Vocab, data: dict[str, np.ndarray] | None, teacher: jax.Array) -> jax.Array:
    """Returns the guidance-distilled transformer's EMA weights (flat, fp32)."""
    r = run.recipe
    m = flow_models(r, vocab)
    teacher_flat, flat = flow_layouts(m)
    init = lambda: fresh_state(flat.ravel(teacher_flat.unravel(teacher)["transformer"]), r.distill)  # noqa: E731
    if run.done("distill") is not None:
        return final_state(run, "distill", r.distill, init)["ema"]
    step = distill_step_fn(m, r)
    # the teacher is an argument of the step, not a constant folded into the compiled program
    state = train_loop(run, "distill", r.distill, step, init, (_device_data(data), teacher))
    run.mark_done("distill", {"steps": r.distill.steps, "guidance_range": list(r.guidance_range)})
    return state["ema"]


def _device_data(data: dict[str, np.ndarray] | None) -> dict[str, jax.Array]:
    if data is None:
        raise RuntimeError("the training data is missing; run the data stage first")
    return {k: jnp.asarray(v) for k, v in data.items()}


# ------------------------------------------------------------------------------------ driver


def run_recipe(out: str | Path, recipe: Recipe, *, until: str = "export", export_dir: str | Path | None = None,
               time_limit_min: float | None = None, progress: bool = True, workers: int | None = None,
               stop_after: int | None = None, log_every: int = 50) -> Path | None:
    """Run (or continue) every stage up to and including `until`. Returns the export folder when
    the export ran. Raises OutOfTime when the time limit (or `stop_after`) interrupted a stage."""
    if until not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {until!r}")
    deadline = time.monotonic() + 60 * time_limit_min if time_limit_min else math.inf
    run = Run(Path(out), recipe, deadline, progress, workers, stop_after, log_every)
    last = STAGES.index(until)
    vocab = stage_tokenizers(run)
    if last == 0:
        return None
    vae_params, factors = stage_vae(run, vocab)
    if last == 1:
        return None
    need_data = run.done("distill") is None
    data = stage_data(run, vocab, vae_params, factors) if need_data or last == 2 else None
    if last == 2:
        return None
    teacher = stage_transformer(run, vocab, data)
    if last == 3:
        return None
    student = stage_distill(run, vocab, data, teacher)
    if last == 4:
        return None
    from .export import export

    target = Path(export_dir) if export_dir is not None else run.out / "model"
    export(target, **export_weights(recipe, vocab, vae_params, teacher, student), recipe=recipe,
           tokenizer_dir=run.out / "tokenizers", vocab=vocab, vae_factors=factors, provenance=_provenance(run))
    return target


def export_weights(recipe: Recipe, vocab: Vocab, vae_vec: jax.Array, teacher_vec: jax.Array,
                   student_vec: jax.Array) -> dict[str, Any]:
    """The flat vectors as the per-component weight pytrees export() takes: the VAE, phase 1's
    (EMA) text encoders, and the distilled student transformer (EMA)."""
    m = flow_models(recipe, vocab)
    teacher_flat, flat = flow_layouts(m)
    teacher = teacher_flat.unravel(teacher_vec)
    return {"vae_params": vae_layout(models(recipe, vocab)["vae"]).unravel(vae_vec), "t5_params": teacher["t5"],
            "clip_params": teacher["clip"], "transformer_params": flat.unravel(student_vec)}


def _provenance(run: Run) -> dict:
    info = {"recipe": run.recipe.to_dict(), "vae": run.done("vae"), "tokenizers": run.done("tokenizers")}
    log = run.out / "log.jsonl"
    if log.is_file():
        last: dict[str, dict] = {}
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if "stage" in rec and "loss" in rec:
                last[rec["stage"]] = {"step": rec["step"], "loss": rec["loss"]}
        info["final_losses"] = last
    return info


def gpu_run_settings() -> None:
    """The settings the recipe was measured with on an H200 (jax 0.11.2), unless already set.

    XLA's deterministic GPU ops: reductions and scatter-adds (the text encoders' embedding
    gradients) in a fixed order, so a resumed run is bit-exact; they are also faster here:
    without them the bf16 atomic scatter-adds into the ~56-row T5 table made the phase-1 step
    6x slower (8 vs 47 steps/s). XLA's attention rather than cuDNN's fused kernel: under
    deterministic ops the cuDNN backward failed to compile (XLA raised IndexError
    raw_hash_map::at), and at 96 tokens the XLA path costs ~20% of the distillation step at most.
    XLA reads its flags when the backend starts, i.e. at the first computation, after this."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_gpu_deterministic_ops=true").strip()
    os.environ.setdefault("FLAXFLUX_ATTENTION", "xla")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flaxflux.refmodel.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run folder: tokenizers, data cache, checkpoints, log (resumable)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="reference")
    p.add_argument("--stage", choices=STAGES, default="export", help="run up to and including this stage")
    p.add_argument("--export", dest="export_dir", help="where the diffusers-layout folder goes (default OUT/model)")
    p.add_argument("--time-limit", type=float, help="minutes; checkpoint and exit 3 when reached (rerun to continue)")
    p.add_argument("--workers", type=int, help="rendering processes (default: all cores)")
    p.add_argument("--seed", type=int)
    p.add_argument("--vae-steps", type=int)
    p.add_argument("--transformer-steps", type=int)
    p.add_argument("--distill-steps", type=int)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    gpu_run_settings()
    # compiled steps persist in the run folder: a continued run (--time-limit) skips recompiling
    jax.config.update("jax_compilation_cache_dir", str(Path(args.out).resolve() / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    recipe = PRESETS[args.preset]
    if args.seed is not None:
        recipe = dataclasses.replace(recipe, seed=args.seed)
    for name in ("vae", "transformer", "distill"):
        steps = getattr(args, f"{name}_steps")
        if steps is not None:
            recipe = dataclasses.replace(recipe, **{name: dataclasses.replace(getattr(recipe, name), steps=steps)})
    try:
        target = run_recipe(args.out, recipe, until=args.stage, export_dir=args.export_dir,
                            time_limit_min=args.time_limit, progress=not args.no_progress, workers=args.workers)
    except OutOfTime as e:
        print(f"time limit: {e}", file=sys.stderr)
        return 3
    except (ValueError, OSError) as e:  # bad settings or files: one clear line, as the flaxflux CLI
        print(f"refmodel.train: error: {e}", file=sys.stderr)
        return 2
    if target is not None:
        print(f"exported the reference model to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
