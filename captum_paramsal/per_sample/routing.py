"""Decide, per selected parameter, whether its per-layer rule is exact for this model.

A rule sees only the calls of its own module, with the batch on dim 0. A
one-sample *probe* forward checks both assumptions before the real pass:

* every use of the parameter happens inside a call of a module that owns it
  (a ``TorchFunctionMode`` records each op that touches it), so weights read
  elsewhere, such as ``nn.MultiheadAttention``'s ``out_proj.weight`` used
  functionally, or a tied embedding reused as an output projection, go to the
  fallback;
* for each call, the batch is dim 0 of every tensor input and output (or, for a rule
  that declares its batch dims, where it says; for a position-wise rule, the leading dim
  that has size 1 in every tensor, which the probe records): with a batch of one, that dim
  has size 1 (a sequence-first ``(T, 1, D)`` activation fed to a layer that is not
  position-wise does not).

Anything the probe cannot vouch for goes to the generic fallback, which is
exact for every model.

The probe costs a one-sample forward (about a tenth of a batch's forward and
backward for a small CNN), so :class:`RoutingCache` keeps its result per input
signature. A cached routing is never trusted blindly: every real pass watches
parameter uses with the same :class:`ParameterUseWatch` and checks each call's
shapes against the probe's (:meth:`Routing.call_matches_probe`), and whatever
no longer matches goes to the fallback for that pass. One change it cannot see: a
forward that, between two calls, starts feeding a module a tensor whose batch has
left dim 0 while its shape stays the same (a sequence-first ``(T, B, D)`` with
``T == B`` where the probe saw ``(B, T, D)``); a new ``ParameterSaliency`` probes
afresh.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Hashable, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .batching import slice_batch, slice_kwargs
from .call import CallInputs, batch_first, call_inputs, is_tapped, output_tensors
from .hooks import hook_forward, hook_forward_pre
from .registry import explain_rule, rule_for_module
from .selection import SelectedParameter, Selection
from .tap import new_anchor, tap_output

#: One call as the probe saw it: the shapes of its tensor inputs and of its tapped output
#: tensors at batch 1 without the batch dim (all moved batch first), and the batch dims it
#: moved (None: dim 0 everywhere); or None when the batch was not where the rule expects it
#: in all of them (or the call had no tensor input, or no floating output tensor).
CallShapes = Optional[Tuple[Tuple[Any, ...], Tuple[Tuple[int, ...], ...], Optional[Tuple[Any, Any]]]]


@dataclass(frozen=True)
class BatchFirstCall:
    """A call as its rule sees it: inputs and tapped outputs with the batch on dim 0, and
    where each tapped output keeps its batch (to move its gradient the same way)."""

    inputs: CallInputs
    outputs: List[Tensor]
    output_dims: Optional[List[int]]
    #: which input tensors are per sample (the others are shared by all samples)
    batched_inputs: Tuple[int, ...]

    def grads_batch_first(self, grads: List[Tensor]) -> List[Tensor]:
        return batch_first(grads, self.output_dims)


def batch_first_call(
    rule: Any, module: nn.Module, inputs: CallInputs, output: Any, dims: Optional[Tuple[Any, Any]] = None
) -> BatchFirstCall:
    """``inputs`` and ``output`` of one call moved batch first: by ``dims`` (``(input dims,
    output dims)``, as the probe recorded them) where given, else as ``rule`` declares."""
    outputs = output_tensors(output)
    in_dims = out_dims = None
    if dims is not None:
        in_dims, out_dims = dims
    elif rule is not None and rule.batch_dims is not None:
        in_dims, out_dims = rule.batch_dims(module, inputs, output)  # ValueError: not this call
    tensors = inputs.tensors()
    moved_inputs = inputs.with_tensors(batch_first(tensors, in_dims)) if in_dims is not None else inputs
    batched = tuple(i for i in range(len(tensors)) if in_dims is None or in_dims[i] is not None)
    moved = batch_first(outputs, out_dims)
    tapped = [i for i, t in enumerate(outputs) if is_tapped(t)]
    dims = None if out_dims is None else [out_dims[i] for i in tapped]
    return BatchFirstCall(moved_inputs, [moved[i] for i in tapped], dims, batched)


def positionwise_dim(inputs: CallInputs, output: Any, size: int = 1) -> Optional[int]:
    """For a layer that treats every leading position alike (Linear, a norm, an embedding):
    the first dim, other than 0, that has ``size`` (the batch) in every tensor input and
    output and is not a floating tensor's last (feature) dim; None where there is none."""
    tensors = [*inputs.tensors(), *(t for t in output_tensors(output) if is_tapped(t))]
    depth = min(t.dim() - (1 if t.is_floating_point() else 0) for t in tensors)
    for dim in range(1, depth):
        if all(t.shape[dim] == size for t in tensors):
            return dim
    return None


