"""Llama 4 chunked layers on a ring: decode KV bytes and batch-1 decode speed against the context
length, for a tiny random Llama 4 (4 layers: 3 chunked, 1 global). decode tok/s = 64 / (time(72 new)
- time(8 new)), median of --runs; JSON out. Runs against whichever source tree holds it (so the
same file measures a checkout from before the ring, too).

  python experiments/bench_llama4_ring.py --contexts 128,1024,4096 --chunk 64
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FLAGS = flags.FLAGS
flags.DEFINE_list("contexts", ["128", "1024", "4096"], "Prompt lengths.")
flags.DEFINE_integer("chunk", 64, "attention_chunk_size.")
flags.DEFINE_integer("runs", 5, "Timed runs (median).")
flags.DEFINE_string("out", None, "JSON output path.")


def _model_dir(chunk: int, max_pos: int) -> str:
    import torch
    import transformers

    cfg = transformers.Llama4TextConfig(
        vocab_size=160, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=2, attention_chunk_size=chunk, no_rope_layers=[1, 1, 0, 1],
        max_position_embeddings=max_pos,
    )
    torch.manual_seed(0)
    out = tempfile.mkdtemp(prefix="llama4_ring_")
    transformers.Llama4ForCausalLM(cfg).save_pretrained(out)
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax
    import numpy as np

    import infire_jax
    from infire_jax.engine.disagg import Request
    from infire_jax.engine.sampling import SamplingParams

    contexts = [int(c) for c in FLAGS.contexts]
    model_dir = _model_dir(FLAGS.chunk, max(contexts) + 256)
    page = 16
    model = infire_jax.load(model_dir, page_size=page, kv_pages=(max(contexts) + 256) // page, max_decode_batch=1)
    worker = model.engine.decode_workers[0]
    kv_bytes = sum(x.nbytes for x in jax.tree.leaves((worker.k_pages, worker.v_pages)))
    rows = []
    for ctx in contexts:
        prompt = np.random.default_rng(ctx).integers(1, 160, ctx).tolist()

        def run(n):
            t0 = time.perf_counter()
            model.generate([prompt], max_new_tokens=n)
            return time.perf_counter() - t0

        run(8), run(72)  # compile
        times = [(run(72), run(8)) for _ in range(FLAGS.runs)]
        tok_s = statistics.median(64 / (a - b) for a, b in times)
        reserved = worker.pages_for(Request(0, np.asarray(prompt), SamplingParams(72), 0.0))
        rows.append(dict(context=ctx, decode_tok_s=round(tok_s, 1), pages_reserved=reserved))
        print(rows[-1], flush=True)
    out = dict(chunk=FLAGS.chunk, page_size=page, kv_page_bytes=kv_bytes, rows=rows)
    print(json.dumps(out))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    app.run(main)
