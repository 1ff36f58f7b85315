"""``show_progress`` of ``attribute`` / ``profile``: a tqdm bar over the samples, chunk by chunk of
``internal_batch_size``; by default only where the batch is cut and the call runs past the delay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import captum_paramsal._core.parameter_space_attribution as base
from captum_paramsal import ParameterGuidedInputSaliency, ParameterSaliency


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return model, torch.randn(10, 4), torch.randint(0, 3, (10,))


def bar_of(capsys) -> str:
    return capsys.readouterr().err


def test_a_bar_over_the_chunks_when_asked_or_when_the_call_is_long(setup, capsys, monkeypatch):
    model, x, y = setup
    ps = ParameterSaliency(model)
    whole = ps.attribute(x, target=y)
    assert bar_of(capsys) == ""  # one chunk, a quick call: nothing
    chunked = ps.attribute(x, target=y, internal_batch_size=4)
    assert bar_of(capsys) == ""  # chunks, but done before the delay
    assert torch.allclose(chunked, whole, rtol=1e-6, atol=0)
    ps.attribute(x, target=y, internal_batch_size=4, show_progress=True)
    shown = bar_of(capsys)
    assert "ParameterSaliency" in shown and "10/10" in shown and "sample" in shown
    monkeypatch.setattr(base, "PROGRESS_DELAY", 0.0)  # a call past the delay
    ps.profile(x, target=y, internal_batch_size=4)
    assert "10/10" in bar_of(capsys)
    ps.attribute(x, target=y, internal_batch_size=4, show_progress=False)
    ps.attribute(x, target=y)  # one chunk: no bar by default, whatever the time
    assert bar_of(capsys) == ""
    pgis = ParameterGuidedInputSaliency(model, k=2, parameter_saliency=ps)
    pgis.attribute(x, target=y, internal_batch_size=3)
    assert "ParameterGuidedInputSaliency" in bar_of(capsys)


def test_fit_stats_keeps_its_own_bar_only(setup, capsys, monkeypatch):
    model, x, y = setup
    monkeypatch.setattr(base, "PROGRESS_DELAY", 0.0)
    ps = ParameterSaliency(model)
    ps.fit_stats([(x, y)], progress=False, internal_batch_size=4)
    assert bar_of(capsys) == ""  # the per-batch passes show none of their own


def test_the_report_shows_its_steps_when_asked(tmp_path, capsys):
    from captum_paramsal.html_report import write_report

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 3))
    x, y = torch.rand(10, 1, 4, 4), torch.randint(0, 3, (10,))
    ps = ParameterSaliency(model)
    write_report(model, ps, x, y, str(tmp_path / "r"), max_samples=2, k=2, pruning_ks=(1, 2), progress=True,
                 low_percentile=50.0)
    shown = bar_of(capsys)
    assert "report" in shown and "6/6" in shown
    write_report(model, ps, x, y, str(tmp_path / "q"), max_samples=2, k=2, pruning_ks=(1, 2), progress=False,
                 low_percentile=50.0)
    assert "report" not in bar_of(capsys)
