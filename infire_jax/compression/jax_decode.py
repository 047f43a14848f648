"""In-jit decode of palette12 weights to float32, right before the matmul.

This CPU has no native bf16: a bf16 ``astype`` inside jit is 30-50x slower than fp32, so the decoder
never touches bf16. It rebuilds the fp32 bit pattern directly with integer ops
(``sign << 31 | exp << 23 | mantissa << 16``, i.e. the bf16 pattern shifted left by 16) and bitcasts,
which is exactly bf16 -> f32 for every pattern, NaN payloads and subnormals included.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

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


def unpack_halves(packed: jax.Array, n: int) -> jax.Array:
    """jnp twin of codec.unpack_halves: the low nibbles then the high nibbles, one concatenate of
    two constant-shift vectors. (A broadcast variable shift or a select between the halves measured
    ~4x slower on this CPU: XLA does not vectorise them.)"""
    out = jnp.concatenate([packed & 0x0F, packed >> 4], axis=-1)
    return out if out.shape[-1] == n else out[..., :n]


def decode_palette12_f32(
    packed_idx: jax.Array,
    sign_mant: jax.Array,
    palette: jax.Array,
    escape_idx: jax.Array,
    escape_val: jax.Array,
    shape: tuple[int, ...] | None = None,
    *,
    palette_is_range: bool = False,
    nibble_layout: str = "block128",
) -> jax.Array:
    """Decode one palette12 tensor to float32 (bit-identical to bf16 -> f32). Pure and jittable.

    packed_idx: uint8 (..., ceil(N/2)) 4-bit palette indices in codec.pack_nibbles' layout ((1,) for
                a 0-d tensor). sign_mant: uint8 of the tensor's shape (sign << 7 | mantissa).
    palette:    uint8 (<=16,) exponents. escape_idx: int (E,) flat indices into the tensor; indices
                >= size (padding) are dropped. escape_val: uint16 (E,) full bf16 patterns.
    shape:      optional check of the logical shape; it is otherwise taken from ``sign_mant``.
    palette_is_range: static promise that palette[i] == palette[0] + i (see codec.palette_is_range);
                replaces the 16-entry gather by an add, which XLA vectorises (~1.5x faster on CPU).
    nibble_layout: "block128" (codec.pack_nibbles, the palette12 format) or "halves"
                (codec.pack_halves, the blocked runtime layout of compressed checkpoints).
    """
    if shape is not None and tuple(shape) != tuple(sign_mant.shape):
        raise ValueError(f"shape {tuple(shape)} does not match sign_mant shape {tuple(sign_mant.shape)}")
    shape = tuple(sign_mant.shape)
    expected = (1,) if not shape else shape[:-1] + ((shape[-1] + 1) // 2,)
    if tuple(packed_idx.shape) != expected:
        raise ValueError(f"packed_idx shape {tuple(packed_idx.shape)} does not fit tensor shape {shape}")
    if nibble_layout == "halves" and shape:
        idx = unpack_halves(packed_idx, shape[-1]).astype(jnp.uint32)
    elif nibble_layout in ("block128", "halves"):
        idx = unpack_nibbles(packed_idx, shape).astype(jnp.uint32)
    else:
        raise ValueError(f"unknown nibble layout {nibble_layout!r}")
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


def _mesh_axes(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Palette12Weight:
    """A palette12 weight as a pytree of jax arrays, decoded with :meth:`decode_f32` inside jit.

    For a stacked (L, ...) weight every leaf has the leading L axis: the palette is (L, 16) and the
    escapes are (L, E) with indices relative to the slice, padded to a common E with the index
    ``slice size`` (dropped by the scatter). ``lax.scan`` over the weight thus hands each step an
    ordinary single-slice weight. The shape is read from ``sign_mant`` rather than stored as
    static metadata, so it stays right for slices (scan) and local shards alike. Static fields:
    ``palette_is_range`` selects the gather-free decode path; ``nibble_layout`` the packing.

    Blocked form (``block_spec`` set; built by :func:`place_stacked_palette12` for compressed
    checkpoints, codec's "blocked palette12" layout):

    * ``perm``: the slice is stored with its axes permuted, stored axis i = logical axis perm[i]
      (the loader puts a weight's contraction axes first: the decoded array is then the (K, N)
      row-major operand of the CPU dot and XLA makes no transposing copy). ``shape`` and
      :meth:`decode_f32` are logical; the leaves are in stored order.
    * ``block_spec``: one PartitionSpec entry per *stored* slice axis on ``mesh``. The slice is cut
      into the device shards of that spec, each packed on its own with its own escape list
      (block-relative indices), so the escapes gain a block axis, (..., G, E), sharded over the
      spec's mesh axes. Decoding runs in a ``shard_map`` over those axes: every device decodes
      exactly its own shard with no communication, and the f32 weight comes out sharded as the
      uncompressed weight would be.
    """

    packed_idx: jax.Array
    sign_mant: jax.Array
    palette: jax.Array
    escape_idx: jax.Array
    escape_val: jax.Array
    palette_is_range: bool = dataclasses.field(default=False, metadata=dict(static=True))
    nibble_layout: str = dataclasses.field(default="block128", metadata=dict(static=True))
    perm: tuple[int, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))
    block_spec: tuple | None = dataclasses.field(default=None, metadata=dict(static=True))
    mesh: Any = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape (stacked axes first)."""
        stored = tuple(self.sign_mant.shape)
        if self.perm is None:
            return stored
        k = len(stored) - len(self.perm)
        logical = [0] * len(self.perm)
        for i, ax in enumerate(self.perm):
            logical[ax] = stored[k + i]
        return stored[:k] + tuple(logical)

    @property
    def ndim(self) -> int:
        return self.sign_mant.ndim

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))

    def __getitem__(self, key: Any) -> "Palette12Weight":
        """``w[...]`` is ``w`` (nnx reads Variables this way); other keys index the leading
        (stacked) axis of every leaf, e.g. ``w[3]`` is layer 3 as a single-slice weight."""
        if key is Ellipsis:
            return self
        if self.palette.ndim < 2:
            raise IndexError("only a stacked Palette12Weight (leading layers/experts axis) can be indexed")
        return jax.tree.map(lambda a: a[key], self)

    @property
    def block_axes(self) -> tuple[str, ...]:
        """Mesh axes the blocks are spread over (row-major block order), () if unsharded."""
        return tuple(a for e in (self.block_spec or ()) for a in _mesh_axes(e))

    def _decode_slice(self, packed_idx, sign_mant, palette, escape_idx, escape_val) -> jax.Array:
        dec = functools.partial(
            decode_palette12_f32, palette_is_range=self.palette_is_range, nibble_layout=self.nibble_layout
        )
        axes = self.block_axes
        if self.block_spec is None:
            out = dec(packed_idx, sign_mant, palette, escape_idx, escape_val)
        elif not axes:  # one block: escapes are (1, E)
            out = dec(packed_idx, sign_mant, palette, escape_idx[0], escape_val[0])
        else:
            if self.mesh is None:
                raise ValueError("a Palette12Weight sharded into blocks needs its mesh")
            # Inside an enclosing shard_map (the pp stages) the context mesh has some axes manual
            # already: nest into it. At top level (no context mesh) use the weight's own mesh.
            ctx = jax.sharding.get_abstract_mesh()
            mesh = ctx if not ctx.empty and all(ctx.shape.get(a) == self.mesh.shape[a] for a in axes) else self.mesh
            spec = P(*self.block_spec)
            local = lambda p, s, pal, i, v: dec(p, s, pal, i[0], v[0])  # noqa: E731  (one block per device)
            out = jax.shard_map(
                local, mesh=mesh, in_specs=(spec, spec, P(), P(axes), P(axes)), out_specs=spec,
                axis_names=set(axes), check_vma=False,
            )(packed_idx, sign_mant, palette, escape_idx, escape_val)
        return out if self.perm is None else out.transpose(np.argsort(self.perm))

    def as_rows(self, contracted: int) -> tuple | None:
        """This one-slice weight as N rows of K (its trailing ``contracted`` axes flattened) in the
        operand form of a fused decode-and-multiply kernel (kernels/cpu.py matmul_nt_palette12):
        (packed_idx (N, K / S * ceil(S / 2)), sign_mant (N, K), palette (16,), escape_idx (E,),
        escape_val (E,), S) with S the last axis, the free reshapes of the stored leaves. None where
        the stored form is not that: a stack, permuted axes, blocks over devices or block128 nibbles."""
        one_block = self.block_spec is not None and not self.block_axes and self.escape_idx.ndim == 2
        natural = self.perm is None or tuple(self.perm) == tuple(range(len(self.perm)))
        if self.palette.ndim != 1 or self.nibble_layout != "halves" or not natural or not one_block:
            return None
        shape = self.sign_mant.shape
        if not 0 < contracted < len(shape):
            return None
        n = int(np.prod(shape[: len(shape) - contracted]))
        return (
            self.packed_idx.reshape(n, -1), self.sign_mant.reshape(n, -1), self.palette, self.escape_idx[0],
            self.escape_val[0], shape[-1],
        )

    def decode_f32(self) -> jax.Array:
        """float32 weight in logical axis order; vmaps over leading stacked axes if the palette has them."""
        fn = self._decode_slice
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


