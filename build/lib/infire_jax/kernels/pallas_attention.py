"""Pallas attention kernels for GPUs (Pallas' Triton lowering), also runnable by Pallas' interpreter.

Two kernels, written with `pl.pallas_call` grids and BlockSpecs only (no platform-specific calls), so
the program a GPU compiles is the program `interpret=True` runs on any platform:

- `paged_attention`: query rows attending over each row's cached positions read in place from a page
  pool of every layer, (L, pages, KV, page, d), through its page table — no gathered copy of the
  cache. The key may come in parts from several pools (MLA: latent and rope key) and the values from
  one more pool or from the first key part (MLA: the latent is both). Each program covers one
  (row, KV head, block of query rows, key split) and returns its unnormalised output with the softmax
  max and sum, so the splits and the new tokens (not in the pool yet) merge afterwards (in XLA: the
  new tokens' part is T x T, small next to the cache).
- `causal_attention`: flash attention of a prompt over itself (GQA, causal, optional window of
  positions), one program per (row, KV head, query block).

Shapes are padded to what the Triton lowering needs (power-of-two arrays, dots of at least 16 rows);
dots too small for the tensor cores are written as broadcast products. Kernel parameters (keys per
step, key splits, query blocks, warps) come from one table, KERNEL_PARAMS.

The wrappers `paged_gqa`, `paged_latent` and `causal_prefill` take the model's layouts and, on a mesh of
several devices, run the kernel inside `shard_map` (a pallas_call has no partitioning rule): each device
attends with its own rows and heads where the layout splits batch or heads, with replicated operands
where it does not. `fits_*` say which operands they take; the kernel dispatch (dispatch.py) keeps XLA's
code for the rest.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from infire_jax.sharding import Layout

__all__ = [
    "KERNEL_PARAMS", "PagedParams", "PrefillParams", "paged_params", "prefill_params", "paged_attention",
    "causal_attention", "paged_gqa", "paged_latent", "causal_prefill", "fits_paged", "fits_prefill",
]

_NEG = -1e30  # finite: a fully masked block never computes inf - inf
NO_WINDOW = 1 << 30  # the window of unwindowed attention: one no position reaches
_MIN_DOT = 16  # smallest dot dimension the Triton lowering takes (tl.dot)
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class PagedParams:
    keys_per_step: int  # keys (pages x page size) per inner step
    splits: int  # key ranges run as separate programs and merged afterwards (parallelism for long rows)
    rows: int = 64  # query rows per program at most (MLA's many heads share one latent KV head)
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class PrefillParams:
    rows: int  # query rows (positions x query heads of one KV head) per program
    block_k: int  # keys per inner step
    num_warps: int = 4
    num_stages: int = 2


# The one table of kernel parameters: per kernel, (bound, parameters) rows; the first row whose bound
# is at least the shape's size wins (None: any size). paged: the keys of a row's page-table width, for
# keys of at most 256 values (GQA heads); paged_wide: the same for wider keys (MLA's latent 512 + rope
# 64: smaller steps keep a step's keys in shared memory); prefill: the prompt length. Starting points
# after the published Triton flash/paged kernels, not measured here (no GPU): retune them from
# experiments/gpu_check.py's figures.
KERNEL_PARAMS: dict[str, tuple[tuple[int | None, Any], ...]] = {
    "paged": (
        (256, PagedParams(keys_per_step=32, splits=1)),
        (2048, PagedParams(keys_per_step=64, splits=2)),
        (16384, PagedParams(keys_per_step=64, splits=8)),
        (None, PagedParams(keys_per_step=128, splits=16, num_warps=8)),
    ),
    "paged_wide": (
        (2048, PagedParams(keys_per_step=32, splits=2, rows=64, num_warps=8, num_stages=1)),
        (None, PagedParams(keys_per_step=32, splits=8, rows=64, num_warps=8, num_stages=1)),
    ),
    "prefill": (
        (64, PrefillParams(rows=32, block_k=32)),
        (None, PrefillParams(rows=64, block_k=64)),
    ),
}


def _row(kernel: str, size: int) -> Any:
    return next(p for bound, p in KERNEL_PARAMS[kernel] if bound is None or size <= bound)


def paged_params(keys: int, width: int) -> PagedParams:
    """Parameters of paged_attention for page tables of `keys` positions per row and keys of `width`
    values (the key parts' head dims together)."""
    return _row("paged" if width <= 256 else "paged_wide", keys)


def prefill_params(t: int) -> PrefillParams:
    """Parameters of causal_attention for prompts of t positions."""
    return _row("prefill", t)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a (M, d) . b (N, d)^T in float32; a broadcast product where tl.dot would be too small."""
    if min(a.shape[0], b.shape[0], a.shape[1]) >= _MIN_DOT:
        return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return jnp.sum(a[:, None, :].astype(jnp.float32) * b[None, :, :].astype(jnp.float32), axis=-1)


def _dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a (M, K) @ b (K, N) in float32; a broadcast product where tl.dot would be too small."""
    if min(a.shape[0], a.shape[1], b.shape[1]) >= _MIN_DOT:
        return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return jnp.sum(a[:, :, None].astype(jnp.float32) * b[None, :, :].astype(jnp.float32), axis=1)


# ---- paged attention --------------------------------------------------------------------------


def _paged_kernel(layer_ref, table_ref, hi_ref, lo_ref, *refs, parts, values_from_key, page, pages_per_step,
                  pages_per_split, num_pages):
    q_refs, pool_refs, rest = refs[:parts], refs[parts : 2 * parts], refs[2 * parts :]
    v_ref, (o_ref, m_ref, l_ref) = (None, rest) if values_from_key else (rest[0], rest[1:])
    split = pl.program_id(3)
    hi, lo, layer = hi_ref[...], lo_ref[...], layer_ref[0]
    qs = [r[...] for r in q_refs]
    rows, keys = qs[0].shape[0], pages_per_step * page
    # This split's pages that some query row sees, in whole steps (the table is padded to whole splits).
    first = jnp.maximum(split * pages_per_split, jnp.min(lo) // page) // pages_per_step * pages_per_step
    last = jnp.minimum((split + 1) * pages_per_split, pl.cdiv(hi, page))

    def step(i, carry):
        o, m, l = carry
        p0 = first + i * pages_per_step
        ids = layer * num_pages + jnp.clip(table_ref[pl.ds(p0, pages_per_step)], 0, num_pages - 1)
        ks = [r[ids].reshape(keys, r.shape[-1]) for r in pool_refs]
        s = functools.reduce(jnp.add, [_dot_nt(q, k) for q, k in zip(qs, ks)])  # (rows, keys)
        pos = p0 * page + jax.lax.broadcasted_iota(jnp.int32, (rows, keys), 1)
        visible = (pos >= lo[:, None]) & (pos < hi)
        m_next = jnp.maximum(m, jnp.max(jnp.where(visible, s, _NEG), axis=1))
        p = jnp.where(visible, jnp.exp(s - m_next[:, None]), 0.0)
        scale = jnp.exp(m - m_next)
        v = ks[0] if values_from_key else v_ref[ids].reshape(keys, v_ref.shape[-1])
        return o * scale[:, None] + _dot_nn(p.astype(v.dtype), v), m_next, l * scale + jnp.sum(p, axis=1)

    dv = pool_refs[0].shape[-1] if values_from_key else v_ref.shape[-1]
    init = (jnp.zeros((rows, dv), jnp.float32), jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32))
    o, m, l = jax.lax.fori_loop(0, pl.cdiv(jnp.maximum(last - first, 0), pages_per_step), step, init)
    o_ref[...], m_ref[...], l_ref[...] = o, m, l


def paged_attention(
    q_parts: tuple[jax.Array, ...],  # each (B, KV, R, d_i): R query rows per KV head, scaled
    pools: tuple[jax.Array, ...],  # each (L, pages, KV, page, d_i): the key's parts
    values: jax.Array | None,  # (L, pages, KV, page, dv), or None: the values are the first key part
    layer: jax.Array,  # () int32: the layer of the pools to read
    table: jax.Array,  # (B, P) int32: row b's position p sits in page table[b, p // page]
    hi: jax.Array,  # (B,) int32: row b's visible cached positions end here (exclusive)
    lo: jax.Array,  # (B, R) int32: and start here, per query row (a window's start, else 0)
    *,
    interpret: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per key split s: the unnormalised output (S, B, KV, R, dv) of each query row over its cached
    positions lo <= p < hi, its running max (S, B, KV, R) and softmax sum (S, B, KV, R), in float32.
    R must be a power of two >= 16 and every d a power of two (see `fits_paged`). One program per
    (row, KV head, block of query rows, key split)."""
    b, kv, all_rows, _ = q_parts[0].shape
    layers, num_pages, _, page, _ = pools[0].shape
    params = paged_params(table.shape[1] * page, sum(q.shape[-1] for q in q_parts))
    rows = min(all_rows, params.rows)
    pages_per_step = max(1, params.keys_per_step // page)
    per_split = pl.cdiv(pl.cdiv(table.shape[1], params.splits), pages_per_step) * pages_per_step
    splits = pl.cdiv(table.shape[1], per_split)
    table = jnp.pad(table.astype(jnp.int32), ((0, 0), (0, splits * per_split - table.shape[1])))
    flat = lambda a: a.reshape((layers * num_pages,) + a.shape[2:])  # noqa: E731  (free: leading dims merge)
    pool_spec = lambda a: pl.BlockSpec((layers * num_pages, None) + a.shape[3:], lambda i, h, r, s: (0, h, 0, 0))  # noqa: E731
    arrays = tuple(pools) + (() if values is None else (values,))
    dv = arrays[-1].shape[-1] if values is not None else pools[0].shape[-1]
    kernel = functools.partial(
        _paged_kernel, parts=len(q_parts), values_from_key=values is None, page=page, pages_per_step=pages_per_step,
        pages_per_split=per_split, num_pages=num_pages,
    )
    stats = lambda: pl.BlockSpec((None, None, None, rows), lambda i, h, r, s: (s, i, h, r))  # noqa: E731
    return pl.pallas_call(
        kernel,
        grid=(b, kv, all_rows // rows, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h, r, s: (0,)),
            pl.BlockSpec((None, table.shape[1]), lambda i, h, r, s: (i, 0)),
            pl.BlockSpec((None,), lambda i, h, r, s: (i,)),
            pl.BlockSpec((None, rows), lambda i, h, r, s: (i, r)),
            *[pl.BlockSpec((None, None, rows, q.shape[-1]), lambda i, h, r, s: (i, h, r, 0)) for q in q_parts],
            *[pool_spec(a) for a in arrays],
        ],
        out_specs=[pl.BlockSpec((None, None, None, rows, dv), lambda i, h, r, s: (s, i, h, r, 0)), stats(), stats()],
        out_shape=[
            jax.ShapeDtypeStruct((splits, b, kv, all_rows, dv), jnp.float32),
            jax.ShapeDtypeStruct((splits, b, kv, all_rows), jnp.float32),
            jax.ShapeDtypeStruct((splits, b, kv, all_rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=params.num_warps, num_stages=params.num_stages),
        interpret=interpret,
        name="infire_paged_attention",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), table, hi.astype(jnp.int32), lo.astype(jnp.int32),
      *q_parts, *map(flat, arrays))


# ---- causal prefill attention -----------------------------------------------------------------


def _causal_kernel(start_ref, window_ref, q_ref, k_ref, v_ref, o_ref, *, block_k):
    block_q, groups, hd = q_ref.shape
    rows = block_q * groups
    qi = pl.program_id(2)
    start, window = start_ref[...], window_ref[0]
    q = q_ref[...].reshape(rows, hd)
    q_pos = qi * block_q + jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 0) // groups
    q_win = (start + q_pos) // window
    lo = jnp.maximum(((start + qi * block_q) // window) * window - start, 0)  # the first query's window

    def step(j, carry):
        o, m, l = carry
        k = k_ref[pl.ds(j * block_k, block_k), :]
        s = _dot_nt(q, k)
        k_pos = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
        visible = (k_pos <= q_pos) & ((start + k_pos) // window == q_win)
        m_next = jnp.maximum(m, jnp.max(jnp.where(visible, s, _NEG), axis=1))
        p = jnp.where(visible, jnp.exp(s - m_next[:, None]), 0.0)
        scale = jnp.exp(m - m_next)
        v = v_ref[pl.ds(j * block_k, block_k), :]
        return o * scale[:, None] + _dot_nn(p.astype(v.dtype), v), m_next, l * scale + jnp.sum(p, axis=1)

    init = (jnp.zeros((rows, hd), jnp.float32), jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32))
    o, _, l = jax.lax.fori_loop(lo // block_k, pl.cdiv((qi + 1) * block_q, block_k), step, init)
    o_ref[...] = (o / l[:, None]).reshape(block_q, groups, hd).astype(o_ref.dtype)


def causal_attention(
    q: jax.Array,  # (B, T, KV, G, hd), scaled; G a power of two
    k: jax.Array,  # (B, T, KV, hd)
    v: jax.Array,
    start: jax.Array,  # (B,) position of the first token (windows are counted in positions)
    window: jax.Array,  # () int32: keys in the query's own window of positions (NO_WINDOW: all)
    *,
    interpret: bool,
) -> jax.Array:
    """Causal attention (B, T, KV, G, hd) of a prompt over itself; T a multiple of the table's blocks."""
    b, t, kv, g, hd = q.shape
    params = prefill_params(t)
    block_q = min(t, max(1, params.rows // g))
    block_k = min(t, params.block_k)
    kernel = functools.partial(_causal_kernel, block_k=block_k)
    return pl.pallas_call(
        kernel,
        grid=(b, kv, t // block_q),
        in_specs=[
            pl.BlockSpec((None,), lambda i, h, j: (i,)),
            pl.BlockSpec((1,), lambda i, h, j: (0,)),
            pl.BlockSpec((None, block_q, None, g, hd), lambda i, h, j: (i, j, h, 0, 0)),
            pl.BlockSpec((None, t, None, hd), lambda i, h, j: (i, 0, h, 0)),
            pl.BlockSpec((None, t, None, hd), lambda i, h, j: (i, 0, h, 0)),
        ],
        out_specs=pl.BlockSpec((None, block_q, None, g, hd), lambda i, h, j: (i, j, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=params.num_warps, num_stages=params.num_stages),
        interpret=interpret,
        name="infire_causal_attention",
    )(start.astype(jnp.int32), jnp.reshape(window, (1,)).astype(jnp.int32), q, k, v)


# ---- the model-facing wrappers ----------------------------------------------------------------


def fits_paged(q: jax.Array, pools: tuple[jax.Array, ...], values: jax.Array | None) -> bool:
    """Whether paged_attention takes these operands: one float dtype throughout, power-of-two head dims
    and page size (the Triton lowering's array sizes)."""
    arrays = (q, *pools) + (() if values is None else (values,))
    dims = [a.shape[-1] for a in arrays] + [pools[0].shape[3]]
    return q.dtype in _DTYPES and all(a.dtype == q.dtype for a in arrays) and all(map(_pow2, dims))


def fits_prefill(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether causal_prefill takes these operands: one float dtype, a power-of-two head dim."""
    return q.dtype in _DTYPES and q.dtype == k.dtype == v.dtype and _pow2(q.shape[-1])


def _merge(o, m, l, o_new, m_new, l_new) -> jax.Array:
    """The normalised output of softmax parts: the key splits (leading axis) and the new tokens."""
    top = jnp.maximum(jnp.max(m, axis=0), m_new)
    w, w_new = jnp.exp(m - top), jnp.exp(m_new - top)
    num = jnp.sum(o * w[..., None], axis=0) + o_new * w_new[..., None]
    return num / (jnp.sum(l * w, axis=0) + l_new * w_new)[..., None]


def _new_part(scores: jax.Array, step: jax.Array, same_window: jax.Array | None, values: Callable[[jax.Array], jax.Array]):
    """Softmax part (o, m, l) of the new tokens among themselves: scores (..., R, T) of query rows for
    new token `step` (R,), causal, and where given only between rows and keys in the same window."""
    visible = jnp.arange(scores.shape[-1]) <= step[:, None]
    if same_window is not None:
        visible = visible & same_window
    m = jnp.max(jnp.where(visible, scores, _NEG), axis=-1)
    p = jnp.where(visible, jnp.exp(scores - m[..., None]), 0.0)
    return values(p), m, jnp.sum(p, axis=-1)


def _rows_padded(x: jax.Array, axis: int) -> jax.Array:
    """x with its query-row axis padded to a power of two of at least 16 rows (tl.dot's minimum)."""
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, max(_MIN_DOT, _next_pow2(n)) - n)
    return jnp.pad(x, pad)


def _window_array(window: int | jax.Array | None) -> jax.Array:
    return jnp.asarray(NO_WINDOW if window is None else window, jnp.int32)


def _paged_gqa_local(q, k_new, v_new, k_pages, v_pages, table, start, layer, window, *, interpret):
    b, t, kv, g, hd = q.shape
    rows = t * g
    qr = _rows_padded(q.transpose(0, 2, 1, 3, 4).reshape(b, kv, rows, hd), 2)
    step = jnp.arange(qr.shape[2]) // g  # each row's new token
    q_win = (start[:, None] + step[None, :]) // window  # (B, R)
    lo = jnp.minimum(q_win * window, start[:, None])
    o, m, l = paged_attention((qr,), (k_pages,), v_pages, layer, table, start, lo, interpret=interpret)
    scores = jnp.einsum("bkrd,btkd->bkrt", qr, k_new, preferred_element_type=jnp.float32)
    k_win = (start[:, None] + jnp.arange(t)[None, :]) // window  # (B, T)
    o_new, m_new, l_new = _new_part(
        scores, step, q_win[:, None, :, None] == k_win[:, None, None, :],
        lambda p: jnp.einsum("bkrt,btkd->bkrd", p.astype(v_new.dtype), v_new, preferred_element_type=jnp.float32),
    )
    out = _merge(o, m, l, o_new, m_new, l_new)[:, :, :rows]
    return out.reshape(b, kv, t, g, hd).transpose(0, 2, 1, 3, 4).astype(q.dtype)


def _paged_latent_local(q_lat, q_rope, c_new, kr_new, c_pages, kr_pages, table, start, layer, *, scale, interpret):
    b, t, h, r = q_lat.shape
    rows = t * h
    ql = _rows_padded((q_lat * scale).reshape(b, 1, rows, r), 2)
    qr = _rows_padded((q_rope * scale).reshape(b, 1, rows, q_rope.shape[-1]), 2)
    lo = jnp.zeros((b, ql.shape[2]), jnp.int32)
    o, m, l = paged_attention((ql, qr), (c_pages, kr_pages), None, layer, table, start, lo, interpret=interpret)
    scores = jnp.einsum("bkrd,btd->bkrt", ql, c_new, preferred_element_type=jnp.float32)
    scores = scores + jnp.einsum("bkrd,btd->bkrt", qr, kr_new, preferred_element_type=jnp.float32)
    step = jnp.arange(ql.shape[2]) // h
    o_new, m_new, l_new = _new_part(
        scores, step, None,
        lambda p: jnp.einsum("bkrt,btd->bkrd", p.astype(c_new.dtype), c_new, preferred_element_type=jnp.float32),
    )
    out = _merge(o, m, l, o_new, m_new, l_new)[:, 0, :rows]
    return out.reshape(b, t, h, r).astype(q_lat.dtype)


def _causal_local(q, k, v, start, window, *, interpret):
    b, t, kv, g, hd = q.shape
    tp, gp = _next_pow2(t), _next_pow2(g)  # padded keys come after every real query: never visible
    if (tp, gp) != (t, g):
        q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, gp - g), (0, 0)))
        k, v = (jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0))) for x in (k, v))
    return causal_attention(q, k, v, start, window, interpret=interpret)[:, :t, :, :g]


def _mesh_split(layout: Layout | None, logical: str, size: int) -> Any:
    """The mesh axes a logical axis of this size is split over in `layout` (None: not split), leaving
    out axes the program being traced already runs manually (the pipeline's pp)."""
    if layout is None:
        return None
    manual = set(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))
    spec = layout.spec((logical,), (size,))
    axes = spec[0] if len(spec) else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in manual)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _on_devices(layout: Layout | None, fn: Callable, args: tuple, in_specs: tuple, out_spec: P) -> jax.Array:
    """fn on each device's block of args (shard_map over the mesh axes the program does not run manually
    yet): a pallas_call has no partitioning rule, so each device attends with its own rows and heads
    where the specs split them, and with replicated operands where they do not. One device: fn(*args)."""
    context = jax.sharding.get_abstract_mesh()
    mesh = layout.mesh if layout is not None and context.empty else context
    manual = set(getattr(context, "manual_axes", ()))
    axes = {a for a, n in mesh.shape.items() if n > 1 and a not in manual} if layout is not None else set()
    if not axes:
        return fn(*args)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec, axis_names=axes, check_vma=False)(*args)


