"""The pass: per-sample unit saliency of a batch in one tapped forward and one backward.

Forward hooks on the modules that own rule-routed parameters keep each call's inputs
and tap its output (:mod:`.tap`). The backward hands each tap the gradient at that
output; the module's rule turns (inputs, output gradient) into per-sample gradients of
its parameters, calls of the same module are summed, and after the last call the sum is
reduced to units (:mod:`.unit_values`) and freed. No whole-model per-sample gradient is
ever held. Parameters the probe did not route to rules go through :mod:`.fallback`.

Everything a pass needs is one :class:`SaliencyPass`; the attribution classes build one
per chunk of ``internal_batch_size`` samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .call import CallInputs, GradOutputs, LayerCall, call_inputs
from .fallback import LossFn, fallback_unit_saliency
from .grads import PerSampleGrad
from .hooks import hook_forward
from .policy import KernelPolicy
from .reductions import Reduction
from .registry import find_rule
from .routing import (
    BatchFirstCall,
    ParameterUseWatch,
    Routing,
    batch_first_call,
    positionwise_dim,
    positionwise_dims,
)
from .selection import SelectedParameter, Selection
from .tap import new_anchor, tap_output
from .unit_values import Workspace, reduce_to_units

#: ``resolve_target(output) -> target`` (validated, one entry per sample)
TargetResolver = Callable[[Tensor], Tensor]


def model_output_tensor(output: Any) -> Tensor:
    """The tensor a loss explains in a model's output: the output itself, the ``logits`` of a
    Hugging Face ``ModelOutput``, or the first element of a tuple."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"the model returned a {type(output).__name__}, which holds no logits or leading tensor; pass "
        "output_fn= to pick the tensor to explain (e.g. output_fn=lambda out: out['scores'])"
    )


@dataclass(frozen=True)
class SaliencyPass:
    """One batch and everything the engine needs to explain it.

    The model must already be in eval mode; the caller restores its state.
    """

    model: nn.Module
    selection: Selection
    routing: Routing
    inputs: Tuple[Tensor, ...]
    additional_forward_args: Tuple[Any, ...]
    resolve_target: TargetResolver
    loss_fn: LossFn
    reduction: Reduction
    policy: KernelPolicy
    fallback_chunk_size: int
    #: keyword arguments of the model (per-sample tensors among them are sliced like inputs)
    forward_kwargs: Dict[str, Any] = field(default_factory=dict)
    #: ``output_fn(model output) -> Tensor``: what the loss sees (the logits of a ModelOutput)
    output_fn: Callable[[Any], Tensor] = field(default=model_output_tensor)
    #: ``around_forward() -> context`` that :meth:`forward` runs the model in (the input
    #: saliency's probe on a layer's output, :mod:`.second_order`); None: none
    around_forward: Optional[Callable[[], ContextManager[Any]]] = None

    @property
    def batch(self) -> int:
        return self.inputs[0].shape[0]

    def with_inputs(self, inputs: Tuple[Tensor, ...]) -> SaliencyPass:
        return dataclasses.replace(self, inputs=inputs)

    def forward(self) -> Tensor:
        """The model's output on this batch, as the loss sees it (through :attr:`output_fn`)."""
        around = self.around_forward() if self.around_forward is not None else contextlib.nullcontext()
        with around:
            output = self.model(*self.inputs, *self.additional_forward_args, **self.forward_kwargs)
        return check_output(self.output_fn(output), self.output_fn)


@dataclass(frozen=True)
class RulePassResult:
    """What :func:`rules_first` gives: the rule pass's ``values`` (``{name: (B, units)}``, or
    ``{name: [LayerCall]}`` when the calls were kept), the parameters left for the fallback
    in layout order, and the target (None only when no pass ran and nothing is left)."""

    values: Dict[str, Any]
    fallback: List[SelectedParameter]
    target: Optional[Tensor]


@dataclass
class _Accumulator:
    """The per-sample gradients (or kept calls) of one parameter from each call seen so far."""

    param: SelectedParameter
    calls: int = 0
    grads: List[PerSampleGrad] = field(default_factory=list)
    kept: List[LayerCall] = field(default_factory=list)
    unusable: bool = False


def check_losses(losses: Tensor, batch: int) -> Tensor:
    if not isinstance(losses, Tensor) or losses.shape != (batch,):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return one loss per sample, shape ({batch},); got {shape}. "
            "Use reduction='none' in a torch loss."
        )
    return losses


def check_output(output: Any, output_fn: Optional[Callable] = None) -> Tensor:
    if not isinstance(output, Tensor):
        source = "output_fn" if output_fn not in (None, model_output_tensor) else "the model"
        raise TypeError(f"{source} must return a Tensor, got {type(output).__name__}")
    return output


