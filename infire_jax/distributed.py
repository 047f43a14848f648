"""Multi-host meshes: one model over the devices of several processes (multi-controller JAX).

    import infire_jax
    infire_jax.distributed.initialize("10.0.0.1:4321", num_processes=2, process_id=i)  # first thing
    model = infire_jax.load(model_dir, mesh="pp=2,tp=2")  # the same call in every process
    outputs = model.generate(prompts, max_new_tokens=16)  # the same outputs in every process

Every process runs the same program over its local devices of one global mesh (jax.distributed):
mesh specs name global devices in `jax.devices()` order (process 0's devices first), so "pp=2,tp=2"
over two processes of two devices puts one pipeline stage in each process. On CPU the collectives
between processes go over gloo (TCP). Without arguments, `initialize` takes the cluster from the
environment that launchers set (JAX's own detection: SLURM, Open MPI, Kubernetes, ...).

Loading: each process builds only its own devices' shards, so it reads only those bytes of the
checkpoint (checkpoint/reads.py counts them); no process holds the whole model.

Host-side scheduling is made deterministically, not broadcast: every process runs the same engine
over the same requests, and every decision (which requests form a batch, which pages they get, when
they finish) is a function of the requests and their tokens alone, never of clocks or arrival
races. The tokens every decision needs reach every process through `fetch`: a replicated result is
read locally; a result on a mesh that spans only some processes (prefill and decode meshes on
different process groups) is sent from its first owner to all processes, together with a digest
of each process's own schedule, and the digests are compared (HostDivergence if they differ).

Faults: a watchdog thread keeps a TCP connection to every other process (addresses exchanged right
after the cluster forms) with a heartbeat each second. A peer whose connection closes without its
goodbye (it died or was killed) or that sends nothing for `heartbeat_timeout` seconds makes this
process print which process was lost and exit with LOST_PROCESS_EXIT, whatever the main thread is
blocked in (a collective waiting for the dead peer never returns). A cluster that does not form
within `initialization_timeout` (a process never started, or was given another address or count)
stops every process that did start with JOIN_FAILED_EXIT. JAX's own heartbeat stays the backstop.
Note that JAX installs a SIGTERM handler (preemption notice) in distributed processes: stop a
process with SIGKILL (or SIGINT).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import selectors
import socket
import sys
import threading
import time
import zlib
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from infire_jax.mesh import MeshSpecError

__all__ = [
    "DistributedError",
    "HostDivergence",
    "Cluster",
    "initialize",
    "shutdown",
    "cluster",
    "process_count",
    "owner_processes",
    "fetch",
    "check_meshes",
    "LOST_PROCESS_EXIT",
    "JOIN_FAILED_EXIT",
]

LOST_PROCESS_EXIT = 75
JOIN_FAILED_EXIT = 76
_ROW_BYTES = 512  # one process's entry in the address exchange


class DistributedError(RuntimeError):
    """The distributed set-up cannot go on: called too late or twice, inconsistent processes."""


class HostDivergence(DistributedError):
    """Processes made different host-side decisions (a bug: scheduling must be deterministic)."""


@dataclasses.dataclass(frozen=True)
class Peer:
    process: int
    host: str
    port: int
    pid: int
    hostname: str

    def __str__(self) -> str:
        return f"process {self.process} ({self.hostname}, pid {self.pid})"


@dataclasses.dataclass
class Cluster:
    """This process's view of the cluster once `initialize` returned."""

    process_id: int
    num_processes: int
    local_devices: int
    global_devices: int
    peers: dict[int, Peer]
    watchdog: "_Watchdog | None" = None

    def describe(self) -> str:
        return (
            f"{self.num_processes} processes, {self.global_devices} devices "
            f"(process {self.process_id} holds {self.local_devices})"
        )


_CLUSTER: Cluster | None = None


def cluster() -> Cluster | None:
    """The cluster `initialize` formed in this process (None in a single-process run)."""
    return _CLUSTER


