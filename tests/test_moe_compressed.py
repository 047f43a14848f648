"""MoE families complete: routed experts compressed on the device, and Model.save / restore of MoE
models across layouts.

Tiny transformers-built Llama 4, Qwen3-MoE and Mixtral checkpoints in bf16 (a few expert weights
set to values whose exponents fall outside any palette, so the escape lists are exercised) and
their compressed checkpoints. The compressed load on one device generates greedily through the
engine (decode with the experts decoded in the CPU kernel); the raw bf16 load on one device reads
the same sequences (prompt + generated tokens) in one forward pass: its argmax along them is the
generated tokens (so the raw load's greedy tokens are the same), its logits at those positions are
the generation's step logits (1e-5 relative) and they are the reference for the other layouts.
Each compressed load, on tp=1, ep=2 and pp=2,tp=2, keeps the routed experts palette12 on the device
(split like the bf16 weights, <= 0.76 of their bytes per device), warns about nothing, and its
logits over those sequences are the raw ones (1e-5 relative) with the same greedy tokens. Save on
one layout and restore on another: compressed Llama 4 (ep=2 -> pp=2,tp=2), raw bf16 Qwen3-MoE
(tp=1 -> pp=2,tp=2), DeepSeek-V3 with int4 experts (ep=2,tp=2 -> pp=2): the same greedy tokens,
weights restored in the form saved (compressed, bf16, int4 packed), every device reading only the
parts it holds. A compressed bf16 DeepSeek-V3 on ep=2 gives the raw logits. Teacher-forced checks
keep the compiled programs to one per model (~25 in all); ~100 s on an idle 2-core machine.
"""

import warnings

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import infire_jax
from infire_jax.checkpoint import compressed, store
from infire_jax.compression.jax_decode import Palette12Weight
from infire_jax.engine.inspect import expert_bytes
from infire_jax.engine.sampling import SamplingParams
from infire_jax.models import deepseek, moe
from tests.reference.test_moe_reference import CONFIGS

VOCAB = 160
PROMPTS = [[int(t) for t in np.random.default_rng(s).integers(0, VOCAB, n)] for s, n in ((1, 19), (2, 5))]
NEW_TOKENS = 8
MIXTRAL = dict(arch="MixtralForCausalLM", config="MixtralConfig", vocab_size=VOCAB, hidden_size=64,
               intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)
SPECS = {"llama4": CONFIGS["llama4"], "qwen3_moe": CONFIGS["qwen3_moe"], "mixtral": MIXTRAL,
         "deepseek_v3": CONFIGS["deepseek_v3_mesh"]}
ESCAPES = (0.75, -1.25, 1e-7, 3.0)  # exponents no palette of N(0, 0.08) weights holds


def _write(family: str, out, dtype: str) -> None:
    import torch
    import transformers

    kwargs = dict(SPECS[family])
    arch, config = kwargs.pop("arch"), kwargs.pop("config")
    torch.manual_seed(0)
    model = getattr(transformers, arch)(getattr(transformers, config)(**kwargs)).eval()
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.08)
            if "experts" in name and p.ndim == 3:  # expert 0 gets most escapes, the others fewer or none
                for e, count in enumerate((2, 1)[: p.shape[0]]):
                    flat = p.data[e].view(-1)
                    flat[torch.as_tensor(rng.choice(flat.numel(), count, replace=False))] = torch.tensor(ESCAPES[:count])
    model.to(getattr(torch, dtype)).save_pretrained(out)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (raw bf16 checkpoint, its compressed checkpoint)."""
    out = {}
    for family in ("llama4", "qwen3_moe", "mixtral"):
        root = tmp_path_factory.mktemp(family)
        _write(family, root / "raw", "bfloat16")
        compressed.compress_checkpoint(root / "raw", root / "comp", runtime_ratio=False)
        out[family] = root / "raw", root / "comp"
    return out


def _load(path, mesh: str) -> infire_jax.Model:
    """A compressed checkpoint loaded with no warning about compression (experts are not kept raw)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = infire_jax.load(path, mesh=mesh, dtype="bfloat16")
    assert not [w for w in caught if "compress" in str(w.message)], [str(w.message) for w in caught]
    return model


