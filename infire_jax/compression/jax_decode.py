"""In-jit decode of palette12 weights to float32, right before the matmul.

This CPU has no native bf16: a bf16 ``astype`` inside jit is 30-50x slower than fp32, so the decoder
never touches bf16. It rebuilds the fp32 bit pattern directly with integer ops
(``sign << 31 | exp << 23 | mantissa << 16``, i.e. the bf16 pattern shifted left by 16) and bitcasts,
which is exactly bf16 -> f32 for every pattern, NaN payloads and subnormals included.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

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
    ordinary single-slice weight. A weight may have several stack axes: routed experts are stacked
    (layers, experts, ...) with a palette and escapes per expert, (L, X, 16) and (L, X, G, E), so the
    expert dispatch indexes a layer, then an expert, and decodes that expert alone. The shape is read from ``sign_mant`` rather than stored as
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

    def leaf_specs(self, stack_spec: tuple) -> "Palette12Weight":
        """PartitionSpecs of the leaves (a pytree shaped like this weight, for shard_map / placing)
        when the leading stack axes are split by ``stack_spec`` (one entry per stack axis) and the
        slice by ``block_spec``."""
        return _leaf_specs(self, tuple(stack_spec), tuple(self.block_spec or ()))

    def local_shard(self) -> "Palette12Weight":
        """This weight as a device sees it inside a shard_map over its block axes: the leaves hold
        one block, decoded on its own (the one-block form, no nested shard_map)."""
        if not self.block_axes:
            return self
        return dataclasses.replace(self, block_spec=(None,) * len(self.block_spec), mesh=None)

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


def _trimmed(*entries: Any) -> P:
    """Canonical PartitionSpec: no trailing Nones."""
    entries = list(entries)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def _leaf_specs(like: Any, stack_spec: tuple, block_spec: tuple) -> Any:
    """Per-leaf PartitionSpecs of a blocked palette12 weight (a Palette12Weight or a dict of its
    leaves): packed_idx / sign_mant split like the stored weight, the palette on the stack axes
    only, escapes (stack..., G, E) on (stack axes, the block axes flattened in row-major order)."""
    axes = tuple(a for e in block_spec for a in _mesh_axes(e))
    blocks_axis = None if not axes else axes[0] if len(axes) == 1 else axes
    full = _trimmed(*stack_spec, *block_spec)
    specs = dict(packed_idx=full, sign_mant=full, palette=_trimmed(*stack_spec),
                 escape_idx=_trimmed(*stack_spec, blocks_axis), escape_val=_trimmed(*stack_spec, blocks_axis))
    if isinstance(like, dict):
        return specs
    return dataclasses.replace(like, **specs)


def place_stacked_palette12(
    leaves: dict[str, np.ndarray], mesh: Any, spec: tuple, palette_is_range: bool, perm: tuple[int, ...],
) -> Palette12Weight:
    """Put stacked blocked leaves (codec.encode_palette12_blocks of each stored slice, stacked by
    :func:`stack_palette12_blocks`, then reshaped to the stack axes) on ``mesh``. The stack axes are
    the palette's leading axes (one: layers; two: layers, experts). ``spec``: PartitionSpec entries
    of the stored (stack..., slice...) array, one per axis; its slice part must be the blocking the
    leaves were encoded with. ``perm``: stored slice axis i is logical axis perm[i]. packed_idx /
    sign_mant are sharded like the stored weight (the packed last axis has blocks[-1] equal parts),
    the palette on the stack axes only, escapes (stack..., G, E) on (stack axes, the block axes
    flattened in row-major order). No stack axis (palette (16,)): one layer's weight. Each process
    places only its own devices' blocks (put_host_array)."""
    k = leaves["palette"].ndim - 1
    spec = tuple(spec) + (None,) * (leaves["sign_mant"].ndim - len(spec))
    stack_spec, block_spec = spec[:k], spec[k:]
    g = leaves["escape_idx"].shape[k]
    if g != int(np.prod(block_counts(mesh, block_spec), dtype=np.int64)):
        raise ValueError(f"escapes have {g} blocks but spec {spec} makes {block_counts(mesh, block_spec)}")
    shardings = _leaf_specs(leaves, stack_spec, block_spec)
    arrays = {name: put_host_array(v, NamedSharding(mesh, shardings[name])) for name, v in leaves.items()}
    return Palette12Weight(
        **arrays, palette_is_range=palette_is_range, nibble_layout="halves", perm=tuple(perm),
        block_spec=tuple(block_spec), mesh=mesh,
    )


