"""Hand-written decode kernels for XLA:CPU (FFI targets), built on first use.

- `matmul_nt` (cpu_matmul.cc): x @ w.T for a few float32 rows and a float32 or bfloat16 weight;
  `matmul_nt_palette12` the same for a palette12-compressed weight, decoded on the fly (12 bits
  read per weight, bit for bit the bf16 result) instead of to a float32 copy per step.
  Decode multiplies a handful of rows by every weight; at 4-16 rows XLA:CPU's dots with the
  (out, in) weights the models store run at 20-65 GFLOP/s on this project's 2-core machines, and
  the kernel runs 30 decoder layers' projections 2.6x (4 rows) and 1.6x (16 rows) faster, at least
  level with XLA at one row. At 64 rows XLA's dots are level, so callers use it for at most
  MATMUL_MAX_ROWS rows. A bfloat16 weight is widened in the kernel (exact): half the bytes to read,
  where XLA materialises a float32 copy first (so the kernel pays up to MATMUL_MAX_ROWS_BF16 rows).
- `embed_rows_bf16` (cpu_embed.cc): rows of a bf16 embedding table as float32. XLA:CPU gathers
  bf16 through a table-sized copy, hoisted out of the decode loop (56-113 MB per dispatch).
- `paged_decode_attention` (cpu_attention.cc): one new token per row attending over its pages of a
  paged KV pool in place, instead of gathering them into a contiguous cache first.
- `causal_prefill_attention` (cpu_prefill_attention.cc): a prompt attending causally over itself
  (prefill with no cache) with an online softmax over register tiles, instead of XLA's many small
  blocked dots and softmax fusions. `paged_prefill_attention`: the same for a chunk of new tokens
  after a cached prefix read from its pages in place (prefix reuse, chunked prefill), instead of
  gathering the pages and materialising every score.
- `huffman_decode` (cpu_huffman.cc): not an XLA op but a host function for loading compressed
  checkpoints: the Huffman exponent stream decoded chunk by chunk over threads (compression/codec.py).
(Figures: WORKSPACE_NOTES.md, issue 9.)

The library is compiled once per machine with the system C++ compiler (-O3, tuned for the host
CPU) into the user cache directory. Without a compiler the build error is reported once as a
warning and callers keep XLA (`available()` is False).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from infire_jax.machine import cpu_signature  # what -march=native depends on: one library per CPU

__all__ = [
    "MATMUL_MAX_ROWS", "MATMUL_MAX_ROWS_BF16", "available", "registered", "embed_rows_bf16", "ensure_built", "library_path", "matmul_nt",
    "matmul_nt_palette12", "paged_decode_attention", "causal_prefill_attention", "paged_prefill_attention",
    "huffman_decode", "histogram_u8",
]

MATMUL_MAX_ROWS = 32  # float32 weights, measured: 1.42x at 32 rows, 1.00x at 64 (30-layer projection chain)
MATMUL_MAX_ROWS_BF16 = 64  # bf16 weights (XLA widens a copy first): 1.92x at 32 rows, 1.65x at 64, 0.98x at 128
_TARGETS = {
    "infire_matmul_nt": "InfireMatmulNT",
    "infire_matmul_nt_bf16": "InfireMatmulNTBF16",
    "infire_matmul_nt_palette12": "InfireMatmulNTPalette12",
    "infire_paged_decode_attention": "InfirePagedDecodeAttention",
    "infire_causal_prefill_attention": "InfireCausalPrefillAttention",
    "infire_paged_prefill_attention": "InfirePagedPrefillAttention",
    "infire_embed_rows_bf16": "InfireEmbedRowsBF16",
}
_HERE = pathlib.Path(__file__).parent
_SOURCES = (_HERE / "cpu_matmul.cc", _HERE / "cpu_attention.cc", _HERE / "cpu_prefill_attention.cc", _HERE / "cpu_embed.cc",
            _HERE / "cpu_huffman.cc")
_HEADERS = (_HERE / "cpu_common.h",)
_FLAGS = ("-O3", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-Wno-attributes", "-Wno-return-type")
_NATIVE = ("-march=native",)


def _compiler() -> str | None:
    return next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


def _cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "infire_jax" / "kernels"


def library_path(compiler: str) -> pathlib.Path:
    """Where the library for this source, jaxlib, compiler and CPU lives."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join([*(f.read_text() for f in _SOURCES + _HEADERS), jax.__version__, version, " ".join(_FLAGS + _NATIVE), cpu_signature()]).encode()
    ).hexdigest()[:16]
    return _cache_dir() / f"cpu_kernels-{key}.so"


