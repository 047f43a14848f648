"""Pictures of deployments: who holds what, does it fit, and what crosses the wires each step.

  layout = measured_layout(model.programs)                       # a loaded model: compiled programs
  layout = planned_layout("kimi_k25", Deployment("h100", 8, mesh="pp=2,tp=4", weights="int4_experts"))
  fig = layout_figure(layout)                                    # a matplotlib Figure
  fig = compare_deployments("kimi_k25", [Deployment(...), ...])  # several meshes side by side
  write_trace(model, "/tmp/trace")                               # a jax.profiler trace of generation

Both layout sources give the same `LayoutData`: the mesh as a grid (pp rows, tp columns, one panel
per dp x ep coordinate), each device's pipeline stage, the slices of heads / experts / vocab it owns,
its memory by kind, and the collectives of the prefill and decode programs per step. A measured
layout reads the loaded arrays' shardings and the compiled programs' HLO (engine.inspect); a planned
one reads the capacity planner and the simulator's cost model (plan.capacity, plan.simulator), so
its numbers are the planner's. Every figure keeps the numbers it was drawn from
(`fig.layout_data`, `fig.comparison`) for tests and for readers who want the values.

This module sits above plan/ and engine/ (it draws what they compute); nothing below imports it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import pathlib
import re
import textwrap
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from infire_jax import mesh as mesh_lib
from infire_jax.engine.inspect import DeviceShare, device_shares, inspect_model, per_device_bytes, placed_shares
from infire_jax.engine.programs import Programs
from infire_jax.plan.capacity import Deployment, load_hf_config, param_kind, plan_capacity
from infire_jax.plan.hardware import GiB, Hardware, get_hardware
from infire_jax.plan.simulator import CostModel
from infire_jax.sharding import Layout

__all__ = [
    "WEIGHT_GROUPS",
    "CollectiveRow",
    "DeviceMemory",
    "LayoutData",
    "DeploymentSummary",
    "measured_layout",
    "planned_layout",
    "layout_figure",
    "compare_deployments",
    "write_trace",
]

# The parameter kinds of plan.capacity.param_kind, grouped as the figures show them.
WEIGHT_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("attention",),
    "MLP / shared expert": ("dense_mlp", "shared_expert"),
    "routed experts + router": ("routed_expert", "router"),
    "embedding + LM head": ("embedding", "lm_head"),
    "norms": ("norm",),
}
_GROUP_OF = {kind: group for group, kinds in WEIGHT_GROUPS.items() for kind in kinds}
_COLORS = {
    "attention": "#4C72B0", "MLP / shared expert": "#55A868", "routed experts + router": "#8172B3",
    "embedding + LM head": "#64B5CD", "norms": "#937860", "KV cache": "#DD8452", "reserved": "#9E9E9E",
    "free": "#F2F2F2", "over capacity": "#C44E52",
}
_SLICE_NAMES = dict(heads="heads", kv_heads="KV heads", experts="experts", expert_mlp="expert cols", mlp="MLP cols",
                    vocab="vocab")


def _group_weights(by_kind: Mapping[str, float]) -> dict[str, float]:
    out = {g: 0.0 for g in WEIGHT_GROUPS}
    for kind, b in by_kind.items():
        out[_GROUP_OF.get(kind, "attention")] += b
    return out


# ------------------------------------------------------------------------------------------------
# The numbers a layout figure is drawn from
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DeviceMemory:
    """One device: where it sits, what it owns, and its memory in bytes."""

    share: DeviceShare
    weights: dict[str, float]  # WEIGHT_GROUPS name -> bytes
    kv: float  # KV cache at the layout's batch and context
    reserved: dict[str, float]  # what the runtime keeps (planner: runtime, headroom, activations, logits)
    capacity: float | None  # device memory of the chosen hardware (None: no hardware, no "free")

    @property
    def device(self) -> int:
        return self.share.device

    @property
    def weight_bytes(self) -> float:
        return sum(self.weights.values())

    @property
    def used(self) -> float:
        return self.weight_bytes + self.kv + sum(self.reserved.values())

    @property
    def free(self) -> float | None:
        return None if self.capacity is None else self.capacity - self.used


@dataclasses.dataclass(frozen=True)
class CollectiveRow:
    """Collectives of one kind over the same mesh axes in one program, per device per step."""

    program: str  # "prefill" | "decode"
    kind: str
    axes: tuple[str, ...]
    count: float  # executions per step
    bytes: float  # bytes per device per step (message sizes summed over executions)
    message: str  # what one message is (measured: the largest one's type; planned: what it carries)


@dataclasses.dataclass
class LayoutData:
    title: str
    source: str  # how the numbers were obtained
    mesh: dict[str, int]
    devices: list[DeviceMemory]
    collectives: list[CollectiveRow]
    steps: dict[str, str]  # program -> what one step is ("4 rows x 32 prompt tokens", ...)
    kv_what: str  # the batch and context the KV bars hold
    hardware: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def weight_bytes(self) -> dict[int, float]:
        return {d.device: d.weight_bytes for d in self.devices}

    def kv_bytes(self) -> dict[int, float]:
        return {d.device: d.kv for d in self.devices}

    def bytes_per_step(self, program: str) -> float:
        return sum(c.bytes for c in self.collectives if c.program == program)


def _mesh_name(shape: Mapping[str, int]) -> str:
    return ",".join(f"{a}={n}" for a, n in shape.items() if n > 1) or "tp=1"


def _hardware_reserve(hw: Hardware) -> dict[str, float]:
    return dict(runtime=hw.runtime_reserve_bytes, headroom=hw.headroom_fraction * hw.memory_bytes)


def measured_layout(
    programs: Programs,
    *,
    report: Mapping[str, Any] | None = None,
    batch: int = 4,
    prompt_len: int = 32,
    cache_len: int = 128,
    steps: int = 8,
    hardware: str | Hardware | None = None,
    title: str | None = None,
) -> LayoutData:
    """The layout of a loaded model (`engine.programs.Programs`, e.g. `model.programs`): weights by
    kind from the placed arrays' shardings, KV and collectives from `inspect_model` (pass its
    `report` to reuse one; otherwise the programs are compiled for batch / prompt_len / cache_len /
    steps). With `hardware` ("h100", ...) each bar shows that device's memory, its runtime reserve
    and what is left free."""
    from infire_jax.flax_nnx import nnx

    placed = programs.placed
    if report is None:
        report = inspect_model(programs, batch, prompt_len, cache_len, steps)
    by_kind: dict[str, dict[int, float]] = collections.defaultdict(dict)
    for path, var in nnx.to_flat_state(placed.state):
        value = var.get_value()
        kind = param_kind(tuple(str(p) for p in path), tuple(var.get_metadata()["logical_axes"]))
        leaves = [(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(value)]  # a compressed weight: its leaves
        for dev, b in per_device_bytes(leaves).items():
            by_kind[kind][dev] = by_kind[kind].get(dev, 0) + b
    cfg = placed.cfg
    shares = placed_shares(placed)
    hw = get_hardware(hardware) if hardware is not None else None
    kv = {int(k): v for k, v in report["kv_bytes_per_device"].items()}
    devices = [
        DeviceMemory(
            share=s,
            weights=_group_weights({k: per.get(s.device, 0) for k, per in by_kind.items()}),
            kv=float(kv.get(s.device, 0)),
            reserved=_hardware_reserve(hw) if hw else {},
            capacity=hw.memory_bytes if hw else None,
        )
        for s in shares
    ]
    mesh = {k: int(v) for k, v in report["mesh"].items()}
    rows = []
    for program, per in (("prefill", 1), ("decode", report["decode"].get("steps", 1))):
        groups: dict[tuple, list[dict]] = collections.defaultdict(list)
        for c in report[program]["collectives"]:
            groups[(c["kind"], tuple(c["axes"]))].append(c)
        for (kind, axes), cs in groups.items():
            top = max(cs, key=lambda c: c["bytes"])
            rows.append(CollectiveRow(program, kind, axes, sum(c["count"] for c in cs) / per,
                                      sum(c["total_bytes"] for c in cs) / per, "largest " + re.sub(r"\{[^}]*\}", "", top["shape"])))
    b = report["batch"]
    ticks, calls = report["decode"].get("ticks"), report["decode"].get("steps", 1)
    name = title or f"{cfg.family} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.architecture})"
    return LayoutData(
        title=f"{name} on {_mesh_name(mesh)}",
        source="measured: the loaded arrays' shardings and the compiled programs' HLO (engine/inspect.py)",
        mesh=mesh,
        devices=devices,
        collectives=sorted(rows, key=lambda r: (r.program != "prefill", -r.bytes)),
        steps=dict(prefill=f"one call: {b} rows x {report['prompt_len']} prompt tokens",
                   decode=f"one token for {b} rows" + (f" ({ticks} pipeline ticks per {calls} steps)" if ticks != calls else "")),
        kv_what=f"KV cache for {b} rows x {report['cache_len']} positions (paged)",
        hardware=hw.name if hw else None,
    )


def planned_layout(
    model: str | pathlib.Path | Mapping[str, Any],
    deployment: Deployment,
    *,
    batch: int = 16,
    context: int = 8192,
    prefill_tokens: int = 4096,
) -> LayoutData:
    """The layout of a model config on a deployment, on paper: the capacity planner's weights by kind,
    reserved memory and KV cache (`batch` sequences of `context` tokens), and the cost model's
    collectives for a decode step of `batch` rows and a prefill pass of `prefill_tokens` tokens.
    Without `deployment.mesh` the planner's default (tp over all devices) is drawn; one replica."""
    plan = plan_capacity(model, deployment)
    cost = CostModel(plan)
    am = plan.abstract
    layout = Layout(jax.sharding.AbstractMesh(tuple(am.mesh_shape.values()), mesh_lib.AXES), am.rules)
    shares = device_shares(layout, am.cfg, am.layer_slots, am.num_slots, am.kv_repeat)
    per_stage = plan.seq_bytes_per_stage(context)
    weights = _group_weights(plan.weight_breakdown_per_device)
    devices = [
        DeviceMemory(share=s, weights=dict(weights), kv=batch * per_stage[s.stage], reserved=dict(plan.reserved),
                     capacity=plan.hardware.memory_bytes)
        for s in shares
    ]
    rows = []
    for program, colls in (("prefill", cost.collectives(prefill_tokens)), ("decode", cost.decode_collectives(batch))):
        rows += [CollectiveRow(program, c.kind, c.axes, c.count, c.total_bytes, f"{c.what}, {_fmt_bytes(c.bytes)} each")
                 for c in colls]
    notes = [] if plan.fits else [f"does not fit: {plan.reason}"]
    return LayoutData(
        title=f"{plan.model} ({plan.weights}) on {plan.mesh}, {plan.devices_per_replica}x {plan.hardware.name.upper()}",
        source="planned from the config: plan.capacity (memory) and plan.simulator.CostModel (collectives)",
        mesh=dict(am.mesh_shape),
        devices=devices,
        collectives=sorted(rows, key=lambda r: (r.program != "prefill", -r.bytes)),
        steps=dict(prefill=f"one pass of {prefill_tokens:,} prompt tokens", decode=f"one token for {batch} rows"),
        kv_what=f"KV cache for {batch} sequences x {context:,} tokens ({plan.kv_dtype_bytes}-byte KV)",
        hardware=plan.hardware.name,
        notes=notes,
    )


