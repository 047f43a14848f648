"""The Pallas backend (kernels/pallas_attention.py) through Pallas' interpreter, against XLA's code.

Op level: the model entry points (attention.gqa_attention over pages and without a cache,
deepseek.mla_attention over paged latents) under a kernels="pallas_interpret" layout equal the same
calls under kernels="xla" (fp32, <= 1e-5 of the largest output), for rows of mixed lengths (empty,
length 1, whole pages, ragged), batch 1, windows (Llama 4's rings and chunked prefill), new tokens
over a cached prefix (T > 1), static and traced layer indices, several key splits, on tp=1 and tp=2.
Engine level: dense Llama, Llama 4 (ring pages) and DeepSeek-V3 (MLA) generate the XLA engine's greedy
tokens and logits on tp=1 and tp=2 (there also prefilling a prompt in chunks over its pages). Also: kernels="auto" picks Pallas only on a GPU platform (faked),
and the kernels lower for CUDA through the Triton lowering (no GPU needed to lower).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infire_jax
from infire_jax import executables
from infire_jax.engine.sampling import SamplingParams
from infire_jax.kernels import cpu, dispatch, pallas_attention
from infire_jax.kv.paged import PagedLayerCache
from infire_jax.loader import make_layout
from infire_jax.models import attention, deepseek
from infire_jax.sharding import Layout, use_layout
from tests.helpers import save_reference
from tests.reference.test_moe_reference import VOCAB, save_moe_reference

PAGE, POOL_PAGES, LAYERS = 4, 40, 2
LENGTHS = [0, 1, 8, 13, 6]  # an empty row, one position, two whole pages, ragged


@pytest.fixture(scope="module")
def layouts():
    return {spec: {k: make_layout(spec, kernels=k) for k in ("xla", "pallas_interpret")} for spec in ("tp=1", "tp=2")}


@pytest.fixture
def kernel_calls(monkeypatch):
    """How often each Pallas kernel was traced (proof that the Pallas path ran, not XLA's): every
    program traced (no executable cache)."""
    monkeypatch.setattr(executables, "executable_cache_dir", lambda: None)
    calls = {"paged": 0, "causal": 0, "paged_rows": 0}  # and the most query rows of a paged call
    for name, fn in (("paged", pallas_attention.paged_attention), ("causal", pallas_attention.causal_attention)):
        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            if _name == "paged":
                calls["paged_rows"] = max(calls["paged_rows"], args[0][0].shape[2])
            return _fn(*args, **kwargs)

        monkeypatch.setattr(pallas_attention, f"{name}_attention", counted)
    return calls


def _pool(rng, lengths, width, heads, *dims):
    """Page pools (LAYERS, POOL_PAGES, heads, PAGE, d) per d and a table giving each row its own pages."""
    pools = [jnp.asarray(rng.normal(size=(LAYERS, POOL_PAGES, heads, PAGE, d)), jnp.float32) for d in dims]
    table = jnp.asarray(rng.permutation(POOL_PAGES)[: len(lengths) * width].reshape(len(lengths), width), jnp.int32)
    return pools, table


def _compare(layouts, spec, fn, *args):
    """fn(*args) jitted under the Pallas-interpret and the XLA layout of a mesh spec."""
    outs = {}
    for kind, layout in layouts[spec].items():
        with use_layout(layout):  # a new function per layout: no trace is shared between the two
            outs[kind] = np.asarray(jax.jit(lambda *a: fn(*a))(*args))
    scale = np.abs(outs["xla"]).max()
    assert np.abs(outs["pallas_interpret"] - outs["xla"]).max() <= 1e-5 * scale, spec
    return outs


@pytest.mark.parametrize(
    "spec,t,window,traced_layer,lengths,kv,g",
    [
        ("tp=1", 1, None, False, LENGTHS, 2, 2),  # decode, a static layer (unrolled layers)
        ("tp=1", 3, 8, True, [14], 2, 2),  # batch 1, a traced layer (a scan over layers), three new tokens
        # over a cached prefix (chunked prefill) crossing into the next window
        ("tp=2", 3, None, False, LENGTHS, 1, 3),  # heads tp does not divide: replicated on both devices
        # (KV heads split over tp: the engine tests on tp=2)
    ],
)
def test_paged_gqa_equals_xla(layouts, kernel_calls, spec, t, window, traced_layer, lengths, kv, g):
    rng = np.random.default_rng(0)
    b, hd = len(lengths), 16
    (k_pages, v_pages), table = _pool(rng, lengths, 4, kv, hd, hd)
    q, k_new, v_new = (jnp.asarray(rng.normal(size=(b, t, n, hd)), jnp.float32) for n in (kv * g, kv, kv))
    start = jnp.asarray(lengths, jnp.int32)

    def attend(q, k_new, v_new, k_pages, v_pages, table, start, layer):
        layer = layer if traced_layer else 1
        kc, vc = PagedLayerCache(k_pages, table, layer), PagedLayerCache(v_pages, table, layer)
        return attention.gqa_attention(q, k_new, v_new, start, kc, vc, window=window)

    _compare(layouts, spec, attend, q, k_new, v_new, k_pages, v_pages, table, start, jnp.int32(1))
    assert kernel_calls["paged"] == 1


def test_paged_attention_key_splits_and_row_blocks(layouts, kernel_calls, monkeypatch):
    """Several key splits, steps per split and blocks of query rows (6 new tokens x 3 heads = 18 rows,
    padded to 32, in blocks of 16), merged: the long-context parameters on tiny shapes."""
    params = pallas_attention.PagedParams(keys_per_step=4, splits=4, rows=16)
    monkeypatch.setitem(pallas_attention.KERNEL_PARAMS, "paged", ((None, params),))
    rng = np.random.default_rng(1)
    lengths = [0, 1, 16, 26, 21]
    (k_pages, v_pages), table = _pool(rng, lengths, 8, 1, 16, 16)
    q, k_new, v_new = (jnp.asarray(rng.normal(size=(5, 6, n, 16)), jnp.float32) for n in (3, 1, 1))

    def attend(q, k_new, v_new, k_pages, v_pages, table, start):
        kc, vc = PagedLayerCache(k_pages, table, 0), PagedLayerCache(v_pages, table, 0)
        return attention.gqa_attention(q, k_new, v_new, start, kc, vc)

    _compare(layouts, "tp=1", attend, q, k_new, v_new, k_pages, v_pages, table, jnp.asarray(lengths, jnp.int32))
    assert kernel_calls["paged"] == 1


@pytest.mark.parametrize("spec,t,lengths", [("tp=1", 1, LENGTHS), ("tp=2", 2, [9])])
def test_paged_latent_equals_xla(layouts, kernel_calls, spec, t, lengths):
    """DeepSeek MLA's absorbed decode over paged latents (latent 32, rope key 8, 4 heads)."""
    rng = np.random.default_rng(2)
    b, h, r, rope, nope, vd = len(lengths), 4, 32, 8, 16, 16
    (c_pages, kr_pages), table = _pool(rng, lengths, 4, 1, r, rope)
    f = lambda *s: jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)  # noqa: E731
    q_nope, q_rope, c_new, kr_new = f(b, t, h, nope), f(b, t, h, rope), f(b, t, r), f(b, t, rope)
    w_uk, w_uv = f(h, nope, r), f(h, vd, r)

    def attend(q_nope, q_rope, c_new, kr_new, c_pages, kr_pages, table, start, layer):
        c, kr = PagedLayerCache(c_pages, table, layer), PagedLayerCache(kr_pages, table, layer)
        return deepseek.mla_attention(q_nope, q_rope, c_new, kr_new, w_uk, w_uv, start, 0.17, c, kr)

    args = (q_nope, q_rope, c_new, kr_new, c_pages, kr_pages, table, jnp.asarray(lengths, jnp.int32), jnp.int32(1))
    _compare(layouts, spec, attend, *args)
    assert kernel_calls["paged"] == 1


