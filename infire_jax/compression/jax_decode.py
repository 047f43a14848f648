"""In-jit decode of palette12 weights to float32, right before the matmul.

This CPU has no native bf16: a bf16 ``astype`` inside jit is 30-50x slower than fp32, so the decoder
never touches bf16. It rebuilds the fp32 bit pattern directly with integer ops
(``sign << 31 | exp << 23 | mantissa << 16``, i.e. the bf16 pattern shifted left by 16) and bitcasts,
which is exactly bf16 -> f32 for every pattern, NaN payloads and subnormals included.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from infire_jax.compression import codec
from infire_jax.compression.codec import NIBBLE_BLOCK, PALETTE_SIZE, Compressed


def unpack_nibbles(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """jnp twin of codec.unpack_nibbles: the split-block layout unpacks as 64-wide contiguous halves."""
    if not shape:
        return packed[0] & 0x0F
    lead, n = shape[:-1], shape[-1]
    main = n - n % NIBBLE_BLOCK
    pm = packed[..., : main // 2].reshape(lead + (-1, NIBBLE_BLOCK // 2))
    parts = [jnp.concatenate([pm & 0x0F, pm >> 4], axis=-1).reshape(lead + (main,))]
    if main < n:
        pt = packed[..., main // 2 :]
        parts.append(jnp.concatenate([pt & 0x0F, pt >> 4], axis=-1)[..., : n - main])
    return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]


def decode_palette12_f32(
    packed_idx: jax.Array,
    sign_mant: jax.Array,
    palette: jax.Array,
    escape_idx: jax.Array,
    escape_val: jax.Array,
    shape: tuple[int, ...] | None = None,
    *,
    palette_is_range: bool = False,
) -> jax.Array:
    """Decode one palette12 tensor to float32 (bit-identical to bf16 -> f32). Pure and jittable.

    packed_idx: uint8 (..., ceil(N/2)) 4-bit palette indices in codec.pack_nibbles' layout ((1,) for
                a 0-d tensor). sign_mant: uint8 of the tensor's shape (sign << 7 | mantissa).
    palette:    uint8 (<=16,) exponents. escape_idx: int (E,) flat indices into the tensor; indices
                >= size (padding) are dropped. escape_val: uint16 (E,) full bf16 patterns.
    shape:      optional check of the logical shape; it is otherwise taken from ``sign_mant``.
    palette_is_range: static promise that palette[i] == palette[0] + i (see codec.palette_is_range);
                replaces the 16-entry gather by an add, which XLA vectorises (~1.5x faster on CPU).
    """
    if shape is not None and tuple(shape) != tuple(sign_mant.shape):
        raise ValueError(f"shape {tuple(shape)} does not match sign_mant shape {tuple(sign_mant.shape)}")
    shape = tuple(sign_mant.shape)
    expected = (1,) if not shape else shape[:-1] + ((shape[-1] + 1) // 2,)
    if tuple(packed_idx.shape) != expected:
        raise ValueError(f"packed_idx shape {tuple(packed_idx.shape)} does not fit tensor shape {shape}")
    idx = unpack_nibbles(packed_idx, shape).astype(jnp.uint32)
    if palette_is_range:
        exp = palette[0].astype(jnp.uint32) + idx
    else:
        pal = jnp.zeros(PALETTE_SIZE, jnp.uint32).at[: palette.shape[-1]].set(palette.astype(jnp.uint32))
        exp = jnp.take(pal, idx.astype(jnp.int32), mode="clip")  # 4-bit indices: never out of range
    sm = sign_mant.astype(jnp.uint32)
    out = lax.bitcast_convert_type(((sm & 0x80) << 24) | (exp << 23) | ((sm & 0x7F) << 16), jnp.float32)
    if escape_idx.shape[-1] == 0:
        return out
    vals = lax.bitcast_convert_type(escape_val.astype(jnp.uint32) << 16, jnp.float32)
    flat = out.reshape(-1).at[escape_idx].set(vals, mode="drop", indices_are_sorted=True)
    return flat.reshape(shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Palette12Weight:
    """A palette12 weight as a pytree of jax arrays, decoded with :meth:`decode_f32` inside jit.

    For a stacked (L, ...) weight every leaf has the leading L axis: the palette is (L, 16) and the
    escapes are (L, E) with indices relative to the slice, padded to a common E with the index
    ``slice size`` (dropped by the scatter). ``lax.scan`` over the weight thus hands each step an
    ordinary single-slice weight. The logical shape is read from ``sign_mant`` rather than stored
    as static metadata, so it stays right for slices (scan) and local shards alike. The only static
    field, ``palette_is_range``, selects the gather-free decode path.
    """

    packed_idx: jax.Array
    sign_mant: jax.Array
    palette: jax.Array
    escape_idx: jax.Array
    escape_val: jax.Array
    palette_is_range: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.sign_mant.shape)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))

    def decode_f32(self) -> jax.Array:
        """float32 weight; vmaps over leading stacked axes if the palette has them."""
        fn = functools.partial(decode_palette12_f32, palette_is_range=self.palette_is_range)
        for _ in range(self.palette.ndim - 1):
            fn = jax.vmap(fn)
        return fn(self.packed_idx, self.sign_mant, self.palette, self.escape_idx, self.escape_val)


def palette12_from_numpy(c: Compressed, stacked_axis0: bool = False) -> Palette12Weight:
    """Build a :class:`Palette12Weight` from any Compressed (transcoded to palette12 if needed).

    With ``stacked_axis0`` the tensor is treated as L slices along axis 0 (e.g. layers or experts)
    and the palette/escapes are laid out per slice so the weight can be scanned over axis 0.
    """
    if c.kind != "palette12":
        c = codec.transcode_to_palette12(c, allow_raw=False)
    a = c.arrays
    palette = np.zeros(PALETTE_SIZE, np.uint8)
    palette[: a["palette"].size] = a["palette"]
    esc_idx, esc_val = a["escape_idx"].astype(np.int64), a["escape_val"]
    if not stacked_axis0:
        if c.size >= 2**31:
            raise ValueError(f"tensor of {c.size} elements is too large for int32 escape indices; stack it")
        leaves = (palette, esc_idx.astype(np.int32), esc_val)
    else:
        if len(c.shape) < 2:
            raise ValueError(f"stacked_axis0 needs a tensor of rank >= 2, got shape {c.shape}")
        n_slices, per = c.shape[0], c.size // max(c.shape[0], 1)
        if per >= 2**31 - 1:
            raise ValueError(f"slice of {per} elements is too large for int32 escape indices")
        layer = esc_idx // max(per, 1)
        counts = np.bincount(layer, minlength=n_slices)
        width = int(counts.max()) if counts.size else 0
        rank = np.arange(esc_idx.size) - (np.cumsum(counts) - counts)[layer]
        idx = np.full((n_slices, width), per, np.int32)  # padding: one past the slice, dropped
        val = np.zeros((n_slices, width), np.uint16)
        idx[layer, rank] = esc_idx - layer * per
        val[layer, rank] = esc_val
        leaves = (np.broadcast_to(palette, (n_slices, PALETTE_SIZE)), idx, val)
    arrays = (a["packed_idx"], a["sign_mant"], *leaves)
    return Palette12Weight(*map(jnp.asarray, arrays), palette_is_range=codec.palette_is_range(a["palette"]))
