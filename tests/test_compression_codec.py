"""Bit-exactness, ratio and robustness tests of the bf16 weight codecs (numpy + JAX decode)."""

import dataclasses
import time

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax import lax

from infire_jax.compression import decode, encode, from_bytes, to_bytes, transcode_to_palette12
from infire_jax.compression.codec import MAX_CODE_LEN, huffman_code_lengths
from infire_jax.compression.jax_decode import Palette12Weight, decode_palette12_f32, palette12_from_numpy

KINDS = ["huffman", "palette12"]
BF16 = ml_dtypes.bfloat16


def gaussian(shape, std=0.02, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * std).astype(BF16)


def bits(a):
    return np.asarray(a).view(np.uint16)


def assert_roundtrip(x, kind, allow_raw=True, **kw):
    c = encode(x, kind, allow_raw=allow_raw, **kw)
    y = decode(c)
    assert y.dtype == BF16 and y.shape == np.shape(x)
    np.testing.assert_array_equal(bits(y), bits(x))
    np.testing.assert_array_equal(bits(decode(from_bytes(to_bytes(c)))), bits(x))
    return c


def f32_bits(x):
    """Reference bf16 -> f32 bits, computed on integers (no float conversion that could touch NaNs)."""
    return bits(x).astype(np.uint32) << 16


def special_values():
    return np.array(
        [0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x0040, 0x7F80, 0xFF80,  # ±0, subnormals, ±inf
         0x7FC0, 0xFFC0, 0x7F81, 0x7FA5, 0xFF81, 0x7F7F, 0xFF7F, 0x0080],  # NaNs with payloads, max, min normal
        np.uint16,
    )


# ----------------------------------------------------------------------------- numpy round trips


@pytest.mark.parametrize("kind", KINDS)
def test_gaussian_roundtrip(kind):
    c = assert_roundtrip(gaussian((257, 300)), kind)
    assert c.kind == kind and c.ratio < 0.8


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("allow_raw", [True, False])
def test_all_bf16_patterns(kind, allow_raw):
    x = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    c = assert_roundtrip(x, kind, allow_raw)
    assert c.kind == ("raw" if allow_raw else kind)  # uniform exponents: compression cannot pay


@pytest.mark.parametrize("kind", KINDS)
def test_special_values_inside_weights(kind):
    x = bits(gaussian((40, 51))).copy()
    x.reshape(-1)[::97][: special_values().size] = special_values()
    c = assert_roundtrip(x, kind, allow_raw=False)
    assert c.kind == kind


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", [0x0000, 0x8000, 0x3C00, 0x7FC1, 0xFF80, 0x0001])
def test_constant_tensors(kind, value):
    c = assert_roundtrip(np.full((64, 65), value, np.uint16), kind)
    assert c.kind == kind and c.ratio < 0.76


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5, 7), (0,), (2, 0, 3), (5, 1)])
def test_odd_shapes(kind, shape):
    x = gaussian(shape, std=1.0)
    assert_roundtrip(x, kind, allow_raw=False)
    assert_roundtrip(x, kind, allow_raw=True)


@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_input(kind):
    x = gaussian((64, 90))[::2, 1::3]
    assert_roundtrip(x, kind)


@settings(max_examples=15, deadline=None, database=None)
@given(
    x=hnp.arrays(np.uint16, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=24)),
    kind=st.sampled_from(KINDS),
    allow_raw=st.booleans(),
)
def test_random_bit_strings_property(x, kind, allow_raw):
    assert_roundtrip(x, kind, allow_raw)


def test_random_bits_fall_back_to_raw():
    x = np.random.default_rng(1).integers(0, 65536, (128, 128), dtype=np.uint16)
    for kind in KINDS:
        c = assert_roundtrip(x, kind)
        assert c.kind == "raw" and c.ratio == 1.0


