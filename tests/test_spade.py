"""SPADE: the layer solver against brute force, the second moments, exact sparsity, exact restore,
the Captum wrapper with each supported method, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from captum.attr import (
    Attribution,
    DeepLift,
    GradientShap,
    GuidedBackprop,
    GuidedGradCam,
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Occlusion,
    Saliency,
)

from captum_paramsal import ParameterGuidedInputSaliency, ParameterSaliency
from captum_paramsal.spade import (
    SPADE,
    DefaultAugmentation,
    SampleTargetedPruning,
    augmented_batch,
    exact_reconstruction,
    sparsegpt_prune,
)
from captum_paramsal.spade.second_moments import SecondMomentCollector, grouped_weight
from captum_paramsal.spade.solver import inverse_hessian_factor, sparsegpt_mask_and_weights

from helpers import assert_unchanged, snapshot


class Net(nn.Module):
    """Plain, grouped and depthwise (reflect-padded) convolutions, BatchNorm, two Linear layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect")
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(32, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = F.relu(self.dw(x))
        return self.fc2(F.relu(self.fc1(self.pool(x).flatten(1))))


PRUNABLE = ["conv1", "conv2", "dw", "fc1", "fc2"]


@pytest.fixture
def model():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture
def images():
    return torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def small_pruning(model, **options):
    options = {"sparsity": 0.75, "n_augmentations": 16, **options}
    return SampleTargetedPruning(model, **options)


# --------------------------------------------------------------------------- the solver


def brute_force(weight, x, mask):
    """Per row, least squares of the kept columns of ``x`` against the dense row's outputs."""
    out = torch.zeros_like(weight)
    for r in range(weight.shape[0]):
        kept = (~mask[r]).nonzero().flatten()
        if len(kept):
            out[r, kept] = torch.linalg.lstsq(x[:, kept], x @ weight[r]).solution
    return out


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])  # both formulations (kept side / pruned side)
def test_given_mask_is_least_squares(fraction):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, dtype=torch.float64, generator=generator)
    weight = torch.randn(4, 6, dtype=torch.float64, generator=generator)
    mask = torch.rand(4, 6, generator=generator) < fraction
    mask[0] = True  # a fully pruned row
    mask[1] = False  # an unpruned row
    hessian = 2 * x.T @ x
    expected = brute_force(weight, x, mask)
    got = sparsegpt_prune(weight, hessian, mask=mask, percdamp=0.0)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert bool((got[mask] == 0).all())


def test_given_mask_per_group():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 30, 5, dtype=torch.float64, generator=generator)  # each group its own inputs
    weight = torch.randn(2, 3, 5, dtype=torch.float64, generator=generator)
    mask = torch.rand(2, 3, 5, generator=generator) < 0.5
    got = exact_reconstruction(weight, 2 * x.transpose(1, 2) @ x, mask)
    for g in range(2):
        torch.testing.assert_close(got[g], brute_force(weight[g], x[g], mask[g]), rtol=1e-10, atol=1e-10)


def naive_sparsegpt(weight, hessian, sparsity, blocksize, percdamp):
    """Textbook sequential OBS with SparseGPT's frozen columns: explicit inverses of ``H_F``,
    ``F = {i, ..., C-1}``, at every column; the mask of each block chosen at its start."""
    h = hessian + percdamp * hessian.diagonal().mean() * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    w = weight.clone()
    rows, columns = w.shape
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        d = torch.stack([torch.linalg.inv(h[q:, q:])[0, 0] for q in range(i1, i2)])
        scores = w[:, i1:i2] ** 2 / d
        k = round(sparsity * rows * i2) - round(sparsity * rows * i1)
        chosen = torch.zeros(scores.numel(), dtype=torch.bool)
        chosen[scores.flatten().argsort()[:k]] = True
        mask[:, i1:i2] = chosen.view(rows, i2 - i1)
        for i in range(i1, i2):
            hinv = torch.linalg.inv(h[i:, i:])
            for r in mask[:, i].nonzero().flatten():
                w[r, i:] -= w[r, i] / hinv[0, 0] * hinv[0]
    return mask, w


