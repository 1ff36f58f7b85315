"""turn_off / boost / perturb change exactly the chosen units and restore every bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from captum_paramsal import ParameterSaliency
from captum_paramsal.interventions import boost, perturb, resolve_units, turn_off

from helpers import assert_unchanged, snapshot


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.ConvTranspose2d(4, 6, 2, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 5 * 5, 3),
    )


def changed_mask(model, before, name):
    return dict(model.named_parameters())[name].detach() != before.values[name]


def test_turn_off_zeroes_exactly_the_units_and_restores():
    model = make_model()
    before = snapshot(model)
    units = [("0.weight", 1), ("2.weight", 4), ("5.weight", 2)]
    with turn_off(model, units, bias=True):
        p = dict(model.named_parameters())
        assert torch.all(p["0.weight"][1] == 0) and p["0.bias"][1] == 0
        # ConvTranspose2d(4, 6, groups=2): output channel 4 is group 1's second output;
        # its weights are weight[2:4, 1] (input channels of group 1)
        assert torch.all(p["2.weight"][2:4, 1] == 0) and p["2.bias"][4] == 0
        assert torch.all(p["5.weight"][2] == 0) and p["5.bias"][2] == 0
        for name in ("0.weight", "2.weight", "5.weight"):
            expected = torch.zeros_like(before.values[name], dtype=torch.bool)
            if name == "0.weight":
                expected[1] = True
            elif name == "2.weight":
                expected[2:4, 1] = True
            else:
                expected[2] = True
            assert torch.equal(changed_mask(model, before, name), expected & (before.values[name] != 0))
    assert_unchanged(model, before)


def test_restores_after_an_error_and_leaves_grad_flags():
    model = make_model()
    model[0].weight.requires_grad_(False)
    model[5].weight.grad = torch.ones_like(model[5].weight)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="inside"):
        with boost(model, [("0.weight", 0), ("5.weight", 1)], factor=3.0, bias=True):
            assert torch.equal(model[0].weight[0], before.values["0.weight"][0] * 3.0)
            raise RuntimeError("inside")
    assert_unchanged(model, before)
    assert not model[0].weight.requires_grad and torch.equal(model[5].weight.grad, torch.ones_like(model[5].weight))


def test_layout_columns_and_perturb():
    model = make_model()
    layout = ParameterSaliency(model).layout
    column = layout.column("5.weight", 1)
    assert resolve_units(model, [column, ("5.weight", 1), torch.tensor(column)], layout) == {"5.weight": [1]}
    assert resolve_units(model, [column]) == {"5.weight": [1]}  # the default layout
    before = snapshot(model)
    with perturb(model, [column], noise="gaussian", seed=3):
        first = model[5].weight.detach().clone()
    with perturb(model, [column], noise="gaussian", seed=3):
        assert torch.equal(model[5].weight, first)
    with perturb(model, [column], noise="proportional", scale=0.5, seed=4):
        changed = changed_mask(model, before, "5.weight")
        assert changed[1].all() and not changed[0].any() and not changed[2].any()
        ratio = model[5].weight[1] / before.values["5.weight"][1]
        assert not torch.allclose(ratio, torch.ones_like(ratio))
    assert_unchanged(model, before)
    with turn_off(model, []):
        assert_unchanged(model, before)


def test_bad_units():
    model = make_model()
    with pytest.raises(ValueError, match="no parameter named 'nope.weight'"):
        with turn_off(model, [("nope.weight", 0)]):
            pass
    with pytest.raises(ValueError, match="unit 4 of 0.weight is out of range: it has 4 units"):
        with turn_off(model, [("0.weight", 4)]):
            pass
    with pytest.raises(ValueError, match="column 10000 is out of range"):
        with turn_off(model, [10000]):
            pass
    with pytest.raises(TypeError, match="a unit is a layout column"):
        with turn_off(model, ["0.weight"]):
            pass
    with pytest.raises(ValueError, match="noise must be one of"):
        perturb(model, [0], noise="uniform")
    with pytest.raises(ValueError, match="factor must be a number"):
        boost(model, [0], factor=float("nan"))