def process_count() -> int:
    return _CLUSTER.num_processes if _CLUSTER else 1


# ---- set-up -----------------------------------------------------------------------------------
def _backends_started() -> bool:
    """Whether JAX has created its backends (a device was touched): jax_num_cpu_devices's validator
    refuses a change after that, so a change and its undo tell without private APIs."""
    current = jax.config.jax_num_cpu_devices
    try:
        jax.config.update("jax_num_cpu_devices", current + 2 if current > 0 else 3)
    except RuntimeError:
        return True
    jax.config.update("jax_num_cpu_devices", current)
    return False


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_count: int | None = None,
    *,
    initialization_timeout: float = 120.0,
    heartbeat_timeout: float = 20.0,
) -> Cluster:
    """Join this process to the cluster; call it before anything touches a device.

    coordinator_address ("host:port" of process 0's coordination service), num_processes and
    process_id: as jax.distributed.initialize, or None to take them from the cluster launcher's
    environment. local_device_count: simulated CPU devices of this process (tests, one-machine
    runs); leave None on accelerator hosts. A cluster that has not formed after
    initialization_timeout seconds stops this process (JOIN_FAILED_EXIT); a peer that dies or
    is silent for heartbeat_timeout seconds stops it too (LOST_PROCESS_EXIT)."""
    global _CLUSTER
    if _CLUSTER is not None or jax.distributed.is_initialized():
        raise DistributedError("infire_jax.distributed.initialize was already called in this process")
    if _backends_started():
        raise DistributedError(
            "infire_jax.distributed.initialize must run before anything touches a device, and JAX's "
            "backends are already up in this process (a jax computation, jax.devices() or "
            "infire_jax.load ran before it). Call it first thing, right after the imports."
        )
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"process_id must be in 0..{num_processes - 1}, got {process_id}")
    if local_device_count is not None:
        if local_device_count < 1:
            raise DistributedError(f"local_device_count must be >= 1, got {local_device_count}")
        jax.config.update("jax_num_cpu_devices", local_device_count)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

    where = coordinator_address or "the launcher's coordinator"
    bind = None  # JAX's default: every interface; a loopback coordinator stays on loopback
    if coordinator_address and coordinator_address.rpartition(":")[0].strip("[]") in ("127.0.0.1", "localhost", "::1"):
        bind = coordinator_address
    joined = threading.Event()
    timer = threading.Thread(
        target=_join_timer, args=(joined, initialization_timeout, where, num_processes, process_id), daemon=True
    )
    timer.start()
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id,
        initialization_timeout=int(initialization_timeout) + 30,  # ours reports first, JAX's is the backstop
        heartbeat_timeout_seconds=int(2 * heartbeat_timeout) + 10,
        shutdown_timeout_seconds=int(initialization_timeout),
        coordinator_bind_address=bind,
    )
    me, n = jax.process_index(), jax.process_count()
    host = _reachable_host(coordinator_address)
    listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    entry = dict(
        process=me, host=host, port=listener.getsockname()[1], pid=os.getpid(),
        hostname=socket.gethostname(), claimed=num_processes, local_devices=jax.local_device_count(),
    )
    rows = exchange(np.frombuffer(json.dumps(entry).encode().ljust(_ROW_BYTES), np.uint8))
    joined.set()
    entries = [json.loads(bytes(r).decode().strip()) for r in rows]
    claims = {e["process"]: e["claimed"] for e in entries if e["claimed"] not in (None, n)}
    if claims:
        raise DistributedError(
            f"the cluster formed with {n} processes but processes {sorted(claims)} were started with "
            f"num_processes {sorted(set(claims.values()))}; start every process with num_processes={n}"
        )
    peers = {e["process"]: Peer(e["process"], e["host"], e["port"], e["pid"], e["hostname"]) for e in entries}
    _CLUSTER = Cluster(me, n, jax.local_device_count(), jax.device_count(), peers)
    if n > 1:
        _CLUSTER.watchdog = _Watchdog(me, peers, listener, heartbeat_timeout, initialization_timeout)
        _CLUSTER.watchdog.start()
        atexit.register(_goodbye_at_exit)
        _watch_uncaught_exceptions()
    else:
        listener.close()
    return _CLUSTER


