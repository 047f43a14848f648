"""Paged KV cache: fixed-size pages in one array per cache kind, a page table per request.

Device side: k and v pages of shape (layer slots, num_pages, kv_heads, page_size, head_dim) (the
model's cache pair, with batch x seq replaced by pages x page positions). Host side: a free list.
Pages are reserved when a request joins a decode batch (prompt + all tokens it may generate, rounded
up to the decode chunk), so a running request never runs out; a request that does not fit waits,
and pages return to the free list when it finishes or fails.

Cache groups. A model may declare that its layers fall into groups cached differently
(`module.cache_groups()` -> CacheGroups, or None: one full-length group; models/contract.py). Each
group has its own pair of page arrays (layers of that group only) and its own page allocator, and every request its own page list per group:
  window None  every position is kept: a request's pages grow with its length (global attention).
  window W     the layer only reads keys of the query's own window of W positions (Llama 4's chunked
               attention: positions floor(p / W) * W .. p), so the group keeps a ring of W positions
               per request: position p at ring slot p mod W. At the decode step for position p the
               ring's valid slots are j < p mod W (positions floor(p / W) * W + j); later slots still
               hold the previous window and are masked. A request reserves min(pages for its length,
               W / page) ring pages: constant however long it grows.
The prefill -> decode handoff sends, for a windowed group, only the ring (`ring_window`): the
prompt's last partial window, min(W, T) positions, not the whole prompt.
A chunk of a prompt at position `start` (Programs.chunk_fn: prefix reuse, chunked prefill) reads the
ring as a decode step does (it must hold start's window) and writes the chunk's last W positions, so a
chunk may be longer than W and cross window boundaries. A ring holds only the window of its request's
current length: a cached prefix of P tokens can reuse another request's ring only while that request's
length is in P's window; otherwise reuse stops at floor(P / W) * W, where the ring starts empty.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "PageAllocator", "OutOfPages", "paged_axes", "pages_needed", "CacheGroups", "Pool", "pools",
    "ring_window",
]


class OutOfPages(RuntimeError):
    """Not enough free pages right now (the request should wait)."""


def paged_axes(kv_logical_axes: tuple) -> tuple:
    """Logical axes of the paged form of a (layers, batch, heads, seq, dim) cache array."""
    layers, _, heads, _, dim = kv_logical_axes
    return (layers, "pages", heads, "page_pos", dim)


def pages_needed(tokens: int, page_size: int) -> int:
    return math.ceil(tokens / page_size)


class PageAllocator:
    """Free-list allocator of page ids [0, num_pages)."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))
        self._owner: dict[int, object] = {}

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, n: int, owner: object) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"need {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._owner[p] = owner
        return pages

    def release(self, pages: list[int]) -> None:
        for p in pages:
            if self._owner.pop(p, None) is None:
                raise ValueError(f"page {p} is not allocated")
            self._free.append(p)


@dataclasses.dataclass(frozen=True)
class CacheGroups:
    """A model's KV cache groups (see the module docstring). `plan` maps each layer slot to (group,
    position in the group's stack) like the FFN-kind stacks of models/moe.py SlotPlan: stage-major and
    padded per pipeline stage, so pp splits every group's layer axis into each stage's own layers."""

    windows: tuple[int | None, ...]  # per group: None = every position, W = a ring of W positions
    plan: Any  # models.moe.SlotPlan over the groups

    def layers(self, g: int, layer_slots: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """(layer indices, positions in group g's stack) of group g's real layers, in layer order."""
        pairs = [(i, self.plan.slot_pos[s]) for i, s in enumerate(layer_slots) if self.plan.slot_kind[s] == g]
        return [i for i, _ in pairs], [p for _, p in pairs]

    def write_slots(self, local_slots: int) -> list[np.ndarray]:
        """Per group, (stages, stage-local stack length): the stage-local layer slot whose new K/V each
        entry of the group's stage-local stack stores (0 for padding entries, which nothing reads)."""
        kind, index = self.plan.local_tables(local_slots)
        p = kind.shape[0]
        out = []
        for g, size in enumerate(self.plan.sizes):
            table = np.zeros((p, size // p), np.int32)
            for stage in range(p):
                for slot in range(local_slots):
                    if self.plan.slot_kind[stage * local_slots + slot] == g:
                        table[stage, index[stage, slot]] = slot
            out.append(table)
        return out


@dataclasses.dataclass(frozen=True)
class Pool:
    """One cache group's pages on a decode worker."""

    num_pages: int
    page_size: int
    window: int | None = None

    def pages_for(self, tokens: int) -> int:
        """Pages a request of `tokens` positions reserves (a ring never more than window / page)."""
        n = pages_needed(tokens, self.page_size)
        return n if self.window is None else min(n, self.window // self.page_size)

    def seq(self, t: int) -> int:
        """Positions of a t-position prefill the handoff carries for this group."""
        return t if self.window is None else min(self.window, t)


def pools(groups: CacheGroups | None, num_pages: int, page_size: int, max_batch: int) -> tuple[Pool, ...]:
    """A decode worker's page pools, one per cache group. Full-length groups get num_pages pages of
    page_size. A windowed group gets pages of gcd(window, page_size) positions (whole pages tile the
    ring also when page_size does not divide the window) and window / page of them for each of
    max_batch requests: it never holds up admission, and its size does not depend on num_pages."""
    if groups is None:
        return (Pool(num_pages, page_size),)
    out = []
    for w in groups.windows:
        if w is None:
            out.append(Pool(num_pages, page_size))
        else:
            ps = math.gcd(w, page_size)
            out.append(Pool(max_batch * (w // ps), ps, w))
    return tuple(out)


def ring_window(x: jax.Array, lengths: jax.Array, window: int) -> jax.Array:
    """KV of a prefill (L, B, H, T, d) -> the ring a windowed group decodes from (L, B, H, min(W, T), d):
    slot j holds position floor(len / W) * W + j if that is < len (the current window), else zeros."""
    w = min(window, x.shape[3])
    pos = (lengths // window * window)[:, None] + jnp.arange(w)[None, :]  # (B, w)
    g = jnp.take_along_axis(x, jnp.minimum(pos, x.shape[3] - 1)[None, :, None, :, None], axis=3)
    return jnp.where((pos < lengths[:, None])[None, :, None, :, None], g, jnp.zeros((), x.dtype))
