"""The packed ternary weight layout: the one definition every kernel, loader and file uses.

A ternary weight w (K, N) with values in {-1, 0, +1} (x @ w contracts over K) is stored as an
int8 array `packed` of shape (K_pad / 4, N): four 2-bit codes c = w + 1 per byte
(-1 -> 0b00, 0 -> 0b01, +1 -> 0b10). Only the shape is (K_pad/4, N); the bytes are arranged
K-tile by K-tile, each tile transposed so that K is contiguous (what int8 tensor cores need):

    T = K_pad / TILE_K, SLAB = TILE_K / 4, tiles = packed.reshape(T, N, SLAB)   (free reshape)
    tiles[t, n, j]  bits 2p..2p+1  =  w[t * TILE_K + p * SLAB + j, n] + 1

for tile t, output column n, byte j in [0, SLAB) and plane p in [0, 4). So a (rows n, SLAB
bytes) block of one tile is a K-contiguous block of w^T, and unpacking it is elementwise
(`((b >> 2p) & 3) - 1`): plane p is the contiguous K-slab
[p * SLAB, (p + 1) * SLAB) of the tile, already in the register layout a wgmma A operand wants
(the kernels compute out^T = w^T x^T with w^T in registers). No shuffles, no transposes.

Consequence: `packed` must not be sliced or concatenated along N (its second axis is not
column n); unpack, slice, repack instead. Slicing whole K-tiles (rows t*SLAB .. ) is fine.

Why w + 1: the offset code makes the unpack affine, so kernels turn 4 codes in a 32-bit register
into 4 int8 weights with shift, and, add, xor (no carries between bytes), and into bf16 with
one byte permute shared by the 4 planes, then a mask and one fused multiply-add per plane
(0x4300 | (c << 2p) is the bf16 number 128 + c 4^p).

Padding rule: K is zero-padded up to a multiple of TILE_K (weights 0, code 1: contribute nothing).
K_pad = ceil(K / TILE_K) * TILE_K; callers pass the true K (x's last axis) to slice it off.
FLUX's K (3072, 12288, 15360) are multiples of TILE_K, so full-size models carry no padding.

Version 2 (TILE_K 256, tile-transposed, offset codes) replaced version 1 (TILE_K 512,
N-contiguous, two's complement): int8 wgmma needs K-major operands, and a 64-byte slab keeps the
K-step's shared-memory stage small enough for 3-4 pipeline stages (see NOTES.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LAYOUT_NAME = "ternary-tiled2-kmajor-offset1-i8"
LAYOUT_VERSION = 2
TILE_K = 256
PLANES = 4            # 2-bit codes per byte
SLAB = TILE_K // PLANES


def padded_k(k: int) -> int:
    """K rounded up to a whole number of TILE_K tiles."""
    return -(-k // TILE_K) * TILE_K


def layout_metadata() -> dict[str, str]:
    """What a file must record to be read back with this layout."""
    return {"packing": LAYOUT_NAME, "packing_version": str(LAYOUT_VERSION), "packing_tile_k": str(TILE_K)}


def check_layout_metadata(meta: dict[str, str], where: str) -> None:
    want = layout_metadata()
    got = {k: meta.get(k) for k in want}
    if got != want:
        raise ValueError(f"{where}: packed with layout {got}, this flaxflux reads {want}")


def _check_ternary(w) -> None:
    if w.ndim != 2:
        raise ValueError(f"pack_ternary expects w of shape (K, N), got {w.shape}")


def _check_packed(packed) -> None:
    if packed.ndim != 2:
        raise ValueError(f"packed ternary weight must be 2-D (K_pad/4, N), got shape {packed.shape}")
    if packed.shape[0] % SLAB:
        raise ValueError(f"packed rows {packed.shape[0]} are not a whole number of {TILE_K}-row tiles "
                         f"({SLAB} packed rows each)")


def pack_ternary_np(w: np.ndarray) -> np.ndarray:
    """numpy version of `pack_ternary` (converter: host memory, no device)."""
    _check_ternary(w)
    k, n = w.shape
    codes = np.ones((padded_k(k), n), np.uint8)   # code 1 = weight 0 (padding)
    codes[:k] = (np.asarray(w, np.int8) + 1).astype(np.uint8) & 3
    tiles = codes.reshape(-1, PLANES, SLAB, n)  # (tile, plane, j, n)
    packed = tiles[:, 0] | (tiles[:, 1] << 2) | (tiles[:, 2] << 4) | (tiles[:, 3] << 6)  # (tile, j, n)
    return np.ascontiguousarray(packed.transpose(0, 2, 1)).reshape(-1, n).view(np.int8)


def pack_ternary(w: jax.Array) -> jax.Array:
    """w (K, N) int8 in {-1, 0, 1} -> packed (K_pad/4, N) int8 (see the module docstring)."""
    _check_ternary(w)
    k, n = w.shape
    codes = jnp.ones((padded_k(k), n), jnp.uint8).at[:k].set(
        (jnp.asarray(w, jnp.int8) + 1).astype(jnp.uint8) & 3)
    tiles = codes.reshape(-1, PLANES, SLAB, n)
    packed = tiles[:, 0] | (tiles[:, 1] << 2) | (tiles[:, 2] << 4) | (tiles[:, 3] << 6)
    return jax.lax.bitcast_convert_type(packed.transpose(0, 2, 1).reshape(-1, n), jnp.int8)


def packed_tiles(packed: jax.Array) -> jax.Array:
    """The (T, N, SLAB) view of a packed (K_pad/4, N) weight (a free reshape)."""
    _check_packed(packed)
    return packed.reshape(-1, packed.shape[1], SLAB)


def unpack_planes(packed: jax.Array) -> list[jax.Array]:
    """int8 bytes -> the 4 planes of int8 weights in {-1, 0, 1}, same shape each (elementwise)."""
    packed = jnp.asarray(packed, jnp.int8)
    return [(jax.lax.shift_right_logical(packed, jnp.int8(2 * p)) & jnp.int8(3)) - jnp.int8(1)
            for p in range(PLANES)]


def unpack_ternary(packed: jax.Array, k: int | None = None) -> jax.Array:
    """packed (K_pad/4, N) int8 -> w (K, N) int8 (K = k, or K_pad if not given)."""
    kp4, n = packed.shape
    planes = unpack_planes(packed_tiles(packed))                # each (tile, n, j)
    w = jnp.stack(planes, axis=1).transpose(0, 1, 3, 2)         # (tile, plane, j, n)
    w = w.reshape(kp4 * PLANES, n)
    return w if k is None else w[:k]


def unpack_ternary_np(packed: np.ndarray, k: int | None = None) -> np.ndarray:
    """numpy version of `unpack_ternary`."""
    _check_packed(packed)
    kp4, n = packed.shape
    b = np.asarray(packed, np.int8).view(np.uint8).reshape(-1, n, SLAB)
    planes = [((b >> np.uint8(2 * p)) & np.uint8(3)).astype(np.int8) - np.int8(1) for p in range(PLANES)]
    w = np.stack(planes, axis=1).transpose(0, 1, 3, 2).reshape(kp4 * PLANES, n).astype(np.int8)
    return w if k is None else w[:k]


def kernel_operands(parts, m: int, k: int, mp: int, w3, scale, step=None, step_rows: int | None = None) -> list:
    """The operands the Pallas kernels take: the activation parts (each (m, k_i)) zero-padded to
    `mp` rows and whole K tiles and joined along K, the tiled weights, the fp32 scale, and (for
    W1.58A8) the per-row activation step padded to `step_rows` rows (default `mp`). w3 is passed
    through; only its first axis (K-tiles) is read."""
    kp = w3.shape[0] * TILE_K
    xs = (jnp.concatenate([jnp.pad(xp, ((0, mp - m), (0, kp - k))) for xp in parts], axis=1)
          if (mp, kp) != (m, k) or len(parts) > 1 else parts[0])
    args = [xs, w3, scale.astype(jnp.float32)]
    if step is not None:
        args.append(jnp.pad(step.astype(jnp.float32), (0, (step_rows or mp) - m)))
    return args


def sum_split_k(partials, bias, out_dtype):
    """Finish a split-K kernel: sum its fp32 partials (splits, rows, N) (scales already applied),
    add the bias once, cast."""
    out = partials.sum(axis=0)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(out_dtype)
