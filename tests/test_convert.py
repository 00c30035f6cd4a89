"""`flaxflux convert`: round trips, atomic output, and a clear error for every kind of bad input."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from flaxflux import FluxConfig, load_transformer, naming
from flaxflux.cli import main as cli_main
from flaxflux.convert import convert
from flaxflux.safetensors_io import CheckpointError

from conftest import TINY_CONFIGS, make_inputs, make_reference, run

pytest.importorskip("diffusers")
CFG = TINY_CONFIGS["dev"]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A FLUX.1-dev-shaped snapshot folder: sharded transformer, tokenizer/scheduler files."""
    root = tmp_path_factory.mktemp("snapshot")
    make_reference(CFG).save_pretrained(root / "transformer", max_shard_size="50KB")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 3.0}))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text("{}")
    return root


def _states_equal(a, b) -> None:
    fa = nnx.to_flat_state(nnx.state(a))
    fb = dict(nnx.to_flat_state(nnx.state(b)))
    assert len(fa) == len(fb)
    for path, v in fa:
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(fb[path][...]), err_msg=str(path))


def test_round_trip_none_is_bit_exact(snapshot, tmp_path):
    out = tmp_path / "out"
    summary = convert(snapshot, out, progress=False)
    assert summary.components == ["transformer", "tokenizer", "scheduler"]
    assert (out / "tokenizer" / "vocab.json").read_text() == "{}"
    assert (out / "model_index.json").exists()
    direct = load_transformer(snapshot, dtype=jnp.float32)
    converted = load_transformer(out, dtype=jnp.float32)
    _states_equal(direct, converted)
    x = make_inputs(CFG)
    np.testing.assert_array_equal(run(direct, x), run(converted, x))
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert "transformer/model-00001-of-00001.safetensors" in manifest and "scheduler/scheduler_config.json" in manifest


def test_round_trip_from_bfl_file(snapshot, tmp_path):
    cfg = FluxConfig.from_diffusers(snapshot / "transformer" / "config.json")
    sd = {}
    for f in (snapshot / "transformer").glob("*.safetensors"):
        sd.update(load_file(str(f)))
    bfl = {t.bfl: naming.diffusers_to_bfl(t, sd.__getitem__) for t in naming.tensors(cfg)}
    src = tmp_path / "flux1-tiny.safetensors"
    save_file(bfl, str(src))
    with pytest.raises(ValueError, match="--config"):  # tiny RoPE axes cannot be inferred
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    convert(src, tmp_path / "out", progress=False, config=snapshot / "transformer" / "config.json")
    converted = load_transformer(tmp_path / "out", dtype=jnp.float32)
    direct = load_transformer(snapshot, dtype=jnp.float32)
    _states_equal(direct, converted)
    x = make_inputs(CFG)
    np.testing.assert_array_equal(run(direct, x), run(converted, x))


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_ternary_folder_loads_bit_exact(snapshot, tmp_path, granularity):
    """Converting with --quantize ternary (streamed, base-3 on disk) gives exactly the model that
    quantizing the loaded bf16... here float32 source in memory gives."""
    from flaxflux.ternary import TernaryLinear, quantize_model

    out = tmp_path / "t"
    convert(snapshot, out, quantize="ternary", granularity=granularity, progress=False)
    loaded = load_transformer(out, dtype=jnp.float32)
    reference = quantize_model(load_transformer(snapshot, dtype=jnp.float32), granularity)
    _states_equal(reference, loaded)
    assert isinstance(loaded.double_blocks.img_attn.qkv, TernaryLinear)
    x = make_inputs(CFG)
    np.testing.assert_array_equal(run(reference, x), run(loaded, x))
    # and a second conversion writes byte-identical shards (deterministic output)
    convert(snapshot, tmp_path / "t2", quantize="ternary", granularity=granularity, progress=False)
    a = json.loads((out / "manifest.json").read_text())["files"]
    b = json.loads((tmp_path / "t2" / "manifest.json").read_text())["files"]
    assert a == b


