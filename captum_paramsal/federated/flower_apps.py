"""The federation on Flower: a ClientApp, a strategy (a ``FedAvg`` subclass whose aggregation is
the per-coordinate one of :mod:`.aggregation`), a ServerApp that runs one or several
federations one after another, and :func:`simulate`, which runs them on Flower's simulation
engine (Ray) from Python and returns what every round did.

Messages: the downlink (train) carries the dense encoder and, with SCAFFOLD, the server
variate (:mod:`.records`) and the round's :class:`~.client.ClientConfig` as a ``ConfigRecord``;
the reply carries the chosen units' updates and, in its ``MetricRecord``, the sample count and
the personalised accuracy of the encoder the client received (its own head on its own
held-out data). The last round also sends an evaluation message, for the final accuracy. The
private head and the client's control variate live in ``context.state`` and never leave it.
Bytes are ``ArrayRecord.count_bytes()`` of what each message carries.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .client import ClientConfig, ClientState, ModelFn, client_accuracy, client_round, initial_state
from .local_training import LocalTraining
from .partition import ClientData
from .records import arrays_of, downlink_arrays, downlink_from_arrays, record_of, update_arrays, update_from_arrays
from .server import ServerState, aggregate_round, log
from .shared_units import SharedLayer, shared_layers
from .split import ModelSplit, PartSpec, split_model


@dataclass(frozen=True)
class Federation:
    """One federated run: the model (``model_fn`` builds it with the same initial weights on
    every call; it must pickle, for Ray), how it splits, each client's data (client ``i`` is
    Flower's partition ``i``), what clients do, for how many rounds."""

    name: str
    model_fn: ModelFn
    encoder: PartSpec
    clients: Sequence[ClientData]
    config: ClientConfig = field(default_factory=ClientConfig)
    rounds: int = 10
    head: PartSpec = None
    server_lr: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be a positive int, got {self.rounds!r}")
        if not self.clients:
            raise ValueError(f"federation {self.name!r} has no clients")
        empty = [i for i, c in enumerate(self.clients) if c.num_train == 0 or c.y_test.numel() == 0]
        if empty:
            raise ValueError(f"federation {self.name!r}: client(s) {empty[:5]} have no training or no held-out samples")
        if not (isinstance(self.server_lr, (int, float)) and self.server_lr > 0):
            raise ValueError(f"server_lr must be > 0, got {self.server_lr!r}")

    def split(self) -> Tuple[ModelSplit, Tuple[SharedLayer, ...]]:
        model = self.model_fn()
        split = split_model(model, self.encoder, self.head)
        return split, shared_layers(model, split)


@dataclass
class RoundRecord:
    """One round: the personalised accuracy of the encoder the clients received this round
    (each client's head, its held-out data; weighted by held-out samples), per client too; bytes
    per client down (encoder + variate) and up (the reply's arrays); rejected replies; per layer
    the share of units some client sent."""

    round: int
    accuracy_received: float
    client_accuracy_received: List[float]
    bytes_down: List[int]
    bytes_up: List[int]
    rejected: List[Tuple[str, str]] = field(default_factory=list)
    coverage: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class FederationResult:
    """Every round of one federation, and the personalised accuracy after the last."""

    name: str
    rounds: List[RoundRecord]
    final_accuracy: float = float("nan")
    final_client_accuracy: List[float] = field(default_factory=list)
    encoder: Dict[str, torch.Tensor] = field(default_factory=dict)

    def accuracy_curve(self) -> List[float]:
        """Accuracy after each round: round r's received accuracy is the model after round r-1."""
        return [r.accuracy_received for r in self.rounds[1:]] + [self.final_accuracy]

    def megabytes_per_round(self) -> Tuple[float, float]:
        """Mean MB per client per round, (down, up)."""
        down = [sum(r.bytes_down) / len(r.bytes_down) for r in self.rounds]
        up = [sum(r.bytes_up) / max(1, len(r.bytes_up)) for r in self.rounds]
        return sum(down) / len(down) / 1e6, sum(up) / len(up) / 1e6


# -- configs as Flower records ---------------------------------------------------------------------


def config_values(config: ClientConfig) -> Dict[str, Any]:
    """A :class:`ClientConfig` as ``ConfigRecord`` values (str, int, float, bool)."""
    t = config.training
    return {"criterion": config.criterion, "rho": float(config.rho), "lr": float(t.lr), "epochs": int(t.epochs),
            "batch-size": int(t.batch_size), "prox-mu": float(t.prox_mu), "scaffold": bool(t.scaffold),
            "saliency-batch-size": int(config.saliency_batch_size)}


