"""Mixtral (HF MixtralForCausalLM), served as a tensor-name variant of the Qwen3-MoE family.

A tiny random transformers Mixtral saved with save_pretrained: full-sequence logits (fp32, <= 1e-4
relative), 32-token greedy generation for two prompts, and equal logits with the experts split over
an ep=2 mesh. Plus the config layer (routing fields, sliding-window refusal) and the full-size config
in configs/models against the published parameter count. < 60 s.
"""

import json

import numpy as np
import pytest

import infire_jax
from infire_jax import mesh as mesh_lib
from infire_jax.config import ConfigError, from_hf_config
from infire_jax.engine.sampling import SamplingParams
from infire_jax.sharding import Layout, use_layout
from tests.helpers import torch_greedy, torch_logits

VOCAB = 160
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)
PROMPTS = [[int(t) for t in np.random.default_rng(s).integers(0, VOCAB, n)] for s, n in ((1, 19), (2, 5))]
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 40)).astype(np.int32)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    import torch
    import transformers

    out = tmp_path_factory.mktemp("mixtral")
    torch.manual_seed(0)
    ref = transformers.MixtralForCausalLM(transformers.MixtralConfig(**TINY)).eval()
    with torch.no_grad():  # larger weights than the default init, so logits and routing are not flat
        for p in ref.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.08)
    ref.save_pretrained(out)
    model = infire_jax.load(out)
    return out, ref, model, model.logits(TOKENS)


def test_logits_match_transformers(mixtral):
    _, ref, model, ours = mixtral
    theirs = torch_logits(ref, TOKENS)
    assert ours.shape == theirs.shape == (2, 40, VOCAB) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_greedy_generate_matches_transformers(mixtral):
    _, ref, model, _ = mixtral
    reqs = model.run_requests([np.asarray(p, np.int32) for p in PROMPTS], [SamplingParams(32)] * len(PROMPTS))
    for prompt, req in zip(PROMPTS, reqs):
        assert req.output == torch_greedy(ref, prompt, 32)


def test_expert_parallel_matches_single_device(mixtral):
    from flax import nnx

    out, _, _, logits = mixtral
    with use_layout(Layout(mesh_lib.make_mesh("ep=2"))):
        model = infire_jax.load(out, mesh="ep=2")
    gate_up = dict(nnx.to_flat_state(model.placed.state))[("moe", "w_gate_up")].get_value()
    assert gate_up.sharding.shard_shape(gate_up.shape)[1] == TINY["num_local_experts"] // 2  # experts split
    got = model.logits(TOKENS)
    assert np.abs(got - logits).max() <= 1e-5 * np.abs(logits).max()


def test_config():
    hf = dict(TINY, architectures=["MixtralForCausalLM"], rms_norm_eps=1e-5, sliding_window=None)
    cfg = from_hf_config(hf)
    assert cfg.family == "qwen3_moe" and not cfg.qk_norm and cfg.head_dim == 16
    assert (cfg.get("num_experts"), cfg.get("num_experts_per_tok"), cfg.get("norm_topk_prob")) == (4, 2, True)
    assert cfg.get("moe_intermediate_size") == 32 and cfg.get("mlp_only_layers") == ()
    assert from_hf_config(dict(hf, sliding_window=256)) == cfg  # a window as long as the context is full attention
    with pytest.raises(ConfigError, match="MixtralForCausalLM: sliding_window=128 is not supported"):
        from_hf_config(dict(hf, sliding_window=128))
    # Mistral (dense) shares the rule: a window shorter than the context is refused, not ignored
    mistral = {k: v for k, v in hf.items() if k not in ("num_local_experts", "num_experts_per_tok")}
    mistral["architectures"] = ["MistralForCausalLM"]
    assert from_hf_config(dict(mistral, sliding_window=None)).family == "llama"
    with pytest.raises(ConfigError, match="MistralForCausalLM: sliding_window=128 is not supported"):
        from_hf_config(dict(mistral, sliding_window=128))
    with pytest.raises(ConfigError, match=r"num_experts_per_tok=5 must be in \[1, num_local_experts=4\]"):
        from_hf_config(dict(hf, num_experts_per_tok=5))


def test_full_size_config_matches_published_parameter_count():
    from infire_jax.plan import Deployment, plan_capacity
    from infire_jax.plan.capacity import MODELS_DIR

    assert json.loads((MODELS_DIR / "mixtral_8x7b.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    p = plan_capacity("mixtral_8x7b", Deployment("h200", 8, mesh="ep=8", weights="bf16"))
    assert abs(p.params_total / 46.7e9 - 1) < 0.01, p.params_total
