"""Lazy per-sample gradients: the *forms* a rule's result takes.

A rule does not return the per-sample gradient itself (``B x numel`` values, gigabytes
for a deep layer at batch 64) but a :class:`PerSampleGrad` that can build the gradient of
any range of samples and, where its structure allows, hand out the factors it is made of
(:class:`LowRankGrad`), from which a reduction may compute its units in closed form
(:mod:`.reductions`). The forms know nothing of reductions; the reductions know nothing of
layers.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

#: ``pull_back(start, stop, cotangent, row_scale) -> [(tensor, its cotangent)]``
PullBack = Callable[[int, int, Tensor, Tensor], List[Tuple[Tensor, Tensor]]]


def batched_product(a: Tensor, b: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``a @ b``, written into the buffer ``out`` where one is given and autograd does not track
    the factors (``out=`` has no autograd): the materializing step of the low-rank forms."""
    tracked = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    if out is not None and not tracked:
        return torch.matmul(a, b, out=out.view(*a.shape[:-1], b.shape[-1]))
    return a @ b


class PerSampleGrad:
    """Per-sample gradient of one parameter from one call of a layer.

    Subclasses implement :meth:`materialize`; the rest is optional.
    """

    batch: int

    def materialize(self, start: int, stop: int, out: Optional[Tensor] = None, direct: bool = False) -> Tensor:
        """Per-sample gradients of samples ``start:stop``, shaped ``(n, *param.shape)``.

        Returns a tensor that the caller owns and may overwrite: ``out`` (a buffer of
        ``(stop - start) * numel`` values) when the implementation can write into it,
        else a new tensor. Reusing one buffer spares the page faults of a fresh
        allocation, which on CPU cost more than the arithmetic. ``direct``: use the
        layer's own weight-gradient kernel where the form has one (:attr:`has_direct`).
        """
        raise NotImplementedError

    def factors(self, start: int, stop: int) -> Optional[Tuple[Tensor, Tensor]]:
        """``(left (n, G, R, P), right (n, G, P, J))`` with ``g = left @ right`` per group
        (units along the rows), or None where the gradient has no such form."""
        return None

    def units_by(self, reduce: Callable[[Tensor], Tensor], grouping: Callable) -> Optional[Tensor]:
        """``(B, units)`` by the form's own exact shortcut, or None where it has none.

        ``reduce`` maps grouped values ``(m, units, entries) -> (m, units)`` (a reduction's
        :meth:`~.reductions.Reduction.reduce`); ``grouping`` is the parameter's unit grouping.
        A form whose gradient is mostly zero (an embedding's rows that a sample's tokens never
        touch) reduces only what is there and fills the rest with ``reduce`` of zeros.
        """
        return None

    def rows_are_units(self, grouping: Callable) -> bool:
        """Whether the rows of :meth:`factors` are the parameter's units under ``grouping``
        (so that a reduction's closed form on the factors gives the units)."""
        return False

    @property
    def rank(self) -> Optional[int]:
        """``P`` of :meth:`factors`, or None."""
        return None

    @property
    def has_direct(self) -> bool:
        """Whether :meth:`materialize` and :meth:`pull_back` have a ``direct`` kernel."""
        return False

    def pull_back(
        self, start: int, stop: int, cotangent: Tensor, row_scale: Tensor, direct: bool = False
    ) -> Optional[List[Tuple[Tensor, Tensor]]]:
        """Carry a cotangent of :meth:`materialize`'s result back toward the rule's inputs.

        The cotangent is ``row_scale[:, r] * cotangent[:, r, ...]`` with rows ``r`` along the
        parameter's first axis (``cotangent`` is ``(n, *param.shape)``, ``row_scale`` is
        ``(n, rows)``; the caller may overwrite ``cotangent``). Returns ``(tensor, its
        cotangent)`` pairs whose tensors autograd links to the call's inputs and output
        gradient, or ``None`` when the gradient has no such rule (the caller then
        differentiates through :meth:`materialize`). Call it with autograd enabled; the
        cotangents themselves are not tracked. The second-order pass uses this to skip
        autograd over ``n x numel`` values.
        """
        return None


class DenseGrad(PerSampleGrad):
    """An already computed, small per-sample gradient (biases, norm layers)."""

    def __init__(self, values: Tensor) -> None:
        self.values = values
        self.batch = values.shape[0]

    def materialize(self, start: int, stop: int, out: Optional[Tensor] = None, direct: bool = False) -> Tensor:
        return self.values[start:stop].clone()


