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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from infire_jax.kv import cache as kv_cache

__all__ = ["Collective", "hlo_collectives", "inspect_model", "layout_table"]

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


def _groups(rest: str) -> str:
    for key in ("replica_groups=", "source_target_pairs="):
        i = rest.find(key)
        if i < 0:
            continue
        s, depth, j = rest[i + len(key):], 0, 0
        while j < len(s):
            c = s[j]
            depth += c in "{[("
            depth -= c in "}])"
            if c == "," and depth == 0 and not s[j + 1 : j + 2].strip().startswith(("'", "{")):
                break
            j += 1
        return s[:j].strip()
    return ""


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


def _per_device_bytes(arrays: list[tuple[tuple[int, ...], Any, Any]]) -> dict[int, int]:
    """(shape, dtype, sharding) -> bytes held by each device id."""
    out: dict[int, int] = collections.defaultdict(int)
    for shape, dtype, sharding in arrays:
        item = jnp.dtype(dtype).itemsize
        for device, index in sharding.devices_indices_map(tuple(shape)).items():
            n = int(np.prod([len(range(*s.indices(d))) for s, d in zip(index, shape)] or [1]))
            out[device.id] += n * item
    return dict(sorted(out.items()))


def _summary(colls: list[Collective], per: int) -> dict[str, Any]:
    return dict(
        collectives=[
            dict(kind=c.kind, shape=c.shape, groups=c.groups, bytes=c.bytes, count=c.count, total_bytes=c.total_bytes)
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
    return hlo | dict(
        mesh={k: int(v) for k, v in placed.layout.mesh.shape.items()},
        batch=b,
        prompt_len=prompt_len,
        cache_len=cache_len,
        param_bytes_total=int(sum(np.prod(s) * jnp.dtype(t).itemsize for s, t, _ in params)),
        param_bytes_per_device=_per_device_bytes(params),
        kv_bytes_per_device=_per_device_bytes(kv),
        prefill=_summary(hlo_collectives(prefill.as_text()), 1),
        decode=_summary(hlo_collectives(decode.as_text()), steps) | dict(steps=steps, ticks=ticks, tokens_per_call=b * steps),
    )


def layout_table(placed: Any) -> str:
    """Text map of a deployment: for each device, its pipeline stage, the layers it holds and the
    slice of heads / KV heads / MLP columns / vocab it owns."""
    layout, cfg, module = placed.layout, placed.cfg, placed.module
    mesh = layout.mesh
    slots = module.layer_slots
    per_stage = len(module.active) // mesh.shape["pp"]
    lines = [f"mesh {dict(mesh.shape)}  rules: " + ", ".join(f"{k}->{v}" for k, v in layout.rules.items() if v)]
    stored_kv = module.kv_heads  # KV heads may be repeated for tp
    repeat = stored_kv // cfg.num_kv_heads
    sizes = dict(heads=cfg.num_heads, kv_heads=stored_kv, mlp=cfg.intermediate_size, vocab=cfg.vocab_size)
    for idx, dev in np.ndenumerate(mesh.devices):
        c = dict(zip(mesh.axis_names, idx))
        stage = c["pp"]
        layers = [i for i, s in enumerate(slots) if s // per_stage == stage]
        parts = [f"device {dev.id}", f"stage {stage}", f"layers {layers[0]}-{layers[-1]}" if layers else "layers -"]
        for logical, n in sizes.items():
            spec = layout.spec((logical,), (n,))
            axes = spec[0] if len(spec) else None
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
            pos = 0
            for a in axes:
                pos = pos * mesh.shape[a] + c[a]
            chunk = n // ways
            first, last = pos * chunk, (pos + 1) * chunk - 1
            if logical == "kv_heads" and repeat > 1:  # name the original KV heads a device holds
                first, last = first // repeat, last // repeat
            parts.append(f"{logical} {first}-{last}" + ("" if ways > 1 else " (all)"))
        lines.append(" | ".join(parts))
    return "\n".join(lines)


def layout_figure(placed: Any, path: str | None = None):
    """The layout_table as a picture: one box per device, grouped by pipeline stage (rows) and
    tensor/expert-parallel rank (columns). Saved as PNG when `path` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = layout_table(placed).splitlines()
    mesh = placed.layout.mesh
    n_rows = mesh.shape["dp"] * mesh.shape["pp"]
    n_cols = mesh.shape["ep"] * mesh.shape["tp"]
    fig, ax = plt.subplots(figsize=(2.6 * n_cols + 0.5, 1.5 * n_rows + 0.8))
    colors = plt.get_cmap("tab10")
    for k, (idx, _) in enumerate(np.ndenumerate(mesh.devices)):
        dp, pp, ep, tp = idx
        r, c = dp * mesh.shape["pp"] + pp, ep * mesh.shape["tp"] + tp
        ax.add_patch(plt.Rectangle((c, -r), 0.95, 0.9, color=colors(pp % 10), alpha=0.35))
        text = rows[1 + k].split(" | ")
        ax.text(c + 0.05, -r + 0.82, "\n".join(text), va="top", fontsize=7, family="monospace")
    ax.set_xlim(-0.05, n_cols)
    ax.set_ylim(-n_rows + 0.9, 1)
    ax.axis("off")
    ax.set_title(rows[0][:110], fontsize=8)
    if path:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig
