"""benchmarks/bench_saliency.py's peer rows (Opacus, BackPACK) on small shapes: each that runs agrees
with the naive per-sample loop; each that cannot run says why; bench_transformers.py's peers,
which share the helpers in bench_common.py, still behave as before."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("opacus")
pytest.importorskip("backpack")
pytest.importorskip("torchvision")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_saliency  # noqa: E402
import bench_transformers  # noqa: E402

from bench_common import layout_rel_diff, train_mode_where_hooked  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _case(name: str, **quick) -> bench_saliency.Case:
    from dataclasses import replace

    return replace(bench_saliency.CASES[name], **quick)


@pytest.fixture(scope="module")
def resnet_setup() -> bench_saliency.Setup:
    torch.manual_seed(0)
    return bench_saliency.build_setup(_case("resnet18", quick_size=16, quick_batch=2), "cpu", True, None)


@pytest.fixture(scope="module")
def encoder_setup() -> bench_saliency.Setup:
    return bench_saliency.build_setup(_case("encoder", quick_size=8, quick_batch=2), "cpu", True, None)


@pytest.mark.parametrize("method", ["opacus", "opacus-functorch", "backpack-fx"])
def test_peer_agrees_with_naive_on_resnet(resnet_setup, method):
    reference = bench_saliency.run_naive(resnet_setup)
    result = bench_saliency.RUNNERS[method](resnet_setup)
    assert layout_rel_diff(result, reference, resnet_setup.saliency.layout) < 1e-4
    # the copy is made once; the original model is left as it was (eval mode, every weight trainable)
    assert method in resnet_setup.copies
    assert not resnet_setup.model.training
    assert all(p.requires_grad for p in resnet_setup.model.parameters())
    assert all(not hasattr(p, "grad_sample") and p.grad is None for p in resnet_setup.model.parameters())


def test_plain_backpack_refuses_the_residual_addition(resnet_setup):
    with pytest.raises(RuntimeError, match="modified inplace") as error:
        bench_saliency.RUNNERS["backpack"](resnet_setup)
    assert bench_saliency.peer_failure(error.value).startswith("does not run: RuntimeError: Output 0 of")


def test_opacus_train_mode_only_on_hooked_layers(resnet_setup):
    wrapped, _ = bench_saliency.prepared(resnet_setup, "opacus")
    model = wrapped._module
    bn, conv = model.get_submodule("bn1"), model.get_submodule("conv1")
    assert conv.training and not bn.training and not bn.weight.requires_grad
    plain = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(0.5))
    plain[1].requires_grad_(False)
    train_mode_where_hooked(plain)
    assert [m.training for m in plain] == [True, False, False] and not plain.training


@pytest.mark.parametrize(
    ("method", "reason"),
    [
        ("opacus", "missing 2 required positional arguments: 'key' and 'value'"),
        ("opacus-functorch", "missing 2 required positional arguments: 'key' and 'value'"),
        ("backpack", "no grad_batch for 2 of 5 weights (MultiheadAttention, NonDynamicallyQuantizableLinear)"),
        ("backpack-fx", "no grad_batch for 2 of 5 weights (MultiheadAttention, NonDynamicallyQuantizableLinear)"),
    ],
)
def test_peers_do_not_run_on_the_encoder(encoder_setup, method, reason):
    with pytest.raises(Exception) as error:  # noqa: B017 - the reason is checked below
        bench_saliency.RUNNERS[method](encoder_setup)
    status = bench_saliency.peer_failure(error.value)
    assert status.startswith("does not run: ") and reason in status
    # the selected weights of the copy are left without per-sample attributes
    _, selected = encoder_setup.copies[method]
    assert all(getattr(p, "grad_sample", None) is None and not hasattr(p, "grad_batch") for p in selected)


def test_encoder_case_engine_matches_naive(encoder_setup):
    assert bench_saliency.check_engine_matches_naive(encoder_setup) < 1e-4


def test_bench_transformers_peers_unchanged():
    args = bench_transformers.parse_args(["--quick", "--seq", "8", "--batch", "2"])
    setup = bench_transformers.build_setup(bench_transformers.CASES["encoder"], "cpu", args)
    with pytest.raises(TypeError, match="'key' and 'value'"):
        bench_transformers.run_opacus(setup)
    with pytest.raises(RuntimeError, match=r"no grad_batch for 2 of 5 weights \(MultiheadAttention"):
        bench_transformers.run_backpack(setup)
    assert bench_transformers.installed("opacus") and bench_transformers.installed("naive")
