"""KV handoff from a prefill mesh to a decode mesh.

The prefill program emits the KV of all layers stacked. Its sender side puts it into the canonical
form (real layers only, each KV head once, a (k, v) pair per cache group; a windowed group sends
only its ring; see engine/programs.py `canonical_kv_fn`), and one `jax.device_put` of the arrays
moves the whole request batch onto the decode mesh, resharding
into the decode layout in the same step; the decode side then scatters it into its pages. Before
anything moves, the two sides' KV specs are compared: a mismatch raises, never silently wrong data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any, Sequence

import jax
import numpy as np

__all__ = ["KVSpec", "KVLayoutMismatch", "TransferStats", "handoff", "move", "model_fingerprint"]


class KVLayoutMismatch(ValueError):
    """The prefill and decode sides disagree on what the KV arrays are."""


def model_fingerprint(cfg: Any) -> str:
    """Identifies a model architecture (not its layout): equal configs give equal fingerprints."""
    return hashlib.sha1(repr(cfg).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class KVSpec:
    """Canonical KV description: per array (layers, batch, heads, seq, dim) with these sizes; a (k, v)
    pair per cache group (kv/cache.py), in group order."""

    model: str  # model_fingerprint of the config
    num_layers: int
    heads: tuple[int, int]  # heads of the k and the v array (canonical: each KV head once)
    dims: tuple[int, int]  # last dim of the k and the v array
    dtype: str
    logical_axes: tuple
    # (layers, window) per cache group; () = one full-length group of num_layers layers. A windowed
    # group's arrays hold its ring of min(window, T) slots (kv/cache.py ring_window), not T positions.
    groups: tuple[tuple[int, int | None], ...] = ()

    def array_shapes(self, b: int, t: int) -> list[tuple[int, ...]]:
        """Shapes of the canonical arrays (k, v of each group) of b rows and t prompt positions."""
        groups = self.groups or ((self.num_layers, None),)
        return [(n, b, h, t if w is None else min(w, t), d) for n, w in groups for h, d in zip(self.heads, self.dims)]

    def page_shapes(self, counts: Sequence[int], page_sizes: Sequence[int]) -> list[tuple[int, ...]]:
        """Shapes of canonical KV pages (k, v of each group): counts[g] pages of page_sizes[g] positions,
        (layers, pages, heads, page, dim): what moves when workers exchange pages, not prompts."""
        groups = self.groups or ((self.num_layers, None),)
        return [(n, c, h, ps, d) for (n, _), c, ps in zip(groups, counts, page_sizes) for h, d in zip(self.heads, self.dims)]

    def check(self, other: "KVSpec") -> None:
        diffs = [
            f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
        if diffs:
            raise KVLayoutMismatch("prefill and decode KV layouts differ (prefill vs decode): " + "; ".join(diffs))

    def check_arrays(self, arrays: tuple[Any, ...], t: int | None = None) -> None:
        """The arrays are what the spec says (t: the prefill's positions; default: the first array's)."""
        t = arrays[0].shape[3] if t is None else t
        wants = self.array_shapes(arrays[0].shape[1], t)
        if len(arrays) != len(wants):
            raise KVLayoutMismatch(f"{len(arrays)} KV arrays, spec says {len(wants)} (a k, v pair per cache group)")
        for i, (arr, want) in enumerate(zip(arrays, wants)):
            if tuple(arr.shape) != want or str(arr.dtype) != self.dtype:
                name = ("k", "v")[i % 2] + (f" (cache group {i // 2})" if len(wants) > 2 else "")
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


def move(arrays: Sequence[jax.Array], shardings: Sequence[jax.sharding.Sharding]) -> tuple[jax.Array, ...]:
    """arrays into `shardings` on another mesh: one device_put, resharding on the way; between meshes
    of different processes of a multi-process run (which device_put refuses), the collective copy of
    kv/process_handoff.py, which every process runs."""
    from infire_jax.kv import process_handoff  # (it builds on this module)

    if process_handoff.needs_process_handoff(arrays, shardings):
        return process_handoff.move(arrays, shardings)
    return jax.device_put(tuple(arrays), tuple(shardings))


def handoff(
    arrays: tuple[jax.Array, ...],
    src: KVSpec,
    dst: KVSpec,
    dst_shardings: tuple[jax.sharding.Sharding, ...],
    stats: TransferStats | None = None,
    t: int | None = None,
) -> tuple[jax.Array, ...]:
    """Move canonical KV arrays ((k, v) per cache group) of a prefill of t positions onto the decode
    mesh in one transfer (`move`), after checking layouts."""
    src.check(dst)
    src.check_arrays(arrays, t)
    t0 = time.perf_counter()
    out = move(arrays, dst_shardings)
    jax.block_until_ready(out)
    if stats is not None:
        stats.transfers += 1
        stats.bytes += int(sum(np.prod(a.shape) * a.dtype.itemsize for a in arrays))
        stats.seconds += time.perf_counter() - t0
    return out
