"""Issue 16, items 11 and 12: interventions on channels_last and non-contiguous weights, and
messages that name the argument and what it allows (tied and wrapped parameter names, targets,
internal_batch_size, unit indices, the fine-tuning test's arguments).

After every call that raises, the model is checked to be exactly as found
(:func:`helpers.assert_unchanged`); after every intervention, also its strides.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from captum_paramsal import ParameterSaliency
from captum_paramsal.analysis import finetune_salient, neighbour_correction, pruning_curves
from captum_paramsal.interventions import boost, edited_values, perturb, swapped_parameters, turn_off
from captum_paramsal.losses import MeanSquaredError
from captum_paramsal.saliency_profile import UnitScore
from captum_paramsal.units import resolve_entries, resolve_units

from helpers import TiedLinears, assert_unchanged, snapshot

# -- models whose weights are not laid out row-major ---------------------------------------------


def conv_model(seed: int = 0) -> nn.Module:
    """Two convolutions (more than one input channel, so channels_last really reorders them), a
    transposed convolution and a Linear layer, float64, on ``(B, 3, 8, 8)``, four classes."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2), nn.ReLU(),
        nn.ConvTranspose2d(5, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4),
    ).double()


def conv_data(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values, stored with the first two axes swapped (dense, not contiguous)."""
    return t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() >= 2 else t


def _reversed(t: torch.Tensor) -> torch.Tensor:
    """The same values, stored with every axis reversed (dense, not contiguous)."""
    axes = list(reversed(range(t.dim())))
    return t.permute(*axes).contiguous().permute(*axes)


def _sliced(t: torch.Tensor) -> torch.Tensor:
    """The same values, every other entry of a larger tensor (strides with gaps)."""
    big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)
    big[..., ::2] = t
    return big[..., ::2]


LAYOUTS = {
    "channels_last": lambda model: model.to(memory_format=torch.channels_last),
    "transposed": lambda model: _relaid(model, _transposed),
    "reversed": lambda model: _relaid(model, _reversed),
    "sliced": lambda model: _relaid(model, _sliced),
}


def _relaid(model: nn.Module, relay) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.data = relay(p.data)
    return model


def pair(layout: str):
    """``(contiguous reference, the same model laid out as ``layout``)``: equal values."""
    reference = conv_model()
    model = LAYOUTS[layout](copy.deepcopy(reference))
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a, b)
    if layout != "sliced":
        assert not all(p.is_contiguous() for p in model.parameters() if p.dim() > 1)
    return reference, model


def strides(model: nn.Module):
    return {name: (p.stride(), p.storage_offset(), p.data_ptr()) for name, p in model.named_parameters()}


UNITS = [("0.weight", 1), ("2.weight", 3), ("4.weight", 2), ("7.weight", 0)]
INTERVENTIONS = {
    "turn_off": lambda model: turn_off(model, UNITS, bias=True),
    "boost": lambda model: boost(model, UNITS, factor=3.0, bias=True),
    "perturb_gaussian": lambda model: perturb(model, UNITS, scale=0.5, seed=0),
    "perturb_proportional": lambda model: perturb(model, UNITS, noise="proportional", scale=0.5, seed=0),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("intervention", sorted(INTERVENTIONS))
def test_interventions_on_relaid_weights_edit_as_on_a_contiguous_model_and_restore_every_bit(layout, intervention):
    reference, model = pair(layout)
    x, _ = conv_data()
    make = INTERVENTIONS[intervention]
    with make(reference):
        want = {name: p.detach().clone() for name, p in reference.named_parameters()}
        want_out = reference(x)
    before, laid = snapshot(model), strides(model)
    with make(model):
        inside = dict(model.named_parameters())
        for name, value in want.items():  # the same edit, entry for entry, bit for bit
            assert torch.equal(inside[name].detach(), value), name
        if layout != "sliced":  # a dense layout is kept inside too (channels_last stays so)
            for name, p in inside.items():
                assert p.stride() == laid[name][0], name
        assert torch.allclose(model(x), want_out, rtol=0, atol=1e-12)
    assert_unchanged(model, before)  # values bit for bit, same storage, version, grad, hooks
    assert strides(model) == laid  # strides, offset and storage as found


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_edited_values_of_relaid_weights_are_those_of_the_contiguous_model(layout):
    reference, model = pair(layout)
    before = snapshot(model)
    edit = lambda v: v * 2 + 1  # noqa: E731
    want = edited_values(reference, UNITS, edit, bias=True)
    got = edited_values(model, UNITS, edit, bias=True)
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert_unchanged(model, before)


def test_a_weight_restored_after_an_error_in_the_block_keeps_its_channels_last_strides():
    _, model = pair("channels_last")
    before, laid = snapshot(model), strides(model)
    with pytest.raises(RuntimeError, match="inside"):
        with turn_off(model, UNITS):
            assert model[2].weight.is_contiguous(memory_format=torch.channels_last)
            raise RuntimeError("inside")
    assert_unchanged(model, before)
    assert strides(model) == laid
    assert model[2].weight.is_contiguous(memory_format=torch.channels_last)


def test_a_channels_last_3d_conv_is_turned_off_and_restored():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv3d(2, 3, 2), nn.Flatten(), nn.Linear(3 * 27, 2)).double()
    model = copy.deepcopy(reference).to(memory_format=torch.channels_last_3d)
    assert not model[0].weight.is_contiguous()
    x = torch.randn(2, 2, 4, 4, 4, dtype=torch.float64)
    with turn_off(reference, [("0.weight", 1)], bias=True):
        want = reference(x)
    before, laid = snapshot(model), strides(model)
    with turn_off(model, [("0.weight", 1)], bias=True):
        assert bool((model[0].weight[1] == 0).all()) and model[0].bias[1] == 0
        assert torch.count_nonzero(model[0].weight[[0, 2]]) == model[0].weight[[0, 2]].numel()
        assert torch.allclose(model(x), want, rtol=0, atol=1e-12)
    assert_unchanged(model, before)
    assert strides(model) == laid


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_finetune_salient_on_relaid_weights(layout):
    reference, model = pair(layout)
    x, _ = conv_data()
    with torch.no_grad():
        y = int(model(x[:1]).argmin(1))  # a label the model gets wrong
    before, laid = snapshot(model), strides(model)
    want = finetune_salient(reference, ParameterSaliency(reference), x[:1], y, k=4, lr=0.5, max_steps=5)
    got = finetune_salient(model, ParameterSaliency(model), x[:1], y, k=4, lr=0.5, max_steps=5)
    assert_unchanged(model, before)
    assert strides(model) == laid
    assert got.units == want.units and got.steps == want.steps and got.corrected == want.corrected
    assert set(got.delta) == set(want.delta)
    for name in want.delta:
        assert torch.allclose(got.delta[name], want.delta[name], rtol=0, atol=1e-10), name
    with got.applied(model):
        if layout == "channels_last":
            assert model[2].weight.is_contiguous(memory_format=torch.channels_last)
        assert strides(model) != laid  # other storage inside
    assert_unchanged(model, before)
    assert strides(model) == laid


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_pruning_curves_on_relaid_weights(layout):
    reference, model = pair(layout)
    x, y = conv_data(8)
    before, laid = snapshot(model), strides(model)
    want = pruning_curves(reference, ParameterSaliency(reference), x, y, ks=(1, 3))
    got = pruning_curves(model, ParameterSaliency(model), x, y, ks=(1, 3))
    assert_unchanged(model, before)
    assert strides(model) == laid
    assert len(got.records) == len(want.records) > 0
    for a, b in zip(got.records, want.records):
        assert (a["sample"], a["k"], a["mode"], a["corrected"]) == (b["sample"], b["k"], b["mode"], b["corrected"])
        assert a["delta_true_prob"] == pytest.approx(b["delta_true_prob"], abs=1e-10)
        assert a["delta_wrong_prob"] == pytest.approx(b["delta_wrong_prob"], abs=1e-10)


# -- names: a tied weight's alias, a wrapped model's parameter without the wrapper's prefix ------


class Wrapper(nn.Module):
    """A thin user wrapper (one child, nothing of its own): its parameters' names gain "module."."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner

    def forward(self, x):
        return self.module(x)


def test_turn_off_takes_a_tied_alias_as_parameter_saliency_does():
    model = TiedLinears()
    ps = ParameterSaliency(model, params=["b.weight"])  # the alias is accepted here ...
    assert ps.layout.names == ("a.weight",)
    before = snapshot(model)
    with turn_off(model, [("b.weight", 1)]):  # ... and here: the same weight, one row
        assert bool((model.a.weight[1] == 0).all()) and model.b.weight is model.a.weight
        assert torch.count_nonzero(model.a.weight[[0, 2]]) == 6
    assert_unchanged(model, before)
    assert resolve_units(model, [("b.weight", 1)]) == {"a.weight": [1]}


def test_a_wrapped_models_parameters_are_named_as_params_takes_them():
    inner = TiedLinears()
    model = Wrapper(inner)
    ps = ParameterSaliency(model, params=["b.weight"])  # without the wrapper's prefix
    assert ps.layout.names == ("module.a.weight",)
    before = snapshot(model)
    for name in ("b.weight", "a.weight", "module.b.weight", "module.a.weight"):
        assert resolve_units(model, [(name, 2)]) == {"module.a.weight": [2]}, name
        with turn_off(model, [(name, 2)], bias=True):
            assert bool((inner.a.weight[2] == 0).all()) and inner.a.bias[2] == 0, name
        assert_unchanged(model, before)
        with boost(model, [(name, 2)], factor=2.0):
            assert torch.equal(inner.a.weight[2], 2 * before.values["module.a.weight"][2])
        assert_unchanged(model, before)
    with swapped_parameters(model, {"a.bias": torch.zeros(3, dtype=inner.a.bias.dtype)}):
        assert bool((inner.a.bias == 0).all())
    assert_unchanged(model, before)
    x = torch.randn(1, 3)
    result = finetune_salient(model, ps, x, 0, units=[("b.weight", 0)], lr=0.1, max_steps=2)
    assert set(result.delta) == {"module.a.weight"}
    assert_unchanged(model, before)
    # a name the model really lacks still says so, with a hint
    with pytest.raises(ValueError, match=r"no parameter named 'c.weight'.*did you mean"):
        with turn_off(model, [("c.weight", 0)]):
            pass
    assert_unchanged(model, before)


# -- targets ------------------------------------------------------------------------------------


def small_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_integer_targets_of_any_dtype_are_class_labels(dtype):
    model = small_classifier()
    ps = ParameterSaliency(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0])
    want = ps.attribute(x, target=labels)
    before = snapshot(model)
    assert torch.equal(ps.attribute(x, target=labels.to(dtype)), want)
    chunked = ps.attribute(x, target=labels, internal_batch_size=2)
    assert torch.equal(ps.attribute(x, target=labels.to(dtype), internal_batch_size=2), chunked)
    assert torch.equal(ps.attribute(x, target=torch.tensor(2, dtype=dtype)), ps.attribute(x, target=2))
    assert_unchanged(model, before)


