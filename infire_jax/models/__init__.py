"""Model families: the registry of family name -> Family (module, HF tensor map, storage options)."""

from infire_jax.config import ConfigError, ModelConfig
from infire_jax.models import deepseek, llama, llama4, qwen3_moe
from infire_jax.models.contract import BuildOptions, Family, ServingModel, build_options

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", llama.Llama, llama.hf_tensor_map, llama.Llama.ffn_kinds,
                    repeats_kv_heads=True, per_layer_weights=True, captures_hidden=True),
    "qwen3_moe": Family("qwen3_moe", qwen3_moe.Qwen3Moe, qwen3_moe.hf_tensor_map, qwen3_moe.Qwen3Moe.ffn_kinds,
                        captures_hidden=True),
    "deepseek_v3": Family("deepseek_v3", deepseek.DeepseekV3, deepseek.hf_tensor_map, deepseek.DeepseekV3.ffn_kinds,
                          captures_hidden=True),
    "llama4": Family("llama4", llama4.Llama4, llama4.hf_tensor_map, llama4.Llama4.ffn_kinds, captures_hidden=True),
}


def family_of(cfg: ModelConfig) -> Family:
    """The registered family of a config (ConfigError naming the known ones otherwise)."""
    if cfg.family not in FAMILIES:
        raise ConfigError(f"model family {cfg.family!r} has no registered model class; known: {sorted(FAMILIES)}")
    return FAMILIES[cfg.family]


__all__ = ["FAMILIES", "Family", "BuildOptions", "ServingModel", "build_options", "family_of"]
