"""Replay a multi-turn agent trace through a deployment with the prefix cache on and off, side by side.

  python experiments/agent_trace.py --out /tmp/trace.jsonl --vocab_size 49152 --system_tokens 1024 ...
  python experiments/bench_agent_trace.py --trace /tmp/trace.jsonl --model_dir /tmp/smollm \
      --out /tmp/agent.json --png /tmp/agent_ttft.png                                   # colocated
  python experiments/bench_agent_trace.py --trace ... --prefill_workers "tp=1@0" --decode_workers "tp=1@1"
  python experiments/bench_agent_trace.py --trace ... --prefill_workers tp=1 --decode_workers tp=1 --multiprocess

Each arm (prefix cache on, off) first replays a warm-up copy of the trace (same lengths and schedule,
other token ids: it compiles the same programs and caches nothing the measured pass can use), then the
trace (--rounds > 1: paired rounds, arms alternating). JSON: per arm TTFT / TPOT p50, p90, p99 (all
turns, turn 0, later turns), tokens/s, hit ratio, prefill tokens computed, KV pages and bytes sent
prefill -> decode, evictions; and the ratios off / on. --png: the TTFT distributions (CDFs) of both
arms. A trace of one turn per session and no shared system prompt has a 0% hit rate: the cache's
overhead.

--scenario long_prompt: chunked prefill instead. `--rows` requests decode while one prompt of
--long_prompt tokens arrives; arms are --prefill_chunk (e.g. 256) and whole-prompt prefill. Reported:
the decoding rows' longest gap between tokens while the long prompt is prefilled, and its TTFT.
"""

from __future__ import annotations

import dataclasses
import gc
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
flags_common.define_engine_flags(kv_pages=1024)
flags_common.define_worker_flags()
flags.DEFINE_enum("scenario", "trace", ["trace", "long_prompt"], "What to measure (see the module doc).")
flags.DEFINE_string("trace", None, "Trace JSONL (experiments/agent_trace.py); default: a small generated one.")
flags.DEFINE_bool("multiprocess", False, "Workers as OS processes (engine/remote.py).")
flags.DEFINE_float("time_scale", 1.0, "Multiply the trace's arrival times (0 = everything at once).")
flags.DEFINE_bool("warmup", True, "Replay a warm-up copy of the trace first in each arm.")
flags.DEFINE_integer("rounds", 1, "Paired rounds (arms alternate their order; with more than one, every round "
                     "replays the trace with other token ids, so rounds share no cached prefix).")
flags.DEFINE_integer("rows", 8, "long_prompt: decoding rows.")
flags.DEFINE_integer("long_prompt", 4000, "long_prompt: tokens of the arriving prompt.")
flags.DEFINE_integer("row_prompt", 64, "long_prompt: prompt tokens of each decoding row.")
flags.DEFINE_string("out", None, "Write the JSON here.")
flags.DEFINE_string("png", None, "Write the TTFT distributions here (trace scenario).")


def _pcts(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return dict(p50=None, p90=None, p99=None, n=0)
    xs = sorted(xs)
    at = lambda q: xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]  # noqa: E731
    return dict(p50=at(0.5), p90=at(0.9), p99=at(0.99), n=len(xs))


class _InProcess:
    """The model placed once per mesh spec (engine/build.py Deployment); an engine per arm on it."""

    def __init__(self, model_dir: str, prefill_specs: list[str], decode_specs: list[str]):
        from infire_jax.engine.build import Deployment

        self.deployment = Deployment(model_dir, prefill_specs, decode_specs, dtype=FLAGS.dtype,
                                     options=flags_common.engine_options())

    def engine(self, prefix_cache: bool, prefill_chunk: int | None):
        options = dataclasses.replace(self.deployment.options, prefix_cache=prefix_cache, prefill_chunk=prefill_chunk)
        return self.deployment.engine(options)


class _Remote:
    def __init__(self, model_dir: str, prefill_specs: list[str], decode_specs: list[str]):
        self.model_dir, self.specs = model_dir, (prefill_specs, decode_specs)

    def engine(self, prefix_cache: bool, prefill_chunk: int | None):
        from infire_jax.engine.remote import RemoteEngine, WorkerConfig

        pre, dec = self.specs
        kw = dict(num_pages=FLAGS.kv_pages, page_size=FLAGS.page_size, prefix_cache=prefix_cache, dtype=FLAGS.dtype,
                  max_batch=FLAGS.max_decode_batch, decode_steps=FLAGS.decode_steps)
        engine = RemoteEngine(
            self.model_dir,
            [WorkerConfig("prefill", f"p{i}", mesh=s, prefill_chunk=prefill_chunk, **kw) for i, s in enumerate(pre)],
            [WorkerConfig("decode", f"d{i}", mesh=s, **kw) for i, s in enumerate(dec)],
            start_timeout=600.0, stall_timeout=600.0,
        )
        return engine.start()


