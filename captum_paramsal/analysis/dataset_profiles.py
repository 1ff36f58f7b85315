"""Mean saliency profiles of a data set's correctly and wrongly classified samples (Levin et al.,
Fig. 2): misclassified samples have larger gradients overall, and after standardization their
profiles stand out in particular layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._utils import evaluation_mode
from ..data import labelled_batches
from ..layout import SaliencyLayout

if TYPE_CHECKING:
    from .._core.parameter_saliency import ParameterSaliency


@dataclass(frozen=True, eq=False)
class DatasetProfiles:
    r"""Mean unit saliency of the correctly and of the wrongly classified samples of a data set.

    Built by :func:`dataset_profiles`. Every profile is a float64 ``(F,)`` tensor on the CPU
    whose columns follow :attr:`layout` (``profile[entry.slice]`` is one parameter's units);
    a group without samples has ``None`` as its profiles.

    Attributes:
        layout (SaliencyLayout): the columns, one entry per selected parameter.
        num_correct (int): samples whose prediction (argmax of the model's output) is their label.
        num_misclassified (int): the others.
        mean_raw_correct, mean_raw_misclassified (Tensor or None): the mean raw profile
            (the reduction's value per unit: mean ``|grad|``, the signed mean or the rms).
        value_label (str): what the raw values are, for the plot's axis.
        mean_z_correct, mean_z_misclassified (Tensor or None): the mean standardized profile
            (z-scores against the reference statistics); ``None`` as well when the profiles were
            computed with ``standardize=False``.

    Examples::

        >>> result = dataset_profiles(ps, val_loader)    # ps.stats set, see ParameterSaliency
        >>> result.num_misclassified
        2381
        >>> print(result.to_markdown())                  # mean z per layer, correct vs wrong
        >>> result.plot().savefig("mean_profiles.png")   # the paper's figure
    """

    layout: SaliencyLayout
    num_correct: int
    num_misclassified: int
    mean_raw_correct: Optional[Tensor]
    mean_raw_misclassified: Optional[Tensor]
    mean_z_correct: Optional[Tensor] = None
    mean_z_misclassified: Optional[Tensor] = None
    #: what the raw values are (the reduction's label, e.g. "mean |grad|")
    value_label: str = "mean |grad|"

    @property
    def num_samples(self) -> int:
        """All samples seen: ``num_correct + num_misclassified``.

        Examples::

            >>> result.num_samples
            10000
        """
        return self.num_correct + self.num_misclassified

    @property
    def standardized(self) -> bool:
        """Whether standardized means are available (the profiles were computed with statistics).

        Examples::

            >>> dataset_profiles(ps, val_loader, standardize=False).standardized
            False
        """
        return self.mean_z_correct is not None or self.mean_z_misclassified is not None

    def by_layer(self, standardized: bool = True) -> List[Tuple[str, int, Optional[float], Optional[float]]]:
        """Per parameter, in network order: ``(name, units, mean over its units of the correct
        samples' mean profile, the same for the misclassified samples)``; ``None`` for an empty
        group. ``standardized=False`` (or profiles without statistics) uses the raw profiles.

        Examples::

            >>> result.by_layer()[0]
            ('conv1.weight', 64, -0.12, 0.87)
        """
        correct, wrong = self._pair(standardized)
        rows = []
        for entry in self.layout:
            rows.append((
                entry.name,
                entry.num_units,
                None if correct is None else float(correct[entry.slice].mean()),
                None if wrong is None else float(wrong[entry.slice].mean()),
            ))
        return rows

    def _pair(self, standardized: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        if standardized and self.standardized:
            return self.mean_z_correct, self.mean_z_misclassified
        return self.mean_raw_correct, self.mean_raw_misclassified

    def to_markdown(self, standardized: bool = True) -> str:
        """A per-layer table: layer, units, mean z of the correct and of the misclassified
        samples (raw saliency instead when ``standardized=False`` or without statistics).

        Examples::

            >>> print(result.to_markdown())
        """
        use_z = standardized and self.standardized
        what = "mean z" if use_z else "mean saliency"
        fmt = "{:+.3f}" if use_z else "{:.4g}"
        lines = [
            f"| layer | units | {what}, correct (n={self.num_correct}) | "
            f"{what}, misclassified (n={self.num_misclassified}) |",
            "|---|---:|---:|---:|",
        ]
        for name, units, correct, wrong in self.by_layer(use_z):
            cells = ["—" if value is None else fmt.format(value) for value in (correct, wrong)]
            lines.append(f"| {name} | {units} | {cells[0]} | {cells[1]} |")
        return "\n".join(lines)

    def plot(self, axes: Optional[Sequence[Any]] = None, max_layer_labels: int = 40) -> Any:
        """The paper's figure: the mean profile of the correct and of the misclassified samples,
        units in network order (column order of :attr:`layout`), layer boundaries as vertical
        lines and layer names as ticks at each layer's centre.

        Two panels, raw and standardized saliency, one above the other sharing the unit axis
        (one panel, raw, without statistics).

        Args:
            axes: matplotlib axes to draw into, one per panel; default: a new Figure.
            max_layer_labels: at most this many layer names on the unit axis (every n-th one
                for deeper networks, so the labels stay legible); boundaries are all drawn.

        Returns:
            the matplotlib ``Figure`` (``fig.savefig(path)`` writes it to a file).

        Examples::

            >>> result.plot().savefig("mean_profiles.png")
        """
        panels = [("raw", self.mean_raw_correct, self.mean_raw_misclassified, f"mean saliency ({self.value_label})")]
        if self.standardized:
            panels.append(
                ("standardized", self.mean_z_correct, self.mean_z_misclassified, "mean standardized saliency (z)")
            )
        if axes is None:
            from matplotlib.figure import Figure  # no pyplot: works headless, no global figure registry

            figure = Figure(figsize=(11, 3.2 * len(panels) + 0.6), layout="constrained")
            axes = list(figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0])
        else:
            axes = list(axes)
            if len(axes) != len(panels):
                raise ValueError(f"plot needs {len(panels)} axes (one per panel), got {len(axes)}")
            figure = axes[0].figure
        columns = self.layout.num_columns
        boundaries = [entry.slice.start - 0.5 for entry in self.layout][1:]
        centres = [(entry.slice.start + entry.slice.stop - 1) / 2 for entry in self.layout]
        step = max(1, -(-len(self.layout) // max(1, max_layer_labels)))  # ceil division
        x = list(range(columns))
        for ax, (kind, correct, wrong, ylabel) in zip(axes, panels):
            marker = "." if columns <= 200 else None  # single units are invisible as dots at scale
            if correct is not None:
                ax.plot(x, correct.tolist(), color="tab:blue", linewidth=0.8, marker=marker, markersize=3,
                        label=f"correctly classified (n={self.num_correct})")
            if wrong is not None:
                ax.plot(x, wrong.tolist(), color="tab:red", linewidth=0.8, marker=marker, markersize=3,
                        label=f"misclassified (n={self.num_misclassified})")
            for boundary in boundaries:
                ax.axvline(boundary, color="0.75", linewidth=0.6, zorder=0)
            if kind == "standardized":
                ax.axhline(0.0, color="0.4", linewidth=0.6, linestyle="--", zorder=0)
            ax.set_xlim(-0.5, columns - 0.5)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{kind} saliency, mean over samples")
            ax.legend(loc="upper right", fontsize="small")
        bottom = axes[-1]
        bottom.set_xticks(centres[::step], [entry.name for entry in self.layout][::step],
                          rotation=90, fontsize="x-small")
        bottom.set_xlabel("units in network order (vertical lines: layer boundaries)")
        return figure


def dataset_profiles(
    ps: ParameterSaliency,
    data: Iterable,
    progress: bool = True,
    max_samples: Optional[int] = None,
    standardize: bool = True,
    internal_batch_size: Optional[int] = None,
) -> DatasetProfiles:
    r"""Mean raw and standardized saliency profiles of the correct and the misclassified samples.

    For every batch ``(inputs, labels)`` of ``data``: the prediction is the argmax of the
    model's output (eval mode, no gradient); the saliency profile is computed with the TRUE
    label as the loss target, as in the paper, whether or not the sample is classified
    correctly. Profiles are summed per group in float64 as they arrive, so memory does not grow
    with the data set. Since standardization is affine per unit, the mean standardized profile
    is the standardization of the mean raw profile; it is computed that way, exactly.

    Args:
        ps: a :class:`~captum_paramsal.ParameterSaliency`; its model must output
            ``(batch, classes)`` logits.
        data: an iterable of ``(inputs, labels)`` batches (a ``DataLoader`` included);
            ``inputs`` is a tensor or a tuple of tensors, ``labels`` one class per sample.
            Batches are moved to the model's device.
        progress: show a tqdm progress bar.
        max_samples: stop after this many samples.
        standardize: also compute the standardized means, which needs ``ps.stats`` (default);
            with False only the raw means are computed.
        internal_batch_size: as in :meth:`ParameterSaliency.attribute`, bounds memory.

    Returns:
        :class:`DatasetProfiles`.

    Raises:
        ValueError: ``standardize=True`` while ``ps.stats`` is None, a batch that is not an
            ``(inputs, labels)`` pair or whose labels do not match, a model output that is
            not ``(batch, classes)``, or no samples at all.

    Examples::

        >>> from captum_paramsal import ParameterSaliency
        >>> from captum_paramsal.analysis import dataset_profiles
        >>> ps = ParameterSaliency(model)
        >>> ps.stats = ps.fit_stats(val_loader)          # the reference set, as in the paper
        >>> result = dataset_profiles(ps, val_loader)
        >>> result.mean_z_misclassified.shape           # (ps.layout.num_columns,)
        >>> print(result.to_markdown())
        >>> result.plot().savefig("mean_profiles.png")
    """
    stats = ps.stats  # one snapshot, so a concurrent reassignment cannot mix two references
    if standardize and stats is None:
        raise ValueError(
            "dataset_profiles(standardize=True) needs reference statistics, but ps.stats is None: "
            "set ps.stats = ps.fit_stats(reference_data) first, or pass standardize=False for raw profiles only"
        )
    columns = ps.layout.num_columns
    sums = {True: torch.zeros(columns, dtype=torch.float64), False: torch.zeros(columns, dtype=torch.float64)}
    counts = {True: 0, False: 0}
    batches = labelled_batches(
        data, device=device_of(ps), max_samples=max_samples, progress=progress, desc="dataset profiles"
    )
    for inputs, labels in batches:
        predictions = predict(ps.model, inputs, require=True)
        correct = (predictions == labels).cpu()
        (raw,) = ps.attribute(inputs, target=labels, internal_batch_size=internal_batch_size, standardize=False)
        raw = raw.detach().to(device="cpu", dtype=torch.float64)
        for group in (True, False):
            rows = raw[correct == group]
            sums[group] += rows.sum(0)
            counts[group] += rows.shape[0]
    if counts[True] + counts[False] == 0:
        raise ValueError("dataset_profiles saw no samples: data is empty")
    means = {group: sums[group] / counts[group] if counts[group] else None for group in (True, False)}
    z = {group: None for group in (True, False)}
    if standardize:
        z = {group: None if mean is None else stats.standardize(mean) for group, mean in means.items()}
    return DatasetProfiles(
        layout=ps.layout,
        num_correct=counts[True],
        num_misclassified=counts[False],
        mean_raw_correct=means[True],
        mean_raw_misclassified=means[False],
        mean_z_correct=z[True],
        mean_z_misclassified=z[False],
        value_label=ps.value_label,
    )


# -- shared with the saliency index ------------------------------------------------------------


def predict(model: nn.Module, inputs: Tuple[Tensor, ...], require: bool) -> Optional[Tensor]:
    """Argmax of ``model(*inputs)`` in eval mode without gradients; None (or, with ``require``,
    an error) when the output is not ``(batch, classes)`` logits.

    Each submodule's training flag is restored afterwards.

    Examples::

        >>> predict(model, (images,), require=True)       # (B,) predicted classes
    """
    with torch.no_grad(), evaluation_mode(model):
        output = model(*inputs)
    batch = inputs[0].shape[0]
    if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[0] != batch:
        if require:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"predictions need a model output of shape (batch, classes) = ({batch}, C), got {shape}"
            )
        return None
    return output.argmax(-1)


def device_of(ps: ParameterSaliency) -> torch.device:
    """Where ``ps``'s inputs must be: the device of its selected parameters (the saliency's own
    device check compares inputs with it).

    Examples::

        >>> device_of(ParameterSaliency(model.cuda()))
        device(type='cuda', index=0)
    """
    params = dict(ps.model.named_parameters(remove_duplicate=False))
    # a layout entry may be a head or neuron group, named by its module: ask a parameter of it
    return params[ps.layout.parameter_names[0]].device
