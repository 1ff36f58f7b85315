"""Salient-parameter federated learning (SPATL done for real) on Flower.

Clients share an encoder and keep a private head; each round they train locally (SCAFFOLD's
correction or FedProx's term optional), choose a fraction ``rho`` of every shared layer's units
by a criterion (this library's parameter saliency, SPATL's L2 norm, the update's size, random,
or all), and send only those units' updates; the server averages each coordinate over the
clients that sent it. docs/METHOD.md, "Federated learning".

The parts, from the bottom: :mod:`.split` (encoder / head), :mod:`.shared_units` (layers of
units), :mod:`.selection`, :mod:`.local_training`, :mod:`.aggregation` and :mod:`.server`
(pure torch, no Flower), :mod:`.client` (one client's round), :mod:`.records` (Flower records,
bytes), :mod:`.flower_apps` (ClientApp, strategy, ServerApp, :func:`simulate`),
:mod:`.digits_task` (the task the experiments use), :mod:`.localhost` (real processes).

Flower is the optional extra ``fl`` (``pip install "captum-paramsal[fl]"``, Python >= 3.11); only
:mod:`.records`, :mod:`.flower_apps` and :mod:`.localhost` need it.
"""

from .aggregation import ClientUpdate, masked_average, update_server_control
from .client import ClientConfig, ClientState, client_round
from .flower_apps import Federation, FederationResult, RoundRecord, simulate
from .local_training import LocalTraining
from .partition import ClientData, client_datasets, dirichlet_split
from .selection import CRITERIA
from .server import ServerState, aggregate_round
from .shared_units import SharedLayer, shared_layers
from .split import ModelSplit, split_model

__all__ = [
    "CRITERIA",
    "ClientConfig",
    "ClientData",
    "ClientState",
    "ClientUpdate",
    "Federation",
    "FederationResult",
    "LocalTraining",
    "ModelSplit",
    "RoundRecord",
    "ServerState",
    "SharedLayer",
    "aggregate_round",
    "client_datasets",
    "client_round",
    "dirichlet_split",
    "masked_average",
    "shared_layers",
    "simulate",
    "split_model",
    "update_server_control",
]
