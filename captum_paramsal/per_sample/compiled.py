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
asked warns once and goes on with the eager path.

When to compile (``compile_kernels``): ``True`` always, ``False`` never, ``"auto"`` (the
default) once it pays, decided before each pass by :meth:`CompiledKernels.should_compile`:
where a compiler is present (:func:`compiler_missing`), after the method has spent
:data:`AUTO_AFTER_SECONDS` in eager passes (its long passes: :meth:`fit_stats` over a data
set, the many batches of an analysis, a loop of calls). That is the ski-rental rule: keep
renting (eager) until the rent paid equals the price of buying (compiling: about 30 s for
a ResNet-18's kernels on an empty inductor cache on 2 CPU cores, 6 s warm), so a job never
costs more than about twice what it would with hindsight, and one small call never
compiles. Where kernels compiled before on this machine with this torch (a marker in
inductor's cache folder, :func:`warm_cache`), the price is the warm one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import warnings
from collections import Counter
from typing import Any, Callable, Dict, Optional, Set, Tuple, Union

import torch
from torch import Tensor

from .._utils import atomic_write, outside_stacklevel

#: Distinct shapes one process may compile (a ResNet-50 has a few dozen).
RECOMPILE_LIMIT = 256

#: eager seconds of one attribution method's passes after which ``compile_kernels="auto"``
#: compiles, by whether inductor's cache holds kernels this library compiled before ("warm")
#: or not ("cold"): about what compiling then costs (measured: a ResNet-18 at 32x32, 2 CPU
#: cores, 33 s cold and 6 s warm for its first compiled call, against 0.25 s for an eager one)
AUTO_AFTER_SECONDS: Dict[str, float] = {"cold": 30.0, "warm": 6.0}

#: what a compile_kernels argument may be
CompileSetting = Union[bool, str]

#: the marker file in inductor's cache folder (JSON: the torch version and device types whose
#: kernels compiled), read without unpickling and validated
MARKER = "captum_paramsal_kernels.json"


def check_compile_setting(setting: Any) -> CompileSetting:
    """``setting`` if it is True, False or ``"auto"``; a TypeError naming it otherwise."""
    if isinstance(setting, bool) or (isinstance(setting, str) and setting == "auto"):
        return setting
    raise TypeError(f"compile_kernels must be True, False or 'auto', got {setting!r}")


def compiler_missing(device_type: str) -> Optional[str]:
    """Why ``torch.compile`` cannot build kernels for ``device_type`` here, or None where it
    can be tried: a CPU needs a C++ compiler (``$CXX``, else g++, c++ or clang++ on the PATH),
    a CUDA device triton."""
    if device_type == "cpu":
        names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(name) for name in names):
            return f"no C++ compiler ({', '.join(names)}) on the PATH"
        return None
    if device_type == "cuda":
        return None if importlib.util.find_spec("triton") is not None else "triton is not installed"
    return f"the compiled kernels are not set up for {device_type} devices"


def inductor_cache_dir() -> str:
    """Inductor's on-disk cache folder, as torch finds it (``$TORCHINDUCTOR_CACHE_DIR``, else
    its default under the temporary folder), without creating it."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # a light module

    return os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())


def _read_marker(path: str) -> Set[str]:
    """The device types of a valid marker for this torch version; empty for anything else."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return set()
    if (not isinstance(data, dict) or data.get("format") != 1 or data.get("torch") != torch.__version__
            or not isinstance(data.get("devices"), list) or not all(isinstance(d, str) for d in data["devices"])):
        return set()
    return set(data["devices"])


def warm_cache(device_type: str) -> bool:
    """Whether kernels of this library compiled for ``device_type`` with this torch version
    before, into the inductor cache in use (so compiling again mostly reads them back)."""
    return device_type in _read_marker(os.path.join(inductor_cache_dir(), MARKER))


def _mark_warm(device_type: str) -> None:
    """Record in the inductor cache that kernels compiled for ``device_type`` (best effort:
    a read-only cache folder only means the next process pays the cold price)."""
    folder = inductor_cache_dir()
    path = os.path.join(folder, MARKER)
    devices = _read_marker(path)
    if device_type in devices:
        return
    marker = {"format": 1, "torch": torch.__version__, "devices": sorted(devices | {device_type})}
    try:
        os.makedirs(folder, exist_ok=True)
        atomic_write(path, json.dumps(marker).encode())
    except OSError:
        pass


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
        #: seconds this method's passes spent with compiling off (what ``"auto"`` weighs)
        self.eager_seconds = 0.0
        self._marked: Set[str] = set()

    def should_compile(self, setting: CompileSetting, device_type: str) -> bool:
        """Whether the next pass compiles under ``compile_kernels=setting``: True and False as
        given; ``"auto"`` where a compiler is present, compiling has not failed here on
        ``device_type``, and :attr:`eager_seconds` reached :data:`AUTO_AFTER_SECONDS` (the warm
        figure where :func:`warm_cache` says so)."""
        if isinstance(setting, bool):
            return setting
        if self.eager_seconds < AUTO_AFTER_SECONDS["warm"]:
            return False  # before any price is due nothing else is looked at (the PATH, the marker)
        if any(device == device_type for _, device in self.failed) or compiler_missing(device_type):
            return False
        price = AUTO_AFTER_SECONDS["warm" if warm_cache(device_type) else "cold"]
        return self.eager_seconds >= price

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
        if device_type not in self._marked:
            self._marked.add(device_type)
            _mark_warm(device_type)
        return result
