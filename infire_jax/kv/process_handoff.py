"""KV handoff between meshes held by different processes of one jax.distributed cluster.

In a multi-process run `jax.device_put` refuses to move an array onto another set of devices
("For a cross-host reshard in multi-controller JAX, input and target sharding should have the same
set of devices"), and its DCN transfer path (jax_cross_host_transfer_socket_address) left the
receiving processes blocked forever on CPU (jax 0.10.2, measured). So the handoff is a collective
the whole cluster runs, as every other step of the multi-controller engine:

1. the sender side reshards the canonical KV, on its own devices, into the decode side's sharding
   rebuilt on a same-shaped mesh of the prefill devices (one jit; processes without prefill devices
   run it as a no-op);
2. the two device grids are stacked into one union mesh ("side", decode axes...): side 0 holds
   the sender's shards, side 1 zeros of the same shape on the decode devices;
3. one jitted shard_map ppermute along "side" copies every shard to its decode twin (gloo on CPU);
4. the decode side's shards become the array on the decode mesh.

Shard for shard, like jax.experimental.transfer (which silently returns wrong data for a mismatched
sharding, CPU_NOTES): both ends' sharding descriptions (remote_transfer.describe) are compared
before anything moves. Needs prefill and decode meshes of the same device count
(distributed.check_meshes refuses others at load).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from infire_jax.kv import remote_transfer
from infire_jax.kv.transfer import KVLayoutMismatch

__all__ = ["needs_process_handoff", "move"]


def needs_process_handoff(arrays: Sequence[jax.Array], dst: Sequence[jax.sharding.Sharding]) -> bool:
    """Whether device_put cannot do this move: several processes and another set of devices."""
    return jax.process_count() > 1 and any(a.sharding.device_set != s.device_set for a, s in zip(arrays, dst))


def _twin_mesh(src: jax.sharding.Sharding, dst_mesh: Mesh) -> Mesh:
    """The sender's devices arranged in the decode mesh's shape and axis names."""
    devices = list(src.mesh.devices.flat) if isinstance(src, NamedSharding) else sorted(src.device_set, key=lambda d: d.id)
    if len(devices) != dst_mesh.size:
        raise KVLayoutMismatch(
            f"the prefill mesh has {len(devices)} devices and the decode mesh {dst_mesh.size}; across processes "
            "the KV moves shard for shard, so give both meshes the same number of devices"
        )
    return Mesh(np.array(devices, dtype=object).reshape(dst_mesh.devices.shape), dst_mesh.axis_names,
                axis_types=dst_mesh.axis_types)


@functools.lru_cache(maxsize=64)
def _ppermute(union: Mesh, specs: tuple[P, ...]):
    def send(*xs):
        return tuple(jax.lax.ppermute(x, "side", [(0, 1)]) for x in xs)

    return jax.jit(jax.shard_map(send, mesh=union, in_specs=specs, out_specs=specs, check_vma=False))


def move(arrays: Sequence[jax.Array], dst: Sequence[NamedSharding]) -> tuple[jax.Array, ...]:
    """arrays (on the prefill mesh) -> the same values in shardings `dst` (on the decode mesh).
    Every process of the cluster must call it with the same arguments."""
    dst_mesh = dst[0].mesh
    twin = _twin_mesh(arrays[0].sharding, dst_mesh)
    staged_sh = tuple(NamedSharding(twin, s.spec) for s in dst)
    sent = [remote_transfer.describe(s, a.shape, a.dtype) for s, a in zip(staged_sh, arrays)]
    expected = [remote_transfer.describe(s, a.shape, a.dtype) for s, a in zip(dst, arrays)]
    remote_transfer.check_descriptions(sent, expected, "process handoff")
    staged = jax.jit(lambda *xs: xs, out_shardings=staged_sh)(*arrays)

    union = Mesh(np.stack([twin.devices, dst_mesh.devices]), ("side",) + tuple(dst_mesh.axis_names),
                 axis_types=(jax.sharding.AxisType.Auto,) * (1 + len(dst_mesh.axis_names)))
    specs = tuple(P("side", *s.spec) for s in dst)
    receivers = set(dst_mesh.devices.flat)
    stacked = []
    for x, sh, spec in zip(staged, dst, specs):
        shard_shape = sh.shard_shape(x.shape)
        local = {s.device: s.data[None] for s in x.addressable_shards}
        pieces = []
        for d in union.devices.flat:
            if d.process_index != jax.process_index():
                continue
            pieces.append(local[d] if d in local else jnp.zeros((1,) + shard_shape, x.dtype, device=d))
        stacked.append(
            jax.make_array_from_single_device_arrays((2,) + x.shape, NamedSharding(union, spec), pieces, dtype=x.dtype)
        )
    moved = _ppermute(union, specs)(*stacked)
    out = []
    for y, x, sh in zip(moved, staged, dst):
        shards = [s.data.reshape(s.data.shape[1:]) for s in y.addressable_shards if s.device in receivers]
        out.append(jax.make_array_from_single_device_arrays(x.shape, sh, shards, dtype=x.dtype))
    return tuple(out)
