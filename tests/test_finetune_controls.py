"""finetune_units (the batch fine-tuning finetune_salient and repair run) against a plain masked
gradient descent written out here, and neighbour_correction's controls (all the other
misclassified samples; random units) against hand recounts."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from captum_paramsal import ParameterSaliency
from captum_paramsal.analysis import FineTuneResult, finetune_salient, neighbour_correction
from captum_paramsal.analysis.finetune import RANDOM_RECORD_KEYS, RECORD_KEYS, finetune_units
from captum_paramsal.analysis.intervals import bootstrap_mean, paired_difference

from helpers import assert_unchanged, small_cnn, small_data, snapshot

# -- a plain masked gradient descent, by hand -----------------------------------------------------


def naive_descent(forward, params, units, x, y, lr, max_steps):
    """Steps of ``p -= lr * grad * mask`` on the batch's mean cross-entropy, the mask 1 on the
    rows (filters, Linear rows) of ``units``; stop when every sample is right or after
    ``max_steps``. Returns ``(params, steps, fixed)``."""
    params = {name: p.detach().clone() for name, p in params.items()}
    masks = {}
    for name, index in units:
        masks.setdefault(name, torch.zeros_like(params[name]))[index] = 1.0
    steps = 0
    while True:
        with torch.no_grad():
            fixed = forward(params, x).argmax(1) == y
        if bool(fixed.all()) or steps == max_steps:
            return params, steps, fixed
        for name in masks:
            params[name].requires_grad_(True)
        loss = F.cross_entropy(forward(params, x), y)
        grads = torch.autograd.grad(loss, [params[name] for name in masks])
        for name, grad in zip(list(masks), grads):
            params[name] = (params[name] - lr * grad * masks[name]).detach()
        steps += 1


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def mlp_forward(p, x):
    return torch.tanh(x @ p["0.weight"].T + p["0.bias"]) @ p["2.weight"].T + p["2.bias"]


def cnn_forward(p, x):
    h = torch.relu(F.conv2d(x, p["0.weight"], p["0.bias"], padding=1))
    h = torch.relu(F.conv2d(h, p["2.weight"], p["2.bias"], stride=2))
    return h.flatten(1) @ p["5.weight"].T + p["5.bias"]


def wrong_labels(model, x):
    """The labels the model is furthest from: every sample starts misclassified."""
    with torch.no_grad():
        return model(x).argmin(1)


CASES = {
    "mlp": (mlp, mlp_forward, lambda: torch.randn(5, 6, generator=torch.Generator().manual_seed(3),
                                                  dtype=torch.float64),
            [("0.weight", 1), ("0.weight", 4), ("2.weight", 0), ("2.weight", 2)], 0.3, 80),
    "cnn": (small_cnn, cnn_forward, lambda: small_data(4)[0],
            [("0.weight", 1), ("2.weight", 3), ("2.weight", 5), ("5.weight", 2), ("5.weight", 4)], 0.2, 60),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_finetune_units_is_the_plain_masked_descent(case):
    build, forward, data, units, lr, max_steps = CASES[case]
    model = build()
    x = data()
    y = wrong_labels(model, x)
    before = snapshot(model)
    result = finetune_units(model, units, x, y, lr=lr, max_steps=max_steps)
    assert_unchanged(model, before)
    want, steps, fixed = naive_descent(forward, dict(model.named_parameters()), units, x, y, lr, max_steps)
    assert steps >= 1 and result.steps == steps
    assert torch.equal(result.fixed, fixed) and result.corrected == bool(fixed.all())
    assert result.fixed.dtype == torch.bool and result.fixed.shape == (len(x),)
    assert result.units == units
    assert set(result.delta) == {name for name, _ in units}
    for name, change in result.delta.items():
        old = before.values[name]
        assert torch.allclose(change, want[name] - old, rtol=0, atol=1e-9), name
        # entries outside the units: exactly zero change
        outside = torch.ones(old.shape[0], dtype=torch.bool)
        outside[[i for n, i in units if n == name]] = False
        assert torch.count_nonzero(change[outside]) == 0, name
        assert torch.count_nonzero(change[~outside]) > 0, name
    with result.applied(model), torch.no_grad():
        assert torch.equal(model(x).argmax(1) == y, result.fixed)
        for name, p in model.named_parameters():
            if name not in result.delta:  # parameters without units: the very same values
                assert torch.equal(p, before.values[name]), name
    assert_unchanged(model, before)


def test_a_hand_built_model_takes_the_steps_worked_out_by_hand():
    """logits = W x with W = I on x = (1, 0), label 1: the logits are (1, 0), wrong. Only row 1
    of W moves; its gradient is -(1 - p1) x, so W[1, 0] grows by lr (1 - p1) a step, p1 =
    sigmoid(W[1, 0] - 1), until W[1, 0] > 1; W[1, 1] (x1 = 0) and row 0 never move."""
    model = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.eye(2, dtype=torch.float64))
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    w, steps, lr = 0.0, 0, 1.0
    while w <= 1.0:
        w += lr * (1.0 - 1.0 / (1.0 + math.exp(1.0 - w)))
        steps += 1
    assert steps == 2  # 0 -> 0.731 -> 1.298
    result = finetune_units(model, [("weight", 1)], x, 1, lr=lr, max_steps=10)
    assert result.steps == steps and result.corrected and result.fixed.tolist() == [True]
    assert result.delta["weight"][1, 0].item() == pytest.approx(w, abs=1e-12)
    assert result.delta["weight"][0].tolist() == [0.0, 0.0] and result.delta["weight"][1, 1].item() == 0.0
    # the same with the unit as a layout column, and through finetune_salient
    ps = ParameterSaliency(model)
    for other in (finetune_units(model, [1], x, torch.tensor([1]), layout=ps.layout, lr=lr, max_steps=10),
                  finetune_salient(model, ps, x, 1, units=[("weight", 1)], lr=lr, max_steps=10)):
        assert other.units == [("weight", 1)] and other.steps == steps
        assert torch.equal(other.delta["weight"], result.delta["weight"])


def test_the_stopping_rule():
    model = mlp()
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    units = [("0.weight", 0), ("2.weight", 1), ("2.weight", 2)]
    # a batch right from the start: no step, no change
    with torch.no_grad():
        right = model(x).argmax(1)
    result = finetune_units(model, units, x, right, lr=0.5, max_steps=10)
    assert result.steps == 0 and result.corrected and bool(result.fixed.all())
    assert all(torch.count_nonzero(d) == 0 for d in result.delta.values())
    # stops at the first step where every sample is right: one step fewer leaves one wrong
    y = wrong_labels(model, x[:3])
    done = finetune_units(model, units, x[:3], y, lr=0.5, max_steps=200)
    assert done.corrected and done.steps >= 2
    short = finetune_units(model, units, x[:3], y, lr=0.5, max_steps=done.steps - 1)
    assert short.steps == done.steps - 1 and not short.corrected and not bool(short.fixed.all())
    # max_steps reached: the per-sample fixed is what the changed model predicts
    tiny = finetune_units(model, units, x, wrong_labels(model, x), lr=1e-6, max_steps=3)
    assert tiny.steps == 3 and not tiny.corrected
    with tiny.applied(model), torch.no_grad():
        assert torch.equal(model(x).argmax(1) == wrong_labels(model, x), tiny.fixed)


def test_the_model_is_left_as_found_and_the_copy_runs_in_eval_mode():
    """BatchNorm in training mode with a frozen first layer: the copy is in eval mode (running
    statistics read, never updated), the frozen layer's unit is fine-tuned, and the model keeps
    its modes, buffers, requires_grad flags and gradients."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    model.train()
    model[0].weight.requires_grad_(False)
    model[4].weight.grad = torch.ones_like(model[4].weight)
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        y = model.eval()(x).argmin(1)  # wrong in eval mode
    model.train()
    before = snapshot(model)
    result = finetune_units(model, [("0.weight", 2), ("4.weight", 0)], x, y, lr=0.5, max_steps=30)
    assert_unchanged(model, before)
    assert torch.count_nonzero(result.delta["0.weight"][2]) > 0  # the frozen parameter's unit moved
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def forward(p, inputs):
        h = inputs @ p["0.weight"].T + p["0.bias"]
        h = (h - buffers["1.running_mean"]) / torch.sqrt(buffers["1.running_var"] + model[1].eps)
        h = torch.relu(h * p["1.weight"] + p["1.bias"])
        return h @ p["4.weight"].T + p["4.bias"]

    want, steps, _ = naive_descent(forward, params, [("0.weight", 2), ("4.weight", 0)], x, y, 0.5, 30)
    assert result.steps == steps
    for name in result.delta:
        assert torch.allclose(result.delta[name], want[name] - params[name].detach(), rtol=0, atol=1e-9)
    assert_unchanged(model, before)


