"""FLUX's 16-channel KL autoencoder (diffusers `AutoencoderKL`, BFL `AutoEncoder`) in Flax NNX.

Layout: NHWC throughout (JAX's native conv layout); conv weights keep PyTorch's (out, in, kh, kw)
so checkpoints load without transposes. Public API:

    vae.encode(images)   images (B, H, W, in_channels) in [-1, 1]  -> latents (B, H/f, W/f, C)
                         the posterior mean, then scaling * (mean - shift) as FLUX does; fp32
    vae.decode(latents)  latents (B, h, w, C) -> images (B, h*f, w*f, out_channels) ~[-1, 1]; fp32
                         latents / scaling + shift first
    vae.encode_moments(images) -> (mean, logvar), unscaled, in the parameter dtype
    vae.decode_raw(z)    unscaled latents -> images, in the parameter dtype

f = 2 ** (len(block_out_channels) - 1) (8 for FLUX). GroupNorm statistics and the mid-block
attention's softmax are fp32; convolutions run in the parameter dtype (bf16 by default).

Checkpoints: a diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors) or
BFL's `ae.safetensors` (names `encoder.down.{i}.block.{j}...`, `decoder.up.{n-1-i}...`, 1x1-conv
attention). Both map onto the same module (`vae_tensor_specs`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .layers import init_normal
from .hf_loading import (
    TensorSpec,
    config_dict,
    dense,
    expected_shapes,
    fill_module,
    resolve_component,
    softmax_attention,
)
from .safetensors_io import CheckpointError, TensorReader

Array = jax.Array
SUBFOLDER = "vae"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
BFL_FILE = "ae.safetensors"
# single-file checkpoints that bundle the VAE put it under one of these prefixes
BFL_PREFIXES = ("first_stage_model.", "vae.")
NAMINGS = ("diffusers", "bfl")


@dataclass(frozen=True)
class VAEConfig:
    """Autoencoder sizes; defaults are FLUX.1's VAE."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    mid_block_add_attention: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any] | str | Path) -> "VAEConfig":
        """From a diffusers AutoencoderKL config (dict, config.json path or folder). Keys absent
        there take diffusers' defaults, except the ones FLUX's config always sets."""
        d = config_dict(config)
        where = "VAE config"
        cls_name = d.get("_class_name", "AutoencoderKL")
        if cls_name != "AutoencoderKL":
            raise ValueError(f"{where}: _class_name {cls_name!r}, expected 'AutoencoderKL'")
        boc = tuple(int(c) for c in d.get("block_out_channels", (64,)))
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = d.get(key, [want] * len(boc))
            if len(types) != len(boc) or any(t != want for t in types):
                raise ValueError(f"{where}: {key} {types} not supported (expected {len(boc)} x {want!r})")
        if d.get("act_fn", "silu") not in ("silu", "swish"):
            raise ValueError(f"{where}: act_fn {d['act_fn']!r} not supported (expected 'silu')")
        if d.get("latents_mean") is not None or d.get("latents_std") is not None:
            raise ValueError(f"{where}: latents_mean / latents_std normalization is not supported")
        shift = d.get("shift_factor")
        cfg = cls(
            in_channels=int(d.get("in_channels", 3)), out_channels=int(d.get("out_channels", 3)),
            latent_channels=int(d.get("latent_channels", 4)), block_out_channels=boc,
            layers_per_block=int(d.get("layers_per_block", 1)), norm_num_groups=int(d.get("norm_num_groups", 32)),
            scaling_factor=float(d.get("scaling_factor", 0.18215)),
            shift_factor=float(shift) if shift is not None else 0.0,
            mid_block_add_attention=bool(d.get("mid_block_add_attention", True)),
            use_quant_conv=bool(d.get("use_quant_conv", True)),
            use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"VAE config: block_out_channels {self.block_out_channels} not divisible by "
                             f"norm_num_groups {self.norm_num_groups}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_diffusers(self) -> dict[str, Any]:
        """A diffusers AutoencoderKL config dict that `from_diffusers` reads back as `self`
        (what a converted BFL ae.safetensors stores as its config)."""
        n = len(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": self.in_channels,
                "out_channels": self.out_channels, "latent_channels": self.latent_channels,
                "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                "norm_num_groups": self.norm_num_groups, "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor, "mid_block_add_attention": self.mid_block_add_attention,
                "use_quant_conv": self.use_quant_conv, "use_post_quant_conv": self.use_post_quant_conv,
                "latents_mean": None, "latents_std": None}


FLUX_VAE = VAEConfig()


# ----------------------------------------------------------------------------- layers

class Conv2d(nnx.Module):
    """NHWC convolution with a PyTorch-layout (out, in, kh, kw) weight and a bias."""

    def __init__(self, cin: int, cout: int, k: int, *, dtype: Any, rngs: nnx.Rngs, stride: int = 1,
                 padding: tuple[tuple[int, int], tuple[int, int]] | None = None):
        self.weight = nnx.Param(init_normal(rngs, (cout, cin, k, k), (cin * k * k) ** -0.5, dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), dtype))
        self.stride = stride
        self.padding = padding if padding is not None else ((k // 2, k // 2), (k // 2, k // 2))

    def __call__(self, x: Array) -> Array:
        precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
        y = jax.lax.conv_general_dilated(
            x, self.weight[...].astype(x.dtype), (self.stride, self.stride), self.padding,
            dimension_numbers=("NHWC", "OIHW", "NHWC"), precision=precision)
        return y + self.bias[...].astype(y.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm over NHWC (eps 1e-6 as in the VAE), statistics in fp32; returns fp32."""

    def __init__(self, channels: int, groups: int, *, dtype: Any, eps: float = 1e-6):
        self.weight = nnx.Param(jnp.ones((channels,), dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), dtype))
        self.groups, self.eps = groups, eps

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        xf = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 4), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


def _norm_act(norm: GroupNorm, x: Array) -> Array:
    return jax.nn.silu(norm(x)).astype(x.dtype)


class ResnetBlock(nnx.Module):
    """norm-SiLU-conv twice, plus the input (through a 1x1 conv when channels change)."""

    def __init__(self, cin: int, cout: int, groups: int, *, dtype: Any, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(cin, groups, dtype=dtype)
        self.conv1 = Conv2d(cin, cout, 3, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(cout, groups, dtype=dtype)
        self.conv2 = Conv2d(cout, cout, 3, dtype=dtype, rngs=rngs)
        self.shortcut = Conv2d(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

    def __call__(self, x: Array) -> Array:
        h = self.conv1(_norm_act(self.norm1, x))
        h = self.conv2(_norm_act(self.norm2, h))
        return (self.shortcut(x) if self.shortcut is not None else x) + h


class Linear(nnx.Module):
    def __init__(self, dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.weight = nnx.Param(init_normal(rngs, (dim, dim), dim**-0.5, dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))

    def __call__(self, x: Array) -> Array:
        return dense(x, self.weight[...]) + self.bias[...].astype(x.dtype)


class AttnBlock(nnx.Module):
    """Single-head self-attention over all positions, with GroupNorm and a residual."""

    def __init__(self, c: int, groups: int, *, dtype: Any, rngs: nnx.Rngs):
        self.norm = GroupNorm(c, groups, dtype=dtype)
        self.q = Linear(c, dtype=dtype, rngs=rngs)
        self.k = Linear(c, dtype=dtype, rngs=rngs)
        self.v = Linear(c, dtype=dtype, rngs=rngs)
        self.out = Linear(c, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        t = self.norm(x).astype(x.dtype).reshape(b, h * w, 1, c)
        a = softmax_attention(self.q(t), self.k(t), self.v(t), None, scale=c**-0.5)
        return x + self.out(a.reshape(b, h, w, c))


class MidBlock(nnx.Module):
    def __init__(self, c: int, groups: int, attention: bool, *, dtype: Any, rngs: nnx.Rngs):
        self.resnet_1 = ResnetBlock(c, c, groups, dtype=dtype, rngs=rngs)
        self.attn = AttnBlock(c, groups, dtype=dtype, rngs=rngs) if attention else None
        self.resnet_2 = ResnetBlock(c, c, groups, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = self.resnet_1(x)
        if self.attn is not None:
            x = self.attn(x)
        return self.resnet_2(x)


class Stage(nnx.Module):
    """Resnet blocks at one resolution, then an optional down- or upsampling conv."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, resample: str | None, *, dtype: Any,
                 rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(cin if j == 0 else cout, cout, groups, dtype=dtype, rngs=rngs)
                                 for j in range(n)])
        self.resample = resample
        if resample == "down":
            # pad (0, 1) on H and W, then a stride-2 3x3 conv without padding (BFL / diffusers)
            self.sample_conv = Conv2d(cout, cout, 3, dtype=dtype, rngs=rngs, stride=2, padding=((0, 1), (0, 1)))
        elif resample == "up":
            self.sample_conv = Conv2d(cout, cout, 3, dtype=dtype, rngs=rngs)
        else:
            self.sample_conv = None

    def __call__(self, x: Array) -> Array:
        for r in self.resnets:
            x = r(x)
        if self.resample == "up":
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        return self.sample_conv(x) if self.sample_conv is not None else x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype: Any, rngs: nnx.Rngs):
        boc, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.in_channels, boc[0], 3, dtype=dtype, rngs=rngs)
        self.down = nnx.List([
            Stage(boc[max(i - 1, 0)], boc[i], cfg.layers_per_block, g, "down" if i < n - 1 else None,
                  dtype=dtype, rngs=rngs) for i in range(n)])
        self.mid = MidBlock(boc[-1], g, cfg.mid_block_add_attention, dtype=dtype, rngs=rngs)
        self.norm_out = GroupNorm(boc[-1], g, dtype=dtype)
        self.conv_out = Conv2d(boc[-1], 2 * cfg.latent_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = self.conv_in(x)
        for stage in self.down:
            x = stage(x)
        return self.conv_out(_norm_act(self.norm_out, self.mid(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype: Any, rngs: nnx.Rngs):
        rev, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.latent_channels, rev[0], 3, dtype=dtype, rngs=rngs)
        self.mid = MidBlock(rev[0], g, cfg.mid_block_add_attention, dtype=dtype, rngs=rngs)
        # diffusers' order: up[0] is the lowest resolution (BFL's up.{n-1})
        self.up = nnx.List([
            Stage(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, "up" if i < n - 1 else None,
                  dtype=dtype, rngs=rngs) for i in range(n)])
        self.norm_out = GroupNorm(rev[-1], g, dtype=dtype)
        self.conv_out = Conv2d(rev[-1], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, z: Array) -> Array:
        x = self.mid(self.conv_in(z))
        for stage in self.up:
            x = stage(x)
        return self.conv_out(_norm_act(self.norm_out, x))


class AutoencoderKL(nnx.Module):
    """The KL autoencoder; see the module docstring for shapes and scaling."""

    def __init__(self, cfg: VAEConfig = FLUX_VAE, *, dtype: Any = jnp.bfloat16, rngs: nnx.Rngs):
        cfg.validate()
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(cfg, dtype=dtype, rngs=rngs)
        c = cfg.latent_channels
        self.quant_conv = Conv2d(2 * c, 2 * c, 1, dtype=dtype, rngs=rngs) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv2d(c, c, 1, dtype=dtype, rngs=rngs) if cfg.use_post_quant_conv else None

    def _check(self, name: str, x: Array, channels: int, multiple: int) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{name}: expected (batch, height, width, {channels}) NHWC, got {tuple(x.shape)}")
        if x.shape[1] % multiple or x.shape[2] % multiple:
            raise ValueError(f"{name}: height and width {tuple(x.shape[1:3])} must be multiples of {multiple}")

    def encode_moments(self, images: Array) -> tuple[Array, Array]:
        """Posterior (mean, logvar), unscaled, (B, H/f, W/f, latent_channels) each."""
        images = jnp.asarray(images)
        self._check("images", images, self.config.in_channels, self.config.downscale)
        m = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            m = self.quant_conv(m)
        c = self.config.latent_channels
        return m[..., :c], m[..., c:]

    def encode(self, images: Array) -> Array:
        """images in [-1, 1] -> FLUX latents scaling * (mean - shift), fp32 (no sampling)."""
        mean, _ = self.encode_moments(images)
        cfg = self.config
        return cfg.scaling_factor * (mean.astype(jnp.float32) - cfg.shift_factor)

    def decode_raw(self, z: Array) -> Array:
        """Unscaled latents -> images (B, h*f, w*f, out_channels) in the parameter dtype."""
        z = jnp.asarray(z)
        self._check("latents", z, self.config.latent_channels, 1)
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, latents: Array) -> Array:
        """FLUX latents -> images in ~[-1, 1] (fp32); latents / scaling + shift first."""
        cfg = self.config
        z = jnp.asarray(latents, jnp.float32) / cfg.scaling_factor + cfg.shift_factor
        return self.decode_raw(z).astype(jnp.float32)


# ----------------------------------------------------------------------------- checkpoint

def _conv(t: str, d: str, b: str, cout: int, cin: int, k: int) -> list[tuple]:
    return [(f"{t}.weight", f"{d}.weight", f"{b}.weight", (cout, cin, k, k), None),
            (f"{t}.bias", f"{d}.bias", f"{b}.bias", (cout,), None)]


def _norm(t: str, d: str, b: str, c: int) -> list[tuple]:
    return [(f"{t}.weight", f"{d}.weight", f"{b}.weight", (c,), None),
            (f"{t}.bias", f"{d}.bias", f"{b}.bias", (c,), None)]


def _resnet(t: str, d: str, b: str, cin: int, cout: int) -> list[tuple]:
    out = _norm(f"{t}.norm1", f"{d}.norm1", f"{b}.norm1", cin)
    out += _conv(f"{t}.conv1", f"{d}.conv1", f"{b}.conv1", cout, cin, 3)
    out += _norm(f"{t}.norm2", f"{d}.norm2", f"{b}.norm2", cout)
    out += _conv(f"{t}.conv2", f"{d}.conv2", f"{b}.conv2", cout, cout, 3)
    if cin != cout:
        out += _conv(f"{t}.shortcut", f"{d}.conv_shortcut", f"{b}.nin_shortcut", cout, cin, 1)
    return out


def _attn(t: str, d: str, b: str, c: int) -> list[tuple]:
    out = _norm(f"{t}.norm", f"{d}.group_norm", f"{b}.norm", c)
    for ours, dn, bn in (("q", "to_q", "q"), ("k", "to_k", "k"), ("v", "to_v", "v"), ("out", "to_out.0", "proj_out")):
        # diffusers stores Linear (c, c); BFL 1x1 convs (c, c, 1, 1)
        out.append((f"{t}.{ours}.weight", f"{d}.{dn}.weight", f"{b}.{bn}.weight", (c, c), "conv1x1"))
        out.append((f"{t}.{ours}.bias", f"{d}.{dn}.bias", f"{b}.{bn}.bias", (c,), None))
    return out


def _mid(t: str, d: str, b: str, c: int, attention: bool) -> list[tuple]:
    out = _resnet(f"{t}.resnet_1", f"{d}.resnets.0", f"{b}.block_1", c, c)
    if attention:
        out += _attn(f"{t}.attn", f"{d}.attentions.0", f"{b}.attn_1", c)
    return out + _resnet(f"{t}.resnet_2", f"{d}.resnets.1", f"{b}.block_2", c, c)


def _entries(cfg: VAEConfig) -> list[tuple]:
    """(internal target, diffusers name, BFL name, diffusers shape, layout note) for every tensor."""
    boc, n, lpb = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
    e = _conv("encoder.conv_in", "encoder.conv_in", "encoder.conv_in", boc[0], cfg.in_channels, 3)
    for i in range(n):
        for j in range(lpb):
            cin = boc[max(i - 1, 0)] if j == 0 else boc[i]
            e += _resnet(f"encoder.down.{i}.resnets.{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                         f"encoder.down.{i}.block.{j}", cin, boc[i])
        if i < n - 1:
            e += _conv(f"encoder.down.{i}.sample_conv", f"encoder.down_blocks.{i}.downsamplers.0.conv",
                       f"encoder.down.{i}.downsample.conv", boc[i], boc[i], 3)
    e += _mid("encoder.mid", "encoder.mid_block", "encoder.mid", boc[-1], cfg.mid_block_add_attention)
    e += _norm("encoder.norm_out", "encoder.conv_norm_out", "encoder.norm_out", boc[-1])
    e += _conv("encoder.conv_out", "encoder.conv_out", "encoder.conv_out", 2 * cfg.latent_channels, boc[-1], 3)

    rev = boc[::-1]
    e += _conv("decoder.conv_in", "decoder.conv_in", "decoder.conv_in", rev[0], cfg.latent_channels, 3)
    e += _mid("decoder.mid", "decoder.mid_block", "decoder.mid", rev[0], cfg.mid_block_add_attention)
    for i in range(n):
        k = n - 1 - i  # BFL numbers decoder levels from the highest resolution
        for j in range(lpb + 1):
            cin = rev[max(i - 1, 0)] if j == 0 else rev[i]
            e += _resnet(f"decoder.up.{i}.resnets.{j}", f"decoder.up_blocks.{i}.resnets.{j}",
                         f"decoder.up.{k}.block.{j}", cin, rev[i])
        if i < n - 1:
            e += _conv(f"decoder.up.{i}.sample_conv", f"decoder.up_blocks.{i}.upsamplers.0.conv",
                       f"decoder.up.{k}.upsample.conv", rev[i], rev[i], 3)
    e += _norm("decoder.norm_out", "decoder.conv_norm_out", "decoder.norm_out", rev[-1])
    e += _conv("decoder.conv_out", "decoder.conv_out", "decoder.conv_out", cfg.out_channels, rev[-1], 3)
    c = cfg.latent_channels
    if cfg.use_quant_conv:
        e += _conv("quant_conv", "quant_conv", "quant_conv", 2 * c, 2 * c, 1)
    if cfg.use_post_quant_conv:
        e += _conv("post_quant_conv", "post_quant_conv", "post_quant_conv", c, c, 1)
    return e


def _squeeze_1x1(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], a.shape[1])


def vae_tensor_specs(cfg: VAEConfig, naming: str = "diffusers") -> list[TensorSpec]:
    """Checkpoint tensor names (diffusers or BFL) and where each lands in `AutoencoderKL`."""
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")
    specs = []
    for target, dname, bname, shape, note in _entries(cfg):
        if naming == "diffusers":
            specs.append(TensorSpec((dname,), shape, target))
        elif note == "conv1x1":
            specs.append(TensorSpec((bname,), (*shape, 1, 1), target, transform=_squeeze_1x1))
        else:
            specs.append(TensorSpec((bname,), shape, target))
    return specs


def vae_tensor_shapes(cfg: VAEConfig = FLUX_VAE, naming: str = "diffusers") -> dict[str, tuple[int, ...]]:
    """Expected tensor name -> shape of a VAE checkpoint for `cfg` (naming "diffusers" for a
    `vae/` folder, "bfl" for ae.safetensors)."""
    return expected_shapes(vae_tensor_specs(cfg, naming))


def detect_naming(names: Sequence[str]) -> str:
    """"bfl" or "diffusers" from the tensor names of a VAE checkpoint."""
    if any(n.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "decoder.mid_block.")) for n in names):
        return "diffusers"
    if any(n.startswith(("encoder.down.", "decoder.up.", "decoder.mid.")) for n in names):
        return "bfl"
    raise CheckpointError(f"cannot tell the VAE naming from tensor names (e.g. {sorted(names)[:4]}): "
                          "expected diffusers (encoder.down_blocks...) or BFL (encoder.down...) names")


