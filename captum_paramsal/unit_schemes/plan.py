"""From a unit scheme to what the engine computes and how its columns combine.

The engine computes one value per *slice* of each selected parameter: a row, or a
column where a scheme reads a parameter by its input features (a head reads the output
projection's columns). :class:`UnitPlan` says which axis each parameter is sliced along,
and how the slices' values combine into the user's columns: a head's value is the
reduction over the union of its slices' entries (:meth:`~..per_sample.reductions.Reduction.combine`),
which is exact because each reduction is the mean of an additive quantity.
"""

from __future__ import annotations

import difflib
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._utils import outside_stacklevel
from ..layout import SaliencyLayout, UnitPart
from .groups import UNIT_SCHEMES, UnitGroup, find_groups

#: what ``units=`` takes: a scheme, several, or ``{module or parameter name prefix: scheme}``
UnitsSpec = Union[str, Sequence[str], Mapping[str, str]]


@dataclass(frozen=True)
class UnitPlan:
    """How the engine's per-slice values become the user's columns.

    Attributes:
        layout: the user's columns (rows entries and groups).
        axes: ``{parameter name: storage axis}`` for parameters sliced along another axis
            than their registry's (pass to ``select_parameters(axes=)``).
        unit_of: ``(S,)`` the column of each slice, slices in the engine's layout order;
            None when slices are the columns (no group).
        entries: ``(S,)`` each slice's number of entries.
    """

    layout: SaliencyLayout
    axes: Dict[str, int]
    unit_of: Optional[Tensor] = None
    entries: Optional[Tensor] = None
    #: the slices that are a column on their own (rows entries), copied rather than combined
    single: Optional[Tensor] = None

    @property
    def identity(self) -> bool:
        return self.unit_of is None

    def combine(self, values: Tensor, reduction: Any) -> Tensor:
        """``(B, S) -> (B, F)``: slice values to the layout's columns."""
        if self.unit_of is None:
            return values
        unit_of = self.unit_of.to(values.device)
        columns = reduction.combine(values, self.entries.to(values.device), unit_of, self.layout.num_columns)
        single = self.single.to(values.device)
        # a column of one slice is that slice's value, bit for bit (not unpooled(pooled(v)))
        return columns.index_copy(1, unit_of[single], values[:, single])

    def slice_weights(self, weights_of: Callable[[Tensor], Tensor], reduction: Any) -> Callable[[Tensor], Tensor]:
        """``weights_of`` on columns turned into weights on slices, by the chain rule through
        :meth:`combine` (what the input saliency's second-order pass needs)."""
        if self.unit_of is None:
            return weights_of

        def on_slices(slices: Tensor) -> Tensor:
            with torch.enable_grad():
                leaf = slices.detach().requires_grad_()
                columns = self.combine(leaf, reduction)
                column_weights = weights_of(columns.detach()).detach()
                (weights,) = torch.autograd.grad(columns, leaf, column_weights)
            return weights

        return on_slices


def parse_units(units: UnitsSpec) -> Callable[[str], str]:
    """``scheme_of(name) -> scheme`` for a ``units=`` value; a clear error for a bad one.

    A string is one scheme for the whole model; a list or tuple, several; a mapping gives a
    scheme per module or parameter name prefix (the longest matching prefix wins; names it
    does not cover are ``"rows"``)."""
    def check(scheme: Any) -> str:
        if scheme not in UNIT_SCHEMES:
            raise ValueError(f"units must name schemes among {UNIT_SCHEMES}, got {scheme!r}")
        return scheme

    if isinstance(units, str):
        scheme = check(units)
        return lambda name, kind="": scheme if kind in ("", scheme) else "rows"
    if isinstance(units, Mapping):
        table = {str(prefix): check(scheme) for prefix, scheme in units.items()}

        def by_prefix(name: str, kind: str = "") -> str:
            best, chosen = -1, "rows"
            for prefix, scheme in table.items():
                if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                    best, chosen = len(prefix), scheme
            return chosen

        return by_prefix
    if isinstance(units, (list, tuple)) and units:
        chosen_set = {check(s) for s in units}
        return lambda name, kind="": kind if kind in chosen_set else "rows"
    raise TypeError(
        f"units must be a scheme ({', '.join(UNIT_SCHEMES)}), a list of them, or a mapping of module names "
        f"to schemes, got {units!r}"
    )


def _schemes_asked(units: UnitsSpec) -> List[str]:
    if isinstance(units, str):
        return [units]
    if isinstance(units, Mapping):
        return list(dict.fromkeys(units.values()))
    return list(dict.fromkeys(units))


