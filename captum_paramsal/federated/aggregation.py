"""The server's side: per-coordinate averages of what clients sent, and SCAFFOLD's server variate.

Each client ``k`` sends, per layer, the indices of the units it selected and its update of
those units (``delta_k = y_k - x`` on them). For every coordinate the server averages the
updates of the clients that sent it, weighted by their sample counts ``n_k``, and leaves a
coordinate nobody sent unchanged:

    x[j] <- x[j] + eta_g * sum_{k sent j} n_k delta_k[j] / sum_{k sent j} n_k

Averaging zero-filled updates instead (``sum_k n_k delta_k[j] / sum_k n_k`` over all clients)
would shrink every update by the share of clients that did not send it, pulling weights
toward where they were: :func:`zero_filled_average` computes that biased form for tests
and figures. With every unit sent by every client this is FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .shared_units import SharedLayer


@dataclass
class ClientUpdate:
    """One client's reply: its sample count, per layer the selected unit indices, the update
    of those units for each of the layer's tensors, and optionally the change of its SCAFFOLD
    control variate on the same units (parameters only)."""

    num_examples: int
    indices: Dict[str, Tensor]
    values: Dict[str, Tensor]
    control: Dict[str, Tensor] = field(default_factory=dict)
    client: str = "?"


def check_update(update: ClientUpdate, layers: Sequence[SharedLayer], state: Mapping[str, Tensor]) -> Optional[str]:
    """Why ``update`` cannot be aggregated (indices out of range, duplicated or not 1-D integers;
    values of the wrong shape or dtype; tensors that are not the encoder's), or None."""
    if isinstance(update.num_examples, bool) or not isinstance(update.num_examples, int) or update.num_examples < 1:
        return f"num_examples must be a positive int, got {update.num_examples!r}"
    by_name = {layer.name: layer for layer in layers}
    unknown = sorted(set(update.indices) - set(by_name))
    if unknown:
        return f"indices for unknown layer(s) {unknown[:3]}"
    expected = {name for layer_name in update.indices for name in by_name[layer_name].tensors}
    extra = sorted(set(update.values) - expected)
    if extra:
        return f"values for tensor(s) {extra[:3]} that are not in the layers it sent indices for"
    for layer_name, indices in update.indices.items():
        layer = by_name[layer_name]
        if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.dtype not in (torch.int64, torch.int32):
            return f"layer {layer_name}: indices must be a 1-D integer array"
        if indices.numel() == 0:
            return f"layer {layer_name}: no unit selected"
        if int(indices.min()) < 0 or int(indices.max()) >= layer.num_units:
            return f"layer {layer_name}: an index is out of range 0..{layer.num_units - 1}"
        if indices.unique().numel() != indices.numel():
            return f"layer {layer_name}: duplicated indices"
        for name in layer.tensors:
            sent = {"values": update.values, "control": update.control}
            for kind, record in sent.items():
                if name not in record:
                    if kind == "values":
                        return f"layer {layer_name}: no values for {name}"
                    continue
                value = record[name]
                reference = state[name]
                shape = (indices.numel(), *reference.shape[1:]) if reference.dim() else (1,)
                if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                    got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    return f"{kind} of {name}: shape {got}, expected {shape} for {indices.numel()} units"
                if not value.is_floating_point():
                    return f"{kind} of {name}: dtype {value.dtype} is not floating"
                if not bool(torch.isfinite(value).all()):
                    return f"{kind} of {name}: non-finite values"
    extra_control = sorted(set(update.control) - expected)
    if extra_control:
        return f"control for tensor(s) {extra_control[:3]} outside the layers it sent"
    return None


def _scatter(target: Tensor, indices: Tensor, rows: Tensor) -> None:
    if target.dim() == 0:
        target.add_(rows.reshape(()))
    else:
        target.index_add_(0, indices, rows.to(target.dtype))


def masked_average(
    state: Mapping[str, Tensor],
    updates: Sequence[ClientUpdate],
    layers: Sequence[SharedLayer],
    server_lr: float = 1.0,
) -> Tuple[Dict[str, Tensor], Dict[str, float]]:
    """The new encoder state, and per layer the share of its units that at least one client sent.

    Computed in float64 and cast back to each tensor's dtype."""
    by_name = {layer.name: layer for layer in layers}
    sums = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in state.items()}
    weights = {layer.name: torch.zeros(layer.num_units, dtype=torch.float64) for layer in layers}
    for update in updates:
        n = float(update.num_examples)
        for layer_name, indices in update.indices.items():
            indices = indices.long()
            weights[layer_name].index_add_(0, indices, torch.full((indices.numel(),), n, dtype=torch.float64))
            for name in by_name[layer_name].tensors:
                _scatter(sums[name], indices, n * update.values[name].to(torch.float64))
    new_state, coverage = {}, {}
    for layer in layers:
        w = weights[layer.name]
        sent = w > 0
        coverage[layer.name] = float(sent.double().mean())
        for name in layer.tensors:
            old = state[name]
            if old.dim() == 0:
                mean = sums[name] / w[0] if sent[0] else torch.zeros((), dtype=torch.float64)
                new_state[name] = (old.double() + server_lr * mean).to(old.dtype)
                continue
            shape = (-1,) + (1,) * (old.dim() - 1)
            mean = torch.where(sent.reshape(shape), sums[name] / w.clamp(min=1e-300).reshape(shape), 0.0)
            new_state[name] = (old.double() + server_lr * mean).to(old.dtype)
    return new_state, coverage