# ------------------------------------------------------------------------------------------------
# Drawing helpers (the layout figure is laid out in inches on one full-figure axes)
# ------------------------------------------------------------------------------------------------

CELL_W, GAP, PANEL_GAP, STAGE_COL, MARGIN = 2.55, 0.1, 0.35, 1.5, 0.3  # inches
BAR_H, LINE = 0.2, 0.2  # memory bar height, table row height
EM = 0.6  # a generous average character width of DejaVu Sans, in em (it averages ~0.55)


def _unit(largest: float) -> tuple[str, float]:
    for name, size in (("GiB", GiB), ("MiB", float(1 << 20)), ("KiB", 1024.0)):
        if largest >= size:
            return name, size
    return "B", 1.0


def _fmt_bytes(b: float) -> str:
    name, size = _unit(abs(b))
    return f"{b / size:,.1f} {name}" if size > 1 else f"{b:,.0f} B"


def _fmt_count(n: float) -> str:
    return f"{n:,.0f}" if abs(n - round(n)) < 1e-9 or n >= 100 else f"{n:,.2f}"


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    chars = max(20, int(width_in * 72 / (fontsize * EM)))
    return "\n".join(textwrap.wrap(text, chars))


def _stage_color(stage: int) -> Any:
    import matplotlib

    return matplotlib.colormaps["tab10"](stage % 10)


