"""Compile the prefill and decode programs for a model + deployment and report, as JSON, the
per-device parameter and KV bytes (routed experts separately for MoE models: bytes held, what bf16
would hold, their ratio) and every collective (kind, groups, mesh axes, bytes, count per call).

  python experiments/inspect_program.py --mesh pp=2,tp=2
  python experiments/inspect_program.py --deployment pp2_tp4 --png /tmp/layout.png
  python experiments/inspect_program.py --model_dir path/to/compressed_moe --mesh ep=2 --dtype bfloat16
  python experiments/inspect_program.py --mesh pp=2,tp=2 --trace_dir /tmp/trace   # then: tensorboard --logdir
      /tmp/trace, or open /tmp/trace/plugins/profile/<run>/perfetto_trace.json.gz in ui.perfetto.dev

--png draws infire_jax.viz.layout_figure: the mesh (pp rows, tp columns), each device's slices and memory
bar, and the collectives per step, from the same numbers as the JSON.
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
flags.DEFINE_string("dtype", "float32", "Storage dtype of the weights that stay raw (infire_jax.load's dtype).")
flags.DEFINE_integer("batch", 4, "Decode/prefill batch.")
flags.DEFINE_integer("prompt_len", 32, "Prefill length.")
flags.DEFINE_integer("cache_len", 128, "Decode cache positions per row.")
flags.DEFINE_integer("steps", 8, "Decode steps per call (collectives are reported per step).")
flags.DEFINE_string("png", None, "Also draw the layout figure (infire_jax.viz.layout_figure) to this PNG.")
flags.DEFINE_string("hardware", None, "Draw each device's memory bar against this hardware's memory (h100, h200, cpu).")
flags.DEFINE_string("trace_dir", None, "Also run one prefill and a few decode steps under jax.profiler into this "
                    "directory (TensorBoard's profile plugin / Perfetto).")
flags.DEFINE_integer("trace_decode_calls", 2, "Decode calls (of --steps tokens each) in the trace.")
flags.DEFINE_string("out", None, "Write the JSON here too.")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import infire_jax
    from infire_jax import viz
    from infire_jax.checkpoint import tiny
    from infire_jax.engine.inspect import inspect_model, layout_table

    model_dir = FLAGS.model_dir or tiny.ensure_default_model()
    kwargs = dict(deployment=FLAGS.deployment) if FLAGS.deployment else dict(mesh=FLAGS.mesh)
    model = infire_jax.load(model_dir, dtype=FLAGS.dtype, decode_steps=FLAGS.steps, **kwargs)
    report = inspect_model(model.programs, FLAGS.batch, FLAGS.prompt_len, FLAGS.cache_len, FLAGS.steps)
    report["layout"] = layout_table(model.placed).splitlines()
    data = viz.measured_layout(model.programs, report=report, hardware=FLAGS.hardware)
    report["weight_bytes_per_device_by_kind"] = {d.device: d.weights for d in data.devices}
    if FLAGS.png:
        viz.layout_figure(data).savefig(FLAGS.png)
        report["png"] = FLAGS.png
    if FLAGS.trace_dir:
        files = viz.write_trace(model, FLAGS.trace_dir, prompt_len=FLAGS.prompt_len, decode_calls=FLAGS.trace_decode_calls)
        report["trace_files"] = [str(f) for f in files]
    text = json.dumps(report, indent=1)
    print(text)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    app.run(main)
