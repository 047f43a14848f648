"""Decoder-layer matmuls on this CPU: weight layout x XLA:CPU dot kernel, by rows per step.

A chain of L layers of the SmolLM-135M shape runs only the projections (RMSNorm, fused qkv,
o, fused gate/up, SiLU-gate, down; no attention) so the figure is the weight matmuls alone, the
part that bounds decode. Side by side in one process, per row count M (= decode batch):

  layout (N, K): weights as stored by infire_jax and by HF (out, in); x @ W^T
  layout (K, N): weights as (in, out) (jax-llm-examples' order); x @ W
  kernel ynn:   XLA:CPU's default (YNNPACK dot fusions)
  kernel eigen: ynn fusions off for this program (compiler option
                xla_cpu_experimental_ynn_fusion_type=''), so XLA's own dot runs
  (N,K) infire: infire_jax's CPU kernel (infire_jax/kernels/cpu_matmul.cc), what decode uses for
                at most 32 rows (kernels="auto")
  (N,K) infire bf16 / palette12: the same kernel reading the weights (rounded to bf16) as bf16 or
                as palette12-compressed (decoded in registers, issue 6's runtime format); their
                outputs are compared with each other (bitwise equal) and GB/s counts their own bytes

Reports ms per chain (median of --runs, after two warm-ups), the weight read rate and GFLOP/s, and
each variant's speed relative to the default (N, K) + ynn. JSON out.

  python experiments/bench_layer_matmuls.py --rows=1,4,16,64,512 --out=/tmp/bench_layer_matmuls.json
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import bench_common as bc  # noqa: E402
from infire_jax.kernels import cpu  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("rows", ["1", "4", "16", "64", "512"], "Rows per matmul (decode batch or prompt tokens).")
flags.DEFINE_integer("layers", 30, "Layers in the chain.")
flags.DEFINE_integer("hidden", 576, "Hidden size D.")
flags.DEFINE_integer("mlp", 1536, "MLP size F.")
flags.DEFINE_integer("qkv", 960, "Fused q/k/v output size ((heads + 2 kv_heads) * head_dim).")
flags.DEFINE_integer("runs", 11, "Timed runs per figure (median).")
flags.DEFINE_string("out", "bench_layer_matmuls.json", "JSON output path.")

KERNELS = {"ynn": {}, "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""}}


def _chain(d: int, f: int, weight_nk: bool, matmul=None):
    """jit-able chain of decoder-layer projections over per-layer weight dicts (matmul: x, w -> y)."""
    dims = (((1,), (1,)), ((), ())) if weight_nk else (((1,), (0,)), ((), ()))

    def mm(x, w):
        return matmul(x, w) if matmul else jax.lax.dot_general(x, w, dims)

    def rms(x):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)

    def run(weights, x):
        for w in weights:
            qkv = mm(rms(x), w["qkv"])
            x = x + mm(qkv[:, :d], w["o"])
            gu = mm(rms(x), w["gate_up"])
            x = x + mm(jax.nn.silu(gu[:, :f]) * gu[:, f:], w["down"])
        return x

    return run


def _compressed(nk: list[dict]) -> tuple[list[dict], list[dict], int, int]:
    """The layers' weights rounded to bf16 (as bf16 arrays) and as palette12 operand tuples of
    cpu.matmul_nt_palette12, with each form's bytes."""
    from infire_jax.compression import codec

    bf16, pal, bf16_bytes, pal_bytes = [], [], 0, 0
    for layer in nk:
        b, q = {}, {}
        for name, w in layer.items():
            bits = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncation: any bf16 values will do
            b[name] = jnp.asarray(bits).view(jnp.bfloat16)
            enc = codec.encode_palette12_blocks(*codec.split_bits(bits), (1, 1))
            leaves = (enc["packed_idx"], enc["sign_mant"], enc["palette"], enc["escape_idx"][0].astype(np.int32), enc["escape_val"][0])
            q[name] = tuple(jnp.asarray(a) for a in leaves)
            bf16_bytes += bits.nbytes
            pal_bytes += sum(a.nbytes for a in leaves)
        bf16.append(b)
        pal.append(q)
    return bf16, pal, bf16_bytes, pal_bytes


