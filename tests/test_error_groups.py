"""Error groups, culprits, exemplars and verified repair (captum_paramsal.analysis.error_groups,
.repair), on a hand-built network with two planted failure modes and against a naive per-sample
loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_paramsal import ParameterSaliency
from captum_paramsal.analysis import error_groups, repair
from captum_paramsal.analysis.intervals import bootstrap_draws_and_samples, bootstrap_mean, paired_difference
from captum_paramsal.analysis.repair import unit_weight_magnitude
from captum_paramsal.interventions import turn_off

from helpers import assert_unchanged, small_cnn, small_data, snapshot
from naive import naive_unit_saliency

# -- the planted model ---------------------------------------------------------------------------
# Four classes; hidden units 0-3 copy the class features x[0..3]. Unit 4 fires only when
# feature x[4] is on and pushes class 2; unit 5 fires on x[5] and pushes class 3. Class-0
# samples carrying x[4] become "2" (failure mode A), class-1 samples carrying x[5] become "3"
# (failure mode B). The reference set carries neither feature, so units 4 and 5 never fire there.
BUGS = {(0, 2): ("0.weight", 4), (1, 3): ("0.weight", 5)}


def planted_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    w1, b1, w2 = torch.zeros(8, 8), torch.zeros(8), torch.zeros(4, 8)
    for c in range(4):
        w1[c, c], w2[c, c] = 3.0, 0.5
    w1[4, 4], b1[4], w2[2, 4] = 2.0, -0.5, 2.0
    w1[5, 5], b1[5], w2[3, 5] = 2.0, -0.5, 2.0
    w1[6, 6], w1[7, 7] = 1.0, 1.0
    w2[:, 6] = torch.tensor([0.1, -0.1, 0.05, 0.0])
    w2[:, 7] = torch.tensor([0.0, 0.05, -0.1, 0.1])
    with torch.no_grad():
        model[0].weight.copy_(w1)
        model[0].bias.copy_(b1)
        model[2].weight.copy_(w2)
        model[2].bias.zero_()
    return model.eval()


def planted_data(n: int, seed: int, failing: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.1 * torch.randn(n, 8, generator=g)
    x[torch.arange(n), y] += 1.0
    x[:, 6:] = torch.rand(n, 2, generator=g)
    a = (y == 0) & (torch.rand(n, generator=g) < failing)
    b = (y == 1) & (torch.rand(n, generator=g) < failing)
    x[a, 4] = 1.0 + 0.2 * torch.rand(int(a.sum()), generator=g)
    x[b, 5] = 1.0 + 0.2 * torch.rand(int(b.sum()), generator=g)
    return x, y


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    ps = ParameterSaliency(model)
    ps.stats = ps.fit_stats([planted_data(400, 0)], progress=False)
    test = planted_data(400, 1, failing=0.6)
    held_out = planted_data(400, 2, failing=0.6)
    return model, ps, test, held_out


def test_planted_model_fails_only_as_planted(planted):
    model, _, (x, y), _ = planted
    predicted = model(x).argmax(1)
    pairs = {(int(t), int(p)) for t, p in zip(y, predicted) if t != p}
    assert pairs == set(BUGS)
    clean = planted_data(400, 3)
    assert bool((model(clean[0]).argmax(1) == clean[1]).all())


def test_error_groups_find_the_two_failure_modes_and_their_units(planted):
    model, ps, test, _ = planted
    before = snapshot(model)
    groups = error_groups(ps, test, progress=False)
    assert_unchanged(model, before)
    assert groups.criterion == "silhouette" and len(groups) == 2
    assert max(groups.silhouettes, key=groups.silhouettes.get) == 2
    found = {}
    for g in groups:
        assert len(g.pairs) == 1  # every group is pure
        (pair, count), = g.pairs
        assert count == len(g)
        found[pair] = g
        assert g.culprits[0].pair == BUGS[pair]
        assert g.culprits[0].consistency == 1.0
    assert set(found) == set(BUGS)
    assert groups.num_misclassified == sum(len(g) for g in groups)
    assert [len(g) for g in groups] == sorted((len(g) for g in groups), reverse=True)
    assert "0.weight" in groups.to_markdown() and "group 0" in groups[0].describe()


def test_culprit_scores_and_exemplars_against_a_naive_loop():
    """Two architectures: the planted MLP and a small CNN with random weights."""
    for model, (x, y), (xr, yr) in (
        (planted_model(), planted_data(120, 1, failing=0.6), planted_data(80, 0)),
        (small_cnn(3), small_data(60, seed=4), small_data(50, seed=5)),
    ):
        ps = ParameterSaliency(model)
        ps.stats = ps.fit_stats([(xr, yr)], progress=False)
        names = list(ps.layout.parameter_names)
        z = ps.stats.standardize(naive_unit_saliency(model, (x,), y, names).to(torch.float64))
        raw = naive_unit_saliency(model, (x,), y, names).to(torch.float64)
        with torch.no_grad():
            wrong = model(x).argmax(1) != y
        groups = error_groups(ps, [(x[:25], y[:25]), (x[25:], y[25:])], n_groups=2, culprits=4, exemplars=3,
                              progress=False)
        assert groups.criterion == "given" and len(groups) == 2
        positions = wrong.nonzero().flatten()
        assert sorted(torch.cat([g.indices for g in groups]).tolist()) == positions.tolist()
        right = (~wrong).nonzero().flatten()
        for g in groups:
            torch.testing.assert_close(g.z, z[g.indices], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(g.raw, raw[g.indices], rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(g.inputs[0], x[g.indices])
            mean = z[g.indices].mean(0)
            expected = sorted(range(mean.shape[0]), key=lambda c: -float(mean[c]))[:4]
            assert [c.column for c in g.culprits] == expected
            for c in g.culprits:
                assert c.score == pytest.approx(float(mean[c.column]), rel=1e-6, abs=1e-6)
                share = float((z[g.indices, c.column] >= 2.0).double().mean())
                assert c.consistency == pytest.approx(share)
                # exemplars: the correctly classified samples of highest z of this unit
                ex = g.exemplars[c.column]
                best = z[right, c.column].topk(3)
                torch.testing.assert_close(ex.z, best.values, rtol=1e-6, atol=1e-6)  # ties may come in any order
                assert set(ex.indices.tolist()) <= set(right.tolist())
                torch.testing.assert_close(z[ex.indices, c.column], ex.z, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(ex.inputs[0], x[ex.indices])
                assert ex.labels.tolist() == y[ex.indices].tolist()


def test_exemplars_from_a_reference_set():
    model = planted_model()
    ps = ParameterSaliency(model)
    xr, yr = planted_data(80, 0)
    ps.stats = ps.fit_stats([(xr, yr)], progress=False)
    x, y = planted_data(100, 1, failing=0.6)
    xe, ye = planted_data(30, 9, failing=0.3)  # exemplars from a set that carries the features
    groups = error_groups(ps, (x, y), n_groups=2, reference=(xe, ye), exemplars=2, progress=False)
    z = ps.stats.standardize(naive_unit_saliency(model, (xe,), ye, list(ps.layout.parameter_names)).double())
    for g in groups:
        c = g.culprits[0]
        assert g.exemplars[c.column].indices.tolist() == z[:, c.column].topk(2).indices.tolist()
        # the failing unit's first exemplar carries its feature
        feature = BUGS[g.pairs[0][0]][1]
        assert float(g.exemplars[c.column].inputs[0][0, feature]) > 0.9


def test_repair_fixes_each_group_without_collateral_damage_and_the_random_control_does_not(planted):
    model, ps, test, held_out = planted
    groups = error_groups(ps, test, progress=False)
    before = snapshot(model)
    for g in groups:
        result = repair(model, ps, g, held_out, k=1, random_draws=12)
        assert_unchanged(model, before)
        culprits, random = result.rows["culprits"], result.rows["random"]
        assert culprits.columns == [g.culprits[0].column]
        assert culprits.fix_group.value == 1.0 and culprits.fix_held_out.value == 1.0
        assert culprits.collateral.value == 0.0
        assert result.num_held_out > 20 and result.num_correct > 200
        assert random.fix_held_out.value < 0.5 and len(random.columns) == 12
        assert random.collateral.value > 0.0
        advantage = result.differences["random"]["fix_held_out"]
        assert advantage.low > 0 and advantage.excludes(0.0)
        assert result.differences["weight"]["fix_held_out"].low > 0  # the biggest weights are not the bug
        with result.applied(model):
            assert bool((model(g.inputs[0]).argmax(1) == g.labels).all())
        assert_unchanged(model, before)
        assert "culprits" in result.to_markdown() and result.plot() is not None


def test_repair_rates_by_hand(planted):
    model, ps, test, (xh, yh) = planted
    groups = error_groups(ps, test, progress=False)
    g = groups[0]
    result = repair(model, ps, g, (xh, yh), k=3, controls=("gradient", "weight"))
    with torch.no_grad():
        predicted = model(xh).argmax(1)
    pairs = {pair for pair, _ in g.pairs}
    in_pairs = torch.tensor([(int(t), int(p)) in pairs for t, p in zip(yh, predicted)])
    right = predicted == yh
    for name, columns in (("culprits", g.ranked_columns(3)), ("gradient", g.raw.mean(0).topk(3).indices.tolist()),
                          ("weight", unit_weight_magnitude(model, ps.layout).topk(3).indices.tolist())):
        row = result.rows[name]
        assert row.columns == columns
        with turn_off(model, columns, layout=ps.layout), torch.no_grad():
            after = model(xh).argmax(1)
            fixed_group = (model(g.inputs[0]).argmax(1) == g.labels).double().mean()
        assert row.fix_group.value == pytest.approx(float(fixed_group))
        assert row.fix_held_out.value == pytest.approx(float((after[in_pairs] == yh[in_pairs]).double().mean()))
        assert row.collateral.value == pytest.approx(float((after[right] != yh[right]).double().mean()))
    assert result.num_held_out == int(in_pairs.sum()) and result.num_correct == int(right.sum())


def test_unit_weight_magnitude_by_hand():
    model = planted_model()
    ps = ParameterSaliency(model)
    magnitude = unit_weight_magnitude(model, ps.layout)
    expected = torch.cat([model[0].weight.abs().mean(1), model[2].weight.abs().mean(1)]).double()
    torch.testing.assert_close(magnitude, expected)


def test_error_groups_and_repair_errors(planted):
    model, ps, test, held_out = planted
    with pytest.raises(ValueError, match="ps.stats is None"):
        error_groups(ParameterSaliency(model), test, progress=False)
    clean = planted_data(50, 3)
    with pytest.raises(ValueError, match="no misclassified"):
        error_groups(ps, clean, progress=False)
    with pytest.raises(ValueError, match="n_groups"):
        error_groups(ps, test, n_groups=10_000, progress=False)
    with pytest.raises(ValueError, match="n_groups"):
        error_groups(ps, test, n_groups=0, progress=False)
    with pytest.raises(ValueError, match="max_groups"):
        error_groups(ps, test, max_groups=1, progress=False)
    with pytest.raises(ValueError, match="empty"):
        error_groups(ps, [], progress=False)
    g = error_groups(ps, test, progress=False)[0]
    with pytest.raises(ValueError, match="k must be"):
        repair(model, ps, g, held_out, k=0)
    with pytest.raises(ValueError, match="k must be"):
        repair(model, ps, g, held_out, k=ps.layout.num_columns + 1)
    with pytest.raises(ValueError, match="method"):
        repair(model, ps, g, held_out, method="prune")
    with pytest.raises(ValueError, match="controls"):
        repair(model, ps, g, held_out, controls=("magic",))
    with pytest.raises(ValueError, match="random_draws"):
        repair(model, ps, g, held_out, random_draws=0)
    other = planted_model()
    with pytest.raises(ValueError, match="this model"):
        repair(other, ps, g, held_out)
    with pytest.raises(ValueError, match="empty"):
        repair(model, ps, g, [])


def test_intervals():
    e = bootstrap_mean(torch.tensor([True, False, True, True]))
    assert e.value == 0.75 and e.low <= 0.75 <= e.high and e.n == 4
    assert bootstrap_mean([0.5]).low == bootstrap_mean([0.5]).high == 0.5
    assert bootstrap_mean([]).n == 0 and bootstrap_mean([]).format() == "—"
    # a percentile interval: the quantiles of resampled means, drawn here by hand
    values = torch.tensor([0.0, 1.0, 3.0, 7.0, 2.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    means = values[torch.randint(5, (300, 5), generator=g)].mean(1)
    e = bootstrap_mean(values, resamples=300, seed=5)
    assert e.low == pytest.approx(float(means.quantile(0.025)))
    assert e.high == pytest.approx(float(means.quantile(0.975)))
    assert paired_difference([1, 1, 0], [0, 1, 0]).value == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="pair"):
        paired_difference([1, 0], [1])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean([float("nan")])
    table = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    e = bootstrap_draws_and_samples(table)
    assert e.value == pytest.approx(float(table.mean())) and e.n == 4 and e.low < e.value < e.high
    # wider than resampling the samples alone: the draws vary too
    alone = bootstrap_mean(table.mean(0))
    assert e.high - e.low > alone.high - alone.low
    assert bootstrap_draws_and_samples(torch.ones(3, 5)).low == 1.0
    with pytest.raises(ValueError, match="2-d"):
        bootstrap_draws_and_samples(torch.ones(3))


def test_repair_by_finetuning_edits_only_the_culprits(planted):
    from captum_paramsal.analysis import finetune_units

    model, ps, test, held_out = planted
    groups = error_groups(ps, test, progress=False)
    before = snapshot(model)
    g = groups[0]
    result = repair(model, ps, g, held_out, method="finetune", k=1, lr=0.05, max_steps=200, random_draws=3)
    assert_unchanged(model, before)
    culprits = result.rows["culprits"]
    assert culprits.fix_group.value == 1.0 and culprits.fix_held_out.value > 0.9
    assert culprits.collateral.value < 0.02
    # the change is finetune_units on the group's samples, confined to the culprit's row
    expected = finetune_units(model, culprits.columns, g.inputs[0], g.labels, layout=ps.layout, lr=0.05,
                              max_steps=200)
    assert set(result.delta) == {"0.weight"}
    torch.testing.assert_close(result.delta["0.weight"], expected.delta["0.weight"])
    unit = g.culprits[0].unit
    others = torch.ones(8, dtype=torch.bool)
    others[unit] = False
    assert bool((result.delta["0.weight"][others] == 0).all())
    with result.applied(model):
        assert bool((model(g.inputs[0]).argmax(1) == g.labels).all())
    assert_unchanged(model, before)
    assert len(result.rows["random"].columns) == 3


def test_heads_and_neurons_weight_magnitude_groups_and_repair():
    """Under unit schemes (attention heads, MLP neurons) of a TransformerEncoder."""
    from test_unit_schemes import _Encoder

    from captum_paramsal.units import resolve_entries

    torch.manual_seed(3)
    model = _Encoder()
    x = torch.randn(40, 5, 16, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    for scheme in ("heads", "neurons"):
        ps = ParameterSaliency(model, units=scheme)
        ps.stats = ps.fit_stats([(x[:20], y[:20])], progress=False)
        magnitude = unit_weight_magnitude(model, ps.layout)
        params = dict(model.named_parameters())
        group_columns = [c for e in ps.layout if e.is_group for c in range(e.slice.start, e.slice.stop)]
        assert group_columns
        for column in group_columns + [0, ps.layout.num_columns - 1]:  # one unit at a time, by hand
            values = torch.cat([params[name].detach().reshape(-1)[index.reshape(-1)]
                                for name, blocks in resolve_entries(model, [column], ps.layout).items()
                                for index in blocks])
            assert float(magnitude[column]) == pytest.approx(float(values.abs().mean()), rel=1e-12)
        before = snapshot(model)
        groups = error_groups(ps, (x[20:], y[20:]), n_groups=2, culprits=3, progress=False)
        assert sum(len(g) for g in groups) == groups.num_misclassified
        result = repair(model, ps, groups[0], (x[:20], y[:20]), k=1, random_draws=2)
        with turn_off(model, result.rows["culprits"].columns, layout=ps.layout), torch.no_grad():
            fixed = (model(groups[0].inputs[0]).argmax(1) == groups[0].labels).double().mean()
        assert result.rows["culprits"].fix_group.value == pytest.approx(float(fixed))
        assert_unchanged(model, before)
