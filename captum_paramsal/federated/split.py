"""Which part of a model is shared with the server (the encoder) and which stays on the client (the head).

A split is given by parameter-name prefixes or by a predicate on names. Every parameter must
fall in exactly one part: a parameter in neither, or in both, is an error before any round.
Floating-point buffers (BatchNorm's running statistics) follow the module that holds them; a
buffer that does not float (``num_batches_tracked``) is never shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

#: ``"layer1."``-style name prefixes, or ``predicate(name) -> bool``
PartSpec = Union[str, Sequence[str], Callable[[str], bool]]


def _matcher(spec: PartSpec, what: str) -> Callable[[str], bool]:
    if callable(spec):
        return spec
    prefixes = (spec,) if isinstance(spec, str) else tuple(spec)
    if not prefixes or not all(isinstance(p, str) and p for p in prefixes):
        raise ValueError(f"{what} must be parameter-name prefixes (non-empty strings) or a predicate, got {spec!r}")
    return lambda name: any(name == p or name.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


@dataclass(frozen=True)
class ModelSplit:
    """The names of the shared tensors (parameters and floating buffers, in ``state_dict``
    order) and of the private head's parameters."""

    encoder: Tuple[str, ...]
    head: Tuple[str, ...]
    encoder_parameters: Tuple[str, ...]

    def encoder_state(self, model: nn.Module) -> Dict[str, Tensor]:
        """The encoder's tensors of ``model`` (detached copies)."""
        state = model.state_dict()
        return {name: state[name].detach().clone() for name in self.encoder}

    def head_state(self, model: nn.Module) -> Dict[str, Tensor]:
        state = model.state_dict()
        return {name: state[name].detach().clone() for name in self.head_tensors(model)}

    def head_tensors(self, model: nn.Module) -> Tuple[str, ...]:
        """The head's parameters and every tensor of the state dict that is not shared (the
        head's buffers and ``num_batches_tracked`` counters): what a client keeps to itself."""
        shared = set(self.encoder)
        return tuple(name for name in model.state_dict() if name not in shared)


def split_model(model: nn.Module, encoder: PartSpec, head: PartSpec = None) -> ModelSplit:
    """Split ``model`` into a shared encoder and a private head.

    Args:
        model: the network every client trains.
        encoder: name prefixes of the shared parameters (``"features"`` matches
            ``features.0.weight``), or a predicate on parameter names.
        head: the same for the private head; default: every parameter not in the encoder.

    An empty head (every parameter shared) is plain FedAvg / FedProx / SCAFFOLD.

    Raises:
        ValueError: a parameter in neither part or in both, or an empty encoder.
    """
    in_encoder = _matcher(encoder, "encoder")
    in_head = (lambda name: not in_encoder(name)) if head is None else _matcher(head, "head")
    names = [name for name, _ in model.named_parameters()]
    neither = [n for n in names if not in_encoder(n) and not in_head(n)]
    both = [n for n in names if in_encoder(n) and in_head(n)]
    if neither:
        raise ValueError(f"the encoder/head split leaves {len(neither)} parameter(s) in neither part: {neither[:5]}")
    if both:
        raise ValueError(f"the encoder/head split puts {len(both)} parameter(s) in both parts: {both[:5]}")
    encoder_params = tuple(n for n in names if in_encoder(n))
    if not encoder_params:
        raise ValueError("the encoder is empty: no parameter matches it, so nothing would be shared")
    owners = {name.rpartition(".")[0] for name in encoder_params}
    shared_buffers = {
        name
        for name, buffer in model.named_buffers()
        if name.rpartition(".")[0] in owners and torch.is_floating_point(buffer)
    }
    keep = set(encoder_params) | shared_buffers
    encoder_tensors = tuple(name for name in model.state_dict() if name in keep)
    return ModelSplit(encoder=encoder_tensors, head=tuple(n for n in names if in_head(n)),
                      encoder_parameters=encoder_params)