def shutdown() -> None:
    """Leave the cluster normally: tell the peers (so they do not report this process as lost),
    then shut jax.distributed down (it waits for every process to arrive)."""
    global _CLUSTER
    if _CLUSTER is None:
        return
    if _CLUSTER.watchdog is not None:
        _CLUSTER.watchdog.goodbye()
    _CLUSTER = None
    jax.distributed.shutdown()


def _join_timer(joined: threading.Event, timeout: float, where: str, n: int | None, me: int | None) -> None:
    if joined.wait(timeout):
        return
    who = f"process {me}" if me is not None else f"process {os.getpid()}"
    count = f"{n} processes" if n is not None else "the cluster"
    _stop(
        f"infire_jax.distributed: {who} waited {timeout:.0f} s for {count} to join at {where}; not every "
        "process joined (one was not started, crashed before joining, or was given another coordinator "
        f"address, num_processes or a duplicate process_id). Stopping (exit code {JOIN_FAILED_EXIT}).",
        JOIN_FAILED_EXIT,
    )


def _stop(message: str, code: int) -> None:
    """Report and leave at once: the main thread may be blocked in a collective that never returns."""
    try:
        sys.stdout.flush()
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    finally:
        os._exit(code)


def _reachable_host(coordinator_address: str | None) -> str:
    """The address of this host that the coordinator's network reaches (the interface a packet to
    the coordinator leaves by); the hostname when there is no coordinator address to aim at."""
    if not coordinator_address:
        return socket.gethostbyname(socket.gethostname())
    host, _, port = coordinator_address.rpartition(":")
    host = host.strip("[]")
    family, _, _, _, addr = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(addr)  # no packet is sent: this only picks the route
        return s.getsockname()[0]


# ---- the watchdog -------------------------------------------------------------------------------
_UNCAUGHT = False


def _watch_uncaught_exceptions() -> None:
    """A process that ends with an uncaught exception leaves at once, without its goodbye: its peers
    then stop naming it (they would wait for it in their next collective), and it does not wait in
    JAX's shutdown barrier for peers that will never arrive there."""
    previous = sys.excepthook

    def hook(*args: Any) -> None:
        global _UNCAUGHT
        _UNCAUGHT = True
        previous(*args)
        if _CLUSTER is not None and _CLUSTER.watchdog is not None:
            # a lost peer often surfaces first as an error in a collective: let the watchdog name it
            _CLUSTER.watchdog.settle()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    sys.excepthook = hook


def _goodbye_at_exit() -> None:
    if _CLUSTER is not None and _CLUSTER.watchdog is not None and not _UNCAUGHT:
        _CLUSTER.watchdog.goodbye()