class ChunkedGrad(PerSampleGrad):
    """A per-sample gradient computed on demand by ``compute(start, stop)``."""

    def __init__(self, batch: int, compute: Callable[[int, int], Tensor]) -> None:
        self.batch = batch
        self.compute = compute

    def materialize(self, start: int, stop: int, out: Optional[Tensor] = None, direct: bool = False) -> Tensor:
        return self.compute(start, stop)


class LowRankGrad(PerSampleGrad):
    """``g_i = left_i @ right_i`` per group: ``left (B, G, R, P)``, ``right (B, G, P, J)``.

    Rows (``G * R``) are the units and ``J`` the entries of each. This is the form of
    Linear and convolution gradients: ``P`` positions (sequence steps, output pixels),
    each contributing an outer product. ``right`` is a function of the sample range, so
    that large patch matrices are only built chunk by chunk. A layer may also give a
    ``direct`` way to build the gradient and pull a cotangent back (a convolution's own
    weight-gradient kernel, faster at many positions); the kernel policy chooses.
    """

    def __init__(
        self,
        left: Tensor,
        right: Callable[[int, int], Tensor],
        shape: tuple,
        direct_materialize: Optional[Callable[[int, int], Tensor]] = None,
        direct_pull_back: Optional[PullBack] = None,
        row_grouping: Optional[Callable] = None,
    ) -> None:
        self.left = left
        # under which unit grouping the rows are the units: None is the default grouping (units
        # along the parameter's first axis, the layout :meth:`materialize` writes); a layer that
        # stores its weight transposed (Hugging Face's Conv1D) names its registered grouping
        self.row_grouping = row_grouping
        self.right = right
        self.shape = tuple(shape)
        self.batch = left.shape[0]
        self._direct_materialize = direct_materialize
        self._direct_pull_back = direct_pull_back

    @property
    def rank(self) -> int:
        return self.left.shape[-1]

    @property
    def factor_shape(self) -> Tuple[int, int, int, int]:
        """``(G, R, P, J)``: groups, rows per group, rank, entries per row."""
        groups, rows, rank = self.left.shape[1:]
        entries = 1
        for size in self.shape:
            entries *= size
        return groups, rows, rank, entries // (groups * rows)

    @property
    def has_direct(self) -> bool:
        return self._direct_materialize is not None

    def rows_are_units(self, grouping: Callable) -> bool:
        from .registry import default_grouping  # the registry imports this module

        return grouping is (self.row_grouping or default_grouping)

    def factors(self, start: int, stop: int) -> Tuple[Tensor, Tensor]:
        return self.left[start:stop], self.right(start, stop)

    def transposed(self) -> Optional[LowRankGrad]:
        """The same gradient with the roles of rows and entries swapped, ``g^T = right^T left^T``:
        a form whose rows are the ``J`` entries (a Linear's input features), so that the
        reductions' closed forms give units along the other axis of a 2-D weight. Its
        :meth:`materialize` writes ``(n, J, R)``. None with several groups."""
        if self.left.shape[1] != 1:
            return None
        left = self.left
        rows, entries = left.shape[2], self.factor_shape[3]
        right = self.right(0, self.batch).transpose(-1, -2)  # (B, 1, J, P): cheap views for a Linear
        return LowRankGrad(right, lambda start, stop: left[start:stop].transpose(-1, -2), (entries, rows))

    def materialize(self, start: int, stop: int, out: Optional[Tensor] = None, direct: bool = False) -> Tensor:
        if direct and self._direct_materialize is not None:
            return self._direct_materialize(start, stop)
        left, right = self.factors(start, stop)
        return batched_product(left, right, out).view(stop - start, *self.shape)

    def pull_back(
        self, start: int, stop: int, cotangent: Tensor, row_scale: Tensor, direct: bool = False
    ) -> List[Tuple[Tensor, Tensor]]:
        if direct and self._direct_pull_back is not None:
            return self._direct_pull_back(start, stop, cotangent, row_scale)
        # d(left @ right) with the row scale on the small factors, never on the dense values
        left, right = self.factors(start, stop)
        with torch.no_grad():
            scale = row_scale.reshape(*left.shape[:-1], 1)
            c = cotangent.view(*left.shape[:-1], right.shape[-1])
            # a contiguous right factor: MKL's batched GEMM is several times slower on the
            # transposed patches that im2col leaves behind
            d_left = (c @ right.contiguous().transpose(-1, -2)).mul_(scale)
            d_right = (left * scale).transpose(-1, -2) @ c
        return [(left, d_left), (right, d_right)]
