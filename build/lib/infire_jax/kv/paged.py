"""The device-side view of a paged KV pool that model code attends over during decode.

A pool holds every layer's pages, (L, pages, KV, page, hd); a row's positions are found through its
page table (B, P): position p of row b sits in page table[b, p // page]. Attention reads the pages in
place where the kernel dispatch has a kernel for it (kernels/dispatch.py), else gathers them into a
contiguous per-row cache with `PagedLayerCache.gather`. Layers run unrolled get one PagedLayerCache
each (a static layer index); a scanned stack of layers gets the whole `PagedPool` and gives each
layer's step its view (`PagedPool.layer`, a traced index).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["PagedLayerCache", "PagedPool", "rows_of_pages", "scan_layers"]


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
    layer: int | jax.Array  # static for unrolled layers, traced inside a scan over layers

    def gather(self) -> jax.Array:
        """This layer's pages of every row as a contiguous (B, KV, P * page, hd) cache."""
        return rows_of_pages(self.pages[self.layer][self.table])


@dataclasses.dataclass(frozen=True)
class PagedPool:
    """Every layer's pages (L, pages, KV, page, hd) and each row's page table (B, P): the decode cache of
    a scanned stack of layers, whose step for layer i attends over `layer(i)` in place."""

    pages: jax.Array
    table: jax.Array

    @property
    def num_layers(self) -> int:
        return self.pages.shape[0]

    def layer(self, index: int | jax.Array) -> PagedLayerCache:
        return PagedLayerCache(self.pages, self.table, index)


def scan_layers(k_cache: Any, v_cache: Any) -> tuple[Any, Any, Callable[[Any, Any], tuple[Any, Any]]]:
    """What a scan over a stack's layers carries for its caches, and how each step gets its own:
    stacked caches (or None) are sliced by the scan as they are; PagedPools stay whole and the scan
    carries each layer's index instead (their pages are read in place, never sliced or copied)."""
    if not isinstance(k_cache, PagedPool):
        return k_cache, v_cache, lambda kc, vc: (kc, vc)
    index = jnp.arange(k_cache.num_layers)
    return index, index, lambda kc, vc: (k_cache.layer(kc), v_cache.layer(vc))
