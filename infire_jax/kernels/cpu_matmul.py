"""x @ w.T for a few float32 rows on XLA:CPU: a hand-written kernel (cpu_matmul.cc), built on first use.

Why: decode multiplies a handful of rows by every weight. At 4-16 rows XLA:CPU's dots with the
(out, in) weights the models store run at 20-65 GFLOP/s on this project's 2-core machines; the
kernel runs 30 decoder layers' projections 2.1x (4 rows) and 1.5x (16 rows) faster, and matches
XLA at one row (WORKSPACE_NOTES.md, issue 9). From about 64 rows XLA's dots win, so callers use it
for at most MAX_ROWS rows.

The kernel is compiled once per machine with the system C++ compiler (-O3, tuned for the host CPU)
into the user cache directory and registered as an XLA FFI target. Without a compiler the build
error is reported once as a warning and callers keep XLA's dot (`available()` is False).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp

__all__ = ["MAX_ROWS", "available", "ensure_built", "library_path", "matmul_nt"]

MAX_ROWS = 32  # measured: 1.17x at 32 rows, 0.88x at 64 (30-layer projection chain)
_TARGET = "infire_matmul_nt"
_SOURCE = pathlib.Path(__file__).with_name("cpu_matmul.cc")
_FLAGS = ("-O3", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-Wno-attributes", "-Wno-return-type")
_NATIVE = ("-march=native",)


def _compiler() -> str | None:
    return next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


def _cpu_signature() -> str:
    """What -march=native depends on: a library built for one CPU may not run on another that
    shares the cache directory."""
    try:
        flags = [ln for ln in pathlib.Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith(("flags", "Features"))]
        return flags[0] if flags else platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "infire_jax" / "kernels"


def library_path(compiler: str) -> pathlib.Path:
    """Where the library for this source, jaxlib, compiler and CPU lives."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join([_SOURCE.read_text(), jax.__version__, version, " ".join(_FLAGS + _NATIVE), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    return _cache_dir() / f"cpu_matmul-{key}.so"


def _build(compiler: str, out: pathlib.Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    base = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
    try:
        result = subprocess.run(base[:1] + list(_NATIVE) + base[1:], capture_output=True, text=True)
        if result.returncode:  # a compiler without -march=native: portable code, still vectorised
            result = subprocess.run(base, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(result.stderr.strip()[-2000:])
        os.replace(tmp, out)  # atomic: concurrent builders never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure_built() -> pathlib.Path:
    """The kernel library for this machine, compiled first if it is not in the cache yet."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++, g++ or clang++) on PATH")
    path = library_path(compiler)
    if not path.is_file():
        _build(compiler, path)
    return path


@functools.cache
def available() -> bool:
    """Build (once per machine), load and register the kernel; False (with one warning) if it cannot be."""
    try:
        lib = ctypes.cdll.LoadLibrary(str(ensure_built()))
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.InfireMatmulNT), platform="cpu")
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: keep XLA's dot, and say why once
        warnings.warn(
            f"infire_jax: the CPU small-row matmul kernel is unavailable ({e}); projections use XLA's dot "
            "(install a C++ compiler to get it, or pass matmul='xla' to silence this)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False


def matmul_nt(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (M, K) @ w (N, K).T as float32 (M, N), on the CPU backend; call `available()` first."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ValueError(f"matmul_nt takes float32 x (M, K) and w (N, K); got {x.dtype}{x.shape} and {w.dtype}{w.shape}")
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(x, w)