def test_numpy_integer_targets_are_class_labels():
    model = small_classifier()
    ps = ParameterSaliency(model)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(ps.attribute(x, target=np.int64(2)), ps.attribute(x, target=2))


@pytest.mark.parametrize("shape", [(5, 1), (5, 2), (5, 1, 1)])
def test_a_multi_dimensional_target_for_the_default_class_loss_is_refused(shape):
    model = small_classifier()
    ps = ParameterSaliency(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    before = snapshot(model)
    target = torch.zeros(shape, dtype=torch.long)
    match = rf"target has shape {re.escape(str(shape))}.*one class label per sample, shape \(5,\)"
    with pytest.raises(ValueError, match=match):
        ps.attribute(x, target=target)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"target has shape .* shape \(5,\)"):
        ps.profile(x, target=target)
    assert_unchanged(model, before)


def test_a_float_target_for_the_default_class_loss_names_target():
    model = small_classifier()
    ps = ParameterSaliency(model)
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"target: class labels must be integers .*float64"):
        ps.attribute(torch.randn(2, 4, dtype=torch.float64), target=torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert_unchanged(model, before)


def test_a_custom_loss_keeps_its_multi_dimensional_and_float_targets():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    target = torch.randn(5, 1, dtype=torch.float64)  # (B, 1) regression targets: fine here
    ps = ParameterSaliency(model, loss_fn=MeanSquaredError())
    sal = ps.attribute(x, target=target)
    assert sal.shape == (5, ps.layout.num_columns) and bool(torch.isfinite(sal).all())
    # and the loss gets the target as given, dtype and shape
    seen = []

    def loss(outputs, t):
        seen.append((t.dtype, tuple(t.shape)))
        return ((outputs - t.to(outputs.dtype)) ** 2).sum(1)

    ParameterSaliency(model, loss_fn=loss).attribute(x, target=torch.zeros(5, 1, dtype=torch.int32))
    assert set(seen) == {(torch.int32, (5, 1))}


# -- internal_batch_size ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", [True, False, 0, -1, 2.0, "2", torch.tensor(2), np.bool_(True)])
def test_internal_batch_size_must_be_a_positive_int(bad):
    model = small_classifier()
    ps = ParameterSaliency(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"internal_batch_size must be a positive int or None, got "):
        ps.attribute(torch.randn(3, 4, dtype=torch.float64), target=0, internal_batch_size=bad)
    assert_unchanged(model, before)


def test_internal_batch_size_true_is_named_as_given():
    ps = ParameterSaliency(small_classifier())
    with pytest.raises(ValueError, match=r"^internal_batch_size must be a positive int or None, got True$"):
        ps.attribute(torch.randn(3, 4, dtype=torch.float64), target=0, internal_batch_size=True)


def test_a_numpy_internal_batch_size_is_an_int():
    ps = ParameterSaliency(small_classifier())
    x = torch.randn(5, 4, dtype=torch.float64)
    want = ps.attribute(x, target=1, internal_batch_size=2)
    assert torch.equal(ps.attribute(x, target=1, internal_batch_size=np.int64(2)), want)


# -- unit indices ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "unit, match",
    [
        (("2.weight", 2.0), r"unit \('2.weight', 2.0\) in units: the unit index must be an int, got float 2.0"),
        (("2.weight", 2.5), r"the unit index must be an int, got float 2.5"),
        (("2.weight", np.float64(2.0)), r"the unit index must be an int, got float64"),
        (("2.weight", True), r"the unit index must be an int, got bool True"),
        (("2.weight", np.bool_(True)), r"the unit index must be an int, got bool"),
        (("2.weight", torch.tensor(2.0)), r"the unit index must be an int, got Tensor"),
        (UnitScore("2.weight", 2.5, 1.0, 0), r"UnitScore\('2.weight', unit=2.5\) in units: the unit index must be"),
        (2.0, r"a unit is a layout column \(int\).*got float 2.0 \(a layout column is an int"),
        (True, r"a unit is a layout column \(int\).*got bool True"),
    ],
)
def test_a_fractional_or_boolean_unit_index_is_refused_naming_units(unit, match):
    model = small_classifier()
    ps = ParameterSaliency(model)
    x = torch.randn(1, 4, dtype=torch.float64)
    before = snapshot(model)
    for call in (
        lambda: turn_off(model, [unit]).__enter__(),
        lambda: boost(model, [unit], factor=2.0).__enter__(),
        lambda: perturb(model, [unit], seed=0).__enter__(),
        lambda: resolve_entries(model, [unit]),
        lambda: finetune_salient(model, ps, x, 0, units=[unit], max_steps=1),
    ):
        with pytest.raises(TypeError, match=match):
            call()
        assert_unchanged(model, before)


