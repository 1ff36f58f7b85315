"""The embedded digits model and the reproduce experiment."""

from __future__ import annotations

import re

import pytest
import torch

from captum_paramsal import ParameterSaliency
from captum_paramsal.analysis import (
    SaliencyIndex,
    dataset_profiles,
    neighbour_correction,
    pruning_curves,
    semantic_agreement,
)
from captum_paramsal.analysis.intervals import bootstrap_mean, paired_difference
from captum_paramsal.experiments.reproduce import run
from captum_paramsal.experiments.results_markdown import write_section
from captum_paramsal.interventions import turn_off
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


@pytest.mark.slow
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


def _says(flat_text: str, phrase: str) -> None:
    """``phrase`` is in the text, and not as the tail of a longer number ("5%" inside "45%")."""
    assert re.search(r"(?<![\d.])" + re.escape(phrase), flat_text), f"the section does not say {phrase!r}"


def _verdict(flat_text: str, claim: str) -> str:
    """The section's verdict on the claim: "**Claim: ... Holds here**", "Does not hold here" or
    "Weaker here (holds at lr ... only)"."""
    found = re.search(re.escape(claim) + r" (Holds here|Does not hold here|Weaker here \(holds at lr [^)]*\))\*\*",
                      flat_text)
    assert found, f"no verdict after {claim!r}"
    return found.group(1)


