"""An identity on a layer's output whose backward hands the output gradient to a callback.

Every tap also takes a shared scalar *anchor* that requires grad: the tapped
outputs then require grad even in a frozen model fed integer inputs, and
``torch.autograd.grad(loss, anchor)`` runs the backward exactly as far as the
earliest tap, computing no parameter gradient on the way.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class GradTap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output: Tensor, anchor: Tensor, on_grad: Callable[[Tensor], None]) -> Tensor:
        ctx.on_grad = on_grad
        ctx.anchor_meta = (anchor.dtype, anchor.device)
        # A clone, not the input itself: a returned input would be a view that an
        # in-place op downstream (ReLU(inplace=True)) is not allowed to modify.
        return output.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        # Only the first backward reports: a later one (the second-order pass goes back
        # through the forward graph) passes the gradient through like any identity.
        if ctx.on_grad is not None:
            ctx.on_grad(grad_output)
            ctx.on_grad = None  # drop the saved activation now, not when the graph dies
        dtype, device = ctx.anchor_meta
        return grad_output, torch.zeros((), dtype=dtype, device=device), None


def new_anchor(device: torch.device) -> Tensor:
    return torch.zeros((), device=device, requires_grad=True)
