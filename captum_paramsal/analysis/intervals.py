"""Rates with their uncertainty: every rate the analysis toolkit reports (a fix rate, a share
of neighbours corrected, collateral damage) is a mean over samples, reported with a percentile
bootstrap interval over those samples."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["Estimate", "bootstrap_draws_and_samples", "bootstrap_mean", "paired_difference"]


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` samples and its percentile bootstrap interval at ``level``.

    ``n == 0`` gives NaN everywhere (a rate over no samples is undefined, not zero).

    Examples::

        >>> e = bootstrap_mean([1, 0, 1, 1])
        >>> e.value, e.low <= e.value <= e.high, e.n
        (0.75, True, 4)
        >>> e.format(percent=True)
        '75.0% [25.0, 100.0]'
    """

    value: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def excludes(self, value: float = 0.0) -> bool:
        """Whether ``value`` lies outside the interval.

        Examples::

            >>> bootstrap_mean([0.2, 0.3, 0.25]).excludes(0.0)
            True
        """
        return self.n > 0 and not (self.low <= value <= self.high)

    def format(self, percent: bool = False, digits: int = 1, signed: bool = False) -> str:
        """``"value [low, high]"`` as display text (``"—"`` without samples).

        Examples::

            >>> bootstrap_mean([1, 0]).format(percent=True)
            '50.0% [0.0, 100.0]'
        """
        if self.n == 0 or math.isnan(self.value):
            return "—"
        scale, unit = (100.0, "%") if percent else (1.0, "")
        sign = "+" if signed else ""
        value = f"{self.value * scale:{sign}.{digits}f}{unit}"
        return f"{value} [{self.low * scale:{sign}.{digits}f}, {self.high * scale:{sign}.{digits}f}]"

    def as_dict(self) -> dict:
        """The fields as a plain dict (for JSON).

        Examples::

            >>> bootstrap_mean([1.0]).as_dict()["n"]
            1
        """
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n, "level": self.level}


def _as_vector(values: Union[Tensor, Sequence[Any]], what: str) -> Tensor:
    # Python numbers straight to float64: through float32 they would lose digits
    v = values.detach().cpu() if isinstance(values, Tensor) else torch.as_tensor(list(values), dtype=torch.float64)
    v = v.to(torch.float64).reshape(-1)
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{what} must be finite numbers")
    return v


def _estimate(v: Tensor, means: Tensor, n: int, level: float) -> Estimate:
    tail = round((1.0 - level) / 2, 12)  # 0.95 -> exactly 0.025, not 0.025000000000000022
    low, high = float(torch.quantile(means, tail)), float(torch.quantile(means, 1.0 - tail))
    return Estimate(float(v.mean()), low, high, n, level)


def bootstrap_mean(
    values: Union[Tensor, Sequence[Any]],
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    generator: Optional[torch.Generator] = None,
) -> Estimate:
    """The mean of ``values`` (per-sample numbers; booleans count as 0/1) and its percentile
    bootstrap interval: ``resamples`` draws of ``len(values)`` samples with replacement.

    Deterministic for a given ``seed`` (a private generator; the global random state is not
    used). A single sample gives a zero-width interval at its value.

    Args:
        values: one number per sample (a 1-d tensor or a sequence).
        resamples: bootstrap draws (a positive int).
        seed: seeds the draws; ignored when ``generator`` is given.
        level: the interval's coverage, in (0, 1).
        generator: draw from this generator instead of a fresh one seeded by ``seed``.

    Returns:
        :class:`Estimate`.

    Raises:
        ValueError: non-finite values, ``resamples`` that is not a positive int, or ``level``
            outside (0, 1).

    Examples::

        >>> from captum_paramsal.analysis.intervals import bootstrap_mean
        >>> fixed = torch.tensor([True, False, True, True, False])
        >>> print(bootstrap_mean(fixed).format(percent=True))
        60.0% [20.0, 100.0]
    """
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    if not isinstance(level, float) or not 0.0 < level < 1.0:
        raise ValueError(f"level must be a float in (0, 1), got {level!r}")
    v = _as_vector(values, "values")
    n = v.shape[0]
    if n == 0:
        nan = float("nan")
        return Estimate(nan, nan, nan, 0, level)
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    means = v[torch.randint(n, (resamples, n), generator=generator)].mean(1)
    return _estimate(v, means, n, level)


def paired_difference(
    a: Union[Tensor, Sequence[Any]],
    b: Union[Tensor, Sequence[Any]],
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Estimate:
    """The mean of ``a - b`` over paired samples (the same samples measured two ways) and its
    bootstrap interval: whether a method beats its control on the same samples.

    Raises:
        ValueError: ``a`` and ``b`` of different lengths, or as :func:`bootstrap_mean`.

    Examples::

        >>> paired_difference([1, 1, 0, 1], [0, 1, 0, 0]).value
        0.5
    """
    va, vb = _as_vector(a, "a"), _as_vector(b, "b")
    if va.shape != vb.shape:
        raise ValueError(f"a and b must pair one value per sample, got {va.shape[0]} and {vb.shape[0]}")
    return bootstrap_mean(va - vb, resamples=resamples, seed=seed, level=level)


def bootstrap_draws_and_samples(
    values: Tensor,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Estimate:
    """The mean of a ``(draws, samples)`` table (a random control drawn several times, each
    draw measured on the same samples) and its bootstrap interval, resampling the draws and
    the samples independently: the interval covers both the luck of the draw and the choice
    of samples. ``n`` is the number of samples.

    One draw is :func:`bootstrap_mean` over the samples.

    Raises:
        ValueError: a table that is not 2-d, or as :func:`bootstrap_mean`.

    Examples::

        >>> fixed = torch.tensor([[1., 1., 0.], [0., 0., 0.]])   # 2 draws x 3 samples
        >>> bootstrap_draws_and_samples(fixed).value
        0.3333333333333333
    """
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    if not isinstance(level, float) or not 0.0 < level < 1.0:
        raise ValueError(f"level must be a float in (0, 1), got {level!r}")
    if not isinstance(values, Tensor) or values.dim() != 2:
        raise ValueError("values must be a 2-d (draws, samples) tensor")
    v = values.detach().cpu().to(torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise ValueError("values must be finite numbers")
    draws, n = v.shape
    if n == 0 or draws == 0:
        nan = float("nan")
        return Estimate(nan, nan, nan, 0, level)
    generator = torch.Generator().manual_seed(seed)
    means = torch.empty(resamples, dtype=torch.float64)
    for start in range(0, resamples, 256):  # bounded memory: 256 resampled tables at a time
        count = min(256, resamples - start)
        d = torch.randint(draws, (count, draws), generator=generator)
        s = torch.randint(n, (count, n), generator=generator)
        per_draw = v[d]  # (count, draws, n)
        means[start : start + count] = per_draw.gather(2, s[:, None, :].expand(-1, draws, -1)).mean((1, 2))
    return _estimate(v, means, n, level)
