"""The paper's fine-tuning test (docs/METHOD.md, "The paper's validation experiments"): fix one
misclassified sample by updating only its most salient units, then see whether that also fixes
its neighbours in saliency space, against two controls (every other misclassified sample, and
the same fine-tuning on random units).

:func:`finetune_units` is the fine-tuning itself, on any units and any batch;
:func:`finetune_salient` picks one sample's top-``k`` units for it; :func:`neighbour_correction`
runs the test."""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import evaluation_mode
from ..interventions import swapped_parameters
from ..layout import SaliencyLayout
from ..saliency_profile import UnitScore
from ..units import Units, _is_column, _is_pair, _not_a_unit, _pair_of, iter_units, resolve_columns, resolve_entries
from .intervals import Estimate, bootstrap_mean, paired_difference

if TYPE_CHECKING:
    from .._core.parameter_saliency import ParameterSaliency


@dataclass
class FineTuneResult:
    """What :func:`finetune_units` (or :func:`finetune_salient`) changed: ``delta[name]`` is the
    new value minus the old, zero outside the chosen units; ``fixed`` which samples of the batch
    ended up classified right, ``corrected`` whether all of them did.

    Attributes:
        delta (dict): ``{parameter name: new value - old value}``, one entry per updated parameter.
        units (list): the updated units, ``(parameter name, unit index)`` pairs.
        steps (int): gradient steps taken.
        corrected (bool): whether every sample is classified correctly after them (for one
            sample: whether it is).
        fixed (Tensor): ``(N,)`` bool, on the CPU: which samples are classified correctly after
            them. Built without it (``FineTuneResult(delta, units, steps, corrected)``, one
            sample), it is ``tensor([corrected])``.

    Examples::

        >>> result = finetune_salient(model, ps, images[3:4], labels[3], k=25)
        >>> result.units[:2]
        [('layer4.1.conv2.weight', 97), ('fc.weight', 3)]
        >>> with result.applied(model):
        ...     fixed = model(images).argmax(1)
        >>> group = finetune_units(model, [("fc.weight", 3)], images[:8], labels[:8])
        >>> group.fixed, group.corrected
        (tensor([True, True, False, True, True, True, True, True]), False)
    """

    delta: Dict[str, Tensor]
    units: List[Tuple[str, int]]
    steps: int
    corrected: bool
    fixed: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.fixed is None:
            self.fixed = torch.tensor([bool(self.corrected)])

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """The fine-tuned model inside the block (``delta`` added); on exit, also on error, the
        exact old values.

        Runs on :func:`~captum_paramsal.interventions.swapped_parameters`: each changed
        parameter shows ``old + delta`` (computed in the parameter's dtype), and gets its own
        untouched storage back on exit; ``requires_grad`` and ``.grad`` are never touched.

        Raises:
            ValueError: ``model`` has no parameter of that name, or one of another shape
                (the change belongs to another model).

        Examples::

            >>> with result.applied(model) as tuned:
            ...     tuned(images).argmax(1)
        """
        params = dict(model.named_parameters())
        missing = [name for name in self.delta if name not in params]
        if missing:
            raise ValueError(f"the model has no parameter {missing[0]!r}: this change belongs to another model")
        for name, change in self.delta.items():
            if change.shape != params[name].shape:
                raise ValueError(
                    f"the change of {name!r} has shape {tuple(change.shape)} but the model's parameter has "
                    f"{tuple(params[name].shape)}: this change belongs to another model"
                )
        with torch.no_grad():
            values = {name: params[name].detach() + change.to(params[name]) for name, change in self.delta.items()}
        with swapped_parameters(model, values):
            yield model


