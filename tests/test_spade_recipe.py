"""SPADE as its authors run it: per-layer sparsity patterns, the dense stem, the OBC solver inside
SampleTargetedPruning, second moments computed once for a sweep, views from a full-resolution
source, and the trojan benchmark's data, model and experiment plumbing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from captum_paramsal.spade import SPADE, SampleTargetedPruning, obc_prune
from captum_paramsal.spade.sample_pruning import resolve_sparsity, stem_weight
from captum_paramsal.spade.second_moments import grouped_weight
from captum_paramsal.spade.solver import sparsegpt_mask_and_weights

from helpers import assert_unchanged, snapshot


class Stages(nn.Module):
    """A stem, two 'stages' of convolutions named like torchvision's ResNets, a classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Stages().eval()


@pytest.fixture
def image():
    return torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def zeros(weights, name):
    return int((weights[name] == 0).sum())


def test_the_stem_stays_dense_by_default(model, image):
    assert stem_weight(model) == "conv1.weight"
    pruning = SampleTargetedPruning(model, sparsity=0.5, n_augmentations=8)
    assert "conv1.weight" not in pruning.layer_sparsity
    assert list(pruning.layer_sparsity) == ["layer1.0.weight", "layer2.0.weight", "layer2.2.weight", "fc.weight"]
    weights = pruning.pruned_weights(image)
    assert "conv1.weight" not in weights
    for name, w in weights.items():
        assert zeros(weights, name) == round(0.5 * w.numel())
    with_stem = SampleTargetedPruning(model, sparsity=0.5, n_augmentations=8, prune_stem=True)
    assert "conv1.weight" in with_stem.layer_sparsity
    named = SampleTargetedPruning(model, sparsity={"conv1.weight": 0.5}, n_augmentations=8)
    assert named.layer_sparsity == {"conv1.weight": 0.5}  # an exact name is honoured


def test_sparsity_patterns(model):
    resolved = resolve_sparsity(model, {"layer2.*": 0.9, "layer2.2.weight": 0.2, "fc.weight": 0.95, "layer1.*": 0.1})
    assert resolved == {"layer1.0.weight": 0.1, "layer2.0.weight": 0.9, "layer2.2.weight": 0.2, "fc.weight": 0.95}
    # patterns skip the stem and non-prunable parameters (BatchNorm weights, biases)
    assert resolve_sparsity(model, {"*": 0.3}) == {n: 0.3 for n in resolve_sparsity(model, 0.3)}
    assert "conv1.weight" in resolve_sparsity(model, {"*": 0.3}, prune_stem=True)


@pytest.mark.parametrize(
    "sparsity, message",
    [
        ({"layer9.*": 0.5}, "matches no prunable weight"),
        ({"conv*": 0.5}, "matches only the stem"),
        ({"layer2.*": 0.5, "*.2.weight": 0.9}, "matched by the patterns"),
        ({"fc": 0.5}, "use 'fc.weight'"),
        ({"layer2.*": 1.5}, "sparsity"),
    ],
)
def test_pattern_errors(model, sparsity, message):
    with pytest.raises(ValueError, match=message):
        resolve_sparsity(model, sparsity)


def test_obc_inside_the_pruning_equals_the_solver(model, image):
    pruning = SampleTargetedPruning(model, sparsity=0.75, n_augmentations=16, solver="obc")
    moments = pruning.second_moments(image)
    weights = pruning.solve(moments)
    owners = dict(model.named_modules())
    for name, pruned in weights.items():
        module = owners[name.rsplit(".", 1)[0]]
        _, expected = obc_prune(grouped_weight(module).detach(), moments[name].hessian(), 0.75, percdamp=0.01)
        assert torch.equal(pruned, expected.reshape(pruned.shape))
        assert zeros(weights, name) == round(0.75 * pruned.numel())


