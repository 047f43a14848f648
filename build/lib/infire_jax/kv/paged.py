"""The device-side view of a paged KV pool that model code attends over during decode.

A pool holds every layer's pages, (L, pages, KV, page, hd); a row's positions are found through its
page table (B, P): position p of row b sits in page table[b, p // page]. Attention reads the pages in
place where the kernel dispatch has a kernel for it (kernels/dispatch.py), else gathers them into a
contiguous per-row cache with `PagedLayerCache.gather`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["PagedLayerCache", "rows_of_pages"]


def rows_of_pages(gathered: jax.Array) -> jax.Array:
    """Pages gathered by a page table, (..., B, P, KV, page, hd), as each row's contiguous cache
    (..., B, KV, P * page, hd)."""
    *lead, p, kv, page, hd = gathered.shape
    return jnp.swapaxes(gathered, -4, -3).reshape(*lead, kv, p * page, hd)


@dataclasses.dataclass(frozen=True)
class PagedLayerCache:
    """One layer's view of a paged KV pool, as a decode step's cache: the pool of every layer
    (L, pages, KV, page, hd), this layer's index and each row's page table (B, P)."""

    pages: jax.Array
    table: jax.Array
    layer: int

    def gather(self) -> jax.Array:
        """This layer's pages of every row as a contiguous (B, KV, P * page, hd) cache."""
        return rows_of_pages(self.pages[self.layer][self.table])
