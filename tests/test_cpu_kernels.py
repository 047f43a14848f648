"""infire_jax's CPU decode kernels (kernels/cpu.py) and where model code uses them."""

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infire_jax.kernels import cpu
from infire_jax.kv.paged import PagedLayerCache
from infire_jax.models.attention import gqa_attention
from infire_jax.mesh import make_mesh
from infire_jax.models import layers
from infire_jax.sharding import Layout, use_layout

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the kernels cannot be built")


@pytest.mark.parametrize(
    "m,k,n",
    [(1, 576, 960), (2, 64, 13), (3, 17, 8), (4, 576, 3072), (5, 100, 9), (16, 1536, 576), (31, 40, 129), (32, 8, 1)],
)
def test_matches_float64_reference(m, k, n):
    """Every tile shape and remainder: rows not a multiple of the row tile, weight rows not a
    multiple of the column tile, K not a multiple of the vector width."""
    rng = np.random.default_rng(m * 1000 + n)
    x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((n, k), np.float32)
    y = np.asarray(jax.jit(cpu.matmul_nt)(x, w))
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6 * np.sqrt(k) * np.abs(ref).max())


@pytest.mark.parametrize("m,k,n", [(1, 576, 960), (4, 100, 13), (16, 64, 49)])
def test_bf16_weights_are_widened_exactly(m, k, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((m, k), np.float32)
    w = jnp.asarray(rng.standard_normal((n, k), np.float32), jnp.bfloat16)
    y = np.asarray(jax.jit(cpu.matmul_nt)(x, w))
    ref = x.astype(np.float64) @ np.asarray(w.astype(jnp.float32), np.float64).T  # the exact bf16 values
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6 * np.sqrt(k) * np.abs(ref).max())


def test_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="float32 x"):
        cpu.matmul_nt(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((4, 3), jnp.bfloat16))
    with pytest.raises(ValueError, match="float32 or bfloat16 w"):
        cpu.matmul_nt(jnp.ones((2, 3)), jnp.ones((4, 3), jnp.float16))
    with pytest.raises(ValueError, match="w \\(N, K\\)"):
        cpu.matmul_nt(jnp.ones((2, 3)), jnp.ones((4, 5)))


def _dense_hlo(layout, rows: int, w_dtype=jnp.float32) -> str:
    x = jax.ShapeDtypeStruct((rows, 1, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((2, 48, 64), w_dtype)

    def f(x, w):
        with use_layout(layout):
            return layers.dense(x, w, "btd,gfd->btgf")

    return jax.jit(f).lower(x, w).as_text()


def test_dense_uses_the_kernel_only_where_it_pays():
    one_cpu = Layout(make_mesh("tp=1"))
    uses = lambda hlo: "infire_matmul_nt" in hlo  # noqa: E731
    assert uses(_dense_hlo(one_cpu, 1)) and uses(_dense_hlo(one_cpu, cpu.MATMUL_MAX_ROWS))
    assert not uses(_dense_hlo(one_cpu, cpu.MATMUL_MAX_ROWS + 1))  # prefill-sized: XLA's dot is faster
    assert uses(_dense_hlo(one_cpu, 4, jnp.bfloat16))  # read as stored, widened in registers
    assert uses(_dense_hlo(one_cpu, cpu.MATMUL_MAX_ROWS_BF16, jnp.bfloat16))  # XLA would widen a copy first
    assert not uses(_dense_hlo(one_cpu, cpu.MATMUL_MAX_ROWS_BF16 + 1, jnp.bfloat16))
    assert not uses(_dense_hlo(one_cpu, 4, jnp.float16))  # no kernel for it: XLA
    assert not uses(_dense_hlo(Layout(make_mesh("tp=1"), kernels="xla"), 4))
    assert not uses(_dense_hlo(Layout(make_mesh("tp=2")), 4))  # sharded weights: not partitioned
    assert not uses(_dense_hlo(None, 4))


def test_dense_gives_the_same_values_either_way():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 2, 64), np.float32), rng.standard_normal((2, 48, 64), np.float32)
    out = {}
    for kernels in ("auto", "xla"):
        layout = Layout(make_mesh("tp=1"), kernels=kernels)
        with use_layout(layout):
            out[kernels] = np.asarray(jax.jit(lambda x, w: layers.dense(x, w, "btd,gfd->btgf"))(x, w))
    assert out["auto"].shape == (3, 2, 2, 48)
    np.testing.assert_allclose(out["auto"], out["xla"], rtol=1e-5, atol=1e-5)


