"""MoE / MLA families against transformers (fp32): Llama 4 text, DeepSeek-V3, Qwen3-MoE.

Tiny random models built with transformers and saved with save_pretrained. Each family: full-sequence
logits match, greedy generation of 32 tokens matches token for token (a batch of two prompts, one
longer than Llama 4's attention chunk). DeepSeek-V3 also checks that decode over the latent cache
(absorbed weights) gives the logits of the expanded prefill form, and the MLA cache bytes. One model
runs the mesh matrix ep=2 / tp=2 / pp=2,ep=2,tp=2 on the 8 simulated devices.
"""

import json

import numpy as np
import pytest

import infire_jax
from infire_jax import mesh as mesh_lib
from infire_jax.engine.sampling import SamplingParams
from infire_jax.models import deepseek, moe
from infire_jax.sharding import Layout, use_layout
from tests.helpers import torch_greedy, torch_logits

VOCAB = 160
_YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, mscale=1.0, mscale_all_dim=0.7,
             beta_fast=32, beta_slow=1)

CONFIGS = {
    # 4 layers: MoE on 1 and 3 (interleave step 2), layer 2 is a global NoPE layer, the others chunked
    # (chunk 8) with rope + L2 qk-norm; floor_scale 4 so the NoPE temperature tuning is not a no-op.
    "llama4": dict(
        arch="Llama4ForCausalLM", config="Llama4TextConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=2, attention_chunk_size=8, no_rope_layers=[1, 1, 0, 1], floor_scale=4,
        attn_scale=0.5, max_position_embeddings=256,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32),
    ),
    # first layer dense, 8 experts in 4 groups (2 groups chosen), top-2, shared expert, YaRN with
    # mscale != mscale_all_dim (both the rope attention factor and the softmax mscale^2 matter).
    "deepseek_v3": dict(
        arch="DeepseekV3ForCausalLM", config="DeepseekV3Config", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, kv_lora_rank=32, q_lora_rank=48,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_group=4, topk_group=2,
        num_experts_per_tok=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        rope_scaling=_YARN, max_position_embeddings=256,
    ),
    # layer 0 dense (mlp_only_layers), softmax top-2 of 8 with renormalisation.
    "qwen3_moe": dict(
        arch="Qwen3MoeForCausalLM", config="Qwen3MoeConfig", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
        mlp_only_layers=[0], norm_topk_prob=True, max_position_embeddings=256,
    ),
    # The mesh-matrix model: the other DeepSeek branches (no q_lora, half-split rope, one group,
    # unnormalised weights, 2 shared experts).
    "deepseek_v3_mesh": dict(
        arch="DeepseekV3ForCausalLM", config="DeepseekV3Config", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=4, n_shared_experts=2, kv_lora_rank=32, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=24, n_group=1, topk_group=1,
        num_experts_per_tok=2, first_k_dense_replace=1, norm_topk_prob=False, routed_scaling_factor=1.5,
        rope_interleave=False, max_position_embeddings=256,
    ),
}
PROMPTS = [list(np.random.default_rng(1).integers(0, VOCAB, 19)), list(np.random.default_rng(2).integers(0, VOCAB, 5))]
PROMPTS = [[int(t) for t in p] for p in PROMPTS]


def save_moe_reference(name: str, out, seed: int = 0):
    import torch
    import transformers

    kwargs = dict(CONFIGS[name])
    arch, config = kwargs.pop("arch"), kwargs.pop("config")
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(getattr(transformers, config)(**kwargs)).eval()
    with torch.no_grad():  # larger weights than the default init, so logits and routing are not flat
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.08)
        for name_, buf in model.named_buffers():
            if name_.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.05)  # nonzero, so the biased choice differs from the weights
    model.save_pretrained(out)
    return model


@pytest.fixture(scope="module", params=["llama4", "deepseek_v3", "qwen3_moe"])
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    ref = save_moe_reference(request.param, out)
    return request.param, ref, infire_jax.load(out)


