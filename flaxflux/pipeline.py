"""FluxPipeline: prompt -> T5 + CLIP -> jitted Euler sampler over the transformer -> VAE decode.

Text encoders, the sampling loop and the VAE are separate jitted programs: each compiles once per
(batch, resolution, steps, dtype) and is reused for every prompt, seed and guidance. A batch is
split over all local devices (weights replicated) with jax.sharding when it divides evenly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import sampler
from .clip import CLIPTextModel, load_clip
from .loading import load_transformer
from .t5 import T5Encoder, load_t5
from .tokenization import PromptTokenizer, load_clip_tokenizer, load_t5_tokenizer
from .transformer import FluxTransformer
from .vae import AutoencoderKL, load_vae

DEFAULTS = dict(height=1024, width=1024, num_inference_steps=50, guidance_scale=3.5)


def _compiled(module: nnx.Module, method: str):
    """jax.jit of `module.method` over split state (plain jit over a pure function)."""
    graphdef, state = nnx.split(module)

    @jax.jit
    def fn(state, *args):
        return getattr(nnx.merge(graphdef, state), method)(*args)

    return lambda *args: fn(state, *args)


class FluxPipeline:
    """Text-to-image with FLUX.1 (bf16 or 1.58-bit transformer).

    pipe = FluxPipeline.from_pretrained(path)      # flaxflux folder or a diffusers FLUX snapshot
    images = pipe("a red circle", height=1024, width=1024, num_inference_steps=50,
                  guidance_scale=3.5, seed=0)        # list of PIL images
    """

    def __init__(self, transformer: FluxTransformer, vae: AutoencoderKL, clip: CLIPTextModel, t5: T5Encoder,
                 clip_tokenizer: PromptTokenizer, t5_tokenizer: PromptTokenizer,
                 scheduler_config: dict[str, Any] | None = None):
        self.transformer, self.vae, self.clip, self.t5 = transformer, vae, clip, t5
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
        self.scheduler_config = sampler.read_scheduler_config(None) if scheduler_config is None else scheduler_config
        self.vae_scale = vae.config.downscale
        self._graphdef, self._state = nnx.split(transformer)
        self._replicated: dict[int, Any] = {}  # mesh size -> transformer state replicated on it
        self._clip = _compiled(clip, "__call__")
        self._t5 = _compiled(t5, "__call__")
        self._decode = _compiled(vae, "decode")

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: Any = jnp.bfloat16, *, max_sequence_length: int | None = None,
                        t5_quantize: str | None = None, transformer: str | Path | None = None) -> "FluxPipeline":
        """Load every component from a flaxflux model folder (bf16 or ternary transformer) or a
        raw diffusers FLUX snapshot (model_index.json). max_sequence_length: the T5 length
        prompts are padded to; None takes tokenizer_2's model_max_length (512 for FLUX.1).
        transformer: another folder to take the transformer from (e.g. a distilled ternary one
        saved alone), the other components still coming from `path`."""
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: not a folder (expected a flaxflux model folder or a FLUX snapshot)")
        if transformer is not None and not Path(transformer).is_dir():
            raise FileNotFoundError(f"transformer={transformer}: not a folder (expected a flaxflux or diffusers "
                                    "transformer folder)")
        return cls(
            transformer=load_transformer(root if transformer is None else Path(transformer), dtype=dtype),
            vae=load_vae(root, dtype=dtype),
            clip=load_clip(root, dtype=dtype),
            t5=load_t5(root, dtype=dtype, quantize=t5_quantize),
            clip_tokenizer=load_clip_tokenizer(root),
            t5_tokenizer=load_t5_tokenizer(root, max_length=max_sequence_length),
            scheduler_config=sampler.read_scheduler_config(root / "scheduler" / "scheduler_config.json"),
        )

    def set_ternary_options(self, *, activations: str | None = None, backend: str | None = None) -> None:
        """Switch the ternary transformer's activations ("native" | "int8") or kernel backend."""
        from .ternary import set_ternary_options

        set_ternary_options(self.transformer, activations=activations, backend=backend)
        self._graphdef, self._state = nnx.split(self.transformer)
        self._replicated.clear()

    # --- pieces ---------------------------------------------------------------------------------

    def encode_prompt(self, prompts: str | Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """(T5 sequence (B, max_len, d_t5), pooled CLIP (B, d_clip)); no attention masks (FLUX)."""
        prompts = _prompt_list(prompts)
        txt = self._t5(jnp.asarray(self.t5_tokenizer(prompts)))
        _, pooled = self._clip(jnp.asarray(self.clip_tokenizer(prompts)))
        return txt, pooled

    def decode(self, latents: jax.Array, height: int, width: int) -> jax.Array:
        """Packed latents (B, L, 64) -> images (B, H, W, 3) in [0, 1], fp32."""
        h, w = sampler.latent_size(height, width, self.vae_scale)
        z = sampler.unpack_latents(jnp.asarray(latents, jnp.float32), h, w)
        return jnp.clip(self._decode(z) / 2 + 0.5, 0.0, 1.0)

    def prepare_latents(self, batch: int, height: int, width: int, seed: int | Sequence[int] = 0) -> jax.Array:
        """Packed initial noise: one seed for the batch (split per image), or one seed per image."""
        h, w = sampler.latent_size(height, width, self.vae_scale)
        if isinstance(seed, (int, np.integer)):
            return sampler.initial_noise(int(seed), batch, h, w)
        seeds = list(seed)
        if len(seeds) != batch:
            raise ValueError(f"seed: got {len(seeds)} seeds for a batch of {batch}")
        return jnp.concatenate([sampler.initial_noise(int(s), 1, h, w) for s in seeds])

    # --- the main job ---------------------------------------------------------------------------

    def __call__(self, prompt: str | Sequence[str], height: int = DEFAULTS["height"], width: int = DEFAULTS["width"],
                 num_inference_steps: int = DEFAULTS["num_inference_steps"],
                 guidance_scale: float = DEFAULTS["guidance_scale"], seed: int | Sequence[int] = 0,
                 latents: jax.Array | None = None, output_type: str = "pil", progress: bool = True):
        """Generate images. `latents`: packed initial noise (B, L, 64), as diffusers' FluxPipeline
        takes it; otherwise drawn from `seed`. output_type "pil" (list of images) or "np"
        (float32 (B, H, W, 3) in [0, 1])."""
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not math.isfinite(float(guidance_scale)):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        prompts = _prompt_list(prompt)
        b = len(prompts)
        h, w = sampler.latent_size(height, width, self.vae_scale)
        n_tokens = (h // 2) * (w // 2)
        if latents is None:
            latents = self.prepare_latents(b, height, width, seed)
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != (b, n_tokens, sampler.LATENT_CHANNELS * 4):
            raise ValueError(f"latents: expected shape {(b, n_tokens, sampler.LATENT_CHANNELS * 4)} for "
                             f"{b} prompt(s) at {height}x{width}, got {tuple(latents.shape)}")
        txt, pooled = self.encode_prompt(prompts)
        txt_ids = jnp.zeros((b, txt.shape[1], 3), jnp.float32)
        img_ids = sampler.image_ids(b, h, w)
        guidance = jnp.full((b,), guidance_scale, jnp.float32)
        sigmas = jnp.asarray(sampler.sigma_schedule(num_inference_steps, n_tokens, self.scheduler_config))
        mesh = batch_mesh(b)
        state = self._state
        args = (latents, img_ids, txt, txt_ids, pooled, guidance)
        if mesh is not None:
            if mesh.size not in self._replicated:  # weights copied to every device once, then reused
                self._replicated[mesh.size] = jax.device_put(self._state, NamedSharding(mesh, P()))
            state = self._replicated[mesh.size]
            args = tuple(jax.device_put(a, NamedSharding(mesh, P("data"))) for a in args)
        out = sampler.run_denoise(self._graphdef, state, *args, sigmas, progress=progress)
        images = self.decode(out, height, width)
        if output_type == "np":
            return np.asarray(images)
        return to_pil(images)


def _prompt_list(prompt: str | Sequence[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("prompt: got an empty list; pass a string or a non-empty list of strings")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt[{i}]: expected a string, got {type(p).__name__}")
        if not p.strip():
            raise ValueError(f"prompt[{i}] is empty; describe the image to generate")
    return prompts


def batch_mesh(batch: int) -> Mesh | None:
    """A 1-D "data" mesh over as many local devices as divide the batch (None for one device):
    the batch axis is split over it and the weights replicated, so the jitted sampler runs
    data-parallel under GSPMD."""
    devices = jax.local_devices()
    n = math.gcd(batch, len(devices))
    return Mesh(np.array(devices[:n]), ("data",)) if n > 1 else None


def to_pil(images: jax.Array) -> list:
    from PIL import Image

    arr = np.asarray(jnp.round(images * 255.0)).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def save_png(image, path: str | Path) -> None:
    """Write a PIL image as PNG atomically: a temporary sibling renamed into place."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
