"""The one table of FLUX transformer tensor names: flaxflux (NNX path) <-> BFL <-> diffusers.

BFL names (`flux1-dev.safetensors`) are the canonical on-disk names of flaxflux model folders:
fused qkv and fused single-block linear1, `final_layer.adaLN_modulation.1` in (shift, scale)
order. diffusers splits qkv / linear1 into to_q/to_k/to_v(/proj_mlp) and stores the final
modulation as (scale, shift).

All weights keep PyTorch's (out, in) layout everywhere, so mapping never transposes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping

import numpy as np

from .config import FluxConfig


@dataclasses.dataclass(frozen=True)
class Row:
    internal: str                 # module path in FluxTransformer ("{i}" = layer index)
    bfl: str                      # module path in BFL files
    diffusers: tuple[str, ...]    # module path(s) in diffusers; several = concatenated on axis 0
    kind: str = "linear"          # "linear" (weight, bias) or "norm" (scale <-> diffusers weight)
    swap_halves: bool = False     # BFL (shift, scale) vs diffusers (scale, shift)
    block: str | None = None      # "double" | "single" | None
    optional: str | None = None   # config flag that must be true for the row to exist


def _rows() -> list[Row]:
    rows = [
        Row("img_in", "img_in", ("x_embedder",)),
        Row("txt_in", "txt_in", ("context_embedder",)),
        Row("final_layer.linear", "final_layer.linear", ("proj_out",)),
        Row("final_layer.adaLN_modulation", "final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
    ]
    for bfl, dif, opt in (("time_in", "timestep_embedder", None), ("vector_in", "text_embedder", None),
                          ("guidance_in", "guidance_embedder", "guidance_embed")):
        for j, layer in enumerate(("in_layer", "out_layer"), start=1):
            rows.append(Row(f"{bfl}.{layer}", f"{bfl}.{layer}", (f"time_text_embed.{dif}.linear_{j}",), optional=opt))

    d = "transformer_blocks.{i}."
    double = [
        ("img_mod", "img_mod.lin", ("norm1.linear",), "linear"),
        ("txt_mod", "txt_mod.lin", ("norm1_context.linear",), "linear"),
        ("img_attn.qkv", "img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), "linear"),
        ("txt_attn.qkv", "txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "linear"),
        ("img_attn.proj", "img_attn.proj", ("attn.to_out.0",), "linear"),
        ("txt_attn.proj", "txt_attn.proj", ("attn.to_add_out",), "linear"),
        ("img_attn.norm.query_norm", "img_attn.norm.query_norm", ("attn.norm_q",), "norm"),
        ("img_attn.norm.key_norm", "img_attn.norm.key_norm", ("attn.norm_k",), "norm"),
        ("txt_attn.norm.query_norm", "txt_attn.norm.query_norm", ("attn.norm_added_q",), "norm"),
        ("txt_attn.norm.key_norm", "txt_attn.norm.key_norm", ("attn.norm_added_k",), "norm"),
        ("img_mlp.fc1", "img_mlp.0", ("ff.net.0.proj",), "linear"),
        ("img_mlp.fc2", "img_mlp.2", ("ff.net.2",), "linear"),
        ("txt_mlp.fc1", "txt_mlp.0", ("ff_context.net.0.proj",), "linear"),
        ("txt_mlp.fc2", "txt_mlp.2", ("ff_context.net.2",), "linear"),
    ]
    for internal, bfl, dif, kind in double:
        rows.append(Row(f"double_blocks.{{i}}.{internal}", f"double_blocks.{{i}}.{bfl}",
                        tuple(d + x for x in dif), kind, block="double"))
    s = "single_transformer_blocks.{i}."
    single = [
        ("modulation", "modulation.lin", ("norm.linear",), "linear"),
        ("linear1", "linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear"),
        ("linear2", "linear2", ("proj_out",), "linear"),
        ("norm.query_norm", "norm.query_norm", ("attn.norm_q",), "norm"),
        ("norm.key_norm", "norm.key_norm", ("attn.norm_k",), "norm"),
    ]
    for internal, bfl, dif, kind in single:
        rows.append(Row(f"single_blocks.{{i}}.{internal}", f"single_blocks.{{i}}.{bfl}",
                        tuple(s + x for x in dif), kind, block="single"))
    return rows


TABLE: tuple[Row, ...] = tuple(_rows())

# Parameter names of each row kind: (flaxflux / BFL name, diffusers name).
PARAMS = {"linear": (("weight", "weight"), ("bias", "bias")), "norm": (("scale", "weight"),)}

# Prefix used by ComfyUI-style single files; stripped on load.
BFL_PREFIXES = ("model.diffusion_model.",)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One BFL-named tensor and where it lives in the NNX model."""

    bfl: str
    internal: str                 # dotted NNX path without the layer index (stacked param)
    layer: int | None             # index into the stacked leading axis, None if not stacked
    diffusers: tuple[str, ...]
    swap_halves: bool


def _layers(row: Row, cfg: FluxConfig) -> Iterable[int | None]:
    if row.block == "double":
        return range(cfg.depth)
    if row.block == "single":
        return range(cfg.depth_single_blocks)
    return (None,)


