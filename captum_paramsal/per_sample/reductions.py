"""How a unit's per-sample gradient becomes one number: one object per reduction.

The engine gives a reduction a parameter's per-sample gradient in one of two forms and
the reduction does the rest:

* grouped dense values ``(n, units, entries)``: :meth:`Reduction.reduce`;
* low-rank factors (a Linear over ``P`` steps, a convolution over ``P`` output
  positions: ``g[r, j] = sum_p left[r, p] * right[p, j]``, see :class:`~.grads.LowRankGrad`):
  :meth:`Reduction.low_rank`, a closed form that never builds the ``(n, units, entries)``
  values, where the reduction has one that is cheaper at this shape.

For the input saliency's second-order pass a reduction also says how its value moves
with the dense gradient (:meth:`Reduction.dense_pull_back`), so that the pass can carry a
cotangent back through a layer's own rule without autograd over ``n x numel`` values; and
it may carry a compiled kernel (:attr:`Reduction.compiled_low_rank`) that the kernel
policy runs where it pays (:mod:`.compiled`).

Adding a reduction is one subclass here and one entry in :data:`REDUCTIONS`.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from .compiled import low_rank_abs_mean, low_rank_abs_mean_pull_back


class Reduction:
    """One way to reduce a unit's entries to a number (subclass per reduction)."""

    #: the name users pass (``reduction="..."``), stored in statistics files
    name: str = ""
    #: what a plot's axis says the values are
    label: str = ""
    #: whether the reduction of a sum of gradients is the sum of their reductions, so that a
    #: layer called several times can be reduced call by call
    additive: bool = False
    #: whether :meth:`dense_pull_back` is implemented (else the second-order pass lets
    #: autograd differentiate :meth:`reduce`)
    pulls_back: bool = False
    #: ``f(left (m, R, P), right (m, P, J)) -> (m, R)`` written plainly, which the kernel
    #: policy may compile (it must equal :meth:`low_rank` / :meth:`reduce` exactly)
    compiled_low_rank: Optional[Callable[[Tensor, Tensor], Tensor]] = None
    #: ``f(left, right, weights (m, R)) -> (d_left, d_right)``: the cotangents of
    #: ``sum(weights * units)`` with respect to both factors, written plainly, to compile
    compiled_pull_back: Optional[Callable[[Tensor, Tensor, Tensor], Tuple[Tensor, Tensor]]] = None

    def reduce(self, grouped: Tensor, in_place: bool = False) -> Tensor:
        """``(n, units, entries) -> (n, units)``. With ``in_place`` the caller owns ``grouped``
        and no autograd needs it, so it may be overwritten."""
        raise NotImplementedError

    def has_low_rank(self, rank: int, rows: int, entries: int) -> bool:
        """Whether :meth:`low_rank` applies to factors of this rank and is worth it over
        building the ``rows x entries`` gradient."""
        return False

    def low_rank(self, left: Tensor, right: Tensor) -> Tensor:
        """``(n, G, R, P), (n, G, P, J) -> (n, G * R)``: the units of ``left @ right``
        without building it (only where :meth:`has_low_rank` says so)."""
        raise NotImplementedError

    def dense_pull_back(self, grouped: Tensor, units: Optional[Tensor] = None) -> Optional[Tuple[Tensor, Tensor]]:
        """``(direction, unit_scale)`` with ``d units[n, u] / d grouped[n, u, j] = unit_scale[n, u] *
        direction[n, u, j]``, or None where the pass should let autograd do it. ``grouped`` is
        a buffer the caller owns (it may be overwritten and returned as ``direction``)."""
        return None

    def pooled(self, values: Tensor) -> Tensor:
        """A unit's value as the mean over its entries of an additive quantity: ``mean |g|``
        and ``mean g`` are their own; ``rms`` is the square root of ``mean g^2``."""
        return values

    def unpooled(self, pooled: Tensor) -> Tensor:
        """The inverse of :meth:`pooled`."""
        return pooled

    def combine(self, values: Tensor, entries: Tensor, unit_of: Tensor, num_units: int) -> Tensor:
        """``(n, S) -> (n, U)``: the value of units made of several *slices* (a head: rows of q, k
        and v and columns of the output projection) from each slice's value.

        ``entries (S,)`` is each slice's number of entries and ``unit_of (S,)`` the unit it
        belongs to. The reduction of a union of entries is the entry-weighted mean of the
        slices' :meth:`pooled` values, unpooled: exact, and differentiable (the input
        saliency carries its weights back through it)."""
        weights = entries.to(values.dtype)
        pooled = torch.zeros(values.shape[0], num_units, dtype=values.dtype, device=values.device)
        pooled.index_add_(1, unit_of, self.pooled(values) * weights)
        totals = torch.zeros(num_units, dtype=values.dtype, device=values.device).index_add_(0, unit_of, weights)
        return self.unpooled(pooled / totals)

    def __repr__(self) -> str:
        return f"<reduction {self.name!r}>"


