"""The generic per-sample method for every parameter that no rule covers.

``torch.func``: ``vmap(grad(loss of one sample))`` over a chunk of samples,
with only the fallback parameters differentiated, reduced to units at once so
that at most ``chunk_size`` per-sample gradients of those parameters exist.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .batching import is_per_sample, slice_batch
from .reduce import REDUCTIONS
from .selection import SelectedParameter

LossFn = Callable[[Tensor, Tensor], Tensor]


def fallback_unit_saliency(
    model: nn.Module,
    params: Sequence[SelectedParameter],
    inputs: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
    target: Tensor,
    loss_fn: LossFn,
    reduction: str,
    chunk_size: int,
    create_graph: bool = False,
) -> Dict[str, Tensor]:
    """``{name: (B, units)}`` for ``params``, by torch.func per-sample gradients."""
    batch = inputs[0].shape[0]
    reduce = REDUCTIONS[reduction]
    primals = {p.name: p.param.detach() for p in params}
    per_sample_args = [i for i, a in enumerate(additional_forward_args) if is_per_sample(a, batch)]

    def sample_loss(values: Dict[str, Tensor], sample: Tuple[Tensor, ...], label: Tensor, extras):
        args = list(additional_forward_args)
        for i, extra in zip(per_sample_args, extras):
            args[i] = extra.unsqueeze(0)
        output = functional_call(model, values, (*(x.unsqueeze(0) for x in sample), *args))
        return loss_fn(output, label.unsqueeze(0)).sum()

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))
    pieces: Dict[str, list] = {p.name: [] for p in params}
    with torch.enable_grad() if create_graph else torch.no_grad(), warnings.catch_warnings():
        # vmap falls back to a loop for ops without batching rules (attention kernels);
        # that is the point of a fallback, not news for the user on every call.
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        for start in range(0, batch, chunk_size):
            stop = min(start + chunk_size, batch)
            extras = tuple(additional_forward_args[i][start:stop] for i in per_sample_args)
            grads = per_sample_grads(
                primals, slice_batch(inputs, batch, start, stop), target[start:stop], extras
            )
            for p in params:
                pieces[p.name].append(reduce(p.grouping(grads.pop(p.name), p.grouping_module)))
    return {name: torch.cat(chunks) for name, chunks in pieces.items()}
