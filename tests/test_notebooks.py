"""The tutorials are committed with their outputs (so that the figures show where the
repository is browsed), and still run top to bottom (small sizes, as in CI).

The committed files are only read: each notebook is executed from an in-memory copy, and
``python tutorials/run_notebooks.py`` is what regenerates the committed outputs.
"""

from __future__ import annotations

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), os.pardir, "tutorials", "*.ipynb")))
IDS = [os.path.basename(p) for p in TUTORIALS]
REGENERATE = "regenerate the outputs with: python tutorials/run_notebooks.py"
MAX_BYTES = 250_000  # per notebook: PNGs at modest dpi, no embedded data


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_there_are_five_tutorials():
    assert [os.path.basename(p)[:3] for p in TUTORIALS] == ["01_", "02_", "03_", "04_", "05_"]


@pytest.mark.parametrize("path", TUTORIALS, ids=IDS)
def test_tutorial_is_committed_with_its_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    cells = code_cells(notebook)
    counts = [cell.get("execution_count") for cell in cells]
    # one run top to bottom: every code cell executed, once, in order
    assert counts == list(range(1, len(cells) + 1)), f"execution counts {counts}: {REGENERATE}"
    outputs = [output for cell in cells for output in cell.get("outputs", [])]
    errors = [output for output in outputs if output.output_type == "error"]
    assert not errors, f"committed with an error ({errors[0].get('ename')}): {REGENERATE}"
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert images, f"no figure among the committed outputs: {REGENERATE}"
    assert os.path.getsize(path) <= MAX_BYTES, f"{os.path.getsize(path)} bytes: keep the committed figures small"


@pytest.mark.parametrize("path", TUTORIALS, ids=IDS)
def test_tutorial_runs(path, tmp_path, monkeypatch):
    with open(path, "rb") as f:
        committed = f.read()
    notebook = nbformat.reads(committed.decode(), as_version=4)
    monkeypatch.setenv("PARAMSAL_TUTORIAL_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    resources = {"metadata": {"path": str(tmp_path)}}  # files the notebooks write land here
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources=resources)
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    assert all(cell.get("execution_count") for cell in code_cells(notebook))
    with open(path, "rb") as f:
        assert f.read() == committed, "running the tutorial must not write into the committed notebook"
