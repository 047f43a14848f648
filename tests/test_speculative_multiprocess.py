"""Speculative decoding under multi-process P/D (engine/remote.py): one engine start, one prefill
process (tp=2, with the draft model beside it) and two decode processes (tp=1), one speculating with
n-gram lookup ("ngram:4"), one with a draft model ("draft:DIR:4": the target's first 3 of 4 layers).
The router alternates requests between the two. Greedy tokens equal colocated tokens without
speculation; proposed/accepted counts arrive in request metrics and RemoteEngine.stats(); the draft
decoder's draft KV of the prompt comes from the prefill process in the same offer as the target's
pages (its draft is never fed a prompt token), the n-gram decoder gets no draft pages. With
"eagle3:DIR:K" on both sides the prompt's captured hidden states ride with the pages."""

import numpy as np
import pytest

import infire_jax
from infire_jax.checkpoint import tiny
from infire_jax.engine.remote import RemoteEngine, WorkerConfig
from infire_jax.engine.sampling import SamplingParams
from tests.helpers import write_head
from tests.test_multiprocess import HARD_LIMIT_S, RUN_S, TIMEOUTS, hard_limit  # noqa: F401 - the alarm fixture

NEW = 12


def _prompts() -> list[list[int]]:
    """Repetitive prompts (n-gram lookup drafts from the first call on), four of them."""
    rng = np.random.default_rng(0)
    out = []
    for n in (5, 4, 6, 3):
        base = rng.integers(3, 150, n).tolist()
        out.append(base * 3 + base[:2])
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_mp")
    return dict(
        target=tiny.write_tiny_checkpoint(root / "target", "tiny-llama", tokenizer=False),
        draft=tiny.write_tiny_checkpoint(root / "draft", "tiny-llama", tokenizer=False,
                                         overrides=dict(num_hidden_layers=3)),
    )


def test_speculation_under_multiprocess_pd_gives_colocated_tokens(dirs):
    prompts = _prompts()
    want = infire_jax.load(dirs["target"]).generate(prompts, max_new_tokens=NEW)
    draft = f"draft:{dirs['draft']}:4"
    decode = dict(decode_steps=2, num_pages=32, max_batch=4)
    with RemoteEngine(
        dirs["target"],
        [WorkerConfig("prefill", "prefill0", mesh="tp=2", num_pages=32, speculative=draft)],
        [WorkerConfig("decode", "ngram", speculative="ngram:4", **decode),
         WorkerConfig("decode", "draft", speculative=draft, **decode)],
        **TIMEOUTS,
    ) as engine:
        assert engine.workers["draft"].info["draft"] is not None and engine.workers["ngram"].info["draft"] is None
        for name in ("ngram", "draft"):
            engine.debug(name, verify_always=True)
        reqs = engine.run_requests(prompts, [SamplingParams(NEW)] * len(prompts), timeout=RUN_S)
        for r in reqs:
            r.raise_error()
        assert [r.output for r in reqs] == want
        by = {name: [r for r in reqs if r.decode_worker == name] for name in ("ngram", "draft")}
        assert all(by.values()), [r.decode_worker for r in reqs]  # the router used both
        for name, rs in by.items():  # both proposers drafted, and verification kept some drafts
            assert sum(r.metrics()["proposed_tokens"] for r in rs) > 0, (name, [r.metrics() for r in rs])
            assert sum(r.metrics()["accepted_tokens"] for r in rs) > 0, (name, [r.metrics() for r in rs])
        stats = engine.stats()
        assert stats["spec_proposed_tokens"] == sum(r.proposed_tokens for r in reqs) > 0
        assert stats["spec_accepted_tokens"] == sum(r.accepted_tokens for r in reqs) > 0
        assert 0 < stats["acceptance_rate"] <= 1 and stats["spec_verify_calls"] > 0
        # the draft decoder's prompts were prefilled through the draft by the prefill process and shipped
        assert stats["draft_prefill_tokens"] == sum(len(r.prompt) for r in by["draft"])
        assert stats["draft_kv_pages_transferred"] == sum(-(-len(r.prompt) // 16) for r in by["draft"])
        assert stats["draft_kv_bytes_transferred"] > 0
        # pulled in the same offers: the transfers' bytes (pages padded to a power of two) hold both
        assert stats["transfer_bytes"] >= stats["kv_bytes_transferred"] + stats["draft_kv_bytes_transferred"]
        # its draft was fed only generated tokens (at most one per token, the last never), no prompt token
        assert 0 < stats["draft_fed_tokens"] <= sum(len(r.output) - 1 for r in by["draft"])


def test_eagle3_prompt_states_ride_with_the_pages_across_processes(dirs, tmp_path):
    """"eagle3:DIR:K" on both sides: the prefill process captures the head's target layers while it
    prefills and ships the prompt's states with the pages, so the decode process recomputes no
    prompt (hidden_states_received = every prompt position); the tokens are colocated plain ones."""
    prompts = _prompts()
    want = infire_jax.load(dirs["target"]).generate(prompts, max_new_tokens=NEW)
    spec = f"eagle3:{write_head(tmp_path / 'head', dirs['target'])}:3"
    with RemoteEngine(
        dirs["target"],
        [WorkerConfig("prefill", "prefill0", mesh="tp=1", num_pages=32, speculative=spec)],
        [WorkerConfig("decode", "eagle3", speculative=spec, decode_steps=2, num_pages=32, max_batch=4)],
        **TIMEOUTS,
    ) as engine:
        engine.debug("eagle3", verify_always=True)
        reqs = engine.run_requests(prompts, [SamplingParams(NEW)] * len(prompts), timeout=RUN_S)
        for r in reqs:
            r.raise_error()
        assert [r.output for r in reqs] == want
        stats = engine.stats()
        assert stats["spec_proposed_tokens"] > 0 and stats["spec_verify_calls"] > 0
        assert stats["hidden_states_received"] == sum(len(p) for p in prompts)
