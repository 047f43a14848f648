"""Generate text with infire_jax: the project's main job.

With no --model_dir it builds the embedded default (a tiny Llama with deterministic random weights
and an offline-trained tokenizer, written once in HF format under ~/.cache/infire_jax) and loads it
through the same path as a real checkpoint. Its output is fluent nonsense: the weights are random.

  python experiments/generate.py --prompt "The weather today" --max_new_tokens 32
  python experiments/generate.py --model_dir /path/to/hf_model --mesh pp=2,tp=2 --temperature 0.7
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flags_common  # noqa: E402  (experiments/flags_common.py)

FLAGS = flags.FLAGS
flags_common.define_model_flags()
flags.DEFINE_multi_string("prompt", ["The weather today is"], "Prompt text (repeat for a batch).")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "0 = no top-k cut.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling threshold in (0, 1].")
flags.DEFINE_integer("seed", 0, "Sampling seed (request i uses seed + i).")
flags.DEFINE_string("mesh", "tp=1", "Mesh spec, e.g. 'tp=2' or 'pp=2,tp=2@0-3'.")
flags.DEFINE_string("prefill_mesh", None, "Disaggregated: prefill mesh, e.g. 'pp=2,tp=2@0-3' (with --decode_mesh).")
flags.DEFINE_string("decode_mesh", None, "Disaggregated: decode mesh on other devices, e.g. 'tp=4@4-7'.")
flags.DEFINE_integer("devices", None, "Simulated CPU devices (default: as many as the mesh needs).")
flags.DEFINE_bool("warmup", True, "Compile the programs these prompts need before the first request.")
flags_common.define_compilation_cache_flag()
flags_common.define_speculative_flag()

flags.adopt_module_key_flags(flags_common)  # --help lists the shared flags too

def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    from infire_jax import boot

    with boot.gc_paused():  # imports: long-lived objects only
        specs = [m for m in (FLAGS.mesh, FLAGS.prefill_mesh, FLAGS.decode_mesh) if m]
        needed = FLAGS.devices or flags_common.devices_needed(specs)
        cache_dir = flags_common.start_boot("generate.py", needed, ("model_dir", "dtype", "mesh", "prefill_mesh",
                                                                    "decode_mesh", "devices", "speculative"))
        from infire_jax import load  # imports flax, the models and the engine (the programs load meanwhile)
        from infire_jax.checkpoint import tiny

    model_dir = FLAGS.model_dir or tiny.ensure_default_model()
    t0 = time.perf_counter()
    load_started, load_started_cpu = boot.clock.since_start(t0), time.process_time()
    placement = (
        dict(prefill_mesh=FLAGS.prefill_mesh, decode_mesh=FLAGS.decode_mesh)
        if FLAGS.prefill_mesh or FLAGS.decode_mesh
        else dict(mesh=FLAGS.mesh)
    )
    model = load(model_dir, dtype=FLAGS.dtype, compilation_cache_dir=cache_dir,
                 speculative=FLAGS.speculative or None, **placement)
    load_s = time.perf_counter() - t0
    sampling = dict(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)
    warmup = model.warm_up([len(model.encode(p)) for p in FLAGS.prompt], FLAGS.max_new_tokens) if FLAGS.warmup else None

    t0 = time.perf_counter()
    texts = model.generate_text(FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens, **sampling)
    first_s = time.perf_counter() - t0  # includes compiling the prefill and decode programs (without --warmup)
    t0 = time.perf_counter()
    texts = model.generate_text(FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens, **sampling)
    warm_s = time.perf_counter() - t0

    for prompt, text in zip(FLAGS.prompt, texts):
        print(f"--- {prompt!r}\n{prompt}{text}")
    stats = dict(
        model_dir=str(model_dir),
        placement={k: str(v) for k, v in placement.items()},
        load_seconds=round(load_s, 3),
        first_call_seconds=round(first_s, 3),
        warm_call_seconds=round(warm_s, 3),
        prompts=len(FLAGS.prompt),
        max_new_tokens=FLAGS.max_new_tokens,
        compilation_cache_dir=str(cache_dir) if cache_dir else None,
        warmup={k: round(v, 3) for k, v in warmup.items()} if warmup else None,
        boot=boot.clock.report(),
    )
    if stats["boot"]["first_token_s"] is not None:  # the boot after Python's and JAX's imports
        stats["load_to_first_token_s"] = round(stats["boot"]["first_token_s"] - load_started, 4)
    stats["before_load_cpu_s"] = round(load_started_cpu, 4)  # CPU seconds of the imports etc. (load-independent)
    print(json.dumps(stats))


if __name__ == "__main__":
    app.run(main)
