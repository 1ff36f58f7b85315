"""Hugging Face's ``Conv1D`` (GPT-2's attention and MLP projections): a Linear stored transposed.

``y = x @ W + b`` with ``W`` of shape ``(nx, nf)`` = ``(in_features, out_features)``. Per
sample, ``dW = sum_t X[t]^T dY[t]`` and ``db = sum_t dY[t]``. The units are the *output*
features, the columns of ``W`` (index 1): the weight registers that grouping
(:func:`output_feature_units`), and its gradient is a :class:`TransposedLowRankGrad`
whose factor rows are the output features (``left = dY^T``, ``right = X``, as for a
Linear), so that the reductions' closed forms give the units, while
:meth:`~TransposedLowRankGrad.materialize` writes the parameter's own ``(nx, nf)`` layout.

``transformers`` is optional: without it this module registers nothing.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..call import CallInputs
from ..grads import DenseGrad, LowRankGrad, PerSampleGrad, batched_product
from ..registry import register_rule, register_units
from .linear import compact_factors

try:  # transformers is optional
    from transformers.pytorch_utils import Conv1D
except Exception:  # noqa: BLE001  (not installed, or broken: no rule then)
    Conv1D = None


def output_feature_units(per_sample_grad: Tensor, module: Optional[nn.Module] = None) -> Tensor:
    """``(B, nx, nf) -> (B, nf, nx)``: one unit per output feature (a column of the weight)."""
    return per_sample_grad.transpose(1, 2)


output_feature_units.storage_axis = 1  # the units are the weight's columns (registry.grouping_axis)


class TransposedLowRankGrad(LowRankGrad):
    """A :class:`~..grads.LowRankGrad` of a weight stored transposed, ``(J, R)`` = ``(nx, nf)``.

    The factors are those of the untransposed weight (rows = units = the ``R`` output
    features, under :attr:`row_grouping`); :meth:`materialize` and :meth:`pull_back` work
    in the parameter's own layout, ``g^T = right^T @ left^T``, as every other form does.
    One group only (``G = 1``).
    """

    def materialize(self, start: int, stop: int, out: Optional[Tensor] = None, direct: bool = False) -> Tensor:
        left, right = self.factors(start, stop)
        # (n, 1, J, P) @ (n, 1, P, R): the transposed product, in the parameter's layout
        return batched_product(right.transpose(-1, -2), left.transpose(-1, -2), out).view(stop - start, *self.shape)

    def pull_back(
        self, start: int, stop: int, cotangent: Tensor, row_scale: Tensor, direct: bool = False
    ) -> List[Tuple[Tensor, Tensor]]:
        """As :meth:`PerSampleGrad.pull_back`: ``cotangent (n, J, R)``, ``row_scale (n, J)``
        along the parameter's first axis (the input features here)."""
        left, right = self.factors(start, stop)
        n, inputs, outputs = stop - start, self.shape[0], self.shape[1]
        with torch.no_grad():
            c = (cotangent.reshape(n, inputs, outputs) * row_scale.reshape(n, inputs, 1)).unsqueeze(1)
            d_right = left.transpose(-1, -2) @ c.transpose(-1, -2)  # (n, 1, P, J)
            d_left = c.transpose(-1, -2) @ right.transpose(-1, -2)  # (n, 1, R, P)
        return [(left, d_left), (right, d_right)]


def hf_conv1d_per_sample_grads(
    module: nn.Module, inputs: CallInputs, grad_output: Tensor, names: FrozenSet[str]
) -> Dict[str, PerSampleGrad]:
    activation = inputs.arg(0, "x")
    batch, nx, nf = activation.shape[0], module.nx, module.nf
    dy = grad_output.reshape(batch, -1, nf)
    grads: Dict[str, PerSampleGrad] = {}
    if "weight" in names:
        live_dy, x = compact_factors(dy, activation.reshape(batch, -1, nx))  # the live positions only
        x = x.unsqueeze(1)  # (B, 1, T, nx)
        left = live_dy.transpose(1, 2).unsqueeze(1)  # (B, 1, nf, T)
        grads["weight"] = TransposedLowRankGrad(
            left, lambda start, stop: x[start:stop], module.weight.shape, row_grouping=output_feature_units
        )
    if "bias" in names:
        grads["bias"] = DenseGrad(dy.sum(1))
    return grads


if Conv1D is not None:
    register_rule(Conv1D, default=("weight",), subclasses=True, name="hf_conv1d", positionwise=True)(
        hf_conv1d_per_sample_grads
    )
    register_units(Conv1D, param="weight", num_units=lambda module: module.nf)(output_feature_units)
