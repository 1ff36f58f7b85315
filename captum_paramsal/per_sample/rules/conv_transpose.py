"""Per-sample gradients of ``ConvTranspose1d/2d/3d`` weights and biases.

A transposed convolution is the adjoint of a convolution with the same
geometry, so its weight gradient swaps roles: the layer's input plays the
convolution's output gradient and the output gradient's patches play the
convolution's input. Units of the weight ``(C_in, C_out/groups, *k)`` are the
output channels.
"""

from __future__ import annotations

from typing import Dict, FrozenSet

import torch
from torch import Tensor, nn

from ..call import CallInputs
from ..grads import ChunkedGrad, DenseGrad, PerSampleGrad
from ..registry import register_rule, register_units
from ._im2col import im2col

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@register_rule(*_TRANSPOSED, default=("weight",), subclasses=True, name="conv_transpose")
def conv_transpose_per_sample_grads(
    module: nn.Module, inputs: CallInputs, grad_output: Tensor, names: FrozenSet[str]
) -> Dict[str, PerSampleGrad]:
    activation = inputs.arg(0, "input")
    batch = activation.shape[0]
    groups = module.groups
    in_channels, out_channels = module.in_channels, module.out_channels
    grads: Dict[str, PerSampleGrad] = {}
    if "weight" in names:
        positions = activation[0].numel() // in_channels

        def weight_grads(start: int, stop: int) -> Tensor:
            n = stop - start
            cols = im2col(
                grad_output[start:stop], module.kernel_size, module.stride, module.dilation, module.padding
            )
            if cols.shape[-1] != positions:
                # output_padding >= stride (legal when it is below the dilation) adds whole
                # windows past the last input position; they touch no weight, drop them.
                grid = [
                    (size + 2 * pad - dil * (k - 1) - 1) // st + 1
                    for size, k, st, dil, pad in zip(
                        grad_output.shape[2:], module.kernel_size, module.stride, module.dilation, module.padding
                    )
                ]
                cols = cols.reshape(*cols.shape[:-1], *grid)
                cols = cols[(..., *(slice(0, size) for size in activation.shape[2:]))]
            cols = cols.reshape(n, groups, -1, positions)
            x = activation[start:stop].reshape(n, groups, in_channels // groups, positions)
            return torch.matmul(x, cols.transpose(-1, -2)).reshape(n, *module.weight.shape)

        grads["weight"] = ChunkedGrad(batch, weight_grads)
    if "bias" in names:
        grads["bias"] = DenseGrad(grad_output.reshape(batch, out_channels, -1).sum(-1))
    return grads


@register_units(*_TRANSPOSED, param="weight", num_units=lambda module: module.out_channels)
def output_channel_units(per_sample_grad: Tensor, module: nn.Module) -> Tensor:
    """``(B, C_in, C_out/g, *k) -> (B, C_out, C_in/g * K)``: one unit per output channel."""
    batch, in_channels, out_per_group = per_sample_grad.shape[:3]
    groups = module.groups
    g = per_sample_grad.reshape(batch, groups, in_channels // groups, out_per_group, -1)
    return g.transpose(2, 3).reshape(batch, groups * out_per_group, -1)
