"""Multi-process prefill/decode: the engine core's workers as separate OS processes, KV pages moved
with jax.experimental.transfer.

    with RemoteEngine(model_dir, [WorkerConfig("prefill", "prefill0", mesh="tp=2")],
                      [WorkerConfig("decode", "decode0", mesh="pp=2")]) as engine:
        outputs = engine.generate(prompts, max_new_tokens=16)

Processes. The client (this module's RemoteEngine, in the caller's process; it never touches a device)
starts every worker with the `spawn` start method, so each worker initialises JAX itself and simulates
its own CPU devices (`jax_num_cpu_devices`); mesh device ranges ("tp=2@0-1") refer to the worker's own
devices. A prefill worker runs engine/core.PrefillWorker, a decode worker engine/core.DecodeWorker: the
same workers, prefix caches and scheduling as the in-process engine (engine/disagg.py); this module is
their transport. The client routes with the same core.Router, reading each worker's prefix index from
the index changes the worker reports with its messages.

Transfer layout ("mode", chosen per request batch by the client): "mesh" (default) = the prefill side
reshards the canonical KV pages to the decode worker's own sharding rebuilt on a same-shaped mesh of
its devices, so the pull lands every shard once, in place (a prefill process therefore gets at least as
many simulated devices as the largest decode mesh); "single" = one device on each side, the decode
side reshards locally after the pull.

Control protocol: pickled tuples (kind, payload) over multiprocessing.connection (TCP on 127.0.0.1,
HMAC authkey handshake). Worker -> client: "connected", "hello" (handshake: KV spec, transfer
address, number of transport addresses, the decode layout {mesh shape, rules}, capacity, cache
identity), then "reserved", "shipped", "accepted", "tokens", "failed", "bench_*". Client -> worker:
"reserve", "prefill", "accept", "cancel", "debug", "bench_*", "shutdown". KV never goes through the
client. Workers know a request as (id, attempt), so a retried request is never confused with its
earlier placement.

One request:
  1. client -> decode (router: its cached prefix, its load): "reserve"; the decode worker reserves
     pages for the whole request when they are free (FIFO), reusing the prefix its index holds, and
     answers "reserved" {id, skip = tokens it holds}.
  2. client -> prefill (router): "prefill" {requests with skip, the decode worker's announced KVSpec +
     layout, mode}; the prefill worker checks its KVSpec against the decode's (KVLayoutMismatch ->
     "failed", nothing is offered), reuses its own cached prefix and runs prefill calls (whole prompts,
     or chunks of prefill_chunk tokens). After every call it exports the pages that call completed
     (minus the first skip tokens), reshards them into the transfer layout, offers them under a fresh
     uuid (expires after offer_timeout) and answers "shipped" {first tokens of completed prompts, uuid,
     address, its KVSpec, a device-independent description of each array's sharding, checksums}.
  3. client -> decode: "accept" with that description: the decode worker checks the prefill's KVSpec
     against its own, the array descriptions against the shardings it will pull with and the transport
     count, all BEFORE pulling (mismatch -> KVLayoutMismatch, "failed"); pulls (deadline pull_timeout)
     while the prefill worker computes the next chunk, compares checksums, reshards locally, writes the
     pages into the request's reserved pages, and decodes once the prompt is complete. With a draft
     model on both sides ("draft:DIR:K", equal draft KV specs announced in the handshakes) the
     draft's pages ride in the same offer after the target's, checked and pulled the same way. "tokens" after
     every decode call (also the heartbeat; "done" entries when requests end).

Timeouts: worker start (start_timeout), every client wait (run's timeout, polled), worker silence
while it has requests in flight (stall_timeout -> killed), the pull (pull_timeout), offers
(offer_timeout). A worker that dies (its process sentinel fires or its socket closes) has its
in-flight requests re-placed (max_retries; the other worker of the placement is told to let go) or
failed with a WorkerDied error naming the worker, its pid and exit code; the rest go on.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import multiprocessing
import os
import queue
import secrets
import sys
import threading
import time
import traceback
import warnings
from multiprocessing.connection import Client, Listener, wait
from typing import Any, Sequence

from infire_jax.engine.core import Router
from infire_jax.engine.generation import RequestError, validate_prompt
from infire_jax.engine.sampling import SamplingError, SamplingParams, per_request
from infire_jax.engine.speculative import SpecCounters, spec_stats
from infire_jax.kv.cache import pages_needed
from infire_jax.kv.transfer import KVLayoutMismatch

__all__ = [
    "WorkerConfig",
    "RemoteEngine",
    "RemoteRequest",
    "WorkerDied",
    "WorkerStartError",
    "RequestTimeout",
    "RemoteRequestError",
]


class WorkerDied(RuntimeError):
    """A worker process died (or stopped answering) while a request was in flight on it."""


class WorkerStartError(RuntimeError):
    """A worker process did not come up (crashed, failed to load, or missed the start deadline)."""


class RequestTimeout(TimeoutError):
    """A request did not finish within the run's deadline."""


class RemoteRequestError(RuntimeError):
    """A request failed in a worker with an error of another type (its name is in the message)."""


def _error_class(name: str | None) -> type[Exception]:
    from infire_jax.kv.remote_transfer import TransferError

    classes = dict(
        KVLayoutMismatch=KVLayoutMismatch, WorkerDied=WorkerDied, RequestTimeout=RequestTimeout,
        TransferError=TransferError, RequestError=RequestError, SamplingError=SamplingError,
    )
    return classes.get(name or "", RemoteRequestError)


@dataclasses.dataclass
class WorkerConfig:
    """One worker process. mesh device ranges refer to the worker's own (simulated) devices.

    speculative: on a decode worker, speculative decoding of its rows; on a prefill worker, a
    "draft:DIR:K" spec places the draft model there too, so it prefills the draft's KV and ships it
    with the target's to decode workers that speculate with the same draft (others: the spec is
    ignored there, and a decode worker with a draft but no shipped draft KV feeds it the prompt)."""

    role: str  # "prefill" or "decode"
    name: str
    mesh: str = "tp=1"
    dtype: str = "float32"  # weight storage dtype
    compute_dtype: str = "float32"  # activations and KV
    rules: dict | None = None
    devices: int | None = None  # simulated CPU devices in the process (default: what the mesh needs)
    decode_steps: int = 8
    num_pages: int = 256  # KV pages (decode: the decode cache; prefill: its prefix cache)
    page_size: int = 16
    max_batch: int = 16
    max_batch_tokens: int = 8192  # prefill: padded tokens per prefill batch
    prefill_chunk: int | None = 512  # prefill: prompt tokens per prefill call (None: whole prompts)
    prefix_cache: bool = True
    speculative: str | None = None  # speculative decoding (engine/speculative.py), None = off; see below
    draft_tp: int = 1  # "draft:DIR:K": the draft model's tensor-parallel size (engine/draft.py)

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"role must be 'prefill' or 'decode', got {self.role!r}")

    def engine_options(self):
        """This worker's settings as the engine builder takes them (engine/build.py)."""
        from infire_jax.engine.build import EngineOptions

        return EngineOptions(
            decode_steps=self.decode_steps, kv_pages=self.num_pages, page_size=self.page_size,
            max_decode_batch=self.max_batch, prefill_max_tokens=self.max_batch_tokens,
            prefix_cache=self.prefix_cache, prefill_chunk=self.prefill_chunk, speculative=self.speculative,
            draft_tp=self.draft_tp,
        )

    def mesh_devices(self) -> int:
        from infire_jax.mesh import parse_mesh

        spec = parse_mesh(self.mesh)
        return spec.last_device + 1 if spec.last_device is not None else spec.num_devices


