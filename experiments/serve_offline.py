"""Run a list of prompts through a deployment (colocated, or N prefill : M decode workers on disjoint
device ranges) and write per-request metrics and aggregate throughput as JSON.

  python experiments/serve_offline.py --num_requests 64                       # colocated, tp=1
  python experiments/serve_offline.py --prefill_workers "tp=1@0;tp=1@1" --decode_workers "tp=2@2-3"
  python experiments/serve_offline.py --prompts_file prompts.jsonl --out /tmp/metrics.json
  python experiments/serve_offline.py --multiprocess --prefill_workers "tp=2" --decode_workers "tp=1;tp=1"

--prompts_file holds one JSON object per line with "prompt" (text) or "tokens" (ids), optional
"max_tokens". Without it, random token prompts of --min_len..--max_len tokens are generated (seeded).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flags_common  # noqa: E402  (experiments/flags_common.py)

FLAGS = flags.FLAGS
flags_common.define_model_flags()
flags_common.define_worker_flags()
flags_common.define_engine_flags()
flags.DEFINE_string("prompts_file", None, "JSONL prompts (see module doc).")
flags.DEFINE_integer("num_requests", 32, "Random prompts when no --prompts_file.")
flags.DEFINE_integer("min_len", 4, "Random prompt length range.")
flags.DEFINE_integer("max_len", 64, "Random prompt length range.")
flags.DEFINE_integer("max_new_tokens", 32, "Default generation length.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("seed", 0, "Prompt and sampling seed.")
flags.DEFINE_bool("warmup", True, "Run the workload once first so the timed run excludes compilation.")
flags.DEFINE_bool("multiprocess", False, "Run each worker as its own OS process on 127.0.0.1 (KV over "
                  "jax.experimental.transfer; mesh specs then refer to each process's own devices).")
flags.DEFINE_float("timeout", 600.0, "Multi-process: seconds before unfinished requests fail.")
flags.DEFINE_string("out", None, "Write the metrics JSON here.")
flags_common.define_compilation_cache_flag()

flags.adopt_module_key_flags(flags_common)  # --help lists the shared flags too

def build_engine(model_dir, prefill_specs, decode_specs):
    from infire_jax.engine.build import build_engine as build

    return build(model_dir, prefill_specs, decode_specs, dtype=FLAGS.dtype, options=flags_common.engine_options())


def load_requests(vocab: int, tokenize) -> list[tuple[list[int], int]]:
    import numpy as np

    if FLAGS.prompts_file:
        out = []
        with open(FLAGS.prompts_file) as f:
            for line in f:
                if line.strip():
                    item = json.loads(line)
                    ids = item["tokens"] if "tokens" in item else tokenize(item["prompt"])
                    out.append((ids, int(item.get("max_tokens", FLAGS.max_new_tokens))))
        return out
    rng = np.random.default_rng(FLAGS.seed)
    return [
        (rng.integers(0, vocab, int(rng.integers(FLAGS.min_len, FLAGS.max_len + 1))).tolist(), FLAGS.max_new_tokens)
        for _ in range(FLAGS.num_requests)
    ]


def run(engine, requests) -> tuple[list[dict], dict]:
    engine.requests.clear()
    engine.reset_stats()
    for i, (ids, n) in enumerate(requests):
        engine.submit(ids, dict(max_new_tokens=n, temperature=FLAGS.temperature, seed=FLAGS.seed + i), request_id=i)
    engine.run()
    metrics = [r.metrics() for r in engine.requests.values()]
    return metrics, engine.stats()


def run_multiprocess(model_dir, prefill_specs, decode_specs, vocab: int, tokenize) -> tuple[list[dict], dict]:
    """The same workload through worker processes (engine/remote.py); one timed run."""
    from infire_jax.engine.remote import RemoteEngine, WorkerConfig

    cache = dict(page_size=FLAGS.page_size, num_pages=FLAGS.kv_pages, prefix_cache=FLAGS.prefix_cache)
    prefill = [
        WorkerConfig("prefill", f"prefill{i}", mesh=s, dtype=FLAGS.dtype, prefill_chunk=FLAGS.prefill_chunk or None,
                     **cache)
        for i, s in enumerate(prefill_specs)
    ]
    decode = [
        WorkerConfig("decode", f"decode{i}", mesh=s, dtype=FLAGS.dtype, decode_steps=FLAGS.decode_steps,
                     max_batch=FLAGS.max_decode_batch, speculative=FLAGS.speculative or None, **cache)
        for i, s in enumerate(decode_specs)
    ]
    requests = load_requests(vocab, tokenize)
    cache_dir = FLAGS.compilation_cache_dir or None
    with RemoteEngine(str(model_dir), prefill, decode, compilation_cache_dir=cache_dir) as engine:
        params = lambda i, n: dict(max_new_tokens=n, temperature=FLAGS.temperature, seed=FLAGS.seed + i)  # noqa: E731
        if FLAGS.warmup:
            warm = [engine.submit(ids, params(i, n)) for i, (ids, n) in enumerate(requests)]
            engine.run(FLAGS.timeout)
            del warm
        reqs = [engine.submit(ids, params(i, n)) for i, (ids, n) in enumerate(requests)]
        t0 = time.perf_counter()
        engine.run(FLAGS.timeout)
        wall = time.perf_counter() - t0
        metrics = [r.metrics() for r in reqs]
        generated = sum(m["generated_tokens"] for m in metrics)
        stats = dict(engine.stats(), requests=len(reqs), failed=sum(m["status"] == "failed" for m in metrics),
                     generated_tokens=generated, wall_s=wall, tokens_per_s=generated / wall if wall else 0.0)
    return metrics, stats


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    prefill_specs, decode_specs = flags_common.worker_specs()
    if FLAGS.multiprocess:
        from infire_jax.checkpoint import tiny
        from infire_jax.config import load_config

        model_dir = FLAGS.model_dir or tiny.ensure_default_model()
        from tokenizers import Tokenizer

        tok_path = os.path.join(model_dir, "tokenizer.json")
        tokenizer = Tokenizer.from_file(tok_path) if os.path.isfile(tok_path) else None
        tokenize = (lambda text: tokenizer.encode(text).ids) if tokenizer else None
        metrics, stats = run_multiprocess(model_dir, prefill_specs, decode_specs, load_config(model_dir).vocab_size, tokenize)
        _report(metrics, stats, prefill_specs, decode_specs)
        return
    from infire_jax import boot

    with boot.gc_paused():  # imports: long-lived objects only
        flags_common.start_boot("serve_offline.py", flags_common.devices_needed(prefill_specs + decode_specs),
                                ("model_dir", "dtype", *flags_common.ENGINE_FLAGS), prefill=prefill_specs,
                                decode=decode_specs)
        from infire_jax.checkpoint import tiny
        from infire_jax.engine import build  # noqa: F401  (the engine's modules, imported while programs load)

    model_dir = FLAGS.model_dir or tiny.ensure_default_model()
    engine = build_engine(model_dir, prefill_specs, decode_specs)
    tokenizer = None

    def tokenize(text):
        nonlocal tokenizer
        if tokenizer is None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        return tokenizer.encode(text).ids

    requests = load_requests(engine.vocab_size, tokenize)
    if FLAGS.warmup:  # the workload itself: every program the timed run uses (its tokens are not the first)
        with boot.clock.warming_up():
            run(engine, requests)
    metrics, stats = run(engine, requests)
    _report(metrics, stats, prefill_specs, decode_specs, boot.clock.report())


def _report(metrics: list[dict], stats: dict, prefill_specs: list[str], decode_specs: list[str],
            boot: dict | None = None) -> None:
    done = [m for m in metrics if m["status"] == "done"]
    summary = dict(
        stats,
        deployment=dict(prefill=prefill_specs, decode=decode_specs, multiprocess=FLAGS.multiprocess),
        ttft_p50_s=statistics.median([m["ttft_s"] for m in done]) if done else None,
        tpot_p50_s=statistics.median([m["tpot_s"] for m in done if "tpot_s" in m] or [0.0]),
    )
    if boot is not None:  # in-process deployments (a multi-process one boots in its workers)
        summary["boot"] = boot
    report = dict(summary=summary, requests=metrics)
    print(json.dumps(summary, indent=1))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    app.run(main)
