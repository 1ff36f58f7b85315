"""Saliency-space neighbours, semantic agreement and data-set mean profiles (SPEC §4)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from captum_paramsal import ParameterSaliency, SaliencyLayout
from captum_paramsal.analysis import (
    DatasetProfiles,
    SaliencyIndex,
    SemanticAgreement,
    dataset_profiles,
    semantic_agreement,
)

from helpers import loader, small_cnn, small_data
from naive import rel_err

# -- plain references ---------------------------------------------------------------------------


def brute_force(profiles, queries, m, exclude=None):
    """Cosine of every (query, sample) pair in plain python, excluded samples dropped, sorted."""
    P, Q = np.asarray(profiles, dtype=np.float64), np.asarray(queries, dtype=np.float64)
    sims_out, idx_out = [], []
    for q in range(len(Q)):
        banned = set() if exclude is None else {int(e) for e in np.atleast_1d(exclude[q]) if e >= 0}
        scored = []
        for j in range(len(P)):
            if j in banned:
                continue
            cosine = float(Q[q] @ P[j]) / (math.sqrt(float(Q[q] @ Q[q])) * math.sqrt(float(P[j] @ P[j])))
            scored.append((cosine, j))
        scored.sort(key=lambda pair: -pair[0])
        sims_out.append([c for c, _ in scored[:m]])
        idx_out.append([j for _, j in scored[:m]])
    return np.array(sims_out), np.array(idx_out)


def brute_agreement(profiles, labels, predictions, m, among=None):
    """Semantic agreement and its chance level by loops over samples, from brute-force neighbours."""
    keep = list(range(len(labels))) if among is None else [i for i in range(len(labels)) if among[i]]
    P = np.asarray(profiles)[keep]
    y = [int(labels[i]) for i in keep]
    pair = [(int(labels[i]), int(predictions[i])) for i in keep]
    n = len(keep)
    _, idx = brute_force(P, P, m, exclude=np.arange(n))
    same_class = np.mean([np.mean([y[j] == y[i] for j in idx[i]]) for i in range(n)])
    same_pair = np.mean([np.mean([pair[j] == pair[i] for j in idx[i]]) for i in range(n)])
    chance_class = np.mean([sum(y[j] == y[i] for j in range(n) if j != i) / (n - 1) for i in range(n)])
    chance_pair = np.mean([sum(pair[j] == pair[i] for j in range(n) if j != i) / (n - 1) for i in range(n)])
    return same_class, chance_class, same_pair, chance_pair


def random_profiles(n, f, seed, dtype=torch.float64):
    # continuous random data: all cosines distinct (ties-free) with probability one
    return torch.randn(n, f, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module")
def fitted():
    """A small float64 CNN, its data, and a ParameterSaliency with statistics over that data."""
    model, (x, y) = small_cnn(), small_data(30)
    ps = ParameterSaliency(model)
    ps.stats = ps.fit_stats(loader(x, y, 7), progress=False)
    return model, ps, x, y


# -- exact search ---------------------------------------------------------------------------------


def test_search_matches_brute_force():
    profiles, queries = random_profiles(60, 13, seed=0), random_profiles(9, 13, seed=1)
    sims, idx = SaliencyIndex(profiles).search(queries, m=7)
    ref_sims, ref_idx = brute_force(profiles, queries, 7)
    assert sims.shape == idx.shape == (9, 7) and idx.dtype == torch.int64
    assert idx.tolist() == ref_idx.tolist()
    np.testing.assert_allclose(sims.numpy(), ref_sims, rtol=0, atol=1e-12)
    # cosine ignores each row's scale: rescaled profiles and queries give the same answer
    scales = torch.rand(60, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 50 + 0.01
    _, idx_scaled = SaliencyIndex(profiles * scales).search(queries * 3.0, m=7)
    assert idx_scaled.tolist() == ref_idx.tolist()


def test_neighbours_exclude_the_sample_itself():
    profiles = random_profiles(40, 11, seed=2)
    index = SaliencyIndex(profiles)
    sims, idx = index.neighbours_of_all(6)
    ref_sims, ref_idx = brute_force(profiles, profiles, 6, exclude=np.arange(40))
    assert idx.tolist() == ref_idx.tolist()
    np.testing.assert_allclose(sims.numpy(), ref_sims, rtol=0, atol=1e-12)
    assert all(i not in row for i, row in enumerate(idx.tolist()))
    one_sims, one_idx = index.neighbours(17, 6)
    assert one_idx.shape == (6,) and one_idx.tolist() == ref_idx[17].tolist()
    assert torch.equal(index.neighbours(-1, 3)[1], idx[39, :3])
    # all the others: m = N - 1 is allowed and returns every other sample once
    assert sorted(index.neighbours(0, 39)[1].tolist()) == list(range(1, 40))


def test_search_of_a_member_without_exclusion_finds_itself_first():
    profiles = random_profiles(25, 8, seed=4)
    sims, idx = SaliencyIndex(profiles).search(profiles[5], m=25)
    assert idx[0] == 5 and abs(float(sims[0]) - 1.0) < 1e-12
    assert sorted(idx.tolist()) == list(range(25))  # m = N: everything, sorted descending
    assert bool((sims[:-1] >= sims[1:]).all())


def test_chunking_gives_the_same_result():
    profiles, queries = random_profiles(50, 9, seed=5), random_profiles(23, 9, seed=6)
    whole = SaliencyIndex(profiles).search(queries, 5)
    for chunk in (1, 3, 22, 23, 100):
        chunked = SaliencyIndex(profiles, chunk_size=chunk).search(queries, 5)
        assert torch.equal(chunked[1], whole[1]) and torch.allclose(chunked[0], whole[0], rtol=0, atol=1e-15)
    # the default chunk is derived from a budget of entries: force several chunks through it
    import captum_paramsal.analysis.index as index_module

    saved = index_module.CHUNK_ELEMENTS
    index_module.CHUNK_ELEMENTS = 50 * 4  # 4 queries per chunk
    try:
        auto = SaliencyIndex(profiles).search(queries, 5, exclude=torch.arange(23))
    finally:
        index_module.CHUNK_ELEMENTS = saved
    ref = SaliencyIndex(profiles).search(queries, 5, exclude=torch.arange(23))
    assert torch.equal(auto[1], ref[1])


def test_similarity_blocks_stay_within_the_chunk(monkeypatch):
    # memory is bounded by the (chunk, N) similarity block handed to topk, whatever Q is
    import captum_paramsal.analysis.index as index_module

    rows, topk = [], torch.topk
    monkeypatch.setattr(torch, "topk", lambda block, *a, **k: rows.append(block.shape) or topk(block, *a, **k))
    profiles, queries = random_profiles(50, 9, seed=5), random_profiles(23, 9, seed=6)
    SaliencyIndex(profiles, chunk_size=5).search(queries, 3)
    assert rows == [(5, 50)] * 4 + [(3, 50)]
    rows.clear()
    monkeypatch.setattr(index_module, "CHUNK_ELEMENTS", 50 * 4)
    SaliencyIndex(profiles).neighbours_of_all(3)
    assert rows == [(4, 50)] * 12 + [(2, 50)]


def test_several_exclusions_with_padding():
    profiles, queries = random_profiles(30, 7, seed=7), random_profiles(4, 7, seed=8)
    exclude = torch.tensor([[0, 1, 2], [5, -1, -1], [-1, -1, -1], [29, 3, 4]])
    sims, idx = SaliencyIndex(profiles, chunk_size=2).search(queries, 27, exclude=exclude)
    ref_sims, ref_idx = brute_force(profiles, queries, 27, exclude=exclude.numpy())
    assert idx.tolist() == ref_idx.tolist()
    np.testing.assert_allclose(sims.numpy(), ref_sims, atol=1e-12)


def test_float32_and_array_inputs():
    profiles = random_profiles(30, 6, seed=9, dtype=torch.float32)
    index = SaliencyIndex(profiles.numpy())
    assert index.profiles.dtype == torch.float32
    sims, idx = index.search(profiles[:3].tolist(), 4)
    ref_sims, ref_idx = brute_force(profiles, profiles[:3], 4)
    assert idx.tolist() == ref_idx.tolist() and sims.dtype == torch.float32
    np.testing.assert_allclose(sims.numpy(), ref_sims, atol=1e-5)


def test_zero_profile_has_zero_similarity():
    profiles = torch.cat([random_profiles(5, 4, seed=10), torch.zeros(1, 4, dtype=torch.float64)])
    sims, idx = SaliencyIndex(profiles).neighbours(5, 5)
    assert torch.equal(sims, torch.zeros(5, dtype=torch.float64))


def test_subset_keeps_labels_and_searches_inside():
    profiles = random_profiles(20, 5, seed=11)
    labels, preds = torch.arange(20) % 3, torch.arange(20) % 4
    mask = torch.arange(20) % 2 == 0
    sub = SaliencyIndex(profiles, labels=labels, predictions=preds).subset(mask)
    assert len(sub) == 10 and torch.equal(sub.labels, labels[mask]) and torch.equal(sub.predictions, preds[mask])
    _, ref_idx = brute_force(profiles[mask], profiles[mask], 3, exclude=np.arange(10))
    assert sub.neighbours_of_all(3)[1].tolist() == ref_idx.tolist()


def test_faiss_backend_agrees_with_torch():
    pytest.importorskip("faiss")
    profiles, queries = random_profiles(200, 16, seed=12), random_profiles(15, 16, seed=13)
    exact, fast = SaliencyIndex(profiles), SaliencyIndex(profiles, backend="faiss")
    for (ts, ti), (fs, fi) in [
        (exact.search(queries, 8), fast.search(queries, 8)),
        (exact.neighbours_of_all(5), fast.neighbours_of_all(5)),
        (exact.search(queries, 6, exclude=torch.arange(15)), fast.search(queries, 6, exclude=torch.arange(15))),
    ]:
        assert fi.shape == ti.shape and fi.dtype == torch.int64
        np.testing.assert_allclose(fs.numpy(), ts.numpy(), atol=1e-5)
        differ = fi != ti
        # float32 faiss may swap near-ties only; on random data there are none at 1e-5
        assert not bool(differ.any()) or bool(((ts - fs.double()).abs()[differ] < 1e-5).all())
        assert float(differ.double().mean()) < 0.01
    assert fast.neighbours(3, 4)[1].tolist() == exact.neighbours(3, 4)[1].tolist()
    assert not bool((fast.neighbours_of_all(5)[1] == torch.arange(200)[:, None]).any())
    labels = torch.arange(200) % 4
    preds = (torch.arange(200) // 3) % 4
    a = semantic_agreement(exact, labels, preds, m=4, among=labels != preds)
    b = semantic_agreement(fast, labels, preds, m=4, among=labels != preds)
    assert a == b


def test_faiss_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        SaliencyIndex(random_profiles(5, 3, seed=0), backend="faiss")


# -- semantic agreement ---------------------------------------------------------------------------


def clustered_case():
    """Profiles that cluster exactly by (true, predicted) pair: each pair its own axis plus a small,
    distinct offset; pairs (0,0)x3, (0,1)x3, (1,1)x4, (2,0)x3."""
    pairs = [(0, 0)] * 3 + [(0, 1)] * 3 + [(1, 1)] * 4 + [(2, 0)] * 3
    axis = {p: k for k, p in enumerate(dict.fromkeys(pairs))}
    g = torch.Generator().manual_seed(0)
    profiles = torch.zeros(len(pairs), 6, dtype=torch.float64)
    for i, p in enumerate(pairs):
        profiles[i, axis[p]] = 1.0
        profiles[i, 4:] = 0.05 * torch.rand(2, generator=g, dtype=torch.float64)
    labels = torch.tensor([p[0] for p in pairs])
    predictions = torch.tensor([p[1] for p in pairs])
    return profiles, labels, predictions


def test_semantic_agreement_hand_built():
    profiles, labels, predictions = clustered_case()
    result = semantic_agreement(SaliencyIndex(profiles), labels, predictions, m=2)
    assert isinstance(result, SemanticAgreement)
    assert result.same_class == 1.0 and result.same_pair == 1.0
    assert result.m == 2 and result.num_samples == 13
    # chance, by hand: class sizes 6, 4, 3 and pair sizes 3, 3, 4, 3 among 13 samples
    assert result.same_class_chance == pytest.approx((6 * 5 + 4 * 3 + 3 * 2) / (13 * 12), abs=1e-15)
    assert result.same_pair_chance == pytest.approx((3 * 2 + 3 * 2 + 4 * 3 + 3 * 2) / (13 * 12), abs=1e-15)
    # neighbours beyond the pair's cluster: m = 3 takes one sample of another pair for the 3-sample pairs
    wide = semantic_agreement(SaliencyIndex(profiles), labels, predictions, m=3)
    assert wide.same_pair == pytest.approx((9 * (2 / 3) + 4 * 1.0) / 13, abs=1e-15)
    # class 0 only: pairs (0,0)x3 and (0,1)x3; neighbours searched among those 6
    sub = semantic_agreement(SaliencyIndex(profiles), labels, predictions, m=2, among=labels == 0)
    assert (sub.same_class, sub.same_class_chance, sub.same_pair) == (1.0, 1.0, 1.0)
    assert sub.same_pair_chance == pytest.approx(2 / 5, abs=1e-15) and sub.num_samples == 6
    table = result.to_markdown()
    assert "100.0%" in table and f"{30 / 156:.1%}" in table and "true class" in table
    assert f"{156 / 30:.1f}×" in table


def test_semantic_agreement_random_against_loops():
    profiles = random_profiles(45, 10, seed=14)
    g = torch.Generator().manual_seed(15)
    labels = torch.randint(0, 3, (45,), generator=g)
    predictions = torch.randint(0, 3, (45,), generator=g)
    index = SaliencyIndex(profiles, labels=labels, predictions=predictions)
    for among in (None, labels != predictions):
        result = semantic_agreement(index, m=4, among=among)  # labels and predictions from the index
        expected = brute_agreement(profiles, labels, predictions, 4, among)
        got = (result.same_class, result.same_class_chance, result.same_pair, result.same_pair_chance)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
        assert result.num_samples == (45 if among is None else int(among.sum()))


# -- from_saliency and dataset_profiles on a small model -------------------------------------------


def test_from_saliency_stacks_standardized_profiles(fitted):
    model, ps, x, y = fitted
    index = SaliencyIndex.from_saliency(ps, loader(x, y, 7), progress=False)
    assert index.layout == ps.layout and len(index) == len(x)
    reference = ps.attribute(x, target=y)  # one batch: the index must not depend on the batching
    assert rel_err(index.profiles, reference) < 1e-10
    assert torch.equal(index.labels, y)
    with torch.no_grad():
        assert torch.equal(index.predictions, model(x).argmax(1))
    # 13 cuts the second batch of 7 one sample short
    raw = SaliencyIndex.from_saliency(ps, loader(x, y, 7), progress=False, standardize=False, max_samples=13)
    assert len(raw) == 13 and torch.equal(raw.labels, y[:13])
    assert rel_err(raw.profiles, ps.attribute(x[:13], target=y[:13], standardize=False)) < 1e-10
    assert ParameterSaliency(model).stats is None
    with pytest.raises(ValueError, match="ps.stats is None"):
        SaliencyIndex.from_saliency(ParameterSaliency(model), loader(x, y, 7), progress=False)


def test_dataset_profiles_against_a_per_sample_loop(fitted):
    model, ps, x, y = fitted
    model.train()  # dataset_profiles evaluates in eval mode and must restore the flag
    result = dataset_profiles(ps, loader(x, y, 7), progress=False)
    assert model.training
    raw_rows, z_rows, correct = [], [], []
    for i in range(len(x)):
        raw_rows.append(ps.attribute(x[i : i + 1], target=y[i : i + 1], standardize=False)[0])
        z_rows.append(ps.attribute(x[i : i + 1], target=y[i : i + 1])[0])
        model.eval()
        with torch.no_grad():
            correct.append(int(model(x[i : i + 1]).argmax()) == int(y[i]))
        model.train()
    raw, z, correct = torch.stack(raw_rows), torch.stack(z_rows), torch.tensor(correct)
    assert 0 < int(correct.sum()) < len(x), "the test needs both groups"
    assert isinstance(result, DatasetProfiles)
    assert (result.num_correct, result.num_misclassified) == (int(correct.sum()), int((~correct).sum()))
    assert rel_err(result.mean_raw_correct, raw[correct].mean(0)) < 1e-10
    assert rel_err(result.mean_raw_misclassified, raw[~correct].mean(0)) < 1e-10
    assert rel_err(result.mean_z_correct, z[correct].mean(0)) < 1e-10
    assert rel_err(result.mean_z_misclassified, z[~correct].mean(0)) < 1e-10
    assert result.mean_z_correct.dtype == torch.float64 and result.num_samples == len(x)
    # the table: one row per layer, the layer's mean of the group means
    table = result.to_markdown()
    for entry in ps.layout:
        value = float(z[~correct].mean(0)[entry.slice].mean())
        assert f"| {entry.name} | {entry.num_units} |" in table and f"{value:+.3f}" in table
    # max_samples stops early; standardize=False needs no statistics
    part = dataset_profiles(ParameterSaliency(model), loader(x, y, 7), progress=False, max_samples=17,
                            standardize=False)
    assert part.num_samples == 17 and part.mean_z_correct is None and not part.standardized
    assert rel_err(part.mean_raw_correct, raw[:17][correct[:17]].mean(0)) < 1e-10
    assert "mean saliency" in part.to_markdown()


def test_dataset_profiles_with_an_empty_group(fitted):
    model, ps, x, y = fitted
    with torch.no_grad():
        predicted = model(x).argmax(1)
    result = dataset_profiles(ps, [(x, predicted)], progress=False)  # every sample "correct"
    assert result.num_misclassified == 0 and result.mean_z_misclassified is None
    assert "—" in result.to_markdown()
    figure = result.plot()
    assert len(figure.axes[0].get_lines()) >= 1


def test_plot_is_a_labelled_png(fitted, tmp_path):
    _, ps, x, y = fitted
    result = dataset_profiles(ps, loader(x, y, 7), progress=False)
    figure = result.plot()
    path = tmp_path / "profiles.png"
    figure.savefig(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    raw_ax, z_ax = figure.axes
    assert "saliency" in raw_ax.get_ylabel() and "z" in z_ax.get_ylabel()
    assert "units" in z_ax.get_xlabel()
    for ax in (raw_ax, z_ax):
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
        assert any("misclassified" in t for t in labels) and any("correct" in t for t in labels)
        profile_lines = [line for line in ax.get_lines() if len(line.get_xdata()) == ps.layout.num_columns]
        assert len(profile_lines) == 2
    assert [t.get_text() for t in z_ax.get_xticklabels()] == list(ps.layout.names)
    # layer boundaries: one vertical line between each pair of consecutive layers
    vertical = [line for line in z_ax.get_lines() if len(set(line.get_xdata())) == 1]
    assert sorted(float(line.get_xdata()[0]) for line in vertical) == [e.slice.start - 0.5 for e in ps.layout][1:]
    # raw only: one panel
    raw_only = dataset_profiles(ps, loader(x, y, 7), progress=False, standardize=False).plot()
    assert len(raw_only.axes) == 1 and raw_only.axes[0].get_xlabel()


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "profiles, kwargs, error, match",
    [
        (torch.randn(5), {}, ValueError, "2-D"),
        (torch.randn(2, 3, 4), {}, ValueError, "2-D"),
        (torch.zeros(0, 4), {}, ValueError, "at least one sample"),
        (torch.tensor([[1.0, float("nan")], [1.0, 2.0]]), {}, ValueError, "NaN"),
        (torch.tensor([[1.0, 2.0], [float("inf"), 2.0]]), {}, ValueError, r"inf \(first in row 1\)"),
        (torch.randn(4, 3), {"backend": "annoy"}, ValueError, "unknown backend 'annoy'"),
        (torch.randn(4, 3), {"chunk_size": 0}, ValueError, "chunk_size"),
        (torch.randn(4, 3), {"layout": SaliencyLayout([("w", (2, 5), 2)])}, ValueError, "layout has 2 columns"),
        (torch.randn(4, 3), {"labels": torch.zeros(3, dtype=torch.long)}, ValueError, r"labels must have shape \(4,\)"),
        (torch.randn(4, 3), {"predictions": torch.zeros(4)}, ValueError, "integer"),
    ],
)
def test_bad_index_construction(profiles, kwargs, error, match):
    with pytest.raises(error, match=match):
        SaliencyIndex(profiles, **kwargs)


def test_bad_queries():
    index = SaliencyIndex(random_profiles(6, 4, seed=16))
    good = random_profiles(2, 4, seed=17)
    cases = [
        (lambda: index.search(good, 0), "m must be between 1 and 6"),
        (lambda: index.search(good, 7), "m must be between 1 and 6"),
        (lambda: index.search(good, True), "m must be an int"),
        (lambda: index.search(good, 6, exclude=torch.tensor([0, 1])), "between 1 and 5"),
        (lambda: index.neighbours(0, 6), "between 1 and 5"),
        (lambda: index.neighbours(0, 0), "between 1 and 5"),
        (lambda: index.neighbours_of_all(6), "between 1 and 5"),
        (lambda: index.search(random_profiles(2, 5, seed=0), 2), "width 5.*4 units"),
        (lambda: index.search(torch.randn(2, 2, 4), 2), "2-D"),
        (lambda: index.search(torch.tensor([[0.0, 1.0, float("nan"), 0.0]]), 2), "queries contain NaN"),
        (lambda: index.search(good, 2, exclude=torch.tensor([0, 1, 2])), r"exclude must be \(2,\)"),
        (lambda: index.search(good, 2, exclude=torch.tensor([0, 6])), "index 6"),
        (lambda: index.search(good, 2, exclude=torch.tensor([0.0, 1.0])), "integer"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(IndexError, match="out of range"):
        index.neighbours(6, 2)


def test_bad_agreement_arguments():
    profiles, labels, predictions = clustered_case()
    index = SaliencyIndex(profiles)
    with pytest.raises(ValueError, match="needs labels"):
        semantic_agreement(index, m=2)
    with pytest.raises(ValueError, match="needs predictions"):
        semantic_agreement(index, labels, m=2)
    with pytest.raises(ValueError, match=r"predictions must have shape \(13,\)"):
        semantic_agreement(index, labels, predictions[:5], m=2)
    with pytest.raises(ValueError, match="boolean mask"):
        semantic_agreement(index, labels, predictions, m=2, among=torch.arange(13))
    with pytest.raises(ValueError, match="m must be between 1 and 12"):
        semantic_agreement(index, labels, predictions, m=13)
    with pytest.raises(ValueError, match="m must be between 1 and 2"):
        semantic_agreement(index, labels, predictions, m=3, among=labels == 2)
    with pytest.raises(ValueError, match="at least 2 samples"):
        semantic_agreement(index, labels, predictions, m=1, among=torch.arange(13) == 0)
    with pytest.raises(TypeError, match="SaliencyIndex"):
        semantic_agreement(profiles, labels, predictions)


def test_bad_data(fitted):
    model, ps, x, y = fitted
    with pytest.raises(ValueError, match="ps.stats is None"):
        dataset_profiles(ParameterSaliency(model), loader(x, y, 7), progress=False)
    with pytest.raises(ValueError, match=r"batch 0 of data is a Tensor"):
        dataset_profiles(ps, [x], progress=False)
    with pytest.raises(ValueError, match=r"labels of batch 1 must be one class per sample"):
        dataset_profiles(ps, [(x[:3], y[:3]), (x[3:6], y[3:5])], progress=False)
    with pytest.raises(ValueError, match="integer class indices"):
        dataset_profiles(ps, [(x[:3], y[:3].double())], progress=False)
    with pytest.raises(ValueError, match="max_samples"):
        dataset_profiles(ps, loader(x, y, 7), progress=False, max_samples=0)
    with pytest.raises(ValueError, match="data is empty"):
        dataset_profiles(ps, [], progress=False)
    with pytest.raises(ValueError, match="data is empty"):
        SaliencyIndex.from_saliency(ps, [], progress=False)
    with pytest.raises(ValueError, match="unknown backend"):
        SaliencyIndex.from_saliency(ps, loader(x, y, 7), progress=False, backend="hnsw")
    with pytest.raises(ValueError, match=r"\(batch, classes\)"):
        flat = ParameterSaliency(nn.Sequential(nn.Flatten(), nn.Linear(64, 1), nn.Flatten(0)).double(),
                                 loss_fn=lambda out, target: (out - target) ** 2)
        dataset_profiles(flat, [(x[:3], y[:3])], progress=False, standardize=False)
