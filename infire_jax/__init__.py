"""infire_jax: a JAX/XLA research inference stack (prefill/decode disaggregation, PP+TP(+EP), lossless
weight compression). Public surface: `load`, `Model.logits`, `Model.generate`.

The public names import the stack (flax, the models, the engine) on first use, so ``infire_jax.boot``,
``infire_jax.executables`` and ``infire_jax.mesh`` are cheap to import: a script can configure the compilation cache and start
loading compiled programs (executables.prefetch) while the rest is still being imported."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infire_jax import distributed
    from infire_jax.api import Model, load

__all__ = ["load", "Model", "distributed"]


def __getattr__(name: str) -> Any:
    if name in ("load", "Model"):
        from infire_jax import api

        return getattr(api, name)
    if name == "distributed":
        import importlib

        return importlib.import_module("infire_jax.distributed")
    raise AttributeError(f"module 'infire_jax' has no attribute {name!r}")