def infer_vae_config(shapes: Mapping[str, tuple[int, ...]], naming: str, base: VAEConfig = FLUX_VAE) -> VAEConfig:
    """Sizes from tensor shapes; what shapes cannot tell (norm groups, scaling and shift factors)
    comes from `base` (FLUX.1's VAE by default)."""
    down, block = ("down_blocks", "resnets") if naming == "diffusers" else ("down", "block")
    levels = sorted({int(m.group(1)) for n in shapes if (m := re.match(rf"encoder\.{down}\.(\d+)\.", n))})
    if not levels:
        raise CheckpointError(f"cannot infer the VAE config: no encoder.{down}.* tensors")
    try:
        boc = tuple(shapes[f"encoder.{down}.{i}.{block}.0.conv1.weight"][0] for i in range(len(levels)))
        lpb = len({m.group(1) for n in shapes if (m := re.match(rf"encoder\.{down}\.0\.{block}\.(\d+)\.", n))})
        cin = shapes["encoder.conv_in.weight"][1]
        latent = shapes["decoder.conv_in.weight"][1]
        cout = shapes["decoder.conv_out.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"cannot infer the VAE config: tensor {e} is missing") from e
    mid_attn = any(".attn_1." in n or ".attentions.0." in n for n in shapes)
    return replace(base, in_channels=cin, out_channels=cout, latent_channels=latent, block_out_channels=boc,
                   layers_per_block=lpb, mid_block_add_attention=mid_attn,
                   use_quant_conv="quant_conv.weight" in shapes,
                   use_post_quant_conv="post_quant_conv.weight" in shapes)


def load_vae(path: str | Path | Sequence[str | Path], dtype: Any = jnp.bfloat16,
             config: VAEConfig | Mapping[str, Any] | str | Path | None = None) -> AutoencoderKL:
    """Load the VAE.

    path: a diffusers `vae/` folder, BFL's ae.safetensors (or any VAE safetensors file / list of
    files, diffusers or BFL names, told apart by the names), a FLUX snapshot root (vae/, else
    ae.safetensors), or a flaxflux model folder. config: a VAEConfig, or a diffusers config
    (dict / config.json path); without one, config.json beside the weights, else sizes inferred
    from shapes with FLUX.1's norm groups and scaling / shift factors. dtype: jnp.float32 for
    exact comparisons.
    """
    p = Path(path) if isinstance(path, (str, Path)) else None
    if p is not None and p.is_dir() and not (p / "config.json").is_file() and not (p / SUBFOLDER).is_dir() \
            and (p / BFL_FILE).is_file():
        path = p / BFL_FILE
    src = resolve_component(path, SUBFOLDER, WEIGHTS_INDEX, WEIGHTS)
    reader = TensorReader(src.files, strip=BFL_PREFIXES)
    naming = detect_naming(reader.keys())
    if isinstance(config, VAEConfig):
        cfg = config
    elif config is not None:
        cfg = VAEConfig.from_diffusers(config)
    elif src.config is not None:
        cfg = VAEConfig.from_diffusers(src.config)
    else:
        cfg = infer_vae_config({k: reader.shape(k) for k in reader.keys()}, naming)
    return fill_module(lambda: AutoencoderKL(cfg, dtype=dtype, rngs=nnx.Rngs(0)), reader,
                       vae_tensor_specs(cfg, naming), src.description)
