"""The README's Python examples run as written (in order, sharing one namespace)."""

from __future__ import annotations

import os
import re

import matplotlib.pyplot as plt

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)  # files the examples write land here
    namespace: dict = {}
    for index, block in enumerate(blocks):
        if "MyScale" in block:  # the rule-registration sketch defines a rule for a user's layer
            block = "import torch.nn as nn\nclass MyScale(nn.Module):\n    pass\n" + block
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)
    plt.close("all")
    assert (tmp_path / "resnet18-stats.safetensors").exists() and (tmp_path / "heatmap.png").exists()
