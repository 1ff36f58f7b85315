"""Which column of a saliency profile belongs to which parameter unit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence, Tuple, Union, overload


@dataclass(frozen=True)
class LayoutEntry:
    """One selected parameter and the columns its units occupy.

    Attributes:
        name: the parameter's name in ``model.named_parameters()``,
            e.g. ``"layer1.0.conv1.weight"``.
        shape: the parameter's shape.
        num_units: how many units (filters, neurons, ...) it has.
        slice: its columns, so ``sal[:, entry.slice]`` is its profile.
    """

    name: str
    shape: Tuple[int, ...]
    num_units: int
    slice: slice

    @property
    def entries_per_unit(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel // self.num_units


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

    def __init__(self, entries: Sequence[Tuple[str, Tuple[int, ...], int]]) -> None:
        built, start = [], 0
        for name, shape, num_units in entries:
            built.append(LayoutEntry(name, tuple(shape), num_units, slice(start, start + num_units)))
            start += num_units
        self._entries: Tuple[LayoutEntry, ...] = tuple(built)
        self._by_name = {entry.name: entry for entry in self._entries}
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
