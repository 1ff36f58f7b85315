"""What one call of a layer saw: all of its inputs, and the gradient at its output.

A rule is given every input of the call, positional and keyword, as
:class:`CallInputs`, so that layers with several tensor inputs (attention blocks,
embeddings with offsets) can have exact rules. The engine keeps the tensors that are per
sample (batch on dim 0) and slices them for chunks of samples; everything else (a flag, a
shared mask) is passed on unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from torch import Tensor, nn

if TYPE_CHECKING:
    from .grads import PerSampleGrad


@dataclass(frozen=True)
class CallInputs:
    """The positional ``args`` and keyword ``kwargs`` of one call of a layer."""

    args: Tuple[Any, ...]
    kwargs: Mapping[str, Any]

    def arg(self, index: int, name: Optional[str] = None) -> Any:
        """Positional argument ``index``, or keyword ``name`` where it was passed by name."""
        if index < len(self.args):
            return self.args[index]
        if name is not None and name in self.kwargs:
            return self.kwargs[name]
        raise KeyError(f"the call has no argument {index}" + (f" or {name!r}" if name else ""))

    @property
    def first(self) -> Any:
        """The first input, positional or keyword (a layer's main input)."""
        if self.args:
            return self.args[0]
        return next(iter(self.kwargs.values()), None)

    def tensors(self) -> Iterator[Tuple[Any, Tensor]]:
        """``(position or keyword, tensor)`` of every tensor input."""
        for i, value in enumerate(self.args):
            if isinstance(value, Tensor):
                yield i, value
        for key, value in self.kwargs.items():
            if isinstance(value, Tensor):
                yield key, value

    def map_batched(self, batch: int, fn: Callable[[Tensor], Any]) -> CallInputs:
        """The inputs with ``fn(tensor)`` applied to every tensor whose dim 0 is the batch."""

        def apply(value: Any) -> Any:
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
                return fn(value)
            return value

        return CallInputs(tuple(apply(v) for v in self.args), {k: apply(v) for k, v in self.kwargs.items()})

    def detached(self) -> CallInputs:
        """The inputs with every tensor detached (what a first-order pass keeps)."""

        def detach(value: Any) -> Any:
            return value.detach() if isinstance(value, Tensor) else value

        return CallInputs(tuple(detach(v) for v in self.args), {k: detach(v) for k, v in self.kwargs.items()})

    def batched(self, batch: int) -> List[Tensor]:
        """The tensor inputs whose dim 0 is the batch, in :meth:`tensors` order."""
        return [t for _, t in self.tensors() if t.dim() > 0 and t.shape[0] == batch]

    def replace_batched(self, batch: int, values: List[Tensor]) -> CallInputs:
        """The inputs with the batched tensors (:meth:`batched` order) replaced by ``values``."""
        remaining = iter(values)
        return self.map_batched(batch, lambda _: next(remaining))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.tensors())


@dataclass(frozen=True)
class LayerCall:
    """One call of a rule-covered layer: its inputs and the gradient at its output."""

    module: nn.Module
    attr: str
    rule: Any  # the LayerRule (typed loosely: registry imports this module)
    inputs: CallInputs
    grad_output: Tensor

    @property
    def batch(self) -> int:
        return self.grad_output.shape[0]

    def tensors(self) -> List[Tensor]:
        """The per-sample tensors a second derivative goes through: batched inputs, then the
        output gradient."""
        return [*self.inputs.batched(self.batch), self.grad_output]

    def with_tensors(self, tensors: List[Tensor]) -> LayerCall:
        """This call with :meth:`tensors` replaced (same order), e.g. by leaves of a chunk."""
        inputs = self.inputs.replace_batched(self.batch, tensors[:-1])
        return LayerCall(self.module, self.attr, self.rule, inputs, tensors[-1])

    def sliced(self, start: int, stop: int) -> LayerCall:
        return self.with_tensors([t[start:stop] for t in self.tensors()])

    def detached(self) -> LayerCall:
        return self.with_tensors([t.detach() for t in self.tensors()])

    def per_sample_grad(self) -> PerSampleGrad:
        """The rule's lazy per-sample gradient of :attr:`attr` for this call."""
        return self.rule(self.module, self.inputs, self.grad_output, frozenset([self.attr]))[self.attr]


def call_inputs(args: Tuple[Any, ...], kwargs: Optional[Dict[str, Any]]) -> CallInputs:
    return CallInputs(tuple(args), dict(kwargs or {}))