def test_many_small_chunks():
    x = gaussian((3, 1001))
    for cs in (1, 7, 1000, 3003, 5000):
        assert_roundtrip(x, "huffman", allow_raw=False, chunk_symbols=cs)


def test_huffman_length_limit():
    fib = [1, 1]
    while len(fib) < 24:
        fib.append(fib[-1] + fib[-2])
    counts = np.zeros(256, np.int64)
    counts[100 : 100 + len(fib)] = fib  # unlimited Huffman would need 23-bit codes
    lengths = huffman_code_lengths(counts).astype(np.int64)
    assert lengths.max() == MAX_CODE_LEN
    assert sum(2.0 ** -l for l in lengths[lengths > 0]) <= 1.0
    exps = np.repeat(np.arange(100, 100 + len(fib)), fib).astype(np.uint16)
    x = np.random.default_rng(2).permutation((exps << 7) | 0x8055)
    assert_roundtrip(x, "huffman", allow_raw=False)


@pytest.mark.parametrize("source", ["huffman", "raw"])
def test_transcode_to_palette12(source):
    x = gaussian((100, 37))
    c = encode(x, "huffman") if source == "huffman" else encode(x, "huffman", chunk_symbols=1)
    if source == "raw":  # one chunk offset per symbol makes huffman lose: raw fallback
        assert c.kind == "raw"
    p, direct = transcode_to_palette12(c), encode(x, "palette12")
    assert p.kind == "palette12"
    for name in direct.arrays:
        np.testing.assert_array_equal(p.arrays[name], direct.arrays[name])
    np.testing.assert_array_equal(bits(decode(p)), bits(x))


# ----------------------------------------------------------------------------- errors


def test_bad_input_errors():
    with pytest.raises(ValueError, match="bfloat16"):
        encode(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="unknown compression kind"):
        encode(np.zeros(4, np.uint16), kind="zstd")


def test_corrupted_payload_is_detected():
    blob = bytearray(to_bytes(encode(gaussian((64, 64)), "huffman")))
    blob[len(blob) // 2] ^= 0x40
    with pytest.raises(ValueError, match="CRC32"):
        from_bytes(bytes(blob))
    with pytest.raises(ValueError, match="magic"):
        from_bytes(b"XXXX" + bytes(blob[4:]))
    with pytest.raises(ValueError):
        from_bytes(bytes(blob[:8]))


def test_inconsistent_huffman_offsets_are_detected():
    c = encode(gaussian((64, 64)), "huffman", chunk_symbols=512)
    c.arrays["chunk_offsets"][1] += 1
    with pytest.raises(ValueError, match="corrupt huffman payload"):
        decode(c)


# ----------------------------------------------------------------------------- compression ratio


@pytest.fixture(scope="module")
def big_gaussian():
    return gaussian((4096, 4096))


def test_ratio_on_4096_gaussian(big_gaussian):
    t0 = time.perf_counter()
    h = encode(big_gaussian, "huffman")
    p = encode(big_gaussian, "palette12")
    assert h.ratio <= 0.665, h.ratio
    assert p.ratio <= 0.752, p.ratio
    np.testing.assert_array_equal(bits(decode(h)), bits(big_gaussian))
    np.testing.assert_array_equal(bits(decode(p)), bits(big_gaussian))
    assert time.perf_counter() - t0 < 15.0  # encode + decode of both formats


# ----------------------------------------------------------------------------- JAX decode


def jax_decode(c, stacked=False):
    """JAX decode bits via both the gather path and, when applicable, the range (add) path."""
    w = palette12_from_numpy(c, stacked_axis0=stacked)
    fn = jax.jit(Palette12Weight.decode_f32)
    out = np.asarray(fn(dataclasses.replace(w, palette_is_range=False))).view(np.uint32)
    if w.palette_is_range:
        np.testing.assert_array_equal(np.asarray(fn(w)).view(np.uint32), out)
    return out


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5, 7), (40, 51), (3, 128), (2, 300), (5, 129), (1, 383)])
def test_jax_decode_matches_numpy(shape):
    x = bits(gaussian(shape, std=1.0)).copy()
    x.reshape(-1)[: min(x.size, 16)] = special_values()[: min(x.size, 16)]
    c = encode(x, "palette12", allow_raw=False)
    np.testing.assert_array_equal(jax_decode(c), f32_bits(decode(c)))
    np.testing.assert_array_equal(jax_decode(c), f32_bits(x))


