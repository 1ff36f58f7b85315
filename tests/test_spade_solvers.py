"""The SPADE layer solvers: SparseGPT's mask re-chosen every ``mask_every`` columns, and OBC's greedy
per-row OBS against a brute force, its allocation over rows, its trajectory, and bad input."""

from __future__ import annotations

import pytest
import torch

import captum_paramsal.spade.obc as obc_module
from captum_paramsal.spade import OBCTrajectory, obc_prune, obc_trajectory, sparsegpt_prune
from captum_paramsal.spade.solver import (
    _as_groups,
    _check_shapes,
    _compute_dtype,
    check_percdamp,
    check_sparsity,
    inverse_hessian_factor,
    sparsegpt_mask_and_weights,
)


def _old_sparsegpt(weight, hessian, sparsity, blocksize=128, percdamp=0.01):
    """``sparsegpt_mask_and_weights`` as it was before ``mask_every`` (copied verbatim): the mask
    chosen once per block of ``blocksize`` columns."""
    sparsity = check_sparsity(sparsity)
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
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

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        block = w[..., i1:i2].clone()
        quantized = torch.zeros_like(block)
        errors = torch.zeros_like(block)
        u_block = upper[:, i1:i2, i1:i2]
        # this block's share of the exact layer budget (the cumulative rounding telescopes)
        k = round(sparsity * per_column * i2) - round(sparsity * per_column * i1)
        prune = torch.zeros(block.shape, dtype=torch.bool, device=block.device)
        if k > 0:
            scores = block.square() / u_block.diagonal(dim1=-2, dim2=-1).square().unsqueeze(1)
            # topk, not a threshold: ties cannot push the count past the budget
            prune.view(-1)[scores.reshape(-1).topk(k, largest=False).indices] = True
        for i in range(count):
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


# --------------------------------------------------------------------------- shared


def correlated_inputs(samples, columns, generator, dtype=torch.float64, rank=None):
    """Calibration inputs (rows) with correlated columns, so that the OBS corrections matter."""
    rank = rank or columns
    x = torch.randn(samples, rank, dtype=dtype, generator=generator) @ torch.randn(
        rank, columns, dtype=dtype, generator=generator
    )
    return x + 0.1 * torch.randn(samples, columns, dtype=dtype, generator=generator)


def damped(hessian, percdamp=0.01):
    """``H + percdamp * mean(diag H) I`` per group, written out plainly."""
    eye = torch.eye(hessian.shape[-1], dtype=hessian.dtype)
    return hessian + percdamp * hessian.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * eye


def error(weight, pruned, x):
    """``||X (W - W')ᵀ||²`` summed over groups: the reconstruction error both solvers minimize."""
    return float(((weight - pruned) @ x.transpose(-1, -2)).square().sum())


# --------------------------------------------------------------------------- SparseGPT, mask_every


def naive_sparsegpt_every(weight, hessian, sparsity, mask_every, percdamp=0.01):
    """Textbook sequential OBS with frozen columns and no lazy blocks: explicit ``inv(H[q:, q:])`` at
    every column; at every column ``i`` with ``i % mask_every == 0`` the mask of ``i : i + mask_every``
    is chosen from the current (corrected) weights."""
    h = damped(hessian, percdamp)
    w = weight.clone()
    rows, columns = w.shape
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i in range(columns):
        if i % mask_every == 0:
            j2 = min(i + mask_every, columns)
            d = torch.stack([torch.linalg.inv(h[q:, q:])[0, 0] for q in range(i, j2)])
            scores = w[:, i:j2] ** 2 / d
            k = round(sparsity * rows * j2) - round(sparsity * rows * i)
            chosen = torch.zeros(scores.numel(), dtype=torch.bool)
            chosen[scores.flatten().argsort()[:k]] = True
            mask[:, i:j2] = chosen.view(rows, j2 - i)
        hinv = torch.linalg.inv(h[i:, i:])
        for r in mask[:, i].nonzero().flatten():
            w[r, i:] -= w[r, i] / hinv[0, 0] * hinv[0]
    return mask, w


