"""Decode attention over a paged KV pool on this CPU: infire_jax's kernel vs XLA over the gathered cache.

One new token per row attends over `context` cached positions held in pages of a pool shared by L
layers (pages placed at random in the pool, as a long-running server's allocator leaves them), for
a chain of L layers (each layer's output feeds the next one's query, so nothing is hoisted).
Side by side in one process, interleaved, per (batch, context):

  kernel: `kernels.cpu.paged_decode_attention` (cpu_attention.cc), what decode runs on a
          one-device layout: reads each row's valid pages in place
  xla:    the same attention as XLA runs it without the kernel: each row's pages gathered into a
          contiguous cache (`PagedLayerCache.gather`), then `gqa_attention`'s dots and softmax

Reports us per layer (median of --runs after a warm-up), the KV read rate of each, the speed-up and
the largest difference between the two outputs. JSON out.

  python experiments/bench_paged_attention.py --batch_sizes=1,16 --contexts=48,1024,4096
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import bench_common as bc  # noqa: E402
from infire_jax.kernels import cpu  # noqa: E402
from infire_jax.kv.paged import PagedLayerCache  # noqa: E402
from infire_jax.models.attention import gqa_attention  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["1", "16"], "Rows decoding at once.")
flags.DEFINE_list("contexts", ["48", "1024", "4096"], "Cached positions per row.")
flags.DEFINE_integer("layers", 30, "Layers in the pool and in the chain.")
flags.DEFINE_integer("kv_heads", 3, "KV heads (SmolLM-135M: 3).")
flags.DEFINE_integer("q_per_kv", 3, "Query heads per KV head (SmolLM-135M: 3).")
flags.DEFINE_integer("head_dim", 64, "Head dimension.")
flags.DEFINE_integer("page_size", 16, "Positions per page (the engine's default).")
flags.DEFINE_integer("runs", 9, "Timed runs per variant (median), interleaved, after one warm-up.")
flags.DEFINE_integer("max_pool_mb", 4096, "Skip a case whose K + V pools would exceed this many MB.")
flags.DEFINE_string("out", "bench_paged_attention.json", "JSON output path.")


def _pool_pages(batch: int, context: int) -> tuple[int, int]:
    """Pages per row and pages in the pool (every row's, plus one never read)."""
    width = -(-context // FLAGS.page_size)
    return width, batch * width + 1


def _case(batch: int, context: int, rng: np.random.Generator) -> tuple:
    L, kv, g, hd, page = FLAGS.layers, FLAGS.kv_heads, FLAGS.q_per_kv, FLAGS.head_dim, FLAGS.page_size
    width, pages = _pool_pages(batch, context)
    f = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32))  # noqa: E731
    q = f(batch, 1, kv * g, hd) / np.sqrt(hd)
    k_new, v_new = f(batch, 1, kv, hd), f(batch, 1, kv, hd)
    k_pages, v_pages = f(L, pages, kv, page, hd), f(L, pages, kv, page, hd)
    table = jnp.asarray(rng.permutation(pages)[: batch * width].reshape(batch, width).astype(np.int32))
    start = jnp.full((batch,), context, jnp.int32)
    return q, k_new, v_new, k_pages, v_pages, table, start


def _chain(kernel: bool):
    def run(q, k_new, v_new, k_pages, v_pages, table, start):
        b, _, heads, hd = q.shape
        kv = k_new.shape[2]
        out = q
        for layer in range(FLAGS.layers):
            qi = out * 0.5 + q
            if kernel:
                y = cpu.paged_decode_attention(qi.reshape(b, kv, heads // kv, hd), k_new, v_new, k_pages, v_pages, table, start, layer)
            else:
                views = PagedLayerCache(k_pages, table, layer), PagedLayerCache(v_pages, table, layer)
                y = gqa_attention(qi, k_new, v_new, start, views[0].gather(), views[1].gather())
            out = y.reshape(q.shape)
        return out

    return jax.jit(run)


def main(argv: list[str]) -> None:
    del argv
    if not cpu.available():
        raise SystemExit("the CPU kernels could not be built (no C++ compiler?): nothing to compare")
    fns = {"kernel": _chain(True), "xla": _chain(False)}
    rng = np.random.default_rng(0)
    result: dict = dict(bench="paged_attention", layers=FLAGS.layers, kv_heads=FLAGS.kv_heads, q_per_kv=FLAGS.q_per_kv,
                        head_dim=FLAGS.head_dim, page_size=FLAGS.page_size, runs=FLAGS.runs, machine=bc.machine_info(), rows=[])
    for b in [int(x) for x in FLAGS.batch_sizes]:
        for ctx in [int(x) for x in FLAGS.contexts]:
            pool_mb = 2 * FLAGS.layers * _pool_pages(b, ctx)[1] * FLAGS.kv_heads * FLAGS.page_size * FLAGS.head_dim * 4 / 1e6
            if pool_mb > FLAGS.max_pool_mb:
                print(f"batch {b} x {ctx}: skipped (pools of {pool_mb:.0f} MB > --max_pool_mb)")
                continue
            args = _case(b, ctx, rng)
            outs = {n: np.asarray(fn(*args)) for n, fn in fns.items()}  # compile + warm-up
            times: dict[str, list[float]] = {n: [] for n in fns}
            for _ in range(FLAGS.runs):
                for n, fn in fns.items():
                    t = time.perf_counter()
                    jax.block_until_ready(fn(*args))
                    times[n].append(time.perf_counter() - t)
            kv_bytes = b * ctx * FLAGS.kv_heads * FLAGS.head_dim * 2 * 4  # keys + values read per layer
            row: dict = dict(batch=b, context=ctx, kv_mb_per_layer=kv_bytes / 1e6,
                             max_abs_diff=float(np.max(np.abs(outs["kernel"] - outs["xla"]))))
            for n, ts in times.items():
                us = statistics.median(ts) / FLAGS.layers * 1e6
                row[n] = dict(us_per_layer=us, kv_gbps=kv_bytes / us / 1e3, times_s=ts)
            row["kernel_speedup"] = row["xla"]["us_per_layer"] / row["kernel"]["us_per_layer"]
            result["rows"].append(row)
            print(f"batch {b:3d} x {ctx:5d} positions: kernel {row['kernel']['us_per_layer']:8.1f} us/layer "
                  f"({row['kernel']['kv_gbps']:5.1f} GB/s)  xla {row['xla']['us_per_layer']:8.1f} "
                  f"({row['xla']['kv_gbps']:5.1f} GB/s)  kernel {row['kernel_speedup']:.2f}x  max|diff| {row['max_abs_diff']:.1e}",
                  flush=True)
            bc.write_json(FLAGS.out, result)
    bc.write_json(FLAGS.out, result)


if __name__ == "__main__":
    app.run(main)
