"""orbax save/restore of a loaded model, independent of the layout it was loaded with.

Saved form ("orbax-canonical-v2"): a parameter outside the layer stacks is one array; a stacked
parameter (the layers of a dense model, the MoE families' per-kind stacks "layers" / "dense" /
"moe", routed experts (experts, ...) per layer) is one array per real layer, params/<name>/<layer>:
no pipeline padding slot is saved and no stack layout is assumed, so a model saved on ep=2,tp=2
restores onto pp=2 or tp=4. Weights are saved in the form the model holds them: float (bf16 / f32)
arrays and packed int4 experts (words and group scales) as they are, palette12-compressed weights
in their layout-free form (compression/jax_decode.py to_saved). KV heads repeated for tp (Llama's
kv_repeat) are written once.

Restoring reads each device's shard only: layer i of a stack is read onto the devices of the
pipeline stage that holds it (a sub-mesh), split as the target layout splits it (tp, ep), and each
stage's stacked array is then assembled from those shards on every device
(jax.make_array_from_single_device_arrays): nothing is read whole or sent between devices.
Compressed weights are re-blocked for the target layout on the device (jax_decode.from_saved) and
never decoded; int4 words stay packed. Arrays are stored in chunks of at most `chunk_bytes`, so a
process of a multi-process restore reads the chunks its shards touch (checkpoint/reads.py counts
the file bytes tensorstore read).
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from infire_jax import boot
from infire_jax.checkpoint import hf, reads
from infire_jax.compression import jax_decode
from infire_jax.compression.jax_decode import Palette12Weight, SavedLayout
from infire_jax.flax_nnx import nnx

__all__ = ["MARKER", "FORMAT", "is_saved_model", "save", "restore"]

MARKER = "infire_jax_checkpoint.json"
FORMAT = "orbax-canonical-v2"
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
StackIndex = dict[str, tuple[tuple[int, int], ...]]  # stack -> (layer, position in the stack) of its layers


def is_saved_model(path: str | pathlib.Path) -> bool:
    return (pathlib.Path(path) / MARKER).is_file()


def _is_stacked(var: nnx.Variable) -> bool:
    axes = var.get_metadata().get("logical_axes") or ()
    return bool(axes) and axes[0] == "layers"


def _flat(state: Any) -> dict[str, nnx.Variable]:
    return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def _saved_name(name: str) -> str:
    """The saved array of a parameter: its own, or for a layer of a layer-list model ("layers/3/wo")
    the stacked weight's ("layers/wo"), of which it is entry 3."""
    key = hf.layer_list_key(tuple(name.split("/")))
    return name if key is None else "/".join(key[0])


def _mesh_axes(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _entries(spec: Any, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(spec))


def _orbax() -> Any:
    """orbax.checkpoint, imported on first save/restore: importing it costs ~1 s of every start."""
    import orbax.checkpoint as ocp

    return ocp


def _checkpointer() -> Any:
    """orbax's pytree checkpointer, writing a replicated array once, from one device (by default
    orbax splits it over its replicas first, slicing it on every device: a compile per array shape
    and device, most of the time of saving a small model)."""
    ocp = _orbax()
    handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
    registry = ocp.type_handlers.create_type_handler_registry((jax.Array, handler))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))


# A stack (n, ...) whose layer axis is split over S pipeline stages is handled as n / S "parts"
# (S, ...): part j holds every stage's j-th entry, split like the stack. Going between the stack and
# its parts is a local reshape (one program for all stacks, no data between devices), and a part's
# entry for stage s is the (1, ...) array made of the shards that stage's devices hold (no copy).


def _stages(mesh: jax.sharding.Mesh, spec: tuple) -> tuple[tuple[str, ...], int]:
    """(mesh axes splitting a stack's layer axis, number of stages they make)."""
    lead = _mesh_axes(spec[0]) if spec else ()
    return lead, math.prod(mesh.shape[x] for x in lead)


def _stage_mesh(mesh: jax.sharding.Mesh, lead: tuple[str, ...], stage: int) -> jax.sharding.Mesh:
    """The devices of one pipeline stage (entry `stage` of the mesh axes `lead`), as a mesh with the
    same axis names (the lead axes of size 1)."""
    devices = mesh.devices
    coords = np.unravel_index(stage, [mesh.shape[a] for a in lead]) if lead else ()
    for a, c in zip(lead, coords):
        devices = devices.take([int(c)], axis=mesh.axis_names.index(a))
    return jax.sharding.Mesh(devices, mesh.axis_names, axis_types=mesh.axis_types)