# ------------------------------------------------------------------------------------- saved form
#
# Model.save writes a compressed weight in a form that does not depend on the layout it was placed
# for, and restoring re-blocks it for the target layout on the device: no weight is ever decoded
# (checkpoint/store.py). Leaves, in stored axis order, stack axes first:
#   sign_mant    uint8 (stack..., slice...)                 as placed
#   index_pairs  uint8 (stack..., slice[:-1], ceil(n / 2))  the 4-bit palette indices in pairs along
#                the last axis (byte k = idx[2k] | idx[2k + 1] << 4): a split of that axis into
#                blocks of even width is a slice of the bytes
#   palette      uint8 (stack..., 16)
#   escape_idx   int32 (stack..., E): flat indices into the slice, ascending, padded with its size
#   escape_val   uint16 (stack..., E)

def _pack_pairs(idx: jax.Array) -> jax.Array:
    if idx.shape[-1] % 2:
        idx = jnp.pad(idx, [(0, 0)] * (idx.ndim - 1) + [(0, 1)])
    pairs = idx.reshape(idx.shape[:-1] + (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _unpack_pairs(pairs: jax.Array) -> jax.Array:
    return jnp.stack([pairs & 0x0F, pairs >> 4], axis=-1).reshape(pairs.shape[:-1] + (-1,))


def _pack_halves(idx: jax.Array) -> jax.Array:
    """jnp twin of codec.pack_halves."""
    n = idx.shape[-1]
    h = (n + 1) // 2
    hi = jnp.pad(idx[..., h:], [(0, 0)] * (idx.ndim - 1) + [(0, 2 * h - n)])
    return idx[..., :h] | (hi << 4)


def _full_spec(a: jax.Array) -> tuple:
    spec = tuple(a.sharding.spec)
    return spec + (None,) * (a.ndim - len(spec))


@functools.lru_cache(maxsize=None)
def _to_saved_program(layouts: tuple) -> Any:
    """One program for many weights, each (mesh, packed spec, sign_mant spec, escape spec, slice
    shape, blocks): every device unpacks its own blocks' "halves" nibbles and the indices are packed
    in pairs; escapes become slice-relative, sorted, and are counted per stack entry."""
    def one(layout, packed, sign_mant, escape_idx, escape_val):
        mesh, packed_spec, sm_spec, esc_spec, pairs_spec, slice_shape, blocks = layout
        unpack = jax.shard_map(lambda p, s: unpack_halves(p, s.shape[-1]), mesh=mesh, in_specs=(packed_spec, sm_spec),
                               out_specs=sm_spec, check_vma=False)
        idx, val = _slice_escapes(escape_idx, escape_val, slice_shape, blocks)
        keep = lambda a, spec: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec))  # noqa: E731
        count = jnp.max(jnp.sum(idx < int(np.prod(slice_shape)), axis=-1), initial=0)
        return keep(_pack_pairs(unpack(packed, sign_mant)), pairs_spec), keep(idx, esc_spec), keep(val, esc_spec), count

    return jax.jit(lambda *args: [one(layout, *a) for layout, a in zip(layouts, zip(*args))])


@functools.lru_cache(maxsize=None)
def _cut_program(cuts: tuple) -> Any:
    """One program cutting (or padding with index `size`) many escape lists to `width` entries."""
    def one(cut, idx, val):
        width, size, mesh, spec = cut
        if idx.shape[-1] < width:
            pad = [(0, 0)] * (idx.ndim - 1) + [(0, width - idx.shape[-1])]
            idx, val = jnp.pad(idx, pad, constant_values=size), jnp.pad(val, pad)
        keep = lambda a: jax.lax.with_sharding_constraint(a[..., :width], NamedSharding(mesh, spec))  # noqa: E731
        return keep(idx), keep(val)

    return jax.jit(lambda idx, val: [one(c, i, v) for c, i, v in zip(cuts, idx, val)])


