"""Where a replayed agent trace's time goes, in the engine and in the simulator, request by request.

  python experiments/timeline_agent.py --settings colocated_short_reuse --out /tmp/timeline.json

One calibration (experiments/calibrate_agent.py's points, --calibration_rounds rounds), then one
setting replayed through the engine with every step, prefill call and decode call timed (wall clock,
from the start of the pass), and the same trace simulated with the calibrated Hardware and every
simulated step logged. Printed: per request (session, turn) the submit time, the start and end of
the step whose prefill call gave its first token, TTFT, engine and simulator side by side; per call
kind the measured time against the cost model's price of the same padded shape; the time between
calls (the engine's host-side work the per-call costs do not hold).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import statistics
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import calibrate_agent as cal_lib  # noqa: E402  (its flags: --layers, --settings, --calls, ...)
import bench_agent_trace as bench  # noqa: E402
import flags_common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("passes", 2, "Measured passes of the trace (each with other token ids).")


class _Recorder:
    """Wraps one engine's workers: step, prefill call and decode call times, in seconds from t0."""

    def __init__(self, engine):
        self.engine, self.t0, self.events = engine, time.perf_counter(), []
        self.submitted: list = []
        orig_submit = engine.submit

        def submit(*a, **k):
            r = orig_submit(*a, **k)
            self.submitted.append(r)
            return r

        engine.submit = submit
        for w in engine.workers:
            self._wrap(w)
        orig_ship = engine._ship

        def ship(p, s):
            t = self.now()
            orig_ship(p, s)
            self.events.append(dict(kind="ship", worker=p.name, t0=t, t1=self.now(), rows=[x.id for x in s.rows]))

        engine._ship = ship

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def reset(self) -> None:
        self.t0, self.events, self.submitted = time.perf_counter(), [], []

    def _wrap(self, w) -> None:
        rec = self
        orig_step, orig_pf = w.step, getattr(w, "_prefill_call", None)
        orig_dec = getattr(w, "_decode_call", None)

        def step():
            t = rec.now()
            out = orig_step()
            rec.events.append(dict(kind="step", worker=w.name, t0=t, t1=rec.now()))
            return out

        def prefill_call():
            head = w.prefilling[0] if w.prefilling else None
            whole = bool(head is not None and head.computed == 0 and len(head.request.prompt) <= w.prefill_budget)
            t = rec.now()
            plan = orig_pf()
            if plan:
                b = w.programs.batch_bucket(len(plan))
                ns = [n for _, n in plan]
                width = max(16, 1 << (max(ns) - 1).bit_length())
                rec.events.append(dict(kind="whole" if whole else "chunk", worker=w.name, t0=t, t1=rec.now(), b=b,
                                       width=width, rows=[(row.id, n, row.computed - n) for row, n in plan]))
            return plan

        def decode_call(steps):
            n = len(w.running) + len(w.ready)
            t = rec.now()
            ctx = sum(r.length for r in w.running) + sum(len(row.request.prompt) for row in list(w.ready))
            out = orig_dec(steps)
            if n:
                rec.events.append(dict(kind="decode", worker=w.name, t0=t, t1=rec.now(), n=min(n, w.max_batch),
                                       steps=steps, ctx=ctx))
            return out

        w.step = step
        if orig_pf is not None:
            w._prefill_call = prefill_call
        if orig_dec is not None:
            w._decode_call = decode_call


def _sim_recorded(hw, model_cfg, kind, params, trace):
    """predict_setting with every engine-loop step logged: (events, requests)."""
    from infire_jax.plan import simulator as sim_mod

    events, reqs = [], []
    inst = sim_mod._Instance
    orig_step, orig_pf, orig_submit = inst._engine_step, inst._engine_prefill, inst.submit
    last = {}

    def engine_prefill(self):
        t, taken = orig_pf(self)
        last["pf"] = (t, [(r, n, r.done_prefill) for r, n in taken])
        return t, taken

    def engine_step(self):
        last.pop("pf", None)
        now = self.sim.now
        busy0 = self.busy
        orig_step(self)
        if self.busy and not busy0:
            t_pf, taken = last.get("pf", (0.0, []))
            events.append(dict(role=self.spec.role, t0=now, t1=self.step_end, t_pf=t_pf, rows=len(self.rows),
                               taken=[((r.session, r.turn), n, done) for r, n, done in taken]))

    def submit(self, r):
        if r not in reqs:
            reqs.append(r)
        return orig_submit(self, r)

    inst._engine_step, inst._engine_prefill, inst.submit = engine_step, engine_prefill, submit
    try:
        pred = cal_lib.predict_setting(hw, model_cfg, kind, params, trace)
    finally:
        inst._engine_step, inst._engine_prefill, inst.submit = orig_step, orig_pf, orig_submit
    return pred, events, reqs


