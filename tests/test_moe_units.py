"""Units of the MoE / MLA code: routers against transformers' router modules, the grouped expert
matmuls against a numpy loop, expert-parallel dispatch against the local one, MLA absorbed vs
expanded attention, YaRN against transformers, slot plans and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from infire_jax import mesh as mesh_lib
from infire_jax.config import ConfigError, from_hf_config
from infire_jax.models import deepseek, layers, moe
from infire_jax.sharding import Layout, use_layout


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---- routers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [True, False])
def test_deepseek_router_matches_transformers(norm):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                           norm_topk_prob=norm, routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        router.e_score_correction_bias.normal_(0, 0.2)
    x = torch.randn(64, 32)
    with torch.no_grad():
        logits, w_ref, i_ref = router(x)
    w, i = moe.sigmoid_group_topk(jnp.asarray(logits.numpy()), jnp.asarray(router.e_score_correction_bias.numpy()),
                                  4, 4, 2, norm, 2.5)
    _same_choice(w, i, w_ref.numpy(), i_ref.numpy())


@pytest.mark.parametrize("norm", [True, False])
def test_qwen3_router_matches_transformers(norm):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    cfg = Qwen3MoeConfig(hidden_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=norm)
    router = Qwen3MoeTopKRouter(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        logits, w_ref, i_ref = router(torch.randn(64, 32))
    w, i = moe.softmax_topk(jnp.asarray(logits.numpy()), 2, norm)
    _same_choice(w, i, w_ref.numpy(), i_ref.numpy())


@pytest.mark.parametrize("k", [1, 2])
def test_llama4_router_matches_transformers(k):
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    router = Llama4Router(Llama4TextConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=k))
    torch.manual_seed(2)
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        dense_scores, logits = router(torch.randn(64, 32))  # (N, E): sigmoid on the chosen, 0 elsewhere
    w, i = moe.sigmoid_topk_logits(jnp.asarray(logits.numpy()), k)
    dense = np.zeros((64, 8), np.float32)
    np.put_along_axis(dense, np.asarray(i), np.asarray(w), axis=1)
    np.testing.assert_allclose(dense, dense_scores.numpy(), rtol=1e-6, atol=1e-7)


def _same_choice(w, i, w_ref, i_ref):
    order, order_ref = np.argsort(np.asarray(i), 1), np.argsort(i_ref, 1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(i), order, 1), np.take_along_axis(i_ref, order_ref, 1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, 1), np.take_along_axis(w_ref, order_ref, 1),
                               rtol=1e-5, atol=1e-7)


# ---- expert dispatch ---------------------------------------------------------------------------


def _experts(g, d, f, in_major, seed=0):
    r = _rng(seed)
    if in_major:
        return r.normal(0, 0.2, (g, d, 2, f)).astype(np.float32), r.normal(0, 0.2, (g, f, d)).astype(np.float32)
    return r.normal(0, 0.2, (g, 2, f, d)).astype(np.float32), r.normal(0, 0.2, (g, d, f)).astype(np.float32)


def _np_expert(x, wgu, wd, e, in_major):
    if in_major:
        gu = np.einsum("md,dcf->mcf", x, wgu[e])
        h = gu[:, 0] / (1 + np.exp(-gu[:, 0])) * gu[:, 1]
        return h @ wd[e]
    gu = np.einsum("md,cfd->mcf", x, wgu[e])
    h = gu[:, 0] / (1 + np.exp(-gu[:, 0])) * gu[:, 1]
    return h @ wd[e].T


@pytest.mark.parametrize("in_major", [False, True])
def test_grouped_mlp_impls_match_numpy(in_major):
    g, d, f, m = 6, 16, 8, 150  # 150 rows: three tiles of 64 (one partial), groups straddle tiles
    wgu, wd = _experts(g, d, f, in_major)
    sizes = np.array([40, 0, 71, 1, 0, 30], np.int32)  # empty experts; 8 trailing rows in no group
    xs = _rng(1).normal(0, 1, (m, d)).astype(np.float32)
    want = np.zeros((m, d), np.float32)
    ends = np.cumsum(sizes)
    for e in range(g):
        rows = slice(ends[e] - sizes[e], ends[e])
        want[rows] = _np_expert(xs[rows], wgu, wd, e, in_major)
    for impl in ("tiled", "ragged"):
        got = jax.jit(lambda *a, impl=impl: moe.grouped_mlp(*a, in_major=in_major, impl=impl))(xs, sizes, wgu, wd)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=impl)


def _np_routed(x, w, idx, wgu, wd, in_major, scale_input):
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[n, j]
            if scale_input:
                out[n] += _np_expert(x[n : n + 1] * w[n, j], wgu, wd, e, in_major)[0]
            else:
                out[n] += w[n, j] * _np_expert(x[n : n + 1], wgu, wd, e, in_major)[0]
    return out


@pytest.mark.parametrize("in_major, scale_input", [(False, False), (True, True)])
def test_routed_experts_match_numpy_locally_and_expert_parallel(in_major, scale_input):
    g, d, f, n, k = 8, 16, 8, 9, 2
    wgu, wd = _experts(g, d, f, in_major, seed=2)
    x = _rng(3).normal(0, 1, (n, d)).astype(np.float32)
    idx = np.stack([_rng(4 + i).choice(g, k, replace=False) for i in range(n)]).astype(np.int32)
    w = _rng(5).uniform(0.1, 1, (n, k)).astype(np.float32)
    want = _np_routed(x, w, idx, wgu, wd, in_major, scale_input)
    gu_axes, d_axes = moe.expert_axes(in_major)

    def run(x, w, idx, wgu, wd):
        return moe.routed_experts(x, w, idx, wgu, wd, gate_up_axes=gu_axes, down_axes=d_axes, in_major=in_major,
                                  scale_input=scale_input)

    np.testing.assert_allclose(np.asarray(jax.jit(run)(x, w, idx, wgu, wd)), want, rtol=1e-5, atol=1e-5)
    # ep=4 x tp=2: two experts and half the hidden columns per device, one psum of the output
    layout = Layout(mesh_lib.make_mesh("ep=4,tp=2"))
    with use_layout(layout):
        put = lambda a, axes: jax.device_put(a, layout.sharding(axes, a.shape))  # noqa: E731
        got = jax.jit(run)(x, w, idx, put(wgu, gu_axes), put(wd, d_axes))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ---- MLA ---------------------------------------------------------------------------------------


def test_mla_absorbed_equals_expanded_over_a_cache():
    b, t, s, h, nope, rope, v, r = 2, 3, 10, 4, 8, 4, 6, 12
    rng = _rng(6)
    arr = lambda *shape: jnp.asarray(rng.normal(0, 1, shape).astype(np.float32))  # noqa: E731
    args = (arr(b, t, h, nope), arr(b, t, h, rope), arr(b, t, r), arr(b, t, rope), arr(h, nope, r), arr(h, v, r))
    start = jnp.asarray([4, 7], jnp.int32)  # rows see different cache lengths
    cache = (arr(b, s, r), arr(b, s, rope))
    mla = jax.jit(deepseek.mla_attention, static_argnames=("scale", "absorb"))
    absorbed = mla(*args, start, 0.3, *cache, absorb=True)
    expanded = mla(*args, start, 0.3, *cache, absorb=False)
    np.testing.assert_allclose(np.asarray(absorbed), np.asarray(expanded), rtol=1e-5, atol=1e-5)
    assert absorbed.shape == (b, t, h, v)
    # and without a cache
    np.testing.assert_allclose(
        np.asarray(mla(*args, start, 0.3, absorb=True)), np.asarray(mla(*args, start, 0.3, absorb=False)),
        rtol=1e-5, atol=1e-5,
    )


@pytest.mark.parametrize(
    "params",
    [
        dict(factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0, beta_fast=32,
             beta_slow=1),  # DeepSeek-V3
        dict(factor=32.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0, beta_fast=1,
             beta_slow=1),  # Kimi K2
        dict(factor=4.0, original_max_position_embeddings=32, mscale=1.0, mscale_all_dim=0.7),
        dict(factor=8.0, original_max_position_embeddings=64),
    ],
)
def test_yarn_matches_transformers(params):
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import _compute_yarn_parameters
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    rope = dict(rope_type="yarn", rope_theta=10000.0, **params)
    hf = DeepseekV3Config(qk_rope_head_dim=64, qk_nope_head_dim=128, rope_parameters=dict(rope),
                          max_position_embeddings=params["original_max_position_embeddings"] * 4)
    inv_ref, attn_ref = _compute_yarn_parameters(hf)
    inv, attn = layers.rope_inv_freq(64, 10000.0, rope)
    np.testing.assert_allclose(inv, inv_ref.numpy(), rtol=1e-6)
    assert attn == pytest.approx(attn_ref, rel=1e-7)
    cfg = from_hf_config(dict(hf.to_dict(), architectures=["DeepseekV3ForCausalLM"]))
    assert deepseek.softmax_scale(cfg) == pytest.approx(yarn_apply_mscale(hf.rope_parameters, 192**-0.5), rel=1e-7)


# ---- slot plans and configs --------------------------------------------------------------------


def test_slot_plan_lays_kinds_out_per_stage():
    kinds = ("dense", "dense", "moe", "moe", "moe")  # first_k_dense_replace=2, 5 layers
    num_slots, slots = moe.stage_slots(5, 2)  # stage 0: slots 0-2, stage 1: slots 3-4 (+ padding 5)
    plan = moe.SlotPlan.build(kinds, slots, num_slots, 2)
    assert plan.sizes == (4, 4)  # dense: 2 per stage (stage 1 has none: 2 zero slots); moe: 1 and 2 -> 2 each
    kind, index = plan.local_tables(3)
    assert kind.tolist() == [[0, 0, 1], [1, 1, 0]]
    assert index.tolist() == [[0, 1, 0], [0, 1, 0]]
    with pytest.raises(ValueError, match="laid out for 1 pipeline stage.* run on 2"):
        moe.SlotPlan.build(kinds, tuple(range(5)), 6, 1).local_tables(3)  # 3 moe layers do not split in 2
    one = moe.SlotPlan.build(kinds, tuple(range(5)), 5, 1)
    assert one.sizes == (2, 3) and one.slot_pos == (0, 1, 0, 1, 2)


def _ds_config(**overrides):
    hf = dict(architectures=["DeepseekV3ForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=8,
              num_hidden_layers=2, num_attention_heads=2, rms_norm_eps=1e-6, kv_lora_rank=4, q_lora_rank=None,
              qk_rope_head_dim=2, qk_nope_head_dim=2, v_head_dim=2, n_routed_experts=4, n_group=2, topk_group=1,
              num_experts_per_tok=2, moe_intermediate_size=4)
    return hf | overrides


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_group=3), "not a multiple of n_group"),
        (dict(topk_group=3), "topk_group=3"),
        (dict(num_experts_per_tok=3), "exceeds the experts"),
        (dict(scoring_func="softmax"), "scoring_func"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(qk_rope_head_dim=3), "must be even"),
    ],
)
def test_deepseek_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        from_hf_config(_ds_config(**overrides))


def test_moe_configs_parse():
    cfg = from_hf_config(_ds_config())
    assert cfg.family == "deepseek_v3" and cfg.get("kv_lora_rank") == 4 and cfg.head_dim == 4
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        from_hf_config(dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=8,
                            num_hidden_layers=2, num_attention_heads=2, rms_norm_eps=1e-6, num_experts=4,
                            num_experts_per_tok=5, moe_intermediate_size=4))
    l4 = from_hf_config(dict(architectures=["Llama4ForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=4,
                             intermediate_size_mlp=16, num_hidden_layers=4, num_attention_heads=2, rms_norm_eps=1e-5,
                             num_local_experts=4, interleave_moe_layer_step=2))
    assert l4.intermediate_size == 16 and l4.get("moe_layers") == (1, 3)
    assert l4.get("no_rope_layers") == (1, 1, 1, 0)
    assert l4.get("layer_types")[3] == "full_attention"


# ---- INT4 experts ------------------------------------------------------------------------------


def _int4_config(**weights):
    scheme = dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=4) | weights
    q = dict(quant_method="compressed-tensors", format="pack-quantized",
             config_groups=dict(group_0=dict(targets=["Linear"], weights=scheme)),
             ignore=["lm_head", "re:.*self_attn\\..*", "re:.*\\.mlp\\.(gate|up|down)_proj$"])
    return _ds_config(first_k_dense_replace=1, hidden_size=16, moe_intermediate_size=8, quantization_config=q)


def test_int4_config_accepts_the_k25_scheme():
    assert from_hf_config(_int4_config(group_size=8)).get("expert_int4_group") == 8


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(weights=dict(num_bits=8, group_size=8)), "num_bits=8"),
        (dict(weights=dict(symmetric=False, group_size=8)), "symmetric=False"),
        (dict(weights=dict(strategy="channel", group_size=8)), "strategy='channel'"),
        (dict(weights=dict(group_size=12)), "group_size=12"),
        (dict(weights=dict(group_size=32)), "group_size=32"),  # does not divide moe_intermediate_size 8
        (dict(format="int-quantized"), "format='int-quantized'"),
        (dict(quant_method="gptq"), "quant_method='gptq'"),
        (dict(ignore=["lm_head"]), "only routed-expert weights"),
    ],
)
def test_int4_config_rejects_other_schemes(change, message):
    hf = _int4_config(**change.pop("weights", dict(group_size=8)))
    hf["quantization_config"] |= change
    with pytest.raises(ConfigError, match=message):
        from_hf_config(hf)


def test_packed_int4_decodes_like_numpy_and_runs_expert_parallel():
    g, d, f = 8, 32, 32
    wgu, wd = _experts(g, d, f, in_major=False, seed=7)
    pack = lambda w: [moe.int4_quantize(m, 32) for m in w.reshape(-1, w.shape[-1])[None]][0]  # noqa: E731
    (pgu, sgu), (pd, sd) = pack(wgu), pack(wd)
    deq_gu = moe.int4_dequantize(pgu, sgu).reshape(wgu.shape)
    deq_d = moe.int4_dequantize(pd, sd).reshape(wd.shape)
    packed_gu = moe.PackedInt4(jnp.asarray(pgu.reshape(g, 2, f, d // 8)), jnp.asarray(sgu.reshape(g, 2, f, 1)))
    packed_d = moe.PackedInt4(jnp.asarray(pd.reshape(g, d, f // 8)), jnp.asarray(sd.reshape(g, d, 1)))
    np.testing.assert_array_equal(np.asarray(packed_gu.decode_f32()), deq_gu)
    n, k = 5, 2
    x = _rng(8).normal(0, 1, (n, d)).astype(np.float32)
    idx = np.stack([_rng(9 + i).choice(g, k, replace=False) for i in range(n)]).astype(np.int32)
    w = _rng(10).uniform(0.1, 1, (n, k)).astype(np.float32)
    want = _np_routed(x, w, idx, deq_gu, deq_d, False, False)
    gu_axes, d_axes = moe.expert_axes(False)

    def run(x, w, idx, wgu, wd):
        return moe.routed_experts(x, w, idx, wgu, wd, gate_up_axes=gu_axes, down_axes=d_axes)

    np.testing.assert_allclose(np.asarray(jax.jit(run)(x, w, idx, packed_gu, packed_d)), want, rtol=1e-5, atol=1e-5)
    with use_layout(Layout(mesh_lib.make_mesh("ep=4,tp=2"))):
        got = jax.jit(run)(x, w, idx, packed_gu, packed_d)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