def _greedy(model, prompts=PROMPTS) -> tuple[list[list[int]], list[np.ndarray]]:
    """Greedy tokens through the engine (prefill, then paged decode) and each step's logits."""
    reqs = model.run_requests([np.asarray(p, np.int32) for p in prompts], [SamplingParams(NEW_TOKENS)] * len(prompts),
                              with_logits=True)
    return [r.output for r in reqs], [np.stack(r.logits) for r in reqs]


def _paths(prompts, tokens) -> np.ndarray:
    """Each prompt followed by its generated tokens but the last, right-padded (causal: the padding
    changes nothing before it)."""
    seqs = [p + t[:-1] for p, t in zip(prompts, tokens)]
    batch = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for row, seq in zip(batch, seqs):
        row[: len(seq)] = seq
    return batch


def _assert_greedy_path(logits: np.ndarray, tokens, prompts=PROMPTS) -> None:
    """The argmax of full-sequence logits along prompt + tokens is the tokens: the model generates them greedily."""
    for row, prompt, want in zip(logits, prompts, tokens):
        assert np.argmax(row[len(prompt) - 1 : len(prompt) - 1 + len(want)], axis=-1).tolist() == want


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


_FAMILY: dict[str, tuple] = {}
_LOADED: dict[tuple[str, str], infire_jax.Model] = {}


def _family(checkpoints, family: str) -> tuple:
    """(greedy tokens of the compressed load on one device, the sequences they make, the raw bf16
    load's logits over them), once per family. The compressed load's step logits are the raw ones
    at the same positions, and the raw load generates the same tokens."""
    if family not in _FAMILY:
        comp = _LOADED[family, "tp=1"] = _load(checkpoints[family][1], "tp=1")
        tokens, steps = _greedy(comp)
        batch = _paths(PROMPTS, tokens)
        _LOADED[family, "raw"] = infire_jax.load(checkpoints[family][0], dtype="bfloat16")
        raw = _LOADED[family, "raw"].logits(batch)
        _assert_greedy_path(raw, tokens)
        for row, prompt, step in zip(raw, PROMPTS, steps):
            _assert_close(step, row[len(prompt) - 1 : len(prompt) - 1 + len(step)])
        _FAMILY[family] = tokens, batch, raw
    return _FAMILY[family]


def _trimmed(spec) -> tuple:
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


def _experts(model) -> dict[str, object]:
    params = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(model.placed.state)}
    return {n: params[f"moe/{n}"].get_value() for n in ("w_gate_up", "w_down")}


