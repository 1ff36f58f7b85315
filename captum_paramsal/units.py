"""One vocabulary for naming units, shared by every part of the library that takes them.

A *unit* is what the saliency computes one number for: a convolution's output filter, a
Linear layer's output row, a transposed convolution's output channel, index 0 of any other
parameter (docs/METHOD.md, "Units, reductions and the selected parameters"). Wherever the
library takes units (the interventions
:func:`~captum_paramsal.interventions.turn_off` / ``boost`` / ``perturb``, the fine-tuning test
:func:`~captum_paramsal.analysis.finetune_salient`, the pruning curves, the input saliency's
``units=``), a unit may be written in any of these forms:

* a **layout column**: an ``int`` (a NumPy integer or a 0-d integer tensor too, but not a
  ``bool``), the column of a ``(B, F)`` profile, e.g. ``int(sal[0].argmax())``. A column only
  means something together with the :class:`~captum_paramsal.layout.SaliencyLayout` it indexes;
* a **(parameter name, unit index)** pair, a tuple or a list, e.g. ``("layer4.1.conv2.weight", 97)``;
  the name as in ``model.named_parameters()``; or, for a head or a neuron
  (:mod:`captum_paramsal.unit_schemes`), the **(module name, head or neuron index)** pair,
  e.g. ``("transformer.h.3.attn", 7)``, as layouts under ``units="heads"`` name them;
* a :class:`~captum_paramsal.saliency_profile.UnitScore`, what ``profile.top_k()`` returns; it is
  read as its ``(param, unit)`` pair (its ``column`` is the column in the profile it came from,
  which need not be the layout it is resolved against, so it is not used).

A collection of units is any iterable of these (a list, a tuple of pairs, a 1-D integer tensor of
columns, one row of ``profile.top_k()``); a single unit on its own is read as a collection of
one. :func:`resolve_columns` turns units into layout columns, :func:`resolve_units` into
``{parameter name: [unit indices]}`` for a model.

Examples::

    >>> from captum_paramsal.units import resolve_columns, resolve_units
    >>> layout = ps.layout
    >>> resolve_columns([4711, ("fc.weight", 3)], layout)
    [4711, 5003]
    >>> resolve_units(model, ps.profile(images).top_k(3)[0])        # sample 0's top 3
    {'layer4.1.conv2.weight': [97], 'fc.weight': [3, 7]}
"""

from __future__ import annotations

import bisect
import difflib
import operator
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .layout import SaliencyLayout
from .saliency_profile import UnitScore

#: One unit: a layout column, a ``(parameter name, unit index)`` pair or a ``UnitScore``.
Unit = Union[int, Tensor, Tuple[str, int], UnitScore]
#: A collection of units (or a single unit, read as a collection of one).
Units = Union[Unit, Iterable[Unit]]

_FORMS = "a layout column (int), a (parameter name, unit index) pair or a UnitScore"


def resolve_columns(units: Units, layout: SaliencyLayout) -> List[int]:
    r"""The layout columns of ``units``, in the caller's order, duplicates dropped.

    Every form of unit (see :mod:`captum_paramsal.units`) is turned into its column of
    ``layout``: a column is range-checked (``0 <= column < layout.num_columns``; negative
    columns are not counted from the end), a ``(name, index)`` pair or a ``UnitScore`` is
    looked up with :meth:`SaliencyLayout.column`, so its parameter must be in the layout.

    Order: the columns come in the order the units are given (so ``top_k`` rows keep their
    ranking); a unit named twice, in the same or in two forms, is kept at its first place only.
    An empty collection gives an empty list; whether that is allowed is the caller's decision.

    Args:
        units: a collection of units, or a single unit.
        layout: the :class:`~captum_paramsal.layout.SaliencyLayout` the columns index (e.g.
            ``ps.layout``).

    Returns:
        ``list`` of ``int`` columns.

    Raises:
        TypeError: a unit in none of the forms (a bare parameter name, a float, a bool, ...),
            or ``layout`` that is not a ``SaliencyLayout``.
        ValueError: a column out of range, a parameter not in the layout, or a unit index out
            of range for its parameter; the message names the unit.

    Examples::

        >>> from captum_paramsal.units import resolve_columns
        >>> layout = ps.layout
        >>> resolve_columns([("layer1.0.conv1.weight", 5), 17, 17], layout)
        [5, 17]
        >>> resolve_columns(profile.top_k(10)[0], layout)      # sample 0's top 10, ranked
        >>> resolve_columns(sal[0].topk(5).indices, layout)     # a tensor of columns
    """
    if not isinstance(layout, SaliencyLayout):
        raise TypeError(f"layout must be a SaliencyLayout (e.g. ps.layout), got {type(layout).__name__}")
    columns: List[int] = []
    seen = set()
    for unit in iter_units(units):
        column = _column_of(unit, layout)
        if column not in seen:
            seen.add(column)
            columns.append(column)
    return columns


