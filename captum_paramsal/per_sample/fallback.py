"""The generic per-sample method for every parameter that no rule covers.

``torch.func``: ``vmap(grad(loss of one sample))`` over a chunk of samples,
with only the fallback parameters differentiated, reduced to units at once so
that at most ``chunk_size`` per-sample gradients of those parameters exist.

The second derivative (:func:`fallback_weighted_input_grads`) differentiates that with
respect to the sample, or, given a layer, with respect to a zero offset that a forward
hook adds to the layer's output (the layer's own parameters keep their graph).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from .._utils import outside_stacklevel
from .batching import is_per_sample, slice_batch
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


class _Extras:
    """The model's extra arguments (positional and keyword) split into the per-sample tensors,
    which vmap maps over, and everything else, which every sample shares."""

    def __init__(self, run: SaliencyPass) -> None:
        batch = run.batch
        self.args = run.additional_forward_args
        self.kwargs = dict(run.forward_kwargs)
        self.keys = [("a", i) for i, a in enumerate(self.args) if is_per_sample(a, batch)]
        self.keys += [("k", k) for k, v in self.kwargs.items() if is_per_sample(v, batch)]

    def per_sample(self, start: int, stop: int) -> Dict[str, Tensor]:
        """``{key: samples start:stop}`` of every per-sample extra argument."""
        return {f"{kind}:{key}": (self.args[key] if kind == "a" else self.kwargs[key])[start:stop]
                for kind, key in self.keys}

    def call_arguments(self, one: Dict[str, Tensor]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        """``(args, kwargs)`` of one sample, its per-sample tensors given (without the batch dim)."""
        args, kwargs = list(self.args), dict(self.kwargs)
        for kind, key in self.keys:
            value = one[f"{kind}:{key}"].unsqueeze(0)
            if kind == "a":
                args[key] = value
            else:
                kwargs[key] = value
        return tuple(args), kwargs


@contextlib.contextmanager
def _offset_output(layer: Optional[nn.Module], offset: Optional[Tensor]) -> Iterator[None]:
    """Inside: ``layer``'s output (one sample's, batch dim of 1) plus ``offset``; nothing
    where either is None. The layer must be called once."""
    if layer is None or offset is None:
        yield
        return
    calls = [0]

    def add(module: nn.Module, args: Any, output: Any) -> Any:
        calls[0] += 1
        if calls[0] > 1 or not isinstance(output, Tensor):
            raise RuntimeError(
                f"layer= ({type(module).__name__}) must be called once per forward and return one Tensor"
            )
        return output + offset.unsqueeze(0)

    handle = layer.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


def _unit_saliency_of_sample(
    run: SaliencyPass, params: Sequence[SelectedParameter], extras: _Extras, layer: Optional[nn.Module] = None
):
    """``f(sample, label, extras, offset=None) -> (F_fallback,)``: one sample's units, for vmap;
    ``offset`` is added to ``layer``'s output."""
    reduce = run.reduction.reduce
    primals = {p.name: p.param.detach() for p in params}

    def sample_loss(
        values: Dict[str, Tensor], sample: Tuple[Tensor, ...], label: Tensor, one, offset: Optional[Tensor]
    ) -> Tensor:
        args, kwargs = extras.call_arguments(one)
        with _offset_output(layer, offset):
            output = functional_call(run.model, values, (*(x.unsqueeze(0) for x in sample), *args), kwargs)
        return run.loss_fn(run.output_fn(output), label.unsqueeze(0)).sum()

    def units(sample: Tuple[Tensor, ...], label: Tensor, one, offset: Optional[Tensor] = None) -> Tensor:
        grads = grad(sample_loss)(primals, sample, label, one, offset)
        return torch.cat([reduce(p.grouping(grads[p.name].unsqueeze(0), p.grouping_module))[0] for p in params])

    return units


