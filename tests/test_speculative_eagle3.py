"""Speculative decoding with EAGLE-3 heads (models/eagle3.py, engine/eagle3.py, "eagle3:DIR:K").

Tiny random heads in the published layout (config.json, midlayer.* / fc / norm / lm_head, d2t and
t2d) for the tiny Llama target and the MoE reference models (DeepSeek MLA, Llama 4). A random head
proposes tokens the target mostly rejects, so verification rolls back nearly every draft: greedy
tokens must still equal plain decoding colocated (tp=1, pp=2; tp=1 for the MoE targets) and under
in-process P/D with different layouts (tp=1 prefill, tp=2 decode). The proposer's drafts equal a
full forward of the head over the whole sequence (catch-up, own-state steps and rollback), the
hidden states the decode and verify calls captured equal the target's prefill ones (Llama and
DeepSeek targets; the prompt's from the prefill call, shipped under P/D, never recomputed), a reduced
vocabulary never proposes a token it lacks, a head that must propose the target's next token (a
target whose greedy token is always 0, a head that always drafts 0) has every draft accepted, and
bad heads fail with one SpecError each. Every decode call verifies (`adaptive = False`).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from infire_jax.checkpoint.tiny import write_tiny_checkpoint
from infire_jax.engine.build import Deployment, EngineOptions
from infire_jax.engine.disagg import generate
from infire_jax.engine.eagle3 import Eagle3Proposer
from infire_jax.engine.sampling import per_request
from infire_jax.engine.speculative import DraftRow, SpecError
from infire_jax.models import FAMILIES
from tests.helpers import write_head

OPTIONS = EngineOptions(kv_pages=64, page_size=16, max_decode_batch=4, decode_steps=2, prefill_chunk=None)
NEW = 12


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    base = rng.integers(3, 150, 5).tolist()
    return [base * 3 + base[:1], rng.integers(3, 150, 4).tolist() * 4]


# MoE targets (tests/conftest.py checkpoints: transformers' reference models, random weights) and the
# target layers their heads read: DeepSeek's dense first layer and MoE layers; Llama 4's ring
# (chunked) and full attention layers, dense and MoE
MOE_TARGETS = {"deepseek_v3": [0, 1, 2], "llama4": [1, 2, 3]}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp("eagle3")
    target = write_tiny_checkpoint(root / "target", "tiny-llama", tokenizer=False)
    # a target whose LM head is zero: every logit 0, so its greedy token is always 0
    zero = write_tiny_checkpoint(root / "zero", "tiny-llama", tokenizer=False)
    weights = load_file(str(zero / "model.safetensors"))
    weights["lm_head.weight"] = np.zeros_like(weights["lm_head.weight"])
    save_file(weights, str(zero / "model.safetensors"))
    moe = {name: checkpoints(name) for name in MOE_TARGETS}
    moe_heads = {f"{name}:head": write_head(root / f"{name}_head", path, seed=2,
                                            config=dict(eagle_aux_hidden_state_layer_ids=MOE_TARGETS[name]))
                 for name, path in moe.items()}
    return moe | moe_heads | dict(
        target=target,
        zero=zero,
        head=write_head(root / "head", target),
        odd=write_head(root / "odd", target, ids=np.arange(1, 512, 2), seed=1, own_embedding=True),
        always0=write_head(root / "always0", zero, ids=np.arange(0, 512, 4), zero_lm_head=True),
        root=root,
    )


@pytest.fixture(scope="module")
def deployments(dirs):
    made = {}

    def get(prefill, decode=None, target="target"):
        key = (prefill, decode or prefill, target)
        if key not in made:
            made[key] = Deployment(dirs[target], [prefill], [decode or prefill], options=OPTIONS)
        return made[key]

    return get


@pytest.fixture(scope="module")
def plain(deployments):
    """Greedy tokens without speculation (tp=1)."""
    return [r.output for r in generate(deployments("tp=1").engine(), _prompts(), per_request(2, NEW))]


def _engine(deployment, head, k: int = 3):
    engine = deployment.engine(dataclasses.replace(OPTIONS, speculative=f"eagle3:{head}:{k}"))
    for w in engine.decode_workers:
        w.speculator.adaptive = False
    return engine


def _run(deployment, head, k: int = 3):
    engine = _engine(deployment, head, k)
    reqs = generate(engine, _prompts(), per_request(2, NEW))
    assert all(r.status == "done" for r in reqs), [r.error for r in reqs]
    # the prompts' states came from the prefill calls (shipped under P/D), none recomputed
    assert sum(w.speculator.hidden.recomputed_positions for w in engine.decode_workers) == 0
    return reqs, engine.stats()


# (prefill mesh, decode mesh): colocated tp=1 and pp=2; P/D from tp=1 to a tp=2 decode mesh
LAYOUTS = [("tp=1", None), ("pp=2", None), ("tp=1@0-0", "tp=2@2-3")]


@pytest.mark.parametrize("prefill, decode", LAYOUTS)
def test_eagle3_gives_the_tokens_of_plain_decoding(dirs, deployments, plain, prefill, decode):
    reqs, stats = _run(deployments(prefill, decode), dirs["head"])
    assert [r.output for r in reqs] == plain
    assert stats["spec_verify_calls"] > 0 and stats["spec_proposed_tokens"] > 0
    assert stats["hidden_states_received"] == (0 if decode is None else sum(len(r.prompt) for r in reqs))
    assert sum(r.metrics()["proposed_tokens"] for r in reqs) == stats["spec_proposed_tokens"]


@pytest.mark.parametrize("target", sorted(MOE_TARGETS))
def test_eagle3_on_moe_targets_gives_the_tokens_of_plain_decoding(dirs, deployments, target):
    """One draft per verification (k = 1: one verify program to compile; longer drafts are the head's
    business, tested on the Llama target): the captured states feed the head, rollbacks stay exact."""
    deployment = deployments("tp=1", target=target)
    plain = [r.output for r in generate(deployment.engine(), _prompts(), per_request(2, NEW))]
    reqs, stats = _run(deployment, dirs[f"{target}:head"], k=1)
    assert [r.output for r in reqs] == plain
    assert stats["spec_verify_calls"] > 0 and stats["spec_proposed_tokens"] > 0


@pytest.mark.parametrize("target", sorted(MOE_TARGETS))
def test_moe_targets_capture_the_inputs_of_the_chosen_layers(dirs, deployments, target):
    """The states a MoE target captures are transformers' hidden_states[j] (the input of layer j)."""
    torch, transformers = pytest.importorskip("torch"), pytest.importorskip("transformers")
    path, ids = dirs[target], MOE_TARGETS[target]
    ref = getattr(transformers, json.loads((path / "config.json").read_text())["architectures"][0])
    ref = ref.from_pretrained(path).eval()
    tokens = np.asarray([_prompts()[0][:16]], np.int32)
    with torch.no_grad():
        want = ref(torch.as_tensor(tokens, dtype=torch.long), output_hidden_states=True).hidden_states
    programs = deployments("tp=1", target=target).programs("tp=1")
    got = np.asarray(programs.hidden_fn(1, 16, tuple(ids))(programs.placed.state, tokens))
    np.testing.assert_allclose(got, np.concatenate([want[j].numpy() for j in ids], -1), rtol=1e-4, atol=1e-4)