@pytest.mark.parametrize("spec,t,window", [("tp=1", 20, None), ("tp=1", 16, 8)])
def test_causal_prefill_equals_xla(layouts, kernel_calls, spec, t, window):
    """A prompt over itself: a length that is no power of two, and Llama 4's chunked layers (the
    window a traced per-layer value), rows starting at different positions. (tp=2: the engines.)"""
    rng = np.random.default_rng(3)
    b, kv, g, hd = 2, 2, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, hd)), jnp.float32) for n in (kv * g, kv, kv))
    start = jnp.asarray([0, 5], jnp.int32)

    def attend(q, k, v, start, window):
        return attention.gqa_attention(q, k, v, start, window=window)

    _compare(layouts, spec, attend, q, k, v, start, None if window is None else jnp.int32(window))
    assert kernel_calls["causal"] == 1


def test_auto_picks_pallas_only_on_a_gpu(monkeypatch):
    """The platform check decides (faked here); the CPU kernels are not built for a GPU program."""
    one_cpu = make_layout("tp=1")
    expected_cpu = "cpu" if cpu.available() else "xla"
    with use_layout(one_cpu):
        assert dispatch.backend() == expected_cpu and not dispatch.pages_in_place()
    with use_layout(make_layout("tp=2")):
        assert dispatch.backend() == "xla"
    with use_layout(make_layout("tp=1", kernels="pallas_interpret")):
        assert dispatch.backend() == "pallas_interpret" and dispatch.pages_in_place()

    def no_build():
        raise AssertionError("the CPU kernels were built for a GPU program")

    monkeypatch.setattr(cpu, "available", no_build)
    monkeypatch.setattr(Layout, "platform", property(lambda self: "gpu"))
    for spec in ("tp=1", "tp=2"):
        with use_layout(make_layout(spec)):
            assert dispatch.backend() == "pallas" and dispatch.pages_in_place()
        with use_layout(make_layout(spec, kernels="xla")):
            assert dispatch.backend() == "xla"
    assert not make_layout("tp=1").cpu_kernels


def test_pallas_needs_a_gpu():
    with pytest.raises(ValueError, match="kernels='pallas' needs GPU devices"):
        make_layout("tp=1", kernels="pallas")


