"""The serving engine: prefill workers, decode workers, a token-aware router, continuous batching.

A prefill worker runs its compiled prefill program on its own mesh over a batch of queued prompts
and hands the batch's KV, in canonical form, to one decode worker in one transfer (kv/transfer.py).
A decode worker owns a paged KV cache on its own mesh; requests join its batch as soon as their KV
has arrived and pages are free (pages for the whole request are reserved on joining, so a running
request never runs out; the others wait), and leave it the step they finish, freeing their pages.
Every decode call runs `steps` tokens for every running row; the batch is rebuilt between calls.

Colocated serving is the same engine with one prefill and one decode worker on the same model.
One Python thread drives all workers; JAX dispatch is asynchronous, so workers on disjoint devices
overlap their device work. A request that fails (bad input, an error in its batch) fails alone.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from typing import Any, Sequence

import jax
import numpy as np

from infire_jax import boot
from infire_jax.engine.generation import RequestError, validate_prompt
from infire_jax.engine.programs import Programs, bucket
from infire_jax.engine.sampling import SamplingParams, pack_params
from infire_jax.kv import transfer
from infire_jax.kv import cache as kv_cache
from infire_jax.kv.cache import PageAllocator

__all__ = ["Request", "PrefillWorker", "DecodeWorker", "Engine", "generate"]


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
    pages: list[list[int]] = dataclasses.field(default_factory=list)  # per KV pool (cache group)
    length: int = 0  # tokens whose KV is in the cache
    times: dict[str, float] = dataclasses.field(default_factory=dict)
    transfer_seconds: float = 0.0
    decode_worker: str | None = None
    with_logits: bool = False  # keep the logits each token was drawn from (tests, analysis)

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
            generated_tokens=n,
            transfer_s=self.transfer_seconds,
            decode_worker=self.decode_worker,
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


@dataclasses.dataclass
class PrefillBatch:
    """One prefill program run: its requests (row i = requests[i]) and their canonical KV."""

    requests: list[Request]
    kv: tuple[jax.Array, ...]  # canonical (k, v) per cache group (programs.canonical_kv_fn)
    t: int  # padded prompt length (KV positions)
    pending_rows: set[int] = dataclasses.field(default_factory=set)

    @property
    def rows(self) -> int:
        return self.kv[0].shape[1]


class PrefillWorker:
    """Runs batches of prompts through one model's prefill program on its mesh."""

    def __init__(self, name: str, programs: Programs, max_batch: int = 8, max_batch_tokens: int = 8192):
        self.name, self.programs = name, programs
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        self.queue: collections.deque[Request] = collections.deque()
        self.kv_spec = programs.kv_spec()

    @property
    def pending_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.queue)

    def _take(self, page_size: int) -> list[Request]:
        batch: list[Request] = []
        while self.queue and len(batch) < self.max_batch:
            longest = max([len(r.prompt) for r in batch] + [len(self.queue[0].prompt)])
            if batch and bucket(len(batch) + 1) * bucket(longest, max(16, page_size)) > self.max_batch_tokens:
                break
            batch.append(self.queue.popleft())
        return batch

    def run(self, page_size: int) -> PrefillBatch | None:
        reqs = self._take(page_size)
        if not reqs:
            return None
        now = time.perf_counter()
        for r in reqs:
            r.status, r.times["prefill_start"] = "prefill", now
        p = self.programs
        b = p.batch_bucket(len(reqs))
        lengths = np.array([len(r.prompt) for r in reqs] + [1] * (b - len(reqs)), np.int32)
        t = bucket(int(lengths.max()), max(16, page_size))
        tokens = np.zeros((b, t), np.int32)
        for i, r in enumerate(reqs):
            tokens[i, : len(r.prompt)] = r.prompt
        sp = p.put_sampling(pack_params([r.params for r in reqs], b))
        lens = p.put(lengths, ("batch",))
        first, first_logits, k, v = p._timed(
            ("prefill", b, t), p.prefill_fn(b, t), p.placed.state, p.put(tokens, ("batch", "seq")), lens, sp
        )
        kv = p.canonical_kv_fn(b, t)(k, v, lens)
        first = np.asarray(first)
        want_logits = any(r.with_logits for r in reqs)
        first_logits = np.asarray(first_logits) if want_logits else None
        now = time.perf_counter()
        boot.clock.mark_first_token(now)  # the process's first token ends its boot
        for i, r in enumerate(reqs):
            r.times["first_token"] = now
            r.add_token(first[i], first_logits[i] if want_logits else None)
            r.length = len(r.prompt)
        return PrefillBatch(reqs, kv, t, set(range(len(reqs))))


