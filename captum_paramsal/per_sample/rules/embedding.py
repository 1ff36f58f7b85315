"""``Embedding`` and ``EmbeddingBag``: per-sample gradients that touch only a sample's rows.

A lookup ``y[t] = W[ids[t]]`` sends the output gradient back to the looked-up rows only:
for one sample ``i``, ``G_i[v] = sum_{t: ids[i, t] = v} dY[i, t]`` and every other row of
the ``V x D`` table is zero. So the gradient is a short list of ``(sample, row, vector)``
entries (:class:`RowSparseGrad`), and a reduction needs to see only the touched rows: the
others all reduce to ``reduce(0)``. ``B x V x D`` values are built only where the engine
asks for the dense gradient (:meth:`RowSparseGrad.materialize`, e.g. a weight tied to a
Linear head, whose calls are summed densely).

* ``padding_idx``: its row gets no gradient (torch zeroes it), so its entries are dropped.
* ``scale_grad_by_freq``: torch divides each row's gradient by the number of times the row
  occurs in the call's input. Per sample that is the count within the sample, which is
  what a forward and backward of that sample alone gives, and what the rule computes.
* ``sparse=True`` changes only how autograd stores ``weight.grad``, not the gradient: the
  rule is exact for it.
* ``max_norm`` renormalizes the looked-up rows of the weight *in place* during the forward,
  so the weight a pass explains is not the weight it was given: the rule refuses it with
  a ``ValueError`` (:func:`embedding_unsupported` says why, for a registry that can ask
  before routing to send such a layer to the fallback instead).

``EmbeddingBag`` (``sum``, ``mean``, ``max``, ``per_sample_weights``, ``offsets``) is the
same form: a bag is a sample (a 2-d input of ``B`` bags, or a 1-d input with ``B``
offsets), and each element of a bag contributes its row with the bag's output gradient,
weighted (``sum``), divided by the bag's size without padding (``mean``), or, per output
dim, only where it is the bag's maximum (``max``; the first such element, as torch does).

Neither is in the default selection: embeddings are selected by name.
"""

from __future__ import annotations

from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..call import CallInputs
from ..grads import PerSampleGrad
from ..registry import default_grouping, register_rule


class RowSparseGrad(PerSampleGrad):
    """Per-sample gradients of a ``(V, D)`` table that are nonzero on a few rows only.

    Entry ``k`` adds ``values[k]`` (a ``D``-vector) to row ``rows[k]`` of sample
    ``samples[k]``'s gradient; ``samples`` is sorted, and repeated ``(sample, row)`` pairs
    add up. ``values`` stays a differentiable function of what the rule was given (the
    output gradient), so the second-order pass can go through it.
    """

    def __init__(self, batch: int, samples: Tensor, rows: Tensor, values: Tensor, num_rows: int) -> None:
        if samples.dim() != 1 or rows.shape != samples.shape or values.shape[:1] != samples.shape:
            raise ValueError("RowSparseGrad needs samples (K,), rows (K,) and values (K, D)")
        self.batch = batch
        self.samples = samples
        self.rows = rows
        self.values = values
        self.num_rows = num_rows
        self.dim = values.shape[1]

    def _range(self, start: int, stop: int) -> Tuple[int, int]:
        """The entries of samples ``start:stop`` (``samples`` is sorted)."""
        if start == 0 and stop >= self.batch:
            return 0, self.samples.shape[0]
        bounds = torch.searchsorted(self.samples, torch.tensor([start, stop], device=self.samples.device))
        lo, hi = bounds.tolist()
        return lo, hi

    def materialize(self, start: int, stop: int, out: Optional[Tensor] = None, direct: bool = False) -> Tensor:
        """Dense ``(n, V, D)``: correct at any size, affordable only for small tables."""
        n, lo_hi = stop - start, self._range(start, stop)
        lo, hi = lo_hi
        values = self.values[lo:hi]
        flat = (self.samples[lo:hi] - start) * self.num_rows + self.rows[lo:hi]
        tracked = torch.is_grad_enabled() and values.requires_grad
        if out is not None and not tracked:
            dense = out.view(n * self.num_rows, self.dim).zero_()
            dense.index_add_(0, flat, values)
        else:
            dense = values.new_zeros(n * self.num_rows, self.dim).index_add(0, flat, values)
        return dense.view(n, self.num_rows, self.dim)

    def units_by(self, reduce: Callable[[Tensor], Tensor], grouping: Callable) -> Optional[Tensor]:
        """``(B, V)``: the touched rows reduced, every other row ``reduce(0)``; units are the
        rows (the default grouping) only, else None."""
        if grouping is not default_grouping:
            return None
        keys = self.samples * self.num_rows + self.rows
        zero = reduce(self.values.new_zeros(1, 1, self.dim)).reshape(1)
        units = zero.expand(self.batch * self.num_rows)
        if keys.numel() == 0:
            return units.clone().view(self.batch, self.num_rows)
        touched, where = torch.unique(keys, return_inverse=True)
        summed = self.values.new_zeros(touched.shape[0], self.dim).index_add(0, where, self.values)
        reduced = reduce(summed.unsqueeze(0)).reshape(-1)
        return units.index_put((touched,), reduced).view(self.batch, self.num_rows)

    def pull_back(
        self, start: int, stop: int, cotangent: Tensor, row_scale: Tensor, direct: bool = False
    ) -> List[Tuple[Tensor, Tensor]]:
        """Each entry's value moves its row of its sample's gradient: its cotangent is that
        row's (scaled) cotangent."""
        lo, hi = self._range(start, stop)
        samples, rows = self.samples[lo:hi] - start, self.rows[lo:hi]
        with torch.no_grad():
            n = stop - start
            c = cotangent.reshape(n, self.num_rows, self.dim)[samples, rows]
            c = c * row_scale.reshape(n, self.num_rows)[samples, rows].unsqueeze(-1)
        return [(self.values[lo:hi], c)]


