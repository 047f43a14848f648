"""Llama 4's chunked-attention layers decode from a ring of one chunk per request (kv/cache.py cache
groups), its global layers from the growing paged cache: against transformers (logits and greedy
tokens over prompts longer than the chunk and generations crossing several chunk boundaries), ring
memory independent of the context, pp/tp meshes and disaggregated prefill -> decode, and continuous
batching with rows joining and leaving (ring pages recycled between requests)."""

import jax
import numpy as np
import pytest

import infire_jax
from infire_jax.engine.build import place_programs
from infire_jax.engine.disagg import DecodeWorker
from infire_jax.engine.sampling import SamplingParams
from infire_jax.kv import cache as kv_cache
from tests.helpers import save_reference, torch_greedy, torch_logits
from tests.reference.test_moe_reference import CONFIGS, VOCAB, save_moe_reference

CHUNK = CONFIGS["llama4"]["attention_chunk_size"]  # 8; layers 0, 1, 3 chunked, layer 2 global
PAGE = 4  # two ring pages per request
ENGINE = dict(page_size=PAGE, kv_pages=64, max_decode_batch=4)
# 19: the ring starts with 3 of the prompt's positions; 5: shorter than a chunk; 8: exactly one chunk
# (the first decoded position opens a new chunk). 32 new tokens cross 4-5 chunk boundaries.
# No token 0 in prompts: torch_greedy passes pad_token_id=0, so HF generate would mask those tokens.
PROMPTS = [np.random.default_rng(i).integers(1, VOCAB, n).tolist() for i, n in enumerate((19, 5, 8))]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama4_ring")
    return out, save_moe_reference("llama4", out)


@pytest.fixture(scope="module")
def model(ref):
    return infire_jax.load(ref[0], **ENGINE)


@pytest.fixture(scope="module")
def expected(ref):
    return [torch_greedy(ref[1], p, 32) for p in PROMPTS]


