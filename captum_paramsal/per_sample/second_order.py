"""Input gradients of a weighted sum of unit saliencies: the batched second derivative.

For weights ``c (B, F)`` that may depend on the saliency itself but are held fixed
(detached), this computes per sample ``d/dx_i sum_u c[i, u] * s_i[u]``. With
``c = dO/ds`` that is the gradient of any objective ``O(s)`` whose other
arguments are detached, such as filter boosting's ``cos(z, b)``.

Cost: one tapped forward, one backward with ``create_graph`` (keeping each rule
layer's input and output gradient differentiable in the input), the saliency from
detached copies (phase A, to choose ``c``), then per layer and chunk of samples
the rule's saliency rebuilt on leaf copies to take the gradient of ``c . s`` with
respect to that layer's input and output gradient (phase B), and finally one
backward from all of them to the inputs. Memory stays bounded by the chunking:
no per-sample gradient outlives its chunk.

With a ``layer`` (token ids are not differentiable) the gradient is taken with respect to
that layer's output instead: a :class:`LayerProbe` adds a per-sample zero tensor that
requires grad to the output in the tapped forward, and the final backward (and the
fallback's ``grad`` of ``grad``) differentiates with respect to it. Adding, not replacing,
keeps the graph from the output to the layer's own parameters (a selected embedding
table) intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .call import LayerCall, is_tapped
from .engine import SaliencyPass, rules_first
from .fallback import fallback_unit_saliency, fallback_weighted_input_grads
from .hooks import hook_forward
from .selection import SelectedParameter
from .unit_values import Workspace, pull_back_chunk, reduce_to_units, units_pull_back


def check_layer_output(output: Any, batch: int, layer: nn.Module) -> Tensor:
    """``output`` of ``layer`` if the input saliency can be taken with respect to it: one
    floating-point tensor, batch first; a clear error otherwise."""
    name = type(layer).__name__
    if not isinstance(output, Tensor):
        raise TypeError(
            f"layer= ({name}) returned a {type(output).__name__}; the attribution at a layer needs a layer "
            "whose output is one Tensor (pick the submodule that produces it, e.g. the embedding lookup)"
        )
    if not output.is_floating_point():
        raise TypeError(f"layer= ({name}) returned a {output.dtype} tensor; a gradient needs a floating-point output")
    if output.dim() == 0 or output.shape[0] != batch:
        raise ValueError(
            f"layer= ({name}) returned shape {tuple(output.shape)} for {batch} samples; the attribution at a "
            "layer needs its output batch first"
        )
    return output


class LayerProbe:
    """A zero tensor that requires grad, added to ``layer``'s output while attached: the
    gradient with respect to it is the gradient with respect to that output, per sample.

    :meth:`attached` is the context a pass's forward runs in (``SaliencyPass.around_forward``);
    the layer must be called exactly once in it. The probe is made on the first call, shaped
    like the output, and kept (``probe``) for the backward.
    """

    def __init__(self, layer: nn.Module, batch: int) -> None:
        self.layer = layer
        self.batch = batch
        self.probe: Optional[Tensor] = None
        self._calls = 0

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        self._calls = 0
        handle = hook_forward(self.layer, self._add)
        try:
            yield
        finally:
            handle.remove()
        if self._calls == 0:
            raise RuntimeError(
                f"layer= ({type(self.layer).__name__}) was not called in the model's forward: pass a submodule "
                "that the forward runs (e.g. model.bert.embeddings, model.transformer.wte)"
            )

    def tensor(self) -> Tensor:
        """The probe, ``(B, *layer output dims)``, made by the forward this was attached to."""
        if self.probe is None:
            raise RuntimeError("the layer probe was read before a forward with it attached")
        return self.probe

    def _add(self, module: nn.Module, args: Any, output: Any) -> Tensor:
        self._calls += 1
        if self._calls > 1:
            raise RuntimeError(
                f"layer= ({type(module).__name__}) is called more than once in one forward; the attribution at a "
                "layer needs a layer called exactly once (a shared module's output is not one tensor)"
            )
        output = check_layer_output(output, self.batch, module)
        if self.probe is None:
            self.probe = torch.zeros_like(output, memory_format=torch.contiguous_format).requires_grad_()
        elif self.probe.shape != output.shape:
            raise RuntimeError(
                f"layer= ({type(module).__name__}) returned shape {tuple(output.shape)}, before "
                f"{tuple(self.probe.shape)}, for the same batch"
            )
        return output + self.probe


def _saliency_from_calls(
    run: SaliencyPass, p: SelectedParameter, calls: List[LayerCall], workspace: Workspace
) -> Tuple[Tensor, int]:
    """``(units (B, units), samples per chunk of the pull-back)`` from one run of the rules on
    detached copies of the calls (a rule that recomputes its layer, attention's or an LSTM's,
    is not run again just to size the chunks)."""
    with torch.no_grad():
        grads = [call.detached().per_sample_grad() for call in calls]
        units = reduce_to_units(p, grads, run.batch, run.reduction, run.policy, workspace)
    return units, pull_back_chunk(p, grads, run.reduction, run.policy)


def _layer_cotangents(
    run: SaliencyPass, p: SelectedParameter, calls: List[LayerCall], weights: Tensor, chunk: int,
    workspace: Workspace,
) -> Tuple[List[Tensor], List[Tensor]]:
    """Gradients of ``sum(weights * s_p)`` with respect to each call's tensors, chunk by chunk."""
    batch = weights.shape[0]
    per_call = [call.tensors() for call in calls]
    tensors = [t for ts in per_call for t in ts]
    cotangents = [torch.zeros_like(t) if is_tapped(t) else None for t in tensors]
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        # integer ids and boolean masks are sliced but not differentiated
        leaves = [t[start:stop].detach().requires_grad_(is_tapped(t)) for t in tensors]
        with torch.enable_grad():
            grads, offset = [], 0
            for call, ts in zip(calls, per_call):
                grads.append(call.with_tensors(leaves[offset : offset + len(ts)]).per_sample_grad())
                offset += len(ts)
            pairs = units_pull_back(p, grads, weights[start:stop], run.reduction, run.policy, workspace)
            if pairs is None:
                values = reduce_to_units(p, grads, stop - start, run.reduction, run.policy, workspace)
                pairs = [((values * weights[start:stop]).sum(), None)]
            outputs, grad_outputs = zip(*pairs)
            differentiable = [leaf for leaf in leaves if leaf.requires_grad]
            found = iter(torch.autograd.grad(outputs, differentiable, grad_outputs, allow_unused=True))
            parts = [next(found) if leaf.requires_grad else None for leaf in leaves]
        for cotangent, part in zip(cotangents, parts):
            if part is not None:
                cotangent[start:stop] += part
    return tensors, cotangents


