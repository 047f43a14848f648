"""The engine core: workers that own a paged KV cache with a prefix index, and the router.

Both engines drive these same workers: the in-process one (engine/disagg.py) calls them directly, the
multi-process one (engine/remote.py) runs each in its own process and carries the calls as messages.

  ColocatedWorker  prefills and decodes on one cache. Each step admits waiting requests (pages
                   reserved for the whole request, its cached prefix reused), runs one prefill call
                   of at most `prefill_chunk` prompt tokens (whole prompts, or the next chunk of a
                   long one) and one decode call for the running rows, so running decodes keep
                   producing tokens while a long prompt is prefilled (one token per row per step
                   while an admitted prompt is incomplete; `steps` tokens otherwise).
  PrefillWorker    the same prefill calls on its own cache with its own prefix index. After every
                   call it ships the pages that call completed to each row's decode worker as one
                   `Shipment` per destination, leaving out the leading pages that worker already
                   holds: decode receives chunk k while prefill computes chunk k + 1. With a
                   draft model ("draft:DIR:K") it also prefills the draft's KV and ships its
                   pages in the same shipment (engine/draft.py).
  DecodeWorker     reserves a request's pages (reusing the prefix it holds) before its prefill
                   starts, so its prefill worker knows what not to send; receives the pages; decodes.
  Router           places a request where its uncached tokens plus the worker's queued work are
                   fewest: the worker that holds a conversation keeps it (session affinity) until
                   its queue outweighs the reuse.

Prefill programs. Rows with nothing cached whose whole prompt fits the call run the whole-prompt
prefill program (the CPU causal prefill kernel) and are inserted into the pages; every other row
(a cached prefix, or a chunk of a long prompt) runs the chunk program (`Programs.chunk_fn`: new tokens
at an offset, attending to the row's pages). Pages are reserved for a request's whole life up front
(prompt + every token it may generate), so a running request never runs out; a request that does not
fit now waits (FIFO), one that never fits fails at submit. Finished requests leave their full pages
(prompt and generated tokens) in the prefix index (kv/manager.py).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any, Protocol, Sequence

import numpy as np

from infire_jax import boot, distributed
from infire_jax.engine.draft import DraftModelProposer
from infire_jax.engine.programs import Programs, bucket, page_tables
from infire_jax.engine.sampling import SamplingParams, pack_params
from infire_jax.engine.speculative import Proposer, SpecConfig, Speculator
from infire_jax.kv import cache as kv_cache
from infire_jax.kv import transfer
from infire_jax.kv.manager import KVManager, Lease, cache_identity

__all__ = [
    "Request", "Shipment", "ShippedRow", "DraftPages", "ColocatedWorker", "PrefillWorker", "DecodeWorker", "Router", "WorkerCounters", "finish",
]


@dataclasses.dataclass
class Request:
    id: Any
    prompt: np.ndarray
    params: SamplingParams
    submitted: float
    output: list[int] = dataclasses.field(default_factory=list)
    logits: list[np.ndarray] = dataclasses.field(default_factory=list)
    status: str = "queued"  # queued, prefill, waiting, decoding, done, failed
    error: str | None = None
    finish_reason: str | None = None
    length: int = 0  # tokens whose KV is in the decoding worker's cache
    times: dict[str, float] = dataclasses.field(default_factory=dict)
    cached_tokens: int = 0  # prompt tokens whose KV the prefilling worker reused from its prefix index
    transfer_seconds: float = 0.0
    transfer_bytes: int = 0
    prefill_worker: str | None = None
    decode_worker: str | None = None
    with_logits: bool = False  # keep the logits each token was drawn from (tests, analysis)
    proposed_tokens: int = 0  # speculative drafts verified for it
    accepted_tokens: int = 0  # of those, the ones kept
    block_hashes: dict[bytes, list[bytes]] = dataclasses.field(default_factory=dict, repr=False)  # per cache identity

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed")

    def metrics(self) -> dict[str, Any]:
        t = self.times
        n = len(self.output)
        out = dict(
            id=self.id,
            status=self.status,
            error=self.error,
            finish_reason=self.finish_reason,
            prompt_tokens=int(len(self.prompt)),
            cached_tokens=self.cached_tokens,
            generated_tokens=n,
            transfer_s=self.transfer_seconds,
            transfer_bytes=self.transfer_bytes,
            prefill_worker=self.prefill_worker,
            decode_worker=self.decode_worker,
            proposed_tokens=self.proposed_tokens,
            accepted_tokens=self.accepted_tokens,
        )
        if "prefill_start" in t:
            out["queue_s"] = t["prefill_start"] - self.submitted
        if "first_token" in t:
            out["ttft_s"] = t["first_token"] - self.submitted
        if "end" in t:
            out["e2e_s"] = t["end"] - self.submitted
            if n > 1 and "first_token" in t:
                out["tpot_s"] = (t["end"] - t["first_token"]) / (n - 1)
        return out

    def add_token(self, token: int, logits: np.ndarray | None = None) -> None:
        self.output.append(int(token))
        if logits is not None:
            self.logits.append(logits)
        p = self.params
        if self.output[-1] in p.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.output) >= p.max_new_tokens:
            self.finish_reason = "length"

    def total_tokens(self, steps: int) -> int:
        """Positions a decoding worker reserves: the prompt, every token the request may generate,
        and the overshoot of its last decode call (calls of at most `steps` tokens, in any mix)."""
        return len(self.prompt) + self.params.max_new_tokens + steps


def finish(r: Request, error: str | None = None) -> None:
    r.status = "failed" if error else "done"
    r.error = error
    r.times["end"] = time.perf_counter()


@dataclasses.dataclass
class WorkerCounters:
    """What a worker did since the last reset (engine.stats() sums them)."""

    prompt_tokens: int = 0  # prompts this worker prefilled (or, decode: reserved)
    prefill_tokens_computed: int = 0
    prefix_hit_tokens: int = 0
    kv_pages_transferred: int = 0  # decode: pages received
    kv_bytes_transferred: int = 0
    draft_tokens_computed: int = 0  # tokens run through a draft model's chunk program (prefill: the prompt)
    draft_kv_pages_transferred: int = 0  # decode: a draft model's pages received (not in kv_pages_transferred)
    draft_kv_bytes_transferred: int = 0
    hidden_states_received: int = 0  # decode: prompt positions whose EAGLE-3 head states came with the pages


@dataclasses.dataclass
class _Row:
    """A request on one worker."""

    request: Request
    lease: Lease | None = None
    computed: int = 0  # prompt tokens whose KV this worker holds
    dest: Any = None  # prefill worker: the decode worker (or its name) the pages go to
    skip: int = 0  # prefill worker: leading blocks the destination holds (never sent)
    shipped: int = 0  # prefill worker: blocks sent so far, or held by the destination
    with_draft: bool = False  # prefill worker: the draft model's KV is prefilled here and shipped too
    draft_shipped: int = 0  # prefill worker: draft blocks sent so far
    states: list[tuple[int, np.ndarray]] = dataclasses.field(default_factory=list)  # prefill worker: captured, unsent

    @property
    def id(self) -> Any:
        return self.request.id


@dataclasses.dataclass(frozen=True)
class ShippedRow:
    """One request's part of a shipment: blocks [first, first + blocks) of its block list and, when its
    prompt is complete (final), its ring pages (per windowed group)."""

    id: Any
    first: int
    blocks: int
    final: bool
    rings: tuple[int, ...] = ()


@dataclasses.dataclass
class DraftPages:
    """A draft model's KV pages riding in a Shipment ("draft:DIR:K" under P/D): per row, blocks
    [first, first + blocks) of its draft block list (always from block 0: a draft keeps no prefix
    index); `arrays` in the draft's canonical page form, `count` pages (bucketed), `real` of them data."""

    rows: list[ShippedRow]
    count: int
    real: int
    arrays: tuple[Any, ...]

    def page_bytes(self, spec: transfer.KVSpec, page_size: int) -> int:
        return _page_bytes(spec, (self.real,), (page_size,))


