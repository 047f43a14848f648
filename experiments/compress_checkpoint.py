"""Compress a bf16 (or fp32/fp16, rounded to bf16) Hugging Face checkpoint for infire_jax.load.

  python experiments/compress_checkpoint.py --src=HF_DIR --dst=DIR

Writes DIR/weights-*.ijxc (Huffman distribution format, raw where it does not pay, CRC32 per
tensor), DIR/manifest.json (per-tensor kind/shape/dtype/bytes/ratio and whole-model ratios) and
copies config.json and the tokenizer files. `infire_jax.load(DIR)` then runs with the layer
weights kept in the 12-bit runtime format on the device. Format: infire_jax/checkpoint/compressed.py.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

from infire_jax.checkpoint.compressed import compress_checkpoint  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "Hugging Face checkpoint directory (config.json + *.safetensors).")
flags.DEFINE_string("dst", None, "New output directory (must not exist or be empty).")
flags.DEFINE_integer("container_max_mb", 2048, "Start a new container file past this many MiB.")
flags.DEFINE_bool("runtime_ratio", True, "Also measure each tensor's palette12 (runtime format) ratio.")
flags.DEFINE_bool("verbose", False, "Print one line per tensor.")
flags.mark_flags_as_required(["src", "dst"])


def main(argv):
    del argv
    t0 = time.perf_counter()

    def report(name, entry):
        if FLAGS.verbose:
            print(f"{name:60s} {str(tuple(entry['shape'])):18s} {entry['kind']:8s} {entry['ratio']:.4f}", flush=True)

    manifest = compress_checkpoint(
        FLAGS.src, FLAGS.dst, container_max_bytes=FLAGS.container_max_mb << 20,
        runtime_ratio=FLAGS.runtime_ratio, on_tensor=report,
    )
    summary = dict(
        dst=FLAGS.dst, seconds=round(time.perf_counter() - t0, 2), containers=manifest["containers"],
        source=manifest["source"], totals=manifest["totals"],
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    app.run(main)
