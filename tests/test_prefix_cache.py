"""Prefix reuse and chunked prefill in the engine (engine/core.py, kv/manager.py): multi-turn agent
traces (engine/trace.py) give the same tokens with the cache on and off and with prefill chunks of 16,
64 or whole prompts, colocated and prefill/decode on different layouts (the engine without them is the
one tests/test_api.py and tests/reference tie to transformers); seeded temperature sampling draws the
same tokens; the prefill tokens computed and the pages sent prefill -> decode are exactly the trace's
uncached tokens and pages; every page ends free or held only by the prefix index."""

from __future__ import annotations

import pytest

from infire_jax.checkpoint.tiny import write_tiny_checkpoint
from infire_jax.engine.disagg import ColocatedWorker, DecodeWorker, Engine, PrefillWorker
from infire_jax.engine.build import place_programs
from infire_jax.engine.trace import history_stats, make_trace, replay

PAGE = 16
# Three sessions of three turns sharing nothing across sessions, so the accounting is exact: turn 0 a
# 24-token system prompt + a user message, later turns a tool output + a user message on top of the
# conversation; prompts grow past 64 tokens (two chunks of 64).
SMALL = dict(sessions=3, turns=3, system_tokens=24, shared_system=False, user_tokens=(3, 6), tool_tokens=(10, 16),
             max_tokens=5, session_interval_s=0.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("prefix_llama"), "tiny-llama", tokenizer=False)


@pytest.fixture(scope="module")
def programs(model_dir):
    return place_programs(model_dir, "tp=1@0", decode_steps=4)


@pytest.fixture(scope="module")
def trace(programs):
    return make_trace(vocab_size=programs.placed.cfg.vocab_size, seed=1, **SMALL)


def colocated(programs, **kw):
    return Engine([], [ColocatedWorker("c", programs, num_pages=64, page_size=PAGE, max_batch=4, **kw)])


@pytest.fixture(scope="module")
def baseline(programs, trace):
    """The engine as it was: no prefix cache, whole prompts."""
    engine = colocated(programs, prefix_cache=False, prefill_chunk=None)
    greedy = replay(engine, trace)
    sampled = replay(engine, trace, temperature=0.9, seed=3)
    assert engine.stats()["prefill_tokens_computed"] == 2 * sum(len(r["prompt"]) for r in greedy)
    return greedy, sampled


def _check_idle(engine):
    for w in engine.workers:
        w.kv.check()
        assert w.kv.idle() and not w.rows  # every page free or held only by the prefix index


@pytest.mark.parametrize("chunk", [None, 16, 64])
def test_colocated_reuse_and_chunks_are_exact(programs, trace, baseline, chunk):
    engine = colocated(programs, prefill_chunk=chunk)
    got = replay(engine, trace)
    assert [r["output"] for r in got] == [r["output"] for r in baseline[0]]
    want = history_stats(got, PAGE)
    stats = engine.stats()
    assert stats["prefill_tokens_computed"] == want["colocated_computed"] < want["prompt_tokens"]
    assert sum(r["cached_tokens"] for r in got) == stats["prefix_hit_tokens"] == want["prompt_tokens"] - want["colocated_computed"]
    assert all(r["cached_tokens"] > 0 for r in got if r["turn"] > 0)
    if chunk is None:  # seeded sampling: the same draws with the cache on
        engine.reset_stats()
        sampled = replay(engine, trace, temperature=0.9, seed=3)
        assert [r["output"] for r in sampled] == [r["output"] for r in baseline[1]]
        assert engine.stats()["prefix_hit_tokens"] > 0
    _check_idle(engine)


@pytest.fixture(scope="module")
def prefill_programs(model_dir):
    return place_programs(model_dir, "tp=2@1-2")


def pd(prefill_programs, programs, chunk):
    """Prefill on tp=2, decode on the tp=1 placement: different layouts."""
    return Engine([PrefillWorker("p", prefill_programs, page_size=PAGE, num_pages=256, prefill_chunk=chunk)],
                  [DecodeWorker("d", programs, page_size=PAGE, num_pages=256, max_batch=8)])


def test_pd_reuse_is_exact_and_sends_only_missing_pages(prefill_programs, programs, trace, baseline):
    engine = pd(prefill_programs, programs, chunk=32)
    got = replay(engine, trace)
    assert [r["output"] for r in got] == [r["output"] for r in baseline[0]]
    want, stats = history_stats(got, PAGE), engine.stats()
    assert stats["prefill_tokens_computed"] == want["prefill_computed"]
    assert stats["kv_pages_transferred"] == want["pages_to_transfer"]
    assert stats["transfers"] > len(trace)  # prompts past 32 tokens: their pages cross chunk by chunk
    _check_idle(engine)


def test_agent_trace_accounting(prefill_programs, programs):
    """8 sessions x 6 turns, turns >= 2 reusing >= 90% of their prompt: the prefill worker computes
    exactly the tokens its cache lacks (the new turn and the previous answer), and exactly the pages
    the decode worker lacks cross (the new turn), with no eviction in between."""
    engine = pd(prefill_programs, programs, chunk=None)
    trace = make_trace(sessions=8, turns=6, vocab_size=engine.vocab_size, system_tokens=240, shared_system=False,
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
