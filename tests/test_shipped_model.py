"""The shipped reference model (flaxflux/refmodel/model): complete, small enough, and drawn the
same by diffusers' FluxPipeline and flaxflux's from the same latents (issue 8's must-show)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from flaxflux.refmodel import SHIPPED_MODEL
from flaxflux.refmodel.config import REFERENCE
from flaxflux.refmodel.export import folder_size_mb

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler")


def test_shipped_model_is_complete_and_small():
    index = json.loads((SHIPPED_MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for name in COMPONENTS:
        assert name in index and (SHIPPED_MODEL / name).is_dir(), name
    assert folder_size_mb(SHIPPED_MODEL) <= 40.0
    info = json.loads((SHIPPED_MODEL / "refmodel.json").read_text())
    assert info["final_losses"]["distill"]["step"] == REFERENCE.distill.steps  # the whole recipe ran


def test_diffusers_draws_the_shipped_model_like_flaxflux():
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    from flaxflux import FluxPipeline

    size, steps = REFERENCE.sizes.image_size, 4
    prompts = ["a red circle to the left of a blue square", "three yellow triangles"]
    ours = FluxPipeline.from_pretrained(SHIPPED_MODEL, dtype=jnp.float32)
    ref = diffusers.FluxPipeline.from_pretrained(SHIPPED_MODEL, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(0).standard_normal((2, REFERENCE.sizes.image_tokens, 64)).astype(np.float32)
    kw = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=3.5)
    expected = ref(prompts, latents=torch.from_numpy(latents), output_type="np",
                   max_sequence_length=REFERENCE.sizes.t5_max_length, **kw).images
    got = ours(prompts, latents=latents, output_type="np", progress=False, **kw)
    assert got.shape == expected.shape == (2, size, size, 3)
    assert got.std() > 0.05  # a drawn scene, not a flat image
    assert np.abs(got - expected).max() <= 1e-3
