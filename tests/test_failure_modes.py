"""The failure-modes experiment: its verdict rule, and a quick end-to-end run that writes its
section of RESULTS.md with tables consistent with themselves."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from captum_paramsal.analysis.intervals import Estimate
from captum_paramsal.experiments import failure_modes


def _result(held_out: int, lows: dict) -> SimpleNamespace:
    differences = {name: {"fix_held_out": Estimate(low + 0.1, low, low + 0.2, held_out)} for name, low in lows.items()}
    return SimpleNamespace(num_held_out=held_out, differences=differences)


def test_the_verdict_rule():
    assert failure_modes._verdict(_result(50, {"random": 0.1, "gradient": 0.05})) == ("holds", ["random", "gradient"])
    assert failure_modes._verdict(_result(50, {"random": 0.1, "gradient": -0.2})) == ("weaker", ["random"])
    assert failure_modes._verdict(_result(50, {"random": -0.1, "gradient": -0.2})) == ("does not hold", [])
    verdict, _ = failure_modes._verdict(_result(failure_modes.MIN_HELD_OUT - 1, {"random": 0.5}))
    assert verdict == "too few held-out samples to tell"


@pytest.mark.slow
def test_failure_modes_quick(tmp_path):
    text = failure_modes.run(str(tmp_path), quick=True)
    written = (tmp_path / "RESULTS.md").read_text()
    assert text.strip() in written and "<!-- begin: failure modes -->" in written
    for name in ("error_group_digits.png", "repair_digits.png", "error_group_trojan.png", "repair_trojan.png"):
        assert (tmp_path / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    assert "Quick mode" in text
    # the trojan's source table: each row's counts add up to the group's size, and the share of
    # triggered samples in their own trigger's group is the one stated
    table = text.split("What the groups' samples carry")[1].split("**Claim")[0]
    rows = [[int(c) for c in line.strip("|").split("|")] for line in table.splitlines()
            if re.match(r"^\| \d", line)]
    assert rows
    together = triggered = 0
    for _group, size, clean, *per_trigger in rows:
        assert clean + sum(per_trigger) == size
        counts = [clean, *per_trigger]
        dominant = counts.index(max(counts)) - 1  # -1: no trigger
        for t, n in enumerate(per_trigger):
            triggered += n
            together += n if dominant == t else 0
    stated = re.search(r"(\d+)% of the\s+misclassified triggered samples", text)
    assert stated and int(stated.group(1)) == round(100 * together / max(triggered, 1))
    # every repair row carries intervals, and every verdict is one of the four
    assert text.count("| trojan 0 | turn_off | culprits |") == 1
    verdicts = re.findall(r"group \d+, (?:turn off|finetune): \*\*([a-z \-]+)\*\*", text)
    assert verdicts and set(verdicts) <= {"holds", "weaker", "does not hold", "too few held-out samples to tell"}