def resolve_units(
    model: nn.Module, units: Units, layout: Optional[SaliencyLayout] = None
) -> Dict[str, List[int]]:
    r"""``{parameter name: [unit indices]}`` of ``units`` in ``model``, for units that are one
    parameter's rows (a head or a neuron spans parameters: :func:`resolve_entries` takes those).

    Columns are read in ``layout``; without one, in the layout of the model's default selection
    (what ``ParameterSaliency(model).layout`` is: every Conv, ConvTranspose and Linear weight),
    built only when a column is given. Pairs and ``UnitScore`` name parameters of ``model``
    directly, with or without a layout: the name must be one of ``model.named_parameters()``
    (an alias of a tied parameter is read as the parameter's own name; a wrapped model's
    parameter may be named without the wrapper's prefix, as ``params=`` takes it), with a
    "did you mean" hint otherwise, and the index must be below the parameter's number of
    units (as the saliency counts them).

    Order: parameters in ``model.named_parameters()`` order, each one's indices sorted, a unit
    named twice kept once. An empty collection gives ``{}``.

    Args:
        model: the network whose parameters the units belong to.
        units: a collection of units, or a single unit.
        layout: the :class:`~captum_paramsal.layout.SaliencyLayout` that columns index (e.g.
            ``ps.layout`` of a ``ParameterSaliency`` with ``params=``); default: the default
            selection's.

    Returns:
        ``dict`` of parameter name to a sorted ``list`` of unit indices.

    Raises:
        TypeError: a unit in none of the forms, or ``layout`` that is not a ``SaliencyLayout``.
        ValueError: a column out of range of the layout, a parameter the model does not have,
            a unit index out of range for its parameter, or a head / neuron (the message
            names the unit).

    Examples::

        >>> from captum_paramsal.units import resolve_units
        >>> resolve_units(model, [("fc.weight", 3), ("layer4.1.conv2.weight", 97)])
        {'layer4.1.conv2.weight': [97], 'fc.weight': [3]}
        >>> resolve_units(model, [4711], layout=ps.layout)     # a column of ps's profiles
        {'layer4.1.conv2.weight': [97]}
        >>> resolve_units(model, ps.profile(images).top_k(5)[0])
    """
    rows, groups = _resolve(model, units, layout)
    if groups:
        group, index, unit = groups[0]
        raise ValueError(
            f"unit {_show(unit)} is {group.kind[:-1].replace('_', ' ')} {index} of {group.name}, which spans "
            "parameters; resolve_entries (and turn_off, boost, perturb) take such units"
        )
    return rows


def resolve_entries(
    model: nn.Module, units: Units, layout: Optional[SaliencyLayout] = None, bias: bool = False
) -> Dict[str, List[Tensor]]:
    r"""``{parameter name: [flat entry indices (k, m)]}``: where ``units`` lie in ``model``'s
    parameters, for every kind of unit (rows, heads, neurons).

    Each block holds ``k`` chosen units of one kind in one parameter, one row of ``m`` flat
    (row-major) indices each: a row unit's entries as the saliency groups them (so a
    transposed convolution's output channels come out right); a head's or a neuron's part
    of that parameter (GPT-2's head ``h`` in ``c_attn.weight``: its q, k and v columns
    together). Units are read as in :func:`resolve_units`, plus heads and neurons: layout
    columns or ``(name, index)`` pairs whose name is a group of ``layout`` or, without one,
    a group the unit schemes find in the model (``("transformer.h.3.attn", 7)``).

    With ``bias=True`` the blocks also hold the units' entries of their layers' biases: a
    row's bias entry; a head's or neuron's entries of the biases of the parts that lie along
    their layer's output axis (q, k and v, the up projection), not of those along the input
    axis (the output projection's bias belongs to no head).

    Examples::

        >>> from captum_paramsal.units import resolve_entries
        >>> blocks = resolve_entries(gpt2, [("transformer.h.0.attn", 1)])
        >>> {name: [b.shape for b in bs] for name, bs in blocks.items()}
        {'transformer.h.0.attn.c_attn.weight': [(1, 384)], 'transformer.h.0.attn.c_proj.weight': [(1, 128)]}
    """
    from .interventions import unit_entries
    from .per_sample.selection import select_parameters
    from .unit_schemes import group_part_indices

    rows, groups = _resolve(model, units, layout)
    blocks: Dict[str, List[Tensor]] = {}
    params = dict(model.named_parameters())
    names = {id(param): name for name, param in params.items()}
    if rows:
        for p in select_parameters(model, list(rows)).params:
            blocks.setdefault(p.name, []).append(unit_entries(p)[rows[p.name]])
            owner_bias = _row_bias(p, names) if bias else None
            if owner_bias is not None:
                index = torch.tensor(rows[p.name], device=params[owner_bias].device)[:, None]
                blocks.setdefault(owner_bias, []).append(index)
    by_group: Dict[str, Tuple[Any, List[int]]] = {}
    for group, index, _ in groups:
        chosen = by_group.setdefault(group.name, (group, []))[1]
        if index not in chosen:
            chosen.append(index)
    for group, chosen in by_group.values():
        chosen.sort()
        per_param: Dict[str, List[Tensor]] = {}
        for part in group.parts:
            device = params[part.param].device if part.param in params else None
            per_param.setdefault(part.param, []).append(group_part_indices(part, chosen, device))
            part_bias = _part_bias(model, part) if bias else None
            if part_bias is not None:
                index = torch.tensor([list(part.indices(u)) for u in chosen], device=device)
                per_param.setdefault(part_bias, []).append(index)
        for name, pieces in per_param.items():
            blocks.setdefault(name, []).append(torch.cat(pieces, dim=1))
    order = {name: i for i, name in enumerate(params)}
    return {name: blocks[name] for name in sorted(blocks, key=lambda n: order.get(n, len(order)))}


