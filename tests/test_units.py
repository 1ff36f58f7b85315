"""The one vocabulary of units (captum_paramsal.units) and the one weight swap
(captum_paramsal.interventions.swapped_parameters)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from captum_paramsal.interventions import edited_values, swapped_parameters, turn_off
from captum_paramsal.layout import SaliencyLayout
from captum_paramsal.saliency_profile import SaliencyProfile, UnitScore
from captum_paramsal.units import iter_units, resolve_columns, resolve_units


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))


LAYOUT = SaliencyLayout([("0.weight", (4, 2, 3, 3), 4), ("3.weight", (3, 36), 3)])  # the default selection


# --------------------------------------------------------------------------- resolve_columns


def test_every_form_resolves_to_its_column_in_the_callers_order():
    score = UnitScore("3.weight", 2, 9.5, 123)  # its column (123) is another profile's: not used
    units = [5, ("0.weight", 1), ["3.weight", 0], torch.tensor(2), np.int64(0), score]
    assert resolve_columns(units, LAYOUT) == [5, 1, 4, 2, 0, 6]
    # duplicates, in the same or another form, keep their first place only
    assert resolve_columns([6, ("3.weight", 2), 1, UnitScore("3.weight", 2, 0.0, 6), 1], LAYOUT) == [6, 1]
    assert resolve_columns([], LAYOUT) == []


def test_collections_and_single_units():
    assert resolve_columns(torch.tensor([3, 1, 3]), LAYOUT) == [3, 1]  # a 1-D tensor of columns
    assert resolve_columns(("3.weight", 1), LAYOUT) == [5]  # one pair alone
    assert resolve_columns(4, LAYOUT) == [4]
    assert resolve_columns(torch.tensor(4), LAYOUT) == [4]
    assert resolve_columns((u for u in [2, 0]), LAYOUT) == [2, 0]  # any iterable
    assert list(iter_units(UnitScore("3.weight", 1, 0.0, 5))) == [UnitScore("3.weight", 1, 0.0, 5)]


def test_top_k_rows_resolve_directly():
    values = torch.tensor([[0.0, 5, 1, 0, 0, 0, 9]])
    profile = SaliencyProfile(values, LAYOUT)
    (row,) = profile.top_k(2)
    assert resolve_columns(row, LAYOUT) == [6, 1]
    assert resolve_units(make_model(), row) == {"0.weight": [1], "3.weight": [2]}


@pytest.mark.parametrize(
    "unit, error, match",
    [
        (7, ValueError, r"unit column 7 is out of range for a layout of 7 columns \(0..6\)"),
        (-1, ValueError, "unit column -1 is out of range"),
        (("3.weight", 3), ValueError, r"unit \('3.weight', 3\) is out of range: 3.weight has 3 units"),
        (("3.wieght", 0), ValueError, "no parameter '3.wieght' in the layout; did you mean '3.weight'"),
        (UnitScore("nope", 0, 1.0, 0), ValueError, r"unit UnitScore\('nope', unit=0\): no parameter 'nope'"),
        (True, TypeError, "a unit is a layout column"),
        (2.0, TypeError, "a unit is a layout column"),
        (torch.tensor(2.0), TypeError, "0-d integer tensor"),
        (torch.tensor(True), TypeError, "a unit is a layout column"),
        (torch.tensor([[1, 2]]), TypeError, "1-D tensor of layout columns"),
        ("0.weight", TypeError, "a parameter name alone names no unit"),
        (["0.weight"], TypeError, "a parameter name alone names no unit"),
        ([("0.weight", 1.0)], TypeError, "the unit index must be an int, got float"),
        ([("0.weight", True)], TypeError, "the unit index must be an int, got bool"),
        ([("0.weight", 1, 2)], TypeError, "a unit is a layout column"),
        (None, TypeError, "units must be one unit or a collection of units; a unit is a layout column"),
    ],
)
def test_bad_units_name_the_problem(unit, error, match):
    with pytest.raises(error, match=match):
        resolve_columns(unit, LAYOUT)


def test_resolve_columns_needs_a_layout():
    with pytest.raises(TypeError, match="layout must be a SaliencyLayout"):
        resolve_columns([0], {"0.weight": 4})


# --------------------------------------------------------------------------- resolve_units


def test_resolve_units_against_a_model():
    model = make_model()
    assert resolve_units(model, [("3.weight", 2), 1, ("0.weight", 1), UnitScore("3.weight", 0, 0.0, 99)]) == {
        "0.weight": [1],
        "3.weight": [0, 2],
    }  # model order, indices sorted, duplicates dropped, columns in the default layout
    # a layout of other parameters: columns are read in it
    layout = SaliencyLayout([("3.bias", (3,), 1), ("3.weight", (3, 36), 3)])
    assert resolve_units(model, [0, 3], layout) == {"3.weight": [2], "3.bias": [0]}
    # pairs name parameters outside the default selection too
    assert resolve_units(model, [("0.bias", 0)]) == {"0.bias": [0]}
    assert resolve_units(model, []) == {}


def test_resolve_units_of_a_tied_parameter_uses_its_own_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    assert resolve_units(Tied(), [("b.weight", 1), ("a.weight", 2)]) == {"a.weight": [1, 2]}


def test_resolve_units_errors():
    model = make_model()
    with pytest.raises(ValueError, match="no parameter named '3.wieght'; did you mean '3.weight'"):
        resolve_units(model, [("3.wieght", 0)])
    with pytest.raises(ValueError, match=r"unit 4 of 0.weight is out of range: it has 4 units"):
        resolve_units(model, [("0.weight", 4)])
    with pytest.raises(ValueError, match=r"given as UnitScore\('0.weight', unit=9\)"):
        resolve_units(model, [UnitScore("0.weight", 9, 0.0, 0)])
    with pytest.raises(ValueError, match="unit column 7 is out of range"):
        resolve_units(model, [7])
    other = SaliencyLayout([("fc.weight", (3, 3), 3)])
    with pytest.raises(ValueError, match="is the layout this model's"):
        resolve_units(model, [0], other)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        resolve_units(LAYOUT, [0])
    with pytest.raises(TypeError, match="layout must be a SaliencyLayout"):
        resolve_units(model, [0], layout="0.weight")


# --------------------------------------------------------------------------- swapped_parameters


def state(model):
    return {
        name: (p, p.data_ptr(), p.detach().clone(), p.requires_grad, p.grad, p._version)
        for name, p in model.named_parameters()
    }


def assert_restored(model, before):
    for name, p in model.named_parameters():
        obj, ptr, values, requires_grad, grad, version = before[name]
        assert p is obj and p.data_ptr() == ptr and p._version == version, name
        assert torch.equal(p, values), name  # bit for bit
        assert p.requires_grad == requires_grad and p.grad is grad, name


def test_swap_shows_the_values_and_restores_every_bit():
    model = make_model()
    model[0].weight.requires_grad_(False)
    model[3].weight.grad = torch.randn_like(model[3].weight)
    grad_values = model[3].weight.grad.clone()
    before = state(model)
    new = torch.arange(12.0, dtype=torch.float64).reshape(3, 4).repeat(1, 9)  # float64: converted
    with swapped_parameters(model, {"3.weight": new, "0.bias": torch.zeros(4)}) as inside:
        assert inside is model
        assert model[3].weight.dtype == torch.float32 and torch.equal(model[3].weight, new.float())
        assert torch.equal(model[0].bias, torch.zeros(4))
        assert model[3].weight is before["3.weight"][0] and model[3].weight.grad is before["3.weight"][4]
        model[3].weight.data.add_(1.0)  # writing the model inside never writes the caller's tensor
    assert torch.equal(new[0, :4], torch.arange(4.0, dtype=torch.float64))
    assert_restored(model, before)
    assert torch.equal(model[3].weight.grad, grad_values)


def test_swap_restores_on_error_and_nests():
    model = make_model()
    before = state(model)
    with pytest.raises(RuntimeError, match="inside"):
        with swapped_parameters(model, {"3.weight": torch.zeros(3, 36)}):
            with swapped_parameters(model, {"3.weight": torch.ones(3, 36), "0.weight": torch.ones(4, 2, 3, 3)}):
                assert bool((model[3].weight == 1).all())
            assert bool((model[3].weight == 0).all()) and torch.equal(model[0].weight, before["0.weight"][2])
            raise RuntimeError("inside")
    assert_restored(model, before)


def test_swap_keeps_the_parameters_layout():
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    value = torch.randn(4, 3, 3, 3)
    with swapped_parameters(conv, {"weight": value}):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(conv.weight, value)


@pytest.mark.parametrize(
    "values, error, match",
    [
        ({"3.wieght": torch.zeros(3, 36)}, ValueError, "no parameter named '3.wieght'; did you mean '3.weight'"),
        ({"3": torch.zeros(3, 36)}, ValueError, "'3' is a module, name its parameter: '3.weight', '3.bias'"),
        ({"3.weight": torch.zeros(36, 3)}, ValueError, r"has shape \(36, 3\), but the parameter has \(3, 36\)"),
        ({"3.weight": torch.zeros(1, 36)}, ValueError, "has shape"),  # no broadcasting
        ({"3.weight": [[0.0] * 36] * 3}, TypeError, "must be a Tensor, got list"),
        ({"3.weight": torch.zeros(3, 36, dtype=torch.complex64)}, ValueError, "is complex"),
        ({3: torch.zeros(3, 36)}, TypeError, "keyed by parameter names"),
        ([("3.weight", torch.zeros(3, 36))], TypeError, "must be a mapping"),
    ],
)
def test_swap_bad_values_leave_the_model_alone(values, error, match):
    model = make_model()
    before = state(model)
    good = {"0.bias": torch.zeros(4)}  # checked first, and still not swapped
    with pytest.raises(error, match=match):
        with swapped_parameters(model, {**good, **values} if isinstance(values, dict) else values):
            pass
    assert_restored(model, before)


def test_swap_refuses_two_names_of_one_tied_parameter():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match="'0.weight' and '1.weight' name the same"):
        with swapped_parameters(model, {"0.weight": torch.zeros(3, 3), "1.weight": torch.ones(3, 3)}):
            pass
    with swapped_parameters(model, {"1.weight": torch.zeros(3, 3)}):  # an alias alone is fine
        assert bool((model[0].weight == 0).all())


def test_edits_of_a_bias_that_is_also_a_chosen_unit_compose():
    model = make_model()
    values = edited_values(model, [("3.weight", 1), ("3.bias", 1)], lambda v: v + 1.0, bias=True)
    assert set(values) == {"3.weight", "3.bias"}
    expected = model[3].bias.detach().clone()
    expected[1] += 2.0  # once as the bias's own unit 1, once as the bias entry of the weight's unit 1
    assert torch.equal(values["3.bias"], expected)
    before = state(model)
    with turn_off(model, [("3.weight", 1)], bias=True):
        assert model[3].bias[1] == 0 and bool((model[3].weight[1] == 0).all())
    assert_restored(model, before)
