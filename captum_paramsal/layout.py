"""Which column of a saliency profile belongs to which unit.

An entry of a layout is either one selected parameter whose units are its output rows
(``kind="rows"``: a conv filter, a Linear row) or a *group* of units that span several
parameters (``kind="heads"``: an attention head is rows of q, k and v and columns of the
output projection; ``"neurons"``: a row of the MLP's up projection and the matching column
of its down projection; ``"kv_heads"``: the shared k and v rows of grouped-query attention),
named by its module and described by its :class:`UnitPart` s (:mod:`captum_paramsal.unit_schemes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence, Tuple, Union, overload

#: the kinds of entry: one parameter's rows, or units that span parameters
ENTRY_KINDS = ("rows", "heads", "kv_heads", "neurons")


@dataclass(frozen=True)
class UnitPart:
    """Where a group's units lie in one parameter: unit ``u`` is the indices
    ``start + u * size ... start + (u + 1) * size - 1`` along ``axis`` of ``param``.

    Examples::

        >>> UnitPart("h.0.attn.c_attn.weight", (16, 48), axis=1, start=16, size=8)  # GPT-2's k columns
    """

    param: str
    shape: Tuple[int, ...]
    axis: int
    start: int
    size: int

    def entries_per_unit(self) -> int:
        """How many of the parameter's entries one unit has here."""
        return self.size * math.prod(self.shape) // self.shape[self.axis]

    def indices(self, unit: int) -> range:
        """The unit's indices along :attr:`axis`."""
        return range(self.start + unit * self.size, self.start + (unit + 1) * self.size)


@dataclass(frozen=True)
class LayoutEntry:
    """One layout entry (a selected parameter, or a group of units) and its columns.

    Attributes:
        name: a ``"rows"`` entry's parameter name in ``model.named_parameters()``, e.g.
            ``"layer1.0.conv1.weight"``; a group's module name, e.g.
            ``"transformer.h.3.attn"``.
        shape: the parameter's shape (empty for a group: its parts have theirs).
        num_units: how many units (filters, rows, heads, neurons) it has.
        slice: its columns, so ``sal[:, entry.slice]`` is its profile.
        kind: ``"rows"``, ``"heads"``, ``"kv_heads"`` or ``"neurons"``.
        parts: a group's :class:`UnitPart` s (empty for ``"rows"``).
    """

    name: str
    shape: Tuple[int, ...]
    num_units: int
    slice: slice
    kind: str = "rows"
    parts: Tuple[UnitPart, ...] = ()

    @property
    def entries_per_unit(self) -> int:
        if self.parts:
            return sum(part.entries_per_unit() for part in self.parts)
        return math.prod(self.shape) // self.num_units

    @property
    def is_group(self) -> bool:
        """Whether the units span parameters (heads, neurons) rather than one parameter's rows."""
        return self.kind != "rows"

    def description(self) -> list:
        """The entry as JSON-ready lists (what statistics files store and fingerprint)."""
        plain = [self.name, list(self.shape), self.num_units]
        if not self.is_group:
            return plain  # as before groups existed: older statistics files keep their fingerprint
        parts = [[p.param, list(p.shape), p.axis, p.start, p.size] for p in self.parts]
        return plain + [self.kind, parts]