def _resolve(model: nn.Module, units: Units, layout: Optional[SaliencyLayout]):
    """``(rows {param: sorted indices}, groups [(group, index, unit as given)])`` of ``units``."""
    from .per_sample.selection import select_parameters, wrapper_prefix

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if layout is not None and not isinstance(layout, SaliencyLayout):
        raise TypeError(f"layout must be a SaliencyLayout or None, got {type(layout).__name__}")
    # every name of every parameter (a tied weight's aliases too), and, as select_parameters
    # (so ParameterSaliency's params=) reads them, the names of a wrapped model's parameters
    # without the wrapper's prefix (DataParallel's "module.", torch.compile's "_orig_mod.")
    aliases = dict(model.named_parameters(remove_duplicate=False))
    prefix = wrapper_prefix(model)
    if prefix:
        aliases.update({name[len(prefix):]: p for name, p in aliases.items()
                        if name.startswith(prefix) and name[len(prefix):] not in aliases})
    canonical = {id(param): name for name, param in model.named_parameters()}
    wanted: Dict[str, List[Tuple[int, Any]]] = {}  # canonical name -> [(index, the unit as given)]
    groups: List[Tuple[Any, int, Any]] = []
    model_groups: Optional[Dict[str, Any]] = None
    for unit in iter_units(units):
        if _is_column(unit):
            if layout is None:
                layout = select_parameters(model).layout
            name, index = layout.unit_of(_column_of(unit, layout))
            entry = layout[name]
            if entry.is_group:
                groups.append((entry, index, unit))
                continue
            if name not in aliases:
                raise ValueError(
                    f"unit column {_as_int(unit)} is {(name, index)!r} in the layout, but the model has no "
                    f"parameter named {name!r}: is the layout this model's?"
                )
        else:
            name, index = _pair_of(unit)
            group = None
            if layout is not None and name in layout and layout[name].is_group:
                group = layout[name]
            elif name not in aliases:
                if model_groups is None:
                    model_groups = _model_groups(model)
                group = model_groups.get(name)
                if group is None and prefix:
                    group = model_groups.get(prefix + name)
                if group is None:
                    known = list(aliases) + list(model_groups)
                    raise ValueError(
                        f"unit {_show(unit)}: the model has no parameter named {name!r}{_hint(name, known)} "
                        "(nor an attention block or MLP of that name)"
                    )
            if group is not None:
                if not 0 <= index < group.num_units:
                    raise ValueError(
                        f"unit {_show(unit)} is out of range: {name} has {group.num_units} {group.kind} "
                        f"(indices 0..{group.num_units - 1})"
                    )
                groups.append((group, index, unit))
                continue
        wanted.setdefault(canonical[id(aliases[name])], []).append((index, unit))
    resolved: Dict[str, List[int]] = {}
    if wanted:
        for p in select_parameters(model, list(wanted)).params:
            for index, unit in wanted[p.name]:
                if not 0 <= index < p.num_units:
                    raise ValueError(
                        f"unit {index} of {p.name} is out of range: it has {p.num_units} units "
                        f"(indices 0..{p.num_units - 1}; given as {_show(unit)})"
                    )
            resolved[p.name] = sorted({index for index, _ in wanted[p.name]})
    return resolved, groups


