"""infire_jax.viz: the layout figure's numbers are inspect_program's (measured) or the planner's (on
paper), no text falls outside a figure, the K2.5 comparison renders from configs alone in < 30 s, and
write_trace leaves a trace the profiler's loaders open."""

from __future__ import annotations

import gzip
import io
import json
import time

import numpy as np
import pytest

import infire_jax
from infire_jax import viz
from infire_jax.checkpoint import tiny
from infire_jax.engine.inspect import inspect_model
from infire_jax.plan import Deployment, plan_capacity
from infire_jax.plan.simulator import CostModel

BATCH, PROMPT, CACHE, STEPS = 4, 16, 64, 2
K25_MESHES = ("tp=8", "pp=2,tp=4", "pp=8")


def texts_outside(fig) -> list[str]:
    """Non-empty text artists drawn when the figure renders whose bounding box leaves the figure
    (1 px slack). Only drawn texts count: an axis keeps tick labels beyond its limits undrawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    drawn, draw = [], Text.draw

    def recording_draw(self, renderer):
        draw(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.append(self)

    canvas = FigureCanvasAgg(fig)
    Text.draw = recording_draw
    try:
        canvas.draw()
    finally:
        Text.draw = draw
    renderer, box = canvas.get_renderer(), fig.bbox
    out = []
    for t in drawn:
        bb = t.get_window_extent(renderer)
        if bb.x0 < box.x0 - 1 or bb.y0 < box.y0 - 1 or bb.x1 > box.x1 + 1 or bb.y1 > box.y1 + 1:
            out.append(t.get_text())
    return out


@pytest.fixture(scope="module")
def loaded():
    model_dir = tiny.ensure_default_model()
    return {mesh: infire_jax.load(model_dir, mesh=mesh, decode_steps=STEPS) for mesh in ("pp=2,tp=2", "pp=2,tp=4")}


@pytest.mark.parametrize("mesh", ["pp=2,tp=2", "pp=2,tp=4"])
def test_measured_figure_shows_inspect_programs_numbers(loaded, mesh):
    model = loaded[mesh]
    # the JSON inspect_program.py prints (string device ids), and the figure it draws from it
    report = json.loads(json.dumps(inspect_model(model.programs, BATCH, PROMPT, CACHE, STEPS)))
    fig = viz.layout_figure(viz.measured_layout(model.programs, report=report))
    data = fig.layout_data
    weights = {str(k): v for k, v in data.weight_bytes().items()}
    kv = {str(k): v for k, v in data.kv_bytes().items()}
    assert weights == report["param_bytes_per_device"]  # by kind in the figure, summed
    assert kv == report["kv_bytes_per_device"]
    assert all(d.weights["attention"] > 0 and d.weights["MLP / shared expert"] > 0 for d in data.devices)
    # the KV bars, independently: 2 layers per stage x (K, V) x 1 KV head per device x all cached positions
    cfg = model.cfg
    assert set(kv.values()) == {2 * 2 * 1 * BATCH * CACHE * cfg.head_dim * 4}
    assert data.bytes_per_step("decode") == pytest.approx(report["decode"]["total_bytes_per_step"])
    assert data.bytes_per_step("prefill") == pytest.approx(report["prefill"]["total_bytes"])
    assert {d.share.stage for d in data.devices if d.device >= 4 or (mesh == "pp=2,tp=2" and d.device >= 2)} == {1}
    assert texts_outside(fig) == []


def test_text_check_catches_clipped_text():
    data = viz.planned_layout("llama4_scout", Deployment("h200", 2, mesh="tp=2"), batch=8, context=8192)
    fig = viz.layout_figure(data)
    assert texts_outside(fig) == []
    fig.text(0.98, 0.5, "a title running off the right edge")
    assert texts_outside(fig) == ["a title running off the right edge"]


def test_planned_figure_is_the_planners():
    dep = Deployment("h100", 8, mesh="pp=2,tp=4", weights="int4_experts")
    fig = viz.layout_figure(viz.planned_layout("kimi_k25", dep, batch=8, context=8192))
    data, plan = fig.layout_data, plan_capacity("kimi_k25", dep)
    assert len(data.devices) == 8 and [d.share.stage for d in data.devices] == [0] * 4 + [1] * 4
    per_stage = plan.seq_bytes_per_stage(8192)
    for d in data.devices:
        assert d.weight_bytes == pytest.approx(plan.weight_bytes_per_device)
        assert d.kv == pytest.approx(8 * per_stage[d.share.stage])
        assert d.free == pytest.approx(plan.kv_free_per_device - d.kv)
    cost = CostModel(plan)
    assert data.bytes_per_step("decode") == pytest.approx(sum(c.total_bytes for c in cost.decode_collectives(8)))
    assert texts_outside(fig) == []


def test_k25_comparison_renders_from_configs_and_matches_the_planner():
    deps = [Deployment("h100", 8, mesh=m, weights="int4_experts") for m in K25_MESHES]
    t0 = time.perf_counter()
    fig = viz.compare_deployments("kimi_k25", deps, batch=8, context=8192)
    fig.savefig(io.BytesIO(), format="png")
    elapsed = time.perf_counter() - t0
    assert elapsed < 30, f"comparison took {elapsed:.1f} s"
    assert texts_outside(fig) == []
    rows = fig.comparison
    assert [r.mesh for r in rows] == list(K25_MESHES)
    for dep, row in zip(deps, rows):
        plan = plan_capacity("kimi_k25", dep)
        cost = CostModel(plan)
        assert row.fits == plan.fits
        assert row.weight_bytes == pytest.approx(plan.weight_bytes_per_device)
        assert row.reserved == pytest.approx(sum(plan.reserved.values()))
        assert row.kv_tokens == pytest.approx(plan.max_cache_tokens(8192) * plan.replicas)
        assert sum(row.decode_collectives.values()) == pytest.approx(sum(c.total_bytes for c in cost.decode_collectives(8)))
        assert row.tpot_s == pytest.approx(cost.decode_step(8, 8192))
    assert [r.fits for r in rows] == [True, True, False]  # pp=8 replicates the 2 x 2.2 GiB embedding + head
    # tp=8, by hand: attention and MoE outputs all-reduced in each of 61 layers, 8 rows x 7168 bf16
    assert sum(rows[0].decode_collectives.values()) == 2 * 61 * 8 * 7168 * 2


def test_write_trace_opens_in_the_profilers_loaders(loaded, tmp_path):
    import jax

    files = viz.write_trace(loaded["pp=2,tp=2"], tmp_path, prompt_len=8, decode_calls=1)
    xplane = [f for f in files if f.name.endswith(".xplane.pb")]
    perfetto = [f for f in files if f.name == "perfetto_trace.json.gz"]
    assert len(xplane) == 1 and len(perfetto) == 1, files
    names = {e.name for plane in jax.profiler.ProfileData.from_file(str(xplane[0])).planes
             for line in plane.lines for e in line.events}
    assert any("jit_prefill" in n for n in names) and any("jit_decode" in n for n in names)
    events = json.loads(gzip.decompress(perfetto[0].read_bytes()))["traceEvents"]
    assert any("infire_jax: prefill" in str(e.get("name")) for e in events)
    assert np.all([f.stat().st_size > 0 for f in files])