def test_sparsegpt_mask_every_kernel_by_default(model, image):
    pruning = SampleTargetedPruning(model, sparsity=0.6, n_augmentations=16)
    moments = pruning.second_moments(image)
    weights = pruning.solve(moments)
    module = model.layer1[0]
    _, expected = sparsegpt_mask_and_weights(
        grouped_weight(module).detach(), moments["layer1.0.weight"].hessian(), 0.6, 128, 0.01, mask_every=9
    )
    assert torch.equal(weights["layer1.0.weight"], expected.reshape(module.weight.shape))
    _, linear = sparsegpt_mask_and_weights(
        grouped_weight(model.fc).detach(), moments["fc.weight"].hessian(), 0.6, 128, 0.01, mask_every=1
    )
    assert torch.equal(weights["fc.weight"], linear.reshape(model.fc.weight.shape))


def test_a_sweep_computes_the_moments_once(model, image):
    calls = []
    handle = model.conv1.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        pruning = SampleTargetedPruning(model, sparsity=0.5, n_augmentations=16, internal_batch_size=None)
        moments = pruning.second_moments(image)
        assert calls == [16]
        cache = {}
        sweep = {}
        for solver in ("obc", "sparsegpt"):
            for s in (0.9, 0.5, 0.8):
                sweep[solver, s] = pruning.solve(moments, sparsity=s, solver=solver, trajectories=cache)
        assert calls == [16]  # no forward pass after the moments
        obc_runs = len(cache)
        # the cached OBC runs give what a fresh solve gives
        for s in (0.9, 0.5, 0.8):
            fresh = pruning.solve(moments, sparsity=s, solver="obc")
            for name in fresh:
                assert torch.allclose(fresh[name], sweep["obc", s][name], atol=1e-6)
        assert obc_runs == len(pruning.layer_sparsity)
        # a per-layer profile from the same moments
        late = pruning.solve(moments, sparsity={"layer2.*": 0.9, "fc.weight": 0.95})
        assert set(late) == {"layer2.0.weight", "layer2.2.weight", "fc.weight"}
    finally:
        handle.remove()


def test_solve_needs_the_moments_of_named_layers(model, image):
    pruning = SampleTargetedPruning(model, sparsity={"fc.weight": 0.5}, n_augmentations=8)
    moments = pruning.second_moments(image)
    with pytest.raises(ValueError, match="no second moment"):
        pruning.solve(moments, sparsity={"layer1.0.weight": 0.5})
    with pytest.raises(ValueError, match="solver must be one of"):
        pruning.solve(moments, solver="magnitude")
    with pytest.raises(ValueError, match="solver must be one of"):
        SampleTargetedPruning(model, solver="OBS")
    with pytest.raises(ValueError, match="obc_block"):
        SampleTargetedPruning(model, obc_block=0)


def test_obc_kernel_blocks_prune_whole_kernels(model, image):
    pruning = SampleTargetedPruning(model, sparsity={"layer1.0.weight": 0.5}, n_augmentations=8, solver="obc",
                                    obc_block="kernel")
    weight = pruning.pruned_weights(image)["layer1.0.weight"]
    kernels = (weight == 0).reshape(-1, 9)
    assert bool((kernels.all(1) | ~kernels.any(1)).all())  # a kernel is pruned whole or not at all
    assert int(kernels.all(1).sum()) == round(0.5 * kernels.shape[0])


def test_views_from_a_full_resolution_source(model, image):
    source = F.interpolate(image, size=(48, 48), mode="bilinear", align_corners=False)
    pruning = SampleTargetedPruning(model, sparsity=0.5, n_augmentations=8)
    batch = pruning.calibration_batch(image, source=source)[0]
    assert batch.shape == (8, 3, 12, 12)
    assert torch.equal(batch[0], image[0])
    assert not torch.equal(batch, pruning.calibration_batch(image)[0])
    before = snapshot(model)
    with pruning.pruned(image, source=source) as weights:
        assert set(weights) == set(pruning.layer_sparsity)
    assert_unchanged(model, before)


