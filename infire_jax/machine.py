"""The host CPU's identity: what -march=native code (kernels/cpu.py) and XLA:CPU executables depend on."""

from __future__ import annotations

import pathlib
import platform

__all__ = ["cpu_signature"]


def cpu_signature() -> str:
    """The host CPU's feature flags (what -march=native code and XLA:CPU executables depend on)."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
        flags = [ln for ln in lines if ln.startswith(("flags", "Features"))]
        return flags[0] if flags else platform.processor()
    except OSError:
        return platform.processor() or platform.machine()
