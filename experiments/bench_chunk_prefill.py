"""Prefill over a cached prefix (Programs.chunk_fn) against the whole-prompt prefill, SmolLM-135M shape.

A conversation turn of --history cached tokens plus --new new tokens (one row, float32, the CPU kernels
as the engine uses them):
  whole       prefill_fn over all history + new tokens: the time to first token without a cache
              (the CPU causal prefill kernel attends);
  cached      chunk_fn over the new tokens at start = history, attending to the history's pages:
              the time to first token with a prefix cache;
  fresh       chunk_fn over the same new tokens at start = 0 (no history): `cached - fresh` is what
              attending to the cached pages costs;
  speedup     whole / cached (the agent-trace acceptance asks >= 5x for turns >= 2).
and one layer's attention of the chunk over the cached pages alone (models/attention.py gqa_attention
with a paged cache), by the CPU kernel (kernels/cpu.py paged_prefill_attention) and by XLA (the pages
gathered into a contiguous cache, every score materialised).
Paired: every figure of a row is timed in the same run, alternating, medians of --runs quiet runs.

  python experiments/bench_chunk_prefill.py --history=512,2048,4096 --new=256 --out=/tmp/bench_chunk.json
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import bench_common as bc  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "HF checkpoint (default: the smollm-135m preset under ~/.cache/infire_jax/bench/).")
flags.DEFINE_list("history", ["512", "2048", "4096"], "Cached tokens before the new ones.")
flags.DEFINE_integer("new", 256, "New tokens of the turn (one chunk).")
flags.DEFINE_integer("page_size", 16, "KV page size.")
flags.DEFINE_integer("runs", 3, "Timed runs per figure (median reported), after one warm-up run.")
flags.DEFINE_string("kernels", "auto", "auto (infire_jax's CPU kernels) or xla, for the whole-model figures.")
flags.DEFINE_boolean("model", True, "Time the whole model (else only the attention of one layer).")
flags.DEFINE_string("out", "bench_chunk_prefill.json", "JSON output path.")


def attention_figures(cfg, history: int, new: int, page: int, runs: int) -> dict:
    """One layer's attention of `new` tokens over `history` cached positions: the CPU kernel vs XLA."""
    import jax
    import jax.numpy as jnp

    from infire_jax.engine.programs import bucket
    from infire_jax.mesh import make_mesh
    from infire_jax.models.attention import PagedLayerCache, gqa_attention
    from infire_jax.sharding import Layout, use_layout

    rng = np.random.default_rng(history)
    kv, h, hd = cfg.num_kv_heads, cfg.num_heads, cfg.head_dim
    per_row = bucket(-(-(history + new) // page))
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
    q, k_new, v_new = f(1, new, h, hd) / np.sqrt(hd), f(1, new, kv, hd), f(1, new, kv, hd)
    k_pages, v_pages = f(1, per_row, kv, page, hd), f(1, per_row, kv, page, hd)
    table, start = jnp.arange(per_row, dtype=jnp.int32)[None], jnp.int32([history])
    out = {}
    fns = {}
    for kernels in ("auto", "xla"):
        layout = Layout(make_mesh("tp=1"), kernels=kernels)

        def attend(q, k_new, v_new, k_pages, v_pages, table, start, layout=layout):
            with use_layout(layout):
                return gqa_attention(q, k_new, v_new, start, PagedLayerCache(k_pages, table, 0), PagedLayerCache(v_pages, table, 0))

        fn = jax.jit(attend)
        args = (q, k_new, v_new, k_pages, v_pages, table, start)
        fns[kernels] = lambda fn=fn, args=args: fn(*args).block_until_ready()
        fns[kernels]()
    times: dict[str, list] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            times[name].append(bc.quiet_runs(fn, 1, warmup=0, max_runs=3, budget_s=10)["median"])
    med = {("kernel" if k == "auto" else "xla"): float(np.median(v)) for k, v in times.items()}
    flops = 4 * new * (history + new / 2) * h * hd
    out = dict(seconds=med, gflops={k: flops / v / 1e9 for k, v in med.items()}, xla_over_kernel=med["xla"] / med["kernel"])
    print(f"  attention of one layer: kernel {med['kernel'] * 1e3:.1f} ms, xla {med['xla'] * 1e3:.1f} ms "
          f"({out['xla_over_kernel']:.1f}x)")
    return out


def main(argv: list[str]) -> None:
    del argv
    from infire_jax.loader import make_layout, place_model
    from infire_jax.engine.programs import Programs, bucket
    from infire_jax.engine.sampling import SamplingParams, pack_params

    model_dir = FLAGS.model_dir or str(bc.ensure_model())
    programs = Programs(place_model(model_dir, make_layout("tp=1", kernels=FLAGS.kernels)))
    p, state, page, new = programs, programs.placed.state, FLAGS.page_size, FLAGS.new
    vocab = p.placed.cfg.vocab_size
    result: dict = dict(bench="chunk_prefill", model_dir=model_dir, new=new, page_size=page, kernels=FLAGS.kernels,
                        machine=bc.machine_info(), rows=[])
    sp = p.put_sampling(pack_params([SamplingParams(1)], 1))
    for history in map(int, FLAGS.history):
        total = history + new
        print(f"history {history} + {new}:")
        attention = attention_figures(p.placed.cfg, history, new, page, FLAGS.runs)
        if not FLAGS.model:
            result["rows"].append(dict(history=history, new=new, attention=attention))
            bc.write_json(FLAGS.out, result)
            continue
        tokens = np.random.default_rng(history).integers(3, vocab, (1, total)).astype(np.int32)
        per_row = bucket(-(-total // page))
        pages = p.allocate_pages(per_row, page)
        table = np.arange(per_row, dtype=np.int32)[None]
        c = bucket(new, 16)

        def chunk(start: int, n: int, tokens_row: np.ndarray):
            nonlocal pages
            padded = np.zeros((1, bucket(n, 16)), np.int32)
            padded[0, :n] = tokens_row
            fn = p.chunk_fn(1, padded.shape[1], per_row, per_row, page)
            tok, _, *pages = fn(state, *pages, table, np.int32([start]), np.int32([n]), padded, sp)
            return int(np.asarray(tok)[0])

        # the history's KV, written by chunks of `c` (as a chunked prefill would)
        for s in range(0, history, c):
            chunk(s, min(c, history - s), tokens[0, s : min(s + c, history)])
        t = bucket(total, 16)
        whole_tokens = np.zeros((1, t), np.int32)
        whole_tokens[0, :total] = tokens[0]
        prefill = p.prefill_fn(1, t)
        tok_arg, len_arg = p.put(whole_tokens, ("batch", "seq")), p.put(np.int32([total]), ("batch",))

        def whole():
            first, _, k, v = prefill(state, tok_arg, len_arg, sp)
            k.block_until_ready()
            return int(np.asarray(first)[0])

        t0 = time.perf_counter()
        want = whole()
        compile_whole = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = chunk(history, new, tokens[0, history:])
        compile_chunk = time.perf_counter() - t0
        figures = {
            "whole": whole,
            "cached": lambda: chunk(history, new, tokens[0, history:]),
            "fresh": lambda: chunk(0, new, tokens[0, history:]),
        }
        times: dict[str, list] = {k: [] for k in figures}
        for _ in range(FLAGS.runs):  # paired: alternate the figures run by run
            for name, fn in figures.items():
                times[name].append(bc.quiet_runs(fn, 1, warmup=0, max_runs=3, budget_s=30)["median"])
        chunk(history, new, tokens[0, history:])  # the history's pages again (fresh wrote over them)
        med = {k: float(np.median(v)) for k, v in times.items()}
        row = dict(history=history, new=new, total=total, same_first_token=want == got,
                   seconds=med, times=times, first_call_s=dict(whole=compile_whole, chunk=compile_chunk),
                   speedup=med["whole"] / med["cached"], cached_attention_s=med["cached"] - med["fresh"], attention=attention,
                   whole_tok_s=total / med["whole"], cached_new_tok_s=new / med["cached"])
        result["rows"].append(row)
        print(f"  whole {med['whole']:.3f} s, cached {med['cached']:.3f} s "
              f"(fresh {med['fresh']:.3f} s), speedup {row['speedup']:.1f}x, same token {want == got}")
        bc.write_json(FLAGS.out, result)


if __name__ == "__main__":
    app.run(main)