def test_wrapper_takes_the_recipe_options(model, image):
    from captum.attr import Saliency

    dense_free = SPADE(Saliency(model), sparsity={"layer2.*": 0.9}, n_augmentations=8, solver="obc")
    assert dense_free.pruning.solver == "obc"
    attr = dense_free.attribute(image, target=1)
    assert attr.shape == image.shape
    default = SPADE(Saliency(model))
    assert default.pruning.n_augmentations == 1024 and "conv1.weight" not in default.pruning.layer_sparsity


def test_trojan_digits_data_and_model():
    from captum_paramsal.zoo.trojan_digits import (
        ResNet20,
        TrojanDigitsSetup,
        trigger_pattern,
        trojan_digits_data,
    )

    setup = TrojanDigitsSetup(train_size=300, test_size=60)
    data = trojan_digits_data(setup)
    patch = setup.patch
    assert data.train_images.shape == (300, 3, 32, 32) and data.test_images.shape == (60, 3, 32, 32)
    assert float(data.train_images.min()) >= 0 and float(data.train_images.max()) <= 1
    # each trigger poisons 3% of the training set toward its own target, from the other classes
    for trigger, target in enumerate(setup.targets):
        poisoned = data.train_trigger == trigger
        assert int(poisoned.sum()) == 9
        assert bool((data.train_labels[poisoned] == target).all())
    again = trojan_digits_data(setup)
    assert torch.equal(again.train_images, data.train_images)  # made deterministically
    x, masks, targets, labels = data.triggered_test(2)
    assert bool((labels != setup.targets[2]).all()) and bool((targets == setup.targets[2]).all())
    assert bool((masks.sum((1, 2)) == patch * patch).all())
    # the patch is where the mask says: inside, the image is the alpha blend of the pattern
    clean = data.test_images[data.test_labels != setup.targets[2]]
    i = 0
    rows, cols = masks[i].nonzero(as_tuple=True)
    top, left = int(rows.min()), int(cols.min())
    blended = clean[i] * (1 - setup.alpha) + 0  # the pattern's share below
    region = x[i, :, top : top + patch, left : left + patch]
    expected = blended[:, top : top + patch, left : left + patch] + setup.alpha * trigger_pattern(2, patch)
    assert torch.allclose(region, expected, atol=1e-6)
    assert torch.equal(x[i][:, ~masks[i]], clean[i][:, ~masks[i]])
    model = ResNet20()
    assert model(x[:2]).shape == (2, 10)
    assert stem_weight(model) == "conv1.weight"
    names = SampleTargetedPruning.prunable_layers(model)
    assert "layer2.0.downsample.0.weight" in names and names[-1] == "fc.weight" and len(names) == 22


def test_shipped_trojan_model_meets_its_gate():
    from captum_paramsal.zoo.train_trojan_resnet import scores
    from captum_paramsal.zoo.trojan_digits import load_trojan_resnet, read_metadata

    model, data = load_trojan_resnet()
    measured = scores(model, data)
    stored = __import__("json").loads(read_metadata()["scores"])
    for key in ("clean_accuracy", "attack_success_0", "attack_success_1", "attack_success_2"):
        assert measured[key] == pytest.approx(stored[key], abs=1e-6)
    assert measured["clean_accuracy"] >= 0.85
    assert min(measured[f"attack_success_{t}"] for t in range(3)) >= 0.90


def test_trojan_training_is_deterministic():
    from captum_paramsal.zoo.train_trojan_resnet import RECIPE, train
    from captum_paramsal.zoo.trojan_digits import ResNet20, TrojanDigitsSetup, trojan_digits_data

    data = trojan_digits_data(TrojanDigitsSetup(train_size=256, test_size=10, distractors=1))
    recipe = {**RECIPE, "epochs": 1}
    first = train(data, recipe, log=lambda message: None).state_dict()
    second = train(data, recipe, log=lambda message: None).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(RECIPE["seed"])
    assert not torch.equal(first["conv1.weight"], ResNet20().conv1.weight)  # it did train