def to_saved(weights: Sequence[Palette12Weight], groups: Sequence[Any] | None = None) -> list[dict[str, jax.Array]]:
    """The layout-free saved form (above) of placed blocked palette12 weights, computed on the
    devices that hold them (two programs for all of them): each device unpacks its own blocks'
    nibbles, the block-relative escape lists become slice-relative ones, as wide as the widest of
    the weight (of its group: weights sharing a group key get one width, e.g. a layer list's layers)."""
    layouts = []
    for w in weights:
        if w.nibble_layout != "halves" or w.block_spec is None:
            raise ValueError("only blocked palette12 weights (the runtime form of compressed checkpoints) can be saved")
        depth = w.palette.ndim - 1
        specs = w.leaf_specs(_full_spec(w.sign_mant)[:depth])
        slice_shape = tuple(w.sign_mant.shape[depth:])
        mesh = w.sign_mant.sharding.mesh
        pairs = saved_specs(_full_spec(w.sign_mant)[:depth], w.block_spec, slice_shape, mesh)["index_pairs"]
        layouts.append((mesh, specs.packed_idx, specs.sign_mant, specs.palette, pairs, slice_shape,
                        block_counts(w.mesh, w.block_spec)))
    if not weights:
        return []
    out = _to_saved_program(tuple(layouts))(*zip(*((w.packed_idx, w.sign_mant, w.escape_idx, w.escape_val) for w in weights)))
    counts = [max(1, int(c)) for c in jax.device_get([o[3] for o in out])]  # >= 1: no empty arrays
    groups = list(range(len(weights))) if groups is None else list(groups)
    width = {g: max(c for c, h in zip(counts, groups) if h == g) for g in groups}
    cuts = tuple((width[g], int(np.prod(lay[5])), lay[0], lay[3]) for g, lay in zip(groups, layouts))
    escapes = _cut_program(cuts)([o[1] for o in out], [o[2] for o in out])
    return [dict(sign_mant=w.sign_mant, index_pairs=o[0], palette=w.palette, escape_idx=e[0], escape_val=e[1])
            for w, o, e in zip(weights, out, escapes)]


