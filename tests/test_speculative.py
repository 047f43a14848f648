"""Speculative decoding (engine/speculative.py, Programs.verify_fn, sampling.verify).

Exactness: greedy tokens with n-gram speculation equal those without, for dense Llama / Qwen3, Llama 4
(ring layers; generations cross its 8-position windows) and DeepSeek MLA, colocated on tp=1, tp=2 and
pp=2, and under P/D with different layouts on each side. Speculation is forced on every call there
(`adaptive = False`), so every decode step is a verification. Distribution: with temperature (and
top-k) the verified tokens follow the target's distribution (chi-square over 20,000 draws). Plus the
spec parser's errors, the proposer, the adaptive off-switch, metrics, and seeded reproducibility.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infire_jax
from infire_jax.engine.build import Deployment, EngineOptions
from infire_jax.engine.disagg import generate
from infire_jax.engine.sampling import SamplingParams, per_request, sample, verify
from infire_jax.engine.speculative import NgramProposer, SpecConfig, SpecError, Speculator, parse_speculative

OPTIONS = EngineOptions(kv_pages=64, page_size=16, max_decode_batch=4, decode_steps=2, prefill_chunk=None)
NEW = 12


def _prompts(rows: int = 2, vocab: int = 150) -> list[list[int]]:
    """Prompts of 16 tokens with recurring n-grams (proposals from the prompt; random models then tend
    to repeat themselves too). 16 + 12 new + overshoot stays within 2 pages of 16 and the rows are
    few: few compiled shapes."""
    rng = np.random.default_rng(0)
    base = rng.integers(3, vocab, 5).tolist()
    return [base * 3 + base[:1], rng.integers(3, vocab, 4).tolist() * 4][:rows]


@pytest.fixture(scope="module")
def deployments(checkpoints):
    """One Deployment (so one set of compiled programs) per (model, prefill mesh, decode mesh)."""
    made = {}

    def get(name, prefill, decode=None):
        key = (name, prefill, decode or prefill)
        if key not in made:
            made[key] = Deployment(checkpoints(name), [prefill], [decode or prefill], options=OPTIONS)
        return made[key]

    return get


@pytest.fixture(scope="module")
def plain(deployments):
    """Greedy tokens without speculation per (model, mesh), computed once."""
    made = {}

    def get(name, mesh, rows=2):
        if (name, mesh, rows) not in made:
            made[name, mesh, rows] = [r.output for r in _run(deployments(name, mesh), _prompts(rows), None)[0]]
        return made[name, mesh, rows]

    return get


def _forced(engine):
    """Every decode call with drafts verifies (no cost model): the verify path on every step."""
    for w in engine.decode_workers:
        w.speculator.adaptive = False
    return engine


def _run(deployment: Deployment, prompts, speculative: str | None, params=None):
    engine = deployment.engine(dataclasses.replace(OPTIONS, speculative=speculative))
    if speculative:
        _forced(engine)
    reqs = generate(engine, prompts, params or per_request(len(prompts), NEW))
    return reqs, engine


def _check_speculated(engine, reqs):
    stats = engine.stats()
    assert stats["spec_verify_calls"] > 0 and stats["spec_proposed_tokens"] > 0
    assert stats["spec_accepted_tokens"] > 0  # the repetitive prompts make random models repeat too
    assert sum(r.metrics()["proposed_tokens"] for r in reqs) == stats["spec_proposed_tokens"]
    assert sum(r.metrics()["accepted_tokens"] for r in reqs) == stats["spec_accepted_tokens"]
    assert 1.0 < stats["mean_accepted_length"] <= 4.0
    assert all(len(r.output) == NEW for r in reqs)


# Each family once, each layout once: dense Llama (tp=1; two rows with different draft counts in one
# batch) and Qwen3 (tp=2), Llama 4's ring layers (tp=1; 8-position windows, crossed by every
# generation), DeepSeek MLA on pp=2 (whose batch is 2 rows anyway); P/D below. (One row for Llama 4:
# fewer batch shapes.)
CASES = [("tiny-llama", "tp=1", 2), ("tiny-qwen3", "tp=2", 2), ("llama4", "tp=1", 1), ("deepseek_v3", "pp=2", 2)]


@pytest.mark.parametrize("name, mesh, rows", CASES)
def test_greedy_tokens_equal_plain_decoding(deployments, plain, name, mesh, rows):
    got, engine = _run(deployments(name, mesh), _prompts(rows), "ngram:3")
    assert [r.output for r in got] == plain(name, mesh, rows)
    _check_speculated(engine, got)


def test_disaggregated_speculation_equals_colocated(deployments, plain):
    """P/D with different layouts on each side (prefill pp=2,tp=2; decode tp=2), speculating decode."""
    got, engine = _run(deployments("tiny-llama", "pp=2,tp=2@0-3", "tp=2@4-5"), _prompts(), "ngram:3")
    assert not engine.colocated
    assert [r.output for r in got] == plain("tiny-llama", "tp=1")
    _check_speculated(engine, got)


def test_sampled_speculation_is_seeded_and_reproducible(deployments):
    dep = deployments("tiny-llama", "tp=1")
    params = per_request(2, NEW, temperature=0.3, top_k=3, seed=7)
    runs = [_run(dep, _prompts(), "ngram:3", params) for _ in range(2)]
    assert [r.output for r in runs[0][0]] == [r.output for r in runs[1][0]]
    assert all(engine.stats()["spec_accepted_tokens"] > 0 for _, engine in runs)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_verified_tokens_follow_the_target_distribution(temperature, top_k, top_p):
    """Rejection sampling with deterministic drafts: the first token of a verify follows p_0, and the
    second, given that the first is the draft d_1, follows p_1 (chi-square over N draws each, p >= 0.01).
    Plain sampling (`sample`) over the same logits and seeds passes the same test."""
    from scipy.stats import chisquare

    n, vocab = 20_000, 8
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(0, 1.0, (1, 3, vocab)) * 0.6, jnp.float32)
    expect = [np.asarray(_target(logits[0, j], temperature, top_k, top_p)) for j in range(3)]
    d1 = int(np.argmax(expect[0]))  # kept often (the second token's test), rejected often (the residual's)
    drafts = jnp.asarray([[d1, 2, 0]] * n, jnp.int32)
    params = dict(temperature=jnp.full((n,), temperature, jnp.float32), top_k=jnp.full((n,), top_k, jnp.int32),
                  top_p=jnp.full((n,), top_p, jnp.float32), seed=jnp.arange(n, dtype=jnp.uint32))
    tokens, accepted = jax.jit(verify)(jnp.broadcast_to(logits, (n, 3, vocab)), drafts, jnp.full((n,), 2, jnp.int32),
                                       jnp.full((n,), 10, jnp.int32), params)
    tokens, accepted = np.asarray(tokens), np.asarray(accepted)
    first = tokens[:, 0]
    plain = np.asarray(jax.jit(sample)(jnp.broadcast_to(logits[:, 0], (n, vocab)), jnp.full((n,), 11, jnp.int32), params))
    second = tokens[first == d1, 1]
    assert 1000 < len(second) < n - 1000
    for drawn, p in ((first, expect[0]), (plain, expect[0]), (second, expect[1])):
        keep = p > 0
        assert not np.isin(drawn, np.flatnonzero(~keep)).any()  # nothing outside top-k / top-p
        counts = np.bincount(drawn, minlength=vocab)[keep]
        assert chisquare(counts, p[keep] / p[keep].sum() * len(drawn)).pvalue >= 0.01
    assert ((accepted >= 1) == (first == d1)).all()


def _target(logits, temperature, top_k, top_p) -> np.ndarray:
    """The filtered distribution in numpy (independent of sampling.py)."""
    x = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-x)
    probs = np.exp(x[order] - x[order].max())
    probs /= probs.sum()
    keep = np.ones(len(x), bool)
    if top_k:
        keep[top_k:] = False
    keep &= (np.cumsum(probs) - probs) < top_p
    out = np.zeros(len(x))
    out[order[keep]] = probs[keep]
    return out / out.sum()


def test_warm_up_compiles_the_verify_programs(deployments):
    """engine/warmup.py compiles a verify program per width (k = 3: 2, 3 and 5 columns) for the decode
    shapes of its dummy wave, so the real requests after it compile none. (Its own page pool size: the
    programs of this test alone.)"""
    from infire_jax.engine.warmup import warm_up

    engine = deployments("tiny-llama", "tp=1").engine(dataclasses.replace(OPTIONS, kv_pages=48, speculative="ngram:3"))
    p = engine.decode_workers[0].programs
    verify = lambda: {k for k in p.compile_seconds if k[0] == "verify" and k[4] == 48}  # noqa: E731
    warm_up(engine, [16, 16], NEW)
    assert {k[2] for k in verify()} == {2, 3, 5}
    before = verify()
    reqs = generate(_forced(engine), _prompts(), per_request(2, NEW))
    assert engine.stats()["spec_verify_calls"] > 0 and all(len(r.output) == NEW for r in reqs)
    assert verify() == before


def test_parse_speculative():
    assert parse_speculative(None) is None and parse_speculative("") is None
    assert parse_speculative("ngram:4") == SpecConfig("ngram", 4)
    for bad in ("ngram", "ngram:0", "ngram:x", "ngram:17", "medusa:4", "ngram:dir:4", "draft:4"):
        with pytest.raises(SpecError, match="bad speculative spec"):
            parse_speculative(bad)
    with pytest.raises(SpecError, match="not a checkpoint directory"):
        parse_speculative("eagle3:/some/dir:4")  # draft: tests/test_speculative_draft.py, eagle3: test_speculative_eagle3.py
    with pytest.raises(SpecError):
        EngineOptions(speculative="ngram:-1")


def test_load_rejects_a_bad_spec_before_placing(checkpoints):
    with pytest.raises(SpecError, match="bad speculative spec 'nrgam:4'"):
        infire_jax.load(checkpoints("tiny-llama"), speculative="nrgam:4")


def test_ngram_proposer():
    prop = NgramProposer()
    code = np.array([9, 1, 2, 3, 8, 4, 5, 1, 2, 3, 6, 7, 9, 1, 2, 3], np.int32)
    assert prop.propose(code, 2).tolist() == [8, 4]  # "9 1 2 3" agrees longer than the more recent "5 1 2 3"
    assert prop.match(code) == (4, 4)
    seq = np.array([1, 2, 3, 4, 5, 9, 9, 2, 3, 4], np.int32)
    assert prop.propose(seq, 3).tolist() == [5, 9, 9]  # trigram 2 3 4 recurs: what followed it
    assert prop.propose(seq, 1).tolist() == [5]
    assert prop.propose(np.array([1, 2, 3, 4], np.int32), 3).tolist() == []  # nothing recurs
    seq = np.array([7, 8, 1, 7, 8, 2, 7, 8], np.int32)
    assert prop.propose(seq, 2).tolist() == [2, 7]  # the most recent occurrence wins


def test_adaptive_k_and_off_switch():
    spec = Speculator(SpecConfig("ngram", 6), windows=[None, 8])
    assert spec._cap(length=13, left=100) == 2  # drafts at 14, 15 stay in the window 8..15 of the first draft
    assert spec._cap(length=5, left=3) == 2  # the row may generate 3 more: its last token + 2 drafts
    spec.observed_decode(1, 4, 0.4)  # 0.1 s per decode step
    drafts = {"a": np.arange(6)}
    assert spec.worth(1, 8, drafts, rows=1)  # verify unmeasured: tried
    spec.observed_verify(1, 8, 0.12, {"a": (6, 6)})
    assert spec.rows["a"].k == 6 and spec.worth(1, 8, drafts, rows=1)  # every draft kept: 1 + ~6 tokens per 0.12 s
    for _ in range(8):
        spec.observed_verify(1, 8, 0.12, {"a": (6, 0)})  # nothing kept: ~1 token per 0.12 s < 1 per 0.1 s
    assert spec.rows["a"].k == 2  # the run it sustains (~0) + 1
    refused = [spec.worth(1, 8, {"a": np.arange(1)}, rows=1) for _ in range(Speculator.PROBE_EVERY[0])]
    assert refused[:-1] == [False] * (len(refused) - 1) and refused[-1]  # off, with an occasional re-measure
    c = spec.counters
    assert (c.proposed_tokens, c.accepted_tokens, c.verified_rows) == (54, 6, 9)


REAL_CODE = '''def word_counts(text):
    counts = {}
    for word in text.lower().split():
        word = word.strip(".,;:!?")
        if word:
            counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda item: -item[1])
'''


def test_real_model_copies_code_with_exact_speculation():
    """SmolLM2-135M-Instruct's trained weights asked to repeat a code block: n-gram drafts are mostly
    kept, and the greedy tokens equal plain decoding's. Uses the copy experiments/bench_speculative.py
    fetches into the bench cache (a minute of download and conversion, then ~1 min of compiles here);
    skipped when it is not there, so CI does not pay for it."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
    import bench_common as bc

    model_dir = bc.bench_cache_dir() / f"smollm2-135m-instruct-{bc.SMOLLM2_WHEEL[1]}"
    if not (model_dir / "model.safetensors").is_file():
        pytest.skip(f"SmolLM2-135M-Instruct is not in {model_dir.parent} (python experiments/bench_speculative.py fetches it)")
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompt = tok.apply_chat_template(
        [dict(role="user", content=f"Repeat this Python code exactly:\n\n```python\n{REAL_CODE}```")],
        add_generation_prompt=True, tokenize=True, return_dict=False)
    opts = EngineOptions(kv_pages=32, page_size=16, max_decode_batch=1, decode_steps=8)
    dep = Deployment(model_dir, ["tp=1"], ["tp=1"], options=opts)
    params = [SamplingParams(48, stop_token_ids=(tok.eos_token_id,))]
    want = generate(dep.engine(), [prompt], params)
    engine = _forced(dep.engine(dataclasses.replace(opts, speculative="ngram:7")))
    got = generate(engine, [prompt], params)
    assert got[0].output == want[0].output
    stats = engine.stats()
    figures = {k: stats[k] for k in ("acceptance_rate", "mean_accepted_length", "spec_verify_calls", "spec_decode_calls")}
    assert stats["acceptance_rate"] > 0.25 and stats["mean_accepted_length"] > 1.8, figures  # measured 0.35, 2.1
