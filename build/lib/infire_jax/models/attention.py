"""Grouped-query attention of new tokens over an optional KV cache plus themselves.

One function serves prefill (no cache), decode (one new token over the cache) and chunked prefill
(several new tokens over a cache): the new tokens sit at positions start[b] + t, cache entries at
positions < start[b] are visible, and the new tokens see each other causally. The new keys/values are
returned for the caller to store, so the cache is written once per step (in place) after all layers.

`grouped_attention` serves models whose layers keep different caches (kv/cache.py CacheGroups): each
layer attends over its own group's cache, a windowed group's being a ring of W slots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from infire_jax.kernels import dispatch
from infire_jax.kv.paged import PagedLayerCache, PagedPool

__all__ = ["gqa_attention", "grouped_attention"]

_NEG = -1e30
QUERY_BLOCK = 128  # prompt queries per causal block when there is no cache (see gqa_attention)


def _causal_blocks(q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array, window: int | None) -> jax.Array:
    """Causal attention of a prompt over itself (no cache), QUERY_BLOCK queries at a time.

    Block i attends to the keys before it (all visible: no mask) and to its own diagonal block
    (a static triangle), so the upper triangle is neither computed nor masked. Heads are moved ahead
    of time once (q to (B, KV, T, G, hd), k and v to (B, KV, T, hd)) so that every dot is a batched
    matmul over leading (B, KV) with a block's T*G query rows: XLA:CPU then runs the dots without
    transposing each block's operands, and normalises the (rows, hd) output instead of the scores.
    q (B, T, KV, G, hd), k / v (B, T, KV, hd), pos (B, T) positions (used only by a window)."""
    b, t, kv, g, hd = q.shape
    qm, km, vm = q.transpose(0, 2, 1, 3, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = lambda a, keys: jax.lax.dot_general(a, keys, (((3,), (3,)), ((0, 1), (0, 1))))  # noqa: E731
    mix = lambda p, vals: jax.lax.dot_general(p, vals, (((3,), (2,)), ((0, 1), (0, 1))))  # noqa: E731
    outs = []
    for i in range(0, t, QUERY_BLOCK):
        n = min(QUERY_BLOCK, t - i)
        qb = qm[:, :, i : i + n].reshape(b, kv, n * g, hd)  # rows (query, group)
        diag = jnp.repeat(jnp.arange(n)[:, None] >= jnp.arange(n)[None, :], g, axis=0)  # static triangle
        if window is not None:  # keys in the query's own window only
            row_window = jnp.repeat(pos[:, i : i + n] // window, g, axis=1)[:, None, :, None]
            diag = diag & (row_window == pos[:, None, None, i : i + n] // window)
        parts = [(scores(qb, km[:, :, i : i + n]), vm[:, :, i : i + n], diag)]
        if i:
            prev = None if window is None else row_window == pos[:, None, None, :i] // window
            parts.append((scores(qb, km[:, :, :i]), vm[:, :, :i], prev))
        parts = [(s if m is None else jnp.where(m, s, _NEG), vals) for s, vals, m in parts]
        top = functools.reduce(jnp.maximum, [s.max(-1, keepdims=True) for s, _ in parts])
        probs = [(jnp.exp(s - top), vals) for s, vals in parts]
        total = sum(p.sum(-1, keepdims=True) for p, _ in probs)
        out = sum(mix(p, vals) for p, vals in probs) / total
        outs.append(out.reshape(b, kv, n, g, hd))
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3, 4)


def gqa_attention(
    q: jax.Array,  # (B, T, H, hd), already rotated and scaled
    k_new: jax.Array,  # (B, T, KV, hd)
    v_new: jax.Array,  # (B, T, KV, hd)
    start: jax.Array,  # (B,) number of valid cache entries = position of the first new token
    k_cache: jax.Array | PagedLayerCache | None = None,  # (B, KV, S, hd)
    v_cache: jax.Array | PagedLayerCache | None = None,
    *,
    window: int | None = None,  # chunked-local attention: only keys in the same window of positions
) -> jax.Array:
    """Attention output (B, T, H, hd); the kernel dispatch picks how each case runs."""
    b, t, h, hd = q.shape
    kv = k_new.shape[2]
    if isinstance(k_cache, PagedLayerCache):
        pages = k_cache, v_cache
        return dispatch.paged_attention(
            q, k_new, v_new, k_cache, v_cache, start, window,
            xla=lambda: gqa_attention(q, k_new, v_new, start, pages[0].gather(), pages[1].gather(), window=window),
        )
    # No constraint here: the split of q's heads carries over to (kv, group) by itself, also when
    # kv_heads < tp (each device then attends with its own q heads against replicated K/V).
    qg = q.reshape(b, t, kv, h // kv, hd)
    if k_cache is None:
        return dispatch.causal_prefill_attention(
            qg, k_new, v_new, start, window, xla=lambda: _prompt_attention(qg, k_new, v_new, start, window)
        ).reshape(b, t, h, hd)
    return _attention(qg, k_new, v_new, start, k_cache, v_cache, window).reshape(b, t, h, hd)


def _prompt_attention(qg, k_new, v_new, start, window):
    """XLA's causal attention of a prompt over itself: blocked for long prompts, else one softmax."""
    t = qg.shape[1]
    if t >= 2 * QUERY_BLOCK:
        return _causal_blocks(qg, k_new, v_new, start[:, None] + jnp.arange(t)[None, :], window)
    return _attention(qg, k_new, v_new, start, None, None, window)


