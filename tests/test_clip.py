"""CLIP text model parity with transformers' CLIPTextModel (float32, random weights), with both
pooling rules (legacy eos_token_id == 2 -> argmax of ids; else first EOS), and loading paths."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from flaxflux.clip import CLIP_L, CLIPTextConfig, load_clip, clip_tensor_shapes
from flaxflux.safetensors_io import CheckpointError

from conftest import rel_l2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, EOS = 100, 97
HF_CFG = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=20, hidden_act="quick_gelu", layer_norm_eps=1e-5,
              bos_token_id=96, pad_token_id=EOS)


def _reference(eos_token_id: int, seed: int = 0):
    torch.manual_seed(seed)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**HF_CFG, eos_token_id=eos_token_id)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.ndim == 1:  # LayerNorm weights
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return ref


def _ids(n: int = 16) -> np.ndarray:
    """BOS, random ids, EOS, EOS padding; row 1 holds an id above EOS before its EOS and a second
    EOS run, so argmax-of-ids and first-EOS pool at different positions."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 90, (3, n))
    ids[:, 0] = 96
    for row, end in ((0, 9), (1, 12), (2, n - 1)):
        ids[row, end:] = EOS
    ids[1, 4] = 99
    ids[2, 6] = 98
    return ids


@pytest.fixture(scope="module", params=[EOS, 2], ids=["eos", "legacy-eos2"])
def case(request, tmp_path_factory):
    ref = _reference(request.param)
    folder = tmp_path_factory.mktemp("snapshot") / "text_encoder"
    ref.save_pretrained(folder)
    ids = _ids()
    with torch.no_grad():
        o = ref(input_ids=torch.from_numpy(ids))
    return dict(eos=request.param, ref=ref, folder=folder, ids=ids,
                hidden=o.last_hidden_state.numpy(), pooled=o.pooler_output.numpy())


def test_parity(case):
    model = load_clip(case["folder"], dtype=jnp.float32)
    h, pooled = model(case["ids"])
    eh, ep = rel_l2(h, case["hidden"]), rel_l2(pooled, case["pooled"])
    print(f"CLIP (eos_token_id={case['eos']}) rel L2: last_hidden_state {eh:.2e}, pooler_output {ep:.2e}")
    assert eh <= 1e-5 and ep <= 1e-5
    # the two pooling rules really differ on these ids, so the test tells them apart
    first_eos = np.argmax(case["ids"] == EOS, axis=-1)
    largest = np.argmax(case["ids"], axis=-1)
    assert (first_eos != largest).any()
    want = largest if case["eos"] == 2 else first_eos
    np.testing.assert_array_equal(np.asarray(model.eos_positions(jnp.asarray(case["ids"]))), want)


def test_attention_mask_parity(case):
    model = load_clip(case["folder"], dtype=jnp.float32)
    mask = (np.arange(case["ids"].shape[1])[None] <= np.array([9, 12, 15])[:, None]).astype(np.int64)
    with torch.no_grad():
        o = case["ref"](input_ids=torch.from_numpy(case["ids"]), attention_mask=torch.from_numpy(mask))
    h, pooled = model(case["ids"], jnp.asarray(mask))
    assert rel_l2(h, o.last_hidden_state.numpy()) <= 1e-5
    assert rel_l2(pooled, o.pooler_output.numpy()) <= 1e-5


def test_flux_names_and_file_list(case, tmp_path):
    """FLUX's checkpoint names carry `text_model.` (older transformers) and may hold position_ids."""
    sd = load_file(str(case["folder"] / "model.safetensors"))
    assert set(sd) == set(clip_tensor_shapes(CLIPTextConfig.from_hf(case["folder"]), prefix=""))
    flux = {f"text_model.{k}": v for k, v in sd.items()}
    flux["text_model.embeddings.position_ids"] = np.arange(20, dtype=np.int64)[None]
    path = tmp_path / "model.safetensors"
    save_file(flux, str(path))
    model = load_clip([path], dtype=jnp.float32, config=case["folder"] / "config.json")
    h, pooled = model(case["ids"])
    assert rel_l2(pooled, case["pooled"]) <= 1e-5
    del flux["text_model.final_layer_norm.bias"]
    save_file(flux, str(path))
    with pytest.raises(CheckpointError, match="final_layer_norm.bias"):
        load_clip(path, dtype=jnp.float32, config=case["folder"] / "config.json")


def test_bf16(case):
    model = load_clip(case["folder"])  # bf16 by default
    assert model.token_embedding[...].dtype == jnp.bfloat16
    h, pooled = model(case["ids"])
    assert h.dtype == jnp.bfloat16
    assert rel_l2(np.asarray(pooled, np.float32), case["pooled"]) < 2e-2


def test_flux_config():
    assert CLIP_L.eos_token_id == 2 and CLIP_L.hidden_size == 768
    shapes = clip_tensor_shapes(CLIP_L)
    assert shapes["text_model.embeddings.position_embedding.weight"] == (77, 768)
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert 1.22e8 < n < 1.24e8  # CLIP-L text tower: 123 M parameters (246 MB in bf16)
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_hf({**HF_CFG, "hidden_act": "nope"})