def zero_filled_average(
    state: Mapping[str, Tensor], updates: Sequence[ClientUpdate], layers: Sequence[SharedLayer]
) -> Dict[str, Tensor]:
    """The biased alternative: every client's update zero-filled where it sent nothing, averaged
    over all clients by sample count (what averaging dense copies of sparse uploads does)."""
    by_name = {layer.name: layer for layer in layers}
    total = float(sum(u.num_examples for u in updates))
    sums = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in state.items()}
    for update in updates:
        for layer_name, indices in update.indices.items():
            for name in by_name[layer_name].tensors:
                _scatter(sums[name], indices.long(), update.num_examples * update.values[name].to(torch.float64))
    return {name: (state[name].double() + sums[name] / total).to(state[name].dtype) for name in state}


def update_server_control(
    control: Mapping[str, Tensor], updates: Sequence[ClientUpdate], layers: Sequence[SharedLayer], num_clients: int
) -> Dict[str, Tensor]:
    """SCAFFOLD's server variate: ``c <- c + (1 / N) sum_k delta c_k``, ``N`` the number of ALL
    clients (not only this round's), each ``delta c_k`` added on the units it was sent for."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    by_name = {layer.name: layer for layer in layers}
    new = {name: c.detach().to(torch.float64).clone() for name, c in control.items()}
    for update in updates:
        for layer_name, indices in update.indices.items():
            for name in by_name[layer_name].tensors:
                if name in update.control and name in new:
                    _scatter(new[name], indices.long(), update.control[name].to(torch.float64) / num_clients)
    return {name: new[name].to(control[name].dtype) for name in control}


def client_update(
    num_examples: int,
    received: Mapping[str, Tensor],
    local: Mapping[str, Tensor],
    chosen: Mapping[str, Tensor],
    layers: Sequence[SharedLayer],
    control_change: Optional[Mapping[str, Tensor]] = None,
    client: str = "?",
) -> ClientUpdate:
    """The reply of a client that trained ``received`` into ``local`` and chose ``chosen``."""
    values: Dict[str, Tensor] = {}
    control: Dict[str, Tensor] = {}
    for layer in layers:
        indices = chosen[layer.name]
        for name in layer.tensors:
            delta = local[name].detach() - received[name].detach()
            values[name] = delta.reshape(1) if delta.dim() == 0 else delta.index_select(0, indices)
            if control_change is not None and name in control_change:
                change = control_change[name]
                control[name] = change.reshape(1) if change.dim() == 0 else change.index_select(0, indices)
    return ClientUpdate(num_examples, dict(chosen), values, control, client)
