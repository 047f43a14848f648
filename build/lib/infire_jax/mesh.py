"""Mesh specs as strings: "pp=2,tp=2@0-3" -> a jax Mesh with named axes over a device range.

Every mesh carries all four axes (dp, pp, ep, tp) in that order, absent ones with size 1, so a rules
table may name any axis whatever the deployment. tp is the fastest-varying axis: tensor-parallel
peers are neighbouring devices (the NVLink-closest ones on a GPU host).

Axis type: Auto (GSPMD). Weights and caches get explicit NamedShardings, activations get logical
sharding constraints; the compiler propagates the rest. Pipeline stages use shard_map over "pp".
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import jax
import numpy as np

__all__ = ["AXES", "MeshSpec", "MeshSpecError", "parse_mesh", "make_mesh"]

AXES = ("dp", "pp", "ep", "tp")
_SPEC_RE = re.compile(r"^\s*(?P<axes>[^@]*?)\s*(?:@\s*(?P<first>\d+)\s*(?:-\s*(?P<last>\d+)\s*)?)?$")


class MeshSpecError(ValueError):
    """A mesh spec string that does not describe a valid mesh on this machine."""


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    sizes: tuple[tuple[str, int], ...]  # (axis, size) for every axis in AXES order
    first_device: int | None = None  # device range [first, last]; None = the first N devices
    last_device: int | None = None

    @property
    def shape(self) -> dict[str, int]:
        return dict(self.sizes)

    @property
    def num_devices(self) -> int:
        return math.prod(size for _, size in self.sizes)

    def device_ids(self, available: int) -> list[int]:
        n = self.num_devices
        if self.first_device is None:
            if n > available:
                raise MeshSpecError(f"mesh {self} needs {n} devices but only {available} are available")
            return list(range(n))
        first, last = self.first_device, self.last_device
        if last >= available:
            raise MeshSpecError(
                f"mesh {self}: device range {first}-{last} is out of bounds (devices 0-{available - 1} exist)"
            )
        return list(range(first, last + 1))

    def __str__(self) -> str:
        axes = ",".join(f"{a}={s}" for a, s in self.sizes if s > 1) or "tp=1"
        rng = "" if self.first_device is None else f"@{self.first_device}-{self.last_device}"
        return axes + rng


def parse_mesh(spec: str | MeshSpec) -> MeshSpec:
    """Parse "pp=2,tp=2@0-3" (device range optional, "@2" = device 2 alone; absent axes have size 1)."""
    if isinstance(spec, MeshSpec):
        return spec
    m = _SPEC_RE.match(spec or "")
    if not m:
        raise MeshSpecError(f"cannot parse mesh spec {spec!r}; expected e.g. 'pp=2,tp=2@0-3'")
    sizes = dict.fromkeys(AXES, 1)
    seen = set()
    for part in filter(None, (p.strip() for p in m["axes"].split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in AXES:
            raise MeshSpecError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {', '.join(AXES)}")
        if name in seen:
            raise MeshSpecError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise MeshSpecError(f"mesh spec {spec!r}: size of {name!r} must be an integer, got {value!r}") from None
        if size < 1:
            raise MeshSpecError(f"mesh spec {spec!r}: size of {name!r} must be >= 1, got {size}")
        sizes[name] = size
        seen.add(name)
    first = last = None
    if m["first"] is not None:
        first = int(m["first"])
        last = int(m["last"]) if m["last"] is not None else first
        if last < first:
            raise MeshSpecError(f"mesh spec {spec!r}: device range {first}-{last} is empty")
        count = last - first + 1
        product = math.prod(sizes.values())
        if count != product:
            raise MeshSpecError(
                f"mesh spec {spec!r}: the axis sizes multiply to {product} but the range {first}-{last} "
                f"holds {count} devices; make them equal"
            )
    return MeshSpec(tuple((a, sizes[a]) for a in AXES), first, last)


def make_mesh(spec: str | MeshSpec, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """Build an Auto-typed Mesh for a spec over jax.devices() (or the given device list)."""
    spec = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    ids = spec.device_ids(len(devices))
    grid = np.array([devices[i] for i in ids], dtype=object).reshape([s for _, s in spec.sizes])
    return jax.sharding.Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
