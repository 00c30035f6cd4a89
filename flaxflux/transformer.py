"""The FLUX.1 transformer (dev and schnell) as a Flax NNX module.

Double- and single-stream blocks are each one module whose parameters carry a leading layer
axis; the forward pass walks them with `jax.lax.scan`, so compile time does not grow with
19 + 38 blocks. Every block linear is a `Linear` (or, once quantized, a `TernaryLinear`
with the same call signature).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from .config import TIMESTEP_DIM, FluxConfig
from .layers import (
    Linear,
    MLPEmbedder,
    RMSNorm,
    attention,
    gelu_tanh,
    modulate,
    rope_frequencies,
    timestep_embedding,
)

Array = jax.Array


class QKNorm(nnx.Module):
    def __init__(self, dim: int, *, stack: tuple[int, ...], dtype: Any):
        self.query_norm = RMSNorm(dim, stack=stack, dtype=dtype)
        self.key_norm = RMSNorm(dim, stack=stack, dtype=dtype)


class SelfAttention(nnx.Module):
    """Parameters of one stream's attention: fused qkv, q/k RMS norms, output projection."""

    def __init__(self, cfg: FluxConfig, *, stack: tuple[int, ...], dtype: Any, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.qkv = Linear(d, 3 * d, bias=cfg.qkv_bias, stack=stack, dtype=dtype, rngs=rngs)
        self.norm = QKNorm(cfg.head_dim, stack=stack, dtype=dtype)
        self.proj = Linear(d, d, stack=stack, dtype=dtype, rngs=rngs)

    def qkv_heads(self, x: Array, num_heads: int) -> tuple[Array, Array, Array]:
        """x (B, L, D) -> q, k (fp32, normed) and v, each (B, L, H, head_dim)."""
        qkv = self.qkv(x)
        b, l, _ = qkv.shape
        q, k, v = jnp.moveaxis(qkv.reshape(b, l, 3, num_heads, -1), 2, 0)  # BFL: "B L (K H D)"
        return self.norm.query_norm(q), self.norm.key_norm(k), v


class MLP(nnx.Module):
    def __init__(self, cfg: FluxConfig, *, stack: tuple[int, ...], dtype: Any, rngs: nnx.Rngs):
        self.fc1 = Linear(cfg.hidden_size, cfg.mlp_hidden_dim, stack=stack, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(cfg.mlp_hidden_dim, cfg.hidden_size, stack=stack, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(gelu_tanh(self.fc1(x)))


def _chunks(mod: Array, n: int) -> list[Array]:
    """(B, n*D) modulation vector -> n arrays (B, 1, D) (BFL order: shift, scale, gate, ...)."""
    return [m[:, None, :] for m in jnp.split(mod, n, axis=-1)]


class DoubleBlock(nnx.Module):
    """Double-stream block: separate image / text weights, joint attention over [txt, img]."""

    def __init__(self, cfg: FluxConfig, *, stack: tuple[int, ...] = (), dtype: Any, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.img_mod = Linear(d, 6 * d, stack=stack, dtype=dtype, rngs=rngs)
        self.img_attn = SelfAttention(cfg, stack=stack, dtype=dtype, rngs=rngs)
        self.img_mlp = MLP(cfg, stack=stack, dtype=dtype, rngs=rngs)
        self.txt_mod = Linear(d, 6 * d, stack=stack, dtype=dtype, rngs=rngs)
        self.txt_attn = SelfAttention(cfg, stack=stack, dtype=dtype, rngs=rngs)
        self.txt_mlp = MLP(cfg, stack=stack, dtype=dtype, rngs=rngs)

    def modulation(self, silu_vec: Array) -> tuple[Array, Array]:
        """(img, txt) modulation vectors (N, 6*hidden) for silu(vec) (N, hidden)."""
        return self.img_mod(silu_vec), self.txt_mod(silu_vec)

    def __call__(self, img: Array, txt: Array, mod: tuple[Array, Array], cos: Array, sin: Array
                 ) -> tuple[Array, Array]:
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = _chunks(mod[0], 6)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = _chunks(mod[1], 6)

        iq, ik, iv = self.img_attn.qkv_heads(modulate(img, i_shift1, i_scale1), self.num_heads)
        tq, tk, tv = self.txt_attn.qkv_heads(modulate(txt, t_shift1, t_scale1), self.num_heads)
        cat = lambda a, b: jnp.concatenate([a, b], axis=1)  # noqa: E731 (text tokens first)
        attn = attention(cat(tq, iq), cat(tk, ik), cat(tv, iv), cos, sin)
        n_txt = txt.shape[1]
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]

        img = img + i_gate1 * self.img_attn.proj(img_attn)
        img = img + i_gate2 * self.img_mlp(modulate(img, i_shift2, i_scale2))
        txt = txt + t_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_gate2 * self.txt_mlp(modulate(txt, t_shift2, t_scale2))
        return img, txt


class SingleBlock(nnx.Module):
    """Single-stream block: one fused linear1 (qkv | mlp-in), attention, linear2 over [attn, mlp]."""

    def __init__(self, cfg: FluxConfig, *, stack: tuple[int, ...] = (), dtype: Any, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.hidden_size = d
        self.modulation = Linear(d, 3 * d, stack=stack, dtype=dtype, rngs=rngs)
        self.linear1 = Linear(d, 3 * d + cfg.mlp_hidden_dim, stack=stack, dtype=dtype, rngs=rngs)
        self.linear2 = Linear(d + cfg.mlp_hidden_dim, d, stack=stack, dtype=dtype, rngs=rngs)
        self.norm = QKNorm(cfg.head_dim, stack=stack, dtype=dtype)

    def __call__(self, x: Array, mod: Array, cos: Array, sin: Array) -> Array:
        shift, scale, gate = _chunks(mod, 3)
        h = self.linear1(modulate(x, shift, scale))
        qkv, mlp = h[..., : 3 * self.hidden_size], h[..., 3 * self.hidden_size :]
        b, l, _ = qkv.shape
        q, k, v = jnp.moveaxis(qkv.reshape(b, l, 3, self.num_heads, -1), 2, 0)
        attn = attention(self.norm.query_norm(q), self.norm.key_norm(k), v, cos, sin)
        out = self.linear2(jnp.concatenate([attn, gelu_tanh(mlp)], axis=-1))
        return x + gate * out


class LastLayer(nnx.Module):
    def __init__(self, cfg: FluxConfig, *, dtype: Any, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.adaLN_modulation = Linear(d, 2 * d, dtype=dtype, rngs=rngs)
        self.linear = Linear(d, cfg.out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, mod: Array) -> Array:
        shift, scale = _chunks(mod, 2)  # BFL: shift first
        return self.linear(modulate(x, shift, scale))


LayerHook = Callable[[Any], Any]


def scan_blocks(blocks: nnx.Module, carry: Any, step: Callable[[nnx.Module, Any, Any], Any], xs: Any = None,
                remat: bool = False, layer_hook: LayerHook | None = None) -> Any:
    """Run `step(layer, carry, x)` for each layer of a stacked block module with `lax.scan`;
    `xs` are per-layer inputs (leading axis = layers), x is None if there are none.
    `layer_hook(layer_state)` runs on each layer's parameters inside the loop (FSDP: gather
    one layer's sharded weights at a time)."""
    graphdef, state = nnx.split(blocks)

    def body(c, inputs):
        layer_state, x = inputs
        if layer_hook is not None:
            layer_state = layer_hook(layer_state)
        return step(nnx.merge(graphdef, layer_state), c, x), None

    if remat:
        body = jax.checkpoint(body)
    carry, _ = jax.lax.scan(body, carry, (state, xs))
    return carry


def map_blocks(blocks: nnx.Module, fn: Callable[[nnx.Module], Any], layer_hook: LayerHook | None = None) -> Any:
    """`fn(layer)` for every layer of a stacked block module, outputs stacked on a leading axis."""
    graphdef, state = nnx.split(blocks)
    hook = layer_hook or (lambda s: s)
    return jax.lax.map(lambda s: fn(nnx.merge(graphdef, hook(s))), state)


class FluxTransformer(nnx.Module):
    """FLUX.1 flow transformer. Call with BFL's argument names (see `__call__`)."""

    def __init__(self, cfg: FluxConfig, *, dtype: Any = jnp.bfloat16, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.img_in = Linear(cfg.in_channels, d, dtype=dtype, rngs=rngs)
        self.time_in = MLPEmbedder(TIMESTEP_DIM, d, dtype=dtype, rngs=rngs)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, d, dtype=dtype, rngs=rngs)
        self.guidance_in = MLPEmbedder(TIMESTEP_DIM, d, dtype=dtype, rngs=rngs) if cfg.guidance_embed else None
        self.txt_in = Linear(cfg.context_in_dim, d, dtype=dtype, rngs=rngs)
        self.double_blocks = DoubleBlock(cfg, stack=(cfg.depth,), dtype=dtype, rngs=rngs)
        self.single_blocks = SingleBlock(cfg, stack=(cfg.depth_single_blocks,), dtype=dtype, rngs=rngs)
        self.final_layer = LastLayer(cfg, dtype=dtype, rngs=rngs)

    def embed_vector(self, timesteps: Array, y: Array, guidance: Array | None) -> Array:
        """The conditioning vector `vec` (B, hidden): depends only on t, guidance and pooled CLIP."""
        vec = self.time_in(timestep_embedding(timesteps).astype(self.dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this model has a guidance embedding (FLUX.1-dev): pass guidance=(B,) values")
            vec = vec + self.guidance_in(timestep_embedding(guidance).astype(self.dtype))
        return vec + self.vector_in(y.astype(self.dtype))

    def modulations(self, vec: Array, layer_hook: LayerHook | None = None) -> dict[str, Any]:
        """Every modulation vector of the model for conditioning vectors vec (N, hidden).

        They depend only on vec, i.e. on t, guidance and pooled CLIP; a sampler can compute all
        steps' at once (N = steps x batch), reading the 3.2 B modulation weights once per image
        instead of once per step. Layer-stacked: double (L, N, 6h) x2, single (L, N, 3h)."""
        sv = jax.nn.silu(vec)
        return {"double": map_blocks(self.double_blocks, lambda blk: blk.modulation(sv), layer_hook),
                "single": map_blocks(self.single_blocks, lambda blk: blk.modulation(sv), layer_hook),
                "final": self.final_layer.adaLN_modulation(sv)}

    def __call__(
        self,
        *,
        img: Array,
        img_ids: Array,
        txt: Array,
        txt_ids: Array,
        timesteps: Array | None = None,
        y: Array | None = None,
        guidance: Array | None = None,
        mods: dict[str, Any] | None = None,
        remat: bool = False,
        layer_hook: LayerHook | None = None,
    ) -> Array:
        """Velocity prediction.

        img (B, L, in_channels) packed latents; img_ids (B, L, 3); txt (B, L_txt, context_in_dim);
        txt_ids (B, L_txt, 3); timesteps (B,) in [0, 1]; y (B, vec_in_dim) pooled CLIP;
        guidance (B,) (FLUX.1-dev only). Instead of timesteps / y / guidance, `mods` may give
        the precomputed `modulations(vec)` for this batch. Returns (B, L, out_channels) in the
        model dtype.
        """
        cfg = self.config
        if mods is None:
            if timesteps is None or y is None:
                raise ValueError("pass timesteps and y (and guidance for FLUX.1-dev), or precomputed mods")
            _check_inputs(cfg, img, img_ids, txt, txt_ids, timesteps, y)
            mods = self.modulations(self.embed_vector(timesteps, y, guidance), layer_hook)
        else:
            _check_inputs(cfg, img, img_ids, txt, txt_ids, None, None)
        img = self.img_in(img.astype(self.dtype))
        txt = self.txt_in(txt.astype(self.dtype))
        cos, sin = rope_frequencies(jnp.concatenate([txt_ids, img_ids], axis=1), cfg.axes_dim, cfg.theta)

        img, txt = scan_blocks(self.double_blocks, (img, txt), lambda blk, c, m: blk(c[0], c[1], m, cos, sin),
                               mods["double"], remat, layer_hook)
        x = jnp.concatenate([txt, img], axis=1)
        x = scan_blocks(self.single_blocks, x, lambda blk, c, m: blk(c, m, cos, sin), mods["single"], remat, layer_hook)
        return self.final_layer(x[:, txt.shape[1] :], mods["final"])


def _check_inputs(cfg: FluxConfig, img, img_ids, txt, txt_ids, timesteps, y) -> None:
    def need(name: str, arr: Any, shape: tuple) -> None:
        got = tuple(arr.shape)
        if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
            want = tuple("?" if s is None else s for s in shape)
            raise ValueError(f"{name}: expected shape {want}, got {got}")

    b = img.shape[0] if img.ndim == 3 else None
    need("img", img, (None, None, cfg.in_channels))
    need("img_ids", img_ids, (b, img.shape[1], len(cfg.axes_dim)))
    need("txt", txt, (b, None, cfg.context_in_dim))
    need("txt_ids", txt_ids, (b, txt.shape[1], len(cfg.axes_dim)))
    if timesteps is not None:
        need("timesteps", timesteps, (b,))
    if y is not None:
        need("y", y, (b, cfg.vec_in_dim))