def positionwise_dims(inputs: CallInputs, output: Any, dim: int) -> Tuple[List[int], List[int]]:
    """``(input dims, output dims)`` with the batch at ``dim`` in every tensor."""
    return [dim] * len(inputs.tensors()), [dim] * len(output_tensors(output))


def _call_shapes(rule: Any, module: nn.Module, inputs: CallInputs, output: Any) -> Tuple[CallShapes, str]:
    """``(the probe's record of a call, why it is None)``."""
    if not inputs.tensors() or not isinstance(inputs.first, Tensor):
        return None, "its main input is not a tensor"
    dims = None
    try:
        if rule is not None and rule.batch_dims is not None:
            dims = rule.batch_dims(module, inputs, output)  # ValueError: the rule cannot take this call
    except ValueError as error:
        return None, str(error)
    if rule is not None and rule.positionwise and dims is None:
        tensors = [*inputs.tensors(), *(t for t in output_tensors(output) if is_tapped(t))]
        if not all(t.dim() > 0 and t.shape[0] == 1 for t in tensors):
            found = positionwise_dim(inputs, output)
            if found is not None:  # a sequence-first call of a position-wise layer: move its batch
                dims = positionwise_dims(inputs, output, found)
    call = batch_first_call(rule, module, inputs, output, dims)
    if not call.outputs:
        return None, f"it returns a {type(output).__name__} with no floating tensor"
    where = "dim 0" if rule is None or rule.batch_dims is None else "the dim its rule declares"
    batched_inputs = [t for i, t in enumerate(call.inputs.tensors()) if i in call.batched_inputs]
    for kind, tensors in (("input", batched_inputs), ("output", call.outputs)):
        for i, t in enumerate(tensors):
            if t.dim() == 0 or t.shape[0] != 1:
                shape = tuple(t.shape)
                return None, f"{kind} tensor {i} of shape {shape} at batch 1 does not have the batch on {where}"
    # a shared input is recorded whole (its shape must stay), a batched one without the batch
    input_shapes = tuple(
        tuple(t.shape[1:]) if i in call.batched_inputs else ("shared", *t.shape)
        for i, t in enumerate(call.inputs.tensors())
    )
    recorded = None if dims is None else (tuple(dims[0]), tuple(dims[1]))
    return (input_shapes, tuple(tuple(t.shape[1:]) for t in call.outputs), recorded), ""


@dataclass(frozen=True)
class Routing:
    """Parameters the rules compute, per rule-module call whether dim 0 is the batch, and
    why each other selected parameter goes to the fallback."""

    rule_names: FrozenSet[str]
    calls: Dict[nn.Module, Tuple[CallShapes, ...]] = field(default_factory=dict)
    reasons: Dict[str, str] = field(default_factory=dict)

    def call_dims(self, module: nn.Module, call: int) -> Optional[Tuple[Any, Any]]:
        """The batch dims the probe moved for call number ``call`` of ``module`` (None: dim 0
        everywhere, or no record)."""
        calls = self.calls.get(module, ())
        return calls[call][2] if call < len(calls) and calls[call] is not None else None

    def call_matches_probe(self, module: nn.Module, call: int, batch: int, moved: BatchFirstCall) -> bool:
        """Whether call number ``call`` of ``module``, moved batch first, has the batch on dim 0
        of every tensor: the probe said so, and each tensor has the probe's shape but for
        the batch."""
        calls = self.calls.get(module, ())
        if call >= len(calls) or calls[call] is None:
            return False
        input_shapes, output_shapes, _ = calls[call]
        tensors = moved.inputs.tensors()
        if len(tensors) != len(input_shapes) or len(moved.outputs) != len(output_shapes):
            return False
        for i, (t, shape) in enumerate(zip(tensors, input_shapes)):
            if i not in moved.batched_inputs:
                if ("shared", *t.shape) != shape:
                    return False
            elif t.dim() == 0 or t.shape[0] != batch or tuple(t.shape[1:]) != shape:
                return False
        return all(t.dim() > 0 and t.shape[0] == batch and tuple(t.shape[1:]) == s for t, s in zip(moved.outputs,
                                                                                                 output_shapes))


#: Tensor attributes and methods that read a parameter's metadata, never its values: using
#: them outside the module (``h.to(self.fc2.weight.dtype)``, as T5 does) does not make the
#: per-layer rule wrong
_METADATA = frozenset({
    "dtype", "device", "shape", "ndim", "layout", "is_cuda", "is_leaf", "is_sparse", "is_quantized", "is_meta",
    "requires_grad", "names", "size", "dim", "ndimension", "numel", "nelement", "stride", "element_size",
    "is_floating_point", "is_complex", "is_contiguous", "get_device", "data_ptr", "storage_offset",
})


