"""Per-unit reductions of per-sample gradients grouped as ``(B, units, entries)``."""

from __future__ import annotations

from typing import Callable, Dict

from torch import Tensor


def _mean_abs(grouped: Tensor) -> Tensor:
    # ``grouped`` is a fresh tensor the engine owns (PerSampleGrad.materialize's
    # contract): take |.| in place, which is several times faster than an L1
    # vector_norm, unless autograd needs the signed values for a second derivative.
    magnitude = grouped.abs() if grouped.requires_grad else grouped.abs_()
    return magnitude.mean(-1)


def _mean(grouped: Tensor) -> Tensor:
    return grouped.mean(-1)


REDUCTIONS: Dict[str, Callable[[Tensor], Tensor]] = {"mean_abs": _mean_abs, "mean": _mean}


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    return reduction
