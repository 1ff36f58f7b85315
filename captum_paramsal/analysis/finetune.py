"""The paper's fine-tuning test (docs/METHOD.md, "The paper's validation experiments"): fix one
misclassified sample by updating only its most salient units, then see whether that also fixes
its neighbours in saliency space."""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import evaluation_mode
from ..interventions import swapped_parameters
from ..saliency_profile import UnitScore
from ..units import Units, _is_column, _is_pair, _not_a_unit, _pair_of, iter_units, resolve_columns, resolve_entries

if TYPE_CHECKING:
    from .._core.parameter_saliency import ParameterSaliency


@dataclass
class FineTuneResult:
    """What :func:`finetune_salient` changed: ``delta[name]`` is the new value minus the old,
    zero outside the chosen units; ``corrected`` whether the sample ended up classified right.

    Attributes:
        delta (dict): ``{parameter name: new value - old value}``, one entry per updated parameter.
        units (list): the updated units, ``(parameter name, unit index)`` pairs.
        steps (int): gradient steps taken.
        corrected (bool): whether the sample is classified correctly after them.

    Examples::

        >>> result = finetune_salient(model, ps, images[3:4], labels[3], k=25)
        >>> result.units[:2]
        [('layer4.1.conv2.weight', 97), ('fc.weight', 3)]
        >>> with result.applied(model):
        ...     fixed = model(images).argmax(1)
    """

    delta: Dict[str, Tensor]
    units: List[Tuple[str, int]]
    steps: int
    corrected: bool

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


def _named_units(units: Units, ps: ParameterSaliency) -> List[Tuple[str, int]]:
    """``units`` as ``(name, index)`` pairs, columns read in ``ps.layout``, each unit once, in
    layout order where the layout has them (parameters outside it after, as given)."""
    pairs: List[Tuple[str, int]] = []
    for unit in iter_units(units):
        if isinstance(unit, UnitScore) or _is_pair(unit):
            pair = _pair_of(unit)  # the index checked to be an int (no float, no bool) and made one
        elif _is_column(unit):
            pair = ps.layout.unit_of(resolve_columns(unit, ps.layout)[0])
        else:
            raise TypeError(f"units: {_not_a_unit(unit)}")
        if pair not in pairs:
            pairs.append(pair)
    if not pairs:
        raise ValueError("units is empty: give at least one unit to fine-tune (or units=None for the top-k)")
    layout = ps.layout

    def place(pair: Tuple[str, int]) -> Tuple[int, int]:
        name, index = pair
        if name in layout and isinstance(index, int) and 0 <= index < layout[name].num_units:
            return (0, layout.column(name, index))
        return (1, 0)

    return sorted(pairs, key=place)


