"""``mean_abs`` of a low-rank per-sample gradient in one compiled pass (opt-in).

The units of a gradient ``g = left @ right`` (``left (m, R, P)``, ``right (m, P, J)``,
rank ``P`` over output positions) are ``mean_j |sum_p left[r, p] * right[p, j]|``.
Eagerly that is a batched matmul writing all ``m * R * J`` products, then ``abs`` and
``mean`` reading them back: at small ``P`` the matmul is bound by those writes, and
the three passes dominate the engine's time (a ResNet's deep layers at small inputs).
``torch.compile`` fuses the sum over ``p`` into the reduction over ``j``, so each
product lives in a register and nothing of size ``m * R * J`` is written.
:func:`low_rank_abs_mean_pull_back` does the same for the input saliency's second
pass (the cotangents of the weighted units with respect to both factors); there
inductor still writes the signs ``sgn(g)`` once, since two reductions over different
axes read them, but skips the eager path's product and its separate ``sgn``.

Costs: each distinct shape compiles once per process (about a second after the first
compilation, which takes several; inductor caches the generated code on disk), and
the CPU needs a C++ compiler (a GPU, triton). Where compiling fails, the engine warns
once and goes on with the eager path. Opt in with ``ParameterSaliency(...,
compile_kernels=True)``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

#: The sum over positions is unrolled into the kernel: beyond this rank the eager
#: matmul (or the convolution's own weight-gradient kernel) is faster than the
#: unrolled loop, and compiling it takes longer.
MAX_FUSED_RANK = 16

#: Distinct shapes one process may compile (a ResNet-50 has a few dozen).
RECOMPILE_LIMIT = 256


def low_rank_abs_mean(left: Tensor, right: Tensor) -> Tensor:
    """``(m, R)``: ``mean_j |sum_p left[:, r, p] * right[:, p, j]|``, written plainly."""
    total = left[:, :, 0, None] * right[:, None, 0, :]
    for p in range(1, left.shape[-1]):
        total = total + left[:, :, p, None] * right[:, None, p, :]
    return total.abs().mean(-1)


def low_rank_abs_mean_pull_back(left: Tensor, right: Tensor, row_scale: Tensor) -> Tuple[Tensor, Tensor]:
    """Cotangents of ``sum_r row_scale[:, r] * sum_j |g[:, r, j]|`` for ``g = left @ right``,
    with respect to ``left`` and ``right``, written plainly: ``d|g|/dg = sgn(g)`` (0 at 0,
    autograd's convention), recomputed from the factors in each of the two reductions
    (over ``j`` for ``left``, over ``r`` for ``right``) instead of stored."""
    positions = left.shape[-1]
    total = left[:, :, 0, None] * right[:, None, 0, :]
    for p in range(1, positions):
        total = total + left[:, :, p, None] * right[:, None, p, :]
    signs = torch.sgn(total)
    d_left = torch.stack([(signs * right[:, None, p, :]).sum(-1) for p in range(positions)], -1)
    scaled = left * row_scale[..., None]
    d_right = torch.stack([(scaled[:, :, p, None] * signs).sum(1) for p in range(positions)], 1)
    return d_left * row_scale[..., None], d_right


#: compiled kernels per (function, device type); None once compiling failed there
_compiled: Dict[Tuple[str, str], Optional[Callable[..., Any]]] = {}


def _run_compiled(function: Callable[..., Any], *tensors: Tensor) -> Any:
    """``function(*tensors)`` compiled for their device type, or None where compiling
    failed there (after one warning); the caller then takes the eager path."""
    device_type = tensors[0].device.type
    key = (function.__name__, device_type)
    if key not in _compiled:
        # static shapes (dynamo would otherwise turn every dim dynamic after the second
        # shape, and dynamic inner sizes defeat the vectorization); the batch dim is
        # marked dynamic per call instead
        _compiled[key] = torch.compile(function, dynamic=False, fullgraph=True)
    kernel = _compiled[key]
    if kernel is None:
        return None
    tensors = tuple(t.contiguous() for t in tensors)  # vectorized along the last dim
    if tensors[0].shape[0] > 1:  # one kernel for every chunk size of a layer
        for t in tensors:
            torch._dynamo.mark_dynamic(t, 0)
    try:
        config = torch._dynamo.config  # imported on first use: importing dynamo takes a while
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
        with config.patch(**{limit: RECOMPILE_LIMIT}):
            return kernel(*tensors)
    except Exception as error:  # no C++ compiler, no triton, an unsupported dtype ...
        _compiled[key] = None
        warnings.warn(
            f"compile_kernels: torch.compile failed on {device_type} ({type(error).__name__}: {error}); "
            f"using the eager path instead of {function.__name__} for the rest of this process",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def fused_low_rank_abs_mean(left: Tensor, right: Tensor) -> Optional[Tensor]:
    """:func:`low_rank_abs_mean` compiled, or None (see :func:`_run_compiled`)."""
    return _run_compiled(low_rank_abs_mean, left, right)


def fused_low_rank_abs_mean_pull_back(
    left: Tensor, right: Tensor, row_scale: Tensor
) -> Optional[Tuple[Tensor, Tensor]]:
    """:func:`low_rank_abs_mean_pull_back` compiled, or None (see :func:`_run_compiled`)."""
    return _run_compiled(low_rank_abs_mean_pull_back, left, right, row_scale)