def test_ring_decode_matches_transformers(ref, model, expected):
    worker = model.engine.decode_workers[0]
    assert [(p.window, p.page_size) for p in worker.pools] == [(None, PAGE), (CHUNK, PAGE)]  # the ring path runs
    reqs = model.run_requests([np.asarray(p, np.int32) for p in PROMPTS], [SamplingParams(32)] * 3, with_logits=True)
    assert [r.output for r in reqs] == expected
    # every decode step's logits against transformers' full-sequence forward at that position
    for prompt, r in zip(PROMPTS, reqs):
        seq = np.asarray([prompt + r.output[:-1]], np.int32)
        want = torch_logits(ref[1], seq)[0, len(prompt) - 1 :]
        got = np.stack(r.logits)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_ring_memory_does_not_grow_with_the_context(model):
    programs = model.programs
    c = model.cfg
    ring_layers = sum(t == "chunked_attention" for t in c.get("layer_types"))
    small, large = (DecodeWorker("d", programs, num_pages=n, page_size=PAGE, max_batch=4) for n in (64, 256))
    for w in (small, large):
        k_full, k_ring = w.k_pages
        assert [v.shape for v in w.v_pages] == [k_full.shape, k_ring.shape]
        # global layers only in the paged cache, chunked layers only in the ring pool
        assert k_full.shape[0] == c.num_layers - ring_layers and k_ring.shape[0] == ring_layers
        assert k_full.shape[1] == w.num_pages and k_ring.shape[1] == 4 * CHUNK // PAGE  # max_batch rings
    assert large.k_pages[0].nbytes == 4 * small.k_pages[0].nbytes
    ring_bytes = 2 * ring_layers * 4 * CHUNK * c.num_kv_heads * c.head_dim * 4  # k + v, 4 rows, fp32
    assert small.k_pages[1].nbytes + small.v_pages[1].nbytes == ring_bytes
    assert large.k_pages[1].nbytes + large.v_pages[1].nbytes == ring_bytes
    # per request: global pages grow with the length, the ring reservation is one chunk at most
    short, long = (small.pages_for(_request(n, 200)) for n in (10, 800))
    assert short[1] == long[1] == CHUNK // PAGE
    steps = small.steps
    assert long[0] == -(-(800 + 200 + steps) // PAGE) > short[0]
    assert kv_cache.Pool(8, PAGE, CHUNK).pages_for(3) == 1  # nor more than the request spans
    # a window that page_size does not divide: ring pages of gcd(window, page_size) positions
    groups = programs.cache_groups
    odd = kv_cache.pools(kv_cache.CacheGroups((None, 12), groups.plan), 10, 8, 3)
    assert [(p.num_pages, p.page_size) for p in odd] == [(10, 8), (3 * 3, 4)] and odd[1].pages_for(1000) == 3


def test_models_without_chunked_layers_keep_one_cache(tmp_path):
    """Other families: no cache groups, one page array per k/v over every layer slot, as before."""
    save_reference("llama", tmp_path)
    programs = place_programs(tmp_path, "tp=1")
    worker = DecodeWorker("d", programs, num_pages=8, page_size=4, max_batch=2)
    assert programs.cache_groups is None and programs.kv_spec().groups == () and len(worker.pools) == 1
    assert isinstance(worker.k_pages, jax.Array) and worker.k_pages.shape == (3, 8, 2, 4, 16)


def _request(prompt_len, new):
    from infire_jax.engine.disagg import Request

    return Request(0, np.zeros(prompt_len, np.int32), SamplingParams(new), 0.0)


def test_continuous_batching_recycles_rings(ref, model):
    """Rows join and leave between dispatches (4 slots for 6 requests); ring pages of finished
    requests are reused by later ones. Every request gets transformers' one-at-a-time greedy tokens."""
    rng = np.random.default_rng(5)
    lengths, news = (23, 3, 12, 30, 9, 17), (20, 28, 12, 24, 16, 8)
    prompts = [rng.integers(1, VOCAB, n).tolist() for n in lengths]
    engine = model.engine
    worker = engine.decode_workers[0]
    batches, ring_owners = [], {}

    def observed_join():  # what each decode call runs with
        type(worker)._join(worker)
        batches.append(tuple(r.id for r in worker.running))
        for r in worker.running:
            pages = worker.pages(r)
            assert len(pages[1]) == CHUNK // PAGE and len(pages[0]) == worker.pages_for(r)[0]
            for page in pages[1]:
                ring_owners.setdefault(page, set()).add(r.id)

    worker._join = observed_join
    try:
        reqs = [engine.submit(p, SamplingParams(n)) for p, n in zip(prompts[:3], news[:3])]
        engine.step()
        reqs += [engine.submit(p, SamplingParams(n)) for p, n in zip(prompts[3:], news[3:])]
        engine.run()
    finally:
        del worker._join
    for r in reqs:
        engine.requests.pop(r.id)
    assert max(map(len, batches)) == 4 and len(set(batches)) > 3  # a full batch whose rows changed
    assert any(len(owners) > 1 for owners in ring_owners.values())  # ring pages moved between requests
    assert worker.kv.idle()
    worker.kv.check()
    assert [r.output for r in reqs] == [torch_greedy(ref[1], p, n) for p, n in zip(prompts, news)]


@pytest.mark.parametrize(
    "meshes", [dict(mesh="pp=2,tp=2"), dict(prefill_mesh="tp=2@0-1", decode_mesh="pp=2@2-3")], ids=["pp2tp2", "disagg"]
)
def test_ring_meshes_and_disaggregation(ref, expected, meshes):
    model = infire_jax.load(ref[0], **meshes, **ENGINE)
    assert model.generate(PROMPTS, max_new_tokens=32) == expected
    if model.disaggregated:  # the pages carry the global layer's prompt and the rings' last chunk
        c = model.cfg
        stats = model.engine.stats()
        per_position = 2 * c.num_kv_heads * c.head_dim * 4  # k + v, fp32
        prompt_pages = sum(-(-len(p) // PAGE) for p in PROMPTS)  # every prompt page of the global layer
        ring_pages = sum(min(-(-len(p) // PAGE), CHUNK // PAGE) for p in PROMPTS)  # each row's ring
        assert stats["transfers"] == 1 and stats["kv_pages_transferred"] == prompt_pages
        assert stats["transfer_bytes"] == per_position * PAGE * (1 * prompt_pages + 3 * ring_pages)
