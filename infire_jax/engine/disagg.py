"""The in-process serving engine: the core's workers (engine/core.py) driven by one Python thread.

Colocated: `Engine([], [ColocatedWorker(...)])` prefills and decodes on one cache. Disaggregated:
`Engine([PrefillWorker(...), ...], [DecodeWorker(...), ...])` on disjoint meshes. A request is placed
on a decode (or colocated) worker by the router when it is submitted and waits there for pages
(FIFO), reusing the prefix that worker holds; a disaggregated request then goes to the prefill worker
the router picks, which computes what its own cache lacks and, after every prefill call, ships the
pages the decode worker lacks: one `jax.device_put` per shipment moves them onto the decode mesh,
resharding into its layout (the KV specs are compared first: a mismatch fails the requests, never
decodes wrong data). Nothing here blocks on the device except reading sampled tokens: JAX dispatch is
asynchronous, so workers on disjoint devices overlap, and the decode side's import of chunk k runs
while the prefill side computes chunk k + 1. A request that fails (bad input, an error in its program
call or transfer) fails alone; the engine goes on.

In a multi-process run (infire_jax.distributed) every process runs this same engine over the same
requests: its decisions depend only on the requests and their tokens (never on clocks), and every
token comes back to every process through distributed.fetch, so no process diverges; a shipment
between meshes of different processes is a collective copy (kv/transfer.move).
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Sequence

import numpy as np

from infire_jax.engine.core import (
    ColocatedWorker, DecodeWorker, PrefillWorker, Request, Router, Shipment, WorkerCounters, finish,
)
from infire_jax.engine.generation import RequestError, validate_prompt
from infire_jax.engine.sampling import SamplingParams
from infire_jax.engine.speculative import spec_stats
from infire_jax.kv import transfer

__all__ = ["Request", "ColocatedWorker", "PrefillWorker", "DecodeWorker", "Engine", "generate"]


class Engine:
    """Colocated workers, or N prefill and M decode workers, with the router of engine/core.py."""

    def __init__(self, prefill: Sequence[PrefillWorker], decode: Sequence[DecodeWorker | ColocatedWorker]):
        self.prefill_workers, self.decode_workers = list(prefill), list(decode)
        if not self.decode_workers:
            raise ValueError("an engine needs at least one decode (or colocated) worker")
        kind = DecodeWorker if self.prefill_workers else ColocatedWorker
        wrong = [w.name for w in self.decode_workers if not isinstance(w, kind)]
        if wrong:
            raise ValueError(
                f"workers {wrong} are not {kind.__name__}s: an engine with prefill workers takes DecodeWorkers, "
                "one without takes ColocatedWorkers (which prefill themselves)"
            )
        sizes = {w.page_size for w in self.prefill_workers + self.decode_workers}
        if len(sizes) > 1:
            raise ValueError(f"prefill and decode workers must use one page_size (pages cross whole), got {sorted(sizes)}")
        self.requests: dict[Any, Request] = {}
        self._ids = itertools.count()
        cfg = self.decode_workers[0].programs.placed.cfg
        self.vocab_size = cfg.vocab_size
        self.context = min(
            [cfg.max_position_embeddings] + [w.context_tokens for w in self.decode_workers if w.context_tokens]
        )
        self.transfer_stats = transfer.TransferStats()
        self._evicted0 = 0
        self.started = time.perf_counter()

    @property
    def colocated(self) -> bool:
        return not self.prefill_workers

    @property
    def workers(self) -> list[Any]:
        return self.prefill_workers + self.decode_workers

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
            worker = Router.choose(self.decode_workers, r)
            if worker is None:
                raise RequestError(
                    f"request needs {min(w.pages_for(r)[0] for w in self.decode_workers)} KV pages but no decode "
                    "worker has that many; lower max_new_tokens or give the decode workers more pages"
                )
            if self.prefill_workers and not any(w.fits(r) for w in self.prefill_workers):
                raise RequestError(
                    f"request needs {min(w.pages_for(r)[0] for w in self.prefill_workers)} KV pages to prefill but "
                    "no prefill worker has that many; give the prefill workers more pages"
                )
        except (RequestError, ValueError, TypeError) as e:
            finish(r, str(e))
            return r
        r.with_logits = with_logits
        worker.submit(r)
        return r

    # -- the loop ---------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return any(not r.finished for r in self.requests.values())

    def step(self) -> None:
        """Colocated: one step of every worker. Disaggregated: decode workers reserve pages for their
        waiting requests (which then go to a prefill worker), every prefill worker runs one prefill
        call and ships its pages, every decode worker runs one decode call."""
        if self.colocated:
            for w in self.decode_workers:
                self._guarded(w, w.step)
            return
        for d in self.decode_workers:
            for row in d.admit():
                r = row.request
                p = Router.choose(self.prefill_workers, r)
                if p is None:  # checked at submit; a worker cannot shrink, so this is a bug
                    self._fail([r], RuntimeError("no prefill worker holds this request"))
                    continue
                p.submit(r, dest=d, skip_tokens=row.lease.hit_tokens, draft=d.draft_kv is not None)
        for p in self.prefill_workers:
            for shipment in self._guarded(p, p.step) or ():
                self._ship(p, shipment)
        for d in self.decode_workers:
            self._guarded(d, d.step)

    def _guarded(self, worker: Any, fn):
        """Run a worker call; if it raises, the requests of its program call fail, the engine goes on."""
        worker.in_call = []
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - the call's requests fail, nothing else
            self._fail(worker.in_call, e)
            return None

    def _ship(self, p: PrefillWorker, s: Shipment) -> None:
        d: DecodeWorker = s.dest
        try:
            p.kv_spec.check(d.kv_spec)
            arrays, shardings = tuple(s.arrays), d.programs.canonical_page_shardings(
                d.programs.pack(s.counts), d.programs.pack(d.page_sizes))
            nbytes = s.page_bytes(d.kv_spec, d.page_sizes)
            if s.draft is not None:  # the draft model's pages ride in the same transfer
                p.draft.kv_spec.check(d.draft_kv.kv_spec)
                arrays += tuple(s.draft.arrays)
                shardings += d.draft_kv.programs.canonical_page_shardings(s.draft.count, d.page_size)
                nbytes += s.draft.page_bytes(d.draft_kv.kv_spec, d.page_size)
            t0 = time.perf_counter()
            arrays = transfer.move(arrays, shardings)
            arrays, draft_arrays = arrays[: len(s.arrays)], arrays[len(s.arrays):] or None
            spent = time.perf_counter() - t0
            self.transfer_stats.transfers += 1
            self.transfer_stats.bytes += nbytes
            self.transfer_stats.seconds += spent
            for row in s.rows:
                r = self.requests.get(row.id)
                if r is not None:
                    r.transfer_seconds += spent
                    r.transfer_bytes += s.row_bytes(row, d.kv_spec, d.page_sizes)
            d.in_call = [self.requests[row.id] for row in s.rows if row.id in self.requests]
            d.receive(s, arrays, draft_arrays)
        except Exception as e:  # noqa: BLE001 - these requests fail, the engine goes on
            self._fail([self.requests[row.id] for row in s.rows if row.id in self.requests], e)

    def _fail(self, reqs: Sequence[Request], error: Exception) -> None:
        for r in reqs:
            for w in self.workers:
                w.release(r)
            if not r.finished:
                finish(r, f"{type(error).__name__}: {error}")

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
        return any(w.rows for w in self.workers)

    # -- measurements -----------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Start counting afresh (the wall clock, transfers, the workers' counters, evictions)."""
        self.started = time.perf_counter()
        self.transfer_stats = transfer.TransferStats()
        for w in self.workers:
            w.counters = WorkerCounters()
        self._evicted0 = sum(w.kv.evicted_pages for w in self.workers)

    def stats(self) -> dict[str, Any]:
        """Totals over the finished requests in the table, and the workers' counters since the last
        reset_stats: prefill_tokens_computed (prompt tokens run through a prefill program),
        prefix_hit_tokens (prompt tokens a prefilling worker reused from its cache; hit_ratio = these
        over the prompt tokens it admitted), decode_hit_tokens (prompt tokens a decode worker held
        already, so they did not cross), kv_pages_transferred / kv_bytes_transferred (P -> D),
        evicted_pages (cached pages reused for other requests). A draft model ("draft:DIR:K"):
        draft_prefill_tokens (prompt tokens prefill workers ran through it, P/D), draft_fed_tokens
        (tokens decoding workers fed it: generated ones, and prompts whose draft KV was not shipped),
        draft_kv_pages_transferred / draft_kv_bytes_transferred (its pages P -> D, not in kv_*; both
        in transfer_bytes). An EAGLE-3 head ("eagle3:DIR:K"): hidden_states_received (prompt positions
        whose captured states came with the pages, P/D)."""
        reqs = [r for r in self.requests.values() if r.finished]
        wall = max([r.times.get("end", self.started) for r in reqs] + [self.started]) - self.started
        generated = sum(len(r.output) for r in reqs)
        computing = self.prefill_workers or self.decode_workers
        admitted = sum(w.counters.prompt_tokens for w in computing)
        hit = sum(w.counters.prefix_hit_tokens for w in computing)
        ts = self.transfer_stats
        return dict(
            requests=len(reqs),
            failed=sum(r.status == "failed" for r in reqs),
            generated_tokens=generated,
            prompt_tokens=int(sum(len(r.prompt) for r in reqs)),
            cached_tokens=int(sum(r.cached_tokens for r in reqs)),
            wall_s=wall,
            tokens_per_s=generated / wall if wall else 0.0,
            prefill_tokens_computed=sum(w.counters.prefill_tokens_computed for w in computing),
            prefix_hit_tokens=hit,
            hit_ratio=hit / admitted if admitted else 0.0,
            decode_hit_tokens=0 if self.colocated else sum(w.counters.prefix_hit_tokens for w in self.decode_workers),
            kv_pages_transferred=sum(w.counters.kv_pages_transferred for w in self.decode_workers),
            kv_bytes_transferred=sum(w.counters.kv_bytes_transferred for w in self.decode_workers),
            evicted_pages=sum(w.kv.evicted_pages for w in self.workers) - self._evicted0,
            draft_prefill_tokens=sum(w.counters.draft_tokens_computed for w in self.prefill_workers),
            draft_fed_tokens=sum(w.counters.draft_tokens_computed for w in self.decode_workers),
            draft_kv_pages_transferred=sum(w.counters.draft_kv_pages_transferred for w in self.decode_workers),
            draft_kv_bytes_transferred=sum(w.counters.draft_kv_bytes_transferred for w in self.decode_workers),
            hidden_states_received=sum(w.counters.hidden_states_received for w in self.decode_workers),
            transfers=ts.transfers,
            transfer_bytes=ts.bytes,
            transfer_s=ts.seconds,
            **spec_stats([w.speculator.counters for w in self.decode_workers if w.speculator is not None]),
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
