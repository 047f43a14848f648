"""Every experiments/ script is an absl program: flags, --help, no argparse."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"
SCRIPTS = sorted(p for p in EXPERIMENTS.glob("*.py") if p.stem not in ("flags_common", "bench_common"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_script_is_an_absl_program(script):
    text = script.read_text()
    assert "argparse" not in text, "use absl flags (experiments/flags_common.py for the deployment flags)"
    assert "app.run(main)" in text


@pytest.mark.parametrize("name", ["plan_capacity", "serve_offline", "launch_pd"])
def test_help_lists_the_flags(name, tmp_path):
    res = subprocess.run([sys.executable, str(EXPERIMENTS / f"{name}.py"), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    shown = res.stdout + res.stderr
    assert "flags:" in shown
    assert ("--model=" if name == "plan_capacity" else "--model_dir") in shown.replace(": ", "=")
