"""Cold start: a second process start compiles nothing (the persistent compilation cache), the boot
breakdown in generate.py's JSON, the boot clock's phase accounting, and the compressed checkpoint's
native Huffman decoder against numpy's reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest

from infire_jax import boot, executables
from infire_jax.compression import codec
from infire_jax.kernels import cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOOT_KEYS = {"read_s", "convert_s", "place_s", "compile_s", "first_token_s", "programs_compiled"}


def _generate(model_dir, cache_dir) -> tuple[dict, str]:
    """One generate.py process: its JSON line and the text it printed."""
    cmd = [sys.executable, os.path.join(REPO, "experiments", "generate.py"), f"--model_dir={model_dir}",
           f"--compilation_cache_dir={cache_dir}", "--max_new_tokens=2", "--prompt=Hello"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1])


def test_second_start_compiles_nothing(tmp_path):
    """The second start takes every program from the executable cache: nothing compiled, traced or
    lowered, and the same tokens."""
    from infire_jax.checkpoint import tiny

    model = tiny.write_tiny_checkpoint(tmp_path / "model", overrides={"num_hidden_layers": 2})
    cache = tmp_path / "xla"
    first, first_text = _generate(model, cache)
    second, second_text = _generate(model, cache)
    assert BOOT_KEYS <= set(first["boot"]) and BOOT_KEYS <= set(second["boot"])
    assert first["boot"]["programs_compiled"] > 0 and first["boot"]["programs_loaded"] == 0, first["boot"]
    assert second["boot"]["programs_compiled"] == 0 and second["boot"]["programs_lowered"] == 0, second["boot"]
    assert second["warmup"]["programs_loaded"] > 0 and second["warmup"]["programs_lowered"] == 0, second["warmup"]
    assert second["boot"]["programs_from_cache"] == second["boot"]["programs_loaded"]
    # generate.py names its deployment, so the second start found every program loaded on the prefetch threads
    assert second["boot"]["programs_prefetched"] == second["boot"]["programs_loaded"], second["boot"]
    assert 0 < second["boot"]["first_token_s"] and 0 < first["boot"]["first_token_s"]
    assert second_text == first_text and "Hello" in first_text


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """This process's compilation cache at a new directory (restored afterwards), warnings re-armed."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setattr(executables, "_warned", set())
    yield boot.use_compilation_cache(tmp_path / "xla")
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", before)


def test_executable_cache_hits_misses_and_corrupt_entries(fresh_cache):
    import jax
    import jax.numpy as jnp

    def program(description, build=lambda: jax.jit(lambda x, y: (x * 2 + y, None))):
        return executables.CachedProgram(build, description)

    def entries():
        return sorted((fresh_cache / executables.EXECUTABLES).glob("*.exe"))

    x, y, y3 = jax.device_put(np.arange(4.0, dtype=np.float32)), jnp.float32(1), jnp.float32(3)
    x5, x_int = jax.device_put(np.arange(5.0, dtype=np.float32)), jax.device_put(np.arange(4, dtype=np.int32))
    expected = np.arange(4.0) * 2 + 1
    compiled, loaded, lowered = boot.clock.programs_compiled, boot.clock.programs_loaded, boot.clock.programs_lowered
    np.testing.assert_array_equal(program("p")(x, y)[0], expected)
    assert len(entries()) == 1 and boot.clock.programs_compiled == compiled + 1
    hit = program("p", build=lambda: pytest.fail("a cached program was traced"))
    out, none = hit(x, y)
    np.testing.assert_array_equal(out, expected)
    assert none is None and boot.clock.programs_loaded == loaded + 1
    assert boot.clock.programs_compiled == compiled + 1 and boot.clock.programs_lowered == lowered + 1
    np.testing.assert_array_equal(hit(x, y3)[0], expected + 2)  # later calls run the loaded executable,
    with pytest.raises(TypeError, match="Argument types differ"):  # which checks its arguments
        hit(x, x)
    # another description: a miss; the same program text, so JAX's persistent cache supplies it; jaxlib serializes
    # what that cache supplied without its machine code, so it is compiled once more outside that cache and stored
    hits, loaded = boot.clock.cache_hits, boot.clock.programs_loaded
    np.testing.assert_array_equal(program("q")(x, y)[0], expected)
    assert boot.clock.cache_hits == hits + 1 and boot.clock.programs_compiled == compiled + 2
    assert boot.clock.programs_loaded == loaded and len(entries()) == 2
    np.testing.assert_array_equal(program("q", build=lambda: pytest.fail("traced"))(x, y)[0], expected)  # loaded
    # another argument shape or type: a miss, compiled and stored
    program("p")(x5, y)
    program("p")(x_int, 1)
    assert len(entries()) == 4 and boot.clock.programs_compiled == compiled + 4
    # unreadable entries: one warning, each program compiled again (and stored again), the right results
    for f in entries():
        f.write_bytes(f.read_bytes()[:-7] + b"garbage")
    loaded = boot.clock.programs_loaded
    with pytest.warns(RuntimeWarning, match="ignoring unreadable entry"):
        np.testing.assert_array_equal(program("p")(x, y)[0], expected)
    np.testing.assert_array_equal(program("p")(x5, y)[0], np.arange(5.0) * 2 + 1)  # no second warning
    assert boot.clock.programs_loaded == loaded and len(entries()) == 4
    np.testing.assert_array_equal(program("p", build=lambda: pytest.fail("traced"))(x5, y)[0], np.arange(5.0) * 2 + 1)


