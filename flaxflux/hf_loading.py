"""Loading NNX modules from checkpoints that keep Hugging Face tensor names (T5, CLIP, VAE).

A component describes its checkpoint as a list of `TensorSpec`s (on-disk names and shapes, and
where each lands in the model). `fill_module` builds the model abstractly (`nnx.eval_shape`, no
allocation), validates the tensors (missing, unexpected, shape, dtype: each error names tensor
and file) and fills every parameter, one tensor at a time, on the host.

`resolve_component` turns what a user passes (a component folder, a FLUX snapshot root, a
flaxflux model folder, or a list of safetensors files) into (files, config dict).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .layers import gelu_tanh
from .safetensors_io import FLOAT_TAGS, CheckpointError, TensorReader, read_json, sharded_files

Array = jax.Array
PathLike = str | Path


# ----------------------------------------------------------------------------- activations

def gelu_erf(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names -> functions (the ones T5 / CLIP configs use).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "gelu": gelu_erf,
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str, where: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"{where}: activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------- config helpers

def config_dict(config: Mapping[str, Any] | PathLike) -> dict[str, Any]:
    """A config given as a dict, a config.json path, or a folder holding config.json. flaxflux's
    own component config ({"flaxflux_component": ..., "config": {...}}) is unwrapped."""
    if isinstance(config, Mapping):
        d = dict(config)
    else:
        p = Path(config)
        d = read_json(p / "config.json" if p.is_dir() else p)
    if "flaxflux_component" in d and isinstance(d.get("config"), Mapping):
        d = dict(d["config"])
    return d


# ----------------------------------------------------------------------------- locating files

@dataclass(frozen=True)
class ComponentSource:
    files: list[Path]
    config: dict[str, Any] | None   # the component's config.json contents, None if there is none
    description: str                # for error messages


def resolve_component(path: PathLike | Sequence[PathLike], subfolder: str, index_name: str,
                      single_name: str) -> ComponentSource:
    """Files and config of one component.

    path: a list of safetensors files; one safetensors file; the component folder (config.json +
    safetensors [+ index]); a FLUX snapshot root (uses `subfolder`); or a flaxflux model folder.
    """
    from .model_folder import find_root, open_component

    if isinstance(path, (list, tuple)):
        files = [Path(p) for p in path]
        if not files:
            raise CheckpointError(f"{subfolder}: empty list of safetensors files")
        return ComponentSource(files, None, ", ".join(str(f) for f in files))
    path = Path(path)
    if path.is_file():
        return ComponentSource([path], None, str(path))
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    if find_root(path) is not None:
        found = open_component(path if (path / "config.json").is_file() else path / subfolder, subfolder)
        if found is not None:
            files, info = found
            return ComponentSource(files, config_dict(info), f"flaxflux folder {files[0].parent}")
    if not (path / "config.json").is_file() and (path / subfolder).is_dir():
        path = path / subfolder
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (expected a {subfolder}/ component folder, a FLUX "
                              f"snapshot root holding {subfolder}/, or a list of safetensors files)")
    return ComponentSource(sharded_files(path, index_name, single_name), read_json(path / "config.json"),
                           f"{path}")


# ----------------------------------------------------------------------------- tensor specs

@dataclass(frozen=True)
class TensorSpec:
    """One model parameter and the on-disk tensor(s) it comes from.

    names: on-disk names; more than one are stacked along a new leading axis (scanned layers).
    shape: the on-disk shape of each named tensor.
    target: dotted path of the parameter in the model's pure state dict.
    transform: on-disk layout -> model layout, applied to each tensor before stacking.
    alternates: names accepted instead of names[0] when that is absent (tied embeddings).
    """

    names: tuple[str, ...]
    shape: tuple[int, ...]
    target: str
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    alternates: tuple[str, ...] = ()


def expected_shapes(specs: Iterable[TensorSpec]) -> dict[str, tuple[int, ...]]:
    """On-disk tensor name -> shape, for a converter to validate against."""
    return {n: tuple(s.shape) for s in specs for n in s.names}


def _few(names: Sequence[str], n: int = 6) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _resolve_names(reader: TensorReader, specs: Sequence[TensorSpec]) -> dict[str, str]:
    """Expected name -> the name actually present (an alternate where the primary is absent)."""
    out = {}
    for s in specs:
        for n in s.names:
            if n in reader or not s.alternates:
                out[n] = n
                continue
            out[n] = next((a for a in s.alternates if a in reader), n)
    return out


def check_tensors(reader: TensorReader, specs: Sequence[TensorSpec], description: str,
                  ignore: Callable[[str], bool] = lambda name: False) -> dict[str, str]:
    """Missing / unexpected tensors, wrong shapes and non-float dtypes, each named with its file.
    Returns expected name -> present name."""
    present = _resolve_names(reader, specs)
    have = set(reader.keys())
    tolerated = {a for s in specs for a in s.alternates}
    missing = sorted(n for n, p in present.items() if p not in have)
    if missing:
        alt = {n: s.alternates for s in specs for n in s.names if s.alternates}
        hint = "".join(f" ({m!r} may also be named {', '.join(map(repr, alt[m]))})" for m in missing[:3] if m in alt)
        raise CheckpointError(f"{description}: missing tensor(s) {_few(missing)}{hint}")
    extra = sorted(n for n in have - set(present.values()) - tolerated if not ignore(n))
    if extra:
        raise CheckpointError(f"{description}: unexpected tensor(s) {_few(extra)} (e.g. {extra[0]!r} in "
                              f"{reader.file_of(extra[0])}); does the config match the weights?")
    for s in specs:
        for n in s.names:
            p = present[n]
            got = tuple(reader.shape(p))
            if got != tuple(s.shape):
                raise CheckpointError(f"tensor {p!r} in {reader.file_of(p)}: shape {got}, expected "
                                      f"{tuple(s.shape)} (does the config match the weights?)")
            tag = reader.dtype_tag(p)
            if tag not in FLOAT_TAGS:
                raise CheckpointError(f"tensor {p!r} in {reader.file_of(p)}: dtype {tag}, expected one of {FLOAT_TAGS}")
    return present


# ----------------------------------------------------------------------------- int8 weights

def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel absmax int8: w (..., out, in) ~= q * scale[..., None].
    Returns (q int8, scale float32 (..., out)). Rows of zeros get scale 1 (q = 0)."""
    wf = np.asarray(w, np.float32)
    amax = np.max(np.abs(wf), axis=-1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(wf / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale


# ----------------------------------------------------------------------------- filling a model

def _flat(pure: Mapping) -> dict[str, Any]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
        out[".".join(str(getattr(k, "key", k)) for k in path)] = leaf
    return out


def _key(d: Mapping, k: str) -> Any:
    # nnx.List children appear under int keys in the pure dict
    return int(k) if k.isdigit() and int(k) in d else k


def _set(pure: dict, dotted: str, value: Any) -> None:
    d = pure
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d[_key(d, k)]
    d[_key(d, keys[-1])] = value


def fill_module(model_fn: Callable[[], nnx.Module], reader: TensorReader, specs: Sequence[TensorSpec],
                description: str, ignore: Callable[[str], bool] = lambda name: False) -> nnx.Module:
    """Build `model_fn()` abstractly, validate `reader` against `specs`, fill every parameter.

    Each parameter takes the dtype of the abstract model; an int8 target (with a sibling `scale`)
    is quantized per output channel on the host (`quantize_int8`)."""
    graphdef, state = nnx.split(nnx.eval_shape(model_fn))
    pure = nnx.to_pure_dict(state)
    flat = _flat(pure)
    present = check_tensors(reader, specs, description, ignore)
    filled: set[str] = set()
    for s in specs:
        if s.target not in flat:
            raise AssertionError(f"spec target {s.target!r} is not a parameter of the model")
        target = flat[s.target]
        stack = (lambda a: np.stack(a)) if len(s.names) > 1 else (lambda a: a[0])
        arrays, scales = [], []
        for n in s.names:  # one layer at a time: host peak is one stacked tensor, not an fp32 copy
            a = reader.get(present[n])
            if s.transform is not None:
                a = s.transform(a)
            if jnp.dtype(target.dtype) == jnp.int8:
                a, scale = quantize_int8(a)
                scales.append(scale)
            arrays.append(a)
        host = stack(arrays)
        if tuple(host.shape) != tuple(target.shape):
            raise AssertionError(f"{s.target}: built {host.shape}, model has {target.shape}")
        _set(pure, s.target, jnp.asarray(host, dtype=target.dtype))
        if scales:
            scale_path = s.target.rsplit(".", 1)[0] + ".scale"
            _set(pure, scale_path, jnp.asarray(stack(scales), flat[scale_path].dtype))
            filled.add(scale_path)
        filled.add(s.target)
        del arrays, host
    unfilled = sorted(set(flat) - filled)
    if unfilled:
        raise AssertionError(f"model parameters without a checkpoint tensor: {unfilled[:6]}")
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- shared numerics

def dense(x: Array, weight: Array, out_dtype: Any = None) -> Array:
    """x (..., K) @ weight (N, K)^T in x's dtype with fp32 accumulation; result in `out_dtype`
    (default x's dtype). float32 inputs use full precision (no TF32 on GPU)."""
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jax.lax.dot_general(
        x, weight.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())), precision=precision,
        preferred_element_type=out_dtype or x.dtype)


def layer_norm(x: Array, weight: Array, bias: Array | None, eps: float) -> Array:
    """LayerNorm over the last axis with affine parameters; statistics in fp32; returns fp32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * weight.astype(jnp.float32)
    return y + bias.astype(jnp.float32) if bias is not None else y


def softmax_attention(q: Array, k: Array, v: Array, bias: Array | None, scale: float) -> Array:
    """q, k, v (B, L, H, D); bias broadcastable to (B, H, Lq, Lk) (fp32, additive).
    Scores and softmax in fp32; probabilities cast to v's dtype for the value product."""
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision, preferred_element_type=jnp.float32)
    if scale != 1.0:
        s = s * scale
    if bias is not None:
        s = s + bias
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v, precision=precision)


NEG_INF = float(np.finfo(np.float32).min)  # additive mask value, as transformers uses


def key_padding_bias(mask: Array | None) -> Array | None:
    """(B, Lk) keep-mask (1 = attend) -> additive fp32 bias (B, 1, 1, Lk), or None."""
    if mask is None:
        return None
    return jnp.where(jnp.asarray(mask)[:, None, None, :] > 0, 0.0, NEG_INF).astype(jnp.float32)