def _check_label(logits: Tensor, y: Tensor) -> None:
    """The fine-tuning's cross-entropy needs ``(1, classes)`` logits and ``y`` among the classes."""
    needs = "finetune_salient needs a model that returns (1, classes) logits"
    if not isinstance(logits, Tensor):
        raise ValueError(f"{needs}, got a {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{needs}, got shape {tuple(logits.shape)}")
    classes = logits.shape[1]
    if not 0 <= int(y[0]) < classes:
        raise ValueError(f"y={int(y[0])} is out of range for a model with {classes} classes (0..{classes - 1})")


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
    """Update only the top-``k`` salient units of one misclassified sample until it
    is
    classified correctly (docs/METHOD.md, "The paper's validation experiments"); the model itself
    is left exactly as it was.

    Gradient descent on the sample's cross-entropy (plain steps of size ``lr``, with every
    gradient entry outside the chosen units masked to zero) on a copy of the model in eval
    mode, stopping as soon as the prediction is ``y`` or after ``max_steps``.

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
    lr_ok = isinstance(lr, numbers.Real) and not isinstance(lr, bool) and lr > 0 and math.isfinite(lr)
    if not lr_ok or isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(
            f"lr must be > 0 (a finite number) and max_steps a positive int, got lr={lr!r}, max_steps={max_steps!r}"
        )
    if ps.model is not model:
        raise ValueError("ps must be a ParameterSaliency of this model")
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    if units is None:
        chosen = _top_units(ps, x, y, k)
    else:
        chosen = _named_units(units, ps)
    # where the units lie: rows of one parameter, or a head's / neuron's parts of several
    entries = resolve_entries(model, chosen, ps.layout)

    work = copy.deepcopy(model).eval()
    params = dict(work.named_parameters())
    masks: Dict[str, Tensor] = {}
    for name, blocks in entries.items():
        mask = torch.zeros(params[name].numel(), dtype=torch.bool, device=params[name].device)
        for block in blocks:
            mask[block.reshape(-1).to(mask.device)] = True
        masks[name] = mask.view_as(params[name])
    trained = [params[name] for name in masks]
    steps, corrected = 0, False
    for step in range(max_steps + 1):
        with torch.no_grad():
            logits = work(x)
        if step == 0:
            _check_label(logits, y)
        corrected = bool(logits.argmax(-1)[0] == y[0])
        if corrected or step == max_steps:
            break
        loss = F.cross_entropy(work(x), y)
        grads = torch.autograd.grad(loss, trained)
        with torch.no_grad():
            for param, grad, name in zip(trained, grads, masks):
                param.sub_(lr * grad * masks[name])
        steps += 1
    original = dict(model.named_parameters())
    delta = {name: (params[name].detach() - original[name].detach()) for name in masks}
    return FineTuneResult(delta, chosen, steps, corrected)


@dataclass
class NeighbourCorrection:
    """Per fine-tuned sample: the fraction of its ``m`` saliency-space neighbours (other
    misclassified samples) that the fine-tuning corrected, against ``m`` random ones.

    Built by :func:`neighbour_correction`.

    Attributes:
        records (list): one dict per fine-tuned sample: ``"sample"`` (its index in the inputs),
            ``"self_corrected"``, ``"steps"``, ``"neighbours_corrected"`` and
            ``"random_corrected"`` (fractions of its ``m`` neighbours / random samples).
        m, k (int): neighbours per sample; units fine-tuned per sample.
        num_misclassified (int): misclassified samples among the inputs.
        summary (dict): the averages over the samples the fine-tuning corrected.

    Examples::

        >>> result = neighbour_correction(model, ps, images, labels, k=25, m=5)
        >>> result.summary["neighbours_corrected"], result.summary["random_corrected"]
        (0.36, 0.08)
        >>> print(result.to_markdown())
    """

    records: List[Dict[str, Any]]
    m: int
    k: int
    num_misclassified: int
    summary: Dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        used = [r for r in self.records if r["self_corrected"]]
        n = max(1, len(used))
        self.summary = {
            "fine_tuned": len(self.records),
            "self_corrected": len(used),
            "neighbours_corrected": sum(r["neighbours_corrected"] for r in used) / n,
            "random_corrected": sum(r["random_corrected"] for r in used) / n,
        }

    def to_markdown(self) -> str:
        """:attr:`summary` as a one-row markdown table.

        Examples::

            >>> print(neighbour_correction(model, ps, images, labels).to_markdown())
        """
        s = self.summary
        return "\n".join([
            "| misclassified samples | fine-tuned until correct | neighbours corrected | random samples corrected |",
            "|---:|---:|---:|---:|",
            f"| {self.num_misclassified} | {s['self_corrected']} of {s['fine_tuned']} | "
            f"{s['neighbours_corrected']:.1%} | {s['random_corrected']:.1%} |",
        ])


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
) -> NeighbourCorrection:
    """For each misclassified sample among ``inputs``: fine-tune its top-``k`` units on it
    (:func:`finetune_salient`), then count how many of its ``m`` nearest neighbours among the
    other misclassified samples (cosine of standardized profiles at the true label) are now
    classified correctly, against ``m`` random other misclassified samples (docs/METHOD.md, "The paper's
    validation experiments").

    Averages are over the samples the fine-tuning corrected. The model is left exactly as it
    was (each fine-tuning runs on a copy and is shown to the model only through
    :meth:`FineTuneResult.applied`).

    Args:
        model: the network ``ps`` explains.
        ps: a :class:`~captum_paramsal.ParameterSaliency` of ``model``.
        inputs, labels: a batch and its true labels (``(N,)``).
        k: units fine-tuned per sample.
        m: neighbours (and random samples) per sample.
        seed: seeds the random samples.
        lr, max_steps: as in :func:`finetune_salient`.
        max_samples: caps how many misclassified samples are fine-tuned (all of them still
            serve as neighbours).

    Returns:
        :class:`NeighbourCorrection`.

    Raises:
        ValueError: ``k``, ``m`` or ``max_samples`` that is not a positive int (``max_samples``
            may be None), ``k`` above the number of units, labels that do not match the
            inputs, fewer than ``m + 1`` misclassified samples, or ``ps`` of another model.

    Examples::

        >>> from captum_paramsal.analysis import neighbour_correction
        >>> result = neighbour_correction(model, ps, images, labels, k=25, m=5, max_samples=50)
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
    if ps.model is not model:
        raise ValueError("ps must be a ParameterSaliency of this model")
    with evaluation_mode(model):
        with torch.no_grad():
            predicted = model(inputs).argmax(-1)
        wrong = (predicted != labels.to(predicted.device)).nonzero().flatten()
        if len(wrong) < m + 1:
            raise ValueError(f"{len(wrong)} misclassified samples: need at least m + 1 = {m + 1}")
        if k > ps.layout.num_columns:
            raise ValueError(f"k={k} is larger than the number of units ({ps.layout.num_columns})")
        x, y = inputs[wrong], labels[wrong].to(predicted.device)
        z = ps.attribute(x, target=y).detach()
        unit = F.normalize(z, dim=1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-float("inf"))
        generator = torch.Generator().manual_seed(seed)
        records = []
        count = len(wrong) if max_samples is None else min(max_samples, len(wrong))
        for i in range(count):
            chosen = [ps.layout.unit_of(int(c)) for c in z[i].topk(k).indices]
            result = finetune_salient(model, ps, x[i : i + 1], y[i], k=k, lr=lr, max_steps=max_steps, units=chosen)
            neighbours = similarity[i].topk(m).indices
            others = torch.tensor([j for j in range(len(wrong)) if j != i])
            random = others[torch.randperm(len(others), generator=generator)[:m]]
            with result.applied(model), torch.no_grad():
                fixed = model(x).argmax(-1) == y
            records.append({
                "sample": int(wrong[i]),
                "self_corrected": result.corrected,
                "steps": result.steps,
                "neighbours_corrected": float(fixed[neighbours].float().mean()),
                "random_corrected": float(fixed[random].float().mean()),
            })
    return NeighbourCorrection(records, m, k, len(wrong))
