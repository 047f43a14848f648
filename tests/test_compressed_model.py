"""Compressed checkpoints: bitwise-identical model outputs, checksums, runtime layout on the mesh."""

import json
import pathlib
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import infire_jax
from infire_jax.checkpoint import compressed
from infire_jax.checkpoint.tiny import write_tiny_checkpoint
from infire_jax.compression import codec
from infire_jax.compression.jax_decode import Palette12Weight

STACKED = ("wqkv", "wo", "w_gate_up", "w_down")
# 3 layers: on pp=2 the second stage gets a padding slot, which must stay a valid (zero) weight.
OVERRIDES = {"num_hidden_layers": 3}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed")
    raw = write_tiny_checkpoint(root / "raw", "tiny-llama", dtype="bfloat16", overrides=OVERRIDES)
    manifest = compressed.compress_checkpoint(raw, root / "comp")
    return raw, root / "comp", manifest


def test_manifest_and_files(dirs):
    raw, comp, manifest = dirs
    assert compressed.is_compressed_checkpoint(comp) and not compressed.is_compressed_checkpoint(raw)
    assert json.loads((comp / "manifest.json").read_text()) == manifest
    for f in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (comp / f).read_bytes() == (raw / f).read_bytes()
    t = manifest["totals"]
    assert 0.6 < t["ratio"] < 0.72 and 0.74 < t["palette12_ratio"] < 0.77
    assert t["compressed_bytes"] == sum(e["nbytes"] for e in manifest["tensors"].values())
    assert not manifest["source"]["converted_to_bf16"]
    e = manifest["tensors"]["model.layers.0.mlp.down_proj.weight"]
    assert e["kind"] == "huffman" and e["dtype"] == "bfloat16" and e["shape"] == [64, 176]
    assert e["bf16_bytes"] == 2 * 64 * 176 and 0 < e["ratio"] < 0.75 and {"crc32", "file", "offset"} <= set(e)


@pytest.mark.parametrize("mesh,kernels", [("tp=1", "auto"), ("tp=1", "xla"), ("pp=2,tp=2", "auto")])
def test_bitwise_identical_to_raw_bf16(dirs, mesh, kernels):
    """Like with like: on one CPU device kernels="auto" runs raw bf16 weights through the few-row CPU
    kernel and compressed ones through its palette12 form (decoded in registers, same sums), "xla"
    both through XLA's code (compressed: decoded to float32 inside the step); multi-device layouts
    always take XLA's."""
    raw_dir, comp_dir, _ = dirs
    raw = infire_jax.load(raw_dir, mesh=mesh, dtype="bfloat16", kernels=kernels)
    comp = infire_jax.load(comp_dir, mesh=mesh, dtype="bfloat16", kernels=kernels)

    layers = comp.placed.module.layers
    assert comp.placed.module.unrolled == raw.placed.module.unrolled == (mesh == "tp=1")
    for name in STACKED:
        if mesh == "tp=1":  # no pipeline: per-layer weights, each compressed on its own
            pairs = [(c[name].get_value(), r[name].get_value()) for c, r in zip(layers, raw.placed.module.layers)]
        else:
            pairs = [(layers[name].get_value(), raw.placed.module.layers[name].get_value())]
            n_slots = pairs[0][1].shape[0]
            assert all(leaf.shape[0] == n_slots for leaf in jax.tree.leaves(pairs[0][0])), name  # scan needs it
        for w, r in pairs:
            assert isinstance(w, Palette12Weight), name
            assert w.shape == r.shape
            assert w.nbytes < 0.78 * 2 * np.prod(w.shape)
    if mesh != "tp=1":  # compressed leaves are split like the weight: layers on pp, heads / mlp on tp
        wq, w_down = layers["wqkv"].get_value(), layers["w_down"].get_value()
        assert wq.sign_mant.sharding.spec == P("pp", "tp")  # stored (kv_heads, q/k/v, head_dim, embed)
        assert w_down.sign_mant.sharding.spec == P("pp", None, "tp")  # stored (embed, mlp)
        assert w_down.escape_idx.sharding.spec == P("pp", "tp")
        assert wq.palette.sharding.spec == P("pp")

    tokens = np.random.default_rng(0).integers(5, raw.cfg.vocab_size, size=(2, 11)).astype(np.int32)
    a, b = raw.logits(tokens), comp.logits(tokens)
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))

    prompts = [[5, 17, 99, 3], [42, 8]]
    assert raw.generate(prompts, max_new_tokens=6) == comp.generate(prompts, max_new_tokens=6)

    if kernels == "xla" and mesh == "tp=1":  # dtype applies to the params that stay raw (norms, embedding);
        # bf16 -> f32 is exact (XLA's dot both ways: the kernel sums float32 and bf16 weights in other orders)
        f32 = infire_jax.load(comp_dir, mesh=mesh, dtype="float32", kernels="xla").logits(tokens)
        np.testing.assert_array_equal(a.view(np.uint32), f32.view(np.uint32))