def _owned_lines(share: DeviceShare) -> list[str]:
    items = []
    for logical, (first, last, ways) in share.slices.items():
        what = f"{first}-{last}" if ways > 1 else "all"
        items.append(f"{_SLICE_NAMES.get(logical, logical)} {what}")
    lines: list[str] = []
    for item in items:  # two to a line where they fit the box
        if lines and lines[-1].count(" · ") == 0 and _text_width(lines[-1] + " · " + item, 7.5) <= CELL_W - 0.16:
            lines[-1] += " · " + item
        else:
            lines.append(item)
    return lines


def _layers(share: DeviceShare) -> str:
    return f"layers {share.layers[0]}-{share.layers[-1]}" if share.layers else "no layers"


def _text_width(text: str, fontsize: float) -> float:
    """A generous estimate of a single line's width in inches."""
    return len(text) * fontsize * EM / 72


def _draw_bar(ax: Any, x: float, y: float, d: DeviceMemory, scale: float) -> None:
    """A device's stacked memory bar from (x, y) at `scale` bytes per inch: weights by kind, KV,
    reserved, then free up to the device's memory (framed); anything beyond it is hatched red."""
    from matplotlib.patches import Rectangle

    parts = list(d.weights.items()) + [("KV cache", d.kv), ("reserved", sum(d.reserved.values()))]
    if d.capacity is not None and d.free > 0:
        parts.append(("free", d.free))
    pos = x
    for name, b in parts:
        if b > 0:
            ax.add_patch(Rectangle((pos, y), b / scale, BAR_H, facecolor=_COLORS[name], edgecolor="none"))
            pos += b / scale
    if d.capacity is not None:
        ax.add_patch(Rectangle((x, y), d.capacity / scale, BAR_H, facecolor="none", edgecolor="#333333", linewidth=0.7))
        if d.free < 0:
            ax.add_patch(Rectangle((x + d.capacity / scale, y - 0.03), -d.free / scale, BAR_H + 0.06, facecolor="none",
                                   edgecolor=_COLORS["over capacity"], hatch="////", linewidth=1.0))