@pytest.mark.parametrize("index", [2, np.int64(2), np.int32(2), torch.tensor(2), torch.tensor(2, dtype=torch.int16)])
def test_integer_unit_indices_of_any_kind_are_fine(index):
    model = small_classifier()
    ps = ParameterSaliency(model)
    before = snapshot(model)
    with turn_off(model, [("2.weight", index)]):
        assert bool((model[2].weight[2] == 0).all())
    assert_unchanged(model, before)
    result = finetune_salient(model, ps, torch.randn(1, 4, dtype=torch.float64), 0, units=[("2.weight", index)],
                              max_steps=1)
    assert result.units == [("2.weight", 2)] and type(result.units[0][1]) is int
    result = finetune_salient(model, ps, torch.randn(1, 4, dtype=torch.float64), 0,
                              units=[UnitScore("2.weight", index, 0.0, 0)], max_steps=1)
    assert result.units == [("2.weight", 2)]
    assert_unchanged(model, before)


# -- the fine-tuning test's arguments -----------------------------------------------------------


def _finetune_setup():
    model = small_classifier()
    return model, ParameterSaliency(model), torch.randn(1, 4, dtype=torch.float64), snapshot(model)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"k": 0}, ValueError, r"^k must be a positive int, got 0$"),
        ({"k": True}, ValueError, r"^k must be a positive int, got True$"),
        ({"k": 2.0}, ValueError, r"^k must be a positive int, got 2.0$"),
        ({"units": []}, ValueError, r"units is empty: give at least one unit to fine-tune"),
        ({"units": torch.tensor([], dtype=torch.long)}, ValueError, r"units is empty"),
        ({"max_steps": True}, ValueError, r"max_steps a positive int, got .*max_steps=True"),
        ({"lr": True}, ValueError, r"lr must be > 0 .*got lr=True"),
        ({"lr": "0.1"}, ValueError, r"lr must be > 0 .*got lr='0.1'"),
        ({"lr": float("inf")}, ValueError, r"lr must be > 0 \(a finite number\)"),
    ],
)
def test_finetune_salient_messages_name_the_argument(kwargs, error, match):
    model, ps, x, before = _finetune_setup()
    with pytest.raises(error, match=match) as raised:
        finetune_salient(model, ps, x, 0, **kwargs)
    assert "params=" not in str(raised.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "y, error, match",
    [
        (1.0, TypeError, r"y must be an integer class label \(any integer dtype\), got dtype torch.float32"),
        (True, TypeError, r"y must be an integer class label .*torch.bool"),
        ("cat", TypeError, r"y must be an int class label or a one-element integer tensor, got 'cat'"),
        (torch.tensor([1.0]), TypeError, r"y must be an integer class label \(any integer dtype\), got dtype"),
        (torch.tensor(True), TypeError, r"y must be an integer class label"),
        (7, ValueError, r"y=7 is out of range for a model with 3 classes \(0..2\)"),
        (-1, ValueError, r"y=-1 is out of range"),
    ],
)
def test_finetune_salient_refuses_a_label_that_is_no_class(y, error, match):
    model, ps, x, before = _finetune_setup()
    with pytest.raises(error, match=match):
        finetune_salient(model, ps, x, y, units=[("2.weight", 0)])
    assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_finetune_salient_takes_a_label_of_any_integer_dtype(dtype):
    model, ps, x, before = _finetune_setup()
    want = finetune_salient(model, ps, x, 1, k=2, lr=0.5, max_steps=3)
    got = finetune_salient(model, ps, x, torch.tensor([1], dtype=dtype), k=2, lr=0.5, max_steps=3)
    assert got.units == want.units and got.steps == want.steps
    for name in want.delta:
        assert torch.equal(got.delta[name], want.delta[name])
    assert_unchanged(model, before)


