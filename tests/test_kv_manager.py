"""The KV page manager (kv/manager.py): reference counts, the hashed prefix index, LRU eviction, ring
groups, and a 1,000-request randomized soak under page pressure with a model of every page's content."""

import collections

import numpy as np
import pytest

from infire_jax.kv.cache import Pool
from infire_jax.kv.manager import KVManager, block_hashes, cache_identity

PS = 4
ID = cache_identity("model", "spec", PS)


def manager(blocks=16, rings=(), **kw):
    pools = [Pool(blocks, PS)] + [Pool(n, PS, w) for n, w in rings]
    return KVManager(pools, ID, **kw)


def test_hash_chain_names_a_block_by_everything_before_it():
    a = block_hashes(list(range(12)), PS, ID)
    assert len(a) == 3 and len(set(a)) == 3
    b = block_hashes([99] + list(range(1, 12)), PS, ID)  # first page differs: every later hash differs
    assert all(x != y for x, y in zip(a, b))
    assert block_hashes(list(range(12)), PS, cache_identity("model", "other spec", PS)) != a
    assert block_hashes(list(range(12)), PS, ID, start=1, previous=a[0]) == a[1:]
    assert block_hashes(list(range(11)), PS, ID) == a[:2]  # only full pages


def test_reuse_pins_blocks_and_leaves_the_last_prompt_token_to_compute():
    m = manager()
    prompt = list(range(10))  # two full pages + 2
    first = m.reserve("a", prompt, 14)
    assert first.hit_tokens == 0 and len(first.blocks) == 4
    m.commit(first, prompt + [50, 51, 52])  # 13 tokens written: 3 full pages
    assert m.cached_blocks == 3
    second = m.reserve("b", prompt + [50, 51, 52, 7], 20)
    assert second.hit_tokens == 12 and second.blocks[:3] == first.blocks[:3]
    # a prompt of exactly the cached pages: its last page is recomputed (its last token needs logits)
    third = m.reserve("c", prompt[:8], 9)
    assert third.hit_tokens == 4 and third.blocks[0] == first.blocks[0] and third.blocks[1] != first.blocks[1]
    m.check()
    for lease in (first, second, third):
        m.release(lease)
    m.check()
    assert m.idle() and m.free_blocks == 16 and m.cached_blocks == 3
    assert m.hit_tokens == 16


def test_cached_blocks_are_evicted_least_recently_used_and_never_block_a_request():
    m = manager(blocks=8)
    seqs = [[s] * 8 for s in range(4)]  # four 2-page prompts
    for s in seqs:
        lease = m.reserve(s[0], s, 8)
        m.commit(lease, s)
        m.release(lease)
    assert m.cached_blocks == 8 and m.free_blocks == 8
    assert m.match(m.hashes(seqs[0])) == 2
    hit = m.reserve("again", seqs[0] + [1], 12)  # touches sequence 0: now the most recent
    assert hit.hit_tokens == 8 and m.evicted_pages == 1  # its third page evicted sequence 1's tail
    m.release(hit)  # that page was never committed: free
    big = m.reserve("big", list(range(100, 116)), 20)  # 5 pages: the free one + the 4 oldest cached
    assert big is not None and m.evicted_pages == 5
    assert m.match(m.hashes(seqs[0])) == 2  # the recently used sequence survived
    assert m.match(m.hashes(seqs[1])) == 0 and m.match(m.hashes(seqs[2])) == 0
    # the chain's tail goes first: sequence 3 lost its second page, kept its first
    assert m.match(m.hashes(seqs[3])) == 1
    m.check()
    with pytest.raises(ValueError, match="needs"):
        m.reserve("huge", [1], 40)  # more than the pool: never fits
    assert m.reserve("wait", [2] * 4, 16) is None  # fits the pool, but held pages are in the way: wait
    m.release(big)
    assert m.reserve("now", [2] * 4, 16) is not None


def test_hit_blocks_count_against_the_cache_not_twice():
    """A reservation that reuses a cached (unheld) block takes it out of the evictable set: the
    capacity check counts it once."""
    m = manager(blocks=4)
    p = [1] * 8
    lease = m.reserve("a", p, 8)
    m.commit(lease, p)
    m.release(lease)
    assert m.free_blocks == 4
    # 2 hit (cached) + 2 fresh: exactly the pool (counting the hits as free too would make it 6)
    full = m.reserve("b", p + [2], 16)
    assert full is not None and full.hit_tokens == 8
    assert m.free_blocks == 0
    m.check()


def test_no_prefix_cache_indexes_nothing():
    m = manager(prefix_cache=False)
    lease = m.reserve("a", [1] * 8, 8)
    assert m.commit(lease, [1] * 8) == 0
    m.release(lease)
    assert m.cached_blocks == 0 and m.reserve("b", [1] * 9, 9).hit_tokens == 0


def test_rings_are_private_and_reuse_is_cut_to_whole_windows():
    m = manager(blocks=16, rings=[(6, 8)])  # a window of 8 = 2 pages; room for 3 rings
    assert m.granularity == 8
    p = list(range(20))
    a = m.reserve("a", p, 24)
    assert [len(r) for r in a.rings] == [2]
    m.commit(a, p)
    m.release(a)  # ring pages free at once; 5 blocks cached
    assert m.cached_blocks == 5 and m.idle()
    b = m.reserve("b", p + [1], 24)
    assert b.hit_tokens == 16  # 5 pages indexed, cut to 2 whole windows
    c = manager(blocks=16, rings=[(6, 8)], align_to_windows=False)  # a decode worker: the ring is sent
    lease = c.reserve("a", p, 24)
    c.commit(lease, p)
    c.release(lease)
    assert c.reserve("b", p + [1], 24).hit_tokens == 20
    # ring pages are reserved per request and wait like blocks do
    m.reserve("x", [7], 8), m.reserve("y", [8], 8)
    assert m.reserve("z", [9], 8) is None
    m.check()