@functools.cache
def _head_forward(head, programs):
    """(fed tokens (1, 32), hidden (1, 32, H)) -> the head's pre-norm outputs (1, 32, H), no cache
    (causal: padding past the fed positions changes nothing before it)."""

    def run(head_state, target_state, tokens, hidden):
        module, target = nnx.merge(head.graphdef, head_state), nnx.merge(programs.placed.graphdef, target_state)
        return module(target.embed_tokens(tokens), hidden, jnp.zeros(1, jnp.int32))[0]

    return jax.jit(run)


def _reference_drafts(deployment, head, seq: np.ndarray, k: int) -> list[int]:
    """The head run over the whole sequence without a cache: position p reads token p + 1 and the
    target's state of p, then each draft reads the previous output (recomputed from scratch each step)."""
    programs = deployment.programs("tp=1")
    module, n = nnx.merge(head.graphdef, head.state), len(seq)
    tokens = np.zeros((1, 32), np.int32)
    tokens[0, : n - 1] = seq[: n - 1]
    states = programs.hidden_fn(1, 32, head.aux_layers)(programs.placed.state, tokens)
    hidden, fed, out = np.array(module.fuse(states)), np.zeros((1, 32), np.int32), []
    fed[0, : n - 1] = seq[1:]
    for i in range(k):
        at = n - 2 + i  # the position whose output is the next draft
        x = np.asarray(_head_forward(head, programs)(head.state, programs.placed.state, fed, hidden))
        out.append(int(module.greedy(x[:, at])[0]))
        fed[0, at + 1], hidden[0, at + 1] = out[-1], x[0, at]
    return out


