"""infire_jax: a JAX/XLA research inference stack (prefill/decode disaggregation, PP+TP(+EP), lossless
weight compression). Public surface: `load`, `Model.logits`, `Model.generate`."""

import sys

if "IPython" not in sys.modules:
    # flax.nnx asks IPython, at import, whether it runs inside it (to colour reprs): importing IPython for that
    # costs 0.15-1.7 s of every start. Outside IPython the answer is no without asking (inside, IPython is
    # already imported and flax asks it as usual), so flax is imported with IPython marked unavailable.
    sys.modules["IPython"] = None  # type: ignore[assignment]  # `import IPython` raises ImportError
    try:
        import flax.nnx  # noqa: F401
    finally:
        del sys.modules["IPython"]

from infire_jax import distributed  # noqa: E402
from infire_jax.api import Model, load  # noqa: E402

__all__ = ["load", "Model", "distributed"]
