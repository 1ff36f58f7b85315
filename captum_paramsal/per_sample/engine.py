"""Per-sample unit saliency of a batch: one tapped forward and one backward.

Forward hooks on the modules that own rule-routed parameters keep each call's
input and tap its output (:mod:`.tap`). The backward hands each tap the
gradient at that output; the module's rule turns (input, output gradient) into
per-sample gradients of its parameters, calls of the same module are summed,
and after the last call the sum is grouped into units, reduced and freed. No
whole-model per-sample gradient is ever held. Parameters the probe did not
route to rules go through :mod:`.fallback`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .fallback import LossFn, fallback_unit_saliency
from .grads import PerSampleGrad
from .reduce import REDUCTIONS
from .registry import default_grouping, find_rule
from .routing import ParameterUseWatch, Routing
from .selection import SelectedParameter, Selection
from .tap import GradTap, new_anchor

#: ``resolve_target(output) -> target`` (validated, one entry per sample)
TargetResolver = Callable[[Tensor], Tensor]


#: Per-sample gradients are built this many values at a time (a chunk of samples),
#: so a layer of 2M weights at batch 64 never needs half a gigabyte at once.
WORKSPACE_VALUES = 1 << 22

#: On CPU the rules run after the backward rather than inside it, in batches of layers
#: whose saved (input, output gradient) pairs take up to this many bytes: a rule's matmuls
#: interleaved with the backward's convolutions evict each other's data from the caches,
#: which cost about a tenth of the engine's time on resnet18 (benchmarks/bench_saliency.py).
#: On other devices kernels run asynchronously and each layer is reduced and freed at once.
DEFERRED_BYTES = {"cpu": 256 << 20}


@dataclass(frozen=True)
class LayerCall:
    """What one call of a rule-covered layer saw: its input and the gradient at its output."""

    module: nn.Module
    attr: str
    activation: Tensor
    grad_output: Tensor

    def per_sample_grad(self, start: int = 0, stop: Optional[int] = None, detach: bool = False) -> PerSampleGrad:
        """The rule's lazy per-sample gradient for samples ``start:stop`` of this call."""
        activation, grad_output = self.activation[start:stop], self.grad_output[start:stop]
        if detach:
            activation, grad_output = activation.detach(), grad_output.detach()
        rule = find_rule(self.module, self.attr)
        return rule(self.module, activation, grad_output, frozenset([self.attr]))[self.attr]


@dataclass
class _Accumulator:
    """The per-sample gradients (or raw calls) of one parameter from each call seen so far."""

    param: SelectedParameter
    calls: int = 0
    grads: List[PerSampleGrad] = field(default_factory=list)
    raw: List[LayerCall] = field(default_factory=list)
    unusable: bool = False


