"""Ternarization, TernaryLinear / quantized models, and the base-3 storage codec."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels as pk
from flaxflux import FLUX_DEV, FluxConfig, FluxTransformer, load_transformer
from flaxflux.convert import save_transformer
from flaxflux.layers import Linear
from flaxflux.loading import abstract_model
from flaxflux.ternary import (TernaryLinear, absmean_scale, block_linears, count_parameters, decode_trits,
                              encode_trits_np, fake_ternarize, quantize_model, set_ternary_options, ternarize)

from conftest import TINY_CONFIGS, make_inputs, rel_l2, run

SMALL = FluxConfig.from_diffusers(TINY_CONFIGS["dev"])


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_absmean_ternarize_matches_formula(granularity):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 40, 70)).astype(np.float32) * rng.uniform(0.1, 2, (3, 40, 1)).astype(np.float32)
    codes, scale = ternarize(jnp.asarray(w), granularity)
    axes = (-2, -1) if granularity == "tensor" else (-1,)
    gamma = np.abs(w.astype(np.float64)).mean(axis=axes, keepdims=True) + 1e-5
    want = np.clip(np.round(w / gamma), -1, 1)
    assert set(np.unique(np.asarray(codes))) <= {-1, 0, 1}
    assert (np.asarray(codes) == want).mean() > 0.999  # ties at exactly +-0.5 may round either way
    assert scale.shape == ((3, 1) if granularity == "tensor" else (3, 40))
    np.testing.assert_allclose(np.asarray(scale), gamma.reshape(scale.shape), rtol=1e-6)


def test_straight_through_estimator():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((16, 24)), jnp.float32)
    r = jnp.asarray(rng.standard_normal((16, 24)), jnp.float32)
    codes, scale = ternarize(w, "channel")
    np.testing.assert_allclose(fake_ternarize(w, "channel"), codes * scale[:, None], rtol=1e-6)
    g = jax.grad(lambda w: jnp.sum(fake_ternarize(w, "channel") * r))(w)
    np.testing.assert_allclose(g, r, rtol=1e-6)  # identity: straight through
    # a learnable scale gets its own gradient: d/ds sum(codes * s * r) = sum(codes * r) per row
    s0 = absmean_scale(w, "channel")
    gs = jax.grad(lambda s: jnp.sum(fake_ternarize(w, "channel", scale=s) * r))(s0)
    np.testing.assert_allclose(gs, jnp.sum(codes * r, axis=1), rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (40, 5), (33, 64), (5, 11)])
def test_base3_codec_round_trip(shape):
    codes = np.random.default_rng(2).integers(-1, 2, shape).astype(np.int8)
    trits = encode_trits_np(codes)
    assert trits.shape == (shape[0], -(-shape[1] // 5)) and trits.max() < 243
    np.testing.assert_array_equal(np.asarray(decode_trits(jnp.asarray(trits), shape[1])), codes)


@pytest.mark.parametrize("k", [1, 3, 64, 500, 511, 512, 513, 1000, 3072])
def test_pack_unpack_exact_any_k(k):
    """The compute layout (pallas_kernels owns it) pads K to whole tiles and unpacks exactly."""
    w = np.random.default_rng(k).integers(-1, 2, (k, 9)).astype(np.int8)
    packed = pk.pack_ternary(jnp.asarray(w))
    assert packed.shape == (pk.padded_k(k) // 4, 9) and packed.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(pk.unpack_ternary(packed, k)), w)
    np.testing.assert_array_equal(pk.pack_ternary_np(w), np.asarray(packed))


def _dense_twin(model: FluxTransformer, q: FluxTransformer) -> FluxTransformer:
    """`model` with every block linear's weight replaced by the ternary one, dequantized in fp32."""
    qmap = {path: layer for _, _, layer, path in block_linears(q)}
    for _, _, lin, path in block_linears(model):
        lin.weight[...] = qmap[path].dequantized_weight()
    return model


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_quantized_model_equals_dequantized_dense(granularity):
    model = FluxTransformer(SMALL, dtype=jnp.float32, rngs=nnx.Rngs(3))
    q = quantize_model(FluxTransformer(SMALL, dtype=jnp.float32, rngs=nnx.Rngs(3)), granularity)
    twin = _dense_twin(model, q)
    x = make_inputs(TINY_CONFIGS["dev"])
    err = rel_l2(run(q, x), run(twin, x))
    assert err < 1e-5, err  # (x @ codes) * scale vs x @ (codes * scale): fp32 rounding only
    # and ternarization really changed the model (the comparison is not vacuous)
    assert rel_l2(FluxTransformer(SMALL, dtype=jnp.float32, rngs=nnx.Rngs(3))(**x), run(twin, x)) > 1e-2


