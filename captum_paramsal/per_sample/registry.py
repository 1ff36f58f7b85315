"""One registry of per-layer rules for per-sample parameter gradients.

A *rule* turns what one call of a layer saw in a batched forward/backward pass,
its input ``activation`` (batch first) and the gradient at its output
``grad_output`` (batch first), into the per-sample gradient of each of the
layer's own parameters that was asked for, as a lazy
:class:`~.grads.PerSampleGrad` (``(B, *param.shape)`` once materialized).

Rules are registered by exact module type (a subclass may override ``forward``
and use its weight differently, so it is not trusted to follow its parent's
rule); everything without a rule goes through :mod:`.fallback`.

A layer whose parameter is split into *units* differently from the default
(index 0 of the tensor) registers a unit grouping with :func:`register_units`.
"""

from __future__ import annotations

from typing import Callable, Dict, FrozenSet, Optional, Type

import torch
from torch import Tensor, nn

from .grads import PerSampleGrad

#: ``rule(module, activation, grad_output, names) -> {name: PerSampleGrad}``
PerSampleRule = Callable[[nn.Module, Tensor, Tensor, FrozenSet[str]], Dict[str, PerSampleGrad]]
#: ``grouping(per_sample_grad (B, *shape), module) -> (B, units, entries_per_unit)``
UnitGrouping = Callable[[Tensor, nn.Module], Tensor]

_RULES: Dict[Type[nn.Module], PerSampleRule] = {}
_HANDLED: Dict[Type[nn.Module], FrozenSet[str]] = {}
_UNITS: Dict[tuple, tuple] = {}


def register_rule(*module_types: Type[nn.Module], params: tuple = ("weight", "bias")):
    """Register ``rule`` for ``module_types``; ``params`` are the attribute names it covers."""

    def decorator(rule: PerSampleRule) -> PerSampleRule:
        for module_type in module_types:
            _RULES[module_type] = rule
            _HANDLED[module_type] = frozenset(params)
        return rule

    return decorator


def register_units(*module_types: Type[nn.Module], param: str, num_units: Callable[[nn.Module], int]):
    """Register how ``param`` of ``module_types`` splits into units (see :data:`UnitGrouping`)."""

    def decorator(grouping: UnitGrouping) -> UnitGrouping:
        for module_type in module_types:
            _UNITS[(module_type, param)] = (grouping, num_units)
        return grouping

    return decorator


def find_rule(module: nn.Module, param: str) -> Optional[PerSampleRule]:
    """The rule covering ``module.<param>``, or None when the fallback must handle it."""
    module_type = type(module)
    if param in _HANDLED.get(module_type, ()):
        return _RULES[module_type]
    return None


def default_grouping(per_sample_grad: Tensor, module: Optional[nn.Module] = None) -> Tensor:
    """Units along index 0 of the parameter: ``(B, *shape) -> (B, shape[0], -1)``."""
    batch = per_sample_grad.shape[0]
    if per_sample_grad.dim() == 1:  # a 0-d parameter is one unit of one entry
        return per_sample_grad.reshape(batch, 1, 1)
    return per_sample_grad.reshape(batch, per_sample_grad.shape[1], -1)


def unit_grouping(module: Optional[nn.Module], param: str, shape: torch.Size):
    """``(grouping, num_units)`` for ``param`` of ``module`` (module None: a bare parameter)."""
    if module is not None and (type(module), param) in _UNITS:
        grouping, num_units = _UNITS[(type(module), param)]
        return grouping, num_units(module)
    return default_grouping, (shape[0] if len(shape) > 0 else 1)