@dataclasses.dataclass
class Shipment:
    """KV pages one prefill call completed, for one decode worker. `arrays` holds them in canonical
    page form (Programs.export_pages_fn): per group, the rows' pages in row order, then padding."""

    dest: Any
    rows: list[ShippedRow]
    counts: tuple[int, ...]  # bucketed page count per group (the arrays' page axis)
    real: tuple[int, ...]  # pages per group that carry data
    arrays: tuple[Any, ...]
    final: list[Request]  # requests whose prompt completed in this call (first token set)
    draft: DraftPages | None = None  # the draft model's pages of the same rows (same transfer)
    # "eagle3:DIR:K": the prompt states the prefill calls captured, per row (id, first position, (n, width)),
    # of target layers `hidden_layers` (a decoding worker whose head reads other layers ignores them)
    hidden: list[tuple[Any, int, np.ndarray]] = dataclasses.field(default_factory=list)
    hidden_layers: tuple[int, ...] = ()

    def page_bytes(self, spec: transfer.KVSpec, page_sizes: Sequence[int]) -> int:
        """Bytes of the pages that carry data (not the padding of the bucket)."""
        return _page_bytes(spec, self.real, page_sizes)

    def row_bytes(self, row: ShippedRow, spec: transfer.KVSpec, page_sizes: Sequence[int]) -> int:
        rings = iter(row.rings)
        counts = [row.blocks if w is None else (next(rings) if row.final else 0) for _, w in spec.groups or ((0, None),)]
        return _page_bytes(spec, counts, page_sizes)


def _page_bytes(spec: transfer.KVSpec, counts: Sequence[int], page_sizes: Sequence[int]) -> int:
    return int(sum(math.prod(s) for s in spec.page_shapes(counts, page_sizes)) * np.dtype(spec.dtype).itemsize)


