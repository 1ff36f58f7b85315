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

The functions here are written plainly; :class:`~.reductions.MeanAbs` carries them as
its compiled kernels and the kernel policy (:mod:`.policy`) decides where they run.

Costs: each distinct shape compiles once per process (about a second after the first
compilation, which takes several; inductor caches the generated code on disk), and
the CPU needs a C++ compiler (a GPU, triton). Where compiling fails, the method that
asked warns once and goes on with the eager path. Opt in with ``ParameterSaliency(...,
compile_kernels=True)``.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Callable, Dict, Tuple

import torch
from torch import Tensor

from .._utils import outside_stacklevel

#: Distinct shapes one process may compile (a ResNet-50 has a few dozen).
RECOMPILE_LIMIT = 256


def low_rank_abs_mean(left: Tensor, right: Tensor) -> Tensor:
    """``(m, R)``: ``mean_j |sum_p left[:, r, p] * right[:, p, j]|``, written plainly."""
    total = left[:, :, 0, None] * right[:, None, 0, :]
    for p in range(1, left.shape[-1]):
        total = total + left[:, :, p, None] * right[:, None, p, :]
    return total.abs().mean(-1)


def low_rank_abs_mean_pull_back(left: Tensor, right: Tensor, weights: Tensor) -> Tuple[Tensor, Tensor]:
    """Cotangents of ``sum_r weights[:, r] * mean_j |g[:, r, j]|`` for ``g = left @ right``,
    with respect to ``left`` and ``right``, written plainly: ``d|g|/dg = sgn(g)`` (0 at 0,
    autograd's convention), recomputed from the factors in each of the two reductions
    (over ``j`` for ``left``, over ``r`` for ``right``) instead of stored."""
    positions = left.shape[-1]
    row_scale = weights / right.shape[-1]
    total = left[:, :, 0, None] * right[:, None, 0, :]
    for p in range(1, positions):
        total = total + left[:, :, p, None] * right[:, None, p, :]
    signs = torch.sgn(total)
    d_left = torch.stack([(signs * right[:, None, p, :]).sum(-1) for p in range(positions)], -1)
    scaled = left * row_scale[..., None]
    d_right = torch.stack([(scaled[:, :, p, None] * signs).sum(1) for p in range(positions)], 1)
    return d_left * row_scale[..., None], d_right


#: torch.compile'd wrappers per (function, device type): a cache shared by every kernel set,
#: since dynamo keeps what it compiled per code object anyway; whether compiling *works*
#: is each :class:`CompiledKernels`' own state, never the process's
_wrappers: Dict[Tuple[str, str], Callable[..., Any]] = {}
#: successful compiled runs per function name in this process (what tests check to tell a
#: compiled pass from one that silently took the eager path)
_runs: Counter = Counter()


def run_counts() -> Dict[str, int]:
    """``{kernel function name: successful compiled runs in this process}``."""
    return dict(_runs)


class CompiledKernels:
    """The compiled kernels of one attribution method: where compiling failed for a device
    type, this object (not the process) goes on with the eager path, after one warning."""

    def __init__(self) -> None:
        self.failed: Dict[Tuple[str, str], str] = {}
        self.runs: Counter = Counter()

    def run(self, function: Callable[..., Any], *tensors: Tensor) -> Any:
        """``function(*tensors)`` compiled for their device type, or None where compiling
        failed there (the caller then takes the eager path)."""
        device_type = tensors[0].device.type
        key = (function.__name__, device_type)
        if key in self.failed:
            return None
        if key not in _wrappers:
            # static shapes (dynamo would otherwise turn every dim dynamic after the second
            # shape, and dynamic inner sizes defeat the vectorization); the batch dim is
            # marked dynamic per call instead
            _wrappers[key] = torch.compile(function, dynamic=False, fullgraph=True)
        kernel = _wrappers[key]
        tensors = tuple(t.contiguous() for t in tensors)  # vectorized along the last dim
        if tensors[0].shape[0] > 1:  # one kernel for every chunk size of a layer
            for t in tensors:
                torch._dynamo.mark_dynamic(t, 0)
        try:
            config = torch._dynamo.config  # imported on first use: importing dynamo takes a while
            limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
            with config.patch(**{limit: RECOMPILE_LIMIT}):
                result = kernel(*tensors)
        except Exception as error:  # no C++ compiler, no triton, an unsupported dtype ...
            self.failed[key] = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"compile_kernels: torch.compile failed on {device_type} ({type(error).__name__}: {error}); "
                f"using the eager path instead of {function.__name__} for the rest of this attribution "
                "method's life",
                RuntimeWarning,
                stacklevel=outside_stacklevel(),
            )
            return None
        _runs[function.__name__] += 1
        self.runs[function.__name__] += 1
        return result