def _row_bias(p: Any, names: Dict[int, str]) -> Optional[str]:
    """The name of the bias whose entry ``u`` belongs to row unit ``u`` of weight ``p``, if any."""
    module = p.grouping_module
    if module is None or not p.name.endswith("weight"):
        return None
    bias = getattr(module, "bias", None)
    if isinstance(bias, nn.Parameter) and id(bias) in names and bias.dim() == 1 and bias.shape[0] == p.num_units:
        return names[id(bias)]
    return None


def _part_bias(model: nn.Module, part: Any) -> Optional[str]:
    """The bias of a group part's layer where the part lies along the layer's output axis
    (``q_proj.weight`` -> ``q_proj.bias``, ``in_proj_weight`` -> ``in_proj_bias``), else None."""
    from .per_sample.registry import grouping_axis
    from .per_sample.selection import select_parameters

    if not part.param.endswith("weight"):
        return None
    name = part.param[: -len("weight")] + "bias"
    bias = dict(model.named_parameters()).get(name)
    if bias is None or bias.dim() != 1 or bias.shape[0] != part.shape[part.axis]:
        return None
    (p,) = select_parameters(model, [part.param]).params
    return name if grouping_axis(p.grouping) == part.axis else None


def _model_groups(model: nn.Module) -> Dict[str, Any]:
    """Every head and neuron group the unit schemes find in ``model``, by name."""
    from .unit_schemes import find_groups

    return {g.name: g for scheme in ("heads", "neurons") for g in find_groups(model, scheme)}


def iter_units(units: Units) -> Iterable[Unit]:
    """The units of a collection one by one; a single unit is a collection of one.

    Raises:
        TypeError: ``units`` is neither a unit nor an iterable of units (e.g. a bare string).

    Examples::

        >>> list(iter_units(("fc.weight", 3)))       # a single pair
        [('fc.weight', 3)]
        >>> list(iter_units(torch.tensor([4, 9])))   # a tensor of columns
        [tensor(4), tensor(9)]
    """
    if isinstance(units, str):
        raise TypeError(
            f"units is the string {units!r}: a parameter name alone names no unit; "
            f"give (name, unit index) pairs, e.g. [({units!r}, 0)]"
        )
    if _is_column(units) or _is_pair(units) or isinstance(units, UnitScore):
        return [units]
    if isinstance(units, Tensor):
        if units.dim() == 0:  # not a column (a float or bool scalar): the unit's own error names it
            return [units]
        if units.dim() > 1:
            raise TypeError(f"units as a tensor must be a 1-D tensor of layout columns, got shape {tuple(units.shape)}")
    try:
        return list(units)
    except TypeError:
        raise TypeError(f"units must be one unit or a collection of units; {_not_a_unit(units)}") from None


# -- one unit ----------------------------------------------------------------------------------


def _is_column(unit: Any) -> bool:
    """An int, a NumPy integer or a 0-d integer tensor; never a bool."""
    if isinstance(unit, bool):
        return False
    if isinstance(unit, Tensor):
        return unit.dim() == 0 and not (unit.is_floating_point() or unit.is_complex() or unit.dtype == torch.bool)
    if isinstance(unit, (str, bytes, tuple, list)):
        return False
    try:
        operator.index(unit)  # int, numpy integers (numpy bools have no __index__)
    except TypeError:
        return False
    return True


def _is_pair(unit: Any) -> bool:
    return (
        isinstance(unit, (tuple, list))
        and not isinstance(unit, UnitScore)
        and len(unit) == 2
        and isinstance(unit[0], str)
    )


def _as_int(unit: Any) -> int:
    return operator.index(unit)


def _pair_of(unit: Any) -> Tuple[str, int]:
    """``(name, index)`` of a pair or a UnitScore; a TypeError for anything else."""
    if isinstance(unit, UnitScore):
        name, index = unit.param, unit.unit
    elif _is_pair(unit):
        name, index = unit
    else:
        raise TypeError(_not_a_unit(unit))
    if not _is_column(index):
        raise TypeError(
            f"unit {_show(unit)} in units: the unit index must be an int, got {type(index).__name__} {index!r} "
            "(an int, a NumPy integer or a 0-d integer tensor; not a bool, nor a float even if whole)"
        )
    return name, _as_int(index)


