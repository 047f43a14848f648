"""Prefix reuse and chunked prefill in the engine (engine/core.py, kv/manager.py), per family: dense
Llama and Qwen3, Llama 4 (ring layers; prompts cross its 8-position attention chunks) and DeepSeek MLA.
A multi-turn agent trace (engine/trace.py; every later turn resends the conversation) gives
transformers' greedy tokens with the cache off, and the same tokens with the cache on and prefill
chunks of 16, 64 or whole prompts, colocated and prefill (tp=2) -> decode (tp=1); seeded temperature
sampling draws the same tokens with the cache on and off; the prefill tokens computed and the pages
sent prefill -> decode are exactly the trace's uncached tokens and pages; every page ends free or held
only by the prefix index. (Multi-process: tests/test_multiprocess.py.)"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from infire_jax.engine.build import place_programs
from infire_jax.engine.disagg import ColocatedWorker, DecodeWorker, Engine, PrefillWorker
from infire_jax.engine.programs import Programs
from infire_jax.engine.trace import Turn, history_stats, make_trace, replay
from tests.helpers import DENSE_CONFIGS, save_reference, torch_greedy
from tests.reference.test_moe_reference import save_moe_reference

PAGE = 4
# One page geometry and batch bound for every worker on the tp=1 placement (colocated engines and the
# P/D decode worker), so they share compiled programs.
WORKER = dict(page_size=PAGE, num_pages=512, max_batch=8)
# Three turns, sessions sharing nothing, so the accounting is exact: turn 0 a 24-token system prompt +
# a user message, later turns a tool output + a user message on top of the conversation; prompts grow
# past 64 tokens (two chunks of 64). Llama runs two sessions at once (rows of different offsets
# batched in one call); the other families one (fewer programs to compile: CI time).
SMALL = dict(turns=3, system_tokens=24, shared_system=False, user_tokens=(3, 6), tool_tokens=(12, 18), max_tokens=5,
             session_interval_s=0.0)
FAMILIES = {"llama": 2, "qwen3": 1, "llama4": 1, "deepseek_v3": 1}  # name -> sessions


@dataclasses.dataclass
class Family:
    name: str
    programs: Programs  # tp=1: colocated and P/D decode
    prefill_programs: Programs  # tp=2: P/D prefill
    trace: list[Turn]
    greedy: list[dict[str, Any]]  # the trace with the cache off, whole prompts (= transformers')
    sampled: list[dict[str, Any]]  # the same, temperature 0.9, seeded

    @property
    def ring(self) -> bool:  # Llama 4: its ring layers' reuse is cut to whole windows (kv/manager.py)
        return self.name == "llama4"


def colocated(programs: Programs, **kw: Any) -> Engine:
    return Engine([], [ColocatedWorker("c", programs, **WORKER, **kw)])


def pd(f: Family, chunk: int | None) -> Engine:
    """Prefill on tp=2 (devices 1-2), decode on the tp=1 placement (device 0): different layouts."""
    return Engine([PrefillWorker("p", f.prefill_programs, page_size=PAGE, num_pages=512, max_batch=8, prefill_chunk=chunk)],
                  [DecodeWorker("d", f.programs, **WORKER)])


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> Family:
    """The family's tiny transformers model saved and placed twice; the trace replayed with the cache
    off and whole prompts (the engine as it was), checked against transformers' greedy tokens."""
    name = request.param
    out = tmp_path_factory.mktemp(name)
    ref = save_reference(name, out) if name in DENSE_CONFIGS else save_moe_reference(name, out)
    programs = place_programs(out, "tp=1@0", decode_steps=4)
    trace = make_trace(vocab_size=programs.placed.cfg.vocab_size, sessions=FAMILIES[name], seed=1, **SMALL)
    engine = colocated(programs, prefix_cache=False, prefill_chunk=None)
    greedy = replay(engine, trace)
    sampled = replay(engine, trace, temperature=0.9, seed=3)
    assert engine.stats()["prefill_tokens_computed"] == 2 * sum(len(r["prompt"]) for r in greedy)  # no reuse
    assert max(len(r["prompt"]) for r in greedy) > 64
    for r in greedy:
        assert r["output"] == torch_greedy(ref, r["prompt"], len(r["output"])), (name, r["session"], r["turn"])
    return Family(name, programs, place_programs(out, "tp=2@1-2"), trace, greedy, sampled)