def config_from_values(values: Mapping[str, Any]) -> ClientConfig:
    training = LocalTraining(lr=float(values["lr"]), epochs=int(values["epochs"]),
                             batch_size=int(values["batch-size"]), prox_mu=float(values["prox-mu"]),
                             scaffold=bool(values["scaffold"]))
    return ClientConfig(str(values["criterion"]), float(values["rho"]), training,
                        int(values["saliency-batch-size"]))


def client_seed(seed: int, server_round: int, partition: int) -> int:
    return (seed * 1_000_003 + server_round * 1009 + partition) % (2**31)


# -- the client ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSide:
    """What a client needs to know about a federation: the model, its split, every client's data
    (it takes its own partition's)."""

    model_fn: ModelFn
    encoder: PartSpec
    head: PartSpec
    clients: Sequence[ClientData]


def _load_state(context, fed_id: str, side: ClientSide, split: ModelSplit) -> ClientState:
    from flwr.app import ConfigRecord

    meta = context.state.get("meta")
    if meta is None or str(meta["fed-id"]) != fed_id:  # a new federation: start afresh
        for key in ("head", "control"):
            context.state.pop(key, None)
        context.state["meta"] = ConfigRecord({"fed-id": fed_id})
        return initial_state(side.model_fn, split)
    head = {k: torch.from_numpy(a.copy()) for k, a in arrays_of(context.state["head"]).items()}
    control = None
    if "control" in context.state:
        control = {k: torch.from_numpy(a.copy()) for k, a in arrays_of(context.state["control"]).items()}
    return ClientState(head, control)


def _save_state(context, state: ClientState) -> None:
    context.state["head"] = record_of({k: v.detach().cpu().numpy() for k, v in state.head.items()})
    if state.control is not None:
        context.state["control"] = record_of({k: v.detach().cpu().numpy() for k, v in state.control.items()})


def client_app(federations: Mapping[str, ClientSide]):
    """A Flower ``ClientApp`` for ``federations`` (by federation id)."""
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def side_and_data(msg: Message, context: Context):
        torch.set_num_threads(1)
        config = msg.content["config"]
        fed_id = str(config["fed-id"])
        if fed_id not in federations:
            raise ValueError(f"unknown federation {fed_id!r}")
        side = federations[fed_id]
        partition = int(context.node_config["partition-id"])
        if not 0 <= partition < len(side.clients):
            raise ValueError(f"partition {partition} has no data in federation {fed_id!r}")
        model = side.model_fn()
        split = split_model(model, side.encoder, side.head)
        return fed_id, side, split, shared_layers(model, split), side.clients[partition], partition, config

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        fed_id, side, split, layers, data, partition, config = side_and_data(msg, context)
        state = _load_state(context, fed_id, side, split)
        encoder, control = downlink_from_arrays(arrays_of(msg.content["arrays"]))
        received_accuracy = client_accuracy(side.model_fn, split, data, encoder, state)
        server_round = int(config["server-round"])
        reply, state, metrics = client_round(
            side.model_fn, split, layers, data, encoder, state, config_from_values(config),
            seed=client_seed(int(config["seed"]), server_round, partition), server_control=control,
            client=str(partition),
        )
        _save_state(context, state)
        content = RecordDict({
            "arrays": record_of(update_arrays(reply)),
            "metrics": MetricRecord({"num-examples": reply.num_examples, "partition": partition,
                                     "accuracy-received": float(received_accuracy),
                                     "num-test": int(data.y_test.numel()),
                                     "train-accuracy": float(metrics["train_accuracy"])}),
        })
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        fed_id, side, split, _, data, partition, _ = side_and_data(msg, context)
        state = _load_state(context, fed_id, side, split)
        encoder, _ = downlink_from_arrays(arrays_of(msg.content["arrays"]))
        accuracy = client_accuracy(side.model_fn, split, data, encoder, state)
        return Message(RecordDict({"metrics": MetricRecord({
            "accuracy": float(accuracy), "num-test": int(data.y_test.numel()), "partition": partition})}),
            reply_to=msg)

    return app


# -- the server ---------------------------------------------------------------------------------------


