"""The federated experiment (python -m captum_paramsal.experiments.federated) in its quick mode,
end to end into a temporary folder: one Flower simulation of six federations (5 clients,
5 rounds), the raw JSON, the figure and the RESULTS.md section, and the section written again
from the JSON alone."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("flwr")

from captum_paramsal.experiments import federated  # noqa: E402


@pytest.mark.slow
def test_federated_quick(tmp_path, capsys):
    # Ray's state in a folder of its own under /tmp (simulate's default), not tmp_path: a pytest run beside
    # this one may rotate this session's basetemp away, and Ray waits forever on a vanished session folder
    text = federated.run(str(tmp_path), quick=True)
    err = capsys.readouterr().err
    setting = federated.QUICK
    n = len(federated.planned(setting))
    assert f"federation 1 of {n}" in err and f"federation {n} of {n}" in err and "elapsed" in err

    results = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- begin: federated -->" in results and text.strip() in results
    assert "| method | MB/round down | MB/round up | rounds to 80%" in text
    assert "Saliency selection against SPATL (L2) selection at equal bytes" in text
    assert "Saliency selection against random selection at equal bytes" in text
    assert "The paper's shapes" in text and "SPATL's down + up per round" in text
    assert (tmp_path / "figures" / federated.FIGURE).read_bytes()[:4] == b"\x89PNG"

    payload = json.loads((tmp_path / federated.RAW).read_text())
    runs = payload["runs"]
    assert len(runs) == n and payload["quick"] is True
    for run in runs:
        assert len(run["rounds"]) == setting.rounds
        curve = federated.accuracy_curve(run)
        assert all(0.0 <= a <= 1.0 for a in curve), (run["name"], curve)
        assert all(0.0 <= a <= 1.0 for r in run["rounds"] for a in r["client_accuracy_received"])
        assert not any(r["rejected"] for r in run["rounds"])
        assert all(len(r["bytes_up"]) == len(r["bytes_down"]) == setting.clients for r in run["rounds"])
    by = {(r["method"], r["rho"]): r for r in runs}
    _, fedavg_up = federated.megabytes(by[("fedavg", 1.0)])
    for method in ("spatl-l2", "saliency", "random"):
        down, up = federated.megabytes(by[(method, 0.1)])
        assert max(up) < min(fedavg_up) / 3, method  # a tenth of the units (and their variate's change)
        assert federated.cumulative_megabytes(by[(method, 0.1)]) == federated.cumulative_megabytes(
            by[("saliency", 0.1)]), "equal rho must mean equal bytes"
    # the same initial model for every method: the same accuracy before round 1
    assert len({federated.accuracy_curve(r)[0] for r in runs}) == 1
    # FedAvg learns the digits in 5 rounds; the selection methods send a tenth and stay sane
    assert by[("fedavg", 1.0)]["final_accuracy"] > 0.8
    assert all(not math.isnan(r["final_accuracy"]) for r in runs)

    # the section and figure again from the raw results alone, without Flower
    (tmp_path / "RESULTS.md").unlink()
    again = federated.run(str(tmp_path), from_json=str(tmp_path / federated.RAW))
    assert again == text
    assert again.strip() in (tmp_path / "RESULTS.md").read_text()
