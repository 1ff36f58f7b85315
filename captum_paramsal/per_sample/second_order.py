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
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .engine import (
    LayerCall,
    TargetResolver,
    _closed_form_applies,
    _reduce_calls,
    _Workspace,
    rules_first,
    samples_per_chunk,
)
from .fallback import LossFn, fallback_unit_saliency, fallback_weighted_input_grads
from .grads import PerSampleGrad
from .registry import default_grouping
from .routing import Routing
from .selection import SelectedParameter, Selection


def _saliency_from_calls(p: SelectedParameter, calls: List[LayerCall], batch: int, reduction: str, workspace) -> Tensor:
    with torch.no_grad():
        grads = [call.per_sample_grad(detach=True) for call in calls]
        return _reduce_calls(p, grads, batch, reduction, workspace)


def _mean_abs_pull_back(
    p: SelectedParameter, grads: List[PerSampleGrad], weights: Tensor, workspace: _Workspace
) -> Optional[List[Tuple[Tensor, Tensor]]]:
    """``(tensor, cotangent)`` pairs of ``sum(weights * mean_abs units)`` through the rules'
    own :meth:`~.grads.PerSampleGrad.pull_back`, or ``None`` where a rule has none
    (with ``compile_kernels``, the single-call low-rank layers take the compiled
    :meth:`~.grads.PerSampleGrad.fused_mean_abs_pull_back` instead).

    By hand rather than by autograd through the dense gradient, whose ``abs``, its backward's
    ``sgn`` and ``mul`` and the mean's broadcast would each pass over ``n x numel`` values:
    here the dense gradient is built once into the workspace and turned into its signs in
    place (``d|G|/dG = sgn(G)``, autograd's convention at 0), scaled per unit by the weight
    over the unit's size, and handed to each call's rule.
    """
    if p.grouping is not default_grouping:
        return None
    batch, numel = weights.shape[0], p.param.numel()
    row_scale = weights / (numel // p.num_units)
    if workspace.fused and len(grads) == 1:
        pairs = grads[0].fused_mean_abs_pull_back(0, batch, row_scale)
        if pairs is not None:
            return pairs
    with torch.no_grad():
        dense = grads[0].materialize(0, batch, workspace.get(batch * numel, p.param.dtype, p.param.device))
        for g in grads[1:]:
            dense += g.materialize(0, batch)
        signs = dense.sgn_()
    pairs: List[Tuple[Tensor, Tensor]] = []
    for i, g in enumerate(grads):
        # a rule may overwrite the cotangent it is given: the last one gets the original
        part = g.pull_back(0, batch, signs if i == len(grads) - 1 else signs.clone(), row_scale)
        if part is None:
            return None
        pairs += part
    return pairs


def _layer_cotangents(
    p: SelectedParameter, calls: List[LayerCall], weights: Tensor, reduction: str, workspace
) -> Tuple[List[Tensor], List[Tensor]]:
    """Gradients of ``sum(weights * s_p)`` with respect to each call's tensors, chunk by chunk."""
    batch = weights.shape[0]
    tensors = [t for call in calls for t in (call.activation, call.grad_output)]
    cotangents = [torch.zeros_like(t) for t in tensors]
    detached = [call.per_sample_grad(detach=True) for call in calls]
    chunk = samples_per_chunk(p, detached, reduction)
    if workspace.fused and reduction == "mean_abs" and len(detached) == 1 and detached[0].fusable():
        # the compiled pull-back writes the signs once and reads them twice: half a
        # workspace of them stays in cache (a whole one was slower on a 32 MiB L3)
        chunk = max(1, chunk // 2)
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        leaves = [t[start:stop].detach().requires_grad_() for t in tensors]
        with torch.enable_grad():
            grads = [
                LayerCall(call.module, call.attr, leaves[2 * i], leaves[2 * i + 1]).per_sample_grad()
                for i, call in enumerate(calls)
            ]
            pairs = None
            if reduction == "mean_abs" and not _closed_form_applies(p, grads, reduction):
                pairs = _mean_abs_pull_back(p, grads, weights[start:stop], workspace)
            if pairs is None:
                values = _reduce_calls(p, grads, stop - start, reduction, workspace)
                pairs = [((values * weights[start:stop]).sum(), None)]
            outputs, grad_outputs = zip(*pairs)
            parts = torch.autograd.grad(outputs, leaves, grad_outputs, allow_unused=True)
        for cotangent, part in zip(cotangents, parts):
            if part is not None:
                cotangent[start:stop] += part
    return tensors, cotangents


def weighted_saliency_input_grads(
    model: nn.Module,
    selection: Selection,
    routing: Routing,
    inputs: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
    resolve_target: TargetResolver,
    loss_fn: LossFn,
    reduction: str,
    fallback_chunk_size: int,
    weights_of: Callable[[Tensor], Tensor],
    fused: bool = False,
) -> Tuple[Tensor, Tensor, Tuple[Tensor, ...]]:
    """``(saliency (B, F), weights (B, F), input gradients)`` for ``weights = weights_of(saliency)``.

    ``inputs`` must be floating point; the model must be in eval mode.
    """
    batch = inputs[0].shape[0]
    leaves = tuple(x.detach().requires_grad_() for x in inputs)
    workspace = _Workspace(fused)  # phase A's saliency may use the compiled kernels
    raw, fallback_params, target = rules_first(
        model, selection, routing, leaves, additional_forward_args, resolve_target, loss_fn, reduction,
        keep_calls=True,
    )
    rule_params = [p for p in selection.params if p.name in raw]

    # Phase A: the saliency itself, to choose the weights.
    columns: Dict[str, Tensor] = {p.name: _saliency_from_calls(p, raw[p.name], batch, reduction, workspace)
                                  for p in rule_params}
    if fallback_params:
        columns.update(fallback_unit_saliency(
            model, fallback_params, leaves, additional_forward_args, target, loss_fn, reduction, fallback_chunk_size,
        ))
    saliency = torch.cat([columns[p.name] for p in selection.params], dim=1)
    weights = weights_of(saliency).detach()
    weight_of = dict(zip((p.name for p in selection.params), torch.split(
        weights, [p.num_units for p in selection.params], dim=1)))

    # Phase B: d(weights . saliency)/d(inputs), rule layers through their saved tensors ...
    outputs: List[Tensor] = []
    cotangents: List[Tensor] = []
    for p in rule_params:
        tensors, cots = _layer_cotangents(p, raw[p.name], weight_of[p.name], reduction, workspace)
        for t, c in zip(tensors, cots):
            if t.requires_grad:
                outputs.append(t)
                cotangents.append(c)
    raw.clear()
    input_grads = [torch.zeros_like(x) for x in leaves]
    if outputs:
        parts = torch.autograd.grad(outputs, leaves, grad_outputs=cotangents, allow_unused=True)
        input_grads = [g if part is None else g + part for g, part in zip(input_grads, parts)]
    # ... and the fallback parameters by torch.func's grad of grad.
    if fallback_params:
        fb_weights = torch.cat([weight_of[p.name] for p in fallback_params], dim=1)
        parts = fallback_weighted_input_grads(
            model, fallback_params, leaves, additional_forward_args, target, loss_fn, reduction,
            fallback_chunk_size, fb_weights,
        )
        input_grads = [g + part for g, part in zip(input_grads, parts)]
    return saliency, weights, tuple(g.detach() for g in input_grads)
