"""Patches of a batched N-d signal, the shared step of the convolution rules."""

from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor


def im2col(
    x: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    padding: Sequence[int],
) -> Tensor:
    """Sliding windows of ``x`` ``(B, C, *spatial)`` as ``(B, C, K, P)``.

    ``K`` is the number of kernel taps (``prod(kernel_size)``, in weight order)
    and ``P`` the number of output positions (row-major), for a convolution
    with the given geometry and symmetric zero ``padding``.
    """
    batch, channels = x.shape[:2]
    nd = len(kernel_size)
    taps = math.prod(kernel_size)
    if taps == 1 and not any(padding):
        # A 1x1 kernel's patches are the (strided) input itself: a view, no copy.
        x = x[(slice(None), slice(None), *(slice(None, None, s) for s in stride))]
        return x.reshape(batch, channels, 1, -1)
    if nd <= 2:
        # F.unfold is a fused im2col kernel for 2-d; a 1-d signal is a 2-d one of height 1.
        def lift(values: Sequence[int], fill: int) -> tuple:
            return tuple(values) if nd == 2 else (fill, *values)

        x2 = x if nd == 2 else x.unsqueeze(2)
        cols = F.unfold(
            x2,
            lift(kernel_size, 1),
            dilation=lift(dilation, 1),
            padding=lift(padding, 0),
            stride=lift(stride, 1),
        )
        return cols.view(batch, channels, taps, cols.shape[-1])
    # General N-d: Tensor.unfold per spatial dim (a view), dilation by striding the window.
    if any(padding):
        pads = [p for p in reversed(padding) for _ in range(2)]
        x = F.pad(x, pads)
    for dim, (k, s, d) in enumerate(zip(kernel_size, stride, dilation)):
        x = x.unfold(2 + dim, d * (k - 1) + 1, s)
        if d > 1:
            x = x[..., ::d]
    # (B, C, *out, *kernel) -> (B, C, *kernel, *out)
    order = (0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
    x = x.permute(order)
    return x.reshape(batch, channels, taps, -1)
