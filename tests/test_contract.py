"""The Captum contract (SPEC §5) and the layout (SPEC §1): model state, no_grad, NoiseTunnel,
sensitivity_max, tensor/tuple in and out, the column layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from captum.attr import GradientAttribution, NoiseTunnel
from captum.metrics import sensitivity_max

from captum_paramsal import ParameterSaliency

from helpers import assert_unchanged, snapshot
from naive import default_param_names, naive_unit_saliency, rel_err


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6 * 3 * 3, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.conv1(x)))
        h = self.drop(F.relu(self.conv2(h)).flatten(1))
        return self.head(self.norm(torch.tanh(self.fc(h))))


PARAMS = ["conv1.weight", "bn.weight", "conv2.weight", "fc.weight", "fc.bias", "norm.weight", "head.weight"]


def make_net() -> nn.Module:
    torch.manual_seed(0)
    model = Net().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def data(batch: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 7, 7, generator=g, dtype=torch.float64), torch.randint(0, 4, (batch,), generator=g)


def prepared_net(mixed_modes: bool, backward_hook: bool = False) -> nn.Module:
    """A partly frozen net with a pre-existing .grad, user hooks, train mode (optionally with
    one submodule in eval, and a user full backward hook)."""
    model = make_net().train()
    if mixed_modes:
        model.bn.eval()
    model.conv1.weight.requires_grad_(False)
    model.norm.weight.requires_grad_(False)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.25)
    model.conv2.register_forward_hook(lambda m, i, o: None)
    model.conv2.register_forward_pre_hook(lambda m, i: None)
    model.fc.register_forward_hook(lambda m, args, kwargs, out: None, with_kwargs=True)
    model.head.register_forward_pre_hook(lambda m, args, kwargs: None, with_kwargs=True)
    if backward_hook:
        model.fc.register_full_backward_hook(lambda m, gi, go: None)
        model.conv2.register_full_backward_pre_hook(lambda m, go: None)
    model.norm.register_forward_hook(lambda m, i, o: None)
    return model


@pytest.mark.parametrize("mixed_modes", [False, True], ids=["train", "train_with_eval_submodule"])
def test_model_unchanged_after_call(mixed_modes):
    model = prepared_net(mixed_modes)
    before = snapshot(model)
    x, y = data()
    sal = ParameterSaliency(model, params=PARAMS).attribute(x, target=y)
    assert_unchanged(model, before)
    # also exact, frozen parameters and user hooks notwithstanding (eval mode inside)
    assert rel_err(sal, naive_unit_saliency(model, (x,), y, PARAMS)) < 1e-5
    assert_unchanged(model, before)


def test_model_unchanged_default_params_and_internal_batches():
    model = prepared_net(True)
    before = snapshot(model)
    x, y = data(5)
    ParameterSaliency(model).attribute(x, target=y, internal_batch_size=2)
    ParameterSaliency(model, params=PARAMS, reduction="mean").attribute(x)
    assert_unchanged(model, before)


@pytest.mark.parametrize("mixed_modes", [False, True], ids=["train", "train_with_eval_submodule"])
def test_model_with_user_backward_hooks_rule_params(mixed_modes):
    """User full backward (pre-)hooks, parameters that the per-layer rules cover."""
    model = prepared_net(mixed_modes, backward_hook=True)
    before = snapshot(model)
    x, y = data()
    rule_params = ["conv1.weight", "conv2.weight", "fc.weight", "fc.bias", "head.weight"]
    sal = ParameterSaliency(model, params=rule_params).attribute(x, target=y)
    assert_unchanged(model, before)
    assert rel_err(sal, naive_unit_saliency(model, (x,), y, rule_params)) < 1e-5
    with pytest.raises(RuntimeError, match="boom from loss_fn"):
        ParameterSaliency(model, params=rule_params, loss_fn=raising_loss).attribute(x, target=y)
    assert_unchanged(model, before)


def test_model_with_user_backward_hooks_fallback_params():
    """A user's full backward hook must not stop the fallback (BatchNorm, LayerNorm)."""
    model = prepared_net(False, backward_hook=True)
    before = snapshot(model)
    x, y = data()
    try:
        sal = ParameterSaliency(model, params=PARAMS).attribute(x, target=y)
    finally:
        assert_unchanged(model, before)
    assert rel_err(sal, naive_unit_saliency(model, (x,), y, PARAMS)) < 1e-5


def test_frozen_parameters_give_the_same_saliency():
    x, y = data()
    unfrozen = ParameterSaliency(make_net(), params=PARAMS).attribute(x, target=y)
    model = make_net()
    for p in model.parameters():
        p.requires_grad_(False)
    before = snapshot(model)
    frozen = ParameterSaliency(model, params=PARAMS).attribute(x, target=y)
    assert_unchanged(model, before)
    assert torch.allclose(frozen, unfrozen, rtol=1e-12, atol=0)


def raising_loss(outputs, target):
    raise RuntimeError("boom from loss_fn")


