"""``captum-paramsal demo``: the embedded digits CNN explains its own mistakes.

Finds the misclassified test digits, prints each one's top salient units, runs the turn-off
test, groups the mistakes by their culprit units, and writes an HTML report (profiles,
parameter-guided input saliency next to Captum's Saliency and IntegratedGradients, pruning
curves, error groups). Nothing is downloaded; seconds on a CPU.
"""

from __future__ import annotations

import argparse
import os
import time

from ._common import add_overwrite_argument, check_report_folder, make_room_for_report


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="the embedded digits CNN: its mistakes, their salient units, the turn-off test, error groups, "
        "an HTML report",
        description="Explain the mistakes of the embedded CNN (trained by the project on scikit-learn's "
        "handwritten digits): print each misclassified test digit's most salient units, turn them off to "
        "see whether that corrects it, and write an HTML report.",
    )
    parser.add_argument("--out", default="paramsal-report",
                        help="report folder (default ./paramsal-report); an existing one is updated in place")
    add_overwrite_argument(parser, "an existing file at --out by the report folder (else refused)")
    parser.add_argument("--samples", type=int, default=6, help="misclassified digits to list and explain (default 6)")
    parser.add_argument("--top-k", type=int, default=5, help="salient units to print per digit (default 5)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from .._core.parameter_saliency import ParameterSaliency
    from ..analysis import error_groups, pruning_curves
    from ..html_report import write_report
    from ..zoo import load_digits_model
    from ..zoo.digits import CLASSES

    if args.samples < 1 or args.top_k < 1:
        raise ValueError("--samples and --top-k must be at least 1")
    check_report_folder(args.out, args.overwrite)
    started = time.perf_counter()
    model, stats, data = load_digits_model()
    x, y = data.test_set()
    ps = ParameterSaliency(model, stats=stats)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    wrong = (predicted != y).nonzero().flatten()
    print(
        f"Embedded digits CNN ({ps.layout.num_columns} units in {len(ps.layout)} layers), {len(y)} test digits, "
        f"{len(wrong)} misclassified.\nSaliency: z-scores of mean |d loss / d weight| per filter/neuron, "
        "loss at the true label, against the test digits' statistics.\n"
    )
    shown = wrong[: args.samples]
    profile = ps.profile(x[shown], target=y[shown])
    for row, index in enumerate(shown.tolist()):
        print(f"digit #{index}: true {int(y[index])}, predicted {int(predicted[index])}")
        for rank, unit in enumerate(profile.top_k(args.top_k)[row], 1):
            print(f"  {rank}. {unit.param:<14s} unit {unit.unit:4d}   z = {unit.value:6.2f}")
    pruning = pruning_curves(model, ps, x, y, ks=(1, 5, 10, 25, 50))
    print("\nTurn-off test over all misclassified digits: the share corrected after turning off k units\n")
    print(pruning.to_markdown())
    groups = error_groups(ps, (x, y), progress=False)
    print(f"\nError groups: the misclassified digits grouped by their standardized profiles "
          f"({len(groups)} groups, {groups.criterion})\n")
    print(groups.to_markdown())
    make_room_for_report(args.out)
    path = write_report(
        model, ps, x, y, args.out, classes=CLASSES, title="Why the digits CNN gets these digits wrong",
        max_samples=args.samples, low_percentile=50.0, pruning=pruning, noun="test digit", groups=groups,
        notes=["Heat maps clip below the 50th percentile (the paper: 90th) because the digits are only 8x8."],
    )
    print(f"\nReport: {os.path.abspath(path)}  ({time.perf_counter() - started:.1f} s)")
    return 0
