"""FluxPipeline end to end against diffusers' FluxPipeline on a tiny random snapshot."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from flaxflux import FluxPipeline
from flaxflux.cli import main as cli_main

from snapshots import make_tiny_snapshot

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

PROMPTS = ["a red circle on the city night", "a small dog with a blue square"]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return make_tiny_snapshot(tmp_path_factory.mktemp("flux_tiny"))["root"]


@pytest.fixture(scope="module")
def pipes(snapshot):
    ref = diffusers.FluxPipeline.from_pretrained(snapshot, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ours = FluxPipeline.from_pretrained(snapshot, dtype=jnp.float32)
    return ref, ours


def _latents(pipe: FluxPipeline, batch: int, height: int, width: int, seed: int) -> np.ndarray:
    h, w = height // pipe.vae_scale, width // pipe.vae_scale
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, (h // 2) * (w // 2), 64)).astype(np.float32)


@pytest.mark.parametrize("height,width,steps,guidance", [(64, 96, 4, 3.5), (96, 64, 7, 5.0)])
def test_images_match_diffusers(pipes, height, width, steps, guidance):
    ref, ours = pipes
    latents = _latents(ours, len(PROMPTS), height, width, seed=steps)
    expected = ref(PROMPTS, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                   latents=torch.from_numpy(latents), output_type="np").images
    got = ours(PROMPTS, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
               latents=latents, output_type="np", progress=False)
    assert got.shape == expected.shape == (2, height, width, 3)
    assert got.std() > 0.01  # a real image, not a constant
    diff = np.abs(got - expected).max()
    assert diff <= 1e-3, diff


def test_prompt_embeddings_match_diffusers(pipes):
    ref, ours = pipes
    prompt_embeds, pooled, _ = ref.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=512)
    txt, y = ours.encode_prompt(PROMPTS)
    np.testing.assert_allclose(np.asarray(txt), prompt_embeds.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y), pooled.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_seed_reproducible_and_distinct(pipes):
    _, ours = pipes
    a = ours(PROMPTS[0], height=32, width=32, num_inference_steps=2, seed=1, output_type="np", progress=False)
    b = ours(PROMPTS[0], height=32, width=32, num_inference_steps=2, seed=1, output_type="np", progress=False)
    c = ours(PROMPTS[0], height=32, width=32, num_inference_steps=2, seed=2, output_type="np", progress=False)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_converted_folder_gives_the_same_images(pipes, snapshot, tmp_path):
    from flaxflux.convert import convert

    _, ours = pipes
    convert(snapshot, tmp_path / "bf", progress=False)
    conv = FluxPipeline.from_pretrained(tmp_path / "bf", dtype=jnp.float32)
    latents = _latents(ours, 1, 32, 48, seed=0)
    kw = dict(height=32, width=48, num_inference_steps=3, latents=latents, output_type="np", progress=False)
    np.testing.assert_array_equal(conv(PROMPTS[0], **kw), ours(PROMPTS[0], **kw))
    convert(snapshot, tmp_path / "t", quantize="ternary", progress=False)
    tern = FluxPipeline.from_pretrained(tmp_path / "t", dtype=jnp.float32)
    img = tern(PROMPTS[0], **kw)
    assert img.shape == (1, 32, 48, 3) and np.isfinite(img).all()
    tern.set_ternary_options(activations="int8")
    assert np.isfinite(tern(PROMPTS[0], **kw)).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=[]), "empty list"),
    (dict(prompt=["  "]), "empty"),
    (dict(prompt="x", height=33), r"height must be a positive multiple of 4 \(2 x the VAE"),
    (dict(prompt="x", width=0), r"width must be a positive multiple of 4"),
    (dict(prompt="x", num_inference_steps=0), "num_inference_steps"),
    (dict(prompt="x", num_inference_steps=-3), "num_inference_steps"),
    (dict(prompt="x", output_type="tensor"), "output_type"),
    (dict(prompt="x", guidance_scale=float("nan")), "guidance_scale"),
    (dict(prompt="x", latents=np.zeros((1, 3, 64), np.float32)), "latents: expected shape"),
])
def test_bad_arguments_are_named(pipes, kwargs, match):
    _, ours = pipes
    assert ours.vae_scale == 2  # the tiny VAE: FLUX.1's (8) would make the multiple 16
    kwargs = {"height": 32, "width": 32, "num_inference_steps": 2, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        ours(**kwargs)


def test_generate_cli_writes_png(snapshot, tmp_path):
    from PIL import Image

    out = tmp_path / "img.png"
    rc = cli_main(["generate", "--model", str(snapshot), "--prompt", "a red circle", "--height", "32", "--width",
                   "48", "--steps", "2", "--dtype", "fp32", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert Image.open(out).size == (48, 32)
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]  # no temporary left behind
    assert cli_main(["generate", "--model", str(snapshot), "--prompt", "x", "--height", "33", "--out",
                     str(tmp_path / "bad.png")]) != 0
    assert not (tmp_path / "bad.png").exists()