def paged_gqa(
    q: jax.Array,  # (B, T, KV, G, hd): the new tokens' queries, rotated and scaled
    k_new: jax.Array,  # (B, T, KV, hd): their keys and values (not in the pool yet)
    v_new: jax.Array,
    k_pages: jax.Array,  # (L, pages, KV, page, hd): the pool of every layer
    v_pages: jax.Array,
    table: jax.Array,  # (B, P)
    start: jax.Array,  # (B,) cached positions each row sees
    layer: int | jax.Array,
    window: int | jax.Array | None,
    layout: Layout | None,
    *,
    interpret: bool,
) -> jax.Array:
    """GQA attention (B, T, KV, G, hd) of T new tokens per row over its pages read in place and over
    themselves (causal): decode (T = 1) and prefill over a cached prefix (T > 1). With a window, the
    new token at position start + t sees the cached positions of its own window only."""
    b, _, kv, g, _ = q.shape
    rows, kv_axes = _mesh_split(layout, "batch", b), _mesh_split(layout, "kv_heads", kv)
    g_axes = None if kv_axes else _mesh_split(layout, "heads", g)
    fn = functools.partial(_paged_gqa_local, interpret=interpret)
    args = (q, k_new, v_new, k_pages, v_pages, table, start, jnp.asarray(layer, jnp.int32), _window_array(window))
    specs = (
        P(rows, None, kv_axes, g_axes), P(rows, None, kv_axes), P(rows, None, kv_axes), P(None, None, kv_axes),
        P(None, None, kv_axes), P(rows), P(rows), P(), P(),
    )
    return _on_devices(layout, fn, args, specs, specs[0])


