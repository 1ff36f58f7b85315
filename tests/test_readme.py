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


def test_readme_claims_about_the_demo_model():
    """The README's example digit is corrected by turning off its most salient unit."""
    import torch

    from captum_paramsal import ParameterSaliency
    from captum_paramsal.interventions import turn_off
    from captum_paramsal.zoo import load_digits_model

    model, stats, data = load_digits_model()
    x, y = data.test_set()
    ps = ParameterSaliency(model, stats=stats)
    with torch.no_grad():
        assert int(y[172]) == 1 and int(model(x[172:173]).argmax(1)) == 8
        top = [(u.param, u.unit) for u in ps.profile(x[172:173], target=y[172:173]).top_k(1)[0]]
        with turn_off(model, top):
            assert int(model(x[172:173]).argmax(1)) == 1
