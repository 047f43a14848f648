"""Speculative decoding with a draft model (engine/draft.py, "draft:DIR:K").

A draft equal to the target accepts every proposal; a different draft (the target's first 3 of 4
layers: it agrees with the target now and then, so verification keeps some drafts and rolls others
back) gives the greedy tokens of plain decoding, colocated on tp=1 and under in-process P/D with the
target decoding on tp=2 and the draft on tp=1 beside it. Every decode call verifies
(`adaptive = False`). Under P/D the prefill worker prefills the draft's KV and ships it with the
target's pages: the decode worker's draft is never fed a prompt token. Bad specs fail once, before
anything is placed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from infire_jax.checkpoint.tiny import write_tiny_checkpoint
from infire_jax.engine.build import Deployment, EngineOptions
from infire_jax.engine.disagg import generate
from infire_jax.engine.draft import DraftModelProposer, draft_mesh
from infire_jax.engine.sampling import per_request
from infire_jax.engine.speculative import DraftRow, SpecConfig, SpecError, Speculator, parse_speculative

OPTIONS = EngineOptions(kv_pages=64, page_size=16, max_decode_batch=4, decode_steps=2, prefill_chunk=None)
NEW = 12


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    base = rng.integers(3, 150, 5).tolist()
    return [base * 3 + base[:1], rng.integers(3, 150, 4).tolist() * 4]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The target (tiny Llama, 4 layers), a draft of its first 3 layers, and one with another vocabulary."""
    root = tmp_path_factory.mktemp("draft")
    return dict(
        target=write_tiny_checkpoint(root / "target", "tiny-llama", tokenizer=False),
        layers3=write_tiny_checkpoint(root / "layers3", "tiny-llama", tokenizer=False, overrides=dict(num_hidden_layers=3)),
        vocab=write_tiny_checkpoint(root / "vocab", "tiny-llama", tokenizer=False,
                                    overrides=dict(vocab_size=1024, num_hidden_layers=1)),
    )


@pytest.fixture(scope="module")
def deployments(dirs):
    made = {}

    def get(prefill, decode=None):
        key = (prefill, decode or prefill)
        if key not in made:
            made[key] = Deployment(dirs["target"], [prefill], [decode or prefill], options=OPTIONS)
        return made[key]

    return get


@pytest.fixture(scope="module")
def plain(deployments):
    """Greedy tokens without speculation (tp=1)."""
    return [r.output for r in generate(deployments("tp=1").engine(), _prompts(), per_request(2, NEW))]


def _run(deployment, speculative, params=None):
    engine = deployment.engine(dataclasses.replace(OPTIONS, speculative=speculative))
    for w in engine.decode_workers:
        w.speculator.adaptive = False
    reqs = generate(engine, _prompts(), params or per_request(2, NEW))
    assert all(r.status == "done" for r in reqs), [r.error for r in reqs]
    return reqs, engine.stats()


def test_a_draft_equal_to_the_target_accepts_every_proposal(dirs, deployments, plain):
    reqs, stats = _run(deployments("tp=1"), f"draft:{dirs['target']}:3")
    assert [r.output for r in reqs] == plain
    assert stats["spec_proposed_tokens"] > 0 and stats["acceptance_rate"] == 1.0
    assert stats["mean_accepted_length"] > 2.0
    assert sum(r.metrics()["accepted_tokens"] for r in reqs) == stats["spec_accepted_tokens"]


# (prefill mesh, decode mesh): colocated tp=1; P/D with a tp=1 prefill and a tp=2 decode mesh whose
# draft is on tp=1 (the draft's own layout beside a tensor-parallel target).
LAYOUTS = [("tp=1", None), ("tp=1@0-0", "tp=2@2-3")]


@pytest.mark.parametrize("prefill, decode", LAYOUTS)
def test_a_different_draft_gives_the_tokens_of_plain_decoding(dirs, deployments, plain, prefill, decode):
    reqs, stats = _run(deployments(prefill, decode), f"draft:{dirs['layers3']}:3")
    assert [r.output for r in reqs] == plain
    # some drafts kept, some rolled back: both paths of the draft's KV bookkeeping ran
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_proposed_tokens"]
    prompt_tokens = sum(len(r.prompt) for r in reqs)
    if decode is None:  # colocated: the draft is fed the prompt on its first call
        assert stats["draft_prefill_tokens"] == 0 and stats["draft_fed_tokens"] >= prompt_tokens
    else:  # P/D: the prefill worker prefilled the draft's KV and shipped it; decode feeds generated tokens only
        _check_draft_shipped(reqs, stats)


