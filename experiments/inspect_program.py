"""Compile the prefill and decode programs for a model + deployment and report, as JSON, the
per-device parameter and KV bytes and every collective (kind, groups, bytes, count per call).

  python experiments/inspect_program.py --mesh pp=2,tp=2
  python experiments/inspect_program.py --deployment pp2_tp4 --png /tmp/layout.png
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "HF checkpoint directory (default: the embedded tiny model).")
flags.DEFINE_string("mesh", "tp=2", "Mesh spec (ignored when --deployment is given).")
flags.DEFINE_string("deployment", None, "Deployment name in configs/deployments/ or a JSON path.")
flags.DEFINE_integer("batch", 4, "Decode/prefill batch.")
flags.DEFINE_integer("prompt_len", 32, "Prefill length.")
flags.DEFINE_integer("cache_len", 128, "Decode cache positions per row.")
flags.DEFINE_integer("steps", 8, "Decode steps per call (collectives are reported per step).")
flags.DEFINE_string("png", None, "Also draw the layout (which device holds which layers/heads) to this PNG.")
flags.DEFINE_string("out", None, "Write the JSON here too.")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import infire_jax
    from infire_jax.checkpoint import tiny
    from infire_jax.engine.inspect import inspect_model, layout_figure, layout_table

    model_dir = FLAGS.model_dir or tiny.ensure_default_model()
    kwargs = dict(deployment=FLAGS.deployment) if FLAGS.deployment else dict(mesh=FLAGS.mesh)
    model = infire_jax.load(model_dir, **kwargs)
    report = inspect_model(model.programs, FLAGS.batch, FLAGS.prompt_len, FLAGS.cache_len, FLAGS.steps)
    report["layout"] = layout_table(model.placed).splitlines()
    if FLAGS.png:
        layout_figure(model.placed, FLAGS.png)
        report["png"] = FLAGS.png
    text = json.dumps(report, indent=1)
    print(text)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    app.run(main)
