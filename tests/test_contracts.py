"""The house rules, checked: floors never import upward, and the declared contracts (models/contract.py,
engine/contract.py) match what the families and both engines implement."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import pathlib

import pytest

from infire_jax.engine import disagg, remote
from infire_jax.engine.contract import EngineRequest, ServingEngine
from infire_jax.models import FAMILIES, ServingModel

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "infire_jax"

# Lowest floor first. A module may import its own package and anything on a lower floor; packages on
# the same floor never import each other (engine and plan are both above the loader; neither knows the
# other). Calibration measures the engine for the planner, so it sits above both.
FLOORS = {
    "infire_jax.machine": 0,  # the host CPU's identity
    "infire_jax.boot": 1,  # the process's compilation cache, boot clock and start-up GC pause
    "infire_jax.flax_nnx": 0,  # flax.nnx, imported without asking IPython
    "infire_jax.config": 0,
    "infire_jax.mesh": 0,
    "infire_jax.compression": 0,
    "infire_jax.sharding": 1,
    "infire_jax.distributed": 1,  # jax.distributed set-up, the watchdog, host values shared between processes
    "infire_jax.kernels": 2,
    "infire_jax.executables": 3,  # the engine's compiled programs across processes (loading needs the CPU kernels)
    "infire_jax.kv": 2,
    "infire_jax.checkpoint": 2,
    "infire_jax.models": 3,
    "infire_jax.loader": 4,
    "infire_jax.engine": 5,
    "infire_jax.engine.speculative": 5,  # proposers and the verify-or-decode decision of speculative decoding
    "infire_jax.plan": 5,
    "infire_jax.plan.calibrate": 6,
    "infire_jax.viz": 6,  # figures of what engine/inspect measures and plan/ computes
    "infire_jax.api": 7,
    "infire_jax": 8,  # the package's __init__: the public surface
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The FLOORS entry a module belongs to (the longest matching prefix)."""
    # "infire_jax" names the package's __init__ only: a new module must be given its floor, not inherit the top one
    best = max((k for k in FLOORS if module == k or (k != "infire_jax" and module.startswith(k + "."))), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} is on no floor: add it (or its package) to FLOORS in {__file__}")
    return best


def _imports(path: pathlib.Path) -> set[str]:
    """Every infire_jax module a file imports, at any depth (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("infire_jax")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("infire_jax"):
            for a in node.names:  # `from infire_jax import mesh` imports the module infire_jax.mesh
                sub = f"{node.module}.{a.name}"
                out.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                        or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else node.module)
    return out


def test_no_floor_imports_a_higher_one():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _module_name(path)
        mine = _unit(me)
        for target in _imports(path):
            theirs = _unit(target)
            if theirs == mine or mine.startswith(theirs + ".") or theirs.startswith(mine + "."):
                continue  # within one package (plan.calibrate may use plan, and plan may not use it: below)
            if FLOORS[theirs] > FLOORS[mine] or (FLOORS[theirs] == FLOORS[mine]):
                upward.append(f"{me} imports {target} (floor {FLOORS[theirs]} {theirs}; it is on {FLOORS[mine]} {mine})")
    calibrate_users = [
        _module_name(p) for p in PACKAGE.rglob("*.py")
        if "infire_jax.plan.calibrate" in _imports(p) and _unit(_module_name(p)) in ("infire_jax.plan",)
    ]
    assert not upward and not calibrate_users, "\n".join(upward + [f"{m} imports plan.calibrate" for m in calibrate_users])


def test_no_signature_probes_or_private_jax():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "inspect.signature" not in text, f"{path}: declare the option in models/contract.py instead"
        assert "jax._src" not in text, f"{path}: private JAX API"


def _params(fn) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def _compatible(protocol_fn, impl_fn) -> str | None:
    """Why impl_fn cannot be called the ways protocol_fn can (None if it can)."""
    impl = {p.name: p for p in _params(impl_fn)}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in impl.values())
    wanted = _params(protocol_fn)
    for p in wanted:
        if p.name not in impl and not var_kw:
            return f"has no parameter {p.name!r}"
        if p.name in impl and p.default is not p.empty and impl[p.name].default is p.empty:
            return f"requires {p.name!r}, which the contract lets callers leave out"
    extra = [p for n, p in impl.items() if n not in {w.name for w in wanted} and p.default is p.empty
             and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return f"requires extra parameters {[p.name for p in extra]}" if extra else None


def _members(protocol) -> tuple[list[str], list[str]]:
    """(methods and properties, data attributes) a Protocol declares."""
    own = [n for n in vars(protocol) if not n.startswith("_") or n == "__call__"]
    callables = [n for n in own if callable(getattr(protocol, n)) or isinstance(vars(protocol)[n], property)]
    data = [n for n in getattr(protocol, "__annotations__", {}) if n not in callables]
    return callables, data


def _check(protocol, cls, instance_fields=()) -> list[str]:
    problems = []
    methods, data = _members(protocol)
    for name in methods:
        want, have = inspect.getattr_static(protocol, name), inspect.getattr_static(cls, name, None)
        if have is None:
            if not (isinstance(want, property) and name in instance_fields):  # set in __init__
                problems.append(f"{cls.__name__} lacks {name}")
        elif isinstance(want, property):
            if isinstance(have, (staticmethod, classmethod)) or (callable(have) and not isinstance(have, property)):
                problems.append(f"{cls.__name__}.{name} should be a property, not a method")
        else:
            why = _compatible(getattr(protocol, name), getattr(cls, name))
            if why:
                problems.append(f"{cls.__name__}.{name} {why}")
    for name in data:
        if name not in instance_fields and not hasattr(cls, name):
            problems.append(f"{cls.__name__} lacks attribute {name}")
    return problems


@pytest.mark.parametrize("cls", [disagg.Engine, remote.RemoteEngine], ids=lambda c: c.__name__)
def test_both_engines_implement_the_engine_contract(cls):
    assert _check(ServingEngine, cls, instance_fields=("requests",)) == []


@pytest.mark.parametrize("cls", [disagg.Request, remote.RemoteRequest], ids=lambda c: c.__name__)
def test_both_request_kinds_implement_the_request_contract(cls):
    fields = tuple(f.name for f in dataclasses.fields(cls))
    assert _check(EngineRequest, cls, instance_fields=fields) == []


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_implements_the_model_contract(name):
    cls = FAMILIES[name].module
    fields = ("cfg", "layer_slots", "active", "compute_dtype", "kv_heads")  # set in __init__
    assert _check(ServingModel, cls, instance_fields=fields) == []


def test_an_incompatible_implementation_is_caught():
    """The checker itself: a step that requires an argument, a missing stats, a missing attribute."""

    class Broken:
        requests: dict = {}

        def submit(self, prompt, params):  # no request_id
            ...

        busy = property(lambda self: False)

        def step(self, budget):  # requires an argument the contract does not pass
            ...

        def run(self):
            ...

    problems = _check(ServingEngine, Broken)
    assert any("submit has no parameter 'request_id'" in p for p in problems)
    assert any("step requires extra parameters ['budget']" in p for p in problems)
    assert any("lacks stats" in p for p in problems)