def _bar_label(d: DeviceMemory) -> tuple[str, str]:
    """Lines under a device's bar: what it holds, then what is reserved and left (or missing)."""
    text = f"weights {_fmt_bytes(d.weight_bytes)} · KV {_fmt_bytes(d.kv)}"
    if d.capacity is None:
        return text, "#222222"
    rest = f"reserved {_fmt_bytes(sum(d.reserved.values()))} · "
    if d.free >= 0:
        return text + "\n" + rest + f"free {_fmt_bytes(d.free)} of {_fmt_bytes(d.capacity)}", "#222222"
    return text + "\n" + rest + f"{_fmt_bytes(-d.free)} over {_fmt_bytes(d.capacity)}", _COLORS["over capacity"]


def _pp_bytes(data: LayoutData) -> float:
    return sum(c.bytes for c in data.collectives if c.program == "decode" and c.axes == ("pp",))


def _legend_entries(data: LayoutData) -> list[tuple[str, dict[str, Any]]]:
    names = [g for g in WEIGHT_GROUPS if any(d.weights.get(g, 0) > 0 for d in data.devices)] + ["KV cache"]
    if any(d.reserved for d in data.devices):
        names.append("reserved")
    if any(d.free is not None and d.free > 0 for d in data.devices):
        names.append("free")
    out = [(n, dict(facecolor=_COLORS[n], edgecolor="#444444", linewidth=0.4)) for n in names]
    if any(d.free is not None and d.free < 0 for d in data.devices):
        out.append(("over capacity", dict(facecolor="none", edgecolor=_COLORS["over capacity"], hatch="////")))
    return out


def _table_rows(data: LayoutData, max_rows: int) -> list[tuple[str, list[str], dict[str, Any]]]:
    """(kind of row, cells, text style) for the collectives table, prefill then decode."""
    rows = []
    for program in ("prefill", "decode"):
        mine = [c for c in data.collectives if c.program == program]
        rows.append(("program", [program, data.steps.get(program, "")], {}))
        if not mine:
            rows.append(("note", ["", "none (one device: nothing to exchange)"], dict(color="#666666")))
        for r in mine[:max_rows]:
            rows.append(("row", ["", r.kind, "+".join(r.axes) or "-", _fmt_count(r.count), _fmt_bytes(r.bytes), r.message], {}))
        rest = mine[max_rows:]
        if rest:
            rows.append(("row", ["", f"{len(rest)} more", "", _fmt_count(sum(r.count for r in rest)),
                                 _fmt_bytes(sum(r.bytes for r in rest)), ""], dict(color="#666666")))
        rows.append(("row", ["", "total", "", "", _fmt_bytes(sum(r.bytes for r in mine)), ""], dict(fontweight="bold")))
    return rows


TABLE_COLS = (0.0, 0.9, 2.9, 4.2, 5.6, 7.0)  # left edges (count and bytes are right-aligned at +1.1)
TABLE_HEADS = ("program", "collective", "over mesh axes", "count / step", "bytes / step", "message")