@pytest.mark.parametrize("mesh", ["tp=1", "ep=2", "pp=2,tp=2"])
@pytest.mark.parametrize("family", ["llama4", "qwen3_moe", "mixtral"])
def test_compressed_experts_on_the_device_match_raw_bf16(checkpoints, family, mesh):
    tokens, batch, raw = _family(checkpoints, family)
    model = _LOADED.get((family, mesh)) or _load(checkpoints[family][1], mesh)
    _LOADED[family, mesh] = model
    layout = model.placed.layout
    for (name, w), axes in zip(_experts(model).items(), moe.expert_axes(in_major=family == "llama4")):
        assert isinstance(w, Palette12Weight) and w.palette.ndim == 3, name  # a palette per (layer, expert)
        # split like the bf16 weight, in stored order (Llama 4's input-major experts: output-major)
        logical = tuple(layout.spec(("layers",) + axes, w.shape)) + (None,) * w.ndim
        assert (w.perm != tuple(range(w.ndim - 2))) == (family == "llama4"), name
        want = P(*(logical[i] for i in (0, 1, *(2 + q for q in w.perm))))
        assert _trimmed(w.sign_mant.sharding.spec) == _trimmed(want), name
    w = _experts(model)["w_gate_up"]  # escapes held (padding entries are >= the block size)
    assert (np.asarray(w.escape_idx) < np.prod(w.sign_mant.shape[2:]) // w.escape_idx.shape[2]).any()
    ratios = expert_bytes(model.placed)["routed_expert_ratio_per_device"]
    assert len(ratios) == layout.mesh.size and max(ratios.values()) <= 0.76, ratios
    if mesh != "tp=1":  # on one device the generation and its step logits were checked (_family)
        logits = model.logits(batch)
        _assert_close(logits, raw)
        _assert_greedy_path(logits, tokens)


def test_inspect_program_reports_compressed_expert_bytes(checkpoints):
    """inspect_program.py's report (inspect_model) and its layout figure (viz.measured_layout) of a
    compressed MoE model on ep=2: routed experts <= 0.76 of bf16 per device, every weight byte in
    the figure (compressed weights counted leaf by leaf)."""
    from infire_jax import viz
    from infire_jax.engine.inspect import inspect_model

    model = _LOADED.get(("qwen3_moe", "ep=2")) or _load(checkpoints["qwen3_moe"][1], "ep=2")
    report = inspect_model(model.programs, 1, 8, 16, 1)
    assert max(report["routed_expert_ratio_per_device"].values()) <= 0.76, report["routed_expert_ratio_per_device"]
    assert viz.measured_layout(model.programs, report=report).weight_bytes() == report["param_bytes_per_device"]


@pytest.mark.parametrize("family,source", [("llama4", "ep=2"), ("qwen3_moe", "raw")])
def test_moe_model_saves_and_restores_on_pp2_tp2(checkpoints, family, source, tmp_path, monkeypatch):
    """Compressed Llama 4 saved from ep=2, raw bf16 Qwen3-MoE saved from one device."""
    tokens, batch, raw = _family(checkpoints, family)
    model = _LOADED.get((family, source)) or _load(checkpoints[family][1], source)
    path = model.save(tmp_path / "saved")
    reads = _spy_reads(monkeypatch)
    restored = infire_jax.load(path, mesh="pp=2,tp=2", dtype="bfloat16")
    _assert_reads_own_shards(restored, reads[0])
    for name, w in _experts(restored).items():  # in the form saved, layers split over the stages
        if source == "raw":
            assert w.dtype.name == "bfloat16" and w.sharding.spec[0] == "pp", name
        else:
            assert isinstance(w, Palette12Weight) and w.sign_mant.sharding.spec[0] == "pp", name
    logits = restored.logits(batch)
    _assert_close(logits, raw)
    _assert_greedy_path(logits, tokens)


def test_int4_experts_save_on_ep2_tp2_and_restore_on_pp2(tmp_path, monkeypatch):
    _write("deepseek_v3", tmp_path / "f32", "float32")
    deepseek.write_int4_experts(tmp_path / "f32", tmp_path / "int4", group_size=32)
    source = infire_jax.load(tmp_path / "int4", mesh="ep=2,tp=2")
    tokens, _ = _greedy(source)
    path = source.save(tmp_path / "saved")
    reads = _spy_reads(monkeypatch)
    restored = infire_jax.load(path, mesh="pp=2")
    _assert_reads_own_shards(restored, reads[0])
    params = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(restored.placed.state)}
    assert params["moe/w_gate_up_packed"].dtype == np.int32 and params["moe/w_down_scale"].dtype.name == "bfloat16"
    assert params["moe/w_gate_up_packed"].sharding.spec[0] == "pp"
    _assert_greedy_path(restored.logits(_paths(PROMPTS, tokens)), tokens)


def test_deepseek_bf16_experts_compressed_on_ep2(tmp_path):
    """DeepSeek-V3 in bf16 (MLA attention, shared experts) compressed: experts palette12 on ep=2,
    logits of the raw bf16 load on one device."""
    _write("deepseek_v3", tmp_path / "raw", "bfloat16")
    compressed.compress_checkpoint(tmp_path / "raw", tmp_path / "comp", runtime_ratio=False)
    tokens = np.random.default_rng(3).integers(0, VOCAB, (2, 13)).astype(np.int32)
    model = _load(tmp_path / "comp", "ep=2")
    assert all(isinstance(w, Palette12Weight) for w in _experts(model).values())
    _assert_close(model.logits(tokens), infire_jax.load(tmp_path / "raw", dtype="bfloat16").logits(tokens))


