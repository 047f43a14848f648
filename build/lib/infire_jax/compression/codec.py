"""Lossless bf16 weight codecs (numpy).

Trained bf16 weights spend 8 bits on an exponent whose entropy is only ~2.6 bits, while the sign and
the 7 mantissa bits are close to incompressible. Every format here therefore splits a bf16 value into

* the exponent byte  ``(bits >> 7) & 0xFF``, which is compressed, and
* the sign+mantissa byte ``sign << 7 | mantissa``, which is stored raw (one uint8 per weight).

Formats (``Compressed.kind``):

``huffman``   distribution format. Per-tensor canonical, length-limited Huffman code of the exponent;
              the bit stream is cut every ``chunk_symbols`` symbols and the bit offset of each chunk
              is stored, so all chunks decode in parallel (vectorised over chunks in numpy).
``palette12`` runtime format, fixed 12 bits per weight: a 4-bit index into a palette of the 16 most
              common exponents (stored in ascending order), packed two per byte along the last axis
              (so leading axes can be sharded/sliced untouched; layout in pack_nibbles), plus the
              sign+mantissa byte. Positions whose exponent is not in the palette are listed as
              sparse escapes (ascending flat index + full uint16 pattern); their packed index is 0.
``raw``       the uint16 bit patterns, used when compression would not pay (e.g. random bits).
"""

from __future__ import annotations

import heapq
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import ml_dtypes
import numpy as np

KINDS = ("huffman", "palette12", "raw")
MAX_CODE_LEN = 16  # decode table of 2**16 entries; costs ~nothing vs unlimited on weight data
DEFAULT_CHUNK_SYMBOLS = 4096
PALETTE_SIZE = 16
NIBBLE_BLOCK = 128  # palette12 packing block along the last axis, see pack_nibbles
_ENCODE_BLOCK = 1 << 18


@dataclass(frozen=True, eq=False)
class Compressed:
    """One compressed bf16 tensor: named numpy payload arrays plus a few integer parameters."""

    kind: str
    shape: tuple[int, ...]
    arrays: dict[str, np.ndarray]
    meta: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes of the whole payload: data, code tables, palettes, escapes and chunk offsets."""
        return int(sum(a.nbytes for a in self.arrays.values()))

    @property
    def ratio(self) -> float:
        """Compressed size relative to bf16 (1.0 for an empty tensor)."""
        return self.nbytes / (2 * self.size) if self.size else 1.0


# ----------------------------------------------------------------------------- bit plumbing


def as_bits(array) -> np.ndarray:
    """uint16 bit patterns of a bf16 array (or of uint16 input, passed through)."""
    a = np.asarray(array)
    if a.dtype == ml_dtypes.bfloat16:
        return a.view(np.uint16)
    if a.dtype == np.uint16:
        return a
    raise ValueError(
        f"expected a bfloat16 array or uint16 bit patterns, got dtype {a.dtype}; "
        "convert with .astype(ml_dtypes.bfloat16) first"
    )


def split_bits(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint16 patterns -> (exponent byte, sign+mantissa byte), both uint8 of the same shape."""
    exp = np.asarray((bits >> 7) & 0xFF, dtype=np.uint8)  # asarray: 0-d ufunc results are scalars
    sm = np.asarray(((bits >> 8) & 0x80) | (bits & 0x7F), dtype=np.uint8)
    return exp, sm


def join_bits(exp: np.ndarray, sm: np.ndarray) -> np.ndarray:
    """Inverse of :func:`split_bits`."""
    sm16 = sm.astype(np.uint16)
    return np.asarray(((sm16 & 0x80) << 8) | (exp.astype(np.uint16) << 7) | (sm16 & 0x7F))


def _index_dtype(n: int) -> np.dtype:
    return np.dtype(np.uint32) if n < 2**32 else np.dtype(np.uint64)


# ----------------------------------------------------------------------------- huffman