def _reads_metadata_only(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property of the tensor: its descriptor names it
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return name in _METADATA


class _ParameterUseRecorder(TorchFunctionMode):
    """Flags watched parameters used by an op outside a call of one of their owners."""

    def __init__(self, owners: Dict[int, set], stack: List[nn.Module]) -> None:
        super().__init__()
        self.owners = owners
        self.stack = stack
        self.foreign: Dict[int, str] = {}  # id(param) -> the first op that used it outside

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads_metadata_only(func):
            return func(*args, **kwargs)
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, Tensor) and id(leaf) in self.owners:
                if not self.stack or id(self.stack[-1]) not in self.owners[id(leaf)]:
                    self.foreign.setdefault(id(leaf), getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


class ParameterUseWatch:
    """During a forward, which of ``params`` an op used outside a call of one of its owners.

    Use as a context manager around the forward; the owners' calls are tracked by hooks
    that the watch adds on entry and removes on exit.
    """

    def __init__(self, params: Iterable[SelectedParameter]) -> None:
        params = list(params)
        self._names = {id(p.param): p.name for p in params}
        self._owners = {id(p.param): {id(m) for m, _ in p.owners} for p in params}
        self._modules = {m for p in params for m, _ in p.owners}
        self._stack: List[nn.Module] = []
        self._recorder = _ParameterUseRecorder(self._owners, self._stack)
        self._handles: list = []

    def _push(self, module, args, kwargs):
        self._stack.append(module)

    def _pop(self, module, args, kwargs, output):
        self._stack.pop()

    def __enter__(self) -> ParameterUseWatch:
        try:
            for module in self._modules:
                # first: the call must be popped before any other forward hook runs ops
                self._handles.append(hook_forward_pre(module, self._push, with_kwargs=True))
                self._handles.append(hook_forward(module, self._pop, with_kwargs=True))
            self._recorder.__enter__()
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._recorder.__exit__(*exc)
        finally:
            self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def foreign_names(self) -> FrozenSet[str]:
        """Names of the parameters used outside their owners' calls so far."""
        return frozenset(self._names[i] for i in self._recorder.foreign)

    def foreign_uses(self) -> Dict[str, str]:
        """``{name: the first op that used it outside its owners' calls}``."""
        return {self._names[i]: op for i, op in self._recorder.foreign.items()}


def _ignore(_grads: List[Tensor]) -> None:
    return None


def route(
    model: nn.Module,
    selection: Selection,
    inputs: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
    forward_kwargs: Optional[Dict[str, Any]] = None,
) -> Routing:
    """Run the probe on the first sample of ``inputs`` and return the :class:`Routing`.

    Only per-sample tensors (batch on dim 0) of the extra arguments are cut to the first
    sample; everything else (a cache object, a flag, a shared mask) is passed unchanged."""
    reasons = {p.name: p.why_no_rule() for p in selection.params if not p.has_rule}
    candidates = [p for p in selection.params if p.name not in reasons]
    if not candidates:
        return Routing(frozenset(), {}, reasons)
    rule_modules = {m for p in candidates for m, _ in p.owners}
    rules = {m: rule_for_module(m)[0] for m in rule_modules}
    calls: Dict[nn.Module, List[CallShapes]] = {m: [] for m in rule_modules}
    why_not: Dict[nn.Module, str] = {}
    anchor = new_anchor(inputs[0].device)

    def record(module, args, kwargs, output):
        shapes, why = _call_shapes(rules.get(module), module, call_inputs(args, kwargs), output)
        if shapes is None:
            why_not.setdefault(module, f"call {len(calls[module])} of its {type(module).__name__}: {why}")
        calls[module].append(shapes)
        # tapped as in the real pass, so that the probe's forward is the same
        return tap_output(output, anchor, _ignore)

    batch = inputs[0].shape[0]
    handles = []
    watch = ParameterUseWatch(candidates)
    try:
        for module in rule_modules:
            handles.append(hook_forward(module, record, with_kwargs=True))
        with torch.enable_grad(), watch:
            kwargs = slice_kwargs(forward_kwargs or {}, batch, 0, 1)
            model(*slice_batch(inputs, batch, 0, 1), *slice_batch(additional_forward_args, batch, 0, 1), **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    for name, op in watch.foreign_uses().items():
        reasons[name] = f"used outside a call of the module that holds it (by {op})"
    for p in candidates:
        if p.name not in reasons:
            why = next((why_not[m] for m, _ in p.owners if m in why_not), None)
            if why is not None:
                reasons[p.name] = why
    rule_names = frozenset(p.name for p in candidates if p.name not in reasons)
    return Routing(rule_names, {m: tuple(c) for m, c in calls.items()}, reasons)


def _signature(values: Tuple[Any, ...], batch: int) -> Optional[Hashable]:
    """What the probe's outcome may depend on in ``values``, or None when that is not hashable."""
    parts = []
    for value in values:
        if isinstance(value, Tensor):
            batched = value.dim() > 0 and value.shape[0] == batch
            shape = tuple(value.shape[1:]) if batched else tuple(value.shape)
            parts.append((batched, shape, value.dtype, value.device))
            continue
        try:
            hash(value)
        except TypeError:
            return None
        parts.append((type(value), value))
    return tuple(parts)


class RoutingCache:
    """The probe's :class:`Routing` per input signature (shapes without the batch, dtypes,
    devices, and the non-tensor arguments), for the last ``size`` signatures seen.

    Safe to reuse because every pass re-validates the routing (see the module docstring).
    Arguments that cannot be hashed disable the cache for that call.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, Routing] = OrderedDict()

    def routing(
        self,
        model: nn.Module,
        selection: Selection,
        inputs: Tuple[Tensor, ...],
        additional_forward_args: Tuple[Any, ...],
        forward_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Routing:
        batch = inputs[0].shape[0]
        kwargs = forward_kwargs or {}
        signature = _signature(inputs, batch)
        keyed = [part for key in sorted(kwargs) for part in (key, kwargs[key])]
        extra = _signature((*additional_forward_args, *keyed), batch)
        key = None if signature is None or extra is None else (signature, extra)
        if key is not None and key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        result = route(model, selection, inputs, additional_forward_args, kwargs)
        if key is not None:
            self._entries[key] = result
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return result


@dataclass(frozen=True)
class RouteRow:
    """How one selected parameter is computed."""

    parameter: str
    module: str  #: the type of the module that holds it
    rule: Optional[str]  #: the rule's name, None for the fallback
    reason: str  #: why the fallback, "" for a rule

    @property
    def route(self) -> str:
        return f"rule: {self.rule}" if self.rule is not None else "fallback (torch.func)"


class RoutingReport(Sequence[RouteRow]):
    """For each selected parameter, which rule computes it or why the fallback does.

    Print it for a table. The fallback is exact for every model but costs a ``vmap``
    over chunks of samples; a layer that a rule should cover and does not shows here
    with the reason (a subclass overriding ``forward``, a weight used outside its module,
    a layer fed sequence-first tensors, ...).

    Examples::

        >>> report = ps.routing(images)
        >>> print(report)
        parameter        module   route                  reason
        conv1.weight     Conv2d   rule: conv
        ...
        >>> report.fallback              # names of the parameters on the slow path
        ()
    """

    def __init__(self, rows: Sequence[RouteRow]) -> None:
        self._rows = tuple(rows)

    def __getitem__(self, index):
        return self._rows[index]

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def fallback(self) -> Tuple[str, ...]:
        """Names of the parameters that the fallback computes."""
        return tuple(row.parameter for row in self._rows if row.rule is None)

    def _table(self) -> List[Tuple[str, str, str, str]]:
        return [(r.parameter, r.module, r.route, r.reason) for r in self._rows]

    def __str__(self) -> str:
        header = ("parameter", "module", "route", "reason")
        rows = [header, *self._table()]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in rows]
        slow = len(self.fallback)
        summary = f"{len(self) - slow} of {len(self)} parameters by rules, {slow} by the fallback"
        return "\n".join([*(line.rstrip() for line in lines), summary])

    def __repr__(self) -> str:
        return f"RoutingReport({len(self) - len(self.fallback)} by rules, {len(self.fallback)} by the fallback)"

    def to_markdown(self) -> str:
        lines = ["| parameter | module | route | reason |", "|---|---|---|---|"]
        lines += [f"| `{a}` | {b} | {c} | {d} |" for a, b, c, d in self._table()]
        return "\n".join(lines)


def routing_report(selection: Selection, routing: Routing) -> RoutingReport:
    """The :class:`RoutingReport` of ``routing`` for the parameters of ``selection``."""
    rows = []
    for p in selection.params:
        module = type(p.owners[0][0]).__name__ if p.owners else "-"
        if p.name in routing.rule_names:
            rule = next(explain_rule(m, attr)[0] for m, attr in p.owners)
            rows.append(RouteRow(p.name, module, rule.name, ""))
        else:
            rows.append(RouteRow(p.name, module, None, routing.reasons.get(p.name, "routed to the fallback")))
    return RoutingReport(rows)
