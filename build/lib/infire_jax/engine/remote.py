"""Multi-process prefill/decode: workers as separate OS processes, KV moved with jax.experimental.transfer.

    with RemoteEngine(model_dir, [WorkerConfig("prefill", "prefill0", mesh="tp=2")],
                      [WorkerConfig("decode", "decode0", mesh="pp=2")]) as engine:
        outputs = engine.generate(prompts, max_new_tokens=16)

Processes. The client (this module's RemoteEngine, in the caller's process; it never touches a device)
starts every worker with the `spawn` start method, so each worker initialises JAX itself and simulates
its own CPU devices (`jax_num_cpu_devices`); mesh device ranges ("tp=2@0-1") refer to the worker's own
devices. A prefill worker runs engine/disagg.PrefillWorker, a decode worker runs engine/disagg.DecodeWorker
(paged KV, continuous batching) on its own mesh with its own copy of the weights.

Transfer layout ("mode", chosen per request batch by the client): "mesh" (default) = the prefill side
reshards to the decode worker's own canonical sharding rebuilt on a same-shaped mesh of its devices,
so the pull lands every shard once, in place (a prefill process therefore gets at least as many
simulated devices as the largest decode mesh); "single" = one device on each side, the decode side
reshards locally after the pull.

Control protocol: pickled tuples (kind, payload) over multiprocessing.connection (TCP on 127.0.0.1,
HMAC authkey handshake). Worker -> client: "connected", "hello" (handshake: KV spec, transfer
address, number of transport addresses, the decode layout {mesh shape, rules}, capacity), then
"prefilled", "prefill_failed", "accepted", "tokens", "done", "failed", "bench_*". Client -> worker:
"prefill", "accept", "cancel", "debug", "bench_*", "shutdown". KV never goes through the client.

One request batch:
  1. client -> prefill: "prefill" {requests, target decode worker's announced KVSpec + layout, mode}
  2. prefill: checks its KVSpec against the decode's (KVLayoutMismatch -> "prefill_failed", nothing
     is offered), runs the prefill program, makes the canonical KV (programs.canonical_kv_fn),
     reshards it locally into the transfer layout (mode "mesh": the decode side's own canonical
     sharding rebuilt on a same-shaped mesh of its devices; mode "single": one device), offers it under
     a fresh uuid (expires after offer_timeout) and answers "prefilled" {first tokens, uuid, address,
     its KVSpec, a device-independent description of each array's sharding, checksums}.
  3. client -> decode: "accept" with that description.
  4. decode: checks the prefill's KVSpec against its own, the array descriptions against the shardings
     it will pull with, and the transport count, all BEFORE pulling (mismatch -> KVLayoutMismatch,
     "failed"); pulls (deadline pull_timeout), compares checksums, reshards locally into its canonical
     layout (transfer.handoff, one device_put), inserts into its pages (programs.insert_fn) and decodes.
     "tokens" after every decode call (also the heartbeat), "done" when a request ends.

Timeouts: worker start (start_timeout), every client wait (run's timeout, polled), worker silence
while it has requests in flight (stall_timeout -> killed), the pull (pull_timeout), offers
(offer_timeout). A worker that dies (its process sentinel fires or its socket closes) has its
in-flight requests re-queued on a surviving worker of the same role (max_retries) or failed with a
WorkerDied error naming the worker, its pid and exit code; the rest go on.
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

from infire_jax.engine.generation import RequestError, validate_prompt
from infire_jax.engine.sampling import SamplingError, SamplingParams, per_request
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
    """One worker process. mesh device ranges refer to the worker's own (simulated) devices."""

    role: str  # "prefill" or "decode"
    name: str
    mesh: str = "tp=1"
    dtype: str = "float32"  # weight storage dtype
    compute_dtype: str = "float32"  # activations and KV
    rules: dict | None = None
    devices: int | None = None  # simulated CPU devices in the process (default: what the mesh needs)
    decode_steps: int = 8
    num_pages: int = 256  # decode: KV pages
    page_size: int = 16
    max_batch: int = 16
    max_batch_tokens: int = 8192  # prefill: padded tokens per prefill batch

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"role must be 'prefill' or 'decode', got {self.role!r}")

    def engine_options(self):
        """This worker's settings as the engine builder takes them (engine/build.py)."""
        from infire_jax.engine.build import EngineOptions

        return EngineOptions(
            decode_steps=self.decode_steps, kv_pages=self.num_pages, page_size=self.page_size,
            max_decode_batch=self.max_batch, prefill_max_tokens=self.max_batch_tokens,
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
    """Shared worker-process state: the model on this worker's mesh, the transfer endpoint."""

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

    def hello(self) -> dict[str, Any]:
        c, model_cfg = self.cfg, self.programs.placed.cfg
        return dict(
            name=c.name, role=c.role, pid=os.getpid(), mesh=c.mesh, devices=len(self.jax.devices()),
            kv_spec=self.kv_spec, address=self.endpoint.address, num_transports=self.endpoint.num_transports,
            layout=dict(mesh=tuple(self.layout.mesh.shape.items()), rules=dict(self.layout.rules)),
            vocab_size=model_cfg.vocab_size, context=model_cfg.max_position_embeddings,
            page_size=c.page_size, num_pages=c.num_pages, decode_steps=c.decode_steps, max_batch=c.max_batch,
        )

    def send(self, kind: str, payload: dict[str, Any]) -> None:
        self.conn.send((kind, payload))

    def handle_common(self, kind: str, p: dict[str, Any]) -> bool:
        if kind == "debug":
            self.tamper.update(p)
            return True
        return False


class _PrefillServer(_Server):
    def __init__(self, cfg, opts, conn):
        super().__init__(cfg, opts, conn)
        from infire_jax.engine.build import prefill_worker

        self.worker = prefill_worker(cfg.name, self.programs, cfg.engine_options())
        self.uuids = itertools.count(1)

    def serve(self) -> None:
        while True:
            if not self.conn.poll(1.0):
                continue
            kind, p = self.conn.recv()
            if kind == "shutdown":
                return
            if self.handle_common(kind, p):
                continue
            if kind == "prefill":
                self.prefill(p)
            elif kind == "bench_offer":
                self.bench_offer(p)

    def prefill(self, p: dict[str, Any]) -> None:
        import numpy as np

        from infire_jax.engine.disagg import Request

        target = p["target"]
        ids = [q["id"] for q in p["requests"]]
        if self.tamper.get("prefill_delay"):  # test hook: a hung prefill worker
            time.sleep(float(self.tamper["prefill_delay"]))
        try:
            self.kv_spec.check(target["kv_spec"])  # before any work: a mismatch never reaches a transfer
        except KVLayoutMismatch as e:
            self.send("prefill_failed", dict(job=p["job"], **_error_payload(ids, e)))
            return
        for q in p["requests"]:
            r = Request(q["id"], np.asarray(q["prompt"], np.int32), SamplingParams(**q["params"]), time.perf_counter())
            self.worker.queue.append(r)
        while self.worker.queue:
            batch, reqs = None, list(self.worker.queue)
            t0 = time.perf_counter()
            try:
                batch = self.worker.run(target["page_size"])
                reqs = batch.requests
                self.offer(p, batch, time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - this batch fails, the worker goes on
                if batch is None:
                    self.worker.queue.clear()
                self.send("prefill_failed", dict(job=p["job"], **_error_payload([r.id for r in reqs], e)))

    def offer(self, p: dict[str, Any], batch, prefill_s: float) -> None:
        import dataclasses as dc

        from infire_jax.kv import remote_transfer as rt

        jax, target, mode = self.jax, p["target"], p["mode"]
        b = batch.rows
        rows = [
            dict(row=i, id=r.id, output=list(r.output), finish_reason=r.finish_reason)
            for i, r in enumerate(batch.requests)
        ]
        live = [row for row in rows if not row["finish_reason"]]
        if not live:  # every row ended at its first token: nothing to transfer
            self.send("prefilled", dict(job=p["job"], rows=rows, prefill_s=prefill_s))
            return
        t0 = time.perf_counter()
        send_mode = self.tamper.get("send_mode") or mode
        shardings = rt.sender_shardings(send_mode, self.kv_spec, b, batch.t, target["layout"], jax.devices())
        kv = jax.block_until_ready(jax.device_put(batch.kv, tuple(shardings)))
        sums = rt.checksum(kv) if self.opts.get("checksum", True) else None
        if self.tamper.get("corrupt"):
            kv = (jax.block_until_ready(kv[0] + 1),) + kv[1:]  # arrives in the right layout but with the wrong bytes
        reshard_s = time.perf_counter() - t0
        uuid = next(self.uuids)
        self.endpoint.offer(uuid, kv, float(self.opts.get("offer_timeout", 60.0)))
        spec = self.kv_spec
        if self.tamper.get("kv_spec"):
            spec = dc.replace(spec, **self.tamper["kv_spec"])
        self.send("prefilled", dict(
            job=p["job"], rows=rows, prefill_s=prefill_s, reshard_s=reshard_s, uuid=uuid,
            address=self.endpoint.address, num_transports=self.endpoint.num_transports, kv_spec=spec,
            descs=[rt.describe(a.sharding, a.shape, a.dtype) for a in kv], checksums=sums, b=b, t=batch.t,
            mode=mode,
        ))

    def bench_offer(self, p: dict[str, Any]) -> None:
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
        self.requests: dict[Any, Any] = {}  # id -> disagg.Request, while it lives here
        self.sent: dict[Any, int] = {}  # id -> tokens already reported

    def serve(self) -> None:
        w = self.worker
        while True:
            busy = bool(w.running or w.arrived)
            if self.conn.poll(0.0 if busy else 1.0):
                while True:
                    kind, p = self.conn.recv()
                    if kind == "shutdown":
                        return
                    if not self.handle_common(kind, p):
                        getattr(self, "on_" + kind)(p)
                    if not self.conn.poll(0.0):
                        break
            self.decode_once()

    # -- messages ---------------------------------------------------------------------------------
    def on_accept(self, p: dict[str, Any]) -> None:
        ids = [row["id"] for row in p["rows"]]
        try:
            pulled = self.pull(p)
        except Exception as e:  # noqa: BLE001 - these requests fail, the worker goes on
            self.send("failed", _error_payload(ids, e))
            return
        self.send("accepted", dict(ids=ids, **pulled))

    def pull(self, p: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from infire_jax.engine.disagg import PrefillBatch, Request
        from infire_jax.kv import remote_transfer as rt

        jax, programs = self.jax, self.programs
        # 1. everything is checked before a byte moves
        p["kv_spec"].check(self.kv_spec)
        if p["num_transports"] != self.endpoint.num_transports:
            raise rt.TransferError(
                f"the prefill side uses {p['num_transports']} transport addresses, this decode worker "
                f"{self.endpoint.num_transports}; start both with the same num_transports"
            )
        b, t = p["b"], p["t"]
        if t % self.cfg.page_size:
            raise KVLayoutMismatch(f"KV of {t} positions does not fill whole pages of {self.cfg.page_size}")
        shapes = rt.kv_shapes(self.kv_spec, b, t)
        if p["mode"] == "mesh":
            shardings = programs.canonical_kv_shardings(b, t)
        else:
            first = next(iter(self.layout.mesh.devices.flat))
            shardings = (jax.sharding.SingleDeviceSharding(first),) * len(shapes)
        mine = [rt.describe(sh, shape, self.kv_spec.dtype) for sh, shape in zip(shardings, shapes)]
        rt.check_descriptions(p["descs"], mine, f"decode worker {self.cfg.name!r}")
        # 2. the transfer
        structs = [jax.ShapeDtypeStruct(s, np.dtype(self.kv_spec.dtype), sharding=sh) for s, sh in zip(shapes, shardings)]
        res = self.endpoint.pull(p["address"], p["uuid"], structs, float(self.opts.get("pull_timeout", 30.0)))
        kv = tuple(res.arrays)
        if p.get("checksums") is not None and rt.checksum(kv) != list(p["checksums"]):
            raise KVLayoutMismatch(
                "the pulled KV does not match the sender's checksums (wrong bytes or shards in the wrong "
                "place); refusing to decode from it"
            )
        # 3. local reshard into the decode layout (one device_put) and queue for the pages
        rows = {row["row"]: row for row in p["rows"]}
        reqs: list[Any] = [None] * b
        for i, row in rows.items():
            r = Request(row["id"], np.asarray(row["prompt"], np.int32), SamplingParams(**row["params"]), time.perf_counter())
            r.output, r.length = list(row["output"]), len(row["prompt"])
            reqs[i] = r
        batch = PrefillBatch(reqs, kv, t, set(rows))
        before = self.worker.transfer_stats.seconds
        self.worker.accept(batch, p["kv_spec"])
        reshard_s = self.worker.transfer_stats.seconds - before
        for i in rows:
            self.requests[reqs[i].id] = reqs[i]
            self.sent[reqs[i].id] = len(reqs[i].output)
            reqs[i].transfer_seconds += res.seconds
        return dict(pull_s=res.seconds, local_reshard_s=reshard_s, bytes=res.bytes)

    def on_cancel(self, p: dict[str, Any]) -> None:
        for rid in p["ids"]:
            r = self.requests.pop(rid, None)
            self.sent.pop(rid, None)
            if r is not None:
                self._drop(r)

    def _drop(self, r) -> None:
        w = self.worker
        w.arrived = collections.deque((b, i) for b, i in w.arrived if b.requests[i] is not r)
        w.release(r)

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

    # -- decoding ---------------------------------------------------------------------------------
    def decode_once(self) -> None:
        w = self.worker
        try:
            w.admit()
        except Exception as e:  # noqa: BLE001 - the requests being admitted fail
            running = {id(r) for r in w.running}
            stuck = [r for r in self.requests.values() if id(r) not in running]
            for r in stuck:
                self._drop(r)
            self._fail(stuck, e)
        if not w.running:
            return
        if self.tamper.get("step_delay"):  # test hook: a slow decode worker
            time.sleep(float(self.tamper["step_delay"]))
        running = list(w.running)
        try:
            finished = w.step()
        except Exception as e:  # noqa: BLE001 - the running batch fails, the worker goes on
            for r in running:
                w.release(r)
            self._fail(running, e)
            return
        tokens = {}
        for r in running:
            new = r.output[self.sent[r.id]:]
            if new:
                tokens[r.id] = [int(x) for x in new]
                self.sent[r.id] = len(r.output)
        done = [dict(id=r.id, output=[int(x) for x in r.output], finish_reason=r.finish_reason,
                     transfer_s=r.transfer_seconds) for r in finished]
        for r in finished:
            self.requests.pop(r.id, None)
            self.sent.pop(r.id, None)
        self.send("tokens", dict(tokens=tokens, done=done, free_pages=w.allocator.free))

    def _fail(self, reqs: list[Any], e: BaseException) -> None:
        for r in reqs:
            self.requests.pop(r.id, None)
            self.sent.pop(r.id, None)
        if reqs:
            self.send("failed", _error_payload([r.id for r in reqs], e))


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
    status: str = "queued"  # queued, prefill, transfer, decoding, done, failed
    error: str | None = None
    error_type: str | None = None
    finish_reason: str | None = None
    times: dict[str, float] = dataclasses.field(default_factory=dict)
    prefill_worker: str | None = None
    decode_worker: str | None = None
    job: int | None = None
    retries: int = 0
    prefill_s: float = 0.0
    pull_s: float = 0.0
    local_reshard_s: float = 0.0
    transfer_bytes: int = 0

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
            finish_reason=self.finish_reason, prompt_tokens=len(self.prompt), generated_tokens=n,
            prefill_worker=self.prefill_worker, decode_worker=self.decode_worker, retries=self.retries,
            prefill_s=self.prefill_s, transfer_s=self.pull_s + self.local_reshard_s, pull_s=self.pull_s,
            local_reshard_s=self.local_reshard_s, transfer_bytes=self.transfer_bytes,
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

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def role(self) -> str:
        return self.cfg.role

    def describe(self) -> str:
        return f"{self.role} worker {self.name!r} (pid {self.process.pid})"


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
        )
        self.workers: dict[str, _Worker] = {}
        self.requests: dict[Any, RemoteRequest] = {}
        self.queue: collections.deque[Any] = collections.deque()
        self.jobs: dict[int, dict[str, Any]] = {}
        self._ids = itertools.count()
        self._jobs = itertools.count()
        self._authkey = secrets.token_bytes(32)
        self._listener: Listener | None = None
        self.transfers: list[dict[str, Any]] = []  # one entry per KV transfer (request batch)
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
                    w.info, w.last_heard = p, time.perf_counter()
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
        sleeps before every job; decode: step_delay=seconds sleeps before every decode call)."""
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
            context = min([info["context"]] + [w.info["num_pages"] * w.info["page_size"] for w in decoders])
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
        steps = w.info["decode_steps"]
        total = len(r.prompt) + -(-r.params.max_new_tokens // steps) * steps + 1
        return pages_needed(total, w.info["page_size"])

    def _fail(self, r: RemoteRequest, error_type: str, error: str) -> None:
        if r.finished:
            return
        r.status, r.error_type, r.error = "failed", error_type, error
        r.times["end"] = time.perf_counter()

    def _done(self, r: RemoteRequest, output: list[int], finish_reason: str | None) -> None:
        r.output, r.finish_reason, r.status = list(output), finish_reason, "done"
        r.times["end"] = time.perf_counter()

    @property
    def busy(self) -> bool:
        return any(not r.finished for r in self.requests.values())

    # ---- routing --------------------------------------------------------------------------------
    def _load(self, w: _Worker) -> int:
        """Routing load: prompt tokens waiting for prefill, or requests headed for this decode worker."""
        if w.role == "prefill":
            return sum(len(r.prompt) for r in self.requests.values() if r.prefill_worker == w.name and r.status == "prefill")
        return sum(1 for r in self.requests.values() if r.decode_worker == w.name and not r.finished)

    def _in_flight(self, w: _Worker) -> int:
        """Requests the worker itself is working on now (it must keep talking while there are any)."""
        stages = ("prefill",) if w.role == "prefill" else ("transfer", "decoding")
        name = "prefill_worker" if w.role == "prefill" else "decode_worker"
        return sum(1 for r in self.requests.values() if getattr(r, name) == w.name and r.status in stages)

    def _dispatch(self) -> None:
        if not self.queue:
            return
        prefills, decoders = self.alive("prefill"), self.alive("decode")
        jobs: dict[tuple[str, str], list[RemoteRequest]] = {}
        while self.queue:
            r = self.requests[self.queue.popleft()]
            if r.finished:
                continue
            if not prefills or not decoders:
                role = "prefill" if not prefills else "decode"
                self._fail(r, "WorkerDied", f"WorkerDied: no {role} worker is alive")
                continue
            fits = [d for d in decoders if self._pages_for(r, d) <= d.info["num_pages"]]
            if not fits:
                self._fail(r, "RequestError", "RequestError: no surviving decode worker has enough KV pages")
                continue
            pw = min(prefills, key=self._load)
            dw = min(fits, key=self._load)
            r.prefill_worker, r.decode_worker, r.status = pw.name, dw.name, "prefill"
            r.times["dispatched"] = time.perf_counter()
            jobs.setdefault((pw.name, dw.name), []).append(r)
        for (pname, dname), reqs in jobs.items():
            job = next(self._jobs)
            pw, dw = self.workers[pname], self.workers[dname]
            self.jobs[job] = dict(prefill=pname, decode=dname, ids=[r.id for r in reqs])
            for r in reqs:
                r.job = job
            target = dict(
                name=dname, kv_spec=dw.info["kv_spec"], layout=dw.info["layout"], page_size=dw.info["page_size"],
                num_transports=dw.info["num_transports"],
            )
            reqs_payload = [dict(id=r.id, prompt=r.prompt, params=dataclasses.asdict(r.params)) for r in reqs]
            self._send(pw, ("prefill", dict(job=job, requests=reqs_payload, target=target, mode=self.mode)))

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

    def _cancel(self, reqs: list[RemoteRequest]) -> None:
        by_worker: dict[str, list[Any]] = {}
        for r in reqs:
            if r.decode_worker and r.decode_worker in self.workers:
                by_worker.setdefault(r.decode_worker, []).append(r.id)
        for name, ids in by_worker.items():
            w = self.workers[name]
            if w.alive:
                self._send(w, ("cancel", dict(ids=ids)))

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

    def _on_prefilled(self, w: _Worker, p: dict[str, Any]) -> None:
        now = time.perf_counter()
        job = self.jobs.get(p["job"], {})
        live = []
        for row in p["rows"]:
            r = self.requests.get(row["id"])
            if r is None or r.finished or r.job != p["job"]:
                continue
            r.output, r.prefill_s = list(row["output"]), p["prefill_s"]
            r.times["first_token"] = now
            if row["finish_reason"]:
                self._done(r, row["output"], row["finish_reason"])
            else:
                r.status = "transfer"
                live.append((row["row"], r))
        if not live:
            return
        dw = self.workers[job["decode"]]
        if not dw.alive:
            self._retry_or_fail([r for _, r in live], dw)
            return
        rows = [dict(row=i, id=r.id, prompt=r.prompt, params=dataclasses.asdict(r.params), output=r.output) for i, r in live]
        fields = ("uuid", "address", "num_transports", "kv_spec", "descs", "checksums", "b", "t", "mode")
        self._send(dw, ("accept", dict(job=p["job"], rows=rows, **{f: p[f] for f in fields})))

    def _on_prefill_failed(self, w: _Worker, p: dict[str, Any]) -> None:
        self._fail_ids(p)

    def _on_failed(self, w: _Worker, p: dict[str, Any]) -> None:
        self._fail_ids(p)

    def _fail_ids(self, p: dict[str, Any]) -> None:
        for rid in p["ids"]:
            r = self.requests.get(rid)
            if r is not None:
                self._fail(r, p["error_type"], p["error"])

    def _on_accepted(self, w: _Worker, p: dict[str, Any]) -> None:
        self.transfers.append(dict(worker=w.name, requests=len(p["ids"]), bytes=p["bytes"], pull_s=p["pull_s"],
                                   local_reshard_s=p["local_reshard_s"]))
        for rid in p["ids"]:
            r = self.requests.get(rid)
            if r is not None and not r.finished:
                r.status, r.pull_s, r.local_reshard_s, r.transfer_bytes = (
                    "decoding", p["pull_s"], p["local_reshard_s"], p["bytes"])

    def _on_tokens(self, w: _Worker, p: dict[str, Any]) -> None:
        for rid, toks in p["tokens"].items():
            r = self.requests.get(rid)
            if r is not None and not r.finished:
                r.output.extend(toks)
        for d in p["done"]:
            r = self.requests.get(d["id"])
            if r is not None and not r.finished:
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
            affected = [r for r in self.requests.values() if not r.finished and r.prefill_worker == w.name and r.status == "prefill"]
        else:
            affected = [r for r in self.requests.values() if not r.finished and r.decode_worker == w.name
                        and r.status in ("transfer", "decoding")]
        self._retry_or_fail(affected, w)

    def _retry_or_fail(self, reqs: list[RemoteRequest], w: _Worker) -> None:
        survivors = self.alive(w.role)
        why = f"{w.describe()} died: {w.death or 'not alive'}"
        for r in reqs:
            if survivors and r.retries < self.max_retries:
                r.retries += 1
                r.status, r.output, r.job = "queued", [], None
                r.prefill_worker = r.decode_worker = None
                r.times.pop("first_token", None)
                self.queue.append(r.id)
            elif survivors:
                self._fail(r, "WorkerDied", f"WorkerDied: {why}; already retried {r.retries} time(s)")
            else:
                self._fail(r, "WorkerDied", f"WorkerDied: {why}; no surviving {w.role} worker to retry on")

    # ---- measurements ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        reqs = [r for r in self.requests.values() if r.finished]
        wall = max([r.times.get("end", self.started) for r in reqs] + [self.started]) - self.started
        generated = sum(len(r.output) for r in reqs if r.status == "done")
        nbytes = sum(t["bytes"] for t in self.transfers)
        pull_s = sum(t["pull_s"] for t in self.transfers)
        return dict(
            requests=len(reqs), failed=sum(r.status == "failed" for r in reqs), generated_tokens=generated,
            wall_s=wall, tokens_per_s=generated / wall if wall else 0.0, transfers=len(self.transfers),
            transfer_bytes=nbytes, pull_s=pull_s, pull_gib_per_s=nbytes / 2**30 / pull_s if pull_s else 0.0,
            local_reshard_s=sum(t["local_reshard_s"] for t in self.transfers),
            workers={w.name: dict(role=w.role, pid=w.process.pid, mesh=w.cfg.mesh, alive=w.alive, death=w.death)
                     for w in self.workers.values()},
        )

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

