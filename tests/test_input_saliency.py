"""ParameterGuidedInputSaliency (SPEC §3) against a plain per-sample double-backprop loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from captum.attr import GradientAttribution, NoiseTunnel
from captum.attr import visualization as viz
from captum.metrics import infidelity, sensitivity_max

from captum_paramsal import ParameterGuidedInputSaliency, ParameterSaliency
from captum_paramsal.visualization import paper_heatmap

from helpers import assert_unchanged, seeded_resnet18, snapshot
from naive import naive_boosting, rel_err


def conv1d_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 3, 3, stride=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(3 * 4, 5),
    ).double()


def resnet18():
    return seeded_resnet18(num_classes=5)


@pytest.mark.parametrize("make_model, shape", [
    (conv1d_model, (3, 2, 10)),
    pytest.param(resnet18, (2, 3, 32, 32), marks=pytest.mark.slow),  # double backprop per sample: seconds
])
@pytest.mark.parametrize("with_stats", [False, True])
def test_matches_naive_double_backprop(make_model, shape, with_stats):
    model = make_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (shape[0],), generator=g)
    ps = ParameterSaliency(model)
    if with_stats:
        reference = [(torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 5, (shape[0],)))
                     for _ in range(3)]
        ps.stats = ps.fit_stats(reference, progress=False)
    pgis = ParameterGuidedInputSaliency.from_parameter_saliency(ps, k=3)
    ours = pgis.attribute(x, target=y)
    assert ours.shape == x.shape
    expected = naive_boosting(model, x, y, list(ps.layout.names), k=3, stats=ps.stats)
    assert rel_err(ours, expected) < 1e-4
    # the constructor path gives the same thing
    direct = ParameterGuidedInputSaliency(model, stats=ps.stats, k=3).attribute(x, target=y)
    assert torch.allclose(direct, ours, rtol=1e-10, atol=0)


class _Twice(nn.Module):
    """One convolution called twice: the rules sum its per-sample gradients."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(torch.tanh(self.conv(x)))


# Geometries of every path of the second-order pass: many positions (the per-sample kernel
# adjoint by grouped convolution), few positions (the im2col factors), 1x1 (patches as view),
# padding modes other than zeros, transposed convolutions (autograd through the rule).
SECOND_ORDER_CASES = [
    ("conv1d_many_positions", lambda: nn.Conv1d(2, 4, 5, stride=2, padding=3, dilation=2, groups=2), (2, 150)),
    ("conv1d_same_circular", lambda: nn.Conv1d(2, 4, 4, padding="same", padding_mode="circular"), (2, 80)),
    ("conv2d_many_positions_grouped", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (4, 17, 17)),
    ("conv2d_depthwise_dilated", lambda: nn.Conv2d(3, 6, 3, dilation=2, groups=3, padding=2), (3, 9, 9)),
    ("conv2d_reflect_few_positions", lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 5, 5)),
    ("conv2d_1x1_strided", lambda: nn.Conv2d(3, 4, 1, stride=2), (3, 9, 9)),
    ("conv3d_many_positions", lambda: nn.Conv3d(2, 3, 3, padding=1), (2, 5, 5, 5)),
    ("conv_transpose2d", lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), (3, 5, 5)),
    ("conv2d_used_twice", lambda: _Twice(nn.Conv2d(3, 3, 3, padding=1)), (3, 9, 9)),
]


@pytest.mark.parametrize("reduction", ["mean_abs", "mean"])
@pytest.mark.parametrize("name, make_layer, shape", SECOND_ORDER_CASES, ids=[c[0] for c in SECOND_ORDER_CASES])
def test_conv_geometries_match_naive(name, make_layer, shape, reduction):
    torch.manual_seed(0)
    layer = make_layer()
    with torch.no_grad():
        width = layer(torch.zeros(1, *shape)).numel()
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(width, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (3,), generator=g)
    pgis = ParameterGuidedInputSaliency(model, k=3, reduction=reduction)
    expected = naive_boosting(model, x, y, list(pgis.layout.names), k=3, reduction=reduction)
    assert rel_err(pgis.attribute(x, target=y), expected) < 1e-4
    assert rel_err(pgis.attribute(x, target=y, internal_batch_size=2), expected) < 1e-4


def test_fallback_parameters_and_internal_batch_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    model = model.double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0])
    names = ["0.weight", "1.weight", "1.bias", "4.weight"]  # BatchNorm goes through torch.func
    pgis = ParameterGuidedInputSaliency(model, params=names, k=2)
    expected = naive_boosting(model, x, y, names, k=2)
    assert rel_err(pgis.attribute(x, target=y), expected) < 1e-4
    assert rel_err(pgis.attribute(x, target=y, internal_batch_size=2), expected) < 1e-4