def _shifted(trace, vocab: int, shift: int):
    """The trace with other token ids (same lengths and schedule): nothing in it is cached by a pass
    with another shift."""
    span = vocab - 3
    step = span // 7 + 1
    return [dataclasses.replace(t, append=tuple(3 + (x - 3 + shift * step) % span for x in t.append)) for t in trace]


def _arm_result(records: list[dict], stats: dict, wall: float) -> dict:
    generated = sum(r["generated_tokens"] for r in records)
    return dict(
        records=records, wall_s=wall, generated_tokens=generated, tokens_per_s=generated / wall,
        prompt_tokens=sum(len(r["prompt"]) for r in records), cached_tokens=sum(r["cached_tokens"] for r in records),
        **{k: stats.get(k) for k in ("hit_ratio", "prefill_tokens_computed", "prefix_hit_tokens", "decode_hit_tokens",
                                     "kv_pages_transferred", "kv_bytes_transferred", "evicted_pages", "transfers")},
    )


def run_trace(deploy, trace, vocab: int) -> dict:
    """--rounds rounds; in each, both arms replay the trace (other token ids every round, so no round
    reuses another's cache), in alternating order; each arm's engine replays a warm-up pass first."""
    from infire_jax.engine.trace import replay

    arms = {"cache_off": False, "cache_on": True}
    engines = {}
    rounds: list[dict[str, dict]] = []
    try:
        for arm, cache in arms.items():
            engines[arm] = deploy.engine(cache, FLAGS.prefill_chunk or None)
            if FLAGS.warmup:
                replay(engines[arm], _shifted(trace, vocab, FLAGS.rounds), time_scale=FLAGS.time_scale)
        for k in range(FLAGS.rounds):
            order = list(arms) if k % 2 == 0 else list(arms)[::-1]
            this = {}
            for arm in order:
                engine = engines[arm]
                engine.reset_stats()
                t0 = time.perf_counter()
                records = replay(engine, _shifted(trace, vocab, k), time_scale=FLAGS.time_scale)
                this[arm] = _arm_result(records, engine.stats(), time.perf_counter() - t0)
                print(f"round {k} {arm}: {this[arm]['tokens_per_s']:.2f} tok/s, prefill computed "
                      f"{this[arm]['prefill_tokens_computed']}", flush=True)
            rounds.append(this)
    finally:
        for engine in engines.values():
            if hasattr(engine, "close"):
                engine.close()
    out = {}
    for arm in arms:
        records = [r for rd in rounds for r in rd[arm]["records"]]
        per_round = [rd[arm] for rd in rounds]
        med = lambda key: statistics.median(x[key] for x in per_round if x[key] is not None) if all(  # noqa: E731
            x[key] is not None for x in per_round) else None
        out[arm] = dict(
            ttft_s=_pcts([r["ttft_s"] for r in records]),
            ttft_turn0_s=_pcts([r["ttft_s"] for r in records if r["turn"] == 0]),
            ttft_later_turns_s=_pcts([r["ttft_s"] for r in records if r["turn"] >= 1]),
            tpot_s=_pcts([r["tpot_s"] for r in records if "tpot_s" in r]),
            tokens_per_s=med("tokens_per_s"), tokens_per_s_rounds=[x["tokens_per_s"] for x in per_round],
            **{k: med(k) for k in ("wall_s", "generated_tokens", "prompt_tokens", "cached_tokens", "hit_ratio",
                                   "prefill_tokens_computed", "prefix_hit_tokens", "decode_hit_tokens",
                                   "kv_pages_transferred", "kv_bytes_transferred", "evicted_pages", "transfers")},
            ttft_later=[r["ttft_s"] for r in records if r["turn"] >= 1], ttft_all=[r["ttft_s"] for r in records],
        )
    on, off = out["cache_on"], out["cache_off"]
    ratio = lambda a, b: (a / b) if a and b else None  # noqa: E731
    out["off_over_on"] = dict(
        ttft_p50_later_turns=ratio(off["ttft_later_turns_s"]["p50"], on["ttft_later_turns_s"]["p50"]),
        ttft_p90_later_turns=ratio(off["ttft_later_turns_s"]["p90"], on["ttft_later_turns_s"]["p90"]),
        prefill_tokens_computed=ratio(off["prefill_tokens_computed"], on["prefill_tokens_computed"]),
        kv_bytes_transferred=ratio(off["kv_bytes_transferred"], on["kv_bytes_transferred"]),
        tokens_per_s=ratio(off["tokens_per_s"], on["tokens_per_s"]),
        tokens_per_s_paired_median=statistics.median(
            rd["cache_off"]["tokens_per_s"] / rd["cache_on"]["tokens_per_s"] for rd in rounds),
    )
    return out


