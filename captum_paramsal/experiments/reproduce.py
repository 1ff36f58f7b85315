"""Reproduce the paper's validation experiments (docs/METHOD.md, "The paper's validation experiments")
on the embedded digits CNN.

``python -m captum_paramsal.experiments.reproduce [--out docs]`` writes the section
"reproduce" of ``docs/RESULTS.md`` and its figures under ``docs/figures/``: the pruning table
(k = 1, 5, 10, 25, 50; salient, random, least units), the neighbour-correction rates, the
semantic agreement of saliency-space neighbours against chance, and the mean profiles of
correct and misclassified digits, each with a plain statement of whether the paper's claim
holds here and by how much. Deterministic; about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import torch

from .results_markdown import write_section


def run(out_dir: str = "docs", quick: bool = False) -> str:
    from matplotlib.figure import Figure  # no pyplot, no backend chosen: figures are only written to files

    from .._core.parameter_saliency import ParameterSaliency
    from ..analysis import SaliencyIndex, dataset_profiles, neighbour_correction, pruning_curves, semantic_agreement
    from ..zoo import load_digits_model
    from ..zoo.digits import read_metadata

    started = time.perf_counter()
    figures = os.path.join(out_dir, "figures")
    os.makedirs(figures, exist_ok=True)
    model, stats, data = load_digits_model()
    x, y = data.test_set()
    if quick:
        x, y = x[:300], y[:300]
    ps = ParameterSaliency(model, stats=stats)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    wrong = predicted != y
    meta = read_metadata()

    pruning = pruning_curves(model, ps, x, y, ks=(1, 5, 10, 25, 50), seed=0)
    fig = Figure(figsize=(13, 3.6))
    pruning.plot(ax=fig.subplots(1, 3))
    fig.savefig(os.path.join(figures, "pruning_curves.png"), dpi=110)

    corrections = {
        lr: neighbour_correction(model, ps, x, y, k=25, m=5, lr=lr, max_steps=500, seed=0,
                                 max_samples=8 if quick else None)
        for lr in (1e-3, 1e-4)
    }

    z = ps.attribute(x, target=y).detach()
    index = SaliencyIndex(z, layout=ps.layout)
    agreement_all = semantic_agreement(index, y, predicted, m=5)
    agreement_wrong = semantic_agreement(index, y, predicted, m=3, among=wrong)

    profiles = dataset_profiles(ps, [(x, y)], progress=False)
    fig = profiles.plot()
    fig.savefig(os.path.join(figures, "dataset_profiles.png"), dpi=110)
    sample = int(wrong.nonzero()[0])
    fig = ps.profile(x[sample : sample + 1], target=y[sample : sample + 1]).plot(
        0, name=f"test digit {sample} (label {int(y[sample])}, predicted {int(predicted[sample])})"
    )
    fig.savefig(os.path.join(figures, "misclassified_profile.png"), dpi=110)

    def row(k: int, mode: str) -> float:
        return pruning.row(k, mode)["fraction_corrected"]

    def holds(condition: bool) -> str:
        return "Holds here" if condition else "Does not hold here"

    ks = pruning.ks
    best_k = max(ks, key=lambda k: row(k, "salient"))
    beats = [k for k in ks if row(k, "salient") > max(row(k, "random"), row(k, "least"))]
    pruning_claim = (
        f"**Claim: the most salient units correct far more misclassified samples than random or least "
        f"salient ones. {holds(ks[0] in beats and len(beats) >= len(ks) - 1)}**: turning off the single most "
        f"salient unit corrects {row(1, 'salient'):.0%} of the misclassified digits (random: {row(1, 'random'):.0%}, "
        f"least: {row(1, 'least'):.0%}); the best k is {best_k} with {row(best_k, 'salient'):.0%} "
        f"(random: {row(best_k, 'random'):.0%}). Salient units beat both baselines at k = "
        f"{', '.join(map(str, beats)) or 'none'}"
    )
    lost = [k for k in ks if k not in beats]
    if lost:
        pruning_claim += (
            f", not at k = {', '.join(map(str, lost))} (k = {max(lost)} is {max(lost) / ps.layout.num_columns:.0%} "
            f"of the {ps.layout.num_columns} units; mean change of p(true class) there: "
            f"{pruning.row(max(lost), 'salient')['mean_delta_true_prob']:+.3f}; not analysed further)"
        )
    pruning_claim += "."
    nc = corrections[1e-4].summary
    ratio = nc["neighbours_corrected"] / max(nc["random_corrected"], 1e-9)
    neighbour_claim = (
        f"**Claim: neighbours are corrected more often than random samples. "
        f"{holds(all(c.summary['neighbours_corrected'] > c.summary['random_corrected'] for c in corrections.values()))}"
        f"**: with the smaller step (the smaller change), {nc['neighbours_corrected']:.0%} of the neighbours "
        f"against {nc['random_corrected']:.0%} of random misclassified digits ({ratio:.1f}x)."
    )
    class_ratio = agreement_all.same_class / max(agreement_all.same_class_chance, 1e-9)
    pair_ratio = agreement_wrong.same_pair / max(agreement_wrong.same_pair_chance, 1e-9)
    agreement_claim = (
        f"**Claim: samples whose profiles are close are semantically alike. {holds(min(class_ratio, pair_ratio) > 1.5)}"
        f"**: neighbours share the true class {class_ratio:.1f}x as often as chance, and among misclassified "
        f"digits they share the (true, predicted) pair {pair_ratio:.1f}x as often as chance."
    )
    layers = profiles.by_layer(standardized=True)
    higher = [name for name, _, correct, misclassified in layers if misclassified > correct]
    profiles_claim = (
        f"Misclassified digits have the larger mean standardized saliency in {len(higher)} of {len(layers)} layers"
        + (" (all), as in the paper's figure: the parameters are \"more wrong\" on them."
           if len(higher) == len(layers) else f": {', '.join(higher)}.")
    )
    lr_rows = "\n".join(
        f"| {lr:g} | {c.num_misclassified} | {c.summary['self_corrected']} of {c.summary['fine_tuned']} | "
        f"{c.summary['neighbours_corrected']:.1%} | {c.summary['random_corrected']:.1%} |"
        for lr, c in corrections.items()
    )
    seconds = time.perf_counter() - started
    text = f"""## The paper's validation experiments on the embedded digits CNN

