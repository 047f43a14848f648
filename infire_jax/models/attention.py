"""Grouped-query attention of new tokens over an optional KV cache plus themselves.

One function serves prefill (no cache), decode (one new token over the cache) and chunked prefill
(several new tokens over a cache): the new tokens sit at positions start[b] + t, cache entries at
positions < start[b] are visible, and the new tokens see each other causally. The new keys/values are
returned for the caller to store, so the cache is written once per step (in place) after all layers.

`grouped_attention` serves models whose layers keep different caches (kv/cache.py CacheGroups): each
layer attends over its own group's cache, a windowed group's being a ring of W slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["gqa_attention", "grouped_attention"]

_NEG = -1e30
QUERY_BLOCK = 128  # prompt queries per causal block when there is no cache (see gqa_attention)


def _attend_causal(qg: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, window) -> jax.Array:
    """Queries qg (B, Tq, KV, G, hd) at positions q_pos (B, Tq) over keys/values (B, Tk, KV, hd) at
    k_pos (B, Tk): causal by position, and within the same window when window is set."""
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k)
    mask = q_pos[:, :, None] >= k_pos[:, None, :]
    if window is not None:
        mask = mask & (q_pos[:, :, None] // window == k_pos[:, None, :] // window)
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], s, _NEG), axis=-1)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v)


def gqa_attention(
    q: jax.Array,  # (B, T, H, hd), already rotated and scaled
    k_new: jax.Array,  # (B, T, KV, hd)
    v_new: jax.Array,  # (B, T, KV, hd)
    start: jax.Array,  # (B,) number of valid cache entries = position of the first new token
    k_cache: jax.Array | None = None,  # (B, KV, S, hd)
    v_cache: jax.Array | None = None,
    *,
    window: int | None = None,  # chunked-local attention: only keys in the same window of positions
) -> jax.Array:
    b, t, h, hd = q.shape
    kv = k_new.shape[2]
    # No constraint here: the split of q's heads carries over to (kv, group) by itself, also when
    # kv_heads < tp (each device then attends with its own q heads against replicated K/V).
    qg = q.reshape(b, t, kv, h // kv, hd)
    pos_new = start[:, None] + jnp.arange(t)[None, :]  # (B, T)
    if k_cache is None and t >= 2 * QUERY_BLOCK:
        # A long prompt without a cache: blocks of queries, each against the keys up to its own
        # end, so most of the upper triangle of the T x T scores is neither computed nor masked
        # (3/8 of the attention work at 4 blocks).
        blocks = [
            _attend_causal(qg[:, i : i + QUERY_BLOCK], k_new[:, : i + QUERY_BLOCK], v_new[:, : i + QUERY_BLOCK],
                           pos_new[:, i : i + QUERY_BLOCK], pos_new[:, : i + QUERY_BLOCK], window)
            for i in range(0, t, QUERY_BLOCK)
        ]
        return jnp.concatenate(blocks, axis=1).reshape(b, t, h, hd)

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
    return out.reshape(b, t, h, hd)


def grouped_attention(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    start: jax.Array,
    k_caches: tuple[jax.Array, ...],  # per cache group: (layers of the group, B, KV, S_g, hd)
    v_caches: tuple[jax.Array, ...],
    group: jax.Array,  # this layer's cache group
    index: jax.Array,  # this layer's entry in its group's caches
    windows: tuple[int | None, ...],  # per group: None (every position) or W (a ring of W slots)
) -> jax.Array:
    """gqa_attention over the cache of the layer's own group. A windowed group's cache is a ring with
    position p at slot p mod W; its layers attend only within their window, so with start' = start mod W
    the ring reads as an ordinary cache whose first start' slots are the current window's positions
    (later slots hold the previous window and are masked, as are cached slots for new tokens that
    cross into the next window). One lax.switch branch per group: the caches differ in length."""

    def branch(g: int):
        def attend(q, k_new, v_new, start, index):
            kc = jax.lax.dynamic_index_in_dim(k_caches[g], index, 0, keepdims=False)
            vc = jax.lax.dynamic_index_in_dim(v_caches[g], index, 0, keepdims=False)
            w = windows[g]
            return gqa_attention(q, k_new, v_new, start if w is None else start % w, kc, vc, window=w)

        return attend

    if len(windows) == 1:
        return branch(0)(q, k_new, v_new, start, index)
    return jax.lax.switch(group, [branch(g) for g in range(len(windows))], q, k_new, v_new, start, index)