class MeanAbs(Reduction):
    """``mean_j |g[u, j]|``: the paper's reduction (the default)."""

    name = "mean_abs"
    label = "mean |grad|"
    pulls_back = True
    compiled_low_rank = staticmethod(low_rank_abs_mean)
    compiled_pull_back = staticmethod(low_rank_abs_mean_pull_back)

    def reduce(self, grouped: Tensor, in_place: bool = False) -> Tensor:
        # in place |.| is several times faster than an L1 vector_norm and allocates nothing
        magnitude = grouped.abs_() if in_place else grouped.abs()
        return magnitude.mean(-1)

    def has_low_rank(self, rank: int, rows: int, entries: int) -> bool:
        return rank == 1  # |l_r * r_j| = |l_r| * |r_j|; at rank > 1 there is no closed form

    def low_rank(self, left: Tensor, right: Tensor) -> Tensor:
        right_l1 = right.abs().mean(-1)  # (n, G, 1)
        return (left[..., 0].abs() * right_l1).reshape(left.shape[0], -1)

    def dense_pull_back(self, grouped: Tensor, units: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        # d|g|/dg = sgn(g), 0 at 0 (autograd's convention); the mean divides by the entries
        scale = torch.full(grouped.shape[:2], 1.0 / grouped.shape[-1], dtype=grouped.dtype, device=grouped.device)
        return grouped.sgn_(), scale


class Mean(Reduction):
    """``mean_j g[u, j]``: the signed mean (linear, so exact in closed form at any rank)."""

    name = "mean"
    label = "mean grad (signed)"
    additive = True

    def reduce(self, grouped: Tensor, in_place: bool = False) -> Tensor:
        return grouped.mean(-1)

    def has_low_rank(self, rank: int, rows: int, entries: int) -> bool:
        return True

    def low_rank(self, left: Tensor, right: Tensor) -> Tensor:
        # mean_j sum_p l[r, p] r[p, j] = sum_p l[r, p] * mean_j r[p, j]
        return (left @ right.mean(-1, keepdim=True)).reshape(left.shape[0], -1)


#: values one chunk of samples of :meth:`RootMeanSquare.low_rank` may hold (its Gram matrices
#: and ``left @ gram``): the closed form's memory stays bounded at any batch and sequence length
CLOSED_FORM_VALUES = 1 << 22


class RootMeanSquare(Reduction):
    """``sqrt(mean_j g[u, j]^2)``: the unit gradient's L2 norm over ``sqrt(entries)``.

    For low-rank factors the squared norm of row ``r`` is a quadratic form in the ``P x P``
    Gram matrix of the right factor, ``|sum_p l[r,p] right[p]|^2 = l_r^T (right right^T) l_r``,
    which costs ``P^2 (J + R)`` multiply-adds per sample instead of the ``R J P`` of building
    the gradient: the closed form is used where that is fewer (few positions: a Linear over a
    sequence shorter than about ``R J / (R + J)`` tokens, a late convolution), the dense path
    (a workspace of samples at a time) elsewhere. Both are exact; neither holds more than a
    bounded number of values whatever the batch (:data:`CLOSED_FORM_VALUES`, the workspace).
    """

    name = "rms"
    label = "rms grad"
    pulls_back = True

    def reduce(self, grouped: Tensor, in_place: bool = False) -> Tensor:
        squares = grouped.square_() if in_place else grouped.square()
        return squares.mean(-1).sqrt()

    def has_low_rank(self, rank: int, rows: int, entries: int) -> bool:
        # multiply-adds, Gram form vs the dense gradient: P^2 (J + R) <= P R J. The full P x P
        # product is computed (a batched GEMM does not halve a symmetric result); measured on
        # CPU from 64 to 1024 positions, the two paths cross within 20% of this line
        return rank * (entries + rows) <= rows * entries

    def low_rank(self, left: Tensor, right: Tensor) -> Tensor:
        n, groups, rows, rank = left.shape
        step = max(1, CLOSED_FORM_VALUES // max(1, groups * rank * (rank + rows)))
        parts = []
        for start in range(0, n, step):
            rows_part, right_part = left[start : start + step], right[start : start + step]
            gram = right_part @ right_part.transpose(-1, -2)  # (m, G, P, P)
            parts.append(((rows_part @ gram) * rows_part).sum(-1))  # (m, G, R)
        squared = torch.cat(parts) if len(parts) > 1 else parts[0]
        # clamp: rounding can leave a tiny negative where the row's gradient is zero
        return (squared.clamp_min(0) / right.shape[-1]).sqrt().reshape(n, -1)

    def dense_pull_back(self, grouped: Tensor, units: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if units is None:
            units = grouped.square().mean(-1).sqrt()
        # d rms / dg = g / (entries * rms); 0 where the unit's gradient is all zero (the
        # subgradient autograd's sqrt would make inf * 0 = nan)
        positive = units > 0
        scale = torch.where(positive, 1.0 / (grouped.shape[-1] * torch.where(positive, units, 1.0)), 0.0)
        return grouped, scale

    def pooled(self, values: Tensor) -> Tensor:
        return values.square()

    def unpooled(self, pooled: Tensor) -> Tensor:
        # sqrt with a zero (not infinite) derivative at 0: a unit whose gradient is all zero
        positive = pooled > 0
        return torch.where(positive, torch.where(positive, pooled, 1.0).sqrt(), 0.0)


#: every reduction by name
REDUCTIONS: Dict[str, Reduction] = {r.name: r for r in (MeanAbs(), Mean(), RootMeanSquare())}

ReductionLike = Union[str, Reduction]


def get_reduction(reduction: ReductionLike) -> Reduction:
    """The :class:`Reduction` named ``reduction`` (or ``reduction`` itself); a clear error otherwise."""
    if isinstance(reduction, Reduction):
        return reduction
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    return REDUCTIONS[reduction]