# ================================================================================================
# Worker processes
# ================================================================================================
def worker_main(cfg: WorkerConfig, opts: dict[str, Any], address: Any, authkey: bytes) -> None:
    """Entry point of a worker process (spawned: JAX is initialised here, with this worker's devices)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:  # the process's own device count rules
        os.environ["XLA_FLAGS"] = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
    import jax

    jax.config.update("jax_platforms", opts.get("platform", "cpu"))
    jax.config.update("jax_num_cpu_devices", int(cfg.devices or cfg.mesh_devices()))
    from infire_jax import boot

    boot.use_compilation_cache(opts.get("compilation_cache_dir"))  # as the client's process: before any compile
    conn = Client(address, authkey=authkey)
    code = 0
    try:
        conn.send(("connected", dict(name=cfg.name, pid=os.getpid())))
        try:
            server = (_PrefillServer if cfg.role == "prefill" else _DecodeServer)(cfg, opts, conn)
        except Exception as e:  # noqa: BLE001 - reported to the client, which raises WorkerStartError
            conn.send(("error", dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())))
            code = 1
            return
        conn.send(("hello", server.hello()))
        server.serve()
    except (EOFError, OSError):  # the client went away: nothing left to serve
        code = 2
    finally:
        try:
            conn.close()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)  # do not wait for library threads (transfer server) at interpreter exit


def _exit_text(process: Any) -> str:
    code = process.exitcode
    if code is None:
        return "still running"
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _error_payload(ids: Sequence[Any], e: BaseException) -> dict[str, Any]:
    return dict(ids=list(ids), error_type=type(e).__name__, error=f"{type(e).__name__}: {e}")


class _Server:
    """Shared worker-process state: the model on this worker's mesh, its core worker, the transfer endpoint."""

    def __init__(self, cfg: WorkerConfig, opts: dict[str, Any], conn):
        import jax

        from infire_jax.engine.build import place_programs
        from infire_jax.kv.remote_transfer import TransferEndpoint

        self.cfg, self.opts, self.conn = cfg, opts, conn
        self.programs = place_programs(
            opts["model_dir"], cfg.mesh, rules=cfg.rules, dtype=cfg.dtype, compute_dtype=cfg.compute_dtype,
            decode_steps=cfg.decode_steps,
        )
        self.layout = self.programs.layout
        self.kv_spec = self.programs.kv_spec()
        self.endpoint = TransferEndpoint(int(opts.get("num_transports", 2)))
        self.tamper: dict[str, Any] = {}  # test hooks (the "debug" message): simulate a misbehaving peer
        self.jax = jax
        self.worker: Any = None

    def hello(self) -> dict[str, Any]:
        c, model_cfg, w = self.cfg, self.programs.placed.cfg, self.worker
        return dict(
            name=c.name, role=c.role, pid=os.getpid(), mesh=c.mesh, devices=len(self.jax.devices()),
            kv_spec=self.kv_spec, address=self.endpoint.address, num_transports=self.endpoint.num_transports,
            layout=dict(mesh=tuple(self.layout.mesh.shape.items()), rules=dict(self.layout.rules)),
            vocab_size=model_cfg.vocab_size, context=model_cfg.max_position_embeddings,
            page_size=c.page_size, num_pages=c.num_pages, decode_steps=c.decode_steps, max_batch=c.max_batch,
            identity=w.kv.identity, page_sizes=w.page_sizes, context_tokens=w.context_tokens,
            compilation_cache_dir=self.jax.config.jax_compilation_cache_dir,
            overshoot=w.overshoot if c.role == "decode" else 0, draft=self.draft_info(),
        )

    def draft_info(self) -> dict[str, Any] | None:
        """The draft model whose KV this worker prefills (prefill) or drafts from (decode): its KV spec and,
        decode, its layout (the shape its shipped pages are pulled in); None without one."""
        draft = self.worker.draft if self.cfg.role == "prefill" else self.worker.draft_kv
        if draft is None:
            return None
        layout = draft.programs.layout
        return dict(kv_spec=draft.kv_spec, layout=dict(mesh=tuple(layout.mesh.shape.items()), rules=dict(layout.rules)))

    def send(self, kind: str, payload: dict[str, Any]) -> None:
        self.conn.send((kind, payload))

    def state(self) -> dict[str, Any]:
        """What the client's copy of this worker needs: index changes (for routing), counters."""
        w = self.worker
        spec = w.speculator.counters if self.cfg.role == "decode" and w.speculator is not None else None
        return dict(events=w.kv.drain_events(), counters=dataclasses.asdict(w.counters),
                    evicted_pages=w.kv.evicted_pages, free_blocks=w.kv.free_blocks,
                    spec=dataclasses.asdict(spec) if spec else None)

    def serve(self) -> None:
        while True:
            if self.conn.poll(0.0 if self.busy else 1.0):
                while True:
                    kind, p = self.conn.recv()
                    if kind == "shutdown":
                        return
                    if kind == "debug":
                        self.tamper.update(p)
                    else:
                        getattr(self, "on_" + kind)(p)
                    if not self.conn.poll(0.0):
                        break
            self.work()

    def on_cancel(self, p: dict[str, Any]) -> None:
        for key in p["ids"]:
            r = self.requests.pop(key, None)
            if r is not None:
                self.worker.release(r)

    def _fail(self, reqs: Sequence[Any], e: BaseException) -> None:
        for r in reqs:
            self.requests.pop(r.id, None)
            self.worker.release(r)
        if reqs:
            self.send("failed", _error_payload([r.id for r in reqs], e))


