"""The engine against a hostile user (issue "Trust", items 1-5): hooks that change what the model
computes, inputs modified in place, threads, and the precision of standardized neighbours.

Each quantity is checked against a per-sample autograd loop written here (or in
:mod:`tests.naive`), which includes whatever the user's hooks do, as autograd does.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_paramsal import ParameterGuidedInputSaliency, ParameterSaliency
from captum_paramsal.analysis import SaliencyIndex

from helpers import assert_unchanged, loader, snapshot
from naive import naive_boosting, naive_unit_saliency, rel_err

# -- models ---------------------------------------------------------------------------------------


class Gain(nn.Module):
    """A layer without a per-layer rule: its parameter goes to the fallback."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, width, dtype=torch.float64))

    def forward(self, x):
        return x * self.gain


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), Gain(5), nn.Tanh(), nn.Linear(5, 3)).double().eval()


def mlp_data(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


ALL = ["0.weight", "0.bias", "1.gain", "3.weight"]


# -- 1. a user's forward hook that changes a layer's output ------------------------------------------


@pytest.mark.parametrize("reduction", ["mean_abs", "mean", "rms"])
def test_forward_hook_that_changes_output_is_part_of_the_model(reduction):
    """The repro of the issue: the tap must read the gradient at the layer's own output, and the
    hook's doubling must act on everything upstream, as in autograd."""
    model = mlp()
    model[0].register_forward_hook(lambda module, args, out: 2 * out)
    model[3].register_forward_hook(lambda module, args, kwargs, out: out - 0.5 * out.mean(), with_kwargs=True)
    x, y = mlp_data()
    before = snapshot(model)
    got = ParameterSaliency(model, params=ALL, reduction=reduction).attribute(x, target=y)
    assert_unchanged(model, before)
    expected = naive_unit_saliency(model, (x,), y, ALL, reduction=reduction)
    assert rel_err(got, expected) < 1e-10


def test_forward_hook_of_the_issue_exact_ratio_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).eval()
    model[0].register_forward_hook(lambda module, inputs, out: 2 * out)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])
    got = ParameterSaliency(model, params=["0.weight"]).attribute(x, target=y)
    rows = []
    for i in range(5):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        (g,) = torch.autograd.grad(loss, model[0].weight)
        rows.append(g.abs().mean(1))
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-5, atol=0)


def test_forward_hook_that_uses_the_weight_goes_to_the_fallback_exactly():
    """A hook that reads the layer's weight uses it outside the layer's call: the rule would
    miss that use, so the probe must send the weight to the fallback, which is exact."""
    model = mlp()
    model[0].register_forward_hook(lambda module, args, out: out + 0.1 * module.weight.sum())
    x, y = mlp_data()
    ps = ParameterSaliency(model, params=ALL)
    assert "0.weight" in ps.routing(x).fallback
    got = ps.attribute(x, target=y)
    assert rel_err(got, naive_unit_saliency(model, (x,), y, ALL)) < 1e-10


def test_forward_hooks_and_input_saliency():
    """The second-order pass sees the same model: hooks included."""
    model = mlp()
    model[0].register_forward_hook(lambda module, args, out: 2 * out)
    model[1].register_forward_pre_hook(lambda module, args: (args[0] + 0.25,))
    x, y = mlp_data()
    before = snapshot(model)
    got = ParameterGuidedInputSaliency(model, params=ALL, k=3).attribute(x, target=y)
    assert_unchanged(model, before)
    expected = naive_boosting(model, x, y, ALL, k=3)
    assert rel_err(got, expected) < 1e-8


# -- 2. a user's backward hooks: one convention (autograd's) for every parameter -----------------------


def hooked_backward_model(offset: float = 0.0):
    """Backward hooks that rescale gradients; with ``offset`` one that is affine, not linear, in
    the gradient (fine for a first derivative; a second derivative runs the hooks again in the
    double backward, so there only linear hooks have one answer)."""
    model = mlp()
    model[3].register_full_backward_hook(lambda module, grad_in, grad_out: (3 * grad_in[0],))
    model[2].register_full_backward_pre_hook(lambda module, grad_out: (grad_out[0] * 0.5 + offset,))
    return model


@pytest.mark.parametrize("reduction", ["mean_abs", "rms"])
def test_backward_hooks_act_on_rule_and_fallback_parameters_alike(reduction):
    model = hooked_backward_model(offset=0.01)
    x, y = mlp_data()
    before = snapshot(model)
    ps = ParameterSaliency(model, params=ALL, reduction=reduction)
    assert ps.routing(x).fallback == ("1.gain",)
    with pytest.warns(RuntimeWarning, match="backward hooks"):
        got = ps.attribute(x, target=y, internal_batch_size=4)
    assert_unchanged(model, before)
    expected = naive_unit_saliency(model, (x,), y, ALL, reduction=reduction)
    assert rel_err(got, expected) < 1e-10
    # the hooks really change the answer: without them the fallback's column differs
    plain = naive_unit_saliency(mlp(), (x,), y, ALL, reduction=reduction)
    assert rel_err(got[:, 8:13], plain[:, 8:13]) > 0.1


