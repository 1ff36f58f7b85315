"""SPADE names layers by their weight parameter, prunes a tied weight once, bounds its calibration
pass with internal_batch_size, and swaps weights with interventions.swapped_parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from captum_paramsal.spade import SampleTargetedPruning, prunable_weights
from captum_paramsal.spade.second_moments import SecondMomentCollector


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 5 * 5, 6)
        self.head = nn.Linear(6, 3)
        self.unused = nn.Linear(3, 3)  # never called in forward

    def forward(self, x):
        x = torch.relu(self.norm(self.conv(x)))
        return self.head(torch.relu(self.fc(x.flatten(1))))


class Tied(nn.Module):
    """Two Linear layers that share one weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.b(torch.tanh(self.a(x))))


def identity(sample):
    return sample + 0.1 * torch.randn_like(sample)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


def test_layers_are_named_by_their_weight(net):
    names = ["conv.weight", "fc.weight", "head.weight", "unused.weight"]
    assert SampleTargetedPruning.prunable_layers(net) == names
    assert list(prunable_weights(net)) == names
    pruning = SampleTargetedPruning(net, sparsity=0.5, n_augmentations=4, augment=identity, prune_stem=True)
    assert list(pruning.layer_sparsity) == names
    assert list(SampleTargetedPruning(net, sparsity=0.5).layer_sparsity) == names[1:]  # the stem stays dense
    x = torch.randn(1, 2, 5, 5)
    weights = pruning.pruned_weights(x)
    assert set(weights) == {"conv.weight", "fc.weight", "head.weight"}
    assert pruning.last_skipped == ["unused.weight"]  # its layer never ran
    params = dict(net.named_parameters())
    with pruning.pruned(x) as inside:
        for name, value in inside.items():
            assert torch.equal(params[name], value)
            assert int((params[name] == 0).sum()) == round(0.5 * value.numel())
    named = SampleTargetedPruning(
        net, sparsity={"fc.weight": 0.5, "unused.weight": 0.5}, n_augmentations=4, augment=identity
    )
    with pytest.raises(ValueError, match=r"the layer\(s\) of \['unused.weight'\] did not run"):
        named.pruned_weights(x)
    with pytest.raises(ValueError, match=r"none of the model's prunable layers ran when calling Identity\(...\)"):
        named.pruned_weights(x, forward_func=nn.Identity())


@pytest.mark.parametrize(
    "key, match",
    [
        ("fc", "sparsity names the module 'fc'; layers are named by their weight parameter.*use 'fc.weight'"),
        ("norm", "'norm' is a module, and it cannot be pruned: it is a BatchNorm2d"),
        ("norm.weight", r"'norm.weight' cannot be pruned \(the weight of layer 'norm'\): it is a BatchNorm2d"),
        ("fc.bias", "'fc.bias' cannot be pruned: it is the 'bias' parameter of a Linear"),
        ("hed.weight", "no parameter named 'hed.weight'; did you mean 'head.weight'"),
        ("hed", "no parameter named 'hed'; did you mean 'head.weight'"),
        ("xyzzy", "prunable weights: 'conv.weight', 'fc.weight'"),
    ],
)
def test_bad_names(net, key, match):
    with pytest.raises(ValueError, match=match):
        SampleTargetedPruning(net, sparsity={key: 0.5})


def test_lazy_and_parametrized_weights_are_refused_by_name():
    lazy = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"\(the weight of layer '0'\): its weight is not initialized"):
        SampleTargetedPruning(lazy, sparsity={"0.weight": 0.5})
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def forward(self, w):
            return 2 * w

    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    parametrize.register_parametrization(model[0], "weight", Scale())
    assert SampleTargetedPruning.prunable_layers(model) == ["1.weight"]
    with pytest.raises(ValueError, match="'0.weight' cannot be pruned: its weight is not a plain nn.Parameter"):
        SampleTargetedPruning(model, sparsity={"0.weight": 0.5})


def test_a_tied_weight_is_pruned_once_for_both_layers():
    torch.manual_seed(1)
    model = Tied().eval()
    assert SampleTargetedPruning.prunable_layers(model) == ["a.weight", "out.weight"]
    assert [len(layers) for layers in prunable_weights(model).values()] == [2, 1]
    pruning = SampleTargetedPruning(model, sparsity={"b.weight": 0.5}, n_augmentations=8, augment=identity)
    assert pruning.layer_sparsity == {"a.weight": 0.5}  # the alias reads as the weight's own name
    x = torch.randn(1, 6)
    moments = pruning.second_moments(x)
    batch = pruning.calibration_batch(x)[0]
    with torch.no_grad():
        into_b = torch.tanh(model.a(batch))
    expected = batch.T @ batch + into_b.T @ into_b  # both layers' inputs
    torch.testing.assert_close(moments["a.weight"].matrix[0], expected, rtol=1e-5, atol=1e-5)
    assert moments["a.weight"].rows == 16
    before = model.a.weight.detach().clone()
    with pruning.pruned(x):
        assert model.b.weight is model.a.weight and int((model.a.weight == 0).sum()) == 18
    assert torch.equal(model.a.weight, before)
    with pytest.raises(ValueError, match="names the weight 'a.weight' twice"):
        SampleTargetedPruning(model, sparsity={"a.weight": 0.5, "b.weight": 0.4})


def test_internal_batch_size_bounds_the_calibration_pass(net):
    x = torch.randn(1, 2, 5, 5)
    calls = []
    net.fc.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    whole = SampleTargetedPruning(net, sparsity=0.5, n_augmentations=10, augment=identity)
    chunked = SampleTargetedPruning(net, sparsity=0.5, n_augmentations=10, augment=identity, internal_batch_size=4)
    assert chunked.internal_batch_size == 4
    expected = whole.second_moments(x)
    calls.clear()
    got = chunked.second_moments(x)
    assert calls == [4, 4, 2]
    for name in expected:
        torch.testing.assert_close(got[name].matrix, expected[name].matrix, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="internal_batch_size must be a positive int"):
        SampleTargetedPruning(net, internal_batch_size=0)
    with pytest.raises(TypeError):
        SampleTargetedPruning(net, calibration_batch_size=4)  # the old name is gone


def test_collector_removes_its_hooks_when_entering_fails(net):
    collector = SecondMomentCollector({"fc.weight": net.fc, "norm.weight": net.norm})
    with pytest.raises(TypeError, match="has no second-moment rule"):
        with collector:
            pass
    assert not net.fc._forward_pre_hooks and not collector._handles
    mixed = SecondMomentCollector({"w": [nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, groups=4)]})
    with pytest.raises(TypeError, match="differ in type, groups or weight shape"):
        with mixed:
            pass
