"""Prefill over a cached prefix (Programs.chunk_fn): a prompt run as chunks of 16, of 64, or as a cached
prefix (whole-prompt prefill + insert) plus the rest gives the whole-prompt prefill's first token and
logits, and its pages decode the same continuation, for dense Llama/Qwen3, Llama 4 (ring layers, prompts
crossing the attention-chunk boundary) and DeepSeek MLA, on tp=1, tp=2 and pp=2. Temperature sampling
with a seed draws the same tokens. The programs are driven directly: pages allocated, tables filled and
chunks chained here, as the engine does."""

from __future__ import annotations

import numpy as np
import pytest

from infire_jax.loader import make_layout, place_model
from infire_jax.engine.programs import Programs, bucket
from infire_jax.engine.sampling import SamplingParams, pack_params
from infire_jax.kv import cache as kv_cache

PAGE = 4
STEPS = 4  # decode steps after the first token
ROWS = 2  # prompts per batch (padded to the layout's batch bucket)


class Driver:
    """Pages for `ROWS` rows of up to `max_len` positions on one Programs, and the two ways to fill them."""

    def __init__(self, programs: Programs, max_len: int):
        self.p = programs
        self.b = programs.batch_bucket(ROWS)
        self.pools = kv_cache.pools(programs.cache_groups, self.b * -(-max_len // PAGE), PAGE, self.b)
        # row r owns the r-th run of pages of every pool (a ring: its window's worth)
        self.per_row = [pool.pages_for(max_len) for pool in self.pools]
        self.tables = [np.arange(self.b * n, dtype=np.int32).reshape(self.b, n) for n in self.per_row]
        self.geometry = programs.pack([q.num_pages for q in self.pools]), programs.pack([q.page_size for q in self.pools])

    def fresh_pages(self):
        return self.p.allocate_pages(*self.geometry)

    def _table(self):
        return self.p.pack([np.asarray(t) for t in self.tables])

    def prefill(self, prompts, params, pages=None):
        """Whole-prompt prefill + canonical KV + insert -> (first tokens, logits, pages)."""
        p, b = self.p, self.b
        lengths = np.array([len(x) for x in prompts] + [1] * (b - len(prompts)), np.int32)
        t = bucket(int(lengths.max()), 16)
        tokens = np.zeros((b, t), np.int32)
        for i, x in enumerate(prompts):
            tokens[i, : len(x)] = x
        lens = p.put(lengths, ("batch",))
        first, logits, k, v = p.prefill_fn(b, t)(p.placed.state, p.put(tokens, ("batch", "seq")), lens, p.put_sampling(pack_params(params, b)))
        kv = p.canonical_kv_fn(b, t)(k, v, lens)
        ids = []
        for pool, table in zip(self.pools, self.tables):
            n = pool.seq(t) // pool.page_size
            full = np.full((b, n), pool.num_pages, np.int32)
            full[: len(prompts), : min(n, table.shape[1])] = table[: len(prompts), :n]
            ids.append(full)
        pages = pages or self.fresh_pages()
        k_pages, v_pages = p.insert_fn(b, t, *self.geometry)(*pages, kv, p.pack(ids))
        return np.asarray(first)[: len(prompts)], np.asarray(logits)[: len(prompts)], (k_pages, v_pages)

    def chunks(self, prompts, params, size, done=None, pages=None):
        """The prompts from position done[r] on (0: from scratch) as chunks of `size` tokens; every row
        takes its next chunk in each call (rows already through are padding rows, n_new = 0)."""
        p, b = self.p, self.b
        done = list(done or [0] * len(prompts))
        pages = pages or self.fresh_pages()
        c = bucket(size)
        fn = p.chunk_fn(b, c, p.pack(self.per_row), *self.geometry, with_logits=True)
        sp = {k: p.put(v, ("batch",)) for k, v in pack_params(params, b).items()}
        first, logits = [None] * len(prompts), [None] * len(prompts)
        while any(d < len(x) for d, x in zip(done, prompts)):
            start, n_new, tokens = np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros((b, c), np.int32)
            for r, x in enumerate(prompts):
                n = min(size, len(x) - done[r])
                start[r], n_new[r] = done[r], n
                tokens[r, :n] = x[done[r] : done[r] + n]
            tok, lg, *pages = fn(p.placed.state, *pages, self._table(), start, n_new, tokens, sp)
            tok, lg = np.asarray(tok), np.asarray(lg)
            for r, x in enumerate(prompts):
                if n_new[r] and done[r] + n_new[r] == len(x):
                    first[r], logits[r] = tok[r], lg[r]
                done[r] += int(n_new[r])
        return np.asarray(first), np.stack(logits), tuple(pages)

    def decode(self, prompts, first, pages, params):
        """STEPS decode steps from the pages after each prompt's first token."""
        p, b = self.p, self.b
        lengths, tokens, active = np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, bool)
        for r, x in enumerate(prompts):
            lengths[r], tokens[r], active[r] = len(x), first[r], True
        fn = p.decode_fn(b, p.pack(self.per_row), *self.geometry, STEPS)
        out, *_ = fn(p.placed.state, *pages, self._table(), lengths, tokens, active, pack_params(params, b))
        return np.asarray(out)[:, : len(prompts)].T


def visible_kv(drv: Driver, pages, lengths) -> list[np.ndarray]:
    """What decode reads of each row's pages after `lengths` positions, per pool and k/v: the real
    layers' entries (not pipeline padding), positions < length, a ring's slots of the current window."""
    out = []
    layers = [positions for _, positions, _ in drv.p._group_layers()]
    for pool, table, k, v, real in zip(drv.pools, drv.tables, drv.p.unpack(pages[0]), drv.p.unpack(pages[1]), layers):
        for x in (np.asarray(k)[real], np.asarray(v)[real]):
            for r, n in enumerate(lengths):
                rows = x[:, table[r]].transpose(0, 2, 1, 3, 4).reshape(x.shape[0], x.shape[2], -1, x.shape[4])
                out.append(rows[:, :, : (n if pool.window is None else n % pool.window)])
    return out


def check_family(programs: Programs, prompts, prefix, *, decode=True, temperature=0.0):
    """The prompts as chunks of 16 and of 64 from position 0, and after a cached prefix of prefix[r]
    tokens (whole-prompt prefill + insert) as one chunk and as chunks of 16, against the whole-prompt
    prefill: same first token, logits and KV within float32 tolerance, (decode) same next tokens."""
    params = [SamplingParams(STEPS + 1, temperature=temperature, seed=7 + r) for r in range(len(prompts))]
    lengths = [len(x) for x in prompts]
    drv = Driver(programs, max(lengths) + STEPS + 1)
    want_first, want_logits, want_pages = drv.prefill(prompts, params)
    want_kv = visible_kv(drv, want_pages, lengths)
    want_tokens = drv.decode(prompts, want_first, want_pages, params) if decode else None
    rest = max(n - m for n, m in zip(lengths, prefix))
    runs = {f"chunks of {size}": dict(size=size) for size in (16, 64)}
    runs |= {f"cached prefix + {size}": dict(size=size, done=prefix) for size in (16, rest)}
    scale = np.abs(want_logits).max()
    for name, run in runs.items():
        cached = drv.prefill([x[:n] for x, n in zip(prompts, prefix)], params)[2] if "done" in run else None
        first, logits, pages = drv.chunks(prompts, params, pages=cached, **run)
        assert np.abs(logits - want_logits).max() <= 2e-5 * scale, name
        assert first.tolist() == want_first.tolist(), name
        for got, want in zip(visible_kv(drv, pages, lengths), want_kv):
            assert np.abs(got - want).max(initial=0.0) <= 2e-5 * max(1.0, np.abs(want).max(initial=0.0)), name
        if decode:
            assert drv.decode(prompts, first, pages, params).tolist() == want_tokens.tolist(), name


# 120 tokens: chunks of 64 take two calls; a 69-token prefix (mid-window for Llama 4's 8-position ring
# layers: 69 = 8 * 8 + 5) leaves a 51-token rest, one chunk of the 64 bucket or 16-token chunks that
# cross window boundaries. Row 2 is shorter: its padding columns and, once through, n_new = 0 rows run
# along. (All prefills share one 128-position bucket and all chunks two buckets: few compiles.)
PROMPTS = [np.random.default_rng(i).integers(3, 150, n).tolist() for i, n in enumerate((120, 23))]
PREFIX = (69, 5)
CASES = [  # (checkpoint, mesh): every family on one device, each layout with a dense, a ring and an MLA model
    ("tiny-llama", "tp=1"), ("tiny-qwen3", "tp=1"), ("llama4", "tp=1"), ("deepseek_v3", "tp=1"),
    ("tiny-llama", "tp=2"), ("tiny-llama", "pp=2"), ("llama4", "pp=2,tp=2"), ("deepseek_v3", "pp=2,tp=2"),
]


@pytest.mark.parametrize("name, mesh", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_chunks_match_the_whole_prompt_prefill(checkpoints, name, mesh):
    programs = Programs(place_model(checkpoints(name), make_layout(mesh)))
    one_device = mesh == "tp=1"
    check_family(programs, PROMPTS, PREFIX, decode=name == "tiny-llama" and one_device)
    if name == "tiny-llama" and one_device:  # the same programs, drawing with a temperature and seeds
        check_family(programs, PROMPTS, PREFIX, temperature=0.8)