class _PrefillServer(_Server):
    def __init__(self, cfg, opts, conn):
        super().__init__(cfg, opts, conn)
        from infire_jax.engine.build import prefill_draft, prefill_worker

        options = cfg.engine_options()
        self.worker = prefill_worker(cfg.name, self.programs, options, prefill_draft(self.programs, options))
        self.worker.kv.track_events()
        self.requests: dict[Any, Any] = {}  # key -> core Request, while it prefills here
        self.targets: dict[str, dict[str, Any]] = {}  # decode worker name -> its announced layout
        self.warned: set[str] = set()  # decode workers with another draft model (warned once)
        self.uuids = itertools.count(1)

    @property
    def busy(self) -> bool:
        """Work that can go on without a message: prompts being prefilled (rows waiting for pages
        wait for a prefill call or a cancel to free some)."""
        return bool(self.worker.prefilling)

    def on_prefill(self, p: dict[str, Any]) -> None:
        import numpy as np

        from infire_jax.engine.core import Request

        target = p["target"]
        keys = [q["id"] for q in p["requests"]]
        if self.tamper.get("prefill_delay"):  # test hook: a hung prefill worker
            time.sleep(float(self.tamper["prefill_delay"]))
        try:
            self.kv_spec.check(target["kv_spec"])  # before any work: a mismatch never reaches a transfer
        except KVLayoutMismatch as e:
            self.send("failed", _error_payload(keys, e))
            return
        self.targets[target["name"]] = dict(target, mode=p["mode"])
        draft = self._ships_draft(target)
        for q in p["requests"]:
            r = Request(q["id"], np.asarray(q["prompt"], np.int32), SamplingParams(**q["params"]), time.perf_counter())
            self.requests[r.id] = r
            self.worker.submit(r, dest=target["name"], skip_tokens=q["skip"], draft=draft)

    def _ships_draft(self, target: dict[str, Any]) -> bool:
        """Whether this worker prefills and ships the draft model's KV for `target`: both have the draft
        (equal KV specs; a different one is warned about once, and that decode worker feeds its own)."""
        mine, theirs = self.worker.draft, target["draft"]
        if mine is None or theirs is None:
            return False
        if theirs["kv_spec"] != mine.kv_spec:
            if target["name"] not in self.warned:
                self.warned.add(target["name"])
                warnings.warn(f"decode worker {target['name']!r} speculates with another draft model than prefill "
                              f"worker {self.cfg.name!r} ({theirs['kv_spec']} vs {mine.kv_spec}): its draft KV is not "
                              "shipped, it feeds the prompt to its draft itself", RuntimeWarning)
            return False
        return True

    def work(self) -> None:
        """One prefill call; its pages offered to their decode workers, one offer per destination."""
        w = self.worker
        if not w.rows:
            return
        w.in_call = []
        t0 = time.perf_counter()
        try:
            shipments = w.step()
        except Exception as e:  # noqa: BLE001 - this call's requests fail, the worker goes on
            self._fail(w.in_call, e)
            return
        prefill_s = time.perf_counter() - t0
        for s in shipments:
            try:
                self.offer(s, prefill_s)
            except Exception as e:  # noqa: BLE001
                self._fail([self.requests[row.id] for row in s.rows if row.id in self.requests], e)
        for r in list(self.requests.values()):
            if r.id not in w.rows:  # its prompt is complete and shipped
                self.requests.pop(r.id)

    def offer(self, s, prefill_s: float) -> None:
        import dataclasses as dc

        from infire_jax.kv import remote_transfer as rt
        from infire_jax.kv.cache import paged_axes

        jax, target = self.jax, self.targets[s.dest]
        send_mode = self.tamper.get("send_mode") or target["mode"]
        shapes = self.kv_spec.page_shapes(s.counts, target["page_sizes"])
        shardings = rt.sender_shardings(send_mode, shapes, paged_axes(self.kv_spec.logical_axes), target["layout"],
                                        jax.devices())
        t0 = time.perf_counter()
        kv = jax.device_put(s.arrays, tuple(shardings))
        draft = None
        if s.draft is not None:  # the draft model's pages ride in the same offer, after the target's
            dspec = self.worker.draft.kv_spec
            draft_sh = rt.sender_shardings(send_mode, dspec.page_shapes((s.draft.count,), (self.worker.page_size,)),
                                           paged_axes(dspec.logical_axes), target["draft"]["layout"], jax.devices())
            draft_kv = jax.device_put(s.draft.arrays, tuple(draft_sh))
            draft = dict(rows=[dc.astuple(row) for row in s.draft.rows], count=s.draft.count, real=s.draft.real,
                         descs=[rt.describe(a.sharding, a.shape, a.dtype) for a in draft_kv])
            kv = tuple(kv) + tuple(draft_kv)
        hidden = None
        if s.hidden:  # an EAGLE-3 head's prompt states ride last, one (positions, width) array for every row
            import numpy as np

            states = np.concatenate([x for _, _, x in s.hidden]).astype(np.float32, copy=False)
            hidden = dict(rows=[(rid, start, len(x)) for rid, start, x in s.hidden], shape=states.shape)
            kv = tuple(kv) + (jax.device_put(states, jax.devices()[0]),)
        kv = jax.block_until_ready(kv)
        sums = rt.checksum(kv) if self.opts.get("checksum", True) else None
        if self.tamper.get("corrupt"):
            kv = (jax.block_until_ready(kv[0] + 1),) + kv[1:]  # arrives in the right layout but with the wrong bytes
        reshard_s = time.perf_counter() - t0
        uuid = next(self.uuids)
        self.endpoint.offer(uuid, kv, float(self.opts.get("offer_timeout", 60.0)))
        n_target = len(s.arrays)
        spec = self.kv_spec
        if self.tamper.get("kv_spec"):
            spec = dc.replace(spec, **self.tamper["kv_spec"])
        final = [dict(id=r.id, output=[int(t) for t in r.output], finish_reason=r.finish_reason,
                      cached_tokens=r.cached_tokens) for r in s.final]
        self.send("shipped", dict(
            dest=s.dest, uuid=uuid, address=self.endpoint.address, num_transports=self.endpoint.num_transports,
            kv_spec=spec, descs=[rt.describe(a.sharding, a.shape, a.dtype) for a in kv[:n_target]], checksums=sums,
            rows=[dc.astuple(row) for row in s.rows], counts=s.counts, real=s.real, final=final, draft=draft,
            hidden=hidden, hidden_layers=s.hidden_layers, mode=target["mode"], prefill_s=prefill_s, reshard_s=reshard_s, **self.state(),
        ))

    def on_bench_offer(self, p: dict[str, Any]) -> None:
        import numpy as np

        jax = self.jax
        n = int(p["bytes"]) // 4
        x = jax.block_until_ready(jax.device_put(np.arange(n, dtype=np.float32), jax.devices()[0]))
        uuids = [next(self.uuids) for _ in range(p["repeats"])]
        for u in uuids:
            self.endpoint.offer(u, [x], float(self.opts.get("offer_timeout", 60.0)))
        self.send("bench_offered", dict(uuids=uuids, address=self.endpoint.address, n=n))


