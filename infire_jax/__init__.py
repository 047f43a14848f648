"""infire_jax: a JAX/XLA research inference stack (prefill/decode disaggregation, PP+TP(+EP), lossless
weight compression). Public surface: `load`, `Model.logits`, `Model.generate`."""

from infire_jax import distributed
from infire_jax.api import Model, load

__all__ = ["load", "Model", "distributed"]
