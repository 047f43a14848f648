"""Tensor + pipeline (+ data) parallelism on 8 simulated devices: same logits and tokens as one
device, minimal communication read from the compiled HLO, balanced parameter bytes."""

import re

import numpy as np
import pytest

import infire_jax
from infire_jax.sharding import stage_slots
from infire_jax.engine.inspect import collective_axes, hlo_collectives, inspect_model, layout_table
from infire_jax.engine.sampling import SamplingParams
from infire_jax.mesh import MeshSpecError, make_mesh, parse_mesh
from tests.helpers import save_reference

MESHES = ["tp=2", "tp=4", "pp=2", "pp=4", "pp=2,tp=2", "pp=2,tp=4", "pp=4,tp=2", "dp=2,tp=2"]
PROMPTS = [[3, 14, 15, 92, 65], list(range(1, 18)), [7] * 9]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The reference Llama: 3 layers (not divisible by pp=2 or pp=4), GQA with 2 KV heads."""
    out = tmp_path_factory.mktemp("llama3l")
    save_reference("llama", out)
    return out


@pytest.fixture(scope="module")
def single(model_dir):
    model = infire_jax.load(model_dir)
    tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, 19)).astype(np.int32)
    return tokens, model.logits(tokens), model.generate(PROMPTS, max_new_tokens=16)


@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_matches_single_device(model_dir, single, mesh):
    tokens, logits, generated = single
    model = infire_jax.load(model_dir, mesh=mesh)
    got = model.logits(tokens)
    assert np.abs(got - logits).max() <= 1e-5 * np.abs(logits).max()
    assert model.generate(PROMPTS, max_new_tokens=16) == generated


def test_stage_slots_balanced():
    assert stage_slots(3, 2) == (4, (0, 1, 2))
    assert stage_slots(5, 4) == (8, (0, 1, 2, 4, 6))  # 2,1,1,1 layers per stage
    for layers, stages in [(30, 4), (7, 3), (2, 2), (9, 4)]:
        per_stage = np.bincount(np.asarray(stage_slots(layers, stages)[1]) // -(-layers // stages), minlength=stages)
        assert per_stage.max() - per_stage.min() <= 1 and per_stage.sum() == layers


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tp=3@0-3", "multiply to 3 but the range 0-3 holds 4"),
        ("xp=2", "unknown axis 'xp'"),
        ("tp=2@7-8", "out of bounds"),
        ("tp=16", "needs 16 devices"),
        ("tp=two", "must be an integer"),
        ("tp=0", "must be >= 1"),
        ("tp=2,tp=2", "given twice"),
    ],
)
def test_invalid_mesh_specs(spec, message):
    with pytest.raises(MeshSpecError, match=message):
        make_mesh(spec)


def test_mesh_spec_parsing():
    spec = parse_mesh("pp=2,tp=2@4-7")
    assert spec.shape == {"dp": 1, "pp": 2, "ep": 1, "tp": 2} and spec.device_ids(8) == [4, 5, 6, 7]
    assert str(spec) == "pp=2,tp=2@4-7"
    mesh = make_mesh("tp=2@2-3")
    assert [d.id for d in mesh.devices.flat] == [2, 3]


@pytest.fixture(scope="module")
def reports(model_dir):
    out = {}
    for mesh in ("tp=2", "tp=4", "pp=2,tp=2", "tp=1"):
        model = infire_jax.load(model_dir, mesh=mesh)
        out[mesh] = (model, inspect_model(model.programs, batch=4, prompt_len=16, cache_len=64, steps=2, keep_hlo=True))
    return out


def _param_shapes(model):
    import jax

    shapes = set()
    for x in jax.tree.leaves(model.placed.state):
        shapes.add(tuple(x.shape))
        shapes.add(tuple(x.sharding.shard_shape(x.shape)))
    return shapes


def _shapes(c) -> list[tuple[int, ...]]:
    """Array shapes in a collective's result type (several for a tuple-shaped result)."""
    import re

    return [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]", c["shape"])]


def _shape(c):
    shapes = _shapes(c)
    return shapes[0] if len(shapes) == 1 else tuple(shapes)


@pytest.mark.parametrize("mesh", ["tp=2", "tp=4"])
def test_tensor_parallel_decode_communication(reports, mesh):
    """Exactly 2 activation all-reduces per layer (attention out, MLP out) + 1 for the vocab-parallel
    embedding lookup per decode step; nothing shaped like a weight moves, nor the KV cache (tp=4 >
    kv_heads=2: KV heads are repeated so each device holds its own); everything else is at most
    logits-sized (the sampling branch gathers the logits rows for top-k/top-p)."""
    model, report = reports[mesh]
    d, layers, b = model.cfg.hidden_size, model.cfg.num_layers, report["batch"]
    decode = report["decode"]
    steps = decode["ticks"]  # = steps without a pipeline
    weights = _param_shapes(model)
    acts = [c for c in decode["collectives"] if c["kind"] == "all-reduce" and _shape(c) in {(b, 1, d), (b, d)}]
    assert sum(c["count"] for c in acts) == (2 * layers + 1) * steps
    for c in decode["collectives"]:
        assert c["kind"] == "all-reduce" or not set(_shapes(c)) & weights, c  # reductions carry partial sums
        assert c["bytes"] <= b * model.cfg.vocab_size * 4, c