class _DecodeServer(_Server):
    def __init__(self, cfg, opts, conn):
        super().__init__(cfg, opts, conn)
        from infire_jax.engine.build import decode_worker

        self.worker = decode_worker(cfg.name, self.programs, cfg.engine_options())
        self.worker.kv.track_events()
        self.requests: dict[Any, Any] = {}  # key -> core Request, while it lives here
        self.sent: dict[Any, int] = {}  # key -> tokens already reported

    @property
    def busy(self) -> bool:
        """Work that can go on without a message: rows to decode (reservations waiting for pages wait
        for a decode call or a cancel to free some; rows waiting for their pages, for "accept")."""
        w = self.worker
        return bool(w.running or w.ready)

    # -- messages ---------------------------------------------------------------------------------
    def on_reserve(self, p: dict[str, Any]) -> None:
        import numpy as np

        from infire_jax.engine.core import Request

        for q in p["requests"]:
            r = Request(q["id"], np.asarray(q["prompt"], np.int32), SamplingParams(**q["params"]), time.perf_counter())
            self.requests[r.id] = r
            self.worker.submit(r)

    def on_accept(self, p: dict[str, Any]) -> None:
        keys = [row[0] for row in p["rows"]]
        try:
            pulled, finished = self.pull(p)
        except Exception as e:  # noqa: BLE001 - these requests fail, the worker goes on
            self._fail([self.requests[k] for k in keys if k in self.requests], e)
            return
        self.send("accepted", dict(ids=keys, **pulled, **self.state()))
        if finished:
            self.report([], finished)

    def pull(self, p: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        import numpy as np

        from infire_jax.engine.core import DraftPages, Shipment, ShippedRow
        from infire_jax.kv import remote_transfer as rt

        jax, programs = self.jax, self.programs
        # 1. everything is checked before a byte moves
        p["kv_spec"].check(self.kv_spec)
        if p["num_transports"] != self.endpoint.num_transports:
            raise rt.TransferError(
                f"the prefill side uses {p['num_transports']} transport addresses, this decode worker "
                f"{self.endpoint.num_transports}; start both with the same num_transports"
            )
        counts = tuple(p["counts"])
        shapes = self.kv_spec.page_shapes(counts, self.worker.page_sizes)
        packed = programs.pack(counts), programs.pack(self.worker.page_sizes)
        if p["mode"] == "mesh":
            shardings = programs.canonical_page_shardings(*packed)
        else:
            first = next(iter(self.layout.mesh.devices.flat))
            shardings = (jax.sharding.SingleDeviceSharding(first),) * len(shapes)
        mine = [rt.describe(sh, shape, self.kv_spec.dtype) for sh, shape in zip(shardings, shapes)]
        rt.check_descriptions(p["descs"], mine, f"decode worker {self.cfg.name!r}")
        structs = [jax.ShapeDtypeStruct(s, np.dtype(self.kv_spec.dtype), sharding=sh) for s, sh in zip(shapes, shardings)]
        draft, dk = p.get("draft"), self.worker.draft_kv
        if draft is not None:  # the draft model's pages, after the target's in the same offer
            if dk is None:
                raise KVLayoutMismatch(f"the prefill side ships draft-model pages but decode worker {self.cfg.name!r} "
                                       "has no draft model; start both with the same 'draft:DIR:K'")
            p["draft_kv_spec"].check(dk.kv_spec)
            ps = self.worker.page_size
            draft_shapes = dk.kv_spec.page_shapes((draft["count"],), (ps,))
            draft_sh = (dk.programs.canonical_page_shardings(draft["count"], ps) if p["mode"] == "mesh" else
                        (jax.sharding.SingleDeviceSharding(next(iter(dk.programs.layout.mesh.devices.flat))),)
                        * len(draft_shapes))
            rt.check_descriptions(draft["descs"], [rt.describe(sh, shape, dk.kv_spec.dtype) for sh, shape in
                                                   zip(draft_sh, draft_shapes)], f"decode worker {self.cfg.name!r} (draft)")
            structs += [jax.ShapeDtypeStruct(s, np.dtype(dk.kv_spec.dtype), sharding=sh)
                        for s, sh in zip(draft_shapes, draft_sh)]
        hidden = p.get("hidden")
        if hidden is not None:  # the prompt's states for an EAGLE-3 head, after the pages
            structs.append(jax.ShapeDtypeStruct(tuple(hidden["shape"]), np.float32,
                                                sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0])))
        # 2. the transfer
        res = self.endpoint.pull(p["address"], p["uuid"], structs, float(self.opts.get("pull_timeout", 30.0)))
        kv = tuple(res.arrays)
        if p.get("checksums") is not None and rt.checksum(kv) != list(p["checksums"]):
            raise KVLayoutMismatch(
                "the pulled KV does not match the sender's checksums (wrong bytes or shards in the wrong "
                "place); refusing to decode from it"
            )
        states = []
        if hidden is not None:
            values, kv, start = np.asarray(kv[-1]), kv[:-1], 0
            for rid, first, n in hidden["rows"]:
                states.append((rid, first, values[start:start + n]))
                start += n
        # 3. local reshard into the decode layout (one device_put), written into the rows' pages
        t0 = time.perf_counter()
        kv, draft_kv = kv[: len(shapes)], kv[len(shapes):]
        kv = jax.device_put(kv, programs.canonical_page_shardings(*packed))
        pages = None
        if draft is not None:
            draft_kv = jax.device_put(draft_kv, dk.programs.canonical_page_shardings(draft["count"], self.worker.page_size))
            pages = DraftPages([ShippedRow(*row) for row in draft["rows"]], draft["count"], draft["real"], draft_kv)
        for f in p["final"]:  # first tokens, sampled by the prefill worker (reported to the client by it)
            r = self.requests.get(f["id"])
            if r is not None:
                r.output, r.finish_reason, r.cached_tokens = list(f["output"]), f["finish_reason"], f["cached_tokens"]
                self.sent[r.id] = len(r.output)
        shipment = Shipment(self.cfg.name, [ShippedRow(*row) for row in p["rows"]], counts, tuple(p["real"]), kv, [], pages,
                            states, tuple(p["hidden_layers"]))
        finished = self.worker.receive(shipment, kv, draft_kv if pages is not None else None)
        jax.block_until_ready((self.worker.k_pages, self.worker.v_pages))
        reshard_s = time.perf_counter() - t0
        for row in shipment.rows:
            r = self.requests.get(row.id)
            if r is not None:
                r.transfer_seconds += res.seconds
        return dict(pull_s=res.seconds, local_reshard_s=reshard_s, bytes=res.bytes,
                    pages=sum(row.blocks for row in shipment.rows)), finished

    def on_bench_pull(self, p: dict[str, Any]) -> None:
        import numpy as np

        jax = self.jax
        devs = list(self.layout.mesh.devices.flat)
        n = p["n"]
        sh = jax.sharding.SingleDeviceSharding(devs[0])
        pulls = []
        for u in p["uuids"]:
            res = self.endpoint.pull(p["address"], u, [jax.ShapeDtypeStruct((n,), np.float32, sharding=sh)], 60.0)
            ok = bool(np.asarray(res.arrays[0][-1]) == np.float32(n - 1))
            pulls.append(res.seconds)
            del res
        # the same bytes copied in-process: device to another device (or host to device with one device)
        all_devs = jax.devices()
        x = jax.block_until_ready(jax.device_put(np.arange(n, dtype=np.float32), all_devs[0]))
        dst = all_devs[1] if len(all_devs) > 1 else all_devs[0]
        src = x if len(all_devs) > 1 else np.arange(n, dtype=np.float32)
        puts = []
        for _ in p["uuids"]:
            t0 = time.perf_counter()
            jax.block_until_ready(jax.device_put(src, dst))
            puts.append(time.perf_counter() - t0)
        self.send("bench_result", dict(
            bytes=4 * n, pull_s=pulls, device_put_s=puts, ok=ok,
            device_put_kind="device->device" if len(all_devs) > 1 else "host->device",
        ))

    # -- reserving and decoding -------------------------------------------------------------------
    def work(self) -> None:
        w = self.worker
        admitted = w.admit()
        if admitted:
            self.send("reserved", dict(rows=[dict(id=row.id, skip=row.lease.hit_tokens) for row in admitted],
                                       **self.state()))
        if not (w.running or w.ready):
            return
        if self.tamper.get("step_delay"):  # test hook: a slow decode worker
            time.sleep(float(self.tamper["step_delay"]))
        if w.speculator is not None:  # test hook: verify whenever a row has drafts (no cost model)
            w.speculator.adaptive = not self.tamper.get("verify_always")
        w.in_call = []
        try:
            finished = w.step()
        except Exception as e:  # noqa: BLE001 - the running batch fails, the worker goes on
            self._fail(w.in_call, e)
            return
        self.report(w.in_call, finished)

    def report(self, stepped: Sequence[Any], finished: Sequence[Any]) -> None:
        tokens = {}
        for r in stepped:
            new = r.output[self.sent.get(r.id, 0):]
            if new:
                tokens[r.id] = [int(x) for x in new]
                self.sent[r.id] = len(r.output)
        done = [dict(id=r.id, output=[int(x) for x in r.output], finish_reason=r.finish_reason,
                     transfer_s=r.transfer_seconds, proposed_tokens=r.proposed_tokens,
                     accepted_tokens=r.accepted_tokens) for r in finished]
        for r in finished:
            self.requests.pop(r.id, None)
            self.sent.pop(r.id, None)
        self.send("tokens", dict(tokens=tokens, done=done, **self.state()))


