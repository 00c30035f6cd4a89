"""Load a FLUX transformer from a BFL single file, a diffusers folder or a flaxflux model folder.

Every source is seen through one interface, `BflSource`: BFL tensor names -> numpy arrays,
read lazily. The model is built abstractly (`nnx.eval_shape`, no allocation), each parameter
is filled from the source, checked for shape, and cast to the requested dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import naming
from .config import FLUX_DEV, FluxConfig
from .safetensors_io import FLOAT_TAGS, TAGS, CheckpointError, TensorReader, sharded_files
from .transformer import FluxTransformer

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


class BflSource(Protocol):
    """Tensors of one transformer under BFL names."""

    description: str

    def keys(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype_tag(self, name: str) -> str: ...
    def get(self, name: str) -> np.ndarray: ...
    def origin(self, name: str) -> str: ...   # "where it comes from", for error messages
    def nbytes(self, name: str) -> int: ...   # bytes read to produce it
    def files(self) -> list[Path]: ...


class BflFileSource:
    """A BFL-named checkpoint (flux1-dev.safetensors, or flaxflux's own shards)."""

    def __init__(self, files: list[Path], description: str):
        self.reader = TensorReader(files, strip=naming.BFL_PREFIXES)
        self.description = description

    def keys(self) -> list[str]:
        return self.reader.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(name)

    def dtype_tag(self, name: str) -> str:
        return self.reader.dtype_tag(name)

    def get(self, name: str) -> np.ndarray:
        return self.reader.get(name)

    def origin(self, name: str) -> str:
        return f"tensor {name!r} in {self.reader.file_of(name)}"

    def nbytes(self, name: str) -> int:
        return self.reader.nbytes(name)

    def files(self) -> list[Path]:
        return [f.path for f in self.reader.files]


class DiffusersSource:
    """A diffusers `FluxTransformer2DModel` folder seen under BFL names (q/k/v fused on the fly)."""

    def __init__(self, folder: Path, cfg: FluxConfig):
        self.folder = folder
        self.reader = TensorReader(sharded_files(folder, DIFFUSERS_INDEX, DIFFUSERS_WEIGHTS))
        self.description = f"diffusers folder {folder}"
        self._tensors = {t.bfl: t for t in naming.tensors(cfg)}
        wanted = {d for t in self._tensors.values() for d in t.diffusers}
        have = set(self.reader.keys())
        missing, extra = sorted(wanted - have), sorted(have - wanted)
        if missing:
            raise CheckpointError(f"{folder}: missing tensor(s) {_few(missing)} (expected by config.json)")
        if extra:
            raise CheckpointError(f"{folder}: unexpected tensor(s) {_few(extra)} in {_files_of(self.reader, extra)}")
        for t in self._tensors.values():
            self.shape(t.bfl)  # parts of a fused tensor must agree before anything else is checked

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        t = self._tensors[name]
        parts = [self.reader.shape(d) for d in t.diffusers]
        if any(p[1:] != parts[0][1:] for p in parts):
            raise CheckpointError(f"{self.description}: cannot fuse, mismatched shapes: {self.origin(name)}")
        return (sum(p[0] for p in parts), *parts[0][1:])

    def dtype_tag(self, name: str) -> str:
        tags = {self.reader.dtype_tag(d) for d in self._tensors[name].diffusers}
        return tags.pop() if len(tags) == 1 else "mixed:" + ",".join(sorted(tags))

    def get(self, name: str) -> np.ndarray:
        return naming.diffusers_to_bfl(self._tensors[name], self.reader.get)

    def nbytes(self, name: str) -> int:
        return sum(self.reader.nbytes(d) for d in self._tensors[name].diffusers)

    def files(self) -> list[Path]:
        return [f.path for f in self.reader.files]

    def origin(self, name: str) -> str:
        parts = self._tensors[name].diffusers
        where = ", ".join(f"{d!r} {self.reader.shape(d)} in {self.reader.file_of(d)}" for d in parts)
        return f"tensor {name!r} (built from diffusers {where})"


def _few(names: list[str], n: int = 6) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _files_of(reader: TensorReader, names: list[str]) -> str:
    return ", ".join(sorted({str(reader.file_of(n)) for n in names}))


def _config_arg(config: FluxConfig | Mapping[str, Any] | str | Path | None) -> FluxConfig | None:
    if config is None or isinstance(config, FluxConfig):
        return config
    return FluxConfig.from_diffusers(dict(config) if isinstance(config, Mapping) else config)


def open_transformer(path: str | Path, config: FluxConfig | Mapping | str | Path | None = None
                     ) -> tuple[BflSource, FluxConfig, dict[str, Any]]:
    """Resolve `path` to (BFL-named source, config, format info).

    path: a BFL single file; a diffusers `transformer/` folder; a FLUX snapshot folder
    (model_index.json, uses transformer/); or a flaxflux model folder (or its transformer/).
    """
    from .model_folder import open_component  # the flaxflux format (kept apart from foreign ones)

    path = Path(path)
    cfg = _config_arg(config)
    if path.is_file():
        src = BflFileSource([path], f"BFL file {path}")
        if cfg is None:
            cfg = naming.infer_config({k: src.shape(k) for k in src.keys()}, base=FLUX_DEV)
        return src, cfg, {"quantization": "none"}
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    found = open_component(path, "transformer")
    if found is not None:
        files, info = found
        return BflFileSource(files, f"flaxflux folder {path}"), cfg or FluxConfig.from_dict(info["config"]), info
    if (path / "model_index.json").exists():
        if not (path / "transformer").is_dir():
            raise CheckpointError(f"{path}: snapshot has no transformer/ folder")
        path = path / "transformer"
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: not a FLUX transformer folder (no config.json, no flaxflux.json)")
    cfg = cfg or FluxConfig.from_diffusers(path / "config.json")
    return DiffusersSource(path, cfg), cfg, {"quantization": "none"}


def abstract_model(model_fn) -> tuple[nnx.Module, Any, Any, dict, dict[str, Any]]:
    """(abstract module, graphdef, state, pure dict, flat dotted name -> ShapeDtypeStruct),
    built with nnx.eval_shape: nothing is allocated."""
    module = nnx.eval_shape(model_fn)
    graphdef, state = nnx.split(module)
    pure = nnx.to_pure_dict(state)
    return module, graphdef, state, pure, _flat_params(pure)


class DenseCodec:
    """How model parameters appear on disk: each parameter layer under its BFL name, as is.

    A codec answers, per model parameter, which tensors a folder must hold (names, per-layer
    shapes and dtypes), how to load them into the parameter, and (for the converter) how to make
    each stored tensor from a dense source. `flaxflux.ternary.TernaryCodec` extends it."""

    def disk_tensors(self, internal: str, names: list[str], target: Any) -> list[tuple[str, jax.ShapeDtypeStruct]]:
        shape = target.shape[1:] if naming.is_stacked(internal) else target.shape
        return [(n, jax.ShapeDtypeStruct(tuple(shape), target.dtype)) for n in names]

    def load(self, internal: str, names: list[str], target: Any, src: BflSource) -> jax.Array:
        arrays = [src.get(n) for n in names]
        if not naming.is_stacked(internal):
            return jnp.asarray(arrays[0], dtype=target.dtype)
        # numpy arrays stack on the host; arrays a source already made on a device stay there
        stack = jnp.stack if isinstance(arrays[0], jax.Array) else np.stack
        return jnp.asarray(stack(arrays), dtype=target.dtype)

    def encode(self, name: str, src: BflSource) -> np.ndarray:
        return src.get(name)

    def source_name(self, name: str) -> str:
        """The dense source tensor a stored tensor is made from."""
        return name


def expected_tensors(flat: Mapping[str, Any], codec: DenseCodec | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Stored name -> per-layer shape and dtype of every tensor the (abstract) model needs."""
    codec = codec or DenseCodec()
    out = {}
    for internal, (names, target) in naming.param_routes(flat).items():
        out.update(codec.disk_tensors(internal, names, target))
    return out


def check_source(src: BflSource, expected: Mapping[str, jax.ShapeDtypeStruct]) -> None:
    """Missing / unexpected tensors, wrong shapes and unsupported dtypes, each named."""
    have = set(src.keys())
    missing = sorted(set(expected) - have)
    extra = sorted(have - set(expected))
    if missing:
        raise CheckpointError(f"{src.description}: missing tensor(s) {_few(missing)}")
    if extra:
        raise CheckpointError(f"{src.description}: unexpected tensor(s) {_few(extra)} "
                              f"(e.g. {src.origin(extra[0])})")
    for name, want in expected.items():
        got = tuple(src.shape(name))
        if got != tuple(want.shape):
            raise CheckpointError(f"{src.origin(name)}: shape {got}, expected {tuple(want.shape)} "
                                  "(does the config match the weights?)")
        tag = src.dtype_tag(name)
        allowed = FLOAT_TAGS if jnp.issubdtype(want.dtype, jnp.floating) else (TAGS[np.dtype(want.dtype)],)
        if tag not in allowed:
            raise CheckpointError(f"{src.origin(name)}: dtype {tag}, expected one of {allowed}")


def _flat_params(pure: Mapping) -> dict[str, Any]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
        out[".".join(str(getattr(k, "key", k)) for k in path)] = leaf
    return out


def _set_flat(pure: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    d = pure
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


def fill_model(model_fn, src: BflSource, codec: DenseCodec | None = None) -> nnx.Module:
    """Build `model_fn()` abstractly, validate `src` against it, and fill every parameter.

    Parameters take the dtype the abstract model gives them (the model dtype for weights; int8 /
    fp32 for ternary codes and scales). `codec` says how they are stored (dense by default)."""
    codec = codec or DenseCodec()
    _, graphdef, state, pure, flat = abstract_model(model_fn)
    check_source(src, expected_tensors(flat, codec))
    for internal, (names, target) in naming.param_routes(flat).items():
        _set_flat(pure, internal, codec.load(internal, names, target, src))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def load_transformer(path: str | Path, dtype: Any = jnp.bfloat16,
                     config: FluxConfig | Mapping | str | Path | None = None, *,
                     quantize: str | None = None, granularity: str = "tensor") -> FluxTransformer:
    """Load a FLUX transformer (see `open_transformer` for the accepted paths).

    For a BFL single file the config is inferred from tensor shapes (RoPE axes: FLUX.1's);
    `config=` (a FluxConfig, or a diffusers config.json path / dict) overrides.
    dtype=jnp.float32 gives exact comparisons; bf16 is the default.
    quantize="ternary" ternarizes a dense checkpoint while loading, one layer at a time, so the
    dense model is never held whole (a ternary folder loads as ternary without it).
    """
    src, cfg, info = open_transformer(path, config)
    return load_from_source(src, cfg, info, dtype, quantize=quantize, granularity=granularity)


def load_from_source(src: BflSource, cfg: FluxConfig, info: Mapping[str, Any], dtype: Any = jnp.bfloat16, *,
                     quantize: str | None = None, granularity: str = "tensor") -> FluxTransformer:
    """`load_transformer` for an already opened source (any `BflSource`)."""
    if quantize not in (None, "none", "ternary"):
        raise ValueError(f"quantize must be None, 'none' or 'ternary', got {quantize!r}")
    if quantize == "ternary" and info.get("quantization", "none") == "none":
        from .ternary import QuantizeOnLoadCodec

        model_fn, _ = model_factory(cfg, {"quantization": "ternary", "granularity": granularity}, dtype)
        return fill_model(model_fn, src, QuantizeOnLoadCodec.for_model(model_fn, granularity))
    model_fn, codec = model_factory(cfg, info, dtype)
    return fill_model(model_fn, src, codec)


def model_factory(cfg: FluxConfig, info: Mapping[str, Any], dtype: Any = jnp.bfloat16):
    """(function building the model a folder describes, its storage codec) from the component
    info (`quantization`: "none" | "ternary", with its `granularity`)."""
    quant = info.get("quantization", "none")
    if quant == "none":
        return (lambda: FluxTransformer(cfg, dtype=dtype, rngs=nnx.Rngs(0))), DenseCodec()
    if quant == "ternary":
        from .ternary import TernaryCodec, quantize_model

        granularity = info.get("granularity", "tensor")
        fn = lambda: quantize_model(FluxTransformer(cfg, dtype=dtype, rngs=nnx.Rngs(0)), granularity)  # noqa: E731
        return fn, TernaryCodec.for_model(fn, granularity)
    raise CheckpointError(f"unknown quantization {quant!r} (this flaxflux knows 'none' and 'ternary')")


def save_bfl_file(model: FluxTransformer, path: str | Path) -> None:
    """Write a dense model as one BFL-named safetensors file (tests, small models)."""
    from safetensors.numpy import save_file

    save_file(state_to_bfl(model), str(path))


def state_to_bfl(model: FluxTransformer) -> dict[str, np.ndarray]:
    """BFL name -> numpy array for every parameter of a dense model."""
    flat = _flat_params(nnx.to_pure_dict(nnx.state(model)))
    out = {}
    for t in naming.tensors(model.config):
        a = np.asarray(flat[t.internal])
        out[t.bfl] = a[t.layer] if t.layer is not None else a
    return out