def _without_vmap(function: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``function`` applied to one sample of each batched argument at a time (what vmap
    computes, in a Python loop): for models whose forward vmap cannot trace."""

    def looped(*batched: Any) -> Any:
        count = batched[1].shape[0]  # the labels: one per sample
        rows = [function(*(tree_map(lambda t, i=i: t[i], value) for value in batched)) for i in range(count)]
        if isinstance(rows[0], tuple):  # input gradients: one per input
            return tuple(torch.stack(parts) for parts in zip(*rows))
        return torch.stack(rows)

    return looped


def _vmapped(function: Callable[..., Tensor], params: Sequence[SelectedParameter], what: str):
    """``vmap(function)``, or where vmap cannot trace the model (data-dependent control flow,
    an op without a batching rule that also fails unbatched ...), the same in a loop over
    samples after one warning that names the parameters; an error naming them where that
    fails too."""
    mapped = vmap(function)
    state = {"loop": False}

    def run(*batched: Any) -> Tensor:
        if not state["loop"]:
            try:
                return mapped(*batched)
            except Exception as error:  # noqa: BLE001 - which errors vmap raises is not documented
                names = ", ".join(p.name for p in params[:4]) + (", ..." if len(params) > 4 else "")
                warnings.warn(
                    f"the torch.func fallback for {names} could not vmap the model ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:200]}); computing their {what} one sample at a time, exactly but "
                    "slowly. Select parameters that per-layer rules cover to avoid it (see .routing(inputs)).",
                    RuntimeWarning,
                    stacklevel=outside_stacklevel(),
                )
                state["loop"] = True
        try:
            return _without_vmap(function)(*batched)
        except Exception as error:
            names = ", ".join(p.name for p in params)
            raise RuntimeError(
                f"the torch.func fallback could not compute the per-sample {what} of {names}: {error}. These "
                "parameters have no per-layer rule (see .routing(inputs)); leave them out of params=, or "
                "register a rule for their layer (captum_paramsal.per_sample.register_rule)"
            ) from error

    return run


@contextlib.contextmanager
def _functional_pass(model: nn.Module) -> Iterator[None]:
    """Where torch.func runs the model: no outer autograd graph, no vmap warnings, no user hooks."""
    with torch.no_grad(), _quiet_batching_fallbacks(), _without_backward_hooks(model):
        yield


def _chunks(run: SaliencyPass, extras: _Extras, target: Tensor):
    """``(inputs, target, per-sample extra arguments, sample slice)`` of each chunk of samples."""
    batch = run.batch
    for start in range(0, batch, run.fallback_chunk_size):
        stop = min(start + run.fallback_chunk_size, batch)
        yield slice_batch(run.inputs, batch, start, stop), target[start:stop], extras.per_sample(start, stop), slice(
            start, stop
        )


def fallback_unit_saliency(run: SaliencyPass, params: Sequence[SelectedParameter], target: Tensor) -> Dict[str, Tensor]:
    """``{name: (B, units)}`` for ``params``, by torch.func per-sample gradients."""
    extras = _Extras(run)
    units = _vmapped(_unit_saliency_of_sample(run, params, extras), params, "gradients")
    rows = []
    with _functional_pass(run.model):
        for chunk, labels, per_sample, _ in _chunks(run, extras, target):
            rows.append(units(chunk, labels, per_sample))
    values = torch.cat(rows)
    split = torch.split(values, [p.num_units for p in params], dim=1)
    return {p.name: part for p, part in zip(params, split)}


def fallback_weighted_input_grads(
    run: SaliencyPass,
    params: Sequence[SelectedParameter],
    target: Tensor,
    weights: Tensor,
    at_layer: Optional[Tuple[nn.Module, Tensor]] = None,
) -> Tuple[Tensor, ...]:
    """Per sample ``d/dx_i sum_u weights[i, u] * s_i[u]`` over the fallback units (a second
    derivative: ``grad`` of a function that takes ``grad``), chunked like the saliency.

    With ``at_layer = (layer, like)`` the derivative is taken with respect to ``layer``'s
    output instead (``like``: a tensor of that output's shape, dtype and device, ``(B, ...)``),
    and the result is a 1-tuple of that shape.
    """
    extras = _Extras(run)
    layer = None if at_layer is None else at_layer[0]
    units = _unit_saliency_of_sample(run, params, extras, layer)

    def weighted(sample: Tuple[Tensor, ...], label: Tensor, one, row: Tensor, *offset: Tensor) -> Tensor:
        return (units(sample, label, one, *offset) * row).sum()

    if at_layer is None:
        input_grads = _vmapped(grad(weighted), params, "input gradients")
    else:  # the offset last: the loop without vmap counts the samples by the labels, argument 1
        input_grads = _vmapped(grad(weighted, argnums=4), params, "gradients at the layer's output")
    parts = []
    with _functional_pass(run.model):
        for chunk, labels, per_sample, samples in _chunks(run, extras, target):
            chunk = tuple(x.detach() for x in chunk)
            if at_layer is None:
                parts.append(input_grads(chunk, labels, per_sample, weights[samples]))
            else:
                offset = torch.zeros_like(at_layer[1][samples])
                parts.append((input_grads(chunk, labels, per_sample, weights[samples], offset),))
    count = len(run.inputs) if at_layer is None else 1
    return tuple(torch.cat([part[i] for part in parts]) for i in range(count))