def embedding_unsupported(module: nn.Module) -> Optional[str]:
    """Why the rule cannot take ``module`` (an ``Embedding`` or ``EmbeddingBag``), or None."""
    if getattr(module, "max_norm", None) is not None:
        return (
            f"{type(module).__name__} with max_norm={module.max_norm} renormalizes its weight in place during the "
            "forward; its per-sample gradients are not computed by the embedding rule"
        )
    return None


def _why_not(module: nn.Module) -> Optional[str]:
    return embedding_unsupported(module)


def _check(module: nn.Module) -> None:
    why = embedding_unsupported(module)
    if why is not None:
        raise ValueError(why)


def _scaled_by_frequency(samples: Tensor, rows: Tensor, values: Tensor, num_rows: int) -> Tensor:
    """``values`` divided by how often its row occurs in its sample (``scale_grad_by_freq``)."""
    _, where, counts = torch.unique(samples * num_rows + rows, return_inverse=True, return_counts=True)
    return values / counts[where].to(values.dtype).unsqueeze(-1)


@register_rule(
    nn.Embedding, params=("weight",), default=(), subclasses=True, name="embedding", unsupported=lambda m: _why_not(m),
    positionwise=True,
)
def embedding_per_sample_grads(
    module: nn.Module, inputs: CallInputs, grad_output: Tensor, names: FrozenSet[str]
) -> Dict[str, PerSampleGrad]:
    _check(module)
    ids = inputs.arg(0, "input")
    batch, dim = grad_output.shape[0], module.embedding_dim
    if ids.shape[:1] != (batch,) or grad_output.shape != (*ids.shape, dim):
        raise ValueError(
            f"embedding rule: ids {tuple(ids.shape)} and output gradient {tuple(grad_output.shape)} are not "
            "batch-first (B, ...) and (B, ..., D)"
        )
    rows = ids.reshape(-1)
    values = grad_output.reshape(-1, dim)
    samples = torch.arange(batch, device=ids.device).repeat_interleave(rows.shape[0] // batch if batch else 0)
    if module.padding_idx is not None:
        keep = rows != module.padding_idx
        samples, rows, values = samples[keep], rows[keep], values[keep]
    if module.scale_grad_by_freq:
        values = _scaled_by_frequency(samples, rows, values, module.num_embeddings)
    return {"weight": RowSparseGrad(batch, samples, rows, values, module.num_embeddings)}


def _bags(module: nn.EmbeddingBag, inputs: CallInputs, batch: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(rows (K,), bag of each (K,), per-sample weights (K,) or None)``, bags sorted."""
    ids = inputs.arg(0, "input")
    offsets = _optional(inputs, 1, "offsets")
    weights = _optional(inputs, 2, "per_sample_weights")
    if ids.dim() == 2:
        if offsets is not None:
            raise ValueError("EmbeddingBag: offsets must be None for a 2-d input")
        if ids.shape[0] != batch:
            raise ValueError(f"embedding_bag rule: {ids.shape[0]} bags for a batch of {batch}")
        bags = torch.arange(batch, device=ids.device).repeat_interleave(ids.shape[1])
        return ids.reshape(-1), bags, None if weights is None else weights.reshape(-1)
    if ids.dim() != 1 or offsets is None:
        raise ValueError("EmbeddingBag: a 1-d input needs offsets")
    if module.include_last_offset:
        starts, ends = offsets[:-1], offsets[1:]
    else:
        starts, ends = offsets, torch.cat([offsets[1:], offsets.new_tensor([ids.shape[0]])])
    if starts.shape[0] != batch:
        raise ValueError(f"embedding_bag rule: {starts.shape[0]} bags for a batch of {batch}")
    ids = ids[int(starts[0]) if batch else 0 : int(ends[-1]) if batch else 0]
    bags = torch.arange(batch, device=ids.device).repeat_interleave(ends - starts)
    first = int(starts[0]) if batch else 0
    return ids, bags, None if weights is None else weights[first : first + ids.shape[0]]


def _optional(inputs: CallInputs, index: int, name: str):
    try:
        return inputs.arg(index, name)
    except KeyError:
        return None


def _first_max(module: nn.EmbeddingBag, rows: Tensor, bags: Tensor, batch: int) -> Tensor:
    """``(K, D)`` 0/1: whether element ``k`` is the first maximum of its bag in dim ``d``."""
    table = module.weight.detach()
    looked_up = table[rows]  # (K, D)
    dim = looked_up.shape[1]
    index = bags.unsqueeze(1).expand(-1, dim)
    peak = looked_up.new_full((batch, dim), float("-inf")).scatter_reduce(0, index, looked_up, "amax")
    position = torch.arange(rows.shape[0], device=rows.device).unsqueeze(1).expand(-1, dim)
    candidate = torch.where(looked_up == peak[bags], position, rows.shape[0])
    first = torch.full((batch, dim), rows.shape[0], device=rows.device, dtype=position.dtype)
    first = first.scatter_reduce(0, index, candidate, "amin")
    return (position == first[bags]).to(looked_up.dtype)


@register_rule(
    nn.EmbeddingBag, params=("weight",), default=(), subclasses=True, name="embedding_bag",
    unsupported=lambda m: _why_not(m),
)
def embedding_bag_per_sample_grads(
    module: nn.Module, inputs: CallInputs, grad_output: Tensor, names: FrozenSet[str]
) -> Dict[str, PerSampleGrad]:
    _check(module)
    batch, dim = grad_output.shape[0], module.embedding_dim
    if grad_output.shape != (batch, dim):
        raise ValueError(f"embedding_bag rule: output gradient {tuple(grad_output.shape)}, expected (B, {dim})")
    rows, bags, weights = _bags(module, inputs, batch)
    keep = None if module.padding_idx is None else rows != module.padding_idx
    if keep is not None:
        rows, bags = rows[keep], bags[keep]
        weights = None if weights is None else weights[keep]
    values = grad_output[bags]  # (K, D)
    if module.mode == "sum":
        if weights is not None:
            values = values * weights.unsqueeze(-1)
    elif module.mode == "mean":
        counts = torch.bincount(bags, minlength=batch).clamp_min(1)
        values = values / counts[bags].to(values.dtype).unsqueeze(-1)
    elif module.mode == "max":
        values = values * _first_max(module, rows, bags, batch)
    else:
        raise ValueError(f"embedding_bag rule: unknown mode {module.mode!r}")
    if module.scale_grad_by_freq:
        values = _scaled_by_frequency(bags, rows, values, module.num_embeddings)
    return {"weight": RowSparseGrad(batch, bags, rows, values, module.num_embeddings)}
