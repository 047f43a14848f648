"""experiments/sharding_layouts.ipynb runs top to bottom (so it never rots) and shows layout pictures."""

from __future__ import annotations

import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "experiments" / "sharding_layouts.ipynb"
BUDGET_S = 120


def _kernel_name(tmp_path: pathlib.Path, monkeypatch) -> str:
    """"python3" when its spec runs this interpreter (jupyter_client maps argv "python" to
    sys.executable); otherwise a spec for sys.executable written to a temporary JUPYTER_PATH."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
        if argv0 in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}") or (
            os.path.realpath(argv0) == os.path.realpath(sys.executable)
        ):
            return "python3"
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    install(kernel_name="infire-python3", prefix=str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    return "infire-python3"


def test_sharding_layouts_notebook_runs_and_draws_layouts(tmp_path, monkeypatch):
    import nbclient
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:  # execute from a clean slate, not the stored outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    monkeypatch.setenv("LAYOUT_FIG_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    client = nbclient.NotebookClient(
        nb, kernel_name=_kernel_name(tmp_path, monkeypatch), timeout=BUDGET_S, allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    t0 = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - t0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(pngs) >= 5, f"expected the layout pictures, got {len(pngs)} PNG outputs"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "device 7 | stage 1" in text  # the 8-device pp2_tp4 layout table
    assert "canonical KV handed over" in text
    assert elapsed < BUDGET_S, f"notebook took {elapsed:.0f} s (budget {BUDGET_S} s)"
