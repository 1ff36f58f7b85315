"""The probe's routing is cached per input signature and re-validated on every pass.

A model may change what its forward does between two ``attribute`` calls with inputs of the
same shapes. The cached routing must then never give a wrong saliency: each pass watches
parameter uses again and checks each call's shapes against the probe's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import captum_paramsal.per_sample.routing as routing
from captum_paramsal import ParameterSaliency

from naive import naive_unit_saliency, rel_err


@pytest.fixture
def probes(monkeypatch):
    calls = []
    real_route = routing.route

    def counting_route(*args, **kwargs):
        calls.append(1)
        return real_route(*args, **kwargs)

    monkeypatch.setattr(routing, "route", counting_route)
    return calls


class ReusesAWeight(nn.Module):
    """With ``reuse``, ``a.weight`` is also used functionally, outside ``a``'s call."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.reuse = False

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.reuse:
            h = h + torch.tanh(F.linear(h, self.a.weight))
        return self.head(h)


class SwitchesLayout(nn.Module):
    """With ``seq_first``, ``lin`` sees ``(T, B, D)`` instead of ``(B, T, D)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.seq_first = False

    def forward(self, x):
        if self.seq_first:
            h = self.lin(x.transpose(0, 1)).transpose(0, 1)
        else:
            h = self.lin(x)
        return self.head(torch.tanh(h).mean(1))


def test_a_weight_used_outside_its_module_after_the_probe_goes_to_the_fallback(probes, monkeypatch):
    torch.manual_seed(0)
    model = ReusesAWeight().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    ps = ParameterSaliency(model)
    names = list(ps.layout.names)
    assert rel_err(ps.attribute(x, target=y), naive_unit_saliency(model, (x,), y, names)) < 1e-10

    model.reuse = True  # same input signature: the cached routing still says "rule" for a.weight
    expected = naive_unit_saliency(model, (x,), y, names)
    assert rel_err(ps.attribute(x, target=y), expected) < 1e-10
    assert len(probes) == 1

    # the check is what saves it: without the watch the rule alone misses the second use
    monkeypatch.setattr(routing.ParameterUseWatch, "foreign_names", lambda self: frozenset())
    assert rel_err(ps.attribute(x, target=y), expected) > 1e-3


def test_a_call_whose_batch_moved_after_the_probe_goes_to_the_fallback(probes):
    torch.manual_seed(0)
    model = SwitchesLayout().double()
    x, y = torch.randn(6, 5, 4, dtype=torch.float64), torch.randint(0, 3, (6,))  # B=6, T=5
    ps = ParameterSaliency(model)
    names = list(ps.layout.names)
    assert rel_err(ps.attribute(x, target=y), naive_unit_saliency(model, (x,), y, names)) < 1e-10

    model.seq_first = True
    expected = naive_unit_saliency(model, (x,), y, names)
    assert rel_err(ps.attribute(x, target=y), expected) < 1e-10
    assert len(probes) == 1


def test_unhashable_extra_arguments_are_probed_every_time(probes):
    class TakesOptions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x, options):
            return self.lin(x) * options["scale"]

    torch.manual_seed(0)
    model = TakesOptions().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    ps = ParameterSaliency(model)
    for scale in (1.0, 2.0):
        options = {"scale": scale}
        got = ps.attribute(x, target=y, additional_forward_args=(options,))
        expected = naive_unit_saliency(model, (x,), y, list(ps.layout.names), additional_forward_args=(options,))
        assert rel_err(got, expected) < 1e-10
    assert len(probes) == 2


def test_hashable_extra_arguments_are_part_of_the_signature(probes):
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x, scale):
            return self.lin(x) * scale

    torch.manual_seed(0)
    model = Scaled().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    ps = ParameterSaliency(model)
    for scale in (1.0, 2.0, 1.0):
        got = ps.attribute(x, target=y, additional_forward_args=scale)
        expected = naive_unit_saliency(model, (x,), y, list(ps.layout.names), additional_forward_args=scale)
        assert rel_err(got, expected) < 1e-10
    assert len(probes) == 2
