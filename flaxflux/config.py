"""Transformer configuration: FLUX.1-dev / schnell presets and diffusers `config.json` parsing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# RoPE base: BFL and diffusers hard-code 10000 (the diffusers config.json has no theta key).
ROPE_THETA = 10_000
# Embedding width of the sinusoidal timestep / guidance features fed to time_in / guidance_in.
TIMESTEP_DIM = 256


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """Shape of a FLUX.1 transformer, in BFL's terms (black-forest-labs/flux `FluxParams`)."""

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768          # pooled CLIP width (diffusers: pooled_projection_dim)
    context_in_dim: int = 4096     # T5 width (diffusers: joint_attention_dim)
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19                # double-stream blocks (diffusers: num_layers)
    depth_single_blocks: int = 38  # single-stream blocks (diffusers: num_single_layers)
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = ROPE_THETA
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"every RoPE axis dim must be even, got {self.axes_dim}")
        object.__setattr__(self, "axes_dim", tuple(int(d) for d in self.axes_dim))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FluxConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown FluxConfig keys {sorted(unknown)}")
        return cls(**{k: (tuple(v) if k == "axes_dim" else v) for k, v in d.items()})

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any] | str | Path) -> "FluxConfig":
        """Build from a diffusers `FluxTransformer2DModel` config (dict or path to config.json)."""
        if not isinstance(cfg, dict):
            path = Path(cfg)
            try:
                cfg = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: not a readable diffusers config.json ({e})") from e
        if cfg.get("patch_size", 1) != 1:
            raise ValueError(f"patch_size {cfg['patch_size']} is not supported; FLUX.1 uses 1")
        heads = cfg.get("num_attention_heads", 24)
        head_dim = cfg.get("attention_head_dim", 128)
        in_ch = cfg.get("in_channels", 64)
        return cls(
            in_channels=in_ch,
            out_channels=cfg.get("out_channels") or in_ch,
            vec_in_dim=cfg.get("pooled_projection_dim", 768),
            context_in_dim=cfg.get("joint_attention_dim", 4096),
            hidden_size=heads * head_dim,
            num_heads=heads,
            depth=cfg.get("num_layers", 19),
            depth_single_blocks=cfg.get("num_single_layers", 38),
            axes_dim=tuple(cfg.get("axes_dims_rope", (16, 56, 56))),
            guidance_embed=bool(cfg.get("guidance_embeds", False)),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers `FluxTransformer2DModel` config that describes the same network."""
        if self.mlp_ratio != 4.0 or not self.qkv_bias or self.theta != ROPE_THETA:
            raise ValueError("diffusers FluxTransformer2DModel fixes mlp_ratio=4, qkv_bias and theta=10000")
        return {
            "_class_name": "FluxTransformer2DModel",
            "patch_size": 1,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.depth,
            "num_single_layers": self.depth_single_blocks,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.context_in_dim,
            "pooled_projection_dim": self.vec_in_dim,
            "guidance_embeds": self.guidance_embed,
            "axes_dims_rope": list(self.axes_dim),
        }


FLUX_DEV = FluxConfig()
FLUX_SCHNELL = dataclasses.replace(FLUX_DEV, guidance_embed=False)
PRESETS: dict[str, FluxConfig] = {"flux-dev": FLUX_DEV, "flux-schnell": FLUX_SCHNELL}
