"""KV page manager: reference-counted pages per cache group and a prefix index of full pages.

A worker's cache is one page pool per cache group (kv/cache.py). Its full-length groups all have the
same page count and page size, so a *block* is the page of one id in every full-length group: a
request's positions [i * ps, (i + 1) * ps) live in block i of its block list, in each of them. A
windowed (ring) group holds one ring per request; rings are never shared (below).

Prefix index. The KV of a full block depends only on the tokens up to its end (and on the model and its
canonical KV layout), so a block is named by a hash chain over token ids:
    h_0 = H(identity, tokens[0:ps]),   h_i = H(h_{i-1}, tokens[i*ps:(i+1)*ps])
with identity = the model fingerprint, the canonical KV spec and the page size (the same on a prefill
and a decode worker of different layouts, so their hashes agree). A request that starts with the tokens
of indexed blocks reuses them (reference count + 1) and computes only the rest. Blocks enter the index
once their KV is written (`commit`), so generated tokens are cached too: the next turn of a
conversation resends them.

Lifetime. A block is free, held (reference count > 0) or cached (indexed, count 0). Cached blocks stay
until the pool needs pages: allocation takes free pages first, then evicts cached blocks least recently
used first (a request's blocks are released last-first, so a chain's tail goes before its head).
Reservations count cached blocks as available, so a request that fits the pool alone never waits on,
let alone fails because of, what the cache holds; it waits only for pages that running requests hold.

Ring (windowed) groups: Llama 4's chunked layers keep only the current window of W positions, at slot
p mod W. To continue a cached prefix of P tokens a ring must hold positions floor(P / W) * W .. P - 1,
which no finished request's ring holds in general (it holds that request's own last window). Decision:
rings are never cached. Where the worker computes the new tokens itself (colocated, a prefill worker),
a reused prefix is cut to a multiple of W (`align_to_windows`): the chunked layers of the new tokens
then attend to nothing before the cut and the request starts with an empty ring, at the cost of
recomputing up to W - 1 tokens. A decode worker receives the ring from its prefill worker with the
prompt's KV, so it reuses whole pages with no cut. MLA's latent cache is one full-length group like
any other model's (a single block list, nothing special).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
from typing import Any, Sequence

import numpy as np

from infire_jax.kv.cache import PageAllocator, Pool

__all__ = ["KVManager", "Lease", "block_hashes", "cache_identity"]


def cache_identity(model_fingerprint: str, kv_spec: Any, page_size: int) -> bytes:
    """The seed of a worker's hash chain: equal exactly when cached KV is interchangeable."""
    return hashlib.blake2b(f"{model_fingerprint}|{kv_spec!r}|{page_size}".encode(), digest_size=16).digest()