def _check_draft_shipped(reqs, stats):
    """The prefill worker prefilled the draft's KV of every prompt token and shipped its pages; the
    decode worker fed its draft generated tokens only (each at most once, the last never)."""
    assert stats["draft_prefill_tokens"] == sum(len(r.prompt) for r in reqs)
    assert stats["draft_kv_pages_transferred"] == sum(-(-len(r.prompt) // 16) for r in reqs)
    assert stats["transfer_bytes"] == stats["kv_bytes_transferred"] + stats["draft_kv_bytes_transferred"]
    assert 0 < stats["draft_fed_tokens"] <= sum(len(r.output) - 1 for r in reqs)


def test_sampled_draft_speculation_is_reproducible(dirs, deployments):
    params = per_request(2, NEW, temperature=0.8, seed=5)
    runs = [_run(deployments("tp=1"), f"draft:{dirs['layers3']}:3", params=params)[0] for _ in range(2)]
    assert [r.output for r in runs[0]] == [r.output for r in runs[1]]


def test_draft_catch_up_and_rollback(dirs, deployments):
    """A long catch-up is fed in bounded chunks; after a rejection the proposer keeps only the KV of the
    tokens the sequence still starts with: its drafts equal a fresh proposer's fed the whole sequence."""
    draft = deployments("tp=1").draft("tp=1", dataclasses.replace(OPTIONS, speculative=f"draft:{dirs['layers3']}:3"))
    make = lambda chunk=512: DraftModelProposer(draft, num_pages=8, page_size=16, max_batch=2, chunk=chunk)  # noqa: E731
    seq = np.asarray(_prompts()[0] + [7], np.int32)  # 17 tokens
    bounded, whole = make(chunk=8), make()
    assert [len(bounded.draft([DraftRow("r", seq, 3, 32)])[0]) for _ in range(2)] == [0, 0]  # 8 + 8 of 17 fed
    drafts = whole.draft([DraftRow("r", seq, 3, 32)])[0]
    assert len(drafts) == 3 and bounded.draft([DraftRow("r", seq, 3, 32)])[0].tolist() == drafts.tolist()
    later = np.concatenate([seq, drafts[:1], [(int(drafts[1]) + 1) % 512]]).astype(np.int32)  # 1 kept, then another token
    assert whole.draft([DraftRow("r", later, 3, 32)])[0].tolist() == make().draft([DraftRow("r", later, 3, 32)])[0].tolist()
    whole.forget("r")
    assert whole.kv.free_blocks == 8


def test_pd_ships_chunked_draft_kv_and_prefills_it_whole_after_a_cached_prefix(dirs, deployments):
    """P/D, prompts of 20 tokens prefilled in calls of 16: the draft's pages ride in the shipment of each
    call that completes a page. A second turn reuses the target's cached first page on both workers,
    yet the draft (no prefix index) is prefilled and shipped whole. Without a draft on the prefill
    worker, the decode worker's draft is fed the prompt itself: the same tokens either way."""
    turn1 = [p[:16] + [5, 6, 7, 8] for p in _prompts()]  # 20 + 8 new + 4 overshoot: 2 pages
    turn2 = [p[:16] + [9, 10, 11, 12] for p in _prompts()]
    plain = {i: [r.output for r in generate(deployments("tp=1").engine(), t, per_request(2, 8))]
             for i, t in enumerate((turn1, turn2))}
    engine = deployments("tp=1@0-0", "tp=2@2-3").engine(
        dataclasses.replace(OPTIONS, prefill_chunk=16, speculative=f"draft:{dirs['layers3']}:3"))
    engine.decode_workers[0].speculator.adaptive = False
    reqs = generate(engine, turn1, per_request(2, 8))
    assert [r.output for r in reqs] == plain[0]
    stats = engine.stats()
    # calls of 16 tokens: row 0's first page, then its second (row 1 begins), then row 1's two pages
    assert stats["transfers"] == 3 and stats["spec_proposed_tokens"] > 0
    _check_draft_shipped(reqs, stats)
    engine.reset_stats()
    reqs = generate(engine, turn2, per_request(2, 8))
    assert [r.output for r in reqs] == plain[1]
    stats = engine.stats()
    assert stats["prefix_hit_tokens"] == stats["decode_hit_tokens"] == 32 and stats["prefill_tokens_computed"] == 8
    _check_draft_shipped(reqs, stats)  # the draft: all 40 prompt tokens prefilled, 4 pages shipped
    engine.prefill_workers[0].draft = None  # the decode worker's draft catches up on the prompt itself
    engine.reset_stats()
    reqs = generate(engine, turn1, per_request(2, 8))
    assert [r.output for r in reqs] == plain[0]
    stats = engine.stats()
    assert stats["draft_kv_pages_transferred"] == stats["draft_prefill_tokens"] == 0
    assert stats["draft_fed_tokens"] >= 40


def test_imported_draft_kv_drafts_without_feeding_the_prompt(dirs, deployments):
    """A prompt's draft KV prefilled by one proposer (the prefill side, in two calls), exported and
    imported by another (the decode side): its first draft call feeds one token (the target's first
    token) and drafts what a proposer fed the whole sequence drafts. (The shapes of
    test_draft_catch_up_and_rollback: nothing new to compile but the page export and import.)"""
    draft = deployments("tp=1").draft("tp=1", dataclasses.replace(OPTIONS, speculative=f"draft:{dirs['layers3']}:3"))
    make = lambda chunk=512: DraftModelProposer(draft, num_pages=8, page_size=16, max_batch=2, chunk=chunk)  # noqa: E731
    prompt = np.asarray(_prompts()[0], np.int32)  # 16 tokens: one page
    sender, receiver = make(chunk=8), make()
    assert sender.prefill([("r", prompt[:8], 16)]) == 8 and sender.prefill([("r", prompt, 16)]) == 8
    count, real, arrays = sender.export([("r", 0, 1)])
    assert (count, real) == (1, 1)
    receiver.receive([("r", prompt, 0, 1, True, 32)], count, arrays)
    seq = np.concatenate([prompt, [7]]).astype(np.int32)
    drafts = receiver.draft([DraftRow("r", seq, 3, 32)])[0]
    assert receiver.fed_tokens == 1 and receiver.imported_tokens == 16
    assert len(drafts) == 3 and drafts.tolist() == make().draft([DraftRow("r", seq, 3, 32)])[0].tolist()
    receiver.forget("r")
    sender.forget("r")
    assert receiver.kv.free_blocks == sender.kv.free_blocks == 8


def test_the_draft_mesh_is_its_own_tp_on_the_decoding_devices(deployments):
    decode = deployments("tp=1@0-0", "tp=2@2-3").programs("tp=2@2-3")
    assert draft_mesh(decode, 1) == "tp=1@2-2" and draft_mesh(decode, 2) == "tp=2@2-3"
    with pytest.raises(SpecError, match="draft_tp=4 does not fit"):
        draft_mesh(decode, 4)


def test_bad_draft_specs_fail_with_one_clear_error(dirs, tmp_path):
    with pytest.raises(SpecError, match="not a checkpoint directory"):
        EngineOptions(speculative=f"draft:{tmp_path / 'missing'}:3")
    with pytest.raises(SpecError, match="vocab_size 1024, the target 512"):
        Deployment(dirs["target"], ["tp=1"], ["tp=1"], options=EngineOptions(speculative=f"draft:{dirs['vocab']}:3"))
    with pytest.raises(SpecError, match="EAGLE-3 head .* is not a checkpoint directory"):
        parse_speculative(f"eagle3:{tmp_path / 'missing'}:3")
    with pytest.raises(ValueError, match="draft_tp"):
        EngineOptions(speculative=f"draft:{dirs['target']}:3", draft_tp=0)


class _CountingProposer:
    """A costly proposer that drafts k copies of the last token and counts its calls."""

    costly = True

    def __init__(self):
        self.calls = 0

    def draft(self, rows):
        self.calls += 1
        return [np.full(r.k, r.seq[-1], np.int32) for r in rows]

    def support(self, rid):
        return 0

    def forget(self, rid):
        pass

    def warm(self, shapes, k):
        pass


def test_a_declined_verification_costs_no_drafts():
    prop = _CountingProposer()
    spec = Speculator(SpecConfig("draft", 3, "unused"), proposer=prop)
    row = [("a", np.arange(8, dtype=np.int32), 8, 100)]
    assert spec.drafts(row, batch=1) == {} and prop.calls == 0  # no decode measured yet: decode first
    spec.observed_decode(1, 4, 0.04)  # 10 ms per decode step
    assert len(spec.drafts(row, batch=1)["a"]) == 3 and prop.calls == 1  # verify unmeasured: tried
    width = spec.width({"a": np.arange(3)})  # the verify call's columns for 3 drafts
    assert spec.worth(1, width, {"a": np.arange(3)}, rows=1)  # the decision drafts() took stands
    for _ in range(3):
        spec.observed_verify(1, width, 0.2, {"a": (3, 0)})  # slow, nothing kept
    assert spec.drafts(row, batch=1) == {} and prop.calls == 1  # declined before drafting