@pytest.mark.parametrize(
    "shape,blocksize,mask_every",
    [((12, 40), 16, 16), ((12, 40), 16, 100), ((2, 5, 27), 8, 8), ((16, 8 * 9), 128, 128), ((16, 300), 128, 128)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_every_blocksize_is_the_old_rule_bit_for_bit(shape, blocksize, mask_every, dtype):
    generator = torch.Generator().manual_seed(10)
    weight = torch.randn(*shape, generator=generator, dtype=dtype)
    x = correlated_inputs(60, shape[-1], generator, dtype=dtype).expand(*shape[:-2], 60, shape[-1])
    hessian = 2 * x.transpose(-1, -2) @ x
    expected_mask, expected = _old_sparsegpt(weight, hessian, 0.6, blocksize=blocksize)
    mask, got = sparsegpt_mask_and_weights(weight, hessian, 0.6, blocksize=blocksize, mask_every=mask_every)
    assert torch.equal(mask, expected_mask)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("blocksize,mask_every", [(128, 1), (128, 3), (4, 3), (5, 2), (3, 1)])
def test_mask_every_matches_textbook_obs(blocksize, mask_every):
    generator = torch.Generator().manual_seed(11)
    x = correlated_inputs(64, 10, generator)
    weight = torch.randn(5, 10, dtype=torch.float64, generator=generator)
    hessian = 2 * x.T @ x
    mask, got = sparsegpt_mask_and_weights(weight, hessian, 0.6, blocksize=blocksize, mask_every=mask_every)
    expected_mask, expected = naive_sparsegpt_every(weight, hessian, 0.6, mask_every)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(16, 100), (16, 8 * 9), (2, 8, 4 * 9), (24, 3 * 9)])
@pytest.mark.parametrize("mask_every", [1, 9, 128])
@pytest.mark.parametrize("sparsity", [0.37, 0.5, 0.9, 0.99])
def test_mask_every_budget_is_exact(shape, mask_every, sparsity):
    generator = torch.Generator().manual_seed(12)
    weight = torch.randn(*shape, generator=generator)
    x = torch.randn(*shape[:-2], 50, shape[-1], generator=generator)
    mask, pruned = sparsegpt_mask_and_weights(weight, 2 * x.transpose(-1, -2) @ x, sparsity, mask_every=mask_every)
    assert int(mask.sum()) == int((pruned == 0).sum()) == round(sparsity * weight.numel())
    assert bool((pruned[mask] == 0).all())


@pytest.mark.parametrize("mask_every", [0, -1, 1.5, True, "9", None])
def test_mask_every_must_be_a_positive_int(mask_every):
    with pytest.raises(ValueError, match="mask_every"):
        sparsegpt_prune(torch.ones(2, 4), torch.eye(4), sparsity=0.5, mask_every=mask_every)


def test_mask_every_one_is_no_worse_than_per_block():
    generator = torch.Generator().manual_seed(13)
    every, block = [], []
    for _ in range(3):
        x = correlated_inputs(400, 144, generator, dtype=torch.float32, rank=48)
        weight = torch.randn(32, 144, generator=generator)
        hessian = 2 * x.T @ x
        for sparsity in (0.5, 0.9):
            every.append(error(weight, sparsegpt_prune(weight, hessian, sparsity=sparsity, mask_every=1), x))
            block.append(error(weight, sparsegpt_prune(weight, hessian, sparsity=sparsity, mask_every=128), x))
    print(f"SparseGPT ||X(W-W')ᵀ||², mask_every=1: {[round(e, 1) for e in every]}")
    print(f"SparseGPT ||X(W-W')ᵀ||², mask_every=128: {[round(e, 1) for e in block]}")
    assert sum(every) <= sum(block)


# --------------------------------------------------------------------------- OBC: references


