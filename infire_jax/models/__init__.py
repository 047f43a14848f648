"""Model families: family name -> (NNX module class, HF tensor map builder)."""

from infire_jax.models import llama

FAMILIES = {
    "llama": (llama.Llama, llama.hf_tensor_map),
}

__all__ = ["FAMILIES"]
