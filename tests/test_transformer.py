"""FluxTransformer parity with diffusers (float32, random weights) through both checkpoint layouts."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from flaxflux import FluxConfig, load_transformer, naming
from flaxflux.loading import state_to_bfl
from flaxflux.safetensors_io import CheckpointError

from conftest import TINY_CONFIGS, make_inputs, make_reference, reference_forward, rel_l2

pytest.importorskip("diffusers")


def _state_dict(ref) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}


def _bfl_from_diffusers(sd: dict[str, np.ndarray], cfg: FluxConfig) -> dict[str, np.ndarray]:
    return {t.bfl: naming.diffusers_to_bfl(t, sd.__getitem__) for t in naming.tensors(cfg)}


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def case(request, tmp_path_factory):
    name = request.param
    cfg = TINY_CONFIGS[name]
    ref = make_reference(cfg, seed=len(name))
    folder = tmp_path_factory.mktemp(f"diffusers_{name}")
    ref.save_pretrained(folder, max_shard_size="50KB")  # several shards + index, as FLUX.1-dev
    x = make_inputs(cfg, hw=(5, 7) if name != "schnell" else (3, 6), n_txt=13 if name != "odd" else 6)
    return dict(name=name, cfg=cfg, ref=ref, folder=folder, x=x, expected=reference_forward(ref, x))


def test_diffusers_folder_parity(case):
    assert len(list(case["folder"].glob("*.safetensors"))) > 1
    model = load_transformer(case["folder"], dtype=jnp.float32)
    out = model(**case["x"])
    assert out.shape == case["expected"].shape
    err = rel_l2(out, case["expected"])
    assert err <= 1e-5, err


def test_bfl_file_parity(case, tmp_path):
    cfg = FluxConfig.from_diffusers(case["cfg"])
    bfl = _bfl_from_diffusers(_state_dict(case["ref"]), cfg)
    path = tmp_path / "flux1-tiny.safetensors"
    # ComfyUI-style prefix on half of the files exercises prefix stripping.
    prefix = "model.diffusion_model." if case["name"] == "odd" else ""
    save_file({prefix + k: v for k, v in bfl.items()}, str(path))
    model = load_transformer(path, dtype=jnp.float32, config=case["folder"] / "config.json")
    err = rel_l2(model(**case["x"]), case["expected"])
    assert err <= 1e-5, err


def test_jit_over_split_state_matches_eager(case):
    model = load_transformer(case["folder"], dtype=jnp.float32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(**x)

    np.testing.assert_allclose(forward(state, case["x"]), model(**case["x"]), rtol=2e-5, atol=2e-5)


def test_bf16_default_is_close(case):
    model = load_transformer(case["folder"])
    assert model.img_in.weight[...].dtype == jnp.bfloat16
    out = model(**case["x"])
    assert out.dtype == jnp.bfloat16
    assert rel_l2(np.asarray(out, np.float32), case["expected"]) < 5e-2


def test_parameter_count_tensor_by_tensor(case):
    """Every diffusers tensor lands in exactly one model parameter; counts agree per tensor."""
    cfg = FluxConfig.from_diffusers(case["cfg"])
    sd = _state_dict(case["ref"])
    model = load_transformer(case["folder"], dtype=jnp.float32)
    ours = state_to_bfl(model)
    used = set()
    for t in naming.tensors(cfg):
        parts = [sd[d] for d in t.diffusers]
        assert ours[t.bfl].size == sum(p.size for p in parts), t.bfl
        used.update(t.diffusers)
    assert used == set(sd)
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_ours == sum(p.numel() for p in case["ref"].parameters())


def test_mapping_round_trips_both_directions(case):
    cfg = FluxConfig.from_diffusers(case["cfg"])
    sd = _state_dict(case["ref"])
    bfl = _bfl_from_diffusers(sd, cfg)
    back = {}
    for t in naming.tensors(cfg):
        back.update(naming.bfl_to_diffusers(t, bfl[t.bfl]))
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    # The model state exported under BFL names is the BFL dict we built (loader direction).
    model = load_transformer(case["folder"], dtype=jnp.float32)
    ours = state_to_bfl(model)
    assert set(ours) == set(bfl)
    for k in bfl:
        np.testing.assert_array_equal(ours[k], bfl[k], err_msg=k)


def test_final_layer_shift_scale_order():
    """diffusers stores norm_out as (scale, shift); BFL as (shift, scale)."""
    t = next(t for t in naming.tensors(FluxConfig()) if t.bfl == "final_layer.adaLN_modulation.1.weight")
    scale_shift = np.concatenate([np.full((2, 3), 1.0), np.full((2, 3), 2.0)])
    bfl = naming.diffusers_to_bfl(t, {"norm_out.linear.weight": scale_shift}.__getitem__)
    np.testing.assert_array_equal(bfl[:2], 2.0)  # shift first


def test_flux_dev_table_counts():
    """FLUX.1-dev: 780 BFL tensors, 11,901,408,320 parameters (reference/flux-jax.md)."""
    from flaxflux.loading import abstract_model, expected_tensors
    from flaxflux.transformer import FluxTransformer

    cfg = FluxConfig()
    tensors = naming.tensors(cfg)
    assert len(tensors) == 780
    assert len({d for t in tensors for d in t.diffusers}) == 1160  # split q/k/v in diffusers
    flat = abstract_model(lambda: FluxTransformer(cfg, rngs=nnx.Rngs(0)))[-1]
    expected = expected_tensors(flat)
    assert sum(int(np.prod(s.shape)) for s in expected.values()) == 11_901_408_320


def test_infer_config_from_bfl_shapes():
    from flaxflux.loading import abstract_model, expected_tensors
    from flaxflux.transformer import FluxTransformer

    for cfg in (FluxConfig(), FluxConfig(guidance_embed=False)):
        flat = abstract_model(lambda: FluxTransformer(cfg, rngs=nnx.Rngs(0)))[-1]
        shapes = {k: v.shape for k, v in expected_tensors(flat).items()}
        assert naming.infer_config(shapes) == cfg


# --- bad checkpoints: each error names the tensor / file and what was expected ---------------


def _write_variant(case, tmp_path, edit):
    sd = load_file(str(next(case["folder"].glob("*00001-of-*.safetensors"))))
    folder = tmp_path / "broken"
    folder.mkdir()
    for f in case["folder"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    shard = next(folder.glob("*00001-of-*.safetensors"))
    sd = edit(sd)
    save_file(sd, str(shard))
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in sd})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("what", ["missing", "extra", "shape"])
def test_bad_diffusers_folder_names_the_tensor(what, tmp_path):
    cfg = TINY_CONFIGS["dev"]
    ref = make_reference(cfg)
    src = tmp_path / "src"
    ref.save_pretrained(src, max_shard_size="50KB")
    case = dict(folder=src)
    victim = sorted(load_file(str(next(src.glob("*00001-of-*.safetensors")))))[0]

    def edit(sd):
        if what == "missing":
            sd.pop(victim)
        elif what == "extra":
            sd["transformer_blocks.0.attn.to_q.lora_A.weight"] = np.zeros((2, 2), np.float32)
        else:
            sd[victim] = np.zeros((*sd[victim].shape[:-1], sd[victim].shape[-1] + 1), np.float32)
        return sd

    folder = _write_variant(case, tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        load_transformer(folder, dtype=jnp.float32)
    msg = str(e.value)
    assert "diffusion_pytorch_model-00001-of-" in msg or what == "missing"  # the file is named
    if what == "extra":
        assert "lora_A" in msg and "unexpected" in msg
    else:
        assert victim in msg  # the diffusers tensor name, even where it feeds a fused BFL tensor
        assert ("missing" in msg) if what == "missing" else ("shape" in msg)


def test_bfl_file_missing_tensor(tmp_path):
    cfg = FluxConfig.from_diffusers(TINY_CONFIGS["dev"])
    bfl = _bfl_from_diffusers(_state_dict(make_reference(TINY_CONFIGS["dev"])), cfg)
    bfl.pop("single_blocks.2.linear2.weight")
    path = tmp_path / "flux.safetensors"
    save_file(bfl, str(path))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) 'single_blocks.2.linear2.weight'"):
        load_transformer(path, config=cfg)


def test_guidance_required_for_dev(case):
    if not case["cfg"]["guidance_embeds"]:
        pytest.skip("schnell has no guidance input")
    model = load_transformer(case["folder"], dtype=jnp.float32)
    x = dict(case["x"], guidance=None)
    with pytest.raises(ValueError, match="guidance"):
        model(**x)


def test_wrong_input_shape_is_named(case):
    model = load_transformer(case["folder"], dtype=jnp.float32)
    x = dict(case["x"], txt=case["x"]["txt"][..., :-1])
    with pytest.raises(ValueError, match=r"^txt: expected shape"):
        model(**x)
