"""Random small convolution and linear stacks: ParameterSaliency against the naive loop, float64."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captum_paramsal import ParameterSaliency

from naive import blockwise_rel_err, naive_unit_saliency, rel_err

TOL = 1e-5


def divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def out_size(size: int, kernel: int, stride: int, padding, dilation: int) -> int:
    if padding == "same":
        return size
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@st.composite
def conv_stacks(draw):
    dims = draw(st.sampled_from([1, 2]))
    size = draw(st.integers(4, 12 if dims == 2 else 40))
    channels = draw(st.integers(1, 4))
    in_shape = (channels, *([size] * dims))
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    layers, description = [], []
    for index in range(draw(st.integers(1, 3))):
        out_channels = draw(st.integers(1, 6))
        groups = draw(st.sampled_from(divisors(math.gcd(channels, out_channels))))
        kernel = draw(st.integers(1, 3))
        stride = draw(st.integers(1, 2))
        padding = draw(st.sampled_from([0, 1, 2, "same"] if stride == 1 else [0, 1, 2]))
        dilation = draw(st.integers(1, 2))
        bias = draw(st.booleans())
        new_size = out_size(size, kernel, stride, padding, dilation)
        if new_size < 1:
            break  # the stack ends where the signal would vanish
        if index > 0:
            layers.append(nn.ReLU())
        layers.append(conv(channels, out_channels, kernel, stride=stride, padding=padding,
                           dilation=dilation, groups=groups, bias=bias))
        description.append((out_channels, kernel, stride, padding, dilation, groups, bias))
        channels, size = out_channels, new_size
    if not layers:  # the very first layer did not fit: a plain one always does
        layers.append(conv(channels, 2, 1))
        channels = 2
    classes = draw(st.integers(2, 4))
    batch = draw(st.integers(2, 3))
    seed = draw(st.integers(0, 2**16))
    return dims, in_shape, layers, channels * size**dims, classes, batch, seed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_stacks())
def test_random_conv_stack_matches_naive(case):
    dims, in_shape, layers, width, classes, batch, seed = case
    torch.manual_seed(seed)
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(width, classes)).double()
    for layer in layers:  # fresh weights for every example
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *in_shape, generator=generator, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=generator)

    ps = ParameterSaliency(model)
    got = ps.attribute(x, target=y)
    expected = naive_unit_saliency(model, (x,), y, list(ps.layout.names))
    assert got.shape == expected.shape
    if expected.abs().max() == 0:  # every ReLU dead: no gradient reaches any weight
        assert got.abs().max() == 0
        return
    assert rel_err(got, expected) < TOL
    worst, name = blockwise_rel_err(got, expected, ps.layout)
    assert worst < TOL, f"{name}: relative error {worst:.3e} in {model}"


@st.composite
def linear_stacks(draw):
    """Linear layers over ``(B, *lead, features)`` with 0-2 leading dims, some used twice."""
    lead = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
    widths = draw(st.lists(st.integers(1, 6), min_size=2, max_size=4))
    biases = draw(st.lists(st.booleans(), min_size=len(widths) - 1, max_size=len(widths) - 1))
    reuse = draw(st.booleans())
    classes = draw(st.integers(2, 4))
    batch = draw(st.integers(2, 3))
    seed = draw(st.integers(0, 2**16))
    return lead, widths, biases, reuse, classes, batch, seed


class _LinearStack(nn.Module):
    def __init__(self, widths, biases, reuse, classes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b, bias in zip(widths, widths[1:], biases))
        self.square = nn.Linear(widths[-1], widths[-1]) if reuse else None
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        if self.square is not None:  # one module called twice in a forward pass
            x = self.square(torch.tanh(self.square(x)))
        return self.head(x.flatten(1, -2).mean(1) if x.dim() > 2 else x)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(linear_stacks())
def test_random_linear_stack_matches_naive(case):
    lead, widths, biases, reuse, classes, batch, seed = case
    torch.manual_seed(seed)
    model = _LinearStack(widths, biases, reuse, classes).double()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *lead, widths[0], generator=generator, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=generator)
    for reduction in ("mean_abs", "mean"):
        ps = ParameterSaliency(model, reduction=reduction)
        got = ps.attribute(x, target=y)
        expected = naive_unit_saliency(model, (x,), y, list(ps.layout.names), reduction=reduction)
        worst, name = blockwise_rel_err(got, expected, ps.layout)
        assert worst < TOL, f"{reduction}, {name}: relative error {worst:.3e} in {model}"
