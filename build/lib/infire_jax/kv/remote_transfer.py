"""KV transfer between OS processes: the one module that touches `jax.experimental.transfer`.

What the library does (measured on jax 0.10.2, CPU, two local processes):
- `start_transfer_server(client, "127.0.0.1:0", [addr] * k)` in each process; the sender registers
  arrays with `await_pull(uuid, arrays, timeout=datetime)` (non-blocking; the entry is dropped when the
  timeout passes), the receiver calls `connect(address).pull(uuid, shape_dtype_structs)`, which returns
  at once with arrays that become ready when the bytes have arrived.
- It copies shard for shard and does NOT reshard: pulling with a sharding other than the sender's
  returns wrong data with no error. So both sides describe the exact sharding (shape, dtype, mesh shape,
  partition spec and the index range of every shard in device order) and compare the descriptions
  before anything moves (`describe`, `check_descriptions`); an optional position-weighted checksum
  (exact uint32 arithmetic) is compared after the pull as an end-to-end guard.
- The `timeout` argument of `pull` had no observable effect (a pull of an unknown uuid stayed pending
  10 s past it); a pull of an offer that had expired, and a pull over a fresh connection to an
  address whose process is gone, also stayed pending. So `pull` here polls `is_ready()` against its
  own deadline and raises TransferError when it passes (the library's pending pull cannot be
  cancelled; it is abandoned). A pull pending on an existing connection whose sender dies, or a later
  pull on that connection, fails at once ("SocketServer: Connection closed"): raised as TransferError.
- Both sides must use the same number of transport addresses (a mismatch crashed in CPU_NOTES); the
  count is announced in the handshake and compared before a pull.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding

from infire_jax.kv.transfer import KVLayoutMismatch

__all__ = [
    "TransferError",
    "TransferEndpoint",
    "TRANSFER_MODES",
    "describe",
    "check_descriptions",
    "sender_shardings",
    "checksum",
]

# "mesh": the sender reshards the canonical KV to the decode side's own canonical sharding, rebuilt on a
# mesh of the same shape over its first devices; the receiver pulls straight into its layout, every
# shard crosses once. "single": both sides hold the whole array on one device; the receiver reshards
# locally (one device_put) after the pull.
TRANSFER_MODES = ("mesh", "single")


class TransferError(RuntimeError):
    """A KV transfer between processes failed or timed out (peer gone, deadline passed)."""


# ---- layout descriptions --------------------------------------------------------------------------
def _device_order(sharding: jax.sharding.Sharding) -> list[jax.Device]:
    if isinstance(sharding, NamedSharding):
        return list(sharding.mesh.devices.flat)
    if isinstance(sharding, SingleDeviceSharding):
        return list(sharding.device_set)
    raise TypeError(f"cross-process KV transfer supports NamedSharding and SingleDeviceSharding, got {sharding!r}")


def describe(sharding: jax.sharding.Sharding, shape: Sequence[int], dtype: Any) -> dict[str, Any]:
    """A process-independent description of how an array is laid out: everything the shard-for-shard
    copy depends on, nothing that names a particular process's devices."""
    shape = tuple(int(s) for s in shape)
    index = sharding.devices_indices_map(shape)
    shards = tuple(
        tuple((sl.start or 0, dim if sl.stop is None else sl.stop) for sl, dim in zip(index[d], shape))
        for d in _device_order(sharding)
    )
    if isinstance(sharding, NamedSharding):
        mesh = tuple((str(a), int(s)) for a, s in sharding.mesh.shape.items())
        spec = str(sharding.spec)
    else:
        mesh, spec = None, "single-device"
    return dict(shape=shape, dtype=str(np.dtype(dtype)), mesh=mesh, spec=spec, shards=shards)


def check_descriptions(sent: Sequence[Mapping[str, Any]], expected: Sequence[Mapping[str, Any]], side: str) -> None:
    """Raise KVLayoutMismatch unless the sender's array descriptions equal what the receiver will pull with."""
    if len(sent) != len(expected):
        raise KVLayoutMismatch(f"{side}: sender offers {len(sent)} arrays, receiver expects {len(expected)}")
    diffs = []
    names = [("k", "v")[i % 2] + (f"[group {i // 2}]" if i > 1 else "") for i in range(len(sent))]
    for name, a, b in zip(names, sent, expected):
        for key in ("shape", "dtype", "mesh", "spec", "shards"):
            if a.get(key) != b.get(key):
                diffs.append(f"{name}.{key}: sender {a.get(key)!r} vs receiver {b.get(key)!r}")
    if diffs:
        raise KVLayoutMismatch(f"{side}: transfer layouts differ, refusing to pull: " + "; ".join(diffs))


