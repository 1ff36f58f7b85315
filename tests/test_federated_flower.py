"""The federation on Flower: the strategy without Ray (real Flower messages, a stand-in grid), and
one simulation end to end against the same rounds replayed in a plain loop."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="the fl extra (Flower) is not installed")

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from captum_paramsal.federated.aggregation import masked_average  # noqa: E402
from captum_paramsal.federated.client import client_accuracy, client_round, initial_state  # noqa: E402
from captum_paramsal.federated.digits_task import digits_clients, method_federation  # noqa: E402
from captum_paramsal.federated.flower_apps import (  # noqa: E402
    _strategy_class,
    client_seed,
    config_from_values,
    simulate,
)
from captum_paramsal.federated.records import (  # noqa: E402
    arrays_of,
    downlink_arrays,
    downlink_from_arrays,
    record_bytes,
    record_of,
    update_arrays,
)
from captum_paramsal.federated.server import ServerState, aggregate_round  # noqa: E402


class StandInGrid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def initial_server_state(federation):
    split, _ = federation.split()
    model = federation.model_fn()
    control = None
    if federation.config.training.scaffold:
        params = dict(model.named_parameters())
        control = {n: torch.zeros_like(params[n]) for n in split.encoder_parameters}
    return ServerState(split.encoder_state(model), control)


def test_strategy_without_ray():
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # messages outside a running app
    clients = digits_clients(3, alpha=0.5, seed=0)
    federation = method_federation("saliency", clients, rounds=2, rho=0.3, seed=4)
    split, layers = federation.split()
    state = initial_server_state(federation)
    strategy = _strategy_class()("0:test", federation, state, layers, num_clients=3)
    messages = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), StandInGrid([12, 11, 13]))
    assert [m.metadata.dst_node_id for m in messages] == [11, 12, 13]
    config = messages[0].content["config"]
    assert config["fed-id"] == "0:test" and config["server-round"] == 1 and config["criterion"] == "saliency"
    assert config_from_values(config) == federation.config
    encoder, control = downlink_from_arrays(arrays_of(messages[0].content["arrays"]))
    assert all(torch.equal(encoder[n], state.encoder[n]) for n in state.encoder) and control is not None
    assert strategy._down[11] == record_bytes(downlink_arrays(state.encoder, state.control))

    # two good replies (computed as the clients would), one client that failed, one malformed reply
    updates, replies = [], []
    for k, message in zip(range(2), messages):
        update, _, _ = client_round(federation.model_fn, split, layers, clients[k], encoder,
                                    initial_state(federation.model_fn, split), federation.config,
                                    seed=client_seed(4, 1, k), server_control=control, client=str(k))
        updates.append(update)
        metrics = MetricRecord({"num-examples": update.num_examples, "partition": k, "accuracy-received": 0.5,
                                "num-test": 10, "train-accuracy": 0.5})
        replies.append(Message(RecordDict({"arrays": record_of(update_arrays(update)), "metrics": metrics}),
                               reply_to=message))
    replies.append(Message(Error(code=2, reason="out of memory"), reply_to=messages[2]))
    broken = update_arrays(updates[1])
    broken["idx/conv1"] = broken["idx/conv1"] + 100  # out of range
    replies.append(Message(RecordDict({"arrays": record_of(broken), "metrics": MetricRecord({
        "num-examples": 5, "partition": 2, "accuracy-received": 0.1, "num-test": 10, "train-accuracy": 0.1})}),
        reply_to=messages[2]))
    strategy.aggregate_train(1, replies)
    expected, _ = masked_average(state.encoder, updates, layers)
    for name in expected:
        torch.testing.assert_close(strategy.server_state.encoder[name], expected[name], rtol=0, atol=0)
    record = strategy.history[0]
    assert [reason for _, reason in record.rejected] == [
        "the client failed: out of memory", "layer conv1: an index is out of range 0..15"]
    assert record.bytes_up[:2] == [record_bytes(update_arrays(u)) for u in updates]
    assert record.accuracy_received == pytest.approx(0.5 * 2 * 10 / 30 + 0.1 * 10 / 30)
    # the evaluation message only in the last round
    assert strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), StandInGrid([11])) == []
    assert len(strategy.configure_evaluate(2, ArrayRecord(), ConfigRecord(), StandInGrid([11]))) == 1


def replay(federation, num_clients):
    """The same rounds as the simulation, in a plain loop, on one thread as the clients run (so
    that a near tie in a unit selection breaks the same way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _replay(federation, num_clients)
    finally:
        torch.set_num_threads(threads)


def _replay(federation, num_clients):
    split, layers = federation.split()
    state = initial_server_state(federation)
    clients_state = [initial_state(federation.model_fn, split) for _ in range(num_clients)]
    accuracy, uplinks = [], []
    for server_round in range(1, federation.rounds + 1):
        replies, received = [], []
        for k, data in enumerate(federation.clients):
            received.append(client_accuracy(federation.model_fn, split, data, state.encoder, clients_state[k]))
            reply, clients_state[k], _ = client_round(
                federation.model_fn, split, layers, data, state.encoder, clients_state[k], federation.config,
                seed=client_seed(federation.seed, server_round, k), server_control=state.control, client=str(k))
            replies.append(reply)
        uplinks.append([record_bytes(update_arrays(r)) for r in replies])
        accuracy.append(received)
        state, outcome = aggregate_round(state, replies, layers, num_clients, federation.server_lr)
        assert outcome.accepted == num_clients
    final = [client_accuracy(federation.model_fn, split, d, state.encoder, s)
             for d, s in zip(federation.clients, clients_state)]
    return state, accuracy, uplinks, final


@pytest.mark.slow
def test_simulation_equals_the_plain_loop():
    clients = digits_clients(2, alpha=0.5, seed=1)
    federations = [method_federation("saliency", clients, rounds=2, rho=0.3, seed=2),
                   method_federation("fedavg", clients, rounds=2, seed=3)]
    results = simulate(federations)  # its own temporary folder (not tmp_path: pytest may rotate those)
    for federation, result in zip(federations, results):
        state, accuracy, uplinks, final = replay(federation, 2)
        for name, value in state.encoder.items():
            # bit for bit: the server sums the replies in partition order, as the replay does
            assert torch.equal(result.encoder[name], value), name
        for record, expected in zip(result.rounds, accuracy):
            assert record.client_accuracy_received == pytest.approx(expected, abs=1e-12)
        assert [r.bytes_up for r in result.rounds] == uplinks
        assert result.final_client_accuracy == pytest.approx(final)
        down = record_bytes(downlink_arrays(state.encoder, state.control))
        assert all(r.bytes_down == [down, down] for r in result.rounds)
    sal, fedavg = results
    # 30% of the units, each with its update and its SCAFFOLD variate change: about 0.6x FedAvg's upload
    assert sum(sal.rounds[0].bytes_up) < 0.7 * sum(fedavg.rounds[0].bytes_up)


def test_bytes_are_the_serialized_arrays():
    """``record_bytes`` (``ArrayRecord.count_bytes``) is each array's ``.npy`` serialization, as
    Flower sends it, plus its key: computed here with numpy alone."""
    import io

    import numpy as np

    clients = digits_clients(3, alpha=0.5, seed=0)
    federation = method_federation("saliency", clients, rounds=1, rho=0.3, seed=0)
    split, layers = federation.split()
    encoder = split.encoder_state(federation.model_fn())
    params = dict(federation.model_fn().named_parameters())
    control = {n: torch.zeros_like(params[n]) for n in split.encoder_parameters}
    update, _, _ = client_round(federation.model_fn, split, layers, clients[0], encoder,
                                initial_state(federation.model_fn, split), federation.config, seed=0,
                                server_control=control)

    def npy_size(array):
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        return len(buffer.getvalue())

    for arrays in (update_arrays(update), downlink_arrays(encoder, control)):
        assert record_bytes(arrays) == sum(npy_size(a) + len(k) for k, a in arrays.items())
    sent = update_arrays(update)
    assert sent["idx/conv1"].dtype == np.int64 and len(sent["idx/conv1"]) == round(0.3 * 16)
    assert sent["val/conv1.weight"].shape == (5, 1, 3, 3) and "val/bn1.running_mean" in sent