def test_events_mirror_the_index():
    m = manager(blocks=4)
    m.track_events()
    mirror = set()
    for s in range(5):
        lease = m.reserve(s, [s] * 8, 8)
        m.commit(lease, [s] * 8)
        m.release(lease)
        for kind, h in m.drain_events():
            mirror.add(h) if kind == "add" else mirror.discard(h)
        assert mirror == set(m._index)


def test_soak_1000_requests_under_page_pressure():
    """1,000 requests of multi-turn sessions and shared system prompts through a pool far smaller
    than their total: every request is served exactly once, none that fits alone ever fails,
    reused pages always hold exactly the tokens the request expects (a model of every page's
    content), the bookkeeping is consistent after every step, and at the end every page is free or
    cached. Requests arrive faster than they finish, so the queue is never empty."""
    rng = np.random.default_rng(0)
    blocks = 48
    m = manager(blocks=blocks, rings=[(4 * 2, 8)])  # four rings of 2 pages
    content: dict[int, tuple] = {}  # block -> tokens of positions 0 .. block end it holds
    systems = [rng.integers(0, 50, int(rng.integers(4, 20))).tolist() for _ in range(3)]
    sessions: dict[int, list[int]] = {}
    pending: collections.deque = collections.deque()
    running: list[tuple] = []
    served, hits, steps = 0, 0, 0
    for i in range(1000):
        s = int(rng.integers(0, 30))
        history = sessions.get(s) or list(systems[s % 3])
        prompt = history + rng.integers(0, 50, int(rng.integers(1, 12))).tolist()
        if len(prompt) > 60:  # keep sessions inside the pool
            prompt = list(systems[s % 3]) + prompt[-20:]
        pending.append((i, s, prompt, int(rng.integers(1, 20))))
        while pending and (rng.random() < 0.5 or len(pending) > 8):
            rid, s, prompt, new = pending[0]
            total = len(prompt) + new
            lease = m.reserve(rid, prompt, total)
            if lease is None:
                assert running, "a request that fits waits only for pages running requests hold"
                break
            pending.popleft()
            hits += lease.hit_tokens
            n_hit = lease.hit_tokens // PS
            for j in range(n_hit):  # reused pages hold this prompt's tokens
                assert content[lease.blocks[j]] == tuple(prompt[: (j + 1) * PS])
            for j in range(n_hit, len(lease.blocks)):
                content[lease.blocks[j]] = None  # fresh: written below
            out = rng.integers(0, 50, new).tolist()
            seq = prompt + out[:-1]  # the last generated token's KV is never written
            for j in range(n_hit, len(seq) // PS):
                content[lease.blocks[j]] = tuple(seq[: (j + 1) * PS])
            m.commit(lease, prompt)  # after prefill
            running.append((lease, seq, s, prompt + out, int(rng.integers(1, 4))))
        m.check()
        steps += 1
        still = []
        for lease, seq, s, conversation, left in running:
            if left > 1:
                still.append((lease, seq, s, conversation, left - 1))
                continue
            m.commit(lease, seq)
            m.release(lease)
            sessions[s] = conversation
            served += 1
        running = still
    while pending or running:
        for lease, seq, s, conversation, _ in running:
            m.commit(lease, seq)
            m.release(lease)
            served += 1
        running = []
        if pending:
            rid, s, prompt, new = pending.popleft()
            lease = m.reserve(rid, prompt, len(prompt) + new)
            assert lease is not None  # nothing runs: the pool (cache evicted) always has room
            running.append((lease, prompt, s, prompt, 1))
    m.check()
    assert served == 1000
    assert m.idle() and m.free_blocks == blocks  # every page free or held only by the index
    assert m.evicted_pages > 100 and hits > 1000, (m.evicted_pages, hits)  # the pressure and the reuse were real


def test_router_keeps_a_conversation_where_it_is_cached_until_the_queue_outweighs_it():
    """core.Router: the least (uncached prompt tokens + queued tokens); session affinity falls out."""
    import types

    from infire_jax.engine.core import Router

    class Worker:
        def __init__(self, cached, load, free=10, fits=True):
            self.cached, self.load_tokens, self.free_blocks, self._fits = cached, load, free, fits

        def fits(self, r):
            return self._fits

        def cached_prefix(self, r):
            return self.cached

    r = types.SimpleNamespace(prompt=np.zeros(1000, np.int32))
    home, other = Worker(cached=900, load=0), Worker(cached=0, load=0, free=99)
    assert Router.choose([other, home], r) is home
    home.load_tokens = 850  # 100 uncached + 850 queued < 1000 uncached elsewhere
    assert Router.choose([other, home], r) is home
    home.load_tokens = 950
    assert Router.choose([other, home], r) is other
    fresh = types.SimpleNamespace(prompt=np.zeros(10, np.int32))
    a, b = Worker(0, 0, free=5), Worker(0, 0, free=50)
    assert Router.choose([a, b], fresh) is b  # a tie goes to the most free pages
    assert Router.choose([Worker(900, 0, fits=False), b], r) is b  # never where it cannot fit
    assert Router.choose([Worker(0, 0, fits=False)], r) is None