def sender_shardings(
    mode: str,
    shapes: Sequence[Sequence[int]],
    logical_axes: Sequence[Any],
    receiver_layout: Mapping[str, Any],
    devices: Sequence[jax.Device],
) -> tuple[jax.sharding.Sharding, ...]:
    """The shardings the sender must put arrays of `shapes` (logical axes `logical_axes`, e.g. canonical
    KV pages) in, so that a shard-for-shard copy lands them in the receiver's announced layout.
    receiver_layout: {"mesh": ((axis, size), ...), "rules": {...}}."""
    from infire_jax import mesh as mesh_lib
    from infire_jax.sharding import Layout

    if mode == "single":
        return (SingleDeviceSharding(devices[0]),) * len(shapes)
    if mode != "mesh":
        raise ValueError(f"transfer mode must be one of {TRANSFER_MODES}, got {mode!r}")
    sizes = tuple(receiver_layout["mesh"])
    n = math.prod(s for _, s in sizes)
    if n > len(devices):
        raise KVLayoutMismatch(
            f"the decode layout needs a mesh of {n} devices ({dict(sizes)}) but the prefill process has "
            f"{len(devices)}; give the prefill process more devices or use transfer mode 'single'"
        )
    mesh = mesh_lib.make_mesh(mesh_lib.MeshSpec(sizes), list(devices))
    layout = Layout(mesh, dict(receiver_layout["rules"]))
    return tuple(layout.sharding(tuple(logical_axes), tuple(shape)) for shape in shapes)


# ---- end-to-end checksum --------------------------------------------------------------------------
@jax.jit
def _checksum(x: jax.Array) -> jax.Array:
    width = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    flat = bits.reshape(-1)
    weights = jnp.arange(1, flat.shape[0] + 1, dtype=jnp.uint32) * jnp.uint32(2654435761)
    return jnp.sum(flat * weights, dtype=jnp.uint32)  # wraps mod 2**32: exact, independent of sharding


def checksum(arrays: Sequence[jax.Array]) -> list[int]:
    """Position-weighted checksum per array: equal data in equal places, whatever the sharding.
    Catches a shard that landed in the wrong place (a plain sum would not)."""
    return [int(c) for c in jax.device_get([_checksum(a) for a in arrays])]


# ---- the transfer server --------------------------------------------------------------------------
@dataclasses.dataclass
class PullResult:
    arrays: list[jax.Array]
    seconds: float
    bytes: int


class TransferEndpoint:
    """One transfer server per process: offers arrays to peers and pulls arrays from them."""

    def __init__(self, num_transports: int = 2, host: str = "127.0.0.1", device: jax.Device | None = None):
        from jax.experimental import transfer as jax_transfer

        if num_transports < 1:
            raise ValueError(f"num_transports must be >= 1, got {num_transports}")
        client = (device or jax.devices()[0]).client
        self.num_transports = num_transports
        self._server = jax_transfer.start_transfer_server(client, f"{host}:0", [f"{host}:0"] * num_transports)
        self.address: str = self._server.address()
        self._connections: dict[str, Any] = {}

    def offer(self, uuid: int, arrays: Sequence[jax.Array], timeout_s: float) -> None:
        """Make arrays pullable under uuid until timeout_s has passed (the server then drops them)."""
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        self._server.await_pull(int(uuid), list(arrays), timeout=deadline)

    def pull(
        self,
        address: str,
        uuid: int,
        structs: Sequence[jax.ShapeDtypeStruct],
        timeout_s: float,
    ) -> PullResult:
        """Pull arrays (exactly these shapes, dtypes and shardings) offered under uuid at address.
        Raises TransferError if the peer is gone or the deadline passes."""
        t0 = time.perf_counter()
        try:
            conn = self._connections.get(address)
            if conn is None:
                conn = self._connections[address] = self._server.connect(address)
            out = conn.pull(int(uuid), list(structs))
        except Exception as e:  # noqa: BLE001 - any runtime error of the library is a failed transfer
            self._connections.pop(address, None)
            raise TransferError(f"pull {uuid} from {address} failed: {type(e).__name__}: {e}") from e
        deadline = t0 + timeout_s
        pause = 1e-4
        while not all(a.is_ready() for a in out):
            if time.perf_counter() > deadline:
                self._connections.pop(address, None)
                raise TransferError(
                    f"pull {uuid} from {address} did not complete within {timeout_s:g} s (sender gone, or the "
                    "offer expired or was never made)"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
        try:
            jax.block_until_ready(out)
        except Exception as e:  # noqa: BLE001
            self._connections.pop(address, None)
            raise TransferError(f"pull {uuid} from {address} failed: {type(e).__name__}: {e}") from e
        nbytes = int(sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in structs))
        return PullResult(list(out), time.perf_counter() - t0, nbytes)
