"""The schedule, latent packing and the jitted sampling loop (compile count, sharded batch)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxflux import FluxConfig, FluxTransformer, sampler

from conftest import TINY_CONFIGS

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

DEV_SCHED = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
             "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
SCHNELL_SCHED = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                 "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}


@pytest.mark.parametrize("cfg", [DEV_SCHED, SCHNELL_SCHED], ids=["dev", "schnell"])
@pytest.mark.parametrize("steps,seq_len", [(50, 4096), (28, 1024), (4, 256), (7, 300), (1, 64)])
def test_schedule_matches_diffusers(cfg, steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    mu = calculate_shift(seq_len, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"],
                         cfg["max_shift"])
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = sampler.sigma_schedule(steps, seq_len, {**sampler.DEFAULT_SCHEDULER, **cfg})
    np.testing.assert_array_equal(ours, sched.sigmas.numpy())
    if cfg is DEV_SCHED and seq_len == 4096:
        assert abs(sampler.shift_mu(seq_len, cfg) - 1.15) < 1e-12


def test_schedule_rejects_bad_steps():
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampler.sigma_schedule(0, 256)


def test_packing_and_ids_match_diffusers():
    from diffusers import FluxPipeline

    rng = np.random.default_rng(0)
    b, c, h, w = 2, 16, 6, 10
    z = rng.standard_normal((b, c, h, w)).astype(np.float32)
    theirs = FluxPipeline._pack_latents(torch.from_numpy(z), b, c, h, w).numpy()
    ours = np.asarray(sampler.pack_latents(jnp.asarray(z.transpose(0, 2, 3, 1))))
    np.testing.assert_array_equal(ours, theirs)
    back = sampler.unpack_latents(jnp.asarray(ours), h, w)
    np.testing.assert_array_equal(np.asarray(back), z.transpose(0, 2, 3, 1))
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(np.asarray(sampler.image_ids(b, h, w))[0], ids)


@pytest.mark.parametrize("hw", [(17 * 8, 64), (64, 0), (100, 64), (64.0, 64)])
def test_size_must_be_a_multiple_of_16(hw):
    with pytest.raises(ValueError, match="multiple of 16"):
        sampler.latent_size(*hw)


def _tiny_model():
    return FluxTransformer(FluxConfig.from_diffusers(TINY_CONFIGS["dev"]), dtype=jnp.float32, rngs=nnx.Rngs(0))


def _args(cfg, batch, seed, h=4, w=6, n_txt=7, guidance=3.5):
    rng = np.random.default_rng(seed)
    # the tiny model takes 16 channels per token, not FLUX's 64: use the first 16 of packed noise
    return (sampler.initial_noise(seed, batch, h, w)[..., :cfg.in_channels],
            sampler.image_ids(batch, h, w),
            jnp.asarray(rng.standard_normal((batch, n_txt, cfg.context_in_dim)), jnp.float32),
            jnp.zeros((batch, n_txt, 3), jnp.float32),
            jnp.asarray(rng.standard_normal((batch, cfg.vec_in_dim)), jnp.float32),
            jnp.full((batch,), guidance, jnp.float32))


def test_one_compile_for_new_prompts_seeds_guidance():
    model = _tiny_model()
    graphdef, state = nnx.split(model)
    cfg = model.config
    sig = jnp.asarray(sampler.sigma_schedule(5, 6))
    before = sampler.TRACES["denoise"]
    outs = [sampler.run_denoise(graphdef, state, *_args(cfg, 2, seed, guidance=g), sig)
            for seed, g in ((0, 3.5), (1, 3.5), (2, 1.5))]
    outs.append(sampler.run_denoise(graphdef, state, *_args(cfg, 2, 3), jnp.asarray(sampler.sigma_schedule(5, 900))))
    assert sampler.TRACES["denoise"] - before == 1
    assert not np.allclose(outs[0], outs[1])  # the arguments really changed the result
    sampler.run_denoise(graphdef, state, *_args(cfg, 2, 0), jnp.asarray(sampler.sigma_schedule(6, 6)))
    assert sampler.TRACES["denoise"] - before == 2  # another step count is another program


def test_loop_equals_python_euler_steps():
    model = _tiny_model()
    graphdef, state = nnx.split(model)
    latents, img_ids, txt, txt_ids, y, g = _args(model.config, 2, 5)
    sig = sampler.sigma_schedule(3, 6)
    x = latents
    for i in range(3):
        v = model(img=x, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=jnp.full((2,), sig[i]), y=y, guidance=g)
        x = x + (sig[i + 1] - sig[i]) * v
    out = sampler.run_denoise(graphdef, state, latents, img_ids, txt, txt_ids, y, g, jnp.asarray(sig))
    np.testing.assert_allclose(out, x, rtol=2e-5, atol=2e-5)


def test_progress_bar_counts_steps(capsys):
    model = _tiny_model()
    graphdef, state = nnx.split(model)
    out = sampler.run_denoise(graphdef, state, *_args(model.config, 1, 0), jnp.asarray(sampler.sigma_schedule(4, 6)),
                              progress=True)
    assert out.shape[0] == 1
    assert "4/4" in capsys.readouterr().err


SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from flaxflux import FluxConfig, FluxTransformer, sampler
    from flaxflux.pipeline import batch_mesh
    sys_path = {path!r}
    import sys; sys.path.insert(0, sys_path)
    from conftest import TINY_CONFIGS
    from test_sampler import _args
    assert len(jax.devices()) == 4
    model = FluxTransformer(FluxConfig.from_diffusers(TINY_CONFIGS["dev"]), dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    args = _args(model.config, 4, 0)
    sig = jnp.asarray(sampler.sigma_schedule(3, 6))
    single = sampler.run_denoise(graphdef, state, *args, sig)
    mesh = batch_mesh(4)
    assert mesh.size == 4
    rep = jax.device_put(state, NamedSharding(mesh, P()))
    sharded_args = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in args]
    out = sampler.run_denoise(graphdef, rep, *sharded_args, sig)
    assert len(out.sharding.device_set) == 4, out.sharding
    assert out.sharding.spec[0] == "data", out.sharding
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), rtol=1e-5, atol=1e-5)
    assert batch_mesh(6).size == 2 and batch_mesh(3) is None
    print("SHARDED_OK")
""")


def test_batch_is_sharded_over_devices():
    """4 forced CPU devices in a fresh process (XLA_FLAGS must precede JAX's start)."""
    here = os.path.dirname(__file__)
    proc = subprocess.run([sys.executable, "-c", SHARDED.format(path=here)], capture_output=True, text=True,
                          timeout=600, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert "SHARDED_OK" in proc.stdout, proc.stdout + proc.stderr