class _Workspace:
    """What the layers of one pass share: a scratch buffer, grown on demand, and whether
    to reduce with compiled kernels (:mod:`.fused`).

    One buffer, touched once, instead of a fresh allocation per chunk: on CPU the page
    faults of fresh multi-megabyte allocations cost more than the matmuls that fill them.
    """

    def __init__(self, fused: bool = False) -> None:
        self.fused = fused
        self._buffers: Dict[Tuple[torch.dtype, torch.device], Tensor] = {}

    def get(self, values: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        buffer = self._buffers.get((dtype, device))
        if buffer is None or buffer.numel() < values:
            buffer = torch.empty(values, dtype=dtype, device=device)
            self._buffers[(dtype, device)] = buffer
        return buffer[:values]


def _closed_form(p: SelectedParameter, grads: List[PerSampleGrad], reduction: str) -> Optional[Tensor]:
    """The units of all samples without building the gradient, where the structure allows:
    units along index 0, and one call (or any number, for the linear signed mean)."""
    if not grads or not _closed_form_applies(p, grads, reduction):
        return None
    batch = grads[0].batch
    parts = [g.unit_reduce(reduction, 0, batch) for g in grads]
    return sum(parts[1:], parts[0])


def samples_per_chunk(p: SelectedParameter, grads: List[PerSampleGrad], reduction: str) -> int:
    """How many samples a chunk may hold: all when a closed form applies, else a workspace's worth."""
    if _closed_form_applies(p, grads, reduction):
        return grads[0].batch if grads else 1
    return max(1, WORKSPACE_VALUES // max(1, p.param.numel()))


def _closed_form_applies(p: SelectedParameter, grads: List[PerSampleGrad], reduction: str) -> bool:
    return (
        p.grouping is default_grouping
        and (len(grads) == 1 or reduction == "mean")
        and all(g.has_closed_form(reduction) for g in grads)
    )


def _reduce_calls(
    p: SelectedParameter, grads: List[PerSampleGrad], batch: int, reduction: str, workspace: _Workspace
) -> Tensor:
    """``(B, units)`` of the sum of ``grads`` over calls, a chunk of samples at a time."""
    if not grads:
        return torch.zeros(batch, p.num_units, dtype=p.param.dtype, device=p.param.device)
    reduce = REDUCTIONS[reduction]
    closed = _closed_form(p, grads, reduction)
    if closed is not None:
        return closed
    fused = _fused(p, grads, batch, reduction) if workspace.fused else None
    if fused is not None:
        return fused
    numel = max(1, p.param.numel())
    chunk = max(1, WORKSPACE_VALUES // numel)
    buffer = workspace.get(min(chunk, batch) * numel, p.param.dtype, p.param.device)
    rows = []
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        dense = grads[0].materialize(start, stop, buffer[: (stop - start) * numel])
        for g in grads[1:]:
            dense = dense + g.materialize(start, stop)
        rows.append(reduce(p.grouping(dense, p.grouping_module), in_place=not dense.requires_grad))
    return torch.cat(rows) if len(rows) > 1 else rows[0]


def _fused(p: SelectedParameter, grads: List[PerSampleGrad], batch: int, reduction: str) -> Optional[Tensor]:
    """The units by the compiled kernel, chunked to a workspace's worth of factors; None
    where it does not apply (or compiling failed)."""
    if len(grads) != 1 or p.grouping is not default_grouping or not grads[0].can_fuse(reduction):
        return None
    g = grads[0]
    chunk = max(1, WORKSPACE_VALUES // g.fused_values_per_sample())
    rows = []
    for start in range(0, batch, chunk):
        part = g.fused_unit_reduce(reduction, start, min(start + chunk, batch))
        if part is None:
            return None
        rows.append(part)
    return torch.cat(rows) if len(rows) > 1 else rows[0]


def _check_losses(losses: Tensor, batch: int) -> Tensor:
    if not isinstance(losses, Tensor) or losses.shape != (batch,):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return one loss per sample, shape ({batch},); got {shape}. "
            "Use reduction='none' in a torch loss."
        )
    return losses


def target_without_rules(
    model: nn.Module,
    inputs: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
    resolve_target: TargetResolver,
    loss_fn: LossFn,
) -> Tensor:
    """The target of a batch that no rule pass has seen (only fallback parameters selected)."""
    with torch.no_grad():
        output = model(*inputs, *additional_forward_args)
        if not isinstance(output, Tensor):
            raise TypeError(f"the model must return a Tensor, got {type(output).__name__}")
        target = resolve_target(output)
        # the fallback calls loss_fn one sample at a time, where a batch-mean loss would
        # pass unnoticed: check its contract once on the whole batch
        _check_losses(loss_fn(output, target), inputs[0].shape[0])
    return target


def _rule_pass(
    model: nn.Module,
    params: List[SelectedParameter],
    routing: Routing,
    inputs: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
    resolve_target: TargetResolver,
    loss_fn: LossFn,
    reduction: str,
    keep_calls: bool = False,
    fused: bool = False,
) -> Tuple[Dict[str, Any], List[SelectedParameter], Tensor]:
    """One tapped forward and backward over the rule-routed ``params``.

    Returns ``{name: (B, units)}`` (or, with ``keep_calls``, ``{name: [LayerCall]}`` whose
    tensors stay differentiable with respect to the inputs, for a second derivative), the
    params the rules could not take after all, and the target.
    """
    batch = inputs[0].shape[0]
    accumulators = {p.name: _Accumulator(p) for p in params}
    by_module: Dict[nn.Module, List[Tuple[str, _Accumulator]]] = {}
    for p in params:
        for module, attr in p.owners:
            by_module.setdefault(module, []).append((attr, accumulators[p.name]))
    results: Dict[str, Tensor] = {}
    workspace = _Workspace(fused)
    anchor = new_anchor(inputs[0].device)
    call_counts: Dict[nn.Module, int] = {}

    def finish(acc: _Accumulator) -> None:
        results[acc.param.name] = _reduce_calls(acc.param, acc.grads, batch, reduction, workspace)
        acc.grads = []  # free the saved activations and output gradients

    budget = DEFERRED_BYTES.get(anchor.device.type, 0)
    complete: List[_Accumulator] = []  # all calls seen, not yet reduced
    deferred_bytes = [0]

    def defer(acc: _Accumulator, pair_bytes: int) -> None:
        complete.append(acc)
        deferred_bytes[0] += pair_bytes
        if deferred_bytes[0] > budget:
            flush()

    def flush() -> None:
        while complete:
            finish(complete.pop())
        deferred_bytes[0] = 0

    def on_forward(module: nn.Module, args, kwargs, output):
        call = call_counts.get(module, 0)
        call_counts[module] = call + 1
        activation = args[0] if args else next(iter(kwargs.values()), None)
        here = by_module[module]
        usable = (
            isinstance(activation, Tensor)
            and isinstance(output, Tensor)
            and activation.shape[:1] == (batch,)
            and output.shape[:1] == (batch,)
            and (batch == 1 or routing.call_is_batch_first(module, call, activation, output))
        )
        if not usable:
            for _, acc in here:
                acc.unusable = True
            return None
        for _, acc in here:
            acc.calls += 1
        names = frozenset(attr for attr, _ in here)
        rule = find_rule(module, next(iter(names)))
        saved = [activation if keep_calls else activation.detach()]

        def on_grad(grad_output: Tensor) -> None:
            if keep_calls:
                kept = saved.pop()
                for attr, acc in here:
                    acc.raw.append(LayerCall(module, attr, kept, grad_output))
                return
            activation = saved.pop()
            grads = rule(module, activation, grad_output, names)
            pair_bytes = sum(t.numel() * t.element_size() for t in (activation, grad_output))
            for attr, acc in here:
                if acc.unusable:
                    continue
                acc.grads.append(grads[attr])
                if len(acc.grads) == acc.calls:
                    defer(acc, pair_bytes)
                    pair_bytes = 0  # a weight and a bias share one pair

        return GradTap.apply(output, anchor, on_grad)

    handles = [m.register_forward_hook(on_forward, with_kwargs=True) for m in by_module]
    watch = ParameterUseWatch(params)  # the routing may be cached: check its first assumption again
    try:
        with torch.enable_grad():
            with watch:
                output = model(*inputs, *additional_forward_args)
            if not isinstance(output, Tensor):
                raise TypeError(f"the model must return a Tensor, got {type(output).__name__}")
            for h in handles:  # a loss_fn that calls the model again must not be tapped
                h.remove()
            for name in watch.foreign_names():  # used outside its owners' calls: the fallback's
                accumulators[name].unusable = True
            target = resolve_target(output.detach())
            losses = _check_losses(loss_fn(output, target), batch)
            if losses.requires_grad:  # False when no tapped output reached the loss
                torch.autograd.grad(losses.sum(), anchor, create_graph=keep_calls, allow_unused=True)
            flush()
    finally:
        for h in handles:
            h.remove()
    unusable = [acc.param for acc in accumulators.values() if acc.unusable]
    for acc in accumulators.values():
        if acc.unusable:
            results.pop(acc.param.name, None)
        elif keep_calls:
            results[acc.param.name] = acc.raw
        elif acc.param.name not in results:
            finish(acc)  # some calls' outputs never reached the loss: their gradient is zero
    return results, unusable, target


def rules_first(
    model: nn.Module,
    selection: Selection,
    routing: Routing,
    inputs: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
    resolve_target: TargetResolver,
    loss_fn: LossFn,
    reduction: str,
    keep_calls: bool = False,
    fused: bool = False,
) -> Tuple[Dict[str, Any], List[SelectedParameter], Optional[Tensor]]:
    """The rule pass over the parameters the routing gives the rules, then what is left.

    Returns the rule pass's results (see :func:`_rule_pass`; only parameters the rules did
    take), the parameters for the fallback in layout order (those routed there and those the
    rules could not take after all), and the target (``None`` only when nothing is left for
    the fallback and no rule pass ran).
    """
    rule_params = [p for p in selection.params if p.name in routing.rule_names]
    results: Dict[str, Any] = {}
    unusable: List[SelectedParameter] = []
    target: Optional[Tensor] = None
    if rule_params:
        results, unusable, target = _rule_pass(
            model, rule_params, routing, inputs, additional_forward_args, resolve_target, loss_fn, reduction,
            keep_calls=keep_calls, fused=fused,
        )
    taken_back = {p.name for p in unusable}
    fallback_params = [p for p in selection.params if p.name not in routing.rule_names or p.name in taken_back]
    if fallback_params and target is None:
        target = target_without_rules(model, inputs, additional_forward_args, resolve_target, loss_fn)
    return results, fallback_params, target


def per_sample_unit_saliency(
    model: nn.Module,
    selection: Selection,
    routing: Routing,
    inputs: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
    resolve_target: TargetResolver,
    loss_fn: LossFn,
    reduction: str,
    fallback_chunk_size: int,
    fused: bool = False,
) -> Tensor:
    """``(B, F)`` unit saliency of one batch, columns in ``selection.layout`` order.

    ``fused``: reduce with compiled kernels where they apply (:mod:`.fused`). The model
    must already be in eval mode; the caller restores its state.
    """
    results, fallback_params, target = rules_first(
        model, selection, routing, inputs, additional_forward_args, resolve_target, loss_fn, reduction,
        fused=fused,
    )
    if fallback_params:
        results.update(
            fallback_unit_saliency(
                model, fallback_params, inputs, additional_forward_args, target,
                loss_fn, reduction, fallback_chunk_size,
            )
        )
    return torch.cat([results[p.name] for p in selection.params], dim=1)