def main(argv: list[str]) -> None:
    del argv
    d, f, q, n_layers = FLAGS.hidden, FLAGS.mlp, FLAGS.qkv, FLAGS.layers
    rng = np.random.default_rng(0)
    shapes = dict(qkv=(q, d), o=(d, d), gate_up=(2 * f, d), down=(d, f))  # (N, K)
    nk = [{k: (rng.standard_normal(s, np.float32) * 0.02) for k, s in shapes.items()} for _ in range(n_layers)]
    weights = {
        "(N,K)": [{k: jnp.asarray(v) for k, v in layer.items()} for layer in nk],
        "(K,N)": [{k: jnp.asarray(np.ascontiguousarray(v.T)) for k, v in layer.items()} for layer in nk],
    }
    weight_bytes = 4 * n_layers * sum(a * b for a, b in shapes.values())
    own_bytes = {}
    if cpu.available():
        weights["bf16"], weights["palette12"], own_bytes["bf16"], own_bytes["palette12"] = _compressed(nk)
    result: dict = dict(bench="layer_matmuls", layers=n_layers, hidden=d, mlp=f, qkv=q, weight_bytes=weight_bytes,
                        runs=FLAGS.runs, machine=bc.machine_info(), rows=[])
    for m in [int(r) for r in FLAGS.rows]:
        x = jnp.asarray(rng.standard_normal((m, d), np.float32))
        row: dict = dict(rows=m, variants={})
        reference = None
        variants = [(f"{layout} {kernel}", ws, jax.jit(_chain(d, f, layout == "(N,K)"), compiler_options=options))
                    for layout in ("(N,K)", "(K,N)") for ws in [weights[layout]] for kernel, options in KERNELS.items()]
        if cpu.available():
            palette12 = lambda x, w: cpu.matmul_nt_palette12(x, *w[:5], w[1].shape[1])  # noqa: E731
            variants += [
                ("(N,K) infire", weights["(N,K)"], jax.jit(_chain(d, f, True, cpu.matmul_nt))),
                ("(N,K) infire bf16", weights["bf16"], jax.jit(_chain(d, f, True, cpu.matmul_nt))),
                ("(N,K) infire palette12", weights["palette12"], jax.jit(_chain(d, f, True, palette12))),
            ]
        bf16_out = None
        for name, ws, fn in variants:
            out = np.asarray(fn(ws, x))
            reference = out if reference is None else reference
            secs = statistics.median(bc.timed_runs(lambda: fn(ws, x).block_until_ready(), FLAGS.runs, warmup=2))
            nbytes = own_bytes.get(name.split()[-1], weight_bytes)
            row["variants"][name] = dict(
                ms=1e3 * secs, weight_bytes=nbytes, weight_gbps=nbytes / secs / 1e9,
                gflops=2 * m * weight_bytes / 4 / secs / 1e9,
                max_abs_diff=float(np.abs(out - reference).max()),
            )
            if name.endswith("bf16"):
                bf16_out = out
            if name.endswith("palette12"):
                row["variants"][name]["bitwise_equal_bf16"] = bool((out == bf16_out).all())
        base = row["variants"]["(N,K) ynn"]["ms"]
        for v in row["variants"].values():
            v["speed_vs_default"] = base / v["ms"]
        result["rows"].append(row)
        print(f"M={m:4d}: " + "  ".join(
            f"{k} {v['ms']:7.2f} ms ({v['speed_vs_default']:.2f}x)" for k, v in row["variants"].items()), flush=True)
        bc.write_json(FLAGS.out, result)


if __name__ == "__main__":
    app.run(main)