def _build(compiler: str, out: pathlib.Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    base = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES), "-o", tmp]
    try:
        result = subprocess.run(base[:1] + list(_NATIVE) + base[1:], capture_output=True, text=True)
        if result.returncode:  # a compiler without -march=native: portable code, still vectorised
            result = subprocess.run(base, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(result.stderr.strip()[-2000:])
        os.replace(tmp, out)  # atomic: concurrent builders never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure_built() -> pathlib.Path:
    """The kernel library for this machine, compiled first if it is not in the cache yet."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++, g++ or clang++) on PATH")
    path = library_path(compiler)
    if not path.is_file():
        _build(compiler, path)
    return path


_registered = False


def registered() -> bool:
    """Whether this process has registered the kernels (programs it compiled may call them)."""
    return _registered


def _library() -> ctypes.CDLL:
    return ctypes.cdll.LoadLibrary(str(ensure_built()))


@functools.cache
def available() -> bool:
    """Build (once per machine), load and register the kernels; False (with one warning) if they cannot be."""
    global _registered
    try:
        lib = _library()
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        _registered = True
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: keep XLA's dot, and say why once
        warnings.warn(
            f"infire_jax: the CPU decode kernels are unavailable ({e}); decode uses XLA's own code "
            "(install a C++ compiler to get them, or pass kernels='xla' to silence this)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False


@functools.cache
def _host_functions() -> tuple[Any, Any] | None:
    """The library's host helpers (Huffman decode, byte histogram), or None (one warning) if the
    library cannot be built."""
    try:
        lib = _library()
    except Exception as e:  # noqa: BLE001 - any failure means: numpy's code, and say why once
        warnings.warn(f"infire_jax: compressed checkpoints decode with numpy, ~50x slower ({e})", RuntimeWarning,
                      stacklevel=3)
        return None
    p = ctypes.c_void_p
    decode, histogram = lib.infire_huffman_decode, lib.infire_histogram_u8
    decode.argtypes = [p, ctypes.c_int64, p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, p, p, ctypes.c_int,
                       p, ctypes.c_int]
    decode.restype = ctypes.c_int
    histogram.argtypes = [p, ctypes.c_int64, p]
    histogram.restype = None
    return decode, histogram


def histogram_u8(data: np.ndarray) -> np.ndarray | None:
    """np.bincount(data.ravel(), minlength=256) for uint8 data without widening it first, or None if
    the library is unavailable."""
    fns = _host_functions()
    if fns is None:
        return None
    data = np.ascontiguousarray(data, np.uint8)
    counts = np.zeros(256, np.int64)
    fns[1](data.ctypes.data, data.size, counts.ctypes.data)
    return counts


def huffman_decode(
    stream: np.ndarray, offsets: np.ndarray, chunk_symbols: int, n: int, tab_sym: np.ndarray, tab_len: np.ndarray,
    bits: int, threads: int | None = None,
) -> np.ndarray | None:
    """The n symbols of a chunked Huffman stream (codec's format: uint8 stream, int64 chunk bit
    offsets, the 2**bits-entry (symbol, length) lookup table), or None if the library is unavailable
    (callers use numpy's decoder). ValueError if the chunks do not line up (a corrupt stream). Runs
    without the GIL over `threads` threads (default: the CPUs this process may use)."""
    fns = _host_functions()
    if fns is None:
        return None
    stream = np.ascontiguousarray(stream, np.uint8)
    offsets = np.ascontiguousarray(offsets, np.int64)
    tab_sym, tab_len = np.ascontiguousarray(tab_sym, np.uint8), np.ascontiguousarray(tab_len, np.uint8)
    if tab_sym.size != 1 << bits or tab_len.size != 1 << bits:
        raise ValueError(f"huffman tables must have 2**{bits} entries, got {tab_sym.size} and {tab_len.size}")
    out = np.empty(n, np.uint8)
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    rc = fns[0](stream.ctypes.data, stream.size, offsets.ctypes.data, offsets.size, chunk_symbols, n, tab_sym.ctypes.data,
            tab_len.ctypes.data, bits, out.ctypes.data, threads)
    if rc == 2:
        raise ValueError("corrupt huffman payload: chunk offsets do not match the tensor size/stream")
    if rc:
        raise ValueError("corrupt huffman payload: chunk boundaries do not line up with the bit stream")
    return out


def matmul_nt(x: jax.Array, w: jax.Array) -> jax.Array:
    """float32 x (M, K) @ w (N, K).T as float32 (M, N), w float32 or bfloat16, on the CPU backend;
    call `available()` first."""
    shapes_ok = x.ndim == 2 and w.ndim == 2 and x.shape[1] == w.shape[1]
    if not shapes_ok or x.dtype != jnp.float32 or w.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(
            f"matmul_nt takes float32 x (M, K) and a float32 or bfloat16 w (N, K); got {x.dtype}{x.shape} and {w.dtype}{w.shape}"
        )
    target = "infire_matmul_nt" if w.dtype == jnp.float32 else "infire_matmul_nt_bf16"
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(x, w)


def matmul_nt_palette12(
    x: jax.Array,  # float32 (M, K)
    packed_idx: jax.Array,  # uint8 (N, K / S * ceil(S / 2)): palette indices, "halves" nibbles per segment
    sign_mant: jax.Array,  # uint8 (N, K)
    palette: jax.Array,  # uint8 (16,): exponents
    escape_idx: jax.Array,  # int32 (E,): sorted flat indices into (N, K); >= N * K is padding
    escape_val: jax.Array,  # uint16 (E,): their bf16 patterns
    segment: int,  # S: the weight's last axis, along which the nibbles are packed
) -> jax.Array:
    """float32 x (M, K) @ w.T for a blocked-palette12 weight w (N, K) (compression/codec.py), decoded
    in registers: the same float32 (M, N) as `matmul_nt` on w's bf16 patterns, bit for bit. Call
    `available()` first. Unsorted or negative escape indices fail the program with an error."""
    m, k = x.shape if x.ndim == 2 else (None, None)
    n = sign_mant.shape[0] if sign_mant.ndim == 2 else None
    expected = [
        (x, jnp.float32, (m, k)), (packed_idx, jnp.uint8, (n, k // segment * ((segment + 1) // 2) if k and segment > 0 else None)),
        (sign_mant, jnp.uint8, (n, k)), (palette, jnp.uint8, (16,)), (escape_idx, jnp.int32, escape_val.shape),
        (escape_val, jnp.uint16, escape_idx.shape),
    ]
    if m is None or n is None or segment < 1 or k % segment or escape_idx.ndim != 1 or any(a.dtype != d or a.shape != s for a, d, s in expected):
        got = ", ".join(f"{a.dtype}{a.shape}" for a, _, _ in expected)
        raise ValueError(
            "matmul_nt_palette12 takes float32 x (M, K), uint8 packed_idx (N, K / S * ceil(S / 2)), uint8 sign_mant (N, K), "
            f"uint8 palette (16,), int32 escape_idx (E,), uint16 escape_val (E,) with S = segment dividing K; got {got}, segment {segment}"
        )
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    call = jax.ffi.ffi_call("infire_matmul_nt_palette12", out, vmap_method="sequential")
    return call(x, packed_idx, sign_mant, palette, escape_idx, escape_val, segment=np.int64(segment))


def embed_rows_bf16(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """float32 rows tokens.shape + (D,) of a bfloat16 table (V, D); call `available()` first. A
    token id outside the table fails the program with an error."""
    if table.ndim != 2 or table.dtype != jnp.bfloat16:
        raise ValueError(f"embed_rows_bf16 takes a bfloat16 table (V, D); got {table.dtype}{table.shape}")
    out = jax.ShapeDtypeStruct((tokens.size, table.shape[1]), jnp.float32)
    rows = jax.ffi.ffi_call("infire_embed_rows_bf16", out, vmap_method="sequential")(table, tokens.reshape(-1).astype(jnp.int32))
    return rows.reshape(tokens.shape + (table.shape[1],))


def paged_decode_attention(
    q: jax.Array,  # (B, KV, G, hd): one new token per row, rotated and scaled
    k_new: jax.Array,  # (B, KV, hd): the new token's key and value (not in the pool yet)
    v_new: jax.Array,
    k_pages: jax.Array,  # (L, pages, KV, page, hd): the pool of every layer
    v_pages: jax.Array,
    table: jax.Array,  # (B, P) int32: row b's position p sits in page table[b, p // page]
    start: jax.Array,  # (B,) int32: cached positions row b sees (< start[b])
    layer: int,
) -> jax.Array:
    """Attention output (B, KV, G, hd) of each row's new token over its cached positions and itself,
    read from layer `layer` of the pool in place; call `available()` first. A table entry out of
    range for a visible position fails the program with an error (it would read another row's KV)."""
    b, kv, g, hd = q.shape
    if k_pages.ndim != 5 or k_pages.shape[2:] != v_pages.shape[2:] or (k_pages.shape[2], k_pages.shape[4]) != (kv, hd):
        raise ValueError(f"pages {k_pages.shape} do not match q {q.shape}: expected (layers, pages, {kv}, page, {hd})")
    if not 0 <= layer < k_pages.shape[0]:
        raise ValueError(f"layer {layer} is outside the pool's {k_pages.shape[0]} layers")
    arrays = (q, k_new.reshape(b, kv, hd), v_new.reshape(b, kv, hd), k_pages, v_pages)
    if any(a.dtype != jnp.float32 for a in arrays):
        raise ValueError("paged_decode_attention takes float32 q, k, v and pages")
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    call = jax.ffi.ffi_call("infire_paged_decode_attention", out, vmap_method="sequential")
    return call(*arrays, table.astype(jnp.int32), start.astype(jnp.int32), layer=np.int64(layer))


def causal_prefill_attention(
    q: jax.Array,  # (B, T, KV, G, hd): the prompt's queries, rotated and scaled
    k: jax.Array,  # (B, T, KV, hd)
    v: jax.Array,  # (B, T, KV, hd)
) -> jax.Array:
    """Causal attention (B, T, KV, G, hd) of every prompt position over the positions up to its own
    (no cache, no window), float32; call `available()` first."""
    if q.ndim != 5 or k.shape != v.shape or k.shape != q.shape[:3] + q.shape[4:]:
        raise ValueError(f"causal_prefill_attention takes q (B, T, KV, G, hd) and k, v (B, T, KV, hd); got {q.shape}, {k.shape}, {v.shape}")
    if any(a.dtype != jnp.float32 for a in (q, k, v)):
        raise ValueError(f"causal_prefill_attention takes float32 q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}")
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call("infire_causal_prefill_attention", out, vmap_method="sequential")(q, k, v)


def paged_prefill_attention(
    q: jax.Array,  # (B, T, KV, G, hd): a chunk of new tokens per row, rotated and scaled
    k_new: jax.Array,  # (B, T, KV, hd): the chunk's keys and values (not in the pool yet)
    v_new: jax.Array,
    k_pages: jax.Array,  # (L, pages, KV, page, hd): the pool of every layer
    v_pages: jax.Array,
    table: jax.Array,  # (B, P) int32: row b's position p sits in page table[b, p // page]
    start: jax.Array,  # (B,) int32: cached positions before the chunk (its first position)
    layer: int,
) -> jax.Array:
    """Attention (B, T, KV, G, hd) of each row's new token t over the row's cached positions < start[b]
    (read from layer `layer` of the pool in place) and the new tokens up to t; call `available()`
    first. A table entry out of range for a cached position fails the program with an error."""
    b, t, kv, g, hd = q.shape if q.ndim == 5 else (None,) * 5
    if q.ndim != 5 or k_new.shape != (b, t, kv, hd) or v_new.shape != k_new.shape:
        raise ValueError(f"paged_prefill_attention takes q (B, T, KV, G, hd) and k_new, v_new (B, T, KV, hd); got {q.shape}, {k_new.shape}, {v_new.shape}")
    if k_pages.ndim != 5 or k_pages.shape != v_pages.shape or (k_pages.shape[2], k_pages.shape[4]) != (kv, hd):
        raise ValueError(f"pages {k_pages.shape} do not match q {q.shape}: expected (layers, pages, {kv}, page, {hd})")
    if not 0 <= layer < k_pages.shape[0]:
        raise ValueError(f"layer {layer} is outside the pool's {k_pages.shape[0]} layers")
    if any(a.dtype != jnp.float32 for a in (q, k_new, v_new, k_pages, v_pages)):
        raise ValueError("paged_prefill_attention takes float32 q, k, v and pages")
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    call = jax.ffi.ffi_call("infire_paged_prefill_attention", out, vmap_method="sequential")
    return call(q, k_new, v_new, k_pages, v_pages, table.astype(jnp.int32), start.astype(jnp.int32), layer=np.int64(layer))
