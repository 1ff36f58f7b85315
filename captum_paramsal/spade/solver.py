"""Sparse reconstruction of one layer: the OBS / SparseGPT-style solver behind SPADE.

A prunable layer computes ``Y = W X`` with ``W`` of shape ``(R, C)`` (rows = outputs, columns =
inputs; for a convolution the columns are the unfolded patch ``C_in/groups * k * k``) and ``X``
the inputs it saw on the calibration data. Given ``H = 2 X Xᵀ`` we look for a ``W'`` with the
requested number of zeros that keeps ``||W' X - W X||²`` small. Two solvers live here:

* :func:`sparsegpt_prune`, the fast one (Frantar & Alistarh, 2023): the columns are visited left
  to right; every ``mask_every`` columns the mask of the next ``mask_every`` columns is chosen by
  the OBS error ``w² / [H_F⁻¹]_qq`` (read off the upper Cholesky factor of ``H⁻¹``); each pruned
  weight's error is spread over the columns to its right with the OBS correction (lazily, a block
  of ``blocksize`` columns at a time). Weights already visited are frozen (this is what makes it
  fast, and what makes it an approximation). :mod:`.obc` holds the slower greedy OBC solver.
* :func:`exact_reconstruction`, for a mask that is already fixed: each row's kept weights are the
  exact least-squares reconstruction ``w_K = H_KK⁻¹ (H w)_K`` (equivalently, the OBS update that
  removes the row's whole pruned set at once). SparseGPT's frozen columns mean that running it
  with a given mask is *not* optimal for that mask, so a given mask goes through this solver.

Both take a leading *group* dimension, ``W (G, R, C)`` and ``H (G, C, C)``, so that grouped and
depthwise convolutions are solved per group in one batched call (a plain layer is ``G = 1``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

#: bytes of per-row systems built at once by :func:`exact_reconstruction`
_EXACT_CHUNK_BYTES = 1 << 27


def dampened_hessian(hessian: Tensor, percdamp: float) -> Tensor:
    """``H + λI`` with ``λ = percdamp * mean(diag H)`` per group; dead inputs made harmless.

    An input that was zero on every calibration row has a zero row and column in ``H``. It is
    decoupled from the others, and pruning its weights costs nothing on the calibration data, so it
    gets a small positive curvature (the dampening, or ``1e-8`` of the mean diagonal when
    ``percdamp`` is 0): its OBS error ``w²·ε`` is then tiny and it is pruned first.

    Examples::

        >>> h = dampened_hessian(2 * x.T @ x, percdamp=0.01)     # (C, C) or (G, C, C)
    """
    h = hessian.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    mean = diag.mean(-1, keepdim=True)
    scale = torch.where(mean > 0, mean, torch.ones_like(mean))  # a wholly dead layer: unit scale
    dead = diag <= 0
    if bool(dead.any()):
        diag.copy_(torch.where(dead, scale * max(percdamp, 1e-8), diag))
    diag.add_(percdamp * scale)
    return h


def _cholesky_with_retry(h: Tensor, upper: bool = False) -> Tuple[Tensor, Tensor]:
    """Cholesky factor of ``h`` (batched); on failure, add more dampening and try again.

    Float32 Hessians of highly correlated inputs can lose positive definiteness to rounding; ten
    times more dampening per retry is what SparseGPT users do by hand. Returns ``(factor, h used)``.
    """
    scale = h.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(h.dtype).tiny)
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    extra = 1e-6
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(h, upper=upper)
        if not bool((info != 0).any()):
            return factor, h
        h = h + (extra * scale)[..., None, None] * eye
        extra *= 10
    raise RuntimeError(
        "the layer's dampened Hessian is not positive definite even with extra dampening; "
        "raise percdamp or use float64"
    )


def inverse_hessian_factor(hessian: Tensor, percdamp: float = 0.01) -> Tensor:
    """The upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``H⁻¹ = UᵀU``), batched over groups.

    Row ``q`` of ``U`` is row ``q`` of ``(H_F)⁻¹`` for ``F = {q, ..., C-1}``, scaled by the square
    root of its diagonal: everything the OBS update for column ``q`` needs once the columns left of
    it are fixed, for all ``q`` from one factorization (the SparseGPT trick).

    Computed without forming ``H⁻¹``: with ``J`` the reversal permutation and ``J H J = L̃ L̃ᵀ``,
    ``U = J L̃⁻¹ J``. One Cholesky factorization and one triangular inverse, several times faster
    on a CPU than inverting and factorizing again, and one rounding step fewer.

    Examples::

        >>> u = inverse_hessian_factor(2 * x.T @ x, percdamp=0.01)
        >>> torch.allclose(u.T @ u, torch.linalg.inv(dampened_hessian(2 * x.T @ x, 0.01)))
        True
    """
    flipped = dampened_hessian(hessian, percdamp).flip(-2, -1)
    lower, _ = _cholesky_with_retry(flipped)
    eye = torch.eye(lower.shape[-1], dtype=lower.dtype, device=lower.device).expand_as(lower)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(-2, -1)


def _as_groups(weight: Tensor, hessian: Tensor) -> Tuple[Tensor, Tensor, bool]:
    if weight.dim() == 2 and hessian.dim() == 2:
        return weight.unsqueeze(0), hessian.unsqueeze(0), True
    if weight.dim() == 3 and hessian.dim() == 3:
        return weight, hessian, False
    raise ValueError(
        f"weight and hessian must be (R, C) and (C, C), or (G, R, C) and (G, C, C); "
        f"got {tuple(weight.shape)} and {tuple(hessian.shape)}"
    )


def _check_shapes(w: Tensor, h: Tensor, mask: Optional[Tensor]) -> None:
    groups, _, columns = w.shape
    if h.shape != (groups, columns, columns):
        raise ValueError(f"hessian of shape {tuple(h.shape)} does not match weight of shape {tuple(w.shape)}")
    if mask is not None and mask.shape != w.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match weight of shape {tuple(w.shape)}")


def _compute_dtype(weight: Tensor) -> torch.dtype:
    # half-precision weights are solved in float32; float64 stays float64 (the exactness tests)
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: Optional[float] = None,
    mask: Optional[Tensor] = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    mask_every: int = 1,
) -> Tensor:
    r"""Prune ``weight`` to ``sparsity`` and reconstruct it for the inputs summarized by ``hessian``.

    The mask is chosen segment by segment (``mask_every`` columns): at column ``i`` with
    ``i % mask_every == 0`` (counted in the whole layer), the weights of columns
    ``i : i + mask_every`` (already corrected for all the pruning to their left) are scored by the
    OBS error ``w_rq² / U_qq²`` and the lowest-scoring entries of the *whole segment* (all rows
    and groups together, not a fixed count per row) are pruned. Each segment prunes its share of
    the layer's budget, ``round(s·G·R·j₂) - round(s·G·R·j₁)`` for columns ``j₁:j₂``, so the layer
    ends with exactly ``round(sparsity * weight.numel())`` zeros. Re-choosing often lets the mask
    see the corrections of the weights pruned just before; SparseGPT itself chooses once per
    ``blocksize`` block, the SPADE authors' fast variant every ``kh·kw`` columns for a convolution
    (one input channel's kernel) and every column for a Linear layer. Since every segment prunes
    only its proportional share, a small ``mask_every`` also spreads the sparsity evenly over the
    columns (over the input channels, with ``kh·kw``): an input that is dead on the calibration
    data is no longer pruned whole, only its share.

    The OBS corrections are applied lazily, a block of ``blocksize`` columns at a time (the speed
    of SparseGPT); this changes only the rounding, not the result. When ``mask_every`` is smaller
    than ``blocksize``, a block is the largest multiple of ``mask_every`` not above ``blocksize``
    columns, so that no segment straddles two blocks; ``mask_every >= blocksize`` is the same as
    ``mask_every == blocksize`` (one mask per block, SparseGPT's original rule).

    With ``mask`` given, the solver skips the selection and returns the exact reconstruction for
    that mask (:func:`exact_reconstruction`), since SparseGPT's frozen columns are not optimal for
    a fixed mask.

    Args:
        weight: ``(R, C)`` or ``(G, R, C)`` (groups of a grouped convolution).
        hessian: ``(C, C)`` or ``(G, C, C)``, ``2 X Xᵀ`` up to a positive factor (the solution does
            not depend on the scale; the dampening is relative to the mean diagonal).
        sparsity: fraction of weights to prune, in ``[0, 1)``.
        mask: boolean, ``True`` = prune; instead of ``sparsity``.
        blocksize: columns per lazy-update block (SparseGPT uses 128).
        percdamp: dampening ``λ = percdamp * mean(diag H)``.
        mask_every: the mask is re-chosen every this many columns (a positive int; default 1, every
            column). Pass ``kh * kw`` for a convolution and 1 for a Linear layer, as the SPADE
            authors' fast variant does; ``blocksize`` (or more) gives SparseGPT's per-block mask.

    Returns:
        The pruned weight, the shape and dtype of ``weight`` (pruned entries exactly zero).

    Examples::

        >>> x = torch.randn(256, 32)                       # calibration inputs (rows)
        >>> layer = torch.nn.Linear(32, 16)
        >>> pruned = sparsegpt_prune(layer.weight.detach(), 2 * x.T @ x, sparsity=0.75)
        >>> int((pruned == 0).sum())
        384
    """
    if (sparsity is None) == (mask is None):
        raise ValueError("give exactly one of sparsity and mask")
    if mask is not None:
        return exact_reconstruction(weight, hessian, mask, percdamp=percdamp)
    return sparsegpt_mask_and_weights(weight, hessian, sparsity, blocksize, percdamp, mask_every=mask_every)[1]


def sparsegpt_mask_and_weights(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    blocksize: int = 128,
    percdamp: float = 0.01,
    mask_every: int = 1,
) -> Tuple[Tensor, Tensor]:
    """:func:`sparsegpt_prune` with a sparsity, returning ``(mask, pruned weight)`` (``True`` = pruned).

    Args:
        weight: ``(R, C)`` or ``(G, R, C)``.
        hessian: ``(C, C)`` or ``(G, C, C)``.
        sparsity: fraction of weights to prune, in ``[0, 1)``; exactly ``round(sparsity * numel)``.
        blocksize: columns per lazy-update block.
        percdamp: dampening ``λ = percdamp * mean(diag H)``.
        mask_every: columns per mask segment (see :func:`sparsegpt_prune`): ``kh * kw`` for a
            convolution and 1 for a Linear layer in the SPADE authors' fast variant.

    Examples::

        >>> mask, pruned = sparsegpt_mask_and_weights(layer.weight.detach(), 2 * x.T @ x, 0.5)
        >>> bool((pruned[mask] == 0).all())
        True
    """
    sparsity = check_sparsity(sparsity)
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if not isinstance(mask_every, int) or isinstance(mask_every, bool) or mask_every < 1:
        raise ValueError(f"mask_every must be a positive int, got {mask_every!r}")
    check_percdamp(percdamp)
    w, h, squeeze = _as_groups(weight, hessian)
    _check_shapes(w, h, None)
    if sparsity == 0:
        return torch.zeros(weight.shape, dtype=torch.bool, device=weight.device), weight.detach().clone()
    dtype = _compute_dtype(weight)
    w = w.detach().to(dtype).clone()
    groups, rows, columns = w.shape
    per_column = groups * rows  # weights in one column, all groups together
    upper = inverse_hessian_factor(h.detach().to(dtype), percdamp)
    mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    # a segment never straddles two lazy blocks: its scores must see every correction from the
    # left, and the columns past a block have not received the block's lazy update yet
    segment = min(mask_every, blocksize)
    step = blocksize if segment == blocksize else (blocksize // segment) * segment

    for i1 in range(0, columns, step):
        i2 = min(i1 + step, columns)
        count = i2 - i1
        block = w[..., i1:i2].clone()
        quantized = torch.zeros_like(block)
        errors = torch.zeros_like(block)
        u_block = upper[:, i1:i2, i1:i2]
        u_diag = u_block.diagonal(dim1=-2, dim2=-1).square().unsqueeze(1)
        prune = torch.zeros(block.shape, dtype=torch.bool, device=block.device)
        for i in range(count):
            j1 = i1 + i  # i1 is a multiple of segment, so segments start on layer multiples
            if j1 % segment == 0:
                j2 = min(j1 + segment, i2)
                # this segment's share of the exact layer budget (the cumulative rounding telescopes)
                k = round(sparsity * per_column * j2) - round(sparsity * per_column * j1)
                if k > 0:
                    # scored on the current block, already corrected for every pruning to the left
                    scores = block[..., i : i + j2 - j1].square() / u_diag[..., i : i + j2 - j1]
                    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=block.device)
                    # topk, not a threshold: ties cannot push the count past the budget
                    chosen.view(-1)[scores.reshape(-1).topk(k, largest=False).indices] = True
                    prune[..., i : i + j2 - j1] = chosen
            column = block[..., i]
            q = column.masked_fill(prune[..., i], 0.0)
            quantized[..., i] = q
            # OBS: remove (w - q) from column i, compensate with the columns to its right
            error = (column - q) / u_block[:, i, i].unsqueeze(1)
            block[..., i:] -= error.unsqueeze(2) * u_block[:, i, i:].unsqueeze(1)
            errors[..., i] = error
        w[..., i1:i2] = quantized
        mask[..., i1:i2] = prune
        # the lazy batch update: the whole block's corrections for the columns after it at once
        w[..., i2:] -= errors @ upper[:, i1:i2, i2:]

    if squeeze:
        w, mask = w.squeeze(0), mask.squeeze(0)
    return mask, w.to(weight.dtype)


def exact_reconstruction(weight: Tensor, hessian: Tensor, mask: Tensor, percdamp: float = 0.0) -> Tensor:
    r"""The best weights with ``mask`` pruned: per row, ``w_K = H_KK⁻¹ (H w)_K`` and ``w_P = 0``.

    ``K`` is the row's kept set, ``P`` its pruned set and ``H`` the dampened Hessian (exact least
    squares of the kept columns when ``percdamp = 0``). Each row is its own small system; rows
    are solved in batches padded to the largest system. Whichever side is smaller is solved:
    the kept set directly, or the pruned set through the OBS form
    ``w' = w - H⁻¹[:, P] (H⁻¹_PP)⁻¹ w_P`` (the same optimum).

    Args:
        weight: ``(R, C)`` or ``(G, R, C)``.
        hessian: ``(C, C)`` or ``(G, C, C)``.
        mask: boolean, the shape of ``weight``; ``True`` = prune.
        percdamp: dampening of ``H`` as in :func:`sparsegpt_prune` (default 0).

    Returns:
        The reconstructed weight, the shape and dtype of ``weight``.

    Examples::

        >>> mask = layer.weight.abs() < layer.weight.abs().median()      # magnitude pruning's mask
        >>> refit = exact_reconstruction(layer.weight.detach(), 2 * x.T @ x, mask)
    """
    check_percdamp(percdamp)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError("mask must be a boolean tensor (True = prune)")
    w, h, squeeze = _as_groups(weight, hessian)
    m = mask.unsqueeze(0) if squeeze else mask
    _check_shapes(w, h, m)
    dtype = _compute_dtype(weight)
    w = w.detach().to(dtype)
    h = dampened_hessian(h.detach().to(dtype), percdamp)
    groups, rows, columns = w.shape
    flat_w = w.reshape(groups * rows, columns)
    flat_m = m.reshape(groups * rows, columns).to(w.device)
    group_of_row = torch.arange(groups, device=w.device).repeat_interleave(rows)
    kept_max = int((~flat_m).sum(1).max())
    pruned_max = int(flat_m.sum(1).max())
    if pruned_max == 0:
        return weight.detach().clone()
    if kept_max <= pruned_max:
        target = (w @ h).reshape(groups * rows, columns)  # (H w)_row for every row (H symmetric)
        out = _solve_kept(target, h, flat_m, group_of_row, kept_max)
    else:
        lower, _ = _cholesky_with_retry(h)
        out = _solve_pruned(flat_w, torch.cholesky_inverse(lower), flat_m, group_of_row, pruned_max)
    out = out.masked_fill(flat_m, 0.0).reshape(groups, rows, columns)
    out = out.squeeze(0) if squeeze else out
    return out.to(weight.dtype)


def _padded_indices(select: Tensor, size: int) -> Tuple[Tensor, Tensor]:
    """Per row, the columns where ``select`` is True first (then the others), cut to ``size``."""
    order = torch.argsort((~select).to(torch.int8), dim=1, stable=True)[:, :size]
    valid = torch.arange(size, device=select.device).unsqueeze(0) < select.sum(1, keepdim=True)
    return order, valid


def _padded_system(h: Tensor, group: Tensor, index: Tensor, valid: Tensor) -> Tensor:
    """``H[index, index]`` per row, padded rows/columns replaced by the identity."""
    sub = h[group[:, None, None], index[:, :, None], index[:, None, :]]
    pair = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(index.shape[1], dtype=h.dtype, device=h.device).expand_as(sub)
    return torch.where(pair, sub, eye * (~valid).unsqueeze(1))


def _spd_solve(system: Tensor, rhs: Tensor) -> Tensor:
    """Solve the batched symmetric positive definite ``system`` for ``rhs`` ``(n, k)`` by Cholesky.

    Cholesky rather than ``torch.linalg.solve``: the systems are SPD (principal blocks of a
    dampened Hessian or of its inverse), and batched float32 LU in some MKL builds fails with
    "Pivots given to lu_solve must all be greater or equal to 1" once ``torch.set_num_threads``
    has been changed in the process (seen with torch 2.15 on CPU).
    """
    lower, _ = _cholesky_with_retry(system)
    return torch.cholesky_solve(rhs.unsqueeze(-1), lower).squeeze(-1)


def _row_chunk(size: int, columns: int, itemsize: int) -> int:
    return max(1, _EXACT_CHUNK_BYTES // max(1, (size * max(size, columns)) * itemsize))


def _solve_kept(target: Tensor, h: Tensor, prune: Tensor, group: Tensor, size: int) -> Tensor:
    out = torch.zeros_like(target)
    if size == 0:
        return out
    step = _row_chunk(size, 0, target.element_size())
    for start in range(0, target.shape[0], step):
        rows = slice(start, start + step)
        index, valid = _padded_indices(~prune[rows], size)
        system = _padded_system(h, group[rows], index, valid)
        rhs = torch.gather(target[rows], 1, index) * valid
        solution = _spd_solve(system, rhs)
        out[rows].scatter_(1, index, solution * valid)
    return out


def _solve_pruned(w: Tensor, hinv: Tensor, prune: Tensor, group: Tensor, size: int) -> Tensor:
    out = w.clone()
    columns = w.shape[1]
    every_column = torch.arange(columns, device=w.device)[None, :, None]
    step = _row_chunk(size, columns, w.element_size())
    for start in range(0, w.shape[0], step):
        rows = slice(start, start + step)
        index, valid = _padded_indices(prune[rows], size)
        system = _padded_system(hinv, group[rows], index, valid)
        multipliers = _spd_solve(system, torch.gather(w[rows], 1, index) * valid)
        # H⁻¹[:, P] per row: (n, C, |P|)
        cols = hinv[group[rows][:, None, None], every_column, index[:, None, :]]
        out[rows] -= torch.einsum("ncp,np->nc", cols, multipliers * valid)
    return out


def check_sparsity(sparsity: object, what: str = "sparsity") -> float:
    """``sparsity`` as a float in ``[0, 1)``; a clear error otherwise.

    Examples::

        >>> check_sparsity(0.9)
        0.9
        >>> check_sparsity(1.0)
        Traceback (most recent call last):
        ValueError: sparsity must be in [0, 1) (1 would prune every weight), got 1.0
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{what} must be a number in [0, 1), got {sparsity!r}")
    value = float(sparsity)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be in [0, 1) (1 would prune every weight), got {sparsity!r}")
    return value


def check_percdamp(percdamp: object) -> float:
    """``percdamp`` as a non-negative float; a clear error otherwise.

    Examples::

        >>> check_percdamp(0.01)
        0.01
    """
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not percdamp >= 0:
        raise ValueError(f"percdamp must be a non-negative number, got {percdamp!r}")
    return float(percdamp)
