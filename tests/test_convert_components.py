"""`flaxflux convert` on the components beside the transformer: CLIP text (text_encoder/), T5
(text_encoder_2/) and the VAE (vae/, or BFL's ae.safetensors). Converted components load with
load_clip / load_t5 / load_vae into exactly the models the sources give (float32, bit for bit);
bad tensors in any component fail before anything is written, with errors naming them."""

from __future__ import annotations

import functools
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from flaxflux.cli import main as cli_main
from flaxflux.clip import load_clip
from flaxflux.convert import convert
from flaxflux.info import describe, format_info
from flaxflux.safetensors_io import CheckpointError, read_header
from flaxflux.t5 import load_t5
from flaxflux.vae import FLUX_VAE, VAEConfig, load_vae

pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")

LOADERS = {"text_encoder": load_clip, "text_encoder_2": load_t5, "vae": load_vae}
WEIGHTS = ("transformer", "text_encoder", "text_encoder_2", "vae")


@pytest.fixture(scope="module")
def snap(tiny_snapshot):
    return tiny_snapshot["root"]


@pytest.fixture(scope="module")
def converted(snap, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "out"
    summary = convert(snap, out, progress=False)
    return out, summary


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(graphdef, method, state, x):
    model = nnx.merge(graphdef, state)
    return getattr(model, method)(x) if method else model(x)


def _forward(name: str, model) -> np.ndarray:
    """One jitted forward per component (compiled once for source and converted: same graphdef)."""
    graphdef, state = nnx.split(model)
    if name == "vae":
        z = np.random.default_rng(0).standard_normal((1, 4, 6, 16)).astype(np.float32)
        return np.asarray(_apply(graphdef, "decode", state, z))
    ids = np.random.default_rng(0).integers(3, 100, (2, 12))
    out = _apply(graphdef, None, state, ids)
    return np.concatenate([np.asarray(o).reshape(-1) for o in jax.tree_util.tree_leaves(out)])


def _assert_same_model(a, b) -> None:
    fa = nnx.to_flat_state(nnx.state(a))
    fb = dict(nnx.to_flat_state(nnx.state(b)))
    assert len(fa) == len(fb)
    for path, v in fa:
        x, y = np.asarray(v[...]), np.asarray(fb[path][...])
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y, err_msg=str(path))


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_snapshot_loads_in_diffusers(snap):
    """The builder's snapshot is a real FLUX.1 pipeline (the pipeline tests rely on it)."""
    import diffusers

    pipe = diffusers.FluxPipeline.from_pretrained(snap, local_files_only=True)
    assert pipe.vae.config.latent_channels == 16 and pipe.transformer.config.in_channels == 64
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"


def test_snapshot_round_trip_bit_exact(snap, converted):
    out, summary = converted
    assert summary.components == [*WEIGHTS, "tokenizer", "tokenizer_2", "scheduler"]
    top = json.loads((out / "flaxflux.json").read_text())
    assert top["components"] == summary.components and top["not_converted"] == []
    assert "text_encoder_2/model-00002-of-00007.safetensors" in top["source"]["sha256"]
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    for name, load in LOADERS.items():
        cfg = json.loads((out / name / "config.json").read_text())
        src_cfg = json.loads((snap / name / "config.json").read_text())
        assert cfg["flaxflux_component"] == name and cfg["config"] == src_cfg
        assert f"{name}/model-00001-of-00001.safetensors" in manifest
        direct, conv = load(snap, dtype=jnp.float32), load(out, dtype=jnp.float32)
        _assert_same_model(direct, conv)
        np.testing.assert_array_equal(_forward(name, direct), _forward(name, conv))
    # HF names and source dtype kept, bit for bit; the position_ids buffer no loader reads is dropped
    for name in LOADERS:
        src, got = _tensors(snap / name), _tensors(out / name)
        dropped = set(src) - set(got)
        assert dropped == ({"text_model.embeddings.position_ids"} if name == "text_encoder" else set())
        for k, v in got.items():
            assert v.dtype == src[k].dtype
            np.testing.assert_array_equal(v, src[k], err_msg=k)
    assert (out / "tokenizer_2" / "spiece.model").read_bytes() == (snap / "tokenizer_2" / "spiece.model").read_bytes()


def test_progress_covers_every_component(snap, tmp_path, monkeypatch):
    import flaxflux.convert as conv

    seen = {}

    class Bar:
        def __init__(self, total, **kw):
            seen["total"], seen["done"] = total, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            seen["done"] += n

    monkeypatch.setattr(conv, "tqdm", Bar)
    convert(snap, tmp_path / "out", progress=False)
    files = [f for c in WEIGHTS for f in (snap / c).glob("*.safetensors")]
    assert seen["total"] == seen["done"] == sum(f.stat().st_size for f in files)


