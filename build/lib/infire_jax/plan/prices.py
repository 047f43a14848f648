"""Device prices for cost per token: an editable JSON table of dollars per device-hour.

configs/gpu_prices.json holds one entry per hardware name of plan.hardware (h100, h200, cpu) with
`usd_per_gpu_hour` and the `source` of the default; pass another file (same shape) to use your own
rates. Cost per token then follows from the simulator (SimResult.usd_per_mtok).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from infire_jax.config import configs_dir
from infire_jax.plan.hardware import HardwareError, get_hardware

__all__ = ["PRICES_FILE", "PriceError", "entry_of", "load_prices", "price_of"]

PRICES_FILE = configs_dir() / "gpu_prices.json"


class PriceError(ValueError):
    """A price table that cannot be used (unreadable, malformed, or without the hardware asked for)."""


def load_prices(path: str | pathlib.Path | None = None) -> dict[str, dict[str, Any]]:
    """name -> {"usd_per_gpu_hour": float, "source": str} from `path` (default PRICES_FILE)."""
    path = pathlib.Path(path) if path else PRICES_FILE
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PriceError(f"cannot read the price table {path}: {e}") from None
    out = {}
    for name, entry in table.items():
        if name.startswith("_"):
            continue
        price = entry.get("usd_per_gpu_hour") if isinstance(entry, dict) else None
        if not isinstance(price, (int, float)) or price < 0:
            raise PriceError(f"{path}: entry {name!r} needs a non-negative number usd_per_gpu_hour, got {entry!r}")
        out[name] = dict(usd_per_gpu_hour=float(price), source=str(entry.get("source", "")))
    return out


def price_of(hardware: Any, prices: dict[str, dict[str, Any]] | None = None) -> float:
    """Dollars per device-hour of `hardware` (a name or plan.hardware.Hardware)."""
    return entry_of(hardware, prices)["usd_per_gpu_hour"]


def entry_of(hardware: Any, prices: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The table's entry (usd_per_gpu_hour, source) for `hardware`."""
    prices = prices if prices is not None else load_prices()
    try:
        name = get_hardware(hardware).name
    except HardwareError:
        name = str(hardware)
    if name not in prices:
        raise PriceError(f"no price for hardware {name!r} in the price table (has {sorted(prices)}); add "
                         f'"{name}": {{"usd_per_gpu_hour": ..., "source": ...}}')
    return dict(prices[name], hardware=name)
