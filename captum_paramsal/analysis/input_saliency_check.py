"""The paper's sanity check of parameter-guided input saliency (Levin et al., NeurIPS 2022, §3),
made quantitative: are the maps that boost a sample's top-k salient units different from maps
that boost k random units, and do they point at what matters?

For each sample, four maps, all smoothed alike by Captum's ``NoiseTunnel`` (smoothgrad, the
same noise draws for every map):

* **top-k**: :class:`~captum_paramsal.ParameterGuidedInputSaliency` boosting the sample's k
  units of largest z (loss at the true label, on the clean input; the units are then held fixed
  for every noisy copy, so that the map and the deletion test below are about the same units);
* **random-unit**: the same, boosting k random units (drawn among the other units), in several
  draws (the paper's baseline);
* **Saliency**: Captum's :class:`~captum.attr.Saliency`, the gradient of the true label's logit
  (the class whose loss picks the units), signed under the noise, like the others;
* **random pixels** (deletion test only): a random pixel order.

Each map is reduced to one score per pixel, ``sum over channels of |smoothed map|``, and
compared by Spearman rank correlation, magnitude, share on the object and a deletion test
(:func:`input_saliency_check`). Every rate is a mean over samples with a bootstrap interval
(:mod:`captum_paramsal.analysis.intervals`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from captum.attr import GradientAttribution, NoiseTunnel, Saliency
from captum.log import log_usage
from torch import Tensor

from .._utils import evaluation_mode
from .intervals import Estimate, bootstrap_mean, paired_difference

if TYPE_CHECKING:
    from .._core.parameter_guided_input_saliency import ParameterGuidedInputSaliency

__all__ = ["InputSaliencyCheck", "input_saliency_check", "spearman_rows", "average_ranks"]

#: the maps compared, by name
MAPS = ("top-k", "random-unit", "Saliency")
#: the pixel orders of the deletion test
ORDERS = ("top-k", "random-unit", "Saliency", "random pixels")
#: what the deletion test tracks, by name: the mean z of the sample's original top-k units
#: (relative to its value on the clean input), the probability of the originally predicted
#: class, and whether the prediction changed
CURVES = ("z", "p", "changed")
CURVE_TITLES = {
    "z": "mean z of the top-k units / its clean value",
    "p": "p(originally predicted class)",
    "changed": "share of samples whose prediction changed",
}


# -- rank correlation --------------------------------------------------------------------------


def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks along the last dimension, ties given their average rank (as
    ``scipy.stats.rankdata``), in float64.

    Examples::

        >>> average_ranks(torch.tensor([[0.5, 0.1, 0.5]]))
        tensor([[2.5000, 1.0000, 2.5000]], dtype=torch.float64)
    """
    v = values.detach().to(torch.float64).contiguous()
    ordered = v.sort(dim=-1).values
    below = torch.searchsorted(ordered, v, right=False)  # how many are smaller
    up_to = torch.searchsorted(ordered, v, right=True)  # how many are smaller or equal
    return (below + up_to + 1).to(torch.float64) / 2