Command: `python -m captum_paramsal.experiments.reproduce` ({seconds:.0f} s on this machine).
Model: the embedded `DigitsCNN` (3 conv + 2 Linear layers, {ps.layout.num_columns} units), trained by
`python -m captum_paramsal.zoo.train_digits` on half of scikit-learn's 1797 digits (test accuracy
{float(meta.get("test_accuracy", "nan")):.1%}). Everything below is on the other half, {len(y)} digits, of which
{int(wrong.sum())} are misclassified. Saliency: `mean_abs` over every conv filter and Linear row,
standardized against the test half's statistics (the paper standardizes over its validation
set), loss at the true label.

### Turning off salient units (pruning test)

{pruning.to_markdown()}

![pruning curves](figures/pruning_curves.png)

{pruning_claim}

### Fine-tuning salient units and saliency-space neighbours

Each misclassified digit in turn: plain gradient steps on its cross-entropy, only its top-25
units updated, until it is classified correctly; then the share of its 5 nearest neighbours in
saliency space (cosine of standardized profiles, among the other misclassified digits) that
the change corrects, against 5 random other misclassified digits.

| learning rate | misclassified | fine-tuned until correct | neighbours corrected | random corrected |
|---:|---:|---:|---:|---:|
{lr_rows}

{neighbour_claim}

### Saliency-space neighbours share meaning

All {len(y)} test digits, 5 nearest neighbours each:

{agreement_all.to_markdown()}

The {int(wrong.sum())} misclassified digits among themselves, 3 nearest neighbours each:

{agreement_wrong.to_markdown()}

{agreement_claim}

### Mean profiles of correct and misclassified digits

{profiles.to_markdown()}

![mean profiles](figures/dataset_profiles.png)

{profiles_claim} One misclassified digit's profile (each layer's z sorted, top units marked):

![a misclassified digit's profile](figures/misclassified_profile.png)
"""
    write_section(os.path.join(out_dir, "RESULTS.md"), "reproduce", text)
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", default="docs", help="folder of RESULTS.md and figures/ (default docs)")
    parser.add_argument("--quick", action="store_true", help="a smaller run, for tests")
    args = parser.parse_args(argv)
    run(args.out, args.quick)
    print(f"wrote {os.path.join(args.out, 'RESULTS.md')} and {os.path.join(args.out, 'figures')}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
