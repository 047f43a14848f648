"""Model families: family name -> (NNX module class, HF tensor map builder)."""

from infire_jax.models import deepseek, llama, llama4, qwen3_moe

FAMILIES = {
    "llama": (llama.Llama, llama.hf_tensor_map),
    "qwen3_moe": (qwen3_moe.Qwen3Moe, qwen3_moe.hf_tensor_map),
    "deepseek_v3": (deepseek.DeepseekV3, deepseek.hf_tensor_map),
    "llama4": (llama4.Llama4, llama4.hf_tensor_map),
}

__all__ = ["FAMILIES"]