class _Worker:
    """A paged KV cache with a prefix index on one model's mesh (the base of the three roles)."""

    role = ""

    def __init__(
        self,
        name: str,
        programs: Programs,
        *,
        num_pages: int,
        page_size: int,
        max_batch: int,
        prefix_cache: bool,
        prefill_chunk: int | None = None,
        max_batch_tokens: int = 8192,
        steps: int | None = None,
    ):
        if page_size < 1 or page_size & (page_size - 1) or page_size > 16:
            raise ValueError(f"page_size must be a power of two <= 16, got {page_size}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive number of tokens (or None: whole prompts), got {prefill_chunk}")
        self.name, self.programs = name, programs
        self.page_size, self.num_pages, self.max_batch = page_size, num_pages, max_batch
        self.prefill_chunk, self.max_batch_tokens = prefill_chunk, max_batch_tokens
        self.steps = steps or programs.decode_steps
        self.pools = kv_cache.pools(programs.cache_groups, num_pages, page_size, max_batch)
        self.kv_spec = programs.kv_spec()
        self.kv = KVManager(
            self.pools, cache_identity(self.kv_spec.model, self.kv_spec, page_size),
            prefix_cache=prefix_cache, align_to_windows=self.role != "decode",
        )
        self.k_pages, self.v_pages = programs.allocate_pages(*self._geometry)
        self.waiting: collections.deque[_Row] = collections.deque()  # waiting for pages
        self.rows: dict[Any, _Row] = {}
        self.prefilling: list[_Row] = []  # pages reserved, prompt not complete (colocated, prefill)
        self.in_call: list[Request] = []  # the requests of the program call under way (they fail if it does)
        self.counters = WorkerCounters()
        # captured states (capture) of prompt blocks the prefix index holds, by block hash, least recent first:
        # a prefix the cache serves brings its states along instead of a recompute (at most num_pages blocks)
        self.state_cache: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()

    @property
    def _geometry(self) -> tuple[Any, Any]:
        """(page counts, page sizes) in the form the programs take (Programs.pack)."""
        pack = self.programs.pack
        return pack([q.num_pages for q in self.pools]), pack([q.page_size for q in self.pools])

    @property
    def page_sizes(self) -> tuple[int, ...]:
        return tuple(q.page_size for q in self.pools)

    # -- capacity ---------------------------------------------------------------------------
    def total_tokens(self, r: Request) -> int:
        """Positions this worker reserves for the request."""
        return len(r.prompt) if self.role == "prefill" else r.total_tokens(self.steps)

    def pages_for(self, r: Request) -> tuple[int, ...]:
        return self.kv.pages_for(self.total_tokens(r))

    def fits(self, r: Request) -> bool:
        """Whether the request fits this worker's cache at all (else it could never be admitted)."""
        return self.kv.fits(self.total_tokens(r))

    @property
    def context_tokens(self) -> int | None:
        """Longest sequence the full-length pools hold (None: only rings, no limit from the cache)."""
        full = [q.num_pages * q.page_size for q in self.pools if q.window is None]
        return min(full) if full else None

    @property
    def capacity_pages(self) -> int:
        return self.pools[0].num_pages

    @property
    def free_blocks(self) -> int:
        return self.kv.free_blocks

    def cached_prefix(self, r: Request) -> int:
        """Tokens of the request's prompt whose KV this worker's index holds (no side effects)."""
        return self.kv.match(self.hashes(r)) * self.page_size

    def hashes(self, r: Request) -> list[bytes]:
        """The hash chain of the request's prompt under this worker's cache identity (computed once)."""
        if self.kv.identity not in r.block_hashes:
            r.block_hashes[self.kv.identity] = self.kv.hashes(r.prompt)
        return r.block_hashes[self.kv.identity]

    @property
    def load_tokens(self) -> int:
        """Queued work in tokens: prompt tokens still to prefill here, tokens still to generate here."""
        out = 0
        for row in self.rows.values():
            r = row.request
            if self.role != "decode":
                out += len(r.prompt) - row.computed - (0 if row.lease else self.cached_prefix(r))
            if self.role != "prefill":
                out += r.params.max_new_tokens - len(r.output)
        return out

    # -- admission --------------------------------------------------------------------------
    def submit(self, r: Request, **placement: Any) -> None:
        row = _Row(r, **placement)
        self.rows[r.id] = row
        self.waiting.append(row)

    def admit(self) -> list[_Row]:
        """Reserve pages for waiting requests, first come first served (no overtaking, so nothing
        starves); returns the rows admitted."""
        out = []
        while self.waiting:
            row = self.waiting[0]
            r = row.request
            lease = self.kv.reserve(r.id, r.prompt, self.total_tokens(r), self.hashes(r))
            if lease is None:
                break
            self.waiting.popleft()
            row.lease, row.computed = lease, lease.hit_tokens
            if lease.hit_tokens and self.capture:
                self._cached_states(row)
            self.counters.prompt_tokens += len(r.prompt)
            self.counters.prefix_hit_tokens += lease.hit_tokens
            out.append(row)
        return out

    def release(self, r: Request) -> None:
        """Free a request's pages here (failed or cancelled), wherever it is in this worker."""
        self.drop(r.id)

    def drop(self, rid: Any) -> Request | None:
        """Forget a request (failed, cancelled, or done here): its pages go back (cached or free)."""
        row = self.rows.pop(rid, None)
        if row is None:
            return None
        if row in self.waiting:
            self.waiting.remove(row)
        if row in self.prefilling:
            self.prefilling.remove(row)
        if row.lease is not None:
            self.kv.release(row.lease)
            row.lease = None
        return row.request

    def _pages(self, row: _Row) -> list[list[int]]:
        """The row's page ids per group."""
        lease, rings = row.lease, iter(row.lease.rings)
        return [lease.blocks if q.window is None else next(rings) for q in self.pools]

    def pages(self, r: Request) -> list[list[int]]:
        """The page ids per group that the request holds here ([] per group if none)."""
        row = self.rows.get(r.id)
        return self._pages(row) if row is not None and row.lease is not None else [[] for _ in self.pools]

    # -- prefill ----------------------------------------------------------------------------
    @property
    def prefill_budget(self) -> int:
        return self.prefill_chunk or self.max_batch_tokens

    def _prefill_call(self) -> list[tuple[_Row, int]]:
        """One prefill program call over the rows at the head of `prefilling`; returns (row, tokens
        computed) for the rows it advanced. Rows whose prompt completed have their first token."""
        self.in_call = []
        if not self.prefilling:
            return []
        head = self.prefilling[0]
        if head.computed == 0 and len(head.request.prompt) <= self.prefill_budget:
            return self._whole_prefill()
        return self._chunk_prefill()

    def _whole_prefill(self) -> list[tuple[_Row, int]]:
        """Rows with nothing cached, whole prompts: the prefill program, then an insert into the pages."""
        p, ps = self.programs, self.page_size
        rows: list[_Row] = []
        used = 0
        for row in self.prefilling:
            n = len(row.request.prompt)
            if row.computed or len(rows) >= self.max_batch or (rows and used + n > self.prefill_budget):
                break
            longest = max([len(x.request.prompt) for x in rows] + [n])
            if rows and bucket(len(rows) + 1) * bucket(longest, max(16, ps)) > self.max_batch_tokens:
                break
            rows.append(row)
            used += n
        reqs = [row.request for row in rows]
        self._started(reqs)
        b = p.batch_bucket(len(rows))
        lengths = np.array([len(r.prompt) for r in reqs] + [1] * (b - len(reqs)), np.int32)
        t = bucket(int(lengths.max()), max(16, ps))
        tokens = np.zeros((b, t), np.int32)
        for i, r in enumerate(reqs):
            tokens[i, : len(r.prompt)] = r.prompt
        sp = p.put_sampling(pack_params([r.params for r in reqs], b))
        lens = p.put(lengths, ("batch",))
        capture = self.capture
        first, first_logits, *captured, k, v = p._timed(
            ("prefill", b, t) + ((capture,) if capture else ()), p.prefill_fn(b, t, capture), p.placed.state,
            p.put(tokens, ("batch", "seq")), lens, sp,
        )
        self._prompt_states(captured, [(row, 0, len(row.request.prompt)) for row in rows])
        kv = p.canonical_kv_fn(b, t)(k, v, lens)
        ids = []
        for g, pool in enumerate(self.pools):
            per_row = pool.seq(t) // pool.page_size
            table = np.full((b, per_row), pool.num_pages, np.int32)  # num_pages = skip
            for i, row in enumerate(rows):
                pages = self._pages(row)[g]
                n = min(per_row, len(pages))
                table[i, :n] = pages[:n]
            ids.append(table)
        self.k_pages, self.v_pages = p.insert_fn(b, t, *self._geometry)(self.k_pages, self.v_pages, kv, p.pack(ids))
        self._first_tokens(reqs, distributed.fetch(first, schedule=(tokens, lengths, *ids)), first_logits)
        out = []
        for row in rows:
            n = len(row.request.prompt)
            out.append((row, n))
            row.computed = n
        return self._advanced(out)

    def _chunk_prefill(self) -> list[tuple[_Row, int]]:
        """The next chunk of each row (a cached prefix or a long prompt): the chunk program."""
        p = self.programs
        plan: list[tuple[_Row, int]] = []
        budget = self.prefill_budget
        for row in self.prefilling:
            if budget <= 0 or len(plan) >= self.max_batch:
                break
            n = min(len(row.request.prompt) - row.computed, budget)
            plan.append((row, n))
            budget -= n
        reqs = [row.request for row, _ in plan]
        self._started(reqs)
        b, c = p.batch_bucket(len(plan)), bucket(max(n for _, n in plan), 16)
        tokens = np.zeros((b, c), np.int32)
        start, n_new = np.zeros(b, np.int32), np.zeros(b, np.int32)
        for i, (row, n) in enumerate(plan):
            tokens[i, :n] = row.request.prompt[row.computed: row.computed + n]
            start[i], n_new[i] = row.computed, n
        per_row, tables = page_tables([self._pages(row) for row, _ in plan], self.pools,
                                      [row.computed + n for row, n in plan], b)
        final = [(row, n) for row, n in plan if row.computed + n == len(row.request.prompt)]
        with_logits = any(row.request.with_logits for row, _ in final)
        sp = pack_params([r.params for r in reqs], b)
        shape = (b, c, p.pack(per_row), *self._geometry)
        capture = self.capture
        nxt, logits, *captured, self.k_pages, self.v_pages = p._timed(
            ("chunk",) + shape + (with_logits,) + ((capture,) if capture else ()),
            p.chunk_fn(*shape, with_logits=with_logits, capture=capture), p.placed.state,
            self.k_pages, self.v_pages, p.pack(tables), start, n_new, tokens, sp,
        )
        self._prompt_states(captured, [(row, row.computed, n) for row, n in plan])
        if final:
            idx = [i for i, (row, _) in enumerate(plan) if row.computed + n_new[i] == len(row.request.prompt)]
            toks = distributed.fetch(nxt, schedule=(tokens, start, n_new, *tables))
            lg = distributed.fetch(logits) if with_logits else None
            self._first_tokens([plan[i][0].request for i in idx], toks[idx], lg[idx] if lg is not None else None)
        for row, n in plan:
            row.computed += n
        return self._advanced(plan)

    @property
    def capture(self) -> tuple[int, ...]:
        """Target layers whose inputs this worker's calls return (an EAGLE-3 head's states), or ()."""
        return ()

    def _prompt_states(self, captured: list, pieces: Sequence[tuple[_Row, int, int]]) -> None:
        """Captured states of a prefill call ([(b, t, width)], empty: none asked): row i's positions
        start .. start + n - 1 are its columns 0 .. n - 1 (pieces[i] = (row, start, n))."""
        if not captured:
            return
        hidden = distributed.fetch(captured[0])
        for i, (row, start, n) in enumerate(pieces):
            self._keep_states(row, start, hidden[i, :n])
            self._remember_states(row, start, hidden[i, :n])

    def _remember_states(self, row: _Row, start: int, states: np.ndarray) -> None:
        """Keep the states of the prompt's full blocks these positions cover, by block hash (state_cache)."""
        ps, hashes = self.page_size, self.hashes(row.request)
        for b in range(-(-start // ps), min(len(hashes), (start + len(states)) // ps)):
            self.state_cache[hashes[b]] = states[b * ps - start: (b + 1) * ps - start]
            self.state_cache.move_to_end(hashes[b])
        while len(self.state_cache) > self.num_pages:
            self.state_cache.popitem(last=False)

    def _cached_states(self, row: _Row) -> None:
        """A prefix the prefix cache served was not computed here: its states come from state_cache if it
        holds every block (else the proposer recomputes them at the row's first draft)."""
        n, ps = row.computed, self.page_size
        hashes = self.hashes(row.request)[: n // ps]
        blocks = [self.state_cache.get(h) for h in hashes]
        if n % ps == 0 and blocks and all(x is not None for x in blocks):
            for h in hashes:
                self.state_cache.move_to_end(h)
            self._keep_states(row, 0, np.concatenate(blocks))

    def _keep_states(self, row: _Row, start: int, states: np.ndarray) -> None:
        """Held on the row until its pages ship (a prefill worker); a decoding worker hands them on."""
        row.states.append((start, states))

    def _started(self, reqs: Sequence[Request]) -> None:
        self.in_call = list(reqs)
        now = time.perf_counter()
        for r in reqs:
            if "prefill_start" not in r.times:
                r.times["prefill_start"] = now
                r.status = "prefill"
                r.prefill_worker = self.name

    def _first_tokens(self, reqs: Sequence[Request], first: np.ndarray, logits: Any) -> None:
        want = any(r.with_logits for r in reqs)
        logits = (logits if isinstance(logits, np.ndarray) else distributed.fetch(logits)) if want and logits is not None else None
        now = time.perf_counter()
        boot.clock.mark_first_token(now)  # the process's first token ends its boot
        for i, r in enumerate(reqs):
            r.times["first_token"] = now
            r.add_token(first[i], logits[i] if logits is not None else None)

    def _advanced(self, plan: list[tuple[_Row, int]]) -> list[tuple[_Row, int]]:
        """Bookkeeping after a prefill call: counters, newly written blocks into the index, rows whose
        prompt is complete leave `prefilling`."""
        for row, n in plan:
            r = row.request
            self.counters.prefill_tokens_computed += n
            self.kv.commit(row.lease, r.prompt[: row.computed])
            if row.computed == len(r.prompt):
                self.prefilling.remove(row)
                r.cached_tokens = row.lease.hit_tokens
        return plan

    @property
    def chunking(self) -> bool:
        """Whether an admitted prompt is still incomplete after this step's prefill call (a long one,
        or one the call's token budget cut or left out): the next step's prefill call continues it,
        so this step's decode call makes one step instead of holding it back for `steps` steps."""
        return bool(self.prefilling)


class _Decoding(_Worker):
    """The decode batch of a worker that decodes (colocated or decode). With a speculative config each
    decode call may instead be one verification step of drafted tokens (engine/speculative.py)."""

    def __init__(self, *args: Any, speculative: SpecConfig | None = None, proposer: Proposer | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ready: collections.deque[_Row] = collections.deque()  # prompt KV complete, not running yet
        self.running: list[Request] = []
        one_process = len(distributed.owner_processes(self.programs.layout.replicated)) == 1
        self.speculator = Speculator(speculative, [q.window for q in self.pools], proposer,
                                     clocked=one_process) if speculative else None
        self.decode_shapes: set[tuple[int, Any]] = set()  # (padded batch, packed pages per row) of decode calls run

    @property
    def draft_kv(self) -> DraftModelProposer | None:
        """The draft model's paged KV ("draft:DIR:K"), which a prefill worker may ship prompt pages into."""
        proposer = self.speculator.proposer if self.speculator is not None else None
        return proposer if isinstance(proposer, DraftModelProposer) else None

    @property
    def overshoot(self) -> int:
        """Positions past its last token a call may write: a decode call's steps, or a verify call's
        last token and drafts."""
        return max(self.steps, self.speculator.config.k + 1) if self.speculator else self.steps

    def total_tokens(self, r: Request) -> int:
        """The prompt, every token it may generate, and the overshoot of its last call."""
        return r.total_tokens(self.overshoot)

    @property
    def capture(self) -> tuple[int, ...]:
        """Target layers whose inputs the decode and verify calls return for the proposer (EAGLE-3), or ()."""
        hidden = self.speculator.hidden if self.speculator is not None else None
        return hidden.captures if hidden is not None else ()

    def _keep_states(self, row: _Row, start: int, states: np.ndarray) -> None:
        """A colocated prefill call's prompt states go to the proposer (no recompute at the first draft)."""
        self.speculator.hidden.observe(row.id, start, states)

    def _observed(self, rows: Sequence[Request], captured: list, kept: Any, steps_first: bool = False) -> None:
        """Hand the proposer each row's captured hidden states of the positions it kept: captured [(b, c,
        n x hidden)], or (c, b, ...) with steps_first (swapped on the host: no device program for it);
        empty: none asked. kept(i, r) -> (first position, its columns)."""
        if captured:
            hidden = distributed.fetch(captured[0])
            if steps_first:
                hidden = hidden.swapaxes(0, 1)
            for i, r in enumerate(rows):
                start, cols = kept(i, r)
                self.speculator.hidden.observe(r.id, start, hidden[i, cols])

    def _tables(self, rows: Sequence[Request], reach: Sequence[int], b: int) -> tuple[list[int], list[np.ndarray]]:
        """The running rows' page tables up to reach[i] (programs.page_tables)."""
        return page_tables([self._pages(self.rows[r.id]) for r in rows], self.pools, reach, b)

    def _start_decoding(self, row: _Row) -> Request | None:
        """A row whose prompt KV is complete: queue it for the decode batch, or finish it if its first
        token ended it. Returns the request if it finished."""
        r = row.request
        r.length = len(r.prompt)
        r.decode_worker = self.name
        if r.finish_reason:
            self._release(row)
            finish(r)
            return r
        r.status = "waiting"
        self.ready.append(row)
        return None

    def _join(self) -> None:
        while self.ready and len(self.running) < self.max_batch:
            row = self.ready.popleft()
            row.request.status = "decoding"
            self.running.append(row.request)

    def _decode_call(self, steps: int) -> list[Request]:
        """One decode call for the running batch; returns the requests that finished."""
        self.in_call = []
        self._join()
        if not self.running:
            return []
        p, rows = self.programs, self.running
        self.in_call = list(rows)
        b = p.batch_bucket(len(rows))
        t0, compiled0 = time.perf_counter(), boot.clock.programs_prepared
        if self.speculator is not None:
            fed = self.draft_kv.fed_tokens if self.draft_kv is not None else 0
            drafts = self.speculator.drafts([
                (r.id, np.concatenate([r.prompt, np.asarray(r.output, np.int32)]), r.length,
                 r.params.max_new_tokens - len(r.output)) for r in rows
            ], b)
            if self.draft_kv is not None:
                self.counters.draft_tokens_computed += self.draft_kv.fed_tokens - fed
            declined = drafts
            if drafts:
                c = self.speculator.width(drafts)
                if self.speculator.worth(b, c, drafts, len(rows)):
                    return self._verify_call(rows, b, c, drafts, t0, compiled0)
            steps = self.speculator.decode_steps([r.id for r in rows], steps)
        per_row, tables = self._tables(rows, [r.length + steps for r in rows], b)
        lengths = np.zeros(b, np.int32)
        tokens = np.zeros(b, np.int32)
        active = np.zeros(b, bool)
        for i, r in enumerate(rows):
            lengths[i], tokens[i], active[i] = r.length, r.output[-1], True
        sp = pack_params([r.params for r in rows], b)
        with_logits = any(r.with_logits for r in rows)
        shape = (b, p.pack(per_row), *self._geometry, steps, with_logits)
        self.decode_shapes.add((b, p.pack(per_row)))
        capture = self.capture
        key = ("decode",) + shape + ((capture,) if capture else ())
        out, *captured, self.k_pages, self.v_pages = p._timed(
            key, p.decode_fn(*shape, capture=capture), p.placed.state, self.k_pages, self.v_pages, p.pack(tables),
            lengths, tokens, active, sp,
        )
        self._observed(rows, captured, lambda i, r: (r.length, slice(0, steps)), steps_first=True)
        toks = distributed.fetch(out[0] if with_logits else out, schedule=(*tables, lengths, tokens, active))
        logits = distributed.fetch(out[1]) if with_logits else None
        if self.speculator is not None:
            self.speculator.observed_decode(b, steps, self._seconds(t0, compiled0))
            self.speculator.observed_declined({  # score the declined drafts against what decode produced
                r.id: (min(len(d), steps), _lead_matches(d[:steps], toks[: len(d), i]))
                for i, r in enumerate(rows) if len(d := declined.get(r.id, ()))
            })
        for i, r in enumerate(rows):
            r.length += steps
            for j in range(steps):
                if r.finish_reason:
                    break
                r.add_token(toks[j, i], logits[j, i] if logits is not None else None)
        return self._finish_rows(rows)

    def _seconds(self, t0: float, compiled0: int) -> float | None:
        """Wall time since t0, or None if any program (the target's, a draft model's, a head's)
        compiled or loaded meanwhile: that call's time is not what the call costs."""
        return None if boot.clock.programs_prepared != compiled0 else time.perf_counter() - t0

    def warm_verify(self) -> int:
        """Compile what speculation will run for every decode shape (batch, pages per row) this worker
        has run: the verify program at each width the speculator can ask for (Speculator.widths), run
        with padding rows only (they write nothing), and the proposer's own programs
        (Proposer.warm). engine/warmup.py calls this after its dummy wave, so a first real request
        compiles nothing. Returns the programs compiled or loaded."""
        if self.speculator is None:
            return 0
        p, compiled0 = self.programs, boot.clock.programs_prepared
        capture = self.capture
        for b, per_row in sorted(self.decode_shapes, key=str):
            for c in self.speculator.widths():
                shape = (b, c, per_row, *self._geometry, False)
                key = ("verify",) + shape + ((capture,) if capture else ())
                if key in p.compile_seconds:
                    continue
                tables = [np.zeros((b, n), np.int32) for n in p.unpack(per_row)]
                *_, self.k_pages, self.v_pages = p._timed(
                    key, p.verify_fn(*shape, capture=capture), p.placed.state, self.k_pages, self.v_pages,
                    p.pack(tables), np.zeros(b, np.int32), np.full(b, -1, np.int32), np.zeros((b, c), np.int32),
                    pack_params([], b),
                )
        self.speculator.proposer.warm(sorted({(b, max(p.unpack(per_row))) for b, per_row in self.decode_shapes}),
                                      self.speculator.config.k)
        return boot.clock.programs_prepared - compiled0

    def _verify_call(self, rows: list[Request], b: int, c: int, drafts: dict[Any, np.ndarray], t0: float,
                     compiled0: int) -> list[Request]:
        """One speculative verification step (Programs.verify_fn) for the running batch: each row's
        last token and its drafts (rows without drafts just decode one token); returns the requests
        that finished."""
        p = self.programs
        per_row, tables = self._tables(rows, [r.length + len(drafts.get(r.id, ())) + 1 for r in rows], b)
        tokens = np.zeros((b, c), np.int32)
        start, proposed = np.zeros(b, np.int32), np.full(b, -1, np.int32)
        for i, r in enumerate(rows):
            d = drafts.get(r.id, ())
            tokens[i, 0], tokens[i, 1: 1 + len(d)] = r.output[-1], d
            start[i], proposed[i] = r.length, len(d)
        sp = pack_params([r.params for r in rows], b)
        with_logits = any(r.with_logits for r in rows)
        shape = (b, c, p.pack(per_row), *self._geometry, with_logits)
        capture = self.capture
        key = ("verify",) + shape + ((capture,) if capture else ())
        out, accepted, logits, *captured, self.k_pages, self.v_pages = p._timed(
            key, p.verify_fn(*shape, capture=capture), p.placed.state, self.k_pages, self.v_pages, p.pack(tables),
            start, proposed, tokens, sp,
        )
        toks = distributed.fetch(out, schedule=(*tables, start, proposed, tokens))
        accepted = distributed.fetch(accepted)
        self._observed(rows, captured, lambda i, r: (r.length, slice(0, int(accepted[i]) + 1)))
        logits = distributed.fetch(logits) if with_logits else None
        judged = {}
        for i, r in enumerate(rows):
            k, a = int(max(proposed[i], 0)), int(accepted[i])
            judged[r.id] = (k, a)
            r.proposed_tokens += k
            r.accepted_tokens += a
            r.length += a + 1
            for j in range(a + 1):
                if r.finish_reason:
                    break
                r.add_token(toks[i, j], logits[i, j] if logits is not None else None)
        self.speculator.observed_verify(b, c, self._seconds(t0, compiled0), judged)
        return self._finish_rows(rows)

    def _finish_rows(self, rows: list[Request]) -> list[Request]:
        finished = [r for r in rows if r.finish_reason]
        for r in finished:
            self._release(self.rows[r.id])
            finish(r)
        return finished

    def _release(self, row: _Row) -> None:
        """A request done here: index the blocks it wrote (prompt and generated tokens), free the rest."""
        r = row.request
        if row.lease is not None and not r.error:
            written = min(r.length, len(r.prompt) + max(len(r.output) - 1, 0))
            self.kv.commit(row.lease, np.concatenate([r.prompt, np.asarray(r.output[:-1], np.int32)])[:written])
        if r in self.running:
            self.running.remove(r)
        if row in self.ready:
            self.ready.remove(row)
        if self.speculator is not None:
            self.speculator.forget(r.id)
        self.drop(r.id)

    def release(self, r: Request) -> None:
        """Free a request's pages (failed or cancelled; a request that finishes is released by step)."""
        if r in self.running:
            self.running.remove(r)
        row = self.rows.get(r.id)
        if row is not None and row in self.ready:
            self.ready.remove(row)
        if self.speculator is not None:
            self.speculator.forget(r.id)
        self.drop(r.id)


class ColocatedWorker(_Decoding):
    """Prefill and decode on one cache and one mesh (see the module doc)."""

    role = "colocated"

    def __init__(self, name: str, programs: Programs, *, num_pages: int = 256, page_size: int = 16,
                 max_batch: int = 16, steps: int | None = None, prefill_chunk: int | None = None,
                 prefix_cache: bool = True, max_batch_tokens: int = 8192, speculative: SpecConfig | None = None,
                 proposer: Proposer | None = None):
        super().__init__(name, programs, num_pages=num_pages, page_size=page_size, max_batch=max_batch,
                         prefix_cache=prefix_cache, prefill_chunk=prefill_chunk, max_batch_tokens=max_batch_tokens,
                         steps=steps, speculative=speculative, proposer=proposer)

    def step(self) -> list[Request]:
        """Admit, one prefill call, one decode call; returns the requests that finished."""
        self.prefilling.extend(self.admit())
        finished = []
        for row, _ in self._prefill_call():
            if row.computed == len(row.request.prompt):
                done = self._start_decoding(row)
                if done is not None:
                    finished.append(done)
        steps = 1 if self.chunking else self.steps
        return finished + self._decode_call(steps)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.ready or self.running)


class PrefillWorker(_Worker):
    """Prefill on its own cache; pages out to decode workers after every call (module doc)."""

    role = "prefill"

    def __init__(self, name: str, programs: Programs, max_batch: int = 8, max_batch_tokens: int = 8192, *,
                 num_pages: int = 512, page_size: int = 16, prefill_chunk: int | None = None,
                 prefix_cache: bool = True, draft: DraftModelProposer | None = None, capture: tuple[int, ...] = ()):
        """capture: the target layers an EAGLE-3 head on the decoding side reads ("eagle3:DIR:K"): the
        prefill calls return their inputs and the shipments carry them, so the decode worker does not
        recompute the prompt (Programs.capture_selection checks them here)."""
        super().__init__(name, programs, num_pages=num_pages, page_size=page_size, max_batch=max_batch,
                         prefix_cache=prefix_cache, prefill_chunk=prefill_chunk, max_batch_tokens=max_batch_tokens)
        self.draft = draft  # "draft:DIR:K": the draft model's KV, prefilled here for rows submitted with draft=True
        if capture:
            programs.capture_selection(capture)
        self._capture = tuple(capture)

    @property
    def capture(self) -> tuple[int, ...]:
        return self._capture

    @property
    def pending_tokens(self) -> int:
        return sum(len(row.request.prompt) - row.computed for row in self.rows.values())

    @property
    def queue(self) -> list[Request]:
        return [row.request for row in self.rows.values()]

    def submit(self, r: Request, dest: Any = None, skip_tokens: int = 0, draft: bool = False) -> None:
        """Queue a request whose pages go to `dest`, which already holds its first skip_tokens. draft:
        `dest` speculates with this worker's draft model, so prefill the draft's KV too and ship it."""
        blocks = skip_tokens // self.page_size
        super().submit(r, dest=dest, skip=blocks, shipped=blocks, with_draft=draft and self.draft is not None)

    def drop(self, rid: Any) -> Request | None:
        if self.draft is not None:
            self.draft.forget(rid)
        return super().drop(rid)

    def step(self) -> list[Shipment]:
        """Admit, one prefill call; returns the pages it completed, one shipment per destination."""
        self.prefilling.extend(self.admit())
        plan = self._prefill_call()
        self._draft_prefill([row for row, _ in plan if row.with_draft])
        by_dest: dict[Any, list[_Row]] = {}
        for row, _ in plan:
            by_dest.setdefault(row.dest, []).append(row)
        out = [s for rows in by_dest.values() if (s := self._shipment(rows)) is not None]
        for row, _ in plan:
            if row.computed == len(row.request.prompt):
                self.drop(row.id)  # its pages stay in the index (the export above was dispatched first)
        return out

    def _draft_prefill(self, rows: list[_Row]) -> None:
        """The draft model's KV of the rows, brought up to the prompt tokens the target has prefilled:
        the whole prefix from position 0 (the draft keeps no prefix index, so the target's cached
        prefix is computed here too), in chunk calls of the draft's own."""
        if not rows:
            return
        self.counters.draft_tokens_computed += self.draft.prefill(
            [(row.id, row.request.prompt[: row.computed], len(row.request.prompt)) for row in rows])
        for row in rows:
            row.with_draft = row.id in self.draft.held  # left out (no room in the draft's pool): decode catches up

    def _shipment(self, rows: list[_Row]) -> Shipment | None:
        entries, ids = [], [[] for _ in self.pools]
        final, drafts, hidden = [], [], []
        for row in rows:
            r, pages = row.request, self._pages(row)
            done = row.computed == len(r.prompt)
            upto = -(-row.computed // self.page_size) if done else row.computed // self.page_size
            first = row.shipped
            n = max(0, upto - first)
            row.shipped = max(row.shipped, upto)
            if not n and not done:
                continue
            rings = tuple(len(pages[g]) for g, pool in enumerate(self.pools) if pool.window is not None) if done else ()
            entries.append(ShippedRow(r.id, first, n, done, rings))
            if row.states:  # contiguous pieces of the prompt, in order
                hidden.append((r.id, row.states[0][0], np.concatenate([x for _, x in row.states])))
                row.states = []
            if row.with_draft:  # the draft's blocks up to the same position, from block 0
                drafts.append(ShippedRow(r.id, row.draft_shipped, upto - row.draft_shipped, done))
                row.draft_shipped = upto
            for g, pool in enumerate(self.pools):
                if pool.window is None:
                    ids[g].extend(pages[g][first:first + n])
                elif done:
                    ids[g].extend(pages[g])
            if done:
                final.append(r)
        if not entries:
            return None
        real = tuple(len(x) for x in ids)
        counts = tuple(bucket(max(n, 1)) for n in real)
        padded = [np.asarray(x + [pool.num_pages] * (c - len(x)), np.int32) for x, c, pool in zip(ids, counts, self.pools)]
        p = self.programs
        arrays = p.export_pages_fn(p.pack(counts), *self._geometry)(self.k_pages, self.v_pages, p.pack(padded))
        draft = DraftPages(drafts, *self.draft.export([(d.id, d.first, d.blocks) for d in drafts])) if drafts else None
        return Shipment(rows[0].dest, entries, counts, real, arrays, final, draft, hidden, self.capture if hidden else ())


class DecodeWorker(_Decoding):
    """Reserves pages (reusing the prefix it holds), receives prompt pages, decodes (module doc)."""

    role = "decode"

    def __init__(self, name: str, programs: Programs, *, num_pages: int = 256, page_size: int = 16,
                 max_batch: int = 16, steps: int | None = None, prefix_cache: bool = True,
                 speculative: SpecConfig | None = None, proposer: Proposer | None = None):
        super().__init__(name, programs, num_pages=num_pages, page_size=page_size, max_batch=max_batch,
                         prefix_cache=prefix_cache, steps=steps, speculative=speculative, proposer=proposer)
        self.transfer_stats = transfer.TransferStats()

    def receive(self, shipment: Shipment, arrays: tuple[Any, ...], draft_arrays: tuple[Any, ...] | None = None) -> list[Request]:
        """Write shipped pages (already on this mesh, canonical page shardings) into the rows' pages,
        and the draft model's (draft_arrays: on the draft's mesh) into its pool; rows whose prompt is
        complete join the decode queue. Returns requests that finished at their first token."""
        p = self.programs
        ids = [[] for _ in self.pools]
        for s in shipment.rows:
            row = self.rows.get(s.id)  # None: cancelled meanwhile; its pages are written nowhere
            pages = self._pages(row) if row is not None else None
            rings = iter(s.rings)
            for g, pool in enumerate(self.pools):
                if pool.window is None:
                    ids[g].extend(pages[g][s.first:s.first + s.blocks] if pages else [pool.num_pages] * s.blocks)
                elif s.final:
                    n = next(rings)
                    ids[g].extend(pages[g][:n] if pages else [pool.num_pages] * n)
        padded = [np.asarray(x + [pool.num_pages] * (c - len(x)), np.int32)
                  for x, c, pool in zip(ids, shipment.counts, self.pools)]
        self.k_pages, self.v_pages = p.import_pages_fn(p.pack(shipment.counts), *self._geometry)(
            self.k_pages, self.v_pages, arrays, p.pack(padded))
        self.counters.kv_pages_transferred += sum(s.blocks for s in shipment.rows)
        self.counters.kv_bytes_transferred += shipment.page_bytes(self.kv_spec, self.page_sizes)
        if shipment.draft is not None and draft_arrays is not None and self.draft_kv is not None:
            self._receive_draft(shipment.draft, draft_arrays)
        if shipment.hidden and shipment.hidden_layers == self.capture:  # the prompt states for an EAGLE-3 head
            for rid, start, states in shipment.hidden:
                if rid in self.rows:
                    self._keep_states(self.rows[rid], start, states)
                    self.counters.hidden_states_received += len(states)
        finished = []
        for s in shipment.rows:
            row = self.rows.get(s.id)
            if s.final and row is not None:
                r = row.request
                self.kv.commit(row.lease, r.prompt)
                row.computed = len(r.prompt)
                if (f := self._start_decoding(row)) is not None:
                    finished.append(f)
        return finished

    def _receive_draft(self, pages: DraftPages, arrays: tuple[Any, ...]) -> None:
        rows = []
        for s in pages.rows:
            row = self.rows.get(s.id)  # None: cancelled meanwhile
            r = row.request if row is not None else None
            rows.append((s.id, r.prompt, s.first, s.blocks, s.final, self.total_tokens(r)) if r is not None
                        else (None, None, s.first, s.blocks, s.final, 0))
        self.draft_kv.receive(rows, pages.count, arrays)
        self.counters.draft_kv_pages_transferred += pages.real
        self.counters.draft_kv_bytes_transferred += pages.page_bytes(self.draft_kv.kv_spec, self.page_size)

    def step(self) -> list[Request]:
        return self._decode_call(self.steps)


class Placeable(Protocol):
    """What the router reads of a worker: a worker itself, or a remote engine's view of one."""

    def fits(self, r: Any) -> bool: ...
    def cached_prefix(self, r: Any) -> int: ...
    @property
    def load_tokens(self) -> int: ...
    @property
    def free_blocks(self) -> int: ...


class Router:
    """Places requests on workers: the smallest (uncached prompt tokens + queued tokens), ties to the
    worker with the most free pages. A worker that cannot hold the request is never chosen."""

    @staticmethod
    def choose(workers: Sequence[Placeable], r: Any) -> Any:
        fits = [w for w in workers if w.fits(r)]
        if not fits:
            return None
        return min(fits, key=lambda w: (len(r.prompt) - w.cached_prefix(r) + w.load_tokens, -w.free_blocks))


def _lead_matches(drafts: np.ndarray, produced: np.ndarray) -> int:
    """How many leading drafts equal the tokens produced in their place."""
    n = min(len(drafts), len(produced))
    miss = np.flatnonzero(np.asarray(drafts[:n]) != np.asarray(produced[:n]))
    return int(miss[0]) if miss.size else n