def _attention(qg, k_new, v_new, start, k_cache, v_cache, window):
    """XLA's attention (B, T, KV, G, hd) of new tokens over an optional contiguous cache plus themselves."""
    t = qg.shape[1]
    pos_new = start[:, None] + jnp.arange(t)[None, :]  # (B, T)
    s_new = jnp.einsum("btkgd,bskd->bkgts", qg, k_new)
    mask_new = jnp.arange(t)[None, :, None] >= jnp.arange(t)[None, None, :]  # (1, T, T) causal
    if window is not None:
        mask_new = mask_new & (pos_new[:, :, None] // window == pos_new[:, None, :] // window)
    s_new = jnp.where(mask_new[:, None, None], s_new, _NEG)
    scores = [s_new]
    if k_cache is not None:
        s_cache = jnp.einsum("btkgd,bksd->bkgts", qg, k_cache)
        pos_cache = jnp.arange(k_cache.shape[2])
        mask = pos_cache[None, None, :] < start[:, None, None]  # (B, 1, S)
        if window is not None:
            mask = mask & (pos_cache[None, None, :] // window == pos_new[:, :, None] // window)
        s_cache = jnp.where(mask[:, None, None], s_cache, _NEG)
        scores.insert(0, s_cache)
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    if k_cache is not None:
        s = k_cache.shape[2]
        out = jnp.einsum("bkgts,bksd->btkgd", probs[..., :s], v_cache)
        out = out + jnp.einsum("bkgts,bskd->btkgd", probs[..., s:], v_new)
    else:
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v_new)
    return out


def grouped_attention(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    start: jax.Array,
    k_caches: tuple[jax.Array | PagedPool, ...],  # per cache group: (layers of the group, B, KV, S_g, hd) or its pool
    v_caches: tuple[jax.Array | PagedPool, ...],
    group: jax.Array,  # this layer's cache group
    index: jax.Array,  # this layer's entry in its group's caches
    windows: tuple[int | None, ...],  # per group: None (every position) or W (a ring of W slots)
) -> jax.Array:
    """gqa_attention over the cache of the layer's own group. A windowed group's cache is a ring with
    position p at slot p mod W; its layers attend only within their window, so with start' = start mod W
    the ring reads as an ordinary cache whose first start' slots are the current window's positions
    (later slots hold the previous window and are masked, as are cached slots for new tokens that
    cross into the next window). One lax.switch branch per group: the caches differ in length. A
    group's PagedPool is read in place: the layer's entry is its page view."""

    def entry(cache: jax.Array | PagedPool, index: jax.Array) -> jax.Array | PagedLayerCache:
        if isinstance(cache, PagedPool):
            return cache.layer(index)
        return jax.lax.dynamic_index_in_dim(cache, index, 0, keepdims=False)

    def branch(g: int):
        def attend(q, k_new, v_new, start, index):
            kc, vc = entry(k_caches[g], index), entry(v_caches[g], index)
            w = windows[g]
            return gqa_attention(q, k_new, v_new, start if w is None else start % w, kc, vc, window=w)

        return attend

    if len(windows) == 1:
        return branch(0)(q, k_new, v_new, start, index)
    return jax.lax.switch(group, [branch(g) for g in range(len(windows))], q, k_new, v_new, start, index)
