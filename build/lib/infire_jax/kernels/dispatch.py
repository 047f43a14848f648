"""Kernel dispatch: the one place that decides how an op runs in the program being traced.

Backends:
  "xla"     XLA's own code, on every platform (the formulation the caller passes as `xla`).
  "cpu"     infire_jax's XLA:CPU FFI kernels (kernels/cpu.py): one CPU device, float32 compute.
  "pallas"  infire_jax's Pallas attention kernels (kernels/pallas_attention.py), Triton-lowered on GPUs;
            "pallas_interpret" runs the very same kernels through Pallas' interpreter on any platform.
A Layout's `kernels` setting asks ("auto", "xla", "pallas", "pallas_interpret"); `backend()` resolves
it for the program being traced (sharding.use_layout): "auto" is "pallas" on GPUs, "cpu" on one CPU
device where the CPU kernels build, else "xla". Each op takes its operands and `xla`, a zero-argument
function giving the XLA formulation, which runs wherever the chosen backend has no kernel for these
operands (rows, dtype, window). Model code calls these ops and never checks a kernel's fit itself.

What the Pallas backend covers (any dtype of float32/bf16/fp16 with power-of-two head dims and page
size; under tp/dp each device runs the kernel on its own heads and rows inside shard_map):
  paged_attention          our kernel, reading the page pool (layers, pages, KV, page, hd) in place
                           through the page table with a traced or static layer index: GQA, per-row
                           lengths, windows (Llama 4's ring pages are a window over the ring), and T > 1
                           new tokens, which is prefill over a cached prefix. JAX's shipped
                           pallas.ops.gpu.paged_attention is not used: it wants (KV, pages, page, hd)
                           pages of one layer (a transposed copy of our pool per layer and step), and
                           has no new-token merge, windows or multi-part keys.
  paged_latent_attention   the same kernel with a two-part key (latent, rope key) whose values are the
                           latent: DeepSeek MLA's absorbed decode.
  causal_prefill_attention our flash kernel: GQA without repeating K/V, windows (Llama 4's chunked
                           layers, traced per layer). JAX's shipped attention.mha needs equal q/kv
                           heads and has no window.
  Left to XLA: MLA's expanded prefill (per-head keys of nope + rope dims with a shared rope key),
  non-power-of-two head dims, mixed dtypes, projections and embedding rows (XLA's GPU dots).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from infire_jax.compression.weights import EncodedWeight, RowEncodedWeight
from infire_jax.kernels import cpu
from infire_jax.sharding import current_layout

__all__ = [
    "backend", "pages_in_place", "projection", "embed_rows", "paged_attention", "paged_latent_attention",
    "causal_prefill_attention",
]

XlaFn = Callable[[], jax.Array]
PALLAS = ("pallas", "pallas_interpret")


def _pallas():
    """The Pallas kernels' module, imported when a program first uses them (Pallas' own import costs
    ~0.3 s that CPU-only users need not pay)."""
    from infire_jax.kernels import pallas_attention

    return pallas_attention


def backend() -> str:
    """The backend of the program being traced: what its layout asks for, and for "auto" "pallas" on
    a GPU, "cpu" where the layout allows the CPU kernels (Layout.cpu_kernels: one CPU device) and they
    could be built (never tried elsewhere), else "xla"."""
    layout = current_layout()
    if layout is None:
        return "xla"
    if layout.kernels != "auto":
        return layout.kernels
    if layout.platform == "gpu":
        return "pallas"
    if layout.cpu_kernels and cpu.available():
        return "cpu"
    return "xla"


def pages_in_place() -> bool:
    """Whether every layer of a decode step reads its pages in place, so a stack of scanned layers
    takes the page pools themselves (kv.paged.PagedPool) rather than one gathered copy of all layers.
    The CPU kernel takes a static layer only (unrolled layers: a PagedLayerCache each)."""
    return backend() in PALLAS


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
    (T = 1) and a chunk of a prompt after a cached prefix (T > 1). The CPU kernels read the pages in
    place for float32 tokens with no window and a static layer, the Pallas kernel for any T and window;
    XLA gathers them first."""
    b, t, h, hd = q.shape
    kv = k_new.shape[2]
    kind = backend()
    f32 = q.dtype == k_cache.pages.dtype == jnp.float32
    if kind == "cpu" and f32 and window is None and isinstance(k_cache.layer, int):
        kernel = cpu.paged_decode_attention if t == 1 else cpu.paged_prefill_attention
        qg = q.reshape((b, kv, h // kv, hd) if t == 1 else (b, t, kv, h // kv, hd))
        out = kernel(qg, k_new, v_new, k_cache.pages, v_cache.pages, k_cache.table, start, k_cache.layer)
        return out.reshape(b, t, h, hd)
    if kind in PALLAS and _pallas().fits_paged(q, (k_cache.pages,), v_cache.pages):
        out = _pallas().paged_gqa(
            q.reshape(b, t, kv, h // kv, hd), k_new, v_new, k_cache.pages, v_cache.pages, k_cache.table, start,
            k_cache.layer, window, current_layout(), interpret=kind == "pallas_interpret",
        )
        return out.reshape(b, t, h, hd)
    return xla()


def paged_latent_attention(
    q_lat: jax.Array,  # (B, T, H, r): queries absorbed into latent space
    q_rope: jax.Array,  # (B, T, H, rope), rotated
    c_new: jax.Array,  # (B, T, r) normed latents of the new tokens
    kr_new: jax.Array,  # (B, T, rope) their rotated rope keys
    c_cache: Any,  # kv.paged.PagedLayerCache of the latents (L, pages, 1, page, r)
    kr_cache: Any,  # kv.paged.PagedLayerCache of the rope keys (L, pages, 1, page, rope)
    start: jax.Array,  # (B,)
    scale: float,
    *,
    xla: XlaFn,
) -> jax.Array:
    """MLA's absorbed attention output in latent space (B, T, H, r) of new tokens over a paged latent
    cache plus themselves. The Pallas kernel reads the pages in place; XLA gathers them first."""
    kind = backend()
    if kind in PALLAS and _pallas().fits_paged(q_lat, (c_cache.pages, kr_cache.pages), None) and q_rope.dtype == q_lat.dtype:
        return _pallas().paged_latent(
            q_lat, q_rope, c_new, kr_new, c_cache.pages, kr_cache.pages, c_cache.table, start, c_cache.layer, scale,
            current_layout(), interpret=kind == "pallas_interpret",
        )
    return xla()


def causal_prefill_attention(
    q: jax.Array,  # (B, T, KV, G, hd), rotated and scaled
    k: jax.Array,  # (B, T, KV, hd)
    v: jax.Array,
    start: jax.Array,  # (B,) position of each row's first token (a window counts positions)
    window: int | jax.Array | None,
    *,
    xla: XlaFn,
) -> jax.Array:
    """Causal attention (B, T, KV, G, hd) of a prompt over itself (no cache). The CPU kernel takes
    float32 prompts of two or more tokens with no window; the Pallas kernel any window."""
    kind = backend()
    f32 = q.dtype == k.dtype == v.dtype == jnp.float32
    if kind == "cpu" and f32 and q.shape[1] > 1 and window is None:
        return cpu.causal_prefill_attention(q, k, v)
    if kind in PALLAS and _pallas().fits_prefill(q, k, v):
        return _pallas().causal_prefill(q, k, v, start, window, current_layout(), interpret=kind == "pallas_interpret")
    return xla()