def run_long_prompt(deploy, vocab: int, context: int) -> dict:
    """--rows rows decode; one --long_prompt-token prompt arrives once they all decode."""
    import numpy as np

    from infire_jax.engine.sampling import SamplingParams

    rng = np.random.default_rng(0)
    rows = [rng.integers(3, vocab, FLAGS.row_prompt).tolist() for _ in range(FLAGS.rows)]
    # the rows decode until stopped: as many tokens as the context leaves
    row_tokens = min(1024, context - FLAGS.row_prompt - FLAGS.decode_steps)
    long = rng.integers(3, vocab, FLAGS.long_prompt).tolist()
    out = {}
    for arm, chunk in (("whole", None), (f"chunk_{FLAGS.prefill_chunk}", FLAGS.prefill_chunk or None)):
        engine = deploy.engine(False, chunk)
        for attempt in ("warmup", "measured"):
            shift = 0 if attempt == "measured" else 1
            reqs = [engine.submit([(t + shift) % vocab for t in p], SamplingParams(row_tokens)) for p in rows]
            while not all(len(r.output) > 1 or r.finished for r in reqs):
                engine.step()
            for r in reqs:
                if r.status == "failed":
                    raise RuntimeError(f"a decoding row failed: {r.error}")
            arrivals: dict = {r.id: [] for r in reqs}
            big = engine.submit([(t + shift) % vocab for t in long], SamplingParams(2))
            if big.status == "failed":
                raise RuntimeError(f"the long prompt failed: {big.error}")
            seen = {r.id: len(r.output) for r in reqs}

            def step_and_record() -> None:
                """One engine step; the time each decoding row's new tokens arrived."""
                engine.step()
                now = time.perf_counter()
                for r in reqs:
                    if len(r.output) != seen[r.id]:
                        arrivals[r.id].append(now)
                        seen[r.id] = len(r.output)

            while "first_token" not in big.times:
                step_and_record()
            t_first = big.times["first_token"]
            for _ in range(3):  # the rows' next tokens after the prompt's first
                step_and_record()
            gaps = []
            for r in reqs:
                times = [big.submitted] + arrivals[r.id]
                gaps += [b - a for a, b in zip(times, times[1:])]
            for r in reqs + [big]:
                r.finish_reason = r.finish_reason or "length"
            engine.run()
            engine.requests.clear()
        out[arm] = dict(longest_gap_s=max(gaps), median_gap_s=statistics.median(gaps),
                        long_prompt_ttft_s=t_first - big.submitted, prefill_chunk=chunk)
        print(arm, json.dumps(out[arm]), flush=True)
        del engine
        gc.collect()
    chunked = out[f"chunk_{FLAGS.prefill_chunk}"]
    out["chunked_over_whole"] = dict(longest_gap=chunked["longest_gap_s"] / out["whole"]["longest_gap_s"],
                                     long_prompt_ttft=chunked["long_prompt_ttft_s"] / out["whole"]["long_prompt_ttft_s"])
    return out


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "ttft_later", "turns >= 2"), (axes[1], "ttft_all", "all turns")):
        for arm in ("cache_off", "cache_on"):
            xs = sorted(result[arm][key])
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=arm.replace("_", " "))
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (s)")
        ax.set_ylabel("fraction of turns")
        ax.set_title(f"TTFT, {title}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    prefill_specs, decode_specs = flags_common.worker_specs()
    if FLAGS.multiprocess and prefill_specs == decode_specs:
        raise app.UsageError("--multiprocess needs --prefill_workers and --decode_workers")
    if not FLAGS.multiprocess:
        import jax

        from infire_jax.mesh import parse_mesh

        meshes = [parse_mesh(s) for s in prefill_specs + decode_specs]
        jax.config.update("jax_num_cpu_devices", max(m.last_device + 1 if m.last_device is not None else m.num_devices
                                                     for m in meshes))
    from infire_jax.checkpoint import tiny
    from infire_jax.config import load_config
    from infire_jax.engine import trace as trace_lib

    model_dir = str(FLAGS.model_dir or tiny.ensure_default_model())
    vocab = load_config(model_dir).vocab_size
    deploy = (_Remote if FLAGS.multiprocess else _InProcess)(model_dir, prefill_specs, decode_specs)
    result: dict = dict(
        scenario=FLAGS.scenario, model_dir=model_dir, multiprocess=FLAGS.multiprocess,
        deployment=dict(prefill=prefill_specs, decode=decode_specs, colocated=prefill_specs == decode_specs),
        flags={k: FLAGS[k].value for k in ("prefill_chunk", "kv_pages", "page_size", "max_decode_batch", "decode_steps",
                                            "time_scale", "trace")},
    )
    if FLAGS.scenario == "long_prompt":
        result.update(run_long_prompt(deploy, vocab, load_config(model_dir).max_position_embeddings))
    else:
        trace = trace_lib.read_trace(FLAGS.trace) if FLAGS.trace else trace_lib.make_trace(
            sessions=4, turns=4, vocab_size=vocab, system_tokens=128, tool_tokens=(32, 64), user_tokens=(8, 16),
            max_tokens=8, session_interval_s=0.2)
        result.update(run_trace(deploy, trace, vocab), turns=len(trace))
        if FLAGS.png:
            _plot(result, FLAGS.png)
        for arm in ("cache_on", "cache_off"):
            result[arm].pop("ttft_all")
            result[arm].pop("ttft_later")
    print(json.dumps({k: v for k, v in result.items() if k not in ("cache_on", "cache_off")}, indent=1, default=str))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    app.run(main)
