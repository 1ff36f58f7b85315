"""The kernel policy: every device-dependent choice of the engine, in one place.

How many per-sample values a chunk may hold, whether the rules run inside the backward
or after it, from how many output positions a convolution's own weight-gradient kernel
beats im2col, and which ranks the compiled kernels take. Each attribution method owns
one :class:`KernelPolicy` (and with it one set of :class:`~.compiled.CompiledKernels`, so
a failed compile in one method changes nothing for another).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from .compiled import CompiledKernels
from .grads import PerSampleGrad

#: :attr:`KernelPolicy.deferred_bytes` per device type (absent: 0)
DEFERRED_BYTES = {"cpu": 256 << 20}

#: :attr:`KernelPolicy.workspace_values` per device type (absent: the class default, 2^22). Read
#: by every pass (:meth:`KernelPolicy.for_device`); on CPU a larger workspace measured no faster
#: on the transformer shapes of benchmarks/bench_transformers.py (2^24: 0.96-1.09x the time), on
#: a GPU, where each chunk costs kernel launches, it is the first thing to try
#: (``bench_transformers.py --workspace-values``)
WORKSPACE_VALUES: Dict[str, int] = {}

#: device types on which the Linear-like rules drop the positions whose output gradient is zero
#: in every sample of the call (:func:`compacts_positions`)
COMPACT_POSITIONS = frozenset({"cpu"})


def compacts_positions(device: torch.device) -> bool:
    """Whether a Linear-like rule on ``device`` checks its output gradient for positions that are
    zero in every sample and leaves them out of the low-rank factors (exact: a zero position adds
    nothing to ``sum_t dY[t]^T X[t]``). A language-model head that runs on every position under a
    loss at the last one has rank 1 instead of the sequence length then, so its closed forms
    apply. The check reads the output gradient's first and last positions, and all of it only
    where one of them is zero; on an asynchronous device (CUDA) it would wait for the device in
    every layer call, so it runs on CPU only. A rule asks this itself: rules see no policy."""
    return torch.device(device).type in COMPACT_POSITIONS


@dataclass(frozen=True)
class KernelPolicy:
    """Device-dependent choices of one pass (see the module docstring).

    Attributes:
        workspace_values: per-sample gradients are built this many values at a time (a
            chunk of samples), so a layer of 2M weights at batch 64 never needs half a
            gigabyte at once.
        deferred_bytes: on CPU the rules run after the backward rather than inside it, in
            batches of layers whose saved (inputs, output gradient) take up to this many
            bytes: a rule's matmuls interleaved with the backward's convolutions evict each
            other's data from the caches, which cost about a tenth of the engine's time on
            resnet18 (benchmarks/bench_saliency.py). 0: each layer is reduced and freed
            inside the backward (other devices run kernels asynchronously).
        direct_min_positions: from this many output positions on, a k x k (k > 1)
            convolution's own weight-gradient kernel beats im2col + matmul (measured on CPU;
            1x1 kernels need no im2col at all).
        compile: reduce with compiled kernels where they apply (``compile_kernels=True``).
        compiled_ranks: the low ranks the compiled kernels take: the sum over positions is
            unrolled into the kernel, and beyond 16 the eager matmul (or the direct kernel)
            is faster than the unrolled loop, and compiling takes longer.
    """

    workspace_values: int = 1 << 22
    deferred_bytes: int = 0
    direct_min_positions: int = 64
    compile: bool = False
    compiled_ranks: range = range(2, 17)
    kernels: CompiledKernels = field(default_factory=CompiledKernels, compare=False)

    @classmethod
    def for_device(
        cls, device: torch.device, compile: bool = False, kernels: Optional[CompiledKernels] = None
    ) -> KernelPolicy:
        """The policy for passes on ``device``."""
        kind = torch.device(device).type
        workspace = WORKSPACE_VALUES.get(kind, cls.workspace_values)
        return cls(
            workspace_values=workspace, deferred_bytes=DEFERRED_BYTES.get(kind, 0), compile=compile,
            kernels=kernels or CompiledKernels(),
        )

    def samples_per_chunk(self, values_per_sample: int) -> int:
        """How many samples a chunk of per-sample values may hold."""
        return max(1, self.workspace_values // max(1, values_per_sample))

    def direct(self, grad: PerSampleGrad) -> bool:
        """Whether to build ``grad`` with its layer's own kernel rather than its factors."""
        return grad.has_direct and (grad.rank or 0) >= self.direct_min_positions

    def compiles(self, grad: PerSampleGrad) -> bool:
        """Whether ``grad``'s form is one the compiled kernels take under this policy
        (whatever autograd tracks: the caller checks that)."""
        return self.compile and grad.rank is not None and grad.rank in self.compiled_ranks and not self.direct(grad)