@pytest.mark.parametrize("blocksize", [3, 128])
def test_sparsegpt_matches_textbook_obs(blocksize):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(64, 10, dtype=torch.float64, generator=generator) @ torch.randn(
        10, 10, dtype=torch.float64, generator=generator
    )  # correlated inputs, so that the OBS corrections matter
    weight = torch.randn(5, 10, dtype=torch.float64, generator=generator)
    hessian = 2 * x.T @ x
    # the mask chosen once per block, as in the textbook (mask_every=1, the default, is tested
    # in test_spade_solvers.py)
    mask, got = sparsegpt_mask_and_weights(
        weight, hessian, 0.6, blocksize=blocksize, percdamp=0.01, mask_every=blocksize
    )
    expected_mask, expected = naive_sparsegpt(weight, hessian, 0.6, blocksize, 0.01)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_inverse_hessian_factor():
    x = torch.randn(50, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hessian = (2 * x.T @ x).expand(2, 7, 7)
    upper = inverse_hessian_factor(hessian, percdamp=0.0)
    assert torch.equal(upper, upper.triu())
    torch.testing.assert_close(upper.transpose(1, 2) @ upper, torch.linalg.inv(hessian), rtol=1e-10, atol=1e-12)


def test_reconstruction_beats_magnitude_and_refit_beats_sparsegpt():
    generator = torch.Generator().manual_seed(4)
    # inputs of low effective rank, as a layer's inputs on one sample's augmentations are
    x = torch.randn(200, 8, generator=generator, dtype=torch.float64) @ torch.randn(
        8, 24, generator=generator, dtype=torch.float64
    ) + 0.1 * torch.randn(200, 24, generator=generator, dtype=torch.float64)
    weight = torch.randn(12, 24, generator=generator, dtype=torch.float64)
    hessian = 2 * x.T @ x

    def error(w):
        return float(((w - weight) @ x.T).square().sum())

    mask, pruned = sparsegpt_mask_and_weights(weight, hessian, 0.7, blocksize=8, percdamp=0.01)
    magnitude = weight.clone()
    magnitude.view(-1)[weight.abs().flatten().argsort()[: round(0.7 * weight.numel())]] = 0
    refit = exact_reconstruction(weight, hessian, mask)
    assert error(pruned) < 0.8 * error(magnitude)
    assert error(refit) <= error(pruned) * (1 + 1e-12)
    assert torch.equal(refit == 0, mask)


@pytest.mark.parametrize("shape,sparsity", [((7, 13), 0.37), ((3, 4, 9), 0.5), ((16, 9), 0.99), ((5, 6), 0.0)])
def test_solver_budget_is_exact(shape, sparsity):
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(*shape, generator=generator)
    columns = shape[-1]
    x = torch.randn(*shape[:-2], 50, columns, generator=generator)
    pruned = sparsegpt_prune(weight, 2 * x.transpose(-1, -2) @ x, sparsity=sparsity, blocksize=4)
    assert int((pruned == 0).sum()) == round(sparsity * weight.numel())
    assert pruned.dtype == weight.dtype and pruned.shape == weight.shape


def test_dead_inputs_are_pruned_first():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(6))
    x[:, 2] = 0  # an input that never fires on the calibration data
    weight = torch.ones(3, 6)
    pruned = sparsegpt_prune(weight, 2 * x.T @ x, sparsity=3 / 18, mask_every=6)  # one choice over all columns
    assert bool((pruned[:, 2] == 0).all()) and int((pruned == 0).sum()) == 3


# --------------------------------------------------------------------------- second moments


@pytest.mark.parametrize(
    "layer,shape",
    [
        (nn.Linear(5, 4, bias=False), (6, 3, 5)),  # a sequence input: every position is a row
        (nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding="valid", bias=False), (3, 4, 17)),
        (nn.Conv1d(4, 6, 4, padding="same", padding_mode="reflect", groups=2, bias=False), (3, 4, 11)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False), (2, 4, 9, 9)),
        (nn.Conv2d(3, 3, (3, 2), padding=(2, 1), dilation=(1, 2), padding_mode="circular", bias=False), (2, 3, 7, 8)),
        (nn.Conv2d(4, 4, 3, padding="same", groups=4, bias=False), (4, 7, 7)),  # unbatched
    ],
)
def test_second_moment_quadratic_form(layer, shape):
    """For any weight ``V`` of the layer's shape, ``||layer_V(x)||² = Σ_g tr(V_g M_g V_gᵀ)``."""
    layer = layer.double()
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    collector = SecondMomentCollector({"layer": layer})
    with collector, torch.no_grad():
        layer(x)
    moment = collector.moments["layer"].matrix
    for seed in range(3):
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(seed)))
            energy = layer(x).square().sum()
        v = grouped_weight(layer).detach()
        quadratic = torch.einsum("grc,gcd,grd->", v, moment, v)
        torch.testing.assert_close(quadratic, energy, rtol=1e-10, atol=1e-10)
    assert not collector._handles and not layer._forward_pre_hooks


