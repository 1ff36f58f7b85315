"""From single mistakes to failure modes, measured with controls, on the embedded digits CNN and
on the SPADE benchmark's trojaned ResNet-20.

``python -m captum_paramsal.experiments.failure_modes [--out docs] [--quick]`` writes the section
"failure modes" of ``docs/RESULTS.md`` and its figures under ``docs/figures/``:

- error groups (:func:`~captum_paramsal.analysis.error_groups`) of each model's misclassified
  samples; on the trojaned network the errors include test images carrying each of the three
  planted triggers, so whether the groups recover the triggers is checked against the truth;
- verified repair (:func:`~captum_paramsal.analysis.repair`) of the largest groups, by turning
  off and by fine-tuning their culprits, against random, mean-|grad| and weight-magnitude
  controls, each rate with its 95% bootstrap interval, on held-out samples;
- the paper's neighbour-correction test with its controls on the trojaned network's clean
  errors (the digits CNN's is in the section "reproduce").

Groups are found on one half of each test set and repairs are measured on the other half.
Deterministic; 49 minutes on 2 CPU cores under load from other jobs, most of it the fine-tuning
repairs of the ResNet-20 and their random controls (``--quick``: about a minute, fewer samples,
not for reading).
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .results_markdown import section_command, write_section

#: units edited by each repair
K = 5
#: fewer held-out samples of a group's pairs than this, and a repair's verdict is not told
MIN_HELD_OUT = 10


def _verdict(result: Any, rate: str = "fix_held_out") -> Tuple[str, List[str]]:
    """Holds when the culprits beat every control on ``rate`` (paired interval above 0), weaker
    when they beat some, does not hold when none; untold on too few held-out samples."""
    if result.num_held_out < MIN_HELD_OUT:
        return "too few held-out samples to tell", []
    differences = result.differences
    beaten = [name for name, d in differences.items() if d[rate].n > 0 and d[rate].low > 0]
    if beaten and len(beaten) == len(differences):
        return "holds", beaten
    return ("weaker", beaten) if beaten else ("does not hold", beaten)


def _repairs_run(groups: Sequence[Any], results: Dict[Tuple[int, str], Any]) -> Iterator[Tuple[Any, str, Any]]:
    """``(group, method, repair result)`` of every repair that ran, groups first, turn-off before fine-tune."""
    for g in groups:
        for method in ("turn_off", "finetune"):
            r = results.get((g.id, method))
            if r is not None:
                yield g, method, r


def _repair_rows(name: str, groups: Sequence[Any], results: Dict[Tuple[int, str], Any]) -> List[str]:
    rows = []
    for g, method, r in _repairs_run(groups, results):
        for unit_choice, row in r.rows.items():
            diff = r.differences.get(unit_choice, {}).get("fix_held_out")
            harm = r.differences.get(unit_choice, {}).get("collateral")
            rows.append(
                f"| {name} {g.id} | {method} | {unit_choice} | {row.fix_group.format(percent=True)} | "
                f"{row.fix_held_out.format(percent=True)} (n={r.num_held_out}) | "
                f"{row.collateral.format(percent=True)} | "
                f"{'—' if diff is None else diff.format(percent=True, signed=True)} | "
                f"{'—' if harm is None else harm.format(percent=True, signed=True)} |"
            )
    return rows


REPAIR_HEADER = (
    "| group | edit | units | fixed in the group | fixed, held-out same pairs | collateral damage "
    "| culprits − this, held-out fixed | culprits − this, collateral |\n|---|---|---|---:|---:|---:|---:|---:|"
)


def _repair_verdicts(label: str, groups: Sequence[Any], results: Dict[Tuple[int, str], Any]) -> List[str]:
    lines = []
    for g, method, r in _repairs_run(groups, results):
        verdict, beaten = _verdict(r)
        culprits = r.rows["culprits"]
        lines.append(
            f"- {label} group {g.id}, {method.replace('_', ' ')}: **{verdict}** "
            f"(culprits fix {culprits.fix_held_out.format(percent=True)} of {r.num_held_out} held-out samples "
            f"of the group's pairs, collateral {culprits.collateral.format(percent=True)}; beats "
            + (", ".join(beaten) if beaten else "no control") + ")."
        )
    return lines


def _trojan_sets(data: Any, half: int, per_trigger: Tuple[int, int]) -> Tuple[Tensor, ...]:
    """Clean test images of each half plus triggered ones (first ``per_trigger`` of each half),
    and which trigger each carries (-1: none)."""
    a_x, a_y, a_t = [data.test_images[:half]], [data.test_labels[:half]], [torch.full((half,), -1)]
    rest = data.test_images.shape[0] - half
    b_x, b_y, b_t = [data.test_images[half:]], [data.test_labels[half:]], [torch.full((rest,), -1)]
    for trigger in range(len(data.setup.targets)):
        x, _, _, label = data.triggered_test(trigger)[:4]
        positions = (data.test_labels != data.setup.targets[trigger]).nonzero().flatten()
        first = positions < half
        take_a, take_b = per_trigger
        a_x.append(x[first][:take_a])
        a_y.append(label[first][:take_a])
        a_t.append(torch.full((len(a_y[-1]),), trigger))
        b_x.append(x[~first][:take_b])
        b_y.append(label[~first][:take_b])
        b_t.append(torch.full((len(b_y[-1]),), trigger))
    return (torch.cat(a_x), torch.cat(a_y), torch.cat(a_t), torch.cat(b_x), torch.cat(b_y), torch.cat(b_t))


def _batches(x: Tensor, y: Tensor, size: int = 256) -> List[Tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def _sources_table(groups: Any, trigger_of: Tensor, targets: Sequence[int]) -> Tuple[str, float]:
    """Group × what its samples carry (no trigger, trigger t): counts, and the share of triggered
    samples that sit in the group dominated by their own trigger."""
    names = ["no trigger"] + [f"trigger {t} (→{target})" for t, target in enumerate(targets)]
    lines = ["| group | samples | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
    dominant: Dict[int, int] = {}
    for g in groups:
        carried = trigger_of[g.indices]
        counts = Counter(carried.tolist())
        dominant[g.id] = max(counts, key=counts.get)
        lines.append(f"| {g.id} | {len(g)} | " + " | ".join(str(counts.get(t, 0)) for t in range(-1, len(targets)))
                     + " |")
    triggered = together = 0
    for g in groups:
        carried = trigger_of[g.indices]
        for t in carried.tolist():
            if t >= 0:
                triggered += 1
                together += int(dominant[g.id] == t)
    return "\n".join(lines), together / max(triggered, 1)


def run(out_dir: str = "docs", quick: bool = False) -> str:
    from .._core.parameter_saliency import ParameterSaliency
    from ..analysis import error_groups, neighbour_correction, repair
    from ..zoo import load_digits_model
    from ..zoo.trojan_digits import load_trojan_resnet

    started = time.perf_counter()
    torch.manual_seed(0)
    figures = os.path.join(out_dir, "figures")
    os.makedirs(figures, exist_ok=True)
    draws = 1 if quick else 10
    finetune_steps = 5 if quick else 100
    repaired_groups = 1 if quick else 4

    # -- the digits CNN: groups on the first half of the test digits, repairs on the second --------
    model, stats, data = load_digits_model()
    x, y = data.test_set()
    half = x.shape[0] // 2
    ps = ParameterSaliency(model, stats=stats)
    digit_groups = error_groups(ps, (x[:half], y[:half]), progress=False)
    digit_results: Dict[Tuple[int, str], Any] = {}
    digit_repaired = list(digit_groups)[:repaired_groups]
    for g in digit_repaired:
        for method in ("turn_off", "finetune"):
            digit_results[(g.id, method)] = repair(
                model, ps, g, (x[half:], y[half:]), method=method, k=K, random_draws=draws, lr=1e-3,
                max_steps=finetune_steps, seed=0,
            )
    digit_groups[0].plot().savefig(os.path.join(figures, "error_group_digits.png"), dpi=90)
    digit_results[(digit_groups[0].id, "turn_off")].plot().savefig(
        os.path.join(figures, "repair_digits.png"), dpi=100)
    print(f"digits: {time.perf_counter() - started:.0f} s", file=sys.stderr)

    # -- the trojaned ResNet-20 ------------------------------------------------------------------------
    trojan, tdata = load_trojan_resnet()
    tps = ParameterSaliency(trojan)
    clean = tdata.train_trigger == -1
    reference = 100 if quick else 1000
    tps.stats = tps.fit_stats(_batches(tdata.train_images[clean][:reference], tdata.train_labels[clean][:reference]),
                              progress=False)
    test_half = 300 if quick else 1000
    per_trigger = (8, 10) if quick else (60, 200)
    xa, ya, ta, xb, yb, tb = _trojan_sets(tdata, test_half, per_trigger)
    if quick:
        xb, yb, tb = xb[-150:], yb[-150:], tb[-150:]
    trojan_groups = error_groups(tps, _batches(xa, ya), progress=False)
    sources, recovered = _sources_table(trojan_groups, ta, tdata.setup.targets)
    trojan_results: Dict[Tuple[int, str], Any] = {}
    trojan_repaired = list(trojan_groups)[:repaired_groups]
    for g in trojan_repaired:
        for method in ("turn_off", "finetune"):
            trojan_results[(g.id, method)] = repair(
                trojan, tps, g, (xb, yb), method=method, k=K, random_draws=draws, lr=1e-3,
                max_steps=finetune_steps, seed=0,
            )
            print(f"trojan group {g.id}, {method}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    trojan_groups[0].plot().savefig(os.path.join(figures, "error_group_trojan.png"), dpi=90)
    trojan_results[(trojan_groups[0].id, "turn_off")].plot().savefig(
        os.path.join(figures, "repair_trojan.png"), dpi=100)
    print(f"trojan groups and repairs: {time.perf_counter() - started:.0f} s", file=sys.stderr)

    # -- the paper's neighbour test on the trojaned network's clean errors ----------------------------
    clean_x, clean_y = xa[ta == -1], ya[ta == -1]
    correction = neighbour_correction(trojan, tps, clean_x, clean_y, k=25, m=5, lr=1e-3, max_steps=finetune_steps,
                                      seed=0, max_samples=2 if quick else 30)
    elapsed = time.perf_counter() - started
    print(f"all: {elapsed:.0f} s", file=sys.stderr)

    text = _section(digit_groups, digit_repaired, digit_results, trojan_groups, trojan_repaired, trojan_results,
                    sources, recovered, correction, tdata, elapsed, quick, half, x.shape[0], test_half, per_trigger,
                    reference)
    write_section(os.path.join(out_dir, "RESULTS.md"), "failure modes", text)
    return text


def _section(digit_groups, digit_repaired, digit_results, trojan_groups, trojan_repaired, trojan_results,
             sources, recovered, correction, tdata, elapsed, quick, half, n_digits, test_half, per_trigger,
             reference) -> str:
    s = correction.summary
    n_trig = len(tdata.setup.targets)
    neighbour_verdict = "holds" if s["neighbours_minus_others"].low > 0 else "does not hold"
    random_verdict = "holds" if s["salient_minus_random_neighbours"].low > 0 else "does not hold"
    recovered_verdict = "holds" if recovered >= 0.9 else ("weaker" if recovered >= 0.6 else "does not hold")
    all_verdicts = [_verdict(r)[0] for r in list(digit_results.values()) + list(trojan_results.values())]
    quick_note = "\n**Quick mode: fewer samples and draws; not for reading.**\n" if quick else ""
    return f"""## From mistakes to failure modes: error groups and verified repair
{quick_note}
Command: `python -m captum_paramsal.experiments.failure_modes` ({elapsed:.0f} s on this machine).
Groups are found on one half of each test set; every repair is measured on the other half.
`error_groups` clusters the misclassified samples by the cosine of their standardized profiles
(loss at the true label; k-means on unit-length profiles, the number of groups by the highest
mean silhouette among groups of at least 3); a group's culprit units have the highest mean z
over its samples. `repair` edits only the group's top {K} culprits, by turning them off or by
fine-tuning them on the group's samples (plain steps of 0.001, at most {100 if not quick else 5}), and
reports three rates with 95% bootstrap intervals: the group's samples now right, the held-out
misclassified samples with the group's (true, predicted) pairs now right, and the correctly
classified held-out samples now wrong (collateral damage). Controls edit {K} other units the same way:
`random` ({10 if not quick else 1} draws; the interval resamples draws and samples), `gradient` (largest mean
|grad| over the group, no standardization), `weight` (largest mean |weight| in the model). The
last two columns are culprits minus control on the held-out fix rate and on collateral damage,
paired over the same samples.