def brute_force_obs(w0, hd, block=1):
    """One row's greedy by brute force: at each step try removing every remaining block, refit the
    kept weights by least squares (``H_KK w_K = (H w0)_K``) and keep the removal of least error
    ``½ (w - w0)ᵀ H (w - w0)``. Returns the removal order, the step losses and the weights after each step."""
    columns = w0.shape[0]
    kept = list(range(columns // block))
    target = hd @ w0
    order, losses, weights, previous = [], [], [], 0.0
    while kept:
        best = None
        for candidate in kept:
            cols = [c for b in kept if b != candidate for c in range(b * block, (b + 1) * block)]
            w = torch.zeros_like(w0)
            if cols:
                w[cols] = torch.linalg.solve(hd[cols][:, cols], target[cols])
            loss = float((w - w0) @ hd @ (w - w0)) / 2
            if best is None or loss < best[0]:
                best = (loss, candidate, w)
        order.append(best[1])
        losses.append(best[0] - previous)
        weights.append(best[2])
        previous = best[0]
        kept.remove(best[1])
    return order, losses, weights


def replay(w0, hd, removals, block=1):
    """The sequential OBS updates of one row for a given removal order, eagerly and plainly."""
    w, hinv = w0.clone(), torch.linalg.inv(hd)
    for b in removals:
        cols = list(range(b * block, (b + 1) * block))
        inverse = torch.linalg.inv(hinv[cols][:, cols])
        w -= hinv[:, cols] @ inverse @ w[cols]
        hinv -= hinv[:, cols] @ inverse @ hinv[cols, :]
        w[cols] = 0
    return w


def plain_obc(w0, hd, steps, block=1):
    """One row's OBC greedy written plainly (eager updates): the order and losses it should record."""
    w, hinv = w0.clone(), torch.linalg.inv(hd)
    kept = list(range(w0.shape[0] // block))
    order, losses = [], []
    for _ in range(steps):
        scores = {}
        for b in kept:
            cols = list(range(b * block, (b + 1) * block))
            scores[b] = float(w[cols] @ torch.linalg.inv(hinv[cols][:, cols]) @ w[cols]) / 2
        chosen = min(kept, key=lambda b: scores[b])
        order.append(chosen)
        losses.append(scores[chosen])
        kept.remove(chosen)
        cols = list(range(chosen * block, (chosen + 1) * block))
        inverse = torch.linalg.inv(hinv[cols][:, cols])
        w = w - hinv[:, cols] @ inverse @ w[cols]
        w[cols] = 0
        hinv = hinv - hinv[:, cols] @ inverse @ hinv[cols, :]
    return order, losses


def plain_allocation(losses, n):
    """Per row, how many steps: running max per row, then ``n`` times the cheapest next step over
    the rows (ties: the earlier step, then the lower row)."""
    running = []
    for row in losses:
        out, top = [], -float("inf")
        for value in row:
            top = max(top, value)
            out.append(top)
        running.append(out)
    taken = [0] * len(losses)
    for _ in range(n):
        candidates = [(running[r][taken[r]], taken[r], r) for r in range(len(losses)) if taken[r] < len(losses[r])]
        taken[min(candidates)[2]] += 1
    return taken


def layer(generator, shape, samples=40, dtype=torch.float64):
    """A random weight, its Hessian and its inputs (``(N, C)``, or ``(G, N, C)``: each group its own)."""
    weight = torch.randn(*shape, dtype=dtype, generator=generator)
    if weight.dim() == 2:
        x = correlated_inputs(samples, shape[-1], generator, dtype=dtype)
    else:
        x = torch.stack([correlated_inputs(samples, shape[-1], generator, dtype=dtype) for _ in range(shape[0])])
    return weight, 2 * x.transpose(-1, -2) @ x, x


def per_row(weight, hessian):
    """``(w0, H_damped)`` for every row of every group, in the flattened row order."""
    w = weight.reshape(-1, weight.shape[-1])
    hd = damped(hessian if hessian.dim() == 3 else hessian.unsqueeze(0))
    rows_per_group = weight.shape[-2]
    return [(w[r], hd[r // rows_per_group]) for r in range(w.shape[0])]


# --------------------------------------------------------------------------- OBC against brute force


@pytest.fixture(params=[32, 2], ids=["lazy32", "lazy2"])
def lazy(request, monkeypatch):
    """Run the OBC tests both with the default lazy batch and with a flush every two removals."""
    monkeypatch.setattr(obc_module, "_LAZY", request.param)
    return request.param


@pytest.mark.parametrize("shape", [(3, 6), (2, 3, 6)])
def test_obc_order_and_losses_are_brute_force_obs(shape, lazy):
    weight, hessian, _ = layer(torch.Generator().manual_seed(20), shape)
    trajectory = obc_trajectory(weight, hessian, percdamp=0.01, max_sparsity=1.0)
    assert trajectory.order.shape == (*shape[:-1], 6) and trajectory.losses.dtype == torch.float64
    order, losses = trajectory.order.reshape(-1, 6), trajectory.losses.reshape(-1, 6)
    for r, (w0, hd) in enumerate(per_row(weight, hessian)):
        expected_order, expected_losses, _ = brute_force_obs(w0, hd)
        assert order[r].tolist() == expected_order
        torch.testing.assert_close(losses[r], torch.tensor(expected_losses, dtype=torch.float64), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(3, 6), (2, 3, 6)])
@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.8])
def test_obc_masks_and_weights_are_brute_force_obs(shape, sparsity, lazy):
    weight, hessian, _ = layer(torch.Generator().manual_seed(21), shape)
    mask, pruned = obc_trajectory(weight, hessian, max_sparsity=1.0).at(sparsity)
    rows = per_row(weight, hessian)
    brute = [brute_force_obs(w0, hd) for w0, hd in rows]
    taken = plain_allocation([losses for _, losses, _ in brute], round(sparsity * weight.numel()))
    expected_mask = torch.zeros(len(rows), 6, dtype=torch.bool)
    expected = torch.zeros(len(rows), 6, dtype=torch.float64)
    replayed = torch.zeros_like(expected)
    for r, ((order, _, weights), k) in enumerate(zip(brute, taken)):
        expected_mask[r, order[:k]] = True
        expected[r] = weights[k - 1] if k else rows[r][0]
        replayed[r] = replay(rows[r][0], rows[r][1], order[:k])
    assert torch.equal(mask.reshape(-1, 6), expected_mask)
    torch.testing.assert_close(pruned.reshape(-1, 6), expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pruned.reshape(-1, 6), replayed, rtol=1e-9, atol=1e-9)
    assert bool((pruned[mask] == 0).all())


@pytest.mark.parametrize("shape,block", [((3, 8), 2), ((2, 2, 9), 3)])
def test_obc_blocks_are_brute_force_obs_over_blocks(shape, block, lazy):
    weight, hessian, _ = layer(torch.Generator().manual_seed(22), shape)
    blocks = shape[-1] // block
    trajectory = obc_trajectory(weight, hessian, block=block)
    order, losses = trajectory.order.reshape(-1, blocks), trajectory.losses.reshape(-1, blocks)
    rows = per_row(weight, hessian)
    brute = [brute_force_obs(w0, hd, block) for w0, hd in rows]
    for r, (expected_order, expected_losses, _) in enumerate(brute):
        assert order[r].tolist() == expected_order
        torch.testing.assert_close(losses[r], torch.tensor(expected_losses, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    mask, pruned = trajectory.at(0.5)
    n = round(0.5 * len(rows) * blocks)
    assert int(mask.sum()) == int((pruned == 0).sum()) == block * n
    taken = plain_allocation([b[1] for b in brute], n)
    for r, ((expected_order, _, weights), k) in enumerate(zip(brute, taken)):
        removed = {c // block for c in mask.reshape(-1, shape[-1])[r].nonzero().flatten().tolist()}
        assert removed == set(expected_order[:k])
        torch.testing.assert_close(
            pruned.reshape(-1, shape[-1])[r], weights[k - 1] if k else rows[r][0], rtol=1e-9, atol=1e-9
        )
        torch.testing.assert_close(
            pruned.reshape(-1, shape[-1])[r], replay(rows[r][0], rows[r][1], expected_order[:k], block), rtol=1e-9,
            atol=1e-9,
        )


@pytest.mark.parametrize("block", [1, 4])
def test_obc_lazy_updates_and_shrinking_match_the_plain_greedy(block):
    # 48 columns: several lazy flushes (every 32 removals) and many shrinks of the stored inverses
    weight, hessian, _ = layer(torch.Generator().manual_seed(23), (2, 48), samples=80)
    steps = 48 // block
    trajectory = obc_trajectory(weight, hessian, block=block)
    for r, (w0, hd) in enumerate(per_row(weight, hessian)):
        order, losses = plain_obc(w0, hd, steps, block)
        assert trajectory.order[r].tolist() == order
        expected = torch.tensor(losses, dtype=torch.float64)
        torch.testing.assert_close(trajectory.losses[r], expected, rtol=1e-8, atol=1e-8)


# --------------------------------------------------------------------------- OBC: allocation, trajectory


def test_obc_gives_the_cheap_row_more_of_the_budget():
    generator = torch.Generator().manual_seed(24)
    weight, hessian, _ = layer(generator, (2, 20))
    weight[0] *= 0.01  # row 0 costs 10⁻⁴ as much to prune
    mask, pruned = obc_prune(weight, hessian, 0.5)
    assert int(mask.sum()) == 20
    assert int(mask[0].sum()) > int(mask[1].sum())
    print(f"pruned per row at 0.5: {mask.sum(1).tolist()}")
    # capping each row at the layer sparsity forces an equal split: why rows run to the end by default
    capped, _ = obc_trajectory(weight, hessian, max_sparsity=0.5, max_row_sparsity=0.5).at(0.5)
    assert capped.sum(1).tolist() == [10, 10]


@pytest.mark.parametrize("shape", [(16, 36), (2, 8, 36)])
@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.5, 0.9, 0.99])
def test_obc_budget_is_exact(shape, sparsity):
    generator = torch.Generator().manual_seed(25)
    weight = torch.randn(*shape, generator=generator)
    x = torch.randn(*shape[:-2], 80, shape[-1], generator=generator)
    mask, pruned = obc_prune(weight, 2 * x.transpose(-1, -2) @ x, sparsity)
    assert int(mask.sum()) == int((pruned == 0).sum()) == round(sparsity * weight.numel())
    assert bool((pruned[mask] == 0).all()) and pruned.dtype == weight.dtype and pruned.shape == weight.shape


def test_obc_masks_are_prefixes_of_each_rows_order():
    weight, hessian, _ = layer(torch.Generator().manual_seed(26), (6, 12))
    trajectory = obc_trajectory(weight, hessian, max_sparsity=0.9)
    previous = torch.zeros(weight.shape, dtype=torch.bool)
    for sparsity in (0.1, 0.3, 0.5, 0.7, 0.9):
        mask, _ = trajectory.at(sparsity)
        for r in range(6):
            k = int(mask[r].sum())
            assert set(mask[r].nonzero().flatten().tolist()) == set(trajectory.order[r, :k].tolist())
        assert bool((mask | ~previous).all())  # a higher sparsity only adds to the mask
        previous = mask


@pytest.mark.parametrize("block", [1, 9])
def test_trajectory_at_is_obc_prune_from_scratch(block):
    generator = torch.Generator().manual_seed(27)
    weight = torch.randn(2, 6, 4 * 9, generator=generator)
    x = torch.randn(2, 100, 4 * 9, generator=generator)
    hessian = 2 * x.transpose(1, 2) @ x
    trajectory = obc_trajectory(weight, hessian, block=block, max_sparsity=0.95)
    assert isinstance(trajectory, OBCTrajectory) and trajectory.blocks_per_row == 36 // block
    for sparsity in (0.0, 0.25, 0.5, 0.8, 0.95):
        mask, pruned = trajectory.at(sparsity)
        expected_mask, expected = obc_prune(weight, hessian, sparsity, block=block)
        assert torch.equal(mask, expected_mask)
        assert torch.equal(pruned, expected)


def test_obc_float32_is_close_to_float64():
    generator = torch.Generator().manual_seed(28)
    x = correlated_inputs(300, 64, generator, rank=24)
    weight = torch.randn(16, 64, dtype=torch.float64, generator=generator)
    hessian = 2 * x.T @ x
    for sparsity in (0.5, 0.9):
        _, exact = obc_prune(weight, hessian, sparsity)
        mask, single = obc_prune(weight.float(), hessian.float(), sparsity)
        assert single.dtype == torch.float32
        assert error(weight, single.double(), x) <= error(weight, exact, x) * 1.01


def test_obc_dtypes_and_sparsity_zero():
    generator = torch.Generator().manual_seed(29)
    weight = torch.randn(4, 8, generator=generator).to(torch.bfloat16)
    x = torch.randn(30, 8, generator=generator)
    mask, pruned = obc_prune(weight, 2 * x.T @ x, 0.5)
    assert pruned.dtype == torch.bfloat16 and int(mask.sum()) == int((pruned == 0).sum()) == 16
    trajectory = obc_trajectory(weight, 2 * x.T @ x, max_sparsity=0.5)
    assert trajectory.losses.dtype == torch.float32 and trajectory.order.shape == (4, 8)
    capped = obc_trajectory(weight, 2 * x.T @ x, max_sparsity=0.5, max_row_sparsity=0.6)
    assert capped.order.shape == (4, 5) and torch.equal(capped.order, trajectory.order[:, :5])
    mask, pruned = trajectory.at(0)
    assert not bool(mask.any()) and torch.equal(pruned, weight) and pruned is not weight
    empty = obc_trajectory(weight, 2 * x.T @ x, max_sparsity=0.0)
    assert empty.order.shape == (4, 0) and not bool(empty.at(0.0)[0].any())


def test_obc_bad_input():
    weight, hessian = torch.randn(3, 6), torch.eye(6)
    for block in (0, -2, 4, 1.5, True):
        with pytest.raises(ValueError, match="block"):
            obc_trajectory(weight, hessian, block=block)
    trajectory = obc_trajectory(weight, hessian, max_sparsity=0.5)
    with pytest.raises(ValueError, match="max_sparsity"):
        trajectory.at(0.6)
    for max_sparsity in (-0.1, 1.5, "0.5", None):
        with pytest.raises(ValueError, match="max_sparsity"):
            obc_trajectory(weight, hessian, max_sparsity=max_sparsity)
        with pytest.raises(ValueError, match="max_row_sparsity"):
            obc_trajectory(weight, hessian, max_row_sparsity=max_sparsity)
    with pytest.raises(ValueError, match="at least max_sparsity"):
        obc_trajectory(weight, hessian, max_sparsity=0.5, max_row_sparsity=0.4)
    with pytest.raises(ValueError, match="sparsity must be in"):
        obc_prune(weight, hessian, 1.0)
    with pytest.raises(TypeError, match="sparsity"):
        obc_prune(weight, hessian, "0.5")
    with pytest.raises(ValueError, match="percdamp"):
        obc_prune(weight, hessian, 0.5, percdamp=-1)
    with pytest.raises(ValueError, match="must be"):
        obc_prune(torch.randn(6), hessian, 0.5)
    with pytest.raises(ValueError, match="does not match"):
        obc_prune(weight, torch.eye(5), 0.5)
    with pytest.raises(ValueError, match="does not match"):
        obc_prune(torch.randn(2, 3, 6), torch.eye(6).expand(3, 6, 6), 0.5)


# --------------------------------------------------------------------------- the objective


def test_obc_reconstructs_no_worse_than_sparsegpt():
    generator = torch.Generator().manual_seed(30)
    errors = {"obc": [], "sparsegpt, mask_every=128": [], "sparsegpt, mask_every=1": []}
    for _ in range(3):
        x = correlated_inputs(300, 72, generator, dtype=torch.float32, rank=24)
        weight = torch.randn(16, 72, generator=generator)
        hessian = 2 * x.T @ x
        trajectory = obc_trajectory(weight, hessian, max_sparsity=0.9)
        for sparsity in (0.5, 0.7, 0.9):
            errors["obc"].append(error(weight, trajectory.at(sparsity)[1], x))
            errors["sparsegpt, mask_every=128"].append(
                error(weight, sparsegpt_prune(weight, hessian, sparsity=sparsity, mask_every=128), x)
            )
            errors["sparsegpt, mask_every=1"].append(
                error(weight, sparsegpt_prune(weight, hessian, sparsity=sparsity, mask_every=1), x)
            )
    for name, values in errors.items():
        print(f"{name:>24}: ||X(W-W')ᵀ||² {[round(v, 1) for v in values]}, total {sum(values):.1f}")
    assert sum(errors["obc"]) <= sum(errors["sparsegpt, mask_every=128"])
    assert sum(errors["obc"]) <= sum(errors["sparsegpt, mask_every=1"])