def check_unmodified(inputs: CallInputs, versions: List[int], name: str, module: nn.Module) -> None:
    """Autograd's check, for the inputs a rule keeps: none modified in place since the call."""
    for index, (tensor, version) in enumerate(zip(inputs.tensors(), versions)):
        if tensor._version != version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: input {index} of the {type(module).__name__} that holds {name} ({tuple(tensor.shape)}) "
                f"is at version {tensor._version}, it was at version {version} when the layer used it. Its "
                "per-sample gradient needs the input as the layer saw it: modify a copy (x = x.clone()) instead"
            )


def check_no_gradient_hooks(params: List[SelectedParameter]) -> None:
    """Refuse a selected parameter with a hook on its gradient (``Tensor.register_hook``):
    autograd applies it to the batch's summed gradient, and no per-sample gradient can follow
    that convention (a hook need not be linear), so the answer would silently differ from
    autograd's. Module hooks are fine: they act on activations' gradients, which every path
    here sees as autograd does."""
    hooked = [p.name for p in params if getattr(p.param, "_backward_hooks", None)]
    if hooked:
        raise ValueError(
            f"{', '.join(hooked)} {'has' if len(hooked) == 1 else 'have'} a hook on its gradient "
            "(Tensor.register_hook), which autograd applies to the summed gradient of a batch; per-sample "
            "gradients cannot follow it. Remove the hook (handle.remove()) for the call, or leave the "
            "parameter out of params="
        )


def target_without_rules(run: SaliencyPass) -> Tensor:
    """The target of a batch that no rule pass has seen (only fallback parameters selected)."""
    with torch.no_grad():
        output = run.forward()
        target = run.resolve_target(output)
        # the fallback calls loss_fn one sample at a time, where a batch-mean loss would
        # pass unnoticed: check its contract once on the whole batch
        check_losses(run.loss_fn(output, target), run.batch)
    return target


