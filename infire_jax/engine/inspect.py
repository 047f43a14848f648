"""What a deployment costs per device: parameter and KV bytes, and the collectives of the compiled
prefill and decode programs, read from the optimized HLO.

Collectives inside loops (the layer scan, the decode ticks) are counted as many times as the loop
runs, using the trip counts XLA records on its while loops. Bytes are the per-device size of each
collective's result (what one device receives/produces), summed over executions.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from infire_jax.compression.weights import EncodedWeight
from infire_jax.kv import cache as kv_cache

__all__ = [
    "Collective", "DeviceShare", "collective_axes", "device_shares", "expert_bytes", "group_members", "hlo_collectives",
    "inspect_model", "layout_table", "per_device_bytes", "placed_shares",
]

_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all", "ragged-all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


@dataclasses.dataclass
class Collective:
    kind: str
    shape: str  # result type as printed by XLA
    groups: str  # replica groups / source-target pairs
    bytes: int  # per execution, per device
    count: int  # executions per program call

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.count


def _type_bytes(type_str: str) -> int:
    total = 0.0
    for dtype, dims in _ARRAY.findall(type_str):
        total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return int(total)


_MESH_GROUPS = re.compile(r"mesh\[[^\]]*\](?:,\s*device_ids=\((?:[^()]|\([^()]*\))*\))?(?:\s*\{[^}]*\})?")


def _groups(rest: str) -> str:
    for key in ("replica_groups=", "source_target_pairs="):
        i = rest.find(key)
        if i < 0:
            continue
        s, depth, j = rest[i + len(key):], 0, 0
        mesh_form = _MESH_GROUPS.match(s)  # mesh['axis_0'=2,...], device_ids=([2,2]T(1,0)) {'axis_0'}
        if mesh_form:
            return mesh_form.group(0)
        while j < len(s):
            c = s[j]
            depth += c in "{[("
            depth -= c in "}])"
            if c == "," and depth == 0 and not s[j + 1 : j + 2].strip().startswith(("'", "{")):
                break
            j += 1
        return s[:j].strip()
    return ""


def _iota(text: str) -> np.ndarray:
    """XLA's iota device list "[dims]" or "[dims]T(perm)" as the flat list it stands for."""
    m = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", text.strip())
    if not m:
        raise ValueError(f"not an iota device list: {text!r}")
    dims = [int(d) for d in m.group(1).split(",")]
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    if m.group(2):
        ids = ids.transpose([int(d) for d in m.group(2).split(",")])
    return ids.reshape(-1)


def group_members(groups: str, num_devices: int) -> list[list[int]]:
    """The device positions (0..num_devices-1, the program's mesh order) of each group of a
    collective's `groups` string as `hlo_collectives` reports it: explicit groups or source-target
    pairs "{{0,2},{1,3}}", iota groups "[2,2]<=[4]" / "[2,2]<=[2,2]T(1,0)", mesh-axis groups
    "mesh['axis_0'=2,...], device_ids=(...) {'axis_0'}", or "" / "{}" (all devices)."""
    text = groups.strip()
    if text in ("", "{}"):
        return [list(range(num_devices))]
    if text.startswith("{"):
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", text)]
    iota = re.fullmatch(r"\[(\d+),(\d+)\]<=(.+)", text)
    if iota:
        return _iota(iota.group(3)).reshape(int(iota.group(1)), int(iota.group(2))).tolist()
    mesh = re.match(r"mesh\[([^\]]*)\](?:,\s*device_ids=\((.*)\))?\s*(?:\{([^}]*)\})?$", text)
    if mesh:
        names = re.findall(r"'([^']+)'=(\d+)", mesh.group(1))
        sizes = [int(n) for _, n in names]
        ids = _iota(mesh.group(2)) if mesh.group(2) else np.arange(int(np.prod(sizes)))
        ids = ids.reshape(sizes)
        over = [i for i, (name, _) in enumerate(names) if f"'{name}'" in (mesh.group(3) or "")]
        keep = [i for i in range(len(sizes)) if i not in over]
        ids = ids.transpose(keep + over).reshape(-1, int(np.prod([sizes[i] for i in over] or [1])))
        return ids.tolist()
    raise ValueError(f"unrecognised collective groups {groups!r}")


