"""The generic per-sample method for every parameter that no rule covers.

``torch.func``: ``vmap(grad(loss of one sample))`` over a chunk of samples,
with only the fallback parameters differentiated, reduced to units at once so
that at most ``chunk_size`` per-sample gradients of those parameters exist.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .batching import is_per_sample, slice_batch
from .reductions import Reduction
from .selection import SelectedParameter

if TYPE_CHECKING:
    from .engine import SaliencyPass

LossFn = Callable[[Tensor, Tensor], Tensor]


@contextlib.contextmanager
def _quiet_batching_fallbacks() -> Iterator[None]:
    # vmap falls back to a loop for ops without batching rules (attention kernels);
    # that is the point of a fallback, not news for the user on every call.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        yield


@contextlib.contextmanager
def _without_backward_hooks(model: nn.Module) -> Iterator[None]:
    # A user's full backward hooks run through an autograd.Function that torch.func
    # cannot transform, and inside vmap they would see batched tensors anyway. They
    # observe the model's own backward, not our per-sample one: set them aside for the
    # functional pass and put the very same dicts back (their handles stay valid).
    saved = [(m, m._backward_hooks, m._backward_pre_hooks) for m in model.modules()]
    try:
        for m, _, _ in saved:
            m._backward_hooks = OrderedDict()
            m._backward_pre_hooks = OrderedDict()
        yield
    finally:
        for m, hooks, pre_hooks in saved:
            m._backward_hooks = hooks
            m._backward_pre_hooks = pre_hooks


def _unit_saliency_of_sample(
    model: nn.Module,
    params: Sequence[SelectedParameter],
    additional_forward_args: Tuple[Any, ...],
    per_sample_args: Sequence[int],
    loss_fn: LossFn,
    reduction: Reduction,
):
    """``f(sample, label, extras) -> (F_fallback,)``: one sample's units, for vmap."""
    reduce = reduction.reduce
    primals = {p.name: p.param.detach() for p in params}

    def sample_loss(values: Dict[str, Tensor], sample: Tuple[Tensor, ...], label: Tensor, extras) -> Tensor:
        args = list(additional_forward_args)
        for i, extra in zip(per_sample_args, extras):
            args[i] = extra.unsqueeze(0)
        output = functional_call(model, values, (*(x.unsqueeze(0) for x in sample), *args))
        return loss_fn(output, label.unsqueeze(0)).sum()

    def units(sample: Tuple[Tensor, ...], label: Tensor, extras) -> Tensor:
        grads = grad(sample_loss)(primals, sample, label, extras)
        return torch.cat([reduce(p.grouping(grads[p.name].unsqueeze(0), p.grouping_module))[0] for p in params])

    return units


@contextlib.contextmanager
def _functional_pass(model: nn.Module) -> Iterator[None]:
    """Where torch.func runs the model: no outer autograd graph, no vmap warnings, no user hooks."""
    with torch.no_grad(), _quiet_batching_fallbacks(), _without_backward_hooks(model):
        yield


def _chunks(
    inputs: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
    per_sample_args: Sequence[int],
    target: Tensor,
    chunk_size: int,
) -> Iterator[Tuple[Tuple[Tensor, ...], Tensor, Tuple[Tensor, ...], slice]]:
    """``(inputs, target, per-sample extra arguments, sample slice)`` of each chunk of samples."""
    batch = inputs[0].shape[0]
    for start in range(0, batch, chunk_size):
        stop = min(start + chunk_size, batch)
        extras = tuple(additional_forward_args[i][start:stop] for i in per_sample_args)
        yield slice_batch(inputs, batch, start, stop), target[start:stop], extras, slice(start, stop)


def fallback_unit_saliency(run: SaliencyPass, params: Sequence[SelectedParameter], target: Tensor) -> Dict[str, Tensor]:
    """``{name: (B, units)}`` for ``params``, by torch.func per-sample gradients."""
    extra = run.additional_forward_args
    per_sample_args = [i for i, a in enumerate(extra) if is_per_sample(a, run.batch)]
    units = vmap(_unit_saliency_of_sample(run.model, params, extra, per_sample_args, run.loss_fn, run.reduction))
    rows = []
    with _functional_pass(run.model):
        for chunk, labels, extras, _ in _chunks(run.inputs, extra, per_sample_args, target, run.fallback_chunk_size):
            rows.append(units(chunk, labels, extras))
    values = torch.cat(rows)
    split = torch.split(values, [p.num_units for p in params], dim=1)
    return {p.name: part for p, part in zip(params, split)}


def fallback_weighted_input_grads(
    run: SaliencyPass, params: Sequence[SelectedParameter], target: Tensor, weights: Tensor
) -> Tuple[Tensor, ...]:
    """Per sample ``d/dx_i sum_u weights[i, u] * s_i[u]`` over the fallback units (a second
    derivative: ``grad`` of a function that takes ``grad``), chunked like the saliency."""
    extra = run.additional_forward_args
    per_sample_args = [i for i, a in enumerate(extra) if is_per_sample(a, run.batch)]
    units = _unit_saliency_of_sample(run.model, params, extra, per_sample_args, run.loss_fn, run.reduction)

    def weighted(sample: Tuple[Tensor, ...], label: Tensor, extras, row: Tensor) -> Tensor:
        return (units(sample, label, extras) * row).sum()

    input_grads = vmap(grad(weighted))
    parts = []
    with _functional_pass(run.model):
        for chunk, labels, extras, samples in _chunks(run.inputs, extra, per_sample_args, target,
                                                       run.fallback_chunk_size):
            parts.append(input_grads(tuple(x.detach() for x in chunk), labels, extras, weights[samples]))
    return tuple(torch.cat([part[i] for part in parts]) for i in range(len(run.inputs)))
