"""Standardization statistics (SPEC §2): exactness, merging, processes, files, pictures."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from safetensors.torch import save_file

from captum_paramsal import ParameterSaliency, SaliencyProfile, SaliencyStats
from captum_paramsal.stats import STD_FLOOR

from helpers import loader, small_cnn, small_data
from naive import naive_unit_saliency, rel_err


def test_stats_match_numpy_of_naive_saliency():
    model, (x, y) = small_cnn(), small_data(37)
    ps = ParameterSaliency(model)
    stats = ps.fit_stats(loader(x, y, 6), progress=False)
    naive = naive_unit_saliency(model, (x,), y, list(ps.layout.names)).numpy()
    assert stats.count == len(x)
    assert rel_err(stats.mean, torch.from_numpy(naive.mean(0))) < 1e-10
    assert rel_err(stats.std, torch.from_numpy(naive.std(0, ddof=1))) < 1e-10
    assert stats.mean.dtype == torch.float64


def test_partial_fit_and_merge_equal_one_pass():
    model, (x, y) = small_cnn(), small_data(37)
    ps = ParameterSaliency(model)
    one = ps.fit_stats(loader(x, y, batch_size=len(x)), progress=False)
    first = ps.fit_stats(loader(x[:11], y[:11], 4), progress=False)
    second = ps.fit_stats(loader(x[11:], y[11:], 5), progress=False)
    merged = first.merge(second)
    resumed = SaliencyStats.empty(ps.layout, ps.reduction, ps.loss_name)
    for start in range(0, len(x), 3):  # a resumed run, batch by batch
        resumed.partial_fit(ps.attribute(x[start:start + 3], target=y[start:start + 3]))
    for candidate in (merged, resumed):
        assert candidate.count == one.count
        assert rel_err(candidate.mean, one.mean) < 1e-10
        assert rel_err(candidate.std, one.std) < 1e-10


def test_max_samples_and_bad_data():
    model, (x, y) = small_cnn(), small_data(37)
    ps = ParameterSaliency(model)
    assert ps.fit_stats(loader(x, y, 6), progress=False, max_samples=10).count == 10
    with pytest.raises(ValueError, match="no samples"):
        ps.fit_stats([], progress=False)
    with pytest.raises(ValueError, match=r"\(inputs, labels\) pair"):
        ps.fit_stats([x], progress=False)
    with pytest.raises(ValueError, match="max_samples"):
        ps.fit_stats(loader(x, y, 6), progress=False, max_samples=0)


def test_standardized_attribute_and_dead_units():
    model, (x, y) = small_cnn(), small_data(37)
    ps = ParameterSaliency(model)
    stats = ps.fit_stats(loader(x, y, 6), progress=False)
    raw = ps.attribute(x[:4], target=y[:4])
    ps.stats = stats
    z = ps.attribute(x[:4], target=y[:4])
    assert torch.allclose(z, (raw - stats.mean) / stats.std, rtol=1e-12, atol=0)
    assert torch.equal(ps.attribute(x[:4], target=y[:4], standardize=False), raw)
    # a unit that never varies is divided by 1, not by ~0: its z is 0 (up to the rounding
    # of its mean), never inf; a dead unit (always 0) is exactly 0
    const = SaliencyStats.empty(ps.layout, ps.reduction, ps.loss_name)
    profile = raw[:1].clone()
    profile[0, 0] = 0.0
    const.partial_fit(profile.repeat(3, 1))
    assert bool((const.std <= STD_FLOOR).all())
    z_const = const.standardize(profile)
    assert bool(torch.isfinite(z_const).all()) and float(z_const.abs().max()) < 1e-15
    assert float(z_const[0, 0]) == 0.0
    assert ParameterSaliency(model, stats=stats).attribute(x[:4], target=y[:4]).shape == raw.shape


def test_statistics_of_another_model_or_setting_are_refused():
    model, (x, y) = small_cnn(), small_data(37)
    stats = ParameterSaliency(model).fit_stats(loader(x, y, 6), progress=False)
    other = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(3 * 6 * 6, 5)).double()
    with pytest.raises(ValueError, match="another model"):
        ParameterSaliency(other, stats=stats)
    with pytest.raises(ValueError, match="fingerprint"):
        ParameterSaliency(model, reduction="mean", stats=stats)
    with pytest.raises(ValueError, match="fingerprint"):
        ParameterSaliency(model, params=["0.weight"], stats=stats)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model, (x, y) = small_cnn(), small_data(37)
    stats = ParameterSaliency(model).fit_stats(loader(x, y, 6), progress=False)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    back = SaliencyStats.load(path)
    assert torch.equal(back.mean, stats.mean) and torch.equal(back.std, stats.std)
    assert back.count == stats.count and back.fingerprint == stats.fingerprint
    assert back.layout == stats.layout and back.reduction == stats.reduction and back.loss == stats.loss
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]  # no temporary left behind
    assert b"pickle" not in path.read_bytes() and path.read_bytes()[8:9] == b"{"


def test_bad_files_give_clear_errors(tmp_path):
    model, (x, y) = small_cnn(), small_data(37)
    stats = ParameterSaliency(model).fit_stats(loader(x, y, 6), progress=False)
    good = tmp_path / "good.safetensors"
    stats.save(good)
    payload = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        SaliencyStats.load(truncated)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(300))
    with pytest.raises(ValueError, match="corrupted or truncated"):
        SaliencyStats.load(garbage)

    foreign = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    with pytest.raises(ValueError, match="not captum-paramsal saliency statistics"):
        SaliencyStats.load(foreign)

    with pytest.raises(FileNotFoundError, match="no statistics file"):
        SaliencyStats.load(tmp_path / "missing.safetensors")

    edited = tmp_path / "edited.safetensors"
    tensors = {"count": torch.tensor(3), "mean": stats.mean, "m2": stats.mean.clone()}
    save_file(tensors, str(edited), metadata={
        "format": "captum-paramsal/saliency-stats", "format_version": "1", "fingerprint": "0" * 16,
        "reduction": "mean_abs", "loss": "cross_entropy",
        "layout": '[["0.weight", [4, 1, 3, 3], 4]]',
    })
    with pytest.raises(ValueError):
        SaliencyStats.load(edited)

    future = tmp_path / "future.safetensors"
    save_file(tensors, str(future), metadata={"format": "captum-paramsal/saliency-stats", "format_version": "99"})
    with pytest.raises(ValueError, match="format version"):
        SaliencyStats.load(future)


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, (x, y) = small_cnn(), small_data(37)
        stats = ParameterSaliency(model).fit_stats(loader(x, y, 5), progress=False)
        stats.save(os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model, (x, y) = small_cnn(), small_data(37)
    one = ParameterSaliency(model).fit_stats(loader(x, y, 5), progress=False)
    ranks = [SaliencyStats.load(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    assert torch.equal(ranks[0].mean, ranks[1].mean) and torch.equal(ranks[0].std, ranks[1].std)
    for stats in ranks:
        assert stats.count == one.count
        assert rel_err(stats.mean, one.mean) < 1e-10
        assert rel_err(stats.std, one.std) < 1e-10


def _png_axes_labels(figure):
    ax = figure.axes[0]
    return ax.get_xlabel(), ax.get_ylabel()


def test_profile_views_and_plots(tmp_path):
    model, (x, y) = small_cnn(), small_data(37)
    ps = ParameterSaliency(model)
    ps.stats = ps.fit_stats(loader(x, y, 6), progress=False)
    prof = ps.profile(x[:3], target=y[:3])
    assert isinstance(prof, SaliencyProfile) and prof.standardized
    assert torch.equal(prof.values, ps.attribute(x[:3], target=y[:3]))
    top = prof.top_k(4)
    values = prof.values.numpy()
    for sample, rows in enumerate(top):
        assert [r.value for r in rows] == pytest.approx(sorted(values[sample], reverse=True)[:4])
        for r in rows:
            assert ps.layout.column(r.param, r.unit) == r.column
    bottom = prof.top_k(2, largest=False)[0]
    assert bottom[0].value == pytest.approx(values[0].min())
    layer_max = prof.by_layer("max")
    layer_mean = prof.by_layer("mean")
    for i, entry in enumerate(ps.layout):
        assert np.allclose(layer_max[:, i].numpy(), values[:, entry.slice].max(1))
        assert np.allclose(layer_mean[:, i].numpy(), values[:, entry.slice].mean(1))
    records = prof.to_records()
    assert len(records) == 3 * ps.layout.num_columns
    assert records[5]["value"] == pytest.approx(float(values[0, 5]))
    for name, figure in (("profile", prof.plot(1, k=3)), ("top", prof.plot_top_k(2, k=4))):
        xlabel, ylabel = _png_axes_labels(figure)
        assert xlabel and ylabel
        path = tmp_path / f"{name}.png"
        figure.savefig(path)
        assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(IndexError):
        prof.plot(5)
    with pytest.raises(ValueError, match="k must be"):
        prof.top_k(0)
    with pytest.raises(ValueError, match="reduce"):
        prof.by_layer("median")


def test_the_probe_runs_once_per_input_signature(monkeypatch):
    import captum_paramsal.per_sample.routing as routing

    calls = []
    real_route = routing.route

    def counting_route(*args, **kwargs):
        calls.append(args[2][0].shape)
        return real_route(*args, **kwargs)

    monkeypatch.setattr(routing, "route", counting_route)
    model, (x, y) = small_cnn(), small_data(20)
    ps = ParameterSaliency(model)
    stats = ps.fit_stats(loader(x, y, 6), progress=False)  # batches of 6, 6, 6, 2
    assert len(calls) == 1 and stats.count == 20
    expected = naive_unit_saliency(model, (x,), y, list(ps.layout.names))
    assert torch.allclose(stats.mean, expected.mean(0), rtol=1e-10, atol=0)
    got = ps.attribute(x[:3], target=y[:3])
    assert len(calls) == 1  # same signature (the batch size does not count): cached
    assert rel_err(got, expected[:3]) < 1e-10
    ParameterSaliency(model).attribute(x[:3], target=y[:3])
    assert len(calls) == 2  # the cache belongs to one ParameterSaliency

    torch.manual_seed(0)
    pooled = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5)
    ).double()
    ps = ParameterSaliency(pooled)
    for size, probes in [(8, 3), (6, 4), (8, 4), (6, 4)]:  # another image size: probed once more
        got = ps.attribute(x[:3, :, :size, :size], target=y[:3])
        assert len(calls) == probes
        expected = naive_unit_saliency(pooled, (x[:3, :, :size, :size],), y[:3], list(ps.layout.names))
        assert rel_err(got, expected) < 1e-10
