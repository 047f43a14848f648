"""Paged KV cache: fixed-size pages in one array per cache kind, a page table per request.

Device side: k and v pages of shape (layer slots, num_pages, kv_heads, page_size, head_dim) (the
model's cache pair, with batch x seq replaced by pages x page positions). Host side: a free list.
Pages are reserved when a request joins a decode batch (prompt + all tokens it may generate, rounded
up to the decode chunk), so a running request never runs out; a request that does not fit waits,
and pages return to the free list when it finishes or fails.
"""

from __future__ import annotations

import math

__all__ = ["PageAllocator", "OutOfPages", "paged_axes", "pages_needed"]


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
