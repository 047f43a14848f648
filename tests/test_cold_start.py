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

from infire_jax import boot
from infire_jax.compression import codec
from infire_jax.kernels import cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOOT_KEYS = {"read_s", "convert_s", "place_s", "compile_s", "first_token_s", "programs_compiled"}


def _generate(model_dir, cache_dir) -> dict:
    cmd = [sys.executable, os.path.join(REPO, "experiments", "generate.py"), f"--model_dir={model_dir}",
           f"--compilation_cache_dir={cache_dir}", "--max_new_tokens=2", "--prompt=Hello"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_start_compiles_nothing(tmp_path):
    from infire_jax.checkpoint import tiny

    model = tiny.write_tiny_checkpoint(tmp_path / "model", overrides={"num_hidden_layers": 2})
    cache = tmp_path / "xla"
    first = _generate(model, cache)
    second = _generate(model, cache)
    assert BOOT_KEYS <= set(first["boot"]) and BOOT_KEYS <= set(second["boot"])
    assert first["boot"]["programs_compiled"] > 0, first["boot"]
    assert second["boot"]["programs_compiled"] == 0, second["boot"]
    assert second["boot"]["programs_from_cache"] >= first["boot"]["programs_compiled"]
    assert 0 < second["boot"]["first_token_s"] and 0 < first["boot"]["first_token_s"]
    assert first["warmup"]["programs_compiled"] > 0 and second["warmup"]["programs_compiled"] == 0


def test_boot_phases_are_exclusive():
    clock = boot.BootClock()
    with clock.phase("place"):
        time.sleep(0.05)
        with clock.phase("read"):
            time.sleep(0.1)
        clock._on_duration("/jax/core/compile/backend_compile_duration", 0.03)  # as jax.monitoring calls it
    assert 0.095 < clock.seconds["read"] < 0.5
    assert 0.015 < clock.seconds["place"] < 0.3  # 0.05 + ~0 minus the 0.03 s compilation
    assert clock.compile_s == 0.03 and clock.programs_compiled == 1
    clock._on_event("/jax/compilation_cache/cache_hits")
    assert clock.programs_compiled == 0 and clock.cache_hits == 1
    with clock.warming_up():
        clock.mark_first_token()
    assert clock.first_token is None
    clock.mark_first_token()
    first = clock.first_token
    clock.mark_first_token()
    assert clock.first_token == first and 0 < clock.report()["first_token_s"] < 1e5
    with pytest.raises(ValueError, match="unknown boot phase"):
        with clock.phase("lunch"):
            pass


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