def test_quantize_replaces_exactly_the_block_linears():
    q = quantize_model(FluxTransformer(SMALL, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    kinds = {path: type(layer).__name__ for _, _, layer, path in block_linears(q)}
    assert len(kinds) == 2 * 5 + 3 and set(kinds.values()) == {"TernaryLinear"}  # per stream: mod, qkv,
    # proj, fc1, fc2; single: modulation, linear1, linear2
    for name in ("img_in", "txt_in"):
        assert isinstance(getattr(q, name), Linear)
    assert isinstance(q.final_layer.linear, Linear) and isinstance(q.time_in.in_layer, Linear)


def test_ternary_share_of_flux_dev_is_99_5_percent():
    q = abstract_model(lambda: quantize_model(FluxTransformer(FLUX_DEV, rngs=nnx.Rngs(0))))[0]
    c = count_parameters(q)
    assert c["ternary_params"] + c["other_params"] == 11_901_408_320
    assert c["ternary_params"] == 11_834_228_736  # 99.44% ternary weights; with the in-block
    block_biases = sum(int(np.prod(layer.bias.shape)) for _, _, layer, _ in block_linears(q))
    share = (c["ternary_params"] + block_biases) / 11_901_408_320  # biases, the paper's 99.5%
    assert 0.9945 < share < 0.9947, share


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_save_load_ternary_bit_exact(tmp_path, granularity):
    q = quantize_model(FluxTransformer(SMALL, dtype=jnp.bfloat16, rngs=nnx.Rngs(4)), granularity)
    save_transformer(q, tmp_path / "m")
    back = load_transformer(tmp_path / "m", dtype=jnp.bfloat16)
    a, b = nnx.to_flat_state(nnx.state(q)), dict(nnx.to_flat_state(nnx.state(back)))
    assert len(a) == len(b)
    for path, v in a:
        assert v[...].dtype == b[path][...].dtype, path
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(b[path][...]), err_msg=str(path))
    x = make_inputs(TINY_CONFIGS["dev"])
    np.testing.assert_array_equal(np.asarray(run(q, x), np.float32), np.asarray(run(back, x), np.float32))


def test_int8_activations_switch():
    q = quantize_model(FluxTransformer(SMALL, dtype=jnp.float32, rngs=nnx.Rngs(5)))
    x = make_inputs(TINY_CONFIGS["dev"])
    native = run(q, x)
    set_ternary_options(q, activations="int8")
    assert all(layer.activations == "int8" for _, _, layer, _ in block_linears(q))
    a8 = run(q, x)
    err = rel_l2(a8, native)
    assert 1e-6 < err < 5e-2, err  # per-token int8 activations: close, but not the same numbers
    with pytest.raises(ValueError, match="activations"):
        set_ternary_options(q, activations="int4")


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_quantize_on_load_equals_quantizing_the_loaded_model(tmp_path, granularity):
    """load_transformer(dense, quantize="ternary") ternarizes layer by layer while loading and
    gives exactly quantize_model(load_transformer(dense))."""
    from flaxflux.loading import save_bfl_file

    path = tmp_path / "dense.safetensors"
    save_bfl_file(FluxTransformer(SMALL, dtype=jnp.float32, rngs=nnx.Rngs(6)), path)
    on_load = load_transformer(path, jnp.float32, SMALL, quantize="ternary", granularity=granularity)
    after = quantize_model(load_transformer(path, jnp.float32, SMALL), granularity)
    a, b = nnx.to_flat_state(nnx.state(on_load)), dict(nnx.to_flat_state(nnx.state(after)))
    assert len(a) == len(b)
    for p, v in a:
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(b[p][...]), err_msg=str(p))
