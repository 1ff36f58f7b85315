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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .batching import slice_batch
from .selection import Selection
from .tap import GradTap, new_anchor


@dataclass(frozen=True)
class Routing:
    """Parameters the rules compute, and per rule-module call whether dim 0 is the batch."""

    rule_names: FrozenSet[str]
    batch_first_calls: Dict[nn.Module, Tuple[bool, ...]] = field(default_factory=dict)

    def call_is_batch_first(self, module: nn.Module, call: int) -> bool:
        calls = self.batch_first_calls.get(module, ())
        return call < len(calls) and calls[call]


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
    owners = {id(p.param): {id(m) for m, _ in p.owners} for p in candidates}
    rule_modules = {m for p in candidates for m, _ in p.owners}
    stack: List[nn.Module] = []
    calls: Dict[nn.Module, List[bool]] = {m: [] for m in rule_modules}
    anchor = new_anchor(inputs[0].device)

    def push(module, args, kwargs):
        stack.append(module)

    def pop(module, args, kwargs, output):
        stack.pop()
        activation = args[0] if args else next(iter(kwargs.values()), None)
        ok = (
            isinstance(activation, Tensor)
            and isinstance(output, Tensor)
            and activation.dim() > 0
            and output.dim() > 0
            and activation.shape[0] == 1
            and output.shape[0] == 1
        )
        calls[module].append(ok)
        return GradTap.apply(output, anchor, _ignore) if isinstance(output, Tensor) else None

    batch = inputs[0].shape[0]
    handles = []
    try:
        for module in rule_modules:
            handles.append(module.register_forward_pre_hook(push, with_kwargs=True))
            handles.append(module.register_forward_hook(pop, with_kwargs=True))
        recorder = _ParameterUseRecorder(owners, stack)
        with torch.enable_grad(), recorder:
            model(*slice_batch(inputs, batch, 0, 1), *slice_batch(additional_forward_args, batch, 0, 1))
    finally:
        for handle in handles:
            handle.remove()
    rule_names = frozenset(p.name for p in candidates if id(p.param) not in recorder.foreign)
    return Routing(rule_names, {m: tuple(c) for m, c in calls.items()})