def _column_of(unit: Any, layout: SaliencyLayout) -> int:
    if _is_column(unit):
        column = _as_int(unit)
        if not 0 <= column < layout.num_columns:
            raise ValueError(
                f"unit column {column} is out of range for a layout of {layout.num_columns} columns "
                f"(0..{layout.num_columns - 1})"
            )
        return column
    name, index = _pair_of(unit)
    if name not in layout:
        raise ValueError(f"unit {_show(unit)}: no parameter {name!r} in the layout{_hint(name, layout.names)}")
    entry = layout[name]
    if not 0 <= index < entry.num_units:
        raise ValueError(
            f"unit {_show(unit)} is out of range: {name} has {entry.num_units} units (indices 0..{entry.num_units - 1})"
        )
    return entry.slice.start + index


def _not_a_unit(unit: Any) -> str:
    if isinstance(unit, str):
        return (
            f"a unit is {_FORMS}; got the string {unit!r} (a parameter name alone names no unit: "
            f"give ({unit!r}, unit index))"
        )
    if isinstance(unit, Tensor):
        return (
            f"a unit is {_FORMS}; got a tensor of dtype {unit.dtype} and shape {tuple(unit.shape)} "
            "(a column as a tensor must be a 0-d integer tensor)"
        )
    if isinstance(unit, (float, bool)) or (type(unit).__module__ == "numpy" and getattr(unit, "ndim", 1) == 0):
        return (
            f"a unit is {_FORMS}, got {type(unit).__name__} {unit!r} (a layout column is an int: not a bool, "
            "nor a float even if whole)"
        )
    return f"a unit is {_FORMS}, got {unit!r}"


def _show(unit: Any) -> str:
    if isinstance(unit, UnitScore):
        return f"UnitScore({unit.param!r}, unit={unit.unit})"
    if isinstance(unit, list):
        return repr(tuple(unit))
    return repr(unit)


def _hint(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


class UnitEntries:
    """Each layout column's flat entries (row-major) in each parameter it spans, resolved once
    per layout entry (on first use) by :func:`resolve_entries`, the function
    :func:`~captum_paramsal.interventions.turn_off` resolves units with: turning off a set of
    columns zeroes exactly the union of their entries. For code that visits many units (the
    turn-off test's interventions, each unit's weight magnitude) without resolving each alone.

    Examples::

        >>> entries = UnitEntries(model, ps.layout)
        >>> blocks, row = entries.blocks(12)      # [(name, (units, entries))], column 12's row in each
        >>> entries.names([12, 400])              # the parameters turning off both edits
    """

    def __init__(self, model: nn.Module, layout: SaliencyLayout) -> None:
        self.model, self.layout = model, layout
        self._entries = [e for e in layout if e.num_units > 0]
        self._starts = [e.slice.start for e in self._entries]
        self._blocks: Dict[int, List[Tuple[str, Tensor]]] = {}

    def _of_entry(self, position: int) -> List[Tuple[str, Tensor]]:
        blocks = self._blocks.get(position)
        if blocks is None:
            entry = self._entries[position]
            columns = list(range(entry.slice.start, entry.slice.stop))
            # one row per unit, the units in column order (resolve_entries sorts each kind's units)
            resolved = resolve_entries(self.model, columns, self.layout)
            blocks = []
            for name, pieces in resolved.items():
                for piece in pieces:
                    if piece.shape[0] != len(columns):  # pragma: no cover - a layout resolve_entries splits
                        raise RuntimeError(f"layout entry {entry.name!r} does not resolve to one block per unit")
                    blocks.append((name, piece))
            self._blocks[position] = blocks
        return blocks

    def _locate(self, column: int) -> Tuple[int, int]:
        position = bisect.bisect_right(self._starts, column) - 1
        return position, column - self._starts[position]

    @property
    def entries(self) -> List[Any]:
        """The layout's entries that hold units, in layout order (what :meth:`locate` counts)."""
        return self._entries

    def locate(self, column: int) -> Tuple[int, int]:
        """``(position of the column's entry among the layout's non-empty entries, its unit there)``."""
        return self._locate(column)

    def blocks(self, column: int) -> Tuple[List[Tuple[str, Tensor]], int]:
        """``([(parameter name, (units, entries) flat indices)], the column's row in each)``."""
        position, unit = self._locate(column)
        return self._of_entry(position), unit

    def names(self, columns: Sequence[int]) -> List[str]:
        """The parameters that turning off ``columns`` edits."""
        found: Dict[str, None] = {}
        for column in columns:
            for name, _ in self.blocks(column)[0]:
                found[name] = None
        return list(found)
