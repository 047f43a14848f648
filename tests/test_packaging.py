"""A plain (non-editable) install works from any directory: every package and the shipped configs are
in the wheel, and named deployments, the planner's named models and a load by deployment name work
from it without the source tree."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "infire_jax").rglob("__init__.py")}
    assert found - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert "infire_jax.configs" in listed


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> pathlib.Path:
    """The wheel of this tree (built from a copy, so no build/ lands in the checkout), unpacked as a site directory."""
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
    for name in ("infire_jax", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = out.glob("infire_jax-*.whl")
    site = out / "site"
    zipfile.ZipFile(wheel).extractall(site)
    return site


def test_the_wheel_ships_the_configs(installed):
    shipped = {p.relative_to(installed / "infire_jax" / "configs").as_posix() for p in (installed / "infire_jax" / "configs").rglob("*.json")}
    in_repo = {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.json")}
    assert shipped == in_repo


def test_named_deployments_and_models_work_from_another_directory(installed, tmp_path):
    script = textwrap.dedent("""
        import jax
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", 8)
        import infire_jax
        from infire_jax.checkpoint import tiny
        from infire_jax.plan import Deployment, plan_capacity
        assert "/site/infire_jax/" in infire_jax.__file__, infire_jax.__file__
        plan = plan_capacity("kimi_k25", Deployment("h100", 8, mesh="tp=8", weights="int4_experts"))
        assert plan.fits, plan.summary()
        model_dir = "tiny"
        tiny.write_tiny_checkpoint(model_dir)
        model = infire_jax.load(model_dir, deployment="pp2_tp2")
        assert dict(model.placed.layout.mesh.shape)["pp"] == 2
        print("tokens", model.generate([[1, 2, 3]], max_new_tokens=3)[0])
    """)
    env = {"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tokens [" in res.stdout
