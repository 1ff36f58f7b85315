"""The digits federation as a Flower app for real processes (``flwr run`` against a SuperLink with
SuperNodes), with the same ClientApp and strategy as :func:`~.flower_apps.simulate`.

An app folder only needs a ``pyproject.toml`` that names these objects::

    [tool.flwr.app.components]
    serverapp = "captum_paramsal.federated.deployed_app:server_app"
    clientapp = "captum_paramsal.federated.deployed_app:client_app"

    [tool.flwr.app.config]          # becomes ``context.run_config`` (``flwr run --run-config`` overrides)
    method = "saliency"             # a method of digits_task.METHODS
    rho = 0.3
    rounds = 1
    num-clients = 2
    alpha = 0.5
    seed = 0
    out = "/path/results.json"      # what the ServerApp writes (see below)

Each SuperNode is started with ``--node-config "partition-id=<i> num-partitions=<n>"``; client
``i`` takes the digits task's partition ``i`` (:func:`~.digits_task.digits_clients` is
deterministic, so every process builds the same split). :mod:`.localhost` writes such a folder
and starts the processes.

The ServerApp waits until ``num-clients`` SuperNodes are connected, runs the federation with
:func:`~.flower_apps.run_federations` and writes ``out`` (JSON): per round the bytes down and up
per client (``ArrayRecord.count_bytes()``, as :class:`~.flower_apps.RoundRecord` has them), the
accuracy, the rejected replies; the final accuracy; and what every message that went through the
grid carried (``messages``: count, array bytes, all records' bytes, per direction), to compare
with Flower's own ``network-traffic``. If the federation fails, ``out`` holds ``error``.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from functools import lru_cache
from typing import Any, Dict, Iterable, Mapping, Tuple

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from . import flower_apps
from .digits_task import digits_clients, method_federation
from .flower_apps import Federation, FederationResult

#: ``context.run_config`` keys and their defaults
DEFAULTS: Dict[str, Any] = {
    "method": "saliency", "rho": 0.3, "rounds": 1, "num-clients": 2, "alpha": 0.5, "seed": 0,
    "lr": 0.05, "epochs": 1, "batch-size": 32, "node-timeout": 120.0, "out": "",
}


def settings(run_config: Mapping[str, Any]) -> Dict[str, Any]:
    """``run_config`` with the defaults filled in and each value cast to its default's type;
    unknown keys are an error (a typo would otherwise be silently ignored)."""
    unknown = sorted(set(run_config) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown run-config key(s) {unknown}; known: {sorted(DEFAULTS)}")
    values = dict(DEFAULTS)
    for key, value in run_config.items():
        values[key] = type(DEFAULTS[key])(value)
    return values


def _key(run_config: Mapping[str, Any]) -> Tuple:
    values = settings(run_config)
    return tuple((k, values[k]) for k in ("method", "rho", "rounds", "num-clients", "alpha", "seed",
                                          "lr", "epochs", "batch-size"))


@lru_cache(maxsize=4)
def _federation(key: Tuple) -> Federation:
    v = dict(key)
    clients = digits_clients(v["num-clients"], v["alpha"], v["seed"])
    return method_federation(v["method"], clients, v["rounds"], v["rho"], v["seed"],
                             lr=v["lr"], epochs=v["epochs"], batch_size=v["batch-size"])


def federation(run_config: Mapping[str, Any]) -> Federation:
    """The digits :class:`~.flower_apps.Federation` that ``run_config`` describes (the same in
    the ServerApp and in every ClientApp process)."""
    return _federation(_key(run_config))


# -- the client -----------------------------------------------------------------------------------------

client_app = ClientApp()


@lru_cache(maxsize=4)
def _inner_client(key: Tuple) -> ClientApp:
    # flower_apps' ClientApp for this run's federation (the fed id "0:<name>" matches run_federations')
    return flower_apps.client_app(flower_apps.client_sides([_federation(key)]))


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return _inner_client(_key(context.run_config))(msg, context)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return _inner_client(_key(context.run_config))(msg, context)


# -- the server -----------------------------------------------------------------------------------------


class CountingGrid:
    """A grid that passes everything through and counts what the messages it sends and receives
    carry: per direction the number of messages, their ``ArrayRecord.count_bytes()`` and the
    ``count_bytes()`` of all their records (arrays, configs, metrics)."""

    def __init__(self, grid: Grid, progress: str = "") -> None:
        self._grid = grid
        self.progress = progress  # a file to append a line to after each exchange ("" for none)
        self.counts = {d: {"messages": 0, "arrays": 0, "array-bytes": 0, "record-bytes": 0, "errors": 0}
                       for d in ("down", "up")}

    def _count(self, direction: str, message: Message) -> None:
        count = self.counts[direction]
        if message.has_error() or not message.has_content():
            count["errors"] += 1
            return
        content = message.content
        arrays = sum(r.count_bytes() for r in content.array_records.values())
        others = sum(r.count_bytes() for r in content.config_records.values())
        others += sum(r.count_bytes() for r in content.metric_records.values())
        count["messages"] += 1
        count["arrays"] += sum(len(r) for r in content.array_records.values())
        count["array-bytes"] += arrays
        count["record-bytes"] += arrays + others

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        before = {d: dict(c) for d, c in self.counts.items()}
        started = time.perf_counter()
        for message in messages:
            self._count("down", message)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            self._count("up", reply)
        if self.progress:
            kind = messages[0].metadata.message_type
            config = messages[0].content.config_records.get("config", {})
            down, up = ({k: self.counts[d][k] - before[d][k] for k in self.counts[d]} for d in ("down", "up"))
            progress_line(self.progress, f"round {config.get('server-round', '?')} {kind}: {down['messages']} "
                          f"message(s) down ({down['array-bytes']:,} array bytes), {up['messages']} repl(ies) up "
                          f"({up['array-bytes']:,} array bytes), {up['errors']} failed, "
                          f"{time.perf_counter() - started:.1f} s")
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def progress_line(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> float:
    started = time.perf_counter()
    while len(list(grid.get_node_ids())) < count:
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"only {len(list(grid.get_node_ids()))} of {count} SuperNodes connected "
                               f"after {timeout:.0f} s")
        time.sleep(0.1)
    return time.perf_counter() - started


def result_json(result: FederationResult) -> Dict[str, Any]:
    """A :class:`~.flower_apps.FederationResult` as JSON values (the encoder left out)."""
    return {
        "name": result.name,
        "rounds": [{"round": r.round, "accuracy-received": r.accuracy_received,
                    "client-accuracy-received": list(r.client_accuracy_received),
                    "bytes-down": list(r.bytes_down), "bytes-up": list(r.bytes_up),
                    "rejected": [list(x) for x in r.rejected], "coverage": dict(r.coverage), "seconds": r.seconds}
                   for r in result.rounds],
        "final-accuracy": result.final_accuracy,
        "final-client-accuracy": list(result.final_client_accuracy),
    }


def _write(path: str, payload: Dict[str, Any]) -> None:
    if not path:
        return
    temporary = f"{path}.part"
    with open(temporary, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(temporary, path)  # the reader never sees half a file


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    payload: Dict[str, Any] = {"run-id": int(context.run_id), "run-config": dict(context.run_config),
                               "serverapp-pid": os.getpid()}
    out = str(context.run_config.get("out", ""))
    try:
        values = settings(context.run_config)
        fed = federation(context.run_config)
        progress = f"{out}.log" if out else ""
        waited = _wait_for_nodes(grid, values["num-clients"], values["node-timeout"])
        payload["wait-for-nodes-seconds"] = waited
        if progress:
            progress_line(progress, f"ServerApp (pid {os.getpid()}): {fed.name}, {values['num-clients']} SuperNodes "
                          f"connected after {waited:.1f} s")
        counting = CountingGrid(grid, progress)
        (result,) = flower_apps.run_federations(counting, [fed], values["num-clients"])
        payload.update(result_json(result))
        payload["messages"] = counting.counts
    except BaseException:
        payload["error"] = traceback.format_exc()
        raise
    finally:
        payload["seconds"] = time.perf_counter() - started
        _write(out, payload)