class _Watchdog(threading.Thread):
    """One TCP connection to every peer (process i connects to the lower ids, accepts the higher),
    a heartbeat byte each second, b"b" on a normal goodbye."""

    INTERVAL = 1.0

    def __init__(self, me: int, peers: dict[int, Peer], listener: socket.socket, timeout: float, connect_timeout: float):
        super().__init__(name="infire-watchdog", daemon=True)
        self.me, self.peers, self.timeout = me, peers, timeout
        self.socks: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        self._leaving = False
        deadline = time.monotonic() + connect_timeout
        for j in sorted(p for p in peers if p < me):
            s = socket.create_connection((peers[j].host, peers[j].port), timeout=max(1.0, deadline - time.monotonic()))
            s.sendall(me.to_bytes(4, "little"))
            self.socks[j] = s
        listener.settimeout(max(1.0, deadline - time.monotonic()))
        while len(self.socks) < len(peers) - 1:
            try:
                s, _ = listener.accept()
            except socket.timeout:
                missing = sorted(set(peers) - set(self.socks) - {me})
                raise DistributedError(f"watchdog: processes {missing} did not connect within {connect_timeout:.0f} s")
            s.settimeout(max(1.0, deadline - time.monotonic()))
            j = int.from_bytes(_recv_exact(s, 4), "little")
            self.socks[j] = s
        listener.close()
        for s in self.socks.values():
            s.settimeout(None)
            s.setblocking(False)
        self.last_heard = {j: time.monotonic() for j in self.socks}
        self.gone: set[int] = set()  # peers that said goodbye
        self.rounds = 0  # select rounds done (settle waits for two more)

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        for j, s in self.socks.items():
            sel.register(s, selectors.EVENT_READ, j)
        next_beat = 0.0
        while True:
            now = time.monotonic()
            if now >= next_beat:
                self._send(b"h")
                next_beat = now + self.INTERVAL
            for key, _ in sel.select(timeout=max(0.05, next_beat - time.monotonic())):
                j = key.data
                try:
                    data = key.fileobj.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:
                    data, error = b"", e
                else:
                    error = None
                if b"b" in data:
                    self.gone.add(j)
                if not data:
                    sel.unregister(key.fileobj)
                    if j not in self.gone:
                        self._lost(j, f"its connection closed ({error or 'the process exited or was killed'})")
                    continue
                self.last_heard[j] = time.monotonic()
            now = time.monotonic()
            for j, heard in self.last_heard.items():
                if j not in self.gone and now - heard > self.timeout:
                    self._lost(j, f"no heartbeat for {now - heard:.0f} s (hung, or its host is unreachable)")
            self.rounds += 1

    def settle(self, limit: float = 3.0) -> None:
        """Wait until the watchdog has read every connection twice more (a peer that just died is
        then reported, and this process stopped, by the watchdog)."""
        start, deadline = self.rounds, time.monotonic() + limit
        while self.rounds < start + 2 and time.monotonic() < deadline:
            time.sleep(0.05)

    def _send(self, what: bytes) -> None:
        with self._lock:
            for j, s in self.socks.items():
                if j in self.gone:
                    continue
                try:
                    s.send(what)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    pass  # the read side reports the peer

    def _lost(self, j: int, reason: str) -> None:
        with self._lock:
            if self._leaving:
                return
        _stop(
            f"infire_jax.distributed: lost {self.peers[j]} of {len(self.peers)}: {reason}. "
            f"process {self.me} stops (exit code {LOST_PROCESS_EXIT}).",
            LOST_PROCESS_EXIT,
        )

    def goodbye(self) -> None:
        """Tell every peer this process leaves normally; from now on lost peers are not reported."""
        self._send(b"b")
        with self._lock:
            self._leaving = True


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise DistributedError("watchdog: a peer closed its connection during the handshake")
        out += chunk
    return out


# ---- values every process needs ----------------------------------------------------------------
def _process_mesh() -> jax.sharding.Mesh:
    """One device of each process, in process order (any local device count)."""
    firsts: dict[int, jax.Device] = {}
    for d in jax.devices():
        firsts.setdefault(d.process_index, d)
    return jax.sharding.Mesh(np.array([firsts[p] for p in sorted(firsts)]), ("processes",))


_GATHER: dict[Any, Any] = {}


def exchange(row: np.ndarray) -> np.ndarray:
    """Every process's `row` (same shape and dtype everywhere), stacked in process order, in every
    process: one all-gather over one device per process. Every process must call it."""
    row = np.asarray(row)
    if jax.process_count() == 1:
        return row[None]
    mesh = _process_mesh()
    local = jax.device_put(row[None], mesh.devices[jax.process_index()])
    stacked = jax.make_array_from_single_device_arrays(
        (mesh.size,) + row.shape, NamedSharding(mesh, P("processes")), [local]
    )
    key = (tuple(d.id for d in mesh.devices.flat), row.shape, row.dtype.str)
    if key not in _GATHER:
        _GATHER[key] = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))
    return np.asarray(_GATHER[key](stacked).addressable_data(0))


