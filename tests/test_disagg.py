"""Prefill/decode disaggregation: distinct meshes, one KV transfer per batch, paged KV with
continuous batching, N:M workers under page pressure, per-request failures."""

import numpy as np
import pytest

import infire_jax
from infire_jax.engine.build import place_programs
from infire_jax.engine.disagg import DecodeWorker, Engine, PrefillWorker
from infire_jax.engine.sampling import SamplingParams
from infire_jax.kv import transfer
from infire_jax.kv.cache import OutOfPages, PageAllocator
from tests.helpers import save_reference

PAIRS = [("pp=2,tp=2@0-3", "tp=4@4-7"), ("tp=4@0-3", "pp=2,tp=2@4-7"), ("tp=2@0-1", "tp=1@2")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama_pd")
    save_reference("llama", out)
    return out


def _prompts(n, rng, lo=1, hi=30, vocab=160):
    return [rng.integers(0, vocab, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def colocated(model_dir):
    return infire_jax.load(model_dir)


@pytest.mark.parametrize("prefill_mesh, decode_mesh", PAIRS)
def test_disaggregated_equals_colocated_with_staggered_arrivals(model_dir, colocated, prefill_mesh, decode_mesh):
    model = infire_jax.load(model_dir, prefill_mesh=prefill_mesh, decode_mesh=decode_mesh, decode_steps=4)
    assert model.disaggregated
    rng = np.random.default_rng(0)
    prompts = _prompts(6, rng)
    want = colocated.generate(prompts, max_new_tokens=12)
    engine = model.engine
    params = SamplingParams(max_new_tokens=12)
    early = [engine.submit(p, params) for p in prompts[:3]]
    engine.step()  # the first requests are decoding while the others arrive
    engine.step()
    late = [engine.submit(p, params) for p in prompts[3:]]
    engine.run()
    assert [r.output for r in early + late] == want
    stats = engine.stats()
    prefill_batches = len({r.times["prefill_start"] for r in early + late})
    assert stats["transfers"] == prefill_batches  # one transfer per prefill batch, not per layer/request
    assert all(r.transfer_bytes > 0 and r.metrics()["ttft_s"] > 0 for r in early + late)
    assert stats["kv_pages_transferred"] == sum(-(-len(p) // 16) for p in prompts)  # every prompt page once


def test_kv_layout_mismatch_raises(model_dir):
    p = place_programs(model_dir, "tp=1@0")
    spec = p.kv_spec()
    other = transfer.KVSpec(spec.model, spec.num_layers, spec.heads, spec.dims, "bfloat16", spec.logical_axes)
    with pytest.raises(transfer.KVLayoutMismatch, match="dtype"):
        spec.check(other)
    k = np.zeros((spec.num_layers, 1, spec.heads[0], 16, spec.dims[0] + 1), np.float32)
    with pytest.raises(transfer.KVLayoutMismatch, match="k array"):
        spec.check_arrays((k, k))


def test_meshes_must_be_disjoint(model_dir):
    with pytest.raises(ValueError, match="share devices"):
        infire_jax.load(model_dir, prefill_mesh="tp=2@0-1", decode_mesh="tp=2@1-2")


def test_page_allocator():
    a = PageAllocator(4)
    pages = a.allocate(3, "r1")
    with pytest.raises(OutOfPages):
        a.allocate(2, "r2")
    a.release(pages)
    assert a.free == 4
    with pytest.raises(ValueError, match="not allocated"):
        a.release([0])


def test_500_requests_two_prefill_one_decode_with_too_few_pages(model_dir, colocated):
    """Every request completes exactly once with the colocated output, and all pages are free."""
    rng = np.random.default_rng(7)
    prompts = _prompts(500, rng, 1, 12)
    new = [int(n) for n in rng.integers(1, 7, 500)]
    want = [colocated.run_requests([p], [SamplingParams(n)])[0].output for p, n in zip(prompts[:40], new[:40])]
    prefill = [
        PrefillWorker(f"prefill{i}", place_programs(model_dir, f"tp=1@{i}"), max_batch=8, page_size=8)
        for i in range(2)
    ]
    decode = DecodeWorker(
        "decode", place_programs(model_dir, "tp=2@2-3", decode_steps=4),
        num_pages=12, page_size=8, max_batch=16,
    )
    engine = Engine(prefill, [decode])
    reqs = [engine.submit(p, SamplingParams(n), request_id=i) for i, (p, n) in enumerate(zip(prompts, new))]
    max_running = 0
    while engine.busy:
        engine.step()
        max_running = max(max_running, len(decode.running))
    assert max_running < 16  # the pages, not the batch size, limited the batch
    assert all(r.status == "done" for r in reqs)
    assert [len(r.output) for r in reqs] == [n if r.finish_reason == "length" else len(r.output) for r, n in zip(reqs, new)]
    assert all(len(r.output) == n for r, n in zip(reqs, new))
    assert [r.output for r in reqs[:40]] == want
    for w in prefill + [decode]:
        w.kv.check()
        assert w.kv.idle()  # every page free or held only by the prefix index
    assert sum(w.pending_tokens for w in prefill) == 0


def test_bad_requests_fail_alone(colocated):
    engine = colocated.engine
    good = engine.submit([1, 2, 3], SamplingParams(5))
    bad = [
        engine.submit([], SamplingParams(5)),
        engine.submit([1] * 300, SamplingParams(5)),  # beyond the 256-token context
        engine.submit([1, 2], {"temperature": -1.0}),
        engine.submit([1, 999], SamplingParams(5)),
    ]
    engine.run()
    assert good.status == "done" and len(good.output) == 5
    errors = [r.error for r in bad]
    assert all(r.status == "failed" for r in bad)
    assert "empty" in errors[0] and "context" in errors[1] and "temperature" in errors[2] and "vocabulary" in errors[3]
    assert engine.decode_workers[0].kv.idle()
    for r in [good] + bad:
        engine.requests.pop(r.id)


def test_decode_batch_bound_is_respected(colocated):
    decode = DecodeWorker("decode", colocated.programs, num_pages=64, page_size=16, max_batch=2)
    engine = Engine([PrefillWorker("prefill", colocated.programs)], [decode])
    reqs = [engine.submit([1, 2, i + 3], SamplingParams(6)) for i in range(5)]
    sizes = []
    join = decode._join
    decode._join = lambda: (join(), sizes.append(len(decode.running)))[0]  # the batch of each decode call
    engine.run()
    assert max(sizes) == 2 and all(r.status == "done" and len(r.output) == 6 for r in reqs)


def test_decode_reads_only_the_pages_it_reaches(colocated):
    """A request reserves pages for everything it may generate, but each decode call gathers only
    the pages up to its length + steps (so a long max_tokens does not make every step attend over
    the unwritten rest); the tokens are those of a roomy one-shot run."""
    decode = DecodeWorker("decode", colocated.programs, num_pages=64, page_size=4, max_batch=2)
    engine = Engine([PrefillWorker("prefill", colocated.programs, page_size=4)], [decode])
    req = engine.submit([5, 6, 7], SamplingParams(40))
    tables = []
    fn = colocated.programs.decode_fn
    colocated.programs.decode_fn = lambda b, per_row, *rest, **kw: (tables.append(per_row), fn(b, per_row, *rest, **kw))[1]
    try:
        engine.run()
    finally:
        colocated.programs.decode_fn = fn
    steps = colocated.programs.decode_steps
    # pages per row: ceil((length + steps) / 4) rounded up to a power of two, growing call by call
    assert tables[0] == 4 and tables == sorted(tables) and tables[-1] == 16, (tables, steps)
    assert req.output == colocated.generate([[5, 6, 7]], max_new_tokens=40)[0]
