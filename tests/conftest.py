"""Test-session settings: a headless matplotlib.

`naive` and `helpers` import through ``pythonpath = ["tests"]`` in pyproject.toml.
"""

import matplotlib

matplotlib.use("Agg")
