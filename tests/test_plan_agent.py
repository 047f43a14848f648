"""Agent sessions in the P/D simulator: prefix caches in the KV memory a plan leaves, session
affinity, P/D transfer of missing pages only, cost per token, and boot time on paper.

Abstract like tests/test_plan.py (no weights, no compilation); small sessions keep it to ~30 s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

from infire_jax.plan import Deployment, plan_capacity
from infire_jax.plan.prices import PriceError, entry_of, load_prices
from infire_jax.plan.simulator import (
    WORKLOADS, AgentWorkload, ClusterPlan, InstanceSpec, candidate_plans, goodput, simulate,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Short prefill-heavy sessions: long tool outputs, short answers, a tight TTFT SLO.
SMALL = AgentWorkload(turns=4, system_tokens=2000, first_user=(400, 0.5, 50, 2000), tool=(3000, 0.5, 200, 12000),
                      user=(50, 0.5, 5, 400), output=(80, 0.5, 16, 400), gap=(1.0, 0.5), ttft_slo=1.0, tpot_slo=0.05)


def _plans(model: str, count: int, mesh: str):
    return candidate_plans(model, "h100", count, meshes=(mesh,), chunks=(2048,))


def test_sessions_resend_the_conversation():
    w = WORKLOADS["agent"]
    sessions = w.sessions(20, seed=3)
    assert all(1 <= len(s) <= w.turns for s in sessions)
    for s in sessions:
        assert s[0].prompt >= w.system_tokens + w.first_user[2]
        for prev, turn in zip(s, s[1:]):  # turn k = turn k-1's prompt and answer + tool output + user message
            added = turn.prompt - prev.prompt - prev.output
            assert w.tool[2] + w.user[2] <= added <= w.tool[3] + w.user[3]
        assert s[-1].prompt + s[-1].output <= w.max_context
    assert w.sessions(20, seed=3) == sessions  # deterministic
    mp, _ = w.means()
    assert w.new_tokens_mean() < 0.2 * mp  # most of a turn was sent one turn ago


def test_hit_ratio_follows_the_kv_capacity_left():
    _, col = _plans("llama31_8b", 1, "tp=1")
    plan = col[0]
    roomy = simulate(plan, SMALL, 1.0, seed=1)
    spec = plan.instances[0]
    # the same instance with KV memory left for about two long conversations
    tight_cap = dataclasses.replace(spec.capacity, kv_free_per_device=2 * spec.capacity.seq_bytes_per_device(16000))
    tight = simulate(ClusterPlan([dataclasses.replace(spec, capacity=tight_cap)]), SMALL, 1.0, seed=1)
    mp, _ = SMALL.means()
    ideal = 1 - SMALL.new_tokens_mean() / mp  # every turn finds its conversation so far
    assert roomy.hit_ratio > 0.9 * ideal, (roomy.row(), ideal)
    assert tight.hit_ratio < roomy.hit_ratio - 0.2, (tight.hit_ratio, roomy.hit_ratio)
    assert tight.prefill_tokens > roomy.prefill_tokens
    assert tight.ttft["p50"] > roomy.ttft["p50"]


def test_session_affinity_raises_hit_ratio_and_lowers_cost():
    _, col = _plans("llama31_8b", 2, "tp=1")
    plan = next(p for p in col if p.instances[0].count == 2)
    price = entry_of("h100")["usd_per_gpu_hour"]
    rows = {}
    for aff in (True, False):
        g, res = goodput(plan, SMALL, iters=5, affinity=aff)
        rows[aff] = res.row(price) | {"goodput": g}
    on, off = rows[True], rows[False]
    assert on["goodput"] > off["goodput"], (on, off)
    assert on["hit_ratio"] > off["hit_ratio"], (on, off)  # at a higher load
    same = {aff: simulate(plan, SMALL, off["goodput"], affinity=aff) for aff in (True, False)}
    assert same[True].hit_ratio > same[False].hit_ratio + 0.08, (same[True].row(), same[False].row())
    assert on["usd_per_mtok_all"] < off["usd_per_mtok_all"]
    assert on["usd_per_mtok_input"] < off["usd_per_mtok_input"]


def test_pd_sends_only_the_pages_decode_lacks():
    dis, _ = _plans("llama31_8b", 2, "tp=1")
    plan = dis[0]
    res = simulate(plan, SMALL, 0.3, seed=2)
    assert res.rejected == 0 and res.hit_ratio > 0.3
    total_prompt = res.prefill_tokens / (1 - res.hit_ratio)  # prompt tokens of the measured turns
    # the decode instance keeps each conversation: a later turn ships its new tokens only
    assert res.transferred_tokens < 0.5 * total_prompt, (res.transferred_tokens, total_prompt)
    blind = simulate(plan, SMALL, 0.3, seed=2, affinity=False)  # one decode instance: it holds them anyway
    assert blind.transferred_tokens == res.transferred_tokens


def test_cost_per_token_splits_gpu_time_between_prompt_and_output():
    dis, _ = _plans("llama31_8b", 2, "tp=1")
    res = simulate(dis[0], SMALL, 0.3, seed=2)
    price = 4.0
    inp, out = res.usd_per_mtok(price)
    assert res.input_share == 0.5  # 1 prefill GPU of 2
    assert math.isclose(inp, 2 * price / 3600 * 0.5 / res.input_tok_s * 1e6)
    assert math.isclose(out, 2 * price / 3600 * 0.5 / res.output_tok_s * 1e6)
    row = res.row(price)
    assert math.isclose(row["usd_per_mtok_all"], 2 * price / 3600 / (res.input_tok_s + res.output_tok_s) * 1e6)


def test_price_table(tmp_path):
    prices = load_prices()
    for hw in ("h100", "h200", "cpu"):
        assert prices[hw]["usd_per_gpu_hour"] > 0 and prices[hw]["source"]
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"h100": {"usd_per_gpu_hour": "cheap"}}))
    with pytest.raises(PriceError, match="usd_per_gpu_hour"):
        load_prices(bad)
    bad.write_text(json.dumps({"h100": {"usd_per_gpu_hour": 2.0}}))
    with pytest.raises(PriceError, match="no price for hardware 'h200'"):
        entry_of("h200", load_prices(bad))


def test_simulate_pd_agent_cli(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "experiments", "simulate_pd.py"), "--model=llama31_8b", "--hardware=h100",
           "--count=2", "--workload=agent", "--meshes=tp=1", "--requests=40", "--json",
           f"--pareto={tmp_path / 'pareto.png'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    j = json.loads(out.stdout)
    for kind in ("best_colocated", "best_disaggregated"):
        assert {"ttft_p50_ms", "ttft_p90_ms", "tpot_p90_ms", "hit_ratio", "usd_per_mtok_input",
                "usd_per_mtok_output"} <= set(j[kind]), j[kind]
    assert j["price"]["source"] and (tmp_path / "pareto.png").stat().st_size > 10_000
    assert "with_affinity" in j["affinity_effect"]["colocated"]


def test_boot_time_on_paper():
    from infire_jax.plan.capacity import boot_time

    k25 = plan_capacity("kimi_k25", Deployment("h100", 8, mesh="tp=8", weights="int4_experts"))
    b = boot_time(k25)
    assert set(b) >= {"read_s", "host_to_device_s", "compile_s", "total_s", "assumptions"}
    # 8 devices read their ~70 GB shards in parallel from local NVMe, then PCIe
    assert 5 < b["read_s"] < 60 and 1 < b["host_to_device_s"] < 10
    assert math.isclose(b["total_s"], b["read_s"] + b["host_to_device_s"] + b["compile_s"] + b["init_s"], rel_tol=1e-6)
    faster = boot_time(k25, storage_bw=2 * b["assumptions"]["storage_bytes_per_s"])
    assert faster["read_s"] < b["read_s"]
