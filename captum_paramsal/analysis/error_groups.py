"""From one wrong sample to a model's failure modes: the misclassified samples of a data set
grouped by their standardized saliency profiles, each group with the units that malfunction on
all of it (its culprits) and the reference samples that drive those units hardest.

The paper (Levin et al., NeurIPS 2022) shows that samples with close profiles are alike;
:func:`error_groups` turns that into a map of a model's errors. :func:`~captum_paramsal.analysis.repair`
then edits a group's culprits and measures what that fixes and breaks, against controls.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from ..data import labelled_batches
from ..layout import SaliencyLayout
from .dataset_profiles import device_of, predict

if TYPE_CHECKING:
    from .._core.parameter_saliency import ParameterSaliency

__all__ = ["CulpritUnit", "ErrorGroup", "ErrorGroups", "Exemplars", "as_batches", "error_groups"]


@dataclass(frozen=True)
class CulpritUnit:
    """One unit that malfunctions across a group.

    Attributes:
        column (int): its column in the layout.
        name (str), unit (int): the parameter and unit index (as
            :func:`~captum_paramsal.interventions.turn_off` takes units).
        score (float): the ranking score, the mean z of the unit over the group's samples.
        consistency (float): the share of the group's samples on which the unit's z is at
            least the ``z_threshold`` of :func:`error_groups`.
        mean_raw (float): the mean raw saliency (e.g. mean ``|grad|``) over the group.
    """

    column: int
    name: str
    unit: int
    score: float
    consistency: float
    mean_raw: float

    @property
    def pair(self) -> Tuple[str, int]:
        """``(name, unit)``, a unit as :mod:`captum_paramsal.units` names one."""
        return (self.name, self.unit)


@dataclass(frozen=True, eq=False)
class Exemplars:
    """The reference samples that drive one unit hardest, by saliency: the highest z of that
    unit at each sample's own (true) label, highest first.

    Attributes:
        column (int): the unit's layout column.
        indices (Tensor): ``(m,)`` positions in the reference data (in iteration order).
        z (Tensor): ``(m,)`` their z of this unit.
        inputs (tuple of Tensor): their inputs, on the CPU, one tensor per model input.
        labels (Tensor): ``(m,)`` their labels.
    """

    column: int
    indices: Tensor
    z: Tensor
    inputs: Tuple[Tensor, ...]
    labels: Tensor


@dataclass(eq=False)
class ErrorGroup:
    """Misclassified samples that share their malfunctioning units.

    Attributes:
        id (int): the group's number (groups are numbered by size, largest first).
        indices (Tensor): ``(n,)`` positions of its samples in the data (iteration order).
        inputs (tuple of Tensor): their inputs on the CPU.
        labels, predictions (Tensor): ``(n,)`` true and predicted classes.
        z (Tensor): ``(n, F)`` float64 standardized profiles at the true label.
        raw (Tensor): ``(n, F)`` float64 raw profiles (the reduction's values).
        culprits (list of CulpritUnit): the top units by :attr:`CulpritUnit.score`.
        exemplars (dict): ``{column: Exemplars}`` for each culprit.
        layout (SaliencyLayout): the columns.

    Examples::

        >>> groups = error_groups(ps, test_loader)
        >>> g = groups[0]
        >>> g.pairs[:2]                      # dominant (true, predicted) pairs with counts
        [((3, 5), 12), ((8, 5), 4)]
        >>> g.culprits[0].name, g.culprits[0].unit, g.culprits[0].consistency
        ('layer4.1.conv2.weight', 97, 0.88)
        >>> with turn_off(model, g.culprit_units(5)):
        ...     model(g.inputs[0]).argmax(1)
    """

    id: int
    indices: Tensor
    inputs: Tuple[Tensor, ...]
    labels: Tensor
    predictions: Tensor
    z: Tensor
    raw: Tensor
    culprits: List[CulpritUnit]
    exemplars: Dict[int, Exemplars]
    layout: SaliencyLayout
    z_threshold: float = 2.0

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def pairs(self) -> List[Tuple[Tuple[int, int], int]]:
        """``[((true, predicted), count), ...]``, most frequent first (ties by class)."""
        counts = Counter(zip(self.labels.tolist(), self.predictions.tolist()))
        return sorted(counts.items(), key=lambda item: (-item[1], item[0]))

    @property
    def mean_z(self) -> Tensor:
        """``(F,)`` the mean standardized profile of the group: every unit's culprit score."""
        return self.z.mean(0)

    @property
    def mean_raw(self) -> Tensor:
        """``(F,)`` the mean raw profile of the group (no standardization)."""
        return self.raw.mean(0)

    def ranked_columns(self, k: int) -> List[int]:
        """The ``k`` columns of highest culprit score (mean z over the group), any ``k`` up to
        the number of units; the first :attr:`culprits` are these.

        Examples::

            >>> group.ranked_columns(3)
            [4711, 12, 803]
        """
        _check_k(k, self.layout.num_columns)
        return _ranked(self.mean_z, self.consistency, k)

    @property
    def consistency(self) -> Tensor:
        """``(F,)`` per unit, the share of the group's samples with ``z >= z_threshold``."""
        return (self.z >= self.z_threshold).to(torch.float64).mean(0)

    def culprit_units(self, k: Optional[int] = None) -> List[Tuple[str, int]]:
        """The top ``k`` culprits (default: all listed) as ``(name, unit)`` pairs.

        Examples::

            >>> group.culprit_units(2)
            [('conv2.weight', 7), ('fc1.weight', 31)]
        """
        k = len(self.culprits) if k is None else k
        return [self.layout.unit_of(c) for c in self.ranked_columns(k)]

    def describe(self) -> str:
        """A few lines of text: size, pairs, culprits.

        Examples::

            >>> print(groups[0].describe())
        """
        pairs = ", ".join(f"{t}->{p} ({n})" for (t, p), n in self.pairs[:4])
        lines = [f"group {self.id}: {len(self)} samples; (true->predicted): {pairs}"]
        for rank, c in enumerate(self.culprits, 1):
            lines.append(
                f"  {rank}. {c.name} unit {c.unit}: mean z {c.score:.2f}, z>={self.z_threshold:g} on "
                f"{c.consistency:.0%} of the group"
            )
        return "\n".join(lines)

    def plot(self, thumbnails: int = 8, exemplars: int = 4, culprits: Optional[int] = None) -> Any:
        """The group at a glance: sample thumbnails, the culprits' bar chart (mean z, with the
        share of samples above the threshold), and each culprit's exemplars.

        Inputs are drawn as images when the first input is ``(C, H, W)`` with 1 or 3
        channels or ``(H, W)``; otherwise the thumbnail rows are left out.

        Args:
            thumbnails: at most this many of the group's samples.
            exemplars: at most this many exemplars per culprit.
            culprits: at most this many culprits (default: all listed, up to 6 with exemplars).

        Returns:
            a matplotlib ``Figure`` (built without pyplot).

        Examples::

            >>> groups[0].plot().savefig("group0.png")
        """
        from matplotlib.figure import Figure

        shown = self.culprits[: culprits or len(self.culprits)]
        drawable = _is_image(self.inputs[0])
        with_exemplars = [c for c in shown[:6] if c.column in self.exemplars] if drawable else []
        n_thumbs = min(thumbnails, len(self)) if drawable else 0
        columns = max(n_thumbs, exemplars + 1, 4)
        rows = (1 if n_thumbs else 0) + 1 + len(with_exemplars)
        figure = Figure(figsize=(1.3 * columns + 1, 1.35 * rows + 2.2), layout="constrained")
        grid = figure.add_gridspec(rows, columns, height_ratios=[1] * (1 if n_thumbs else 0) + [2.2]
                                   + [1] * len(with_exemplars))
        row = 0
        if n_thumbs:
            for j in range(n_thumbs):
                ax = figure.add_subplot(grid[0, j])
                _show(ax, self.inputs[0][j])
                ax.set_title(f"#{int(self.indices[j])}: {int(self.labels[j])}->{int(self.predictions[j])}",
                             fontsize="x-small")
            row = 1
        bars = figure.add_subplot(grid[row, :])
        names = [f"{c.name}[{c.unit}]" for c in shown]
        positions = list(range(len(shown)))
        bars.barh(positions, [c.score for c in shown], color="tab:red")
        for p, c in zip(positions, shown):
            bars.text(c.score, p, f"  {c.consistency:.0%}", va="center", fontsize="x-small")
        bars.set_yticks(positions, names, fontsize="x-small")
        bars.invert_yaxis()
        bars.set_xlabel(f"mean z over the group (label: share of samples with z >= {self.z_threshold:g})")
        bars.set_title("culprit units")
        for r, c in enumerate(with_exemplars, start=row + 1):
            label = figure.add_subplot(grid[r, 0])
            label.axis("off")
            label.text(0.5, 0.5, f"{c.name}\n[{c.unit}]\nexemplars", ha="center", va="center",
                       fontsize="x-small")
            ex = self.exemplars[c.column]
            for j in range(min(exemplars, len(ex.indices))):
                ax = figure.add_subplot(grid[r, j + 1])
                _show(ax, ex.inputs[0][j])
                ax.set_title(f"ref #{int(ex.indices[j])} (y={int(ex.labels[j])}) z={float(ex.z[j]):.1f}",
                             fontsize="xx-small")
        pairs = ", ".join(f"{t}->{p} ({n})" for (t, p), n in self.pairs[:3])
        figure.suptitle(f"error group {self.id}: {len(self)} samples; {pairs}")
        return figure


@dataclass(eq=False)
class ErrorGroups:
    """The misclassified samples of a data set in groups; built by :func:`error_groups`.

    Attributes:
        groups (list of ErrorGroup): largest first.
        layout (SaliencyLayout): the columns.
        num_samples, num_misclassified (int): samples seen; those misclassified.
        criterion (str): how the number of groups was chosen: ``"given"``, ``"silhouette"``
            (with a note when k is the largest tried), or why there is one group.
        silhouettes (dict): ``{k: mean silhouette}`` for every k tried (empty when given).
        assignment (Tensor): ``(num_misclassified,)`` each misclassified sample's group id.

    Examples::

        >>> groups = error_groups(ps, test_loader)
        >>> len(groups), groups.criterion
        (4, 'silhouette')
        >>> print(groups.to_markdown())
        >>> groups[0].plot().savefig("group0.png")
    """

    groups: List[ErrorGroup]
    layout: SaliencyLayout
    num_samples: int
    num_misclassified: int
    criterion: str
    silhouettes: Dict[int, float] = field(default_factory=dict)
    assignment: Optional[Tensor] = None

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> ErrorGroup:
        return self.groups[i]

    def __iter__(self) -> Iterator[ErrorGroup]:
        return iter(self.groups)

    def to_markdown(self, culprits: int = 3) -> str:
        """One row per group: size, dominant pairs, top culprits with consistency.

        Examples::

            >>> print(groups.to_markdown())
        """
        lines = ["| group | samples | (true → predicted) pairs | culprit units (mean z, share with z ≥ threshold) |",
                 "|---:|---:|---|---|"]
        for g in self.groups:
            pairs = ", ".join(f"{t}→{p} ({n})" for (t, p), n in g.pairs[:3])
            units = "; ".join(f"`{c.name}`[{c.unit}] ({c.score:.1f}, {c.consistency:.0%})"
                              for c in g.culprits[:culprits])
            lines.append(f"| {g.id} | {len(g)} | {pairs} | {units} |")
        return "\n".join(lines)


def as_batches(data: Any) -> Iterable:
    """``data`` as an iterable of batches: one ``(inputs, labels)`` pair of tensors becomes a
    one-batch list; anything else (a DataLoader, a list of batches) is returned as it is."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor) and (
        isinstance(data[0], Tensor) or (isinstance(data[0], tuple) and all(isinstance(t, Tensor) for t in data[0]))
    ) and data[1].dim() == 1:
        return [tuple(data)]
    return data


def _check_k(k: Any, units: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= units:
        raise ValueError(f"k must be an int between 1 and the number of units ({units}), got {k!r}")
    return k


def _ranked(score: Tensor, tie: Tensor, k: int) -> List[int]:
    """The ``k`` columns of highest ``score``, ties by higher ``tie``, then by lower column:
    two stable sorts, the minor key first."""
    by_tie = torch.sort(-tie, stable=True).indices
    order = by_tie[torch.sort(-score[by_tie], stable=True).indices]
    return order[:k].tolist()


def _is_image(x: Tensor) -> bool:
    return x.dim() == 3 or (x.dim() == 4 and x.shape[1] in (1, 3))


def _show(ax: Any, image: Tensor) -> None:
    image = image.detach().float().cpu()
    if image.dim() == 3:
        image = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)
    low, high = float(image.min()), float(image.max())
    image = (image - low) / (high - low) if high > low else image * 0
    ax.imshow(image.numpy(), cmap="gray" if image.dim() == 2 else None)
    ax.set_xticks([])
    ax.set_yticks([])


def _choose_groups(unit: Tensor, n_groups: Optional[int], max_groups: int, min_group_size: int, seed: int
                   ) -> Tuple[Tensor, str, Dict[int, float]]:
    """Spherical k-means on unit-norm profiles (k-means on the unit sphere groups by cosine);
    the number of groups given, or the k in 2..max_groups of the highest mean silhouette
    under the cosine distance among those whose groups all hold ``min_group_size`` samples."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    points = unit.numpy()
    n = points.shape[0]

    def fit(k: int):
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(points)

    if n_groups is not None:
        return torch.as_tensor(fit(n_groups)), "given", {}
    one = torch.zeros(n, dtype=torch.long)
    if n < max(3, 2 * min_group_size):
        return one, "one group (too few samples to split)", {}
    silhouettes: Dict[int, float] = {}
    best = None
    for k in range(2, min(max_groups, n // min_group_size) + 1):
        labels = fit(k)
        sizes = Counter(labels.tolist())
        if len(sizes) < k or min(sizes.values()) < min_group_size:
            continue
        silhouettes[k] = float(silhouette_score(points, labels, metric="cosine"))
        if best is None or silhouettes[k] > silhouettes[best[0]]:
            best = (k, labels)
    if best is None:
        return one, f"one group (no split into groups of >= {min_group_size})", silhouettes
    at_cap = " (the largest k tried: more groups may fit better)" if best[0] == max(silhouettes) and \
        best[0] == max_groups else ""
    return torch.as_tensor(best[1]), "silhouette" + at_cap, silhouettes


class _RunningTop:
    """The ``m`` reference samples of highest z per unit, kept while the data streams by, and
    the inputs of just those samples (so memory stays ``m`` samples per unit at most)."""

    def __init__(self, columns: int, m: int) -> None:
        self.m = m
        self.values = torch.full((0, columns), -math.inf, dtype=torch.float64)
        self.indices = torch.zeros((0, columns), dtype=torch.long)
        self.kept: Dict[int, Tuple[Tuple[Tensor, ...], int]] = {}

    def add(self, z: Tensor, positions: Tensor, inputs: Tuple[Tensor, ...], labels: Tensor) -> None:
        if z.shape[0] == 0:
            return
        values = torch.cat([self.values, z])
        indices = torch.cat([self.indices, positions[:, None].expand(-1, z.shape[1])])
        top = values.topk(min(self.m, values.shape[0]), dim=0)
        self.values, self.indices = top.values, indices.gather(0, top.indices)
        for row, position in enumerate(positions.tolist()):
            self.kept[position] = (tuple(x[row] for x in inputs), int(labels[row]))
        alive = set(self.indices.flatten().tolist())
        self.kept = {p: v for p, v in self.kept.items() if p in alive}

    def exemplars(self, column: int) -> Exemplars:
        idx = self.indices[:, column]
        chosen = [self.kept[p] for p in idx.tolist()]
        inputs = tuple(torch.stack([c[0][i] for c in chosen]) for i in range(len(chosen[0][0])))
        return Exemplars(column, idx.clone(), self.values[:, column].clone(), inputs,
                         torch.tensor([c[1] for c in chosen]))


def error_groups(
    ps: ParameterSaliency,
    data: Any,
    n_groups: Optional[int] = None,
    max_groups: int = 8,
    culprits: int = 10,
    exemplars: int = 4,
    reference: Any = None,
    z_threshold: float = 2.0,
    min_group_size: int = 3,
    seed: int = 0,
    max_samples: Optional[int] = None,
    progress: bool = True,
    internal_batch_size: Optional[int] = None,
) -> ErrorGroups:
    r"""Group the misclassified samples of ``data`` by their standardized saliency profiles and
    name each group's culprit units and their exemplars.

    1. For every sample: the prediction (argmax of the model's output, eval mode) and the
       profile at its true label (as the paper: what would fix the mistake), raw and
       standardized with ``ps.stats``; one engine pass per batch.
    2. The misclassified samples are clustered by cosine similarity of their z-profiles:
       k-means on the profiles scaled to unit length (scikit-learn's ``KMeans``, 10 starts,
       seeded), with ``n_groups`` groups, or else the k in ``2..max_groups`` with the highest
       mean silhouette under the cosine distance among the k whose groups all hold at least
       ``min_group_size`` samples (``criterion`` says which, and whether k hit
       ``max_groups``; when no k qualifies, all misclassified samples form one group).
       Groups are numbered largest first.
    3. A group's culprit units are ranked by their mean z over the group's samples (ties:
       by consistency, then column); consistency is the share of the group's samples with
       ``z >= z_threshold``.
    4. Exemplars of a culprit unit: the ``exemplars`` samples of the reference set with the
       highest z of that unit at their own label (by saliency, not activation). The
       reference set is ``reference`` when given (all its samples), else the correctly
       classified samples of ``data``. Kept while streaming: at most ``exemplars`` samples
       per unit are held.

    Args:
        ps: a :class:`~captum_paramsal.ParameterSaliency` with statistics (``ps.stats``); its
            model must output ``(batch, classes)``.
        data: an iterable of ``(inputs, labels)`` batches (a DataLoader), or one
            ``(inputs, labels)`` pair of tensors.
        n_groups: the number of groups; None chooses it by silhouette.
        max_groups: the largest number of groups tried when choosing.
        culprits: culprit units listed per group (any number can be ranked later with
            :meth:`ErrorGroup.ranked_columns`).
        exemplars: exemplars per culprit unit.
        reference: the reference data for exemplars, in the forms of ``data``; default the
            correctly classified samples of ``data``.
        z_threshold: the z a unit must reach on a sample to count toward its consistency.
        min_group_size: when choosing the number of groups, the smallest group allowed.
        seed: seeds k-means.
        max_samples: read at most this many samples of ``data``.
        progress: tqdm progress bars over the data.
        internal_batch_size: as in :meth:`ParameterSaliency.attribute`, bounds memory.

    Returns:
        :class:`ErrorGroups`. The misclassified samples' inputs are kept on the CPU.

    Raises:
        ValueError: ``ps.stats`` is None, no misclassified sample, ``n_groups`` larger than
            the number of misclassified samples, or an argument out of range.

    Examples::

        >>> from captum_paramsal import ParameterSaliency
        >>> from captum_paramsal.analysis import error_groups, repair
        >>> ps = ParameterSaliency(model, stats=stats)
        >>> groups = error_groups(ps, (x_test, y_test))
        >>> print(groups.to_markdown())
        >>> print(groups[0].describe())
        >>> groups[0].plot().savefig("group0.png")
        >>> result = repair(model, ps, groups[0], (x_val, y_val), k=5)
        >>> print(result.to_markdown())
    """
    stats = ps.stats
    if stats is None:
        raise ValueError(
            "error_groups needs standardized profiles, but ps.stats is None: set "
            "ps.stats = ps.fit_stats(reference_data) first"
        )
    checked = (("max_groups", max_groups, 2), ("culprits", culprits, 1), ("exemplars", exemplars, 1),
               ("min_group_size", min_group_size, 1))
    for name, value, low in checked:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if n_groups is not None and (isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1):
        raise ValueError(f"n_groups must be a positive int or None, got {n_groups!r}")
    if isinstance(z_threshold, bool) or not isinstance(z_threshold, (int, float)) or not math.isfinite(z_threshold):
        raise ValueError(f"z_threshold must be a finite number, got {z_threshold!r}")
    layout = ps.layout
    columns = layout.num_columns
    culprits = min(culprits, columns)
    device = device_of(ps)
    top = _RunningTop(columns, exemplars)
    wrong_parts: Dict[str, List[Any]] = {"inputs": [], "labels": [], "predictions": [], "z": [], "raw": [],
                                         "indices": []}
    seen = 0
    batches = labelled_batches(as_batches(data), device=device, max_samples=max_samples, progress=progress,
                               desc="error groups")
    for inputs, labels in batches:
        predictions = predict(ps.model, inputs, require=True)
        (raw,) = ps.attribute(inputs, target=labels, internal_batch_size=internal_batch_size, standardize=False)
        raw = raw.detach().to(device="cpu", dtype=torch.float64)
        z = stats.standardize(raw)
        positions = torch.arange(seen, seen + labels.shape[0])
        seen += labels.shape[0]
        wrong = (predictions != labels).cpu()
        cpu_inputs = tuple(x.detach().cpu() for x in inputs)
        labels, predictions = labels.cpu(), predictions.cpu()
        wrong_parts["inputs"].append(tuple(x[wrong] for x in cpu_inputs))
        wrong_parts["labels"].append(labels[wrong])
        wrong_parts["predictions"].append(predictions[wrong])
        wrong_parts["z"].append(z[wrong])
        wrong_parts["raw"].append(raw[wrong])
        wrong_parts["indices"].append(positions[wrong])
        if reference is None:
            right = ~wrong
            top.add(z[right], positions[right], tuple(x[right] for x in cpu_inputs), labels[right])
    if seen == 0:
        raise ValueError("error_groups saw no samples: data is empty")
    z_wrong = torch.cat(wrong_parts["z"])
    n_wrong = z_wrong.shape[0]
    if n_wrong == 0:
        raise ValueError(f"no misclassified samples among the {seen} samples of data: no error to group")
    if n_groups is not None and n_groups > n_wrong:
        raise ValueError(f"n_groups={n_groups} is more than the {n_wrong} misclassified samples")
    if reference is not None:
        position = 0
        for inputs, labels in labelled_batches(as_batches(reference), device=device, progress=progress,
                                               desc="exemplars"):
            (z,) = ps.attribute(inputs, target=labels, internal_batch_size=internal_batch_size)
            positions = torch.arange(position, position + labels.shape[0])
            position += labels.shape[0]
            top.add(z.detach().cpu().to(torch.float64), positions, tuple(x.detach().cpu() for x in inputs),
                    labels.cpu())
    inputs_wrong = tuple(torch.cat([part[i] for part in wrong_parts["inputs"]])
                         for i in range(len(wrong_parts["inputs"][0])))
    labels_wrong = torch.cat(wrong_parts["labels"])
    predictions_wrong = torch.cat(wrong_parts["predictions"])
    raw_wrong = torch.cat(wrong_parts["raw"])
    indices_wrong = torch.cat(wrong_parts["indices"])

    unit = torch.nn.functional.normalize(z_wrong, dim=1)
    assignment, criterion, silhouettes = _choose_groups(unit, n_groups, max_groups, min_group_size, seed)
    # renumber: largest group first, ties by the first sample's position
    sizes = Counter(assignment.tolist())
    order = sorted(sizes, key=lambda g: (-sizes[g], int((assignment == g).nonzero()[0])))
    renumber = {old: new for new, old in enumerate(order)}
    assignment = torch.tensor([renumber[g] for g in assignment.tolist()], dtype=torch.long)

    groups: List[ErrorGroup] = []
    have_exemplars = top.values.shape[0] > 0
    for gid in range(len(order)):
        members = (assignment == gid).nonzero().flatten()
        group = ErrorGroup(
            id=gid,
            indices=indices_wrong[members],
            inputs=tuple(x[members] for x in inputs_wrong),
            labels=labels_wrong[members],
            predictions=predictions_wrong[members],
            z=z_wrong[members],
            raw=raw_wrong[members],
            culprits=[],
            exemplars={},
            layout=layout,
            z_threshold=float(z_threshold),
        )
        score, consistency, mean_raw = group.mean_z, group.consistency, group.mean_raw
        for column in _ranked(score, consistency, culprits):
            name, index = layout.unit_of(column)
            group.culprits.append(CulpritUnit(column, name, index, float(score[column]),
                                              float(consistency[column]), float(mean_raw[column])))
            if have_exemplars:
                group.exemplars[column] = top.exemplars(column)
        groups.append(group)
    return ErrorGroups(groups, layout, seen, n_wrong, criterion, silhouettes, assignment)
