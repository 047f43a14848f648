"""Fingerprints (sha256 of the lowered StableHLO) of the prefill and decode programs per mesh: run it on
two checkouts to show a refactor left the compiled programs, and so their speed and outputs, unchanged.

  PYTHONPATH=/path/to/checkout_a python experiments/program_fingerprints.py --out=a.json
  PYTHONPATH=/path/to/checkout_b python experiments/program_fingerprints.py --out=b.json && diff a.json b.json
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

from absl import app, flags

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # PYTHONPATH picks the checkout

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "HF checkpoint directory (default: the embedded tiny model).")
flags.DEFINE_list("meshes", ["tp=1", "tp=2", "pp=2,tp=2"], "Meshes whose programs are fingerprinted.")
flags.DEFINE_integer("batch", 2, "Rows (padded to the bucket).")
flags.DEFINE_integer("prompt_len", 32, "Prompt bucket of the prefill program.")
flags.DEFINE_integer("pages_per_row", 4, "Page-table width of the decode program.")
flags.DEFINE_string("out", None, "Also write the JSON here.")


def main(argv) -> None:
    del argv
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np

    import infire_jax
    from infire_jax.checkpoint import tiny

    model_dir = FLAGS.model_dir or tiny.ensure_default_model()
    digest = lambda lowered: hashlib.sha256(lowered.as_text().encode()).hexdigest()[:16]  # noqa: E731
    out = {"package": os.path.dirname(infire_jax.__file__)}
    for mesh in FLAGS.meshes:
        model = infire_jax.load(model_dir, mesh=mesh)
        p, worker = model.programs, model.engine.decode_workers[0]
        b, t = p.batch_bucket(FLAGS.batch), FLAGS.prompt_len
        row = lambda dtype: jax.ShapeDtypeStruct((b,), dtype)  # noqa: E731
        sp = {k: row(np.float32 if k in ("temperature", "top_p") else np.int32) for k in ("temperature", "top_k", "top_p", "seed")}
        prefill = p.prefill_fn(b, t).lower(p.placed.state, jax.ShapeDtypeStruct((b, t), np.int32), row(np.int32), sp)
        groups = len(p.unpack(worker.k_pages))  # one page table per KV cache group (Llama 4: ring and full)
        pages, table = FLAGS.pages_per_row, jax.ShapeDtypeStruct((b, FLAGS.pages_per_row), np.int32)
        decode = p.decode_fn(b, p.pack([pages] * groups), *worker._geometry, p.decode_steps, False).lower(
            p.placed.state, worker.k_pages, worker.v_pages, p.pack([table] * groups),
            row(np.int32), row(np.int32), row(bool), sp,
        )
        out[mesh] = dict(prefill=digest(prefill), decode=digest(decode))
    text = json.dumps(out, indent=1)
    print(text)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