def _check_idle(engine: Engine) -> None:
    for w in engine.workers:
        w.kv.check()
        assert w.kv.idle() and not w.rows  # every page free or held only by the prefix index


def _outputs(records: list[dict[str, Any]]) -> list[list[int]]:
    return [r["output"] for r in records]


@pytest.mark.parametrize("chunk", [None, 16, 64])
def test_colocated_reuse_and_chunks_equal_transformers(family, chunk):
    """Cache on, prefill chunks of 16, 64 or whole prompts: transformers' tokens; later turns computed
    only past the conversation the cache holds (exactly, but for Llama 4's cut to whole windows)."""
    engine = colocated(family.programs, prefill_chunk=chunk)
    got = replay(engine, family.trace)
    assert _outputs(got) == _outputs(family.greedy)
    want = history_stats(got, PAGE)
    stats = engine.stats()
    assert sum(r["cached_tokens"] for r in got) == stats["prefix_hit_tokens"] == want["prompt_tokens"] - stats["prefill_tokens_computed"]
    assert all(r["cached_tokens"] > 0 for r in got if r["turn"] > 0)
    if family.ring:
        assert want["colocated_computed"] <= stats["prefill_tokens_computed"] < want["prompt_tokens"]
    else:
        assert stats["prefill_tokens_computed"] == want["colocated_computed"]
    if chunk is None:  # seeded sampling: the same draws with the cache on
        engine.reset_stats()
        assert _outputs(replay(engine, family.trace, temperature=0.9, seed=3)) == _outputs(family.sampled)
        assert engine.stats()["prefix_hit_tokens"] > 0
    _check_idle(engine)


def test_pd_reuse_equals_transformers_and_sends_only_missing_pages(family):
    """Prefill tp=2 -> decode tp=1 in chunks of 16: transformers' tokens; the prefill worker computes
    what its cache lacks, and only the pages the decode worker lacks cross, chunk by chunk."""
    engine = pd(family, chunk=16)
    got = replay(engine, family.trace)
    assert _outputs(got) == _outputs(family.greedy)
    want, stats = history_stats(got, PAGE), engine.stats()
    if not family.ring:
        assert stats["prefill_tokens_computed"] == want["prefill_computed"]
    assert stats["kv_pages_transferred"] == want["pages_to_transfer"]
    assert stats["transfers"] > len(family.trace)  # prompts past 16 tokens: their pages cross chunk by chunk
    _check_idle(engine)


def test_agent_trace_accounting(family):
    """8 sessions x 6 turns, turns >= 2 reusing >= 90% of their prompt: the prefill worker computes
    exactly the tokens its cache lacks (the new turn and the previous answer), and exactly the pages
    the decode worker lacks cross (the new turn), with no eviction in between."""
    if family.name != "llama":
        pytest.skip("one family is enough for the accounting (the exactness tests above cover the others)")
    engine = pd(family, chunk=None)
    trace = make_trace(sessions=8, turns=6, vocab_size=engine.vocab_size, system_tokens=120, shared_system=False,
                       user_tokens=(1, 3), tool_tokens=(2, 5), max_tokens=3, session_interval_s=0.0, seed=2)
    got = replay(engine, trace)
    want, stats = history_stats(got, PAGE), engine.stats()
    assert min(_conversation_cached(got, r) / len(r["prompt"]) for r in got if r["turn"] >= 1) >= 0.9
    assert stats["evicted_pages"] == 0
    assert stats["prefill_tokens_computed"] == want["prefill_computed"]
    assert stats["kv_pages_transferred"] == want["pages_to_transfer"]
    assert stats["decode_hit_tokens"] == PAGE * sum(-(-len(r["prompt"]) // PAGE) for r in got) - PAGE * want["pages_to_transfer"]
    _check_idle(engine)


def _conversation_cached(records, rec):
    """Tokens of rec's prompt that its session's previous turn left in a decode worker's cache."""
    prev = next(r for r in records if r["session"] == rec["session"] and r["turn"] == rec["turn"] - 1)
    return (len(prev["prompt"]) + len(prev["output"]) - 1) // PAGE * PAGE
