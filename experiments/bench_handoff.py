"""KV handoff bandwidth: one resharding transfer of a canonical KV batch from a prefill mesh to a
decode mesh of another layout, against an in-process copy of the same bytes (same sharding) and a
numpy copy into a preallocated buffer. Medians of --runs; JSON out.

  python experiments/bench_handoff.py --layers 30 --kv_heads 3 --head_dim 64 --batch 8 --seq 512
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 30, "KV layers (default: the SmolLM-135M shape).")
flags.DEFINE_integer("kv_heads", 4, "KV heads (a multiple of both tp sizes).")
flags.DEFINE_integer("head_dim", 64, "Head dim.")
flags.DEFINE_integer("batch", 8, "Requests in the prefill batch.")
flags.DEFINE_integer("seq", 512, "Padded prompt length.")
flags.DEFINE_string("prefill_mesh", "pp=2,tp=2@0-3", "Source mesh.")
flags.DEFINE_string("decode_mesh", "tp=4@4-7", "Destination mesh.")
flags.DEFINE_integer("runs", 7, "Timed runs (median).")
flags.DEFINE_string("out", None, "JSON output path.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np

    from infire_jax.kv import transfer
    from infire_jax.mesh import make_mesh
    from infire_jax.sharding import Layout

    axes = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")
    shape = (FLAGS.layers, FLAGS.batch, FLAGS.kv_heads, FLAGS.seq, FLAGS.head_dim)
    src, dst = Layout(make_mesh(FLAGS.prefill_mesh)), Layout(make_mesh(FLAGS.decode_mesh))
    src_sh, dst_sh = src.sharding(axes, shape), dst.sharding(axes, shape)
    k = jax.device_put(np.random.default_rng(0).standard_normal(shape, np.float32), src_sh)
    v = jax.device_put(np.random.default_rng(1).standard_normal(shape, np.float32), src_sh)
    spec = transfer.KVSpec("bench", shape[0], (shape[2],) * 2, (shape[4],) * 2, "float32", axes)
    nbytes = 2 * k.nbytes

    def timed(fn):
        fn()
        ts = []
        for _ in range(FLAGS.runs):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    copy = jax.jit(lambda a, b: (a + 0, b + 0), out_shardings=(src_sh, src_sh))  # same-mesh copy
    t_handoff = timed(lambda: transfer.handoff((k, v), spec, spec, (dst_sh, dst_sh)))
    t_copy = timed(lambda: copy(k, v))
    host_src = [np.asarray(k), np.asarray(v)]
    host_dst = [np.empty_like(a) for a in host_src]
    t_numpy = timed(lambda: [np.copyto(d, s) for d, s in zip(host_dst, host_src)])
    moved = transfer.handoff((k, v), spec, spec, (dst_sh, dst_sh))
    assert np.array_equal(np.asarray(moved[0]), host_src[0])
    gib = nbytes / 2**30
    report = dict(
        shape=shape, bytes=nbytes, prefill_mesh=FLAGS.prefill_mesh, decode_mesh=FLAGS.decode_mesh,
        handoff_s=t_handoff, in_process_copy_s=t_copy, numpy_copy_s=t_numpy,
        handoff_gib_s=gib / t_handoff, in_process_copy_gib_s=gib / t_copy, numpy_copy_gib_s=gib / t_numpy,
        handoff_vs_copy=t_copy / t_handoff,
    )
    print(json.dumps(report, indent=1))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    app.run(main)
