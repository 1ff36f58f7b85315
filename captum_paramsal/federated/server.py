"""The server's round, independent of how messages travel: check each reply, average what the
valid ones sent coordinate by coordinate, and move SCAFFOLD's server variate. A reply that
cannot be aggregated is rejected with its reason; the round goes on with the others."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor

from .aggregation import ClientUpdate, check_update, masked_average, update_server_control
from .shared_units import SharedLayer

log = logging.getLogger("captum_paramsal.federated")


@dataclass
class ServerState:
    """The global encoder, SCAFFOLD's server variate (None without SCAFFOLD), and the round."""

    encoder: Dict[str, Tensor]
    control: Optional[Dict[str, Tensor]] = None
    round: int = 0


@dataclass(frozen=True)
class RoundOutcome:
    """What one aggregation did: how many replies it used, which it rejected and why, and per
    layer the share of units some client sent."""

    accepted: int
    rejected: Tuple[Tuple[str, str], ...]
    coverage: Dict[str, float] = field(default_factory=dict)


def aggregate_round(
    state: ServerState,
    updates: Sequence[ClientUpdate],
    layers: Sequence[SharedLayer],
    num_clients: int,
    server_lr: float = 1.0,
) -> Tuple[ServerState, RoundOutcome]:
    """The next :class:`ServerState` from this round's replies."""
    valid: List[ClientUpdate] = []
    rejected = []
    for update in updates:
        reason = check_update(update, layers, state.encoder)
        if reason is None and state.control is not None:
            params_sent = [n for layer in layers if layer.name in update.indices for n in layer.tensors
                           if n in state.control]
            missing = [n for n in params_sent if n not in update.control]
            if missing:
                reason = f"SCAFFOLD is on but the reply has no control change for {missing[:3]}"
        if reason is not None:
            log.warning("round %d: rejected the reply of client %s: %s", state.round + 1, update.client, reason)
            rejected.append((update.client, reason))
            continue
        valid.append(update)
    if not valid:
        log.warning("round %d: no valid reply; the encoder stays as it was", state.round + 1)
        return ServerState(state.encoder, state.control, state.round + 1), RoundOutcome(0, tuple(rejected))
    encoder, coverage = masked_average(state.encoder, valid, layers, server_lr)
    control = state.control
    if control is not None:
        control = update_server_control(control, valid, layers, num_clients)
    return ServerState(encoder, control, state.round + 1), RoundOutcome(len(valid), tuple(rejected), coverage)