def owner_processes(sharding: jax.sharding.Sharding) -> list[int]:
    """The processes that hold devices of `sharding`."""
    return sorted({d.process_index for d in sharding.device_set})


def _digest(parts: Iterable[Any]) -> int:
    crc = 0
    for p in parts:
        crc = zlib.crc32(np.ascontiguousarray(np.asarray(p)).tobytes(), crc)
    return crc


def fetch(x: jax.Array, schedule: Sequence[Any] = ()) -> np.ndarray:
    """x's value as a numpy array in every process (all processes must call it at the same point).

    One process: np.asarray. Many: a replicated x is read from a local copy; a sharded x is first
    gathered over its mesh's processes; when x's mesh leaves some processes out, the first owner
    sends the value to every process, with a digest of `schedule` (the host-side arrays this step
    was built from) that every process compares with its own (HostDivergence on a difference)."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        value = np.asarray(x)
        if jax.process_count() == 1:
            return value
    elif x.addressable_shards and x.is_fully_replicated:
        value = np.asarray(x.addressable_data(0))
    elif x.addressable_shards:
        from jax.experimental import multihost_utils

        value = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    else:
        value = None
    owners = owner_processes(x.sharding)
    if len(owners) == jax.process_count():
        return value
    me = jax.process_index()
    payload = np.zeros(x.shape, x.dtype) if value is None else value
    row = np.concatenate([
        np.frombuffer(np.ascontiguousarray(payload).tobytes(), np.uint8),
        np.frombuffer(np.int64(_digest(schedule)).tobytes(), np.uint8),
    ])
    rows = exchange(row)
    digests = [int(np.frombuffer(r[-8:].tobytes(), np.int64)[0]) for r in rows]
    if len(set(digests)) > 1:
        groups: dict[int, list[int]] = {}
        for p, d in enumerate(digests):
            groups.setdefault(d, []).append(p)
        raise HostDivergence(
            f"process {me}: the processes scheduled different work at the same step (processes grouped by "
            f"their schedule: {sorted(groups.values())}); every process must submit the same requests in "
            "the same order"
        )
    source = rows[owners[0]][:-8]
    return np.frombuffer(source.tobytes(), x.dtype).reshape(x.shape).copy()


# ---- meshes --------------------------------------------------------------------------------------
def check_meshes(meshes: Sequence[jax.sharding.Mesh], specs: Sequence[str]) -> None:
    """Refuse, before any work, meshes that do not use every device of a multi-process cluster:
    each process runs the same program, and a process holding no device of any mesh would have
    nothing to run (and a mesh spanning part of a process's devices leaves the rest idle)."""
    if jax.process_count() == 1:
        return
    used = [d for m in meshes for d in m.devices.flat]
    total = jax.device_count()
    if len(used) != total:
        what = " and ".join(repr(str(s)) for s in specs)
        raise MeshSpecError(
            f"mesh {what} uses {len(used)} devices but the cluster has {total} ({jax.process_count()} "
            f"processes); across processes the mesh{'es' if len(specs) > 1 else ''} must use every device: "
            f"make the axis sizes multiply to {total}"
        )
    if len(meshes) == 2 and meshes[0].size != meshes[1].size:
        raise MeshSpecError(
            f"prefill mesh {str(specs[0])!r} has {meshes[0].size} devices and decode mesh {str(specs[1])!r} "
            f"{meshes[1].size}; across processes the KV moves shard for shard (kv/process_handoff.py), so give "
            "both meshes the same number of devices"
        )