@functools.partial(jax.jit, static_argnums=(1,))
def _split_stacks(stacks: list[jax.Array], part_shardings: tuple) -> list[tuple[jax.Array, ...]]:
    out = []
    for x, sharding in zip(stacks, part_shardings):
        stages = _stages(sharding.mesh, _entries(sharding.spec, 1))[1]
        parts = x.reshape((stages, -1) + x.shape[1:])
        out.append(tuple(jax.lax.with_sharding_constraint(parts[:, j], sharding) for j in range(parts.shape[1])))
    return out


@functools.partial(jax.jit, static_argnums=(1,))
def _join_stacks(parts: list[tuple[jax.Array, ...]], shardings: tuple) -> list[jax.Array]:
    out = []
    for ps, sharding in zip(parts, shardings):
        x = jnp.stack(ps, axis=1)
        out.append(jax.lax.with_sharding_constraint(x.reshape((-1,) + x.shape[2:]), sharding))
    return out


@functools.partial(jax.jit, static_argnums=(1,))
def _squeeze_all(xs: list[jax.Array], shardings: tuple) -> list[jax.Array]:
    return [jax.lax.with_sharding_constraint(x[0], s) for x, s in zip(xs, shardings)]


def _entry_of(part: jax.Array, stage: int) -> jax.Array:
    """Stage `stage`'s entry of a part, as a (1, ...) array on that stage's devices (their shards)."""
    mesh = part.sharding.mesh
    spec = _entries(part.sharding.spec, part.ndim)
    sub = _stage_mesh(mesh, _stages(mesh, spec)[0], stage)
    on_stage = set(sub.devices.flat)
    shards = [s.data for s in part.addressable_shards if s.device in on_stage]
    return jax.make_array_from_single_device_arrays((1,) + part.shape[1:], NamedSharding(sub, P(None, *spec[1:])), shards,
                                                    dtype=part.dtype)


def _part_from(entries: dict[int, jax.Array], shape: tuple[int, ...], sharding: NamedSharding, dtype: Any) -> jax.Array:
    """A part (stages, ...) whose stage-s entry is entries[s] (a (1, ...) array on that stage's
    devices, split as `sharding` splits the rest), zeros for the stages without one (padding)."""
    local = sharding.shard_shape(shape)
    held = {s: {x.device: x.data for x in a.addressable_shards} for s, a in entries.items()}
    buffers = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        stage = index[0].start or 0
        buffers.append(held[stage][device] if stage in held else jax.device_put(np.zeros(local, dtype), device))
    return jax.make_array_from_single_device_arrays(shape, sharding, buffers)


# ------------------------------------------------------------------------------------------ save


