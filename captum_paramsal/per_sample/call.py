"""What one call of a layer saw: all of its inputs, and the gradient at its outputs.

A rule is given every input of the call, positional and keyword, as
:class:`CallInputs`, so that layers with several tensor inputs (attention blocks,
embeddings with offsets, a recurrent layer's initial state) can have exact rules, and the
gradient at every tensor of its output, in the output's own structure (a tensor for most
layers; ``(output, (h_n, c_n))`` for an LSTM). Every tensor a rule sees has the batch on
dim 0: where a layer keeps it elsewhere (a sequence-first LSTM, ``h_n``), its rule
declares the batch dims (:data:`BatchDims`) and the engine moves them to 0 for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

if TYPE_CHECKING:
    from .grads import PerSampleGrad

#: ``batch_dims(module, inputs, output) -> (batch dim of each tensor input, of each tensor
#: output)``, both in :meth:`CallInputs.tensors` / :func:`output_tensors` order; an input's
#: dim None means the tensor is shared by all samples (a causal mask), not sliced or moved.
#: It raises ValueError for a call its rule cannot take (that call goes to the fallback).
#: A rule without it has the batch on dim 0 of every tensor.
BatchDims = Callable[[nn.Module, "CallInputs", Any], Tuple[Sequence[Optional[int]], Sequence[int]]]


@dataclass(frozen=True)
class CallInputs:
    """The positional ``args`` and keyword ``kwargs`` of one call of a layer."""

    args: Tuple[Any, ...]
    kwargs: Mapping[str, Any]

    def arg(self, index: int, name: Optional[str] = None, default: Any = KeyError) -> Any:
        """Positional argument ``index``, or keyword ``name`` where it was passed by name
        (``default`` where neither was passed, else a KeyError)."""
        if index < len(self.args):
            return self.args[index]
        if name is not None and name in self.kwargs:
            return self.kwargs[name]
        if default is not KeyError:
            return default
        raise KeyError(f"the call has no argument {index}" + (f" or {name!r}" if name else ""))

    @property
    def first(self) -> Any:
        """The first input, positional or keyword (a layer's main input)."""
        if self.args:
            return self.args[0]
        return next(iter(self.kwargs.values()), None)

    @cached_property
    def _flat(self) -> Tuple[List[Any], Any]:
        # once per call's inputs: the engine reads them several times per layer call
        return tree_flatten((tuple(self.args), dict(self.kwargs)))

    def tensors(self) -> List[Tensor]:
        """Every tensor input, nested ones included (``hx=(h, c)``), in a fixed order."""
        return [leaf for leaf in self._flat[0] if isinstance(leaf, Tensor)]

    def map_tensors(self, fn: Callable[[int, Tensor], Any]) -> CallInputs:
        """The inputs with tensor number ``i`` (:meth:`tensors` order) replaced by ``fn(i, tensor)``."""
        leaves, spec = self._flat
        count = 0
        out = []
        for leaf in leaves:
            if isinstance(leaf, Tensor):
                leaf = fn(count, leaf)
                count += 1
            out.append(leaf)
        args, kwargs = tree_unflatten(out, spec)
        return CallInputs(tuple(args), kwargs)

    def with_tensors(self, values: Sequence[Tensor]) -> CallInputs:
        """The inputs with their tensors (:meth:`tensors` order) replaced by ``values``."""
        return self.map_tensors(lambda i, _: values[i])

    def detached(self) -> CallInputs:
        """The inputs with every tensor detached (what a first-order pass keeps)."""
        return self.map_tensors(lambda _, t: t.detach())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def output_tensors(output: Any) -> List[Tensor]:
    """The tensors of a layer's output (a tensor, or a tuple / list / dict of them), in order."""
    return [leaf for leaf in tree_flatten(output)[0] if isinstance(leaf, Tensor)]


def is_tapped(tensor: Tensor) -> bool:
    """Whether the engine taps an output tensor: a gradient can only reach floating ones."""
    return tensor.is_floating_point() or tensor.is_complex()


def batch_first(tensors: Sequence[Tensor], dims: Optional[Sequence[Optional[int]]]) -> List[Tensor]:
    """``tensors`` with dim ``dims[i]`` moved to 0 (views); unchanged where ``dims`` (or its
    entry) is None."""
    if dims is None:
        return list(tensors)
    if len(dims) != len(tensors):
        raise RuntimeError(f"a rule's batch_dims named {len(dims)} dims for {len(tensors)} tensors")
    return [t if d is None or d == 0 else t.movedim(d, 0) for t, d in zip(tensors, dims)]


@dataclass(frozen=True)
class GradOutputs:
    """The gradient at each tensor of a call's output, batch first, and how to rebuild the
    output's structure around them (non-tensor entries, untapped tensors as None)."""

    grads: Tuple[Tensor, ...]
    tapped: Tuple[bool, ...]  # per leaf of the output's structure: whether a gradient is there
    spec: Any

    @staticmethod
    def structure(output: Any) -> Tuple[Tuple[bool, ...], Any]:
        """``(tapped, spec)`` of ``output``: what a :class:`GradOutputs` of it needs besides the
        gradients, without keeping the output's values alive."""
        leaves, spec = tree_flatten(output)
        return tuple(isinstance(leaf, Tensor) and is_tapped(leaf) for leaf in leaves), spec

    def structured(self) -> Any:
        """The gradients in the output's structure (a tensor for a tensor output), None where
        the output held no floating tensor."""
        grads = iter(self.grads)
        return tree_unflatten([next(grads) if tapped else None for tapped in self.tapped], self.spec)

    def with_grads(self, grads: Sequence[Tensor]) -> GradOutputs:
        return GradOutputs(tuple(grads), self.tapped, self.spec)

    @property
    def batch(self) -> int:
        return self.grads[0].shape[0]

    def nbytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.grads)


