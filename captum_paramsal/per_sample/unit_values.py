"""From a parameter's per-sample gradients to its units, and back for a second derivative.

:func:`reduce_to_units` turns the per-sample gradients of one parameter (one
:class:`~.grads.PerSampleGrad` per call of its layer) into ``(B, units)`` by the first of:

1. the reduction's closed form on the gradient's factors (:meth:`~.reductions.Reduction.low_rank`),
   which never builds the gradient;
2. the reduction's compiled kernel, where the kernel policy compiles;
3. the gradient built a workspace's worth of samples at a time and reduced.

:func:`units_pull_back` is the adjoint the second-order pass needs: the cotangents of
``sum(weights * units)`` with respect to what each call's rule was given, through the
rules' own pull-backs rather than autograd over ``n x numel`` values.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .grads import LowRankGrad, PerSampleGrad
from .policy import KernelPolicy
from .reductions import Reduction
from .registry import default_grouping, grouping_axis
from .selection import SelectedParameter


class Workspace:
    """A scratch buffer per dtype and device, grown on demand, shared by the layers of a pass.

    One buffer, touched once, instead of a fresh allocation per chunk: on CPU the page
    faults of fresh multi-megabyte allocations cost more than the matmuls that fill them.
    """

    def __init__(self) -> None:
        self._buffers: Dict[Tuple[torch.dtype, torch.device], Tensor] = {}

    def get(self, values: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        buffer = self._buffers.get((dtype, device))
        if buffer is None or buffer.numel() < values:
            buffer = torch.empty(values, dtype=dtype, device=device)
            self._buffers[(dtype, device)] = buffer
        return buffer[:values]


def oriented(p: SelectedParameter, grads: List[PerSampleGrad]) -> Tuple[SelectedParameter, List[PerSampleGrad]]:
    """``(p, grads)`` with low-rank gradients turned so that their rows are ``p``'s units.

    A unit scheme may take a 2-D weight's units along the axis its rule's factors do not
    have as rows (a head reads columns of the output projection). Such gradients are
    transposed (:meth:`~.grads.LowRankGrad.transposed`: no values are built), and ``p`` gets
    the grouping of the transposed layout, so that closed forms, compiled kernels and the
    dense path all see rows as units. Anything else is returned as it is."""
    axis = grouping_axis(p.grouping)
    if axis is None or p.param.dim() != 2 or not grads or any(not isinstance(g, LowRankGrad) for g in grads):
        return p, grads
    if all(g.rows_are_units(p.grouping) for g in grads):
        return p, grads
    turned = []
    for g in grads:
        row_axis = grouping_axis(g.row_grouping or default_grouping)
        flipped = g.transposed() if row_axis is not None and row_axis != axis else None
        if flipped is None:
            return p, grads
        turned.append(flipped)
    return dataclasses.replace(p, grouping=default_grouping), turned


def closed_form_applies(p: SelectedParameter, grads: List[PerSampleGrad], reduction: Reduction) -> bool:
    """Whether :meth:`~.reductions.Reduction.low_rank` gives the units: units along index 0,
    one call (or any number, for an additive reduction), low-rank factors of a rank the
    reduction has a closed form for."""
    if not grads or (len(grads) > 1 and not reduction.additive):
        return False
    for g in grads:
        if g.rank is None or not g.rows_are_units(p.grouping):
            return False
        _, rows, rank, entries = g.factor_shape
        if not reduction.has_low_rank(rank, rows, entries):
            return False
    return True


def samples_per_chunk(
    p: SelectedParameter, grads: List[PerSampleGrad], reduction: Reduction, policy: KernelPolicy
) -> int:
    """How many samples a chunk may hold: all when a closed form applies, else a workspace's worth."""
    p, grads = oriented(p, grads)
    if closed_form_applies(p, grads, reduction):
        return grads[0].batch
    return policy.samples_per_chunk(p.param.numel())


def _closed_form(grads: List[PerSampleGrad], reduction: Reduction) -> Tensor:
    batch = grads[0].batch
    parts = [reduction.low_rank(*g.factors(0, batch)) for g in grads]
    return sum(parts[1:], parts[0])


def _compiles(p: SelectedParameter, grads: List[PerSampleGrad], kernel, policy: KernelPolicy) -> bool:
    return (
        kernel is not None
        and len(grads) == 1
        and grads[0].rows_are_units(p.grouping)
        and policy.compiles(grads[0])
    )


