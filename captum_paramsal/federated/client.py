"""One client's round, independent of how messages travel: receive the shared encoder (and the
server's SCAFFOLD variate), put the private head back, choose units, train, and reply with the
chosen units' updates. Also the evaluation every round ends with: personalised accuracy on the
client's own held-out data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .aggregation import ClientUpdate, client_update
from .local_training import LocalTraining, accuracy, train_locally
from .partition import ClientData
from .selection import check_criterion, check_rho, saliency_scores, select_units
from .shared_units import SharedLayer
from .split import ModelSplit

ModelFn = Callable[[], nn.Module]


@dataclass(frozen=True)
class ClientConfig:
    """What every client does in a round: local training, and which units it sends."""

    criterion: str = "all"
    rho: float = 1.0
    training: LocalTraining = field(default_factory=LocalTraining)
    saliency_batch_size: int = 64

    def __post_init__(self) -> None:
        check_criterion(self.criterion)
        check_rho(self.rho)


@dataclass
class ClientState:
    """What a client keeps across rounds: its private head (and the head's buffers), and its
    SCAFFOLD control variate."""

    head: Dict[str, Tensor]
    control: Optional[Dict[str, Tensor]] = None


def initial_state(model_fn: ModelFn, split: ModelSplit) -> ClientState:
    """A client's state before its first round: the head as ``model_fn`` builds it."""
    model = model_fn()
    return ClientState(head=split.head_state(model))


def assemble(
    model_fn: ModelFn, split: ModelSplit, encoder: Mapping[str, Tensor], head: Mapping[str, Tensor]
) -> nn.Module:
    """A model with the shared ``encoder`` and the private ``head`` loaded."""
    model = model_fn()
    state = dict(model.state_dict())
    state.update({k: v.clone() for k, v in encoder.items()})
    state.update({k: v.clone() for k, v in head.items()})
    model.load_state_dict(state)
    model.eval()
    return model


def _batches(x: Tensor, y: Tensor, size: int):
    for start in range(0, x.shape[0], size):
        yield x[start : start + size], y[start : start + size]


def client_round(
    model_fn: ModelFn,
    split: ModelSplit,
    layers: Tuple[SharedLayer, ...],
    data: ClientData,
    encoder: Mapping[str, Tensor],
    state: ClientState,
    config: ClientConfig,
    seed: int,
    server_control: Optional[Mapping[str, Tensor]] = None,
    client: str = "?",
) -> Tuple[ClientUpdate, ClientState, Dict[str, float]]:
    """Train on the client's data from the received ``encoder`` and its own head; return the
    reply, the new state, and metrics (training loss is not tracked; the train accuracy after
    training is)."""
    if data.num_train == 0:
        raise ValueError(f"client {client} has no training samples")
    model = assemble(model_fn, split, encoder, state.head)
    received = {name: encoder[name].detach().clone() for name in split.encoder}
    saliency = None
    if config.criterion == "saliency":
        parameters = set(split.encoder_parameters)
        saliency = saliency_scores(model, layers, _batches(data.x_train, data.y_train, config.saliency_batch_size),
                                   parameters)
    generator = torch.Generator().manual_seed(seed)
    control_change = None
    client_control = state.control
    if config.training.scaffold:
        if server_control is None:
            raise ValueError("SCAFFOLD is on but the server sent no control variate")
        if client_control is None:
            client_control = {name: torch.zeros_like(server_control[name]) for name in server_control}
        _, new_control = train_locally(model, split, data.x_train, data.y_train, config.training, generator,
                                       dict(server_control), client_control)
        control_change = {name: new_control[name] - client_control[name] for name in new_control}
        client_control = new_control
    else:
        train_locally(model, split, data.x_train, data.y_train, config.training, generator)
    local = split.encoder_state(model)
    chosen = select_units(config.criterion, config.rho, layers, local, received, saliency, generator)
    reply = client_update(data.num_train, received, local, chosen, layers, control_change, client)
    if control_change is not None:
        # the variate moves only on the units whose change was sent: the server's variate then
        # stays the mean of the clients' (SCAFFOLD's invariant) under any selection
        client_control = _moved_on(state.control, client_control, chosen, layers)
    new_state = ClientState(head=split.head_state(model), control=client_control)
    return reply, new_state, {"train_accuracy": accuracy(model, data.x_train, data.y_train)}


def _moved_on(
    old: Optional[Mapping[str, Tensor]], new: Dict[str, Tensor], chosen: Mapping[str, Tensor],
    layers: Tuple[SharedLayer, ...],
) -> Dict[str, Tensor]:
    """``new`` on the chosen units of each layer, ``old`` (zeros before the first round) elsewhere."""
    result = {}
    for layer in layers:
        indices = chosen[layer.name]
        for name in layer.tensors:
            if name not in new:
                continue
            value = torch.zeros_like(new[name]) if old is None else old[name].clone()
            if value.dim() == 0:
                value = new[name].clone()
            else:
                value[indices] = new[name][indices]
            result[name] = value
    return result


def client_accuracy(model_fn: ModelFn, split: ModelSplit, data: ClientData, encoder: Mapping[str, Tensor],
                    state: ClientState) -> float:
    """Personalised accuracy: the shared ``encoder`` with this client's head, on its held-out data."""
    return accuracy(assemble(model_fn, split, encoder, state.head), data.x_test, data.y_test)
