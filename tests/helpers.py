"""Shared test helpers: tiny transformers reference models saved in HF format, tiny EAGLE-3 heads."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from safetensors.numpy import save_file

# Tiny configs covering the dense families' variants: GQA, tied/untied, llama3 rope, qkv bias, q/k norm.
DENSE_CONFIGS = {
    "llama": dict(
        arch="LlamaForCausalLM", vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    ),
    "qwen2": dict(
        arch="Qwen2ForCausalLM", vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
    ),
    "qwen3": dict(
        arch="Qwen3ForCausalLM", vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
}


def save_reference(name: str, out: pathlib.Path, seed: int = 0):
    """Build a random transformers model for DENSE_CONFIGS[name], save it, return the torch model."""
    import torch
    import transformers

    kwargs = dict(DENSE_CONFIGS[name])
    arch = kwargs.pop("arch")
    cfg_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg_cls(**kwargs)).eval()
    with torch.no_grad():  # larger weights than the default init, so logits are not all near zero
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out)
    return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def torch_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():  # an explicit mask: else prompt tokens equal to pad_token_id count as padding
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0, eos_token_id=None,
        )
    return out[0, len(prompt):].tolist()


def write_head(path: pathlib.Path, target: pathlib.Path, *, ids=None, seed: int = 0, zero_lm_head: bool = False,
               config: dict | None = None, drop: tuple[str, ...] = (), own_embedding: bool = False) -> pathlib.Path:
    """A random one-layer EAGLE-3 head for `target` in the published layout; ids: the target ids of its
    draft vocabulary (default: all)."""
    path.mkdir(parents=True, exist_ok=True)
    t = json.loads((target / "config.json").read_text())
    v, d = t["vocab_size"], t["hidden_size"]
    ids = np.arange(v) if ids is None else np.asarray(ids)
    heads, kv, hd, f = 4, 2, 16, 96
    cfg = dict(architectures=["LlamaForCausalLMEagle3"], model_type="llama", hidden_size=d, intermediate_size=f,
               num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd, rms_norm_eps=1e-5, rope_theta=10000.0,
               vocab_size=v, draft_vocab_size=len(ids), num_hidden_layers=1, hidden_act="silu") | (config or {})
    rng = np.random.default_rng(seed)
    w = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float32)  # noqa: E731
    one, m = np.ones(d, np.float32), "midlayer."
    tensors = {
        "fc.weight": w(d, 3 * d), m + "input_layernorm.weight": one, m + "hidden_norm.weight": one,
        m + "post_attention_layernorm.weight": one, "norm.weight": one,
        m + "self_attn.q_proj.weight": w(heads * hd, 2 * d), m + "self_attn.k_proj.weight": w(kv * hd, 2 * d),
        m + "self_attn.v_proj.weight": w(kv * hd, 2 * d), m + "self_attn.o_proj.weight": w(d, heads * hd),
        m + "mlp.gate_proj.weight": w(f, d), m + "mlp.up_proj.weight": w(f, d), m + "mlp.down_proj.weight": w(d, f),
        "lm_head.weight": np.zeros((len(ids), d), np.float32) if zero_lm_head else w(len(ids), d),
        "d2t": (ids - np.arange(len(ids))).astype(np.int64),
        "t2d": np.isin(np.arange(v), ids),
    }
    if own_embedding:
        tensors["embed_tokens.weight"] = w(v, d)
    save_file({k: x for k, x in tensors.items() if k not in drop}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    return path
