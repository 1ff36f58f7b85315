"""``mean_abs`` of a low-rank per-sample gradient in one compiled pass (opt-in).

The units of a gradient ``g = left @ right`` (``left (m, R, P)``, ``right (m, P, J)``,
rank ``P`` over output positions) are ``mean_j |sum_p left[r, p] * right[p, j]|``.
Eagerly that is a batched matmul writing all ``m * R * J`` products, then ``abs`` and
``mean`` reading them back: at small ``P`` the matmul is bound by those writes, and
the three passes dominate the engine's time (a ResNet's deep layers at small inputs).
``torch.compile`` fuses the sum over ``p`` into the reduction over ``j``, so each
product lives in a register and nothing of size ``m * R * J`` is written.

Costs: each distinct shape compiles once per process (about a second after the first
compilation, which takes several; inductor caches the generated code on disk), and
the CPU needs a C++ compiler (a GPU, triton). Where compiling fails, the engine warns
once and goes on with the eager path. Opt in with ``ParameterSaliency(...,
compile_kernels=True)``.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional

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


_compiled: Dict[str, Optional[Callable[[Tensor, Tensor], Tensor]]] = {}


def _kernel(device_type: str) -> Optional[Callable[[Tensor, Tensor], Tensor]]:
    if device_type not in _compiled:
        # static shapes (dynamo would otherwise turn every dim dynamic after the second
        # shape, and dynamic inner sizes defeat the vectorization); the batch dim is
        # marked dynamic per call instead
        _compiled[device_type] = torch.compile(low_rank_abs_mean, dynamic=False, fullgraph=True)
    return _compiled[device_type]


def fused_low_rank_abs_mean(left: Tensor, right: Tensor) -> Optional[Tensor]:
    """:func:`low_rank_abs_mean` compiled, or None where compiling failed on this device
    type (after one warning); the caller then takes the eager path."""
    kernel = _kernel(left.device.type)
    if kernel is None:
        return None
    left, right = left.contiguous(), right.contiguous()  # vectorized along j
    if left.shape[0] > 1:  # one kernel for every chunk size of a layer
        torch._dynamo.mark_dynamic(left, 0)
        torch._dynamo.mark_dynamic(right, 0)
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return kernel(left, right)
    except Exception as error:  # no C++ compiler, no triton, an unsupported dtype ...
        _compiled[left.device.type] = None
        warnings.warn(
            f"compile_kernels: torch.compile failed on {left.device.type} ({type(error).__name__}: {error}); "
            "using the eager kernels for the rest of this process",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
