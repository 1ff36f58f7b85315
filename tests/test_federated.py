"""Salient-parameter federated learning, the parts that do not need Flower: the split, the layers
of units, selection, masked aggregation, SCAFFOLD's and FedProx's local steps, and the checks
on replies. Each against a computation written out here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_paramsal.federated.aggregation import (
    check_update,
    client_update,
    masked_average,
    update_server_control,
    zero_filled_average,
)
from captum_paramsal.federated.client import ClientConfig, client_round, initial_state
from captum_paramsal.federated.local_training import LocalTraining, train_locally
from captum_paramsal.federated.partition import ClientData, client_datasets, dirichlet_split
from captum_paramsal.federated.selection import saliency_scores, select_units, units_to_send
from captum_paramsal.federated.server import ServerState, aggregate_round
from captum_paramsal.federated.shared_units import shared_layers
from captum_paramsal.federated.split import split_model

from naive import naive_unit_saliency


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 3),
    ).double()


def data(n: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


# -- split and layers --------------------------------------------------------------------------------


def test_split_and_layers():
    model = net()
    split = split_model(model, encoder=["0", "1", "4"])
    assert split.encoder_parameters == ("0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias")
    assert "1.running_mean" in split.encoder and "1.num_batches_tracked" not in split.encoder
    assert split.head == ("6.weight", "6.bias")
    assert "1.num_batches_tracked" in split.head_tensors(model)  # kept on the client
    layers = shared_layers(model, split)
    assert [(layer.name, layer.num_units) for layer in layers] == [("0", 4), ("4", 6)]
    assert layers[0].tensors == ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var")
    covered = sorted(n for layer in layers for n in layer.tensors)
    assert covered == sorted(split.encoder)


def test_split_errors():
    model = net()
    with pytest.raises(ValueError, match="in neither part"):
        split_model(model, encoder=["0"], head=["6"])
    with pytest.raises(ValueError, match="in both parts"):
        split_model(model, encoder=["0", "1", "4", "6"], head=["6"])
    with pytest.raises(ValueError, match="encoder is empty"):
        split_model(model, encoder=["nothing"])
    assert split_model(model, encoder=lambda name: True).head == ()  # FedAvg: all shared


def test_rho_and_criterion_errors():
    with pytest.raises(ValueError, match=r"rho .* must be in \(0, 1\]"):
        ClientConfig("l2", 0.0)
    with pytest.raises(ValueError, match=r"rho"):
        ClientConfig("l2", 1.5)
    with pytest.raises(ValueError, match="unknown selection criterion"):
        ClientConfig("largest", 0.5)


def test_empty_client_data_is_refused():
    model = net()
    split = split_model(model, encoder=["0", "1", "4"])
    empty = ClientData(torch.zeros(0, 1, 4, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long),
                       *data(2))
    with pytest.raises(ValueError, match="no training samples"):
        client_round(net, split, shared_layers(model, split), empty, split.encoder_state(model),
                     initial_state(net, split), ClientConfig(), seed=0)


# -- masked aggregation ------------------------------------------------------------------------------


def setup_updates():
    model = net()
    split = split_model(model, encoder=["0", "1", "4"])
    layers = shared_layers(model, split)
    state = split.encoder_state(model)
    g = torch.Generator().manual_seed(5)
    locals_ = [{n: t + torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in state.items()} for _ in range(3)]
    return split, layers, state, locals_


def test_full_masks_equal_fedavg():
    _, layers, state, locals_ = setup_updates()
    counts = [5, 1, 3]
    everything = {layer.name: torch.arange(layer.num_units) for layer in layers}
    updates = [client_update(n, state, local, everything, layers) for n, local in zip(counts, locals_)]
    new, coverage = masked_average(state, updates, layers)
    for name in state:
        fedavg = sum(n * local[name] for n, local in zip(counts, locals_)) / sum(counts)
        torch.testing.assert_close(new[name], fedavg, rtol=1e-12, atol=1e-12)
    assert all(share == 1.0 for share in coverage.values())


def test_masks_average_each_coordinate_over_its_senders():
    _, layers, state, locals_ = setup_updates()
    counts = [2, 3, 7]
    # client 0 sends units {0, 1} / {0}; client 1 units {1, 2} / {0, 5}; client 2 nothing of layer "4"
    chosen = [
        {"0": torch.tensor([0, 1]), "4": torch.tensor([0])},
        {"0": torch.tensor([1, 2]), "4": torch.tensor([0, 5])},
        {"0": torch.tensor([2])},
    ]
    updates = []
    for n, local, pick in zip(counts, locals_, chosen):
        update = client_update(n, state, local, {**{layer.name: torch.arange(1) for layer in layers}, **pick}, layers)
        update.indices = {k: v for k, v in update.indices.items() if k in pick}
        update.values = {k: v for k, v in update.values.items() if any(k in layer.tensors for layer in layers
                                                                        if layer.name in pick)}
        updates.append(update)
    new, coverage = masked_average(state, updates, layers)
    w = state["0.weight"]
    delta = [local["0.weight"] - w for local in locals_]
    # unit 0: only client 0; unit 1: clients 0 and 1 (2:3); unit 2: clients 1 and 2 (3:7); unit 3: nobody
    torch.testing.assert_close(new["0.weight"][0], w[0] + delta[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new["0.weight"][1], w[1] + (2 * delta[0][1] + 3 * delta[1][1]) / 5, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(new["0.weight"][2], w[2] + (3 * delta[1][2] + 7 * delta[2][2]) / 10, rtol=1e-12,
                               atol=1e-12)
    assert torch.equal(new["0.weight"][3], w[3])  # untouched: exactly as it was
    assert torch.equal(new["1.running_mean"][3], state["1.running_mean"][3])  # its norm entries too
    bias = state["1.bias"]
    expected_bias = bias[1] + (2 * (locals_[0]["1.bias"][1] - bias[1]) + 3 * (locals_[1]["1.bias"][1] - bias[1])) / 5
    torch.testing.assert_close(new["1.bias"][1], expected_bias, rtol=1e-12, atol=1e-12)
    b = state["4.weight"]
    torch.testing.assert_close(new["4.weight"][0], b[0] + (2 * (locals_[0]["4.weight"][0] - b[0])
                               + 3 * (locals_[1]["4.weight"][0] - b[0])) / 5, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new["4.weight"][5], locals_[1]["4.weight"][5], rtol=1e-12, atol=1e-12)
    assert torch.equal(new["4.weight"][1:5], b[1:5])
    assert coverage == {"0": 0.75, "4": 2 / 6}
    # the biased zero-filled average shrinks client 0's unit-0 update by 2 / 12
    biased = zero_filled_average(state, updates, layers)
    torch.testing.assert_close(biased["0.weight"][0], w[0] + delta[0][0] * 2 / 12, rtol=1e-12, atol=1e-12)
    assert (biased["0.weight"][0] - w[0]).abs().sum() < (new["0.weight"][0] - w[0]).abs().sum() / 5


def test_server_learning_rate_and_disjoint_masks():
    _, layers, state, locals_ = setup_updates()
    halves = [{"0": torch.tensor([0, 1]), "4": torch.tensor([0, 1, 2])},
              {"0": torch.tensor([2, 3]), "4": torch.tensor([3, 4, 5])}]
    updates = [client_update(4, state, local, pick, layers) for local, pick in zip(locals_, halves)]
    new, _ = masked_average(state, updates, layers, server_lr=0.5)
    # disjoint: each unit moves half-way to the one client that sent it
    torch.testing.assert_close(new["0.weight"][:2], (state["0.weight"][:2] + locals_[0]["0.weight"][:2]) / 2)
    torch.testing.assert_close(new["0.weight"][2:], (state["0.weight"][2:] + locals_[1]["0.weight"][2:]) / 2)
    torch.testing.assert_close(new["4.bias"][3:], (state["4.bias"][3:] + locals_[1]["4.bias"][3:]) / 2)


def test_bad_replies_are_rejected_and_the_round_goes_on(caplog):
    _, layers, state, locals_ = setup_updates()
    everything = {layer.name: torch.arange(layer.num_units) for layer in layers}
    good = client_update(3, state, locals_[0], everything, layers, client="good")
    bad = []
    for mutate in ("range", "duplicate", "shape", "unknown", "dtype", "count"):
        u = client_update(3, state, locals_[1], everything, layers, client=mutate)
        if mutate == "range":
            u.indices["0"] = torch.tensor([0, 1, 2, 4])
        elif mutate == "duplicate":
            u.indices["0"] = torch.tensor([0, 1, 1, 2])
        elif mutate == "shape":
            u.values["4.weight"] = u.values["4.weight"][:, :3]
        elif mutate == "unknown":
            u.values["6.weight"] = torch.zeros(3, 6, dtype=torch.float64)
        elif mutate == "dtype":
            u.indices["4"] = u.indices["4"].double()
        else:
            u.num_examples = 0
        assert check_update(u, layers, state) is not None
        bad.append(u)
    with caplog.at_level("WARNING", logger="captum_paramsal.federated"):
        new, outcome = aggregate_round(ServerState(state), [good, *bad], layers, num_clients=7)
    assert outcome.accepted == 1 and [c for c, _ in outcome.rejected] == [u.client for u in bad]
    assert all("rejected the reply" in r.message for r in caplog.records)
    for name in state:  # only the good reply counted
        torch.testing.assert_close(new.encoder[name], locals_[0][name], rtol=1e-12, atol=1e-12)


# -- local steps ------------------------------------------------------------------------------------


def test_scaffold_client_and_server_updates_by_hand():
    model = net()
    split = split_model(model, encoder=["0", "1", "4"])
    x, y = data(6)
    c = {n: torch.full_like(p, 0.01) for n, p in model.named_parameters() if n in split.encoder_parameters}
    ci = {n: torch.full_like(p, -0.02) for n, p in model.named_parameters() if n in split.encoder_parameters}
    config = LocalTraining(lr=0.1, epochs=2, batch_size=4, scaffold=True)
    # by hand: the same batches, plain autograd, corrected steps on the encoder only
    reference = net()
    g = torch.Generator().manual_seed(3)
    params = dict(reference.named_parameters())
    x0 = {n: params[n].detach().clone() for n in c}
    reference.train()
    steps = 0
    for _ in range(2):
        order = torch.randperm(6, generator=g)
        for start in (0, 4):
            batch = order[start : start + 4]
            grads = torch.autograd.grad(F.cross_entropy(reference(x[batch]), y[batch]), list(params.values()))
            with torch.no_grad():
                for (name, p), grad in zip(params.items(), grads):
                    p -= 0.1 * (grad + c[name] - ci[name] if name in c else grad)
            steps += 1
    steps_got, new_ci = train_locally(model, split, x, y, config, torch.Generator().manual_seed(3), c, ci)
    assert steps_got == steps == 4
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, params[name], rtol=1e-12, atol=1e-12)
    for name in c:
        expected = ci[name] - c[name] + (x0[name] - params[name].detach()) / (4 * 0.1)
        torch.testing.assert_close(new_ci[name], expected, rtol=1e-12, atol=1e-12)
    # the server: c + (1/N) sum of the changes, N = all clients
    layers = shared_layers(model, split)
    everything = {layer.name: torch.arange(layer.num_units) for layer in layers}
    change = {n: new_ci[n] - ci[n] for n in c}
    update = client_update(6, split.encoder_state(net()), split.encoder_state(model), everything, layers, change)
    server_c = update_server_control(c, [update, update], layers, num_clients=10)
    for name in c:
        torch.testing.assert_close(server_c[name], c[name] + 2 * change[name] / 10, rtol=1e-12, atol=1e-12)


def test_fedprox_term():
    model = net()
    split = split_model(model, encoder=["0", "1", "4"])
    x, y = data(4)
    mu = 0.5
    reference = net()
    start = {n: p.detach().clone() for n, p in reference.named_parameters()}
    reference.train()
    order = torch.randperm(4, generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(reference(x[order]), y[order]) + 0.5 * mu * sum(
        (p - start[n]).pow(2).sum() for n, p in reference.named_parameters() if n in split.encoder_parameters)
    loss.backward()  # at the start the proximal term's gradient is zero, so take two steps
    train_locally(model, split, x, y, LocalTraining(lr=0.1, epochs=2, batch_size=4, prox_mu=mu),
                  torch.Generator().manual_seed(0))
    moved = dict(model.named_parameters())
    plain = net()
    train_locally(plain, split, x, y, LocalTraining(lr=0.1, epochs=2, batch_size=4),
                  torch.Generator().manual_seed(0))
    # the proximal pull changes the encoder's second step, never the head's first
    assert not torch.allclose(moved["0.weight"], dict(plain.named_parameters())["0.weight"])


# -- selection -----------------------------------------------------------------------------------------


def test_selection_counts_and_criteria():
    _, layers, state, locals_ = setup_updates()
    local = dict(state)
    local["0.weight"] = state["0.weight"].clone()
    local["0.weight"][2] += 10.0  # unit 2 of layer "0": the largest update and the largest norm
    chosen = select_units("update", 0.25, layers, local, state)
    assert chosen["0"].tolist() == [2] and chosen["4"].numel() == units_to_send(6, 0.25) == 2
    assert select_units("l2", 0.25, layers, local, state)["0"].tolist() == [2]
    assert [len(v) for v in select_units("all", 0.1, layers, local, state).values()] == [4, 6]
    a = select_units("random", 0.5, layers, local, state, generator=torch.Generator().manual_seed(1))
    b = select_units("random", 0.5, layers, local, state, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a[k], b[k]) for k in a) and [len(v) for v in a.values()] == [2, 3]


def test_saliency_scores_are_the_standardized_mean_saliency():
    model = net().eval()
    split = split_model(model, encoder=["0", "1", "4"])
    layers = shared_layers(model, split)
    x, y = data(10)
    scores = saliency_scores(model, layers, [(x[:6], y[:6]), (x[6:], y[6:])], set(split.encoder_parameters))
    raw = naive_unit_saliency(model, (x,), y, ["0.weight", "4.weight"]).mean(0)
    for layer, part in (("0", raw[:4]), ("4", raw[4:])):
        torch.testing.assert_close(scores[layer], (part - part.mean()) / part.std(), rtol=1e-9, atol=1e-12)


# -- data -------------------------------------------------------------------------------------------------


def test_dirichlet_split_is_a_partition():
    labels = torch.arange(600) % 10
    parts = dirichlet_split(labels, 8, alpha=0.3, seed=2, min_size=5)
    joined = torch.cat(parts).sort().values
    assert torch.equal(joined, torch.arange(600)) and min(p.numel() for p in parts) >= 5
    assert [p.tolist() for p in parts] == [p.tolist() for p in dirichlet_split(labels, 8, alpha=0.3, seed=2,
                                                                                  min_size=5)]
    x = torch.randn(600, 3)
    clients = client_datasets(x, labels, parts, held_out=0.25, seed=2)
    assert sum(c.num_train + c.y_test.numel() for c in clients) == 600
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_split(labels, 8, alpha=0)


def test_a_few_rounds_learn():
    """Three clients, three rounds of SCAFFOLD with saliency selection: the replies pass the
    checks and the personalised accuracy on the training data rises above chance."""
    from captum_paramsal.federated.client import client_accuracy

    model = net()
    split = split_model(model, encoder=["0", "1", "4"])
    layers = shared_layers(model, split)
    x, y = data(90, seed=7)
    y = (x.flatten(1)[:, :8].sum(1) > 0).long() + (x.flatten(1)[:, 8:].sum(1) > 0).long()
    clients = client_datasets(x, y, [torch.arange(0, 30), torch.arange(30, 60), torch.arange(60, 90)], seed=0)
    config = ClientConfig("saliency", 0.5, LocalTraining(lr=0.2, epochs=3, batch_size=8, scaffold=True))
    params = dict(model.named_parameters())
    state = ServerState(split.encoder_state(model), {n: torch.zeros_like(params[n]) for n in split.encoder_parameters})
    clients_state = [initial_state(net, split) for _ in clients]
    for r in range(3):
        replies = []
        for k, c in enumerate(clients):
            reply, clients_state[k], _ = client_round(net, split, layers, c, state.encoder, clients_state[k], config,
                                                      seed=r * 10 + k, server_control=state.control, client=str(k))
            assert reply.indices["0"].numel() == 2 and reply.indices["4"].numel() == 3
            replies.append(reply)
        state, outcome = aggregate_round(state, replies, layers, num_clients=3)
        assert outcome.accepted == 3 and not outcome.rejected
        # SCAFFOLD's invariant under selection: the server's variate is the mean of the clients'
        for name, c in state.control.items():
            mean = sum(s.control[name] for s in clients_state) / 3
            torch.testing.assert_close(c, mean, rtol=1e-9, atol=1e-12)
    train_acc = [client_accuracy(net, split, ClientData(c.x_train, c.y_train, c.x_train, c.y_train), state.encoder, s)
                 for c, s in zip(clients, clients_state)]
    assert sum(train_acc) / 3 > 0.5
