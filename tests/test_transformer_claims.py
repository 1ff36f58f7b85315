"""The embedded colours BERT (captum_paramsal.zoo.colours) and the transformer_claims experiment."""

from __future__ import annotations

import re

import pytest
import torch

from captum_paramsal import ParameterSaliency
from captum_paramsal.zoo import load_colours_model
from captum_paramsal.zoo.colours import (
    COLOURS,
    STATS_FILE,
    UNITS,
    WEIGHTS_FILE,
    ColoursData,
    answer,
    colours_data,
    encode,
    read_metadata,
)


@pytest.fixture(scope="module")
def shipped():
    return load_colours_model()


def test_the_rule_on_hand_made_sentences():
    assert answer("most red blue red green yellow".split()) == "red"
    assert answer("least red blue red green yellow".split()) == "yellow"  # blue, green, yellow once: yellow last
    assert answer("most blue red red blue green yellow".split()) == "blue"  # tie: blue mentioned first
    assert answer("least the yellow green and red blue red blue".split()) == "green"  # yellow, green: green last
    assert answer(["[CLS]", "least", "red", "red", "blue", "green", "yellow", "green", "[SEP]"]) == "yellow"
    with pytest.raises(ValueError, match="starts with"):
        answer("red blue".split())
    ids, mask = encode("most red blue".split())
    assert ids[:5].tolist() == [1, 3, 5, 7, 2] and int(mask.sum()) == 5


def test_generation_is_deterministic_self_contained_and_splits_are_disjoint(shipped):
    _, _, data = shipped
    again = colours_data(seed=0)
    assert again.checksum() == data.checksum() == __import__("json").loads(read_metadata()["data"])["checksum"]
    assert (len(data.train), len(data.validation), len(data.test)) == (8000, 2000, 6000)
    sentences = [
        tuple(row[row != 0].tolist()) for split in (data.train, data.validation, data.test) for row in split.input_ids
    ]
    assert len(set(sentences)) == len(sentences), "a sentence is in two splits (or twice in one)"
    for i in range(0, len(data.test), 97):  # the labels are the rule's answers
        words = ColoursData.words(data.test.input_ids[i])
        assert COLOURS[int(data.test.labels[i])] == answer(words)
        assert set(COLOURS) <= set(words) and 9 <= len(words) <= 21
    assert 0.25 < float(data.test.tied.double().mean()) < 0.45
    assert colours_data(seed=1).checksum() != data.checksum()


def test_loader_restores_the_shipped_model_and_its_statistics(shipped):
    from safetensors.torch import load_file

    model, stats, data = shipped
    stored = load_file(WEIGHTS_FILE)
    state = model.state_dict()
    assert set(stored) == set(state) and all(torch.equal(stored[k], state[k]) for k in stored)
    assert not model.training
    meta = read_metadata()
    with torch.no_grad():
        predicted = model(input_ids=data.test.input_ids, attention_mask=data.test.attention_mask).logits.argmax(1)
    accuracy = float((predicted == data.test.labels).double().mean())
    assert abs(accuracy - float(meta["test_accuracy"])) < 1e-6
    assert 0.80 < accuracy < 0.99, "the model must make some errors, not too many"
    # the statistics fit the layout by heads and neurons and are the validation split's
    ps = ParameterSaliency(model, units=UNITS, stats=stats)
    kinds = [(e.kind, e.num_units) for e in ps.layout]
    assert kinds.count(("heads", 4)) == 2 and kinds.count(("neurons", 128)) == 2
    assert stats.count == len(data.validation)
    v = data.validation
    raw = ps.attribute(v.input_ids, target=v.labels, additional_forward_args=v.forward_args(), standardize=False)
    assert torch.allclose(raw.double().mean(0), stats.mean, rtol=1e-4, atol=1e-9)
    assert STATS_FILE.endswith("colours_bert_stats.safetensors")


def test_loader_refuses_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_colours"):
        load_colours_model(str(tmp_path / "nothing.safetensors"))


@pytest.mark.slow
def test_training_recreates_the_shipped_model(tmp_path, shipped):
    from captum_paramsal.stats import SaliencyStats
    from captum_paramsal.zoo.train_colours import build

    model, scores = build(str(tmp_path), quiet=True)
    shipped_model, shipped_stats, _ = shipped
    rebuilt = model.state_dict()
    assert all(torch.equal(rebuilt[k], v) for k, v in shipped_model.state_dict().items())
    assert read_metadata(str(tmp_path / "colours_bert.safetensors")) == read_metadata()
    stats = SaliencyStats.load(str(tmp_path / "colours_bert_stats.safetensors"))
    # the weights are bit for bit; the statistics are the engine's float32 saliency, whose rounding
    # may change between versions (an equivalent order of operations): to float32 precision
    assert torch.allclose(stats.mean, shipped_stats.mean, rtol=1e-5, atol=0)
    assert torch.allclose(stats.std, shipped_stats.std, rtol=1e-5, atol=0)
    assert not torch.are_deterministic_algorithms_enabled()  # the global setting is restored
    assert scores["seconds"] < 120


