"""Which units of each shared layer a client sends: a fraction ``rho`` of them, by a criterion.

* ``"saliency"``: this library's parameter-space saliency (mean |grad| per unit, averaged over
  the client's local training data, at the model the client received), standardized within
  the layer: the units the client's own data says are responsible for its loss;
* ``"l2"``: the L2 norm of the unit's weights after local training (SPATL's criterion);
* ``"update"``: the L2 norm of the unit's update (all of its tensors);
* ``"random"``: uniformly at random (seeded);
* ``"all"``: every unit (FedAvg's dense upload).

Each layer sends ``max(1, round(rho * units))`` units, so every layer moves every round.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .shared_units import SharedLayer

CRITERIA = ("saliency", "l2", "update", "random", "all")


def check_rho(rho: float) -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho <= 1 or math.isnan(rho):
        raise ValueError(f"rho (the fraction of each layer's units a client sends) must be in (0, 1], got {rho!r}")
    return float(rho)


def check_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise ValueError(f"unknown selection criterion {criterion!r}; choose one of {list(CRITERIA)}")
    return criterion


def units_to_send(num_units: int, rho: float) -> int:
    return min(num_units, max(1, int(round(rho * num_units))))


def saliency_scores(
    model: nn.Module, layers: Sequence[SharedLayer], batches: Iterable[Tuple[Tensor, Tensor]], parameter_names: set
) -> Dict[str, Tensor]:
    """Per layer, the standardized mean saliency of its units over ``batches`` (``model`` as
    given: the received encoder with the client's head). Layers whose main tensor is not a
    parameter (running statistics alone) get no score."""
    from .._core.parameter_saliency import ParameterSaliency

    names = [layer.main for layer in layers if layer.main in parameter_names]
    ps = ParameterSaliency(model, params=names)
    total, count = None, 0
    for x, y in batches:
        raw = ps.attribute(x, target=y).detach().to(torch.float64)
        total = raw.sum(0) if total is None else total + raw.sum(0)
        count += raw.shape[0]
    if count == 0:
        raise ValueError("saliency selection needs local data: the client has no training samples")
    mean = total / count
    scores = {}
    for layer in layers:
        if layer.main not in parameter_names:
            continue
        values = mean[ps.layout[layer.main].slice]
        spread = values.std() if values.numel() > 1 else values.new_tensor(0.0)
        scores[layer.name] = (values - values.mean()) / spread if spread > 0 else values - values.mean()
    return scores


def _unit_norms(state: Mapping[str, Tensor], names: Sequence[str], units: int) -> Tensor:
    total = torch.zeros(units, dtype=torch.float64)
    for name in names:
        tensor = state[name].detach().to(torch.float64)
        total += tensor.reshape(units, -1).pow(2).sum(1) if tensor.dim() else tensor.reshape(1).pow(2)
    return total.sqrt()


def select_units(
    criterion: str,
    rho: float,
    layers: Sequence[SharedLayer],
    local: Mapping[str, Tensor],
    received: Mapping[str, Tensor],
    saliency: Optional[Mapping[str, Tensor]] = None,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, Tensor]:
    """``{layer name: sorted int64 indices}`` of the units to send from each layer.

    ``local``: the client's encoder after local training; ``received``: as the server sent it;
    ``saliency``: :func:`saliency_scores` (for ``"saliency"``; a layer without a score is chosen
    by its update's size)."""
    check_criterion(criterion)
    rho = check_rho(rho)
    chosen = {}
    for layer in layers:
        k = units_to_send(layer.num_units, rho)
        if criterion == "all" or k == layer.num_units:
            chosen[layer.name] = torch.arange(layer.num_units)
            continue
        if criterion == "random":
            order = torch.randperm(layer.num_units, generator=generator)
            chosen[layer.name] = order[:k].sort().values
            continue
        if criterion == "saliency" and saliency is not None and layer.name in saliency:
            scores = saliency[layer.name]
        elif criterion == "l2":
            scores = _unit_norms(local, [layer.main], layer.num_units)
        else:  # "update", and "saliency" for a layer without a parameter
            update = {name: local[name].to(torch.float64) - received[name].to(torch.float64) for name in layer.tensors}
            scores = _unit_norms(update, layer.tensors, layer.num_units)
        # ties broken by the lower index, so that a selection is reproducible
        order = sorted(range(layer.num_units), key=lambda i: (-float(scores[i]), i))
        chosen[layer.name] = torch.tensor(sorted(order[:k]), dtype=torch.long)
    return chosen
