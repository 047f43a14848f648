"""The CPU small-row matmul kernel (kernels/cpu_matmul.py) and where models.layers.dense uses it."""

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infire_jax.kernels import cpu_matmul
from infire_jax.mesh import make_mesh
from infire_jax.models import layers
from infire_jax.sharding import Layout, use_layout

pytestmark = pytest.mark.skipif(not cpu_matmul.available(), reason="no C++ compiler: the kernel cannot be built")


@pytest.mark.parametrize(
    "m,k,n",
    [(1, 576, 960), (2, 64, 13), (3, 17, 8), (4, 576, 3072), (5, 100, 9), (16, 1536, 576), (31, 40, 129), (32, 8, 1)],
)
def test_matches_float64_reference(m, k, n):
    """Every tile shape and remainder: rows not a multiple of the row tile, weight rows not a
    multiple of the column tile, K not a multiple of the vector width."""
    rng = np.random.default_rng(m * 1000 + n)
    x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((n, k), np.float32)
    y = np.asarray(jax.jit(cpu_matmul.matmul_nt)(x, w))
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6 * np.sqrt(k) * np.abs(ref).max())


def test_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="float32 x"):
        cpu_matmul.matmul_nt(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((4, 3), jnp.bfloat16))
    with pytest.raises(ValueError, match="w \\(N, K\\)"):
        cpu_matmul.matmul_nt(jnp.ones((2, 3)), jnp.ones((4, 5)))


def _dense_hlo(layout, rows: int, w_dtype=jnp.float32) -> str:
    x = jax.ShapeDtypeStruct((rows, 1, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((2, 48, 64), w_dtype)

    def f(x, w):
        with use_layout(layout):
            return layers.dense(x, w, "btd,gfd->btgf")

    return jax.jit(f).lower(x, w).as_text()


def test_dense_uses_the_kernel_only_where_it_pays():
    one_cpu = Layout(make_mesh("tp=1"))
    uses = lambda hlo: cpu_matmul._TARGET in hlo  # noqa: E731
    assert uses(_dense_hlo(one_cpu, 1)) and uses(_dense_hlo(one_cpu, cpu_matmul.MAX_ROWS))
    assert not uses(_dense_hlo(one_cpu, cpu_matmul.MAX_ROWS + 1))  # prefill-sized: XLA's dot is faster
    assert not uses(_dense_hlo(one_cpu, 4, jnp.bfloat16))  # XLA fuses the bf16 upcast into its dot
    assert not uses(_dense_hlo(Layout(make_mesh("tp=1"), matmul="xla"), 4))
    assert not uses(_dense_hlo(Layout(make_mesh("tp=2")), 4))  # sharded weights: not partitioned
    assert not uses(_dense_hlo(None, 4))


def test_dense_gives_the_same_values_either_way():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 2, 64), np.float32), rng.standard_normal((2, 48, 64), np.float32)
    out = {}
    for matmul in ("auto", "xla"):
        layout = Layout(make_mesh("tp=1"), matmul=matmul)
        with use_layout(layout):
            out[matmul] = np.asarray(jax.jit(lambda x, w: layers.dense(x, w, "btd,gfd->btgf"))(x, w))
    assert out["auto"].shape == (3, 2, 2, 48)
    np.testing.assert_allclose(out["auto"], out["xla"], rtol=1e-5, atol=1e-5)


def test_unknown_matmul_choice_is_refused():
    with pytest.raises(ValueError, match="unknown matmul 'fast'.*auto"):
        Layout(make_mesh("tp=1"), matmul="fast")


def test_without_a_compiler_it_warns_once_and_keeps_xla(monkeypatch):
    monkeypatch.setattr(cpu_matmul, "_compiler", lambda: None)
    cpu_matmul.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler.*XLA's dot"):
            assert not cpu_matmul.available()
        assert cpu_matmul._TARGET not in _dense_hlo(Layout(make_mesh("tp=1")), 4)
    finally:
        monkeypatch.undo()
        cpu_matmul.available.cache_clear()
        assert cpu_matmul.available()


def test_builds_from_source_into_an_empty_cache(monkeypatch, tmp_path):
    """The first use on a machine compiles cpu_matmul.cc (here into an empty cache directory)."""
    monkeypatch.setattr(cpu_matmul, "_cache_dir", lambda: tmp_path)
    path = cpu_matmul.ensure_built()
    assert path.parent == tmp_path and path.name.startswith("cpu_matmul-") and path.suffix == ".so"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind
    assert hasattr(ctypes.cdll.LoadLibrary(str(path)), "InfireMatmulNT")
    assert cpu_matmul.ensure_built() == path  # cached: built once per machine