def block_counts(mesh: Any, block_spec: tuple) -> tuple[int, ...]:
    """Blocks per slice axis for a PartitionSpec-like ``block_spec`` on ``mesh`` (1 = unsplit)."""
    return tuple(int(np.prod([mesh.shape[a] for a in _mesh_axes(e)], dtype=np.int64)) for e in block_spec)


def stack_palette12_blocks(slices: list[dict[str, Any]], width: int | None = None) -> dict[str, np.ndarray]:
    """Stack per-slice blocked palette12 dicts (codec.encode_palette12_blocks, same shape and
    blocks) into leaves with a leading stack axis; escapes padded to `width` (default: the largest
    block's count)."""
    if not slices:
        raise ValueError("nothing to stack")
    n, g = len(slices), len(slices[0]["escape_idx"])
    size = int(np.prod(slices[0]["sign_mant"].shape)) // g  # elements per block (padding index)
    most = max((len(e) for s in slices for e in s["escape_idx"]), default=0)
    width = most if width is None else width
    if width < most:
        raise ValueError(f"escape width {width} is below the {most} escapes of a block")
    idx = np.full((n, g, width), size, np.int32)
    val = np.zeros((n, g, width), np.uint16)
    for i, s in enumerate(slices):
        for j, (e, v) in enumerate(zip(s["escape_idx"], s["escape_val"])):
            idx[i, j, : len(e)], val[i, j, : len(v)] = e, v
    return dict(
        packed_idx=np.stack([s["packed_idx"] for s in slices]),
        sign_mant=np.stack([s["sign_mant"] for s in slices]),
        palette=np.stack([s["palette"] for s in slices]),
        escape_idx=idx,
        escape_val=val,
    )


