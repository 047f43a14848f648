"""Flags shared by the scripts that run a deployment (generate, serve_offline, batch_generate, launch_pd):
one definition each, and one conversion into the engine's options (engine/build.py EngineOptions).

A script calls the `define_*` functions at import time, before absl parses the command line.
"""

from __future__ import annotations

from absl import flags

FLAGS = flags.FLAGS


def define_model_flags() -> None:
    """--model_dir and --dtype."""
    flags.DEFINE_string("model_dir", None, "HF checkpoint directory (default: the embedded tiny model).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Weight storage dtype.")


def define_compilation_cache_flag() -> None:
    """--compilation_cache_dir: JAX's persistent compilation cache of the deployment's processes
    (this one, and the worker processes of a multi-process deployment)."""
    flags.DEFINE_string("compilation_cache_dir", "default", "JAX's persistent compilation cache, every program "
                        "cached ('default': ~/.cache/infire_jax/xla/<cpu>; '' = off; infire_jax/boot.py).")


def define_speculative_flag() -> None:
    """--speculative: speculative decoding on the decode workers (engine/speculative.py)."""
    flags.DEFINE_string("speculative", None, "Speculative decoding: 'ngram:K' (prompt lookup, up to K draft tokens "
                        "per step, verified exactly; switches itself off where it does not pay), 'draft:DIR:K' (a "
                        "draft checkpoint) or 'eagle3:DIR:K' (an EAGLE-3 head). Default: off.")


def define_engine_flags(kv_pages: int = 512) -> None:
    """The workers' KV capacity, batching and prefix cache: --kv_pages, --page_size, --max_decode_batch,
    --decode_steps, --prefix_cache, --prefill_chunk, --speculative."""
    define_speculative_flag()
    flags.DEFINE_integer("kv_pages", kv_pages, "KV pages per worker (decode: its cache; prefill: its prefix cache).")
    flags.DEFINE_integer("page_size", 16, "Tokens per KV page (a power of two <= 16).")
    flags.DEFINE_integer("max_decode_batch", 16, "Continuous batch bound per decode worker (and rows per prefill batch).")
    flags.DEFINE_integer("decode_steps", 8, "Decode steps per dispatch.")
    flags.DEFINE_bool("prefix_cache", True, "Keep finished requests' KV pages indexed by their tokens, so a prompt that "
                      "starts with them computes only the rest (and in P/D only the pages a decode worker lacks cross); "
                      "--noprefix_cache computes every prompt from position 0.")
    flags.DEFINE_integer("prefill_chunk", 512, "Prompt tokens per prefill call: a longer prompt is prefilled in chunks "
                         "between decode steps (P/D: its pages cross chunk by chunk); 0 = whole prompts.")


def define_worker_flags() -> None:
    """Where the model runs: --mesh (colocated) or --prefill_workers / --decode_workers (N:M workers)."""
    flags.DEFINE_string("mesh", "tp=1", "Colocated mesh (used when no worker lists are given).")
    flags.DEFINE_string("prefill_workers", None, "';'-separated mesh specs, one per prefill worker.")
    flags.DEFINE_string("decode_workers", None, "';'-separated mesh specs, one per decode worker.")


def worker_specs(mesh: str | None = None) -> tuple[list[str], list[str]]:
    """(prefill specs, decode specs) from --prefill_workers / --decode_workers, else `mesh` (or --mesh)
    for both roles (one colocated placement)."""
    if bool(FLAGS.prefill_workers) != bool(FLAGS.decode_workers):
        raise flags.ValidationError("give both --prefill_workers and --decode_workers, or neither (colocated --mesh)")
    if FLAGS.prefill_workers:
        return [s for s in FLAGS.prefill_workers.split(";") if s], [s for s in FLAGS.decode_workers.split(";") if s]
    mesh = mesh or FLAGS.mesh
    return [mesh], [mesh]


ENGINE_FLAGS = ("decode_steps", "kv_pages", "page_size", "max_decode_batch", "prefix_cache", "prefill_chunk", "speculative")


def devices_needed(specs: list[str]) -> int:
    """Simulated CPU devices the mesh specs need (the highest device they name, or their size)."""
    from infire_jax.mesh import parse_mesh

    need = 1
    for spec in specs:
        m = parse_mesh(spec)
        need = max(need, (m.last_device + 1) if m.last_device is not None else m.num_devices)
    return need


def start_boot(script: str, devices: int, flag_names: tuple[str, ...] | list[str], **more: object):
    """A deployment script's boot: `devices` simulated CPU devices (only the CPU backend reads this), JAX's
    persistent compilation cache (--compilation_cache_dir), and the compiled programs the last run of
    this deployment used loading on background threads (infire_jax.executables.prefetch) while the
    script imports the rest. The deployment is named by the script, the values of `flag_names` (the flags
    that decide its programs) and `more`. Returns the compilation cache directory (None: off)."""
    import jax

    from infire_jax import boot, executables

    jax.config.update("jax_num_cpu_devices", max(devices, 1))
    cache_dir = boot.use_compilation_cache(FLAGS.compilation_cache_dir or None)  # before anything compiles
    values = [f"--{name}={FLAGS[name].value}" for name in flag_names] + [f"{k}={v}" for k, v in sorted(more.items())]
    executables.prefetch(" ".join([script, *values]))
    return cache_dir


def engine_options():
    """EngineOptions from the engine flags."""
    from infire_jax.engine.build import EngineOptions

    return EngineOptions(
        decode_steps=FLAGS.decode_steps, kv_pages=FLAGS.kv_pages, page_size=FLAGS.page_size,
        max_decode_batch=FLAGS.max_decode_batch, prefix_cache=FLAGS.prefix_cache,
        prefill_chunk=FLAGS.prefill_chunk or None, speculative=FLAGS.speculative or None,
    )