def spearman_rows(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rank correlation of each row of ``a`` with the same row of ``b`` (``(N, P)``):
    the Pearson correlation of their average ranks. NaN for a row that is constant in either.

    Examples::

        >>> spearman_rows(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 5.0, 4.0]]))
        tensor([0.5000], dtype=torch.float64)
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b must both be (N, P), got {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    denominator = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    return torch.where(denominator > 0, (ra * rb).sum(1) / denominator.clamp(min=1e-300), torch.nan)


# -- the result --------------------------------------------------------------------------------


@dataclass
class InputSaliencyCheck:
    """What :func:`input_saliency_check` measured, per sample, and its summary.

    Pixel scores are ``sum over channels of |smoothed map|``, flattened: ``(N, P)`` with ``P``
    the number of pixels (spatial positions).

    Attributes:
        per_sample (dict): name -> ``(N,)`` float64 values (NaN where undefined: a constant
            map has no rank correlation, a curve starting at 0 cannot be normalized):

            * ``spearman_topk_random``: Spearman of the top-k map with each random-unit map,
              averaged over the draws; ``spearman_random_random``: of the random-unit maps with
              each other (every pair of draws, averaged), the reference of how alike two maps
              of unrelated units are; ``spearman_topk_saliency``: top-k against Saliency.
            * ``magnitude_ratio``: L2 norm of the top-k map over the mean L2 norm of the
              random-unit maps (signed smoothed maps, all channels).
            * ``z_topk``, ``z_random``: mean z of the boosted units on the clean input (random:
              averaged over the draws).
            * with object masks: ``share_topk``, ``share_random`` (averaged over the draws),
              ``share_saliency``: the fraction of the pixel scores on the mask; ``area``: the
              mask's fraction of the pixels, what a map spread uniformly would give.
            * ``auc_<curve>/<order>`` for each curve in :data:`CURVES` and order in
              :data:`ORDERS`: the deletion curve's area over the deleted fraction (0 to 1,
              trapezoids); for ``z`` the curve is first divided by its value on the clean input
              (NaN where that is not positive: a sample none of whose units stands out, such as a
              confidently right one, whose top units are those of zero reference spread at z = 0).

        curves (dict): curve -> order -> ``(N, steps + 1)`` float64, the deletion curves.
        fractions: ``(steps + 1,)`` fraction of pixels deleted at each step.
        scores (dict): map name -> pixel scores ``(N, P)``; ``"random-unit"`` is ``(N, draws, P)``.
        inputs, labels, predicted: the samples (inputs detached), true labels and the model's
            prediction on them.
        object_masks: ``(N, P)`` boolean, or None.
        top_units: ``(N, k)`` layout columns of each sample's top-k units; random_units:
            ``(N, draws, k)``.
        settings (dict): the arguments the check ran with.
        resamples, seed: of the bootstrap intervals.
    """

    per_sample: Dict[str, Tensor]
    curves: Dict[str, Dict[str, Tensor]]
    fractions: Tensor
    scores: Dict[str, Tensor]
    inputs: Tensor
    labels: Tensor
    predicted: Tensor
    object_masks: Optional[Tensor]
    top_units: Tensor
    random_units: Tensor
    settings: Dict[str, Any]
    resamples: int = 2000
    seed: int = 0
    _summary: Optional[Dict[str, Estimate]] = field(default=None, init=False, repr=False)

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    # -- summary ---------------------------------------------------------------------------------

    def _mean(self, values: Tensor) -> Estimate:
        finite = torch.isfinite(values)
        return bootstrap_mean(values[finite], resamples=self.resamples, seed=self.seed)

    def _paired(self, a: Tensor, b: Tensor) -> Estimate:
        finite = torch.isfinite(a) & torch.isfinite(b)
        return paired_difference(a[finite], b[finite], resamples=self.resamples, seed=self.seed)

    def _geometric(self, ratios: Tensor) -> Estimate:
        finite = torch.isfinite(ratios) & (ratios > 0)
        e = bootstrap_mean(ratios[finite].log(), resamples=self.resamples, seed=self.seed)
        if e.n == 0:
            return e
        return Estimate(math.exp(e.value), math.exp(e.low), math.exp(e.high), e.n, e.level)

    @property
    def summary(self) -> Dict[str, Estimate]:
        """Every measure's mean over samples with its bootstrap interval, and the paired
        differences of top-k against each control (same samples), by name.

        Keys: ``spearman: ...`` (three pairs and ``(top-k vs random-unit) - (random vs random)``),
        ``magnitude ratio top-k / random-unit`` (the geometric mean over samples, its interval
        the exponentiated interval of the mean log ratio; 1 = alike), ``z of the boosted units: ...``
        (their mean z on the clean input, what boosting starts from), ``object share: ...``
        (each map, ``chance (mask area)`` and the differences ``top-k - X``), and
        ``deletion <curve>: <order>`` with ``deletion <curve>: top-k - <order>``.

        Examples::

            >>> check.summary["spearman: top-k vs random-unit"].format(digits=3)
            '0.412 [0.371, 0.455]'
        """
        if self._summary is not None:
            return self._summary
        s = self.per_sample
        out: Dict[str, Estimate] = {
            "spearman: top-k vs random-unit": self._mean(s["spearman_topk_random"]),
            "spearman: random-unit vs random-unit": self._mean(s["spearman_random_random"]),
            "spearman: top-k vs Saliency": self._mean(s["spearman_topk_saliency"]),
            "spearman: (top-k vs random-unit) - (random vs random)": self._paired(
                s["spearman_topk_random"], s["spearman_random_random"]
            ),
            "magnitude ratio top-k / random-unit": self._geometric(s["magnitude_ratio"]),
            "z of the boosted units: top-k": self._mean(s["z_topk"]),
            "z of the boosted units: random-unit": self._mean(s["z_random"]),
        }
        if "area" in s:
            out["object share: top-k"] = self._mean(s["share_topk"])
            out["object share: random-unit"] = self._mean(s["share_random"])
            out["object share: Saliency"] = self._mean(s["share_saliency"])
            out["object share: chance (mask area)"] = self._mean(s["area"])
            out["object share: top-k - chance"] = self._paired(s["share_topk"], s["area"])
            out["object share: top-k - random-unit"] = self._paired(s["share_topk"], s["share_random"])
            out["object share: top-k - Saliency"] = self._paired(s["share_topk"], s["share_saliency"])
        for curve in CURVES:
            for order in ORDERS:
                out[f"deletion {curve}: {order}"] = self._mean(s[f"auc_{curve}/{order}"])
            for order in ORDERS[1:]:
                out[f"deletion {curve}: top-k - {order}"] = self._paired(
                    s[f"auc_{curve}/top-k"], s[f"auc_{curve}/{order}"]
                )
        self._summary = out
        return out

    # -- display ---------------------------------------------------------------------------------

    @staticmethod
    def _format(name: str, e: Estimate) -> str:
        if name.startswith("object share") or name.startswith("deletion changed"):
            return e.format(percent=True, digits=1, signed=" - " in name)
        return e.format(digits=3, signed=" - " in name)

    def to_markdown(self) -> str:
        """:attr:`summary` as a Markdown table: measure, mean [95% interval], samples.

        Examples::

            >>> print(check.to_markdown())
        """
        lines = ["| measure | mean [95% interval] | samples |", "|---|---:|---:|"]
        for name, e in self.summary.items():
            lines.append(f"| {name} | {self._format(name, e)} | {e.n} |")
        return "\n".join(lines)

    def plot(self, examples: Union[int, Sequence[int]] = 3, title: Optional[str] = None) -> Any:
        """The deletion curves (mean over samples with a 95% bootstrap band at each step, one
        line per pixel order) and a few samples' maps side by side (input, top-k, one
        random-unit draw on the top-k map's colour scale, Saliency; the object mask's outline
        where known).

        Args:
            examples: how many samples (the first ones), or their indices.
            title: the figure's title.

        Returns:
            a matplotlib ``Figure`` (built without pyplot).

        Examples::

            >>> check.plot(examples=[0, 5]).savefig("pgis_check.png")
        """
        from matplotlib.figure import Figure  # no pyplot: a notebook's backend and state stay as they are

        indices = list(range(min(examples, self.num_samples))) if isinstance(examples, int) else list(examples)
        for i in indices:
            if not 0 <= i < self.num_samples:
                raise IndexError(f"example {i} is not a sample index (0..{self.num_samples - 1})")
        rows = len(indices)
        fig = Figure(figsize=(13, 3.4 + 2.2 * rows), layout="constrained")
        top, bottom = fig.subfigures(2, 1, height_ratios=[3.4, max(2.2 * rows, 0.01)]) if rows else (fig, None)
        axes = top.subplots(1, len(CURVES))
        x = self.fractions.numpy()
        for axis, curve in zip(axes, CURVES):
            for order in ORDERS:
                values = self.curves[curve][order]
                if curve == "z":
                    values = torch.where(values[:, :1] > 0, values / values[:, :1].abs().clamp(min=1e-300), torch.nan)
                finite = torch.isfinite(values).all(1)
                values = values[finite]
                if values.shape[0] == 0:
                    continue
                band = [bootstrap_mean(values[:, j], resamples=500, seed=self.seed) for j in range(values.shape[1])]
                mean = values.mean(0).numpy()
                axis.plot(x, mean, label=order)
                axis.fill_between(x, [b.low for b in band], [b.high for b in band], alpha=0.2)
            axis.set_xlabel("fraction of pixels deleted")
            axis.set_ylabel(CURVE_TITLES[curve])
            axis.grid(alpha=0.3)
        axes[0].legend()
        top.suptitle(title or f"Deletion test, {self.num_samples} samples (mean, 95% bootstrap band)")
        if rows:
            spatial = tuple(self.inputs.shape[2:])
            grid = bottom.subplots(rows, 4, squeeze=False)
            for r, i in enumerate(indices):
                image = self.inputs[i].detach().to(torch.float32).cpu()
                panels = [("input", None), ("top-k", self.scores["top-k"][i]),
                          ("random-unit (top-k's scale)", self.scores["random-unit"][i, 0]),
                          ("Saliency", self.scores["Saliency"][i])]
                # one colour scale for the two boosting maps, so that their magnitudes compare
                shared = float(torch.maximum(panels[1][1].max(), panels[2][1].max()))
                for c, (name, score) in enumerate(panels):
                    axis = grid[r, c]
                    if score is None:
                        shown = image.permute(1, 2, 0) if image.shape[0] == 3 else image.mean(0)
                        lo, hi = float(shown.min()), float(shown.max())
                        shown = (shown - lo) / max(hi - lo, 1e-12)
                        axis.imshow(shown.numpy(), cmap=None if shown.dim() == 3 else "gray")
                        axis.set_title(f"sample {i}: label {int(self.labels[i])}, predicted {int(self.predicted[i])}",
                                       fontsize=8)
                    else:
                        vmax = shared if c in (1, 2) else None
                        axis.imshow(score.reshape(spatial).numpy(), cmap="hot", vmin=0, vmax=vmax)
                        axis.set_title(name, fontsize=8)
                    if self.object_masks is not None:
                        axis.contour(self.object_masks[i].reshape(spatial).float().numpy(), levels=[0.5],
                                     colors="cyan", linewidths=0.6)
                    axis.set_xticks([])
                    axis.set_yticks([])
        return fig


# -- fixed units under NoiseTunnel -------------------------------------------------------------


class _FixedUnits(GradientAttribution):
    """Filter boosting of given units per sample, for ``NoiseTunnel``: it repeats each sample
    ``nt`` times (``repeat_interleave``), so the units are repeated alike."""

    def __init__(self, pgis: ParameterGuidedInputSaliency, units: Tensor, internal_batch_size: Optional[int]) -> None:
        super().__init__(pgis.forward_func)
        self.pgis, self.units, self.internal_batch_size = pgis, units, internal_batch_size

    @log_usage()
    def attribute(self, inputs: Tensor, target: Any = None) -> Tensor:  # type: ignore[override]
        copies, rest = divmod(inputs.shape[0], self.units.shape[0])
        if rest:
            raise RuntimeError(f"{inputs.shape[0]} inputs are not copies of {self.units.shape[0]} samples")
        units = self.units.repeat_interleave(copies, dim=0)
        return self.pgis.attribute(inputs, target=target, units=units, internal_batch_size=self.internal_batch_size)


class _Output(torch.nn.Module):
    """``output_fn(model(x))``: what the loss (and so Saliency's target) is computed on."""

    def __init__(self, model: torch.nn.Module, output_fn: Any) -> None:
        super().__init__()
        self.model, self.output_fn = model, output_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.output_fn(self.model(x))


def _seeded_noise(seed: int, device: torch.device):
    """A context in which the global generator(s) ``NoiseTunnel`` draws from start at ``seed``
    and are put back as they were afterwards (the caller's random state is left alone)."""
    import contextlib

    @contextlib.contextmanager
    def context():
        devices = []
        if device.type == "cuda":
            devices = [device.index if device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(seed)
            if devices:
                with torch.cuda.device(devices[0]):
                    torch.cuda.manual_seed(seed)
            yield

    return context()


# -- checks ------------------------------------------------------------------------------------


def _positive_int(value: Any, name: str, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return value


def _check_masks(masks: Any, batch: int, spatial: Tuple[int, ...]) -> Tensor:
    if not isinstance(masks, Tensor):
        raise TypeError(f"object_masks must be a Tensor, got {type(masks).__name__}")
    shape = tuple(masks.shape)
    if shape == (batch, 1) + spatial:
        masks = masks[:, 0]
    elif shape != (batch,) + spatial:
        raise ValueError(
            f"object_masks must be (N, *spatial) = {(batch,) + spatial} (or with a channel of 1), one mask per "
            f"input, got {shape}"
        )
    if masks.dtype != torch.bool:
        if masks.is_complex() or not bool(((masks == 0) | (masks == 1)).all()):
            raise ValueError("object_masks must be boolean (or hold only 0 and 1)")
        masks = masks != 0
    masks = masks.reshape(batch, -1)
    empty = (~masks.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"object_masks of samples {empty[:10]} are empty: the share on the object is undefined")
    return masks


def _check_baseline(baseline: Any, sample_shape: Tuple[int, ...], like: Tensor) -> Tensor:
    if isinstance(baseline, bool):
        raise TypeError("baseline must be a number or a Tensor, got a bool")
    if isinstance(baseline, (int, float)):
        return torch.full(sample_shape, float(baseline), dtype=like.dtype, device=like.device)
    if not isinstance(baseline, Tensor):
        raise TypeError(f"baseline must be a number or a Tensor, got {type(baseline).__name__}")
    try:
        return torch.broadcast_to(baseline.to(like), sample_shape).clone()
    except RuntimeError as error:
        raise ValueError(
            f"baseline {tuple(baseline.shape)} does not broadcast to one input's shape {sample_shape}"
        ) from error


def _trapezoid(curves: Tensor, fractions: Tensor) -> Tensor:
    """Area under each row of ``curves`` (last dimension) over ``fractions``."""
    widths = fractions[1:] - fractions[:-1]
    return ((curves[..., 1:] + curves[..., :-1]) / 2 * widths).sum(-1)


# -- the check ---------------------------------------------------------------------------------


def input_saliency_check(
    pgis: ParameterGuidedInputSaliency,
    inputs: Tensor,
    labels: Tensor,
    *,
    k: Optional[int] = None,
    random_draws: int = 3,
    object_masks: Optional[Tensor] = None,
    nt_samples: int = 10,
    stdevs: float = 0.1,
    nt_samples_batch_size: Optional[int] = None,
    deletion_steps: int = 20,
    baseline: Union[float, Tensor] = 0.0,
    seed: int = 0,
    resamples: int = 2000,
    internal_batch_size: Optional[int] = None,
) -> InputSaliencyCheck:
    r"""The paper's sanity check of filter boosting, made quantitative: maps from each sample's
    top-k units against maps from k random units, Captum's Saliency and a random pixel order.

    Per sample (true label ``y``; every parameter saliency here is the loss at ``y``, as the units
    are chosen by it):

    1. **Units**: its profile ``z`` on the clean input (standardized when ``pgis`` has
       statistics, raw otherwise); the top-k units by ``z``; ``random_draws`` sets of k random
       units among the others (seeded).
    2. **Maps**: filter boosting of the top-k units and of each random set, with the units held
       fixed for every noisy copy, and Captum's ``Saliency`` (``abs=False``) of the logit of
       ``y``; each smoothed by ``NoiseTunnel`` (``smoothgrad``, ``nt_samples`` copies with
       Gaussian noise of standard deviation ``stdevs``, in the inputs' units), the same noise
       draws for every map. Pixel score: ``sum over channels of |smoothed map|``.
    3. **Rank correlation**: Spearman (average ranks for ties) of the pixel scores: top-k vs
       each random draw, random vs random (every pair of draws: how alike maps of unrelated
       units are), top-k vs Saliency.
    4. **Magnitude**: L2 norm of the top-k map / mean L2 norm of the random-unit maps.
    5. **Object share** (with ``object_masks``): sum of the pixel scores on the mask / their
       sum, against the mask's area (a uniform map's share).
    6. **Deletion test**: pixels are set to ``baseline`` (every channel) in the order of each
       map's scores, highest first (ties by pixel index; the random-unit order from draw 0),
       and in a random order, in ``deletion_steps`` equal steps from none to all; at each step
       the mean z of the sample's original top-k units (the profile recomputed at ``y`` on the
       modified input) and the probability of the class predicted on the clean input, and
       whether the prediction changed. All steps of all orders of a sample run in one batch.
       Each curve is summarized by its area over the deleted fraction in [0, 1] (the z curve
       divided by its clean value first: 1 = the units unmoved); a lower area means the
       order finds what drives the units (or the prediction) sooner.

    Args:
        pgis: a :class:`~captum_paramsal.ParameterGuidedInputSaliency` of the inputs (no
            ``layer``), with its statistics for z (without, raw saliency is used).
        inputs: ``(N, C, *spatial)`` floating-point samples (one tensor).
        labels: ``(N,)`` true labels (integers).
        k: units to boost (default ``pgis.k``).
        random_draws: random unit sets per sample (at least 2: random vs random needs a pair).
        object_masks: ``(N, *spatial)`` (or ``(N, 1, *spatial)``) boolean masks of the object,
            none empty; None leaves out the object share.
        nt_samples, stdevs, nt_samples_batch_size: of ``NoiseTunnel`` (``stdevs=0`` with
            ``nt_samples=1``: unsmoothed maps).
        deletion_steps: steps of the deletion test.
        baseline: the value of a deleted pixel: a number, or a tensor broadcastable to one
            input's shape ``(C, *spatial)`` (a mean image).
        seed: seeds the random units, the noise, the random pixel order and the bootstrap
            (private or restored generators: the global random state is left as it was).
        resamples: bootstrap resamples of the summary's intervals.
        internal_batch_size: at most this many images per pass of the saliency methods (the
            noisy copies count); also sets how many samples' deletion steps share a batch.

    Returns:
        :class:`InputSaliencyCheck`.

    Raises:
        TypeError: ``pgis`` not a ParameterGuidedInputSaliency, inputs or labels of the wrong
            type, a bad ``baseline``.
        ValueError: ``pgis`` with ``layer``, shapes that do not match, ``k`` out of range (or
            too large to draw k other units), bad counts, bad or empty object masks.

    Examples::

        >>> from captum_paramsal import ParameterGuidedInputSaliency, ParameterSaliency
        >>> from captum_paramsal.analysis.input_saliency_check import input_saliency_check
        >>> ps = ParameterSaliency(model)
        >>> ps.stats = ps.fit_stats(val_loader)
        >>> pgis = ParameterGuidedInputSaliency.from_parameter_saliency(ps, k=10)
        >>> check = input_saliency_check(pgis, images, labels, object_masks=masks, nt_samples=10, stdevs=0.1)
        >>> check.summary["spearman: (top-k vs random-unit) - (random vs random)"].excludes(0)
        True
        >>> print(check.to_markdown())
        >>> check.plot(examples=3).savefig("pgis_check.png")
    """
    from .._core.parameter_guided_input_saliency import ParameterGuidedInputSaliency

    if not isinstance(pgis, ParameterGuidedInputSaliency):
        raise TypeError(f"pgis must be a ParameterGuidedInputSaliency, got {type(pgis).__name__}")
    if pgis.layer is not None:
        raise ValueError("pgis attributes a layer's output; the check needs maps on the inputs (layer=None)")
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.dim() < 3:
        raise TypeError("inputs must be one floating-point Tensor (N, C, *spatial)")
    batch = inputs.shape[0]
    if batch < 1:
        raise ValueError("inputs is empty")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"labels must be a 1-d tensor with one label per input ({batch})")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class labels, got dtype {labels.dtype}")
    ps = pgis.parameter_saliency
    columns = ps.layout.num_columns
    k = pgis.k if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= columns // 2:
        raise ValueError(
            f"k must be an int between 1 and half the number of units ({columns // 2}: the random units are "
            f"drawn among the others), got {k!r}"
        )
    random_draws = _positive_int(random_draws, "random_draws", least=2)
    nt_samples = _positive_int(nt_samples, "nt_samples")
    deletion_steps = _positive_int(deletion_steps, "deletion_steps")
    resamples = _positive_int(resamples, "resamples")
    if isinstance(stdevs, bool) or not isinstance(stdevs, (int, float)) or not stdevs >= 0:
        raise ValueError(f"stdevs must be a number >= 0, got {stdevs!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if internal_batch_size is not None:
        internal_batch_size = _positive_int(internal_batch_size, "internal_batch_size")
    spatial = tuple(inputs.shape[2:])
    pixels = math.prod(spatial)
    masks = None if object_masks is None else _check_masks(object_masks, batch, spatial).to(inputs.device)
    base = _check_baseline(baseline, tuple(inputs.shape[1:]), inputs)

    model = pgis.model
    x = inputs.detach()
    y = labels.to(x.device)
    generator = torch.Generator().manual_seed(seed)
    with evaluation_mode(model):
        with torch.no_grad():
            predicted = ps.output_fn(model(x)).argmax(-1)
        # 1. units, on the clean input at the true label
        z_clean = ps.attribute(x, target=y, internal_batch_size=internal_batch_size).detach()
        top = z_clean.topk(k, dim=1).indices
        draw = torch.rand(batch, random_draws, columns, generator=generator).to(x.device)
        draw.scatter_(2, top[:, None, :].expand(-1, random_draws, -1), -1.0)  # the others only
        random_units = draw.topk(k, dim=2).indices

        # 2. maps, the same noise for each
        def smooth(method: Any, **kwargs: Any) -> Tensor:
            with _seeded_noise(seed, x.device):
                return NoiseTunnel(method).attribute(
                    x, nt_type="smoothgrad", nt_samples=nt_samples, stdevs=float(stdevs),
                    nt_samples_batch_size=nt_samples_batch_size, target=y, **kwargs,
                ).detach()

        top_map = smooth(_FixedUnits(pgis, top, internal_batch_size))
        random_maps = torch.stack(
            [smooth(_FixedUnits(pgis, random_units[:, r], internal_batch_size)) for r in range(random_draws)], 1
        )
        saliency_map = smooth(Saliency(_Output(model, ps.output_fn)), abs=False)

    def pixel_scores(m: Tensor) -> Tensor:  # (..., C, *spatial) -> (..., P)
        lead = m.shape[: m.dim() - len(spatial) - 1]
        return m.abs().sum(len(lead)).reshape(*lead, pixels).to(torch.float64).cpu()

    scores = {"top-k": pixel_scores(top_map), "random-unit": pixel_scores(random_maps),
              "Saliency": pixel_scores(saliency_map)}
    t, r, s = scores["top-k"], scores["random-unit"], scores["Saliency"]

    # 3.-5. rank correlation, magnitude, object share
    per_sample: Dict[str, Tensor] = {}
    per_sample["spearman_topk_random"] = torch.stack(
        [spearman_rows(t, r[:, d]) for d in range(random_draws)], 1).mean(1)
    pairs = [(a, b) for a in range(random_draws) for b in range(a + 1, random_draws)]
    per_sample["spearman_random_random"] = torch.stack([spearman_rows(r[:, a], r[:, b]) for a, b in pairs], 1).mean(1)
    per_sample["spearman_topk_saliency"] = spearman_rows(t, s)
    top_norm = top_map.reshape(batch, -1).to(torch.float64).norm(dim=1).cpu()
    random_norm = random_maps.reshape(batch, random_draws, -1).to(torch.float64).norm(dim=2).mean(1).cpu()
    per_sample["magnitude_ratio"] = torch.where(random_norm > 0, top_norm / random_norm.clamp(min=1e-300), torch.nan)
    per_sample["z_topk"] = z_clean.gather(1, top).mean(1).to(torch.float64).cpu()
    per_sample["z_random"] = (
        z_clean[:, None, :].expand(-1, random_draws, -1).gather(2, random_units).mean((1, 2)).to(torch.float64).cpu()
    )
    if masks is not None:
        m = masks.cpu()

        def share(score: Tensor) -> Tensor:  # (N, P) or (N, D, P)
            mm = m if score.dim() == 2 else m[:, None]
            total = score.sum(-1)
            return torch.where(total > 0, (score * mm).sum(-1) / total.clamp(min=1e-300), torch.nan)

        per_sample["share_topk"] = share(t)
        per_sample["share_random"] = share(r).mean(1)
        per_sample["share_saliency"] = share(s)
        per_sample["area"] = m.to(torch.float64).mean(1)

    # 6. deletion, all steps of all orders of a sample in one batch
    orders = {"top-k": t, "random-unit": r[:, 0], "Saliency": s,
              "random pixels": torch.rand(batch, pixels, generator=generator, dtype=torch.float64)}
    fractions = torch.linspace(0, 1, deletion_steps + 1, dtype=torch.float64)
    counts = (fractions * pixels).round().long().to(x.device)
    rank_of = torch.empty(batch, len(ORDERS), pixels, dtype=torch.long, device=x.device)
    positions = torch.arange(pixels, device=x.device).expand(batch, -1)
    for o, name in enumerate(ORDERS):  # a pixel's place in the order, 0 = deleted first
        order = orders[name].to(x.device).argsort(dim=1, descending=True, stable=True)
        rank_of[:, o].scatter_(1, order, positions)
    per_group = len(ORDERS) * (deletion_steps + 1)
    group = max(1, (internal_batch_size or 256) // per_group)
    flat_base = base.reshape(base.shape[0], pixels)
    curve_rows: Dict[str, List[Tensor]] = {c: [] for c in CURVES}
    with evaluation_mode(model):
        for start in range(0, batch, group):
            stop = min(start + group, batch)
            n = stop - start
            deleted = rank_of[start:stop, :, None, :] < counts[None, None, :, None]  # (n, O, S+1, P)
            flat = x[start:stop].reshape(n, 1, 1, x.shape[1], pixels)
            modified = torch.where(deleted[:, :, :, None, :], flat_base, flat)  # (n, O, S+1, C, P)
            modified = modified.reshape(n * per_group, *x.shape[1:])
            targets = y[start:stop].repeat_interleave(per_group)
            with torch.no_grad():
                probabilities = torch.softmax(ps.output_fn(model(modified)), dim=-1)
            before = predicted[start:stop].repeat_interleave(per_group)
            p = probabilities.gather(1, before[:, None])[:, 0]
            changed = probabilities.argmax(-1) != before
            z = ps.attribute(modified, target=targets, internal_batch_size=internal_batch_size).detach()
            z_top = z.gather(1, top[start:stop].repeat_interleave(per_group, dim=0)).mean(1)
            shape = (n, len(ORDERS), deletion_steps + 1)
            curve_rows["z"].append(z_top.to(torch.float64).reshape(shape).cpu())
            curve_rows["p"].append(p.to(torch.float64).reshape(shape).cpu())
            curve_rows["changed"].append(changed.to(torch.float64).reshape(shape).cpu())
    curves = {c: {name: torch.cat(curve_rows[c])[:, o] for o, name in enumerate(ORDERS)} for c in CURVES}
    for name in ORDERS:
        z_curve = curves["z"][name]
        start_value = z_curve[:, :1]  # > 0 for a sample whose top units are salient; else the ratio means nothing
        normalized = torch.where(start_value > 0, z_curve / torch.where(start_value > 0, start_value, 1.0), torch.nan)
        per_sample[f"auc_z/{name}"] = _trapezoid(normalized, fractions)
        per_sample[f"auc_p/{name}"] = _trapezoid(curves["p"][name], fractions)
        per_sample[f"auc_changed/{name}"] = _trapezoid(curves["changed"][name], fractions)

    settings = {"k": k, "random_draws": random_draws, "nt_samples": nt_samples, "stdevs": float(stdevs),
                "deletion_steps": deletion_steps,
                "baseline": float(baseline) if isinstance(baseline, (int, float)) else "tensor",
                "seed": seed, "boost_factor": pgis.boost_factor, "standardized": ps.stats is not None}
    return InputSaliencyCheck(
        per_sample=per_sample, curves=curves, fractions=fractions, scores=scores, inputs=x.cpu(), labels=y.cpu(),
        predicted=predicted.cpu(), object_masks=None if masks is None else masks.cpu(), top_units=top.cpu(),
        random_units=random_units.cpu(), settings=settings, resamples=resamples, seed=seed,
    )