def layout_figure(data: LayoutData, *, max_rows: int = 6) -> Any:
    """The figure of a `LayoutData` (`measured_layout` / `planned_layout`): one box per device,
    coloured by pipeline stage, in a grid of pp rows x tp columns with one panel per dp x ep
    coordinate; in each box the slices the device owns and a stacked memory bar (weights by kind, KV
    cache, reserved, free, a shortfall hatched red); left of the grid the stages, their layers and
    what they hand on per decode step; below, the collectives of the prefill and decode programs per
    step (at most `max_rows` per program, the rest summed). Laid out in inches so nothing is clipped;
    the data rides along as `fig.layout_data`."""
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, Rectangle

    mesh = data.mesh
    pp, tp = mesh["pp"], mesh["tp"]
    panels = [(dp, ep) for dp in range(mesh["dp"]) for ep in range(mesh["ep"])]
    panel_w = tp * CELL_W + (tp - 1) * GAP
    per_line = max(1, min(len(panels), int((15.0 - STAGE_COL + PANEL_GAP) // (panel_w + PANEL_GAP))))
    panel_lines = math.ceil(len(panels) / per_line)
    label_h = 0.3 if len(panels) > 1 else 0.0
    with_capacity = any(d.capacity is not None for d in data.devices)
    owned = max(len(_owned_lines(d.share)) for d in data.devices)
    cell_h = 0.32 + 0.16 * owned + 0.62 + 0.14 * with_capacity
    line_h = label_h + pp * cell_h + (pp - 1) * GAP
    grid_w = STAGE_COL + per_line * panel_w + (per_line - 1) * PANEL_GAP
    grid_h = panel_lines * line_h + (panel_lines - 1) * PANEL_GAP

    table = _table_rows(data, max_rows)
    table_w = max(TABLE_COLS[5] + max(_text_width(c[5], 8) for k, c, _ in table if k == "row"),
                  TABLE_COLS[1] + max(_text_width(c[1], 8) for k, c, _ in table if k == "program"))
    width = max(grid_w, table_w, 8.0) + 2 * MARGIN
    text_w = width - 2 * MARGIN
    title = _wrap(data.title, text_w, 12)
    subtitle = [_wrap(t, text_w, 8.5) for t in [data.source + ". " + data.kv_what + "."] + data.notes]

    legend = _legend_entries(data)
    legend_lines, x = [[]], 0.0
    for name, style in legend:
        w = 0.3 + _text_width(name, 8) + 0.25
        if x + w > text_w and legend_lines[-1]:
            legend_lines.append([])
            x = 0.0
        legend_lines[-1].append((x, name, style))
        x += w

    title_h = 0.2 + 0.22 * (title.count("\n") + 1) + sum(0.16 * (t.count("\n") + 1) for t in subtitle) + 0.1
    legend_h = 0.24 * len(legend_lines) + 0.15
    table_h = LINE * (len(table) + 2) + 0.2
    height = title_h + legend_h + grid_h + 0.3 + table_h + 0.1

    fig = Figure(figsize=(width, height), dpi=100)
    fig.patch.set_facecolor("white")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")

    # -- title, then the legend of the memory bars ---------------------------------------------
    y = height - 0.2
    ax.text(MARGIN, y, title, fontsize=12, fontweight="bold", va="top")
    y -= 0.22 * (title.count("\n") + 1) + 0.04
    for i, t in enumerate(subtitle):
        ax.text(MARGIN, y, t, fontsize=8.5, va="top", color=_COLORS["over capacity"] if i else "#333333")
        y -= 0.16 * (t.count("\n") + 1)
    y = height - title_h
    for line in legend_lines:
        for x, name, style in line:
            ax.add_patch(Rectangle((MARGIN + x, y - 0.16), 0.26, 0.13, **style))
            ax.text(MARGIN + x + 0.32, y - 0.095, name, fontsize=8, va="center")
        y -= 0.24
    y = height - title_h - legend_h

    # -- the mesh: stage column, then one panel per (dp, ep) -----------------------------------
    inner = CELL_W - 0.16
    scale = max(max(d.used, d.capacity or 0.0) for d in data.devices) / inner or 1.0  # bytes per inch of bar
    pp_bytes = _pp_bytes(data)
    for line in range(panel_lines):
        row_top = y - line * (line_h + PANEL_GAP) - label_h
        for s in range(pp):
            share = next(d.share for d in data.devices if d.share.coords["pp"] == s)
            cy = row_top - s * (cell_h + GAP)
            ax.text(MARGIN, cy - 0.1, f"stage {s}", fontsize=9, fontweight="bold", va="top", color=_stage_color(s))
            ax.text(MARGIN, cy - 0.32, _layers(share), fontsize=8, va="top")
            if s + 1 < pp:
                ya, yb = cy - cell_h + 0.45, cy - cell_h - GAP - 0.15
                ax.add_patch(FancyArrowPatch((MARGIN + 0.12, ya), (MARGIN + 0.12, yb), arrowstyle="-|>",
                                             mutation_scale=10, color="#555555"))
                if pp_bytes:
                    ax.text(MARGIN + 0.22, (ya + yb) / 2, f"sends {_fmt_bytes(pp_bytes)}\nper decode step",
                            fontsize=7, va="center")
        for k, (dp, ep) in enumerate(panels[line * per_line:(line + 1) * per_line]):
            x0 = MARGIN + STAGE_COL + k * (panel_w + PANEL_GAP)
            if label_h:
                name = ", ".join(f"{a}={v}" for a, v in (("dp", dp), ("ep", ep)) if mesh[a] > 1)
                ax.text(x0, row_top + label_h - 0.05, name, fontsize=9, fontweight="bold", va="top")
            for d in data.devices:
                c = d.share.coords
                if (c["dp"], c["ep"]) != (dp, ep):
                    continue
                x, yt, color = x0 + c["tp"] * (CELL_W + GAP), row_top - c["pp"] * (cell_h + GAP), _stage_color(c["pp"])
                ax.add_patch(Rectangle((x, yt - cell_h), CELL_W, cell_h, facecolor=(*color[:3], 0.12), edgecolor=color,
                                       linewidth=1.2))
                ax.text(x + 0.08, yt - 0.07, f"device {d.device}", fontsize=9, fontweight="bold", va="top")
                ax.text(x + CELL_W - 0.08, yt - 0.08, f"stage {c['pp']}", fontsize=7.5, va="top", ha="right", color=color)
                ax.text(x + 0.08, yt - 0.3, "\n".join(_owned_lines(d.share)), fontsize=7.5, va="top", linespacing=1.25)
                bar_y = yt - cell_h + 0.3 + 0.14 * with_capacity
                _draw_bar(ax, x + 0.08, bar_y, d, scale)
                label, col = _bar_label(d)
                ax.text(x + 0.08, bar_y - 0.06, label, fontsize=7, va="top", color=col, linespacing=1.3)
    y -= grid_h + 0.3

    # -- collectives per step ------------------------------------------------------------------
    ax.text(MARGIN, y, "Collectives per device per step", fontsize=9.5, fontweight="bold", va="top")
    y -= LINE + 0.05
    for i, head in enumerate(TABLE_HEADS):
        right = i in (3, 4)
        ax.text(MARGIN + TABLE_COLS[i] + (1.1 if right else 0), y, head, fontsize=8, fontweight="bold", va="top",
                ha="right" if right else "left")
    y -= LINE
    ax.plot([MARGIN, width - MARGIN], [y + 0.03, y + 0.03], color="#999999", linewidth=0.6)
    for kind, cells, style in table:
        if kind == "program":
            ax.text(MARGIN, y, cells[0], fontsize=8, fontweight="bold", va="top")
            ax.text(MARGIN + TABLE_COLS[1], y, cells[1], fontsize=8, va="top", style="italic", color="#444444")
        else:
            for i, t in enumerate(cells):
                right = i in (3, 4)
                ax.text(MARGIN + TABLE_COLS[i] + (1.1 if right else 0), y, t, fontsize=8, va="top",
                        ha="right" if right else "left", **style)
        y -= LINE
    fig.layout_data = data
    return fig


# ------------------------------------------------------------------------------------------------
# Several deployments of one model side by side
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DeploymentSummary:
    """One deployment's numbers in `compare_deployments` (the planner's and the cost model's)."""

    label: str
    mesh: str
    hardware: str
    count: int
    fits: bool
    reason: str
    weights: dict[str, float]  # WEIGHT_GROUPS name -> bytes per device
    reserved: float  # bytes per device
    kv: float  # bytes per device (bottleneck stage) for `batch` sequences of `context` tokens
    capacity: float  # device memory
    kv_tokens: float  # tokens that fit in the KV cache of all replicas, as sequences of `context`
    decode_collectives: dict[str, float]  # "kind over axes" -> bytes per device per decode step
    tpot_s: float  # the cost model's time per output token at `batch` rows of `context` tokens

    @property
    def weight_bytes(self) -> float:
        return sum(self.weights.values())

    @property
    def free(self) -> float:
        return self.capacity - self.weight_bytes - self.reserved - self.kv


def _summarize(model: Any, dep: Deployment, batch: int, context: int) -> DeploymentSummary:
    plan = plan_capacity(model, dep)
    cost = CostModel(plan)
    colls: dict[str, float] = {}
    for c in cost.decode_collectives(batch):
        key = f"{c.what} ({c.kind} over {'+'.join(c.axes)})"
        colls[key] = colls.get(key, 0.0) + c.total_bytes
    label = plan.mesh if plan.replicas == 1 else f"{plan.replicas}x {plan.mesh}"
    return DeploymentSummary(
        label=label, mesh=plan.mesh, hardware=plan.hardware.name, count=plan.count, fits=plan.fits, reason=plan.reason,
        weights=_group_weights(plan.weight_breakdown_per_device), reserved=sum(plan.reserved.values()),
        kv=batch * plan.seq_bytes_per_device(context), capacity=plan.hardware.memory_bytes,
        kv_tokens=plan.max_cache_tokens(context) * plan.replicas, decode_collectives=colls,
        tpot_s=cost.decode_step(batch, context),
    )


def compare_deployments(
    model: str | pathlib.Path | Mapping[str, Any],
    deployments: Sequence[Deployment],
    *,
    batch: int = 16,
    context: int = 8192,
) -> Any:
    """One figure comparing deployments of the same model, from the config alone: memory per device
    (weights by kind, reserved, KV cache for `batch` sequences of `context` tokens, free or the
    shortfall), the KV tokens that fit, collective bytes per device per decode step, and the cost
    model's time per output token at `batch` rows. The numbers ride along as `fig.comparison` (a
    list of `DeploymentSummary`, in the order given)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    if not deployments:
        raise ValueError("compare_deployments needs at least one Deployment (with its mesh given)")
    name, hf = load_hf_config(model)
    rows = [_summarize(hf | {"_name": name}, d, batch, context) for d in deployments]
    labels = [r.label for r in rows]
    n = len(rows)
    x = np.arange(n)
    fig = Figure(figsize=(max(12.0, 1.3 * 3 * n + 3.0), 4.2 + 0.45 * n), dpi=100, layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[0.9 + 0.42 * n, 3.0])
    hw = sorted({f"{r.count}x {r.hardware.upper()}" for r in rows})
    fig.suptitle(f"{name} on {', '.join(hw)}: {n} deployments, {batch} sequences of {context:,} tokens "
                 "(capacity planner + simulator cost model)", fontsize=11, fontweight="bold")

    # memory per device: one horizontal stacked bar per deployment, the device memory dashed
    ax = fig.add_subplot(grid[0, :])
    left = np.zeros(n)
    parts = [(g, [r.weights[g] for r in rows]) for g in WEIGHT_GROUPS if any(r.weights[g] for r in rows)]
    parts += [("reserved", [r.reserved for r in rows]), ("KV cache", [r.kv for r in rows]),
              ("free", [max(r.free, 0.0) for r in rows])]
    handles = []
    for part, vals in parts:
        v = np.array(vals) / GiB
        ax.barh(x, v, left=left, color=_COLORS[part], edgecolor="white", linewidth=0.4, height=0.6)
        handles.append(Patch(facecolor=_COLORS[part], edgecolor="#444444", linewidth=0.4, label=part))
        left += v
    caps = {r.capacity for r in rows}
    for cap in caps:
        ax.axvline(cap / GiB, color="#222222", linestyle="--", linewidth=0.9)
    for i, r in enumerate(rows):
        if r.free < 0:
            ax.barh(i, -r.free / GiB, left=r.capacity / GiB, color="none", edgecolor=_COLORS["over capacity"],
                    hatch="////", height=0.6, linewidth=0)
        what = (f"free {r.free / GiB:.1f} GiB" if r.free >= 0 else
                f"{-r.free / GiB:.1f} GiB short" + ("" if r.fits else ": does not fit"))
        ax.text(max(left[i], r.capacity / GiB) + 0.6, i, f"weights {r.weight_bytes / GiB:.1f} · KV {r.kv / GiB:.1f} · {what}",
                va="center", fontsize=8.5, color="#222222" if r.free >= 0 else _COLORS["over capacity"])
    if any(r.free < 0 for r in rows):
        handles.append(Patch(facecolor="none", edgecolor=_COLORS["over capacity"], hatch="////", label="over capacity"))
    ax.set_yticks(x, labels, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left.max(), max(caps) / GiB) * 1.45)
    ax.set_xlabel(f"GiB per device (bottleneck stage); dashed: {rows[0].hardware.upper()} memory "
                  f"{max(caps) / GiB:.1f} GiB")
    ax.set_title("memory per device", fontsize=10, loc="left")
    ax.legend(handles=handles, fontsize=7.5, ncol=len(handles), loc="lower right", bbox_to_anchor=(1.0, 1.0),
              frameon=False, handlelength=1.2, columnspacing=0.8, borderaxespad=0.2)
    ax.spines[["top", "right"]].set_visible(False)

    def bars(ax: Any, values: Sequence[float], fmt: Any, title: str, ylabel: str, color: str) -> None:
        ax.bar(x, values, color=[color if r.fits else "#BBBBBB" for r in rows], width=0.6)
        top = max(values) if max(values) > 0 else 1.0
        for i, (v, r) in enumerate(zip(values, rows)):
            ax.text(i, v + top * 0.02, fmt(v) + ("" if r.fits else "\n(does not fit)"), ha="center", va="bottom",
                    fontsize=8.5, color="#222222" if r.fits else _COLORS["over capacity"])
        ax.set_ylim(0, top * 1.3)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)

    ax = fig.add_subplot(grid[1, 0])
    bars(ax, [r.kv_tokens for r in rows], lambda v: f"{v:,.0f}", f"KV tokens that fit\n(as sequences of {context:,})",
         "tokens", _COLORS["KV cache"])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e3:,.0f}k" if v else "0"))
    # collective bytes per decode step, stacked by what they carry
    ax = fig.add_subplot(grid[1, 1])
    kinds = sorted({k for r in rows for k in r.decode_collectives})
    bottom = np.zeros(n)
    unit, size = _unit(max(sum(r.decode_collectives.values()) for r in rows) or 1.0)
    for j, kind in enumerate(kinds):
        v = np.array([r.decode_collectives.get(kind, 0.0) for r in rows]) / size
        ax.bar(x, v, bottom=bottom, width=0.6, label=kind, color=_series_color(j))
        bottom += v
    for i, total in enumerate(bottom):
        ax.text(i, total + max(bottom.max(), 1e-9) * 0.02, f"{total:,.1f} {unit}", ha="center", va="bottom", fontsize=8.5)
    ax.set_ylim(0, max(bottom.max(), 1e-9) * 1.6)
    ax.set_title(f"collective bytes per device\nper decode step ({batch} rows)", fontsize=10)
    ax.set_ylabel(unit)
    if kinds:
        ax.legend(fontsize=7, loc="upper right", frameon=False)
    ax = fig.add_subplot(grid[1, 2])
    bars(ax, [r.tpot_s * 1e3 for r in rows], lambda v: f"{v:.1f} ms",
         f"time per output token\n(cost model, {batch} rows of {context:,})", "ms", "#4C72B0")
    for ax in fig.axes[1:]:
        ax.set_xticks(x, labels, fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
    fig.comparison = rows
    return fig


def _series_color(i: int) -> Any:
    import matplotlib

    return matplotlib.colormaps["Set2"](i % 8)


# ------------------------------------------------------------------------------------------------
# Traces
# ------------------------------------------------------------------------------------------------


def write_trace(model: Any, trace_dir: str | pathlib.Path, *, prompt_len: int = 32, decode_calls: int = 2,
                batch: int = 1) -> list[pathlib.Path]:
    """Run one prefill and `decode_calls` decode calls (each `decode_steps` tokens) of a loaded
    `infire_jax.api.Model` under jax.profiler and return the files written: an XPlane protobuf
    (TensorBoard's profile plugin / xprof) and a Chrome-trace JSON that ui.perfetto.dev opens, under
    trace_dir/plugins/profile/<run>/. The programs are compiled first (outside the trace), so the
    trace shows the steps, not the compiler."""
    trace_dir = pathlib.Path(trace_dir)
    prompts = [[(7 * i + j) % model.cfg.vocab_size for j in range(prompt_len)] for i in range(batch)]
    new_tokens = decode_calls * model.programs.decode_steps
    model.generate(prompts, max_new_tokens=new_tokens)  # compile outside the trace
    before = set(trace_dir.glob("plugins/profile/*/*"))
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        with jax.profiler.TraceAnnotation(f"infire_jax: prefill {batch}x{prompt_len} + {new_tokens} decode steps"):
            model.generate(prompts, max_new_tokens=new_tokens)
    return sorted(set(trace_dir.glob("plugins/profile/*/*")) - before)