def _spy_reads(monkeypatch) -> list:
    """Record the targets (shapes and shardings) the next restore reads."""
    reads, real = [], store._checkpointer

    class Spy:
        def restore(self, path, args):
            reads.append(args.item)
            return real().restore(path, args=args)

    monkeypatch.setattr(store, "_checkpointer", Spy)
    return reads


def _assert_reads_own_shards(model, targets) -> None:
    """Every stacked layer is read onto exactly the devices that hold it, each device reading the
    piece of it that it holds (escape lists aside: ~1e-4 of the entries, read per expert)."""
    index = model.placed.module.stack_index()
    params = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(model.placed.state)}
    checked = 0
    for name, layers in targets.items():
        if name.split("/")[0] not in index or not isinstance(layers, dict):
            continue
        positions = dict(index[name.split("/")[0]])
        for layer, target in layers.items():
            for leaf, t in (target.items() if isinstance(target, dict) else [(None, target)]):
                if leaf is not None and leaf.startswith("escape"):
                    continue
                value = params[name] if leaf is None else getattr(params[name], {"index_pairs": "packed_idx"}.get(leaf, leaf))
                pos = positions[int(layer)]
                holders = {d for d, idx in value.sharding.devices_indices_map(value.shape).items()
                           if pos in range(*idx[0].indices(value.shape[0]))}
                assert t.sharding.device_set == holders, (name, layer, leaf)
                assert t.sharding.shard_shape(t.shape)[1:] == value.sharding.shard_shape(value.shape)[1:], (name, leaf)
                checked += 1
    assert checked


def test_saved_form_of_compressed_weights_reblocks_exactly():
    """The layout-free saved form of a blocked palette12 stack (escapes, a non-range palette) turns
    back into the blocked form of other layouts (an odd block width, the whole last axis read) that
    decodes to the same bits and equals that layout's own encoding."""
    import ml_dtypes
    from jax.sharding import NamedSharding

    from infire_jax import mesh as mesh_lib
    from infire_jax.compression import codec, jax_decode

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 6, 24)).astype(np.float32) * 0.02
    x[rng.random(x.shape) < 0.1] = 0.0
    x.reshape(-1)[rng.choice(x.size, 12, replace=False)] = [3.0, -7.5, 1e-30, 100.0, -1e-20, 2.5] * 2
    bits = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    exp, sm = codec.split_bits(bits)

    def place(mesh_spec, spec):
        mesh = mesh_lib.make_mesh(mesh_spec)
        return compressed._palette12_param(exp, sm, mesh, spec, (0, 1), 2, jax_decode, set(range(8))), mesh  # all 2 x 4 entries held

    w, _ = place("ep=2,tp=2", (None, "ep", "tp", None))
    saved = jax_decode.to_saved([w])[0]
    for mesh_spec, spec in (("tp=8", (None, None, None, "tp")), ("pp=2,ep=2,tp=2", ("pp", "ep", None, "tp"))):
        want, mesh = place(mesh_spec, spec)
        stack, blocks = spec[:2], spec[2:]
        read = jax_decode.saved_specs(stack, blocks, bits.shape[2:], mesh)
        leaves = {k: jax.device_put(np.asarray(v), NamedSharding(mesh, read[k])) for k, v in saved.items()}
        layout = jax_decode.SavedLayout(mesh, stack, blocks, (0, 1), w.palette_is_range, saved["escape_idx"].shape[-1])
        (got,) = jax_decode.from_saved([(leaves, layout)])
        np.testing.assert_array_equal(np.asarray(got.packed_idx), np.asarray(want.packed_idx))
        decoded = np.asarray(jax.jit(Palette12Weight.decode_f32)(got)).view(np.uint32)
        np.testing.assert_array_equal(decoded, bits.astype(np.uint32) << 16)
