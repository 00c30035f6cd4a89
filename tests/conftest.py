"""Shared fixtures: tiny random FLUX configs, reference models and inputs."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import jax
import numpy as np
import pytest

try:
    import torch

    torch.set_num_threads(1)  # two xdist workers on two cores
except ImportError:  # the GPU machine has no diffusers; parity tests skip there
    torch = None


def pytest_collection_modifyitems(config, items):
    on_gpu = any(d.platform == "gpu" for d in jax.devices())
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(skip)


# Three small diffusers configs: with and without guidance, odd head counts and RoPE axes.
TINY_CONFIGS = {
    "dev": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
                num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=24,
                guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    "schnell": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=32,
                    num_attention_heads=2, joint_attention_dim=40, pooled_projection_dim=16,
                    guidance_embeds=False, axes_dims_rope=(8, 12, 12)),
    "odd": dict(patch_size=1, in_channels=8, out_channels=12, num_layers=3, num_single_layers=1,
                attention_head_dim=24, num_attention_heads=3, joint_attention_dim=20,
                pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(4, 10, 10)),
}


def make_reference(cfg: dict, seed: int = 0):
    """A diffusers FluxTransformer2DModel with its default init plus random biases and norm scales
    (defaults would leave those at 0 / 1, where a mapping mistake could hide)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    ref = FluxTransformer2DModel(**cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
            elif p.ndim == 1:  # RMS norm weights
                p.copy_(1.0 + torch.randn_like(p) * 0.2)
    return ref


def latent_ids(h: int, w: int) -> np.ndarray:
    ids = np.zeros((h * w, 3), np.float32)
    ids[:, 1] = np.repeat(np.arange(h), w)
    ids[:, 2] = np.tile(np.arange(w), h)
    return ids


def make_inputs(cfg: dict, batch: int = 2, hw: tuple[int, int] = (5, 7), n_txt: int = 13, seed: int = 1) -> dict:
    """Random model inputs in flaxflux (BFL) naming; ids differ per axis, t and guidance per sample."""
    rng = np.random.default_rng(seed)
    L = hw[0] * hw[1]
    img_ids = latent_ids(*hw)
    txt_ids = np.zeros((n_txt, 3), np.float32)
    return dict(
        img=rng.standard_normal((batch, L, cfg["in_channels"])).astype(np.float32),
        img_ids=np.broadcast_to(img_ids, (batch, L, 3)).copy(),
        txt=rng.standard_normal((batch, n_txt, cfg["joint_attention_dim"])).astype(np.float32),
        txt_ids=np.broadcast_to(txt_ids, (batch, n_txt, 3)).copy(),
        timesteps=rng.uniform(0.05, 1.0, batch).astype(np.float32),
        y=rng.standard_normal((batch, cfg["pooled_projection_dim"])).astype(np.float32),
        guidance=rng.uniform(1.0, 4.0, batch).astype(np.float32),
    )


def reference_forward(ref, x: dict) -> np.ndarray:
    """diffusers forward on flaxflux-named inputs (diffusers takes 2-D ids shared by the batch)."""
    with torch.no_grad():
        out = ref(
            hidden_states=torch.from_numpy(x["img"]),
            encoder_hidden_states=torch.from_numpy(x["txt"]),
            pooled_projections=torch.from_numpy(x["y"]),
            timestep=torch.from_numpy(x["timesteps"]),
            img_ids=torch.from_numpy(x["img_ids"][0]),
            txt_ids=torch.from_numpy(x["txt_ids"][0]),
            guidance=torch.from_numpy(x["guidance"]) if ref.config.guidance_embeds else None,
        ).sample
    return out.numpy()


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run(model, x: dict) -> np.ndarray:
    """Forward pass compiled as a whole: much faster on CPU than eager op-by-op dispatch."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(**x))(state, x))


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory):
    """A tiny random FLUX.1-dev snapshot (every component; see tests/snapshots.py), built once
    per test process. Tests must not modify it: copy it first."""
    from snapshots import make_tiny_snapshot

    return make_tiny_snapshot(tmp_path_factory.mktemp("tiny_flux"))
