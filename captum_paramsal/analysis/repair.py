"""Verified repair: edit an error group's culprit units and measure what that fixes and what
it breaks, against controls that edit as many other units.

A repair that fixes the group it was chosen on proves little: :func:`repair` also reports the
fix rate on held-out samples with the same (true, predicted) pairs, the collateral damage on
correctly classified samples, and the same three rates for controls at equal ``k`` (random
units; the units of largest mean gradient magnitude over the group, without
standardization; the units of largest weight magnitude), each with a bootstrap interval.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._utils import evaluation_mode
from ..data import labelled_batches
from ..interventions import turn_off
from ..units import UnitEntries
from .dataset_profiles import device_of, predict
from .error_groups import ErrorGroup, as_batches
from .intervals import Estimate, bootstrap_draws_and_samples

if TYPE_CHECKING:
    from .._core.parameter_saliency import ParameterSaliency

__all__ = ["CONTROLS", "METHODS", "RepairResult", "RepairRow", "repair", "unit_weight_magnitude"]

METHODS = ("turn_off", "finetune")
#: the controls, each editing k units chosen without the group's standardized profiles
CONTROLS = ("random", "gradient", "weight")
RATES = ("fix_group", "fix_held_out", "collateral")


@dataclass(eq=False)
class RepairRow:
    """The three rates of one choice of units.

    Attributes:
        name (str): ``"culprits"`` (the group's top-k by mean z) or a control.
        columns (list): the edited layout columns (one list per draw for ``"random"``).
        fix_group, fix_held_out, collateral (Estimate): the share of the group's samples
            classified right after the edit; the same for the held-out samples of the
            group's (true, predicted) pairs; the share of correctly classified held-out
            samples that become wrong. For ``"random"``, the mean over draws and samples,
            its interval resampling both.
        outcomes (dict): ``{rate: (draws, n) float tensor}`` the per-sample outcomes behind
            each rate (one draw but for ``"random"``).
    """

    name: str
    columns: List[Any]
    fix_group: Estimate
    fix_held_out: Estimate
    collateral: Estimate
    outcomes: Dict[str, Tensor] = field(repr=False, default_factory=dict)


@dataclass(eq=False)
class RepairResult:
    """What :func:`repair` measured; the model was never changed.

    Attributes:
        method (str): ``"turn_off"`` or ``"finetune"``.
        k (int): units edited by every row.
        group_id (int), pairs (list): the group and its (true, predicted) pairs.
        rows (dict): ``{name: RepairRow}`` for ``"culprits"`` and each control.
        differences (dict): ``{control: {rate: Estimate}}``, culprits minus control, paired
            over the same samples.
        num_group, num_held_out, num_correct (int): the samples behind each rate.
        delta (dict or None): with ``method="finetune"``, the culprits' fine-tuning
            ``{parameter name: new - old}``.

    Examples::

        >>> result = repair(model, ps, groups[0], (x_val, y_val), k=5)
        >>> result.rows["culprits"].fix_held_out.format(percent=True)
        '64.0% [45.0, 82.0]'
        >>> print(result.to_markdown())
        >>> with result.applied(model):        # the culprits' edit, undone on exit
        ...     model(x_new).argmax(1)
    """

    method: str
    k: int
    group_id: int
    pairs: List[Tuple[int, int]]
    rows: Dict[str, RepairRow]
    differences: Dict[str, Dict[str, Estimate]]
    num_group: int
    num_held_out: int
    num_correct: int
    bias: bool = False
    delta: Optional[Dict[str, Tensor]] = None
    _layout: Any = field(default=None, repr=False)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """The culprits' edit inside the block (turned off, or the fine-tuned values); on exit,
        also on error, the model's own values bit for bit.

        Examples::

            >>> with result.applied(model):
            ...     fixed = model(x).argmax(1)
        """
        if self.method == "turn_off":
            with turn_off(model, self.rows["culprits"].columns, bias=self.bias, layout=self._layout):
                yield model
        else:
            from .finetune import FineTuneResult

            change = FineTuneResult(self.delta or {}, [], 0, True)
            with change.applied(model):
                yield model

    def to_markdown(self) -> str:
        """One row per choice of units: the three rates with intervals, and the culprits'
        paired advantage over each control on the held-out fix rate.

        Examples::

            >>> print(result.to_markdown())
        """
        lines = [
            f"| units ({self.method}, k={self.k}) | fixed in the group (n={self.num_group}) | "
            f"fixed, held-out same pairs (n={self.num_held_out}) | collateral damage (n={self.num_correct}) | "
            "culprits − this, held-out fixed |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, row in self.rows.items():
            diff = self.differences.get(name, {}).get("fix_held_out")
            lines.append(
                f"| {name} | {row.fix_group.format(percent=True)} | {row.fix_held_out.format(percent=True)} | "
                f"{row.collateral.format(percent=True)} | "
                f"{'—' if diff is None else diff.format(percent=True, signed=True)} |"
            )
        return "\n".join(lines)

    def plot(self, ax: Any = None) -> Any:
        """Bars with 95% intervals: the three rates for the culprits and each control.

        Returns:
            a matplotlib ``Figure`` (built without pyplot).

        Examples::

            >>> result.plot().savefig("repair.png")
        """
        if ax is None:
            from matplotlib.figure import Figure

            figure = Figure(figsize=(8, 3.4), layout="constrained")
            ax = figure.subplots()
        figure = ax.figure
        names = list(self.rows)
        width = 0.8 / len(RATES)
        labels = {"fix_group": "fixed in the group", "fix_held_out": "fixed, held-out same pairs",
                  "collateral": "collateral damage"}
        for r, rate in enumerate(RATES):
            xs, heights, errors = [], [], [[], []]
            for i, name in enumerate(names):
                e: Estimate = getattr(self.rows[name], rate)
                value = 0.0 if math.isnan(e.value) else e.value
                xs.append(i + (r - 1) * width)
                heights.append(value)
                errors[0].append(0.0 if math.isnan(e.low) else value - e.low)
                errors[1].append(0.0 if math.isnan(e.high) else e.high - value)
            ax.bar(xs, heights, width, yerr=errors, capsize=2, label=labels[rate])
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("share of samples")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize="small")
        ax.set_title(f"repairing group {self.group_id} by {self.method} of k={self.k} units")
        return figure


def unit_weight_magnitude(model: nn.Module, layout: Any) -> Tensor:
    """``(F,)`` float64: each unit's mean absolute weight over its entries (all the parameter
    entries the unit owns: a row; a head's or neuron's parts), in layout column order.

    Examples::

        >>> unit_weight_magnitude(model, ps.layout).shape
        torch.Size([1234])
    """
    params = dict(model.named_parameters())
    units = UnitEntries(model, layout)
    out = torch.zeros(layout.num_columns, dtype=torch.float64)
    with torch.no_grad():
        for entry in layout:
            if entry.num_units == 0:
                continue
            # all of the entry's units at once: each block has one row per unit, in unit order
            blocks, _ = units.blocks(entry.slice.start)
            total = torch.zeros(entry.num_units, dtype=torch.float64)
            count = 0
            for name, index in blocks:
                flat = params[name].detach().reshape(-1)
                total += flat[index.to(flat.device)].abs().double().sum(1).cpu()
                count += index.shape[1]
            out[entry.slice] = total / max(count, 1)
    return out


def _predictions(model: nn.Module, inputs: Tuple[Tensor, ...], batch: int) -> Tensor:
    parts = []
    for start in range(0, inputs[0].shape[0], batch):
        chunk = tuple(x[start : start + batch] for x in inputs)
        parts.append(predict(model, chunk, require=True).cpu())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _held_out(ps: ParameterSaliency, data: Any, pairs: Sequence[Tuple[int, int]], max_samples: Optional[int],
              progress: bool) -> Tuple[Tuple[Tensor, ...], Tensor, Tuple[Tensor, ...], Tensor]:
    """The held-out misclassified samples of ``pairs``, and the correctly classified ones."""
    wanted = set(pairs)
    pair_parts: List[Tuple[Tuple[Tensor, ...], Tensor]] = []
    right_parts: List[Tuple[Tuple[Tensor, ...], Tensor]] = []
    for inputs, labels in labelled_batches(as_batches(data), device=device_of(ps), max_samples=max_samples,
                                           progress=progress, desc="held-out data"):
        predicted = predict(ps.model, inputs, require=True).cpu()
        labels = labels.cpu()
        inputs = tuple(x.detach() for x in inputs)
        in_pairs = torch.tensor([(int(t), int(p)) in wanted for t, p in zip(labels, predicted)], dtype=torch.bool)
        right = predicted == labels
        pair_parts.append((tuple(x[in_pairs.to(x.device)] for x in inputs), labels[in_pairs]))
        right_parts.append((tuple(x[right.to(x.device)] for x in inputs), labels[right]))
    if not pair_parts:
        raise ValueError("repair's data is empty: it needs held-out samples")

    def joined(parts):
        return (tuple(torch.cat([p[0][i] for p in parts]) for i in range(len(parts[0][0]))),
                torch.cat([p[1] for p in parts]))

    return (*joined(pair_parts), *joined(right_parts))


def repair(
    model: nn.Module,
    ps: ParameterSaliency,
    group: ErrorGroup,
    data: Any,
    method: str = "turn_off",
    k: int = 5,
    controls: Sequence[str] = CONTROLS,
    random_draws: int = 10,
    bias: bool = False,
    lr: float = 1e-3,
    max_steps: int = 100,
    seed: int = 0,
    resamples: int = 2000,
    max_samples: Optional[int] = None,
    batch_size: int = 256,
    progress: bool = False,
) -> RepairResult:
    r"""Edit only ``group``'s top-``k`` culprit units and measure the fix and the damage, with
    the same measures for controls that edit ``k`` other units.

    The edit: ``method="turn_off"`` zeroes the units' weights
    (:func:`~captum_paramsal.interventions.turn_off`, with their bias entries under
    ``bias=True``); ``method="finetune"`` fine-tunes only those units on the group's samples
    (:func:`~captum_paramsal.analysis.finetune_units`: plain gradient steps of size ``lr`` on
    the group's mean cross-entropy at the true labels, until every sample of the group is
    right or ``max_steps``). The model itself is never changed: edits are shown to it inside
    context managers and undone bit for bit.

    Measured for each choice of units, each a share over samples with a 95% bootstrap interval
    over those samples (``resamples`` draws):

    - fixed in the group: the group's samples classified as their label after the edit;
    - fixed, held-out same pairs: the misclassified samples of ``data`` whose (true,
      predicted) pair is one of the group's pairs, classified right after the edit;
    - collateral damage: the correctly classified samples of ``data`` that become wrong.

    The units: ``"culprits"``, the group's top-``k`` by mean z (:meth:`ErrorGroup.ranked_columns`),
    and the controls (each edited the same way): ``"random"``, ``random_draws`` draws of ``k``
    distinct random units (seeded; each sample's outcome averaged over the draws);
    ``"gradient"``, the ``k`` units of largest mean raw saliency over the group (mean
    ``|grad|`` under the default reduction: what one would pick without the reference
    statistics); ``"weight"``, the ``k`` units of largest mean absolute weight in the whole
    model (:func:`unit_weight_magnitude`; the same for every group). Paired differences
    (culprits minus control, over the same samples) carry intervals too.

    Args:
        model: the network ``ps`` explains.
        ps: its :class:`~captum_paramsal.ParameterSaliency` (with the statistics the group was
            found with).
        group: an :class:`~captum_paramsal.analysis.ErrorGroup` from :func:`error_groups`.
        data: held-out data, not the data the group came from: an iterable of
            ``(inputs, labels)`` batches or one ``(inputs, labels)`` pair of tensors.
        method: ``"turn_off"`` or ``"finetune"``.
        k: units edited by every choice (at most the number of units).
        controls: any of :data:`CONTROLS`.
        random_draws: draws of the random control.
        bias: with ``turn_off``, also zero the units' bias entries.
        lr, max_steps: the fine-tuning's step size and step limit.
        seed: seeds the random control and the bootstrap.
        resamples: bootstrap draws per interval.
        max_samples: read at most this many samples of ``data``.
        batch_size: samples per evaluation forward.
        progress: a progress bar over ``data``.

    Returns:
        :class:`RepairResult`; ``with result.applied(model): ...`` shows the culprits' edit.

    Raises:
        ValueError: ``ps`` of another model, an unknown method or control, ``k`` out of range,
            ``random_draws`` < 1, or empty ``data``.

    Examples::

        >>> from captum_paramsal.analysis import error_groups, repair
        >>> groups = error_groups(ps, (x_test, y_test))
        >>> result = repair(model, ps, groups[0], (x_val, y_val), method="turn_off", k=5)
        >>> print(result.to_markdown())
        >>> tuned = repair(model, ps, groups[0], (x_val, y_val), method="finetune", k=5, lr=1e-2)
        >>> result.plot().savefig("repair_group0.png")
    """
    if ps.model is not model:
        raise ValueError("ps must be a ParameterSaliency of this model")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise ValueError(f"controls must be among {CONTROLS}, got {list(controls)!r}")
    if group.layout != ps.layout:
        raise ValueError("group was found with another layout than ps's: use the ParameterSaliency that found it")
    columns = ps.layout.num_columns
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= columns:
        raise ValueError(f"k must be an int between 1 and the number of units ({columns}), got {k!r}")
    if isinstance(random_draws, bool) or not isinstance(random_draws, int) or random_draws < 1:
        raise ValueError(f"random_draws must be a positive int, got {random_draws!r}")
    if method == "finetune" and len(group.inputs) != 1:
        raise ValueError(f"method='finetune' needs a model of one input, the group's samples have {len(group.inputs)}")
    pairs = [pair for pair, _ in group.pairs]
    device = device_of(ps)
    with evaluation_mode(model):
        held_x, held_y, right_x, right_y = _held_out(ps, data, pairs, max_samples, progress)
        group_x = tuple(x.to(device) for x in group.inputs)
        group_y = group.labels
        everything = tuple(torch.cat([g, h.to(device), r.to(device)]) for g, h, r in zip(group_x, held_x, right_x))
        truth = torch.cat([group_y, held_y.cpu(), right_y.cpu()])
        n_group, n_held = len(group_y), len(held_y)
        parts = {"fix_group": slice(0, n_group), "fix_held_out": slice(n_group, n_group + n_held),
                 "collateral": slice(n_group + n_held, len(truth))}

        def outcomes(edit: Callable[[], ContextManager]) -> Dict[str, Tensor]:
            with edit():
                right = (_predictions(model, everything, batch_size) == truth).to(torch.float64)
            return {"fix_group": right[parts["fix_group"]], "fix_held_out": right[parts["fix_held_out"]],
                    "collateral": 1.0 - right[parts["collateral"]]}

        def editor(chosen: List[int]) -> Tuple[Callable[[], ContextManager], Optional[Dict[str, Tensor]]]:
            """The edit of ``chosen`` as a context-manager factory, and the fine-tuning's change."""
            if method == "turn_off":
                return (lambda: turn_off(model, chosen, bias=bias, layout=ps.layout)), None
            from .finetune import finetune_units

            tuned = finetune_units(model, chosen, group_x[0], group_y.to(device), layout=ps.layout, lr=lr,
                                   max_steps=max_steps)
            return (lambda: tuned.applied(model)), tuned.delta

        choices: Dict[str, List[List[int]]] = {"culprits": [group.ranked_columns(k)]}
        if "random" in controls:
            generator = torch.Generator().manual_seed(seed)
            choices["random"] = [torch.randperm(columns, generator=generator)[:k].tolist()
                                 for _ in range(random_draws)]
        if "gradient" in controls:
            choices["gradient"] = [group.mean_raw.topk(k).indices.tolist()]
        if "weight" in controls:
            choices["weight"] = [unit_weight_magnitude(model, ps.layout).topk(k).indices.tolist()]

        rows: Dict[str, RepairRow] = {}
        culprit_delta = None
        for name, draws in choices.items():
            per_draw = []
            for chosen in draws:
                edit, delta = editor(chosen)
                per_draw.append(outcomes(edit))
                if name == "culprits":
                    culprit_delta = delta
            table = {rate: torch.stack([d[rate] for d in per_draw]) for rate in RATES}
            estimates = {rate: bootstrap_draws_and_samples(table[rate], resamples=resamples, seed=seed)
                         for rate in RATES}
            rows[name] = RepairRow(name, draws[0] if name != "random" else draws, estimates["fix_group"],
                                   estimates["fix_held_out"], estimates["collateral"], table)
    # culprits minus control on the same samples (each of the control's draws paired with them)
    differences = {
        name: {rate: bootstrap_draws_and_samples(rows["culprits"].outcomes[rate] - row.outcomes[rate],
                                                 resamples=resamples, seed=seed)
               for rate in RATES}
        for name, row in rows.items() if name != "culprits"
    }
    return RepairResult(method, k, group.id, pairs, rows, differences, n_group, n_held, len(right_y), bias,
                        culprit_delta, ps.layout)
