"""Kernel dispatch: the one place that decides how an op runs in the program being traced.

Backends:
  "xla"  XLA's own code, on every platform (the formulation the caller passes as `xla`).
  "cpu"  infire_jax's XLA:CPU FFI kernels (kernels/cpu.py): one CPU device, float32 compute.
A Layout's `kernels` setting asks ("auto" or "xla"); `backend()` resolves it for the program being
traced (sharding.use_layout). Each op takes its operands and `xla`, a zero-argument function giving the
XLA formulation, which runs wherever the chosen backend has no kernel for these operands (rows, dtype,
window). Model code calls these ops and never checks a kernel's fit itself; a new backend (Pallas on a
GPU) is a new branch here, not a change in model code.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from infire_jax.compression.weights import EncodedWeight, RowEncodedWeight
from infire_jax.kernels import cpu
from infire_jax.sharding import current_layout

__all__ = ["backend", "projection", "embed_rows", "paged_attention", "causal_prefill_attention"]

XlaFn = Callable[[], jax.Array]


def backend() -> str:
    """The backend of the program being traced: "cpu" where its layout allows the CPU kernels
    (Layout.cpu_kernels: asked for, one CPU device) and they could be built, else "xla"."""
    layout = current_layout()
    if layout is not None and layout.cpu_kernels and cpu.available():
        return "cpu"
    return "xla"


def _cpu_projection_operands(x2: jax.Array, w: Any, contracted: int) -> Callable[[], jax.Array] | None:
    """The CPU kernel call for x2 (M, K) @ W.T, or None where it does not pay or does not apply: float32
    x, at most MATMUL_MAX_ROWS rows for float32 weights and MATMUL_MAX_ROWS_BF16 for bf16 and palette12
    (XLA's path widens or decodes a float32 copy first, so the kernel pays for more rows); other encoded
    forms (INT4 experts) have no row form."""
    rows = x2.shape[0]
    if x2.dtype != jnp.float32 or rows == 0:
        return None
    if isinstance(w, RowEncodedWeight):
        operands = w.as_rows(contracted)
        if operands is None or rows > cpu.MATMUL_MAX_ROWS_BF16:
            return None
        return lambda: cpu.matmul_nt_palette12(x2, *operands)
    if isinstance(w, EncodedWeight) or w.dtype not in (jnp.float32, jnp.bfloat16):
        return None
    limit = cpu.MATMUL_MAX_ROWS_BF16 if w.dtype == jnp.bfloat16 else cpu.MATMUL_MAX_ROWS
    if rows > limit:
        return None
    return lambda: cpu.matmul_nt(x2, w.reshape(-1, x2.shape[1]))


def projection(x: jax.Array, w: Any, contracted: int, *, xla: XlaFn) -> jax.Array:
    """x (..., K) @ W.T with W the stored weight w (N..., K...) over its last `contracted` axes, as
    (..., N...). The CPU kernel reads w as stored (bf16 widened, palette12 decoded in registers)."""
    if backend() == "cpu":
        k = int(np.prod(x.shape[x.ndim - contracted :]))
        x2 = x.reshape(-1, k)
        kernel = _cpu_projection_operands(x2, w, contracted)
        if kernel is not None:
            return kernel().reshape(x.shape[: x.ndim - contracted] + tuple(w.shape[: len(w.shape) - contracted]))
    return xla()


def embed_rows(table: Any, tokens: jax.Array, dtype: Any, *, xla: XlaFn) -> jax.Array:
    """Rows `tokens` of an embedding table in dtype. XLA:CPU gathers a bf16 table through a table-sized
    float32 copy per dispatch; the CPU kernel widens only the rows."""
    plain = not isinstance(table, EncodedWeight)
    if backend() == "cpu" and plain and table.dtype == jnp.bfloat16 and dtype == jnp.float32:
        return cpu.embed_rows_bf16(table, tokens)
    return xla()


def paged_attention(
    q: jax.Array,  # (B, T, H, hd), rotated and scaled
    k_new: jax.Array,  # (B, T, KV, hd)
    v_new: jax.Array,
    k_cache: Any,  # kv.paged.PagedLayerCache
    v_cache: Any,
    start: jax.Array,  # (B,) cached positions each row sees
    window: int | None,
    *,
    xla: XlaFn,
) -> jax.Array:
    """Attention (B, T, H, hd) of new tokens over a paged cache plus themselves (causally): decode
    (T = 1) and a chunk of a prompt after a cached prefix. The CPU kernels read the pages in place for
    float32 tokens with no window; XLA gathers them first."""
    b, t, h, hd = q.shape
    kv = k_new.shape[2]
    f32 = q.dtype == k_cache.pages.dtype == jnp.float32
    if backend() == "cpu" and f32 and window is None:
        kernel = cpu.paged_decode_attention if t == 1 else cpu.paged_prefill_attention
        qg = q.reshape((b, kv, h // kv, hd) if t == 1 else (b, t, kv, h // kv, hd))
        out = kernel(qg, k_new, v_new, k_cache.pages, v_cache.pages, k_cache.table, start, k_cache.layer)
        return out.reshape(b, t, h, hd)
    return xla()


def causal_prefill_attention(
    q: jax.Array,  # (B, T, KV, G, hd), rotated and scaled
    k: jax.Array,  # (B, T, KV, hd)
    v: jax.Array,
    window: int | None,
    *,
    xla: XlaFn,
) -> jax.Array:
    """Causal attention (B, T, KV, G, hd) of a prompt over itself (no cache). The CPU kernel takes
    float32 prompts of two or more tokens with no window."""
    f32 = q.dtype == k.dtype == v.dtype == jnp.float32
    if backend() == "cpu" and f32 and q.shape[1] > 1 and window is None:
        return cpu.causal_prefill_attention(q, k, v)
    return xla()