def huffman_code_lengths(counts: np.ndarray, limit: int = MAX_CODE_LEN) -> np.ndarray:
    """Code length per byte value (0 = unused), at most ``limit`` bits, from 256 symbol counts."""
    lengths = np.zeros(256, np.int64)
    used = np.flatnonzero(counts)
    if used.size == 0:
        return lengths.astype(np.uint8)
    if used.size == 1:  # a lone symbol still needs one bit so the stream has a length
        lengths[used[0]] = 1
        return lengths.astype(np.uint8)
    heap = [(int(counts[s]), int(s), [int(s)]) for s in used]
    heapq.heapify(heap)
    while len(heap) > 1:
        c1, t1, s1 = heapq.heappop(heap)
        c2, t2, s2 = heapq.heappop(heap)
        lengths[s1 + s2] += 1
        heapq.heappush(heap, (c1 + c2, min(t1, t2), s1 + s2))
    if lengths.max() > limit:
        # Clamp, then restore the Kraft inequality by lengthening the rarest codes that are still
        # shorter than the limit (each step frees 2**(limit-l-1) units of code space).
        lengths[used] = np.minimum(lengths[used], limit)
        budget = sum(1 << (limit - int(l)) for l in lengths[used]) - (1 << limit)
        by_rarity = sorted(used, key=lambda s: (counts[s], -s))
        while budget > 0:
            s = max((s for s in by_rarity if lengths[s] < limit), key=lambda s: lengths[s])
            lengths[s] += 1
            budget -= 1 << (limit - int(lengths[s]))
    return lengths.astype(np.uint8)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values for the given lengths: shorter codes first, ties by symbol value."""
    codes = np.zeros(256, np.uint32)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        prev = int(lengths[s])
        codes[s] = code
        code += 1
    return codes


def _code_table(lengths: np.ndarray) -> np.ndarray:
    """(symbol, length) rows of the used symbols: ~2 bytes per exponent instead of a 256-byte table."""
    used = np.flatnonzero(lengths)
    return np.stack([used, lengths[used]], axis=1).astype(np.uint8)


def _code_lengths(table: np.ndarray) -> np.ndarray:
    if len(np.unique(table[:, 0])) != len(table):
        raise ValueError("invalid huffman table: a symbol is listed twice")
    lengths = np.zeros(256, np.uint8)
    lengths[table[:, 0]] = table[:, 1]
    return lengths


def _check_kraft(lengths: np.ndarray) -> None:
    used = lengths[lengths > 0].astype(np.int64)
    if used.size == 0 or used.max() > 24 or sum(1 << (24 - int(l)) for l in used) > 1 << 24:
        raise ValueError("invalid huffman table: empty, code lengths over 24 bits, or overfull code space")


def _encode_huffman(exp: np.ndarray, sm: np.ndarray, chunk_symbols: int) -> Compressed:
    flat = exp.reshape(-1)
    counts = np.bincount(flat, minlength=256)
    lengths = huffman_code_lengths(counts)
    codes, len64 = canonical_codes(lengths).astype(np.uint64), lengths.astype(np.int64)
    total_bits = int(counts @ len64)
    # Each code is placed in the 64-bit big-endian window starting at its 32-bit word. Codes never
    # overlap, so summing the contributions per word equals OR-ing them (exact in float64, < 2**32).
    # Blocks keep the temporaries cache-sized instead of several 8-byte-per-symbol arrays.
    words = np.zeros(total_bits // 32 + 2, np.float64)
    offsets = np.empty(-(-flat.size // chunk_symbols), np.int64)
    bit0 = 0
    for a in range(0, flat.size, _ENCODE_BLOCK):
        sym = flat[a : a + _ENCODE_BLOCK]
        ln = len64[sym]
        starts = np.cumsum(ln) - ln + bit0
        bit0 = int(starts[-1] + ln[-1])
        first = -a % chunk_symbols  # first symbol of this block that opens a chunk
        chunk_starts = starts[first::chunk_symbols]
        k0 = (a + first) // chunk_symbols
        offsets[k0 : k0 + chunk_starts.size] = chunk_starts
        word = starts >> 5
        w0 = int(word[0])
        val = codes[sym] << (64 - (starts & 31) - ln).astype(np.uint64)
        hi = np.bincount(word - w0, (val >> np.uint64(32)).astype(np.float64))
        lo = np.bincount(word - w0, (val & np.uint64(0xFFFFFFFF)).astype(np.float64))
        words[w0 : w0 + hi.size] += hi
        words[w0 + 1 : w0 + 1 + lo.size] += lo
    stream = words.astype(np.uint32).astype(">u4").view(np.uint8)[: (total_bits + 7) // 8].copy()
    offsets = offsets.astype(_index_dtype(total_bits))
    return Compressed(
        "huffman",
        exp.shape,
        {"code_table": _code_table(lengths), "chunk_offsets": offsets, "stream": stream, "sign_mant": sm},
        {"chunk_symbols": chunk_symbols},
    )


def _decode_table(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(symbol, code length) per value of the next L stream bits, and L. Unassigned slots (if the
    code is incomplete) decode as length L so a corrupt stream still advances and is caught by the
    chunk-boundary check."""
    _check_kraft(lengths)
    L = int(lengths.max())
    codes = canonical_codes(lengths)
    tab_sym = np.zeros(1 << L, np.uint8)
    tab_len = np.full(1 << L, L, np.uint8)
    for s in np.flatnonzero(lengths):
        lo = int(codes[s]) << (L - int(lengths[s]))
        hi = (int(codes[s]) + 1) << (L - int(lengths[s]))
        tab_sym[lo:hi], tab_len[lo:hi] = s, lengths[s]
    return tab_sym, tab_len, L


