"""Capacity planner, cost model and P/D simulator (infire_jax.plan) on the real configs in configs/models/.

Everything here is abstract (nnx.eval_shape of the registered family classes, roofline costs, a
discrete-event simulation): no weights are allocated and no program is compiled. < 60 s.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from infire_jax.config import ConfigError
from infire_jax.plan import Deployment, HardwareError, PlanError, get_hardware, plan_best, plan_capacity
from infire_jax.plan.capacity import MODELS_DIR, layer_types, load_hf_config, model_config
from infire_jax.plan.hardware import GiB
from infire_jax.plan.simulator import WORKLOADS, CostModel, search

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Capacity: the acceptance deployments
# ------------------------------------------------------------------------------------------------


def test_kimi_k25_int4_needs_8_h100():
    seven, _ = plan_best("kimi_k25", Deployment("h100", 7, weights="int4_experts"))
    assert not seven.fits, seven.summary()
    eight, cands = plan_best("kimi_k25", Deployment("h100", 8, weights="int4_experts"))
    s = eight.summary()
    assert eight.fits and eight.int4_native, s
    assert 30 <= s["kv_free_gib"] <= 80, s
    # the Megatron default (tp=8) fits too, with the MLA latent cache replicated over tp
    tp8 = next(p for p in cands if p.mesh == "tp=8")
    assert tp8.fits and 30 <= tp8.kv_free_total / GiB <= 80
    assert tp8.kv_bytes_per_token_per_device == 61 * (512 + 64) * 2  # latent + rope key, every layer, bf16
    # int4 experts: 4 bits + a bf16 scale per 32 weights
    assert 540 < s["weights_gib_total"] < 570


def test_llama4_scout_bf16_needs_2_h200():
    one, _ = plan_best("llama4_scout", Deployment("h200", 1, weights="bf16"))
    assert not one.fits
    two, _ = plan_best("llama4_scout", Deployment("h200", 2, weights="bf16"))
    s = two.summary()
    assert two.fits and s["mesh"] == "tp=2", s
    assert 56 <= s["kv_free_gib"] <= 70, s
    assert s["max_context_tokens"] >= 1_000_000, s
    # 36 chunked (RoPE) layers capped at 8192 tokens, 12 global NoPE layers grow with the context
    assert s["kv_layers_per_device"] == {"chunked": 36, "full": 12}
    assert s["attention_chunk_size"] == 8192
    per_layer = 2 * 4 * 128 * 2  # k and v, 4 of 8 KV heads per device, bf16
    free = two.kv_free_per_device
    expect = (free - 36 * per_layer * 8192) / (12 * per_layer)
    assert math.isclose(s["max_context_tokens"], expect, rel_tol=1e-6)


@pytest.mark.parametrize(
    "model,published",
    [("kimi_k25", 1.04e12), ("llama4_scout", 109e9), ("llama31_8b", 8.03e9), ("qwen3_30b_a3b", 30.5e9)],
)
def test_bf16_weight_totals_match_published_parameter_counts(model, published):
    p = plan_capacity(model, Deployment("h200", 8, mesh="tp=8", weights="bf16"))
    assert abs(p.weight_bytes_total / (2 * published) - 1) < 0.03, (p.weight_bytes_total / 2e9, published / 1e9)
    assert abs(p.params_total / published - 1) < 0.03


def test_int4_native_parameters_unpack_to_the_bf16_count():
    bf16 = plan_capacity("kimi_k25", Deployment("h100", 8, mesh="tp=8", weights="bf16"))
    int4 = plan_capacity("kimi_k25", Deployment("h100", 8, mesh="tp=8", weights="int4_experts"))
    assert int4.params_total == bf16.params_total
    ratio = int4.weight_breakdown_total["routed_expert"] / bf16.weight_breakdown_total["routed_expert"]
    assert math.isclose(ratio, 0.28125, rel_tol=1e-3)  # (0.5 + 2/32) / 2


def test_weight_formats_and_estimates():
    bf16 = plan_capacity("llama4_scout", Deployment("h200", 2, mesh="tp=2", weights="bf16"))
    int4 = plan_capacity("llama4_scout", Deployment("h200", 2, mesh="tp=2", weights="int4_experts"))
    comp = plan_capacity("llama4_scout", Deployment("h200", 2, mesh="tp=2", weights="compressed"))
    assert not int4.int4_native  # Llama 4 has no int4 expert path: estimated from the bf16 shapes
    e_bf, e_i4 = bf16.weight_breakdown_total["routed_expert"], int4.weight_breakdown_total["routed_expert"]
    assert math.isclose(e_i4 / e_bf, 0.28125, rel_tol=1e-6)
    # palette12 applies to the stacked layer matrices, embeddings stay bf16
    assert math.isclose(comp.weight_breakdown_total["routed_expert"] / e_bf, 0.7502, rel_tol=1e-6)
    assert comp.weight_breakdown_total["embedding"] == bf16.weight_breakdown_total["embedding"]


def test_compressed_scout_gains_kv_by_what_compression_saves():
    """Scout on 2xH200 with compressed weights (routed experts included): the KV cache left grows by
    exactly the weight bytes saved per device, most of them the routed experts', whose bf16 bytes
    are the config's own count (layers x experts x 3 x hidden x expert columns x 2 B, tp=2 splits
    the expert columns)."""
    cfg = json.loads((MODELS_DIR / "llama4_scout.json").read_text())
    comp = plan_capacity("llama4_scout", Deployment("h200", 2, mesh="tp=2", weights="compressed"))
    bf16 = comp.bf16
    assert bf16.weights == "bf16" and bf16.mesh == comp.mesh
    experts_bf16 = len(cfg["moe_layers"]) * cfg["num_local_experts"] * 3 * cfg["hidden_size"] * cfg["intermediate_size"] * 2
    assert math.isclose(bf16.weight_breakdown_per_device["routed_expert"], experts_bf16 / 2, rel_tol=1e-12)
    experts_saved = bf16.weight_breakdown_per_device["routed_expert"] - comp.weight_breakdown_per_device["routed_expert"]
    assert math.isclose(experts_saved, (1 - 0.7502) * experts_bf16 / 2, rel_tol=1e-9)
    saved = bf16.weight_bytes_per_device - comp.weight_bytes_per_device
    assert math.isclose(comp.kv_free_per_device - bf16.kv_free_per_device, saved, rel_tol=1e-9)
    assert 0.9 * saved < experts_saved < saved
    v = comp.summary()["versus_bf16"]
    assert v["kv_gained_gib"] > 44 and v["routed_experts_saved_gib_per_device"] > 22  # ~24.1 GB of 2 x 96.6 GB
    assert v["max_context_tokens_gained"] > 0 and v["cache_tokens_at_8k_gained"] > 0
    assert v["max_context_tokens_bf16"] + v["max_context_tokens_gained"] == comp.summary()["max_context_tokens"]


def test_per_device_bytes_follow_the_layout():
    """Per-device shards come from the logical axes: tp splits heads / mlp / vocab, replicates the
    rest; pp splits the layer stacks (plus padding slots) and keeps embedding + head on every stage."""
    one = plan_capacity("llama31_8b", Deployment("h100", 1, mesh="tp=1"))
    tp2 = plan_capacity("llama31_8b", Deployment("h100", 2, mesh="tp=2"))
    pp2 = plan_capacity("llama31_8b", Deployment("h100", 2, mesh="pp=2"))
    norms = one.weight_breakdown_per_device["norm"]
    assert math.isclose(tp2.weight_bytes_per_device, (one.weight_bytes_per_device - norms) / 2 + norms, rel_tol=1e-9)
    emb = one.weight_breakdown_per_device["embedding"] + one.weight_breakdown_per_device["lm_head"]
    assert math.isclose(pp2.weight_bytes_per_device, (one.weight_bytes_per_device - emb - norms) / 2 + emb + norms / 2,
                        rel_tol=1e-3)
    # tp=16 on 8 KV heads: K/V replicated (Llama's kv_repeat=2), cache per token halves only to 1 head
    tp16 = plan_capacity("llama31_8b", Deployment("h100", 16, mesh="tp=16"))
    assert tp16.abstract.kv_repeat == 2
    assert tp16.kv_bytes_per_token_per_device == 32 * 2 * 1 * 128 * 2
    # pipeline padding: 61 layers on pp=7 -> 63 slots, the unsharded total counts real layers only
    k7 = plan_capacity("kimi_k25", Deployment("h100", 7, mesh="pp=7", weights="int4_experts"))
    k1 = plan_capacity("kimi_k25", Deployment("h100", 8, mesh="tp=8", weights="int4_experts"))
    assert k7.abstract.num_slots == 63
    assert math.isclose(k7.weight_bytes_total, k1.weight_bytes_total, rel_tol=1e-9)


def test_layer_types():
    _, hf = load_hf_config("llama4_scout")
    cfg, _ = model_config(hf, "bf16")
    types = layer_types(cfg)
    assert types.count("full") == 12 and types[3] == "full" and types[0] == "chunked"
    _, hf = load_hf_config("kimi_k25")
    assert set(layer_types(model_config(hf, "int4_experts")[0])) == {"mla"}


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_bad_input_errors():
    with pytest.raises(HardwareError, match="unknown hardware 'h300'.*h100"):
        get_hardware("h300")
    with pytest.raises(HardwareError, match="unknown hardware"):
        plan_best("llama31_8b", Deployment("tpu9", 1))
    with pytest.raises(PlanError, match="needs 16 devices but the deployment has only 8"):
        plan_capacity("llama31_8b", Deployment("h100", 8, mesh="tp=16"))
    with pytest.raises(PlanError, match="do not split"):
        plan_capacity("llama31_8b", Deployment("h100", 6, mesh="tp=4"))
    with pytest.raises(PlanError, match="weight format"):
        plan_capacity("llama31_8b", Deployment("h100", 1, weights="int3"))
    with pytest.raises(PlanError, match="unknown axis"):
        plan_capacity("llama31_8b", Deployment("h100", 2, mesh="xp=2"))
    _, hf = load_hf_config("llama31_8b")
    broken = {k: v for k, v in hf.items() if k != "num_hidden_layers"}
    with pytest.raises(ConfigError, match="missing the required field 'num_hidden_layers'"):
        plan_capacity(broken, Deployment("h100", 1))
    _, k25 = load_hf_config("kimi_k25")
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        plan_capacity({k: v for k, v in k25.items() if k != "kv_lora_rank"}, Deployment("h100", 8, mesh="tp=8"))
    with pytest.raises(ConfigError, match="no model 'gpt-9'"):
        plan_capacity("gpt-9", Deployment("h100", 1))


def test_cli_contract_and_error_exit(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "experiments", "plan_capacity.py")]
    out = subprocess.run(cmd + ["--model=llama4_scout", "--hardware=h200", "--count=2", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    j = json.loads(out.stdout)
    assert j["fits"] is True and {"weights_gib_per_device", "kv_free_gib", "max_context_tokens"} <= set(j)
    bad = subprocess.run(cmd + ["--model=llama4_scout", "--hardware=h300", "--count=2", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown hardware 'h300'" in bad.stderr
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    bad = subprocess.run(cmd + [f"--model={cfg}", "--hardware=h100", "--count=1"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "missing the required field" in bad.stderr


# ------------------------------------------------------------------------------------------------
# Cost model and simulator
# ------------------------------------------------------------------------------------------------


def test_kimi_k25_decode_step_on_8_h100():
    cap = plan_capacity("kimi_k25", Deployment("h100", 8, mesh="tp=8", weights="int4_experts", role="decode"))
    cost = CostModel(cap)
    step = cost.decode_step(64, 1024)  # moderate batch (64 x 1k tokens fits this mesh's KV)
    assert 0.020 <= step <= 0.030, step
    assert 64 * cap.seq_bytes_per_device(1024) <= cap.kv_free_per_device
    # memory-bound, and batching touches more distinct experts
    d = cost.decode_step(64, 1024, detail=True)
    assert d["bound"] == "memory"
    assert cost.touched(1) < 0.03 and cost.touched(64) > 0.7
    assert cost.decode_step(1, 1024) < cost.decode_step(16, 1024) < step


def test_prefill_is_compute_bound_and_pp_adds_latency():
    cap = plan_capacity("kimi_k25", Deployment("h100", 8, mesh="tp=8", weights="int4_experts", role="prefill"))
    cost = CostModel(cap)
    d = cost.stage_time(8192, 1, detail=True, **cost.chunk_terms(0, 8192))
    assert d["bound"] == "compute"
    pp = CostModel(plan_capacity("kimi_k25", Deployment("h100", 8, mesh="pp=2,tp=4", weights="int4_experts",
                                                        role="prefill")))
    assert pp.prefill_time(8192, 8192) > cost.prefill_time(8192, 8192)


def test_rag_tight_tpot_disaggregation_wins():
    out = search("kimi_k25", "h100", 32, WORKLOADS["rag"], weights="int4_experts", meshes=("pp=2,tp=4",), iters=5)
    d, c = out["best_disaggregated"], out["best_colocated"]
    assert d["goodput_per_gpu"] > 1.1 * c["goodput_per_gpu"], (d["plan"]["label"], d["goodput_per_gpu"],
                                                               c["plan"]["label"], c["goodput_per_gpu"])
    assert d["tpot_p90_ms"] <= 20.0 and d["ttft_p90_ms"] <= 8000.0


def test_chat_colocated_wins():
    out = search("kimi_k25", "h100", 32, WORKLOADS["chat"], weights="int4_experts", meshes=("tp=8", "pp=2,tp=8"),
                 iters=5)
    d, c = out["best_disaggregated"], out["best_colocated"]
    assert c["goodput_per_gpu"] > 1.1 * d["goodput_per_gpu"], (d["plan"]["label"], d["goodput_per_gpu"],
                                                               c["plan"]["label"], c["goodput_per_gpu"])


def test_simulator_latencies_grow_with_load():
    from infire_jax.plan.simulator import candidate_plans, simulate

    dis, col = candidate_plans("llama31_8b", "h100", 4, meshes=("tp=1",))
    plan = next(p for p in dis if p.describe()["label"].startswith("1P"))
    lo = simulate(plan, WORKLOADS["chat"], 1.0, n=200)
    hi = simulate(plan, WORKLOADS["chat"], 200.0, n=400)
    assert lo.attainment > 0.95 and lo.rejected == 0
    assert hi.ttft["p90"] > 5 * lo.ttft["p90"] and hi.attainment < lo.attainment
