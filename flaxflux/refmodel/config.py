"""Sizes and training hyperparameters of the reference model (issue 8), in one place.

The reference model is a small FLUX.1-dev: the same five components, the same code paths, the same
folder layout, only narrower and shallower, sized so that the bf16 diffusers folder stays under
~40 MB in all (measured at the REFERENCE sizes below):

    transformer   hidden 256, 4 heads of 64, 3 double + 6 single blocks, guidance embedding  13.6 M  27.2 MB
    T5 encoder    d_model 256, 2 layers, 4 heads, gated-GELU d_ff 512, ~56-token vocabulary   1.3 M   2.7 MB
    CLIP text     hidden 128, 2 layers, 2 heads, 77 positions, ~600-token BPE vocabulary      0.5 M   1.0 MB
    VAE           16 latent channels, 8x down (block_out_channels 32, 64, 96, 96)             2.4 M   4.8 MB
                                                                                     total  ~17.8 M ~35.7 MB
    (the exported folder with configs and tokenizers measured 34.6 MiB)

Images are 128x128 -> latents 16x16x16 -> 8x8 = 64 packed image tokens; T5 runs at 32 tokens
(every caption fits in 16), CLIP at its 77 positions (causal and pooled at the first EOS, so the
length past the EOS changes nothing; training runs it at 16 positions for speed, exactly the same).

`MICRO` is the same recipe at toy sizes for the CPU tests (32x32 images, a few steps).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..clip import CLIPTextConfig
from ..config import FluxConfig
from ..t5 import T5Config
from ..vae import VAEConfig

# The scheduler the exported folder carries (diffusers FlowMatchEulerDiscreteScheduler, FLUX-dev
# style dynamic shifting). FLUX interpolates mu linearly between (256 tokens, 0.5) and
# (4096 tokens, 1.15): 256 tokens is its smallest trained resolution (512x512). Our images are
# 64 tokens (128x128), so the same line is anchored at our own range instead: mu = 0.5 at 64
# tokens (128x128) rising to 1.15 at 1024 tokens (512x512). At 64 tokens the shift is
# e^0.5 = 1.65, i.e. FLUX's shift for its smallest size, which mostly moves steps towards the
# noisy end where layout is decided. Training samples t from the same shifted distribution
# (logit-normal, then shifted by mu(64)), so the sampler's steps land where the model was trained.
SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 64,
    "max_image_seq_len": 1024,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "time_shift_type": "exponential",
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Architecture of every component (vocabulary sizes are filled in from the built tokenizers)."""

    image_size: int = 128
    t5_max_length: int = 32        # tokenizer_2's model_max_length: what both pipelines pad T5 to
    clip_max_length: int = 77      # CLIP's positions (FLUX's; diffusers pads CLIP to model_max_length)
    clip_train_length: int = 16    # positions CLIP runs at in training (>= longest caption + 2)
    vae_channels: tuple[int, ...] = (32, 64, 96, 96)
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 32
    t5_d_model: int = 256
    t5_d_kv: int = 64
    t5_d_ff: int = 512
    t5_layers: int = 2
    t5_heads: int = 4
    clip_hidden: int = 128
    clip_intermediate: int = 512
    clip_layers: int = 2
    clip_heads: int = 2
    hidden_size: int = 256
    num_heads: int = 4
    depth: int = 3
    depth_single_blocks: int = 6
    axes_dim: tuple[int, ...] = (8, 28, 28)

    def vae(self, scaling_factor: float = 1.0, shift_factor: float = 0.0) -> VAEConfig:
        """The VAE; scaling and shift are measured on encoded training images after stage 1."""
        return VAEConfig(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=self.vae_channels,
                         layers_per_block=self.vae_layers_per_block, norm_num_groups=self.vae_norm_groups,
                         scaling_factor=float(scaling_factor), shift_factor=float(shift_factor),
                         mid_block_add_attention=True, use_quant_conv=False, use_post_quant_conv=False)

    def t5(self, vocab_size: int) -> T5Config:
        return T5Config(vocab_size=vocab_size, d_model=self.t5_d_model, d_kv=self.t5_d_kv, d_ff=self.t5_d_ff,
                        num_layers=self.t5_layers, num_heads=self.t5_heads, relative_attention_num_buckets=32,
                        relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                        feed_forward_proj="gated-gelu")

    def clip(self, vocab_size: int) -> CLIPTextConfig:
        # eos_token_id 2: the legacy openai value FLUX's CLIP config has; transformers then pools at
        # argmax(input_ids), and our <|endoftext|> is the largest id, as in CLIP-L.
        return CLIPTextConfig(vocab_size=vocab_size, hidden_size=self.clip_hidden,
                              intermediate_size=self.clip_intermediate, num_hidden_layers=self.clip_layers,
                              num_attention_heads=self.clip_heads, max_position_embeddings=self.clip_max_length,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=2)

    def transformer(self) -> FluxConfig:
        return FluxConfig(in_channels=64, out_channels=64, vec_in_dim=self.clip_hidden,
                          context_in_dim=self.t5_d_model, hidden_size=self.hidden_size, mlp_ratio=4.0,
                          num_heads=self.num_heads, depth=self.depth, depth_single_blocks=self.depth_single_blocks,
                          axes_dim=self.axes_dim, qkv_bias=True, guidance_embed=True)

    @property
    def latent_size(self) -> int:
        return self.image_size // 8

    @property
    def image_tokens(self) -> int:
        return (self.latent_size // 2) ** 2


@dataclasses.dataclass(frozen=True)
class Stage:
    """Optimizer settings of one training stage (AdamW, linear warmup, cosine decay to lr * final_frac)."""

    steps: int
    batch: int
    lr: float
    warmup: int
    final_frac: float = 0.1
    weight_decay: float = 0.0      # none (as DiT); if set, it applies to every weight alike
    clip_norm: float = 1.0
    ema: float = 0.0               # EMA decay of the weights (0: none)
    ckpt_every: int = 2000


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights. Same recipe + same seed -> same model."""

    sizes: Sizes = Sizes()
    seed: int = 0
    vae_images: int = 32_768       # rendered images the VAE trains on
    train_examples: int = 262_144  # rendered (image, caption) pairs the transformer trains on
    vae: Stage = Stage(steps=3000, batch=64, lr=5e-4, warmup=200, ckpt_every=1000)
    vae_kl: float = 1e-4           # KL weight (per-element means): keeps latents smooth, scale set later
    vae_edge: float = 0.5          # weight of the image-gradient L1 term (sharp shape edges)
    transformer: Stage = Stage(steps=28_000, batch=256, lr=4e-4, warmup=1000, ema=0.9995)
    caption_dropout: float = 0.1   # share of captions replaced by "" (the unconditional prediction)
    distill: Stage = Stage(steps=6000, batch=256, lr=1e-4, warmup=200, final_frac=0.2, ema=0.999)
    guidance_range: tuple[float, float] = (1.0, 5.0)  # guidance the student learns, uniform

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REFERENCE = Recipe()

# Toy sizes for the CPU tests: every code path of the reference recipe, in seconds.
MICRO = Recipe(
    sizes=Sizes(image_size=32, t5_max_length=16, clip_train_length=16, vae_channels=(8, 8, 8, 8),
                vae_norm_groups=4, t5_d_model=16, t5_d_kv=8, t5_d_ff=32, t5_layers=2, t5_heads=2,
                clip_hidden=16, clip_intermediate=32, clip_layers=2, clip_heads=2, hidden_size=32, num_heads=2,
                depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6)),
    vae_images=64, train_examples=128,
    vae=Stage(steps=4, batch=8, lr=1e-3, warmup=1, ckpt_every=2),
    transformer=Stage(steps=6, batch=8, lr=1e-3, warmup=1, ema=0.9, ckpt_every=3),
    distill=Stage(steps=4, batch=8, lr=1e-3, warmup=1, ema=0.9, ckpt_every=2),
)

PRESETS: dict[str, Recipe] = {"reference": REFERENCE, "micro": MICRO}
