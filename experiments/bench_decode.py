"""Decode throughput on this CPU: infire_jax vs transformers (and llama.cpp) vs the roofline.

For each batch size, B prompts of --prompt_len tokens generate exactly --new_tokens tokens greedily.

  ours (headline, `generate`): steady-state decode tokens/s of Model.generate =
      B * (new_tokens - 1) / (median t(generate new_tokens) - median t(generate 1 token)),
      i.e. end-to-end generate with the prefill (and first token) subtracted; host loop included.
  ours (`engine`): the engine's own figure: B / median time per output token after the first
      (Request.metrics()['tpot_s'] from Model.run_requests) — decode dispatches of decode_steps
      tokens per row (on-device sampling, donated paged cache) plus the host loop between them.
      Headline is `generate` because it uses only the public API; both are steady-state decode.
  compile: first-call wall time of each program (reported separately, never in the medians).
  transformers: same prompts and weights, torch fp32 on CPU, torch.set_num_threads(2), use_cache,
      greedy, EOS disabled (min_new_tokens): the same subtraction of generate(1).
  roofline: weight bytes / measured copy bandwidth (the issue's figure) and FLOPs / measured fp32
      matmul peak: roofline = B / max(weight-read time, compute time) per step.

Ours and the peers are timed in --runs interleaved rounds (each round times generate(1) and
generate(new_tokens) of every system once), so the machine's slow minutes (its bandwidth moves
+-25% between minutes) hit all of them alike; `paired` holds, per peer, the median over the rounds
of ours / the peer. A timing during which other processes used >= 10% of the CPUs is retried once
(`noisy_timings` counts those still noisy).

  python experiments/bench_decode.py --batch_sizes=1,4,16 --out=/tmp/bench_decode.json
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import bench_common as bc  # noqa: E402
import flags_common  # noqa: E402  (experiments/flags_common.py)

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "HF checkpoint (default: the smollm-135m preset, written once under "
                    "~/.cache/infire_jax/bench/).")
flags.DEFINE_list("batch_sizes", ["1", "4", "16", "64"], "Batch sizes to measure.")
flags.DEFINE_integer("runs", 5, "Timed runs per figure (median reported), after one warm-up run.")
flags.DEFINE_integer("new_tokens", 32, "Tokens generated per row.")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.")
flags.DEFINE_integer("decode_steps", 8, "Decode steps per dispatch of our decode program.")
flags.DEFINE_list("peer", ["transformers"], "Peers: transformers, ours_xla (our engine with kernels='xla': "
                  "the CPU kernels' A/B), llama_cpp (optional; 'unavailable' when "
                  "llama-cpp-python is not importable). Empty = none.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Storage dtype of our weights (ours and ours_xla; "
                  "compute stays float32; the roofline reads this many bytes per weight). The other peers run float32.")
flags.DEFINE_integer("threads", 2, "Threads of the peers (torch.set_num_threads, llama.cpp n_threads).")
flags_common.define_speculative_flag()
flags.DEFINE_boolean("engine_metrics", True, "Also report the engine's own time per output token.")
flags.DEFINE_integer("bandwidth_mb", 512, "Size of the bandwidth probe buffer.")
flags.DEFINE_float("quiet_wait", 10.0, "Seconds to wait for other processes to pause before retrying a run they "
                   "disturbed (this machine is shared; 0 = never wait).")
flags.DEFINE_float("quiet_wait_budget", 120.0, "Total seconds of such waiting per run of the bench.")
flags.DEFINE_string("out", "bench_decode.json", "JSON output path.")


def _timed(fn) -> dict:
    """One timing of fn (retried once if other processes used the CPUs meanwhile)."""
    return bc.quiet_runs(fn, 1, warmup=0, max_runs=2, budget_s=30)


def bench_generate(systems: dict, tokens: np.ndarray, new_tokens: int, runs: int) -> tuple[dict, dict]:
    """Decode tok/s of every system, B * (new_tokens - 1) / (t(generate new_tokens) - t(generate 1)),
    timed in rounds: each round times every system once, so a slow minute of the machine hits them
    all alike. Returns per system the medians (and its first call), and per peer the median over the
    rounds of ours / the peer (the paired ratio). `systems`: name -> generate(tokens, n) -> rows. A
    peer that fails is dropped with its error as its status; ours failing is an error of the bench."""
    b = tokens.shape[0]
    out: dict = {}
    live = dict(systems)

    def attempt(name, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a failing peer must not lose the others' figures
            if name == "ours":
                raise
            out[name] = dict(status=f"failed: {type(e).__name__}: {e}")
            live.pop(name)

    def first_call(gen):
        rows = np.asarray(gen(tokens, new_tokens))
        if rows.shape != (b, new_tokens):
            raise RuntimeError(f"generated {rows.shape} tokens, expected {(b, new_tokens)}")
        return rows

    for name, gen in systems.items():  # first call (compile for ours), then a warm-up of both lengths
        t0 = time.perf_counter()
        first = attempt(name, lambda: first_call(gen))
        if first is None:
            continue
        out[name] = dict(first_call_s=time.perf_counter() - t0, tokens_first_row=first[0][:16].tolist())
        attempt(name, lambda: gen(tokens, 1))
    one = {name: [] for name in systems}
    full = {name: [] for name in systems}
    for _ in range(runs):
        for name, gen in list(live.items()):
            timings = attempt(name, lambda: (_timed(lambda: gen(tokens, 1)), _timed(lambda: gen(tokens, new_tokens))))
            if timings:
                one[name].append(timings[0])
                full[name].append(timings[1])
    per_round = {}
    for name in live:
        t1, tn = [r["median"] for r in one[name]], [r["median"] for r in full[name]]
        dt = float(np.median(tn) - np.median(t1))
        per_round[name] = [b * (new_tokens - 1) / (n - o) if n > o else None for o, n in zip(t1, tn)]
        out[name].update(
            tok_s=b * (new_tokens - 1) / dt if dt > 0 else None, end_to_end_tok_s=b * new_tokens / float(np.median(tn)),
            t_generate_1=bc.summary(t1), t_generate_n=bc.summary(tn),
            noisy_timings=sum(r["noisy"] for r in one[name] + full[name]),
        )
    paired = {}
    for name in live:
        if name != "ours":
            pairs = [a / p for a, p in zip(per_round["ours"], per_round[name]) if a and p]
            paired[f"ours_over_{name}"] = float(np.median(pairs)) if pairs else None
    return out, paired


def bench_ours_engine(model, tokens: np.ndarray, new_tokens: int, runs: int) -> dict:
    """The engine's own per-request timing (Model.run_requests -> Request.metrics()['tpot_s']: time
    per output token after the first): decode tokens/s = B / median tpot over the batch's rows."""
    from infire_jax.engine.sampling import SamplingParams

    prompts = [np.asarray(p, np.int32) for p in tokens]
    params = [SamplingParams(new_tokens)] * len(prompts)
    model.run_requests(prompts, params)  # warm-up

    tpots, foreign = [], []
    for _ in range(runs):
        with bc.contention() as c:
            reqs = model.run_requests(prompts, params)
        tpots.append(float(np.median([r.metrics()["tpot_s"] for r in reqs])))
        foreign.append(c.get("foreign_cpu_fraction"))
    tpot = float(np.median(tpots))
    return dict(method="B / median(Request.metrics()['tpot_s'])", tok_s=tokens.shape[0] / tpot, tpot_s=tpots,
                foreign=foreign)