class DecodeWorker:
    """Owns a paged KV cache and a continuous decode batch on one model's mesh.

    The cache is one page pool per cache group of the model (kv/cache.py): num_pages pages of
    page_size for full-length groups; a windowed group (Llama 4's chunked layers) gets a ring pool
    sized by max_batch and its window, not by num_pages. A request reserves pages in every pool."""

    def __init__(
        self,
        name: str,
        programs: Programs,
        *,
        num_pages: int = 256,
        page_size: int = 16,
        max_batch: int = 16,
        steps: int | None = None,
    ):
        if page_size < 1 or page_size & (page_size - 1) or page_size > 16:
            raise ValueError(f"page_size must be a power of two <= 16, got {page_size}")
        self.name, self.programs = name, programs
        self.page_size, self.num_pages, self.max_batch = page_size, num_pages, max_batch
        self.steps = steps or programs.decode_steps
        self.pools = kv_cache.pools(programs.cache_groups, num_pages, page_size, max_batch)
        self.allocators = [PageAllocator(pool.num_pages) for pool in self.pools]
        self.k_pages, self.v_pages = programs.allocate_pages(*self._geometry)
        self.running: list[Request] = []
        self.arrived: collections.deque[tuple[PrefillBatch, int]] = collections.deque()  # (batch, row)
        self.kv_spec = programs.kv_spec()
        self.transfer_stats = transfer.TransferStats()

    @property
    def _geometry(self) -> tuple[Any, Any]:
        """(page counts, page sizes) in the form the programs take (Programs.pack)."""
        pack = self.programs.pack
        return pack([q.num_pages for q in self.pools]), pack([q.page_size for q in self.pools])

    @property
    def allocator(self) -> PageAllocator:
        """The first pool's allocator (the full-length cache when the model has one)."""
        return self.allocators[0]

    # -- capacity ---------------------------------------------------------------------------
    def pages_for(self, r: Request) -> tuple[int, ...]:
        """Pages the request reserves in each pool: its whole length, or at most a ring's worth."""
        steps = self.steps
        total = len(r.prompt) + -(-r.params.max_new_tokens // steps) * steps + 1
        return tuple(pool.pages_for(total) for pool in self.pools)

    def fits(self, r: Request) -> bool:
        """Whether the request fits this worker's cache at all (else it could never be admitted)."""
        return all(n <= pool.num_pages for n, pool in zip(self.pages_for(r), self.pools))

    @property
    def context_tokens(self) -> int | None:
        """Longest sequence the full-length pools hold (None: only rings, no limit from the cache)."""
        full = [pool.num_pages * pool.page_size for pool in self.pools if pool.window is None]
        return min(full) if full else None

    @property
    def capacity_pages(self) -> int:
        return self.pools[0].num_pages

    @property
    def committed_pages(self) -> int:
        """First pool: pages in use plus pages the arrived-but-waiting requests will need."""
        return (self.pools[0].num_pages - self.allocator.free) + sum(
            self.pages_for(b.requests[i])[0] for b, i in self.arrived
        )

    # -- KV arrival -------------------------------------------------------------------------
    def accept(self, batch: PrefillBatch, src_spec: transfer.KVSpec) -> None:
        """Move a prefill batch's KV onto this mesh (one transfer) and queue its live rows."""
        dst = self.programs.canonical_kv_shardings(batch.rows, batch.t)
        before = self.transfer_stats.seconds
        batch.kv = transfer.handoff(batch.kv, src_spec, self.kv_spec, dst, self.transfer_stats, batch.t)
        spent = self.transfer_stats.seconds - before
        for i in sorted(batch.pending_rows):
            r = batch.requests[i]
            r.transfer_seconds, r.decode_worker = spent, self.name
            if r.finish_reason:  # finished at its first token: nothing to decode
                batch.pending_rows.discard(i)
                _finish(r)
            else:
                r.status = "waiting"
                self.arrived.append((batch, i))

    def admit(self) -> None:
        """Move arrived requests into the running batch while slots and pages allow (FIFO)."""
        by_batch: dict[int, tuple[PrefillBatch, list[tuple[int, list[list[int]]]]]] = {}
        admitted = 0
        while self.arrived and len(self.running) + admitted < self.max_batch:
            batch, row = self.arrived[0]
            r = batch.requests[row]
            need = self.pages_for(r)
            if any(n > a.free for n, a in zip(need, self.allocators)):
                break  # wait for pages (FIFO: no overtaking, so nothing starves)
            self.arrived.popleft()
            r.pages = [a.allocate(n, r.id) for n, a in zip(need, self.allocators)]
            admitted += 1
            by_batch.setdefault(id(batch), (batch, []))[1].append((row, r.pages))
        for batch, rows in by_batch.values():
            self._insert(batch, rows)
            for row, _ in rows:
                batch.pending_rows.discard(row)
                r = batch.requests[row]
                r.status = "decoding"
                self.running.append(r)

    def _insert(self, batch: PrefillBatch, rows: list[tuple[int, list[list[int]]]]) -> None:
        b, t = batch.rows, batch.t
        ids = []
        for g, pool in enumerate(self.pools):
            per_row = pool.seq(t) // pool.page_size
            ids.append(np.full((b, per_row), pool.num_pages, np.int32))  # num_pages = skip
            for row, pages in rows:
                n = min(per_row, len(pages[g]))
                ids[g][row, :n] = pages[g][:n]
        fn = self.programs.insert_fn(b, t, *self._geometry)
        self.k_pages, self.v_pages = fn(self.k_pages, self.v_pages, batch.kv, self.programs.pack(ids))

    # -- decoding ---------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """One decode call for the running batch; returns the requests that finished."""
        if not self.running:
            return []
        p, steps, rows = self.programs, self.steps, self.running
        b = p.batch_bucket(len(rows))
        # Only the pages this call reaches (a request reserves pages for all the tokens it may
        # generate; attending over the not-yet-written ones would gather them every step).
        used = [[min(len(r.pages[g]), pool.pages_for(r.length + steps)) for g, pool in enumerate(self.pools)] for r in rows]
        per_row = [bucket(max(u[g] for u in used)) for g in range(len(self.pools))]
        tables = [np.zeros((b, n), np.int32) for n in per_row]
        lengths = np.zeros(b, np.int32)
        tokens = np.zeros(b, np.int32)
        active = np.zeros(b, bool)
        for i, r in enumerate(rows):
            for table, pages, n in zip(tables, r.pages, used[i]):
                table[i, :n] = pages[:n]
            lengths[i], tokens[i], active[i] = r.length, r.output[-1], True
        sp = pack_params([r.params for r in rows], b)
        with_logits = any(r.with_logits for r in rows)
        shape = (b, p.pack(per_row), *self._geometry, steps, with_logits)
        out, self.k_pages, self.v_pages = p._timed(
            ("decode",) + shape, p.decode_fn(*shape), p.placed.state, self.k_pages, self.v_pages, p.pack(tables),
            lengths, tokens, active, sp,
        )
        toks, logits = (np.asarray(out[0]), np.asarray(out[1])) if with_logits else (np.asarray(out), None)
        finished = []
        for i, r in enumerate(rows):
            r.length += steps
            for j in range(steps):
                if r.finish_reason:
                    break
                r.add_token(toks[j, i], logits[j, i] if logits is not None else None)
            if r.finish_reason:
                finished.append(r)
        for r in finished:
            self.release(r)
            _finish(r)
        return finished

    def release(self, r: Request) -> None:
        if r in self.running:
            self.running.remove(r)
        for a, pages in zip(self.allocators, r.pages):
            a.release(pages)
        r.pages = []


def _finish(r: Request, error: str | None = None) -> None:
    r.status = "failed" if error else "done"
    r.error = error
    r.times["end"] = time.perf_counter()


class Engine:
    """N prefill workers and M decode workers with a token-aware router."""

    def __init__(self, prefill: Sequence[PrefillWorker], decode: Sequence[DecodeWorker]):
        if not prefill or not decode:
            raise ValueError("an engine needs at least one prefill worker and one decode worker")
        self.prefill_workers, self.decode_workers = list(prefill), list(decode)
        self.requests: dict[Any, Request] = {}
        self._ids = itertools.count()
        cfg = prefill[0].programs.placed.cfg
        self.vocab_size = cfg.vocab_size
        self.context = min(
            [cfg.max_position_embeddings] + [w.context_tokens for w in self.decode_workers if w.context_tokens]
        )
        self.started = time.perf_counter()

    # -- requests ---------------------------------------------------------------------------
    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams | dict[str, Any],
        request_id: Any = None,
        with_logits: bool = False,
    ) -> Request:
        """Queue a request (params: SamplingParams or its keyword arguments). Invalid input fails
        this request alone (status "failed", error set); the engine and other requests go on."""
        rid = next(self._ids) if request_id is None else request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        r = Request(rid, np.zeros(0, np.int32), SamplingParams(), time.perf_counter())
        self.requests[rid] = r
        try:
            params = params if isinstance(params, SamplingParams) else SamplingParams(**params)
            r.params = params
            r.prompt = validate_prompt(prompt, self.vocab_size, self.context, params.max_new_tokens)
            if not any(w.fits(r) for w in self.decode_workers):
                raise RequestError(
                    f"request needs {min(w.pages_for(r)[0] for w in self.decode_workers)} KV pages but no decode "
                    "worker has that many; lower max_new_tokens or give the decode workers more pages"
                )
        except (RequestError, ValueError, TypeError) as e:
            _finish(r, str(e))
            return r
        r.with_logits = with_logits
        min(self.prefill_workers, key=lambda w: w.pending_tokens).queue.append(r)
        return r

    def _route_decode(self, batch: PrefillBatch) -> DecodeWorker:
        """The decode worker with the most uncommitted pages, then the smallest batch."""
        return max(self.decode_workers, key=lambda w: (w.capacity_pages - w.committed_pages, -len(w.running)))

    # -- the loop ---------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return any(not r.finished for r in self.requests.values())

    def step(self) -> None:
        page_size = min(d.page_size for d in self.decode_workers)  # prompt buckets fill whole pages
        for w in self.prefill_workers:
            try:
                batch = w.run(page_size)
            except Exception as e:  # the batch fails, the engine goes on
                self._fail_batch([r for r in self.requests.values() if r.status == "prefill"], e)
                continue
            if batch is None:
                continue
            dw = self._route_decode(batch)
            try:
                dw.accept(batch, w.kv_spec)
            except Exception as e:
                self._fail_batch([batch.requests[i] for i in batch.pending_rows], e)
        for dw in self.decode_workers:
            dw.admit()
            running = list(dw.running)
            try:
                dw.step()
            except Exception as e:
                for r in running:
                    dw.release(r)
                self._fail_batch(running, e)

    def _fail_batch(self, reqs: list[Request], error: Exception) -> None:
        for r in reqs:
            if not r.finished:
                _finish(r, f"{type(error).__name__}: {error}")

    def run(self, max_steps: int = 1_000_000) -> list[Request]:
        """Step until every submitted request is done or failed."""
        for _ in range(max_steps):
            if not self.busy:
                break
            self.step()
            if self.busy and not self._progress_possible():
                raise RuntimeError("engine is stuck: requests wait but no worker can make progress")
        return list(self.requests.values())

    def _progress_possible(self) -> bool:
        return any(w.queue for w in self.prefill_workers) or any(
            w.running or w.arrived for w in self.decode_workers
        )

    def stats(self) -> dict[str, Any]:
        reqs = [r for r in self.requests.values() if r.finished]
        wall = max([r.times.get("end", self.started) for r in reqs] + [self.started]) - self.started
        generated = sum(len(r.output) for r in reqs)
        ts = [w.transfer_stats for w in self.decode_workers]
        return dict(
            requests=len(reqs),
            failed=sum(r.status == "failed" for r in reqs),
            generated_tokens=generated,
            prompt_tokens=int(sum(len(r.prompt) for r in reqs)),
            wall_s=wall,
            tokens_per_s=generated / wall if wall else 0.0,
            transfers=sum(s.transfers for s in ts),
            transfer_bytes=sum(s.bytes for s in ts),
            transfer_s=sum(s.seconds for s in ts),
        )


def generate(
    engine: Engine, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], with_logits: bool = False
) -> list[Request]:
    """Submit a list of requests, run the engine until they finish, and hand them back (in order)
    after removing them from the engine's table."""
    reqs = [engine.submit(p, sp, with_logits=with_logits) for p, sp in zip(prompts, params)]
    engine.run()
    for r in reqs:
        engine.requests.pop(r.id, None)
    return reqs