def _named_units(units: Units, layout: Optional[SaliencyLayout], empty_hint: str = "") -> List[Tuple[str, int]]:
    """``units`` as ``(name, index)`` pairs, columns read in ``layout``, each unit once, in
    layout order where the layout has them (the others after, as given; without a layout, all
    as given)."""
    pairs: List[Tuple[str, int]] = []
    for unit in iter_units(units):
        if isinstance(unit, UnitScore) or _is_pair(unit):
            pair = _pair_of(unit)  # the index checked to be an int (no float, no bool) and made one
        elif _is_column(unit):
            if layout is None:
                raise ValueError(
                    f"unit {operator.index(unit)} is a layout column, which means something only in a layout: "
                    "give layout= (e.g. ps.layout), or name the unit as a (parameter name, unit index) pair"
                )
            pair = layout.unit_of(resolve_columns(unit, layout)[0])
        else:
            raise TypeError(f"units: {_not_a_unit(unit)}")
        if pair not in pairs:
            pairs.append(pair)
    if not pairs:
        raise ValueError(f"units is empty: give at least one unit to fine-tune{empty_hint}")
    if layout is None:
        return pairs

    def place(pair: Tuple[str, int]) -> Tuple[int, int]:
        name, index = pair
        if name in layout and isinstance(index, int) and 0 <= index < layout[name].num_units:
            return (0, layout.column(name, index))
        return (1, 0)

    return sorted(pairs, key=place)


def _check_steps(lr: Any, max_steps: Any) -> None:
    lr_ok = isinstance(lr, numbers.Real) and not isinstance(lr, bool) and lr > 0 and math.isfinite(lr)
    if not lr_ok or isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(
            f"lr must be > 0 (a finite number) and max_steps a positive int, got lr={lr!r}, max_steps={max_steps!r}"
        )


def _check_label(logits: Any, y: Tensor, caller: str) -> None:
    """The fine-tuning's cross-entropy needs ``(N, classes)`` logits and every label among the
    classes (``caller`` names the function, and its label argument: ``y`` or ``labels``)."""
    needs = f"{caller} needs a model that returns ({y.shape[0]}, classes) logits"
    if not isinstance(logits, Tensor):
        raise ValueError(f"{needs}, got a {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[0] != y.shape[0]:
        raise ValueError(f"{needs}, got shape {tuple(logits.shape)}")
    classes = logits.shape[1]
    outside = ((y < 0) | (y >= classes)).nonzero().flatten()
    if len(outside):
        i = int(outside[0])
        label = "y" if caller == "finetune_salient" else f"labels[{i}]"
        raise ValueError(
            f"{label}={int(y[i])} is out of range for a model with {classes} classes (0..{classes - 1})"
        )


def _descend(
    model: nn.Module,
    chosen: List[Tuple[str, int]],
    layout: Optional[SaliencyLayout],
    x: Tensor,
    y: Tensor,
    lr: float,
    max_steps: int,
    caller: str,
) -> FineTuneResult:
    """The fine-tuning both :func:`finetune_units` and :func:`finetune_salient` run, on checked
    arguments: masked plain gradient steps on a copy of ``model`` in eval mode."""
    # where the units lie: rows of one parameter, or a head's / neuron's parts of several
    entries = resolve_entries(model, chosen, layout)
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)

    work = copy.deepcopy(model).eval()
    params = dict(work.named_parameters())
    masks: Dict[str, Tensor] = {}
    for name, blocks in entries.items():
        mask = torch.zeros(params[name].numel(), dtype=torch.bool, device=params[name].device)
        for block in blocks:
            mask[block.reshape(-1).to(mask.device)] = True
        masks[name] = mask.view_as(params[name])
    trained = [params[name] for name in masks]
    for param in trained:  # the copy's: a unit of a frozen parameter is fine-tuned too
        param.requires_grad_(True)
    steps = 0
    fixed = torch.zeros(y.shape[0], dtype=torch.bool)
    for step in range(max_steps + 1):
        with torch.no_grad():
            logits = work(x)
        if step == 0:
            _check_label(logits, y, caller)
        fixed = logits.argmax(-1) == y
        if bool(fixed.all()) or step == max_steps:
            break
        loss = F.cross_entropy(work(x), y)
        grads = torch.autograd.grad(loss, trained)
        with torch.no_grad():
            for param, grad, name in zip(trained, grads, masks):
                param.sub_(lr * grad * masks[name])
        steps += 1
    original = dict(model.named_parameters())
    delta = {name: (params[name].detach() - original[name].detach()) for name in masks}
    fixed = fixed.detach().cpu()
    return FineTuneResult(delta, chosen, steps, bool(fixed.all()), fixed)


