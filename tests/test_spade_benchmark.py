"""The SPADE benchmark experiment (python -m captum_paramsal.experiments.spade_benchmark): its
statistics and configurations, the gate stopping a run, resuming from per-sample results, and the
quick mode end to end (gate, tuning, report, figure, RESULTS section)."""

from __future__ import annotations

import json

import pytest
import torch

from captum_paramsal.experiments import spade_benchmark as bench
from captum_paramsal.zoo.trojan_digits import ResNet20


def test_bootstrap_interval_covers_the_mean_and_is_seeded():
    values = torch.randn(200, generator=torch.Generator().manual_seed(0)).tolist()
    mean, low, high = bench.bootstrap_interval(values)
    assert low < mean < high
    assert mean == pytest.approx(sum(values) / len(values))
    # about 1.96 standard errors on each side
    se = torch.tensor(values).std().item() / len(values) ** 0.5
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bench.bootstrap_interval(values) == (mean, low, high)


def test_configurations_and_profiles():
    setup = bench.BenchmarkSetup()
    profiles = bench.grid_profiles(setup.tune_grid)
    assert len(profiles) == 2 * 2 * 2
    assert all(p["fc.weight"] == p["layer3.*"] for p in profiles)
    configs = bench.configurations(setup, {"sparsegpt": profiles[0], "obc": profiles[-1]})
    names = [c.name for c in configs]
    assert len(names) == len(set(names))
    for solver in ("sparsegpt", "obc"):
        for kind in ("targeted", "untargeted"):
            assert {f"{kind} {solver} {s:g}" for s in bench.UNIFORM} <= set(names)
            assert f"{kind} {solver} tuned" in names and f"{kind} {solver} late" in names
    assert {f"magnitude {s:g}" for s in bench.UNIFORM} <= set(names)
    model = ResNet20()
    from captum_paramsal.spade.sample_pruning import resolve_sparsity

    assert bench.pruned_fraction(model, resolve_sparsity(model, 0.9)) == pytest.approx(0.9, abs=1e-3)
    late = bench.pruned_fraction(model, resolve_sparsity(model, bench.LATE_HEAVY))
    assert 0.8 < late < 0.95  # the last stage holds most of the weights


def test_magnitude_pruning_is_exact():
    model = ResNet20()
    weights = bench.magnitude_weights(model, {"layer3.0.conv1.weight": 0.9})
    w = weights["layer3.0.conv1.weight"]
    dense = model.layer3[0].conv1.weight.detach()
    assert int((w == 0).sum()) == round(0.9 * w.numel())
    kept = w != 0
    assert float(dense[kept].abs().min()) >= float(dense[~kept].abs().max())
    assert torch.equal(w[kept], dense[kept])


def test_aucs_of_the_eight_methods_on_a_planted_map():
    torch.manual_seed(0)
    model = ResNet20().eval()
    methods = bench.attribution_methods(model)
    assert tuple(methods) == bench.METHODS
    x = torch.rand(1, 3, 32, 32)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[3:12, 5:14] = True
    aucs = bench.map_aucs(methods, x, 4, mask)
    assert set(aucs) == set(bench.METHODS) and all(0 <= v <= 100 for v in aucs.values())
    again = bench.map_aucs(methods, x, 4, mask)
    assert aucs == again  # GradientShap's draws are seeded


def test_samples_are_switched_by_their_trigger_and_round_robin():
    from captum_paramsal.zoo.trojan_digits import load_trojan_resnet

    model, data = load_trojan_resnet()
    triggered = bench.triggered_sets(data)
    entries = bench.select_samples(model, data, seed=0, triggered=triggered)
    assert entries == bench.select_samples(model, data, seed=0)
    assert [e["trigger"] for e in entries[:6]] == [0, 1, 2, 0, 1, 2]
    for e in entries[:9]:
        x, _, target = bench.sample_of(triggered, e)
        with torch.no_grad():
            assert int(model(x).argmax(1)) == target


@pytest.mark.slow
def test_quick_mode_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    figure, results, raw = tmp_path / "f.png", tmp_path / "RESULTS.md", tmp_path / "o.json"
    argv = ["--quick", "--out", str(out), "--figure", str(figure), "--results", str(results), "--json", str(raw)]
    assert bench.main(argv + ["--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "gate: clean accuracy" in printed.err and "passed" in printed.err
    text = printed.out
    assert text.index("Gate:") < text.index("| configuration |")  # the gate before any SPADE number
    outcome = json.loads(raw.read_text())
    assert outcome["gate"]["passed"] and outcome["samples"] == bench.QUICK.report
    for solver in ("sparsegpt", "obc"):
        assert f"targeted {solver} tuned" in outcome["summary"]
        assert set(outcome["claims"][solver]) >= {"gain", "low", "high", "over_untargeted", "holds"}
    assert figure.read_bytes()[:4] == b"\x89PNG"
    assert "<!-- begin: spade benchmark quick -->" in results.read_text()
    rows = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert len(rows) == bench.QUICK.report
    # resume: a second run evaluates nothing again and reports the same
    assert bench.main(argv + ["--no-progress"]) == 0
    assert json.loads(raw.read_text())["summary"] == outcome["summary"]
    assert len((out / "report.jsonl").read_text().splitlines()) == bench.QUICK.report
    # other options in the same folder are refused
    assert bench.main(["--out", str(out), "--report", "7", "--no-progress"]) == 2
    assert "holds a run with other options" in capsys.readouterr().err


@pytest.mark.slow
def test_a_failed_gate_stops_before_any_spade_number(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(bench.GATE, "dense_auc", 10.0)  # no benchmark passes this
    # not --quick: the smoke run shows its gate without enforcing it
    code = bench.main(["--tune", "1", "--report", "2", "--views", "8", "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 3
    printed = capsys.readouterr()
    assert "FAILED" in printed.err and "no SPADE number" in printed.out
    assert "| configuration |" not in printed.out
    assert not (tmp_path / "run" / "report.jsonl").exists() and not (tmp_path / "run" / "tune.jsonl").exists()
