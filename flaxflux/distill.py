"""Self-supervised ternary distillation: turn a bf16 FLUX into a 1.58-bit one without image data.

    flaxflux distill TEACHER_DIR PROMPTS.txt OUT [--steps --lr --batch --size ...]

The student is the teacher with every block linear replaced by a `QATLinear`: a latent
full-precision weight ternarized in the forward pass (absmean-initialised learnable scale per
output channel by default, straight-through gradient), so the exported model is exactly what
was trained. Everything the student learns from comes from the teacher:

1. Teacher data. For each calibration prompt, `samples_per_prompt` noises eps_i (a pure function
   of the seed and the sample index) and guidances g_i ~ U(guidance_range) are run through the
   teacher's own sampler (`sample_steps` Euler steps): its final latents x0_i. Cached on disk
   (text embeddings, x0, g) once; the noise is regenerated from its index.
2. Objective: velocity matching on the teacher's coupling. A step draws samples i and times t
   (FLUX's logit-normal, shifted by the scheduler's mu at this resolution: where training and
   sampling put their weight), forms x_t = (1 - t) x0_i + t eps_i (the straight line between a
   noise and the image the teacher makes of it, i.e. the points the teacher's near-straight
   trajectory passes), and regresses the student's velocity onto the teacher's at (x_t, t, text,
   g_i): mean squared error, fp32. Chosen by measurement over `objective="flow"` (reflow: regress
   onto eps_i - x0_i, no teacher call in the step), which scored 5.8 GenEval-mini points lower
   on the reference model (benchmarks/RESULTS.md).
   On-policy rows (`onpolicy`, DAgger-style): the teacher's line is where the teacher goes, not
   where the student goes when it samples, and the student's errors compound along its own
   trajectory. So every `rollout_every` steps the current student samples `rollouts()` training
   noises with the teacher-data sampler and keeps every intermediate state; that fraction of
   each later batch is drawn from those states (at their sigma) and regressed onto the teacher's
   velocity there. The states are saved in the work folder, so a resumed run sees the same ones.
   Measured on the reference model (benchmarks/RESULTS.md, 4608 images per variant): 0.25 of
   each batch on-policy took GenEval-mini from 96.8 % of bf16 (all rows on the teacher's line)
   to 98.7 % and 98.5 % (two training seeds); 0.5 gave 98.4 % and 97.1 %. 0.25 is the default.
3. Held-out metrics, on fixed samples of prompts kept out of training (the last `holdout`
   prompts of the file), logged with the loss: the relative velocity error
   ||v_S - v_T||^2 / ||v_T||^2 on the teacher's line, and the relative final-latent error
   ||x0_S - x0_T||^2 / ||x0_T||^2 of the student's own sampling from the teacher's noises.

Sharding (the same code on 1 device or many, one host or several): one mesh axis "data" over
every device; parameters, optimizer state and the teacher are sharded FSDP-style (each array
along its largest axis that the device count divides; small arrays replicated), the batch is
split along it; each block's weights are gathered inside the layer loop (one block at a
time) and XLA inserts the all-gathers and reduce-scatters. Multi-host: call
`jax.distributed.initialize()` first (`--distributed`); each process feeds its rows of the
batch. Checkpoints: Orbax (atomic), every `ckpt_every` steps and at a time-limit stop; a resumed
run continues bit-exactly (the batch of step s is a pure function of (seed, s)).

Work files (teacher data, checkpoints, log.jsonl) live in OUT.work beside OUT; OUT itself, a
normal ternary flaxflux folder (packed transformer + the teacher's other components), appears
atomically at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import sampler
from .checkpoints import Checkpoints
from .ternary import QATLinear, from_qat, to_qat

COMPUTE = jnp.bfloat16
NOISE_STREAM, TIME_STREAM, BATCH_STREAM, GUIDANCE_STREAM, ROLLOUT_STREAM, ONPOLICY_STREAM = 1, 2, 3, 4, 5, 6
MIN_SHARDED = 2**14                 # arrays smaller than this stay replicated (norm scales, biases)
OBJECTIVES = ("velocity", "flow")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    steps: int = 4000
    batch: int = 64
    lr: float = 2e-4
    warmup: int = 100
    final_frac: float = 0.1          # cosine decay to lr * final_frac
    clip_norm: float = 1.0
    granularity: str = "channel"
    objective: str = "velocity"      # "velocity": the teacher's; "flow": eps - x0 on the teacher's pairs
    onpolicy: float = 0.25           # fraction of each batch from the student's own trajectories
    rollout_every: int = 500         # steps between refreshes of those trajectories (first at this step)
    rollout_samples: int | None = None  # samples the student rolls out per refresh; None: 8 x batch
    samples_per_prompt: int = 4
    sample_steps: int = 28           # teacher sampler steps for the teacher data
    guidance_range: tuple[float, float] = (1.0, 5.0)
    size: int | None = None          # image side; None: the scheduler's base resolution
    holdout: int = 16                # prompts kept out for the held-out velocity error
    eval_samples: int = 64
    eval_every: int = 250
    ckpt_every: int = 500
    log_every: int = 50
    gen_batch: int = 64              # teacher sampling batch for the teacher data
    seed: int = 0
    remat: bool = False              # recompute block activations in the backward pass (big models)

    def rollouts(self) -> int:
        """Samples rolled out per refresh: 8 per batch row by default (the measured recipe: 2048 at
        batch 256, each state drawn about half a time), so their cost scales with the batch: with
        28 sampling steps every 500 train steps, 0.45 forwards per row and step."""
        return self.rollout_samples if self.rollout_samples is not None else 8 * self.batch

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ------------------------------------------------------------------------------------ sharding


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """One axis, "data", over every device (all processes' devices under jax.distributed)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def fsdp_spec(shape: Sequence[int], n: int) -> P:
    """Shard an array along its largest axis divisible by n; replicate small or indivisible ones."""
    if n == 1 or math.prod(shape) < MIN_SHARDED:
        return P()
    axes = [a for a in sorted(range(len(shape)), key=lambda a: -shape[a]) if shape[a] % n == 0]
    if not axes:
        return P()
    spec = [None] * len(shape)
    spec[axes[0]] = "data"
    return P(*spec)


def fsdp_shardings(tree: Any, mesh: Mesh) -> Any:
    n = mesh.devices.size
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), n)), tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