### The digits CNN

{len(digit_groups)} groups of the {digit_groups.num_misclassified} misclassified digits among the first {half} of
the {n_digits} test digits (number of groups: {digit_groups.criterion}).

{digit_groups.to_markdown()}

![error group 0 of the digits CNN](figures/error_group_digits.png)

{REPAIR_HEADER}
{chr(10).join(_repair_rows("digits", digit_repaired, digit_results))}

![repair of digits group 0](figures/repair_digits.png)

### The trojaned ResNet-20 of the SPADE benchmark

Reference statistics: {reference} clean training images. Errors: the misclassified samples among the first
{test_half} clean test images and {per_trigger[0]} test images per trigger (each trigger pasted on images of
the first half); held out: the other clean test images and {per_trigger[1]} triggered images per trigger from
the second half. {trojan_groups.num_misclassified} misclassified samples, {len(trojan_groups)} groups
(number of groups: {trojan_groups.criterion}).

{trojan_groups.to_markdown()}

What the groups' samples carry (the truth the grouping never saw):

{sources}

**Claim: error groups recover planted failure modes. {recovered_verdict.capitalize()} here**: {recovered:.0%} of the
misclassified triggered samples sit in the group dominated by their own trigger ({n_trig} triggers).

![error group 0 of the trojaned ResNet-20](figures/error_group_trojan.png)

