"""pruning_curves, finetune_salient and neighbour_correction on models where the answer is known."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from captum_paramsal import ParameterSaliency
from captum_paramsal.analysis import finetune_salient, neighbour_correction, pruning_curves

from helpers import assert_unchanged, snapshot


def culprit_model():
    """Hidden unit 1 fires on x0 and votes for class 1 with weight 2; unit 0 votes class 0.

    On x = (1, 0, 0) (true class 0) the logits are (1.1, 2): wrong, and by hand the raw
    saliency of hidden unit 1's weights (mean |dL/dW1[1]| = 2 p1 / 3 = 0.474) is the largest
    of the six units (fc2's rows: p1 / 2 = 0.356 each; hidden unit 0: p1 / 3; units 2, 3: 0).
    Turning it off gives logits (1.1, 0): corrected. x = (0, 1, 0) is classified right.
    """
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]))
        model[2].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]]))
        model[2].bias.copy_(torch.tensor([0.1, 0.0], dtype=torch.float64))
    return model


def test_pruning_curves_known_answer():
    model = culprit_model()
    before = snapshot(model)
    x = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    ps = ParameterSaliency(model)
    result = pruning_curves(model, ps, x, y, ks=(1, 2), seed=0)
    assert_unchanged(model, before)
    assert result.num_misclassified == 1 and result.num_samples == 2
    p_before = torch.softmax(torch.tensor([1.1, 2.0], dtype=torch.float64), 0)
    p_after = torch.softmax(torch.tensor([1.1, 0.0], dtype=torch.float64), 0)
    salient = result.row(1, "salient")
    assert salient["fraction_corrected"] == 1.0
    assert salient["mean_delta_true_prob"] == pytest.approx(float(p_after[0] - p_before[0]), rel=1e-12)
    assert salient["mean_delta_wrong_prob"] == pytest.approx(float(p_after[1] - p_before[1]), rel=1e-12)
    least = result.row(2, "least")  # the two units without gradient: nothing changes
    assert least["fraction_corrected"] == 0.0 and least["mean_delta_true_prob"] == 0.0
    assert [r["k"] for r in result.table] == [1, 1, 1, 2, 2, 2]
    markdown = result.to_markdown()
    assert markdown.count("\n") == 7 and "| 1 | salient | 100.0% |" in markdown
    fig = result.plot()
    assert fig.axes[0].get_xlabel() and fig.axes[0].get_ylabel()


def test_pruning_bad_input():
    model = culprit_model()
    ps = ParameterSaliency(model)
    x = torch.tensor([[1.0, 0, 0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="larger than the number of units"):
        pruning_curves(model, ps, x, torch.tensor([0]), ks=(7,))
    with pytest.raises(ValueError, match="ks must be positive ints"):
        pruning_curves(model, ps, x, torch.tensor([0]), ks=(0,))
    with pytest.raises(ValueError, match="modes must be among"):
        pruning_curves(model, ps, x, torch.tensor([0]), modes=("best",))
    with pytest.raises(ValueError, match="no misclassified samples"):
        pruning_curves(model, ps, x, torch.tensor([1]), ks=(1,))
    with pytest.raises(ValueError, match="one label per input"):
        pruning_curves(model, ps, x, torch.tensor([0, 1]), ks=(1,))
    with pytest.raises(ValueError, match="ParameterSaliency of this model"):
        pruning_curves(culprit_model(), ps, x, torch.tensor([0]))


def test_finetune_salient_updates_only_the_chosen_units():
    model = culprit_model()
    before = snapshot(model)
    ps = ParameterSaliency(model)
    x = torch.tensor([[1.0, 0, 0]], dtype=torch.float64)
    result = finetune_salient(model, ps, x, 0, k=1, lr=0.5, max_steps=50)
    assert_unchanged(model, before)
    assert result.units == [("0.weight", 1)] and result.corrected and result.steps >= 1
    assert set(result.delta) == {"0.weight"}
    assert torch.count_nonzero(result.delta["0.weight"][[0, 2, 3]]) == 0
    assert result.delta["0.weight"][1, 0] < 0  # the culprit's input weight shrinks
    # plain masked gradient descent, replayed by hand
    w = model[0].weight.detach().clone()
    for _ in range(result.steps):
        w.requires_grad_(True)
        logits = model[2](torch.relu(x @ w.T))
        g = torch.autograd.grad(F.cross_entropy(logits, torch.tensor([0])), w)[0]
        w = (w - 0.5 * g * torch.tensor([0.0, 1, 0, 0], dtype=torch.float64)[:, None]).detach()
    assert torch.allclose(result.delta["0.weight"], w - model[0].weight.detach(), rtol=0, atol=1e-12)
    with result.applied(model):
        assert model(x).argmax(1).item() == 0
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="batch dimension of 1"):
        finetune_salient(model, ps, x.repeat(2, 1), 0)
    with pytest.raises(ValueError, match="larger than the number of units"):
        finetune_salient(model, ps, x, 0, k=99)
    with pytest.raises(ValueError, match="lr must be > 0"):
        finetune_salient(model, ps, x, 0, lr=0)


def test_neighbour_correction_matches_a_plain_recount():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    before = snapshot(model)
    ps = ParameterSaliency(model)
    result = neighbour_correction(model, ps, x, y, k=3, m=2, lr=0.05, max_steps=200, max_samples=4)
    assert_unchanged(model, before)
    assert len(result.records) == 4
    # recount the first record by hand
    with torch.no_grad():
        wrong = (model(x).argmax(1) != y).nonzero().flatten()
    assert result.num_misclassified == len(wrong)
    z = ps.attribute(x[wrong], target=y[wrong])
    sims = [(float(F.cosine_similarity(z[0], z[j], dim=0)), j) for j in range(1, len(wrong))]
    neighbours = [j for _, j in sorted(sims, reverse=True)[:2]]
    tuned = finetune_salient(model, ps, x[wrong[:1]], y[wrong[0]], k=3, lr=0.05, max_steps=200)
    with tuned.applied(model), torch.no_grad():
        fixed = model(x[wrong]).argmax(1) == y[wrong]
    assert result.records[0]["neighbours_corrected"] == pytest.approx(float(fixed[neighbours].double().mean()))
    assert result.records[0]["self_corrected"] == tuned.corrected
    assert "neighbours corrected" in result.to_markdown()
    with pytest.raises(ValueError, match="m must be a positive int"):
        neighbour_correction(model, ps, x, y, m=0)
    with pytest.raises(ValueError, match="one label per input"):
        neighbour_correction(model, ps, x, y[:3])
    with pytest.raises(ValueError, match=r"need at least m \+ 1"):
        neighbour_correction(model, ps, x, y, m=len(wrong))
    with pytest.raises(ValueError, match="ParameterSaliency of this model"):
        neighbour_correction(culprit_model(), ps, x, y)