@pytest.mark.parametrize("zeros", [False, True])
def test_palette_range_detection(zeros):
    x = bits(gaussian((16, 256))).copy()
    if zeros:  # exact zeros put exponent 0 into the palette: no longer a run of exponents
        x[:, ::3] = 0
    c = encode(x, "palette12")
    w = palette12_from_numpy(c)
    assert w.palette_is_range is (not zeros)
    np.testing.assert_array_equal(jax_decode(c), f32_bits(x))


def test_jax_decode_all_patterns_and_functional_api():
    x = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    c = encode(x, "palette12", allow_raw=False)  # 15/16 of the values are escapes
    np.testing.assert_array_equal(jax_decode(c), f32_bits(x))
    a = c.arrays
    out = jax.jit(decode_palette12_f32)(
        a["packed_idx"], a["sign_mant"], a["palette"], a["escape_idx"].astype(np.int32), a["escape_val"]
    )
    np.testing.assert_array_equal(np.asarray(out).view(np.uint32), f32_bits(x))


def test_jax_decode_from_huffman_and_raw():
    x = gaussian((9, 31))
    np.testing.assert_array_equal(jax_decode(encode(x, "huffman")), f32_bits(x))
    r = np.random.default_rng(3).integers(0, 65536, (9, 31), dtype=np.uint16)
    c = encode(r, "palette12")
    assert c.kind == "raw"
    np.testing.assert_array_equal(jax_decode(c), f32_bits(r))


@pytest.mark.parametrize("shape", [(4, 16, 33), (3, 8, 5, 7), (4, 2, 300)])  # stacked layers / (L, experts, K, N)
def test_stacked_decode_under_scan(shape):
    x = bits(gaussian(shape)).copy()
    per = x[0].size
    rare = [0x7F80, 0x7FC3, 0x0001, 0x8001] + [(e << 7) | 0x35 for e in range(200, 212)]
    where = [per + 3, per + 4] + [2 * per + k for k in range(len(rare) - 2)]  # slices 1 and 2 only
    x.reshape(-1)[where] = rare
    c = encode(x, "palette12", allow_raw=False)
    w = palette12_from_numpy(c, stacked_axis0=True)
    assert w.packed_idx.shape[0] == w.sign_mant.shape[0] == w.palette.shape[0] == w.escape_idx.shape[0] == shape[0]
    real = (np.asarray(w.escape_idx) < per).sum(axis=1)  # escapes per slice; the rest is padding
    assert real[0] == 0 and real[2] > real[1] and real.sum() == c.arrays["escape_idx"].size
    ref = f32_bits(x)

    def body(acc, wl):
        return acc, wl.decode_f32()

    _, ys = jax.jit(lambda w: lax.scan(body, 0, w))(w)
    np.testing.assert_array_equal(np.asarray(ys).view(np.uint32), ref)
    np.testing.assert_array_equal(np.asarray(jax.jit(Palette12Weight.decode_f32)(w)).view(np.uint32), ref)
    np.testing.assert_array_equal(np.asarray(ys).view(np.uint32), f32_bits(decode(c)))
    np.testing.assert_array_equal(jax_decode(c, stacked=True), ref)


def test_stacked_needs_rank_two():
    with pytest.raises(ValueError, match="rank"):
        palette12_from_numpy(encode(gaussian((8,)), "palette12", allow_raw=False), stacked_axis0=True)