class HostOps(Protocol):
    """Native helpers a caller may lend the codec for loading (kernels/cpu.py provides them, built by
    the system compiler; the loader passes that module). Each returns None when it cannot run, and
    numpy's code (the reference) takes over."""

    def huffman_decode(self, stream: np.ndarray, offsets: np.ndarray, chunk_symbols: int, n: int,
                       tab_sym: np.ndarray, tab_len: np.ndarray, bits: int) -> np.ndarray | None: ...

    def histogram_u8(self, data: np.ndarray) -> np.ndarray | None: ...


def _decode_huffman_exp(c: Compressed, ops: HostOps | None = None) -> np.ndarray:
    """The exponent bytes of a Huffman tensor. With `ops` the chunks decode natively over threads
    (kernels/cpu_huffman.cc, ~50x faster); without, numpy decodes all chunks in lock step."""
    lengths, stream = _code_lengths(c.arrays["code_table"]), c.arrays["stream"]
    offsets = c.arrays["chunk_offsets"].astype(np.int64)
    cs, n = c.meta["chunk_symbols"], c.size
    if n == 0:
        return np.zeros(c.shape, np.uint8)
    tab_sym, tab_len8, L = _decode_table(lengths)
    n_chunks = -(-n // cs)
    if offsets.shape != (n_chunks,):
        raise ValueError("corrupt huffman payload: chunk offsets do not match the tensor size/stream")
    out = ops.huffman_decode(stream, offsets, cs, n, tab_sym, tab_len8, L) if ops is not None else None
    if out is not None:
        return out.reshape(c.shape)
    tab_len = tab_len8.astype(np.int64)
    # Big-endian 32-bit window starting at every byte: any L <= 24 bits at any bit offset fit in it.
    b = np.concatenate([stream, np.zeros(4, np.uint8)]).astype(np.uint32)
    window = (b[:-3] << 24) | (b[1:-2] << 16) | (b[2:-1] << 8) | b[3:]
    last = n - (n_chunks - 1) * cs
    limit = len(window) * 8
    if offsets.shape != (n_chunks,) or offsets.min() < 0 or offsets.max() > limit:
        raise ValueError("corrupt huffman payload: chunk offsets do not match the tensor size/stream")
    out = np.zeros((cs, n_chunks), np.uint8)
    pos, rows = offsets.copy(), n_chunks
    for k in range(cs):
        if k == last:  # the final chunk is shorter: drop it from the live rows
            rows -= 1
            if rows == 0:
                break
        p = pos[:rows]
        q = np.minimum(p, limit - 1)  # only a corrupt stream runs past the end
        v = (window[q >> 3] << (q & 7).astype(np.uint32)) >> np.uint32(32 - L)
        out[k, :rows] = tab_sym[v]
        p += tab_len[v]
    # Every chunk must end exactly where the next one starts and the last at the stream's end.
    if not np.array_equal(pos[:-1], offsets[1:]) or -(-int(pos[-1]) // 8) != len(stream):
        raise ValueError("corrupt huffman payload: chunk boundaries do not line up with the bit stream")
    return out.T.reshape(-1)[:n].reshape(c.shape)


# ----------------------------------------------------------------------------- palette12


def pack_nibbles(idx: np.ndarray) -> np.ndarray:
    """4-bit values (..., N) -> bytes (..., ceil(N/2)) in the split-block layout; 0-d -> (1,).

    Along the last axis, each block of NIBBLE_BLOCK (128) elements becomes 64 bytes: element j of the
    block in the low nibble of byte j, element 64 + j in its high nibble. A shorter tail block of r
    elements is split the same way at ceil(r/2). Unlike pairing neighbours (2k, 2k+1), the unpacking
    is two contiguous 64-wide vectors per block, which XLA on CPU decodes several times faster; and
    blocks stay aligned for last-axis sharding at multiples of 128.
    """
    if idx.ndim == 0:
        idx = idx.reshape(1)
    lead, n = idx.shape[:-1], idx.shape[-1]
    main = n - n % NIBBLE_BLOCK
    m = idx[..., :main].reshape(lead + (-1, 2, NIBBLE_BLOCK // 2))
    tail = idx[..., main:]
    half = (tail.shape[-1] + 1) // 2
    hi = np.zeros(lead + (half,), np.uint8)
    hi[..., : tail.shape[-1] - half] = tail[..., half:]
    parts = [(m[..., 0, :] | (m[..., 1, :] << 4)).reshape(lead + (-1,)), tail[..., :half] | (hi << 4)]
    return np.concatenate(parts, axis=-1).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_nibbles` for a tensor of logical ``shape``."""
    if not shape:
        return packed[0] & 0x0F
    lead, n = shape[:-1], shape[-1]
    main = n - n % NIBBLE_BLOCK
    pm = packed[..., : main // 2].reshape(lead + (-1, NIBBLE_BLOCK // 2))
    pt = packed[..., main // 2 :]
    m = np.concatenate([pm & 0x0F, pm >> 4], axis=-1).reshape(lead + (main,))
    t = np.concatenate([pt & 0x0F, pt >> 4], axis=-1)[..., : n - main]
    return np.concatenate([m, t], axis=-1)


def _encode_palette12(exp: np.ndarray, sm: np.ndarray) -> Compressed:
    counts = np.bincount(exp.reshape(-1), minlength=256)
    order = np.argsort(-counts, kind="stable")
    # Ascending order: the palette is then usually a run of consecutive exponents, which lets the
    # JAX decoder add a base instead of doing a table lookup (see palette_is_range).
    palette = np.sort(order[: min(PALETTE_SIZE, int(np.count_nonzero(counts)))]).astype(np.uint8)
    lut = np.full(256, 0xFF, np.uint8)
    lut[palette] = np.arange(palette.size, dtype=np.uint8)
    idx = lut[exp.reshape(-1)].reshape(exp.shape)
    escaped = idx == 0xFF
    esc_flat = np.flatnonzero(escaped)
    esc_val = join_bits(exp.reshape(-1)[esc_flat], sm.reshape(-1)[esc_flat])
    idx[escaped] = 0
    return Compressed(
        "palette12",
        exp.shape,
        {
            "palette": palette,
            "packed_idx": pack_nibbles(idx),
            "sign_mant": sm,
            "escape_idx": esc_flat.astype(_index_dtype(exp.size)),
            "escape_val": esc_val,
        },
    )


def palette_is_range(palette: np.ndarray) -> bool:
    """True if the palette is consecutive exponents base, base+1, ..., so exp = base + index."""
    p = np.asarray(palette).astype(np.int64)
    return bool(p.size) and bool(np.array_equal(p, p[0] + np.arange(p.size)))


def _decode_palette12_exp(c: Compressed) -> np.ndarray:
    a = c.arrays
    table = np.zeros(PALETTE_SIZE, np.uint8)
    table[: a["palette"].size] = a["palette"]
    return table[unpack_nibbles(a["packed_idx"], c.shape)]


# ----------------------------------------------------------------------------- blocked palette12
#
# The runtime layout of a (possibly sharded) layer weight, used by compressed checkpoints. Same 12
# bits per weight as palette12, with three differences that make it shardable and fast to decode:
#
# * blocks: the tensor is cut into a grid of blocks (``blocks[i]`` equal parts along axis i, e.g.
#   the tp shards) and every block is self-contained: its nibbles are packed on their own and its
#   escapes are flat indices *relative to the block*, so a device holding one block (its shard)
#   decodes it with no knowledge of the others. The palette is shared by all blocks of the tensor.
# * "halves" nibble layout (pack_halves): along a block's last axis of n elements, element j sits
#   in the low nibble of byte j and element h + j in its high nibble (h = ceil(n / 2)). Unpacking
#   is one concatenate of the two constant-shift halves (fused and vectorised by XLA into the decode
#   loop), for any block width: a shard need not be a multiple of pack_nibbles' 128-element blocks.
# * the caller may store the tensor with its axes permuted (the loader puts a weight's contraction
#   axes first, so the decoded array is already the (K, N) row-major operand the CPU dot wants and
#   no transposing copy is made); this section only ever sees the stored order.
#
# Global arrays (what gets sharded): ``sign_mant`` has the tensor's shape; ``packed_idx`` has it
# with the last axis replaced by blocks[-1] * ceil(nb / 2) (nb = a block's last extent), i.e. the
# blocks' packed arrays side by side; escapes are (G, E), G = prod(blocks) in row-major block order,
# E the largest block's escape count, padded with index = block size (dropped) and value 0.


def pack_halves(idx: np.ndarray) -> np.ndarray:
    """4-bit values (..., n) -> bytes (..., ceil(n/2)): low nibble idx[..., j], high idx[..., h + j]."""
    n = idx.shape[-1]
    h = (n + 1) // 2
    hi = np.zeros(idx.shape[:-1] + (h,), np.uint8)
    hi[..., : n - h] = idx[..., h:]
    return (idx[..., :h] | (hi << 4)).astype(np.uint8)


def unpack_halves(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_halves` for a last axis of n elements."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)[..., :n]


def _to_blocks(a: np.ndarray, blocks: tuple[int, ...]) -> np.ndarray:
    """(n_0, ..., n_r) -> (G, n_0 / b_0, ..., n_r / b_r), blocks in row-major order."""
    r = a.ndim
    split = a.reshape(sum(((b, n // b) for b, n in zip(blocks, a.shape)), ()))
    order = tuple(range(0, 2 * r, 2)) + tuple(range(1, 2 * r, 2))
    return split.transpose(order).reshape((-1,) + tuple(n // b for b, n in zip(blocks, a.shape)))


def _from_blocks(g: np.ndarray, blocks: tuple[int, ...]) -> np.ndarray:
    """Inverse of _to_blocks for blocks of shape g.shape[1:]."""
    r, bs = len(blocks), g.shape[1:]
    grid = g.reshape(tuple(blocks) + bs)
    order = sum(((i, r + i) for i in range(r)), ())
    return grid.transpose(order).reshape(tuple(b * n for b, n in zip(blocks, bs)))


def check_blocks(shape: tuple[int, ...], blocks: tuple[int, ...]) -> None:
    if len(blocks) != len(shape) or not shape:
        raise ValueError(f"blocks {blocks} must give one count per axis of a tensor of rank >= 1, shape {shape}")
    if any(b < 1 or n % b for b, n in zip(blocks, shape)):
        raise ValueError(f"blocks {blocks} do not divide the tensor shape {shape}")


def palette_for(exp: np.ndarray, ops: HostOps | None = None) -> np.ndarray:
    """The palette12 palette of an exponent array: its <= 16 most common values, ascending."""
    counts = _byte_counts(exp, ops)
    order = np.argsort(-counts, kind="stable")
    return np.sort(order[: max(1, min(PALETTE_SIZE, int(np.count_nonzero(counts))))]).astype(np.uint8)


def _byte_counts(a: np.ndarray, ops: HostOps | None = None) -> np.ndarray:
    """np.bincount of uint8 data, counted natively with `ops` (numpy widens every byte to int64
    first: ~50x slower on a layer's exponents)."""
    counts = ops.histogram_u8(a) if ops is not None else None
    return counts if counts is not None else np.bincount(a.reshape(-1), minlength=256)


def encode_palette12_blocks(exp: np.ndarray, sm: np.ndarray, blocks: tuple[int, ...],
                            ops: HostOps | None = None) -> dict[str, Any]:
    """Blocked palette12 of one tensor from its (exponent, sign+mantissa) split (see above).

    Returns packed_idx, sign_mant, palette (16,) zero-padded, n_palette (its used length) and the
    per-block escape lists escape_idx / escape_val (lists of G 1-d arrays; the caller pads them to
    a common length, typically across the layers of a stack: see jax_decode.stack_palette12_blocks).
    """
    blocks = tuple(blocks)
    check_blocks(exp.shape, blocks)
    palette = palette_for(exp, ops)
    lut = np.full(256, 0xFF, np.uint8)
    lut[palette] = np.arange(palette.size, dtype=np.uint8)
    idx_b = _to_blocks(lut[exp], blocks)
    exp_b, sm_b = _to_blocks(exp, blocks), _to_blocks(sm, blocks)
    esc_idx, esc_val = [], []
    for g in range(idx_b.shape[0]):
        e = np.flatnonzero(idx_b[g].reshape(-1) == 0xFF)
        esc_idx.append(e.astype(np.int64))
        esc_val.append(join_bits(exp_b[g].reshape(-1)[e], sm_b[g].reshape(-1)[e]))
    idx_b[idx_b == 0xFF] = 0
    pal16 = np.zeros(PALETTE_SIZE, np.uint8)
    pal16[: palette.size] = palette
    return dict(
        packed_idx=_from_blocks(pack_halves(idx_b), blocks), sign_mant=np.ascontiguousarray(sm), palette=pal16,
        n_palette=palette.size, escape_idx=esc_idx, escape_val=esc_val,
    )


def decode_palette12_blocks(
    packed_idx: np.ndarray, sign_mant: np.ndarray, palette: np.ndarray, escape_idx: np.ndarray,
    escape_val: np.ndarray, blocks: tuple[int, ...],
) -> np.ndarray:
    """numpy reference decoder of one blocked palette12 tensor -> uint16 bf16 bit patterns.

    escape_idx / escape_val: (G, E) padded arrays (indices >= block size are padding)."""
    shape, blocks = sign_mant.shape, tuple(blocks)
    check_blocks(shape, blocks)
    bshape = tuple(n // b for b, n in zip(blocks, shape))
    table = np.zeros(PALETTE_SIZE, np.uint8)
    table[: palette.size] = palette
    exp_b = table[unpack_halves(_to_blocks(packed_idx, blocks), bshape[-1])]
    bits = join_bits(exp_b, _to_blocks(sign_mant, blocks)).reshape(exp_b.shape[0], -1)
    for g in range(bits.shape[0]):
        keep = escape_idx[g] < bits.shape[1]
        bits[g, escape_idx[g][keep]] = escape_val[g][keep]
    return _from_blocks(bits.reshape(exp_b.shape), blocks)


# ----------------------------------------------------------------------------- public API


def encode(
    array,
    kind: str = "huffman",
    *,
    allow_raw: bool = True,
    chunk_symbols: int = DEFAULT_CHUNK_SYMBOLS,
) -> Compressed:
    """Compress a bf16 tensor (ml_dtypes.bfloat16 or uint16 bits) losslessly.

    Falls back to kind "raw" when the chosen format would not be smaller than bf16, unless
    ``allow_raw`` is False (useful to force a format, e.g. for the runtime path or tests).
    """
    if kind not in ("huffman", "palette12"):
        raise ValueError(f"unknown compression kind {kind!r}; expected 'huffman' or 'palette12'")
    if chunk_symbols < 1:
        raise ValueError(f"chunk_symbols must be positive, got {chunk_symbols}")
    bits = as_bits(array)
    exp, sm = split_bits(bits)
    return _encode_parts(exp, sm, bits, kind, allow_raw, chunk_symbols)


def _encode_parts(exp, sm, bits, kind, allow_raw, chunk_symbols=DEFAULT_CHUNK_SYMBOLS) -> Compressed:
    c = None
    if exp.size:
        c = _encode_huffman(exp, sm, chunk_symbols) if kind == "huffman" else _encode_palette12(exp, sm)
    if c is None or (allow_raw and c.nbytes >= 2 * exp.size):
        return Compressed("raw", exp.shape, {"bits": bits if bits is not None else join_bits(exp, sm)})
    return c


def decode_parts(c: Compressed, ops: HostOps | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(exponent byte, sign+mantissa byte) arrays of the tensor's shape, for any kind (validated).

    The split form is what every format shares, so transcoding between formats (huffman ->
    palette12 blocks at load time) goes through it without joining and re-splitting bf16 bits.
    `ops`: native helpers for the Huffman decode (HostOps)."""
    validate(c)
    if c.kind == "raw":
        return split_bits(np.asarray(c.arrays["bits"]).reshape(c.shape))
    exp, sm = _decode_parts(c, ops)
    if c.kind == "palette12" and c.arrays["escape_idx"].size:
        e = c.arrays["escape_idx"]
        exp = exp.copy()
        esc_exp, _ = split_bits(c.arrays["escape_val"])
        exp.reshape(-1)[e] = esc_exp
    return exp, np.asarray(sm).reshape(c.shape)


def _decode_parts(c: Compressed, ops: HostOps | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(exponent, sign+mantissa) for the split formats; None for raw."""
    if c.kind == "huffman":
        return _decode_huffman_exp(c, ops), c.arrays["sign_mant"]
    if c.kind == "palette12":
        return _decode_palette12_exp(c), c.arrays["sign_mant"]
    return None


def decode(c: Compressed) -> np.ndarray:
    """Bit-exact inverse of :func:`encode`, as an ml_dtypes.bfloat16 array."""
    validate(c)
    parts = _decode_parts(c)
    if parts is None:
        return np.array(c.arrays["bits"]).reshape(c.shape).view(ml_dtypes.bfloat16)
    bits = join_bits(*parts)
    if c.kind == "palette12" and c.arrays["escape_idx"].size:
        bits.reshape(-1)[c.arrays["escape_idx"]] = c.arrays["escape_val"]
    return bits.view(ml_dtypes.bfloat16)


def transcode_to_palette12(c: Compressed, *, allow_raw: bool = True) -> Compressed:
    """Re-encode any Compressed as palette12, reusing its exponent/sign-mantissa split."""
    validate(c)
    if c.kind == "palette12":
        return c
    parts = _decode_parts(c)
    if parts is None:
        bits = c.arrays["bits"].reshape(c.shape)
        exp, sm = split_bits(bits)
        return _encode_parts(exp, sm, bits, "palette12", allow_raw)
    return _encode_parts(*parts, None, "palette12", allow_raw)


# ----------------------------------------------------------------------------- validation

_U1, _U2, _U4, _U8 = (np.dtype(t) for t in (np.uint8, np.uint16, np.uint32, np.uint64))
_SCHEMA = {  # kind -> {array name: allowed dtypes}
    "huffman": {"code_table": (_U1,), "chunk_offsets": (_U4, _U8), "stream": (_U1,), "sign_mant": (_U1,)},
    "palette12": {"palette": (_U1,), "packed_idx": (_U1,), "sign_mant": (_U1,),
                  "escape_idx": (_U4, _U8), "escape_val": (_U2,)},
    "raw": {"bits": (_U2,)},
}


def validate(c: Compressed) -> None:
    """Raise ValueError if ``c`` is structurally inconsistent (wrong arrays, dtypes or shapes)."""
    if c.kind not in _SCHEMA:
        raise ValueError(f"unknown compression kind {c.kind!r}; expected one of {KINDS}")
    schema = _SCHEMA[c.kind]
    if set(c.arrays) != set(schema):
        raise ValueError(f"{c.kind} payload must hold arrays {sorted(schema)}, got {sorted(c.arrays)}")
    for name, dtypes in schema.items():
        if c.arrays[name].dtype not in dtypes:
            raise ValueError(f"{c.kind} array {name!r} has dtype {c.arrays[name].dtype}, "
                             f"expected one of {[str(d) for d in dtypes]}")
    a, n = c.arrays, c.size
    expect: dict[str, tuple[int, ...]] = {}
    if c.kind == "raw":
        expect["bits"] = c.shape
    else:
        expect["sign_mant"] = c.shape
    if c.kind == "huffman":
        cs = c.meta.get("chunk_symbols", 0)
        if cs < 1:
            raise ValueError("huffman payload lacks a positive chunk_symbols parameter")
        if a["code_table"].ndim != 2 or a["code_table"].shape[1] != 2 or len(a["code_table"]) > 256:
            raise ValueError(f"huffman code_table must be (k <= 256, 2), got {a['code_table'].shape}")
        expect["chunk_offsets"] = (-(-n // cs),)
    if c.kind == "palette12":
        packed = (1,) if not c.shape else c.shape[:-1] + ((c.shape[-1] + 1) // 2,)
        expect["packed_idx"] = packed
        if a["palette"].ndim != 1 or a["palette"].size > PALETTE_SIZE:
            raise ValueError(f"palette must be 1-d with at most {PALETTE_SIZE} entries, got {a['palette'].shape}")
        if a["escape_idx"].shape != a["escape_val"].shape or a["escape_idx"].ndim != 1:
            raise ValueError("escape_idx and escape_val must be 1-d arrays of equal length")
        e = a["escape_idx"]
        if e.size and (int(e[-1]) >= n or np.any(e[1:] <= e[:-1])):
            raise ValueError("escape indices must be strictly increasing and within the tensor size")
    for name, shape in expect.items():
        if tuple(a[name].shape) != tuple(shape):
            raise ValueError(f"{c.kind} array {name!r} has shape {a[name].shape}, expected {tuple(shape)}")


# ----------------------------------------------------------------------------- serialization

_MAGIC = b"IJXC"
_VERSION = 1
_ALIGN = 8


def to_bytes(c: Compressed) -> bytes:
    """Self-describing blob: magic, version, JSON header, 8-byte aligned arrays, CRC32 trailer.

    Layout: b"IJXC" | u16 version | u32 header length | header JSON | padding | arrays | u32 crc32
    of everything before it. All integers and arrays are little-endian.
    """
    validate(c)
    entries, blobs, offset = [], [], 0
    for name, arr in c.arrays.items():
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()  # C order
        pad = -offset % _ALIGN
        blobs.append(b"\0" * pad + data)
        offset += pad
        entries.append([name, arr.dtype.newbyteorder("<").str, list(arr.shape), offset, len(data)])
        offset += len(data)
    header = json.dumps(
        {"kind": c.kind, "shape": list(c.shape), "meta": c.meta, "arrays": entries}, separators=(",", ":")
    ).encode()
    prefix = _MAGIC + struct.pack("<HI", _VERSION, len(header)) + header
    prefix += b"\0" * (-len(prefix) % _ALIGN)
    body = prefix + b"".join(blobs)
    return body + struct.pack("<I", zlib.crc32(body))


def from_bytes(b: bytes) -> Compressed:
    """Parse :func:`to_bytes` output; ValueError on bad magic/version, CRC mismatch or bad layout."""
    mv = memoryview(b)
    if len(mv) < 14 or bytes(mv[:4]) != _MAGIC:
        raise ValueError("not a compressed tensor: missing b'IJXC' magic")
    (stored_crc,) = struct.unpack("<I", mv[-4:])
    crc = zlib.crc32(mv[:-4])
    if crc != stored_crc:
        raise ValueError(f"compressed tensor is corrupt: CRC32 mismatch (stored {stored_crc:#010x}, computed {crc:#010x})")
    version, hlen = struct.unpack("<HI", mv[4:10])
    if version != _VERSION:
        raise ValueError(f"unsupported compressed tensor version {version} (this reader knows {_VERSION})")
    try:
        header = json.loads(bytes(mv[10 : 10 + hlen]))
        kind, shape, meta = header["kind"], tuple(int(d) for d in header["shape"]), header["meta"]
        base = 10 + hlen + (-(10 + hlen) % _ALIGN)
        arrays = {}
        for name, dtype, ashape, off, nb in header["arrays"]:
            dt = np.dtype(dtype)
            count = int(np.prod(ashape, dtype=np.int64))
            if off < 0 or base + off + nb > len(mv) - 4 or count * dt.itemsize != nb:
                raise ValueError(f"array {name!r} does not fit the payload")
            arrays[name] = np.frombuffer(mv, dt, count, base + off).reshape(ashape)
    except (KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed compressed tensor header: {e!r}") from e
    c = Compressed(kind, shape, arrays, {str(k): int(v) for k, v in meta.items()})
    validate(c)
    return c
