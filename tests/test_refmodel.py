"""The reference-model recipe at toy sizes (config.MICRO): every stage trains, a resumed run is
bit-exact, and the exported FLUX.1-dev folder loads in diffusers' FluxPipeline and in flaxflux's,
which draw the same images from the same latents (issue 8's parity must-show, on trained weights)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxflux import scenes
from flaxflux.refmodel import tokenizers as toklib
from flaxflux.refmodel import train as T
from flaxflux.refmodel.config import MICRO, REFERENCE, SCHEDULER
from flaxflux.refmodel.export import folder_size_mb

pytestmark = pytest.mark.slow
# XLA backend optimizations off for the training steps: they run a handful of times here, and
# compiling them dominates this module's time (numerics are checked against runs made alike)
T.FAST_COMPILE = True


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """The whole MICRO recipe, run once per test session: (run folder, exported model folder).

    Under pytest-xdist the workers share one run (the session's common temp folder, under a
    file lock): the first one trains, the others reuse its folder instead of training again."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        out = tmp_path_factory.mktemp("refmodel") / "run"
        return out, T.run_recipe(out, MICRO, progress=False, workers=1, log_every=1)
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # this session's folder, common to its workers
    out = shared / "refmodel-run"
    with FileLock(str(shared / "refmodel-run.lock")):
        if not (out / "model" / "model_index.json").is_file():
            shutil.rmtree(out, ignore_errors=True)  # a worker that died half-way: start over
            T.run_recipe(out, MICRO, progress=False, workers=1, log_every=1)
    return out, out / "model"


def _losses(run: Path, stage: str) -> list[float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("stage") == stage and "loss" in r]


def test_every_stage_trains(micro_run):
    run, _ = micro_run
    steps = {"vae": MICRO.vae.steps, "transformer": MICRO.transformer.steps, "distill": MICRO.distill.steps}
    for stage, n in steps.items():
        losses = _losses(run, stage)
        assert len(losses) == n and np.isfinite(losses).all(), (stage, losses)
    # the two stages trained from scratch go downhill within their few steps
    for stage in ("vae", "transformer"):
        first, last = _losses(run, stage)[0], _losses(run, stage)[-1]
        assert last < first, (stage, first, last)
    vae = json.loads((run / "vae.done.json").read_text())
    assert vae["scaling_factor"] > 0 and np.isfinite(vae["shift_factor"])
    meta = json.loads((run / "data" / "train" / "meta.json").read_text())
    assert meta["captions"][0] == "" and meta["n"] == MICRO.train_examples
    assert abs(meta["latent_std"] - 1.0) < 0.3  # latents normalized by the measured scale / shift


def test_resume_is_bit_exact(micro_run, tmp_path):
    """Interrupted after 3 of 6 transformer steps and continued == run straight through."""
    run, _ = micro_run
    other = tmp_path / "run"
    other.mkdir()
    for name in ("recipe.json", "tokenizers.done.json", "vae.done.json"):
        shutil.copy(run / name, other / name)
    for name in ("tokenizers", "data", "ckpt/vae"):
        shutil.copytree(run / name, other / name)
    with pytest.raises(T.OutOfTime, match="stopped at step 3 of 6"):
        T.run_recipe(other, MICRO, until="transformer", progress=False, workers=1, stop_after=3)
    assert not (other / "transformer.done.json").exists()
    T.run_recipe(other, MICRO, until="transformer", progress=False, workers=1)

    vocab = T.stage_tokenizers(T.Run(run, MICRO))
    init = T.phase1_init(MICRO, vocab)
    n = MICRO.transformer.steps
    straight = T.final_state(T.Run(run, MICRO), "transformer", MICRO.transformer, init)
    resumed = T.final_state(T.Run(other, MICRO), "transformer", MICRO.transformer, init)
    leaves_a, leaves_b = jax.tree.leaves(straight), jax.tree.leaves(resumed)
    assert len(leaves_a) == len(leaves_b) > 3
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(straight["params"]), np.asarray(init()["params"]))  # it trained
    assert T.Checkpoints(other / "ckpt" / "transformer").latest() == n


def test_other_recipe_in_same_folder_is_refused(micro_run):
    run, _ = micro_run
    import dataclasses

    with pytest.raises(ValueError, match="another recipe"):
        T.Run(run, dataclasses.replace(MICRO, seed=1))