# --------------------------------------------------------------------------- pruning a model


def test_each_layer_reaches_its_sparsity_exactly(model, images):
    assert list(small_pruning(model, sparsity=0.83).layer_sparsity) == [f"{name}.weight" for name in PRUNABLE[1:]]
    pruning = small_pruning(model, sparsity=0.83, prune_stem=True)
    assert list(pruning.layer_sparsity) == [f"{name}.weight" for name in PRUNABLE]
    weights = pruning.pruned_weights(images[:1])
    assert set(weights) == {f"{name}.weight" for name in PRUNABLE}
    params = dict(model.named_parameters())
    for name, w in weights.items():
        assert w.shape == params[name].shape
        assert int((w == 0).sum()) == round(0.83 * w.numel()), name


def test_per_layer_sparsity_dict(model, images):
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    pruning = small_pruning(model, sparsity={"conv2.weight": 0.5, "dw.weight": 0.25, "fc1.weight": 0.9})
    with pruning.pruned(images[:1]) as weights:
        assert set(weights) == {"conv2.weight", "dw.weight", "fc1.weight"}
        for name, s in {"conv2.weight": 0.5, "dw.weight": 0.25, "fc1.weight": 0.9}.items():
            weight = dict(model.named_parameters())[name]
            assert int((weight == 0).sum()) == round(s * weight.numel())
        for name in ("conv1.weight", "fc2.weight", "bn.weight", "fc1.bias"):
            assert torch.equal(model.state_dict()[name], dense[name])
    for name, value in model.state_dict().items():
        assert torch.equal(value, dense[name])


def test_pruned_network_tracks_the_dense_one_on_its_sample(model, images):
    """The reconstruction is for the sample: its logits move much less than under magnitude pruning."""
    x = images[:1]
    with torch.no_grad():
        dense = model(x)
        moved = {}
        for name, options in {
            "default": {},  # SparseGPT, mask re-chosen every kernel (conv) and every column (Linear)
            "per block": {"mask_every": 128},
            "obc": {"solver": "obc"},
        }.items():
            with small_pruning(model, sparsity=0.5, n_augmentations=32, **options).pruned(x):
                moved[name] = (model(x) - dense).norm()
        magnitude = {}
        for name in PRUNABLE:
            w = dict(model.named_modules())[name].weight
            m = w.clone()
            m.view(-1)[w.abs().flatten().argsort()[: round(0.5 * w.numel())]] = 0
            magnitude[f"{name}.weight"] = m
        from captum_paramsal.interventions import swapped_parameters

        with swapped_parameters(model, magnitude):
            naive = model(x)
    magnitude = (naive - dense).norm()
    # measured: 0.012 (default), 0.0004 (per block), 0.00014 (OBC) against 0.018 for magnitude pruning;
    # a mask re-chosen every column of a Linear layer cannot prune whole inputs the sample leaves silent
    assert moved["default"] < magnitude
    assert moved["per block"] < 0.1 * magnitude and moved["obc"] < 0.1 * magnitude


class Probe(Attribution):
    """Records how sparse the model is while it runs; fails on request."""

    def __init__(self, model, fail=False):
        super().__init__(model)
        self.fail = fail
        self.zeros = []

    def attribute(self, inputs, target=None):
        modules = dict(self.forward_func.named_modules())
        self.zeros.append({n: int((modules[n].weight == 0).sum()) for n in PRUNABLE})
        if self.fail:
            raise RuntimeError("the wrapped method failed")
        return torch.zeros_like(inputs)


def messy_model(model):
    model.train()
    model.bn.eval()  # mixed training flags
    model.conv1.weight.requires_grad_(False)
    model.fc1.weight.grad = torch.randn_like(model.fc1.weight)
    model.fc2.register_forward_hook(lambda module, args, out: None)
    return model