# ------------------------------------------------------------------------------------ models


def student_from(teacher_f32: nnx.Module, granularity: str) -> nnx.Module:
    """The student: the teacher (fp32 copy) with QAT block linears."""
    return to_qat(teacher_f32, granularity)


def _qat_paths(model: nnx.Module) -> set[tuple[str, ...]]:
    return {tuple(str(p) for p in path) for path, node in nnx.iter_graph(model) if isinstance(node, QATLinear)}


def compute_cast(params: Any, keep_fp32: set[tuple[str, ...]]) -> Any:
    """bf16 compute copy of fp32 master weights, except the QAT latent weights and scales, which
    the forward pass ternarizes in fp32 (so its codes are exactly those `to_ternary` packs)."""
    def cast(path, x):
        names = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        if names[:-1] in keep_fp32 and names[-1] in ("weight", "weight_scale"):
            return x
        return x.astype(COMPUTE) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree_util.tree_map_with_path(cast, params)


def velocity(model: nnx.Module, xt: jax.Array, t: jax.Array, txt: jax.Array, pooled: jax.Array, g: jax.Array,
             img_ids: jax.Array, remat: bool = False, layer_hook: Callable | None = None) -> jax.Array:
    b = xt.shape[0]
    guidance = g if model.config.guidance_embed else None
    return model(img=xt.astype(COMPUTE), img_ids=img_ids, txt=txt.astype(COMPUTE),
                 txt_ids=jnp.zeros((b, txt.shape[1], 3), jnp.float32), timesteps=t, y=pooled,
                 guidance=guidance, remat=remat, layer_hook=layer_hook).astype(jnp.float32)


def noise(seed: int, idx: jax.Array, tokens: int, channels: int) -> jax.Array:
    """The packed initial noise of teacher sample idx (B,) -> (B, tokens, channels) fp32."""
    key = jax.random.fold_in(jax.random.key(seed), NOISE_STREAM)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (tokens, channels)))(idx)


# ------------------------------------------------------------------------------------ the step


def optimizer(cfg: DistillConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(1, cfg.warmup), max(cfg.steps, cfg.warmup + 1),
                                                  cfg.lr * cfg.final_frac)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=0.0))


@dataclasses.dataclass(frozen=True, eq=False)
class Step:
    """The jitted train and eval steps for one (student, teacher, resolution, mesh)."""

    train: Callable      # (state, teacher, batch) -> (state, loss)
    eval: Callable       # (params, teacher, batch) -> (sum sq err, sum sq teacher)
    rollout: Callable    # (params, batch, sigmas) -> (states before each step (S, B, L, C) bf16, final fp32)


