"""The plumbing of the agent-trace calibration (experiments/calibrate_agent.py), not its numbers:
fitting the CPU Hardware from engine step times, replaying a trace's sessions in the simulator, and
the simulator's engine loop (InstanceSpec.call_steps, one shared processor). Abstract: no weights,
no compilation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from infire_jax.checkpoint.tiny import make_config
from infire_jax.engine.trace import make_trace
from infire_jax.plan import Deployment, plan_capacity
from infire_jax.plan.calibrate import call_time_spread, fit_engine_steps, replay_sessions
from infire_jax.plan.hardware import cpu_hardware
from infire_jax.plan.simulator import AgentWorkload, ClusterPlan, CostModel, InstanceSpec, Turn, simulate

CFG = make_config("smollm-135m", dict(num_hidden_layers=2)) | {"_name": "smollm-L2"}


def _cost(hw):
    return CostModel(plan_capacity(CFG, Deployment(hw, 1, mesh="tp=1", weights="fp32")), hw)


@pytest.fixture(scope="module")
def truth():
    """A CPU whose rates we know: the step times it implies are what the fit gets to see."""
    return cpu_hardware(bandwidth=1e15, flops=50e9, step_overhead_s=0.0,
                        matmul_rates=((1, 5e9), (2, 8e9), (4, 14e9), (8, 20e9), (16, 25e9), (64, 35e9), (256, 45e9)),
                        attention_rates=((1, 3e9), (8, 3e9), (16, 60e9), (256, 60e9)))


def _points(cost):
    decode = {(m, c): cost.stage_time(m, m, m * c, m * c) for m in (1, 2, 4, 8) for c in (64, 512)}
    chunk = {(w, p): cost.stage_time(w, 1, **cost.chunk_terms(p, w)) for w in (16, 64, 256) for p in (32, 1024)}
    return decode, chunk


def test_fit_recovers_the_rates_behind_the_step_times(truth):
    cost = _cost(truth)
    decode, chunk = _points(cost)
    whole = {n: f * cost.stage_time(w, 1, **cost.chunk_terms(0, w)) for n, w, f in ((40, 64, 0.6), (200, 256, 0.9))}
    ship = {64: 2e-3 + 64 * cost.plan.kv_bytes_per_token_total / 5e9,
            960: 2e-3 + 960 * cost.plan.kv_bytes_per_token_total / 5e9}
    hw = fit_engine_steps(cost, decode, chunk, bandwidth=1e15, link_bw=1e9, whole_s=whole, transfer_s=ship,
                          kv_bytes_per_token=cost.plan.kv_bytes_per_token_total, spread=0.25)
    assert hw.call_time_spread == 0.25
    got = dict(hw.matmul_rates)
    for m, rate in ((1, 5e9), (4, 14e9), (8, 20e9), (16, 25e9), (64, 35e9), (256, 45e9)):
        assert got[m] == pytest.approx(rate, rel=1e-6)
    assert hw.attention_rate(4) == pytest.approx(3e9, rel=1e-6)
    assert hw.attention_rate(64) == pytest.approx(60e9, rel=1e-6)
    assert hw.whole_prompt_factor == pytest.approx(0.75, rel=1e-6)  # the median
    assert [w for w, _ in hw.whole_prompt_factors] == [64, 256]
    assert [f for _, f in hw.whole_prompt_factors] == pytest.approx([0.6, 0.9], rel=1e-6)
    # by the call's padded tokens: linear in log between the measured widths, flat outside
    assert [hw.whole_factor(n) for n in (16, 64, 128, 256, 2048)] == pytest.approx([0.6, 0.6, 0.75, 0.9, 0.9], rel=1e-6)
    assert hw.link_bw == pytest.approx(5e9, rel=1e-6) and hw.transfer_latency_s == pytest.approx(2e-3, rel=1e-6)
    fitted = _cost(hw)  # the fitted model predicts its own points back
    for (m, c), t in decode.items():
        assert fitted.stage_time(m, m, m * c, m * c) == pytest.approx(t, rel=1e-6)
    with pytest.raises(ValueError, match="rows = 1"):
        fit_engine_steps(cost, {k: v for k, v in decode.items() if k[0] != 1}, chunk, bandwidth=1e15, link_bw=1e9)


def test_replayed_trace_sessions_and_engine_loop(truth):
    trace = make_trace(sessions=3, turns=3, vocab_size=1000, system_tokens=128, tool_tokens=(20, 40),
                       user_tokens=(4, 8), max_tokens=16, session_interval_s=0.2, seed=1)
    sessions, starts = replay_sessions(trace)
    assert starts == [0.0, 0.2, 0.4] and [len(s) for s in sessions] == [3, 3, 3]
    by = {(t.session, t.turn): t for t in trace}
    for s, turns in enumerate(sessions):
        assert turns[0].prompt == len(by[(s, 0)].append)
        for k in (1, 2):  # previous prompt + its 16 generated tokens + what the turn appends
            assert turns[k].prompt == turns[k - 1].prompt + 16 + len(by[(s, k)].append)
    cost = _cost(truth)
    spec = lambda role: InstanceSpec(role, "tp=1", 1, 512, 16, cost, cost.plan, call_steps=8, page_size=16)  # noqa: E731
    workload = AgentWorkload(turns=3, system_tokens=128)
    col = simulate(ClusterPlan([spec("colocated")]), workload, 1.0, sessions=sessions, starts=starts)
    pd = simulate(ClusterPlan([spec("prefill"), spec("decode")]), workload, 1.0, sessions=sessions, starts=starts,
                  one_loop=True)
    for res in (col, pd):
        assert res.n == 9 and len(res.samples["ttft"]) == 9 and len(res.samples["tpot"]) == 9
        assert (res.samples["ttft"] > 0).all() and (res.samples["tpot"] > 0).all()
        assert 0.5 < res.hit_ratio < 1.0  # later turns and sessions reuse whole pages of what came before
    # one processor for both roles: prefill calls wait for decode calls and the other way round, so
    # first tokens come later and the trace takes longer than on two processors
    two = simulate(ClusterPlan([spec("prefill"), spec("decode")]), workload, 1.0, sessions=sessions, starts=starts)
    assert pd.ttft["p50"] > two.ttft["p50"] and pd.makespan > two.makespan
    # a whole-prompt call priced by the measured factor
    cheap = dataclasses.replace(truth, whole_prompt_factor=0.5)
    cost2 = _cost(cheap)
    spec2 = InstanceSpec("colocated", "tp=1", 1, 512, 16, cost2, cost2.plan, call_steps=8, page_size=16)
    faster = simulate(ClusterPlan([spec2]), AgentWorkload(turns=1, system_tokens=0), 1.0,
                      sessions=[s[:1] for s in sessions], starts=starts)
    slower = simulate(ClusterPlan([spec("colocated")]), AgentWorkload(turns=1, system_tokens=0), 1.0,
                      sessions=[s[:1] for s in sessions], starts=starts)
    assert faster.ttft["p50"] < slower.ttft["p50"]
    with pytest.raises(ValueError, match="one start time per session"):
        simulate(ClusterPlan([spec("colocated")]), workload, 1.0, sessions=sessions, starts=starts[:2])


def test_call_time_spread_pools_log_deviations_from_each_shapes_median():
    e = math.exp
    # two shapes at different costs, deviations of +-0.2 and +-0.4 in log around their medians
    got = call_time_spread([[1.0, e(0.2), e(-0.2)], [0.05 * e(-0.4), 0.05, 0.05 * e(0.4)], [3.0]])
    assert got == pytest.approx(math.sqrt((2 * 0.2 ** 2 + 2 * 0.4 ** 2) / 4), rel=1e-9)
    assert call_time_spread([[2.0], []]) == 0.0  # single times say nothing about the spread
    assert call_time_spread([[1.0, 1.0, 1.0]]) == 0.0


def test_jittered_call_times_keep_the_price_as_median(truth):
    """Hardware.call_time_spread: each engine-loop call's time is drawn around its price (median =
    price, log-sd = spread), reproducibly per seed; without it every run is the same."""
    sessions, starts = [[Turn(300, 2, 0.0)]], [0.0]
    workload = AgentWorkload(turns=1, system_tokens=0)

    def plan(hw):
        cost = _cost(hw)
        return ClusterPlan([InstanceSpec("colocated", "tp=1", 1, 512, 16, cost, cost.plan, call_steps=8, page_size=16)])

    def ttft(p, seed):
        return simulate(p, workload, 1.0, sessions=sessions, starts=starts, seed=seed).ttft["p50"]

    exact_plan, noisy = plan(truth), plan(dataclasses.replace(truth, call_time_spread=0.3))
    exact = ttft(exact_plan, 0)
    assert ttft(exact_plan, 1) == exact
    draws = np.array([ttft(noisy, k) for k in range(300)])
    assert ttft(noisy, 5) == draws[5]  # reproducible per seed
    logs = np.log(draws / exact)
    assert abs(np.median(logs)) < 0.06 and np.std(logs) == pytest.approx(0.3, rel=0.15)


def test_one_processor_pd_decodes_a_prompt_right_after_its_prefill(truth):
    """1P:1D in one engine loop: a step's shipment lands before the decode worker's turn, so a
    finished prompt's first decode call is never queued behind the next prefill call (here B's,
    which arrived during A's prefill): A's TPOT is the same as alone."""
    cost = _cost(truth)
    spec = lambda role: InstanceSpec(role, "tp=1", 1, 512, 16, cost, cost.plan, call_steps=8, page_size=16)  # noqa: E731
    plan, workload = ClusterPlan([spec("prefill"), spec("decode")]), AgentWorkload(turns=1, system_tokens=0)
    alone = simulate(plan, workload, 1.0, sessions=[[Turn(300, 2, 0.0)]], starts=[0.0], one_loop=True)
    both = simulate(plan, workload, 1.0, sessions=[[Turn(300, 2, 0.0)], [Turn(400, 2, 0.0)]], starts=[0.0, 0.001],
                    one_loop=True)
    assert both.samples["tpot"][0] == pytest.approx(alone.samples["tpot"][0], rel=1e-9)
    assert both.samples["tpot"][1] > both.samples["tpot"][0]  # B decodes after A's call


def test_engine_loop_steps_once_every_request_of_the_instant_is_in(truth):
    """Two sessions that start together, and whose answers end in one step, have their turns prefilled
    in one call each time (equal TTFTs), as the replay submits every due turn before the engine
    steps: the loop stays in lockstep instead of starting a step on the first arrival."""
    cost = _cost(truth)
    plan = ClusterPlan([InstanceSpec("colocated", "tp=1", 1, 512, 16, cost, cost.plan, call_steps=8, page_size=16)])
    sessions = [[Turn(300, 16, 0.0), Turn(400, 16, 0.0)], [Turn(200, 16, 0.0), Turn(350, 16, 0.0)]]
    res = simulate(plan, AgentWorkload(turns=2, system_tokens=0), 1.0, sessions=sessions, starts=[0.0, 0.0])
    ttft = res.samples["ttft"]
    assert len(ttft) == 4 and ttft[0] == ttft[1] and ttft[2] == ttft[3]
