"""``Linear``: per-sample weight and bias gradients, any number of leading dims.

For one sample with positions ``t`` (a sequence, or a single one):
``dW = sum_t dY[t]^T X[t]``, a :class:`~..grads.LowRankGrad` of rank ``T``,
and ``db = sum_t dY[t]``. The rows that multiply the weight (SPADE) are the input
vectors at every position.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Iterator

from torch import Tensor, nn

from ..call import CallInputs
from ..grads import DenseGrad, LowRankGrad, PerSampleGrad
from ..registry import register_rule


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
        x = activation.reshape(batch, 1, -1, module.in_features)  # (B, 1, T, I)
        left = dy.transpose(1, 2).unsqueeze(1)  # (B, 1, O, T)
        grads["weight"] = LowRankGrad(left, lambda start, stop: x[start:stop], module.weight.shape)
    if "bias" in names:
        grads["bias"] = DenseGrad(dy.sum(1))
    return grads
