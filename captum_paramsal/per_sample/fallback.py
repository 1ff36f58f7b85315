"""The generic per-sample method for every parameter that no rule covers.

``torch.func``: ``vmap(grad(loss of one sample))`` over a chunk of samples,
with only the fallback parameters differentiated, reduced to units at once so
that at most ``chunk_size`` per-sample gradients of those parameters exist.

The second derivative (:func:`fallback_weighted_input_grads`) differentiates that with
respect to the sample, or, given a layer, with respect to a zero offset that a forward
hook adds to the layer's output (the layer's own parameters keep their graph).

A model with backward hooks takes plain autograd instead, one sample at a time: torch.func
cannot run the hooks, and what a hook does to the gradients is part of autograd's result,
as it is of the rule-routed parameters' (their taps see the hooked gradients).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from .._utils import outside_stacklevel
from .batching import is_per_sample, slice_batch
from .hooks import hook_forward
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


def has_backward_hooks(model: nn.Module) -> bool:
    """Whether a backward hook (full or not, pre or post, the module's own or global) may act
    on the gradients of ``model``'s forward."""
    from torch.nn.modules import module as torch_module

    global_hooks = torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks
    return bool(global_hooks) or any(m._backward_hooks or m._backward_pre_hooks for m in model.modules())


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

    handle = hook_forward(layer, add)
    try:
        yield
    finally:
        handle.remove()


def _unit_saliency_of_sample(
    run: SaliencyPass,
    params: Sequence[SelectedParameter],
    extras: _Extras,
    layer: Optional[nn.Module] = None,
    by_autograd: bool = False,
):
    """``f(sample, label, extras, offset=None) -> (F_fallback,)``: one sample's units, for vmap;
    ``offset`` is added to ``layer``'s output. With ``by_autograd`` the parameter gradient is
    taken by plain autograd instead of ``torch.func.grad`` (for a model whose backward hooks
    must apply, which torch.func cannot run), keeping its graph where ``sample`` or ``offset``
    requires grad (a second derivative)."""
    reduce = run.reduction.reduce
    primals = {p.name: p.param.detach() for p in params}

    def sample_loss(
        values: Dict[str, Tensor], sample: Tuple[Tensor, ...], label: Tensor, one, offset: Optional[Tensor]
    ) -> Tensor:
        args, kwargs = extras.call_arguments(one)
        with _offset_output(layer, offset):
            output = functional_call(run.model, values, (*(x.unsqueeze(0) for x in sample), *args), kwargs)
        return run.loss_fn(run.output_fn(output), label.unsqueeze(0)).sum()

    def autograd_grads(sample: Tuple[Tensor, ...], label: Tensor, one, offset: Optional[Tensor]) -> Dict[str, Tensor]:
        values = {name: value.clone().requires_grad_() for name, value in primals.items()}
        differentiable = any(x.requires_grad for x in sample) or (offset is not None and offset.requires_grad)
        with torch.enable_grad():
            loss = sample_loss(values, sample, label, one, offset)
            found = torch.autograd.grad(loss, list(values.values()), create_graph=differentiable, allow_unused=True)
        return {name: torch.zeros_like(values[name]) if g is None else g for name, g in zip(values, found)}

    def units(sample: Tuple[Tensor, ...], label: Tensor, one, offset: Optional[Tensor] = None) -> Tensor:
        if by_autograd:
            grads = autograd_grads(sample, label, one, offset)
        else:
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


def _looped(function: Callable[..., Tensor], params: Sequence[SelectedParameter], what: str):
    """``function`` one sample at a time (:func:`_without_vmap`), with an error naming ``params``
    where it fails."""
    looped = _without_vmap(function)

    def run(*batched: Any) -> Tensor:
        try:
            return looped(*batched)
        except Exception as error:
            names = ", ".join(p.name for p in params)
            raise RuntimeError(
                f"the torch.func fallback could not compute the per-sample {what} of {names}: {error}. These "
                "parameters have no per-layer rule (see .routing(inputs)); leave them out of params=, or "
                "register a rule for their layer (captum_paramsal.per_sample.register_rule)"
            ) from error

    return run


def _vmapped(function: Callable[..., Tensor], params: Sequence[SelectedParameter], what: str):
    """``vmap(function)``, or where vmap cannot trace the model (data-dependent control flow,
    an op without a batching rule that also fails unbatched ...), the same in a loop over
    samples after one warning that names the parameters; an error naming them where that
    fails too."""
    mapped = vmap(function)
    looped = _looped(function, params, what)
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
        return looped(*batched)

    return run


@contextlib.contextmanager
def _functional_pass(by_autograd: bool) -> Iterator[None]:
    """Where the fallback runs the model: torch.func without an outer autograd graph and
    without vmap's warnings; or, ``by_autograd``, with grad enabled for plain autograd."""
    with (torch.enable_grad() if by_autograd else torch.no_grad()), _quiet_batching_fallbacks():
        yield


def _by_autograd(run: SaliencyPass, params: Sequence[SelectedParameter]) -> bool:
    """Whether the fallback must take plain autograd, one sample at a time: when the model has
    backward hooks. A hook may rescale the gradients it sees, and autograd's result includes
    that (as the rule-routed parameters' does: their taps see the hooked gradient); torch.func
    cannot run the hooks' autograd.Function, and setting them aside would mix two conventions
    in one profile."""
    if not has_backward_hooks(run.model):
        return False
    names = ", ".join(p.name for p in params[:4]) + (", ..." if len(params) > 4 else "")
    warnings.warn(
        f"the model has backward hooks: the parameters without a per-layer rule ({names}) are computed "
        "one sample at a time by plain autograd, so that the hooks act on them as in autograd (torch.func "
        "cannot run backward hooks); exact but slower",
        RuntimeWarning,
        stacklevel=outside_stacklevel(),
    )
    return True


def _autograd_derivative(function: Callable[..., Tensor], argnums: int) -> Callable[..., Any]:
    """``torch.func.grad(function, argnums)`` by plain autograd, for one sample: argument 0 is
    a tuple of tensors (the gradient is a tuple), any other argument one tensor."""

    def derivative(*args: Any) -> Any:
        args = list(args)
        wrt = args[argnums] if argnums == 0 else (args[argnums],)
        leaves = tuple(x.detach().requires_grad_() if x.is_floating_point() else x for x in wrt)
        args[argnums] = leaves if argnums == 0 else leaves[0]
        with torch.enable_grad():
            value = function(*args)
            differentiable = [x for x in leaves if x.requires_grad]
            found = iter(torch.autograd.grad(value, differentiable, allow_unused=True))
        grads = tuple(_or_zeros(next(found), x) if x.requires_grad else torch.zeros_like(x) for x in leaves)
        return grads if argnums == 0 else grads[0]

    return derivative


def _or_zeros(value: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if value is None else value


def _chunks(run: SaliencyPass, extras: _Extras, target: Tensor):
    """``(inputs, target, per-sample extra arguments, sample slice)`` of each chunk of samples."""
    batch = run.batch
    for start in range(0, batch, run.fallback_chunk_size):
        stop = min(start + run.fallback_chunk_size, batch)
        yield slice_batch(run.inputs, batch, start, stop), target[start:stop], extras.per_sample(start, stop), slice(
            start, stop
        )


def fallback_unit_saliency(run: SaliencyPass, params: Sequence[SelectedParameter], target: Tensor) -> Dict[str, Tensor]:
    """``{name: (B, units)}`` for ``params``, by torch.func per-sample gradients (plain autograd
    where the model has backward hooks)."""
    extras = _Extras(run)
    by_autograd = _by_autograd(run, params)
    units = _unit_saliency_of_sample(run, params, extras, by_autograd=by_autograd)
    units = _looped(units, params, "gradients") if by_autograd else _vmapped(units, params, "gradients")
    rows = []
    with _functional_pass(by_autograd):
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
    by_autograd = _by_autograd(run, params)
    units = _unit_saliency_of_sample(run, params, extras, layer, by_autograd)

    def weighted(sample: Tuple[Tensor, ...], label: Tensor, one, row: Tensor, *offset: Tensor) -> Tensor:
        return (units(sample, label, one, *offset) * row).sum()

    # the offset last: the loop without vmap counts the samples by the labels, argument 1
    argnums, what = (0, "input gradients") if at_layer is None else (4, "gradients at the layer's output")
    if by_autograd:
        input_grads = _looped(_autograd_derivative(weighted, argnums), params, what)
    else:
        input_grads = _vmapped(grad(weighted, argnums=argnums), params, what)
    parts = []
    with _functional_pass(by_autograd):
        for chunk, labels, per_sample, samples in _chunks(run, extras, target):
            chunk = tuple(x.detach() for x in chunk)
            if at_layer is None:
                parts.append(input_grads(chunk, labels, per_sample, weights[samples]))
            else:
                offset = torch.zeros_like(at_layer[1][samples])
                parts.append((input_grads(chunk, labels, per_sample, weights[samples], offset),))
    count = len(run.inputs) if at_layer is None else 1
    return tuple(torch.cat([part[i] for part in parts]) for i in range(count))