def make_step(student_gd: nnx.GraphDef, teacher_gd: nnx.GraphDef, keep_fp32: set[tuple[str, ...]],
              cfg: DistillConfig, side: tuple[int, int], mu: float, mesh: Mesh) -> Step:
    """Batch: {"idx" (B,) int32, "x0" (B, L, 64), "txt" (B, Lt, D), "pooled" (B, Dc), "g" (B,)}, and
    with cfg.onpolicy > 0 also {"xs" (B, L, 64), "ts" (B,), "on" (B,) bool}: rows where "on" is
    set are evaluated at (xs, ts), a state of the student's own sampling, instead of the line."""
    h, w = side
    tokens = (h // 2) * (w // 2)
    opt = optimizer(cfg)

    def split(x):
        """Keep x split over "data": arrays made inside the step (times, noise, ids) are
        otherwise replicated, and XLA then runs both models on the whole batch on every device."""
        return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim))

    replicated = NamedSharding(mesh, P())

    def gather(layer_params):
        """FSDP: all-gather one block's weights inside the layer loop (and again in the backward
        pass), so activations stay split by batch; without it XLA shards the attention by heads
        and keeps the whole batch on every device."""
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, replicated), layer_params)

    hook = gather if mesh.devices.size > 1 else None

    def line(batch, t):
        """x_t on the straight line from the teacher's sample x0 to the noise eps it came from
        (or, on on-policy rows, the student's state xs; t is then already ts)."""
        x0 = batch["x0"].astype(jnp.float32)
        eps = split(noise(cfg.seed, batch["idx"], tokens, x0.shape[-1]))
        xt = split((1.0 - t[:, None, None]) * x0 + t[:, None, None] * eps)
        if "on" in batch:
            xt = split(jnp.where(batch["on"][:, None, None], batch["xs"].astype(jnp.float32), xt))
        return xt, split(sampler.image_ids(batch["idx"].shape[0], h, w)), eps - x0

    def prepare(teacher_params, batch, t):
        """(x_t, image ids, the teacher's velocity at x_t)."""
        xt, img_ids, _ = line(batch, t)
        teacher = nnx.merge(teacher_gd, teacher_params)
        v_t = velocity(teacher, xt, t, batch["txt"], batch["pooled"], batch["g"], img_ids, layer_hook=hook)
        return xt, img_ids, jax.lax.stop_gradient(v_t)

    def student_v(params, xt, t, batch, img_ids):
        student = nnx.merge(student_gd, compute_cast(params, keep_fp32))
        return velocity(student, xt, t, batch["txt"], batch["pooled"], batch["g"], img_ids, remat=cfg.remat,
                        layer_hook=hook)

    def train(state, teacher_params, batch):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), TIME_STREAM), state["step"])
        t = split(sampler.training_times(key, batch["idx"].shape[0], mu))
        if "on" in batch:
            t = split(jnp.where(batch["on"], batch["ts"], t))
        if cfg.objective == "flow":  # reflow on the teacher's pairs: no teacher call in the step
            xt, img_ids, v_t = line(batch, t)
        else:
            xt, img_ids, v_t = prepare(teacher_params, batch, t)

        def loss_fn(params):
            return jnp.mean(jnp.square(student_v(params, xt, t, batch, img_ids) - v_t))

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt": opt_state, "step": state["step"] + 1}, loss

    def evaluate(params, teacher_params, batch):
        t = split(batch["t"])
        xt, img_ids, v_t = prepare(teacher_params, batch, t)
        v_s = student_v(params, xt, t, batch, img_ids)
        return jnp.sum(jnp.square(v_s - v_t)), jnp.sum(jnp.square(v_t))

    def rollout(params, batch, sigmas):
        """The student's own Euler sampling from the teacher data's noises of batch["idx"]."""
        b = batch["idx"].shape[0]
        img_ids = split(sampler.image_ids(b, h, w))

        def euler(x, s):
            v = student_v(params, x, jnp.full((b,), s[0], jnp.float32), batch, img_ids)
            return split(x + (s[1] - s[0]) * v), x.astype(COMPUTE)

        x1 = split(noise(cfg.seed, batch["idx"], tokens, batch["x0"].shape[-1]))
        final, states = jax.lax.scan(euler, x1, (sigmas[:-1], sigmas[1:]))
        return states, final

    return Step(train=train, eval=evaluate, rollout=rollout)


def init_state(params: Any, cfg: DistillConfig) -> dict:
    return {"params": params, "opt": optimizer(cfg).init(params), "step": jnp.zeros((), jnp.int32)}


BATCH_NDIM = {"idx": 1, "x0": 3, "txt": 3, "pooled": 2, "g": 1}
ONPOLICY_NDIM = {"xs": 3, "ts": 1, "on": 1}


@dataclasses.dataclass(frozen=True, eq=False)
class Trainer:
    """Everything about one distillation's train step that does not depend on data."""

    student_gd: nnx.GraphDef
    step: Step
    state_abs: Any        # abstract train state (ShapeDtypeStructs carrying their shardings)
    state_sh: Any
    teacher_sh: Any
    batch_sh: dict[str, NamedSharding]
    train: Callable       # jitted, state donated: (state, teacher, batch) -> (state, loss)
    init: Callable        # jitted: teacher params -> initial train state, sharded
    rollout: Callable     # jitted Step.rollout over the sharded params