def _strategy_class():
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    class SalientAggregation(FedAvg):
        """FedAvg's round structure with this library's aggregation: every client takes part
        each round; each coordinate is averaged over the clients that sent it (by sample count),
        others stay; SCAFFOLD's server variate is moved with the number of all clients."""

        def __init__(self, fed_id: str, federation: Federation, state: ServerState, layers, num_clients: int):
            super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=num_clients)
            self.fed_id = fed_id
            self.federation = federation
            self.server_state = state
            self.layers = layers
            self.num_clients = num_clients
            self.history: List[RoundRecord] = []
            self.final: Dict[int, float] = {}
            self._down: Dict[int, int] = {}
            self._started = 0.0

        def _config(self, server_round: int) -> ConfigRecord:
            values = config_values(self.federation.config)
            values.update({"fed-id": self.fed_id, "server-round": server_round, "seed": int(self.federation.seed)})
            return ConfigRecord(values)

        def _downlink(self) -> ArrayRecord:
            return record_of(downlink_arrays(self.server_state.encoder, self.server_state.control))

        def configure_train(self, server_round, arrays, config, grid):
            self._started = time.perf_counter()
            nodes = sorted(grid.get_node_ids())
            messages = []
            for node in nodes:
                record = self._downlink()
                self._down[node] = record.count_bytes()
                messages.append(Message(RecordDict({"arrays": record, "config": self._config(server_round)}),
                                        message_type=MessageType.TRAIN, dst_node_id=node))
            return messages

        def aggregate_train(self, server_round, replies):
            updates, accuracy, tests, partitions, up, rejected, nodes = [], [], [], [], [], [], []
            for reply in replies:
                node = reply.metadata.src_node_id
                if reply.has_error():
                    reason = f"the client failed: {reply.error.reason}"
                    log.warning("round %d: no reply from node %s: %s", server_round, node, reason)
                    rejected.append((str(node), reason))
                    continue
                metrics = reply.content["metrics"]
                record = reply.content["arrays"]
                up.append(record.count_bytes())
                partition = int(metrics["partition"])
                partitions.append(partition)
                nodes.append(node)
                accuracy.append(float(metrics["accuracy-received"]))
                tests.append(int(metrics["num-test"]))
                updates.append(update_from_arrays(arrays_of(record), int(metrics["num-examples"]), str(partition)))
            order = sorted(range(len(partitions)), key=lambda i: partitions[i])
            # in partition order: replies arrive in whatever order the clients finish, and the float sums
            # of the aggregation depend on the order (a last-bit difference grows over rounds)
            self.server_state, outcome = aggregate_round(
                self.server_state, [updates[i] for i in order], self.layers, self.num_clients,
                self.federation.server_lr)
            weighted = sum(a * n for a, n in zip(accuracy, tests)) / max(1, sum(tests))
            # per client in partition order; nodes that did not reply after them
            down_nodes = [nodes[i] for i in order] + sorted(set(self._down) - set(nodes))
            self.history.append(RoundRecord(
                server_round, weighted, [accuracy[i] for i in order], [self._down[n] for n in down_nodes],
                [up[i] for i in order], rejected + list(outcome.rejected), outcome.coverage,
                time.perf_counter() - self._started))
            return ArrayRecord(), MetricRecord({"accuracy-received": weighted, "accepted": outcome.accepted})

        def configure_evaluate(self, server_round, arrays, config, grid):
            if server_round != self.federation.rounds:  # the accuracy rides on the next train reply
                return []
            record_config = self._config(server_round)
            return [Message(RecordDict({"arrays": self._downlink(), "config": record_config}),
                            message_type=MessageType.EVALUATE, dst_node_id=node)
                    for node in sorted(grid.get_node_ids())]

        def aggregate_evaluate(self, server_round, replies):
            results = []
            for reply in replies:
                if reply.has_error():
                    log.warning("final evaluation: node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
                    continue
                m = reply.content["metrics"]
                results.append((int(m["partition"]), float(m["accuracy"]), int(m["num-test"])))
            results.sort()
            for partition, accuracy, _ in results:
                self.final[partition] = accuracy
            if not results:
                return None
            weighted = sum(a * n for _, a, n in results) / sum(n for _, _, n in results)
            self.final[-1] = weighted
            return MetricRecord({"accuracy": weighted})

    return SalientAggregation


def run_federations(grid, federations: Sequence[Federation], num_clients: int,
                    on_result: Optional[Callable[[FederationResult], None]] = None) -> List[FederationResult]:
    """Inside a ServerApp's main: run ``federations`` one after another on ``grid``."""
    from flwr.app import ArrayRecord

    strategy_class = _strategy_class()
    results = []
    _wait_for_nodes(grid, num_clients)
    for index, federation in enumerate(federations):
        split, layers = federation.split()
        model = federation.model_fn()
        encoder = split.encoder_state(model)
        control = None
        if federation.config.training.scaffold:
            params = dict(model.named_parameters())
            control = {name: torch.zeros_like(params[name]) for name in split.encoder_parameters}
        fed_id = f"{index}:{federation.name}"
        strategy = strategy_class(fed_id, federation, ServerState(encoder, control), layers, num_clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=federation.rounds, timeout=3600)
        clients = [strategy.final.get(i, float("nan")) for i in range(num_clients)]
        result = FederationResult(federation.name, strategy.history, strategy.final.get(-1, float("nan")), clients,
                                  strategy.server_state.encoder)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _wait_for_nodes(grid, count: int, timeout: float = 300.0) -> None:
    """Until ``count`` SuperNodes are connected: every client takes part in every round."""
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(list(grid.get_node_ids()))} of {count} SuperNodes connected after "
                               f"{timeout:.0f} s")
        time.sleep(0.2)


