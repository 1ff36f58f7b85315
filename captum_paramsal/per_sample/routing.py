"""Decide, per selected parameter, whether its per-layer rule is exact for this model.

A rule sees only the calls of its own module, with the batch on dim 0. A
one-sample *probe* forward checks both assumptions before the real pass:

* every use of the parameter happens inside a call of a module that owns it
  (a ``TorchFunctionMode`` records each op that touches it), so weights read
  elsewhere, such as ``nn.MultiheadAttention``'s ``out_proj.weight`` used
  functionally, or a tied embedding reused as an output projection, go to the
  fallback;
* for each call, the batch is dim 0 of the input and output: with a batch of
  one, dim 0 has size 1 (a sequence-first ``(T, 1, D)`` activation does not).

Anything the probe cannot vouch for goes to the generic fallback, which is
exact for every model.

The probe costs a one-sample forward (about a tenth of a batch's forward and
backward for a small CNN), so :class:`RoutingCache` keeps its result per input
signature. A cached routing is never trusted blindly: every real pass watches
parameter uses with the same :class:`ParameterUseWatch` and checks each call's
shapes against the probe's (:meth:`Routing.call_is_batch_first`), and whatever
no longer matches goes to the fallback for that pass. One change it cannot see: a
forward that, between two calls, starts feeding a module a tensor whose batch has
left dim 0 while its shape stays the same (a sequence-first ``(T, B, D)`` with
``T == B`` where the probe saw ``(B, T, D)``); a new ``ParameterSaliency`` probes
afresh.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Hashable, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .batching import slice_batch
from .selection import SelectedParameter, Selection
from .tap import GradTap, new_anchor

#: One call as the probe saw it: the (activation, output) shapes at batch 1, or None
#: when dim 0 was not the batch (or the call's input or output was not a tensor).
CallShapes = Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]]


@dataclass(frozen=True)
class Routing:
    """Parameters the rules compute, and per rule-module call whether dim 0 is the batch."""

    rule_names: FrozenSet[str]
    calls: Dict[nn.Module, Tuple[CallShapes, ...]] = field(default_factory=dict)

    def call_is_batch_first(self, module: nn.Module, call: int, activation: Tensor, output: Tensor) -> bool:
        """Whether call number ``call`` of ``module`` has the batch on dim 0: the probe said so,
        and the activation and output have the probe's shapes with dim 0 the batch."""
        calls = self.calls.get(module, ())
        if call >= len(calls) or calls[call] is None:
            return False
        activation_shape, output_shape = calls[call]
        batch = activation.shape[0]
        return (
            activation.shape == (batch, *activation_shape[1:])
            and output.shape == (batch, *output_shape[1:])
        )


class _ParameterUseRecorder(TorchFunctionMode):
    """Flags watched parameters used by an op outside a call of one of their owners."""

    def __init__(self, owners: Dict[int, set], stack: List[nn.Module]) -> None:
        super().__init__()
        self.owners = owners
        self.stack = stack
        self.foreign: set = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, Tensor) and id(leaf) in self.owners:
                if not self.stack or id(self.stack[-1]) not in self.owners[id(leaf)]:
                    self.foreign.add(id(leaf))
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
                # prepend: the call must be popped before any other forward hook runs ops
                self._handles.append(module.register_forward_pre_hook(self._push, with_kwargs=True, prepend=True))
                self._handles.append(module.register_forward_hook(self._pop, with_kwargs=True, prepend=True))
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


def _ignore(_grad: Tensor) -> None:
    return None


def route(
    model: nn.Module,
    selection: Selection,
    inputs: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
) -> Routing:
    """Run the probe on the first sample of ``inputs`` and return the :class:`Routing`."""
    candidates = [p for p in selection.params if p.has_rule]
    if not candidates:
        return Routing(frozenset())
    rule_modules = {m for p in candidates for m, _ in p.owners}
    calls: Dict[nn.Module, List[CallShapes]] = {m: [] for m in rule_modules}
    anchor = new_anchor(inputs[0].device)

    def record(module, args, kwargs, output):
        activation = args[0] if args else next(iter(kwargs.values()), None)
        ok = (
            isinstance(activation, Tensor)
            and isinstance(output, Tensor)
            and activation.dim() > 0
            and output.dim() > 0
            and activation.shape[0] == 1
            and output.shape[0] == 1
        )
        calls[module].append((tuple(activation.shape), tuple(output.shape)) if ok else None)
        # tapped as in the real pass, so that the probe's forward is the same
        return GradTap.apply(output, anchor, _ignore) if isinstance(output, Tensor) else None

    batch = inputs[0].shape[0]
    handles = []
    watch = ParameterUseWatch(candidates)
    try:
        for module in rule_modules:
            handles.append(module.register_forward_hook(record, with_kwargs=True))
        with torch.enable_grad(), watch:
            model(*slice_batch(inputs, batch, 0, 1), *slice_batch(additional_forward_args, batch, 0, 1))
    finally:
        for handle in handles:
            handle.remove()
    foreign = watch.foreign_names()
    rule_names = frozenset(p.name for p in candidates if p.name not in foreign)
    return Routing(rule_names, {m: tuple(c) for m, c in calls.items()})


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
    ) -> Routing:
        batch = inputs[0].shape[0]
        signature = _signature(inputs, batch)
        extra = _signature(additional_forward_args, batch)
        key = None if signature is None or extra is None else (signature, extra)
        if key is not None and key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        result = route(model, selection, inputs, additional_forward_args)
        if key is not None:
            self._entries[key] = result
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return result
