"""A client's local steps: plain SGD on the head, with SCAFFOLD's correction (option II) or
FedProx's proximal term on the shared encoder, and the personalised accuracy it is judged by.

SCAFFOLD (Karimireddy et al., 2020), option II: each encoder gradient step uses
``g + c - c_i`` (server and client control variates); after ``K`` steps of rate ``lr``
(``K`` = batches x epochs) the client's variate becomes ``c_i - c + (x - y_i) / (K lr)``,
``x`` the encoder received and ``y_i`` the trained one. FedProx adds ``mu / 2 |w - x|^2``
over the encoder's parameters to the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .split import ModelSplit


@dataclass(frozen=True)
class LocalTraining:
    """How a client trains each round: ``epochs`` over its data in batches of ``batch_size``
    (shuffled by a seeded generator), SGD at ``lr``; ``prox_mu`` > 0 adds FedProx's term;
    ``scaffold`` applies SCAFFOLD's correction."""

    lr: float = 0.05
    epochs: int = 1
    batch_size: int = 32
    prox_mu: float = 0.0
    scaffold: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(self.prox_mu, (int, float)) and self.prox_mu >= 0):
            raise ValueError(f"prox_mu must be >= 0, got {self.prox_mu!r}")


def train_locally(
    model: nn.Module,
    split: ModelSplit,
    x: Tensor,
    y: Tensor,
    config: LocalTraining,
    generator: torch.Generator,
    server_control: Optional[Dict[str, Tensor]] = None,
    client_control: Optional[Dict[str, Tensor]] = None,
) -> Tuple[int, Optional[Dict[str, Tensor]]]:
    """Train ``model`` in place on ``(x, y)``; returns ``(steps, new client control)`` (the
    control only with ``config.scaffold``: both variates must be given)."""
    if x.shape[0] == 0:
        raise ValueError("a client has no training samples")
    params = dict(model.named_parameters())
    encoder = [name for name in split.encoder_parameters]
    received = {name: params[name].detach().clone() for name in encoder}
    if config.scaffold and (server_control is None or client_control is None):
        raise ValueError("SCAFFOLD needs the server's and the client's control variates")
    model.train()
    steps = 0
    for _ in range(config.epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], config.batch_size):
            batch = order[start : start + config.batch_size]
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            if config.prox_mu > 0:
                loss = loss + 0.5 * config.prox_mu * sum((params[n] - received[n]).pow(2).sum() for n in encoder)
            loss.backward()
            with torch.no_grad():
                for name, p in params.items():
                    if p.grad is None:
                        continue
                    step = p.grad
                    if config.scaffold and name in received:
                        step = step + server_control[name] - client_control[name]
                    p.sub_(config.lr * step)
            steps += 1
    model.zero_grad(set_to_none=True)
    model.eval()
    if not config.scaffold:
        return steps, None
    with torch.no_grad():
        new_control = {
            name: client_control[name] - server_control[name] + (received[name] - params[name]) / (steps * config.lr)
            for name in encoder
        }
    return steps, new_control


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Share of ``(x, y)`` that ``model`` classifies right (eval mode); NaN for no samples."""
    if x.shape[0] == 0:
        return float("nan")
    model.eval()
    right = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
                for i in range(0, x.shape[0], batch_size))
    return right / x.shape[0]
