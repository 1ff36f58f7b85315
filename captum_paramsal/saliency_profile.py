"""A batch of saliency profiles with the layout that names their columns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional

import torch
from torch import Tensor

from .layout import SaliencyLayout


class UnitScore(NamedTuple):
    """One unit of one sample's profile."""

    param: str
    unit: int
    value: float
    column: int


@dataclass(frozen=True)
class SaliencyProfile:
    """Per-sample unit saliency ``values (B, F)`` and the :class:`SaliencyLayout` of its columns.

    ``standardized`` says whether the values are z-scores against reference statistics;
    ``reduction`` names how each unit's per-sample gradient became one number (``"mean_abs"``,
    ``"mean"`` or ``"rms"``, see :mod:`captum_paramsal.per_sample.reductions`), which the
    figures' axis labels say.

    Examples::

        >>> prof = ps.profile(images, target=labels)
        >>> prof.top_k(5)[0]            # sample 0's five most salient units
        [UnitScore(param='layer4.1.conv2.weight', unit=97, value=6.1, column=4711), ...]
        >>> prof.by_layer("max")        # (B, number of parameters)
        >>> fig = prof.plot(0, name="image 17 (label cat, predicted dog)")  # fig.savefig("profile.png")
    """

    values: Tensor
    layout: SaliencyLayout
    standardized: bool = False
    reduction: str = "mean_abs"

    def __post_init__(self) -> None:
        from .per_sample.reductions import get_reduction

        if self.values.dim() != 2 or self.values.shape[1] != self.layout.num_columns:
            raise ValueError(
                f"profile values must be (batch, {self.layout.num_columns}), got {tuple(self.values.shape)}"
            )
        # a Reduction object is stored by its name; an unknown name is a clear error here
        object.__setattr__(self, "reduction", get_reduction(self.reduction).name)

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def value_label(self) -> str:
        """What the values are, for an axis: ``"z-score of mean |grad|"`` (standardized), ``"mean |grad|"``,
        ``"mean grad (signed)"``, ``"rms grad"`` (raw, by reduction)."""
        from .per_sample.reductions import get_reduction

        label = get_reduction(self.reduction).label
        return f"z-score of {label}" if self.standardized else label

    def _check_sample(self, sample: int) -> None:
        if not -len(self) <= sample < len(self):
            raise IndexError(f"sample {sample} is out of range for a profile of {len(self)} samples")

    def top_k(self, k: int = 10, largest: bool = True) -> List[List[UnitScore]]:
        """Per sample, its ``k`` largest (or smallest) units, most extreme first."""
        if not 1 <= k <= self.layout.num_columns:
            raise ValueError(f"k must be between 1 and {self.layout.num_columns}, got {k}")
        values, columns = self.values.detach().float().topk(k, dim=1, largest=largest)
        rows = []
        for sample_values, sample_columns in zip(values.tolist(), columns.tolist()):
            row = []
            for value, column in zip(sample_values, sample_columns):
                name, unit = self.layout.unit_of(column)
                row.append(UnitScore(name, unit, value, column))
            rows.append(row)
        return rows

    def only(self, *kinds: str) -> SaliencyProfile:
        """The profile of the layout entries of these kinds only (``"heads"``, ``"kv_heads"``,
        ``"neurons"``, ``"rows"``), with a layout of just those entries: its ``top_k`` ranks
        heads among heads. Its ``UnitScore`` s name units by ``(entry name, index)``, which
        the full layout resolves too.

        Examples::

            >>> prof.only("heads").top_k(3)[0]        # sample 0's three most salient heads
        """
        from .layout import ENTRY_KINDS

        unknown = [k for k in kinds if k not in ENTRY_KINDS]
        if unknown or not kinds:
            raise ValueError(f"kinds must be among {ENTRY_KINDS}, got {kinds!r}")
        entries = [e for e in self.layout if e.kind in kinds]
        if not entries:
            present = sorted({e.kind for e in self.layout})
            raise ValueError(f"this profile has no {' or '.join(kinds)} entries (it has {', '.join(present)})")
        columns = torch.cat([torch.arange(e.slice.start, e.slice.stop) for e in entries]).to(self.values.device)
        return SaliencyProfile(self.values[:, columns], SaliencyLayout(entries), self.standardized, self.reduction)

    def by_layer(self, reduce: str = "mean") -> Tensor:
        """``(B, number of parameters)``: each parameter's units reduced by ``"mean"`` or ``"max"``,
        columns in ``layout`` order (``layout.names``)."""
        if reduce not in ("mean", "max"):
            raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
        parts = []
        for entry in self.layout:
            block = self.values[:, entry.slice]
            parts.append(block.mean(1) if reduce == "mean" else block.max(1).values)
        return torch.stack(parts, dim=1)

    def to_records(self) -> List[Dict[str, Any]]:
        """One dict per (sample, unit): ``sample, param, unit, column, value`` (for pandas/CSV)."""
        records = []
        values = self.values.detach().cpu().tolist()
        for sample, row in enumerate(values):
            for entry in self.layout:
                for unit in range(entry.num_units):
                    column = entry.slice.start + unit
                    records.append(
                        {"sample": sample, "param": entry.name, "unit": unit, "column": column, "value": row[column]}
                    )
        return records

    def _title(self, what: str, sample: int, name: Optional[str]) -> str:
        return f"{what}: {name if name is not None else f'sample {sample}'}"

    def plot(self, sample: int = 0, k: int = 10, ax: Optional[Any] = None, name: Optional[str] = None) -> Any:
        """The paper's figure: each layer's values sorted descending, layers in network order,
        boundaries marked, the sample's top-``k`` units highlighted. Returns the Figure.

        ``name`` says which sample the figure shows in its title (e.g. ``"digit 35 (label 3,
        predicted 5)"``); the default, ``"sample {sample}"``, only knows the row of this profile.
        """
        from .visualization import plot_profile

        self._check_sample(sample)
        return plot_profile(self.values[sample], self.layout, k=k, value_label=self.value_label,
                            title=self._title("parameter saliency profile", sample, name), ax=ax)

    def plot_top_k(
        self, sample: int = 0, k: int = 10, ax: Optional[Any] = None, name: Optional[str] = None
    ) -> Any:
        """A bar chart of the sample's top-``k`` units (``name`` as in :meth:`plot`). Returns the Figure."""
        from .visualization import plot_top_units

        self._check_sample(sample)
        if not 1 <= k <= self.layout.num_columns:
            raise ValueError(f"k must be between 1 and {self.layout.num_columns}, got {k}")
        return plot_top_units(self.values[sample], self.layout, k=k, value_label=self.value_label,
                              title=self._title(f"top {k} units", sample, name), ax=ax)