def test_backward_hooks_and_input_saliency():
    model = hooked_backward_model()
    x, y = mlp_data()
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match="backward hooks"):
        got = ParameterGuidedInputSaliency(model, params=ALL, k=3).attribute(x, target=y)
    assert_unchanged(model, before)
    assert rel_err(got, naive_boosting(model, x, y, ALL, k=3)) < 1e-8


def test_no_backward_hooks_no_warning_and_vmap_path():
    model = mlp()
    x, y = mlp_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ParameterSaliency(model, params=ALL).attribute(x, target=y)
    assert rel_err(got, naive_unit_saliency(model, (x,), y, ALL)) < 1e-10


@pytest.mark.parametrize("name", ["3.weight", "1.gain"], ids=["rule", "fallback"])
def test_hook_on_a_parameter_gradient_is_refused(name):
    """``Tensor.register_hook`` on a parameter acts on the batch's summed gradient: no
    per-sample convention matches it, so the call refuses instead of ignoring it."""
    model = mlp()
    handle = dict(model.named_parameters())[name].register_hook(lambda g: 2 * g)
    x, y = mlp_data()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"{name} has a hook on its gradient"):
        ParameterSaliency(model, params=ALL).attribute(x, target=y)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="hook on its gradient"):
        ParameterGuidedInputSaliency(model, params=ALL, k=2).attribute(x, target=y)
    assert_unchanged(model, before)
    handle.remove()
    ParameterSaliency(model, params=ALL).attribute(x, target=y)  # fine once removed


# -- 3. an input modified in place after a layer used it ------------------------------------------------


class InPlaceAfterUse(nn.Module):
    def __init__(self, clone: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 3).double()
        self.fc2 = nn.Linear(4, 3).double()
        self.clone = clone

    def forward(self, a):
        a = a * 1.0
        out = self.fc1(a)
        if self.clone:
            a = a.clone()
        a.mul_(3)
        return out + self.fc2(a)


def test_input_modified_in_place_after_use_raises_like_autograd():
    model = InPlaceAfterUse(clone=False).eval()
    x, y = mlp_data()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # autograd itself
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation: input 0 of the Linear that holds fc1"):
        ParameterSaliency(model).attribute(x, target=y)
    assert_unchanged(model, before)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ParameterGuidedInputSaliency(model, k=2).attribute(x, target=y)
    assert_unchanged(model, before)


def test_input_modified_in_place_on_a_copy_is_exact():
    model = InPlaceAfterUse(clone=True).eval()
    x, y = mlp_data()
    names = ["fc1.weight", "fc2.weight"]
    got = ParameterSaliency(model, params=names).attribute(x, target=y)
    assert rel_err(got, naive_unit_saliency(model, (x,), y, names)) < 1e-10


# -- 4. threads -----------------------------------------------------------------------------------------


def conv_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 4)
    ).double()


def run_threads(functions):
    errors = []

    def guarded(fn):
        try:
            fn()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(fn,)) for fn in functions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_two_threads_on_one_model_in_train_mode():
    """The issue's case: results off, every module left in eval, BatchNorm's counters changed."""
    model = conv_net().train()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (12,), generator=g)
    before = snapshot(model)
    shared = ParameterSaliency(model)
    reference = shared.attribute(x, target=y)
    own = ParameterSaliency(model, reduction="rms")
    reference_rms = own.attribute(x, target=y)
    results = {"mean_abs": [], "rms": [], "stats": []}

    def first():
        for _ in range(6):
            results["mean_abs"].append(shared.attribute(x, target=y, internal_batch_size=5))

    def second():
        for _ in range(6):
            results["rms"].append(own.attribute(x, target=y))
            results["mean_abs"].append(shared.attribute(x[:7], target=y[:7]))

    def third():
        for _ in range(2):
            results["stats"].append(shared.fit_stats(loader(x, y, 4), progress=False))

    run_threads([first, second, third])
    assert_unchanged(model, before)
    for got in results["mean_abs"]:
        torch.testing.assert_close(got, reference[: got.shape[0]], rtol=1e-12, atol=0)
    for got in results["rms"]:
        torch.testing.assert_close(got, reference_rms, rtol=1e-12, atol=0)
    alone = shared.fit_stats(loader(x, y, 4), progress=False)
    for stats in results["stats"]:
        assert torch.equal(stats.mean, alone.mean) and torch.equal(stats.var, alone.var)


