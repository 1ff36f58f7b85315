"""Per-sample gradients of ``Conv1d/2d/3d`` weights and biases.

Within each group, one sample's weight gradient is a sum over output positions
``p`` of outer products: ``dW[o, (c, k)] = sum_p dY[o, p] * X_patches[(c, k), p]``,
a :class:`~..grads.LowRankGrad` of rank ``P``. With few positions it is built
by a batched matmul with the input's patches; with many positions a batched
(vmap) convolution weight-gradient kernel is faster and needs no patches: the rule
offers both and the kernel policy chooses (:mod:`..policy`). The rows that multiply the
weight (SPADE) are the patches.
"""

from __future__ import annotations

import math
from typing import Dict, FrozenSet, Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from ..call import CallInputs
from ..grads import DenseGrad, LowRankGrad, PerSampleGrad
from ..registry import register_rule
from ._im2col import im2col


def _padded_input(module: nn.Module, activation: Tensor):
    """The input as the convolution sees it, and the zero padding still to apply."""
    nd = len(module.kernel_size)
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        # 'same' may be asymmetric and padding modes are not zeros: pad explicitly,
        # exactly as the module's own forward does.
        pads = module._reversed_padding_repeated_twice
        if any(pads):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            activation = F.pad(activation, pads, mode=mode)
        return activation, (0,) * nd
    return activation, tuple(module.padding)


def _kernel_weight_grads(module: nn.Module, x: Tensor, grad_output: Tensor, padding) -> Tensor:
    """Per-sample weight gradients by the convolution's own weight-gradient kernel, vmapped."""
    weight = module.weight.detach()
    nd = len(module.kernel_size)

    def one_sample(xi: Tensor, dyi: Tensor) -> Tensor:
        return torch.ops.aten.convolution_backward(
            dyi.unsqueeze(0), xi.unsqueeze(0), weight, None, list(module.stride), list(padding),
            list(module.dilation), False, [0] * nd, module.groups, [False, True, False],
        )[1]

    return vmap(one_sample)(x, grad_output)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _kernel_pull_back(
    module: nn.Module, x: Tensor, grad_output: Tensor, padding, cotangent: Tensor, row_scale: Tensor
) -> List[Tuple[Tensor, Tensor]]:
    """The adjoint of the per-sample weight gradient ``dW_i = conv_weight_grad(x_i, dY_i)``:
    for a per-sample kernel ``C_i``, ``d/dY_i = conv(x_i, C_i)`` and ``d/dx_i =
    conv_transpose(dY_i, C_i)``, all samples at once as one convolution whose groups are
    (sample, group) pairs. Beats im2col + matmul + col2im by far at many positions."""
    with torch.no_grad():
        return _kernel_pull_back_untracked(module, x, grad_output, padding, cotangent, row_scale)


def _kernel_pull_back_untracked(
    module: nn.Module, x: Tensor, grad_output: Tensor, padding, cotangent: Tensor, row_scale: Tensor
) -> List[Tuple[Tensor, Tensor]]:
    n, nd = x.shape[0], len(module.kernel_size)
    groups = n * module.groups
    kernels = cotangent.mul_(row_scale.reshape(n, -1, *[1] * (cotangent.dim() - 2)))
    kernels = kernels.reshape(n * module.out_channels, *cotangent.shape[2:])
    geometry = dict(stride=module.stride, padding=padding, dilation=module.dilation, groups=groups)
    xd, gd = x.detach(), grad_output.detach()  # the pairs below keep the tracked x, grad_output
    d_grad_output = _CONV[nd](xd.reshape(1, -1, *xd.shape[2:]), kernels, **geometry)
    output_padding = [
        size - ((out - 1) * st - 2 * pad + dil * (k - 1) + 1)
        for size, out, st, pad, dil, k in zip(
            xd.shape[2:], gd.shape[2:], module.stride, padding, module.dilation, module.kernel_size
        )
    ]
    d_x = _CONV_TRANSPOSE[nd](gd.reshape(1, -1, *gd.shape[2:]), kernels, output_padding=output_padding, **geometry)
    return [(grad_output, d_grad_output.reshape(grad_output.shape)), (x, d_x.reshape(x.shape))]


def conv_input_rows(module: nn.Module, x: Tensor, max_elements: int) -> Iterator[Tensor]:
    """``(G, C_in/G * K, n * P)`` chunks: per group, every patch of the batch ``x``, one column
    each (entries in the order of the weight's flattened ``(C_in/G, *kernel)``), a chunk of
    samples whose patches hold at most about ``max_elements`` values at a time."""
    if x.dim() == len(module.kernel_size) + 1:  # an unbatched call
        x = x.unsqueeze(0)
    inflation = math.prod(max(1, -(-k // s)) for k, s in zip(module.kernel_size, module.stride))
    step = max(1, max_elements // max(1, x[0].numel() * inflation))
    groups = module.groups
    for start in range(0, x.shape[0], step):
        chunk, padding = _padded_input(module, x[start : start + step])
        cols = im2col(chunk, module.kernel_size, module.stride, module.dilation, padding)  # (n, C, K, P)
        n, channels, taps, positions = cols.shape
        grouped = cols.reshape(n, groups, (channels // groups) * taps, positions).permute(1, 2, 0, 3)
        yield grouped.reshape(groups, (channels // groups) * taps, n * positions)


def conv_per_sample_grads(
    module: nn.Module, inputs: CallInputs, grad_output: Tensor, names: FrozenSet[str]
) -> Dict[str, PerSampleGrad]:
    activation = inputs.arg(0, "input")
    batch = activation.shape[0]
    groups, out_channels = module.groups, module.out_channels
    positions = grad_output[0].numel() // out_channels
    grads: Dict[str, PerSampleGrad] = {}
    if "weight" in names:
        x, padding = _padded_input(module, activation)

        def patches(start: int, stop: int) -> Tensor:  # (n, G, P, J)
            cols = im2col(x[start:stop], module.kernel_size, module.stride, module.dilation, padding)
            if cols.shape[-1] != positions:
                raise RuntimeError(f"conv rule: {cols.shape[-1]} patches for {positions} output positions")
            return cols.reshape(stop - start, groups, -1, positions).transpose(-1, -2)

        materialize = pull_back = None
        if math.prod(module.kernel_size) > 1:  # a 1x1 kernel's patches are a view: no need
            def materialize(start: int, stop: int) -> Tensor:
                return _kernel_weight_grads(module, x[start:stop], grad_output[start:stop], padding)

            def pull_back(start: int, stop: int, cotangent: Tensor, row_scale: Tensor) -> List[Tuple[Tensor, Tensor]]:
                return _kernel_pull_back(
                    module, x[start:stop], grad_output[start:stop], padding, cotangent, row_scale
                )

        left = grad_output.reshape(batch, groups, out_channels // groups, positions)
        grads["weight"] = LowRankGrad(left, patches, module.weight.shape, materialize, pull_back)
    if "bias" in names:
        grads["bias"] = DenseGrad(grad_output.reshape(batch, out_channels, -1).sum(-1))
    return grads


register_rule(
    nn.Conv1d, nn.Conv2d, default=("weight",), subclasses=True, input_rows=conv_input_rows, name="conv"
)(conv_per_sample_grads)
# SPADE's solver is not set up for 3-d kernels: no input rows, so it leaves them dense
register_rule(nn.Conv3d, default=("weight",), subclasses=True, name="conv")(conv_per_sample_grads)