def test_unknown_kernels_choice_is_refused():
    with pytest.raises(ValueError, match="unknown kernels 'fast'.*auto"):
        Layout(make_mesh("tp=1"), kernels="fast")


def test_without_a_compiler_it_warns_once_and_keeps_xla(monkeypatch):
    monkeypatch.setattr(cpu, "_compiler", lambda: None)
    cpu.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler.*XLA's own code"):
            assert not cpu.available()
        assert "infire_matmul_nt" not in _dense_hlo(Layout(make_mesh("tp=1")), 4)
    finally:
        monkeypatch.undo()
        cpu.available.cache_clear()
        assert cpu.available()


def test_builds_from_source_into_an_empty_cache(monkeypatch, tmp_path):
    """The first use on a machine compiles the kernels (here into an empty cache directory)."""
    monkeypatch.setattr(cpu, "_cache_dir", lambda: tmp_path)
    path = cpu.ensure_built()
    assert path.parent == tmp_path and path.name.startswith("cpu_kernels-") and path.suffix == ".so"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind
    lib = ctypes.cdll.LoadLibrary(str(path))
    assert all(hasattr(lib, name) for name in cpu._TARGETS.values())
    assert cpu.ensure_built() == path  # cached: built once per machine


def _paged_case(seed: int, b=3, kv=2, g=3, hd=24, page=4, num_pages=12, layers_=2, width=4):
    """A pool with rows of different lengths (0, inside a page, across pages, the full table)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s, np.float32)  # noqa: E731
    q, k_new, v_new = f(b, 1, kv * g, hd), f(b, 1, kv, hd), f(b, 1, kv, hd)
    k_pages, v_pages = f(layers_, num_pages, kv, page, hd), f(layers_, num_pages, kv, page, hd)
    table = rng.permutation(num_pages)[: b * width].reshape(b, width).astype(np.int32)
    start = np.array([0, 6, page * width][:b], np.int32)
    return q, k_new, v_new, k_pages, v_pages, table, start


@pytest.mark.parametrize("layer", [0, 1])
def test_paged_attention_equals_attention_over_the_gathered_cache(layer):
    q, k_new, v_new, k_pages, v_pages, table, start = _paged_case(layer)
    views = [PagedLayerCache(jnp.asarray(p), jnp.asarray(table), layer) for p in (k_pages, v_pages)]
    want = gqa_attention(q, k_new, v_new, start, views[0].gather(), views[1].gather())  # XLA, no layout

    def paged(q, k_new, v_new, start, k_pages, v_pages, table):
        with use_layout(Layout(make_mesh("tp=1"))):
            views = PagedLayerCache(k_pages, table, layer), PagedLayerCache(v_pages, table, layer)
            return gqa_attention(q, k_new, v_new, start, *views)

    args = (q, k_new, v_new, start, k_pages, v_pages, table)
    assert "infire_paged_decode_attention" in jax.jit(paged).lower(*args).as_text()
    np.testing.assert_allclose(np.asarray(jax.jit(paged)(*args)), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hd,g", [(64, 3), (20, 5)])
def test_paged_attention_over_long_rows_matches_float64(hd, g):
    """Rows long enough to be split into chunks of pages over the threads (their softmaxes merged),
    next to an empty row and a one-position row; a head dim with a scalar tail: float64 attention."""
    rng = np.random.default_rng(hd)
    b, kv, page, width, layers_ = 4, 2, 4, 24, 2
    num_pages = b * width + 3
    f = lambda *s: rng.standard_normal(s, np.float32)  # noqa: E731
    q, k_new, v_new = f(b, kv, g, hd) / np.sqrt(hd), f(b, kv, hd), f(b, kv, hd)
    k_pages, v_pages = f(layers_, num_pages, kv, page, hd), f(layers_, num_pages, kv, page, hd)
    table = rng.permutation(num_pages)[: b * width].reshape(b, width).astype(np.int32)
    start = np.array([page * width, 0, 1, page * width - 3], np.int32)
    got = np.asarray(jax.jit(cpu.paged_decode_attention, static_argnums=7)(q, k_new, v_new, k_pages, v_pages, table, start, 1))
    want = np.zeros(q.shape)
    for r in range(b):
        for h in range(kv):
            pos = np.arange(start[r])
            keys = np.concatenate([k_pages[1, table[r, pos // page], h, pos % page], k_new[r, h][None]]).astype(np.float64)
            vals = np.concatenate([v_pages[1, table[r, pos // page], h, pos % page], v_new[r, h][None]]).astype(np.float64)
            scores = q[r, h].astype(np.float64) @ keys.T
            p = np.exp(scores - scores.max(-1, keepdims=True))
            want[r, h] = (p / p.sum(-1, keepdims=True)) @ vals
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_paged_attention_refuses_a_page_outside_the_pool():
    q, k_new, v_new, k_pages, v_pages, table, start = _paged_case(0)
    table[1, 0] = k_pages.shape[1]  # row 1 sees 6 positions: its first page must exist
    args = [jnp.asarray(a) for a in (q.reshape(3, 2, 3, 24), k_new, v_new, k_pages, v_pages, table, start)]
    with pytest.raises(Exception, match="page table entry .* out of range"):
        jax.block_until_ready(jax.jit(cpu.paged_decode_attention, static_argnums=7)(*args, 0))
    with pytest.raises(ValueError, match="outside the pool's 2 layers"):
        cpu.paged_decode_attention(*args, 2)


def _causal_float64(q, k, v):
    """Causal attention of a prompt over itself in float64: q (B, T, KV, G, hd), k / v (B, T, KV, hd)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    t = q.shape[1]
    s = np.einsum("btkgd,bskd->bkgts", q, k)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bkgts,bskd->btkgd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize(
    "b,t,kv,g,hd",
    [(1, 1, 1, 1, 8), (1, 5, 1, 2, 20), (2, 37, 3, 3, 64), (1, 130, 2, 4, 24), (1, 300, 1, 5, 128)],
)
def test_causal_prefill_attention_matches_float64(b, t, kv, g, hd):
    """Single positions, partial query tiles and key steps, several query heads per KV head, head
    dims with one-vector and scalar tails, and a prompt long enough for several key steps."""
    rng = np.random.default_rng(t)
    q = rng.standard_normal((b, t, kv, g, hd), np.float32) / np.sqrt(hd)
    k, v = rng.standard_normal((b, t, kv, hd), np.float32), rng.standard_normal((b, t, kv, hd), np.float32)
    got = np.asarray(jax.jit(cpu.causal_prefill_attention)(q, k, v))
    np.testing.assert_allclose(got, _causal_float64(q, k, v), rtol=2e-5, atol=2e-6)