# ================================================================================================
# The client
# ================================================================================================
@dataclasses.dataclass
class RemoteRequest:
    id: Any
    prompt: list[int]
    params: SamplingParams
    submitted: float
    output: list[int] = dataclasses.field(default_factory=list)
    status: str = "queued"  # queued, reserving, prefill, transfer, decoding, done, failed
    error: str | None = None
    error_type: str | None = None
    finish_reason: str | None = None
    times: dict[str, float] = dataclasses.field(default_factory=dict)
    prefill_worker: str | None = None
    decode_worker: str | None = None
    job: int | None = None
    attempt: int = 0  # placements so far; workers know the request as (id, attempt)
    retries: int = 0
    cached_tokens: int = 0
    prefill_s: float = 0.0
    pull_s: float = 0.0
    local_reshard_s: float = 0.0
    transfer_bytes: int = 0
    proposed_tokens: int = 0  # speculative drafts verified for it (decode worker)
    accepted_tokens: int = 0
    block_hashes: dict[bytes, list[bytes]] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def key(self) -> tuple[Any, int]:
        return (self.id, self.attempt)

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed")

    def raise_error(self) -> None:
        if self.status == "failed":
            raise _error_class(self.error_type)(f"request {self.id!r} failed: {self.error}")

    def metrics(self) -> dict[str, Any]:
        t, n = self.times, len(self.output)
        out = dict(
            id=self.id, status=self.status, error=self.error, error_type=self.error_type,
            finish_reason=self.finish_reason, prompt_tokens=len(self.prompt), cached_tokens=self.cached_tokens,
            generated_tokens=n, prefill_worker=self.prefill_worker, decode_worker=self.decode_worker,
            retries=self.retries, prefill_s=self.prefill_s, transfer_s=self.pull_s + self.local_reshard_s,
            pull_s=self.pull_s, local_reshard_s=self.local_reshard_s, transfer_bytes=self.transfer_bytes,
            proposed_tokens=self.proposed_tokens, accepted_tokens=self.accepted_tokens,
        )
        if "dispatched" in t:
            out["queue_s"] = t["dispatched"] - self.submitted
        if "first_token" in t:
            out["ttft_s"] = t["first_token"] - self.submitted
        if "end" in t:
            out["e2e_s"] = t["end"] - self.submitted
            if n > 1 and "first_token" in t and self.status == "done":
                out["tpot_s"] = (t["end"] - t["first_token"]) / (n - 1)
        return out


@dataclasses.dataclass
class _Worker:
    cfg: WorkerConfig
    process: Any
    conn: Any = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    alive: bool = True
    last_heard: float = 0.0
    death: str | None = None
    index: set[bytes] = dataclasses.field(default_factory=set)  # block hashes its prefix index holds
    counters: dict[str, int] = dataclasses.field(default_factory=dict)  # its latest counters
    evicted_pages: int = 0
    free_blocks: int = 0
    spec: dict[str, int] | None = None  # decode: its speculation counters (SpecCounters), if on

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def role(self) -> str:
        return self.cfg.role

    def describe(self) -> str:
        return f"{self.role} worker {self.name!r} (pid {self.process.pid})"

    def update(self, p: dict[str, Any]) -> None:
        """Apply the state a worker sent with a message: index changes, counters."""
        for kind, h in p.get("events", ()):
            self.index.add(h) if kind == "add" else self.index.discard(h)
        if "counters" in p:
            self.counters, self.evicted_pages, self.free_blocks = p["counters"], p["evicted_pages"], p["free_blocks"]
            self.spec = p["spec"]

    def hashes(self, r: RemoteRequest) -> list[bytes]:
        from infire_jax.kv.manager import block_hashes

        ident = self.info["identity"]
        if ident not in r.block_hashes:
            r.block_hashes[ident] = block_hashes(r.prompt, self.info["page_size"], ident)
        return r.block_hashes[ident]


class _View:
    """The router's view of a worker process (core.Placeable): its cache from its index events, its
    load from the requests this client placed on it."""

    def __init__(self, engine: "RemoteEngine", w: _Worker):
        self.engine, self.w = engine, w

    def fits(self, r: RemoteRequest) -> bool:
        return self.engine._pages_for(r, self.w) <= self.w.info["num_pages"]

    def cached_prefix(self, r: RemoteRequest) -> int:
        n = 0
        for h in self.w.hashes(r):
            if h not in self.w.index:
                break
            n += 1
        return n * self.w.info["page_size"]

    @property
    def load_tokens(self) -> int:
        return self.engine._load(self.w)

    @property
    def free_blocks(self) -> int:
        return self.w.free_blocks


