"""``compile_kernels=True``: the compiled low-rank reduction (and its pull-back, in the
input saliency) against the naive loop and the eager path, their eager fallback when
compiling fails, and the argument check.

The models are small so that the handful of shapes compile in seconds: output maps of
4x4 and 2x2 positions and a 3-step sequence give ranks 16, 4 and 3 (the fused range).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import captum_paramsal.per_sample.compiled as compiled_module
from captum_paramsal import ParameterGuidedInputSaliency, ParameterSaliency

from naive import naive_unit_saliency, rel_err


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)  # 6x6 -> 4x4: rank 16
        self.b = nn.Conv2d(4, 6, 3, stride=2, padding=1)  # 4x4 -> 2x2: rank 4
        self.head = nn.Linear(6 * 4, 5)  # rank 1: closed form, not fused

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))).flatten(1))


class SequenceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 7)  # over 3 steps: rank 3
        self.head = nn.Linear(7, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)).mean(1))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Which compiled kernels answered, and whether (so a test fails if one never ran)."""
    calls = []
    real = compiled_module.CompiledKernels.run

    def counting(self, function, *tensors):
        out = real(self, function, *tensors)
        calls.append((function.__name__, out is not None))
        return out

    monkeypatch.setattr(compiled_module.CompiledKernels, "run", counting)
    return calls


@pytest.mark.parametrize(
    "make, shape, classes",
    [(SmallConvNet, (7, 3, 6, 6), 5), (SequenceNet, (7, 3, 5), 4)],
    ids=["conv", "sequence"],
)
def test_compiled_kernels_match_the_naive_loop(kernel_calls, make, shape, classes):
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, classes, (shape[0],))
    ps = ParameterSaliency(model, compile_kernels=True)
    got = ps.attribute(x, target=y, internal_batch_size=4)  # chunks of 4 and 3: one dynamic batch dim
    expected = naive_unit_saliency(model, (x,), y, list(ps.layout.names))
    assert rel_err(got, expected) < 1e-10
    assert kernel_calls and all(ok for _, ok in kernel_calls)
    eager = ParameterSaliency(model).attribute(x, target=y)
    assert rel_err(got, eager) < 1e-10


def test_compiled_kernels_in_parameter_guided_input_saliency(kernel_calls):
    torch.manual_seed(0)
    model = SmallConvNet().double()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (3,))
    eager = ParameterGuidedInputSaliency(model, k=3).attribute(x, target=y)
    compiled = ParameterGuidedInputSaliency(model, k=3, compile_kernels=True).attribute(x, target=y)
    assert rel_err(compiled, eager) < 1e-10
    assert {name for name, ok in kernel_calls if ok} == {
        "low_rank_abs_mean",  # the saliency that chooses the boosted units
        "low_rank_abs_mean_pull_back",  # its gradient
    }
    assert all(ok for _, ok in kernel_calls)


def test_a_failed_compilation_warns_once_and_falls_back_to_eager(monkeypatch):
    def compile_without_a_compiler(function, **options):
        def broken(*tensors):  # as torch.compile fails: at the first call
            raise RuntimeError("no C++ compiler here")

        return broken

    monkeypatch.setattr(compiled_module, "_wrappers", {})
    monkeypatch.setattr(compiled_module.torch, "compile", compile_without_a_compiler)
    torch.manual_seed(0)
    model = SmallConvNet().double()
    x, y = torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (4,))
    ps = ParameterSaliency(model, compile_kernels=True)
    with pytest.warns(RuntimeWarning, match="torch.compile failed on cpu.*no C\\+\\+ compiler"):
        got = ps.attribute(x, target=y)
    assert list(ps._kernels.failed) == [("low_rank_abs_mean", "cpu")]  # given up: no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = ps.attribute(x, target=y)
    expected = naive_unit_saliency(model, (x,), y, list(ps.layout.names))
    assert rel_err(got, expected) < 1e-10 and rel_err(again, expected) < 1e-10

    with pytest.warns(RuntimeWarning, match="instead of low_rank_abs_mean_pull_back"):
        boosted = ParameterGuidedInputSaliency(model, k=3, compile_kernels=True).attribute(x, target=y)
    assert rel_err(boosted, ParameterGuidedInputSaliency(model, k=3).attribute(x, target=y)) < 1e-10


