"""One registry of per-layer rules for per-sample parameter gradients.

A *rule* turns what one call of a layer saw in a batched forward/backward pass, all of
its inputs (:class:`~.call.CallInputs`: positional and keyword, batch first) and the
gradient at its output (batch first), into the per-sample gradient of each of the layer's
own parameters that was asked for, as a lazy :class:`~.grads.PerSampleGrad` (``(B,
*param.shape)`` once materialized). A rule knows the layer's derivatives only; what is
computed from them (``mean_abs``, ``rms``, ...) is the :mod:`.reductions`' business.

Each rule is registered once, by :func:`register_rule`, in the file of its layer family
under :mod:`.rules`, with what the rest of the library derives from it:

* which parameters it covers (``params``) and which of them the default selection takes
  (``default``): ``ParameterSaliency(model)`` selects exactly the registry's defaults;
* whether it also covers subclasses of its module types (``subclasses``): a subclass that
  keeps its parent's ``forward`` computes the same function, so the rule is exact for it
  (``NonDynamicallyQuantizableLinear``); a subclass that overrides ``forward`` (a LoRA or a
  quantized Linear) may use its weight differently and is never trusted to follow the rule;
* optionally ``input_rows``: the rows that multiply the weight (a Linear's input vectors, a
  convolution's patches), which SPADE's second moments need; the layers that have them are
  the layers SPADE can prune.

A layer whose parameter splits into *units* other than along index 0 registers a
grouping with :func:`register_units`. Everything without a rule goes through
:mod:`.fallback`, which is exact for every model and slower.

Examples::

    >>> import torch
    >>> from torch import nn
    >>> from captum_paramsal.per_sample import register_rule
    >>> from captum_paramsal.per_sample.grads import DenseGrad
    >>> class Scale(nn.Module):                      # y = x * weight, weight of shape (D,)
    ...     def __init__(self, d):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.ones(d))
    ...     def forward(self, x):
    ...         return x * self.weight
    >>> @register_rule(Scale, params=("weight",), default=("weight",))
    ... def scale_rule(module, inputs, grad_output, names):
    ...     x = inputs.arg(0, "x")
    ...     batch = x.shape[0]
    ...     # dL/dw = sum over every position of dy * x, per sample
    ...     per_sample = (grad_output * x).reshape(batch, -1, module.weight.shape[0]).sum(1)
    ...     return {"weight": DenseGrad(per_sample)}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

from .grads import PerSampleGrad

if TYPE_CHECKING:
    from .call import BatchDims, CallInputs

#: ``rule(module, inputs, grad_output, names) -> {name: PerSampleGrad}``
PerSampleRule = Callable[[nn.Module, "CallInputs", Tensor, FrozenSet[str]], Dict[str, PerSampleGrad]]
#: ``grouping(per_sample_grad (B, *shape), module) -> (B, units, entries_per_unit)``
UnitGrouping = Callable[[Tensor, nn.Module], Tensor]
#: ``input_rows(module, input, max_elements) -> chunks (G, D, n)``: per group, the rows that
#: multiply the weight's ``(G, R, D)`` view, as columns, a bounded chunk at a time (SPADE's
#: second moments ``X X^T`` sum them)
InputRows = Callable[[nn.Module, Tensor, int], Iterator[Tensor]]


@dataclass(frozen=True)
class LayerRule:
    """A registered per-sample rule and what it covers (see the module docstring)."""

    name: str
    module_types: Tuple[Type[nn.Module], ...]
    compute: PerSampleRule
    params: FrozenSet[str]
    default: FrozenSet[str]
    subclasses: bool
    input_rows: Optional[InputRows] = field(default=None, compare=False)
    batch_dims: Optional[BatchDims] = field(default=None, compare=False)
    #: ``unsupported(module) -> reason or None``: a configuration of the layer the rule does
    #: not compute (an Embedding with ``max_norm``); such a module goes to the fallback
    unsupported: Optional[Callable[[nn.Module], Optional[str]]] = field(default=None, compare=False)
    #: the layer treats every leading position alike (Linear, a norm, an embedding), so its batch
    #: may be any leading dim: the probe finds it (a sequence-first call) and the engine moves it
    positionwise: bool = False

    def __call__(
        self, module: nn.Module, inputs: CallInputs, grad_output: Tensor, names: FrozenSet[str]
    ) -> Dict[str, PerSampleGrad]:
        return self.compute(module, inputs, grad_output, names)


_RULES: Dict[Type[nn.Module], LayerRule] = {}
_UNITS: Dict[Tuple[Type[nn.Module], str], Tuple[UnitGrouping, Callable[[nn.Module], int]]] = {}


def register_rule(
    *module_types: Type[nn.Module],
    params: Sequence[str] = ("weight", "bias"),
    default: Sequence[str] = (),
    subclasses: bool = False,
    input_rows: Optional[InputRows] = None,
    name: Optional[str] = None,
    batch_dims: Optional[BatchDims] = None,
    unsupported: Optional[Callable[[nn.Module], Optional[str]]] = None,
    positionwise: bool = False,
) -> Callable[[PerSampleRule], PerSampleRule]:
    """Register the decorated ``rule(module, inputs, grad_output, names)`` for ``module_types``.

    Args:
        module_types: the layer classes the rule is exact for.
        params: the attribute names of the parameters it covers.
        default: those of ``params`` that ``ParameterSaliency(model)`` selects when no
            ``params=`` is given (the weight matrices and filters, not biases or norms).
        subclasses: also cover subclasses of ``module_types`` that do not override
            ``forward`` (the nearest registered class wins).
        input_rows: ``input_rows(module, input, max_elements)``, the rows that multiply the
            weight as ``(G, D, n)`` column chunks (for SPADE); None where the layer is not a
            matrix product of its input.
        name: how the routing report names the rule (default: the function's name).
        batch_dims: ``batch_dims(module, inputs, output) -> (input dims, output dims)``: which
            dim of each tensor input and each tensor output holds the batch (a sequence-first
            layer, an LSTM's ``h_n``); the engine moves them to 0 before calling the rule, so
            that a rule only ever sees batch-first tensors. Default: dim 0 everywhere.
        unsupported: ``unsupported(module) -> reason or None``, for configurations of the layer
            the rule does not compute: such a module goes to the fallback, with the reason in
            the routing report.
        positionwise: the layer treats every leading position alike (it maps ``(..., D_in)`` to
            ``(..., D_out)`` position by position), so a call fed sequence first, ``(T, B, D)``,
            is exact too: the probe finds the batch dim and the engine moves it to 0.

    Examples::

        >>> @register_rule(Scale, params=("weight",))
        ... def scale_rule(module, inputs, grad_output, names): ...
    """
    if not module_types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in module_types):
        raise TypeError(f"register_rule needs nn.Module subclasses, got {module_types!r}")
    if isinstance(params, str) or isinstance(default, str):
        raise TypeError("params and default are sequences of attribute names, e.g. ('weight',)")
    if not set(default) <= set(params):
        raise ValueError(f"default {tuple(default)} must be among params {tuple(params)}")

    def decorator(compute: PerSampleRule) -> PerSampleRule:
        rule = LayerRule(
            name or getattr(compute, "__name__", "rule"), tuple(module_types), compute,
            frozenset(params), frozenset(default), bool(subclasses), input_rows, batch_dims, unsupported,
            bool(positionwise),
        )
        for module_type in module_types:
            _RULES[module_type] = rule
        return compute

    return decorator


def register_units(
    *module_types: Type[nn.Module], param: str, num_units: Callable[[nn.Module], int]
) -> Callable[[UnitGrouping], UnitGrouping]:
    """Register how ``param`` of ``module_types`` splits into units (see :data:`UnitGrouping`).

    Examples::

        >>> @register_units(nn.ConvTranspose2d, param="weight", num_units=lambda m: m.out_channels)
        ... def output_channel_units(per_sample_grad, module): ...
    """

    def decorator(grouping: UnitGrouping) -> UnitGrouping:
        for module_type in module_types:
            _UNITS[(module_type, param)] = (grouping, num_units)
        return grouping

    return decorator


_loaded_libraries: set = set()


def _load_library_rules(module_type: Type[nn.Module]) -> None:
    """Import the rule files of the library that defines ``module_type`` (see
    ``rules.LIBRARY_RULES``), once, the first time one of its layers is met."""
    library = (module_type.__module__ or "").split(".", 1)[0]
    if library in _loaded_libraries:
        return
    _loaded_libraries.add(library)
    import importlib

    from .rules import LIBRARY_RULES

    for name in LIBRARY_RULES.get(library, ()):
        importlib.import_module(f"{__package__}.rules.{name}")


def _registered_base(module_type: Type[nn.Module]) -> Optional[Type[nn.Module]]:
    """The nearest registered class of ``module_type`` (itself first), or None."""
    _load_library_rules(module_type)
    for base in module_type.__mro__:
        if base in _RULES:
            return base
    return None


def rule_for_module(module: nn.Module) -> Tuple[Optional[LayerRule], str]:
    """``(the rule for this module's type or None, why not)``."""
    module_type = type(module)
    base = _registered_base(module_type)
    if base is None:
        return None, f"no rule for {module_type.__name__}"
    rule = _RULES[base]
    why = rule.unsupported(module) if rule.unsupported is not None else None
    if why:
        return None, why
    if base is module_type:
        return rule, ""
    if not rule.subclasses:
        return None, f"{module_type.__name__} subclasses {base.__name__}, whose rule does not cover subclasses"
    if module_type.forward is not base.forward:
        return None, (
            f"{module_type.__name__} subclasses {base.__name__} but overrides forward, so the "
            f"{rule.name} rule may not match it; register a rule for {module_type.__name__}"
        )
    return rule, ""


def explain_rule(module: nn.Module, param: str) -> Tuple[Optional[LayerRule], str]:
    """``(the rule covering module.<param>, "")`` or ``(None, the reason there is none)``."""
    rule, why = rule_for_module(module)
    if rule is None:
        return None, why
    if param not in rule.params:
        return None, f"the {rule.name} rule covers {sorted(rule.params)}, not {param!r}"
    return rule, ""


def find_rule(module: nn.Module, param: str) -> Optional[LayerRule]:
    """The rule covering ``module.<param>``, or None when the fallback must handle it."""
    return explain_rule(module, param)[0]


def default_params(module: nn.Module) -> FrozenSet[str]:
    """The attribute names of ``module``'s parameters that the default selection takes.

    A module whose nearest registered class has a rule is selected like that class even
    where the rule does not cover it (a subclass overriding ``forward``): its weights are
    still the model's weight matrices, computed exactly by the fallback, and the routing
    report says why they are not on the fast path.
    """
    base = _registered_base(type(module))
    return frozenset() if base is None else _RULES[base].default


def prunable_types() -> Tuple[Type[nn.Module], ...]:
    """The registered layer types whose weight has ``input_rows`` (what SPADE can prune)."""
    return tuple(t for t, rule in _RULES.items() if rule.input_rows is not None)


def registered_rules() -> List[LayerRule]:
    """Every registered rule once, in registration order."""
    seen: List[LayerRule] = []
    for rule in _RULES.values():
        if all(rule is not other for other in seen):
            seen.append(rule)
    return seen


def default_grouping(per_sample_grad: Tensor, module: Optional[nn.Module] = None) -> Tensor:
    """Units along index 0 of the parameter: ``(B, *shape) -> (B, shape[0], -1)``."""
    batch = per_sample_grad.shape[0]
    if per_sample_grad.dim() == 1:  # a 0-d parameter is one unit of one entry
        return per_sample_grad.reshape(batch, 1, 1)
    return per_sample_grad.reshape(batch, per_sample_grad.shape[1], -1)


def column_grouping(per_sample_grad: Tensor, module: Optional[nn.Module] = None) -> Tensor:
    """Units along index 1 of a 2-D parameter: ``(B, rows, columns) -> (B, columns, rows)``
    (a Linear weight's input features; a unit scheme's head reads columns of the output
    projection)."""
    return per_sample_grad.transpose(1, 2)


def grouping_axis(grouping: Callable) -> Optional[int]:
    """The axis of a 2-D parameter that ``grouping`` makes the units: 0, 1, or None (another
    grouping). A layer storing its weight transposed marks its grouping with ``storage_axis``."""
    if grouping is default_grouping:
        return 0
    if grouping is column_grouping:
        return 1
    return getattr(grouping, "storage_axis", None)


def axis_grouping(module: Optional[nn.Module], param: str, shape: torch.Size, axis: int) -> Tuple[UnitGrouping, int]:
    """``(grouping, num_units)`` with the units along storage ``axis`` of a 2-D parameter: the
    registered grouping where it already is that axis, else rows (0) or columns (1).

    Raises:
        ValueError: ``axis`` is not 0 or 1, or the parameter is not 2-D.
    """
    if axis not in (0, 1) or len(shape) != 2:
        raise ValueError(f"units along axis {axis} need a 2-D parameter and axis 0 or 1, got shape {tuple(shape)}")
    registered, num_units = unit_grouping(module, param, shape)
    if grouping_axis(registered) == axis:
        return registered, num_units
    return (default_grouping if axis == 0 else column_grouping), shape[axis]


def unit_grouping(module: Optional[nn.Module], param: str, shape: torch.Size) -> Tuple[UnitGrouping, int]:
    """``(grouping, num_units)`` for ``param`` of ``module`` (module None: a bare parameter)."""
    if module is not None:
        for base in type(module).__mro__:
            if (base, param) in _UNITS:
                grouping, num_units = _UNITS[(base, param)]
                return grouping, num_units(module)
    return default_grouping, (shape[0] if len(shape) > 0 else 1)