def weighted_saliency_input_grads(
    run: SaliencyPass, weights_of: Callable[[Tensor], Tensor], layer: Optional[nn.Module] = None
) -> Tuple[Tensor, Tensor, Tuple[Tensor, ...]]:
    """``(saliency (B, F), weights (B, F), input gradients)`` for ``weights = weights_of(saliency)``.

    Without ``layer``, ``run.inputs`` must be floating point and the gradients are one per
    input. With ``layer`` (a submodule called once per forward, whose output is one
    batch-first floating tensor) the inputs may be anything the model takes (token ids),
    and the gradients are a 1-tuple: the gradient at that layer's output, its shape.
    The model must be in eval mode. Attention runs its math kernel here: the fused
    scaled-dot-product kernels have no second derivative.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        return _weighted_saliency_input_grads(run, weights_of, layer)


def _weighted_saliency_input_grads(
    run: SaliencyPass, weights_of: Callable[[Tensor], Tensor], layer: Optional[nn.Module]
) -> Tuple[Tensor, Tensor, Tuple[Tensor, ...]]:
    probe: Optional[LayerProbe] = None
    if layer is None:
        leaves: Tuple[Tensor, ...] = tuple(x.detach().requires_grad_() for x in run.inputs)
        run = run.with_inputs(leaves)
    else:
        probe = LayerProbe(layer, run.batch)
        run = dataclasses.replace(run, inputs=tuple(x.detach() for x in run.inputs), around_forward=probe.attached)
    params = run.selection.params
    workspace = Workspace()
    first = rules_first(run, keep_calls=True)
    kept, fallback, target = dict(first.values), first.fallback, first.target
    del first  # the kept calls are freed by kept.clear() below
    if probe is not None:
        leaves = (probe.tensor(),)
    rule_params = [p for p in params if p.name in kept]

    # Phase A: the saliency itself, to choose the weights.
    phase_a = {p.name: _saliency_from_calls(run, p, kept[p.name], workspace) for p in rule_params}
    columns: Dict[str, Tensor] = {name: units for name, (units, _) in phase_a.items()}
    if fallback:
        columns.update(fallback_unit_saliency(run, fallback, target))
    saliency = torch.cat([columns[p.name] for p in params], dim=1)
    weights = weights_of(saliency).detach()
    weight_of = dict(zip((p.name for p in params), torch.split(weights, [p.num_units for p in params], dim=1)))

    # Phase B: d(weights . saliency)/d(inputs), rule layers through their saved tensors ...
    outputs: List[Tensor] = []
    cotangents: List[Tensor] = []
    for p in rule_params:
        chunk = phase_a[p.name][1]
        tensors, cots = _layer_cotangents(run, p, kept[p.name], weight_of[p.name], chunk, workspace)
        for t, c in zip(tensors, cots):
            if c is not None and t.requires_grad:
                outputs.append(t)
                cotangents.append(c)
    kept.clear()
    input_grads = [torch.zeros_like(x) for x in leaves]
    if outputs:
        parts = torch.autograd.grad(outputs, leaves, grad_outputs=cotangents, allow_unused=True)
        input_grads = [g if part is None else g + part for g, part in zip(input_grads, parts)]
    # ... and the fallback parameters by torch.func's grad of grad.
    if fallback:
        fb_weights = torch.cat([weight_of[p.name] for p in fallback], dim=1)
        at_layer = None if probe is None else (probe.layer, leaves[0])
        parts = fallback_weighted_input_grads(run, fallback, target, fb_weights, at_layer)
        input_grads = [g + part for g, part in zip(input_grads, parts)]
    return saliency, weights, tuple(g.detach() for g in input_grads)