def block_hashes(tokens: Sequence[int] | np.ndarray, page_size: int, identity: bytes, start: int = 0,
                 previous: bytes | None = None) -> list[bytes]:
    """Hash chain of the full pages of `tokens` from page `start` on (`previous` = the hash of page
    start - 1; None: start must be 0 and the chain begins at `identity`)."""
    arr = np.asarray(tokens, np.int32)
    h = identity if previous is None else previous
    if previous is None and start:
        raise ValueError("continuing a hash chain past page 0 needs the previous page's hash")
    out = []
    for i in range(start, len(arr) // page_size):
        h = hashlib.blake2b(h + arr[i * page_size:(i + 1) * page_size].tobytes(), digest_size=16).digest()
        out.append(h)
    return out


@dataclasses.dataclass
class Lease:
    """The pages one request holds: its blocks (full-length groups) and one ring per windowed group."""

    owner: Any
    blocks: list[int]
    rings: list[list[int]]
    hit_tokens: int  # leading tokens whose KV came from the index (a multiple of the page size)
    hashes: list[bytes]  # hash chain of the leading blocks indexed so far (reused or committed)


class KVManager:
    """Pages of one worker's cache groups: reservations, reference counts, the prefix index.

    pools: the worker's pools in group order (kv/cache.py `pools`); identity: `cache_identity(...)`;
    prefix_cache=False keeps no index (every request computes its whole prompt, pages free at release).
    align_to_windows: cut reused prefixes to whole windows of the ring groups (module doc)."""

    def __init__(self, pools: Sequence[Pool], identity: bytes, *, prefix_cache: bool = True,
                 align_to_windows: bool = True):
        self.pools = tuple(pools)
        self.full = [g for g, p in enumerate(self.pools) if p.window is None]
        self.ring = [g for g, p in enumerate(self.pools) if p.window is not None]
        if self.full and len({(self.pools[g].num_pages, self.pools[g].page_size) for g in self.full}) != 1:
            raise ValueError("full-length cache groups must share one page count and page size")
        self.identity = identity
        self.num_blocks = self.pools[self.full[0]].num_pages if self.full else 0
        self.page_size = self.pools[self.full[0]].page_size if self.full else None
        self.prefix_cache = prefix_cache and bool(self.full)
        windows = [self.pools[g].window for g in self.ring] if align_to_windows else []
        self.granularity = math.lcm(self.page_size or 1, *windows)  # reused prefixes are multiples of this
        self._free: list[int] = list(range(self.num_blocks - 1, -1, -1))
        self._refs = [0] * self.num_blocks
        self._index: dict[bytes, int] = {}  # hash -> block
        self._hash_of: dict[int, bytes] = {}  # indexed block -> hash
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached blocks, oldest first
        self._rings = [PageAllocator(self.pools[g].num_pages) for g in self.ring]
        self.leases: dict[int, Lease] = {}  # id(lease) -> lease
        self.evicted_pages = 0
        self.hit_tokens = 0
        self._events: list[tuple[str, bytes]] | None = None

    # ---- capacity -------------------------------------------------------------------------
    def pages_for(self, tokens: int) -> tuple[int, ...]:
        """Pages per pool that a request of `tokens` positions holds."""
        return tuple(p.pages_for(tokens) for p in self.pools)

    def fits(self, tokens: int) -> bool:
        """Whether a request of `tokens` positions fits the pools at all (alone, cache evicted)."""
        return all(n <= p.num_pages for n, p in zip(self.pages_for(tokens), self.pools))

    @property
    def free_blocks(self) -> int:
        """Blocks a reservation can take now: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._lru)

    @property
    def held_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        return len(self._index)

    # ---- the index --------------------------------------------------------------------------
    def hashes(self, tokens: Sequence[int] | np.ndarray) -> list[bytes]:
        return block_hashes(tokens, self.page_size, self.identity) if self.prefix_cache else []

    def match(self, hashes: Sequence[bytes]) -> int:
        """Leading blocks of the chain that are indexed (no side effects: for routing)."""
        n = 0
        if self.prefix_cache:
            for h in hashes:
                if h not in self._index:
                    break
                n += 1
        return n

    def reserve(self, owner: Any, prompt: Sequence[int] | np.ndarray, total: int,
                hashes: Sequence[bytes] | None = None) -> Lease | None:
        """Pages for a request of `total` positions whose first tokens are `prompt`: the indexed
        blocks its prompt starts with (at most up to the prompt's last token, which is always
        computed, and cut to `granularity`), fresh pages for the rest. None if the pages are not
        available now (the request waits); ValueError if they never would be."""
        if not self.fits(total):
            raise ValueError(f"a request of {total} positions needs {self.pages_for(total)} pages, the pools have "
                             f"{tuple(p.num_pages for p in self.pools)}")
        need = self.pages_for(total)
        hashes = list(hashes) if hashes is not None else self.hashes(prompt)
        hit = 0
        if self.full:  # whole blocks, the prompt's last token left to compute, cut to the granularity
            hit = min(self.match(hashes), (len(prompt) - 1) // self.page_size)
            hit = hit * self.page_size // self.granularity * self.granularity // self.page_size
        hit_blocks = [self._index[h] for h in hashes[:hit]]
        fresh = (need[self.full[0]] - hit) if self.full else 0
        cached_hits = sum(1 for b in hit_blocks if self._refs[b] == 0)
        if fresh > self.free_blocks - cached_hits:
            return None
        if any(need[g] > a.free for g, a in zip(self.ring, self._rings)):
            return None
        for b in hit_blocks:
            if self._refs[b] == 0:
                del self._lru[b]
            self._refs[b] += 1
        blocks = hit_blocks + [self._take() for _ in range(fresh)]
        for b in blocks[hit:]:
            self._refs[b] = 1
        lease = Lease(owner, blocks, [a.allocate(need[g], owner) for g, a in zip(self.ring, self._rings)],
                      hit * (self.page_size or 0), list(hashes[:hit]))
        self.leases[id(lease)] = lease
        self.hit_tokens += lease.hit_tokens
        return lease

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        b, _ = self._lru.popitem(last=False)  # least recently used cached block
        h = self._hash_of.pop(b)
        del self._index[h]
        self.evicted_pages += 1
        self._event("del", h)
        return b

    def commit(self, lease: Lease, tokens: Sequence[int] | np.ndarray) -> int:
        """Index the lease's full blocks whose KV is now written: `tokens` are the request's tokens at
        positions 0 .. len(tokens) - 1, all of them in the cache. Returns the blocks newly indexed.
        A block whose content another block already holds in the index stays private."""
        if not self.prefix_cache:
            return 0
        done = len(lease.hashes)
        full = min(len(tokens) // self.page_size, len(lease.blocks))
        if full <= done:
            return 0
        new = block_hashes(tokens[: full * self.page_size], self.page_size, self.identity, done,
                           lease.hashes[-1] if done else None)
        added = 0
        for i, h in enumerate(new, start=done):
            lease.hashes.append(h)
            b = lease.blocks[i]
            if h in self._index or b in self._hash_of:
                continue
            self._index[h], self._hash_of[b] = b, h
            self._event("add", h)
            added += 1
        return added

    def release(self, lease: Lease) -> None:
        """Drop the lease's pages: indexed blocks nobody else holds become cached (most recently used;
        the chain's tail before its head in eviction order), the others free."""
        if self.leases.pop(id(lease), None) is None:
            raise ValueError(f"lease of {lease.owner!r} is not held")
        for b in reversed(lease.blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._hash_of:
                    self._lru[b] = None
                else:
                    self._free.append(b)
        for a, pages in zip(self._rings, lease.rings):
            a.release(pages)
        lease.blocks, lease.rings = [], []

    def clear(self) -> None:
        """Forget every cached block (held blocks stay held; they are not indexed any more)."""
        for b in list(self._lru):
            self._free.append(b)
        self._lru.clear()
        for h in self._index:
            self._event("del", h)
        self._index.clear()
        self._hash_of.clear()

    # ---- mirrors (a router in another process) ----------------------------------------------
    def track_events(self) -> None:
        """Start recording index changes for `drain_events` (a remote router's copy of the index)."""
        if self._events is None:
            self._events = [("add", h) for h in self._index]

    def _event(self, kind: str, h: bytes) -> None:
        if self._events is not None:
            self._events.append((kind, h))

    def drain_events(self) -> list[tuple[str, bytes]]:
        """Index changes ("add" / "del", hash) since the last drain (after track_events)."""
        if self._events is None:
            return []
        out, self._events = self._events, []
        return out

    # ---- accounting -------------------------------------------------------------------------
    def check(self) -> None:
        """Raise AssertionError unless every block is exactly one of free, held, cached, and the
        reference counts equal the leases holding each block."""
        refs = collections.Counter(b for lease in self.leases.values() for b in lease.blocks)
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b in range(self.num_blocks):
            assert self._refs[b] == refs.get(b, 0), f"block {b}: count {self._refs[b]}, held by {refs.get(b, 0)} leases"
            states = [b in free, self._refs[b] > 0, b in self._lru]
            assert sum(states) == 1, f"block {b}: free/held/cached = {states}"
            assert (b in self._lru) <= (b in self._hash_of), f"cached block {b} is not indexed"
            assert not (b in free and b in self._hash_of), f"free block {b} is still indexed"
        assert {self._index[h]: h for h in self._index} == self._hash_of, "index and its inverse disagree"
        for g, a in zip(self.ring, self._rings):
            held = sum(len(lease.rings[self.ring.index(g)]) for lease in self.leases.values())
            assert a.free + held == a.num_pages, f"ring group {g}: {a.free} free + {held} held != {a.num_pages}"

    def idle(self) -> bool:
        """No page is held: every block is free or cached, every ring page free."""
        return not self.leases and self.held_blocks == 0 and all(a.free == a.num_pages for a in self._rings)
