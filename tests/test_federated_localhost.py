"""The federation on real processes on 127.0.0.1 (a SuperLink, two SuperNodes, ``flwr run``; no
simulation engine): it finishes, its results are whole, the library's byte count sits just
below Flower's own traffic count, and nothing it started is left running. Plus the pieces that
need no processes."""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("flwr", reason="the fl extra (Flower) is not installed")
psutil = pytest.importorskip("psutil", reason="the fl extra (psutil) is not installed")

from captum_paramsal.federated.deployed_app import settings  # noqa: E402
from captum_paramsal.federated.localhost import alive, executables, run_localhost, traffic_comparison  # noqa: E402


def test_settings_fill_defaults_cast_and_reject_unknown_keys():
    values = settings({"rho": 1, "rounds": 2.0, "method": "fedavg"})
    assert values["rho"] == 1.0 and isinstance(values["rho"], float)
    assert values["rounds"] == 2 and isinstance(values["rounds"], int)
    assert values["num-clients"] == 2 and values["out"] == ""
    with pytest.raises(ValueError, match="num-client"):
        settings({"num-client": 3})


def test_traffic_comparison_overhead_per_message():
    results = {"rounds": [{"bytes-down": [100, 100], "bytes-up": [40, 30]}],
               "messages": {"down": {"messages": 2, "arrays": 4, "array-bytes": 200, "record-bytes": 260},
                            "up": {"messages": 2, "arrays": 2, "array-bytes": 70, "record-bytes": 90}}}
    traffic = traffic_comparison(results, {"outbound-bytes": 600, "inbound-bytes": 270, "total-bytes": 870})
    assert traffic["library"] == {"down": 200, "up": 70, "total": 270}
    assert traffic["flower"]["total"] == 870
    assert traffic["ratio"]["down"] == pytest.approx(3.0)
    assert traffic["overhead-per-message"]["up"] == pytest.approx(100.0)
    assert traffic["overhead-per-array"]["down"] == pytest.approx(100.0)
    assert traffic["rounds-library"] == {"down": 200, "up": 70}


@pytest.mark.slow
def test_two_supernodes_one_round_on_localhost(tmp_path):
    try:
        executables()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    lines: list = []
    started = time.perf_counter()
    report = run_localhost(clients=2, rounds=1, method="saliency", rho=0.3, timeout=240,
                           json_path=str(tmp_path / "report.json"), echo=lines.append, base_dir=str(tmp_path))
    seconds = time.perf_counter() - started
    log = "\n".join(lines)

    assert report["run"]["status"] == "finished:completed", log
    results = report["results"]
    assert "error" not in results, results["error"]
    (round_,) = results["rounds"]
    assert len(round_["bytes-down"]) == 2 and len(round_["bytes-up"]) == 2, log
    assert all(b > 0 for b in round_["bytes-down"] + round_["bytes-up"])
    assert round_["rejected"] == []
    assert 0.0 <= results["final-accuracy"] <= 1.0
    assert len(results["final-client-accuracy"]) == 2
    # rho = 0.3: the reply carries a fraction of what the dense downlink does
    assert sum(round_["bytes-up"]) < sum(round_["bytes-down"])

    traffic = report["traffic"]
    assert traffic["messages"] == {"down": 4, "up": 4, "total": 8}  # train and the final evaluation, each client
    assert traffic["rounds-library"]["down"] == sum(round_["bytes-down"])
    assert traffic["arrays"]["down"] > traffic["messages"]["down"] and traffic["arrays"]["up"] > 0
    for direction in ("down", "up", "total"):
        # Flower's count adds the protocol (metadata, object ids, Array headers, other records) per message
        assert 0 < traffic["library"][direction] < traffic["flower"][direction], traffic
        assert traffic["ratio"][direction] < 1.5, traffic
        assert 0 < traffic["overhead-per-message"][direction] < 50_000, traffic
    assert "Flower network-traffic" in log and "started superlink" in log

    processes = report["processes"]
    assert len(processes) >= 3  # the SuperLink, the SuperNodes, and their children seen during the run
    assert alive(processes) == [], log
    for record in processes:
        if psutil.pid_exists(record["pid"]):  # only a zombie awaiting its reaper, or another process by now
            p = psutil.Process(record["pid"])
            assert (p.status() == psutil.STATUS_ZOMBIE or record["create-time"] is None
                    or abs(p.create_time() - record["create-time"]) > 0.01), record
    assert not os.path.exists(report["temp-dir"])
    assert os.path.exists(tmp_path / "report.json")
    print(f"localhost deployment: {seconds:.1f} s\n{log}")