def _copy(comp: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    dst = tmp_path / "copy"
    shutil.copytree(comp, dst)
    return dst


def test_corrupt_byte_names_the_tensor(dirs, tmp_path):
    _, comp, manifest = dirs
    bad = _copy(comp, tmp_path)
    name = "model.layers.1.self_attn.o_proj.weight"
    e = manifest["tensors"][name]
    path = bad / e["file"]
    data = bytearray(path.read_bytes())
    data[e["offset"] + e["nbytes"] // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(compressed.CompressedCheckpointError, match=rf"checksum mismatch in tensor '{name}'"):
        infire_jax.load(bad)


def test_truncated_file_is_a_clear_error(dirs, tmp_path):
    _, comp, manifest = dirs
    bad = _copy(comp, tmp_path)
    (fname, size), = manifest["containers"].items()
    last = max(manifest["tensors"].items(), key=lambda kv: kv[1]["offset"])[0]
    with open(bad / fname, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(compressed.CompressedCheckpointError, match=rf"truncated.*tensor '{last}'"):
        infire_jax.load(bad)
    (bad / fname).unlink()
    with pytest.raises(compressed.CompressedCheckpointError, match="missing"):
        infire_jax.load(bad)


def test_fp32_source_is_rounded_to_bf16(tmp_path):
    src = write_tiny_checkpoint(tmp_path / "f32", "tiny-llama", dtype="float32", tokenizer=False,
                                overrides={"num_hidden_layers": 1})
    m = compressed.compress_checkpoint(src, tmp_path / "c", runtime_ratio=False)
    assert m["source"]["converted_to_bf16"] and m["source"]["dtypes"] == ["float32"]
    name = "model.layers.0.mlp.up_proj.weight"
    e = m["tensors"][name]
    assert e["source_dtype"] == "float32" and e["dtype"] == "bfloat16"
    from safetensors.numpy import load_file

    want = load_file(str(src / "model.safetensors"))[name].astype(ml_dtypes.bfloat16)
    got = codec.decode(compressed.read_tensor(tmp_path / "c", name, e))
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    with pytest.raises(FileExistsError):
        compressed.compress_checkpoint(src, tmp_path / "c")


@pytest.mark.parametrize("shape,blocks", [((6, 10, 7), (2, 5, 1)), ((4, 9), (2, 3)), ((1, 5), (1, 1)),
                                          ((8, 256), (2, 2)), ((3, 4, 130), (1, 2, 1))])
def test_blocked_palette12_roundtrip(shape, blocks):
    rng = np.random.default_rng(1)
    bits = (rng.standard_normal(shape).astype(np.float32) * 0.02).astype(ml_dtypes.bfloat16).view(np.uint16)
    special = np.array([0x0000, 0x8000, 0x0001, 0x7F80, 0xFF80, 0x7FC1, 0xFF81, 0x7F7F], np.uint16)
    flat = bits.reshape(-1)
    flat[rng.choice(flat.size, min(flat.size, 8), replace=False)] = special[: min(flat.size, 8)]
    exp, sm = codec.split_bits(bits)
    enc = codec.encode_palette12_blocks(exp, sm, blocks)
    width = max(len(e) for e in enc["escape_idx"])
    size = bits.size // len(enc["escape_idx"])
    ei = np.full((len(enc["escape_idx"]), width), size, np.int64)
    ev = np.zeros(ei.shape, np.uint16)
    for g, (i, v) in enumerate(zip(enc["escape_idx"], enc["escape_val"])):
        ei[g, : len(i)], ev[g, : len(v)] = i, v
    out = codec.decode_palette12_blocks(enc["packed_idx"], enc["sign_mant"], enc["palette"][: enc["n_palette"]],
                                        ei, ev, blocks)
    np.testing.assert_array_equal(out, bits)


@pytest.mark.parametrize("mesh_spec,spec", [
    ("tp=1", ("pp", None, None, None)), ("pp=2,tp=2", ("pp", None, "tp", None)),
    ("tp=2", (None, None, None, "tp")),  # the packed (last) axis split into odd-width blocks
    ("pp=2,tp=4", ("pp", "tp", None, None)),
])
def test_placed_palette12_weight_decodes_exactly(mesh_spec, spec):
    """A stacked weight with a non-range palette (exact zeros), stored permuted and split in blocks,
    decodes (jit, shard_map per block) to exactly its bf16 values, in logical axis order."""
    from infire_jax import mesh as mesh_lib
    from infire_jax.compression import jax_decode

    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 4, 6, 8)).astype(np.float32) * 0.02)
    x[rng.random(x.shape) < 0.2] = 0.0  # exponent 0 makes the palette a non-range
    bits = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    perm = (2, 0, 1)  # stored slice axes: (8, 4, 6)
    stored = np.ascontiguousarray(bits.transpose((0, 3, 1, 2)))
    mesh = mesh_lib.make_mesh(mesh_spec)
    spec = tuple(e if e is None or mesh.shape[e] > 1 else None for e in spec)
    blocks = jax_decode.block_counts(mesh, spec[1:])
    exp, sm = codec.split_bits(stored)
    slices = [codec.encode_palette12_blocks(exp[i], sm[i], blocks) for i in range(2)]
    is_range = all(codec.palette_is_range(s["palette"][: s["n_palette"]]) for s in slices)
    assert not is_range
    w = jax_decode.place_stacked_palette12(jax_decode.stack_palette12_blocks(slices), mesh, spec, is_range, perm)
    assert w.shape == x.shape
    got = jax.jit(Palette12Weight.decode_f32)(w)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), bits.astype(np.uint32) << 16)
    one = jax.jit(lambda w: w[1].decode_f32())(w)  # a scanned slice: single layer
    np.testing.assert_array_equal(np.asarray(one).view(np.uint32), bits[1].astype(np.uint32) << 16)


def test_broken_manifest_is_reported(dirs, tmp_path):
    _, comp, _ = dirs
    bad = _copy(comp, tmp_path)
    (bad / "manifest.json").write_text('{"format": "infire_jax-compressed-v1", "tensors": ')
    with pytest.raises(compressed.CompressedCheckpointError, match="manifest.json"):
        infire_jax.load(bad)
