"""`flaxflux demo`: the end-to-end job on a model the project makes itself.

With the trained reference model shipped (flaxflux/refmodel/model), it runs that model's demo
(bf16 and 1.58-bit side by side, GenEval-mini scores). Until then it builds a small random FLUX transformer, writes
it as a BFL-named checkpoint, loads it back through the real loader and runs the jitted forward
pass in bf16 and float32, printing the agreement and timings.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import FluxConfig
from .loading import load_transformer, save_bfl_file
from .transformer import FluxTransformer

DEMO_CONFIG = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=128, hidden_size=256,
                         num_heads=4, depth=2, depth_single_blocks=4, axes_dim=(8, 28, 28))


def run_demo(out_dir: str | Path = "out") -> None:
    from .refmodel import SHIPPED_MODEL, demo

    if (SHIPPED_MODEL / "model_index.json").is_file():  # the trained reference model, once shipped
        demo(out_dir)
        return
    print(f"note: the trained reference model is not in this version ({SHIPPED_MODEL} is empty); "
          "running the loader and jitted forward pass on a small random transformer instead")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = DEMO_CONFIG
    path = out / "demo-transformer.safetensors"
    save_bfl_file(FluxTransformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), path)
    print(f"wrote a random {sum(x.size for x in jax.tree.leaves(nnx.state(load_transformer(path, jnp.float32, cfg)))):,}"
          f"-parameter FLUX transformer to {path}")

    rng = np.random.default_rng(0)
    h = w = 16  # a 256x256 image: 16x16 latent patches
    ids = np.zeros((1, h * w, 3), np.float32)
    ids[0, :, 1], ids[0, :, 2] = np.repeat(np.arange(h), w), np.tile(np.arange(w), h)
    x = dict(img=rng.standard_normal((1, h * w, 64), np.float32), img_ids=ids,
             txt=rng.standard_normal((1, 32, 128), np.float32), txt_ids=np.zeros((1, 32, 3), np.float32),
             timesteps=np.array([0.7], np.float32), y=rng.standard_normal((1, 64), np.float32),
             guidance=np.array([3.5], np.float32))
    outs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        graphdef, state = nnx.split(load_transformer(path, dtype=dtype, config=cfg))
        fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(**x))
        t0 = time.perf_counter()
        fwd(state, x).block_until_ready()
        t1 = time.perf_counter()
        outs[jnp.dtype(dtype).name] = np.asarray(fwd(state, x).block_until_ready(), np.float32)
        t2 = time.perf_counter()
        print(f"{jnp.dtype(dtype).name:>8}: compile+run {t1 - t0:.2f} s, run {1e3 * (t2 - t1):.1f} ms")
    a, b = outs["bfloat16"], outs["float32"]
    print(f"bf16 vs float32 relative L2 difference: {np.linalg.norm(a - b) / np.linalg.norm(b):.2e}")