@pytest.mark.parametrize("mixed_modes", [False, True], ids=["train", "train_with_eval_submodule"])
def test_model_unchanged_after_error(mixed_modes):
    model = prepared_net(mixed_modes)
    before = snapshot(model)
    x, y = data()
    with pytest.raises(RuntimeError, match="boom from loss_fn"):
        ParameterSaliency(model, params=PARAMS, loss_fn=raising_loss).attribute(x, target=y)
    assert_unchanged(model, before)
    with pytest.raises(RuntimeError, match="boom from loss_fn"):  # fallback parameters only
        ParameterSaliency(model, params=["bn.weight", "norm.weight"], loss_fn=raising_loss).attribute(x, target=y)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="out of range"):
        ParameterSaliency(model, params=PARAMS).attribute(x, target=torch.tensor([0, 9, 1]))
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="out of range"):
        ParameterSaliency(model, params=["bn.weight"]).attribute(x, target=torch.tensor([0, 9, 1]))
    assert_unchanged(model, before)


def test_no_grad_gives_the_same_result():
    model = make_net()
    x, y = data()
    ps = ParameterSaliency(model, params=PARAMS)
    plain = ps.attribute(x, target=y)
    with torch.no_grad():
        quiet = ps.attribute(x, target=y)
    assert torch.allclose(quiet, plain, rtol=1e-12, atol=0)
    assert rel_err(quiet, naive_unit_saliency(model, (x,), y, PARAMS)) < 1e-5


def test_noise_tunnel():
    model = make_net()
    x, y = data()
    ps = ParameterSaliency(model, params=PARAMS)
    sal = NoiseTunnel(ps).attribute(x, nt_type="smoothgrad", nt_samples=3, stdevs=0.1, target=y)
    assert isinstance(sal, torch.Tensor)
    assert sal.shape == (3, ps.layout.num_columns)
    assert torch.isfinite(sal).all()


def test_sensitivity_max():
    model = make_net()
    x, y = data()
    ps = ParameterSaliency(model, params=PARAMS)
    sens = sensitivity_max(ps.attribute, x, target=y, n_perturb_samples=2)
    assert sens.shape == (3,)
    assert torch.isfinite(sens).all()


def test_tensor_in_tensor_out_tuple_in_tuple_out():
    model = make_net()
    x, y = data()
    ps = ParameterSaliency(model)
    out = ps.attribute(x, target=y)
    assert isinstance(out, torch.Tensor) and out.shape == (3, ps.layout.num_columns)
    out_tuple = ps.attribute((x,), target=y)
    assert isinstance(out_tuple, tuple) and len(out_tuple) == 1
    assert torch.equal(out_tuple[0], out)


def test_is_a_captum_gradient_attribution():
    ps = ParameterSaliency(make_net())
    assert isinstance(ps, GradientAttribution)
    assert hasattr(ParameterSaliency.attribute, "__wrapped__")
    assert hasattr(ps.attribute, "__wrapped__")
    assert ps.has_convergence_delta() is False


# ---------------------------------------------------------------------------------------
# layout


def test_layout_columns_follow_named_parameters():
    model = make_net()
    ps = ParameterSaliency(model, params=list(reversed(PARAMS)))  # order given does not matter
    layout = ps.layout
    named = dict(model.named_parameters())
    assert list(layout.names) == [n for n in named if n in PARAMS]
    assert len(layout) == len(PARAMS)
    start = 0
    for entry in layout:
        assert entry.shape == tuple(named[entry.name].shape)
        assert entry.num_units == named[entry.name].shape[0]
        assert entry.slice == slice(start, start + entry.num_units)
        assert layout[entry.name] is entry or layout[entry.name] == entry
        start += entry.num_units
    assert layout.num_columns == start
    x, y = data()
    assert ps.attribute(x, target=y).shape[1] == layout.num_columns


def test_layout_default_selection():
    model = make_net()
    layout = ParameterSaliency(model).layout
    assert list(layout.names) == default_param_names(model)
    assert list(layout.names) == ["conv1.weight", "conv2.weight", "fc.weight", "head.weight"]
    assert [e.num_units for e in layout] == [4, 6, 5, 4]
    assert layout.num_columns == 19


def test_layout_slice_selects_the_parameter_profile():
    model = make_net()
    x, y = data()
    ps = ParameterSaliency(model, params=PARAMS)
    sal = ps.attribute(x, target=y)
    for name in PARAMS:
        alone = ParameterSaliency(model, params=[name]).attribute(x, target=y)
        entry = ps.layout[name]
        assert sal[:, entry.slice].shape == (3, entry.num_units)
        assert torch.allclose(sal[:, entry.slice], alone, rtol=1e-10, atol=0), name


def test_layout_unit_of_and_column_round_trip():
    layout = ParameterSaliency(make_net(), params=PARAMS).layout
    for column in range(layout.num_columns):
        name, unit = layout.unit_of(column)
        assert layout.column(name, unit) == column
        assert layout[name].slice.start <= column < layout[name].slice.stop
    for entry in layout:
        for unit in range(entry.num_units):
            assert layout.unit_of(layout.column(entry.name, unit)) == (entry.name, unit)
    with pytest.raises(IndexError):
        layout.unit_of(layout.num_columns)
    with pytest.raises(IndexError):
        layout.unit_of(-1)
    with pytest.raises(IndexError):
        layout.column("fc.weight", 5)
    with pytest.raises(KeyError):
        layout["nope.weight"]