def main(argv: list[str]) -> None:
    del argv
    bc.QUIET_WAIT[0] = FLAGS.quiet_wait
    bc.QUIET_WAIT_BUDGET[0] = FLAGS.quiet_wait_budget
    model_dir = FLAGS.model_dir or str(bc.ensure_model())
    shape = bc.Shape.from_dir(model_dir)
    if FLAGS.dtype == "bfloat16":
        shape = dataclasses.replace(shape, weight_bytes_per_param=2)
    result: dict = dict(
        bench="decode", model_dir=model_dir, dtype=FLAGS.dtype, prompt_len=FLAGS.prompt_len, new_tokens=FLAGS.new_tokens,
        runs=FLAGS.runs, decode_steps=FLAGS.decode_steps, params=shape.params,
        weight_bytes_per_step=shape.step_weight_bytes, kv_bytes_per_token=shape.kv_bytes_per_token,
        headline="ours.generate.tok_s (steady-state decode of Model.generate; see module docstring)",
    )
    print(f"model {model_dir}: {shape.params / 1e6:.1f}M params, {shape.step_weight_bytes / 1e6:.0f} MB read per step")
    mach = bc.machine(FLAGS.bandwidth_mb)
    result["machine"] = mach
    bw, peak = mach["bandwidth"]["gbps"] * 1e9, mach["matmul"]["peak_gflops"] * 1e9
    print(f"bandwidth {bw / 1e9:.1f} GB/s (copy, read+write), fp32 matmul peak {peak / 1e9:.0f} GFLOP/s "
          f"(jax {mach['matmul']['jax_peak_gflops']:.0f})")

    t0 = time.perf_counter()
    batches = [int(x) for x in FLAGS.batch_sizes]
    sizes = dict(decode_steps=FLAGS.decode_steps, max_batch=max(batches),
                 max_tokens=FLAGS.prompt_len + FLAGS.new_tokens + FLAGS.decode_steps + 1)
    model = bc.load_ours(model_dir, **sizes, dtype=FLAGS.dtype, speculative=FLAGS.speculative)
    result["load_s"] = time.perf_counter() - t0

    peers = {}
    for name in [p for p in FLAGS.peer if p]:
        peer, why = bc.make_peer(name, model_dir, FLAGS.threads, **sizes, dtype=FLAGS.dtype)
        peers[name] = peer if peer is not None else why
        if peer is None:
            print(f"peer {name}: {why}")

    rows = []
    for b in batches:
        tokens = bc.prompts(b, FLAGS.prompt_len, shape.vocab)
        context = FLAGS.prompt_len + FLAGS.new_tokens / 2
        read_bw = mach["bandwidth"].get("read_2threads_gbps", 0) * 1e9 or None
        row: dict = dict(batch=b, roofline=bc.decode_roofline(shape, bw, peak, b, context, read_bw))
        systems = {"ours": lambda toks, n: model.generate(toks.tolist(), max_new_tokens=n)}
        row["peers"] = {}
        for name, peer in peers.items():
            if isinstance(peer, str):
                row["peers"][name] = dict(status=peer)
            elif b > 1 and not getattr(peer, "batched", True):
                row["peers"][name] = dict(status=f"skipped: {name} runs one sequence at a time")
            else:
                systems[name] = peer.generate
        print(f"batch {b}: {', '.join(systems)} in {FLAGS.runs} interleaved rounds ...", flush=True)
        figures, paired = bench_generate(systems, tokens, FLAGS.new_tokens, FLAGS.runs)
        row["ours"] = {"generate": figures.pop("ours")}
        row["peers"].update(figures)
        row["paired"] = paired
        if FLAGS.engine_metrics:
            try:
                row["ours"]["engine"] = bench_ours_engine(model, tokens, FLAGS.new_tokens, min(3, FLAGS.runs))
            except Exception as e:  # noqa: BLE001 - engine internals move; never lose the generate figure
                row["ours"]["engine"] = dict(error=f"{type(e).__name__}: {e}")
        ours = row["ours"]["generate"]["tok_s"]
        rf = row["roofline"]
        row["ratios"] = dict(
            ours_over_roofline=bc.ratio(ours, rf["roofline_tok_s"]),
            ours_over_weight_read_roofline=bc.ratio(ours, rf["weight_read_tok_s"]),
            engine_over_roofline=bc.ratio(row["ours"].get("engine", {}).get("tok_s"), rf["roofline_tok_s"]),
            **{f"ours_over_{n}": bc.ratio(ours, p.get("tok_s")) for n, p in row["peers"].items()},
        )
        rows.append(row)
        peer_txt = "  ".join(
            f"{n} {p['tok_s']:.1f} (paired {row['paired'].get(f'ours_over_{n}') or float('nan'):.2f}x)" if p.get("tok_s")
            else f"{n} {p.get('status', '-')}" for n, p in row["peers"].items()
        )
        prog = row["ours"].get("engine", {}).get("tok_s")
        print(
            f"batch {b:3d}: ours {ours or float('nan'):7.1f} tok/s (engine tpot {prog or float('nan'):7.1f})  {peer_txt}  "
            f"roofline {rf['roofline_tok_s']:.1f} ({rf['bound']}) -> {100 * (row['ratios']['ours_over_roofline'] or 0):.0f}%"
        )
        result["rows"] = rows
        bc.write_json(FLAGS.out, result)  # after every batch size: partial results survive a timeout
    progs = {id(p): p for p in (getattr(model, "programs", None), getattr(model, "decode_programs", None)) if p}
    result["compile_seconds"] = {str(k): v for p in progs.values() for k, v in getattr(p, "compile_seconds", {}).items()}
    bc.write_json(FLAGS.out, result)


if __name__ == "__main__":
    app.run(main)