def build_trainer(teacher_gd: nnx.GraphDef, teacher_state: Any, cfg: DistillConfig, side: tuple[int, int], mu: float,
                  mesh: Mesh) -> Trainer:
    """The sharded train step for a teacher (concrete or abstract state: the memory plan in
    benchmarks/distill_memory.py compiles it for FLUX.1-dev without any weights)."""
    def make_student(ts):
        return student_from(nnx.merge(teacher_gd, jax.tree.map(lambda x: x.astype(jnp.float32), ts)),
                            cfg.granularity)

    student_abs = nnx.eval_shape(make_student, teacher_state)
    student_gd, student_abs_state = nnx.split(student_abs)
    step = make_step(student_gd, teacher_gd, _qat_paths(student_abs), cfg, side, mu, mesh)
    state_abs = jax.eval_shape(lambda p: init_state(p, cfg), student_abs_state)
    state_sh = fsdp_shardings(state_abs, mesh)
    teacher_sh = fsdp_shardings(teacher_state, mesh)
    ndim = {**BATCH_NDIM, **(ONPOLICY_NDIM if cfg.onpolicy > 0 else {})}
    batch_sh = {k: batch_sharding(mesh, nd) for k, nd in ndim.items()}
    train = jax.jit(step.train, in_shardings=(state_sh, teacher_sh, batch_sh),
                    out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=0)
    rollout_in = {k: batch_sh[k] for k in ("idx", "x0", "txt", "pooled", "g")}
    rollout = jax.jit(step.rollout, in_shardings=(state_sh["params"], rollout_in, NamedSharding(mesh, P())),
                      out_shardings=(NamedSharding(mesh, P(None, "data", None, None)), batch_sharding(mesh, 3)))
    init = jax.jit(lambda ts: init_state(nnx.state(make_student(ts)), cfg), out_shardings=state_sh)
    return Trainer(student_gd=student_gd, step=step,
                   state_abs=jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                          state_abs, state_sh),
                   state_sh=state_sh, teacher_sh=teacher_sh, batch_sh=batch_sh, train=train, init=init,
                   rollout=rollout)


# ------------------------------------------------------------------------------------ teacher data


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such prompts file (expected one prompt per line)")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{p}: no prompts (expected one prompt per line)")
    return prompts


def default_size(scheduler_config: dict) -> int:
    """The side whose image token count is the scheduler's base_image_seq_len (FLUX: 512 px;
    the reference model: 128 px): the smallest resolution the model was trained at."""
    return int(round(math.sqrt(scheduler_config["base_image_seq_len"]))) * 16


def _u16(x: jax.Array) -> np.ndarray:
    """bf16 -> its bits as uint16 (numpy has no bf16 .npy format)."""
    return np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.bfloat16), jnp.uint16))


