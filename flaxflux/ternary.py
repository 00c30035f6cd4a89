"""Ternary (1.58-bit) weights: absmean ternarization, TernaryLinear, model quantization, and the
on-disk base-3 storage codec.

In memory a TernaryLinear holds its weight in the 2-bit compute layout that `pallas_kernels`
defines (int8 `weight_packed`, 4 codes per byte) plus fp32 `weight_scale` and a bias in the
model dtype. On disk the codes are stored in base 3, five per byte (1.6 bits), as
`weight_trits` (N, ceil(K/5)) uint8: row n holds w[n, :] (PyTorch's (out, in) orientation),
digit i of byte j is code(w[n, 5j + i]) with code = w + 1 in {0, 1, 2}. Loading decodes it
(jitted, on the target device) and repacks to the compute layout.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels as pk

from .layers import Linear, dense
from .loading import BflSource, DenseCodec

GRANULARITIES = ("tensor", "channel")
ABSMEAN_EPS = 1e-5
TRITS_PER_BYTE = 5
_POW3 = np.array([1, 3, 9, 27, 81], np.uint8)


# --- ternarization -----------------------------------------------------------------------------


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def absmean_scale(w: jax.Array, granularity: str = "tensor") -> jax.Array:
    """BitNet b1.58's gamma + eps over the (out, in) weight: one value per matrix ("tensor", the
    paper's setting) or per output row ("channel"). Leading axes (stacked layers) are kept.
    Shape: w.shape[:-2] + (1,) or w.shape[:-1]; fp32."""
    _check_granularity(granularity)
    a = jnp.abs(w.astype(jnp.float32))
    gamma = jnp.mean(a, axis=(-2, -1))[..., None] if granularity == "tensor" else jnp.mean(a, axis=-1)
    return gamma + ABSMEAN_EPS


def _broadcast_scale(scale: jax.Array) -> jax.Array:
    return scale[..., :, None]  # (..., 1 | out) -> broadcast over the in axis


def _codes(w: jax.Array, scale: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round(w.astype(jnp.float32) / _broadcast_scale(scale)), -1, 1)


def ternarize(w: jax.Array, granularity: str = "tensor") -> tuple[jax.Array, jax.Array]:
    """W_q = RoundClip(W / (mean|W| + eps), -1, 1) on an (..., out, in) weight.
    Returns (codes int8 in {-1, 0, 1}, same shape; scale fp32) with W ~= codes * scale."""
    scale = absmean_scale(w, granularity)
    return _codes(w, scale).astype(jnp.int8), scale


# One compiled reduction per layer shape, shared by in-memory quantization (stacked layers, one at
# a time) and the converter (streamed layers): XLA's reduction order, and so the last bit of a
# scale, depends on the array shape it reduces. The codes then follow elementwise, exactly.
absmean_scale_layer = jax.jit(absmean_scale, static_argnames="granularity")
_codes_layer = jax.jit(lambda w, scale: _codes(w, scale).astype(jnp.int8))


def ternarize_layer(w: jax.Array, granularity: str = "tensor") -> tuple[jax.Array, jax.Array]:
    """`ternarize` of one (out, in) matrix, through the shared compiled scale reduction."""
    scale = absmean_scale_layer(w, granularity)
    return _codes_layer(w, scale), scale


def ternarize_layers(w: jax.Array, granularity: str = "tensor") -> tuple[jax.Array, jax.Array]:
    """`ternarize` applied to each (out, in) matrix of a stacked (..., out, in) weight."""
    flat = w.reshape(-1, *w.shape[-2:])
    parts = [ternarize_layer(flat[i], granularity) for i in range(flat.shape[0])]
    codes = jnp.stack([c for c, _ in parts]).reshape(w.shape)
    scale = jnp.stack([s for _, s in parts]).reshape(*w.shape[:-2], -1)
    return codes, scale


def fake_ternarize(w: jax.Array, granularity: str = "tensor", scale: jax.Array | None = None) -> jax.Array:
    """Quantize-dequantize for quantization-aware training: the value is codes * scale; the
    gradient w.r.t. w is the identity (straight-through estimator), and a given `scale` (e.g. a
    learnable one replacing the absmean) gets d/d(scale) = codes, the codes held fixed."""
    s = jax.lax.stop_gradient(absmean_scale(w, granularity)) if scale is None else scale
    wf = w.astype(jnp.float32)
    codes = jax.lax.stop_gradient(jnp.clip(jnp.round(wf / _broadcast_scale(s)), -1, 1))
    return (codes * _broadcast_scale(s) + (wf - jax.lax.stop_gradient(wf))).astype(w.dtype)


# --- the layer ---------------------------------------------------------------------------------


class TernaryCodes(nnx.Variable):
    """Packed ternary codes: state to save and load, not a trainable parameter."""


class TernaryLinear(nnx.Module):
    """y = x @ (codes * scale)^T + b with codes packed 4 per byte (pallas_kernels layout).

    Drop-in for `Linear` (same call). `activations` = "native" (weight-only, x stays bf16) or
    "int8" (W1.58A8); `backend` is passed to `pallas_kernels.ternary_matmul`."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, stack: tuple[int, ...] = (),
                 granularity: str = "tensor", dtype: Any = jnp.bfloat16, activations: str = "native",
                 backend: str = "auto"):
        _check_granularity(granularity)
        self.in_features = in_features
        self.out_features = out_features
        self.granularity = granularity
        self.activations = activations
        self.backend = backend
        kp4 = pk.padded_k(in_features) // 4
        self.weight_packed = TernaryCodes(jnp.zeros((*stack, kp4, out_features), jnp.int8))
        n_scale = 1 if granularity == "tensor" else out_features
        self.weight_scale = nnx.Param(jnp.ones((*stack, n_scale), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((*stack, out_features), dtype)) if bias else None

    @classmethod
    def from_linear(cls, lin: Linear, granularity: str = "tensor", **kw) -> "TernaryLinear":
        w = lin.weight[...]
        stack = w.shape[:-2]
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, stack=stack,
                  granularity=granularity, dtype=w.dtype, **kw)
        codes, scale = ternarize_layers(w, granularity)
        new.weight_packed[...] = pack_stacked(codes)
        new.weight_scale[...] = scale
        if lin.bias is not None:
            new.bias[...] = lin.bias[...]
        return new

    def dequantized_weight(self) -> jax.Array:
        """codes * scale as a dense fp32 (..., out, in) weight (for tests and QAT init)."""
        codes = unpack_stacked(self.weight_packed[...], self.in_features)
        return codes.astype(jnp.float32) * _broadcast_scale(self.weight_scale[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return pk.ternary_matmul(x, self.weight_packed[...], self.weight_scale[...], bias=bias,
                                 out_dtype=x.dtype, backend=self.backend, activations=self.activations)


class QATLinear(nnx.Module):
    """The training form of a TernaryLinear (quantization-aware training, distillation): a latent
    full-precision weight, ternarized in every forward pass with a straight-through estimator
    (`fake_ternarize`), and a learnable scale. `to_ternary` packs what the forward pass uses."""

    def __init__(self, weight: jax.Array, scale: jax.Array, bias: jax.Array | None, granularity: str):
        _check_granularity(granularity)
        self.in_features, self.out_features = int(weight.shape[-1]), int(weight.shape[-2])
        self.granularity = granularity
        self.weight = nnx.Param(weight)
        self.weight_scale = nnx.Param(scale.astype(jnp.float32))
        self.bias = nnx.Param(bias) if bias is not None else None

    @classmethod
    def from_linear(cls, lin: Linear, granularity: str = "tensor") -> "QATLinear":
        """Latent weight = the dense weight; scale = its absmean (where ternarization starts)."""
        w = lin.weight[...]
        return cls(w, absmean_scale(w, granularity), None if lin.bias is None else lin.bias[...], granularity)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = fake_ternarize(self.weight[...], self.granularity, self.weight_scale[...])
        y = dense(x, w)
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)

    def to_ternary(self, dtype: Any = jnp.bfloat16, **kw) -> TernaryLinear:
        stack = self.weight.shape[:-2]
        new = TernaryLinear(self.in_features, self.out_features, bias=self.bias is not None, stack=stack,
                            granularity=self.granularity, dtype=dtype, **kw)
        scale = self.weight_scale[...].astype(jnp.float32)
        new.weight_packed[...] = pack_stacked(_codes(self.weight[...], scale).astype(jnp.int8))
        new.weight_scale[...] = scale
        if self.bias is not None:
            new.bias[...] = self.bias[...].astype(dtype)
        return new


def to_qat(model: nnx.Module, granularity: str = "tensor") -> nnx.Module:
    """Replace every block linear by a QATLinear (latent weights, absmean-initialised scales), in place."""
    for parent, name, lin, _ in list(block_linears(model)):
        if isinstance(lin, Linear):
            setattr(parent, name, QATLinear.from_linear(lin, granularity))
    return model


def from_qat(model: nnx.Module, dtype: Any = jnp.bfloat16, **kw) -> nnx.Module:
    """Replace every QATLinear by the TernaryLinear its forward pass computes, in place."""
    for parent, name, lin, _ in list(block_linears(model)):
        if isinstance(lin, QATLinear):
            setattr(parent, name, lin.to_ternary(dtype, **kw))
    return model


@jax.jit
def pack_stacked(codes: jax.Array) -> jax.Array:
    """(..., out, in) int8 codes -> (..., K_pad/4, out) compute layout, per stacked layer."""
    flat = codes.reshape(-1, *codes.shape[-2:])
    packed = jax.vmap(lambda c: pk.pack_ternary(c.T))(flat)
    return packed.reshape(*codes.shape[:-2], *packed.shape[-2:])


@functools.partial(jax.jit, static_argnums=1)
def unpack_stacked(packed: jax.Array, in_features: int) -> jax.Array:
    """Inverse of `pack_stacked`: (..., K_pad/4, out) -> (..., out, in) int8."""
    flat = packed.reshape(-1, *packed.shape[-2:])
    codes = jax.vmap(lambda p: pk.unpack_ternary(p, in_features).T)(flat)
    return codes.reshape(*packed.shape[:-2], *codes.shape[-2:])


# --- quantizing a model ------------------------------------------------------------------------


def _block_linears(module: nnx.Module, prefix: str = "") -> Iterator[tuple[nnx.Module, str, Any, str]]:
    for name, child in list(vars(module).items()):
        if isinstance(child, (Linear, TernaryLinear, QATLinear)):
            yield module, name, child, prefix + name
        elif isinstance(child, nnx.Module):
            yield from _block_linears(child, prefix + name + ".")


def block_linears(model: nnx.Module) -> Iterator[tuple[nnx.Module, str, Any, str]]:
    """(parent, attribute, layer, dotted path) of every linear inside the double and single blocks:
    attention qkv/proj, MLPs, modulations, linear1/linear2. Embedders and the final layer are not
    block linears and stay in the model dtype, as in the paper."""
    for blocks in ("double_blocks", "single_blocks"):
        yield from _block_linears(getattr(model, blocks), blocks + ".")


def quantize_model(model: nnx.Module, granularity: str = "tensor", activations: str = "native",
                   backend: str = "auto") -> nnx.Module:
    """Replace every block linear by a TernaryLinear (absmean ternarization), in place."""
    for parent, name, lin, _ in list(block_linears(model)):
        if isinstance(lin, Linear):
            setattr(parent, name, TernaryLinear.from_linear(lin, granularity, activations=activations,
                                                            backend=backend))
    return model


def set_ternary_options(model: nnx.Module, *, activations: str | None = None, backend: str | None = None) -> None:
    """Switch every TernaryLinear's activations ("native" | "int8") or kernel backend."""
    if activations not in (None, "native", "int8"):
        raise ValueError(f"activations must be 'native' or 'int8', got {activations!r}")
    for _, layer in nnx.iter_graph(model):
        if isinstance(layer, TernaryLinear):
            if activations is not None:
                layer.activations = activations
            if backend is not None:
                pk.choose_backend(backend)
                layer.backend = backend


def count_parameters(model: nnx.Module) -> dict[str, int]:
    """Ternary weights (logical count) and everything else, with resident bytes of each.
    Ternary bytes are the packed codes plus their fp32 scales."""
    ternary = ternary_bytes = other = other_bytes = 0
    for _, layer in nnx.iter_graph(model):
        if isinstance(layer, TernaryLinear):
            ternary += int(np.prod(layer.weight_packed.shape[:-2])) * layer.in_features * layer.out_features
    for path, v in nnx.to_flat_state(nnx.state(model)):
        n = int(np.prod(v.shape))
        nbytes = n * jnp.dtype(v.dtype).itemsize
        if path[-1] in ("weight_packed", "weight_scale"):
            ternary_bytes += nbytes
        else:
            other += n
            other_bytes += nbytes
    return {"ternary_params": ternary, "ternary_bytes": ternary_bytes,
            "other_params": other, "other_bytes": other_bytes}


# --- on-disk base-3 codec ----------------------------------------------------------------------


def trits_shape(out_features: int, in_features: int) -> tuple[int, int]:
    return out_features, -(-in_features // TRITS_PER_BYTE)


def encode_trits_np(codes: np.ndarray) -> np.ndarray:
    """(out, in) int8 codes -> (out, ceil(in/5)) uint8, five base-3 digits (w + 1) per byte."""
    n, k = codes.shape
    c = np.ones((n, trits_shape(n, k)[1] * TRITS_PER_BYTE), np.uint8)  # padding holds code(0)
    c[:, :k] = (codes + 1).astype(np.uint8)
    c = c.reshape(n, -1, TRITS_PER_BYTE)
    return (c * _POW3).sum(axis=-1, dtype=np.uint8)


def decode_trits(trits: jax.Array, in_features: int) -> jax.Array:
    """(..., out, ceil(in/5)) uint8 -> (..., out, in) int8 codes in {-1, 0, 1}."""
    t = trits.astype(jnp.int32)[..., None] // jnp.asarray(_POW3, jnp.int32) % 3
    return (t.reshape(*trits.shape[:-1], -1)[..., :in_features] - 1).astype(jnp.int8)


def ternarize_to_trits_np(w: np.ndarray, granularity: str) -> tuple[np.ndarray, np.ndarray]:
    """The converter's per-tensor step: (out, in) float weight -> (trits uint8, scale fp32).
    The scale comes from the same compiled reduction as in-memory quantization; codes and their
    base-3 packing are one fused XLA pass (numpy's short-axis sums were 10x slower)."""
    wj = jax.device_put(w)  # one copy into XLA's buffer (jnp.asarray took 1.6x longer here)
    scale = absmean_scale_layer(wj, granularity)
    return np.asarray(_encode_trits(wj, scale)), np.asarray(scale)


@jax.jit
def _encode_trits(w: jax.Array, scale: jax.Array) -> jax.Array:
    n, k = w.shape
    c = (_codes(w, scale) + 1).astype(jnp.uint8)  # digits 0..2; a byte's value is at most 242
    full = k // TRITS_PER_BYTE * TRITS_PER_BYTE

    def pack(digits: jax.Array) -> jax.Array:
        return sum(digits[..., i] * jnp.uint8(_POW3[i]) for i in range(digits.shape[-1]))

    # Whole bytes from a strided view, the partial last byte apart: padding the codes to a
    # multiple of 5 first would copy the whole matrix (5x slower for FLUX's K = 3072).
    out = pack(c[:, :full].reshape(n, -1, TRITS_PER_BYTE))
    if full < k:  # missing digits of the last byte are code(0) = 1
        pad = sum(int(_POW3[i]) for i in range(k - full, TRITS_PER_BYTE))
        out = jnp.concatenate([out, (pack(c[:, full:]) + jnp.uint8(pad))[:, None]], axis=1)
    return out


# --- storage codec: how a ternary model sits in a flaxflux folder ------------------------------

PACKED, TRITS = "weight_packed", "weight_trits"


class TernaryCodec(DenseCodec):
    """Ternary layers' codes are stored as `weight_trits` (base 3) and loaded as `weight_packed`
    (2-bit compute layout); every other tensor is stored as the dense codec stores it."""

    def __init__(self, in_features: dict[str, int], granularity: str):
        _check_granularity(granularity)
        self.in_features = in_features  # NNX path of each weight_packed -> K (true, unpadded)
        self.granularity = granularity
        self._scales: dict[str, np.ndarray] = {}

    @classmethod
    def for_model(cls, model_fn, granularity: str) -> "TernaryCodec":
        module = nnx.eval_shape(model_fn)
        ks = {f"{path}.{PACKED}": layer.in_features for _, _, layer, path in block_linears(module)}
        return cls(ks, granularity)

    def disk_tensors(self, internal, names, target):
        if not internal.endswith(PACKED):
            return super().disk_tensors(internal, names, target)
        shape = trits_shape(target.shape[-1], self.in_features[internal])
        return [(n[: -len(PACKED)] + TRITS, jax.ShapeDtypeStruct(shape, jnp.uint8)) for n in names]

    def load(self, internal, names, target, src: BflSource) -> jax.Array:
        if not internal.endswith(PACKED):
            return super().load(internal, names, target, src)
        k = self.in_features[internal]
        if not internal.startswith(("double_blocks.", "single_blocks.")):
            return _decode_pack(jnp.asarray(src.get(names[0][: -len(PACKED)] + TRITS)), k)
        buf = jnp.zeros(target.shape, target.dtype)
        for i, name in enumerate(names):  # layer by layer into one buffer: no second copy
            buf = _decode_into(buf, jnp.asarray(src.get(name[: -len(PACKED)] + TRITS)), i, k)
        return buf

    def encode(self, name: str, src: BflSource) -> np.ndarray:
        """A stored tensor made from a dense BFL-named source: trits and scale come from one
        ternarization of `<module>.weight`; the scale is kept until it is asked for."""
        if name.endswith(TRITS):
            base = name[: -len(TRITS)]
            trits, scale = ternarize_to_trits_np(src.get(base + "weight"), self.granularity)
            self._scales[base] = scale
            return trits
        if name.endswith("weight_scale"):
            return self._scales.pop(name[: -len("weight_scale")])
        return src.get(name)

    def source_name(self, name: str) -> str:
        """The dense tensor a stored tensor is made from."""
        if name.endswith(TRITS):
            return name[: -len(TRITS)] + "weight"
        if name.endswith("weight_scale"):
            return name[: -len("weight_scale")] + "weight"
        return name


class QuantizeOnLoadCodec(TernaryCodec):
    """Reads a dense source and ternarizes each block linear layer by layer as it is loaded:
    the layer's dense weight is the only dense copy in memory at any time."""

    def _is_ternary_scale(self, internal: str) -> bool:
        return internal.endswith(".weight_scale") and internal[: -len("weight_scale")] + PACKED in self.in_features

    def disk_tensors(self, internal, names, target):
        if internal.endswith(PACKED):  # read: the dense (out, in) weight of each layer, any float dtype
            shape = (target.shape[-1], self.in_features[internal])
            return [(n[: -len(PACKED)] + "weight", jax.ShapeDtypeStruct(shape, jnp.bfloat16)) for n in names]
        if self._is_ternary_scale(internal):
            return []  # computed while loading the codes
        return DenseCodec.disk_tensors(self, internal, names, target)

    def load(self, internal, names, target, src: BflSource) -> jax.Array:
        if self._is_ternary_scale(internal):
            return self._scales.pop(internal)
        if not internal.endswith(PACKED):
            return DenseCodec.load(self, internal, names, target, src)
        stacked = internal.startswith(("double_blocks.", "single_blocks."))
        buf = jnp.zeros(target.shape if stacked else (1, *target.shape), target.dtype)
        scales = []
        for i, name in enumerate(names):
            w = jnp.asarray(src.get(name[: -len(PACKED)] + "weight"))
            scale = absmean_scale_layer(w, self.granularity)
            buf = _pack_into(buf, _codes_layer(w, scale), i)
            scales.append(scale)
            del w
        self._scales[internal[: -len(PACKED)] + "weight_scale"] = jnp.stack(scales) if stacked else scales[0]
        return buf if stacked else buf[0]


def _pack_into_impl(buf: jax.Array, codes: jax.Array, i: jax.Array) -> jax.Array:
    return buf.at[i].set(pk.pack_ternary(codes.T))


_pack_into = jax.jit(_pack_into_impl, donate_argnums=() if jax.default_backend() == "cpu" else (0,))


@functools.partial(jax.jit, static_argnums=1)
def _decode_pack(trits: jax.Array, k: int) -> jax.Array:
    return pk.pack_ternary(decode_trits(trits, k).T)


def _decode_into_impl(buf: jax.Array, trits: jax.Array, i: jax.Array, k: int) -> jax.Array:
    return buf.at[i].set(pk.pack_ternary(decode_trits(trits, k).T))


# Donating the buffer updates it in place on accelerators; CPU cannot donate (it would warn).
_decode_into = jax.jit(_decode_into_impl, static_argnums=3,
                       donate_argnums=() if jax.default_backend() == "cpu" else (0,))