class SaliencyLayout(Sequence[LayoutEntry]):
    """The ordered columns of a ``(B, F)`` saliency profile.

    Parameters appear in ``model.named_parameters()`` order, each one's units
    in index order. Index by position or by parameter name.

    Examples::

        >>> layout = ParameterSaliency(model).layout
        >>> entry = layout["layer1.0.conv1.weight"]
        >>> profile_of_that_layer = sal[:, entry.slice]
        >>> layout.unit_of(137)      # ('layer1.0.conv2.weight', 9)
    """

    def __init__(self, entries: Sequence[Union[Tuple, LayoutEntry]]) -> None:
        built, start = [], 0
        for entry in entries:
            if isinstance(entry, LayoutEntry):
                name, shape, num_units, kind, parts = entry.name, entry.shape, entry.num_units, entry.kind, entry.parts
            else:
                name, shape, num_units, kind, parts = _entry_fields(entry)
            if kind not in ENTRY_KINDS:
                raise ValueError(f"layout entry {name!r} has kind {kind!r}; kinds are {ENTRY_KINDS}")
            if (kind == "rows") != (not parts):
                raise ValueError(f"layout entry {name!r}: a group ({kind}) has parts and a rows entry none")
            built.append(LayoutEntry(name, tuple(shape), num_units, slice(start, start + num_units), kind, parts))
            start += num_units
        self._entries: Tuple[LayoutEntry, ...] = tuple(built)
        self._by_name = {entry.name: entry for entry in self._entries}
        if len(self._by_name) != len(self._entries):
            raise ValueError("a layout names each entry once")
        self.num_columns: int = start

    @overload
    def __getitem__(self, key: Union[int, str]) -> LayoutEntry: ...

    @overload
    def __getitem__(self, key: slice) -> Sequence[LayoutEntry]: ...

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self._by_name:
                raise KeyError(f"no parameter {key!r} in this layout; it has {list(self._by_name)}")
            return self._by_name[key]
        return self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[LayoutEntry]:
        return iter(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SaliencyLayout) and self._entries == other._entries

    def __hash__(self) -> int:
        return hash(self._entries)

    def __repr__(self) -> str:
        return f"SaliencyLayout({len(self)} parameters, {self.num_columns} units)"

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(self._by_name)

    def description(self) -> list:
        """Every entry's :meth:`LayoutEntry.description` (statistics files store this)."""
        return [entry.description() for entry in self._entries]

    def renamed(self, rename) -> SaliencyLayout:
        """The same layout with every name (entries' and parts' parameters) mapped by ``rename``."""
        return SaliencyLayout([
            (rename(e.name), e.shape, e.num_units, e.kind,
             tuple(UnitPart(rename(p.param), p.shape, p.axis, p.start, p.size) for p in e.parts))
            for e in self._entries
        ])

    @property
    def parameter_names(self) -> Tuple[str, ...]:
        """The parameters the layout covers, in order (a group's parts' parameters in its place)."""
        names = []
        for entry in self._entries:
            names += [p.param for p in entry.parts] if entry.parts else [entry.name]
        return tuple(dict.fromkeys(names))

    def column(self, name: str, unit: int) -> int:
        """The column of unit ``unit`` of parameter ``name``."""
        entry = self[name]
        if not 0 <= unit < entry.num_units:
            raise IndexError(f"{name} has {entry.num_units} units; unit {unit} is out of range")
        return entry.slice.start + unit

    def unit_of(self, column: int) -> Tuple[str, int]:
        """``(parameter name, unit index)`` of a column."""
        if not 0 <= column < self.num_columns:
            raise IndexError(f"column {column} is out of range for {self.num_columns} columns")
        for entry in self._entries:
            if column < entry.slice.stop:
                return entry.name, column - entry.slice.start
        raise AssertionError("unreachable")


def _entry_fields(entry: Sequence) -> Tuple[str, Tuple[int, ...], int, str, Tuple[UnitPart, ...]]:
    """``(name, shape, num_units)`` or ``(name, shape, num_units, kind, parts)``; parts as
    :class:`UnitPart` or as ``[param, shape, axis, start, size]`` lists (a stored description)."""
    if len(entry) == 3:
        name, shape, num_units = entry
        return str(name), tuple(shape), int(num_units), "rows", ()
    if len(entry) == 5:
        name, shape, num_units, kind, parts = entry
        built = tuple(
            part if isinstance(part, UnitPart)
            else UnitPart(str(part[0]), tuple(int(s) for s in part[1]), int(part[2]), int(part[3]), int(part[4]))
            for part in parts
        )
        return str(name), tuple(shape), int(num_units), str(kind), built
    raise ValueError(f"a layout entry is (name, shape, num_units[, kind, parts]), got {entry!r}")
