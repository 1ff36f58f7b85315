"""Test-session settings: a headless matplotlib, `compile_kernels="auto"` kept eager, the `slow`
marker on tests of files marked from here, and a closing line that says what a marker expression
left out.

`naive` and `helpers` import through ``pythonpath = ["tests"]`` in pyproject.toml.
"""

from __future__ import annotations

import matplotlib
import pytest

matplotlib.use("Agg")

# Tests marked `slow` from here, by file name (and, where a set is given, by test name), rather
# than in their own file: each takes seconds (a Jupyter kernel per tutorial; torch.compile of the
# kernels). The other slow tests carry @pytest.mark.slow themselves.
SLOW_BY_FILE = {
    "test_notebooks.py": {"test_tutorial_runs"},
    "test_compiled.py": None,  # all of it: each test compiles kernels or runs a compiled pass
}

_deselected: list = []


@pytest.fixture(autouse=True)
def auto_compile_never_switches(monkeypatch):
    """``compile_kernels="auto"`` (the default) switches to compiled kernels after a number of
    seconds of eager passes: in the suite that would make a test's path depend on how fast the
    machine is (and add a compilation to whichever test crosses the line). So here "auto" stays
    eager; tests/test_compiled.py tests the switch itself, with prices of its own."""
    from captum_paramsal.per_sample import compiled

    monkeypatch.setattr(compiled, "AUTO_AFTER_SECONDS", {"warm": float("inf"), "cold": float("inf")})


@pytest.fixture
def one_thread():
    """One torch thread for the test: tests that run many tiny forward passes (the turn-off
    loop, the recounts) are many times slower on a shared machine where a second thread
    waits for a busy core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = SLOW_BY_FILE.get(item.path.name, ())
        if names is None or getattr(item, "originalname", item.name) in names:
            item.add_marker(pytest.mark.slow)


def pytest_deselected(items):
    _deselected.extend(items)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say what was left out, so that a fast run never reads as a full one; under `-m "not slow"`
    (make test-fast) also name any test left out that is not marked slow."""
    if not _deselected:
        return
    slow = [item for item in _deselected if item.get_closest_marker("slow") is not None]
    other = [item.nodeid for item in _deselected if item.get_closest_marker("slow") is None]
    terminalreporter.write_line(
        f"left out: {len(slow)} slow test(s) (make test runs them)" + (f", {len(other)} other(s)" if other else "")
    )
    if config.option.markexpr.strip() == "not slow" and not config.option.keyword:
        for nodeid in other:
            terminalreporter.write_line(f"  left out, and not marked slow: {nodeid}")