def plan_units(
    model: nn.Module, selected: Sequence[Tuple[str, Tuple[int, ...], int]], units: UnitsSpec = "rows"
) -> UnitPlan:
    """The :class:`UnitPlan` of ``units`` for the selected parameters ``(name, shape, rows)``
    (the registry's units, in model order).

    Groups are found by :func:`~.groups.find_groups`; a group is used when all its parts'
    parameters are selected (else its parameters stay rows, with a warning that says which
    is missing). Every other selected parameter stays one unit per row.

    Raises:
        ValueError: an unknown scheme; a scheme asked for whose modules the model does not
            have (none of its attention blocks or MLPs recognized); a name prefix of a mapping
            that names no module or parameter.
    """
    scheme_of = parse_units(units)
    asked = [s for s in _schemes_asked(units) if s != "rows"]
    if isinstance(units, Mapping):
        _check_prefixes(model, units)
    if not asked:
        return UnitPlan(SaliencyLayout(list(selected)), {})
    shapes = {name: tuple(shape) for name, shape, _ in selected}
    groups: List[UnitGroup] = []
    for scheme in asked:
        found = [g for g in find_groups(model, scheme) if scheme_of(g.name, scheme) == scheme]
        if not found:
            raise ValueError(
                f"units asks for {scheme}, but no {'attention block' if scheme == 'heads' else 'MLP'} of this model "
                f"is one the unit schemes know ({_known(scheme)}); register a finder "
                "(captum_paramsal.unit_schemes.register_finder) or use units='rows'"
            )
        groups += found
    used: List[UnitGroup] = []
    for group in groups:
        missing = [p for p in group.params if p not in shapes]
        if missing:
            warnings.warn(
                f"units: {group.name}'s {group.kind} are not grouped: its parameter(s) {', '.join(missing)} are not "
                "selected (params=); its other parameters stay one unit per row",
                UserWarning, stacklevel=outside_stacklevel(),
            )
            continue
        used.append(group)
    return _build(selected, used)


def _build(selected: Sequence[Tuple[str, Tuple[int, ...], int]], groups: List[UnitGroup]) -> UnitPlan:
    owner: Dict[str, UnitGroup] = {}
    axes: Dict[str, int] = {}
    for group in groups:
        for part in group.parts:
            other = owner.get(part.param)
            if other is not None and other is not group:
                raise ValueError(f"{part.param} is in two unit groups, {other.name} and {group.name}")
            owner[part.param] = group
            if axes.setdefault(part.param, part.axis) != part.axis:
                raise ValueError(f"{part.param} is read along two axes in {group.name}")
    entries: List[Tuple] = []
    start_of: Dict[str, int] = {}
    column = 0
    for name, shape, num_units in selected:  # columns: each group where its first parameter is
        group = owner.get(name)
        if group is None:
            entries.append((name, shape, num_units))
            start_of[name] = column
            column += num_units
        elif group.name not in start_of:
            entries.append((group.name, (), group.num_units, group.kind, group.parts))
            start_of[group.name] = column
            column += group.num_units
    unit_of: List[int] = []
    counts: List[int] = []
    for name, shape, num_units in selected:  # slices: in the engine's order
        group = owner.get(name)
        if group is None:
            unit_of += range(start_of[name], start_of[name] + num_units)
            size = 1
            for s in shape:
                size *= s
            counts += [size // max(1, num_units)] * num_units
            continue
        axis = axes[name]
        slices = shape[axis]
        of_slice = [-1] * slices
        for part in (p for p in group.parts if p.param == name):
            for unit in range(group.num_units):
                for index in part.indices(unit):
                    of_slice[index] = start_of[group.name] + unit
        if -1 in of_slice:
            raise ValueError(f"{group.name}'s parts leave slices of {name} outside every unit: the finder is wrong")
        unit_of += of_slice
        size = 1
        for s in shape:
            size *= s
        counts += [size // slices] * slices
    layout = SaliencyLayout(entries)
    if not groups:
        return UnitPlan(layout, {})
    sizes = Counter(unit_of)
    single = [i for i, column in enumerate(unit_of) if sizes[column] == 1]
    return UnitPlan(layout, axes, torch.tensor(unit_of), torch.tensor(counts), torch.tensor(single, dtype=torch.long))


def _check_prefixes(model: nn.Module, units: Mapping[str, str]) -> None:
    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    known = set(names)
    for prefix in units:
        if prefix == "" or prefix in known:
            continue
        close = difflib.get_close_matches(prefix, names, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"units names {prefix!r}, which is no module or parameter of the model{hint}")


def _known(scheme: str) -> str:
    if scheme == "heads":
        return ("nn.MultiheadAttention, BERT-like query/key/value + output.dense, q/k/v/o projections (Llama, "
                "ViT, T5, BART), GPT-2's c_attn/c_proj")
    return "gate/up/down_proj, c_fc/c_proj, fc1/fc2, wi/wo, linear1/linear2, intermediate/output.dense"


def group_part_indices(part: UnitPart, units: Sequence[int], device: Optional[torch.device] = None) -> Tensor:
    """``(len(units), entries per unit)`` flat (row-major) indices into ``part.param`` of each unit."""
    flat = torch.arange(torch.Size(part.shape).numel(), device=device).view(part.shape)
    rows = []
    for unit in units:
        index = torch.tensor(list(part.indices(unit)), device=device)
        rows.append(flat.index_select(part.axis, index).reshape(-1))
    return torch.stack(rows)
