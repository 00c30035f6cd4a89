"""VAE parity with diffusers' AutoencoderKL (float32, random weights) through the diffusers folder
and a BFL-named ae.safetensors built here from the diffusers state dict (inverse mapping)."""

from __future__ import annotations

import re
from dataclasses import replace

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from flaxflux.safetensors_io import CheckpointError
from flaxflux.vae import FLUX_VAE, VAEConfig, infer_vae_config, load_vae, vae_tensor_shapes

from conftest import rel_l2

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

BLOCKS = (16, 32, 32)  # a channel change (shortcut convs) and a level without one
CFG = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=BLOCKS, layers_per_block=1,
           norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3,
           up_block_types=("UpDecoderBlock2D",) * 3, use_quant_conv=False, use_post_quant_conv=False,
           scaling_factor=0.3611, shift_factor=0.1159)


def _reference(seed: int = 0):
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(**CFG).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.ndim == 1:  # GroupNorm weights
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return ref


def to_bfl(sd: dict[str, np.ndarray], n_levels: int) -> dict[str, np.ndarray]:
    """diffusers AutoencoderKL names -> BFL ae.safetensors names (inverse of diffusers'
    convert_ldm_vae_checkpoint); attention linears become 1x1 convs."""
    out = {}
    for k, v in sd.items():
        b = k
        b = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", b)
        b = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", b)
        b = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                   lambda m: f"decoder.up.{n_levels - 1 - int(m.group(1))}.block.", b)
        b = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{n_levels - 1 - int(m.group(1))}.upsample.", b)
        b = b.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        attn = "mid_block.attentions.0." in b
        b = b.replace("mid_block.attentions.0.", "mid.attn_1.")
        b = b.replace("group_norm.", "norm.").replace("to_q.", "q.").replace("to_k.", "k.")
        b = b.replace("to_v.", "v.").replace("to_out.0.", "proj_out.")
        b = b.replace("conv_shortcut.", "nin_shortcut.").replace("conv_norm_out.", "norm_out.")
        if attn and v.ndim == 2:
            v = v[:, :, None, None]
        out[b] = v
    return out


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    ref = _reference()
    root = tmp_path_factory.mktemp("snapshot")
    ref.save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 24, 16)).astype(np.float32)  # NCHW for diffusers
    z = rng.standard_normal((2, 16, 5, 3)).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x)).latent_dist
        dec = ref.decode(torch.from_numpy(z)).sample.numpy()
    sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    return dict(root=root, folder=root / "vae", x=x, z=z, mean=post.mean.numpy(), logvar=post.logvar.numpy(),
                dec=dec, sd=sd)


nhwc = lambda a: np.transpose(a, (0, 2, 3, 1))
nchw = lambda a: np.transpose(np.asarray(a), (0, 3, 1, 2))


@pytest.fixture(scope="module")
def vae32(case):
    return load_vae(case["folder"], dtype=jnp.float32)


def test_decode_parity(case, vae32):
    err = rel_l2(nchw(vae32.decode_raw(nhwc(case["z"]))), case["dec"])
    print(f"VAE decode rel L2: {err:.2e}")
    assert err <= 1e-5
    # the FLUX-scaled entry point undoes z = scale * (x - shift) first
    s, t = CFG["scaling_factor"], CFG["shift_factor"]
    np.testing.assert_allclose(np.asarray(vae32.decode(nhwc(case["z"]) * s - s * t)),
                               np.asarray(vae32.decode_raw(nhwc(case["z"]))), rtol=2e-5, atol=2e-5)


def test_encode_parity(case, vae32):
    mean, logvar = vae32.encode_moments(nhwc(case["x"]))
    em, el = rel_l2(nchw(mean), case["mean"]), rel_l2(nchw(logvar), case["logvar"])
    print(f"VAE encode rel L2: mean {em:.2e}, logvar {el:.2e}")
    assert em <= 1e-5 and el <= 1e-5
    want = CFG["scaling_factor"] * (case["mean"] - CFG["shift_factor"])
    assert rel_l2(nchw(vae32.encode(nhwc(case["x"]))), want) <= 1e-5


def test_bfl_file(case, vae32, tmp_path):
    bfl = to_bfl(case["sd"], len(BLOCKS))
    cfg = VAEConfig.from_diffusers(case["folder"])
    assert {k: v.shape for k, v in bfl.items()} == vae_tensor_shapes(cfg, naming="bfl")
    path = tmp_path / "ae.safetensors"
    save_file(bfl, str(path))
    # what shapes cannot tell (norm groups) comes from the base config
    shapes = {k: v.shape for k, v in bfl.items()}
    assert infer_vae_config(shapes, "bfl", base=replace(FLUX_VAE, norm_num_groups=8)) == cfg
    for src in (path, tmp_path):  # the file, or a root holding only ae.safetensors
        m = load_vae(src, dtype=jnp.float32, config=cfg)
        assert rel_l2(nchw(m.decode_raw(nhwc(case["z"]))), case["dec"]) <= 1e-5
        assert rel_l2(nchw(m.encode_moments(nhwc(case["x"]))[0]), case["mean"]) <= 1e-5
    # ComfyUI-style bundles prefix the VAE
    save_file({f"first_stage_model.{k}": v for k, v in bfl.items()}, str(path))
    m = load_vae(path, dtype=jnp.float32, config=case["folder"] / "config.json")
    assert rel_l2(nchw(m.decode_raw(nhwc(case["z"]))), case["dec"]) <= 1e-5


def test_checkpoint_names_and_errors(case, tmp_path):
    cfg = VAEConfig.from_diffusers(case["folder"])
    saved = load_file(str(case["folder"] / "diffusion_pytorch_model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == vae_tensor_shapes(cfg)
    bfl = to_bfl(case["sd"], len(BLOCKS))
    name = "decoder.up.0.block.1.conv2.weight"
    bad = {**bfl, name: bfl[name][:, :, :2].copy()}
    path = tmp_path / "ae.safetensors"
    save_file(bad, str(path))
    with pytest.raises(CheckpointError, match=re.escape(name) + r".*ae\.safetensors.*shape"):
        load_vae(path, dtype=jnp.float32, config=cfg)
    save_file({k: v for k, v in bfl.items() if k != name}, str(path))
    with pytest.raises(CheckpointError, match="missing.*" + re.escape(name)):
        load_vae(path, dtype=jnp.float32, config=cfg)


def test_bf16_and_flux_config(case):
    m = load_vae(case["root"])  # snapshot root -> vae/, bf16 by default
    assert m.decoder.conv_out.weight[...].dtype == jnp.bfloat16
    assert rel_l2(nchw(m.decode_raw(nhwc(case["z"]))).astype(np.float32), case["dec"]) < 2e-2
    shapes = vae_tensor_shapes(FLUX_VAE, naming="bfl")
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert 8.3e7 < n < 8.4e7  # ae.safetensors: 335 MB fp32
    assert shapes["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