def client_sides(federations: Sequence[Federation]) -> Dict[str, ClientSide]:
    return {f"{i}:{f.name}": ClientSide(f.model_fn, f.encoder, f.head, f.clients) for i, f in enumerate(federations)}


def quiet_flower(temp_dir: str) -> None:
    """Flower's and Ray's logging down, telemetry and update checks off, their files under ``temp_dir``
    (set before flwr is imported, where possible)."""
    os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_HOME", os.path.join(temp_dir, "flwr"))
    logging.getLogger("flwr").setLevel(logging.ERROR)


def simulate(
    federations: Sequence[Federation],
    temp_dir: Optional[str] = None,
    cpus_per_client: float = 1.0,
    on_result: Optional[Callable[[FederationResult], None]] = None,
) -> List[FederationResult]:
    """Run ``federations`` one after another in one Flower simulation (one Ray start-up); all
    must have the same number of clients. Returns one :class:`FederationResult` each.

    ``temp_dir``: where Flower and Ray keep their state (default: a new temporary folder, removed
    afterwards). Ray's start-up takes about 15 s on 2 cores, then about 0.2-0.5 s per round of
    small models.

    Examples::

        >>> from captum_paramsal.federated import Federation, ClientConfig, LocalTraining, simulate
        >>> spatl = Federation("saliency", model_fn, encoder=["features"], clients=clients, rounds=20,
        ...                    config=ClientConfig("saliency", rho=0.3, training=LocalTraining(scaffold=True)))
        >>> (result,) = simulate([spatl])
        >>> result.final_accuracy, result.megabytes_per_round()
    """
    import shutil
    import tempfile

    if not federations:
        raise ValueError("simulate needs at least one federation")
    sizes = {len(f.clients) for f in federations}
    if len(sizes) != 1:
        raise ValueError(f"all federations of one simulation need the same number of clients, got {sorted(sizes)}")
    names = [f.name for f in federations]
    num_clients = sizes.pop()
    own_dir = temp_dir is None
    temp_dir = tempfile.mkdtemp(prefix="cps-fl-") if own_dir else temp_dir
    os.makedirs(temp_dir, exist_ok=True)
    quiet_flower(temp_dir)
    for f in federations:  # every split and config checked before Ray starts
        f.split()
    results: List[FederationResult] = []
    extra_dirs: List[str] = []
    try:
        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation

        server = ServerApp()

        @server.main()
        def main(grid, context) -> None:
            results.extend(run_federations(grid, federations, num_clients, on_result))

        # Ray's sockets live under its temp dir, and a socket path may not exceed 107 bytes
        ray_dir = os.path.join(temp_dir, "ray")
        if len(ray_dir) > 40:
            ray_dir = tempfile.mkdtemp(prefix="cps-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
            extra_dirs.append(ray_dir)
        os.makedirs(ray_dir, exist_ok=True)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(
                server_app=server,
                client_app=client_app(client_sides(federations)),
                num_supernodes=num_clients,
                backend_config={
                    "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                    "init_args": {"_temp_dir": ray_dir, "logging_level": "ERROR", "log_to_driver": False,
                                  "include_dashboard": False},
                },
            )
    finally:
        for folder in extra_dirs + ([temp_dir] if own_dir else []):
            shutil.rmtree(folder, ignore_errors=True)
    if len(results) != len(federations):
        raise RuntimeError(f"the simulation ended after {len(results)} of {len(federations)} federations "
                           f"({names}); see Flower's log above")
    return results