def _compiled(p: SelectedParameter, grads: List[PerSampleGrad], reduction: Reduction, policy: KernelPolicy):
    """The units by the reduction's compiled kernel, chunked to a workspace's worth of
    factors; None where it does not apply or compiling failed."""
    if not _compiles(p, grads, reduction.compiled_low_rank, policy):
        return None
    g = grads[0]
    if torch.is_grad_enabled() and g.left.requires_grad:  # the kernel is not differentiated
        return None
    groups, rows, rank, entries = g.factor_shape
    chunk = policy.samples_per_chunk(groups * rank * (rows + entries))
    parts = []
    for start in range(0, g.batch, chunk):
        stop = min(start + chunk, g.batch)
        left, right = g.factors(start, stop)
        if torch.is_grad_enabled() and right.requires_grad:
            return None
        units = policy.kernels.run(reduction.compiled_low_rank, left.flatten(0, 1), right.flatten(0, 1))
        if units is None:
            return None
        parts.append(units.reshape(stop - start, -1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def reduce_to_units(
    p: SelectedParameter,
    grads: List[PerSampleGrad],
    batch: int,
    reduction: Reduction,
    policy: KernelPolicy,
    workspace: Workspace,
) -> Tensor:
    """``(B, units)`` of the sum of ``grads`` over calls (see the module docstring)."""
    p, grads = oriented(p, grads)
    if not grads:  # no call's output reached the loss: the gradient is zero
        return torch.zeros(batch, p.num_units, dtype=p.param.dtype, device=p.param.device)
    if closed_form_applies(p, grads, reduction):
        return _closed_form(grads, reduction)
    if len(grads) == 1:
        shortcut = grads[0].units_by(reduction.reduce, p.grouping)
        if shortcut is not None:
            return shortcut
    compiled = _compiled(p, grads, reduction, policy)
    if compiled is not None:
        return compiled
    numel = max(1, p.param.numel())
    chunk = policy.samples_per_chunk(numel)
    buffer = workspace.get(min(chunk, batch) * numel, p.param.dtype, p.param.device)
    rows = []
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        dense = grads[0].materialize(start, stop, buffer[: (stop - start) * numel], direct=policy.direct(grads[0]))
        for g in grads[1:]:
            dense = dense + g.materialize(start, stop, direct=policy.direct(g))
        rows.append(reduction.reduce(p.grouping(dense, p.grouping_module), in_place=not dense.requires_grad))
    return torch.cat(rows) if len(rows) > 1 else rows[0]


def pull_back_chunk(
    p: SelectedParameter, grads: List[PerSampleGrad], reduction: Reduction, policy: KernelPolicy
) -> int:
    """Samples per chunk of the second-order pass: :func:`samples_per_chunk`, halved where
    the compiled pull-back runs (it writes the signs once and reads them twice: half a
    workspace of them stays in cache; a whole one was slower on a 32 MiB L3)."""
    p, grads = oriented(p, grads)
    chunk = samples_per_chunk(p, grads, reduction, policy)
    if _compiles(p, grads, reduction.compiled_pull_back, policy) and not closed_form_applies(p, grads, reduction):
        chunk = max(1, chunk // 2)
    return chunk


def units_pull_back(
    p: SelectedParameter,
    grads: List[PerSampleGrad],
    weights: Tensor,
    reduction: Reduction,
    policy: KernelPolicy,
    workspace: Workspace,
) -> Optional[List[Tuple[Tensor, Tensor]]]:
    """``(tensor, cotangent)`` pairs of ``sum(weights * units)`` through the rules' own
    :meth:`~.grads.PerSampleGrad.pull_back`, or None where that does not apply (a closed
    form, which autograd differentiates cheaply; a reduction or a rule without a
    pull-back): the caller then lets autograd go through :func:`reduce_to_units`.

    By hand rather than by autograd through the dense gradient, whose reduction and its
    backward would each pass over ``n x numel`` values: the dense gradient is built once
    into the workspace, turned in place into the reduction's direction (``sgn`` for
    ``mean_abs``), scaled per unit by the weight and the reduction's unit scale, and
    handed to each call's rule. Where the policy compiles, the reduction's compiled
    pull-back does all of it from the factors.
    """
    p, grads = oriented(p, grads)
    if not reduction.pulls_back or p.grouping is not default_grouping or closed_form_applies(p, grads, reduction):
        return None
    if len(grads) == 1 and type(grads[0]).units_by is not PerSampleGrad.units_by:
        return None  # a form with its own shortcut (sparse rows): autograd through it is cheaper
    batch, numel = weights.shape[0], p.param.numel()
    if _compiles(p, grads, reduction.compiled_pull_back, policy):
        left, right = grads[0].factors(0, batch)
        with torch.no_grad():
            cotangents = policy.kernels.run(
                reduction.compiled_pull_back,
                left.flatten(0, 1), right.flatten(0, 1), weights.reshape(left.shape[:-1]).flatten(0, 1),
            )
        if cotangents is not None:
            d_left, d_right = cotangents
            return [(left, d_left.view(left.shape)), (right, d_right.view(right.shape))]
    with torch.no_grad():
        buffer = workspace.get(batch * numel, p.param.dtype, p.param.device)
        dense = grads[0].materialize(0, batch, buffer, direct=policy.direct(grads[0]))
        for g in grads[1:]:
            dense += g.materialize(0, batch, direct=policy.direct(g))
        pulled = reduction.dense_pull_back(dense.view(batch, p.num_units, -1))
        if pulled is None:
            return None
        direction, unit_scale = pulled
        direction = direction.view(dense.shape)
        row_scale = weights * unit_scale
    pairs: List[Tuple[Tensor, Tensor]] = []
    for i, g in enumerate(grads):
        # a rule may overwrite the cotangent it is given: the last one gets the original
        cotangent = direction if i == len(grads) - 1 else direction.clone()
        part = g.pull_back(0, batch, cotangent, row_scale, direct=policy.direct(g))
        if part is None:
            return None
        pairs += part
    return pairs