def test_kernels_lower_for_cuda():
    """The same kernels through the Triton lowering (bf16, as on a GPU): array sizes, dot shapes and
    indexing the GPU compiler takes. Lowering only (no GPU here); gpu_check.py runs them."""
    bf = lambda *s: jnp.zeros(s, jnp.bfloat16)  # noqa: E731
    table, start = jnp.zeros((3, 5), jnp.int32), jnp.zeros((3,), jnp.int32)
    cases = {
        "gqa": lambda: pallas_attention.paged_gqa(
            bf(3, 1, 2, 4, 64), bf(3, 1, 2, 64), bf(3, 1, 2, 64), bf(4, 32, 2, 16, 64), bf(4, 32, 2, 16, 64), table, start,
            jnp.int32(2), 8192, None, interpret=False),
        "latent": lambda: pallas_attention.paged_latent(  # 128 heads: blocks of rows; a rope key of 8 values
            bf(3, 1, 128, 512), bf(3, 1, 128, 8), bf(3, 1, 512), bf(3, 1, 8), bf(4, 32, 1, 16, 512),
            bf(4, 32, 1, 16, 8), table, start, jnp.int32(0), 0.1, None, interpret=False),
        "prefill": lambda: pallas_attention.causal_prefill(
            bf(2, 128, 2, 4, 64), bf(2, 128, 2, 64), bf(2, 128, 2, 64), start[:2], jnp.int32(32), None, interpret=False),
    }
    for name, fn in cases.items():
        text = jax.jit(fn).trace().lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text and "infire_" in text, name


def test_gpu_check_lists_its_steps_and_needs_a_gpu(tmp_path):
    repo = pathlib.Path(__file__).resolve().parents[1]
    script, env = str(repo / "experiments" / "gpu_check.py"), dict(os.environ, PYTHONPATH=str(repo))
    dry = subprocess.run([sys.executable, script, "--dry_run", "--meshes=tp=1,tp=2"], capture_output=True, text=True, env=env)
    assert dry.returncode == 0, dry.stderr
    for step in ("devices", "reference/llama4/tp=2", "reference/deepseek_v3/tp=1", "roofline/hbm_copy",
                 "attention/decode/b64/ctx4096", "decode/b1/ctx1024", "prefill/b4/t2048"):
        assert f"  {step}  " in dry.stdout
    out = tmp_path / "check.json"
    run = subprocess.run([sys.executable, script, f"--out={out}"], capture_output=True, text=True, env=env)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("gpu_check failed: no GPU: JAX sees only ['cpu'] devices")
    assert json.loads(out.read_text())["failed"].startswith("no GPU")


# ---- engines: greedy tokens and logits ---------------------------------------------------------

FAMILIES = ("llama", "llama4", "deepseek_v3")
ENGINE = dict(page_size=PAGE, kv_pages=64, max_decode_batch=4, decode_steps=8)
# Mixed lengths in one batch: longer than Llama 4's chunk of 8, one token, exactly one chunk, short.
PROMPTS = [np.random.default_rng(i).integers(1, VOCAB, n).astype(np.int32) for i, n in enumerate((19, 1, 8, 4))]


def _generate(path, **kwargs):
    model = infire_jax.load(path, **(ENGINE | kwargs))
    reqs = model.run_requests(PROMPTS, [SamplingParams(8)] * len(PROMPTS), with_logits=True)
    return [r.output for r in reqs], [np.stack(r.logits) for r in reqs]


@pytest.fixture(scope="module")
def xla_run(tmp_path_factory):
    """Per family (on first use): its checkpoint and the XLA engine's tokens and logits on tp=1."""
    runs = {}

    def get(family):
        if family not in runs:
            path = tmp_path_factory.mktemp(family)
            (save_reference if family == "llama" else save_moe_reference)(family, path)
            runs[family] = path, _generate(path, kernels="xla")
        return runs[family]

    return get


@pytest.mark.parametrize(
    "family,mesh,chunk",
    # dense Llama on tp=2 runs the kernels as Llama 4's global layers do (and the op tests on tp=2). With
    # chunk 16 the prompts go through the chunk program (the 19-token one as 16 + 3 tokens: prefill over a
    # cached prefix, the paged kernel with T > 1 new tokens), not the flash kernel; the XLA reference
    # prefills whole prompts.
    [("llama", "tp=1", None), ("llama4", "tp=1", None), ("llama4", "tp=2", 16), ("deepseek_v3", "tp=1", None),
     ("deepseek_v3", "tp=2", 16)],
)
def test_engine_equals_xla(xla_run, kernel_calls, family, mesh, chunk):
    path, (want_tokens, want_logits) = xla_run(family)
    tokens, logits = _generate(path, mesh=mesh, kernels="pallas_interpret", prefill_chunk=chunk or 512)
    assert kernel_calls["paged"] and bool(kernel_calls["causal"]) == (family != "deepseek_v3" and not chunk)  # MLA: XLA
    assert (kernel_calls["paged_rows"] > 16) == bool(chunk)  # rows of several new tokens: the chunk program ran
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