class _TappedPass:
    """One tapped forward and backward over the rule-routed ``params`` of ``run``.

    With ``keep_calls`` the calls' tensors are kept differentiable with respect to the
    inputs (for a second derivative) instead of being reduced.
    """

    def __init__(self, run: SaliencyPass, params: List[SelectedParameter], keep_calls: bool) -> None:
        self.run = run
        self.keep_calls = keep_calls
        self.accumulators = {p.name: _Accumulator(p) for p in params}
        self.by_module: Dict[nn.Module, List[Tuple[str, _Accumulator]]] = {}
        for p in params:
            for module, attr in p.owners:
                self.by_module.setdefault(module, []).append((attr, self.accumulators[p.name]))
        # per module, the attributes its rule computes and the rule, found once (not per call)
        self.names = {m: frozenset(attr for attr, _ in here) for m, here in self.by_module.items()}
        self.rules = {m: find_rule(m, next(iter(names))) for m, names in self.names.items()}
        self.results: Dict[str, Any] = {}
        self.workspace = Workspace()
        self.anchor = new_anchor(run.inputs[0].device)
        self.call_counts: Dict[nn.Module, int] = {}
        self.budget = run.policy.deferred_bytes
        self.complete: List[_Accumulator] = []  # all calls seen, not yet reduced
        self.deferred_bytes = 0

    # -- reducing ---------------------------------------------------------------------

    def finish(self, acc: _Accumulator) -> None:
        run = self.run
        self.results[acc.param.name] = reduce_to_units(
            acc.param, acc.grads, run.batch, run.reduction, run.policy, self.workspace
        )
        acc.grads = []  # free the saved inputs and output gradients

    def defer(self, acc: _Accumulator, pair_bytes: int) -> None:
        self.complete.append(acc)
        self.deferred_bytes += pair_bytes
        if self.deferred_bytes > self.budget:
            self.flush()

    def flush(self) -> None:
        while self.complete:
            self.finish(self.complete.pop())
        self.deferred_bytes = 0

    # -- the hooks --------------------------------------------------------------------

    def _moved(self, module: nn.Module, call: int, rule, inputs, output) -> Optional[BatchFirstCall]:
        """The call moved batch first as the probe recorded it, or None where it does not match
        the probe (the parameters then go to the fallback for this pass). A position-wise layer
        whose probe could not tell the batch dim (a sequence of one step: ``(1, 1, D)``) has it
        found here, where the batch has its real size."""
        routing, batch = self.run.routing, self.run.batch
        if not isinstance(inputs.first, Tensor):
            return None
        try:
            moved = batch_first_call(rule, module, inputs, output, routing.call_dims(module, call))
        except ValueError:  # the rule cannot take this call (the probe said why)
            return None
        if routing.call_matches_probe(module, call, batch, moved):
            return moved
        if rule.positionwise and rule.batch_dims is None and routing.call_dims(module, call) is None and batch > 1:
            found = positionwise_dim(inputs, output, batch)
            if found is not None:
                moved = batch_first_call(rule, module, inputs, output, positionwise_dims(inputs, output, found))
                if routing.call_matches_probe(module, call, batch, moved):
                    return moved
        return None

    def on_forward(self, module: nn.Module, args, kwargs, output):
        call = self.call_counts.get(module, 0)
        self.call_counts[module] = call + 1
        inputs = call_inputs(args, kwargs)
        here, names, rule = self.by_module[module], self.names[module], self.rules[module]
        moved = self._moved(module, call, rule, inputs, output)
        if moved is None:
            for _, acc in here:
                acc.unusable = True
            return None
        for _, acc in here:
            acc.calls += 1
        saved = [moved.inputs if self.keep_calls else moved.inputs.detached()]
        # views and detached tensors share their base's version counter: an in-place change
        # of an input after this call (``a.mul_(3)``) shows as a new version at the backward
        versions = [t._version for t in saved[0].tensors()]

        def on_grad(grads: List[Tensor]) -> None:
            kept = saved.pop()
            check_unmodified(kept, versions, here[0][1].param.name, module)
            grad_outputs = GradOutputs(tuple(moved.grads_batch_first(grads)), *structure)
            if self.keep_calls:
                for attr, acc in here:
                    acc.kept.append(LayerCall(module, attr, rule, kept, grad_outputs, moved.batched_inputs))
                return
            per_sample = rule(module, kept, grad_outputs.structured(), names)
            pair_bytes = kept.nbytes() + grad_outputs.nbytes()
            for attr, acc in here:
                if acc.unusable:
                    continue
                acc.grads.append(per_sample[attr])
                if len(acc.grads) == acc.calls:
                    self.defer(acc, pair_bytes)
                    pair_bytes = 0  # a weight and a bias share one pair

        structure = GradOutputs.structure(output)  # not the output's values: they need not stay alive
        return tap_output(output, self.anchor, on_grad)

    # -- the pass ---------------------------------------------------------------------

    def __call__(self) -> Tuple[Dict[str, Any], List[SelectedParameter], Tensor]:
        run = self.run
        handles = [hook_forward(m, self.on_forward, with_kwargs=True) for m in self.by_module]
        watch = ParameterUseWatch([acc.param for acc in self.accumulators.values()])
        try:
            with torch.enable_grad():
                with watch:  # the routing may be cached: check its first assumption again
                    output = run.forward()
                for h in handles:  # a loss_fn that calls the model again must not be tapped
                    h.remove()
                for name in watch.foreign_names():  # used outside its owners' calls: the fallback's
                    self.accumulators[name].unusable = True
                target = run.resolve_target(output.detach())
                losses = check_losses(run.loss_fn(output, target), run.batch)
                if losses.requires_grad:  # False when no tapped output reached the loss
                    torch.autograd.grad(losses.sum(), self.anchor, create_graph=self.keep_calls, allow_unused=True)
                self.flush()
        finally:
            for h in handles:
                h.remove()
        unusable = [acc.param for acc in self.accumulators.values() if acc.unusable]
        for acc in self.accumulators.values():
            if acc.unusable:
                self.results.pop(acc.param.name, None)
            elif self.keep_calls:
                self.results[acc.param.name] = acc.kept
            elif acc.param.name not in self.results:
                self.finish(acc)  # some calls' outputs never reached the loss: their gradient is zero
        return self.results, unusable, target


def rules_first(run: SaliencyPass, keep_calls: bool = False) -> RulePassResult:
    """The rule pass over the parameters the routing gives the rules, then what is left.

    The result's ``values`` hold only parameters the rules did take; ``fallback`` those
    routed there and those the rules could not take after all (a call that no longer
    matched the probe), in layout order.
    """
    params = run.selection.params
    check_no_gradient_hooks(params)
    rule_params = [p for p in params if p.name in run.routing.rule_names]
    values: Dict[str, Any] = {}
    unusable: List[SelectedParameter] = []
    target: Optional[Tensor] = None
    if rule_params:
        values, unusable, target = _TappedPass(run, rule_params, keep_calls)()
    taken_back = {p.name for p in unusable}
    fallback = [p for p in params if p.name not in run.routing.rule_names or p.name in taken_back]
    if fallback and target is None:
        target = target_without_rules(run)
    return RulePassResult(values, fallback, target)


def unit_saliency(run: SaliencyPass) -> Tensor:
    """``(B, F)`` unit saliency of one batch, columns in ``run.selection.layout`` order."""
    result = rules_first(run)
    values = dict(result.values)
    if result.fallback:
        values.update(fallback_unit_saliency(run, result.fallback, result.target))
    return torch.cat([values[p.name] for p in run.selection.params], dim=1)
