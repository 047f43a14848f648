"""flax.nnx, imported the way every infire_jax module should import it: ``from infire_jax.flax_nnx import nnx``.

flax.nnx asks IPython, at import, whether it runs inside it (to colour reprs); where IPython is installed
but not running, importing it for that question costs 0.15-1.7 s of every process start. Outside IPython
the answer is no without asking (inside, IPython is already imported and flax asks it as usual), so the
first import of flax runs with IPython marked unavailable. Keeping this out of the package's __init__
lets a script start loading its programs before flax is imported (executables.prefetch overlaps the two).
"""

import sys

if "flax.nnx" not in sys.modules and "IPython" not in sys.modules:
    sys.modules["IPython"] = None  # type: ignore[assignment]  # `import IPython` raises ImportError
    try:
        from flax import nnx
    finally:
        del sys.modules["IPython"]
else:
    from flax import nnx

__all__ = ["nnx"]
