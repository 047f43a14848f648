"""Offline batch generation: an OpenAI Batch API-style JSONL of requests in, one JSON result per line
out. Resumable: rerun the same command after a crash (even SIGKILL) and it finishes the rest.

  python experiments/batch_generate.py --input requests.jsonl --output results.jsonl
  python experiments/batch_generate.py --input r.jsonl --output o.jsonl --mesh tp=2
  python experiments/batch_generate.py --input r.jsonl --output o.jsonl \\
      --prefill_workers "tp=1@0;tp=1@1" --decode_workers "tp=2@2-3" --summary /tmp/summary.json
  python experiments/batch_generate.py --input r.jsonl --output o.jsonl --compare_engine   # + serve_offline-style run

Input, one JSON object per line (blank lines are skipped):
  {"custom_id": "q1", "method": "POST", "url": "/v1/completions",
   "body": {"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0.7, "top_p": 0.9, "seed": 1,
            "stop": ["\\n\\n", 1]}}
  {"custom_id": "q2", "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}}
- custom_id: a unique non-empty string (a repeated custom_id stops the job before any work).
- method / url: optional; url is /v1/completions (needs prompt) or /v1/chat/completions (needs messages).
- body.prompt: text (tokenised with the model's BOS first) or a list of token ids (used as is).
- body.messages: rendered with the checkpoint's chat template (tokenizer_config.json "chat_template" or
  chat_template.jinja, jinja2 in a sandbox as transformers does, add_generation_prompt=True). A
  checkpoint without a template gives those lines the error "no_chat_template".
- max_tokens (or max_completion_tokens; default --max_tokens), temperature (0 = greedy, the default),
  top_p, top_k (extension; 0 or -1 = no cut), seed (default: crc32 of custom_id, so reruns draw the
  same tokens; reduced modulo 2**32), ignore_eos (extension; default false = stop at the model's EOS),
  stop (a string, a token id, or a list of both), stop_token_ids (extension). model and user are
  ignored; n, stream, logprobs, penalties... are accepted only at their default values.
- stop semantics: a token id stops on that token. A string that is exactly one token is also turned
  into a stop token id (ends the request on the device at once); every string is matched on the
  decoded text too (the same text can come out as other tokens), checked after each engine step.
  `text` ends right before the earliest stop (stops are not in `text`, as OpenAI); `token_ids` run up
  to and including the token that completed the stop; `stop_reason` names the stop that matched.

Output, one line per input line, appended as each request finishes (written at once, fsync'd by a
background thread, see --fsync):
  {"custom_id": "q1", "line": 1, "text": "...", "token_ids": [...], "finish_reason": "stop"|"length",
   "stop_reason": null | 1 | "\\n\\n", "usage": {"prompt_tokens", "completion_tokens", "total_tokens",
   "prompt_tokens_details": {"cached_tokens"}},
   "timing": {"queue_s", "ttft_s", "tpot_s", "e2e_s"}, "error": null}
  {"custom_id": "q3" | null, "line": 7, "error": {"code": "invalid_json" | "invalid_request" |
   "invalid_parameter" | "prompt_too_long" | "no_chat_template" | "no_tokenizer" | "chat_template_error" |
   "engine_error", "message": "..."}}
Error results are final like any other result: a rerun skips them (delete a line to redo it).

Resuming: results are matched by custom_id (by line number for lines without one). A torn last
line (the job was killed mid-write) is removed and redone; an unreadable line elsewhere stops the job
with its line number. The output is locked while a job writes it.

Progress (requests, tokens/s, ETA) goes to stderr; the final summary JSON to stdout (and --summary).
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
flags.DEFINE_string("input", None, "JSONL of requests (see the module doc).", required=True)
flags.DEFINE_string("output", None, "JSONL of results; appended to, and resumed from when it exists.", required=True)
flags.DEFINE_string("summary", None, "Also write the summary JSON here.")
flags_common.define_model_flags()
flags_common.define_worker_flags()
flags.DEFINE_string("deployment", None, "Colocated deployment (configs/deployments/ name or JSON path): mesh + rules.")
flags_common.define_engine_flags()
flags.DEFINE_integer("max_tokens", 16, "max_tokens of lines that give none (OpenAI's completions default).")
flags.DEFINE_integer("max_inflight", 256, "Requests submitted to the engine at a time (bounds memory, not speed).")
flags.DEFINE_enum("fsync", "background", ["background", "always", "never"],
                  "When results reach the disk: a background thread after every append, inline, or never "
                  "(all three survive the process being killed; only fsync survives a power cut).")
flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
flags.DEFINE_bool("compare_engine", False,
                  "Measure serve_offline's engine throughput on the same requests: an untimed engine pass "
                  "(compiles), the batch job, then --compare_repeats pairs of (timed engine pass, batch pass into "
                  "a scratch file); medians of both go in the summary under engine_comparison.")
flags.DEFINE_integer("compare_repeats", 3, "Paired repeats for --compare_engine (medians are reported).")
flags_common.define_compilation_cache_flag()

flags.adopt_module_key_flags(flags_common)  # --help lists the shared flags too

def _fail(message: str) -> None:
    print(f"batch_generate: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    del argv
    t_start = time.perf_counter()
    logging.set_verbosity(logging.WARNING)
    from infire_jax.engine import batch
    from infire_jax.engine.build import build_engine

    if bool(FLAGS.prefill_workers) != bool(FLAGS.decode_workers):
        _fail("give both --prefill_workers and --decode_workers (disaggregated) or neither (colocated --mesh)")
    if FLAGS.deployment and FLAGS.prefill_workers:
        _fail("--deployment is for a colocated deployment; do not combine it with --prefill_workers/--decode_workers")
    try:
        items = batch.read_input(FLAGS.input)
    except (batch.DuplicateCustomIds, OSError) as e:
        _fail(str(e))
    try:
        writer = batch.ResultsWriter(FLAGS.output, fsync=FLAGS.fsync)
    except (batch.OutputCorrupted, RuntimeError, OSError) as e:
        _fail(str(e))
    if writer.dropped_bytes:
        logging.warning("removed a torn last line (%d bytes) from %s; it will be redone", writer.dropped_bytes,
                        FLAGS.output)
    known = {it.key for it in items}
    stray = sum(1 for r in writer.records if batch.result_key(r) not in known)
    if stray:
        logging.warning("%s holds %d results for lines not in %s (another input?)", FLAGS.output, stray, FLAGS.input)

    rules = None
    mesh = FLAGS.mesh
    if FLAGS.deployment:
        from infire_jax.sharding import load_deployment

        mesh, rules = load_deployment(FLAGS.deployment)
    prefill_specs, decode_specs = flags_common.worker_specs(mesh)
    summary: dict = dict(input=FLAGS.input, output=FLAGS.output, repaired_torn_bytes=writer.dropped_bytes,
                         stray_results=stray, deployment=dict(prefill=prefill_specs, decode=decode_specs))
    pending = [it for it in items if it.key not in writer.done]
    with writer:
        if pending:
            from infire_jax import boot

            with boot.gc_paused():  # imports: long-lived objects only
                flags_common.start_boot("batch_generate.py", flags_common.devices_needed(prefill_specs + decode_specs),
                                        ("model_dir", "dtype", *flags_common.ENGINE_FLAGS), prefill=prefill_specs,
                                        decode=decode_specs, rules=FLAGS.deployment)
                from infire_jax.checkpoint import tiny

            model_dir = FLAGS.model_dir or str(tiny.ensure_default_model())
            summary["model_dir"] = model_dir
            engine = build_engine(model_dir, prefill_specs, decode_specs, rules=rules, dtype=FLAGS.dtype,
                                  options=flags_common.engine_options())
            builder = batch.RequestBuilder.from_model_dir(model_dir, context=engine.context,
                                                          default_max_tokens=FLAGS.max_tokens)
            summary["load_s"] = round(time.perf_counter() - t_start, 3)
            bench = None
            if FLAGS.compare_engine:
                bench = _prepared(batch, builder, pending)
                with boot.clock.warming_up():
                    batch.engine_throughput(engine, *bench)  # untimed: compiles what the job will use
            stats = _run(batch, engine, items, builder, writer, len(pending))
            summary.update(stats)
            summary["boot"] = boot.clock.report()
            if bench is not None:
                summary["engine_comparison"] = _compare(batch, engine, pending, builder, bench, stats)
        else:
            summary.update(lines=len(items), already_done=len(items), processed=0, succeeded=0, errors=0)
    summary["total_results"] = len(items) - len(pending) + summary.get("processed", 0)
    summary["wall_s"] = round(time.perf_counter() - t_start, 3)
    text = json.dumps(summary, indent=1)
    print(text)
    if FLAGS.summary:
        with open(FLAGS.summary, "w") as f:
            f.write(text + "\n")


def _prepared(batch, builder, pending):
    """Prompts and params of the pending lines that are valid (what the engine comparison runs)."""
    prompts, params = [], []
    for it in pending:
        try:
            p = builder.build(it)
        except batch.LineError:
            continue
        prompts.append(p.prompt)
        params.append(p.params)
    return prompts, params


def _compare(batch, engine, pending, builder, bench, stats) -> dict:
    """Paired repeats, after the real job, of the engine alone (serve_offline's measurement: submit
    all, Engine.run) and of the batch job into a scratch output, on the same requests. Wall tokens/s
    swing with other jobs on a shared machine, so the pairs' ratios and tokens per CPU-second
    (process time, all threads) are reported too."""
    import statistics
    import tempfile

    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(FLAGS.compare_repeats):
            eng = batch.engine_throughput(engine, *bench)
            with batch.ResultsWriter(os.path.join(tmp, f"scratch{i}.jsonl"), fsync=FLAGS.fsync) as w:
                job = batch.run_job(engine, pending, builder, w, max_inflight=FLAGS.max_inflight)
            pairs.append(dict(engine_tokens_per_s=round(eng["tokens_per_s"], 2), batch_tokens_per_s=job["tokens_per_s"],
                              engine_tokens_per_cpu_s=round(eng["tokens_per_cpu_s"], 2),
                              batch_tokens_per_cpu_s=job["tokens_per_cpu_s"]))
    med = lambda key: statistics.median(p[key] for p in pairs)  # noqa: E731
    return dict(
        requests=len(bench[0]),
        generated_tokens=eng["generated_tokens"],
        repeats=len(pairs),
        engine_tokens_per_s=med("engine_tokens_per_s"),
        batch_tokens_per_s=med("batch_tokens_per_s"),
        batch_over_engine_wall=round(statistics.median(p["batch_tokens_per_s"] / p["engine_tokens_per_s"] for p in pairs), 4),
        engine_tokens_per_cpu_s=med("engine_tokens_per_cpu_s"),
        batch_tokens_per_cpu_s=med("batch_tokens_per_cpu_s"),
        batch_over_engine_cpu=round(
            statistics.median(p["batch_tokens_per_cpu_s"] / p["engine_tokens_per_cpu_s"] for p in pairs), 4),
        pairs=pairs,
    )


def _run(batch, engine, items, builder, writer, total: int) -> dict:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="req", file=sys.stderr, disable=not FLAGS.progress, dynamic_ncols=True,
               mininterval=0.5)
    t0 = time.perf_counter()

    def progress(done: int, generated: int) -> None:
        elapsed = time.perf_counter() - t0
        bar.set_postfix_str(f"{generated / elapsed if elapsed else 0:.0f} tok/s", refresh=False)
        bar.update(done)

    try:
        return batch.run_job(engine, items, builder, writer, max_inflight=FLAGS.max_inflight, on_progress=progress)
    finally:
        bar.close()


if __name__ == "__main__":
    app.run(main)
