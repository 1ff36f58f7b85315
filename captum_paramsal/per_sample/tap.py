"""An identity on a layer's output tensors whose backward hands their gradients to a callback.

Every tap also takes a shared scalar *anchor* that requires grad: the tapped
outputs then require grad even in a frozen model fed integer inputs, and
``torch.autograd.grad(loss, anchor)`` runs the backward exactly as far as the
earliest tap, computing no parameter gradient on the way. A layer with several
output tensors (an LSTM's ``(output, (h_n, c_n))``) is tapped once for all of them:
the callback gets every gradient at once, zeros for an output the loss did not use.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .call import is_tapped


class GradTap(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, anchor: Tensor, on_grad: Callable[[List[Tensor]], None], *outputs: Tensor
    ) -> Tuple[Tensor, ...]:
        ctx.on_grad = on_grad
        ctx.anchor_meta = (anchor.dtype, anchor.device)
        # Clones, not the inputs themselves: a returned input would be a view that an
        # in-place op downstream (ReLU(inplace=True)) is not allowed to modify.
        return tuple(output.clone() for output in outputs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Tuple[Optional[Tensor], ...]:
        # Only the first backward reports: a later one (the second-order pass goes back
        # through the forward graph) passes the gradient through like any identity.
        if ctx.on_grad is not None:
            ctx.on_grad(list(grads))
            ctx.on_grad = None  # drop the saved inputs now, not when the graph dies
        dtype, device = ctx.anchor_meta
        return (torch.zeros((), dtype=dtype, device=device), None, *grads)


def tap_output(output: Any, anchor: Tensor, on_grad: Callable[[List[Tensor]], None]) -> Any:
    """``output`` with its floating tensors tapped; ``on_grad`` gets their gradients, in
    :func:`~.call.output_tensors` order among the tapped ones. Returns ``output`` unchanged
    where it holds no such tensor."""
    leaves, spec = tree_flatten(output)
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and is_tapped(leaf)]
    if not positions:
        return output
    tapped = GradTap.apply(anchor, on_grad, *(leaves[i] for i in positions))
    for i, value in zip(positions, tapped):
        leaves[i] = value
    if isinstance(output, Tensor):
        return leaves[0]
    return tree_unflatten(leaves, spec)


def new_anchor(device: torch.device) -> Tensor:
    return torch.zeros((), device=device, requires_grad=True)