def test_refuses_to_overwrite_without_force(snapshot, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        convert(snapshot, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert(snapshot, out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "flaxflux.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folders left behind


def test_interrupted_conversion_leaves_nothing(snapshot, tmp_path, monkeypatch):
    from flaxflux import loading

    calls = {"n": 0}
    real = loading.DenseCodec.encode

    def flaky(self, name, src):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(self, name, src)

    monkeypatch.setattr(loading.DenseCodec, "encode", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(snapshot, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_corrupted_output_fails_manifest_check(snapshot, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(snapshot, out, progress=False)
    shard = out / "transformer" / "model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_transformer(out)
    monkeypatch.setenv("FLAXFLUX_NO_VERIFY", "1")
    load_transformer(out)  # the escape hatch skips hashing


# --- bad inputs: the error names the problem and OUT never appears --------------------------------


def _copy(snapshot, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(snapshot / "transformer", src)
    return src


def _shard(src, k=1):
    return sorted(src.glob("*.safetensors"))[k - 1]


def _index(src):
    return src / "diffusion_pytorch_model.safetensors.index.json"


def _rewrite_shard(src, edit):
    shard = _shard(src)
    sd = edit(load_file(str(shard)))
    save_file(sd, str(shard))
    index = json.loads(_index(src).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in sd})
    _index(src).write_text(json.dumps(index))
    return sorted(sd)


def _bad(name, snapshot, tmp_path):
    src = _copy(snapshot, tmp_path)
    if name == "truncated":
        data = _shard(src).read_bytes()
        _shard(src).write_bytes(data[: len(data) - 100])
        return src, ["truncated", _shard(src).name]
    if name == "lfs_pointer":
        _shard(src).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 99\n")
        return src, ["Git-LFS pointer", _shard(src).name]
    if name == "missing_shard":
        missing = _shard(src, 2).name
        _shard(src, 2).unlink()
        return src, ["missing", missing]
    if name == "missing_tensor":
        victim = []
        _rewrite_shard(src, lambda sd: (victim.append(sorted(sd)[0]), sd.pop(sorted(sd)[0]), sd)[-1])
        return src, ["missing", victim[0]]
    if name == "unexpected_tensor":
        _rewrite_shard(src, lambda sd: {**sd, "transformer_blocks.0.attn.extra.weight": np.ones((2, 2), np.float32)})
        return src, ["unexpected", "transformer_blocks.0.attn.extra.weight"]
    if name == "wrong_shape":
        victim = []

        def edit(sd):
            k = next(k for k in sorted(sd) if sd[k].ndim == 2)
            victim.append(k)
            sd[k] = np.ones((sd[k].shape[0], sd[k].shape[1] + 2), np.float32)
            return sd

        _rewrite_shard(src, edit)
        return src, ["shape", victim[0]]
    if name == "wrong_dtype":
        victim = []

        def edit(sd):
            k = sorted(sd)[0]
            victim.append(k)
            sd[k] = (sd[k] * 100).astype(np.int64)
            return sd

        _rewrite_shard(src, edit)
        return src, ["dtype I64", victim[0]]
    if name == "config_mismatch":
        cfg = json.loads((src / "config.json").read_text())
        cfg["num_single_layers"] += 1
        (src / "config.json").write_text(json.dumps(cfg))
        return src, ["missing", "single_transformer_blocks.3."]
    if name == "not_a_checkpoint":
        bogus = tmp_path / "notes.safetensors"
        save_file({"some.weight": np.ones((2, 2), np.float32)}, str(bogus))
        return bogus, ["not a FLUX checkpoint"]
    raise AssertionError(name)


BAD = ["truncated", "lfs_pointer", "missing_shard", "missing_tensor", "unexpected_tensor", "wrong_shape",
       "wrong_dtype", "config_mismatch", "not_a_checkpoint"]


@pytest.mark.parametrize("name", BAD)
@pytest.mark.parametrize("quantize", ["none", "ternary"])
def test_bad_input_clear_error_and_no_output(name, quantize, snapshot, tmp_path):
    src, needles = _bad(name, snapshot, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as e:
        convert(src, out, quantize=quantize, progress=False)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_exit_code_and_message(snapshot, tmp_path, capsys):
    src, _ = _bad("truncated", snapshot, tmp_path)
    rc = cli_main(["convert", str(src), str(tmp_path / "out"), "--no-progress"])
    assert rc != 0
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert cli_main(["convert", str(snapshot), str(tmp_path / "ok"), "--no-progress", "--quantize", "ternary"]) == 0
    assert cli_main(["info", str(tmp_path / "ok")]) == 0
    assert "ternary" in capsys.readouterr().out


def test_info_counts_match_the_model(snapshot, tmp_path):
    from flaxflux.info import describe
    from flaxflux.ternary import count_parameters

    convert(snapshot, tmp_path / "t", quantize="ternary", progress=False)
    d = describe(tmp_path / "t")["transformer"]
    counts = count_parameters(load_transformer(tmp_path / "t"))
    assert d["ternary_parameters"] == counts["ternary_params"] > 0
    assert d["parameters"] == sum(p.numel() for p in make_reference(CFG).parameters())
    assert d["bytes_in_memory"] == counts["ternary_bytes"] + counts["other_bytes"]
    assert d["bytes_on_disk"] == sum(f.stat().st_size for f in (tmp_path / "t" / "transformer").glob("*.safetensors"))
