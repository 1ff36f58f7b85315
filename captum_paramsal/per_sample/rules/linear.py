"""``Linear``: per-sample weight and bias gradients, any number of leading dims.

For one sample with positions ``t`` (a sequence, or a single one):
``dW = sum_t dY[t]^T X[t]``, a :class:`~..grads.LowRankGrad` of rank ``T`` (fewer where some
positions' output gradient is zero in every sample: :func:`live_positions`), and
``db = sum_t dY[t]``. The rows that multiply the weight (SPADE) are the input
vectors at every position.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from ..call import CallInputs
from ..grads import DenseGrad, LowRankGrad, PerSampleGrad
from ..policy import compacts_positions
from ..registry import register_rule


def live_positions(dy: Tensor) -> Optional[Tensor]:
    """The positions (dim 1 of ``dy (B, T, O)``) where some sample's output gradient is not zero,
    where they are at most half of them; else None (also where the device does not check:
    :func:`~..policy.compacts_positions`).

    A zero position adds nothing to a per-sample gradient ``sum_t dY[t]^T X[t]``, so leaving it out
    of the factors is exact and lowers their rank: in a causal model under a loss at the last
    position, the language-model head and every layer of the last block after its attention have
    rank 1, not T; under a loss at position k, every layer has rank k + 1. Dropping fewer than
    half the positions would save less than copying the live ones costs (the causal-LM loss
    leaves the last position alone without a gradient), so the two middle positions are read
    first and the whole gradient only where one of them is zero. A NaN counts as not zero."""
    steps = dy.shape[1]
    if steps < 2 or not compacts_positions(dy.device):
        return None
    with torch.no_grad():
        if bool(dy[:, (steps - 1) // 2].any()) and bool(dy[:, steps // 2].any()):
            return None  # a dead prefix or suffix of half the positions would hold a middle one
        live = dy.any(2).any(0)
        found = live.nonzero().squeeze(1)
    if 2 * found.numel() > steps:
        return None
    # no live position at all (an output that does not reach the loss): one zero position, rank 1
    return found if found.numel() else found.new_zeros(1)


def compact_factors(dy: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
    """``dy (B, T, O)`` and ``x (B, T, I)`` at :func:`live_positions` only (as they are where all are live)."""
    live = live_positions(dy)
    if live is None:
        return dy, x
    return dy.index_select(1, live), x.index_select(1, live)


def linear_input_rows(module: nn.Module, x: Tensor, max_elements: int) -> Iterator[Tensor]:
    """``(1, in_features, N)`` chunks: every input vector of ``x``, one column each, at most
    ``max_elements`` values a chunk."""
    rows = x.reshape(-1, module.in_features)
    step = max(1, max_elements // max(1, module.in_features))
    for start in range(0, rows.shape[0], step):
        yield rows[start : start + step].T.unsqueeze(0)


@register_rule(
    nn.Linear, default=("weight",), subclasses=True, input_rows=linear_input_rows, name="linear", positionwise=True
)
def linear_per_sample_grads(
    module: nn.Module, inputs: CallInputs, grad_output: Tensor, names: FrozenSet[str]
) -> Dict[str, PerSampleGrad]:
    activation = inputs.arg(0, "input")
    batch = activation.shape[0]
    dy = grad_output.reshape(batch, -1, module.out_features)
    grads: Dict[str, PerSampleGrad] = {}
    if "weight" in names:
        live_dy, x = compact_factors(dy, activation.reshape(batch, -1, module.in_features))
        x = x.unsqueeze(1)  # (B, 1, T, I)
        left = live_dy.transpose(1, 2).unsqueeze(1)  # (B, 1, O, T)
        grads["weight"] = LowRankGrad(left, lambda start, stop: x[start:stop], module.weight.shape)
    if "bias" in names:
        grads["bias"] = DenseGrad(dy.sum(1))
    return grads