{REPAIR_HEADER}
{chr(10).join(_repair_rows("trojan", trojan_repaired, trojan_results))}

![repair of trojan group 0](figures/repair_trojan.png)

### Verdicts: does editing a group's culprits fix held-out samples of its pairs better than the controls?

A repair **holds** when the culprits' held-out fix rate beats every control (paired interval above 0),
is **weaker** when it beats some, and **does not hold** when it beats none; collateral damage is reported
beside it; with fewer than {MIN_HELD_OUT} held-out samples of the group's pairs no verdict is told
({all_verdicts.count("holds")} hold, {all_verdicts.count("weaker")} weaker,
{all_verdicts.count("does not hold")} do not hold, {all_verdicts.count("too few held-out samples to tell")} untold,
of {len(all_verdicts)}).

{chr(10).join(_repair_verdicts("digits", digit_repaired, digit_results))}
{chr(10).join(_repair_verdicts("trojan", trojan_repaired, trojan_results))}

### The paper's neighbour test on the trojaned ResNet-20, with its controls

The first {s['fine_tuned']} of the {correction.num_misclassified} clean misclassified test images (first half): each
fine-tuned on its top-25 units (steps of 0.001, at most {100 if not quick else 5}); then the share of its 5 nearest
saliency-space neighbours among the other clean misclassified images that the change corrects, against all the
others, and the same fine-tuning on 25 random units. Rates over the {s['self_corrected']} images the top-25
fine-tuning corrected.

| units fine-tuned | corrected the image itself | neighbours corrected | all other misclassified corrected |
|---|---:|---:|---:|
{_neighbour_rows(s)}

**Claim: neighbours are corrected more often than the others. {neighbour_verdict.capitalize()} here**: neighbours − all
others {s['neighbours_minus_others'].format(percent=True, signed=True)}.
**Claim: it takes the salient units. {random_verdict.capitalize()} here**: salient − random units, neighbours corrected,
{s['salient_minus_random_neighbours'].format(percent=True, signed=True)}.
"""


def _neighbour_rows(s: Dict[str, Any]) -> str:
    rows = []
    for kind, prefix, fixed in (("top-25 salient", "", "self_corrected"), ("25 random", "random_",
                                                                         "random_self_corrected")):
        rows.append(f"| {kind} | {s[fixed]} of {s['fine_tuned']} | "
                    f"{s[prefix + 'neighbours_corrected'].format(percent=True)} | "
                    f"{s[prefix + 'others_corrected'].format(percent=True)} |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return section_command(__doc__.split("\n\n")[0], run, "fewer samples and draws (about a minute)", argv,
                           print_text=True)


if __name__ == "__main__":
    raise SystemExit(main())