@pytest.fixture
def no_prefetch(monkeypatch):
    """This process's prefetch state cleared (one deployment per process) and restored afterwards."""
    monkeypatch.setattr(executables, "_prefetch", None)
    yield
    monkeypatch.setattr(executables, "_prefetch", None)


def test_prefetch_loads_what_the_last_start_of_the_deployment_used(fresh_cache, no_prefetch, monkeypatch):
    """A start records the programs it resolved under its deployment's name; the next start with that
    name loads them on background threads in that order and its programs take them from there. A key list
    from another environment is ignored; a corrupt prefetched entry is one warning and a recompile."""
    import json

    import jax

    def program(build=lambda: jax.jit(lambda x: x * 3 + 1)):
        return executables.CachedProgram(build, "prefetch-test")

    x = jax.device_put(np.arange(6.0, dtype=np.float32))
    expected = np.arange(6.0) * 3 + 1
    assert executables.prefetch("deployment A")
    with pytest.raises(ValueError, match="one deployment per process"):
        executables.prefetch("deployment B")
    np.testing.assert_array_equal(program()(x), expected)  # compiled, stored and recorded
    (keys_file,) = (fresh_cache / executables.EXECUTABLES / executables.BOOT_SETS).glob("*.json")
    saved = json.loads(keys_file.read_text())
    assert saved["deployment"] == "deployment A" and len(saved["keys"]) == 1

    def restart(deployment="deployment A"):  # a new process, as far as the prefetch goes
        monkeypatch.setattr(executables, "_prefetch", None)
        assert executables.prefetch(deployment)

    restart()
    prefetched = boot.clock.programs_prefetched
    np.testing.assert_array_equal(program(build=lambda: pytest.fail("traced"))(x), expected)
    assert boot.clock.programs_prefetched == prefetched + 1
    restart("deployment B")  # another deployment: nothing to prefetch, the program loads itself
    np.testing.assert_array_equal(program(build=lambda: pytest.fail("traced"))(x), expected)
    assert boot.clock.programs_prefetched == prefetched + 1
    keys_file.write_text(json.dumps(dict(saved, environment="another jax or source")))
    restart()  # a stale list: ignored, and replaced by what this start uses
    np.testing.assert_array_equal(program(build=lambda: pytest.fail("traced"))(x), expected)
    assert boot.clock.programs_prefetched == prefetched + 1
    assert json.loads(keys_file.read_text())["environment"] == saved["environment"]
    (entry,) = (fresh_cache / executables.EXECUTABLES).glob("*.exe")
    entry.write_bytes(entry.read_bytes()[:-7] + b"garbage")
    restart()
    with pytest.warns(RuntimeWarning, match="ignoring unreadable entry"):
        np.testing.assert_array_equal(program()(x), expected)


def test_an_edit_to_the_source_takes_over_the_executables_of_unchanged_programs(fresh_cache, monkeypatch):
    """Every key names this package's source, so an edit misses everywhere; a program that lowers to what
    an entry was compiled from takes that entry over (lowered, not compiled, stored under its new key), and
    the next start loads it without lowering. A program the edit did change is compiled as usual."""
    import jax

    def program(fn=lambda x: x * 5 - 2):
        return executables.CachedProgram(lambda: jax.jit(fn), "edit-test")

    def entries():
        return sorted((fresh_cache / executables.EXECUTABLES).glob("*.exe"))

    x = jax.device_put(np.arange(7.0, dtype=np.float32))
    expected = np.arange(7.0) * 5 - 2
    np.testing.assert_array_equal(program()(x), expected)
    assert len(entries()) == 1
    monkeypatch.setattr(executables, "_source", lambda: "the source after an edit")
    c = boot.clock
    compiled, requested, loaded = c.programs_compiled, c.programs_requested, c.programs_loaded
    traced = []
    np.testing.assert_array_equal(program(lambda x: traced.append(1) or x * 5 - 2)(x), expected)
    assert traced and (c.programs_requested, c.programs_loaded) == (requested, loaded + 1)  # lowered, not compiled
    assert len(entries()) == 2
    np.testing.assert_array_equal(executables.CachedProgram(lambda: pytest.fail("traced"), "edit-test")(x), expected)
    assert c.programs_requested == requested and c.programs_loaded == loaded + 2
    monkeypatch.setattr(executables, "_source", lambda: "an edit that changes the program")
    np.testing.assert_array_equal(program(lambda x: x * 5 - 3)(x), expected - 1)  # compiled
    assert c.programs_compiled == compiled + 1 and len(entries()) == 3