def test_drafts_equal_a_full_forward_of_the_head(dirs, deployments):
    """Catch-up (in pieces), own-state steps and rollback: after a partly kept verification the
    proposer's drafts equal the head run over the whole new sequence."""
    deployment = deployments("tp=1")
    options = dataclasses.replace(OPTIONS, speculative=f"eagle3:{dirs['head']}:3")
    head, programs = deployment.draft("tp=1", options), deployment.programs("tp=1")
    proposer = Eagle3Proposer(head, programs, num_pages=8, page_size=16, max_batch=2, k=3, chunk=4)
    # 17 tokens: the prompt's states computed at the first draft, fed to the head in catch-up pieces of 4
    seq = np.asarray(_prompts()[0] + [7], np.int32)
    drafts = proposer.draft([DraftRow("r", seq, 3, 32)])[0]
    assert drafts.tolist() == _reference_drafts(deployment, head, seq, 3)
    # the target fed the last token and kept the first draft, then produced another token
    later = np.concatenate([seq, drafts[:1], [(int(drafts[1]) + 1) % 512]]).astype(np.int32)
    tokens = np.zeros((1, 32), np.int32)
    tokens[0, : len(later)] = later
    states = np.asarray(programs.hidden_fn(1, 32, head.aux_layers)(programs.placed.state, tokens))[0]
    proposer.observe("r", len(seq) - 1, states[len(seq) - 1: len(seq) + 1])
    assert proposer.draft([DraftRow("r", later, 3, 32)])[0].tolist() == _reference_drafts(deployment, head, later, 3)
    proposer.forget("r")
    assert proposer.kv.free_blocks == 8 and not proposer.rows


@pytest.mark.parametrize("target, head, k", [("target", "head", 3), ("deepseek_v3", "deepseek_v3:head", 1)])
def test_decode_and_verify_capture_the_prefill_states(dirs, deployments, target, head, k):
    """The hidden states the engine's prefill, decode and verify calls handed the proposer equal the
    target's prefill (hidden_fn) states of the same positions."""
    deployment = deployments("tp=1", target=target)
    engine = _engine(deployment, dirs[head], k)
    engine.decode_workers[0].speculator.adaptive = True  # some plain decode calls too (the first is always one)
    proposer, seen = engine.decode_workers[0].speculator.hidden, {}
    observe = proposer.observe

    def record(rid, start, hidden):
        seen.setdefault(rid, {}).update(zip(range(start, start + len(hidden)), hidden))
        observe(rid, start, hidden)

    proposer.observe = record
    reqs = generate(engine, _prompts(), per_request(2, NEW))
    programs = deployment.programs("tp=1")
    for r in reqs:
        seq = np.concatenate([r.prompt, np.asarray(r.output[:-1], np.int32)])
        tokens = np.zeros((1, 32), np.int32)
        tokens[0, : len(seq)] = seq
        want = np.asarray(programs.hidden_fn(1, 32, proposer.captures)(programs.placed.state, tokens))[0]
        kept = {p: h for p, h in seen[r.id].items() if p < len(seq)}  # (a finished row's last call may overshoot)
        assert sorted(kept) == list(range(len(seq)))  # the prompt's from the prefill call, then every generated one
        np.testing.assert_allclose(np.stack([kept[p] for p in sorted(kept)]), want[sorted(kept)], rtol=1e-4, atol=1e-4)