def collective_axes(groups: str, mesh_shape: Mapping[str, int]) -> tuple[str, ...]:
    """Mesh axes a collective spans: those along which the members of one of its groups differ."""
    sizes = tuple(mesh_shape.values())
    members = group_members(groups, int(np.prod(sizes)))
    spanned = set()
    for group in members:
        coords = np.array(np.unravel_index(group, sizes)).reshape(len(sizes), -1)
        spanned |= {a for a, row in zip(mesh_shape, coords) if len(set(row.tolist())) > 1}
    return tuple(a for a in mesh_shape if a in spanned)


def hlo_collectives(hlo_text: str) -> list[Collective]:
    """Collectives of an optimized HLO module, with execution counts from loop trip counts."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _COMP.match(line)
        if m and not line.startswith(" "):
            current = m.group(2)
            comps[current] = []
            if m.group(1):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)

    calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)  # callee -> (caller, factor)
    for name, lines in comps.items():
        for line in lines:
            trip = 1
            if " while(" in line:
                t = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                trip = int(t.group(1)) if t else 1
            for key in ("body", "condition", "to_apply", "true_computation", "false_computation"):
                for callee in re.findall(key + r"=%?([\w.\-]+)", line):
                    if not (key == "to_apply" and re.search(r"\b(all-reduce|reduce|scatter|sort|map|reduce-window|select-and-scatter)\(", line)):
                        calls[callee].append((name, trip if key in ("body", "condition") else 1))
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    calls[callee].append((name, 1))

    memo: dict[str, int] = {}

    def multiplier(name: str, seen: frozenset = frozenset()) -> int:
        if name == entry:
            return 1
        if name in memo:
            return memo[name]
        if name in seen:
            return 0
        memo[name] = sum(multiplier(c, seen | {name}) * f for c, f in calls.get(name, ()))
        return memo[name]

    found: dict[tuple, Collective] = {}
    for name, lines in comps.items():
        mult = None
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            kind = m.group(3).removesuffix("-start")
            if kind not in _KINDS:
                continue
            mult = multiplier(name) if mult is None else mult
            if mult == 0:
                continue
            key = (kind, m.group(2), _groups(m.group(4)))
            if key in found:
                found[key].count += mult
            else:
                found[key] = Collective(kind, m.group(2), key[2], _type_bytes(m.group(2)), mult)
    return sorted(found.values(), key=lambda c: (-c.total_bytes, c.kind))


def per_device_bytes(arrays: list[tuple[tuple[int, ...], Any, Any]]) -> dict[int, int]:
    """(shape, dtype, sharding) -> bytes held by each device id."""
    out: dict[int, int] = collections.defaultdict(int)
    for shape, dtype, sharding in arrays:
        item = jnp.dtype(dtype).itemsize
        for device, index in sharding.devices_indices_map(tuple(shape)).items():
            n = int(np.prod([len(range(*s.indices(d))) for s, d in zip(index, shape)] or [1]))
            out[device.id] += n * item
    return dict(sorted(out.items()))


def expert_bytes(placed: Any) -> dict[str, Any]:
    """Routed-expert parameters (logical axes with "experts") per device: the bytes held, and for
    the float and compressed ones what bf16 storage of the same shards would take (None when int4
    or other packed forms are present), with their ratio per device."""
    from infire_jax.flax_nnx import nnx

    held, bf16, plain = [], [], True
    for _, var in nnx.to_flat_state(placed.state):
        axes = tuple(var.get_metadata().get("logical_axes") or ())
        if "experts" not in axes:
            continue
        value = var.get_value()
        held += [(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(value)]
        compressed = isinstance(value, EncodedWeight)
        plain &= compressed or jnp.issubdtype(value.dtype, jnp.floating)
        bf16.append((value.shape, jnp.bfloat16, placed.layout.sharding(axes, value.shape)))
    if not held:
        return {}
    out = dict(routed_expert_bytes_per_device=per_device_bytes(held))
    if plain:
        ref = per_device_bytes(bf16)
        out["routed_expert_bf16_bytes_per_device"] = ref
        out["routed_expert_ratio_per_device"] = {d: round(b / ref[d], 5) for d, b in out["routed_expert_bytes_per_device"].items()}
    return out


def _summary(colls: list[Collective], per: int, mesh_shape: Mapping[str, int]) -> dict[str, Any]:
    return dict(
        collectives=[
            dict(kind=c.kind, shape=c.shape, groups=c.groups, axes=list(collective_axes(c.groups, mesh_shape)),
                 bytes=c.bytes, count=c.count, total_bytes=c.total_bytes)
            for c in colls
        ],
        total_bytes=sum(c.total_bytes for c in colls),
        total_bytes_per_step=sum(c.total_bytes for c in colls) / per,
    )


def inspect_model(
    programs: Any, batch: int = 4, prompt_len: int = 32, cache_len: int = 128, steps: int = 1, page_size: int = 16,
    keep_hlo: bool = False,
) -> dict:
    """Per-device parameter/KV bytes and the collectives of the prefill and decode programs (decode:
    `steps` tokens for `batch` rows over a paged cache of batch * cache_len positions); keep_hlo adds
    both compiled programs' HLO text."""
    placed = programs.placed
    module = placed.module
    params = [(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(placed.state)]
    b = programs.batch_bucket(batch)
    # one page pool per KV cache group (kv/cache.py); a ring pool holds b rows of its window
    pools = kv_cache.pools(programs.cache_groups, b * (cache_len // page_size), page_size, b)
    per_row = programs.pack([pool.pages_for(cache_len) for pool in pools])
    num_pages, sizes = programs.pack([q.num_pages for q in pools]), programs.pack([q.page_size for q in pools])
    dtype = module.compute_dtype
    page_sh = jax.tree.leaves(programs.page_shardings(num_pages, sizes))
    page_shapes = [s for pair in zip(*programs.pool_shapes(num_pages, sizes)) for s in pair]
    kv = [(s, dtype, sh) for s, sh in zip(page_shapes, page_sh)]
    structs = [jax.ShapeDtypeStruct(s, dtype, sharding=sh) for s, sh in zip(page_shapes, page_sh)]
    half = len(structs) // 2
    tables = [jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=placed.layout.replicated) for n in jax.tree.leaves(per_row)]

    sp = jax.tree.map(lambda sh: jax.ShapeDtypeStruct((b,), jnp.float32, sharding=sh), programs._sampling_shardings(b))
    sp["top_k"] = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sp["top_k"].sharding)
    sp["seed"] = jax.ShapeDtypeStruct((b,), jnp.uint32, sharding=sp["seed"].sharding)
    row = programs._sh(("batch",), (b,))
    prefill = programs.prefill_fn(b, prompt_len).lower(
        placed.state,
        jax.ShapeDtypeStruct((b, prompt_len), jnp.int32, sharding=programs._sh(("batch", "seq"), (b, prompt_len))),
        jax.ShapeDtypeStruct((b,), jnp.int32, sharding=row),
        sp,
    ).compile()
    rep = placed.layout.replicated
    vec = lambda dt: jax.ShapeDtypeStruct((b,), dt, sharding=rep)  # noqa: E731
    decode = programs.decode_fn(b, per_row, num_pages, sizes, steps).lower(
        placed.state, programs.pack(structs[:half]), programs.pack(structs[half:]), programs.pack(tables),
        vec(jnp.int32), vec(jnp.int32), vec(jnp.bool_),
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rep) for k, v in sp.items()},
    ).compile()
    ticks = steps * programs.stages + programs.stages - 1
    hlo = dict(prefill_hlo=prefill.as_text(), decode_hlo=decode.as_text()) if keep_hlo else {}
    mesh = {k: int(v) for k, v in placed.layout.mesh.shape.items()}
    return hlo | dict(
        mesh=mesh,
        batch=b,
        prompt_len=prompt_len,
        cache_len=cache_len,
        param_bytes_total=int(sum(np.prod(s) * jnp.dtype(t).itemsize for s, t, _ in params)),
        param_bytes_per_device=per_device_bytes(params),
        **expert_bytes(placed),
        kv_bytes_per_device=per_device_bytes(kv),
        prefill=_summary(hlo_collectives(prefill.as_text()), 1, mesh),
        decode=_summary(hlo_collectives(decode.as_text()), steps, mesh) | dict(steps=steps, ticks=ticks, tokens_per_call=b * steps),
    )