def test_exact_restore(model, images):
    model = messy_model(model)
    before = snapshot(model)
    probe = Probe(model)
    SPADE(probe, sparsity=0.75, n_augmentations=8, prune_stem=True).attribute(images[:2])
    assert len(probe.zeros) == 2
    modules = dict(model.named_modules())
    for zeros in probe.zeros:  # pruned while the wrapped method ran
        for name in PRUNABLE:
            assert zeros[name] == round(0.75 * modules[name].weight.numel())
    assert_unchanged(model, before)
    SPADE(Saliency(model), n_augmentations=8).attribute(images, target=1)
    ParameterSaliencyRun = SPADE(ParameterSaliency(model), n_augmentations=8)
    ParameterSaliencyRun.attribute(images[:1], target=0)
    assert_unchanged(model, before)


def test_exact_restore_on_error(model, images):
    model = messy_model(model)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="wrapped method failed"):
        SPADE(Probe(model, fail=True), n_augmentations=8).attribute(images[:1])
    assert_unchanged(model, before)
    with pytest.raises(KeyError):
        with small_pruning(model).pruned(images[:1]):
            raise KeyError("inside")
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- the Captum wrapper


def methods(model):
    return {
        "Saliency": (Saliency(model), {}),
        "InputXGradient": (InputXGradient(model), {}),
        "IntegratedGradients": (IntegratedGradients(model), {"n_steps": 8}),
        "GuidedBackprop": (GuidedBackprop(model), {}),
        "DeepLift": (DeepLift(model), {}),
        "GuidedGradCam": (GuidedGradCam(model, model.conv2), {}),
        "LayerGradCam": (LayerGradCam(model, model.dw), {}),
        "Occlusion": (Occlusion(model), {"sliding_window_shapes": (3, 3, 3), "strides": 2}),
        "ParameterGuidedInputSaliency": (ParameterGuidedInputSaliency(model, k=3), {}),
        "ParameterSaliency": (ParameterSaliency(model), {}),
    }


@pytest.mark.parametrize("name", list(methods(Net())))
def test_methods_run_on_each_samples_pruned_network(model, images, name):
    method, kwargs = methods(model)[name]
    targets = torch.tensor([0, 2, 3])
    spade = SPADE(method, sparsity=0.8, n_augmentations=8)
    assert spade.model is model
    got = spade.attribute(images, target=targets, **kwargs)
    dense = method.attribute(images, target=targets, **kwargs)
    assert got.shape == dense.shape and bool(torch.isfinite(got).all())
    assert not torch.allclose(got, dense)
    pruning = SampleTargetedPruning(model, sparsity=0.8, n_augmentations=8)
    for i in range(3):  # the same as running the method by hand inside the sample's pruning
        with pruning.pruned(images[i : i + 1]):
            expected = method.attribute(images[i : i + 1], target=targets[i : i + 1], **kwargs)
        torch.testing.assert_close(got[i : i + 1], expected)


def test_gradient_shap_per_sample_with_its_random_draws(model, images):
    method, targets = GradientShap(model), torch.tensor([0, 2, 3])
    baselines = torch.zeros(2, 3, 8, 8)
    # GradientShap draws from torch's and numpy's global generators; SPADE's views from neither
    torch.manual_seed(5), np.random.seed(5)
    got = SPADE(method, sparsity=0.8, n_augmentations=8).attribute(images, baselines=baselines, target=targets)
    torch.manual_seed(5), np.random.seed(5)
    pruning = SampleTargetedPruning(model, sparsity=0.8, n_augmentations=8)
    for i in range(3):
        with pruning.pruned(images[i : i + 1]):
            expected = method.attribute(images[i : i + 1], baselines=baselines, target=targets[i : i + 1])
        torch.testing.assert_close(got[i : i + 1], expected)


def test_layer_gradcam_with_interpolation(model, images):
    cam = SPADE(LayerGradCam(model, model.conv2), n_augmentations=8).attribute(images, target=1)
    assert cam.shape == (3, 1, 8, 8)  # padding keeps 8x8; interpolate to another size
    up = LayerAttribution.interpolate(cam, (16, 16), interpolate_mode="bilinear")
    assert up.shape == (3, 1, 16, 16) and bool(torch.isfinite(up).all())


def test_convergence_delta_and_tuple_inputs(model, images):
    spade = SPADE(IntegratedGradients(model), n_augmentations=8)
    assert spade.has_convergence_delta() and spade.multiplies_by_inputs
    attr, delta = spade.attribute(images, target=[0, 1, 2], n_steps=8, return_convergence_delta=True)
    assert attr.shape == images.shape and delta.shape == (3,)
    (as_tuple,) = spade.attribute((images,), target=[0, 1, 2], n_steps=8, baselines=(torch.zeros(1, 3, 8, 8),))
    torch.testing.assert_close(as_tuple, attr)


