"""Write a deterministic tiny Hugging Face checkpoint (see infire_jax.checkpoint.tiny).

  python experiments/make_tiny_checkpoint.py --out /tmp/tiny --preset tiny-qwen3 \
      --override num_hidden_layers=5 --override 'rope_scaling=null'
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from infire_jax.checkpoint import tiny  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_enum("preset", tiny.DEFAULT_PRESET, sorted(tiny.PRESETS), "Model preset.")
flags.DEFINE_integer("seed", 0, "Weight seed.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Stored weight dtype.")
flags.DEFINE_integer("shard_max_bytes", None, "Split weights into shards of at most this many bytes.")
flags.DEFINE_multi_string("override", [], "Config override key=value; value parsed as JSON, else a string.")
flags.DEFINE_bool("tokenizer", True, "Also write tokenizer.json / tokenizer_config.json.")


def parse_overrides(items: list[str]) -> dict:
    """`key=value` pairs; JSON values (5, 1e4, true, null, {...}) are decoded, anything else is a string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise app.UsageError(f"--override expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str]) -> None:
    del argv
    path = tiny.write_tiny_checkpoint(
        FLAGS.out, FLAGS.preset, seed=FLAGS.seed, dtype=FLAGS.dtype, shard_max_bytes=FLAGS.shard_max_bytes,
        tokenizer=FLAGS.tokenizer, overrides=parse_overrides(FLAGS.override))
    print(path)


if __name__ == "__main__":
    app.run(main)