@dataclasses.dataclass(frozen=True)
class DeviceShare:
    """What one device of a deployment holds: its mesh coordinates, pipeline stage, layers, and the
    slice [first, last] of every sharded logical dimension (ways = how many devices split it)."""

    device: int  # device id (mesh position for an abstract mesh)
    coords: dict[str, int]
    stage: int
    layers: tuple[int, ...]
    slices: dict[str, tuple[int, int, int]]  # logical -> (first, last, ways)


def device_shares(
    layout: Any, cfg: Any, layer_slots: tuple[int, ...], num_slots: int, kv_repeat: int = 1
) -> list[DeviceShare]:
    """Per device (mesh order) the layers and head / KV-head / expert / MLP / vocab slices the rules
    table gives it; works on a concrete Mesh or a jax.sharding.AbstractMesh (planning)."""
    mesh = layout.mesh
    shape = {a: int(n) for a, n in mesh.shape.items()}
    per_stage = num_slots // shape["pp"]
    experts = int(cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    expert_mlp = int(cfg.get("moe_intermediate_size") or cfg.intermediate_size) if experts else 0
    kv_heads = 0 if cfg.get("kv_lora_rank") else cfg.num_kv_heads * kv_repeat  # MLA caches a latent, no KV heads
    sizes = dict(heads=cfg.num_heads, kv_heads=kv_heads, experts=experts, expert_mlp=expert_mlp,
                 mlp=cfg.intermediate_size, vocab=cfg.vocab_size)
    ids = None if isinstance(mesh, jax.sharding.AbstractMesh) else mesh.devices  # abstract: number by position
    out = []
    for pos, idx in enumerate(np.ndindex(*shape.values())):
        c = dict(zip(shape, idx))
        slices = {}
        for logical, n in sizes.items():
            if not n:
                continue
            spec = layout.spec((logical,), (n,))
            axes = spec[0] if len(spec) else None
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            ways = int(np.prod([shape[a] for a in axes])) if axes else 1
            rank = 0
            for a in axes:
                rank = rank * shape[a] + c[a]
            first, last = rank * (n // ways), (rank + 1) * (n // ways) - 1
            if logical == "kv_heads" and kv_repeat > 1:  # name the checkpoint's KV heads a device holds
                first, last = first // kv_repeat, last // kv_repeat
            slices[logical] = (first, last, ways)
        layers = tuple(i for i, s in enumerate(layer_slots) if s // per_stage == c["pp"])
        out.append(DeviceShare(int(ids[idx].id) if ids is not None else pos, c, c["pp"], layers, slices))
    return out


def placed_shares(placed: Any) -> list[DeviceShare]:
    """device_shares of a placed (loaded) model."""
    cfg, module = placed.cfg, placed.module
    stored_kv = module.kv_heads  # KV heads may be repeated for tp
    return device_shares(placed.layout, cfg, module.layer_slots, len(module.active), stored_kv // cfg.num_kv_heads)


def layout_table(placed: Any) -> str:
    """Text map of a deployment: for each device, its pipeline stage, the layers it holds and the
    slice of heads / KV heads / experts / MLP columns / vocab it owns."""
    layout = placed.layout
    lines = [f"mesh {dict(layout.mesh.shape)}  rules: " + ", ".join(f"{k}->{v}" for k, v in layout.rules.items() if v)]
    for d in placed_shares(placed):
        parts = [f"device {d.device}", f"stage {d.stage}", f"layers {d.layers[0]}-{d.layers[-1]}" if d.layers else "layers -"]
        parts += [f"{k} {a}-{b}" + ("" if ways > 1 else " (all)") for k, (a, b, ways) in d.slices.items()]
        lines.append(" | ".join(parts))
    return "\n".join(lines)