def test_logits_match_transformers(pair):
    _, ref, model = pair
    # 40 tokens: the (2, 64) bucket the decode check below reuses; several Llama 4 chunks
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 40)).astype(np.int32)
    ours, theirs = model.logits(tokens), torch_logits(ref, tokens)
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_greedy_generate_matches_transformers(pair):
    name, ref, model = pair
    arrays = [np.asarray(p, np.int32) for p in PROMPTS]
    with_logits = name == "deepseek_v3"  # MLA: also check the latent-cache decode logits below
    reqs = model.run_requests(arrays, [SamplingParams(32)] * len(arrays), with_logits=with_logits)
    outs, logits = [r.output for r in reqs], [r.logits for r in reqs]
    for prompt, got in zip(PROMPTS, outs):
        assert got == torch_greedy(ref, prompt, 32)
    if with_logits:
        # Decode reads the latent cache with the absorbed weights; the cache-free forward over the
        # whole sequence uses the expanded per-head keys/values. Same logits.
        seqs = [prompt + got[:-1] for prompt, got in zip(PROMPTS, outs)]
        batch = np.zeros((2, max(map(len, seqs))), np.int32)  # causal: right padding changes nothing before it
        for row, seq in zip(batch, seqs):
            row[: len(seq)] = seq
        full = model.logits(batch)
        for i, (prompt, step_logits) in enumerate(zip(PROMPTS, logits)):
            ref = full[i, len(prompt) - 1 : len(seqs[i])]
            assert np.abs(np.stack(step_logits) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_mla_cache_holds_only_the_latent(pair):
    name, _, model = pair
    if name != "deepseek_v3":
        pytest.skip("MLA only")
    c, module = model.cfg, model.placed.module
    k_shape, v_shape = module.kv_shapes(batch=1, seq=1)
    per_token = (np.prod(k_shape) + np.prod(v_shape)) * np.dtype(np.float32).itemsize
    assert per_token == (c.get("kv_lora_rank") + c.get("qk_rope_head_dim")) * c.num_layers * 4
    assert k_shape == (c.num_layers, 1, 1, 1, c.get("kv_lora_rank"))
    # the prefill program's cache output has that layout too (nothing per head is kept)
    k_sh, v_sh = model.programs.kv_shardings(2, 16)
    assert k_sh.shard_shape(module.kv_shapes(2, 16)[0])[-1] == c.get("kv_lora_rank")


@pytest.fixture(scope="module")
def mesh_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepseek_mesh")
    ref = save_moe_reference("deepseek_v3_mesh", out, seed=1)
    tokens = np.random.default_rng(3).integers(0, VOCAB, (2, 13)).astype(np.int32)
    logits = infire_jax.load(out).logits(tokens)
    theirs = torch_logits(ref, tokens)
    assert np.abs(logits - theirs).max() <= 1e-4 * np.abs(theirs).max()
    return out, tokens, logits


@pytest.mark.parametrize("mesh", ["ep=2", "tp=2", "pp=2,ep=2,tp=2"])
def test_mesh_matches_single_device(mesh_model, mesh):
    out, tokens, logits = mesh_model
    # Loaded under its layout so the per-kind layer stacks are laid out for its pipeline stages
    # (api.place_model does not tell models the pipeline depth yet; see moe.pipeline_stages).
    with use_layout(Layout(mesh_lib.make_mesh(mesh))):
        model = infire_jax.load(out, mesh=mesh)
    got = model.logits(tokens)
    assert np.abs(got - logits).max() <= 1e-5 * np.abs(logits).max()


def _dequantised_copy(src, dst):
    """The int4 checkpoint with every packed expert weight dequantised in numpy (a plain checkpoint)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    dst.mkdir()
    tensors = {}
    with safe_open(src / "model.safetensors", framework="numpy") as f:
        for name in f.keys():
            if name.endswith("weight_packed"):
                base = name[: -len("weight_packed")]
                tensors[base + "weight"] = moe.int4_dequantize(f.get_tensor(name), f.get_tensor(base + "weight_scale"))
            elif not name.endswith(("weight_scale", "weight_shape")):
                tensors[name] = f.get_tensor(name)
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))


def test_int4_experts_match_numpy_dequantised_reference(mesh_model, tmp_path):
    import transformers
    from flax import nnx

    out, tokens, _ = mesh_model
    deepseek.write_int4_experts(out, tmp_path / "int4", group_size=32)
    _dequantised_copy(tmp_path / "int4", tmp_path / "dequantised")
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "dequantised").eval()
    model = infire_jax.load(tmp_path / "int4")
    assert model.cfg.get("expert_int4_group") == 32
    ours, theirs = model.logits(tokens), torch_logits(ref, tokens)
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    # the experts stay packed on the device: int4 words + bf16 group scales (+ 2 ints of shape each)
    c = model.cfg
    expert_bytes = sum(
        var.get_value().nbytes for path, var in nnx.to_flat_state(model.placed.state)
        if path[0] == "moe" and str(path[1]).startswith(("w_gate_up_", "w_down_"))
    )
    values = c.get("n_routed_experts") * 3 * c.hidden_size * c.get("moe_intermediate_size")
    values *= c.num_layers - c.get("first_k_dense_replace")
    assert 0.28 <= expert_bytes / (2 * values) <= 0.29