def test_ternary_touches_only_the_transformer(snap, converted, tmp_path):
    out, _ = converted
    convert(snap, tmp_path / "t", quantize="ternary", progress=False)
    a = json.loads((out / "manifest.json").read_text())["files"]
    b = json.loads((tmp_path / "t" / "manifest.json").read_text())["files"]
    for rel in a:
        if not rel.startswith("transformer/") and rel != "flaxflux.json":  # it records the quantization
            assert a[rel] == b[rel], rel  # byte-identical files
    assert json.loads((tmp_path / "t" / "transformer" / "config.json").read_text())["quantization"] == "ternary"


@pytest.mark.parametrize("name", list(LOADERS))
def test_component_folder(snap, tmp_path, name):
    """One component folder -> a flaxflux folder holding just it; a bf16 source stays bf16."""
    src = tmp_path / name
    shutil.copytree(snap / name, src)
    for f in src.glob("*.safetensors"):  # bf16 on disk, as FLUX.1-dev ships
        sd = {k: v.astype(jnp.bfloat16) if v.dtype == np.float32 else v for k, v in load_file(str(f)).items()}
        save_file(sd, str(f))
    summary = convert(src, tmp_path / "out", progress=False)
    assert summary.components == [name]
    assert json.loads((tmp_path / "out" / "flaxflux.json").read_text())["components"] == [name]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["flaxflux.json", "manifest.json", name]
    header = read_header(tmp_path / "out" / name / "model-00001-of-00001.safetensors")[0]
    assert {e["dtype"] for e in header.values()} == {"BF16"}
    load = LOADERS[name]
    _assert_same_model(load(src, dtype=jnp.float32), load(tmp_path / "out", dtype=jnp.float32))


def test_full_t5_checkpoint_keeps_the_encoder(tmp_path):
    """A T5ForConditionalGeneration folder converts as its encoder: decoder.* and lm_head.weight,
    which T5EncoderModel (and load_t5) ignore, are dropped."""
    import torch
    import transformers

    from snapshots import T5_CONFIG

    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(transformers.T5Config(**T5_CONFIG)).save_pretrained(tmp_path / "t5")
    convert(tmp_path / "t5", tmp_path / "out", progress=False)
    names = set(_tensors(tmp_path / "out" / "text_encoder_2"))
    assert names and not any(n.startswith("decoder.") or n == "lm_head.weight" for n in names)
    assert any(n.startswith("decoder.") for n in _tensors(tmp_path / "t5"))
    _assert_same_model(load_t5(tmp_path / "t5", dtype=jnp.float32), load_t5(tmp_path / "out", dtype=jnp.float32))


def _to_bfl(snap):
    from test_vae import to_bfl  # the inverse of diffusers' own BFL -> diffusers VAE mapping

    cfg = json.loads((snap / "vae" / "config.json").read_text())
    return to_bfl(load_file(str(snap / "vae" / "diffusion_pytorch_model.safetensors")),
                  len(cfg["block_out_channels"]))


def test_bfl_ae_file(snap, tmp_path):
    ae = tmp_path / "ae.safetensors"
    save_file(_to_bfl(snap), str(ae))
    direct = load_vae(snap, dtype=jnp.float32)
    # no config: sizes from shapes, the rest FLUX.1's preset (this VAE uses FLUX's groups and factors)
    summary = convert(ae, tmp_path / "out", progress=False)
    assert summary.components == ["vae"]
    stored = json.loads((tmp_path / "out" / "vae" / "config.json").read_text())["config"]
    want = VAEConfig.from_diffusers(snap / "vae" / "config.json")
    assert VAEConfig.from_diffusers(stored) == want
    assert (want.norm_num_groups, want.scaling_factor, want.shift_factor) == \
        (FLUX_VAE.norm_num_groups, FLUX_VAE.scaling_factor, FLUX_VAE.shift_factor)
    # stored under diffusers names and layouts (attention (c, c, 1, 1) -> (c, c)), bit-exact
    src = load_file(str(snap / "vae" / "diffusion_pytorch_model.safetensors"))
    got = _tensors(tmp_path / "out" / "vae")
    assert set(got) == set(src)
    for k in src:
        np.testing.assert_array_equal(got[k], src[k], err_msg=k)
    conv = load_vae(tmp_path / "out", dtype=jnp.float32)
    _assert_same_model(direct, conv)
    np.testing.assert_array_equal(_forward("vae", direct), _forward("vae", conv))
    # a ComfyUI-style prefix, and an explicit config (stored as given)
    save_file({f"first_stage_model.{k}": v for k, v in _to_bfl(snap).items()}, str(ae))
    convert(ae, tmp_path / "out2", progress=False, config=snap / "vae" / "config.json")
    stored = json.loads((tmp_path / "out2" / "vae" / "config.json").read_text())["config"]
    assert stored == json.loads((snap / "vae" / "config.json").read_text())
    _assert_same_model(direct, load_vae(tmp_path / "out2", dtype=jnp.float32))