def teacher_data(pipe: Any, prompts: list[str], cfg: DistillConfig, side: tuple[int, int], folder: Path,
                 mesh: Mesh, progress: bool = True) -> dict[str, np.ndarray]:
    """Encode every prompt and sample the teacher (see the module docstring); cached in `folder`
    (written to a temporary sibling and renamed, so a killed run regenerates it whole)."""
    if (folder / "meta.json").is_file():
        return _load_teacher_data(folder)
    h, w = side
    tokens = (h // 2) * (w // 2)
    n_p, k = len(prompts), cfg.samples_per_prompt
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    txt_parts, pooled_parts = [], []
    for i in range(0, n_p, cfg.gen_batch):
        txt, pooled = pipe.encode_prompt(prompts[i:i + cfg.gen_batch])
        txt_parts.append(_u16(txt))
        pooled_parts.append(np.asarray(pooled, np.float32))
    txt_all, pooled_all = np.concatenate(txt_parts), np.concatenate(pooled_parts)
    n_s = n_p * k
    prompt_idx = np.repeat(np.arange(n_p, dtype=np.int32), k)
    g_lo, g_hi = cfg.guidance_range
    g_all = np.random.default_rng([cfg.seed, GUIDANCE_STREAM]).uniform(g_lo, g_hi, n_s).astype(np.float32)
    channels = pipe.transformer.config.in_channels
    x0_all = np.lib.format.open_memmap(tmp / "x0.npy", mode="w+", dtype=np.uint16, shape=(n_s, tokens, channels))
    sigmas = jnp.asarray(sampler.sigma_schedule(cfg.sample_steps, tokens, pipe.scheduler_config))
    replicated = NamedSharding(mesh, P())
    teacher_state = jax.device_put(pipe._state, replicated)
    nd = mesh.devices.size
    from tqdm.auto import tqdm

    for s0 in tqdm(range(0, n_s, cfg.gen_batch), desc="teacher data", disable=not progress):
        idx = np.arange(s0, min(s0 + cfg.gen_batch, n_s), dtype=np.int32)
        b = len(idx)
        pad = (-b) % nd  # the sharded batch must divide over the devices
        idx_p = np.concatenate([idx, np.full(pad, idx[-1], np.int32)])
        bs = lambda a: jax.device_put(a, batch_sharding(mesh, np.ndim(a)))  # noqa: E731
        p = prompt_idx[idx_p]
        latents = bs(noise(cfg.seed, jnp.asarray(idx_p), tokens, channels))
        txt = bs(txt_all[p].view(jnp.bfloat16))
        bp = len(idx_p)
        out = sampler.denoise(pipe._graphdef, teacher_state, latents, sampler.image_ids(bp, h, w), txt,
                              jnp.zeros((bp, txt.shape[1], 3), jnp.float32), bs(jnp.asarray(pooled_all[p])),
                              bs(jnp.asarray(g_all[idx_p])), sigmas)
        x0_all[idx] = _u16(out)[:b]
    x0_all.flush()
    del x0_all, teacher_state
    np.save(tmp / "txt.npy", txt_all)
    np.save(tmp / "pooled.npy", pooled_all)
    np.save(tmp / "prompt_idx.npy", prompt_idx)
    np.save(tmp / "g.npy", g_all)
    (tmp / "meta.json").write_text(json.dumps({"prompts": n_p, "samples": n_s, "side": list(side),
                                               "sample_steps": cfg.sample_steps}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return _load_teacher_data(folder)


def _load_teacher_data(folder: Path) -> dict[str, np.ndarray]:
    data = {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in ("txt", "pooled", "prompt_idx", "g")}
    data["x0"] = np.load(folder / "x0.npy", mmap_mode="r")
    data["meta"] = json.loads((folder / "meta.json").read_text())
    return data


def host_batch(data: dict, idx: np.ndarray) -> dict[str, np.ndarray]:
    p = np.asarray(data["prompt_idx"][idx])
    return {"idx": idx.astype(np.int32), "x0": np.asarray(data["x0"][idx]), "txt": np.asarray(data["txt"][p]),
            "pooled": np.asarray(data["pooled"][p]), "g": np.asarray(data["g"][idx])}


def device_batch(host: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """The global batch as arrays sharded over "data"; each process contributes its own rows
    (every process computes the same global indices, then keeps its slice)."""
    nproc, pid = jax.process_count(), jax.process_index()
    out = {}
    for k, v in host.items():
        rows = v.shape[0] // nproc
        local = v[pid * rows:(pid + 1) * rows]
        if local.dtype == np.uint16:  # every uint16 array here holds bf16 bits (x0, txt, xs)
            local = local.view(jnp.bfloat16)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), local)
    return out


def batch_indices(cfg: DistillConfig, step: int, n_train: int) -> np.ndarray:
    return np.random.default_rng([cfg.seed, BATCH_STREAM, step]).integers(0, n_train, cfg.batch)


# ------------------------------------------------------------------------------------ on-policy states


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """The student's sampling states of one refresh: xs[n, j] (bf16 bits) is teacher-data sample
    idx[n] before Euler step j, at sigmas[j]."""

    step: int
    idx: np.ndarray       # (N,) int32
    xs: np.ndarray        # (N, S, L, C) uint16


def refresh_step(cfg: DistillConfig, step: int) -> int:
    """The step whose student made the states that train step `step` draws from (0: none yet)."""
    return (step // cfg.rollout_every) * cfg.rollout_every


def rollout_indices(cfg: DistillConfig, refresh: int, n_train: int) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, ROLLOUT_STREAM, refresh])
    return np.sort(rng.choice(n_train, min(cfg.rollouts(), n_train), replace=False)).astype(np.int32)


def _gather(x: jax.Array) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x))


