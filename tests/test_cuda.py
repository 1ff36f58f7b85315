"""On CUDA: the engine against the naive loop on CPU, and the model left as found."""

from __future__ import annotations

import pytest
import torch
import torchvision

from captum_paramsal import ParameterSaliency

from naive import blockwise_rel_err, default_param_names, naive_unit_saliency, rel_err

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).double()


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (2,), generator=g)


@pytest.mark.parametrize("reduction", ["mean_abs", "mean", "rms"])
def test_resnet18_cuda_matches_naive_on_cpu(reduction):
    x, y = batch()
    cpu_model = resnet18()
    names = default_param_names(cpu_model)
    expected = naive_unit_saliency(cpu_model, (x,), y, names, reduction)

    model = resnet18().cuda()
    ps = ParameterSaliency(model, reduction=reduction)
    assert list(ps.layout.names) == names
    got = ps.attribute(x.cuda(), target=y.cuda())
    assert got.device.type == "cuda" and got.dtype == torch.float64
    got = got.cpu()
    assert rel_err(got, expected) < 1e-5
    worst, name = blockwise_rel_err(got, expected, ps.layout)
    assert worst < 1e-5, f"{name}: relative error {worst:.3e}"


def test_resnet18_cuda_fallback_params_match_naive_on_cpu():
    x, y = batch()
    names = ["conv1.weight", "bn1.weight", "bn1.bias", "layer4.1.bn2.weight", "fc.weight", "fc.bias"]
    expected = naive_unit_saliency(resnet18(), (x,), y, names)
    got = ParameterSaliency(resnet18().cuda(), params=names).attribute(x.cuda(), target=y.cuda(),
                                                                       internal_batch_size=1)
    assert rel_err(got.cpu(), expected) < 1e-5


def test_model_state_unchanged_on_cuda():
    model = resnet18().cuda().train()
    model.layer2.eval()
    model.conv1.weight.requires_grad_(False)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.5)
    model.layer1.register_forward_hook(lambda m, i, o: None)
    model.fc.register_forward_pre_hook(lambda m, i: None)
    params = [(n, p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()]
    grads = [(n, p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()]
    buffers = [(n, b.clone()) for n, b in model.named_buffers()]
    modes = [(n, m.training) for n, m in model.named_modules()]
    hooks = [(n, list(m._forward_hooks.items()), list(m._forward_pre_hooks.items()),
              list(m._backward_hooks.items())) for n, m in model.named_modules()]

    x, y = batch()
    ParameterSaliency(model, params=["conv1.weight", "bn1.weight", "fc.weight"]).attribute(
        x.cuda(), target=y.cuda())
    with pytest.raises(ValueError, match="out of range"):
        ParameterSaliency(model).attribute(x.cuda(), target=torch.tensor([0, 10], device="cuda"))

    for (n, p, value, requires_grad), (_, p2) in zip(params, model.named_parameters()):
        assert p is p2 and torch.equal(p.detach(), value) and p.requires_grad == requires_grad, n
    for (n, grad, value), (_, p) in zip(grads, model.named_parameters()):
        assert (p.grad is None) if grad is None else (p.grad is grad and torch.equal(p.grad, value)), n
    for (n, value), (_, b) in zip(buffers, model.named_buffers()):
        assert torch.equal(b, value), n
    assert modes == [(n, m.training) for n, m in model.named_modules()]
    assert hooks == [(n, list(m._forward_hooks.items()), list(m._forward_pre_hooks.items()),
                      list(m._backward_hooks.items())) for n, m in model.named_modules()]


def test_resnet18_cuda_compiled_kernels_match_naive_on_cpu():
    # ResNet-18 at 32x32 has ranks 64, 16, 4 and 1: the rank-16 and rank-4 layers go
    # through the compiled kernel (triton on CUDA)
    x, y = batch()
    expected = naive_unit_saliency(resnet18(), (x,), y, default_param_names(resnet18()))
    ps = ParameterSaliency(resnet18().cuda(), compile_kernels=True)
    got = ps.attribute(x.cuda(), target=y.cuda()).cpu()
    # the kernel ran (a silent fall back to eager would pass the comparisons below)
    assert not ps._kernels.failed, ps._kernels.failed
    assert ps._kernels.runs["low_rank_abs_mean"] > 0
    assert rel_err(got, expected) < 1e-5
    worst, name = blockwise_rel_err(got, expected, ps.layout)
    assert worst < 1e-5, f"{name}: relative error {worst:.3e}"
