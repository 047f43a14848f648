"""Multimodal checkpoints served as text: Llama4ForConditionalGeneration and Kimi K2.5.

Llama 4: a tiny model (tiny vision tower too) built and saved by transformers; our load of the whole
checkpoint must give transformers' text logits and greedy tokens. Kimi K2.5: transformers' own
Kimi_K25 class does not write the published layout (its reverse renaming turns `layers` into
`blocks`), so the checkpoint is written here in the published layout from a tiny DeepseekV3 with int4
experts, and must load to the logits of the same weights in text-only form. Plus the config layer
(nested == text-only config) and the errors (unknown wrapper, unsupported text backbone, missing /
unexpected text tensors next to ignored vision tensors). < 60 s.
"""

import copy
import json
import pathlib

import numpy as np
import pytest

import infire_jax
from infire_jax.checkpoint.hf import CheckpointError
from infire_jax.config import NESTED, ConfigError, from_hf_config, load_config
from infire_jax.engine.sampling import SamplingParams
from tests.helpers import torch_greedy, torch_logits

VOCAB = 160
CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs" / "models"
# 3 layers: MoE on layer 1 (interleave step 2), layer 1 a global NoPE layer, 0 and 2 chunked (chunk 8).
LLAMA4_TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
    interleave_moe_layer_step=2, attention_chunk_size=8, no_rope_layers=[1, 0, 1], floor_scale=4, attn_scale=0.5,
    max_position_embeddings=256,
    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=32),
)
LLAMA4_VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     vision_output_dim=32, image_size=28, patch_size=14, projector_input_dim=16,
                     projector_output_dim=64)
DEEPSEEK_TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, kv_lora_rank=32,
    q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1,
    num_experts_per_tok=2, first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=256,
)
PROMPTS = [[int(t) for t in np.random.default_rng(s).integers(0, VOCAB, n)] for s, n in ((1, 19), (2, 5))]