@dataclass(frozen=True)
class LayerCall:
    """One call of a rule-covered layer: its inputs and the gradients at its outputs, all
    batch first."""

    module: nn.Module
    attr: str
    rule: Any  # the LayerRule (typed loosely: the registry imports this module)
    inputs: CallInputs
    grad_outputs: GradOutputs
    #: which of :meth:`CallInputs.tensors` are per sample (the rest are shared)
    batched_inputs: Tuple[int, ...] = ()

    @property
    def batch(self) -> int:
        return self.grad_outputs.batch

    def tensors(self) -> List[Tensor]:
        """The per-sample tensors a second derivative goes through: batched inputs, then the
        output gradients."""
        inputs = self.inputs.tensors()
        return [*(inputs[i] for i in self.batched_inputs), *self.grad_outputs.grads]

    def with_tensors(self, tensors: Sequence[Tensor]) -> LayerCall:
        """This call with :meth:`tensors` replaced (same order), e.g. by leaves of a chunk."""
        batched = self.batched_inputs
        replacement: Dict[int, Tensor] = dict(zip(batched, tensors[: len(batched)]))
        inputs = self.inputs.map_tensors(lambda i, t: replacement.get(i, t))
        grad_outputs = self.grad_outputs.with_grads(tensors[len(batched) :])
        return LayerCall(self.module, self.attr, self.rule, inputs, grad_outputs, batched)

    def detached(self) -> LayerCall:
        return self.with_tensors([t.detach() for t in self.tensors()])

    def per_sample_grad(self) -> PerSampleGrad:
        """The rule's lazy per-sample gradient of :attr:`attr` for this call."""
        return self.rule(self.module, self.inputs, self.grad_outputs.structured(), frozenset([self.attr]))[self.attr]


def call_inputs(args: Tuple[Any, ...], kwargs: Optional[Dict[str, Any]]) -> CallInputs:
    return CallInputs(tuple(args), dict(kwargs or {}))