def test_finetune_salient_is_finetune_units_on_its_units():
    model = mlp()
    ps = ParameterSaliency(model)
    x = torch.randn(1, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = wrong_labels(model, x)
    top = finetune_salient(model, ps, x, y, k=3, lr=0.2, max_steps=50)
    same = finetune_units(model, top.units, x, y, layout=ps.layout, lr=0.2, max_steps=50)
    assert top.steps == same.steps and top.corrected == same.corrected and torch.equal(top.fixed, same.fixed)
    assert set(top.delta) == set(same.delta) and all(torch.equal(top.delta[n], same.delta[n]) for n in top.delta)
    given = [("2.weight", 1), ("0.weight", 5)]
    a = finetune_salient(model, ps, x, y, units=given, lr=0.2, max_steps=50)
    b = finetune_units(model, given, x, y, layout=ps.layout, lr=0.2, max_steps=50)
    assert a.units == b.units == [("0.weight", 5), ("2.weight", 1)]  # in the layout's order
    assert all(torch.equal(a.delta[n], b.delta[n]) for n in a.delta)
    # without a layout, the units come as given
    assert finetune_units(model, given, x, y, lr=0.2, max_steps=1).units == given
    # one-sample results built the old way still have a per-sample fixed
    assert FineTuneResult({}, [], 0, True).fixed.tolist() == [True]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"units": []}, ValueError, r"^units is empty: give at least one unit to fine-tune$"),
        ({"units": [3]}, ValueError, r"unit 3 is a layout column.*give layout="),
        ({"units": ["0.weight"]}, TypeError, r"a parameter name alone names no unit"),
        ({"units": [("0.weight", 1.0)]}, TypeError, r"the unit index must be an int"),
        ({"units": [("nope.weight", 0)]}, ValueError, r"no parameter named 'nope.weight'"),
        ({"units": [("0.weight", 99)]}, ValueError, r"out of range"),
        ({"labels": torch.tensor([0, 1])}, ValueError, r"one label per input: got labels of shape \(2,\) for 3"),
        ({"labels": torch.zeros(3, 1, dtype=torch.long)}, ValueError, r"one label per input"),
        ({"labels": 1}, ValueError, r"one label per input"),
        ({"labels": torch.tensor([0.0, 1.0, 2.0])}, TypeError, r"integer class labels \(any integer dtype\)"),
        ({"labels": [True, False, True]}, TypeError, r"integer class labels .*torch.bool"),
        ({"labels": True}, TypeError, r"integer class labels"),
        ({"labels": "cat"}, TypeError, r"labels must be integer class labels"),
        ({"labels": torch.tensor([0, 7, 1])}, ValueError, r"labels\[1\]=7 is out of range for a model with 3 classes"),
        ({"labels": torch.tensor([0, 1, -1])}, ValueError, r"labels\[2\]=-1 is out of range"),
        ({"inputs": torch.zeros(0, 6, dtype=torch.float64)}, ValueError, r"inputs must be a batch tensor"),
        ({"inputs": [[0.0] * 6]}, ValueError, r"inputs must be a batch tensor"),
        ({"lr": 0}, ValueError, r"lr must be > 0 \(a finite number\)"),
        ({"lr": -0.1}, ValueError, r"lr must be > 0"),
        ({"lr": float("nan")}, ValueError, r"lr must be > 0"),
        ({"lr": float("inf")}, ValueError, r"lr must be > 0"),
        ({"lr": True}, ValueError, r"got lr=True"),
        ({"max_steps": 0}, ValueError, r"max_steps a positive int, got .*max_steps=0"),
        ({"max_steps": 2.0}, ValueError, r"max_steps=2.0"),
        ({"max_steps": True}, ValueError, r"max_steps=True"),
        ({"layout": "layout"}, TypeError, r"layout must be a SaliencyLayout"),
        ({"model": "model"}, TypeError, r"model must be a torch.nn.Module"),
    ],
)
def test_finetune_units_refuses_bad_input(kwargs, error, match):
    model = mlp()
    before = snapshot(model)
    args = {"model": model, "units": [("0.weight", 1)], "inputs": torch.randn(3, 6, dtype=torch.float64),
            "labels": torch.tensor([0, 1, 2]), **kwargs}
    with pytest.raises(error, match=match):
        finetune_units(args.pop("model"), args.pop("units"), args.pop("inputs"), args.pop("labels"), **args)
    assert_unchanged(model, before)


