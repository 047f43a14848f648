"""Shared test helpers: tiny transformers reference models saved in HF format."""

from __future__ import annotations

import pathlib

import numpy as np

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