def test_prefetch_without_a_cache_directory_is_off(no_prefetch):
    import jax

    if jax.config.jax_compilation_cache_dir:
        pytest.skip("this process has a compilation cache")
    assert executables.prefetch("anything") is False


def test_gc_paused_restores_the_collector():
    import gc

    assert gc.isenabled()
    with boot.gc_paused():
        assert not gc.isenabled()
        with boot.gc_paused():
            pass
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with boot.gc_paused():
            pass
        assert not gc.isenabled()  # left as it was
    finally:
        gc.enable()


def test_importing_boot_leaves_flax_and_the_engine_for_later():
    """A script can configure the cache and start the prefetch before flax is imported."""
    code = ("import sys, infire_jax, infire_jax.boot, infire_jax.mesh; "
            "print(sorted(m for m in ('flax', 'infire_jax.api', 'infire_jax.engine') if m in sys.modules)); "
            "from infire_jax import load, Model; print(callable(load), 'flax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "True", "True"]
    import infire_jax

    with pytest.raises(AttributeError, match="no attribute 'lod'"):
        infire_jax.lod


@pytest.mark.parametrize("shape,chunk", [((577, 130), 4096), ((3, 5), 4096), ((64, 96), 7), ((4096,), 4096)])
def test_native_huffman_decode_matches_numpy(shape, chunk):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 0.02).astype(ml_dtypes.bfloat16)
    x.reshape(-1)[::97] = 3e4  # rare exponents: long codes
    c = codec.encode(x, "huffman", allow_raw=False, chunk_symbols=chunk)
    native = codec._decode_huffman_exp(c, cpu)
    ref = codec._decode_huffman_exp(c)
    np.testing.assert_array_equal(native, ref)
    np.testing.assert_array_equal(codec.decode(c).view(np.uint16), x.view(np.uint16))
    one = codec.encode(np.full(shape, 0.5, ml_dtypes.bfloat16), "huffman", allow_raw=False, chunk_symbols=chunk)
    np.testing.assert_array_equal(codec._decode_huffman_exp(one, cpu), codec._decode_huffman_exp(one))
    np.testing.assert_array_equal(cpu.histogram_u8(native), np.bincount(native.reshape(-1), minlength=256))


def test_native_huffman_decode_rejects_a_corrupt_stream():
    x = (np.random.default_rng(1).standard_normal((256, 300)) * 0.02).astype(ml_dtypes.bfloat16)
    c = codec.encode(x, "huffman", chunk_symbols=512)
    stream = c.arrays["stream"].copy()
    stream[len(stream) // 3] ^= 0xFF
    bad = codec.Compressed(c.kind, c.shape, dict(c.arrays, stream=stream), c.meta)
    for ops in (cpu, None):
        with pytest.raises(ValueError, match="corrupt huffman payload"):
            codec._decode_huffman_exp(bad, ops)


def test_executable_cache_key_names_the_static_config(tmp_path):
    """Two models of the same shapes whose configs differ (a rope base: a static attribute, in no
    array) describe their programs differently, so one never runs the other's executable."""
    import infire_jax
    from infire_jax.checkpoint import tiny

    def description(name, **overrides):
        path = tiny.write_tiny_checkpoint(tmp_path / name, overrides=dict(num_hidden_layers=1, **overrides),
                                          tokenizer=False)
        return infire_jax.load(path, compilation_cache_dir=None).programs.description

    base = description("a")
    assert description("b") == base
    assert description("c", rope_theta=5e5) != base


def test_executable_cache_evicts_the_least_recently_used(tmp_path):
    for i, name in enumerate("abcd"):
        f = tmp_path / f"{name}.exe"
        f.write_bytes(b"x" * 100)
        os.utime(f, (1000 + i, 1000 + i))  # a oldest, d newest
    os.utime(tmp_path / "a.exe")  # just used (a loaded entry is touched): newest now
    executables._evict(tmp_path, 250)
    assert sorted(f.name for f in tmp_path.glob("*.exe")) == ["a.exe", "d.exe"]