def save(
    placed: Any, path: str | pathlib.Path, source_dir: str | pathlib.Path | None = None, chunk_bytes: int = 4 << 20
) -> pathlib.Path:
    """Write the model's parameters in the saved form (module docstring), each array in chunks of at
    most chunk_bytes, and the model's config/tokenizer files."""
    path = pathlib.Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"{path} exists; choose a new directory for the saved model")
    module = placed.module
    index = module.stack_index()
    repeat = _kv_repeat(module)
    flat = _flat(placed.state)
    compressed: dict[str, dict[str, Any]] = {}
    packed = [n for n, var in flat.items() if isinstance(var.get_value(), Palette12Weight)]
    for name in packed:
        if repeat > 1 and "kv_heads" in flat[name].get_metadata()["logical_axes"]:
            raise ValueError(
                f"Model.save of compressed weights whose KV heads are repeated for tp ({name}, kv_repeat={repeat}) "
                "is not supported; load the compressed checkpoint on a layout with tp <= KV heads to save it"
            )
    values = dict(zip(packed, jax_decode.to_saved([flat[n].get_value() for n in packed], [_saved_name(n) for n in packed])))
    stacked: dict[str, Any] = {}  # name -> its value (array or saved leaves) still stacked
    tree: dict[str, Any] = {}
    for name, var in flat.items():
        axes = tuple(var.get_metadata()["logical_axes"])
        value = values.get(name, var.get_value())
        key = hf.layer_list_key(tuple(name.split("/")))
        saved = _saved_name(name)
        if name in values:  # the escapes of all its layers are as wide (to_saved's groups)
            w = var.get_value()
            entry = compressed.setdefault(saved, dict(perm=list(w.perm), palette_is_range=True))
            entry["palette_is_range"] &= w.palette_is_range
            entry["escapes"] = int(value["escape_idx"].shape[-1])
        elif repeat > 1 and "kv_heads" in axes:  # saved form: each KV head once
            value = _unrepeat_kv(value, axes, repeat)
        if key is not None:  # one layer of a layer-list model
            tree.setdefault(saved, {})[str(key[1])] = jax.tree.map(lambda a: a[None], value)
        elif _is_stacked(var):
            stacked[name] = value
        else:
            tree[saved] = value
    # every stacked leaf split into its parts in one program, then each layer's entry taken on its stage
    leaves = [(name, leaf, a) for name, v in stacked.items() for leaf, a in (v.items() if isinstance(v, dict) else [(None, v)])]
    shardings = tuple(NamedSharding(a.sharding.mesh, P(*_entries(a.sharding.spec, a.ndim))) for _, _, a in leaves)
    split = _split_stacks([a for _, _, a in leaves], shardings) if leaves else []
    for (name, leaf, a), parts in zip(leaves, split):
        for layer, pos in index[name.split("/")[0]]:
            entry = _entry_of(parts[pos % len(parts)], pos // len(parts))
            if leaf is None:
                tree.setdefault(name, {})[str(layer)] = entry
            else:
                tree.setdefault(name, {}).setdefault(str(layer), {})[leaf] = entry
    path.mkdir(parents=True)
    ocp = _orbax()
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=chunk_bytes), tree)
    _checkpointer().save(path / "params", args=ocp.args.PyTreeSave(tree, save_args=save_args))
    for fname in _COPIED:
        if source_dir and (pathlib.Path(source_dir) / fname).is_file():
            shutil.copy(pathlib.Path(source_dir) / fname, path / fname)
    dtypes = sorted({str(a.dtype) for a in jax.tree.leaves(tree)})
    (path / MARKER).write_text(json.dumps({"format": FORMAT, "dtypes": dtypes, "compressed": compressed}, indent=1))
    return path


def _is_fused_qkv(axes: tuple) -> bool:
    """A fused q/k/v weight or bias (models.llama.gqa_params): (..., kv_heads, G + 2, ...)."""
    i = axes.index("kv_heads")
    return i + 1 < len(axes) and axes[i + 1] == "fused"