def _slice_escapes(escape_idx, escape_val, slice_shape, blocks):
    """Block-relative escapes (stack..., G, Eb) -> slice-relative (stack..., G * Eb), ascending,
    padded with the slice size."""
    bshape = tuple(n // b for n, b in zip(slice_shape, blocks))
    bsize, size = int(np.prod(bshape)), int(np.prod(slice_shape))
    g, eb = escape_idx.shape[-2:]
    inner = jnp.unravel_index(jnp.minimum(escape_idx, bsize - 1), bshape)
    origin = np.unravel_index(np.arange(g), blocks)
    coords = [c + (o * n)[:, None] for c, o, n in zip(inner, origin, bshape)]
    flat = jnp.where(escape_idx < bsize, jnp.ravel_multi_index(coords, slice_shape, mode="clip"), size)
    flat = flat.reshape(flat.shape[:-2] + (g * eb,)).astype(jnp.int32)
    order = jnp.argsort(flat, axis=-1, stable=True)
    val = escape_val.reshape(flat.shape)
    return jnp.take_along_axis(flat, order, axis=-1), jnp.take_along_axis(val, order, axis=-1)


def saved_specs(stack_spec: tuple, block_spec: tuple, slice_shape: tuple[int, ...], mesh: Any) -> dict[str, P]:
    """PartitionSpecs to read the saved leaves with for a layout (stack axes split by stack_spec,
    the slice cut into block_spec's blocks): every device reads the parts its own block needs; the
    index pairs of a last axis cut into blocks of odd width are read whole along that axis; the
    escape lists (~1e-4 of a weight's entries) whole per stack entry, split on the device."""
    stack_spec, block_spec = tuple(stack_spec), tuple(block_spec)
    full = _trimmed(*stack_spec, *block_spec)
    pairs = full
    if block_spec and (slice_shape[-1] // block_counts(mesh, block_spec[-1:])[0]) % 2:
        pairs = _trimmed(*stack_spec, *block_spec[:-1], None)
    stack = _trimmed(*stack_spec)
    return dict(sign_mant=full, index_pairs=pairs, palette=stack, escape_idx=stack, escape_val=stack)


@dataclasses.dataclass(frozen=True)
class SavedLayout:
    """How one saved weight is re-blocked for a layout (see from_saved)."""

    mesh: Any
    stack_spec: tuple
    block_spec: tuple
    perm: tuple[int, ...]
    palette_is_range: bool
    escape_width: int


@functools.lru_cache(maxsize=None)
def _from_saved_program(layouts: tuple) -> Any:
    """One program for many weights, each (SavedLayout, slice shape): every device turns the index
    pairs it read into its block's "halves" nibbles (cutting its block out first where the whole last
    axis was read) and the escapes are split into per-block lists."""
    def one(layout, slice_shape, pairs, sign_mant, escape_idx, escape_val):
        blocks = block_counts(layout.mesh, layout.block_spec)
        specs = _leaf_specs({}, layout.stack_spec, layout.block_spec)
        read = saved_specs(layout.stack_spec, layout.block_spec, slice_shape, layout.mesh)
        nb = slice_shape[-1] // blocks[-1]
        last_axes = _mesh_axes(layout.block_spec[-1]) if layout.block_spec and blocks[-1] > 1 else ()
        whole_last = bool(last_axes) and read["index_pairs"] != specs["sign_mant"]

        def local(pairs, s):
            idx = _unpack_pairs(pairs)
            if whole_last:
                idx = jax.lax.dynamic_slice_in_dim(idx, jax.lax.axis_index(last_axes) * nb, nb, axis=-1)
            return _pack_halves(idx[..., :nb])

        pack = jax.shard_map(local, mesh=layout.mesh, in_specs=(read["index_pairs"], specs["sign_mant"]),
                             out_specs=specs["packed_idx"], check_vma=False)
        idx, val = _block_escapes(escape_idx, escape_val, slice_shape, blocks, layout.escape_width)
        keep = lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(layout.mesh, specs["escape_idx"]))  # noqa: E731
        return pack(pairs, sign_mant), keep(idx), keep(val)

    return jax.jit(lambda *args: [one(*lay, *a) for lay, a in zip(layouts, zip(*args))])


def from_saved(saved: Sequence[tuple[dict[str, jax.Array], SavedLayout]]) -> list[Palette12Weight]:
    """The blocked palette12 weights for a layout from their saved leaves, read with
    :func:`saved_specs` on its mesh, all in one program: each device packs its block's nibbles, the
    escapes are split into per-block lists of ``escape_width`` entries."""
    if not saved:
        return []
    layouts = tuple((lay, tuple(leaves["sign_mant"].shape[len(lay.stack_spec):])) for leaves, lay in saved)
    args = zip(*((lv["index_pairs"], lv["sign_mant"], lv["escape_idx"], lv["escape_val"]) for lv, _ in saved))
    out = _from_saved_program(layouts)(*args)
    return [
        Palette12Weight(packed, leaves["sign_mant"], leaves["palette"], idx, val, palette_is_range=lay.palette_is_range,
                        nibble_layout="halves", perm=tuple(lay.perm), block_spec=tuple(lay.block_spec), mesh=lay.mesh)
        for (leaves, lay), (packed, idx, val) in zip(saved, out)
    ]


def _block_escapes(escape_idx, escape_val, slice_shape, blocks, width):
    """Slice-relative escapes (stack..., E) -> per-block lists (stack..., G, width), block-relative,
    ascending, padded with the block size."""
    bshape = tuple(n // b for n, b in zip(slice_shape, blocks))
    bsize, size = int(np.prod(bshape)), int(np.prod(slice_shape))
    coords = jnp.unravel_index(jnp.minimum(escape_idx, size - 1), slice_shape)
    block = jnp.ravel_multi_index([c // n for c, n in zip(coords, bshape)], blocks, mode="clip")
    inner = jnp.ravel_multi_index([c % n for c, n in zip(coords, bshape)], bshape, mode="clip")
    g, e = int(np.prod(blocks)), escape_idx.shape[-1]
    mine = (escape_idx < size)[..., None, :] & (block[..., None, :] == jnp.arange(g)[:, None])  # (..., G, E)
    rank = jnp.arange(e)
    order = jnp.argsort(jnp.where(mine, rank, e + rank), axis=-1)  # each block's entries first, in order
    idx = jnp.take_along_axis(jnp.where(mine, inner[..., None, :], bsize), order, axis=-1)
    val = jnp.take_along_axis(jnp.broadcast_to(escape_val[..., None, :], mine.shape), order, axis=-1)
    if width > e:
        pad = [(0, 0)] * (idx.ndim - 1) + [(0, width - e)]
        idx, val = jnp.pad(idx, pad, constant_values=bsize), jnp.pad(val, pad)
    return idx[..., :width].astype(jnp.int32), val[..., :width]