def paged_latent(
    q_lat: jax.Array,  # (B, T, H, r): queries absorbed into latent space
    q_rope: jax.Array,  # (B, T, H, rope), rotated
    c_new: jax.Array,  # (B, T, r): the new tokens' latents and rope keys (not in the pool yet)
    kr_new: jax.Array,  # (B, T, rope)
    c_pages: jax.Array,  # (L, pages, 1, page, r)
    kr_pages: jax.Array,  # (L, pages, 1, page, rope)
    table: jax.Array,
    start: jax.Array,
    layer: int | jax.Array,
    scale: float,
    layout: Layout | None,
    *,
    interpret: bool,
) -> jax.Array:
    """MLA's absorbed attention in latent space, (B, T, H, r): scores scale * (q_lat . c + q_rope . k_r)
    over each row's cached latents read in place and the new tokens (causal); values the latents."""
    b, _, h, _ = q_lat.shape
    rows, heads = _mesh_split(layout, "batch", b), _mesh_split(layout, "heads", h)
    fn = functools.partial(_paged_latent_local, scale=scale, interpret=interpret)
    args = (q_lat, q_rope, c_new, kr_new, c_pages, kr_pages, table, start, jnp.asarray(layer, jnp.int32))
    specs = (P(rows, None, heads), P(rows, None, heads), P(rows), P(rows), P(), P(), P(rows), P(rows), P())
    return _on_devices(layout, fn, args, specs, specs[0])


def causal_prefill(
    q: jax.Array,  # (B, T, KV, G, hd), rotated and scaled
    k: jax.Array,  # (B, T, KV, hd)
    v: jax.Array,
    start: jax.Array,  # (B,)
    window: int | jax.Array | None,
    layout: Layout | None,
    *,
    interpret: bool,
) -> jax.Array:
    """Causal attention (B, T, KV, G, hd) of a prompt over itself (flash), optionally within windows."""
    b, _, kv, g, _ = q.shape
    rows, kv_axes = _mesh_split(layout, "batch", b), _mesh_split(layout, "kv_heads", kv)
    g_axes = None if kv_axes else _mesh_split(layout, "heads", g)
    fn = functools.partial(_causal_local, interpret=interpret)
    specs = (P(rows, None, kv_axes, g_axes), P(rows, None, kv_axes), P(rows, None, kv_axes), P(rows), P())
    return _on_devices(layout, fn, (q, k, v, start, _window_array(window)), specs, specs[0])