def _labels(labels: Any, n: int) -> Tensor:
    """``labels`` as an ``(n,)`` long tensor: one integer class label per input."""
    if isinstance(labels, bool):
        raise TypeError("labels must be integer class labels (any integer dtype), got the bool "
                        f"{labels!r}")
    try:
        t = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"labels must be integer class labels (an int, a sequence of ints or an integer tensor), got {labels!r}"
        ) from None
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"labels must be integer class labels (any integer dtype), got dtype {t.dtype}")
    if t.dim() > 1 or t.numel() != n:
        raise ValueError(
            f"labels must hold one label per input: got labels of shape {tuple(t.shape)} for {n} input(s) "
            f"(give a ({n},) tensor{', or an int' if n == 1 else ''})"
        )
    return t.reshape(-1).long()


def finetune_units(
    model: nn.Module,
    units: Units,
    inputs: Tensor,
    labels: Union[int, Sequence[int], Tensor],
    *,
    layout: Optional[SaliencyLayout] = None,
    lr: float = 1e-3,
    max_steps: int = 100,
) -> FineTuneResult:
    r"""Fine-tune only ``units`` of ``model`` until every sample of a batch is classified as its
    label; the model itself is left exactly as it was.

    Plain gradient descent on the batch's mean cross-entropy: each step subtracts ``lr`` times
    the gradient, with every gradient entry outside the units' entries masked to zero (so
    nothing else moves, not even by rounding). It runs on a deep copy of the model in eval
    mode (batch norm reads its running statistics, dropout is off; nothing is updated but the
    units) and stops as soon as the whole batch is classified right (checked before every
    step, so a batch right from the start takes no step) or after ``max_steps`` steps.

    The units' entries are what the saliency groups for them
    (:func:`~captum_paramsal.units.resolve_entries`): a filter's or a row's weights; a head's
    or a neuron's parts of several parameters; never the bias. The copy's parameters holding
    them are made to require gradients, so units of a frozen parameter are fine-tuned too.

    Args:
        model: the network to fine-tune; it is never changed (a copy is trained).
        units: the units to update, in any form of :mod:`captum_paramsal.units` (layout
            columns, ``(parameter name, unit index)`` pairs, heads or neurons by their module's
            name, :class:`~captum_paramsal.saliency_profile.UnitScore`); at least one.
        inputs: a batch ``(N, ...)``, ``N >= 1``; one sample keeps its batch dimension
            (``images[3:4]``).
        labels: one integer class label per input (an ``(N,)`` tensor of any integer dtype or a
            sequence of ints; for one sample, an int too).
        layout: the :class:`~captum_paramsal.layout.SaliencyLayout` that columns index (e.g.
            ``ps.layout``); required when ``units`` holds columns, optional otherwise (with it,
            ``result.units`` comes in layout order).
        lr: the step size (a finite number > 0).
        max_steps: at most this many steps (a positive int).

    Returns:
        :class:`FineTuneResult`: ``delta`` (zero outside the units), ``units``, ``steps``,
        ``fixed`` (which samples are right at the end) and ``corrected`` (all of them);
        ``with result.applied(model): ...`` runs the fine-tuned model.

    Raises:
        TypeError: ``model`` that is no ``nn.Module``, ``layout`` that is no ``SaliencyLayout``,
            a unit in none of the forms or with an index that is no int, or labels that are no
            integer class labels (floats, bools, strings).
        ValueError: ``inputs`` that is no batch tensor, labels that do not match the inputs
            one to one, ``lr`` or ``max_steps`` out of what is allowed, empty ``units``, a
            column without ``layout``, a unit the model does not have, a label outside the
            model's classes, or a model whose output is not ``(N, classes)`` logits. The model
            is left as it was.

    Examples::

        >>> from captum_paramsal.analysis import finetune_units
        >>> group = [("conv3.weight", 11), ("fc1.weight", 40)]
        >>> result = finetune_units(model, group, x[wrong[:6]], y[wrong[:6]], lr=1e-3, max_steps=200)
        >>> result.corrected, result.fixed.sum().item(), result.steps
        (True, 6, 41)
        >>> with result.applied(model):                     # the model itself never changes
        ...     model(x).argmax(1)
        >>> finetune_units(model, ps.attribute(x[:1], target=y[:1])[0].topk(25).indices,
        ...                x[:1], y[:1], layout=ps.layout)   # columns need their layout
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if layout is not None and not isinstance(layout, SaliencyLayout):
        raise TypeError(f"layout must be a SaliencyLayout (e.g. ps.layout) or None, got {type(layout).__name__}")
    if not isinstance(inputs, Tensor) or inputs.dim() < 1 or inputs.shape[0] < 1:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a batch tensor (N, ...) with N >= 1, got {shape}")
    y = _labels(labels, inputs.shape[0])
    _check_steps(lr, max_steps)
    chosen = _named_units(units, layout)
    return _descend(model, chosen, layout, inputs, y, lr, max_steps, "finetune_units")


def _top_units(ps: ParameterSaliency, x: Tensor, y: Tensor, k: int) -> List[Tuple[str, int]]:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    z = ps.attribute(x, target=y)[0]
    if k > z.shape[0]:
        raise ValueError(f"k={k} is larger than the number of units ({z.shape[0]})")
    return [ps.layout.unit_of(int(c)) for c in z.topk(k).indices]


def finetune_salient(
    model: nn.Module,
    ps: ParameterSaliency,
    x: Tensor,
    y: Union[int, Tensor],
    k: int = 25,
    lr: float = 1e-3,
    max_steps: int = 100,
    units: Optional[Units] = None,
) -> FineTuneResult:
    """Update only the top-``k`` salient units of one misclassified sample until it is
    classified correctly (docs/METHOD.md, "The paper's validation experiments"); the model itself
    is left exactly as it was.

    :func:`finetune_units` on one sample with the units chosen here: gradient descent on the
    sample's cross-entropy (plain steps of size ``lr``, with every gradient entry outside the
    chosen units masked to zero) on a copy of the model in eval mode, stopping as soon as the
    prediction is ``y`` or after ``max_steps``. ``result.units`` lists the top-``k`` in
    ranking order (given ``units``, in ``ps.layout``'s order).

    Args:
        model: the network ``ps`` explains; it is never changed (a copy is trained).
        ps: a :class:`~captum_paramsal.ParameterSaliency` of ``model``.
        x: one sample, with its batch dimension (``(1, ...)``).
        y: its true label (an int, or a one-element tensor of any integer dtype).
        k: how many of the most salient units to update (a positive int).
        lr: the step size (a finite number > 0).
        max_steps: at most this many steps (a positive int).
        units: the units to update instead of the top-``k`` by ``ps``'s (standardized)
            saliency at the true label, in any form of :mod:`captum_paramsal.units`
            (columns are read in ``ps.layout``); at least one.

    Returns:
        :class:`FineTuneResult`; ``with result.applied(model): ...`` runs the fine-tuned model.

    Raises:
        TypeError: a unit in none of the forms or with an index that is no int (a float, even
            ``2.0``, or a bool), or ``y`` that is no integer label.
        ValueError: ``x`` that is not one sample, ``k``, ``lr`` or ``max_steps`` out of what is
            allowed, empty ``units``, a unit the model does not have, ``y`` outside the model's
            classes, or ``ps`` of another model. The model is left as it was.

    Examples::

        >>> result = finetune_salient(model, ps, images[3:4], labels[3], k=25)
        >>> result.corrected, result.steps
        (True, 7)
        >>> with result.applied(model):
        ...     model(images).argmax(1)
    """
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] != 1:
        shape = tuple(getattr(x, "shape", ()))
        raise ValueError(f"x must be one sample with a batch dimension of 1, got shape {shape}")
    try:
        y = torch.as_tensor(y).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"y must be an int class label or a one-element integer tensor, got {y!r}") from None
    if y.numel() != 1:
        raise ValueError(f"y must be one label, got {y.numel()}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y must be an integer class label (any integer dtype), got dtype {y.dtype}")
    y = y.long()
    _check_steps(lr, max_steps)
    if ps.model is not model:
        raise ValueError("ps must be a ParameterSaliency of this model")
    if units is None:
        device = next(model.parameters()).device
        chosen = _top_units(ps, x.to(device), y.to(device), k)
    else:
        chosen = _named_units(units, ps.layout, " (or units=None for the top-k)")
    return _descend(model, chosen, ps.layout, x, y, lr, max_steps, "finetune_salient")


#: The keys every record of :class:`NeighbourCorrection` has; with the random-units control,
#: also those of :data:`RANDOM_RECORD_KEYS`.
RECORD_KEYS = ("sample", "units", "self_corrected", "steps", "neighbours", "neighbours_corrected", "others_corrected")
RANDOM_RECORD_KEYS = (
    "random_units", "random_self_corrected", "random_steps", "random_neighbours_corrected", "random_others_corrected",
)


@dataclass
class NeighbourCorrection:
    r"""Per fine-tuned sample: the share of its ``m`` saliency-space neighbours (other
    misclassified samples) that fine-tuning its top-``k`` units corrected, against two
    controls: the share of *all* the other misclassified samples it corrected (what ``m``
    random ones give on average), and the same fine-tuning on ``k`` random units.

    Built by :func:`neighbour_correction`.

    Attributes:
        records (list): one dict per fine-tuned sample (``"others"`` below: every other
            misclassified sample of the inputs, the neighbours among them):

            * ``"sample"``: its index in the inputs; ``"units"``: its top-``k`` units,
              ``(name, index)`` pairs in ranking order;
            * ``"self_corrected"`` (bool), ``"steps"`` (int): whether fine-tuning those units
              corrected the sample itself, and in how many steps;
            * ``"neighbours"``: its ``m`` nearest neighbours, indices in the inputs, nearest
              first;
            * ``"neighbours_corrected"``, ``"others_corrected"``: the fractions of its
              neighbours / of the others classified right after that fine-tuning;
            * with the random-units control only: ``"random_units"`` (the ``k`` units drawn),
              ``"random_self_corrected"``, ``"random_steps"``,
              ``"random_neighbours_corrected"`` (the same ``m`` neighbours) and
              ``"random_others_corrected"``, the same measures after fine-tuning them instead.
        m, k (int): neighbours per sample; units fine-tuned per sample.
        num_misclassified (int): misclassified samples among the inputs.
        random_units (bool): whether the records hold the random-units control.
        summary (dict): counts (``int``) and rates as
            :class:`~captum_paramsal.analysis.intervals.Estimate` (mean, 95% percentile
            bootstrap interval over the samples it averages, ``n``):

            * ``"fine_tuned"``, ``"self_corrected"``: samples fine-tuned; how many of them
              their top-``k`` fine-tuning corrected;
            * ``"self_corrected_rate"``: that share, and ``"steps"``: the mean steps taken
              (``max_steps`` where it failed), over every fine-tuned sample;
            * ``"neighbours_corrected"``, ``"others_corrected"`` and their paired difference
              ``"neighbours_minus_others"``: over the samples their top-``k`` fine-tuning
              corrected (the paper's condition: a change that fixes the sample);
            * with the control: ``"random_self_corrected"`` (a count),
              ``"random_self_corrected_rate"`` and ``"random_steps"`` (over every fine-tuned
              sample);
              ``"random_neighbours_corrected"``, ``"random_others_corrected"``,
              ``"random_neighbours_minus_others"`` and ``"salient_minus_random_neighbours"``
              (top-``k`` neighbours rate minus random-units neighbours rate, paired), all over
              the *same* samples as ``"neighbours_corrected"``, whether or not the random
              units corrected the sample (a random fine-tuning that failed ran all
              ``max_steps`` steps, and what it did to the neighbours counts as measured);
              and, conditioned on both fine-tunings having corrected the sample,
              ``"both_corrected"`` (a count), ``"random_neighbours_corrected_when_fixed"`` and
              ``"salient_minus_random_neighbours_when_fixed"``.

    Examples::

        >>> result = neighbour_correction(model, ps, images, labels, k=25, m=5)
        >>> result.summary["neighbours_corrected"].format(percent=True)
        '54.0% [42.5, 64.5]'
        >>> result.summary["salient_minus_random_neighbours"].excludes(0)
        True
        >>> print(result.to_markdown())
    """

    records: List[Dict[str, Any]]
    m: int
    k: int
    num_misclassified: int
    random_units: bool = False
    summary: Dict[str, Union[int, Estimate]] = field(init=False)

    def __post_init__(self) -> None:
        records = self.records
        used = [r for r in records if r["self_corrected"]]

        def values(key: str, among: List[Dict[str, Any]]) -> List[float]:
            return [float(r[key]) for r in among]

        def arm(prefix: str) -> Dict[str, Estimate]:
            """The rates of the salient (``""``) or the random-unit (``"random_"``) fine-tune."""
            return {
                f"{prefix}self_corrected_rate": bootstrap_mean(values(f"{prefix}self_corrected", records)),
                f"{prefix}steps": bootstrap_mean(values(f"{prefix}steps", records)),
                f"{prefix}neighbours_corrected": bootstrap_mean(values(f"{prefix}neighbours_corrected", used)),
                f"{prefix}others_corrected": bootstrap_mean(values(f"{prefix}others_corrected", used)),
                f"{prefix}neighbours_minus_others": paired_difference(
                    values(f"{prefix}neighbours_corrected", used), values(f"{prefix}others_corrected", used)
                ),
            }

        summary: Dict[str, Union[int, Estimate]] = {"fine_tuned": len(records), "self_corrected": len(used), **arm("")}
        if self.random_units:
            both = [r for r in used if r["random_self_corrected"]]
            summary.update({
                "random_self_corrected": sum(bool(r["random_self_corrected"]) for r in records),
                **arm("random_"),
                "salient_minus_random_neighbours": paired_difference(
                    values("neighbours_corrected", used), values("random_neighbours_corrected", used)
                ),
                "both_corrected": len(both),
                "random_neighbours_corrected_when_fixed": bootstrap_mean(
                    values("random_neighbours_corrected", both)
                ),
                "salient_minus_random_neighbours_when_fixed": paired_difference(
                    values("neighbours_corrected", both), values("random_neighbours_corrected", both)
                ),
            })
        self.summary = summary

    def to_markdown(self) -> str:
        """:attr:`summary` as a markdown table, one row per kind of units fine-tuned, the rates
        with their 95% bootstrap intervals, and a line on the salient − random difference.

        Examples::

            >>> print(neighbour_correction(model, ps, images, labels).to_markdown())
        """
        s = self.summary

        def pct(key: str, signed: bool = False) -> str:
            return s[key].format(percent=True, signed=signed)

        lines = [
            "| units fine-tuned | misclassified | corrected the sample itself | neighbours corrected | "
            "all other misclassified corrected | neighbours − all others |",
            "|---|---:|---:|---:|---:|---:|",
            f"| top-{self.k} salient | {self.num_misclassified} | {s['self_corrected']} of {s['fine_tuned']} | "
            f"{pct('neighbours_corrected')} | {pct('others_corrected')} | {pct('neighbours_minus_others', True)} |",
        ]
        if self.random_units:
            lines.append(
                f"| {self.k} random | {self.num_misclassified} | {s['random_self_corrected']} of {s['fine_tuned']} | "
                f"{pct('random_neighbours_corrected')} | {pct('random_others_corrected')} | "
                f"{pct('random_neighbours_minus_others', True)} |"
            )
        lines += [
            "",
            f"Rates over the {s['self_corrected']} samples whose top-{self.k} fine-tuning corrected them"
            + (" (the random row on the same samples, whether or not the random units corrected them)"
               if self.random_units else "")
            + f", {self.m} neighbours each; 95% bootstrap intervals over those samples.",
        ]
        if self.random_units:
            lines[-1] += (
                f" Salient − random units, neighbours corrected: {pct('salient_minus_random_neighbours', True)}; "
                f"on the {s['both_corrected']} samples both fine-tunings corrected: "
                f"{pct('salient_minus_random_neighbours_when_fixed', True)}."
            )
        return "\n".join(lines)


def _measure(
    model: nn.Module, result: FineTuneResult, x: Tensor, y: Tensor, i: int, neighbours: Tensor
) -> Tuple[bool, int, float, float]:
    """``(corrected, steps, share of the neighbours right, share of all but sample i right)``
    after ``result``'s change, on the misclassified samples ``x``."""
    with result.applied(model), torch.no_grad():
        fixed = model(x).argmax(-1) == y
    others = torch.ones(len(fixed), dtype=torch.bool, device=fixed.device)
    others[i] = False
    near, rest = float(fixed[neighbours].double().mean()), float(fixed[others].double().mean())
    return result.corrected, result.steps, near, rest


def neighbour_correction(
    model: nn.Module,
    ps: ParameterSaliency,
    inputs: Tensor,
    labels: Tensor,
    k: int = 25,
    m: int = 5,
    seed: int = 0,
    lr: float = 1e-3,
    max_steps: int = 100,
    max_samples: Optional[int] = None,
    random_units: bool = True,
) -> NeighbourCorrection:
    """For each misclassified sample among ``inputs``: fine-tune its top-``k`` units on it
    (:func:`finetune_units`), then measure the share of its ``m`` nearest neighbours among the
    other misclassified samples (cosine of standardized profiles at the true label) now
    classified correctly (docs/METHOD.md, "The paper's validation experiments"), against two
    controls:

    * **all the others**: the share of *every* other misclassified sample it corrected, the
      exact expectation of ``m`` random other misclassified samples (the neighbours count
      among them);
    * **random units** (``random_units=True``): the same fine-tuning (same ``lr``,
      ``max_steps``, stopping rule) on ``k`` distinct units drawn uniformly among all the
      layout's columns (they may include top-``k`` units), then the same two shares, on the
      same ``m`` neighbours; and whether it corrected the sample itself.

    Which samples each rate averages over (see :attr:`NeighbourCorrection.summary`): the
    self-correction rates over every fine-tuned sample; the neighbour and all-others rates, of
    both kinds of units, over the samples whose top-``k`` fine-tuning corrected them. A
    random-units fine-tuning that did not correct its sample still counts there (it ran all
    ``max_steps`` steps; its self-correction rate is reported beside); the rate conditioned on
    both having corrected the sample is in the summary too. Each comes with a 95% bootstrap
    interval over its samples, and the differences (neighbours − all others; top-``k`` −
    random units, on the neighbours) are paired, sample by sample.

    The model is left exactly as it was (each fine-tuning runs on a copy and is shown to the
    model only through :meth:`FineTuneResult.applied`).

    Args:
        model: the network ``ps`` explains.
        ps: a :class:`~captum_paramsal.ParameterSaliency` of ``model``.
        inputs, labels: a batch and its true labels (``(N,)``).
        k: units fine-tuned per sample.
        m: neighbours per sample.
        seed: seeds the random units (one draw per fine-tuned sample, in order, from one
            generator: the same seed gives the same units).
        lr, max_steps: as in :func:`finetune_units`, for both kinds of units.
        max_samples: caps how many misclassified samples are fine-tuned (the first ones; all
            of them still serve as neighbours and others).
        random_units: run the random-units control (it doubles the cost).

    Returns:
        :class:`NeighbourCorrection`.

    Raises:
        ValueError: ``k``, ``m`` or ``max_samples`` that is not a positive int (``max_samples``
            may be None), ``k`` above the number of units, labels that do not match the
            inputs, ``lr`` or ``max_steps`` out of what is allowed, fewer than ``m + 1``
            misclassified samples, or ``ps`` of another model.
        TypeError: ``random_units`` that is no bool.

    Examples::

        >>> from captum_paramsal.analysis import neighbour_correction
        >>> result = neighbour_correction(model, ps, images, labels, k=25, m=5, max_samples=50)
        >>> result.summary["neighbours_minus_others"]        # an Estimate: value, low, high, n
        >>> print(result.to_markdown())
    """
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ValueError(f"m must be a positive int, got {m!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != inputs.shape[0]:
        raise ValueError(f"labels must be a 1-d tensor with one label per input ({inputs.shape[0]})")
    _check_steps(lr, max_steps)
    if not isinstance(random_units, bool):
        raise TypeError(f"random_units must be a bool, got {random_units!r}")
    if ps.model is not model:
        raise ValueError("ps must be a ParameterSaliency of this model")
    layout = ps.layout
    with evaluation_mode(model):
        with torch.no_grad():
            predicted = model(inputs).argmax(-1)
        wrong = (predicted != labels.to(predicted.device)).nonzero().flatten()
        if len(wrong) < m + 1:
            raise ValueError(f"{len(wrong)} misclassified samples: need at least m + 1 = {m + 1}")
        if k > layout.num_columns:
            raise ValueError(f"k={k} is larger than the number of units ({layout.num_columns})")
        x, y = inputs[wrong], labels[wrong].to(predicted.device)
        z = ps.attribute(x, target=y).detach()
        unit = F.normalize(z, dim=1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-float("inf"))
        generator = torch.Generator().manual_seed(seed)
        records = []
        count = len(wrong) if max_samples is None else min(max_samples, len(wrong))
        for i in range(count):
            neighbours = similarity[i].topk(m).indices
            chosen = [layout.unit_of(int(c)) for c in z[i].topk(k).indices]
            tuned = finetune_units(model, chosen, x[i : i + 1], y[i : i + 1], layout=layout, lr=lr,
                                   max_steps=max_steps)
            record: Dict[str, Any] = {"sample": int(wrong[i]), "units": chosen}
            record["self_corrected"], record["steps"], near, rest = _measure(model, tuned, x, y, i, neighbours)
            record.update({"neighbours": wrong[neighbours].tolist(), "neighbours_corrected": near,
                           "others_corrected": rest})
            if random_units:
                drawn = [layout.unit_of(int(c)) for c in torch.randperm(layout.num_columns, generator=generator)[:k]]
                control = finetune_units(model, drawn, x[i : i + 1], y[i : i + 1], layout=layout, lr=lr,
                                         max_steps=max_steps)
                record["random_units"] = drawn
                (record["random_self_corrected"], record["random_steps"], record["random_neighbours_corrected"],
                 record["random_others_corrected"]) = _measure(model, control, x, y, i, neighbours)
            records.append(record)
    return NeighbourCorrection(records, m, k, len(wrong), random_units)
