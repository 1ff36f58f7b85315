"""The embedded digits model and the reproduce experiment."""

from __future__ import annotations

import torch

from captum_paramsal import ParameterSaliency
from captum_paramsal.experiments.results_markdown import write_section
from captum_paramsal.experiments.reproduce import run
from captum_paramsal.zoo import load_digits_model
from captum_paramsal.zoo.digits import read_metadata
from captum_paramsal.zoo.train_digits import RECIPE, accuracy, build, train


def test_shipped_digits_model_matches_its_metadata_and_statistics():
    model, stats, data = load_digits_model()
    meta = read_metadata()
    assert abs(accuracy(model, *data.test_set()) - float(meta["test_accuracy"])) < 1e-6
    assert len(data.train) + len(data.test) == 1797 and not set(data.train.tolist()) & set(data.test.tolist())
    ps = ParameterSaliency(model, stats=stats)  # the statistics fit the shipped model's layout
    assert stats.count == len(data.test)
    x, y = data.test_set()
    assert torch.allclose(ps.attribute(x, target=y, standardize=False).double().mean(0), stats.mean, rtol=1e-4)


def test_training_is_deterministic_and_recreates_the_shipped_model(tmp_path):
    _, _, data = load_digits_model(with_stats=False)
    first = train(data, **RECIPE).state_dict()
    second = train(data, **RECIPE).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    model, scores = build(str(tmp_path), quiet=True)
    rebuilt, _, _ = load_digits_model(str(tmp_path / "digits_cnn.safetensors"))
    shipped, _, _ = load_digits_model(with_stats=False)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), shipped.state_dict().values()))
    assert scores["seconds"] < 60


def test_write_section_replaces_only_its_own_section(tmp_path):
    path = str(tmp_path / "RESULTS.md")
    write_section(path, "a", "first A")
    write_section(path, "b", "B")
    write_section(path, "a", "second A")
    text = open(path).read()
    assert "second A" in text and "first A" not in text and text.index("second A") < text.index("B")


def test_reproduce_quick(tmp_path):
    text = run(str(tmp_path), quick=True)
    written = (tmp_path / "RESULTS.md").read_text()
    assert text.strip() in written
    for name in ("pruning_curves.png", "dataset_profiles.png", "misclassified_profile.png"):
        assert (tmp_path / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    for claim in ("pruning test", "neighbours are corrected", "semantically alike", "Mean profiles"):
        assert claim in text
    assert text.count("Holds here") + text.count("Does not hold here") == 3


def test_trojan_quick_writes_its_section(tmp_path, capsys):
    from captum_paramsal.cli.main import main

    results = tmp_path / "RESULTS.md"
    assert main(["trojan", "--quick", "--sparsity", "0.5", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "| **average** |" in out and "SPADE 0.5" in out
    text = results.read_text()
    assert "<!-- begin: trojan --quick --sparsity 0.5 -->" in text
    assert "### `python -m captum_paramsal.experiments.trojan --quick --sparsity 0.5`" in text
