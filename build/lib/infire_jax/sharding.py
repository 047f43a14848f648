"""Logical axis names -> mesh axes: one rules table per deployment.

Model code names only logical axes ("embed", "heads", "layers", ...). A deployment maps each to a
mesh axis (or None = replicated). A logical dimension whose size the mesh axis does not divide is
replicated instead (e.g. kv_heads=2 on tp=4: K/V projections are replicated and every tp peer
computes all KV heads, which is cheaper than splitting a head across devices), and a mesh axis is
used at most once per array.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import pathlib
from typing import Any, Iterator, Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

__all__ = [
    "DEFAULT_RULES",
    "Layout",
    "KERNEL_CHOICES",
    "logical_spec",
    "constrain",
    "use_layout",
    "current_layout",
    "load_deployment",
    "stage_slots",
]


MeshAxes = str | tuple[str, ...] | None

# The Megatron layout: heads / MLP columns / vocab split on tp; layers split on pp; batch on dp.
DEFAULT_RULES: dict[str, MeshAxes] = {
    "batch": "dp",
    "layers": "pp",
    "stages": "pp",  # per-stage state of the decode pipeline ring
    "vocab": "tp",
    "embed": None,
    "heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "mlp": "tp",
    "experts": "ep",
    "expert_mlp": "tp",
    "norm": None,
    "seq": None,
    "cache_seq": None,
    "fused": None,
    "pages": None,  # paged KV cache: page index and position within a page
    "page_pos": None,
    "latent": None,
    "q_lora": None,  # MLA query low-rank dimension (q_lora_rank)
}


KERNEL_CHOICES = ("auto", "xla", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh plus the rules table that places logical axes on it, and the kernels to use: "auto"
    picks by platform: on GPUs the Pallas attention kernels (kernels/pallas_attention.py), on one CPU
    device (float32 compute; float32, bf16 or compressed weights) infire_jax's own kernels where they
    pay (kernels/cpu.py: few-row projections, paged decode attention, causal prefill attention, bf16
    embedding rows); "xla" keeps XLA's code everywhere; "pallas" asks for the Pallas kernels (GPUs
    only); "pallas_interpret" runs the same Pallas kernels through Pallas' interpreter on any platform
    (slow: for proving them equal to XLA's code on machines without a GPU). kernels/dispatch.py
    resolves the choice per op."""

    mesh: jax.sharding.Mesh
    rules: Mapping[str, MeshAxes] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))
    kernels: str = "auto"

    def __post_init__(self) -> None:
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"unknown kernels {self.kernels!r}; choose one of {KERNEL_CHOICES}")
        if self.kernels == "pallas" and self.platform not in ("gpu", None):
            raise ValueError(
                f"kernels='pallas' needs GPU devices, this mesh is on {self.platform}; use 'auto' (or "
                "'pallas_interpret' to run the Pallas kernels through the interpreter, slowly)"
            )

    @property
    def platform(self) -> str | None:
        """The platform of the mesh's devices ("cpu", "gpu", "tpu"), None for an abstract mesh: the
        one platform check kernel choices read."""
        devices = getattr(self.mesh, "devices", None)  # an AbstractMesh (planning) has none
        return None if devices is None else devices.flat[0].platform

    @property
    def cpu_kernels(self) -> bool:
        """Whether model code may use the CPU kernels: asked for, and one CPU device (the kernels are
        not partitioned; sharded programs keep XLA's code)."""
        return self.kernels == "auto" and self.mesh.size == 1 and self.platform == "cpu"

    def axis_size(self, logical: str) -> int:
        """How many ways a logical axis is split (1 when replicated)."""
        axes = self.rules.get(logical)
        axes = (axes,) if isinstance(axes, str) else (axes or ())
        size = 1
        for a in axes:
            size *= self.mesh.shape[a]
        return size

    def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None) -> P:
        return logical_spec(logical_axes, self.rules, self.mesh, shape)

    def sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes, shape))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())


def logical_spec(
    logical_axes: Sequence[str | None],
    rules: Mapping[str, MeshAxes],
    mesh: jax.sharding.Mesh,
    shape: Sequence[int] | None = None,
) -> P:
    """PartitionSpec for an array whose dimensions carry these logical names."""
    used: set[str] = set()
    out: list[MeshAxes] = []
    for i, name in enumerate(logical_axes):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in the rules table {sorted(rules)}")
        axes = rules.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        size = 1
        for a in axes:
            size *= mesh.shape[a]
        if shape is not None and shape[i] % size:
            axes = ()  # not divisible: replicate this dimension rather than split unevenly
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def load_deployment(name_or_path: str | pathlib.Path) -> tuple[str, dict[str, MeshAxes]]:
    """(mesh spec, rules table) of a deployment JSON: a path, or a name in configs/deployments/."""
    from infire_jax.config import configs_dir

    shipped = configs_dir() / "deployments"
    path = pathlib.Path(name_or_path)
    if not path.is_file():
        path = shipped / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in shipped.glob("*.json"))
        raise FileNotFoundError(f"no deployment {name_or_path!r}: give a JSON path or one of {known}")
    spec = json.loads(path.read_text())
    rules = dict(DEFAULT_RULES) | {k: tuple(v) if isinstance(v, list) else v for k, v in spec.get("rules", {}).items()}
    unknown = [k for k in spec.get("rules", {}) if k not in DEFAULT_RULES]
    if unknown:
        raise ValueError(f"deployment {path}: unknown logical axes {unknown}; known: {sorted(DEFAULT_RULES)}")
    return spec["mesh"], rules


def stage_slots(num_layers: int, stages: int) -> tuple[int, tuple[int, ...]]:
    """Slot of each layer when `stages` pipeline stages get ceil(L/stages) slots each and layers
    are spread as evenly as possible (stage sizes differ by at most one; padding slots sit at the
    end of the short stages). Returns (number of slots, slot of each layer)."""
    per = -(-num_layers // stages)
    slots = []
    for s in range(stages):
        count = num_layers // stages + (s < num_layers % stages)
        slots += [s * per + j for j in range(count)]
    return per * stages, tuple(slots)


_LAYOUT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("infire_layout", default=None)


@contextlib.contextmanager
def use_layout(layout: Layout | None) -> Iterator[Layout | None]:
    """Make `layout` the one that `constrain` applies while tracing model code."""
    token = _LAYOUT.set(layout)
    try:
        yield layout
    finally:
        _LAYOUT.reset(token)


def current_layout() -> Layout | None:
    return _LAYOUT.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a layout (single device, tests)."""
    layout = _LAYOUT.get()
    if layout is None or layout.mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, layout.sharding(logical_axes, x.shape))


def tree_shardings(tree: Any, axes_tree: Any, layout: Layout) -> Any:
    """NamedShardings for a pytree of arrays/ShapeDtypeStructs given a matching tree of logical axes."""
    return jax.tree.map(
        lambda x, axes: layout.sharding(axes, x.shape),
        tree,
        axes_tree,
        is_leaf=lambda a: isinstance(a, tuple) and all(isinstance(n, (str, type(None))) for n in a),
    )