def test_a_sample_does_not_depend_on_its_batch(model, images):
    spade = SPADE(Saliency(model), n_augmentations=8)
    batch = spade.attribute(images, target=torch.tensor([3, 1, 0]))
    alone = spade.attribute(images[1:2], target=1)
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-6, atol=1e-8)


def test_sparsity_zero_is_the_dense_method(model, images):
    method = IntegratedGradients(model)
    got = SPADE(method, sparsity=0.0, n_augmentations=4).attribute(images, target=2, n_steps=8)
    torch.testing.assert_close(got, method.attribute(images, target=2, n_steps=8), rtol=0, atol=0)


def test_noise_tunnel_and_no_grad(model, images):
    smooth = NoiseTunnel(SPADE(Saliency(model), sparsity=0.5, n_augmentations=4)).attribute(
        images[:1], nt_samples=2, stdevs=0.05, target=0
    )
    assert smooth.shape == (1, 3, 8, 8)
    spade = SPADE(Saliency(model), sparsity=0.5, n_augmentations=4)
    with torch.no_grad():
        attr = spade.attribute(images[:1], target=0)
    assert bool(attr.abs().sum() > 0)
    torch.testing.assert_close(attr, spade.attribute(images[:1], target=0))


def test_model_discovery_and_override(model, images):
    wrapped = Saliency(lambda x: model(x).softmax(1))
    with pytest.raises(TypeError, match="model="):
        SPADE(wrapped)
    spade = SPADE(wrapped, model=model, n_augmentations=4)
    assert spade.attribute(images[:1], target=0).shape == (1, 3, 8, 8)
    assert SPADE(Saliency(model.forward)).model is model  # a bound method
    assert SPADE(GuidedBackprop(model)).model is model
    other = Net()
    with pytest.raises(ValueError, match="not part of the model"):
        SPADE(LayerGradCam(model, other.dw))
    with pytest.raises(ValueError, match="none of the model's prunable layers ran"):
        SPADE(Saliency(other), model=model, n_augmentations=4).attribute(images[:1], target=0)


# --------------------------------------------------------------------------- augmentations


def test_default_augmentations():
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(8))  # normalized-like values
    state = torch.get_rng_state()
    first = augmented_batch((x,), 10, seed=3)[0]
    assert torch.equal(torch.get_rng_state(), state)  # the global random state is left alone
    assert first.shape == (10, 3, 12, 12)
    assert torch.equal(first[0], x[0])  # row 0 is the sample itself
    assert not torch.allclose(first[1], x[0])
    assert torch.equal(augmented_batch((x,), 10, seed=3)[0], first)
    assert not torch.equal(augmented_batch((x,), 10, seed=4)[0], first)
    assert float(first.min()) >= float(x.min()) - 1e-5 and float(first.max()) <= float(x.max()) + 1e-5
    grey = augmented_batch((torch.rand(1, 1, 8, 8),), 4)[0]
    assert grey.shape == (4, 1, 8, 8)
    # four channels: geometric views only; no crop and no flip with these options = the sample
    four = torch.rand(1, 4, 6, 6)
    assert augmented_batch((four,), 3, augment=DefaultAugmentation())[0].shape == (3, 4, 6, 6)
    still = DefaultAugmentation(crop_scale=(1.0, 1.0), flip=False, brightness=0, contrast=0)
    torch.testing.assert_close(augmented_batch((four,), 3, augment=still)[0], four.expand(3, 4, 6, 6))


def test_custom_augmentation_and_tuple_inputs():
    x = torch.rand(1, 5)
    batch = augmented_batch((x,), 4, augment=lambda s: s + 1)[0]
    torch.testing.assert_close(batch, torch.cat([x, x + 1, x + 1, x + 1]))
    pair = augmented_batch((x, x * 2), 3, augment=lambda t: (t[0] * 0, t[1] * 0))
    assert pair[0].shape == (3, 5) and pair[1].shape == (3, 5) and float(pair[1][1:].abs().sum()) == 0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan"), {"fc1.weight": 1.0}, {"fc1.weight": -0.5}])
def test_sparsity_out_of_range(model, sparsity):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SampleTargetedPruning(model, sparsity=sparsity)


@pytest.mark.parametrize("sparsity", [True, "0.5", None, {"fc1.weight": "0.5"}])
def test_sparsity_of_wrong_type(model, sparsity):
    with pytest.raises(TypeError):
        SampleTargetedPruning(model, sparsity=sparsity)


