"""T5 encoder parity with transformers' T5EncoderModel (float32, random weights), loading paths,
checkpoint errors, and the int8 weight-only error."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from flaxflux.safetensors_io import CheckpointError
from flaxflux.t5 import T5_XXL, T5Config, T5Encoder, load_t5, relative_position_buckets, t5_tensor_shapes

from conftest import rel_l2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_CFG = dict(vocab_size=101, d_model=48, d_kv=16, d_ff=88, num_layers=3, num_heads=4,
              relative_attention_num_buckets=10, relative_attention_max_distance=24,
              feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)
SEQ = 40  # longer than max_distance: the log-spaced and clamped buckets are exercised


def _reference(seed: int = 0):
    torch.manual_seed(seed)
    ref = transformers.T5EncoderModel(transformers.T5Config(**HF_CFG)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 1:  # layer norm weights default to 1, where mapping mistakes hide
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return ref


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    ref = _reference()
    folder = tmp_path_factory.mktemp("snapshot") / "text_encoder_2"
    ref.save_pretrained(folder, max_shard_size="30KB")  # sharded + index, like FLUX.1-dev's T5
    rng = np.random.default_rng(0)
    ids = rng.integers(0, HF_CFG["vocab_size"], (2, SEQ))
    mask = np.ones((2, SEQ), np.int64)
    mask[1, 25:] = 0
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
        out_masked = ref(input_ids=torch.from_numpy(ids),
                         attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    return dict(ref=ref, folder=folder, ids=ids, mask=mask, out=out, out_masked=out_masked)


@pytest.fixture(scope="module")
def model32(case):
    return load_t5(case["folder"], dtype=jnp.float32)


def test_sharded_folder_parity(case, model32):
    assert len(list(case["folder"].glob("*.safetensors"))) > 1
    y = model32(case["ids"])
    assert y.shape == case["out"].shape and y.dtype == jnp.float32
    err = rel_l2(y, case["out"])
    print(f"T5 fp32 parity rel L2: {err:.2e}")
    assert err <= 1e-5, err


def test_attention_mask_parity(case, model32):
    err = rel_l2(model32(case["ids"], jnp.asarray(case["mask"])), case["out_masked"])
    assert err <= 1e-5, err


def test_snapshot_root_and_file_list(case, model32):
    root = case["folder"].parent
    (root / "model_index.json").write_text("{}")
    a = load_t5(root, dtype=jnp.float32)
    files = sorted(case["folder"].glob("*.safetensors"))
    b = load_t5(files, dtype=jnp.float32, config=case["folder"] / "config.json")
    ref = np.asarray(model32(case["ids"]))
    for m in (a, b):
        np.testing.assert_array_equal(np.asarray(m(case["ids"])), ref)
    with pytest.raises(ValueError, match="config"):
        load_t5(files)


def test_flaxflux_folder(case, model32, tmp_path):
    """The converter's layout: flaxflux.json + manifest.json, and text_encoder_2/ holding the
    transformers-named tensors with a wrapped config."""
    from flaxflux.model_folder import sha256_file

    comp = tmp_path / "text_encoder_2"
    comp.mkdir()
    sd = {}
    for f in sorted(case["folder"].glob("*.safetensors")):
        sd.update(load_file(str(f)))
    save_file(sd, str(comp / "model.safetensors"))
    hf = json.loads((case["folder"] / "config.json").read_text())
    (comp / "config.json").write_text(json.dumps({"flaxflux_component": "text_encoder_2", "config": hf}))
    (tmp_path / "flaxflux.json").write_text(json.dumps({"format": "flaxflux", "format_version": 1}))
    files = {f"text_encoder_2/{p.name}": {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in comp.iterdir()}
    (tmp_path / "manifest.json").write_text(json.dumps({"files": files}))
    for path in (tmp_path, comp):
        m = load_t5(path, dtype=jnp.float32)
        np.testing.assert_array_equal(np.asarray(m(case["ids"])), np.asarray(model32(case["ids"])))


def test_relative_buckets_match_transformers():
    attn = transformers.models.t5.modeling_t5.T5Attention
    for nb, md, n in ((32, 128, 600), (10, 24, 64), (8, 16, 50), (16, 20, 70)):
        rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
        want = attn._relative_position_bucket(rel, bidirectional=True, num_buckets=nb, max_distance=md).numpy()
        np.testing.assert_array_equal(relative_position_buckets(n, n, nb, md), want)


def test_tensor_shapes_match_checkpoint(case):
    index = json.loads((case["folder"] / "model.safetensors.index.json").read_text())["weight_map"]
    have = {}
    for shard in sorted(set(index.values())):
        have.update({k: v.shape for k, v in load_file(str(case["folder"] / shard)).items()})
    assert have == t5_tensor_shapes(T5Config.from_hf(HF_CFG))
    xxl = t5_tensor_shapes(T5_XXL)
    n_params = sum(int(np.prod(s)) for s in xxl.values())
    assert len(xxl) == 3 + 24 * 9 and 4.7e9 < n_params < 4.8e9  # google/t5-v1_1-xxl encoder


def test_int8_weight_only_error(case):
    """Embedding error vs the fp32 reference: bf16 weights, int8 weights (fp32 and bf16 activations)."""
    errs = {}
    for name, dtype, q in (("bf16", jnp.bfloat16, None), ("int8/fp32-act", jnp.float32, "int8"),
                           ("int8/bf16-act", jnp.bfloat16, "int8")):
        m = load_t5(case["folder"], dtype=dtype, quantize=q)
        errs[name] = rel_l2(np.asarray(m(case["ids"]), np.float32), case["out"])
        if q:
            assert m.blocks.wi_0.weight[...].dtype == jnp.int8 and m.blocks.wi_0.scale[...].dtype == jnp.float32
    print("T5 rel L2 vs fp32 reference: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert errs["bf16"] < 2e-2
    assert errs["int8/fp32-act"] < 3e-2
    assert errs["int8/bf16-act"] < 4e-2


def test_int8_halves_xxl_bytes():
    """Parameter bytes of the full T5-XXL encoder, counted abstractly (nothing is allocated)."""
    def nbytes(q):
        model = nnx.eval_shape(lambda: T5Encoder(T5_XXL, dtype=jnp.bfloat16, quantize=q, rngs=nnx.Rngs(0)))
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))

    bf16, int8 = nbytes(None), nbytes("int8")
    print(f"T5-XXL parameter bytes: bf16 {bf16 / 1e9:.2f} GB, int8 {int8 / 1e9:.2f} GB")
    assert 9.4e9 < bf16 < 9.6e9 and int8 < 0.55 * bf16


def test_checkpoint_errors(case, tmp_path):
    sd = {}
    for f in sorted(case["folder"].glob("*.safetensors")):
        sd.update(load_file(str(f)))
    cfg = case["folder"] / "config.json"

    def write(d):
        path = tmp_path / "t5.safetensors"
        save_file(d, str(path))
        return path

    name = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_t5(write({k: v for k, v in sd.items() if k != name}), dtype=jnp.float32, config=cfg)
    with pytest.raises(CheckpointError, match=r"shape \(88, 47\), expected \(88, 48\)"):
        load_t5(write({**sd, name: sd[name][:, :47].copy()}), dtype=jnp.float32, config=cfg)
    with pytest.raises(CheckpointError, match="unexpected tensor.*'encoder.block.9.extra'.*t5.safetensors"):
        load_t5(write({**sd, "encoder.block.9.extra": sd[name]}), dtype=jnp.float32, config=cfg)
    # a tied embedding saved under the encoder's name loads the same
    alt = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in sd.items()}
    m = load_t5(write(alt), dtype=jnp.float32, config=cfg)
    assert rel_l2(m(case["ids"]), case["out"]) <= 1e-5
