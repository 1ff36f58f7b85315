"""Optimal Brain Compression: the greedy per-row OBS solver (Frantar & Alistarh, NeurIPS 2022).

The layer is ``Y = W X`` with ``W`` of shape ``(R, C)`` and ``H = 2 X Xᵀ`` (see :mod:`.solver`).
The reconstruction error ``||(W' - W) X||²`` is a sum over rows of ``½ δw_rᵀ H δw_r``, so every
row is its own problem with the same Hessian. OBC solves each row greedily with Optimal Brain
Surgeon: with ``H⁻¹`` of the row's still-unpruned weights, removing weight ``p`` and letting all
the others compensate optimally costs exactly ``w_p² / (2 [H⁻¹]_pp)``; the cheapest one is
removed, the others are updated (``w -= H⁻¹[:, p] w_p / [H⁻¹]_pp``) and ``H⁻¹`` is updated for the
smaller set (``H⁻¹ -= H⁻¹[:, p] H⁻¹[p, :] / [H⁻¹]_pp``, the inverse of ``H`` without row and
column ``p``); then again. After any number of steps the row's weights are exactly the least
squares optimum of its kept set (the updates are exact), so the greedy only chooses the mask.

OBC against SparseGPT (:func:`.solver.sparsegpt_prune`):

* SparseGPT visits the columns once, left to right, and freezes each after its visit: a weight
  can only be compensated by the weights to its right, and a mask choice never sees the
  corrections made after it. It costs ``O(C³ + R·C²)`` per layer (one shared inverse).
* OBC lets every weight compensate for every removal and re-scores all the remaining weights of
  a row after each removal. It needs one ``C x C`` inverse *per row*, updated at every step:
  ``O(R·C³)`` per layer, ``C`` times SparseGPT's cost. This module stores the rows' inverses of
  only the still-unpruned weights, shrinking them as the row is pruned (which divides the
  constant by about two and a half), and batches the rank-1 downdates of 32 steps into one matrix
  product (compute-bound rather than one pass over memory per step). For the small layers of the
  networks SPADE explains (a CIFAR ResNet's convolutions) this is affordable, and it is what the
  SPADE authors use.

Across rows, OBC's budget is not a fixed count per row: each row records the loss of each of its
steps, and a layer sparsity takes the globally cheapest steps (:meth:`OBCTrajectory.at`). One
greedy run (:func:`obc_trajectory`) therefore serves a whole sweep of sparsities. For that
allocation to be free, every row's greedy runs to the end by default (a row may end up anywhere
from dense to fully pruned); with the shrinking inverses the steps past a sparsity ``s`` cost only
about ``(1 - s)³`` of the whole run.

``block = b > 1`` removes consecutive column blocks of ``b`` jointly (loss
``½ w_Bᵀ ([H⁻¹]_BB)⁻¹ w_B``); for a convolution's flattened ``(C_in, kh, kw)`` columns and
``b = kh·kw`` a block is one input channel's kernel of one filter.

As in :mod:`.solver`, a leading group dimension ``W (G, R, C)``, ``H (G, C, C)`` solves grouped
convolutions in one call (every row uses its own group's Hessian).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor

from .solver import (
    _as_groups,
    _check_shapes,
    _cholesky_with_retry,
    _compute_dtype,
    check_percdamp,
    check_sparsity,
    dampened_hessian,
    exact_reconstruction,
)

__all__ = ["OBCTrajectory", "obc_prune", "obc_trajectory"]

#: most bytes of per-row inverse Hessians updated at once (a chunk of rows)
_CHUNK_BYTES = 64 << 20
#: most rows per chunk: fewer rows pay more per-step Python overhead, more leave the caches
#: (measured on a 64x576 float32 layer, best of 3, one CPU thread: 2 rows 2.7 s, 4 rows 1.8 s,
#: 8 rows 1.4 s, 16 rows 1.0 s, 32 rows 1.1 s, 48 rows (the 64 MiB cap) 1.1 s)
_CHUNK_ROWS = 16
#: the rows' inverses are cut down to their unpruned weights once those are at most this
#: fraction of the stored size (a gather costs about one update step; the steps in between then
#: work on matrices at most 1/_SHRINK too large)
_SHRINK = 0.8
#: removals whose downdates of the inverse Hessians are batched into one matrix product
_LAZY = 32


@dataclass
class OBCTrajectory:
    """One greedy OBC run over a layer: the removal order and step losses of every row.

    Built by :func:`obc_trajectory`; :meth:`at` turns it into the mask and weights of any layer
    sparsity up to :attr:`max_sparsity` without running the greedy again.

    Attributes:
        weight: the dense weight, ``(R, C)`` or ``(G, R, C)`` (a detached copy).
        hessian: its Hessian, ``(C, C)`` or ``(G, C, C)`` (a detached copy, undampened).
        percdamp: the dampening used, ``λ = percdamp * mean(diag H)``.
        block: columns removed together (1 = unstructured).
        max_sparsity: the largest sparsity :meth:`at` accepts.
        max_row_sparsity: the greedy of each row stopped after ``ceil(max_row_sparsity * C / block)``
            removals (:attr:`steps`), the most any row can take; ``>= max_sparsity``.
        order: ``(R, steps)`` or ``(G, R, steps)`` int64: the block (the column when ``block`` is
            1) each row removed at each step, in the order removed; block ``j`` is columns
            ``j*block : (j+1)*block``.
        losses: the same shape, in the compute dtype (float64 for float64 weights, float32
            otherwise): the increase of the row's error ``½ δwᵀ H_damp δw`` caused by each step
            (with the row's other weights re-fitted after every step). Not necessarily monotone.

    Examples::

        >>> trajectory = obc_trajectory(weight, 2 * x.T @ x, max_sparsity=0.9)
        >>> for s in (0.5, 0.7, 0.9):
        ...     mask, pruned = trajectory.at(s)
    """

    weight: Tensor
    hessian: Tensor
    percdamp: float
    block: int
    max_sparsity: float
    max_row_sparsity: float
    order: Tensor
    losses: Tensor

    @property
    def blocks_per_row(self) -> int:
        """Blocks in one row, ``C // block``."""
        return self.weight.shape[-1] // self.block

    @property
    def steps(self) -> int:
        """Removal steps recorded per row: ``ceil(max_row_sparsity * blocks_per_row)``, 0 if ``max_sparsity`` is 0."""
        return self.order.shape[-1]

    def at(self, sparsity: float) -> Tuple[Tensor, Tensor]:
        r"""The OBC mask and weights of the layer at ``sparsity``: ``(mask, pruned weight)``.

        ``n = round(sparsity * G·R·blocks_per_row)`` blocks are removed (``block * n`` zeros;
        with ``block = 1`` exactly ``round(sparsity * weight.numel())``). They are spread over
        the rows by loss: each row's step losses are made non-decreasing by a running maximum (a
        later step is never taken before an earlier one, so a row's choice is a prefix of its
        order), and the ``n`` smallest ``(row, step)`` entries of the whole layer are taken,
        earlier steps first on ties (then lower rows); a row takes at most :attr:`steps`
        removals. Row ``r`` then prunes its first ``k_r`` removals, and its weights are the
        least-squares optimum of its kept set for the dampened Hessian,
        :func:`.solver.exact_reconstruction` (what replaying the greedy's OBS updates gives,
        without the rounding of ``k_r`` sequential updates).

        Args:
            sparsity: fraction of the layer's blocks to prune, in ``[0, max_sparsity]`` (and
                below 1).

        Returns:
            ``mask`` (boolean, ``True`` = pruned, the shape of ``weight``) and the pruned weight
            (the dtype of ``weight``, pruned entries exactly zero). Sparsity 0 gives an all-False
            mask and a copy of the weight.

        Examples::

            >>> mask, pruned = obc_trajectory(weight, hessian, max_sparsity=0.9).at(0.75)
            >>> int(mask.sum()) == round(0.75 * weight.numel())
            True
        """
        sparsity = check_sparsity(sparsity)
        if sparsity > self.max_sparsity:
            raise ValueError(
                f"sparsity {sparsity!r} is above this trajectory's max_sparsity {self.max_sparsity!r}; "
                f"run obc_trajectory with max_sparsity >= {sparsity!r}"
            )
        if sparsity == 0:
            return torch.zeros(self.weight.shape, dtype=torch.bool, device=self.weight.device), self.weight.clone()
        blocks, steps = self.blocks_per_row, self.steps
        order = self.order.reshape(-1, steps)
        rows = order.shape[0]
        n = min(round(sparsity * rows * blocks), rows * steps)
        # a running max, so that the n smallest entries take a prefix of every row's order
        running = self.losses.reshape(rows, steps).cummax(dim=1).values
        # step-major flattening + a stable sort: ties go to the earlier step, then the lower row
        chosen = torch.argsort(running.t().reshape(-1), stable=True)[:n]
        taken = torch.bincount(chosen % rows, minlength=rows)
        removed = torch.arange(steps, device=order.device).unsqueeze(0) < taken.unsqueeze(1)
        block_mask = torch.zeros(rows, blocks, dtype=torch.bool, device=order.device)
        block_mask.scatter_(1, order, removed)
        mask = block_mask.repeat_interleave(self.block, dim=1).reshape(self.weight.shape)
        return mask, exact_reconstruction(self.weight, self.hessian, mask, percdamp=self.percdamp)


def obc_trajectory(
    weight: Tensor,
    hessian: Tensor,
    percdamp: float = 0.01,
    block: int = 1,
    max_sparsity: float = 1.0,
    max_row_sparsity: float = 1.0,
) -> OBCTrajectory:
    r"""Run OBC's greedy OBS on every row of ``weight``, recording each row's removals and losses.

    Every row starts from the inverse of its group's dampened Hessian
    (:func:`.solver.dampened_hessian`) and repeats ``steps = ceil(max_row_sparsity * C / block)``
    times (every block, by default): remove the unpruned block ``p`` of least loss ``L_p = ½ w_pᵀ ([H⁻¹]_pp)⁻¹ w_p``
    (``w_p² / (2 [H⁻¹]_pp)`` for single weights), update the row's other weights
    ``w -= H⁻¹[:, p] ([H⁻¹]_pp)⁻¹ w_p``, set ``w_p = 0`` exactly, and update the row's inverse
    ``H⁻¹ -= H⁻¹[:, p] ([H⁻¹]_pp)⁻¹ H⁻¹[p, :]``. The rows are batched (a tensor of per-row
    inverses), a few rows at a time to stay in the caches and within 64 MiB; the cost is
    ``O(steps · C²)`` per row, ``O(R·C³)`` for a whole layer.

    Args:
        weight: ``(R, C)`` or ``(G, R, C)``; float64 is solved in float64, anything else in float32.
        hessian: ``(C, C)`` or ``(G, C, C)``, ``2 X Xᵀ`` up to a positive factor.
        percdamp: dampening ``λ = percdamp * mean(diag H)`` per group (non-negative).
        block: columns removed together: 1 = unstructured; ``b > 1`` = consecutive blocks of ``b``
            columns (``kh * kw`` for a convolution: one input channel's kernel); ``C`` must be a
            multiple of ``b``.
        max_sparsity: the largest layer sparsity :meth:`OBCTrajectory.at` will serve, in ``[0, 1]``
            (0: nothing is run).
        max_row_sparsity: in ``[max_sparsity, 1]``: each row's greedy stops after
            ``ceil(max_row_sparsity * C / block)`` removals, so no row can be pruned beyond that.
            The default 1 leaves the allocation over rows unconstrained; a smaller value saves the
            (cheap) last steps but caps the cheap rows: ``max_row_sparsity = max_sparsity`` would
            force ``at(max_sparsity)`` to prune every row equally.

    Returns:
        An :class:`OBCTrajectory`; ``trajectory.at(s)`` gives ``(mask, pruned weight)``.

    Examples::

        >>> x = torch.randn(256, 32)                       # calibration inputs (rows)
        >>> layer = torch.nn.Linear(32, 16)
        >>> trajectory = obc_trajectory(layer.weight.detach(), 2 * x.T @ x, max_sparsity=0.9)
        >>> trajectory.order.shape                         # every row's greedy to the end
        torch.Size([16, 32])
        >>> mask, pruned = trajectory.at(0.5)
        >>> int((pruned == 0).sum())
        256
    """
    check_percdamp(percdamp)
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    for name, value in (("max_sparsity", max_sparsity), ("max_row_sparsity", max_row_sparsity)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if max_row_sparsity < max_sparsity:
        raise ValueError(
            f"max_row_sparsity ({max_row_sparsity!r}) must be at least max_sparsity ({max_sparsity!r}): "
            "the rows could not hold the layer's budget"
        )
    w, h, squeeze = _as_groups(weight, hessian)
    _check_shapes(w, h, None)
    groups, rows, columns = w.shape
    if columns % block:
        raise ValueError(f"block {block} does not divide the {columns} columns of the weight")
    blocks = columns // block
    # ceil of the product: at(max_sparsity) never needs more steps than were recorded
    steps = 0 if max_sparsity == 0 else min(blocks, math.ceil(float(max_row_sparsity) * blocks))
    dtype = _compute_dtype(weight)
    lead = tuple(weight.shape[:-1])
    order = torch.zeros(groups * rows, steps, dtype=torch.long, device=weight.device)
    losses = torch.zeros(groups * rows, steps, dtype=dtype, device=weight.device)
    if steps > 0:
        lower, _ = _cholesky_with_retry(dampened_hessian(h.detach().to(dtype), percdamp))
        hinv = torch.cholesky_inverse(lower)  # (G, C, C), every row's starting inverse
        flat_w = w.detach().to(dtype).reshape(groups * rows, columns)
        group_of_row = torch.arange(groups, device=w.device).repeat_interleave(rows)
        itemsize = torch.finfo(dtype).bits // 8
        chunk = max(1, min(_CHUNK_ROWS, _CHUNK_BYTES // (columns * columns * itemsize)))
        for start in range(0, groups * rows, chunk):
            part = slice(start, start + chunk)
            # advanced indexing copies: each row gets its own inverse to update
            row_hinv, row_w = hinv[group_of_row[part]], flat_w[part].clone()
            if block == 1:
                order[part], losses[part] = _greedy_columns(row_w, row_hinv, steps)
            else:
                order[part], losses[part] = _greedy_blocks(row_w, row_hinv, steps, block)
    return OBCTrajectory(
        weight=weight.detach().clone(),
        hessian=hessian.detach().clone(),
        percdamp=float(percdamp),
        block=block,
        max_sparsity=float(max_sparsity),
        max_row_sparsity=float(max_row_sparsity),
        order=order.reshape(*lead, steps),
        losses=losses.reshape(*lead, steps),
    )


def obc_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    percdamp: float = 0.01,
    block: int = 1,
) -> Tuple[Tensor, Tensor]:
    r"""OBC-prune ``weight`` to ``sparsity``: ``obc_trajectory(..., max_sparsity=sparsity).at(sparsity)``.

    Every row's greedy runs to the end, so that the budget goes to the rows where it is cheapest.

    Args:
        weight: ``(R, C)`` or ``(G, R, C)``.
        hessian: ``(C, C)`` or ``(G, C, C)``, ``2 X Xᵀ`` up to a positive factor.
        sparsity: fraction of blocks to prune, in ``[0, 1)``: ``n = round(sparsity * G·R·C/block)``
            blocks, so ``block * n`` zeros (``round(sparsity * weight.numel())`` for ``block=1``).
        percdamp: dampening ``λ = percdamp * mean(diag H)``.
        block: columns pruned together (see :func:`obc_trajectory`).

    Returns:
        ``(mask, pruned weight)``: ``True`` = pruned; the weight in the dtype of ``weight`` with
        pruned entries exactly zero and the kept ones the least-squares optimum of each row.

    Examples::

        >>> x = torch.randn(256, 32)
        >>> layer = torch.nn.Linear(32, 16)
        >>> mask, pruned = obc_prune(layer.weight.detach(), 2 * x.T @ x, sparsity=0.75)
        >>> int((pruned == 0).sum())
        384
    """
    sparsity = check_sparsity(sparsity)
    return obc_trajectory(weight, hessian, percdamp=percdamp, block=block, max_sparsity=sparsity).at(sparsity)


def _greedy_columns(w: Tensor, hinv: Tensor, steps: int) -> Tuple[Tensor, Tensor]:
    """The greedy for single weights on a chunk: ``w (n, C)``, ``hinv (n, C, C)``, both consumed.

    The rank-1 downdates of ``H⁻¹`` are applied lazily: the current inverse is
    ``hinv - Σ_j u_j v_jᵀ`` over the ``pending`` removals since the last flush, so a step only needs
    the current diagonal (kept up to date, ``O(C)``) and the current row ``p`` (``hinv[p]`` minus
    ``pending`` corrections, ``O(pending·C)``); every ``_LAZY`` steps the corrections are applied
    as one rank-``_LAZY`` matrix product. The same arithmetic, but compute-bound instead of one
    pass over all the rows' inverses per step (memory-bound).
    """
    n, columns = w.shape
    rows = torch.arange(n, device=w.device)
    ids = torch.arange(columns, device=w.device).expand(n, columns).clone()  # stored position -> column
    alive = torch.ones(n, columns, dtype=torch.bool, device=w.device)
    order = torch.empty(n, steps, dtype=torch.long, device=w.device)
    losses = torch.empty(n, steps, dtype=w.dtype, device=w.device)
    tiny = torch.finfo(w.dtype).tiny
    size = columns
    diag = hinv.diagonal(dim1=1, dim2=2).clone()
    us = torch.empty(n, size, _LAZY, dtype=w.dtype, device=w.device)  # u_j = current H⁻¹[:, p_j]
    vs = torch.empty(n, _LAZY, size, dtype=w.dtype, device=w.device)  # v_j = u_j / pivot_j
    pending = 0
    for t in range(steps):
        remaining = columns - t
        shrink = remaining <= _SHRINK * size
        if pending == _LAZY or (shrink and pending):
            hinv.baddbmm_(us[:, :, :pending], vs[:, :pending], alpha=-1.0)
            diag = hinv.diagonal(dim1=1, dim2=2).clone()  # re-read: no drift from the running update
            pending = 0
        if shrink:
            # the removed weights' rows and columns of H⁻¹ are (numerically) zero and never touch
            # the kept ones again: drop them, so that every later update is on a smaller matrix
            hinv = _principal(hinv, alive)
            w, ids, diag = w[alive].view(n, remaining), ids[alive].view(n, remaining), diag[alive].view(n, remaining)
            alive = torch.ones(n, remaining, dtype=torch.bool, device=w.device)
            size = remaining
            us, vs = us[:, :size].contiguous(), vs[:, :, :size].contiguous()
        # [H⁻¹]_pp > 0 in exact arithmetic; the clamp only keeps float32 rounding from giving a
        # negative (hence "free") loss
        scores = w.square().div_(diag.clamp_min(tiny)).masked_fill_(~alive, math.inf)
        best, p = scores.min(dim=1)
        order[:, t] = ids[rows, p]
        losses[:, t] = best / 2
        row = hinv[rows, p]  # H⁻¹[p, :] = H⁻¹[:, p] (symmetric), a copy
        if pending:
            row.sub_(torch.bmm(us[rows, p, :pending].unsqueeze(1), vs[:, :pending]).squeeze(1))
        pivot = row[rows, p].unsqueeze(1)
        w.sub_(row * (w[rows, p].unsqueeze(1) / pivot))
        w[rows, p] = 0.0  # exactly, not up to rounding
        alive[rows, p] = False
        # H⁻¹ of the kept set: the Schur complement of the removed pivot, deferred
        scaled = row / pivot
        diag.sub_(row * scaled)
        us[:, :, pending] = row
        vs[:, pending] = scaled
        pending += 1
    return order, losses


def _greedy_blocks(w: Tensor, hinv: Tensor, steps: int, block: int) -> Tuple[Tensor, Tensor]:
    """The greedy for blocks of ``block`` consecutive columns on a chunk (``w``, ``hinv`` consumed).

    As :func:`_greedy_columns`, with rank-``block`` downdates ``H⁻¹[:, B] ([H⁻¹]_BB)⁻¹ H⁻¹[B, :]``
    applied lazily and the diagonal blocks ``[H⁻¹]_BB`` kept up to date in between.
    """
    n, columns = w.shape
    rows = torch.arange(n, device=w.device)
    within = torch.arange(block, device=w.device)
    blocks = columns // block
    ids = torch.arange(blocks, device=w.device).expand(n, blocks).clone()  # stored block -> block
    alive = torch.ones(n, blocks, dtype=torch.bool, device=w.device)
    order = torch.empty(n, steps, dtype=torch.long, device=w.device)
    losses = torch.empty(n, steps, dtype=w.dtype, device=w.device)
    eye = torch.eye(block, dtype=w.dtype, device=w.device)
    size = blocks  # blocks stored

    def diagonal_blocks(matrix: Tensor) -> Tensor:  # (n, blocks, b, b), a copy
        return matrix.view(n, size, block, size, block).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).clone()

    diag = diagonal_blocks(hinv)
    lazy = max(1, _LAZY // block)  # removals per flush: a rank-(lazy·b) product
    us = torch.empty(n, columns, lazy * block, dtype=w.dtype, device=w.device)
    vs = torch.empty(n, lazy * block, columns, dtype=w.dtype, device=w.device)
    pending = 0  # removals since the last flush
    for t in range(steps):
        remaining = blocks - t
        shrink = remaining <= _SHRINK * size
        if pending == lazy or (shrink and pending):
            hinv.baddbmm_(us[:, :, : pending * block], vs[:, : pending * block], alpha=-1.0)
            diag = diagonal_blocks(hinv)
            pending = 0
        if shrink:
            keep = alive.repeat_interleave(block, dim=1)
            hinv = _principal(hinv, keep)
            w, ids = w[keep].view(n, remaining * block), ids[alive].view(n, remaining)
            diag = diag[alive].view(n, remaining, block, block)
            alive = torch.ones(n, remaining, dtype=torch.bool, device=w.device)
            size = remaining
            us, vs = us[:, : size * block].contiguous(), vs[:, :, : size * block].contiguous()
        # removed blocks get I (never chosen: their score is masked)
        lower = _block_cholesky(torch.where(alive[:, :, None, None], diag, eye))
        w_blocks = w.view(n, size, block)
        solved = torch.cholesky_solve(w_blocks.unsqueeze(-1), lower).squeeze(-1)  # ([H⁻¹]_BB)⁻¹ w_B
        scores = (w_blocks * solved).sum(-1).masked_fill_(~alive, math.inf)
        best, p = scores.min(dim=1)
        order[:, t] = ids[rows, p]
        losses[:, t] = best / 2
        cols = p.unsqueeze(1) * block + within  # (n, b) stored columns of the removed block
        band = hinv.gather(1, cols.unsqueeze(2).expand(n, block, hinv.shape[2]))  # H⁻¹[B, :], (n, b, C)
        if pending:
            m = pending * block
            picked = us[rows[:, None], cols, :m]  # (n, b, m)
            band.sub_(torch.bmm(picked, vs[:, :m]))
        w.sub_(torch.einsum("nbc,nb->nc", band, solved[rows, p]))
        w.scatter_(1, cols, 0.0)  # exactly, not up to rounding
        alive[rows, p] = False
        scaled = torch.cholesky_solve(band, lower[rows, p])  # ([H⁻¹]_BB)⁻¹ H⁻¹[B, :]
        # the diagonal blocks of the downdate, for every block at once
        diag.sub_(torch.einsum("nakc,nakd->nkcd", band.view(n, block, size, block), scaled.view(n, block, size, block)))
        us[:, :, pending * block : (pending + 1) * block] = band.transpose(1, 2)
        vs[:, pending * block : (pending + 1) * block] = scaled
        pending += 1
    return order, losses


def _principal(matrices: Tensor, keep: Tensor) -> Tensor:
    """``matrices[r][K_r, K_r]`` per row ``r``, ``K_r`` = where ``keep[r]`` (the same count per row).

    Two boolean selections, rows and then columns through the transpose (several times faster
    than one 3-index lookup or two gathers). The result is ``(M_KK)ᵀ``, which is ``M_KK`` for the
    symmetric inverse Hessians here up to the rounding of the updates (either is as good).
    """
    n, columns = keep.shape
    kept = columns - int((~keep[0]).sum())
    rows = matrices[keep].view(n, kept, columns)
    return rows.transpose(1, 2)[keep].view(n, kept, kept)


def _block_cholesky(systems: Tensor) -> Tensor:
    """Cholesky factors of the small SPD blocks, with extra dampening only for those that fail.

    The diagonal blocks of a kept set's ``H⁻¹`` are positive definite, but after many float32
    downdates one can lose that to rounding; it gets ``1e-6`` of its mean diagonal (then ten
    times more) rather than stopping the greedy.
    """
    lower, info = torch.linalg.cholesky_ex(systems)
    extra = 1e-6
    while bool((info != 0).any()):
        if extra > 1:
            raise RuntimeError("OBC: a block of the inverse Hessian is not positive definite; raise percdamp")
        failed = info != 0
        scale = systems.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(torch.finfo(systems.dtype).tiny)
        eye = torch.eye(systems.shape[-1], dtype=systems.dtype, device=systems.device)
        systems = torch.where(failed[..., None, None], systems + (extra * scale)[..., None, None] * eye, systems)
        lower, info = torch.linalg.cholesky_ex(systems)
        extra *= 10
    return lower