def student_rollouts(tr: Trainer, params: Any, data: dict, idx: np.ndarray, sigmas: jax.Array, mesh: Mesh,
                     chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(states (N, S, L, C) bf16 bits, final latents (N, L, C) fp32) of the student sampling the
    teacher-data noises of samples idx, `chunk` at a time."""
    nd = mesh.devices.size
    states, finals = [], []
    for s0 in range(0, len(idx), chunk):
        part = idx[s0:s0 + chunk]
        b = len(part)
        part = np.concatenate([part, np.full((-b) % nd, part[-1], part.dtype)])  # divide over the devices
        xs, x0 = tr.rollout(params, device_batch(host_batch(data, part), mesh), sigmas)
        states.append(np.swapaxes(_u16(_gather(xs)), 0, 1)[:b])
        finals.append(_gather(x0).astype(np.float32)[:b])
    return np.concatenate(states), np.concatenate(finals)


def _rollout_file(work: Path, refresh: int) -> Path:
    return work / "rollouts" / f"{refresh:08d}.npz"


def save_rollouts(work: Path, ro: Rollouts) -> None:
    if jax.process_index() != 0:
        return
    path = _rollout_file(work, ro.step)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(".tmp-" + path.name)
    with open(tmp, "wb") as f:
        np.savez(f, idx=ro.idx, xs=ro.xs)
    os.replace(tmp, path)


def load_rollouts(work: Path, refresh: int) -> Rollouts | None:
    path = _rollout_file(work, refresh)
    if not path.is_file():
        return None
    with np.load(path) as z:
        return Rollouts(refresh, z["idx"], z["xs"])


def drop_old_rollouts(work: Path, keep_from: int) -> None:
    """Delete the states of refreshes before `keep_from` (no checkpoint can need them any more)."""
    if jax.process_index() != 0:
        return
    for f in (work / "rollouts").glob("*.npz"):
        if int(f.stem) < keep_from:
            f.unlink()


def train_batch(cfg: DistillConfig, step: int, data: dict, n_train: int, ro: Rollouts | None,
                sigmas: np.ndarray) -> dict[str, np.ndarray]:
    """The host batch of train step `step`: teacher-line rows, and with cfg.onpolicy > 0 its last
    round(onpolicy * batch) rows drawn from the student's states `ro` (none before the first refresh)."""
    idx = batch_indices(cfg, step, n_train)
    if cfg.onpolicy <= 0:
        return host_batch(data, idx)
    n_on = int(round(cfg.onpolicy * cfg.batch)) if ro is not None else 0
    rows = slice(cfg.batch - n_on, cfg.batch)
    rng = np.random.default_rng([cfg.seed, ONPOLICY_STREAM, step])
    if n_on:
        sample, state = rng.integers(0, len(ro.idx), n_on), rng.integers(0, ro.xs.shape[1], n_on)
        idx[rows] = ro.idx[sample]
    host = host_batch(data, idx)
    host["xs"] = np.zeros(host["x0"].shape, np.uint16)
    host["ts"] = np.zeros(cfg.batch, np.float32)
    host["on"] = np.zeros(cfg.batch, bool)
    if n_on:
        host["xs"][rows] = ro.xs[sample, state]
        host["ts"][rows] = sigmas[state]
        host["on"][rows] = True
    return host


# ------------------------------------------------------------------------------------ the run


class OutOfTime(Exception):
    """The time limit stopped the run after a checkpoint; the same command continues it."""


def _teacher_folder(teacher: Path, work: Path, progress: bool) -> Path:
    """A flaxflux folder of the teacher: itself, or (a raw diffusers snapshot) converted once."""
    if (teacher / "flaxflux.json").is_file():
        return teacher
    conv = work / "teacher"
    if not (conv / "flaxflux.json").is_file():
        from .convert import convert  # noqa: F811

        convert(teacher, conv, quantize="none", progress=progress, force=True)
    return conv


def distill(teacher_dir: str | Path, prompts_file: str | Path, out: str | Path, cfg: DistillConfig = DistillConfig(),
            *, work: str | Path | None = None, force: bool = False, time_limit_min: float | None = None,
            progress: bool = True, devices: Sequence[jax.Device] | None = None, export_dtype: Any = jnp.bfloat16,
            crash_after: int | None = None) -> Path:
    """Distill `teacher_dir` into the ternary flaxflux folder `out` (see the module docstring).
    Resumable: rerunning the same call continues from the last checkpoint in `work`
    (default: OUT.work). crash_after (tests): SIGKILL this process after that step."""
    from .pipeline import FluxPipeline

    teacher_dir, out = Path(teacher_dir), Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass force=True (--force) to replace it")
    if not teacher_dir.is_dir():
        raise FileNotFoundError(f"{teacher_dir}: not a folder (expected the teacher's flaxflux folder or FLUX snapshot)")
    if cfg.granularity not in ("tensor", "channel"):
        raise ValueError(f"granularity must be 'tensor' or 'channel', got {cfg.granularity!r}")
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {cfg.objective!r}")
    if not 0.0 <= cfg.onpolicy < 1.0:
        raise ValueError(f"onpolicy must be a fraction in [0, 1), got {cfg.onpolicy}")
    if cfg.onpolicy > 0 and cfg.objective != "velocity":
        raise ValueError(f"onpolicy {cfg.onpolicy} needs objective='velocity' (the student's states have no flow "
                         "target); pass onpolicy=0 (--onpolicy 0) with objective='flow'")
    if cfg.onpolicy > 0 and (cfg.rollout_every < 1 or cfg.rollouts() < 1):
        raise ValueError(f"rollout_every and rollout_samples must be >= 1, got {cfg.rollout_every}, "
                         f"{cfg.rollout_samples}")
    prompts = read_prompts(prompts_file)
    if len(prompts) <= cfg.holdout:
        raise ValueError(f"{prompts_file}: {len(prompts)} prompts, but {cfg.holdout} are held out for evaluation; "
                         "give more prompts or a smaller --holdout")
    work = Path(work) if work is not None else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    _check_same_run(work, cfg, prompts)
    mesh = make_mesh(devices)
    n_dev = mesh.devices.size
    if cfg.batch % n_dev:
        raise ValueError(f"batch {cfg.batch} must be a multiple of the device count {n_dev}")
    log = _Log(work / "log.jsonl")

    teacher_dir = _teacher_folder(teacher_dir, work, progress)
    pipe = FluxPipeline.from_pretrained(teacher_dir, dtype=COMPUTE)
    size = cfg.size or default_size(pipe.scheduler_config)
    side = sampler.latent_size(size, size, pipe.vae_scale)
    tokens = (side[0] // 2) * (side[1] // 2)
    mu = sampler.shift_mu(tokens, pipe.scheduler_config)
    sigmas_np = sampler.sigma_schedule(cfg.sample_steps, tokens, pipe.scheduler_config).astype(np.float32)
    sigmas = jnp.asarray(sigmas_np)
    t0 = time.perf_counter()
    data = teacher_data(pipe, prompts, cfg, side, work / "teacher_data", mesh, progress)
    log.write(stage="teacher_data", samples=int(data["meta"]["samples"]), seconds=round(time.perf_counter() - t0, 1))

    # teacher: bf16, sharded; student: fp32 master copy of the teacher with QAT block linears
    teacher_gd, teacher_state = nnx.split(pipe.transformer)
    del pipe
    tr = build_trainer(teacher_gd, teacher_state, cfg, side, mu, mesh)
    teacher_state = jax.device_put(teacher_state, tr.teacher_sh)
    train = tr.train

    ckpt = Checkpoints(work / "ckpt")
    latest = ckpt.latest()
    if latest is None:
        state = tr.init(teacher_state)
        start = 0
    else:
        state = ckpt.restore(latest, tr.state_abs)
        start = latest

    n_train = int(np.sum(np.asarray(data["prompt_idx"]) < len(prompts) - cfg.holdout))
    evaluate = _evaluator(tr, data, cfg, mesh, n_train, mu, sigmas)
    if start == 0:
        log.write(stage="distill", step=0, **evaluate(state["params"], teacher_state))
    deadline = time.monotonic() + 60 * time_limit_min if time_limit_min else math.inf
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc="distill", disable=not progress)
    t_last, s_last = time.perf_counter(), start
    ro = None
    for s in range(start, cfg.steps):
        r = refresh_step(cfg, s)
        if cfg.onpolicy > 0 and r > 0 and (ro is None or ro.step != r):
            ro = _refresh(tr, state["params"], data, cfg, s, n_train, sigmas, mesh, work, log)
        batch = device_batch(train_batch(cfg, s, data, n_train, ro, sigmas_np), mesh)
        state, loss = train(state, teacher_state, batch)
        done = s + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            loss = float(loss)
            now = time.perf_counter()
            rec = {"stage": "distill", "step": done, "loss": loss,
                   "steps_per_s": round((done - s_last) / (now - t_last), 2)}
            if done % cfg.eval_every == 0 or done == cfg.steps:
                rec.update(evaluate(state["params"], teacher_state))
            log.write(**rec)
            bar.set_postfix(loss=f"{loss:.4f}")
            t_last, s_last = time.perf_counter(), done
        out_of_time = time.monotonic() > deadline
        if done % cfg.ckpt_every == 0 or done == cfg.steps or out_of_time:
            ckpt.save(done, state)
            if cfg.onpolicy > 0:
                drop_old_rollouts(work, refresh_step(cfg, done))
        if crash_after is not None and done == crash_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if out_of_time and done < cfg.steps:
            bar.close()
            ckpt.close()
            raise OutOfTime(f"stopped at step {done} of {cfg.steps}; rerun the same command to continue")
    bar.close()
    ckpt.close()
    model = export_student(tr.student_gd, state["params"], dtype=export_dtype)
    if jax.process_index() != 0:
        return out
    from .convert import save_transformer

    save_transformer(model, out, force=force, components_from=teacher_dir,
                     source={"distilled_from": str(teacher_dir.resolve()), "distill": cfg.to_dict(),
                             "prompts": len(prompts)})
    return out


def export_student(student_gd: nnx.GraphDef, params: Any, dtype: Any = jnp.bfloat16) -> nnx.Module:
    """The ternary FluxTransformer the student's forward pass computes: packed codes and learned
    scales (fp32, as TernaryLinear holds them) for the block linears, everything else in `dtype`."""
    from jax.experimental import multihost_utils

    gather = lambda x: np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x))  # noqa: E731
    model = nnx.merge(student_gd, jax.tree.map(lambda x: jnp.asarray(gather(x)), params))
    from_qat(model, dtype)

    def cast(path, x):
        names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        return x if names[-1] == "weight_scale" or x.dtype != jnp.float32 else x.astype(dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(cast, nnx.state(model)))
    model.dtype = jnp.dtype(dtype)
    return model


