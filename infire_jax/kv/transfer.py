"""KV handoff from a prefill mesh to a decode mesh.

The prefill program emits the KV of all layers stacked. Its sender side puts it into the canonical
form (real layers only, each KV head once; see engine/programs.py `canonical_kv_fn`), and one
`jax.device_put` of the (k, v) pair moves the whole request batch onto the decode mesh, resharding
into the decode layout in the same step; the decode side then scatters it into its pages. Before
anything moves, the two sides' KV specs are compared: a mismatch raises, never silently wrong data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any

import jax
import numpy as np

__all__ = ["KVSpec", "KVLayoutMismatch", "TransferStats", "handoff", "model_fingerprint"]


class KVLayoutMismatch(ValueError):
    """The prefill and decode sides disagree on what the KV arrays are."""


def model_fingerprint(cfg: Any) -> str:
    """Identifies a model architecture (not its layout): equal configs give equal fingerprints."""
    return hashlib.sha1(repr(cfg).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class KVSpec:
    """Canonical KV description: per array (layers, batch, heads, seq, dim) with these sizes."""

    model: str  # model_fingerprint of the config
    num_layers: int
    heads: tuple[int, int]  # heads of the k and the v array (canonical: each KV head once)
    dims: tuple[int, int]  # last dim of the k and the v array
    dtype: str
    logical_axes: tuple

    def check(self, other: "KVSpec") -> None:
        diffs = [
            f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
        if diffs:
            raise KVLayoutMismatch("prefill and decode KV layouts differ (prefill vs decode): " + "; ".join(diffs))

    def check_arrays(self, pair: tuple[Any, Any]) -> None:
        for name, arr, heads, dim in zip(("k", "v"), pair, self.heads, self.dims):
            want = (self.num_layers, arr.shape[1], heads, arr.shape[3], dim)
            if tuple(arr.shape) != want or str(arr.dtype) != self.dtype:
                raise KVLayoutMismatch(
                    f"{name} array is {arr.dtype}{list(arr.shape)}, spec says {self.dtype}{list(want)}"
                )


@dataclasses.dataclass
class TransferStats:
    transfers: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def gib_per_s(self) -> float:
        return self.bytes / 2**30 / self.seconds if self.seconds else 0.0


def handoff(
    pair: tuple[jax.Array, jax.Array],
    src: KVSpec,
    dst: KVSpec,
    dst_shardings: tuple[jax.sharding.Sharding, jax.sharding.Sharding],
    stats: TransferStats | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Move a canonical (k, v) pair onto the decode mesh in one transfer, after checking layouts."""
    src.check(dst)
    src.check_arrays(pair)
    t0 = time.perf_counter()
    out = jax.device_put(pair, dst_shardings)
    jax.block_until_ready(out)
    if stats is not None:
        stats.transfers += 1
        stats.bytes += int(sum(np.prod(a.shape) * a.dtype.itemsize for a in pair))
        stats.seconds += time.perf_counter() - t0
    return out