def test_unknown_and_unsupported_layers(model):
    with pytest.raises(ValueError, match="no parameter named 'nope'"):
        SampleTargetedPruning(model, sparsity={"nope": 0.5})
    with pytest.raises(ValueError, match="did you mean 'fc1.weight'"):
        SampleTargetedPruning(model, sparsity={"fc_1": 0.5})
    with pytest.raises(ValueError, match="names the module 'fc1'.*use 'fc1.weight'"):
        SampleTargetedPruning(model, sparsity={"fc1": 0.5})
    with pytest.raises(ValueError, match="cannot be pruned.*BatchNorm2d"):
        SampleTargetedPruning(model, sparsity={"bn.weight": 0.5})
    with pytest.raises(ValueError, match="cannot be pruned.*BatchNorm2d"):
        SampleTargetedPruning(model, sparsity={"bn": 0.5})
    with pytest.raises(ValueError, match="empty dict"):
        SampleTargetedPruning(model, sparsity={})
    net3d = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="cannot be pruned.*Conv3d"):
        SampleTargetedPruning(net3d, sparsity={"0.weight": 0.5})
    with pytest.raises(ValueError, match="no prunable layer"):
        SampleTargetedPruning(nn.Sequential(nn.ReLU()))


def test_a_batch_where_one_sample_is_expected(model, images):
    pruning = small_pruning(model)
    for call in (pruning.pruned_weights, pruning.second_moments, pruning.calibration_batch):
        with pytest.raises(ValueError, match="one sample, but inputs hold 3"):
            call(images)
    with pytest.raises(ValueError, match="one sample, but inputs hold 3"):
        with pruning.pruned(images):
            pass


def test_other_bad_input(model, images):
    with pytest.raises(ValueError, match="n_augmentations"):
        SampleTargetedPruning(model, n_augmentations=0)
    with pytest.raises(ValueError, match="blocksize"):
        SampleTargetedPruning(model, blocksize=0)
    with pytest.raises(ValueError, match="percdamp"):
        SampleTargetedPruning(model, percdamp=-1.0)
    with pytest.raises(TypeError, match="Attribution"):
        SPADE(model)
    with pytest.raises(ValueError, match="keep the sample's shape"):
        small_pruning(model, augment=lambda s: s[:, :4]).pruned_weights(images[:1])
    with pytest.raises(ValueError, match="default augmentation is for images"):
        augmented_batch((torch.rand(1, 5),), 3)
    with pytest.raises(ValueError, match="NaN"):
        small_pruning(model).pruned_weights(images[:1] * float("nan"))
    with pytest.raises(ValueError, match="exactly one of"):
        sparsegpt_prune(torch.ones(2, 2), torch.eye(2))
    with pytest.raises(ValueError, match="does not match"):
        sparsegpt_prune(torch.ones(2, 3), torch.eye(2), sparsity=0.5)
    with pytest.raises(ValueError, match="target has 2 entries for 3 samples"):
        SPADE(Saliency(model), n_augmentations=4).attribute(images, target=[0, 1])


# --------------------------------------------------------------------------- the trojan benchmark's scores


def test_trojan_scores():
    from sklearn.metrics import roc_auc_score

    from captum_paramsal.experiments.trojan import checkerboard, paste, pointing_game, roc_auc

    generator = torch.Generator().manual_seed(9)
    scores = torch.randint(0, 5, (8, 8), generator=generator).float()  # many ties
    mask = torch.rand(8, 8, generator=generator) < 0.2
    assert roc_auc(scores, mask) == pytest.approx(roc_auc_score(mask.flatten().numpy(), scores.flatten().numpy()))
    assert roc_auc(mask.float(), mask) == 1.0 and roc_auc(torch.ones(8, 8), mask) == 0.5
    peak = torch.zeros(8, 8)
    peak[2, 3] = 1
    assert pointing_game(peak, peak.bool()) == 1.0 and pointing_game(peak, ~peak.bool()) == 0.0
    assert pointing_game(torch.zeros(8, 8), mask) == pytest.approx(float(mask.float().mean()))
    images, masks = paste(torch.zeros(5, 1, 8, 8), generator, 3)
    assert bool((masks.sum((1, 2)) == 9).all())
    for image, m in zip(images, masks):
        torch.testing.assert_close(image[0][m].view(3, 3), checkerboard(3))
        assert float(image[0][~m].abs().sum()) == 0
