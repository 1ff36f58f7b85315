"""``LayerNorm`` and ``RMSNorm``: per-sample gradients of the elementwise affine.

Both normalize each position over the trailing ``normalized_shape`` dims and then scale
(and, for LayerNorm, shift) elementwise: ``y = x_hat * weight (+ bias)``. So for one
sample ``dweight = sum_t dY[t] * x_hat[t]`` and ``dbias = sum_t dY[t]`` over its leading
positions ``t``, with ``x_hat`` recomputed from the saved input exactly as the layer
does (biased variance, the layer's ``eps``). Not in the default selection: norm
parameters are selected by name.
"""

from __future__ import annotations

from typing import Dict, FrozenSet

import torch
from torch import Tensor, nn

from ..call import CallInputs
from ..grads import DenseGrad, PerSampleGrad
from ..registry import register_rule


def _per_sample_sum(values: Tensor, batch: int, normalized: int) -> Tensor:
    """``(B, ..., *normalized_shape) -> (B, *normalized_shape)``: summed over the positions."""
    shape = values.shape[values.dim() - normalized:]
    return values.reshape(batch, -1, *shape).sum(1)


@register_rule(nn.LayerNorm, subclasses=True, name="layer_norm", positionwise=True)
def layer_norm_per_sample_grads(
    module: nn.Module, inputs: CallInputs, grad_output: Tensor, names: FrozenSet[str]
) -> Dict[str, PerSampleGrad]:
    x = inputs.arg(0, "input")
    batch, normalized = x.shape[0], len(module.normalized_shape)
    grads: Dict[str, PerSampleGrad] = {}
    if "weight" in names:
        dims = tuple(range(x.dim() - normalized, x.dim()))
        mean = x.mean(dims, keepdim=True)
        variance = x.var(dims, unbiased=False, keepdim=True)
        x_hat = (x - mean) * torch.rsqrt(variance + module.eps)
        grads["weight"] = DenseGrad(_per_sample_sum(grad_output * x_hat, batch, normalized))
    if "bias" in names:
        grads["bias"] = DenseGrad(_per_sample_sum(grad_output, batch, normalized))
    return grads


if hasattr(nn, "RMSNorm"):  # torch >= 2.4

    @register_rule(nn.RMSNorm, params=("weight",), subclasses=True, name="rms_norm", positionwise=True)
    def rms_norm_per_sample_grads(
        module: nn.Module, inputs: CallInputs, grad_output: Tensor, names: FrozenSet[str]
    ) -> Dict[str, PerSampleGrad]:
        x = inputs.arg(0, "input")
        batch, normalized = x.shape[0], len(module.normalized_shape)
        dims = tuple(range(x.dim() - normalized, x.dim()))
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        x_hat = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
        return {"weight": DenseGrad(_per_sample_sum(grad_output * x_hat, batch, normalized))}
