"""Launch prefill and decode workers as separate OS processes on 127.0.0.1 and run prompts through them.

Each worker simulates its own CPU devices (mesh device ranges refer to the worker's own devices),
loads its own copy of the weights on its own mesh, and the KV of each prefill batch moves to a decode
worker with jax.experimental.transfer (infire_jax/engine/remote.py describes the protocol).

  python experiments/launch_pd.py --prefill_mesh tp=2 --decode_mesh pp=2 --max_new_tokens 32 \
      --prompts "The weather today is" --prompts "Once upon a time" --out /tmp/pd.json
  python experiments/launch_pd.py --prompts_file prompts.json --num_decode 2 --check_colocated
  python experiments/launch_pd.py --bench_transfer_mib 64     # transfer bandwidth vs in-process copy

--prompts_file: a JSON list whose items are text, a list of token ids, or {"prompt": text | "tokens":
[ids], "max_new_tokens": n}. --out: JSON with per-request metrics (queue, TTFT, TPOT, transfer time
and bytes, workers), aggregate stats and, if asked, the transfer benchmark.
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
flags.DEFINE_string("prefill_mesh", "tp=1", "Mesh of each prefill worker process (its own devices).")
flags.DEFINE_string("decode_mesh", "tp=1", "Mesh of each decode worker process (its own devices).")
flags.DEFINE_integer("num_prefill", 1, "Prefill worker processes.")
flags.DEFINE_integer("num_decode", 1, "Decode worker processes.")
flags.DEFINE_multi_string("prompts", None, "Prompt text (repeat for several requests).")
flags.DEFINE_string("prompts_file", None, "JSON list of prompts (text, token-id lists or dicts).")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt (unless a prompt sets its own).")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "0 = no top-k cut.")
flags.DEFINE_float("top_p", 1.0, "Nucleus threshold in (0, 1].")
flags.DEFINE_integer("seed", 0, "Request i samples with seed + i.")
flags.DEFINE_bool("stop_at_eos", True, "Stop a request at the model's EOS tokens.")
flags.DEFINE_enum("mode", "mesh", ["mesh", "single"],
                  "Transfer layout: 'mesh' = the prefill side reshards to the decode layout and every shard "
                  "crosses once; 'single' = one device each side, the decode side reshards locally.")
flags.DEFINE_string("compute_dtype", "float32", "Activation / KV dtype of the prefill workers.")
flags.DEFINE_string("decode_compute_dtype", None, "Activation / KV dtype of the decode workers (default: "
                    "--compute_dtype; a different one demonstrates the KV layout check).")
flags_common.define_engine_flags(kv_pages=256)
flags_common.define_compilation_cache_flag()
flags.DEFINE_integer("num_transports", 2, "Transport addresses per transfer server (same on every worker).")
flags.DEFINE_float("timeout", 300.0, "Seconds before unfinished requests fail with RequestTimeout.")
flags.DEFINE_float("start_timeout", 180.0, "Seconds for every worker to load and answer the handshake.")
flags.DEFINE_float("stall_timeout", 60.0, "A worker silent this long with requests in flight is killed.")
flags.DEFINE_float("pull_timeout", 30.0, "Seconds for one KV pull.")
flags.DEFINE_float("bench_transfer_mib", 0.0, "If > 0: also measure a pull of this many MiB against an "
                   "in-process device_put of the same bytes.")
flags.DEFINE_integer("bench_repeats", 3, "Repeats of the transfer benchmark (best is reported).")
flags.DEFINE_bool("check_colocated", False, "Also run the prompts colocated in this process (tp=1) and "
                  "report whether the outputs are equal (meaningful for greedy).")
flags.DEFINE_string("out", None, "Write per-request metrics and stats to this JSON file.")

DEFAULT_PROMPTS = ["The weather today is", "Once upon a time", "In a distant galaxy far away, a small robot"]

flags.adopt_module_key_flags(flags_common)  # --help lists the shared flags too

def _load_prompts(tokenizer, bos):
    items = []
    if FLAGS.prompts_file:
        with open(FLAGS.prompts_file) as f:
            items = json.load(f)
        if not isinstance(items, list):
            raise app.UsageError("--prompts_file must hold a JSON list")
    items += list(FLAGS.prompts or [])
    items = items or list(DEFAULT_PROMPTS)
    out = []
    for item in items:
        max_new = FLAGS.max_new_tokens
        if isinstance(item, dict):
            max_new = int(item.get("max_new_tokens", max_new))
            item = item["tokens"] if "tokens" in item else item["prompt"]
        if isinstance(item, str):
            if tokenizer is None:
                raise app.UsageError("text prompts need tokenizer.json in the model directory; give token ids")
            ids = ([bos] if bos is not None else []) + tokenizer.encode(item, add_special_tokens=False).ids
            out.append((item, ids, max_new))
        else:
            out.append((None, [int(t) for t in item], max_new))
    return out


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    from infire_jax.checkpoint import tiny
    from infire_jax.config import load_config
    from infire_jax.engine.remote import RemoteEngine, WorkerConfig
    from infire_jax.engine.sampling import SamplingParams

    model_dir = FLAGS.model_dir or str(tiny.ensure_default_model())
    cfg = load_config(model_dir)
    tokenizer = None
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    stop = tuple(cfg.eos_token_ids) if FLAGS.stop_at_eos else ()
    prompts = _load_prompts(tokenizer, cfg.bos_token_id)
    params = [
        SamplingParams(n, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, (FLAGS.seed + i) % 2**32, stop)
        for i, (_, _, n) in enumerate(prompts)
    ]
    prefill = [
        WorkerConfig("prefill", f"prefill{i}", mesh=FLAGS.prefill_mesh, dtype=FLAGS.dtype,
                     compute_dtype=FLAGS.compute_dtype, page_size=FLAGS.page_size, num_pages=FLAGS.kv_pages,
                     prefill_chunk=FLAGS.prefill_chunk or None, prefix_cache=FLAGS.prefix_cache,
                     speculative=FLAGS.speculative or None)  # "draft:DIR:K": the draft's KV prefilled here
        for i in range(FLAGS.num_prefill)
    ]
    decode = [
        WorkerConfig("decode", f"decode{i}", mesh=FLAGS.decode_mesh, dtype=FLAGS.dtype,
                     compute_dtype=FLAGS.decode_compute_dtype or FLAGS.compute_dtype, decode_steps=FLAGS.decode_steps,
                     num_pages=FLAGS.kv_pages, page_size=FLAGS.page_size, max_batch=FLAGS.max_decode_batch,
                     prefix_cache=FLAGS.prefix_cache, speculative=FLAGS.speculative or None)
        for i in range(FLAGS.num_decode)
    ]
    engine = RemoteEngine(
        model_dir, prefill, decode, mode=FLAGS.mode, num_transports=FLAGS.num_transports,
        start_timeout=FLAGS.start_timeout, stall_timeout=FLAGS.stall_timeout, pull_timeout=FLAGS.pull_timeout,
        compilation_cache_dir=FLAGS.compilation_cache_dir or None,
    )
    t0 = time.perf_counter()
    result: dict = dict(
        model_dir=str(model_dir), prefill_mesh=FLAGS.prefill_mesh, decode_mesh=FLAGS.decode_mesh,
        num_prefill=FLAGS.num_prefill, num_decode=FLAGS.num_decode, mode=FLAGS.mode,
    )
    with engine:
        result["start_s"] = time.perf_counter() - t0
        print(f"started {len(prefill)} prefill + {len(decode)} decode workers in {result['start_s']:.1f} s: "
              + ", ".join(f"{w.name} pid {w.process.pid} mesh {w.cfg.mesh}" for w in engine.workers.values()))
        t0 = time.perf_counter()
        reqs = [engine.submit(ids, sp) for (_, ids, _), sp in zip(prompts, params)]
        engine.run(FLAGS.timeout)
        result["run_s"] = time.perf_counter() - t0
        result["stats"] = engine.stats()
        if FLAGS.bench_transfer_mib > 0:
            result["bench_transfer"] = engine.bench_transfer(int(FLAGS.bench_transfer_mib * 2**20), FLAGS.bench_repeats)
    rows = []
    for (text, ids, _), r in zip(prompts, reqs):
        m = r.metrics()
        m["prompt"] = text
        m["output_tokens"] = list(r.output)
        if tokenizer is not None and r.status == "done":
            m["output_text"] = tokenizer.decode([t for t in r.output if t not in stop])
        rows.append(m)
        head = text if text is not None else f"{len(ids)} tokens"
        print(f"--- {head!r} [{r.status}] " + (m.get("output_text", str(r.output)) if r.status == "done" else r.error))
    result["requests"] = rows
    if FLAGS.check_colocated:
        import jax

        jax.config.update("jax_num_cpu_devices", 1)
        import infire_jax

        model = infire_jax.load(model_dir, dtype=FLAGS.dtype, compute_dtype=FLAGS.compute_dtype)
        want = [model.run_requests([ids], [sp])[0].output for (_, ids, _), sp in zip(prompts, params)]
        result["colocated_equal"] = [r.output == w for r, w in zip(reqs, want)]
        print(f"colocated outputs equal: {sum(result['colocated_equal'])}/{len(want)}")
    s = result["stats"]
    print(json.dumps(dict(start_s=round(result["start_s"], 2), run_s=round(result["run_s"], 2),
                          **{k: s[k] for k in ("requests", "failed", "generated_tokens", "transfers", "transfer_bytes",
                                                "pull_gib_per_s")},
                          **({k: s[k] for k in ("spec_proposed_tokens", "spec_accepted_tokens", "draft_prefill_tokens",
                                                "draft_fed_tokens", "draft_kv_bytes_transferred")}
                             if FLAGS.speculative else {})), default=str))
    if "bench_transfer" in result:
        b = result["bench_transfer"]
        print(f"transfer bench: {b['bytes'] / 2**20:.0f} MiB pull {b['pull_gib_per_s']:.3f} GiB/s vs in-process "
              f"{b['device_put_kind']} device_put {b['device_put_gib_per_s']:.3f} GiB/s "
              f"(pull takes {b['ratio_pull_to_device_put']:.1f}x as long)")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {FLAGS.out}")
    if any(r.status != "done" for r in reqs):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