def test_units_override_and_random_baseline():
    model = conv1d_model()
    x = torch.randn(3, 2, 10, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    pgis = ParameterGuidedInputSaliency(model, k=2)
    layout = pgis.layout
    names = list(layout.names)
    per_sample = [[0, 5], [layout.column("2.weight", 1)], [7, 8, 9]]
    expected = naive_boosting(model, x, y, names, units=per_sample)
    assert rel_err(pgis.attribute(x, target=y, units=per_sample), expected) < 1e-4
    shared = pgis.attribute(x, target=y, units=[("0.weight", 3), ("5.weight", 4)])
    cols = [layout.column("0.weight", 3), layout.column("5.weight", 4)]
    assert rel_err(shared, naive_boosting(model, x, y, names, units=[cols] * 3)) < 1e-4
    first = pgis.attribute(x, target=y, random_units=True, seed=7)
    again = pgis.attribute(x, target=y, random_units=True, seed=7)
    other = pgis.attribute(x, target=y, random_units=True, seed=8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.allclose(first, pgis.attribute(x, target=y))


def test_captum_integrations(tmp_path):
    model = conv1d_model().float()
    x = torch.randn(4, 2, 10)
    y = torch.tensor([0, 1, 2, 3])
    pgis = ParameterGuidedInputSaliency(model, k=3)
    assert isinstance(pgis, GradientAttribution) and hasattr(pgis.attribute, "__wrapped__")
    smooth = NoiseTunnel(pgis).attribute(x, nt_type="smoothgrad", nt_samples=3, stdevs=0.1, target=y)
    assert smooth.shape == x.shape and torch.isfinite(smooth).all()
    with torch.no_grad():
        assert torch.allclose(pgis.attribute(x, target=y), pgis.attribute(x, target=y))
    attributions = pgis.attribute(x, target=y)

    def perturb(inputs):
        noise = torch.randn_like(inputs) * 0.01
        return noise, inputs - noise

    infid = infidelity(model, perturb, x, attributions, target=y, n_perturb_samples=2)
    assert infid.shape == (4,) and torch.isfinite(infid).all()
    sens = sensitivity_max(pgis.attribute, x, target=y, n_perturb_samples=2)
    assert sens.shape == (4,) and torch.isfinite(sens).all()
    # tuple in, tuple out
    as_tuple = pgis.attribute((x,), target=y)
    assert isinstance(as_tuple, tuple) and torch.allclose(as_tuple[0], attributions)


def test_visualizations(tmp_path):
    model = seeded_resnet18(num_classes=3, dtype=torch.float32)
    images = torch.rand(1, 3, 32, 32)
    attr = ParameterGuidedInputSaliency(model, k=5).attribute(images, target=1)
    figure, _ = viz.visualize_image_attr(
        attr[0].permute(1, 2, 0).numpy(), images[0].permute(1, 2, 0).numpy(),
        method="blended_heat_map", sign="absolute_value", use_pyplot=False,
    )
    figure.savefig(tmp_path / "captum.png")
    assert (tmp_path / "captum.png").stat().st_size > 1000
    rgb = paper_heatmap(attr[0], images[0], path=str(tmp_path / "paper.png"))
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    assert (tmp_path / "paper.png").read_bytes()[:4] == b"\x89PNG"
    assert rgb.std() > 0
    with pytest.raises(ValueError, match="attr must be"):
        paper_heatmap(attr[0, 0], images[0])


def test_bad_input():
    model = conv1d_model()
    x = torch.randn(2, 2, 10, dtype=torch.float64)
    units = ParameterSaliency(model).layout.num_columns
    with pytest.raises(ValueError, match="k must be"):
        ParameterGuidedInputSaliency(model, k=units + 1)
    with pytest.raises(ValueError, match="boost_factor"):
        ParameterGuidedInputSaliency(model, boost_factor=0)
    with pytest.raises(ValueError, match="boost_factor"):
        ParameterGuidedInputSaliency(model, boost_factor=-3.0)
    pgis = ParameterGuidedInputSaliency(model, k=2)
    with pytest.raises(ValueError, match="out of range"):
        pgis.attribute(x, target=0, units=[units])
    with pytest.raises(ValueError, match="out of range"):
        pgis.attribute(x, target=0, units=[("0.weight", 99)])
    with pytest.raises(ValueError, match="no parameter"):
        pgis.attribute(x, target=0, units=[("nope.weight", 0)])
    with pytest.raises(ValueError, match="one per sample"):
        pgis.attribute(x, target=0, units=[[0], [1], [2]])
    with pytest.raises(ValueError, match="not both"):
        pgis.attribute(x, target=0, units=[0], random_units=True)
    with pytest.raises(TypeError, match="floating-point"):
        pgis.attribute(torch.ones(2, 2, 10, dtype=torch.long), target=0)


def test_model_left_as_found():
    model = conv1d_model().train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = snapshot(model)  # every module in train mode, no hooks, one .grad set
    ParameterGuidedInputSaliency(model, k=2).attribute(torch.randn(2, 2, 10, dtype=torch.float64), target=1)
    assert_unchanged(model, before)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[2].weight.grad is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_all_zero_profile_gives_zero_not_nan():
    """Every ReLU dead: no selected weight has a gradient, the cosine is undefined; the
    attribution is zero (float32, where a naive |z|^2 would underflow to 0/0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    x = torch.randn(3, 4)
    attr = ParameterGuidedInputSaliency(model, k=2).attribute(x, target=torch.tensor([0, 1, 0]))
    assert torch.equal(attr, torch.zeros_like(x))
    from captum_paramsal._core.parameter_guided_input_saliency import boosting_weights

    tiny = torch.full((2, 5), 1e-24)  # |z|^2 = 5e-48: below float32's range
    tiny[1] = 0
    weights = boosting_weights(tiny, torch.tensor([[True, False, False, False, False]] * 2), 100.0)
    assert torch.isfinite(weights).all() and torch.equal(weights[1], torch.zeros(5))
    assert weights[0].abs().max() > 0