def test_compile_kernels_must_be_a_bool_or_auto():
    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match="compile_kernels must be True, False or 'auto'"):
            ParameterSaliency(SmallConvNet(), compile_kernels=bad)


def test_auto_is_eager_until_its_passes_took_the_price_then_compiled(kernel_calls, monkeypatch):
    torch.manual_seed(0)
    model = SmallConvNet().double()
    x, y = torch.randn(6, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (6,))
    ps = ParameterSaliency(model)  # the default: "auto"
    expected = naive_unit_saliency(model, (x,), y, list(ps.layout.names))
    assert ps.compile_kernels == "auto" and not ps.compiles_next
    assert rel_err(ps.attribute(x, target=y), expected) < 1e-10
    assert kernel_calls == [] and ps._kernels.eager_seconds > 0  # eager, and its time counted
    # a long call crosses the price on the way: its first pass eager, the next two compiled
    monkeypatch.setattr(compiled_module, "AUTO_AFTER_SECONDS", {"warm": 1e-9, "cold": 1e-9})
    fresh = ParameterSaliency(model)
    assert not fresh.compiles_next  # nothing spent yet
    got = fresh.attribute(x, target=y, internal_batch_size=2)
    assert rel_err(got, expected) < 1e-10
    assert fresh.compiles_next and kernel_calls and all(ok for _, ok in kernel_calls)
    calls_of_one_pass = len(kernel_calls) // 2
    assert calls_of_one_pass > 0 and len(kernel_calls) == 2 * calls_of_one_pass
    # the input saliency sharing it shares its state (the kernels, what was spent)
    boosting = ParameterGuidedInputSaliency(model, k=3, parameter_saliency=fresh)
    assert boosting.compiles_next
    # False stays eager whatever was spent
    never = ParameterSaliency(model, compile_kernels=False)
    never._kernels.eager_seconds = 1e6
    assert not never.compiles_next


def test_compiled_kernels_under_no_grad_and_in_noise_tunnel(kernel_calls):
    from captum.attr import NoiseTunnel

    torch.manual_seed(0)
    model = SmallConvNet().double()
    x, y = torch.randn(3, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (3,))
    compiled, eager = ParameterSaliency(model, compile_kernels=True), ParameterSaliency(model)
    with torch.no_grad():
        assert rel_err(compiled.attribute(x, target=y), eager.attribute(x, target=y)) < 1e-10
    kwargs = dict(nt_type="smoothgrad", nt_samples=4, stdevs=0.1, target=y)
    torch.manual_seed(1)
    smoothed = NoiseTunnel(compiled).attribute(x, **kwargs)
    torch.manual_seed(1)
    assert rel_err(smoothed, NoiseTunnel(eager).attribute(x, **kwargs)) < 1e-10
    assert kernel_calls and all(ok for _, ok in kernel_calls)


def test_a_failed_compilation_stays_with_its_method(monkeypatch):
    """Where one method's compile failed, another method still compiles: the failure is
    that method's state, not a switch of the process."""
    real_compile = torch.compile
    broken_once = []

    def compile_failing_first(function, **options):
        if not broken_once:
            broken_once.append(function.__name__)

            def broken(*tensors):
                raise RuntimeError("no C++ compiler here")

            return broken
        return real_compile(function, **options)

    monkeypatch.setattr(compiled_module, "_wrappers", {})
    monkeypatch.setattr(compiled_module.torch, "compile", compile_failing_first)
    torch.manual_seed(0)
    model = SmallConvNet().double()
    x, y = torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (4,))
    first = ParameterSaliency(model, compile_kernels=True)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        first.attribute(x, target=y)
    monkeypatch.setattr(compiled_module, "_wrappers", {})  # a fresh wrapper, which now compiles
    second = ParameterSaliency(model, compile_kernels=True)
    before = compiled_module.run_counts().get("low_rank_abs_mean", 0)
    got = second.attribute(x, target=y)
    assert compiled_module.run_counts()["low_rank_abs_mean"] > before
    assert second._kernels.runs["low_rank_abs_mean"] > 0 and not second._kernels.failed
    assert first._kernels.failed and first._kernels.runs["low_rank_abs_mean"] == 0
    assert rel_err(got, naive_unit_saliency(model, (x,), y, list(second.layout.names))) < 1e-10