def test_causal_prefill_attention_refuses_bad_operands():
    q, kv = jnp.zeros((1, 4, 2, 3, 8)), jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"q \(B, T, KV, G, hd\) and k, v \(B, T, KV, hd\)"):
        cpu.causal_prefill_attention(q, kv[:, :3], kv[:, :3])
    with pytest.raises(ValueError, match="float32 q, k, v"):
        cpu.causal_prefill_attention(q.astype(jnp.bfloat16), kv, kv)


def test_prefill_attention_uses_the_kernel_where_it_applies():
    """A prompt with no cache takes the kernel on a one-CPU layout (same values as XLA's blocked
    attention); a windowed layer, a cache or kernels="xla" keep XLA."""
    rng = np.random.default_rng(1)
    b, t, h, kv, hd = 2, 40, 6, 2, 16
    q = jnp.asarray(rng.standard_normal((b, t, h, hd), np.float32) / 4)
    k, v = (jnp.asarray(rng.standard_normal((b, t, kv, hd), np.float32)) for _ in range(2))
    start = jnp.zeros((b,), jnp.int32)

    def run(kernels, **kw):
        with use_layout(Layout(make_mesh("tp=1"), kernels=kernels)):
            f = jax.jit(lambda q, k, v, s: gqa_attention(q, k, v, s, **kw))
            return f.lower(q, k, v, start).as_text(), np.asarray(f(q, k, v, start))

    hlo, got = run("auto")
    assert "infire_causal_prefill_attention" in hlo
    hlo_xla, want = run("xla")
    assert "infire_causal_prefill_attention" not in hlo_xla
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert "infire_causal_prefill_attention" not in run("auto", window=8)[0]