def test_plain_forward_in_another_thread_during_calls():
    """A model serving predictions while being explained: the explanations stay exact and the
    other thread's forwards are untouched by the library's hooks (the model is in eval mode,
    so eval-mode calls see nothing change)."""
    model = conv_net().eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (10,), generator=g)
    with torch.no_grad():
        served = model(x)
    before = snapshot(model)
    names = ["0.weight", "1.weight", "4.weight"]  # BatchNorm's weight: the fallback
    ps = ParameterSaliency(model, params=names)
    reference = naive_unit_saliency(model, (x,), y, names)
    stop = threading.Event()
    outputs, explained = [], []

    def serve():
        while not stop.is_set():
            with torch.no_grad():
                outputs.append(model(x))

    def explain():
        try:
            for _ in range(60):  # enough calls for the forwards to overlap them many times
                explained.append(ps.attribute(x, target=y))
        finally:
            stop.set()

    run_threads([serve, explain])
    assert_unchanged(model, before)
    assert outputs, "the serving thread never ran"
    for out in outputs:
        torch.testing.assert_close(out, served, rtol=1e-12, atol=0)
    for got in explained:
        assert rel_err(got, reference) < 1e-10


def test_forward_in_another_thread_while_the_hooks_are_on():
    """Deterministically: mid-forward of each of the library's passes (the probe, the tapped
    pass, the fallback), another thread runs the model while the library's hooks are on it.
    They must not count that thread's calls, and that thread's output must be the model's."""
    model = conv_net().eval()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)
    with torch.no_grad():
        served = model(x)
    names = ["0.weight", "1.weight", "4.weight"]  # BatchNorm's weight: the fallback
    reference = naive_unit_saliency(model, (x,), y, names)
    outputs = []

    def serve_meanwhile(module, args):
        if threading.current_thread() is threading.main_thread():
            worker = threading.Thread(target=lambda: outputs.append(model(x).detach()))  # same batch
            worker.start()
            worker.join()

    handle = model[3].register_forward_pre_hook(serve_meanwhile)  # the Flatten: mid-forward
    try:
        before = snapshot(model)
        got = ParameterSaliency(model, params=names).attribute(x, target=y)
        assert_unchanged(model, before)
    finally:
        handle.remove()
    assert len(outputs) >= 2  # the probe and the pass at least
    for out in outputs:
        torch.testing.assert_close(out, served, rtol=1e-12, atol=0)
    assert rel_err(got, reference) < 1e-10


# -- 5. nearest neighbours of a float32 model -------------------------------------------------------------


def float64_neighbours(raw, stats, queries_raw=None):
    """Each row's nearest other row by cosine of z-scores computed from the raw profiles in
    float64, written out plainly."""
    mean = stats.mean
    scale = stats.scale
    z = (raw.double() - mean) / scale
    q = z if queries_raw is None else (queries_raw.double() - mean) / scale
    sims = F.normalize(q, dim=1) @ F.normalize(z, dim=1).T
    if queries_raw is None:
        sims.fill_diagonal_(-2.0)
    return sims.argmax(1)


def test_neighbours_of_a_float32_model_are_those_of_float64():
    from captum_paramsal.zoo.digits import load_digits_model

    model, stats, data = load_digits_model()
    x, y = data.test_set()
    x, y = x[:400], y[:400]
    ps = ParameterSaliency(model, stats=stats)
    raw = ps.attribute(x, target=y, standardize=False)
    assert raw.dtype == torch.float32
    expected = float64_neighbours(raw, stats)
    # what float32 standardization gave: many neighbours differ (the test can fail)
    z32 = (raw - stats.mean.float()) / stats.scale.float()  # what standardizing in float32 gave
    u32 = F.normalize(z32, dim=1)
    sims32 = u32 @ u32.T
    sims32.fill_diagonal_(-2.0)
    assert (sims32.argmax(1) != expected).float().mean() > 0.02

    index = SaliencyIndex.from_saliency(ps, loader(x, y, 64), progress=False)
    assert index.precision == torch.float64
    _, idx = index.neighbours_of_all(1)
    assert torch.equal(idx[:, 0], expected)
    z = ps.attribute(x[:50], target=y[:50])  # the documented query route
    assert z.dtype == torch.float64
    _, found = index.search(z, m=1)
    assert torch.equal(found[:, 0], float64_neighbours(raw, stats, raw[:50]))
    assert torch.equal(ps.profile(x[:5], target=y[:5]).values, ps.attribute(x[:5], target=y[:5]))