def _init_(model, seed: int):
    """Larger weights than transformers' init, so logits and routing are not flat."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.08)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.05)
    return model


def _read(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="numpy") as h:
            out |= {n: h.get_tensor(n) for n in h.keys()}
    return out


def _write(path: pathlib.Path, config: dict, tensors: dict[str, np.ndarray]) -> pathlib.Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    return path


# ------------------------------------------------------------------------------------------------
# Llama 4 (transformers Llama4ForConditionalGeneration)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    import transformers

    out = tmp_path_factory.mktemp("llama4_cg")
    cfg = transformers.Llama4Config(text_config=LLAMA4_TEXT, vision_config=LLAMA4_VISION)
    ref = _init_(transformers.Llama4ForConditionalGeneration(cfg).eval(), seed=0)
    ref.save_pretrained(out)
    return out, ref, infire_jax.load(out)


def test_llama4_layout_is_what_transformers_writes(llama4):
    out, _, model = llama4
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["Llama4ForConditionalGeneration"] and hf["text_config"]["model_type"] == "llama4_text"
    names = set(_read(out))
    nested = NESTED["Llama4ForConditionalGeneration"]
    assert {n.split(".")[0] + "." for n in names} == {nested.prefix, *nested.skip}
    assert "language_model.model.layers.1.feed_forward.experts.gate_up_proj" in names
    text_only = from_hf_config(dict(hf["text_config"], architectures=["Llama4ForCausalLM"]))
    assert model.cfg == text_only and model.cfg.family == "llama4" and model.cfg.get("moe_layers") == (1,)
    assert (model.cfg.weight_prefix, model.cfg.skip_weight_prefixes) == (nested.prefix, nested.skip)


def test_llama4_logits_match_transformers(llama4):
    _, ref, model = llama4
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 40)).astype(np.int32)  # several chunks
    ours, theirs = model.logits(tokens), torch_logits(ref, tokens)
    assert ours.shape == theirs.shape == (2, 40, VOCAB)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_llama4_greedy_matches_transformers(llama4):
    _, ref, model = llama4
    reqs = model.run_requests([np.asarray(p, np.int32) for p in PROMPTS], [SamplingParams(32)] * len(PROMPTS))
    for prompt, req in zip(PROMPTS, reqs):
        assert req.output == torch_greedy(ref, prompt, 32)


def test_nested_checkpoint_reports_text_tensors_only(llama4, tmp_path):
    out, _, _ = llama4
    hf, tensors = json.loads((out / "config.json").read_text()), _read(out)
    del tensors["language_model.model.norm.weight"]
    tensors["language_model.model.layers.0.feed_forward.extra.weight"] = np.zeros((2, 2), np.float32)
    tensors["model.embed_tokens.weight"] = np.zeros((VOCAB, 64), np.float32)  # outside the text prefix
    with pytest.raises(CheckpointError) as e:
        infire_jax.load(_write(tmp_path / "broken", hf, tensors))
    msg = str(e.value)
    assert "missing tensors (1):\n  language_model.model.norm.weight" in msg
    assert "unexpected tensors (2):" in msg
    assert "language_model.model.layers.0.feed_forward.extra.weight" in msg and "\n  model.embed_tokens.weight" in msg
    assert "vision_model" not in msg and "multi_modal_projector" not in msg


# ------------------------------------------------------------------------------------------------
# Kimi K2.5 (published layout, written here)
# ------------------------------------------------------------------------------------------------


def _kimi_k25(text_dir: pathlib.Path, out: pathlib.Path, mtp_layer: int) -> pathlib.Path:
    """The checkpoint in `text_dir` (DeepseekV3 with int4 experts) in Kimi K2.5's published layout:
    text tensors under `language_model.`, the quantization_config inside text_config, a vision tower
    and projector (dummy values, published names) and a multi-token-prediction layer past the last."""
    text = json.loads((text_dir / "config.json").read_text())
    config = dict(
        architectures=["KimiK25ForConditionalGeneration"], model_type="kimi_k25", bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, media_placeholder_token_id=163605,
        text_config=dict(text, architectures=["DeepseekV3ForCausalLM"], model_type="kimi_k2"),
        vision_config=dict(patch_size=14, init_pos_emb_height=4, init_pos_emb_width=4, vt_hidden_size=16,
                           vt_num_hidden_layers=1, vt_num_attention_heads=2, vt_intermediate_size=32,
                           mm_hidden_size=16, text_hidden_size=64, merge_kernel_size=[2, 2]),
    )
    tensors = {"language_model." + n: a for n, a in _read(text_dir).items()}
    rng = np.random.default_rng(0)
    vision = {
        "vision_tower.patch_embed.proj.weight": (16, 3, 14, 14), "vision_tower.patch_embed.pos_emb.weight": (4, 4, 16),
        "vision_tower.encoder.blocks.0.wqkv.weight": (48, 16), "vision_tower.encoder.blocks.0.wo.weight": (16, 16),
        "vision_tower.encoder.blocks.0.mlp.fc0.weight": (32, 16), "vision_tower.encoder.blocks.0.mlp.fc1.weight": (16, 32),
        "vision_tower.encoder.final_layernorm.weight": (16,), "mm_projector.pre_norm.weight": (16,),
        "mm_projector.proj.0.weight": (64, 64), "mm_projector.proj.2.weight": (64, 64),
        f"language_model.model.layers.{mtp_layer}.eh_proj.weight": (64, 128),
    }
    tensors |= {n: rng.normal(size=s).astype(np.float32) for n, s in vision.items()}
    return _write(out, config, tensors)


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    import transformers

    from infire_jax.models import deepseek

    base = tmp_path_factory.mktemp("deepseek")
    _init_(transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**DEEPSEEK_TEXT)).eval(), 1).save_pretrained(base)
    deepseek.write_int4_experts(base, base / "int4", group_size=32)
    nested = _kimi_k25(base / "int4", base / "k25", mtp_layer=DEEPSEEK_TEXT["num_hidden_layers"])
    return base / "int4", nested


def test_kimi_k25_logits_equal_text_only_load(kimi):
    text_dir, nested_dir = kimi
    cfg = load_config(nested_dir)
    assert cfg == load_config(text_dir) and cfg.family == "deepseek_v3" and cfg.get("expert_int4_group") == 32
    assert cfg.weight_prefix == "language_model." and "vision_tower." in cfg.skip_weight_prefixes
    tokens = np.random.default_rng(3).integers(0, VOCAB, (2, 13)).astype(np.int32)
    text_logits = infire_jax.load(text_dir).logits(tokens)
    nested_logits = infire_jax.load(nested_dir).logits(tokens)
    assert np.abs(nested_logits - text_logits).max() <= 1e-6 * np.abs(text_logits).max()


# ------------------------------------------------------------------------------------------------
# Config layer
# ------------------------------------------------------------------------------------------------


def _published(name: str) -> dict:
    return {k: v for k, v in json.loads((CONFIGS_DIR / f"{name}.json").read_text()).items() if not k.startswith("_")}


def test_full_size_nested_configs_equal_their_text_form():
    kimi = _published("kimi_k25")
    nested = dict(architectures=["KimiK25ForConditionalGeneration"], model_type="kimi_k25",
                  text_config=kimi, vision_config={})
    assert from_hf_config(nested) == from_hf_config(kimi)
    assert from_hf_config(nested).get("expert_int4_group") == 32
    # the quantization block at the top level (where some exporters write it) applies to the text model
    text = {k: v for k, v in kimi.items() if k != "quantization_config"}
    top = dict(nested, text_config=text, quantization_config=kimi["quantization_config"])
    assert from_hf_config(top).get("expert_int4_group") == 32
    # an ignore list that names the LM head with the text prefix still leaves it unquantised
    q = copy.deepcopy(kimi["quantization_config"])
    q["ignore"] = ["language_model.lm_head" if p == "lm_head" else p for p in q["ignore"]]
    assert from_hf_config(dict(nested, text_config=dict(kimi, quantization_config=q))).get("expert_int4_group") == 32
    scout = _published("llama4_scout")
    nested = dict(architectures=["Llama4ForConditionalGeneration"], model_type="llama4",
                  text_config=dict(scout, model_type="llama4_text"), vision_config={})
    assert from_hf_config(nested) == from_hf_config(scout)


def test_nested_config_errors():
    scout = dict(_published("llama4_scout"), model_type="llama4_text")
    with pytest.raises(ConfigError, match=r"'Gemma3ForConditionalGeneration'.*supported:.*Llama4ForConditionalGeneration"):
        from_hf_config(dict(architectures=["Gemma3ForConditionalGeneration"], text_config=scout))
    with pytest.raises(ConfigError, match=r"Llama4ForConditionalGeneration: text_config model_type 'gemma3_text' "
                                          r"is not supported; supported: \['llama4_text'\]"):
        from_hf_config(dict(architectures=["Llama4ForConditionalGeneration"], text_config=dict(scout, model_type="gemma3_text")))
    with pytest.raises(ConfigError, match="KimiK25ForConditionalGeneration: config.json has no text_config"):
        from_hf_config(dict(architectures=["KimiK25ForConditionalGeneration"], vision_config={}))
    # a bad text field is reported against the wrapper and its text backbone
    bad = {k: v for k, v in scout.items() if k != "hidden_size"}
    with pytest.raises(ConfigError, match=r"Llama4ForConditionalGeneration text_config \(Llama4ForCausalLM\).*'hidden_size'"):
        from_hf_config(dict(architectures=["Llama4ForConditionalGeneration"], text_config=bad))


def test_compressed_nested_checkpoint_loads_text_weights(llama4, tmp_path):
    """A compressed multimodal checkpoint is served like the raw one: same prefix and skipped vision
    tensors, and (bf16 weights, exact compression) bitwise the raw bf16 logits. Routed experts stay
    compressed on the device too (one palette per layer and expert), with no warning."""
    import warnings

    from flax import nnx

    from infire_jax.checkpoint.compressed import compress_checkpoint
    from infire_jax.compression.jax_decode import Palette12Weight

    out, _, _ = llama4
    comp = tmp_path / "comp"
    compress_checkpoint(out, comp)
    tokens = np.random.default_rng(3).integers(0, VOCAB, (1, 12)).astype(np.int32)
    # Both with XLA's code: raw bf16 weights would otherwise take the few-row CPU kernel (its sums
    # run in another order), which compressed weights do not use.
    raw = infire_jax.load(out, dtype="bfloat16", kernels="xla").logits(tokens)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = infire_jax.load(comp, dtype="bfloat16", kernels="xla")
    assert not [w for w in caught if "compress" in str(w.message)], [str(w.message) for w in caught]
    params = dict(nnx.to_flat_state(model.placed.state))
    assert all(isinstance(params[("moe", n)].get_value(), Palette12Weight) for n in ("w_gate_up", "w_down"))
    np.testing.assert_array_equal(model.logits(tokens), raw)


def test_planner_applies_weight_format_to_the_nested_text_model():
    from infire_jax.plan.capacity import model_config

    kimi = _published("kimi_k25")
    nested = dict(architectures=["KimiK25ForConditionalGeneration"], model_type="kimi_k25",
                  text_config=dict(kimi, model_type="kimi_k2"), vision_config={})
    for weights, native, group in (("int4_experts", True, 32), ("bf16", False, None)):
        flat, nest = model_config(kimi, weights), model_config(nested, weights)
        assert flat == nest and nest[1] is native and nest[0].get("expert_int4_group") == group
    # a wrapper without any quantization block: int4 experts are still native when asked for
    bare = dict(nested, text_config={k: v for k, v in nested["text_config"].items() if k != "quantization_config"})
    assert model_config(bare, "int4_experts")[1] is True