class RemoteEngine:
    """Client of N prefill and M decode worker processes (see the module docstring)."""

    def __init__(
        self,
        model_dir: Any,
        prefill: Sequence[WorkerConfig],
        decode: Sequence[WorkerConfig],
        *,
        mode: str = "mesh",
        num_transports: int = 2,
        start_timeout: float = 180.0,
        stall_timeout: float = 60.0,
        pull_timeout: float = 30.0,
        offer_timeout: float = 60.0,
        max_retries: int = 1,
        checksum: bool = True,
        platform: str = "cpu",
        compilation_cache_dir: str | os.PathLike | None = "default",
    ):
        from infire_jax.kv.remote_transfer import TRANSFER_MODES

        if mode not in TRANSFER_MODES:
            raise ValueError(f"mode must be one of {TRANSFER_MODES}, got {mode!r}")
        if not prefill or not decode:
            raise ValueError("a remote engine needs at least one prefill and one decode worker")
        names = [c.name for c in (*prefill, *decode)]
        if len(set(names)) != len(names):
            raise ValueError(f"worker names must be unique, got {names}")
        self.model_dir = str(model_dir)
        self.mode, self.max_retries = mode, max_retries
        self.start_timeout, self.stall_timeout = start_timeout, stall_timeout
        decode_devices = max(c.mesh_devices() for c in decode)
        self.configs = [
            dataclasses.replace(c, devices=c.devices or max(c.mesh_devices(), decode_devices if mode == "mesh" else 1))
            for c in prefill
        ] + [dataclasses.replace(c, devices=c.devices or c.mesh_devices()) for c in decode]
        self.opts = dict(
            model_dir=self.model_dir, num_transports=num_transports, pull_timeout=pull_timeout,
            offer_timeout=offer_timeout, checksum=checksum, platform=platform,
            compilation_cache_dir=None if compilation_cache_dir is None else str(compilation_cache_dir),
        )
        self.workers: dict[str, _Worker] = {}
        self.requests: dict[Any, RemoteRequest] = {}
        self.queue: collections.deque[Any] = collections.deque()
        self._ids = itertools.count()
        self._jobs = itertools.count()
        self._authkey = secrets.token_bytes(32)
        self._listener: Listener | None = None
        self.transfers: list[dict[str, Any]] = []  # one entry per KV transfer (a prefill call's pages)
        self._base: dict[str, tuple[dict[str, int], int]] = {}  # counters at the last reset_stats
        self.started = time.perf_counter()

    # ---- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "RemoteEngine":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "RemoteEngine":
        """Spawn the workers and wait (at most start_timeout) for every handshake."""
        ctx = multiprocessing.get_context("spawn")
        self._listener = Listener(("127.0.0.1", 0), authkey=self._authkey)
        conns: queue.Queue = queue.Queue()
        stop = threading.Event()

        def accept_loop() -> None:
            while not stop.is_set():
                try:
                    conns.put(self._listener.accept())
                except Exception:  # noqa: BLE001 - bad handshakes are dropped; closed listener ends
                    if stop.is_set():
                        return

        thread = threading.Thread(target=accept_loop, name="remote-engine-accept", daemon=True)
        thread.start()
        try:
            for cfg in self.configs:
                proc = ctx.Process(
                    target=worker_main, args=(cfg, self.opts, self._listener.address, self._authkey),
                    name=f"infire-{cfg.name}", daemon=True,
                )
                proc.start()
                self.workers[cfg.name] = _Worker(cfg, proc)
            self._handshake(conns)
            sizes = {w.info["page_size"] for w in self.workers.values()}
            if len(sizes) > 1:
                raise ValueError(f"prefill and decode workers must use one page_size (pages cross whole), got {sorted(sizes)}")
        except BaseException:
            self.close()
            raise
        finally:
            stop.set()
            try:  # wake the accept loop so its thread ends
                Client(self._listener.address, authkey=self._authkey).close()
            except Exception:  # noqa: BLE001
                pass
            thread.join(5.0)
            self._listener.close()
        self.started = time.perf_counter()
        return self

    def _handshake(self, conns: queue.Queue) -> None:
        deadline = time.perf_counter() + self.start_timeout
        waiting = dict(self.workers)
        by_conn: dict[Any, _Worker] = {}
        while waiting:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise WorkerStartError(
                    f"workers {sorted(waiting)} did not finish start-up within {self.start_timeout:g} s"
                )
            while not conns.empty():
                c = conns.get()
                if c.poll(5.0):
                    kind, p = c.recv()
                    if kind == "connected" and p["name"] in waiting:
                        w = waiting[p["name"]]
                        w.conn = c
                        by_conn[c] = w
                        continue
                c.close()
            for w in waiting.values():
                if not w.process.is_alive():
                    why = f"exited with code {w.process.exitcode} during start-up"
                    try:  # its last words, if it managed to send them
                        while w.conn is not None and w.conn.poll(0):
                            kind, p = w.conn.recv()
                            if kind == "error":
                                why = f"failed to start: {p['error']}\n{p['traceback']}"
                    except (EOFError, OSError):
                        pass
                    raise WorkerStartError(f"{w.describe()} {why}")
            ready = wait(list(by_conn), timeout=min(0.2, remaining)) if by_conn else time.sleep(0.05)
            for c in ready or ():
                w = by_conn[c]
                try:
                    kind, p = c.recv()
                except (EOFError, OSError):
                    raise WorkerStartError(f"{w.describe()} closed its connection during start-up") from None
                if kind == "error":
                    raise WorkerStartError(f"{w.describe()} failed to start: {p['error']}\n{p['traceback']}")
                if kind == "hello":
                    w.info, w.last_heard, w.free_blocks = p, time.perf_counter(), p["num_pages"]
                    del by_conn[c]
                    waiting.pop(w.name, None)

    def close(self, timeout: float = 10.0) -> None:
        """Shut every worker down (killed if it does not exit within timeout; at once if it never
        finished its handshake)."""
        for w in self.workers.values():
            if w.conn is not None and w.alive and w.info:
                try:
                    w.conn.send(("shutdown", {}))
                    continue
                except Exception:  # noqa: BLE001
                    pass
            if w.process.is_alive():
                w.process.kill()
        deadline = time.perf_counter() + timeout
        for w in self.workers.values():
            w.process.join(max(0.0, deadline - time.perf_counter()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(5.0)
            w.alive = False
            if w.conn is not None:
                w.conn.close()
        for r in self.requests.values():
            if not r.finished:
                self._fail(r, "RemoteRequestError", "the engine was closed before the request finished")

    def kill_worker(self, name: str) -> None:
        """SIGKILL one worker process (for failure tests); the engine notices on its next step."""
        self.workers[name].process.kill()

    def alive(self, role: str) -> list[_Worker]:
        return [w for w in self.workers.values() if w.alive and w.role == role]

    def debug(self, name: str, **tamper: Any) -> None:
        """Test hook: make a worker misbehave (prefill: kv_spec={...} sends a tampered KVSpec,
        send_mode='single' ignores the agreed layout, corrupt=True sends wrong bytes, prefill_delay=seconds
        sleeps before every job; decode: step_delay=seconds sleeps before every decode call,
        verify_always=True verifies whenever a row has drafts)."""
        self.workers[name].conn.send(("debug", tamper))

    # ---- requests -------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams | dict[str, Any], request_id: Any = None) -> RemoteRequest:
        rid = next(self._ids) if request_id is None else request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        r = RemoteRequest(rid, [], SamplingParams(), time.perf_counter())
        self.requests[rid] = r
        try:
            r.params = params if isinstance(params, SamplingParams) else SamplingParams(**params)
            info = self.alive("prefill")[0].info if self.alive("prefill") else None
            if info is None:
                raise WorkerDied("no prefill worker is alive")
            decoders = self.alive("decode")
            if not decoders:
                raise WorkerDied("no decode worker is alive")
            context = min([info["context"]] + [w.info["context_tokens"] or info["context"] for w in decoders])
            r.prompt = validate_prompt(prompt, info["vocab_size"], context, r.params.max_new_tokens).tolist()
            if not any(self._pages_for(r, w) <= w.info["num_pages"] for w in decoders):
                raise RequestError("request needs more KV pages than any decode worker has; lower max_new_tokens")
        except (RequestError, ValueError, TypeError, WorkerDied) as e:
            self._fail(r, type(e).__name__, f"{type(e).__name__}: {e}")
            return r
        self.queue.append(rid)
        return r

    @staticmethod
    def _pages_for(r: RemoteRequest, w: _Worker) -> int:
        """Pages of the full-length pool the request reserves on w (engine/core.py: the same rule)."""
        total = len(r.prompt) + (r.params.max_new_tokens + w.info["overshoot"] if w.role == "decode" else 0)
        return pages_needed(total, w.info["page_size"])

    def _live(self, key: Any) -> RemoteRequest | None:
        """The request a worker's key names, if that placement is still the current one."""
        rid, attempt = key
        r = self.requests.get(rid)
        return r if r is not None and not r.finished and r.attempt == attempt else None

    def _fail(self, r: RemoteRequest, error_type: str, error: str) -> None:
        if r.finished:
            return
        r.status, r.error_type, r.error = "failed", error_type, error
        r.times["end"] = time.perf_counter()
        self._cancel([r])

    def _done(self, r: RemoteRequest, output: list[int], finish_reason: str | None) -> None:
        r.output, r.finish_reason, r.status = list(output), finish_reason, "done"
        r.times["end"] = time.perf_counter()

    @property
    def busy(self) -> bool:
        return any(not r.finished for r in self.requests.values())

    # ---- routing --------------------------------------------------------------------------------
    def _load(self, w: _Worker) -> int:
        """Routing load in tokens (as core workers count it): prompt tokens waiting for prefill on a
        prefill worker, tokens still to generate on a decode worker."""
        if w.role == "prefill":
            return sum(len(r.prompt) for r in self.requests.values() if r.prefill_worker == w.name and r.status == "prefill")
        return sum(r.params.max_new_tokens - len(r.output) for r in self.requests.values()
                   if r.decode_worker == w.name and not r.finished)

    def _in_flight(self, w: _Worker) -> int:
        """Requests the worker itself is working on now (it must keep talking while there are any). A
        decode worker's reservations waiting for pages or for their prefill are not its work."""
        stages = ("prefill",) if w.role == "prefill" else ("transfer", "decoding")
        name = "prefill_worker" if w.role == "prefill" else "decode_worker"
        return sum(1 for r in self.requests.values() if getattr(r, name) == w.name and r.status in stages)

    def _dispatch(self) -> None:
        """Place queued requests on decode workers (router: cached prefix and load); each reserves
        pages and answers "reserved" with what it already holds (then the prefill is placed)."""
        by_worker: dict[str, list[RemoteRequest]] = {}
        while self.queue:
            r = self.requests[self.queue.popleft()]
            if r.finished:
                continue
            prefills, decoders = self.alive("prefill"), self.alive("decode")
            if not prefills or not decoders:
                role = "prefill" if not prefills else "decode"
                self._fail(r, "WorkerDied", f"WorkerDied: no {role} worker is alive")
                continue
            view = Router.choose([_View(self, w) for w in decoders], r)
            if view is None:
                self._fail(r, "RequestError", "RequestError: no surviving decode worker has enough KV pages")
                continue
            r.attempt += 1
            r.decode_worker, r.prefill_worker, r.status = view.w.name, None, "reserving"
            r.times["dispatched"] = time.perf_counter()
            by_worker.setdefault(view.w.name, []).append(r)
        for name, reqs in by_worker.items():
            payload = [dict(id=r.key, prompt=r.prompt, params=dataclasses.asdict(r.params)) for r in reqs]
            self._send(self.workers[name], ("reserve", dict(requests=payload)))

    def _on_reserved(self, w: _Worker, p: dict[str, Any]) -> None:
        w.update(p)
        jobs: dict[str, list[tuple[RemoteRequest, int]]] = {}
        for row in p["rows"]:
            r = self._live(row["id"])
            if r is None:  # cancelled or re-placed meanwhile: give the pages back
                self._send(w, ("cancel", dict(ids=[row["id"]])))
                continue
            prefills = self.alive("prefill")
            view = Router.choose([_View(self, x) for x in prefills], r)
            if view is None:
                why = "no prefill worker is alive" if not prefills else "no prefill worker has enough KV pages"
                kind = "WorkerDied" if not prefills else "RequestError"
                self._fail(r, kind, f"{kind}: {why}")
                continue
            r.prefill_worker, r.status = view.w.name, "prefill"
            jobs.setdefault(view.w.name, []).append((r, row["skip"]))
        target = dict(name=w.name, kv_spec=w.info["kv_spec"], layout=w.info["layout"],
                      page_sizes=w.info["page_sizes"], num_transports=w.info["num_transports"], draft=w.info["draft"])
        for pname, reqs in jobs.items():
            job = next(self._jobs)
            for r, _ in reqs:
                r.job = job
            payload = [dict(id=r.key, prompt=r.prompt, params=dataclasses.asdict(r.params), skip=skip) for r, skip in reqs]
            self._send(self.workers[pname], ("prefill", dict(job=job, requests=payload, target=target, mode=self.mode)))

    def _send(self, w: _Worker, msg: tuple) -> bool:
        try:
            w.conn.send(msg)
            w.last_heard = max(w.last_heard, time.perf_counter())  # silence is counted from here on
            return True
        except (OSError, EOFError, ValueError) as e:
            self._lost(w, f"its connection failed ({type(e).__name__}: {e})")
            return False

    # ---- the loop -------------------------------------------------------------------------------
    def step(self, timeout: float = 0.05) -> None:
        """Dispatch queued requests, wait up to `timeout` for worker messages and handle them."""
        self._dispatch()
        live = [w for w in self.workers.values() if w.alive]
        by_obj: dict[Any, tuple[str, _Worker]] = {}
        for w in live:
            by_obj[w.conn] = ("conn", w)
            by_obj[w.process.sentinel] = ("exit", w)
        ready = wait(list(by_obj), timeout=timeout) if by_obj else []
        exited = []
        for obj in ready:
            what, w = by_obj[obj]
            if what == "exit":
                exited.append(w)
            elif w.alive:
                self._drain(w)
        for w in exited:
            if w.alive:
                w.process.join(1.0)  # reap it, so its exit code is known
                self._drain(w)  # messages it sent before dying still count
                self._lost(w, f"its process ended ({_exit_text(w.process)})")
        now = time.perf_counter()
        for w in live:
            if w.alive and self._in_flight(w) and now - w.last_heard > self.stall_timeout:
                w.process.kill()
                self._lost(w, f"it sent nothing for {now - w.last_heard:.0f} s with requests in flight (killed)")

    def _drain(self, w: _Worker) -> None:
        try:
            while w.alive and w.conn.poll(0):
                msg = w.conn.recv()
                w.last_heard = time.perf_counter()
                self._handle(w, *msg)
        except (EOFError, OSError) as e:
            w.process.join(1.0)
            self._lost(w, f"its connection closed ({type(e).__name__}; {_exit_text(w.process)})")

    def run(self, timeout: float = 300.0) -> list[RemoteRequest]:
        """Step until every submitted request is done or failed; requests still unfinished after
        `timeout` seconds fail with RequestTimeout (and are cancelled on their decode worker)."""
        deadline = time.perf_counter() + timeout
        while self.busy:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                late = [r for r in self.requests.values() if not r.finished]
                for r in late:
                    self._fail(r, "RequestTimeout", f"RequestTimeout: not finished after {timeout:g} s (status {r.status})")
                self._cancel(late)
                break
            self.step(min(0.05, remaining))
        return list(self.requests.values())

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_token_ids: Sequence[int] = (),
        timeout: float = 300.0,
    ) -> list[list[int]]:
        """Like Model.generate (request i draws with seed + i); raises the first request's error."""
        reqs = self.run_requests(
            prompts,
            per_request(len(prompts), max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids),
            timeout=timeout,
        )
        for r in reqs:
            r.raise_error()
        return [r.output for r in reqs]

    def run_requests(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], timeout: float = 300.0
    ) -> list[RemoteRequest]:
        """Submit, run until they finish (or timeout), and hand back (and forget) these requests."""
        reqs = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        self.run(timeout)
        for r in reqs:
            self.requests.pop(r.id, None)
        return reqs

    # ---- messages -------------------------------------------------------------------------------
    def _handle(self, w: _Worker, kind: str, p: dict[str, Any]) -> None:
        handler = getattr(self, "_on_" + kind, None)
        if handler is None:
            warnings.warn(f"ignoring an unexpected {kind!r} message from {w.describe()}", RuntimeWarning)
            return
        handler(w, p)

    def _on_shipped(self, w: _Worker, p: dict[str, Any]) -> None:
        """A prefill call's pages for one decode worker: first tokens of the rows it completed; the
        decode worker is told to pull (while the prefill worker computes its next call)."""
        w.update(p)
        now = time.perf_counter()
        for f in p["final"]:
            r = self._live(f["id"])
            if r is None:
                continue
            r.output, r.cached_tokens, r.prefill_s = list(f["output"]), f["cached_tokens"], p["prefill_s"]
            r.times["first_token"] = now
            if f["finish_reason"]:
                self._done(r, f["output"], f["finish_reason"])
            else:
                r.status = "transfer"
        dw = self.workers[p["dest"]]
        live = [r for row in p["rows"] if (r := self._live(row[0])) is not None]
        if not dw.alive:
            self._retry_or_fail(live, dw)
            return
        fields = ("uuid", "address", "num_transports", "kv_spec", "descs", "checksums", "rows", "counts", "real",
                  "final", "mode", "draft", "hidden", "hidden_layers")
        draft_spec = w.info["draft"]["kv_spec"] if p["draft"] is not None else None
        self._send(dw, ("accept", dict({f: p[f] for f in fields}, draft_kv_spec=draft_spec)))

    def _on_failed(self, w: _Worker, p: dict[str, Any]) -> None:
        for key in p["ids"]:
            r = self._live(key)
            if r is not None:
                self._fail(r, p["error_type"], p["error"])

    def _on_accepted(self, w: _Worker, p: dict[str, Any]) -> None:
        w.update(p)
        self.transfers.append(dict(worker=w.name, requests=len(p["ids"]), bytes=p["bytes"], pages=p["pages"],
                                   pull_s=p["pull_s"], local_reshard_s=p["local_reshard_s"]))
        for key in p["ids"]:
            r = self._live(key)
            if r is not None:
                r.pull_s += p["pull_s"]
                r.local_reshard_s += p["local_reshard_s"]
                r.transfer_bytes += p["bytes"] // max(1, len(p["ids"]))
                if r.status == "transfer":
                    r.status = "decoding"

    def _on_tokens(self, w: _Worker, p: dict[str, Any]) -> None:
        w.update(p)
        for key, toks in p["tokens"].items():
            r = self._live(key)
            if r is not None:
                r.output.extend(toks)
        for d in p["done"]:
            r = self._live(d["id"])
            if r is not None:
                r.proposed_tokens, r.accepted_tokens = d["proposed_tokens"], d["accepted_tokens"]
                self._done(r, d["output"], d["finish_reason"])

    # ---- failures -------------------------------------------------------------------------------
    def _lost(self, w: _Worker, why: str) -> None:
        if not w.alive:
            return
        w.alive, w.death = False, why
        if w.process.is_alive():
            w.process.kill()
        w.process.join(5.0)
        if w.role == "prefill":
            affected = [r for r in self.requests.values() if not r.finished and r.prefill_worker == w.name
                        and r.status == "prefill"]
        else:
            affected = [r for r in self.requests.values() if not r.finished and r.decode_worker == w.name
                        and r.status in ("reserving", "prefill", "transfer", "decoding")]
        self._retry_or_fail(affected, w)

    def _retry_or_fail(self, reqs: list[RemoteRequest], w: _Worker) -> None:
        survivors = self.alive(w.role)
        why = f"{w.describe()} died: {w.death or 'not alive'}"
        for r in reqs:
            if survivors and r.retries < self.max_retries:
                self._cancel([r])  # the other worker of its placement lets go of it
                r.retries += 1
                r.status, r.output, r.job = "queued", [], None
                r.prefill_worker = r.decode_worker = None
                r.times.pop("first_token", None)
                self.queue.append(r.id)
            elif survivors:
                self._fail(r, "WorkerDied", f"WorkerDied: {why}; already retried {r.retries} time(s)")
            else:
                self._fail(r, "WorkerDied", f"WorkerDied: {why}; no surviving {w.role} worker to retry on")

    def _cancel(self, reqs: list[RemoteRequest]) -> None:
        """Tell the workers of the requests' placements to let go of them (pages, queues)."""
        by_worker: dict[str, list[Any]] = {}
        for r in reqs:
            for name in {r.decode_worker, r.prefill_worker} - {None}:
                if name in self.workers:
                    by_worker.setdefault(name, []).append(r.key)
        for name, keys in by_worker.items():
            w = self.workers[name]
            if w.alive and w.conn is not None:
                self._send(w, ("cancel", dict(ids=keys)))

    # ---- measurements ---------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Count afresh from now (wall clock, transfers, the workers' counters)."""
        self.started = time.perf_counter()
        self.transfers = []
        self._base = {name: (dict(w.counters), w.evicted_pages) for name, w in self.workers.items()}

    def _counter(self, w: _Worker, key: str) -> int:
        base = self._base.get(w.name, ({}, 0))
        if key == "evicted_pages":
            return w.evicted_pages - base[1]
        return w.counters.get(key, 0) - base[0].get(key, 0)

    def stats(self) -> dict[str, Any]:
        """As Engine.stats (engine/disagg.py), from what the workers reported, plus the workers."""
        reqs = [r for r in self.requests.values() if r.finished]
        wall = max([r.times.get("end", self.started) for r in reqs] + [self.started]) - self.started
        generated = sum(len(r.output) for r in reqs if r.status == "done")
        nbytes = sum(t["bytes"] for t in self.transfers)
        pull_s = sum(t["pull_s"] for t in self.transfers)
        pre, dec = self.workers_of("prefill"), self.workers_of("decode")
        admitted = sum(self._counter(w, "prompt_tokens") for w in pre)
        hit = sum(self._counter(w, "prefix_hit_tokens") for w in pre)
        return dict(
            requests=len(reqs), failed=sum(r.status == "failed" for r in reqs), generated_tokens=generated,
            prompt_tokens=int(sum(len(r.prompt) for r in reqs)), cached_tokens=int(sum(r.cached_tokens for r in reqs)),
            wall_s=wall, tokens_per_s=generated / wall if wall else 0.0,
            prefill_tokens_computed=sum(self._counter(w, "prefill_tokens_computed") for w in pre),
            prefix_hit_tokens=hit, hit_ratio=hit / admitted if admitted else 0.0,
            decode_hit_tokens=sum(self._counter(w, "prefix_hit_tokens") for w in dec),
            kv_pages_transferred=sum(self._counter(w, "kv_pages_transferred") for w in dec),
            kv_bytes_transferred=sum(self._counter(w, "kv_bytes_transferred") for w in dec),
            evicted_pages=sum(self._counter(w, "evicted_pages") for w in self.workers.values()),
            draft_prefill_tokens=sum(self._counter(w, "draft_tokens_computed") for w in pre),
            draft_fed_tokens=sum(self._counter(w, "draft_tokens_computed") for w in dec),
            draft_kv_pages_transferred=sum(self._counter(w, "draft_kv_pages_transferred") for w in dec),
            draft_kv_bytes_transferred=sum(self._counter(w, "draft_kv_bytes_transferred") for w in dec),
            hidden_states_received=sum(self._counter(w, "hidden_states_received") for w in dec),
            transfers=len(self.transfers), transfer_bytes=nbytes, pull_s=pull_s,
            pull_gib_per_s=nbytes / 2**30 / pull_s if pull_s else 0.0,
            local_reshard_s=sum(t["local_reshard_s"] for t in self.transfers),
            **spec_stats([SpecCounters(**w.spec) for w in dec if w.spec]),
            workers={w.name: dict(role=w.role, pid=w.process.pid, mesh=w.cfg.mesh, alive=w.alive, death=w.death)
                     for w in self.workers.values()},
        )

    def workers_of(self, role: str) -> list[_Worker]:
        return [w for w in self.workers.values() if w.role == role]

    def bench_transfer(self, nbytes: int, repeats: int = 3, timeout: float = 120.0) -> dict[str, Any]:
        """Pull `nbytes` (one fp32 array on one device) from the first prefill to the first decode
        worker `repeats` times, and copy the same bytes in-process in the decode worker."""
        if self.busy:
            raise RuntimeError("bench_transfer needs an idle engine")
        pw, dw = self.alive("prefill")[0], self.alive("decode")[0]
        offered = self._ask(pw, ("bench_offer", dict(bytes=nbytes, repeats=repeats)), "bench_offered", timeout)
        res = self._ask(dw, ("bench_pull", offered), "bench_result", timeout)
        best_pull, best_put = min(res["pull_s"]), min(res["device_put_s"])
        gib = res["bytes"] / 2**30
        return dict(res, pull_gib_per_s=gib / best_pull, device_put_gib_per_s=gib / best_put,
                    ratio_pull_to_device_put=best_pull / best_put)

    def _ask(self, w: _Worker, msg: tuple, reply: str, timeout: float) -> dict[str, Any]:
        self._send(w, msg)
        deadline = time.perf_counter() + timeout
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError(f"{w.describe()} did not answer {msg[0]!r} within {timeout:g} s")
            ready = wait([w.conn, w.process.sentinel], timeout=min(0.5, remaining))
            if w.process.sentinel in ready and not w.conn.poll(0):
                raise WorkerDied(f"{w.describe()} died (exit code {w.process.exitcode})")
            if w.conn.poll(0):
                kind, p = w.conn.recv()
                w.last_heard = time.perf_counter()
                if kind == reply:
                    return p
                self._handle(w, kind, p)

