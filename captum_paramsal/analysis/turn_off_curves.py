"""The paper's pruning test (docs/METHOD.md, "The paper's validation experiments"): does turning
off a misclassified sample's most salient units correct it, far more often than random or least
salient units?"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._utils import evaluation_mode, split_forward_args
from ..interventions import turn_off
from ..per_sample.engine import model_output_tensor

if TYPE_CHECKING:
    from .._core.parameter_saliency import ParameterSaliency

MODES = ("salient", "random", "least")


@dataclass
class PruningResult:
    """Per (k, mode): the fraction of misclassified samples corrected and the mean changes of the
    true class's and the wrongly predicted class's probability.

    Built by :func:`pruning_curves`.

    Attributes:
        records (list): one dict per (sample, k, mode): ``"sample"``, ``"k"``, ``"mode"``,
            ``"corrected"``, ``"delta_true_prob"``, ``"delta_wrong_prob"``.
        ks, modes: the numbers of units and the modes, as run.
        num_misclassified, num_samples (int): misclassified samples; all samples.
        table (list): the aggregated rows, one dict per (k, mode): ``"samples"``,
            ``"fraction_corrected"``, ``"mean_delta_true_prob"``, ``"mean_delta_wrong_prob"``.

    Examples::

        >>> result = pruning_curves(model, ps, images, labels, ks=(1, 10, 50))
        >>> result.row(10, "salient")["fraction_corrected"]
        0.62
        >>> print(result.to_markdown())
        >>> result.plot().savefig("pruning.png")
    """

    records: List[Dict[str, Any]]
    ks: Sequence[int]
    modes: Sequence[str]
    num_misclassified: int
    num_samples: int
    table: List[Dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.table = []
        for k in self.ks:
            for mode in self.modes:
                rows = [r for r in self.records if r["k"] == k and r["mode"] == mode]
                n = len(rows)
                self.table.append({
                    "k": k,
                    "mode": mode,
                    "samples": n,
                    "fraction_corrected": sum(r["corrected"] for r in rows) / n,
                    "mean_delta_true_prob": sum(r["delta_true_prob"] for r in rows) / n,
                    "mean_delta_wrong_prob": sum(r["delta_wrong_prob"] for r in rows) / n,
                })

    def row(self, k: int, mode: str) -> Dict[str, Any]:
        """The :attr:`table` row of ``k`` units turned off in ``mode``; a KeyError if not run.

        Examples::

            >>> result.row(10, "salient")["fraction_corrected"]
            0.62
        """
        for r in self.table:
            if r["k"] == k and r["mode"] == mode:
                return r
        raise KeyError(f"no row for k={k}, mode={mode!r}")

    #: column titles of :meth:`formatted_rows`
    COLUMNS = ("k", "units turned off", "corrected", "mean Δ p(true class)", "mean Δ p(predicted wrong class)")

    def formatted_rows(self) -> List[Tuple[str, ...]]:
        """:attr:`table` as display strings, one tuple per row, in :attr:`COLUMNS` order.

        Examples::

            >>> result.formatted_rows()[0]
            ('1', 'salient', '41.0%', '+0.212', '-0.305')
        """
        return [
            (str(r["k"]), r["mode"], f"{r['fraction_corrected']:.1%}",
             f"{r['mean_delta_true_prob']:+.3f}", f"{r['mean_delta_wrong_prob']:+.3f}")
            for r in self.table
        ]

    def to_markdown(self) -> str:
        """:attr:`table` as a markdown table with the :attr:`COLUMNS` titles.

        Examples::

            >>> print(result.to_markdown())
        """
        lines = ["| " + " | ".join(self.COLUMNS) + " |", "|---:|---|---:|---:|---:|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.formatted_rows()]
        return "\n".join(lines)

    def plot(self, ax: Optional[Any] = None) -> Any:
        """Fraction corrected and mean probability changes against k, one line per mode.

        Args:
            ax: three matplotlib axes to draw into; default: a new ``Figure`` (built without pyplot).

        Returns:
            the matplotlib ``Figure``.

        Examples::

            >>> result.plot().savefig("pruning_curves.png")
        """
        if ax is None:
            from matplotlib.figure import Figure  # no pyplot: a notebook's backend and state stay as they are

            fig = Figure(figsize=(13, 3.6), layout="constrained")
            axes = fig.subplots(1, 3)
        else:
            axes, fig = ax, ax[0].figure
        metrics = [
            ("fraction_corrected", "fraction of misclassified samples corrected"),
            ("mean_delta_true_prob", "mean change of p(true class)"),
            ("mean_delta_wrong_prob", "mean change of p(wrong class)"),
        ]
        for axis, (key, label) in zip(axes, metrics):
            for mode in self.modes:
                axis.plot(self.ks, [self.row(k, mode)[key] for k in self.ks], marker="o", label=f"{mode} units")
            axis.set_xlabel("units turned off (k)")
            axis.set_ylabel(label)
            axis.set_xscale("log")
            axis.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"Turning off units of {self.num_misclassified} misclassified samples")
        fig.tight_layout()
        return fig


def _probabilities(model: nn.Module, x: Tensor, output_fn: Callable[[Any], Tensor] = model_output_tensor,
                   args: Tuple[Any, ...] = (), kwargs: Optional[Dict[str, Any]] = None) -> Tensor:
    with torch.no_grad():
        return torch.softmax(output_fn(model(x, *args, **(kwargs or {}))), dim=-1)


def _rows(values: Any, index: Tensor, batch: int) -> Any:
    """``values[index]`` for a per-sample tensor (first dim ``batch``), anything else as it is."""
    return values[index] if isinstance(values, Tensor) and values.dim() > 0 and values.shape[0] == batch else values


def _check_ks(ks: Sequence[int], num_units: int) -> List[int]:
    ks = list(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")
    if max(ks) > num_units:
        raise ValueError(f"k={max(ks)} is larger than the number of units ({num_units})")
    return sorted(set(ks))


def pruning_curves(
    model: nn.Module,
    ps: ParameterSaliency,
    inputs: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (1, 5, 10, 25, 50),
    modes: Sequence[str] = MODES,
    seed: int = 0,
    internal_batch_size: Optional[int] = None,
    additional_forward_args: Any = None,
) -> PruningResult:
    """Turn off the k most salient, k random and k least salient units of each misclassified
    sample among ``inputs`` (docs/METHOD.md, "The paper's validation experiments") and record what changes.

    Saliency (standardized when ``ps`` has statistics; the loss at the true label, as the
    paper) is computed once for all misclassified samples; each intervention is undone
    exactly before the next, so the model is never reloaded.

    Args:
        model: the model ``ps`` explains.
        ps: a :class:`~captum_paramsal.ParameterSaliency` of ``model``.
        inputs, labels: a batch and its true labels.
        ks: numbers of units to turn off.
        modes: any of ``"salient"``, ``"random"``, ``"least"``.
        seed: seeds the random units (one draw per sample and k).
        internal_batch_size: as in :meth:`ParameterSaliency.attribute`, bounds memory.
        additional_forward_args: as in :meth:`ParameterSaliency.attribute` (a dict is passed by
            keyword, e.g. ``{"attention_mask": mask}``); per-sample tensors are cut to each
            sample. The class probabilities are the softmax of ``ps.output_fn(model output)``
            (a Hugging Face model's logits), which must be ``(B, classes)``. Units are those of
            ``ps.layout``: heads or neurons under ``units="heads"`` / ``"neurons"``.

    Returns:
        :class:`PruningResult`.

    Raises:
        ValueError: ``ps`` of another model, unknown modes, ks that are not positive ints or
            exceed the number of units, labels that do not match, or no misclassified sample.
        TypeError: labels that are not integers.

    Examples::

        >>> from captum_paramsal import ParameterSaliency
        >>> from captum_paramsal.analysis import pruning_curves
        >>> ps = ParameterSaliency(model)
        >>> ps.stats = ps.fit_stats(val_loader)
        >>> result = pruning_curves(model, ps, images, labels, ks=(1, 5, 25))
        >>> print(result.to_markdown())
    """
    if ps.model is not model:
        raise ValueError("ps must be a ParameterSaliency of this model")
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes must be among {MODES}, got {list(modes)!r}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != inputs.shape[0]:
        raise ValueError(f"labels must be a 1-d tensor with one label per input ({inputs.shape[0]})")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class labels (any integer dtype), got dtype {labels.dtype}")
    layout = ps.layout
    ks = _check_ks(ks, layout.num_columns)
    with evaluation_mode(model):
        batch = inputs.shape[0]
        extra, keyword = split_forward_args(additional_forward_args)
        before = _probabilities(model, inputs, ps.output_fn, extra, keyword)
        predicted = before.argmax(-1)
        wrong = (predicted != labels.to(predicted.device)).nonzero().flatten()
        if len(wrong) == 0:
            raise ValueError("no misclassified samples among inputs: nothing to correct")
        x, y = inputs[wrong], labels[wrong].to(predicted.device)
        extra = tuple(_rows(a, wrong, batch) for a in extra)
        keyword = {k: _rows(v, wrong, batch) for k, v in keyword.items()}
        passed = keyword if keyword else (extra or None)
        z = ps.attribute(x, target=y, additional_forward_args=passed, internal_batch_size=internal_batch_size).detach()
        generator = torch.Generator().manual_seed(seed)
        records: List[Dict[str, Any]] = []
        for i in range(len(wrong)):
            order = z[i].argsort(descending=True)
            true, bad = int(y[i]), int(predicted[wrong[i]])
            p0 = before[wrong[i]]
            for k in ks:
                chosen = {
                    "salient": order[:k],
                    "least": order[-k:],
                    "random": torch.randperm(layout.num_columns, generator=generator)[:k],
                }
                for mode in modes:
                    with turn_off(model, chosen[mode].tolist(), layout=layout):
                        one = torch.arange(i, i + 1)
                        p = _probabilities(
                            model, x[i : i + 1], ps.output_fn, tuple(_rows(a, one, len(wrong)) for a in extra),
                            {k: _rows(v, one, len(wrong)) for k, v in keyword.items()},
                        )[0]
                    records.append({
                        "sample": int(wrong[i]),
                        "k": k,
                        "mode": mode,
                        "corrected": bool(p.argmax() == true),
                        "delta_true_prob": float(p[true] - p0[true]),
                        "delta_wrong_prob": float(p[bad] - p0[bad]),
                    })
    return PruningResult(records, ks, list(modes), len(wrong), inputs.shape[0])