def test_a_model_without_class_logits_is_refused():
    model = nn.Sequential(nn.Linear(3, 2), nn.Flatten(0))  # (N * 2,) outputs
    with pytest.raises(ValueError, match=r"finetune_units needs a model that returns \(2, classes\) logits"):
        finetune_units(model, [("0.weight", 0)], torch.randn(2, 3), torch.tensor([0, 1]))


# -- neighbour_correction's controls --------------------------------------------------------------


@pytest.fixture(scope="module")
def corrected():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(30, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    ps = ParameterSaliency(model)
    before = snapshot(model)
    result = neighbour_correction(model, ps, x, y, k=3, m=2, lr=0.05, max_steps=100, max_samples=4, seed=7)
    assert_unchanged(model, before)
    return model, ps, x, y, result


def test_the_all_others_rate_and_the_summary_are_hand_recounts(corrected):
    model, ps, x, y, result = corrected
    with torch.no_grad():
        wrong = (model(x).argmax(1) != y).nonzero().flatten().tolist()
    assert result.num_misclassified == len(wrong) and len(result.records) == 4 and result.random_units
    for i, record in enumerate(result.records):
        assert set(record) == set(RECORD_KEYS) | set(RANDOM_RECORD_KEYS)
        sample = wrong[i]
        assert record["sample"] == sample and len(record["neighbours"]) == 2 and sample not in record["neighbours"]
        for prefix, units in (("", record["units"]), ("random_", record["random_units"])):
            tuned = finetune_units(model, units, x[sample : sample + 1], y[sample : sample + 1], layout=ps.layout,
                                   lr=0.05, max_steps=100)
            with tuned.applied(model), torch.no_grad():
                right = model(x).argmax(1) == y
            others = [j for j in wrong if j != sample]
            rate = sum(bool(right[j]) for j in others) / len(others)
            assert record[prefix + "others_corrected"] == pytest.approx(rate, abs=1e-12)
            assert record[prefix + "neighbours_corrected"] == pytest.approx(
                sum(bool(right[j]) for j in record["neighbours"]) / 2, abs=1e-12)
            assert record[prefix + "self_corrected"] == tuned.corrected == bool(right[sample])
            assert record[prefix + "steps"] == tuned.steps
            if i == 0 and prefix == "":
                # the all-others rate is what 2 random others give on average, exactly
                pairs = list(itertools.combinations(others, 2))
                mean = sum(sum(bool(right[j]) for j in pair) / 2 for pair in pairs) / len(pairs)
                assert rate == pytest.approx(mean, abs=1e-12)
    s = result.summary
    used = [r for r in result.records if r["self_corrected"]]
    both = [r for r in used if r["random_self_corrected"]]
    assert used and s["fine_tuned"] == 4 and s["self_corrected"] == len(used)

    def col(key, among):
        return [float(r[key]) for r in among]

    assert s["self_corrected_rate"] == bootstrap_mean(col("self_corrected", result.records))
    assert s["random_self_corrected_rate"] == bootstrap_mean(col("random_self_corrected", result.records))
    assert s["random_self_corrected"] == sum(r["random_self_corrected"] for r in result.records)
    for key in ("neighbours_corrected", "others_corrected", "random_neighbours_corrected", "random_others_corrected"):
        assert s[key] == bootstrap_mean(col(key, used)) and s[key].n == len(used), key
    assert s["neighbours_minus_others"] == paired_difference(col("neighbours_corrected", used),
                                                             col("others_corrected", used))
    assert s["salient_minus_random_neighbours"] == paired_difference(col("neighbours_corrected", used),
                                                                     col("random_neighbours_corrected", used))
    assert s["both_corrected"] == len(both) and s["random_neighbours_corrected_when_fixed"].n == len(both)
    markdown = result.to_markdown()
    assert "neighbours corrected" in markdown and "| top-3 salient |" in markdown and "| 3 random |" in markdown
    assert s["neighbours_corrected"].format(percent=True) in markdown


def test_the_random_units_are_k_distinct_seeded_draws(corrected):
    model, ps, x, y, result = corrected
    columns = ps.layout.num_columns
    generator = torch.Generator().manual_seed(7)
    for record in result.records:
        drawn = [ps.layout.unit_of(int(c)) for c in torch.randperm(columns, generator=generator)[:3]]
        assert record["random_units"] == drawn and len(set(drawn)) == 3
    again = neighbour_correction(model, ps, x, y, k=3, m=2, lr=0.05, max_steps=100, max_samples=4, seed=7)
    assert again.records == result.records
    other = neighbour_correction(model, ps, x, y, k=3, m=2, lr=0.05, max_steps=100, max_samples=4, seed=8)
    assert [r["random_units"] for r in other.records] != [r["random_units"] for r in result.records]
    # the seed draws the random units only: the top-k part is the same
    plain = neighbour_correction(model, ps, x, y, k=3, m=2, lr=0.05, max_steps=100, max_samples=4,
                                 random_units=False)
    for a, b, c in zip(plain.records, other.records, result.records):
        assert set(a) == set(RECORD_KEYS)
        assert a == {key: b[key] for key in RECORD_KEYS} == {key: c[key] for key in RECORD_KEYS}
    assert "random_neighbours_corrected" not in plain.summary and "random" not in plain.to_markdown()


def test_random_units_cover_a_small_layout_uniformly():
    """With k equal to the number of columns, every draw is all the columns."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 2, bias=False)).double()
    x = torch.randn(20, 4, dtype=torch.float64)
    y = 1 - model(x).argmax(1).detach()  # all wrong
    ps = ParameterSaliency(model)
    result = neighbour_correction(model, ps, x, y, k=2, m=1, lr=0.5, max_steps=5, max_samples=3)
    for record in result.records:
        assert sorted(record["random_units"]) == [("0.weight", 0), ("0.weight", 1)]
        assert sorted(record["units"]) == sorted(record["random_units"])
        # the same units: the random fine-tuning is the same fine-tuning
        assert record["random_steps"] == record["steps"]
        assert record["random_neighbours_corrected"] == record["neighbours_corrected"]


def test_neighbour_correction_refuses_bad_controls(corrected):
    model, ps, x, y, _ = corrected
    before = snapshot(model)
    with pytest.raises(TypeError, match="random_units must be a bool"):
        neighbour_correction(model, ps, x, y, k=3, m=2, random_units=1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        neighbour_correction(model, ps, x, y, k=3, m=2, lr=0)
    with pytest.raises(ValueError, match="max_steps a positive int"):
        neighbour_correction(model, ps, x, y, k=3, m=2, max_steps=0)
    assert_unchanged(model, before)