def put_host_array(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array onto a sharding, each process placing only its own devices' blocks (device_put
    of a host array onto a multi-process sharding would compare the whole array across processes;
    here the blocks other processes hold need not even be filled in)."""
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx], dtype=host.dtype)


def place_stacked_palette12(
    leaves: dict[str, np.ndarray], mesh: Any, spec: tuple, palette_is_range: bool, perm: tuple[int, ...],
    stacked: bool = True,
) -> Palette12Weight:
    """Put stacked blocked leaves (codec.encode_palette12_blocks of each stored slice, stacked by
    :func:`stack_palette12_blocks`) on ``mesh``. ``spec``: PartitionSpec entries of the stored
    (L, ...) array, one per axis (the leading stack axis's entry, then the stored slice axes'); its
    slice part must be the blocking the leaves were encoded with. ``perm``: stored slice axis i is
    logical axis perm[i]. packed_idx / sign_mant are sharded like the stored weight (the packed last
    axis has blocks[-1] equal parts), the palette on the stack axis only, escapes (L, G, E) on
    (stack axis, the block axes flattened in row-major order). With ``stacked=False`` the leaves and
    ``spec`` have no stack axis (one layer's weight: slice 0 of a stack of one, taken on the host)."""
    from jax.sharding import NamedSharding

    spec = tuple(spec) + (None,) * (leaves["sign_mant"].ndim - len(spec))
    lead, block_spec = (spec[0], spec[1:]) if stacked else (None, spec)
    axes = tuple(a for e in block_spec for a in _mesh_axes(e))
    g = leaves["escape_idx"].shape[1 if stacked else 0]
    if g != int(np.prod(block_counts(mesh, block_spec), dtype=np.int64)):
        raise ValueError(f"escapes have {g} blocks but spec {spec} makes {block_counts(mesh, block_spec)}")
    blocks_axis = None if not axes else axes[0] if len(axes) == 1 else axes

    def trim(*entries):  # canonical PartitionSpec: no trailing Nones
        entries = list(entries)
        while entries and entries[-1] is None:
            entries.pop()
        return P(*entries)

    head = (lead,) if stacked else ()
    shardings = dict(
        packed_idx=trim(*spec), sign_mant=trim(*spec), palette=trim(*head), escape_idx=trim(*head, blocks_axis),
        escape_val=trim(*head, blocks_axis),
    )
    arrays = {k: put_host_array(v, NamedSharding(mesh, shardings[k])) for k, v in leaves.items()}
    return Palette12Weight(
        **arrays, palette_is_range=palette_is_range, nibble_layout="halves", perm=tuple(perm),
        block_spec=tuple(block_spec), mesh=mesh,
    )
