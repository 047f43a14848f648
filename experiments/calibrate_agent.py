"""Calibrate the simulator on the real engine: predicted vs measured TTFT / TPOT of agent traces.

  python experiments/calibrate_agent.py --out /tmp/calibrate_agent.json

One run, one calibration for every setting (nothing is fitted per setting):
  1. calibration: the engine's own steps timed in isolation: decode calls of 1, 2, 4, 8 rows at two
     contexts, one-step decode calls (the fixed cost of a call), chunked-prefill calls of 16 ... 512
     tokens after two cached prefixes, whole-prompt prefills, and P -> D shipments (1P:1D). This
     machine is shared and its speed drifts with the load, so the points are measured in rounds,
     one before each setting and one after the last (medians over all rounds).
     plan.calibrate.fit_engine_steps turns them into the CPU Hardware entry; the fit's own points
     are predicted back as a check.
  2. five held-out agent traces (experiments/agent_trace.py's generator; prompt lengths, reuse and
     P:D differ), each replayed as experiments/bench_agent_trace.py replays it (a warm-up copy with
     other token ids first, then the trace, prefix cache on; records of two passes that compiled
     nothing) and simulated by plan.simulator with the calibrated Hardware, the engine's loop
     (InstanceSpec.call_steps; 1P:1D on one shared processor) and the trace's sessions.
The prediction prices every call exactly; beside it the calibrated Hardware's spread of the engine's
call times (plan.calibrate.call_time_spread of the repeated calibration calls) gives a second one with
every call's time drawn around its price (16 seeded runs pooled, as the measurement pools its passes).
Printed and written (--out): predicted vs measured TTFT and TPOT p50 / p90 per setting, the errors,
how many settings are within +-25% on both p50s, and the load average at every phase.

Model: the smollm-135m shape with --layers layers (default 4: hidden 576, 9 heads, 3 KV heads,
vocab 49152), deterministic random weights, float32.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_agent_trace as bench  # noqa: E402  (its flags: --kv_pages, --prefill_chunk, --decode_steps, ...)
import flags_common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 4, "Layers of the smollm-135m-shaped model.")
flags.DEFINE_string("checkpoint_root", None, "Where the model is written (default: a temp dir).")
flags.DEFINE_string("settings", None, "Comma-separated subset of the settings (default: all five).")
flags.DEFINE_integer("calls", 2, "Timed calls per calibration point and round.")
flags.DEFINE_integer("calibration_rounds", 3, "Interleaved rounds over the calibration points (medians over all).")
flags.DEFINE_float("tolerance", 0.25, "Relative error counted as a match.")
flags_common.define_compilation_cache_flag()

# name: (deployment, trace parameters). Sessions start session_interval_s apart; think time 0 (a
# turn follows its previous answer at once); 16 tokens per answer.
SETTINGS: dict[str, tuple[str, dict]] = {
    "colocated_short_reuse": ("colocated", dict(sessions=6, turns=4, system_tokens=256, tool_tokens=(32, 64),
                                                user_tokens=(8, 16), session_interval_s=0.4)),
    "colocated_long_reuse": ("colocated", dict(sessions=4, turns=4, system_tokens=1024, tool_tokens=(128, 256),
                                               user_tokens=(16, 48), session_interval_s=1.0)),
    "colocated_no_reuse": ("colocated", dict(sessions=10, turns=1, system_tokens=320, shared_system=False,
                                             tool_tokens=(0, 0), user_tokens=(16, 160), session_interval_s=0.3)),
    "pd_1p1d_medium": ("1p1d", dict(sessions=6, turns=4, system_tokens=512, tool_tokens=(64, 128),
                                    user_tokens=(8, 32), session_interval_s=0.5)),
    "pd_1p1d_long": ("1p1d", dict(sessions=4, turns=3, system_tokens=1024, tool_tokens=(192, 320),
                                  user_tokens=(16, 48), session_interval_s=1.0)),
}
DEPLOYMENTS = {"colocated": (["tp=1@0"], ["tp=1@0"]), "1p1d": (["tp=1@0"], ["tp=1@1"])}
DECODE_ROWS = (1, 2, 4, 8)
DECODE_CONTEXTS = (64, 512)
CHUNK_WIDTHS = (16, 64, 256, 512)
CHUNK_PREFIXES = (32, 1024)
WHOLE_PROMPTS = (48, 200, 500)
SHIP_PROMPTS = (64, 960)  # P -> D shipments of these prompts (1P:1D deployment)
CALL_ROWS = (1, 4)  # one-step decode calls (the per-call overhead)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


# ---- 1. calibration: the engine's steps in isolation ------------------------------------------
def _decode_times(engine, vocab: int, rows: int, ctx: int, rng, calls: int) -> tuple[list[float], float]:
    """(seconds per decode step of each timed call, mean context) of `rows` rows decoding alone."""
    from infire_jax.engine.sampling import SamplingParams

    steps = engine.decode_workers[0].steps
    reqs = [engine.submit(rng.integers(3, vocab, ctx).tolist(), SamplingParams(1 + steps * (calls + 3)))
            for _ in range(rows)]
    while not all(r.output for r in reqs):
        engine.step()
    engine.step()  # settle (a new page-table bucket compiles here)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t0) / steps)
    engine.run()
    return times, ctx + 2 * steps + steps * (calls - 1) / 2 + (steps - 1) / 2


def _prefill_times(engine, prompt, new_tokens: int, vocab: int, rng, calls: int,
                   expect_cached: int | None) -> list[float]:
    """TTFTs of one-token requests `prompt` + `new_tokens` random tokens on an idle engine (one
    prefill call each: whole, or a chunk after the cached `prompt`)."""
    from infire_jax.engine.sampling import SamplingParams

    times = []
    for _ in range(calls):
        r = engine.submit(list(prompt) + rng.integers(3, vocab, new_tokens).tolist(), SamplingParams(1))
        engine.run()
        if expect_cached is not None and r.cached_tokens != expect_cached:
            raise RuntimeError(f"calibration request reused {r.cached_tokens} tokens, expected {expect_cached}")
        times.append(r.metrics()["ttft_s"])
    return times


def _copy_bw() -> float:
    """This CPU's copy rate, (read + written) bytes/s of np.copyto of 128 MiB (best of 5)."""
    import numpy as np

    src = np.ones(32 << 20, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def _link_bw() -> float:
    """Bytes/s of a device_put between two CPU devices of this process (a KV page move)."""
    import jax
    import numpy as np

    d0, d1 = jax.devices()[:2]
    x = jax.device_put(np.ones(4 << 20, np.float32), d0)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        jax.device_put(x, d1).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return x.nbytes / best


class Calibration:
    """The calibration points, measured in rounds (medians over all rounds); the experiment runs one
    round before every setting and one after the last, so the one calibration sees the machine's
    load over the whole run (it drifts on a shared machine) and no setting is fitted on its own."""

    def __init__(self, colocated, pd, vocab: int):
        import collections

        import numpy as np

        self.vocab, self.rng = vocab, np.random.default_rng(1)
        self.engine = colocated.engine(dataclasses.replace(colocated.options, prefix_cache=True))
        self.pd = pd.engine(dataclasses.replace(pd.options, prefix_cache=False)) if pd is not None else None
        # decode calls of one step (what a colocated step runs while a prompt is mid-chunk): against
        # calls of decode_steps steps they give the fixed cost of a call
        self.one_step = colocated.engine(dataclasses.replace(colocated.options, prefix_cache=True, decode_steps=1))
        self.dec1 = collections.defaultdict(list)
        self.bases = {p: self.rng.integers(3, vocab, p).tolist() for p in CHUNK_PREFIXES}
        self.dec, self.dec_ctx = collections.defaultdict(list), {}
        self.chunk, self.whole, self.ship = (collections.defaultdict(list) for _ in range(3))
        self.rounds, self.seconds, self.loads = 0, 0.0, []

    def round(self) -> None:
        engine, vocab, rng, calls, first = self.engine, self.vocab, self.rng, FLAGS.calls, self.rounds == 0
        t0 = time.perf_counter()
        for rows in DECODE_ROWS:
            for ctx in DECODE_CONTEXTS:
                times, self.dec_ctx[(rows, ctx)] = _decode_times(engine, vocab, rows, ctx, rng, calls)
                self.dec[(rows, ctx)] += times
        for rows in CALL_ROWS:
            self.dec1[rows] += _decode_times(self.one_step, vocab, rows, DECODE_CONTEXTS[0], rng, 2 * calls)[0]
        for prefix, base in self.bases.items():
            _prefill_times(engine, base, 16, vocab, rng, 1, None)  # (re)cache the prefix
            for width in CHUNK_WIDTHS:
                times = _prefill_times(engine, base, width, vocab, rng, calls + first, prefix)
                self.chunk[(width, prefix)] += times[first:]  # the first round's first call compiles
        for n in WHOLE_PROMPTS:
            self.whole[n] += _prefill_times(engine, [], n, vocab, rng, calls + first, 0)[first:]
        if self.pd is not None:
            from infire_jax.engine.sampling import SamplingParams

            for n in SHIP_PROMPTS:  # the engine's own clock around each shipment's move
                for i in range(calls + first):
                    self.pd.reset_stats()
                    self.pd.submit(rng.integers(3, vocab, n).tolist(), SamplingParams(2))
                    self.pd.run()
                    st = self.pd.stats()
                    if i >= first and st["transfers"]:
                        self.ship[n].append(st["transfer_s"] / st["transfers"])
        self.rounds += 1
        self.seconds += time.perf_counter() - t0
        self.loads.append(_load())
        print(f"calibration round {self.rounds}: {time.perf_counter() - t0:.0f} s, load {self.loads[-1]}", flush=True)

    def fit(self, cost, kv_bytes_per_token: float) -> tuple[object, dict]:
        from infire_jax.plan.calibrate import call_time_spread, fit_engine_steps

        med = statistics.median
        decode = {(m, round(self.dec_ctx[(m, c)])): med(v) for (m, c), v in self.dec.items()}
        chunk = {k: med(v) for k, v in self.chunk.items()}
        whole = {n: med(v) for n, v in self.whole.items()}
        bw, link = _copy_bw(), _link_bw()
        steps = self.engine.decode_workers[0].steps
        short = DECODE_CONTEXTS[0]
        call = max(0.0, med([(steps * med(self.dec1[m]) - steps * med(self.dec[(m, short)])) / (steps - 1)
                             for m in CALL_ROWS]))
        # the jitter of the engine's calls: every repeated point (decode, one-step decode, chunk, whole)
        spread = call_time_spread([*self.dec.values(), *self.dec1.values(), *self.chunk.values(), *self.whole.values()])
        kw = dict(bandwidth=bw, link_bw=link, whole_s=whole, call_overhead_s=call, decode_steps=steps, spread=spread)
        hw = fit_engine_steps(cost, decode, chunk, **kw)
        transfer = {}
        if self.ship:
            transfer = {n: med(v) for n, v in self.ship.items() if v}
            hw = fit_engine_steps(cost, decode, chunk, transfer_s=transfer, kv_bytes_per_token=kv_bytes_per_token, **kw)
        info = dict(rounds=self.rounds, seconds=self.seconds, load_rounds=self.loads, bandwidth_gbs=bw / 1e9,
                    copy_link_gbs=link / 1e9, shipment_link_gbs=hw.link_bw / 1e9,
                    transfer_latency_ms=None if hw.transfer_latency_s is None else hw.transfer_latency_s * 1e3,
                    whole_prompt_factor=hw.whole_prompt_factor, whole_prompt_factors=hw.whole_prompt_factors,
                    call_overhead_ms=call * 1e3,
                    call_time_spread=hw.call_time_spread,
                    one_step_decode_ms={m: med(v) * 1e3 for m, v in self.dec1.items()},
                    matmul_rates_gflops={m: r / 1e9 for m, r in hw.matmul_rates},
                    attention_rates_gflops={m: r / 1e9 for m, r in hw.attention_rates},
                    decode_ms={f"{m}x{c}": v * 1e3 for (m, c), v in decode.items()},
                    chunk_ms={f"{w}@{p}": v * 1e3 for (w, p), v in chunk.items()},
                    whole_prefill_ms={n: v * 1e3 for n, v in whole.items()},
                    shipment_ms={n: v * 1e3 for n, v in transfer.items()})
        return hw, info


def check_points(cost_cal, info: dict) -> dict:
    """The calibrated cost model on its own points (fit residuals) and on whole-prompt prefills (held out)."""
    from infire_jax.plan.simulator import _pow2

    out = {}
    ov = cost_cal.hw.step_overhead_s
    for key, ms in info["decode_ms"].items():
        m, c = (int(x) for x in key.split("x"))
        out[f"decode {key}"] = ((cost_cal.stage_time(m, m, m * c, m * c) - ov * 7 / 8) * 1e3, ms)
    for key, ms in info["chunk_ms"].items():
        w, p = (int(x) for x in key.split("@"))
        out[f"chunk {key}"] = (cost_cal.stage_time(w, 1, **cost_cal.chunk_terms(p, w)) * 1e3, ms)
    for n, ms in info["whole_prefill_ms"].items():
        t = _pow2(n, 16)
        out[f"whole prefill {n}"] = (cost_cal.stage_time(t, 1, **cost_cal.chunk_terms(0, t)) * 1e3
                                     * cost_cal.hw.whole_factor(t), ms)
    return {k: dict(predicted_ms=round(p, 2), measured_ms=round(m, 2), error=round(p / m - 1, 3))
            for k, (p, m) in out.items()}


# ---- 2. the settings: measured (the bench's replay) and predicted (the simulator) --------------
def measure_setting(deploy, trace, vocab: int, clean_passes: int = 2, max_passes: int = 4) -> dict:
    """The bench's replay (a warm-up copy, then the trace with other token ids, prefix cache on), as
    bench_agent_trace.py --rounds does: records pooled over `clean_passes` passes that compiled no
    program (batching follows timing, so a pass can meet padded shapes the warm-up did not; a
    compilation there is no serving cost the simulator models), at most max_passes (if none was
    clean, the last pass)."""
    from infire_jax import boot
    from infire_jax.engine.trace import replay

    engine = deploy.engine(dataclasses.replace(deploy.options, prefix_cache=True))
    replay(engine, bench._shifted(trace, vocab, max_passes))  # warm-up copy: same lengths, nothing reusable
    kept, hits, load0, walls, compiled = [], [], _load(), [], []
    for k in range(max_passes):
        engine.reset_stats()
        t0, programs0 = time.perf_counter(), boot.clock.programs_prepared
        records = replay(engine, bench._shifted(trace, vocab, k))
        walls.append(time.perf_counter() - t0)
        compiled.append(boot.clock.programs_prepared - programs0)
        if not compiled[-1]:
            kept += records
            hits.append(engine.stats().get("hit_ratio"))
            if len(hits) == clean_passes:
                break
    if not kept:
        kept, hits = records, [engine.stats().get("hit_ratio")]
    return dict(
        ttft_s=bench._pcts([r["ttft_s"] for r in kept]),
        tpot_s=bench._pcts([r["tpot_s"] for r in kept if "tpot_s" in r]),
        hit_ratio=statistics.median(hits), wall_s=walls, load_before=load0, load_after=_load(),
        passes=len(walls), programs_per_pass=compiled, clean_passes=len(hits) if compiled.count(0) else 0,
        records=[dict(session=r["session"], turn=r["turn"], prompt=len(r["prompt"]), cached=r["cached_tokens"],
                      ttft_s=r["ttft_s"], tpot_s=r.get("tpot_s")) for r in kept],
    )


def predict_setting(hw, model_cfg: dict, kind: str, params: dict, trace, seeds: int = 16) -> dict:
    from infire_jax.plan.calibrate import replay_sessions
    from infire_jax.plan.capacity import Deployment, plan_capacity
    from infire_jax.plan.simulator import AgentWorkload, ClusterPlan, CostModel, InstanceSpec, simulate

    cap = plan_capacity(model_cfg, Deployment(hw, 1, mesh="tp=1", weights="fp32"))
    cost = CostModel(cap, hw)
    o = flags_common.engine_options()
    spec = lambda role: InstanceSpec(  # noqa: E731
        role, "tp=1", 1, o.prefill_chunk or o.prefill_max_tokens, o.max_decode_batch, cost, cap,
        call_steps=o.decode_steps, max_batch_tokens=o.prefill_max_tokens, page_size=o.page_size)
    plan = ClusterPlan([spec("colocated")] if kind == "colocated" else [spec("prefill"), spec("decode")])
    sessions, starts = replay_sessions(trace)
    workload = AgentWorkload(turns=params["turns"],
                             system_tokens=params["system_tokens"] if params.get("shared_system", True) else 0)
    # with a call-time spread every run is one draw of the jitter: pool the requests of several (as the
    # measurement pools its passes)
    runs = [simulate(plan, workload, rate=1.0, sessions=sessions, starts=starts, one_loop=kind != "colocated", seed=k)
            for k in range(seeds if hw.call_time_spread > 0 else 1)]
    ttft = [x for res in runs for x in res.samples["ttft"].tolist()]
    tpot = [x for res in runs for x in res.samples["tpot"].tolist()]
    return dict(ttft_s=bench._pcts(ttft), tpot_s=bench._pcts(tpot), hit_ratio=statistics.median(r.hit_ratio for r in runs),
                prefill_tokens=statistics.median(r.prefill_tokens for r in runs), runs=len(runs))


def _errors(predicted: dict, got: dict) -> dict:
    return {f"{m}_{q}": predicted[f"{m}_s"][q] / got[f"{m}_s"][q] - 1
            for m in ("ttft", "tpot") for q in ("p50", "p90") if got[f"{m}_s"][q] and predicted[f"{m}_s"][q]}


def calibration_model() -> tuple[str, int, dict]:
    """The calibration's checkpoint (smollm-135m shape with --layers layers, random weights, written once
    under --checkpoint_root): its directory, vocabulary size and config (named for the planner)."""
    from infire_jax.checkpoint.tiny import write_tiny_checkpoint
    from infire_jax.config import load_config

    root = FLAGS.checkpoint_root or os.path.join(tempfile.gettempdir(), "infire_jax_calibrate_agent")
    model_dir = os.path.join(root, f"smollm135m-L{FLAGS.layers}")
    if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        write_tiny_checkpoint(model_dir, "smollm-135m", overrides=dict(num_hidden_layers=FLAGS.layers), tokenizer=False)
    with open(os.path.join(model_dir, "config.json")) as f:
        model_cfg = json.load(f) | {"_name": f"smollm135m-L{FLAGS.layers}"}
    return model_dir, load_config(model_dir).vocab_size, model_cfg


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    from infire_jax import boot

    boot.use_compilation_cache(FLAGS.compilation_cache_dir or None)  # before anything compiles
    from infire_jax.engine import trace as trace_lib
    from infire_jax.engine.build import Deployment as EngineDeployment
    from infire_jax.plan.capacity import Deployment, plan_capacity
    from infire_jax.plan.hardware import cpu_hardware
    from infire_jax.plan.simulator import CostModel

    model_dir, vocab, model_cfg = calibration_model()
    names = FLAGS.settings.split(",") if FLAGS.settings else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise app.UsageError(f"unknown settings {unknown}; known: {list(SETTINGS)}")
    options = flags_common.engine_options()
    deploys = {k: EngineDeployment(model_dir, *DEPLOYMENTS[k], dtype="float32", options=options)
               for k in sorted({SETTINGS[n][0] for n in names} | {"colocated"})}
    cost_raw = CostModel(plan_capacity(model_cfg, Deployment(cpu_hardware(), 1, mesh="tp=1", weights="fp32")))
    cal = Calibration(deploys["colocated"], deploys.get("1p1d"), vocab)
    traces, measured = {}, {}
    for name in names:
        cal.round()
        kind, params = SETTINGS[name]
        traces[name] = trace_lib.make_trace(vocab_size=vocab, max_tokens=16, think_s=0.0, seed=7, **params)
        measured[name] = measure_setting(deploys[kind], traces[name], vocab)
        m = measured[name]
        print(f"{name}: measured TTFT p50 {m['ttft_s']['p50'] * 1e3:.1f} ms, TPOT p50 {m['tpot_s']['p50'] * 1e3:.2f} ms, "
              f"load {m['load_before']}-{m['load_after']}", flush=True)
    cal.round()
    cap = plan_capacity(model_cfg, Deployment(cpu_hardware(), 1, mesh="tp=1", weights="fp32"))
    hw, info = cal.fit(cost_raw, cap.kv_bytes_per_token_total)
    cost_cal = CostModel(plan_capacity(model_cfg, Deployment(hw, 1, mesh="tp=1", weights="fp32")), hw)
    info["check"] = check_points(cost_cal, info)
    for k, v in info["check"].items():
        print(f"calibration check {k}: predicted {v['predicted_ms']} ms, measured {v['measured_ms']} ms")
    print(json.dumps({k: v for k, v in info.items() if k not in ("decode_ms", "chunk_ms", "check")}, default=str))
    rows, tol = {}, FLAGS.tolerance
    for name in names:
        kind, params = SETTINGS[name]
        got = measured[name]
        # exact call times (the prices); and, beside it, every call's time drawn with the measured spread
        predicted = predict_setting(dataclasses.replace(hw, call_time_spread=0.0), model_cfg, kind, params,
                                    traces[name])
        err = _errors(predicted, got)
        ok = all(abs(err.get(k, 9.9)) <= tol for k in ("ttft_p50", "tpot_p50"))
        jitter = predict_setting(hw, model_cfg, kind, params, traces[name])
        err_jitter = _errors(jitter, got)
        rows[name] = dict(deployment=kind, trace=params, turns=len(traces[name]), measured=got, predicted=predicted,
                          error=err, within_tolerance=ok, predicted_jitter=jitter, error_jitter=err_jitter,
                          within_tolerance_jitter=all(abs(err_jitter.get(k, 9.9)) <= tol
                                                      for k in ("ttft_p50", "tpot_p50")))
        p_, m_ = predicted, got
        print(f"{name:22s} TTFT p50 {p_['ttft_s']['p50'] * 1e3:6.0f} / {m_['ttft_s']['p50'] * 1e3:6.0f} ms "
              f"({100 * err.get('ttft_p50', float('nan')):+4.0f}%)  p90 {p_['ttft_s']['p90'] * 1e3:6.0f} / "
              f"{m_['ttft_s']['p90'] * 1e3:6.0f} ({100 * err.get('ttft_p90', float('nan')):+4.0f}%)  "
              f"TPOT p50 {p_['tpot_s']['p50'] * 1e3:5.1f} / {m_['tpot_s']['p50'] * 1e3:5.1f} ms "
              f"({100 * err.get('tpot_p50', float('nan')):+4.0f}%)  p90 {p_['tpot_s']['p90'] * 1e3:5.1f} / "
              f"{m_['tpot_s']['p90'] * 1e3:5.1f} ({100 * err.get('tpot_p90', float('nan')):+4.0f}%)  "
              f"hit {p_['hit_ratio']:.2f} / {m_['hit_ratio'] or 0:.2f}  load {m_['load_before']}-{m_['load_after']}  "
              f"passes {m_['passes']} ({m_['clean_passes']} clean)  {'ok' if ok else 'MISS'}", flush=True)
        print(f"{'':22s} call times drawn with the spread: TTFT p50 {jitter['ttft_s']['p50'] * 1e3:6.0f} "
              f"({100 * err_jitter.get('ttft_p50', float('nan')):+4.0f}%)  TPOT p50 {jitter['tpot_s']['p50'] * 1e3:5.1f} "
              f"({100 * err_jitter.get('tpot_p50', float('nan')):+4.0f}%)", flush=True)
    result = dict(model=f"smollm-135m shape, {FLAGS.layers} layers, float32", model_dir=model_dir,
                  engine=dataclasses.asdict(options), calibration=info, settings=rows,
                  within_tolerance=sum(r["within_tolerance"] for r in rows.values()), settings_count=len(rows),
                  tolerance=tol)
    result["within_tolerance_jitter"] = sum(r["within_tolerance_jitter"] for r in rows.values())
    print(f"within +-{100 * tol:.0f}% on TTFT p50 and TPOT p50: {result['within_tolerance']} of {len(rows)} settings "
          f"(call times drawn with the measured spread {hw.call_time_spread:.2f}: "
          f"{result['within_tolerance_jitter']} of {len(rows)})")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    app.run(main)