def _unrepeat_kv(value: jax.Array, axes: tuple, r: int) -> jax.Array:
    """A weight with each KV head stored r times -> each KV head once. In a fused q/k/v weight the
    r copies of a KV head hold different query heads (G / r each): those are joined back."""
    i = axes.index("kv_heads")
    if not _is_fused_qkv(axes):
        return jax.lax.slice_in_dim(value, 0, None, r, i)
    shape = value.shape
    g = shape[i + 1] - 2
    v = value.reshape(shape[:i] + (shape[i] // r, r) + shape[i + 1 :])  # (.., kv, r, g + 2, ..)
    q = jax.lax.slice_in_dim(v, 0, g, axis=i + 2).reshape(shape[:i] + (shape[i] // r, r * g) + shape[i + 2 :])
    k_v = jax.lax.slice_in_dim(jax.lax.index_in_dim(v, 0, i + 1, keepdims=False), g, g + 2, axis=i + 1)
    return jnp.concatenate([q, k_v], axis=i + 1)


def _repeat_kv(value: jax.Array, axes: tuple, r: int) -> jax.Array:
    """Inverse of _unrepeat_kv: each KV head r times (a fused q/k/v weight's query heads dealt out
    G / r to each copy)."""
    i = axes.index("kv_heads")
    if not _is_fused_qkv(axes):
        return jnp.repeat(value, r, axis=i)
    shape = value.shape
    kv, g = shape[i], (shape[i + 1] - 2) // r
    q = jax.lax.slice_in_dim(value, 0, g * r, axis=i + 1).reshape(shape[:i] + (kv, r, g) + shape[i + 2 :])
    k_v = jnp.repeat(jnp.expand_dims(jax.lax.slice_in_dim(value, g * r, g * r + 2, axis=i + 1), i + 1), r, axis=i + 1)
    return jnp.concatenate([q, k_v], axis=i + 2).reshape(shape[:i] + (kv * r, g + 2) + shape[i + 2 :])


def _kv_repeat(module: Any) -> int:
    return module.kv_heads // module.cfg.num_kv_heads


# --------------------------------------------------------------------------------------- restore


def _read_marker(path: pathlib.Path) -> dict[str, Any]:
    marker = json.loads((path / MARKER).read_text())
    if marker.get("format") != FORMAT:
        raise ValueError(
            f"{path} was saved in format {marker.get('format')!r}; this version restores {FORMAT!r} "
            "(load the model from its original checkpoint and save it again)"
        )
    return marker


def _saved_form(entry: dict[str, Any] | None, axes: tuple, shape: tuple[int, ...], dtype: Any, layout: Any,
                kv_repeat: int) -> tuple[dict, Any]:
    """For a parameter of `shape` (stacked: all its slots) on `layout`: ({leaf: (shape, dtype, spec)}
    of its saved form (leaf None: a plain array), each spec splitting it as the layout splits the
    parameter, so that a device reads only what it holds; and how the read value becomes the
    parameter's value: a SavedLayout (compressed), a function (repeated KV heads) or None (as read)).
    entry: the marker's record of a compressed weight, else None."""
    spec = _entries(layout.spec(axes, shape), len(shape))
    if entry is not None:
        perm = tuple(entry["perm"])
        depth = len(shape) - len(perm)
        stored = shape[:depth] + tuple(shape[depth + p] for p in perm)
        stored_spec = spec[:depth] + tuple(spec[depth + p] for p in perm)
        stack_spec, block_spec = stored_spec[:depth], stored_spec[depth:]
        read = jax_decode.saved_specs(stack_spec, block_spec, stored[depth:], layout.mesh)
        width = entry["escapes"]
        shapes = dict(sign_mant=(stored, np.uint8), index_pairs=(stored[:-1] + ((stored[-1] + 1) // 2,), np.uint8),
                      palette=(stored[:depth] + (16,), np.uint8), escape_idx=(stored[:depth] + (width,), np.int32),
                      escape_val=(stored[:depth] + (width,), np.uint16))
        form = {leaf: (s, dt, _entries(read[leaf], len(s))) for leaf, (s, dt) in shapes.items()}
        return form, SavedLayout(layout.mesh, stack_spec, block_spec, perm, entry["palette_is_range"], width)
    if kv_repeat > 1 and "kv_heads" in axes:  # saved with each KV head once
        unrepeat = functools.partial(_unrepeat_kv, axes=axes, r=kv_repeat)
        saved = jax.eval_shape(unrepeat, jax.ShapeDtypeStruct(shape, dtype)).shape
        repeat = jax.jit(functools.partial(_repeat_kv, axes=axes, r=kv_repeat), out_shardings=NamedSharding(layout.mesh, P(*spec)))
        return {None: (saved, dtype, _entries(layout.spec(axes, saved), len(saved)))}, repeat
    return {None: (shape, dtype, spec)}, None


def restore(path: str | pathlib.Path, abstract_state: Any, layout: Any, stack_index: StackIndex,
            kv_repeat: int = 1) -> None:
    """Fill `abstract_state` (an nnx.State of ShapeDtypeStructs of the model built for `layout`,
    whose stacks hold their layers at `stack_index`'s positions) in place from a saved model."""
    path = pathlib.Path(path).absolute()
    compressed = _read_marker(path).get("compressed", {})
    mesh = layout.mesh
    ocp = _orbax()
    targets: dict[str, Any] = {}
    plans = []  # (variable, saved name, form, conversion, {layer: (stage, part)} / {layer: None} / None)
    for name, var in _flat(abstract_state).items():
        v = var.get_value()
        axes = tuple(var.get_metadata()["logical_axes"])
        key = hf.layer_list_key(tuple(name.split("/")))
        saved = _saved_name(name)
        form, convert = _saved_form(compressed.get(saved), axes, tuple(v.shape), v.dtype, layout, kv_repeat)
        if key is not None:  # a layer of a layer-list model: its saved (1, ...) entry, read in place
            places = {key[1]: None}
        elif _is_stacked(var):  # each layer read onto the devices of its stage
            parts = v.shape[0] // _stages(mesh, next(iter(form.values()))[2])[1]
            places = {layer: divmod(pos, parts) for layer, pos in stack_index[name.split("/")[0]]}
        else:
            places = None
        for layer, place in (places or {None: None}).items():
            read = {}
            for leaf, (shape, dtype, spec) in form.items():
                if places is None:
                    read[leaf] = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*spec)))
                    continue
                rest, rest_spec = (shape, spec) if place is None else (shape[1:], spec[1:])
                on = mesh if place is None else _stage_mesh(mesh, _stages(mesh, spec)[0], place[0])
                if not any(d.process_index == jax.process_index() for d in on.devices.flat):
                    read[leaf] = ocp.PLACEHOLDER  # a stage of other processes: they read it
                    continue
                read[leaf] = jax.ShapeDtypeStruct((1,) + tuple(rest), dtype, sharding=NamedSharding(on, P(None, *rest_spec)))
            read = read[None] if None in read else read
            if layer is None:
                targets[saved] = read
            else:
                targets.setdefault(saved, {})[str(layer)] = read
        plans.append((var, saved, form, convert, places))
    restore_args = ocp.checkpoint_utils.construct_restore_args(targets)
    before = _file_bytes_read()
    try:
        with boot.clock.phase("read"):
            restored = _checkpointer().restore(path / "params", args=ocp.args.PyTreeRestore(targets, restore_args=restore_args))
    except Exception as e:  # orbax raises a variety of types for structure/shape mismatches
        raise ValueError(f"cannot restore {path}: it does not match this model config ({e})") from None
    arrays = jax.block_until_ready([a for a in jax.tree.leaves(restored) if isinstance(a, jax.Array)])
    reads.add(
        bytes_read=_file_bytes_read() - before, tensors_read=sum(bool(a.addressable_shards) for a in arrays),
        needed_bytes=sum(_local_bytes(a) for a in arrays),
    )
    with boot.clock.phase("place"):  # orbax reads straight onto the devices; here the stacks are assembled
        _place(restored, plans, layout)


def _place(restored: Any, plans: list, layout: Any) -> None:
    """Set every planned variable from what was read (module docstring)."""
    # Stacks from their layers' entries (parts, then one program joining every stack), layer-list
    # entries without their leading axis (one program), compressed weights re-blocked (one program).
    mesh = layout.mesh
    joins, squeezes = [], []
    values: dict[int, dict] = {}
    for i, (var, saved, form, convert, places) in enumerate(plans):
        values[i] = {}
        for leaf, (shape, dtype, spec) in form.items():
            sharding = NamedSharding(mesh, P(*spec))
            pick = lambda r: r if leaf is None else r[leaf]  # noqa: E731
            if places is None:
                values[i][leaf] = pick(restored[saved])
            elif all(place is None for place in places.values()):
                squeezes.append((i, leaf, pick(restored[saved][str(next(iter(places)))]), NamedSharding(mesh, P(*spec))))
            else:
                stages = _stages(mesh, spec)[1]
                part_shape = (stages,) + tuple(shape[1:])
                got = {layer: pick(restored[saved][str(layer)]) for layer in places}  # this process's stages
                got = {layer: a for layer, a in got.items() if isinstance(a, jax.Array)}
                parts = tuple(
                    _part_from({stage: got[layer] for layer, (stage, j) in places.items() if j == part and layer in got},
                               part_shape,
                               sharding, dtype)
                    for part in range(shape[0] // stages)
                )
                joins.append((i, leaf, parts, sharding))
    for todo, program in ((joins, _join_stacks), (squeezes, _squeeze_all)):
        if todo:
            for (i, leaf, _, _), a in zip(todo, program([t[2] for t in todo], tuple(t[3] for t in todo))):
                values[i][leaf] = a
    packed = [i for i, plan in enumerate(plans) if isinstance(plan[3], SavedLayout)]
    for i, w in zip(packed, jax_decode.from_saved([(values[i], plans[i][3]) for i in packed])):
        values[i] = {None: w}
    for i, (var, _, _, convert, _) in enumerate(plans):
        value = values[i][None] if None in values[i] else values[i]
        var.set_value(convert(value) if callable(convert) else value)


def _file_bytes_read() -> int:
    """Bytes tensorstore (orbax's reader) has read from files in this process so far."""
    import tensorstore as ts

    metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return sum(v.get("value", 0) for m in metrics for v in m["values"])


def _local_bytes(a: jax.Array) -> int:
    """Bytes of the distinct blocks of `a` this process holds."""
    blocks = {tuple((s.start, s.stop) for s in shard.index): shard.data.nbytes for shard in a.addressable_shards}
    return sum(blocks.values())