def test_a_cached_prefix_brings_its_states(dirs, deployments):
    """The second run of the same prompts (24 tokens) finds their first block in the prefix cache: its
    states come from the worker's state cache (no recompute), and the tokens are plain decoding's."""
    deployment = deployments("tp=1")
    prompts = [p + p[:8] for p in _prompts()]
    want = [r.output for r in generate(deployment.engine(), prompts, per_request(2, NEW))]
    engine = _engine(deployment, dirs["head"])
    worker = engine.decode_workers[0]
    for _ in range(2):
        reqs = generate(engine, prompts, per_request(2, NEW))
        assert [r.output for r in reqs] == want
    assert sum(r.cached_tokens for r in reqs) == 32  # one block of each prompt
    assert worker.speculator.counters.verify_calls > 0
    assert worker.speculator.hidden.recomputed_positions == 0


def test_the_reduced_vocabulary_is_honoured(dirs, deployments, plain):
    """A head whose draft vocabulary holds only odd ids (and its own embedding) never proposes an even one."""
    engine = _engine(deployments("tp=1"), dirs["odd"])
    proposer = engine.decode_workers[0].speculator.proposer
    proposed, draft = [], proposer.draft

    def record(rows):
        out = draft(rows)
        proposed.extend(int(t) for d in out for t in d)
        return out

    proposer.draft = record
    reqs = generate(engine, _prompts(), per_request(2, NEW))
    assert [r.output for r in reqs] == plain
    assert proposed and all(t % 2 for t in proposed)


def test_a_head_proposing_the_targets_next_token_is_always_accepted(dirs, deployments):
    reqs, stats = _run(deployments("tp=1", target="zero"), dirs["always0"])
    assert all(r.output == [0] * NEW for r in reqs)
    assert stats["spec_proposed_tokens"] > 0 and stats["acceptance_rate"] == 1.0
    assert stats["mean_accepted_length"] > 2.0


def test_bad_heads_fail_with_one_clear_error(dirs, tmp_path, monkeypatch):
    target, root = dirs["target"], dirs["root"]
    cases = [
        (tmp_path / "missing", "not a checkpoint directory"),
        (write_head(root / "no_maps", target, drop=("d2t", "t2d")), r"lacks the vocabulary maps \['d2t', 't2d'\]"),
        (write_head(root / "wide", target, config=dict(target_hidden_size=128)), "hidden states of size 128"),
        (write_head(root / "vocab", target, config=dict(vocab_size=1024)), "vocab_size 1024, the target 512"),
        (write_head(root / "layers", target, config=dict(eagle_aux_hidden_state_layer_ids=[1, 2, 9])),
         r"reads target layers \[1, 2, 9\], the target has 4"),
        (write_head(root / "no_fc", target, drop=("fc.weight",)), "missing tensors"),
        (write_head(root / "two", target, config=dict(num_hidden_layers=2)), "only one-layer EAGLE-3 heads"),
    ]
    for path, message in cases:
        with pytest.raises(SpecError, match=message):
            Deployment(target, ["tp=1"], ["tp=1"], options=EngineOptions(speculative=f"eagle3:{path}:3")).engine()
    # a family that cannot return hidden states (every registered one can: declare one that cannot)
    monkeypatch.setitem(FAMILIES, "llama", dataclasses.replace(FAMILIES["llama"], captures_hidden=False))
    with pytest.raises(SpecError, match="llama family cannot return"):
        Deployment(target, ["tp=1"], ["tp=1"], options=EngineOptions(speculative=f"eagle3:{dirs['head']}:3"))