def _verdict(flat: str, claim: str) -> bool:
    found = re.search(re.escape(claim) + r" (Holds here|Does not hold here)\*\*", flat)
    assert found, f"no verdict after {claim!r}"
    return found.group(1) == "Holds here"


@pytest.mark.slow
def test_transformer_claims_quick(tmp_path, shipped, one_thread):
    from captum_paramsal.analysis import SaliencyIndex, semantic_agreement
    from captum_paramsal.experiments.transformer_claims import QUICK_SENTENCES, run
    from captum_paramsal.interventions import turn_off

    text = run(str(tmp_path), quick=True)
    assert text.strip() in (tmp_path / "RESULTS.md").read_text()
    assert "<!-- begin: transformer_claims -->" in (tmp_path / "RESULTS.md").read_text()
    for name in ("transformer_turn_off.png", "transformer_culprits.png"):
        assert (tmp_path / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    assert text.count("Holds here") + text.count("Does not hold here") == 3
    flat = " ".join(text.split())

    # the errors, recounted
    model, stats, data = shipped
    split = data.test[:QUICK_SENTENCES]
    with torch.no_grad():
        predicted = model(input_ids=split.input_ids, attention_mask=split.attention_mask).logits.argmax(1)
    wrong = (predicted != split.labels).nonzero().flatten()
    n = len(wrong)
    assert 10 < n < QUICK_SENTENCES // 5
    assert f"{QUICK_SENTENCES} held-out test sentences, of which {n} are misclassified" in flat

    # salient corrections recounted one sentence at a time, through profile().only().top_k() and
    # UnitScore rows (not the experiment's columns and grouped batches)
    ps = ParameterSaliency(model, units=UNITS, stats=stats)
    errors = split[wrong]
    prof = ps.profile(errors.input_ids, target=errors.labels, additional_forward_args=errors.forward_args())
    for kind, k in (("heads", 1), ("neurons", 5)):
        top = prof.only(kind).top_k(k)
        corrected = 0
        for i in range(n):
            with turn_off(model, top[i], layout=ps.layout), torch.no_grad():
                logits = model(input_ids=errors.input_ids[i : i + 1], attention_mask=errors.attention_mask[i : i + 1])
            corrected += int(logits.logits.argmax(1)) == int(errors.labels[i])
        row = re.search(rf"\| {kind} \| {k} \| (\d+) of (\d+) \| ([\d.]+)%", text)
        assert row, f"no table row for {kind}, k={k}"
        assert (int(row.group(1)), int(row.group(2))) == (corrected, n)
        assert float(row.group(3)) == pytest.approx(round(100 * corrected / n, 1))

    # each verdict follows from the table: salient's paired intervals above 0 at every k
    for kind in ("heads", "neurons"):
        lower = [
            (float(a), float(b))
            for a, b in re.findall(
                rf"\| {kind} \| \d+ \| [^|]+ \| [^|]+ \| [^|]+ \| [^|]+ \| [+-][\d.]+% \[(-?[\d.]+), [^|]+ \| "
                rf"[+-][\d.]+% \[(-?[\d.]+),", text)
        ]
        assert lower, f"no paired intervals for {kind}"
        holds = _verdict(flat, f"turning off the most salient {kind} corrects more errors than random or least "
                               f"salient {kind}.")
        assert holds == all(a > 0 and b > 0 for a, b in lower)

    # neighbours: the heads-and-neurons row recomputed with the library
    columns = torch.cat([torch.arange(e.slice.start, e.slice.stop) for e in ps.layout
                         if e.kind in ("heads", "neurons")])
    agreement = semantic_agreement(SaliencyIndex(prof.values[:, columns]), errors.labels, predicted[wrong], m=3)
    assert f"| saliency, heads and neurons | {agreement.same_pair * 100:.1f}% [" in text
    ratio = agreement.same_pair / agreement.same_pair_chance
    assert f"| {agreement.same_pair_chance * 100:.1f}% | {ratio:.1f}× |" in text
    p_value = float(re.search(r"\| saliency, heads and neurons \|[^\n]*\| ([\d.]+) \|\n", text).group(1))
    assert _verdict(flat, "saliency-space neighbours share their (true, predicted) pair above chance.") == (
        ratio > 1.5 and p_value < 0.01)