@pytest.mark.slow
def test_reproduce_quick(tmp_path):
    text = run(str(tmp_path), quick=True)
    written = (tmp_path / "RESULTS.md").read_text()
    assert text.strip() in written
    for name in ("pruning_curves.png", "dataset_profiles.png", "misclassified_profile.png"):
        assert (tmp_path / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    for claim in ("pruning test", "neighbours are corrected", "semantically alike", "Mean profiles"):
        assert claim in text
    assert text.count("Holds here") + text.count("Does not hold here") + text.count("Weaker here") == 4
    flat = " ".join(text.split())  # sentences wrap anywhere

    # the same seeded inputs as the quick run: the first 300 test digits, the shipped statistics
    model, stats, data = load_digits_model()
    x, y = data.test_set()
    x, y = x[:300], y[:300]
    ps = ParameterSaliency(model, stats=stats)
    model.eval()
    with torch.no_grad():
        predicted = model(x).argmax(1)
    wrong = (predicted != y).nonzero().flatten()
    assert 5 < len(wrong) < 300, "the quick run needs misclassified digits"
    _says(flat, f"{len(y)} digits, of which {len(wrong)} are misclassified")

    # pruning: the table is the one recomputed; k = 1 salient recounted by hand
    pruning = pruning_curves(model, ps, x, y, ks=(1, 5, 10, 25, 50), seed=0)
    assert pruning.to_markdown() in text
    z = ps.attribute(x[wrong], target=y[wrong]).detach()
    corrected = 0
    for i, sample in enumerate(wrong.tolist()):
        with turn_off(model, [ps.layout.unit_of(int(z[i].argmax()))]), torch.no_grad():
            corrected += int(model(x[sample : sample + 1]).argmax(1)) == int(y[sample])
    assert pruning.row(1, "salient")["fraction_corrected"] == corrected / len(wrong)

    def rate(k, mode):
        return pruning.row(k, mode)["fraction_corrected"]

    _says(flat, f"turning off the single most salient unit corrects {corrected / len(wrong):.0%} of the misclassified "
                f"digits (random: {rate(1, 'random'):.0%}, least: {rate(1, 'least'):.0%})")
    beats = [k for k in pruning.ks if rate(k, "salient") > max(rate(k, "random"), rate(k, "least"))]
    lost = [k for k in pruning.ks if k not in beats]
    _says(flat, f"Salient units beat both baselines at k = {', '.join(map(str, beats)) or 'none'}"
                + (f", not at k = {', '.join(map(str, lost))} " if lost else "."))
    pruning_holds = _verdict(flat, "salient units correct far more misclassified samples than random or least "
                                   "salient ones.")
    assert (pruning_holds == "Holds here") == (1 in beats and len(beats) >= len(pruning.ks) - 1)

    # neighbour correction, both steps: each table row recounted from the records, the intervals
    # recomputed over the samples they average, the two verdicts from the paired intervals
    differences = {}
    for lr in (1e-3, 1e-4):
        result = neighbour_correction(model, ps, x, y, k=25, m=5, lr=lr, max_steps=500, seed=0, max_samples=8)
        assert result.num_misclassified == len(wrong) and len(result.records) == 8
        used = [r for r in result.records if r["self_corrected"]]
        assert used, "no fine-tuning corrected its sample: the rates below would be 0 / 0"
        for kind, prefix in (("top-25 salient", ""), ("25 random", "random_")):
            near = [r[prefix + "neighbours_corrected"] for r in used]
            rest = [r[prefix + "others_corrected"] for r in used]
            fixed = sum(bool(r[prefix + "self_corrected"]) for r in result.records)
            steps = sum(r[prefix + "steps"] for r in result.records) / 8
            row = (f"| {lr:g} | {kind} | {fixed} of 8 | {steps:.1f} | {bootstrap_mean(near).format(percent=True)} | "
                   f"{bootstrap_mean(rest).format(percent=True)} | "
                   f"{paired_difference(near, rest).format(percent=True, signed=True)} |")
            assert row in text, f"the section has no row {row!r}"
        salient = [r["neighbours_corrected"] for r in used]
        random_units = [r["random_neighbours_corrected"] for r in used]
        differences[lr] = (paired_difference(salient, [r["others_corrected"] for r in used]),
                           paired_difference(salient, random_units))
        assert f"| {lr:g} | {differences[lr][1].format(percent=True, signed=True)} |" in text
    s = neighbour_correction(model, ps, x, y, k=25, m=5, lr=1e-4, max_steps=500, seed=0, max_samples=8,
                             random_units=False).summary
    _says(flat, f"{s['neighbours_corrected'].value:.0%} of the neighbours against "
                f"{s['others_corrected'].value:.0%} of all the other misclassified digits")
    assert (_verdict(flat, "neighbours are corrected more often than the other misclassified samples.")
            == "Holds here") == all(d[0].low > 0 for d in differences.values())
    above = [lr for lr, d in differences.items() if d[1].low > 0]
    expected = ("Holds here" if len(above) == len(differences) else "Does not hold here" if not above
                else "Weaker here (holds at lr " + ", ".join(f"{lr:g}" for lr in above) + " only)")
    assert _verdict(flat, "it takes the salient units: fine-tuning random units instead corrects fewer "
                          "neighbours.") == expected

    # semantic agreement: the tables recomputed, the same-class rate recounted from the neighbours
    index = SaliencyIndex(ps.attribute(x, target=y).detach(), layout=ps.layout)
    agreement_all = semantic_agreement(index, y, predicted, m=5)
    agreement_wrong = semantic_agreement(index, y, predicted, m=3, among=predicted != y)
    assert agreement_all.to_markdown() in text and agreement_wrong.to_markdown() in text
    _, idx = index.neighbours_of_all(5)
    assert agreement_all.same_class == pytest.approx(float((y[idx] == y[:, None]).double().mean()), abs=1e-12)
    class_ratio = agreement_all.same_class / max(agreement_all.same_class_chance, 1e-9)
    pair_ratio = agreement_wrong.same_pair / max(agreement_wrong.same_pair_chance, 1e-9)
    _says(flat, f"share the true class {class_ratio:.1f}x as often as chance")
    _says(flat, f"share the (true, predicted) pair {pair_ratio:.1f}x as often as chance")
    assert (_verdict(flat, "samples whose profiles are close are semantically alike.") == "Holds here") == (
        min(class_ratio, pair_ratio) > 1.5)

    # mean profiles: the table recomputed, the count of layers where misclassified digits are higher
    profiles = dataset_profiles(ps, [(x, y)], progress=False)
    assert profiles.to_markdown() in text
    layers = profiles.by_layer(standardized=True)
    higher = [name for name, _, correct, misclassified in layers if misclassified > correct]
    _says(flat, f"larger mean standardized saliency in {len(higher)} of {len(layers)} layers")


@pytest.mark.slow
def test_trojan_quick_writes_its_section(tmp_path, capsys):
    from captum_paramsal.cli.main import main

    results = tmp_path / "RESULTS.md"
    assert main(["trojan", "--quick", "--sparsity", "0.5", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "| **average** |" in out and "SPADE 0.5" in out
    text = results.read_text()
    assert "<!-- begin: trojan --quick --sparsity 0.5 -->" in text
    assert "### `python -m captum_paramsal.experiments.trojan --quick --sparsity 0.5`" in text