def tensors(cfg: FluxConfig) -> list[Tensor]:
    """Every tensor of a FLUX transformer with this config, in file order."""
    out = []
    for row in TABLE:
        if row.optional and not getattr(cfg, row.optional):
            continue
        for i in _layers(row, cfg):
            fmt = (lambda p: p.format(i=i)) if i is not None else (lambda p: p)
            for ours, theirs in PARAMS[row.kind]:
                if ours == "bias" and not cfg.qkv_bias and row.internal.endswith("qkv"):
                    continue
                out.append(Tensor(
                    bfl=f"{fmt(row.bfl)}.{ours}",
                    internal=f"{row.internal.replace('{i}.', '')}.{ours}",
                    layer=i,
                    diffusers=tuple(f"{fmt(x)}.{theirs}" for x in row.diffusers),
                    swap_halves=row.swap_halves,
                ))
    return out


def strip_bfl_prefix(name: str) -> str:
    for p in BFL_PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def _swap_halves(a: np.ndarray) -> np.ndarray:
    h = a.shape[0] // 2
    return np.concatenate([a[h:], a[:h]], axis=0)


def diffusers_to_bfl(t: Tensor, get: Callable[[str], np.ndarray]) -> np.ndarray:
    """The BFL tensor `t` built from diffusers tensors read with `get(name)`."""
    parts = [get(n) for n in t.diffusers]
    a = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return _swap_halves(a) if t.swap_halves else a


def bfl_to_diffusers(t: Tensor, a: np.ndarray, sizes: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """The diffusers tensors that make up BFL tensor `t` (inverse of `diffusers_to_bfl`).

    Split sizes along axis 0: equal parts, except single-block linear1 (q, k, v = hidden each,
    then the MLP input); `sizes` may give them explicitly by diffusers name."""
    if t.swap_halves:
        a = _swap_halves(a)
    if len(t.diffusers) == 1:
        return {t.diffusers[0]: a}
    if sizes is None:
        n = len(t.diffusers)
        if t.diffusers[-1].endswith((".proj_mlp.weight", ".proj_mlp.bias")):
            # linear1 = [q | k | v | mlp]; hidden = (rows - mlp) / 3 with mlp = 4 * hidden.
            hidden = a.shape[0] // (3 + 4)
            cuts = [hidden, hidden, hidden, a.shape[0] - 3 * hidden]
        else:
            cuts = [a.shape[0] // n] * n
    else:
        cuts = [sizes[x] for x in t.diffusers]
    bounds = np.cumsum([0] + cuts)
    return {name: a[bounds[j] : bounds[j + 1]] for j, name in enumerate(t.diffusers)}


_BLOCK_RE = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.")


def infer_config(shapes: Mapping[str, tuple[int, ...]], base: FluxConfig | None = None) -> FluxConfig:
    """A FluxConfig from the shapes of a BFL-named checkpoint.

    Everything but the RoPE axes is determined by the shapes; axes_dim comes from `base`
    (FLUX.1-dev's (16, 56, 56) by default), which must sum to the head dim found."""
    base = base or FluxConfig()
    try:
        hidden, in_ch = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        depth = 1 + max(int(m.group(2)) for k in shapes if (m := _BLOCK_RE.match(k)) and m.group(1) == "double_blocks")
        single = 1 + max(int(m.group(2)) for k in shapes if (m := _BLOCK_RE.match(k)) and m.group(1) == "single_blocks")
        cfg = FluxConfig(
            in_channels=in_ch,
            out_channels=shapes["final_layer.linear.weight"][0],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1],
            context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=hidden,
            mlp_ratio=shapes["double_blocks.0.img_mlp.0.weight"][0] / hidden,
            num_heads=hidden // head_dim,
            depth=depth,
            depth_single_blocks=single,
            axes_dim=base.axes_dim,
            theta=base.theta,
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except (KeyError, ValueError) as e:
        if isinstance(e, KeyError):
            raise ValueError(f"cannot infer a FLUX config: tensor {e.args[0]!r} is missing") from e
        raise ValueError(f"cannot infer a FLUX config from the tensor shapes: {e}; pass config= "
                         "(--config with a diffusers config.json)") from e
    return cfg


# NNX paths of the scanned block modules: their parameters carry a leading layer axis.
STACKED = ("double_blocks.", "single_blocks.")
_BY_INTERNAL = {row.internal.replace("{i}.", ""): row for row in TABLE}


def is_stacked(internal: str) -> bool:
    return internal.startswith(STACKED)


def bfl_name(internal_param: str, layer: int | None) -> str:
    """BFL name of one parameter of the NNX model (any parameter name: weight, bias, scale,
    or a ternary layer's packed codes and scales) for one layer of a stacked block."""
    module, param = internal_param.rsplit(".", 1)
    if module not in _BY_INTERNAL:
        raise KeyError(f"no BFL name for model parameter {internal_param!r}")
    bfl = _BY_INTERNAL[module].bfl
    return f"{bfl.format(i=layer) if layer is not None else bfl}.{param}"


def param_routes(flat: Mapping[str, object]) -> dict[str, tuple[list[str], object]]:
    """NNX parameter (dotted path) -> (BFL names, one per stacked layer, in order; its abstract value)."""
    routes = {}
    for internal, target in flat.items():
        if is_stacked(internal):
            names = [bfl_name(internal, i) for i in range(target.shape[0])]
        else:
            names = [bfl_name(internal, None)]
        routes[internal] = (names, target)
    return routes