def test_neighbour_correction_checks_k_and_max_samples_first():
    model = small_classifier()
    ps = ParameterSaliency(model)
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    before = snapshot(model)
    for kwargs, match in [
        ({"k": 0}, r"^k must be a positive int, got 0$"),
        ({"k": True}, r"^k must be a positive int, got True$"),
        ({"k": 10_000}, r"k=10000 is larger than the number of units"),
        ({"m": True}, r"^m must be a positive int, got True$"),
        ({"max_samples": 0}, r"max_samples must be a positive int or None, got 0"),
        ({"max_samples": True}, r"max_samples must be a positive int or None, got True"),
    ]:
        with pytest.raises(ValueError, match=match):
            neighbour_correction(model, ps, x, y, **{"m": 1, "k": 2, **kwargs})
        assert_unchanged(model, before)


def test_neighbour_correction_takes_int32_labels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(30, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    ps = ParameterSaliency(model)
    want = neighbour_correction(model, ps, x, y, k=3, m=2, lr=0.05, max_steps=20, max_samples=2)
    got = neighbour_correction(model, ps, x, y.to(torch.int32), k=3, m=2, lr=0.05, max_steps=20, max_samples=2)
    assert got.records == want.records


def test_pruning_curves_take_int32_labels_and_refuse_float_ones():
    model = small_classifier()
    ps = ParameterSaliency(model)
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    before = snapshot(model)
    want = pruning_curves(model, ps, x, y, ks=(1, 2))
    got = pruning_curves(model, ps, x, y.to(torch.int32), ks=(1, 2))
    assert got.records == want.records
    with pytest.raises(TypeError, match=r"labels must be integer class labels \(any integer dtype\), got dtype"):
        pruning_curves(model, ps, x, y.double(), ks=(1,))
    assert_unchanged(model, before)