def _price(cost, ev) -> float:
    """The cost model's seconds for one recorded engine call (the simulator's engine-loop formulas)."""
    if ev["kind"] in ("whole", "chunk"):
        terms = dict(pf_pairs_full=0.0, pf_pairs_capped=0.0, pf_prefix_full=0.0, pf_prefix_capped=0.0)
        b, width = ev["b"], ev["width"]
        if ev["kind"] == "whole":
            for k, v in cost.chunk_terms(0, width).items():
                terms[k] += b * v
            return cost.stage_time(b * width, b, **terms) * cost.hw.whole_factor(b * width)
        for _, _, done in ev["rows"]:
            for k, v in cost.chunk_terms(done, width).items():
                terms[k] += v
        return cost.stage_time(b * width, b, **terms)
    if ev["kind"] == "decode":
        n, steps = ev["n"], ev["steps"]
        b = max(1, 1 << (n - 1).bit_length())
        per = cost.stage_time(b, b, ev["ctx"] + n * (steps - 1) / 2.0, ev["ctx"] + n * (steps - 1) / 2.0)
        call = cost.hw.step_overhead_s
        return steps * (per - call) + call
    return 0.0


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    from infire_jax import boot

    boot.use_compilation_cache(FLAGS.compilation_cache_dir or None)
    from infire_jax.engine import trace as trace_lib
    from infire_jax.engine.build import Deployment as EngineDeployment
    from infire_jax.engine.trace import replay
    from infire_jax.plan.capacity import Deployment, plan_capacity
    from infire_jax.plan.hardware import cpu_hardware
    from infire_jax.plan.simulator import CostModel

    model_dir, vocab, model_cfg = cal_lib.calibration_model()
    name = (FLAGS.settings or "colocated_short_reuse").split(",")[0]
    kind, params = cal_lib.SETTINGS[name]
    options = flags_common.engine_options()
    deploys = {k: EngineDeployment(model_dir, *cal_lib.DEPLOYMENTS[k], dtype="float32", options=options)
               for k in sorted({kind, "colocated"})}
    cap = plan_capacity(model_cfg, Deployment(cpu_hardware(), 1, mesh="tp=1", weights="fp32"))
    cost_raw = CostModel(cap)
    cal = cal_lib.Calibration(deploys["colocated"], deploys.get("1p1d"), vocab)
    for _ in range(FLAGS.calibration_rounds):
        cal.round()
    trace = trace_lib.make_trace(vocab_size=vocab, max_tokens=16, think_s=0.0, seed=7, **params)
    engine = deploys[kind].engine(dataclasses.replace(deploys[kind].options, prefix_cache=True))
    rec = _Recorder(engine)
    replay(engine, bench._shifted(trace, vocab, FLAGS.passes + 1))  # warm-up copy
    passes = []
    for k in range(FLAGS.passes):
        programs0 = boot.clock.programs_requested
        rec.reset()
        records = replay(engine, bench._shifted(trace, vocab, k))
        reqs = {r.id: r for r in rec.submitted}
        passes.append(dict(events=rec.events, compiled=boot.clock.programs_requested - programs0,
                           load=cal_lib._load(),
                           requests={f"{s}.{t}": dict(submitted=reqs[("trace", s, t)].submitted - rec.t0,
                                                      prefill_start=reqs[("trace", s, t)].times["prefill_start"] - rec.t0,
                                                      first_token=reqs[("trace", s, t)].times["first_token"] - rec.t0,
                                                      end=reqs[("trace", s, t)].times["end"] - rec.t0,
                                                      prompt=int(len(reqs[("trace", s, t)].prompt)),
                                                      cached=reqs[("trace", s, t)].cached_tokens)
                                     for s, t in ((x["session"], x["turn"]) for x in records)}))
        print(f"pass {k}: {passes[-1]['compiled']} programs compiled, load {passes[-1]['load']}", flush=True)
    cal.round()
    hw, info = cal.fit(cost_raw, cap.kv_bytes_per_token_total)
    cost = CostModel(plan_capacity(model_cfg, Deployment(hw, 1, mesh="tp=1", weights="fp32")), hw)
    # one run with exact call times: its steps line up with the engine's one to one
    pred, sim_events, sim_reqs = _sim_recorded(dataclasses.replace(hw, call_time_spread=0.0), model_cfg, kind, params,
                                               trace)
    print(f"calibration: call overhead {info['call_overhead_ms']:.2f} ms, whole factors {hw.whole_prompt_factors}, "
          f"call-time spread {hw.call_time_spread:.2f}")
    # per call kind: measured vs priced
    for i, p in enumerate(passes):
        by = collections.defaultdict(lambda: [0, 0.0, 0.0])
        steps = [e for e in p["events"] if e["kind"] == "step"]
        for e in p["events"]:
            if e["kind"] in ("whole", "chunk", "decode", "ship"):
                x = by[e["kind"]]
                x[0] += 1
                x[1] += e["t1"] - e["t0"]
                x[2] += _price(cost, e)
                e["priced"] = _price(cost, e)
        busy = sum(e["t1"] - e["t0"] for e in steps)
        ttft = sorted(r["first_token"] - r["submitted"] for r in p["requests"].values())
        print(f"pass {i}: TTFT p50 {1e3 * statistics.median(ttft):.0f} ms (simulated {1e3 * pred['ttft_s']['p50']:.0f}), "
              f"compiled {p['compiled']}")
        calls = sum(v[1] for v in by.values())
        wall = max(e["t1"] for e in p["events"])
        print(f"pass {i}: wall {wall:.2f} s, in steps {busy:.2f} s, in calls {calls:.2f} s "
              f"({len(steps)} steps, of which with work {sum(1 for e in steps if e['t1'] - e['t0'] > 1e-3)})")
        for k, (n, m, pr) in sorted(by.items()):
            print(f"  {k:6s} {n:4d} calls: measured {m:7.3f} s, priced {pr:7.3f} s ({100 * (pr / m - 1):+.0f}%)")
    sim_busy = sum(e["t1"] - e["t0"] for e in sim_events)
    sim_pf = sum(e["t_pf"] for e in sim_events)
    print(f"simulated: {len(sim_events)} steps, busy {sim_busy:.2f} s, of which prefill {sim_pf:.2f} s, "
          f"makespan {max(r.t_done for r in sim_reqs):.2f} s")
    # per request
    sim_by = {(r.session, r.turn): r for r in sim_reqs}
    sim_first_step = {}
    for e in sim_events:
        for key, n, done in e["taken"]:
            if done + n >= sim_by[key].prompt:
                sim_first_step[key] = e
    print(f"{'req':6s} {'prompt':>6s} {'cached':>6s} | engine: submit  pf_start  first  ttft | sim: submit  "
          f"step0  first  ttft | d_submit d_ttft")
    clean = [i for i, p in enumerate(passes) if not p["compiled"]]
    show = clean[0] if clean else len(passes) - 1
    print(f"requests of pass {show} ({'clean' if clean else 'compiled programs'})")
    rows = []
    for key in sorted(passes[show]["requests"], key=lambda k: tuple(int(x) for x in k.split("."))):
        s, t = (int(x) for x in key.split("."))
        e = passes[show]["requests"][key]
        r = sim_by[(s, t)]
        st = sim_first_step.get((s, t), {})
        ttft_e, ttft_s = e["first_token"] - e["submitted"], r.t_first - r.arrival
        rows.append(dict(req=key, engine=e, sim=dict(submitted=r.arrival, first=r.t_first, step0=st.get("t0"),
                                                      cached=r.cached, prompt=r.prompt)))
        # the decode window (first token to the last): calls in it, engine and simulator
        win_e = [x for x in passes[show]["events"] if x["kind"] in ("whole", "chunk", "decode")
                 and e["first_token"] < x["t1"] <= e["end"] + 1e-6]
        win_s = [x for x in sim_events if r.t_first < x["t1"] <= r.t_done + 1e-9]
        print(f"{key:6s} {e['prompt']:6d} {e['cached']:6d} | {e['submitted']:7.3f} {e['prefill_start']:8.3f} "
              f"{e['first_token']:6.3f} {ttft_e * 1e3:5.0f} | {r.arrival:7.3f} {st.get('t0', float('nan')):6.3f} "
              f"{r.t_first:6.3f} {ttft_s * 1e3:5.0f} | {1e3 * (r.arrival - e['submitted']):+6.0f} "
              f"{1e3 * (ttft_s - ttft_e):+6.0f}  sim cached {r.cached} | decode window: engine "
              f"{1e3 * (e['end'] - e['first_token']):5.0f} ms ({sum(x['kind'] == 'decode' for x in win_e)} decode, "
              f"{sum(x['kind'] != 'decode' for x in win_e)} prefill calls), sim {1e3 * (r.t_done - r.t_first):5.0f} ms "
              f"({len(win_s)} steps, {sum(1 for x in win_s if x['taken'])} with prefill)")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(dict(setting=name, calibration=info, passes=passes, requests=rows,
                           sim_events=sim_events, predicted=pred), f, indent=1, default=str)


if __name__ == "__main__":
    app.run(main)