def _paged_chunk_case(seed, b, t, kv, g, hd, page, width, starts, layers_=2):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s, np.float32)  # noqa: E731
    num_pages = b * width + 3
    q, k_new, v_new = f(b, t, kv, g, hd) / np.sqrt(hd), f(b, t, kv, hd), f(b, t, kv, hd)
    k_pages, v_pages = f(layers_, num_pages, kv, page, hd), f(layers_, num_pages, kv, page, hd)
    table = rng.permutation(num_pages)[: b * width].reshape(b, width).astype(np.int32)
    return q, k_new, v_new, k_pages, v_pages, table, np.asarray(starts, np.int32)


@pytest.mark.parametrize(
    "b,t,kv,g,hd,page,width,starts",
    [(3, 37, 2, 3, 64, 4, 24, [0, 6, 50]), (2, 5, 1, 5, 20, 16, 8, [100, 128]), (1, 300, 3, 3, 64, 16, 40, [330])],
)
def test_paged_prefill_attention_matches_float64(b, t, kv, g, hd, page, width, starts):
    """A chunk after a cached prefix read from the pages: no prefix, one inside a page, a full table,
    partial key steps and query tiles, a head dim with a scalar tail, a prefix longer than the chunk."""
    q, k_new, v_new, k_pages, v_pages, table, start = _paged_chunk_case(t, b, t, kv, g, hd, page, width, starts)
    got = np.asarray(jax.jit(cpu.paged_prefill_attention, static_argnums=7)(q, k_new, v_new, k_pages, v_pages, table, start, 1))
    want = np.zeros(q.shape)
    for r in range(b):
        pos = np.arange(start[r])
        for h in range(kv):
            keys = np.concatenate([k_pages[1, table[r, pos // page], h, pos % page], k_new[r, :, h]]).astype(np.float64)
            vals = np.concatenate([v_pages[1, table[r, pos // page], h, pos % page], v_new[r, :, h]]).astype(np.float64)
            scores = np.einsum("tgd,sd->tgs", q[r, :, h].astype(np.float64), keys)
            visible = np.arange(len(keys))[None, :] <= start[r] + np.arange(t)[:, None]  # cached + causal
            scores = np.where(visible[:, None], scores, -np.inf)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            want[r, :, h] = np.einsum("tgs,sd->tgd", p / p.sum(-1, keepdims=True), vals)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_paged_prefill_attention_refuses_bad_operands():
    q, k_new, v_new, k_pages, v_pages, table, start = _paged_chunk_case(0, 2, 5, 2, 3, 16, 4, 4, [6, 0])
    table[0, 1] = k_pages.shape[1]  # row 0's cached positions 4 and 5 sit in a page outside the pool
    with pytest.raises(Exception, match="page table entry for a cached position is out of range"):
        jax.block_until_ready(jax.jit(cpu.paged_prefill_attention, static_argnums=7)(q, k_new, v_new, k_pages, v_pages, table, start, 0))
    with pytest.raises(ValueError, match="outside the pool's 2 layers"):
        cpu.paged_prefill_attention(q, k_new, v_new, k_pages, v_pages, table, start, 2)
    with pytest.raises(ValueError, match=r"q \(B, T, KV, G, hd\) and k_new, v_new \(B, T, KV, hd\)"):
        cpu.paged_prefill_attention(q, k_new[:, :4], v_new[:, :4], k_pages, v_pages, table, start, 0)


def test_chunk_attention_over_pages_uses_the_kernel():
    """Several new tokens over a paged cache take the kernel on a one-CPU layout, with XLA's values
    (the pages gathered); a windowed layer keeps XLA."""
    q, k_new, v_new, k_pages, v_pages, table, start = _paged_chunk_case(3, 2, 9, 2, 3, 16, 4, 5, [7, 13])
    q = q.reshape(2, 9, 6, 16)

    def run(kernels, window=None):
        def attend(q, k_new, v_new, k_pages, v_pages, table, start):
            with use_layout(Layout(make_mesh("tp=1"), kernels=kernels)):
                views = PagedLayerCache(k_pages, table, 1), PagedLayerCache(v_pages, table, 1)
                return gqa_attention(q, k_new, v_new, start, *views, window=window)

        args = (q, k_new, v_new, k_pages, v_pages, table, start)
        return jax.jit(attend).lower(*args).as_text(), np.asarray(jax.jit(attend)(*args))

    hlo, got = run("auto")
    assert "infire_paged_prefill_attention" in hlo
    hlo_xla, want = run("xla")
    assert "infire_paged_prefill_attention" not in hlo_xla
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert "infire_paged_prefill_attention" not in run("auto", window=8)[0]


def test_bf16_embedding_rows_are_widened_exactly():
    table = jnp.asarray(np.random.default_rng(0).standard_normal((50, 24), np.float32), jnp.bfloat16)
    tokens = jnp.asarray([[3, 0, 49], [7, 7, 12]], jnp.int32)
    want = np.asarray(table.astype(jnp.float32))[np.asarray(tokens)]
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu.embed_rows_bf16)(table, tokens)), want)
    with use_layout(Layout(make_mesh("tp=1"))):
        hlo = jax.jit(lambda t, i: layers.embed_lookup(t, i, jnp.float32)).lower(table, tokens).as_text()
    assert "infire_embed_rows_bf16" in hlo
    with pytest.raises(Exception, match="token id is outside the table"):
        jax.block_until_ready(jax.jit(cpu.embed_rows_bf16)(table, jnp.asarray([50], jnp.int32)))


def _palette12_case(n: int, segments: int, s: int, seed: int, outliers: float = 0.02):
    """bf16 bit patterns (n, segments * s) and their blocked palette12 form; `outliers` of the
    weights scaled by 2**-20..2**-40 so their exponents miss the palette (escapes)."""
    from infire_jax.compression import codec

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, segments, s)).astype(np.float32) * 0.02
    mask = rng.random(w.shape) < outliers
    w[mask] *= np.exp2(-rng.integers(20, 40, size=int(mask.sum()))).astype(np.float32)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16)
    enc = codec.encode_palette12_blocks(*codec.split_bits(bits), (1, 1, 1))
    operands = (enc["packed_idx"].reshape(n, -1), enc["sign_mant"].reshape(n, -1), enc["palette"],
                enc["escape_idx"][0].astype(np.int32), enc["escape_val"][0])
    return bits.reshape(n, -1), tuple(map(jnp.asarray, operands)), enc


@pytest.mark.parametrize(
    "m,n,segments,s",
    # segments of 64 (a head_dim-split projection), halves not a multiple of 16 or of the vector
    # width, an odd segment, panels with rows left over, few rows of x and many
    # (decoded in bf16 panels below 8 rows, widened to float32 panels from 8), chunks of many panels
    [(1, 24, 1, 576), (3, 17, 9, 64), (5, 9, 1, 37), (2, 13, 3, 20), (16, 40, 1, 1536), (33, 11, 2, 100), (5, 600, 1, 64),
     (9, 600, 2, 32)],
)
def test_palette12_weights_give_the_bf16_result_bit_for_bit(m, n, segments, s):
    bits, operands, enc = _palette12_case(n, segments, s, seed=m * 100 + s)
    assert operands[3].size > 0  # escapes exercised
    x = jnp.asarray(np.random.default_rng(s).standard_normal((m, segments * s), np.float32))
    want = np.asarray(jax.jit(cpu.matmul_nt)(x, jnp.asarray(bits).view(jnp.bfloat16)))
    got = np.asarray(jax.jit(cpu.matmul_nt_palette12, static_argnums=6)(x, *operands, s))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_palette12_kernel_refuses_bad_operands():
    _, (packed, sm, palette, esc_idx, esc_val), _ = _palette12_case(8, 1, 64, seed=1, outliers=0.05)
    x = jnp.ones((2, 64), jnp.float32)
    with pytest.raises(ValueError, match="S = segment dividing K"):
        cpu.matmul_nt_palette12(x, packed, sm, palette, esc_idx, esc_val, 48)
    with pytest.raises(ValueError, match="int32 escape_idx"):
        cpu.matmul_nt_palette12(x, packed, sm, palette, esc_idx.astype(jnp.int16), esc_val, 64)
    unsorted = esc_idx[::-1]
    with pytest.raises(Exception, match="escape indices must be non-negative and sorted"):
        jax.block_until_ready(jax.jit(cpu.matmul_nt_palette12, static_argnums=6)(x, packed, sm, palette, unsorted, esc_val, 64))


def test_dense_decodes_a_compressed_weight_inside_the_kernel():
    """layers.dense hands a one-device palette12 weight (the compressed checkpoint's runtime form)
    to the fused kernel as stored: the same bits as the bf16 weight through the bf16 kernel."""
    from infire_jax.compression.jax_decode import Palette12Weight

    bits, _, enc = _palette12_case(2 * 48, 1, 64, seed=3)
    mesh = make_mesh("tp=1")
    leaves = dict(
        packed_idx=enc["packed_idx"].reshape(2, 48, 32), sign_mant=enc["sign_mant"].reshape(2, 48, 64),
        palette=enc["palette"], escape_idx=enc["escape_idx"][0][None].astype(np.int32), escape_val=enc["escape_val"][0][None],
    )
    w = Palette12Weight(**{k: jnp.asarray(v) for k, v in leaves.items()}, nibble_layout="halves", perm=(0, 1, 2),
                        block_spec=(None, None, None), mesh=mesh)
    w_bf16 = jnp.asarray(bits.reshape(2, 48, 64)).view(jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 1, 64), np.float32))

    def run(kernels, weight):
        with use_layout(Layout(mesh, kernels=kernels)):
            f = jax.jit(lambda x, w: layers.dense(x, w, "btd,gfd->btgf"))
            return f.lower(x, weight).as_text(), np.asarray(f(x, weight))

    hlo, got = run("auto", w)
    assert "infire_matmul_nt_palette12" in hlo
    np.testing.assert_array_equal(got.view(np.uint32), run("auto", w_bf16)[1].view(np.uint32))
    hlo, xla = run("xla", w)  # decoded to float32 by XLA, then XLA's dot: same values, other sums
    assert "infire_matmul" not in hlo
    np.testing.assert_allclose(got, xla, rtol=1e-5, atol=1e-6)
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), w)  # (layers, ...): not a one-slice weight
    assert stacked.as_rows(1) is None
