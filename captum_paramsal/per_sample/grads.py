"""Lazy per-sample gradients, so that a parameter's units can be reduced chunk by chunk.

A rule does not return the per-sample gradient itself (``B x numel`` values,
gigabytes for a deep layer at batch 64) but a :class:`PerSampleGrad` that can
build the gradient of any range of samples, and, where the layer's structure
allows it, reduce it to units in closed form without building it at all.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .fused import MAX_FUSED_RANK, fused_low_rank_abs_mean, fused_low_rank_abs_mean_pull_back


class PerSampleGrad:
    """Per-sample gradient of one parameter from one call of a layer.

    Subclasses implement :meth:`materialize`; :meth:`unit_reduce` is optional.
    """

    batch: int

    def materialize(self, start: int, stop: int, out: Optional[Tensor] = None) -> Tensor:
        """Per-sample gradients of samples ``start:stop``, shaped ``(n, *param.shape)``.

        Returns a tensor that the caller owns and may overwrite: ``out`` (a buffer of
        ``(stop - start) * numel`` values) when the implementation can write into it,
        else a new tensor. Reusing one buffer spares the page faults of a fresh
        allocation, which on CPU cost more than the arithmetic.
        """
        raise NotImplementedError

    def has_closed_form(self, reduction: str) -> bool:
        """Whether :meth:`unit_reduce` can give ``reduction`` without materializing."""
        return False

    def pull_back(
        self, start: int, stop: int, cotangent: Tensor, row_scale: Tensor
    ) -> Optional[List[Tuple[Tensor, Tensor]]]:
        """Carry a cotangent of :meth:`materialize`'s result back toward the rule's inputs.

        The cotangent is ``row_scale[:, r] * cotangent[:, r, ...]`` with rows ``r`` along the
        parameter's first axis (``cotangent`` is ``(n, *param.shape)``, ``row_scale`` is
        ``(n, rows)``; the caller may overwrite ``cotangent``). Returns ``(tensor, its
        cotangent)`` pairs whose tensors autograd links to the call's activation and output
        gradient, or ``None`` when the gradient has no such rule (the caller then
        differentiates through :meth:`materialize`). Call it with autograd enabled; the
        cotangents themselves are not tracked. The second-order pass uses this to skip
        autograd over ``n x numel`` values.
        """
        return None

    def unit_reduce(self, reduction: str, start: int, stop: int) -> Tensor:
        """``(n, units)`` with units along index 0, computed without materializing."""
        raise NotImplementedError

    def can_fuse(self, reduction: str) -> bool:
        """Whether :meth:`fused_unit_reduce` applies (see :mod:`.fused`)."""
        return False

    def fusable(self) -> bool:
        """Whether this gradient's form has compiled kernels (:meth:`fused_unit_reduce`,
        :meth:`fused_mean_abs_pull_back`), whatever autograd tracks."""
        return False

    def fused_values_per_sample(self) -> int:
        """How many values per sample :meth:`fused_unit_reduce` holds at once."""
        raise NotImplementedError

    def fused_unit_reduce(self, reduction: str, start: int, stop: int) -> Optional[Tensor]:
        """:meth:`unit_reduce`'s result by a compiled kernel that builds no per-sample
        gradient, or None where it cannot run (compiling failed, or autograd would have to
        go through it): the caller then takes the eager path."""
        raise NotImplementedError

    def fused_mean_abs_pull_back(
        self, start: int, stop: int, row_scale: Tensor
    ) -> Optional[List[Tuple[Tensor, Tensor]]]:
        """:meth:`pull_back` of ``sum(row_scale * units)`` for ``mean_abs`` (``row_scale``
        already divided by the unit size) by one compiled kernel from the factors (the
        product, its signs and both cotangents), instead of the eager product, ``sgn_`` and
        two matmuls. None where that does not apply or compiling failed."""
        return None


class DenseGrad(PerSampleGrad):
    """An already computed, small per-sample gradient (biases)."""

    def __init__(self, values: Tensor) -> None:
        self.values = values
        self.batch = values.shape[0]

    def materialize(self, start: int, stop: int, out: Optional[Tensor] = None) -> Tensor:
        return self.values[start:stop].clone()


class ChunkedGrad(PerSampleGrad):
    """A per-sample gradient computed on demand by ``compute(start, stop)``."""

    def __init__(self, batch: int, compute: Callable[[int, int], Tensor]) -> None:
        self.batch = batch
        self.compute = compute

    def materialize(self, start: int, stop: int, out: Optional[Tensor] = None) -> Tensor:
        return self.compute(start, stop)


class LowRankGrad(PerSampleGrad):
    """``g_i = left_i @ right_i`` per group: ``left (B, G, R, P)``, ``right (B, G, P, J)``.

    Rows (``G * R``) are the units and ``J`` the entries of each. This is the
    form of Linear and convolution gradients: ``P`` positions (sequence steps,
    output pixels), each contributing an outer product. ``right`` may be given
    as a function of the sample range, so that large patch matrices are only
    built chunk by chunk.
    """

    def __init__(
        self,
        left: Tensor,
        right: Callable[[int, int], Tensor],
        shape: tuple,
        materialize: Optional[Callable[[int, int], Tensor]] = None,
        pull_back: Optional[Callable[[int, int, Tensor, Tensor], List[Tuple[Tensor, Tensor]]]] = None,
    ) -> None:
        self.left = left
        self.right = right
        self.shape = tuple(shape)
        self.batch = left.shape[0]
        self._materialize = materialize
        self._pull_back = pull_back

    def materialize(self, start: int, stop: int, out: Optional[Tensor] = None) -> Tensor:
        if self._materialize is not None:
            return self._materialize(start, stop)
        left, right = self.left[start:stop], self.right(start, stop)
        tracked = torch.is_grad_enabled() and (left.requires_grad or right.requires_grad)
        if out is not None and not tracked:  # out= has no autograd
            dense = torch.matmul(left, right, out=out.view(*left.shape[:-1], right.shape[-1]))
        else:
            dense = left @ right
        return dense.view(stop - start, *self.shape)

    def pull_back(
        self, start: int, stop: int, cotangent: Tensor, row_scale: Tensor
    ) -> List[Tuple[Tensor, Tensor]]:
        if self._pull_back is not None:
            return self._pull_back(start, stop, cotangent, row_scale)
        # d(left @ right) with the row scale on the small factors, never on the dense values
        left, right = self.left[start:stop], self.right(start, stop)
        with torch.no_grad():
            scale = row_scale.reshape(*left.shape[:-1], 1)
            c = cotangent.view(*left.shape[:-1], right.shape[-1])
            # a contiguous right factor: MKL's batched GEMM is several times slower on the
            # transposed patches that im2col leaves behind
            d_left = (c @ right.contiguous().transpose(-1, -2)).mul_(scale)
            d_right = (left * scale).transpose(-1, -2) @ c
        return [(left, d_left), (right, d_right)]

    def has_closed_form(self, reduction: str) -> bool:
        return reduction == "mean" or (reduction == "mean_abs" and self.left.shape[-1] == 1)

    def unit_reduce(self, reduction: str, start: int, stop: int) -> Tensor:
        left = self.left[start:stop]
        if reduction == "mean":
            # mean_j sum_p l[r,p] r[p,j] = sum_p l[r,p] * mean_j r[p,j]
            right_mean = self.right(start, stop).mean(-1, keepdim=True)
            return (left @ right_mean).reshape(stop - start, -1)
        if reduction == "mean_abs" and left.shape[-1] == 1:
            # a rank-1 gradient: mean_j |l_r * r_j| = |l_r| * mean_j |r_j|
            right_l1 = self.right(start, stop).abs().mean(-1)  # (n, G, 1)
            return (left[..., 0].abs() * right_l1).reshape(stop - start, -1)
        raise ValueError(f"no closed form for reduction {reduction!r} at rank {left.shape[-1]}")

    def fusable(self) -> bool:
        return 1 < self.left.shape[-1] <= MAX_FUSED_RANK and self._materialize is None and self._pull_back is None

    def can_fuse(self, reduction: str) -> bool:
        tracked = torch.is_grad_enabled() and self.left.requires_grad  # the kernel is not differentiated
        return reduction == "mean_abs" and self.fusable() and not tracked

    def fused_values_per_sample(self) -> int:
        groups, rows, positions = self.left.shape[1:]
        entries = math.prod(self.shape) // (groups * rows)
        return groups * positions * (rows + entries)

    def fused_mean_abs_pull_back(
        self, start: int, stop: int, row_scale: Tensor
    ) -> Optional[List[Tuple[Tensor, Tensor]]]:
        if not self.fusable():
            return None
        left, right = self.left[start:stop], self.right(start, stop)
        with torch.no_grad():
            cotangents = fused_low_rank_abs_mean_pull_back(
                left.flatten(0, 1), right.flatten(0, 1), row_scale.reshape(left.shape[:-1]).flatten(0, 1)
            )
        if cotangents is None:
            return None
        d_left, d_right = cotangents
        return [(left, d_left.view(left.shape)), (right, d_right.view(right.shape))]

    def fused_unit_reduce(self, reduction: str, start: int, stop: int) -> Optional[Tensor]:
        left, right = self.left[start:stop], self.right(start, stop)
        if torch.is_grad_enabled() and right.requires_grad:
            return None
        units = fused_low_rank_abs_mean(left.flatten(0, 1), right.flatten(0, 1))
        return None if units is None else units.reshape(stop - start, -1)
