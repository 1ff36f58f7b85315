"""The paper's sanity check of parameter-guided input saliency, made quantitative, on the
embedded digits CNN and on the trojaned ResNet-20 of the SPADE benchmark.

``python -m captum_paramsal.experiments.pgis_check [--out docs] [--quick]`` runs
:func:`~captum_paramsal.analysis.input_saliency_check.input_saliency_check` (maps from each
sample's top-k units against maps from k random units, Captum's Saliency and a random pixel
order: rank correlation, magnitude, share on the object, a deletion test; every rate with a
bootstrap interval) and writes the section "pgis check" of ``docs/RESULTS.md`` and its figures
under ``docs/figures/``, stating for each measure whether the paper's claim (top-k maps differ
from random-unit maps and point at what matters) holds here. Deterministic; a few minutes on 2
CPU cores (``--quick``: under a minute, small and only a smoke test).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch

from .results_markdown import section_command, write_section

if TYPE_CHECKING:
    from ..analysis.input_saliency_check import InputSaliencyCheck
    from ..analysis.intervals import Estimate

SECTION = "pgis check"
#: the digits' ink: pixels brighter than this (inputs in [0, 1]; scikit-learn's 0..16 scale, above 4)
INK_THRESHOLD = 0.25


@dataclass(frozen=True)
class Options:
    """The settings of one run (the full one by default)."""

    k: int = 10
    nt_samples: int = 10
    stdevs: float = 0.1
    random_draws: int = 4
    deletion_steps: int = 20
    digits_wrong: Optional[int] = None  # None: all
    resnet_scan: Optional[int] = None  # test images searched for misclassified ones (None: all)
    resnet_wrong: Optional[int] = None  # None: all
    resnet_reference: int = 1000
    internal_batch_size: int = 256
    seed: int = 0


# (8 ResNet samples, not fewer: ParameterSaliency on ResNet-20 takes seconds for a batch of 4, under one for 8)
QUICK = Options(nt_samples=2, random_draws=2, deletion_steps=4, digits_wrong=6, resnet_scan=400, resnet_wrong=8,
                resnet_reference=64)


@dataclass
class Setting:
    key: str
    title: str
    check: InputSaliencyCheck
    how: str


def _digits(options: Options) -> Tuple[List[Setting], str]:
    from .._core.parameter_guided_input_saliency import ParameterGuidedInputSaliency
    from .._core.parameter_saliency import ParameterSaliency
    from ..analysis.input_saliency_check import input_saliency_check
    from ..stats import STD_FLOOR
    from ..zoo import load_digits_model

    model, stats, data = load_digits_model()
    x, y = data.test_set()
    ps = ParameterSaliency(model, stats=stats)
    pgis = ParameterGuidedInputSaliency.from_parameter_saliency(ps, k=options.k)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    wrong = (predicted != y).nonzero().flatten()
    correct = (predicted == y).nonzero().flatten()
    total_wrong = len(wrong)
    if options.digits_wrong is not None:
        wrong = wrong[: options.digits_wrong]
    xs, ys = x[wrong], y[wrong]
    check = input_saliency_check(
        pgis, xs, ys, k=options.k, random_draws=options.random_draws, object_masks=xs[:, 0] > INK_THRESHOLD,
        nt_samples=options.nt_samples, stdevs=options.stdevs, deletion_steps=options.deletion_steps,
        baseline=0.0, seed=options.seed, internal_batch_size=options.internal_batch_size,
    )
    how = f"all {len(wrong)} misclassified test digits" if options.digits_wrong is None else (
        f"the first {len(wrong)} of the {total_wrong} misclassified test digits")
    # why correctly classified digits are left out: none of their units stands out
    z_correct = ps.attribute(x[correct], target=y[correct], internal_batch_size=options.internal_batch_size)
    no_salient = z_correct.max(1).values <= 0
    dead_top = (z_correct.topk(options.k, dim=1).values == 0).all(1)
    zero_spread = int((stats.std <= STD_FLOOR).sum())
    about = (
        f"**Digits CNN**: the embedded `DigitsCNN` ({ps.layout.num_columns} units) on the test half of scikit-learn's "
        f"digits ({len(y)} images, {total_wrong} misclassified), z against its shipped statistics "
        f"(the test half). Object: the digit's ink, pixels brighter than {INK_THRESHOLD} (inputs in [0, 1]); "
        "deleted pixels are set to 0, the background, so deleting erases ink. Correctly classified digits are left "
        f"out, as in the paper: on {float(no_salient.float().mean()):.0%} of the {len(correct)} correct test digits "
        f"no unit has z > 0, and on {float(dead_top.float().mean()):.0%} the top k are all units of zero reference "
        f"spread ({zero_spread} such units: dead, no gradient, z = 0 exactly), whose boosting map is zero."
    )
    return [Setting("digits_wrong", "digits CNN, misclassified", check, how)], about


def _resnet(options: Options) -> Tuple[List[Setting], str]:
    from .._core.parameter_guided_input_saliency import ParameterGuidedInputSaliency
    from .._core.parameter_saliency import ParameterSaliency
    from ..analysis.input_saliency_check import input_saliency_check
    from ..zoo.trojan_digits import DIGIT_MASK_THRESHOLD, load_trojan_resnet

    model, data = load_trojan_resnet()
    x, y, masks = data.test_images, data.test_labels, data.test_masks
    if options.resnet_scan is not None:
        x, y, masks = x[: options.resnet_scan], y[: options.resnet_scan], masks[: options.resnet_scan]
    with torch.no_grad():
        predicted = torch.cat([model(x[i : i + 500]).argmax(1) for i in range(0, len(y), 500)])
    wrong = (predicted != y).nonzero().flatten()
    total_wrong = len(wrong)
    if options.resnet_wrong is not None:
        wrong = wrong[: options.resnet_wrong]
    # reference statistics: clean test images not among those explained (the paper's validation set)
    others = torch.ones(len(y), dtype=torch.bool)
    others[wrong] = False
    reference = others.nonzero().flatten()[: options.resnet_reference]
    ps = ParameterSaliency(model)
    batches = [(x[reference[i : i + 250]], y[reference[i : i + 250]]) for i in range(0, len(reference), 250)]
    ps.stats = ps.fit_stats(batches, progress=False)
    pgis = ParameterGuidedInputSaliency.from_parameter_saliency(ps, k=options.k)
    train_clean = data.train_images[data.train_trigger == -1]
    baseline = train_clean.mean((0, 2, 3))[:, None, None]  # the training images' mean colour
    xs, ys = x[wrong], y[wrong]
    check = input_saliency_check(
        pgis, xs, ys, k=options.k, random_draws=options.random_draws, object_masks=masks[wrong],
        nt_samples=options.nt_samples, stdevs=options.stdevs, deletion_steps=options.deletion_steps,
        baseline=baseline, seed=options.seed, internal_batch_size=min(options.internal_batch_size, 128),
    )
    how = (f"all {len(wrong)} misclassified clean test images" if options.resnet_wrong is None
           else f"the first {len(wrong)} of the {total_wrong} misclassified clean test images")
    colour = ", ".join(f"{v:.2f}" for v in baseline.flatten().tolist())
    about = (
        f"**ResNet-20**: the trojaned ResNet-20 of the SPADE benchmark ({ps.layout.num_columns} units) on its "
        f"{len(y)} clean test composites ({total_wrong} misclassified, accuracy "
        f"{float((predicted == y).float().mean()):.1%}), "
        f"z against statistics fitted on {len(reference)} other clean test images (not among those explained; "
        f"the paper standardizes over a validation set). Object: the composited digit, where its alpha exceeds "
        f"{DIGIT_MASK_THRESHOLD} (`TrojanDigitsData.test_masks`); deleted pixels are set to the training images' "
        f"mean colour ({colour})."
    )
    return [Setting("resnet20_wrong", "ResNet-20, misclassified", check, how)], about


# -- verdicts ---------------------------------------------------------------------------------


def _fmt(e: Estimate, percent: bool = False, signed: bool = False) -> str:
    return e.format(percent=percent, digits=1 if percent else 3, signed=signed)


def _below(e: Estimate) -> bool:
    return e.n > 0 and e.high < 0


def _above(e: Estimate) -> bool:
    return e.n > 0 and e.low > 0


def verdicts(check: InputSaliencyCheck) -> Dict[str, Tuple[str, str]]:
    """Per measure: (``"holds"`` / ``"weaker"`` / ``"does not hold"``, a sentence with the numbers)."""
    s = check.summary
    out: Dict[str, Tuple[str, str]] = {}

    diff = s["spearman: (top-k vs random-unit) - (random vs random)"]
    levels = (f"rank correlation top-k vs random-unit {_fmt(s['spearman: top-k vs random-unit'])}, random-unit vs "
              f"random-unit {_fmt(s['spearman: random-unit vs random-unit'])}, difference {_fmt(diff, signed=True)}")
    if _below(diff) and diff.value < -0.1:
        out["rank"] = ("holds", f"top-k maps order the pixels unlike random-unit maps ({levels})")
    elif _below(diff):
        out["rank"] = ("weaker", f"top-k maps are only a little less like random-unit maps than those are like each "
                                 f"other ({levels})")
    elif _above(diff):
        out["rank"] = ("does not hold", f"top-k maps are *more* like random-unit maps than two random-unit maps are "
                                        f"like each other ({levels}): by pixel order they are not told apart")
    else:
        out["rank"] = ("does not hold", f"by pixel order top-k maps are as alike to random-unit maps as these are to "
                                        f"each other ({levels})")

    ratio = s["magnitude ratio top-k / random-unit"]
    z = (f"the boosted units' mean z: top-k {_fmt(s['z of the boosted units: top-k'])}, random "
         f"{_fmt(s['z of the boosted units: random-unit'])}")
    if ratio.n and ratio.low > 1.25:
        out["magnitude"] = ("holds", f"top-k maps are {_fmt(ratio)} times as large as random-unit maps (geometric "
                                     f"mean; {z}): unlike the CIFAR-10 report, magnitude tells them apart here")
    elif ratio.n and ratio.low > 1:
        out["magnitude"] = ("weaker", f"top-k maps are larger than random-unit maps, but by little: {_fmt(ratio)} "
                                      f"times ({z})")
    elif ratio.n and ratio.high < 1:
        out["magnitude"] = ("does not hold", f"top-k maps are *smaller* than random-unit maps: {_fmt(ratio)} times "
                                             f"({z})")
    else:
        out["magnitude"] = ("does not hold", f"the magnitude ratio is {_fmt(ratio)} ({z}): barely distinguishable "
                                             "by magnitude, as reported on CIFAR-10")

    if "object share: top-k" in s:
        chance, versus, sal = (s["object share: top-k - chance"], s["object share: top-k - random-unit"],
                               s["object share: top-k - Saliency"])
        shares = (f"share on the object: top-k {_fmt(s['object share: top-k'], True)}, random-unit "
                  f"{_fmt(s['object share: random-unit'], True)}, Saliency {_fmt(s['object share: Saliency'], True)}, "
                  f"chance (the mask's area) {_fmt(s['object share: chance (mask area)'], True)}; top-k minus "
                  f"random-unit {_fmt(versus, True, True)}, minus Saliency {_fmt(sal, True, True)}")
        if _above(chance) and _above(versus):
            out["object"] = ("holds", f"top-k maps put more of their weight on the object than random-unit maps "
                                      f"({shares})")
        elif _above(chance):
            out["object"] = ("weaker", f"top-k maps point at the object more than chance, but no more than "
                                       f"random-unit maps do ({shares})")
        else:
            out["object"] = ("does not hold", f"top-k maps do not point at the object more than chance ({shares})")

    for curve, what in (("z", "the top-k units' z"), ("p", "the predicted class's probability")):
        versus_random = s[f"deletion {curve}: top-k - random-unit"]
        versus_pixels = s[f"deletion {curve}: top-k - random pixels"]
        versus_saliency = s[f"deletion {curve}: top-k - Saliency"]
        areas = (f"area under the curve: top-k {_fmt(s[f'deletion {curve}: top-k'])}, random-unit "
                 f"{_fmt(s[f'deletion {curve}: random-unit'])}, Saliency {_fmt(s[f'deletion {curve}: Saliency'])}, "
                 f"random pixels {_fmt(s[f'deletion {curve}: random pixels'])}; top-k minus random-unit "
                 f"{_fmt(versus_random, signed=True)}, minus Saliency {_fmt(versus_saliency, signed=True)}, minus "
                 f"random pixels {_fmt(versus_pixels, signed=True)}")
        if _below(versus_random) and _below(versus_pixels):
            out[f"deletion {curve}"] = ("holds", f"deleting pixels in top-k order lowers {what} sooner than in "
                                                 f"random-unit or random order ({areas})")
        elif _below(versus_pixels):
            than_random = "*later* than" if _above(versus_random) else "not clearly sooner than"
            out[f"deletion {curve}"] = ("weaker", f"top-k order lowers {what} sooner than a random pixel order, but "
                                                  f"{than_random} random-unit order ({areas})")
        else:
            out[f"deletion {curve}"] = ("does not hold", f"top-k order does not lower {what} sooner than a random "
                                                         f"pixel order ({areas})")
    return out


MEASURES = (
    ("rank", "Top-k maps differ from random-unit maps (pixel order)"),
    ("magnitude", "Top-k maps differ from random-unit maps (magnitude)"),
    ("object", "Top-k maps point at the object"),
    ("deletion z", "Deleting the top-k map's pixels first lowers the units' z sooner"),
    ("deletion p", "Deleting the top-k map's pixels first lowers the prediction sooner"),
)

#: the rows of the comparison table: summary key, display name, percent
TABLE_ROWS = (
    ("spearman: top-k vs random-unit", "Spearman top-k vs random-unit", False),
    ("spearman: random-unit vs random-unit", "Spearman random-unit vs random-unit (reference)", False),
    ("spearman: (top-k vs random-unit) - (random vs random)", "difference of the two", False),
    ("spearman: top-k vs Saliency", "Spearman top-k vs Saliency", False),
    ("magnitude ratio top-k / random-unit", "magnitude ratio top-k / random-unit (geometric mean)", False),
    ("z of the boosted units: top-k", "mean z of the boosted units: top-k", False),
    ("z of the boosted units: random-unit", "mean z of the boosted units: random-unit", False),
    ("object share: top-k", "object share: top-k", True),
    ("object share: random-unit", "object share: random-unit", True),
    ("object share: Saliency", "object share: Saliency", True),
    ("object share: chance (mask area)", "object share: chance (the mask's area)", True),
    ("object share: top-k - random-unit", "object share: top-k − random-unit", True),
    ("deletion z: top-k", "deletion, area of z/z₀: top-k", False),
    ("deletion z: random-unit", "deletion, area of z/z₀: random-unit", False),
    ("deletion z: Saliency", "deletion, area of z/z₀: Saliency", False),
    ("deletion z: random pixels", "deletion, area of z/z₀: random pixels", False),
    ("deletion z: top-k - random-unit", "deletion z: top-k − random-unit", False),
    ("deletion z: top-k - random pixels", "deletion z: top-k − random pixels", False),
    ("deletion p: top-k", "deletion, area of p(predicted): top-k", False),
    ("deletion p: random-unit", "deletion, area of p(predicted): random-unit", False),
    ("deletion p: Saliency", "deletion, area of p(predicted): Saliency", False),
    ("deletion p: random pixels", "deletion, area of p(predicted): random pixels", False),
    ("deletion p: top-k - random-unit", "deletion p: top-k − random-unit", False),
    ("deletion p: top-k - Saliency", "deletion p: top-k − Saliency", False),
    ("deletion p: top-k - random pixels", "deletion p: top-k − random pixels", False),
    ("deletion changed: top-k", "deletion, area of prediction changed: top-k", True),
    ("deletion changed: random-unit", "deletion, area of prediction changed: random-unit", True),
    ("deletion changed: Saliency", "deletion, area of prediction changed: Saliency", True),
    ("deletion changed: random pixels", "deletion, area of prediction changed: random pixels", True),
)


def _table(settings: Sequence[Setting]) -> str:
    head = "| measure | " + " | ".join(f"{s.title} (n = {s.check.num_samples})" for s in settings) + " |"
    lines = [head, "|---|" + "---:|" * len(settings)]
    for key, name, percent in TABLE_ROWS:
        cells = []
        for s in settings:
            e = s.check.summary.get(key)
            cells.append("—" if e is None else _fmt(e, percent, signed=" - " in key))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(out_dir: str = "docs", quick: bool = False) -> str:
    """Run both models' checks, write the figures and the RESULTS.md section; returns the section."""
    started = time.perf_counter()
    options = QUICK if quick else Options()
    figures = os.path.join(out_dir, "figures")
    os.makedirs(figures, exist_ok=True)
    digit_settings, digits_about = _digits(options)
    resnet_settings, resnet_about = _resnet(options)
    settings = digit_settings + resnet_settings
    suffix = "_quick" if quick else ""
    for s in settings:
        fig = s.check.plot(examples=3, title=f"{s.title}: deletion test, {s.check.num_samples} samples")
        fig.savefig(os.path.join(figures, f"pgis_check_{s.key}{suffix}.png"), dpi=90)
    judged = {s.key: verdicts(s.check) for s in settings}
    verdict_table = ["| claim | " + " | ".join(s.title for s in settings) + " |", "|---|" + "---|" * len(settings)]
    for key, claim in MEASURES:
        verdict_table.append(f"| {claim} | " + " | ".join(judged[s.key][key][0] for s in settings) + " |")
    details = []
    for key, claim in MEASURES:
        details.append(f"**{claim}.**")
        details += [f"- {s.title}: **{judged[s.key][key][0]}**: {judged[s.key][key][1]}." for s in settings]
        details.append("")
    seconds = time.perf_counter() - started
    command = "python -m captum_paramsal.experiments.pgis_check" + (" --quick" if quick else "")
    figure_lines = "\n".join(f"![{s.title}](figures/pgis_check_{s.key}{suffix}.png)" for s in settings)
    samples = "; ".join(f"{s.title}: {s.how}" for s in settings)
    smoke = "; a smoke run, too small to conclude anything" if quick else ""
    text = f"""## Parameter-guided input saliency: the paper's sanity check, quantitative

Command: `{command}` ({seconds:.0f} s on this machine{smoke}).
The paper (§3) checks filter boosting qualitatively: maps that boost a sample's top-k salient
units should look unlike maps that boost k random units. Here, per sample: the map of its top
k = {options.k} units (by z, loss at the true label, held fixed over the noise), {options.random_draws} maps of k random
other units, and Captum's `Saliency` of the true label's logit, each smoothed by `NoiseTunnel`
(smoothgrad, {options.nt_samples} noisy copies, σ = {options.stdevs} on inputs in [0, 1], the same noise for every map);
pixel score = sum over channels of |map|. Measures
(`captum_paramsal.analysis.input_saliency_check`): Spearman rank correlation of the pixel scores
(random-unit vs random-unit is the reference for "alike"); the magnitude ratio, L2 norm of the
top-k map over that of the random-unit maps; the share of the pixel scores on the object, with
the object's area as chance; a deletion test: pixels set to the baseline in each map's order
(and in random order) in {options.deletion_steps} steps, tracking the mean z of the sample's original top-k
units (profile recomputed at the true label) and the probability of the originally predicted
class; each curve's area over the deleted fraction (z divided by its clean value first; lower =
sooner). Intervals: 95% bootstrap over samples; differences are paired (same samples).

{digits_about}

{resnet_about}

Samples: {samples}.

### Verdicts

{chr(10).join(verdict_table)}

{chr(10).join(details)}
### All measures

{_table(settings)}

{figure_lines}
"""
    write_section(os.path.join(out_dir, "RESULTS.md"), SECTION + (" quick" if quick else ""), text)
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    return section_command(__doc__.split("\n", 1)[0], run, "a small smoke run (under a minute), for tests", argv)


if __name__ == "__main__":
    sys.exit(main())
