"""Which parameters a saliency profile covers, who owns them, and how they split into units."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from ..layout import SaliencyLayout
from .registry import (
    UnitGrouping,
    axis_grouping,
    default_params,
    explain_rule,
    registered_rules,
    rule_for_module,
    unit_grouping,
)


@dataclass(frozen=True)
class SelectedParameter:
    """A selected parameter with everything the engine needs to compute its units."""

    name: str
    param: nn.Parameter
    #: (module, attribute name) pairs that hold this parameter directly.
    owners: Tuple[Tuple[nn.Module, str], ...]
    grouping: UnitGrouping
    grouping_module: Optional[nn.Module]
    num_units: int

    @property
    def has_rule(self) -> bool:
        """True when every owner has a per-layer rule (else only the fallback is exact)."""
        return self.why_no_rule() is None

    def why_no_rule(self) -> Optional[str]:
        """None when every owner has a rule for this parameter, else why not."""
        if not self.owners:
            return "no module holds it (a bare parameter of the model)"
        for module, attr in self.owners:
            rule, why = explain_rule(module, attr)
            if rule is None:
                return why
        return None


@dataclass(frozen=True)
class Selection:
    layout: SaliencyLayout
    params: Tuple[SelectedParameter, ...]
    #: what wraps the model (``"module."`` of DataParallel, ``"_orig_mod."`` of torch.compile,
    #: a thin wrapper's attribute): not part of a parameter's identity
    wrapper_prefix: str = ""

    @property
    def identity_layout(self) -> SaliencyLayout:
        """:attr:`layout` with the wrapper prefix taken off each name: what statistics are
        keyed by, so that they do not depend on how the model is wrapped."""
        if not self.wrapper_prefix:
            return self.layout
        cut = len(self.wrapper_prefix)
        return SaliencyLayout([(e.name[cut:], e.shape, e.num_units) for e in self.layout])


def wrapper_prefix(model: nn.Module) -> str:
    """The names of the modules that only wrap ``model``'s real network: from the top, each
    module that holds no parameter or buffer of its own and exactly one child (DataParallel's
    ``module``, torch.compile's ``_orig_mod``, a thin user wrapper), joined as a name prefix."""
    prefix, module = "", model
    while True:
        children = list(module.named_children())
        own = [p for p in module._parameters.values() if p is not None]
        own += [b for b in module._buffers.values() if b is not None]
        if len(children) != 1 or own:
            return prefix
        name, module = children[0]
        prefix += name + "."


def _owners(model: nn.Module) -> Dict[int, List[Tuple[nn.Module, str]]]:
    """``{id(param): [(module, attribute)]}``: the modules whose calls use each parameter.

    Usually the module that holds it. A rule may claim a child's parameter that its module's
    forward reads functionally (MultiheadAttention reads ``out_proj.weight`` without calling
    ``out_proj``): the rule's module then owns it under the dotted name, instead of the child.
    """
    owners: Dict[int, List[Tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, attr))
    for module in model.modules():
        rule = rule_for_module(module)[0]
        for dotted in (name for name in (rule.params if rule is not None else ()) if "." in name):
            child_path, attr = dotted.rsplit(".", 1)
            try:
                child = module.get_submodule(child_path)
            except AttributeError:
                continue
            param = child._parameters.get(attr)
            if param is not None:
                others = [(m, a) for m, a in owners.get(id(param), []) if not (m is child and a == attr)]
                owners[id(param)] = [(module, dotted), *others]
    return owners


def select_parameters(
    model: nn.Module, params: Optional[Sequence[str]] = None, axes: Optional[Mapping[str, int]] = None
) -> Selection:
    """Resolve ``params`` (names, or None for the default selection) into a :class:`Selection`.

    The default selection is the registry's: each registered rule's ``default`` parameters
    (the weight of every convolution, transposed convolution and Linear layer, their
    subclasses included), in ``model.named_parameters()`` order.

    ``axes``: ``{parameter name: storage axis}`` for 2-D parameters whose units are to be
    taken along that axis (0: rows, 1: columns) instead of the registry's (a unit scheme
    reads a head from the output projection's columns); the others keep the registry's.

    Raises:
        ValueError: a name the model does not have, a name given twice, or
            nothing to select.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ParameterSaliency needs an nn.Module, got {type(model).__name__}")
    canonical = dict(model.named_parameters())
    owners = _owners(model)
    if params is None:
        wanted = {
            id(getattr(module, attr))
            for module in model.modules()
            for attr in default_params(module)
            if isinstance(getattr(module, attr, None), nn.Parameter)
        }
        if not wanted:
            kinds = sorted({t.__name__ for rule in registered_rules() if rule.default for t in rule.module_types})
            raise ValueError(
                "the model has no Conv, ConvTranspose or Linear weight to select by default (the registry's "
                f"defaults: weights of {', '.join(kinds)}); pass params=[...] with names from model.named_parameters()"
            )
    else:
        if isinstance(params, str):
            params = [params]
        aliases = dict(model.named_parameters(remove_duplicate=False))
        wanted = set()
        prefix = wrapper_prefix(model)
        for name in params:
            if name not in aliases and prefix + name in aliases:  # named without the wrapper
                name = prefix + name
            if name not in aliases:
                close = difflib.get_close_matches(name, list(aliases), n=3)
                hint = f"; did you mean {close}?" if close else ""
                raise ValueError(f"the model has no parameter named {name!r}{hint}")
            if id(aliases[name]) in wanted:
                raise ValueError(f"parameter {name!r} is listed twice in params=")
            wanted.add(id(aliases[name]))
        if not wanted:
            raise ValueError("params= is empty: name at least one parameter")

    selected = []
    for name, param in canonical.items():
        if id(param) not in wanted:
            continue
        param_owners = tuple(owners.get(id(param), ()))
        module = param_owners[0][0] if param_owners else None
        attr = param_owners[0][1] if param_owners else name.rsplit(".", 1)[-1]
        if axes is not None and name in axes:
            grouping, num_units = axis_grouping(module, attr, param.shape, axes[name])
        else:
            grouping, num_units = unit_grouping(module, attr, param.shape)
        selected.append(SelectedParameter(name, param, param_owners, grouping, module, num_units))
    layout = SaliencyLayout([(p.name, tuple(p.param.shape), p.num_units) for p in selected])
    return Selection(layout, tuple(selected), wrapper_prefix(model))
