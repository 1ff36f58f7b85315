"""Per-unit reductions of per-sample gradients grouped as ``(B, units, entries)``."""

from __future__ import annotations

from typing import Callable, Dict

from torch import Tensor


def _mean_abs(grouped: Tensor, in_place: bool = False) -> Tensor:
    # With ``in_place``, ``grouped`` is a buffer the caller owns and no autograd needs
    # (PerSampleGrad.materialize's contract): |.| in place is several times faster than
    # an L1 vector_norm and allocates nothing.
    magnitude = grouped.abs_() if in_place else grouped.abs()
    return magnitude.mean(-1)


def _mean(grouped: Tensor, in_place: bool = False) -> Tensor:
    return grouped.mean(-1)


#: ``reduce(grouped (B, units, entries), in_place=False) -> (B, units)``
REDUCTIONS: Dict[str, Callable[..., Tensor]] = {"mean_abs": _mean_abs, "mean": _mean}


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    return reduction
