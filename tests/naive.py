"""The shared naive reference: per-sample unit saliency, and the input saliency built on it, by
a plain loop over samples.

One forward and one ``torch.autograd.grad`` per sample, nothing clever, so that the
engine's batched per-layer rules and its fallback can be checked against it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _owner(model: nn.Module, name: str) -> nn.Module:
    if "." not in name:
        return model
    return model.get_submodule(name.rsplit(".", 1)[0])


def _units(model: nn.Module, name: str, grad: Tensor) -> Tensor:
    """``(units, entries_per_unit)`` of one sample's gradient of parameter ``name``."""
    owner = _owner(model, name)
    if isinstance(owner, CONV_TRANSPOSE) and name.endswith("weight"):
        # weight (C_in, C_out/groups, *k): unit = output channel o, in group o // (C_out/groups)
        c_in, out_per_group = grad.shape[0], grad.shape[1]
        in_per_group = c_in // owner.groups
        units = []
        for o in range(out_per_group * owner.groups):
            gi = o // out_per_group
            units.append(grad[gi * in_per_group:(gi + 1) * in_per_group, o % out_per_group].reshape(-1))
        return torch.stack(units)
    if grad.dim() == 0:
        return grad.reshape(1, 1)
    return grad.reshape(grad.shape[0], -1)


def _reduce(units: Tensor, reduction: str) -> Tensor:
    """One value per row of ``units``."""
    if reduction == "mean_abs":
        return units.abs().mean(dim=1)
    if reduction == "mean":
        return units.mean(dim=1)
    if reduction == "rms":
        return units.pow(2).mean(dim=1).sqrt()
    raise ValueError(reduction)


def naive_unit_saliency(
    model: nn.Module,
    inputs_tuple: Tuple[Tensor, ...],
    target: Optional[Tensor],
    params_names: Sequence[str],
    reduction: str = "mean_abs",
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    additional_forward_args: Any = (),
) -> Tensor:
    """``(B, F)`` saliency, columns: ``params_names`` in ``model.named_parameters()`` order.

    ``target=None`` uses each sample's predicted class (argmax of the model's output).
    """
    if loss_fn is None:
        loss_fn = lambda out, y: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    if additional_forward_args is None:
        additional_forward_args = ()
    if not isinstance(additional_forward_args, tuple):
        additional_forward_args = (additional_forward_args,)
    named = dict(model.named_parameters())
    wanted = set(params_names)
    names = [n for n in named if n in wanted]
    assert len(names) == len(wanted), f"unknown names: {wanted - set(names)}"
    params = [named[n] for n in names]
    batch = inputs_tuple[0].shape[0]

    modes = [(m, m.training) for m in model.modules()]
    grad_flags = [p.requires_grad for p in params]
    rows = []
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
        if target is None:
            with torch.no_grad():
                target = model(*inputs_tuple, *additional_forward_args).argmax(dim=1)
        for i in range(batch):
            xs = tuple(x[i:i + 1] for x in inputs_tuple)
            args = tuple(
                a[i:i + 1] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == batch else a
                for a in additional_forward_args
            )
            with torch.enable_grad():
                loss = loss_fn(model(*xs, *args), target[i:i + 1]).sum()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            row = []
            for name, p, g in zip(names, params, grads):
                if g is None:
                    g = torch.zeros_like(p)
                row.append(_reduce(_units(model, name, g.detach()), reduction))
            rows.append(torch.cat(row))
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in zip(params, grad_flags):
            p.requires_grad_(flag)
    return torch.stack(rows)


def naive_boosting(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    names: Sequence[str],
    k: int = 10,
    boost: float = 100.0,
    stats: Any = None,
    units: Optional[Sequence[Sequence[int]]] = None,
    reduction: str = "mean_abs",
) -> Tensor:
    """The input saliency by a plain loop: per sample (in eval mode), its profile over ``names``
    with ``create_graph``, standardized by ``stats`` when given, the top-``k`` units (or
    ``units[i]``, columns) multiplied by ``boost``, and the gradient of the cosine between the
    profile and its boosted copy with respect to the sample."""
    params = dict(model.named_parameters())
    modes = [(m, m.training) for m in model.modules()]
    rows = []
    try:
        model.eval()
        for i in range(x.shape[0]):
            xi = x[i : i + 1].clone().requires_grad_(True)
            loss = F.cross_entropy(model(xi), y[i : i + 1])
            grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
            s = torch.cat([_reduce(_units(model, n, g), reduction) for n, g in zip(names, grads)])
            z = (s - stats.mean) / stats.scale if stats is not None else s
            chosen = z.detach().topk(k).indices if units is None else torch.tensor(units[i])
            b = z.detach().clone()
            b[chosen] = b[chosen] * boost
            objective = F.cosine_similarity(z, b, dim=0)
            rows.append(torch.autograd.grad(objective, xi)[0])
    finally:
        for m, training in modes:
            m.training = training
    return torch.cat(rows)


DEFAULT_TYPES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
)


def default_param_names(model: nn.Module) -> list:
    """The default selection (docs/METHOD.md): the weight of every Conv*/ConvTranspose*/Linear
    and the in-projection weights of every MultiheadAttention, in ``named_parameters()`` order
    (a shared weight appears once, under its first name)."""
    weights = {id(m.weight) for m in model.modules() if isinstance(m, DEFAULT_TYPES)}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if isinstance(getattr(m, attr, None), nn.Parameter):
                    weights.add(id(getattr(m, attr)))
    return [name for name, p in model.named_parameters() if id(p) in weights]


def rel_err(got: Tensor, expected: Tensor) -> float:
    """``max|got - expected| / max|expected|``; refuses an all-zero reference."""
    scale = expected.abs().max()
    assert scale > 0, "the reference is all zeros: the comparison could not fail"
    return float((got - expected).abs().max() / scale)


def blockwise_rel_err(got: Tensor, expected: Tensor, layout) -> Tuple[float, str]:
    """The worst :func:`rel_err` over the layout's parameters (each block against its own
    scale, so a wrong small-gradient layer is not hidden by a large one), and its name.
    A block's scale is floored at 1e-8 of the whole reference's: a block that is zero up to
    rounding (a signed mean that cancels) is then held to an absolute error of 1e-13 of it."""
    worst, worst_name = 0.0, ""
    total_scale = expected.abs().max()
    assert total_scale > 0, "the reference is all zeros: the comparison could not fail"
    for entry in layout:
        a, b = got[:, entry.slice], expected[:, entry.slice]
        scale = max(b.abs().max(), 1e-8 * total_scale)
        err = float((a - b).abs().max() / scale)
        if err > worst or not worst_name:
            worst, worst_name = err, entry.name
    return worst, worst_name