def test_pipeline_decode_traffic_is_activations_only(reports):
    model, report = reports["pp=2,tp=2"]
    d = model.cfg.hidden_size
    mb = report["batch"] // 2
    weights = _param_shapes(model)
    stage_of = {d.id: idx[1] for idx, d in np.ndenumerate(model.placed.layout.mesh.devices)}

    def crosses_stages(c):
        pairs = [tuple(map(int, p.split(","))) for p in re.findall(r"\{(\d+,\d+)\}", c["groups"])]
        return any(stage_of[a] != stage_of[b] for a, b in pairs)

    permutes = [c for c in report["decode"]["collectives"] if c["kind"] == "collective-permute" and crosses_stages(c)]
    assert permutes, "stages must hand activations on with a collective-permute"
    ticks, b = report["decode"]["ticks"], report["batch"]
    for c in permutes:  # hidden states of one microbatch, or sampled token ids handed back
        is_hidden = _shape(c) in {(mb, 1, d), (1, mb, 1, d)}
        is_token_ids = c["shape"].startswith("s32") and np.prod(_shape(c)) <= ticks * b
        assert is_hidden or is_token_ids, c
    for c in report["decode"]["collectives"]:
        assert c["kind"] == "all-reduce" or not set(_shapes(c)) & weights, c  # reductions carry partial sums


def test_single_device_has_no_collectives(reports):
    _, report = reports["tp=1"]
    assert report["decode"]["collectives"] == [] and report["prefill"]["collectives"] == []


def test_single_device_decode_reads_layer_weights_in_place(reports):
    """Without pipeline stages the layers are per-layer weights run unrolled: the compiled decode
    program produces no array shaped like a layer weight (a scan over stacked weights makes six such
    copies per layer and step in this model: the dynamic slices of the stacked weights)."""
    model, report = reports["tp=1"]
    assert model.placed.module.unrolled
    weights = {tuple(v.get_value().shape) for layer in model.placed.module.layers for v in layer.values()}
    weights = {s for s in weights if len(s) >= 2} | {(int(np.prod(s[:-1])), s[-1]) for s in weights if len(s) >= 3}
    made = re.findall(r"= f32\[([\d,]*)\]\{[^}]*\} ([\w-]+)\(", report["decode_hlo"])
    copies = [(dims, op) for dims, op in made if op not in ("parameter", "bitcast", "get-tuple-element")
              and tuple(int(d) for d in dims.split(",") if d) in weights]
    assert not copies, copies[:5]


def test_parameter_bytes_split_evenly(reports):
    """Per device = stacked layer bytes / (pp * tp) + embedding/LM head / tp, up to replicated norms
    and KV projections when kv_heads < tp. (The vocab matrices sit on every stage: stage 0 embeds the
    tokens the last stage samples.)"""
    import jax

    for mesh in ("tp=2", "pp=2,tp=2"):
        model, report = reports[mesh]
        mesh_shape = report["mesh"]
        ways = mesh_shape["pp"] * mesh_shape["tp"]
        per_device = np.array(list(report["param_bytes_per_device"].values()))
        layer_bytes = sum(x.nbytes for x in jax.tree.leaves(model.placed.state["layers"]))
        other_bytes = report["param_bytes_total"] - layer_bytes
        ideal = layer_bytes / ways + other_bytes / mesh_shape["tp"]
        assert per_device.max() == per_device.min()
        assert ideal * 0.999 <= per_device[0] <= ideal * 1.1, (mesh, per_device[0], ideal)


def test_rotated_pipeline_batches_equal_one_by_one(model_dir):
    """pp=4 keeps 4 decode microbatches in flight; each row's tokens equal decoding it alone."""
    model = infire_jax.load(model_dir, mesh="pp=4")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, model.cfg.vocab_size, n).astype(np.int32) for n in (3, 8, 5, 11, 2, 6, 9, 4)]
    params = [SamplingParams(10, temperature=0.9, seed=i) for i in range(len(prompts))]
    together = [r.output for r in model.run_requests(prompts, params)]
    assert model.programs.batch_bucket(len(prompts)) // model.programs.stages == 2  # 4 microbatches of 2
    for p, sp, got in zip(prompts, params, together):
        assert model.run_requests([p], [sp])[0].output == got


def test_layout_table(reports):
    model, _ = reports["pp=2,tp=2"]
    text = layout_table(model.placed)
    assert "device 3 | stage 1 | layers 2-2 | heads 2-3" in text


@pytest.mark.parametrize(
    "groups, axes",
    [
        ("[2,2]<=[4]", ("tp",)),  # iota groups {0,1},{2,3}
        ("[2,2]<=[2,2]T(1,0)", ("pp",)),  # transposed iota: {0,2},{1,3}
        ("{{0,2},{2,0},{1,3},{3,1}}", ("pp",)),  # source-target pairs across stages
        ("mesh['axis_0'=1,'axis_1'=2,'axis_2'=2], device_ids=([2,2]T(1,0)) {'axis_1'}", ("tp",)),
        ("mesh['axis_0'=2,'axis_1'=2], device_ids=([4]) {'axis_0'}", ("pp",)),
        ("{}", ("pp", "tp")),
    ],
)
def test_collective_axes(groups, axes):
    assert collective_axes(groups, {"dp": 1, "pp": 2, "ep": 1, "tp": 2}) == axes


def test_reported_collectives_name_their_mesh_axes(reports):
    _, report = reports["pp=2,tp=2"]
    axes = {tuple(c["axes"]) for prog in ("prefill", "decode") for c in report[prog]["collectives"]}
    assert ("tp",) in axes and ("pp",) in axes and axes <= {("tp",), ("pp",), ("pp", "tp")}


def test_hlo_parser_counts_loop_trips():
    hlo = """HloModule m
%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ar = f32[4]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%add
}
%cond (p: (s32[], f32[4])) -> pred[] {
}
ENTRY %main (a: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}
  %ag = f32[8]{0} all-gather(%a), channel_id=2, replica_groups={{0,1}}, dimensions={0}
}
"""
    got = {(c.kind, c.count, c.bytes) for c in hlo_collectives(hlo)}
    assert got == {("all-reduce", 7, 16), ("all-gather", 1, 32)}