def _refresh(tr: Trainer, params: Any, data: dict, cfg: DistillConfig, step: int, n_train: int, sigmas: jax.Array,
             mesh: Mesh, work: Path, log: "_Log") -> Rollouts:
    """The student states for train steps [refresh, refresh + rollout_every): saved ones (a resumed
    run), or made now by the current student, which must then be the student after `refresh` steps."""
    r = refresh_step(cfg, step)
    ro = load_rollouts(work, r)
    if ro is not None:
        return ro
    if step != r:
        raise RuntimeError(f"{_rollout_file(work, r)} is missing: the student states of step {r}, needed to "
                           f"continue at step {step}, were deleted; restart with a fresh --work")
    t0 = time.perf_counter()
    idx = rollout_indices(cfg, r, n_train)
    xs, _ = student_rollouts(tr, params, data, idx, sigmas, mesh, cfg.batch)
    ro = Rollouts(r, idx, xs)
    save_rollouts(work, ro)
    log.write(stage="rollout", step=r, samples=len(idx), seconds=round(time.perf_counter() - t0, 1))
    return ro


def _evaluator(tr: Trainer, data: dict, cfg: DistillConfig, mesh: Mesh, n_train: int, mu: float,
               sigmas: jax.Array) -> Callable:
    """Held-out errors on fixed samples of the held-out prompts: relative velocity error on the
    teacher's line, and relative error of the student's own final latents against the teacher's."""
    n_s = int(data["meta"]["samples"])
    held = np.arange(n_train, n_s)
    n = min(cfg.eval_samples, len(held))
    n -= n % mesh.devices.size
    if n <= 0:
        return lambda *_: {"heldout_rel_err": float("nan"), "heldout_x0_err": float("nan")}
    idx = held[np.linspace(0, len(held) - 1, n).astype(np.int64)]
    host = host_batch(data, idx)
    # fixed times spread over (0, 1), shifted like training's
    u = (np.arange(n) + 0.5) / n
    host["t"] = sampler.time_shift(mu, u).astype(np.float32)
    batch = device_batch(host, mesh)
    fn = jax.jit(tr.step.eval, in_shardings=(tr.state_sh["params"], tr.teacher_sh,
                                             {k: batch_sharding(mesh, np.ndim(v)) for k, v in host.items()}))
    x0_teacher = host["x0"].view(jnp.bfloat16).astype(np.float32)

    def evaluate(params, teacher_state) -> dict[str, float]:
        err, ref = fn(params, teacher_state, batch)
        _, x0 = student_rollouts(tr, params, data, idx, sigmas, mesh, cfg.batch)
        x0_err = float(np.sum(np.square(x0 - x0_teacher)) / np.sum(np.square(x0_teacher)))
        return {"heldout_rel_err": float(err) / float(ref), "heldout_x0_err": x0_err}

    return evaluate


class _Log:
    def __init__(self, path: Path):
        self.path = path

    def write(self, **record: Any) -> None:
        if jax.process_index() != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 1), **record}) + "\n")


def _check_same_run(work: Path, cfg: DistillConfig, prompts: list[str]) -> None:
    """A work folder belongs to one (config, prompts): resuming with other settings is refused."""
    import hashlib

    mine = {"config": cfg.to_dict(), "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}
    saved = work / "run.json"
    if saved.is_file():
        theirs = json.loads(saved.read_text())
        if theirs != mine:
            raise ValueError(f"{saved}: this work folder belongs to another distillation (other settings or "
                             "prompts); use another OUT or --work, or the same settings")
    else:
        tmp = saved.with_name(".run.json.tmp")
        tmp.write_text(json.dumps(mine, indent=2))
        os.replace(tmp, saved)
