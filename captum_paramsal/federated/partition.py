"""Federated data: a Dirichlet label split over clients (NIID-Bench style) and each client's
own held-out part, on which its personalised accuracy is measured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class ClientData:
    """One client's training and held-out samples."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])


def dirichlet_split(
    labels: Tensor, num_clients: int, alpha: float, seed: int = 0, min_size: int = 10, max_tries: int = 1000
) -> List[Tensor]:
    """Sample indices per client: for each class, the shares of the clients drawn from
    ``Dirichlet(alpha)``; drawn again until every client has at least ``min_size`` samples
    (small ``alpha``: each client sees few classes). Deterministic given ``seed``."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive int, got {num_clients!r}")
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"alpha (the Dirichlet concentration) must be > 0, got {alpha!r}")
    if num_clients * min_size > labels.shape[0]:
        raise ValueError(f"{labels.shape[0]} samples cannot give {num_clients} clients {min_size} each")
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    classes = labels.unique().tolist()
    for _ in range(max_tries):
        parts: List[List[Tensor]] = [[] for _ in range(num_clients)]
        for c in classes:
            members = (labels == c).nonzero().flatten()
            members = members[torch.randperm(members.numel(), generator=generator)]
            shares = torch.from_numpy(rng.dirichlet([float(alpha)] * num_clients))
            cuts = (shares.cumsum(0) * members.numel()).round().long().tolist()[:-1]
            for k, chunk in enumerate(torch.tensor_split(members, cuts)):
                parts[k].append(chunk)
        clients = [torch.cat(p).sort().values for p in parts]
        if min(c.numel() for c in clients) >= min_size:
            return clients
    raise ValueError(f"no Dirichlet({alpha}) split in {max_tries} draws gave every client {min_size} samples")


def client_datasets(
    x: Tensor, y: Tensor, parts: List[Tensor], held_out: float = 0.2, seed: int = 0
) -> List[ClientData]:
    """Each client's samples split into training and a held-out share ``held_out`` (at least one
    sample each), by a seeded permutation."""
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), got {held_out!r}")
    generator = torch.Generator().manual_seed(seed + 1)
    result = []
    for indices in parts:
        if indices.numel() < 2:
            raise ValueError("a client needs at least 2 samples (one to train on, one held out)")
        order = indices[torch.randperm(indices.numel(), generator=generator)]
        n_test = min(indices.numel() - 1, max(1, int(round(held_out * indices.numel()))))
        test, train = order[:n_test].sort().values, order[n_test:].sort().values
        result.append(ClientData(x[train], y[train], x[test], y[test]))
    return result


def label_histogram(data: List[ClientData], num_classes: int) -> Tuple[Tuple[int, ...], ...]:
    """Per client, its training samples per class (what a split looks like)."""
    return tuple(tuple(torch.bincount(d.y_train, minlength=num_classes).tolist()) for d in data)
