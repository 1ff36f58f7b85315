"""Statistics do not depend on how the model is wrapped: a model's statistics standardize it
inside DataParallel, torch.compile or a thin wrapper module (and the other way round), and
parameters may be named with or without the wrapper's prefix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_paramsal import ParameterSaliency, SaliencyStats

from naive import rel_err


class Wrapper(nn.Module):
    """A user's thin wrapper: one child, nothing of its own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, x):
        return self.inner(x)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Flatten()).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


WRAPPERS = {"data_parallel": nn.DataParallel, "thin": Wrapper, "nested": lambda m: Wrapper(nn.DataParallel(m))}


@pytest.mark.parametrize("wrap", sorted(WRAPPERS))
def test_statistics_move_between_a_model_and_its_wrappers(wrap, tmp_path):
    net = _net()
    x, y = _data()
    bare = ParameterSaliency(net)
    stats = bare.fit_stats([(x, y)], progress=False)
    stats.save(tmp_path / "stats.safetensors")
    wrapped_model = WRAPPERS[wrap](net)
    wrapped = ParameterSaliency(wrapped_model, stats=SaliencyStats.load(tmp_path / "stats.safetensors"))
    assert wrapped.fingerprint == bare.fingerprint
    assert all(name.endswith(("0.weight", "2.weight")) for name in wrapped.layout.names)
    bare.stats = stats
    assert rel_err(wrapped.attribute(x, target=y), bare.attribute(x, target=y)) < 1e-12
    # and back: statistics fitted through the wrapper standardize the bare model
    bare.stats = wrapped.fit_stats([(x, y)], progress=False)
    assert rel_err(bare.stats.mean, stats.mean) < 1e-12
    # a parameter named without the wrapper's prefix
    assert ParameterSaliency(wrapped_model, params=["2.weight"]).layout.names[0].endswith("2.weight")


def test_a_different_model_is_still_refused():
    x, y = _data()
    stats = ParameterSaliency(_net()).fit_stats([(x, y)], progress=False)
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Identity()).double()  # same shapes
    other = Wrapper(nn.Sequential(nn.Identity(), other))  # the weights now sit at 1.0 and 1.2
    with pytest.raises(ValueError, match="layout fingerprint"):
        ParameterSaliency(other, stats=stats)


@pytest.mark.slow
def test_torch_compile_wrapper():
    net = _net()
    x, y = _data()
    bare = ParameterSaliency(net)
    bare.stats = bare.fit_stats([(x, y)], progress=False)
    compiled = ParameterSaliency(torch.compile(net), stats=bare.stats)
    assert compiled._selection.wrapper_prefix == "_orig_mod."
    assert compiled.routing(x).fallback == ()
    assert rel_err(compiled.attribute(x, target=y), bare.attribute(x, target=y)) < 1e-12