def test_tokenizers_are_deterministic_and_cover_the_vocabulary(micro_run, tmp_path):
    run, _ = micro_run
    toklib.build_tokenizers(tmp_path, t5_max_length=MICRO.sizes.t5_max_length)
    for rel in ("tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/spiece.model",
                "tokenizer_2/tokenizer.json"):
        assert (tmp_path / rel).read_bytes() == (run / "tokenizers" / rel).read_bytes(), rel
    words = list(scenes.VOCABULARY)
    assert toklib.learn_merges(words[::-1]) == toklib.learn_merges(words)  # order-free, tie-free
    clip, t5 = toklib.load(tmp_path)
    ids = clip("a red circle to the left of three blue squares")["input_ids"]
    assert len(ids) == 12 and ids[-1] == len(clip) - 1  # one token per word; EOS is the largest id
    assert t5.model_max_length == MICRO.sizes.t5_max_length
    longest = max(len(x) for x in t5([p.text for p in scenes.evaluation_prompts(64)])["input_ids"])
    assert longest <= REFERENCE.sizes.t5_max_length


def test_export_layout(micro_run):
    _, model = micro_run
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for comp in ("transformer", "text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2", "scheduler"):
        assert (model / comp).is_dir(), comp
    from flaxflux.safetensors_io import read_header

    for f in model.rglob("*.safetensors"):
        header, _ = read_header(f)
        assert {v["dtype"] for v in header.values()} == {"BF16"}, f
    sched = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert {k: sched[k] for k in SCHEDULER} == SCHEDULER
    cfg = json.loads((model / "transformer" / "config.json").read_text())
    assert cfg["guidance_embeds"] is True and cfg["in_channels"] == 64
    assert folder_size_mb(model) < 1.0  # toy sizes; the reference sizes are checked below


def test_reference_sizes_fit_the_budget():
    """The shipped folder must stay under ~40 MB: count the reference model's parameters."""
    vocab = T.Vocab(t5=T.t5_vocab_size(50), clip=600)
    total = 0
    for name, m in T.models(REFERENCE, vocab).items():
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jax.eval_shape(lambda m=m: m.init(0))))
        total += n
        if name == "transformer":
            assert 10e6 < n < 15e6, n
    assert 2 * total / 2**20 < 38.0, total  # bf16 bytes, with room for configs and tokenizers
    assert REFERENCE.sizes.image_tokens == 64


def test_diffusers_pipeline_matches_flaxflux(micro_run):
    """Issue 8's must-show on the micro-trained export: same latents -> same images (float32)."""
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    from flaxflux import FluxPipeline

    _, model = micro_run
    size = MICRO.sizes.image_size
    prompts = ["a red circle to the left of a blue square", "three yellow triangles"]
    ours = FluxPipeline.from_pretrained(model, dtype=jnp.float32)
    assert ours.t5_tokenizer.max_length == MICRO.sizes.t5_max_length  # read from tokenizer_2
    ref = diffusers.FluxPipeline.from_pretrained(model, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(0).standard_normal((2, MICRO.sizes.image_tokens, 64)).astype(np.float32)
    kw = dict(height=size, width=size, num_inference_steps=3, guidance_scale=3.5)
    expected = ref(prompts, latents=torch.from_numpy(latents), output_type="np",
                   max_sequence_length=MICRO.sizes.t5_max_length, **kw).images
    got = ours(prompts, latents=latents, output_type="np", progress=False, **kw)
    assert got.shape == expected.shape == (2, size, size, 3)
    assert got.std() > 1e-3  # not a constant image
    assert np.abs(got - expected).max() <= 1e-3


def test_demo_runs_on_an_export(micro_run, tmp_path):
    from flaxflux.refmodel.demo import DEMO_PROMPTS, run_demo

    _, model = micro_run
    result = run_demo(tmp_path, model, steps=2, size=MICRO.sizes.image_size, prompts=DEMO_PROMPTS[:2],
                      verbose=False)
    from PIL import Image

    img = Image.open(result["png"])
    assert img.size[0] > 2 * MICRO.sizes.image_size and img.size[1] > 2 * MICRO.sizes.image_size
    assert set(result["scores"]) == {"bf16", "1.58-bit absmean"}  # no distilled transformer for this model
    assert all(0.0 <= v <= 1.0 for s in result["scores"].values() for v in s.values())


def test_demo_without_a_model_says_how_to_make_one(tmp_path):
    from flaxflux.refmodel.demo import run_demo

    with pytest.raises(FileNotFoundError, match="refmodel.train"):
        run_demo(tmp_path, tmp_path / "nothing")