# --- bad inputs: a clear error naming the problem, and no OUT ---------------------------------------------


def _edit_shard(folder, edit, prefix, index_name="model.safetensors.index.json"):
    """Apply `edit` to the state dict of `folder`'s shard holding the first tensor named `prefix`...
    (or its only file), keeping the index in step."""
    index = folder / index_name
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        shard = folder / next(v for k, v in sorted(weight_map.items()) if k.startswith(prefix))
    else:
        shard = next(folder.glob("*.safetensors"))
    sd = load_file(str(shard))
    victim = edit(sd)
    save_file(sd, str(shard))
    if index.exists():
        weight_map = {k: v for k, v in weight_map.items() if v != shard.name}
        weight_map.update({k: shard.name for k in sd})
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return shard, victim


def _bad(case, root):
    if case == "t5_missing_tensor":
        def edit(sd):
            victim = next(k for k in sorted(sd) if k.startswith("encoder.block.1."))
            del sd[victim]
            return victim
        _, victim = _edit_shard(root / "text_encoder_2", edit, "encoder.block.1.")
        return ["text_encoder_2", "missing", victim]
    if case == "vae_truncated":
        f = root / "vae" / "diffusion_pytorch_model.safetensors"
        f.write_bytes(f.read_bytes()[:-1000])
        return ["truncated", str(f)]
    if case == "clip_wrong_shape":
        victim = "text_model.encoder.layers.1.mlp.fc1.weight"

        def edit(sd):
            sd[victim] = np.zeros((sd[victim].shape[0], sd[victim].shape[1] + 1), np.float32)
            return victim
        shard, _ = _edit_shard(root / "text_encoder", edit, "")
        return [victim, str(shard), "shape (48, 33), expected (48, 32)"]
    if case == "clip_unexpected_tensor":
        def edit(sd):
            sd["text_projection.weight"] = np.zeros((4, 32), np.float32)
            return "text_projection.weight"
        _edit_shard(root / "text_encoder", edit, "")
        return ["unexpected", "text_projection.weight"]
    if case == "vae_config_mismatch":
        cfg = json.loads((root / "vae" / "config.json").read_text())
        cfg["layers_per_block"] = 2
        (root / "vae" / "config.json").write_text(json.dumps(cfg))
        return ["src/vae", "missing tensor(s) 'decoder.up_blocks.0.resnets.2."]
    if case == "misplaced_component":
        shutil.rmtree(root / "vae")
        shutil.copytree(root / "text_encoder", root / "vae")
        return ["describes a text_encoder", "vae/"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["t5_missing_tensor", "vae_truncated", "clip_wrong_shape", "clip_unexpected_tensor",
                                  "vae_config_mismatch", "misplaced_component"])
def test_bad_component_clear_error_and_no_output(snap, tmp_path, monkeypatch, case):
    import flaxflux.convert.core as core

    root = tmp_path / "src"
    shutil.copytree(snap, root)
    needles = _bad(case, root)

    def no_writes(*a, **k):  # every component is validated before the first one is written
        raise AssertionError("a component was written before the source was fully validated")

    monkeypatch.setattr(core, "write_component", no_writes)
    with pytest.raises(CheckpointError) as e:
        convert(root, tmp_path / "out", progress=False)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_unsupported_sources(snap, tmp_path):
    folder = tmp_path / "proj"
    shutil.copytree(snap / "text_encoder", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["CLIPTextModelWithProjection"]}))
    with pytest.raises(CheckpointError, match=re.escape("'CLIPTextModelWithProjection'") + ".*CLIPTextModel"):
        convert(folder, tmp_path / "out", progress=False)
    # a component named in model_index.json but absent is reported, not silently dropped
    shutil.copytree(snap, tmp_path / "partial", ignore=shutil.ignore_patterns("vae"))
    summary = convert(tmp_path / "partial", tmp_path / "out", progress=False)
    assert "vae" not in summary.components
    assert json.loads((tmp_path / "out" / "flaxflux.json").read_text())["not_converted"] == ["vae"]


def test_info_lists_components(snap, converted, capsys):
    out, _ = converted
    d = describe(out)
    sizes = d["component_sizes"]
    assert list(sizes) == d["components"]
    for name in LOADERS:
        src = _tensors(snap / name)
        src.pop("text_model.embeddings.position_ids", None)
        assert sizes[name]["parameters"] == sum(v.size for v in src.values())
        assert sizes[name]["bytes_on_disk"] == (out / name / "model-00001-of-00001.safetensors").stat().st_size
        assert sizes[name]["dtypes"] == ["F32"]
    assert sizes["transformer"]["parameters"] == d["transformer"]["parameters"]
    assert "parameters" not in sizes["tokenizer"] and sizes["tokenizer"]["bytes_on_disk"] > 0
    assert cli_main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.strip() == format_info(d)
    for name in d["components"]:
        assert re.search(rf"^  {name} .* on disk", text, re.M), name
