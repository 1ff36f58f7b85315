"""The federated task the experiments, the localhost deployment and the tests share: scikit-learn's
digits split over clients by a Dirichlet label split, a small CNN whose convolutions and first
Linear layer are the shared encoder and whose classifier is the private head, and the methods
compared (FedAvg, FedProx, SCAFFOLD, FedPer, SPATL as its code means it, saliency selection,
random selection)."""

from __future__ import annotations

from functools import lru_cache
from typing import List, Tuple

import torch
from torch import nn

from .client import ClientConfig
from .flower_apps import Federation
from .local_training import LocalTraining
from .partition import ClientData, client_datasets, dirichlet_split

#: the shared encoder of :class:`DigitsNet` (parameter-name prefixes); the head is ``head``
ENCODER = ("conv1", "bn1", "conv2", "bn2", "fc")
#: method -> (selection criterion, SCAFFOLD, private head, FedProx mu); selection methods take rho
METHODS = {
    "fedavg": ("all", False, False, 0.0),
    "fedprox": ("all", False, False, 0.01),
    "scaffold": ("all", True, False, 0.0),
    "fedper": ("all", False, True, 0.0),
    "spatl-l2": ("l2", True, True, 0.0),
    "saliency": ("saliency", True, True, 0.0),
    "random": ("random", True, True, 0.0),
}
SELECTION_METHODS = ("spatl-l2", "saliency", "random")


class DigitsNet(nn.Module):
    """Two conv + BatchNorm layers, a Linear layer (the encoder) and a classifier (the head) on
    1x8x8 digits. Built with the same weights every time (seed 0)."""

    def __init__(self) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)
        torch.random.set_rng_state(generator_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(torch.relu(self.fc(x.flatten(1))))


@lru_cache(maxsize=16)
def _clients(num_clients: int, alpha: float, seed: int) -> Tuple[ClientData, ...]:
    from ..zoo.digits import digits_data

    data = digits_data()
    parts = dirichlet_split(data.labels, num_clients, alpha, seed=seed, min_size=20)
    return tuple(client_datasets(data.images, data.labels, parts, held_out=0.25, seed=seed))


def digits_clients(num_clients: int = 10, alpha: float = 0.5, seed: int = 0) -> List[ClientData]:
    """All 1,797 digits over ``num_clients`` clients, Dirichlet(``alpha``) over labels, each
    client's quarter held out (deterministic given the arguments)."""
    return list(_clients(num_clients, float(alpha), seed))


def method_federation(
    method: str,
    clients: List[ClientData],
    rounds: int,
    rho: float = 1.0,
    seed: int = 0,
    lr: float = 0.05,
    epochs: int = 1,
    batch_size: int = 32,
    name: str = "",
) -> Federation:
    """The :class:`Federation` of one compared method on the digits task."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    criterion, scaffold, private_head, mu = METHODS[method]
    if method not in SELECTION_METHODS:
        rho = 1.0
    training = LocalTraining(lr=lr, epochs=epochs, batch_size=batch_size, prox_mu=mu, scaffold=scaffold)
    encoder = ENCODER if private_head else ENCODER + ("head",)
    return Federation(name or (f"{method}@{rho:g}" if method in SELECTION_METHODS else method), DigitsNet,
                      encoder=encoder, clients=clients, config=ClientConfig(criterion, rho, training),
                      rounds=rounds, seed=seed)
