"""The tutorials run top to bottom (small sizes, as in CI) and are committed without outputs."""

from __future__ import annotations

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), os.pardir, "tutorials", "*.ipynb")))


def test_there_are_three_tutorials():
    assert [os.path.basename(p)[:3] for p in TUTORIALS] == ["01_", "02_", "03_"]


@pytest.mark.parametrize("path", TUTORIALS, ids=[os.path.basename(p) for p in TUTORIALS])
def test_tutorial_runs(path, tmp_path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") and not cell.get("execution_count")
               for cell in notebook.cells if cell.cell_type == "code"), "commit notebooks with outputs stripped"
    monkeypatch.setenv("PARAMSAL_TUTORIAL_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    resources = {"metadata": {"path": str(tmp_path)}}  # files the notebooks write land here
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources=resources)
    client.execute()  # raises CellExecutionError with the failing cell's traceback
