"""Benchmark: seconds per sample of SPADE's sample-targeted pruning.

What is measured
----------------
For one sample, with the default options (sparsity 0.9 of every Linear/Conv2d weight, 64
calibration views, blocksize 128, percdamp 0.01):

* ``views``       the calibration batch: the sample and 63 random views (torchvision v2).
* ``moments``     the views plus one dense forward pass with hooks accumulating each layer's
  ``X Xᵀ`` (convolution inputs unfolded).
* ``solve``       the SparseGPT-style reconstruction of every layer from those moments.
* ``solve+refit`` the same with the exact least-squares refit of the masks (``refit=True``).
* ``SPADE(Saliency)`` everything for one sample: pruning, Captum's ``Saliency`` on the pruned
  network, the restore. ``Saliency`` is the dense method alone, for scale.

Cases: the digits CNN (1x8x8, ``captum_paramsal.zoo.DigitsCNN``) and a torchvision ResNet-18 at
64x64 on the CPU; a ResNet-50 at 224x224 on a GPU when one is present (the paper: 41 minutes
per sample with exact OBC on one RTX 2080; seconds with the fast solver). Random seeded weights:
the cost does not depend on what the weights are.

Run ``python benchmarks/bench_spade.py`` (``--quick`` for a smoke run, ``--markdown`` for
docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence, Tuple

import torch
from captum.attr import Saliency

from captum_paramsal.spade import SPADE, SampleTargetedPruning

from bench_common import build_torchvision_model, interleaved_times, make_logger, median, print_report

CASES = {
    "digits-cnn-cpu": ("digits", 8, "cpu"),
    "resnet18-64-cpu": ("resnet18", 64, "cpu"),
    "resnet50-224-cuda": ("resnet50", 224, "cuda"),
}
HEADER = ("case", "phase", "median s", "min s", "layers", "weights pruned")


def build(arch: str, size: int, device: torch.device):
    if arch == "digits":
        from captum_paramsal.zoo import DigitsCNN, digits_data

        torch.manual_seed(0)
        model = DigitsCNN().eval().to(device)
        x = digits_data().images[:1].to(device)
        return model, x
    model = build_torchvision_model(arch, num_classes=10).to(device)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    return model, x


def run_case(name: str, reps: int, augmentations: int, sparsity: float, log) -> List[Tuple[str, ...]]:
    arch, size, device = CASES[name]
    dev = torch.device(device)
    model, x = build(arch, size, dev)
    pruning = SampleTargetedPruning(model, sparsity=sparsity, n_augmentations=augmentations)
    refit = SampleTargetedPruning(model, sparsity=sparsity, n_augmentations=augmentations, refit=True)
    spade = SPADE(Saliency(model), sparsity=sparsity, n_augmentations=augmentations)
    dense = Saliency(model)
    moments = pruning.second_moments(x)
    runners = {
        "views": lambda: pruning.calibration_batch(x),
        "moments": lambda: pruning.second_moments(x),
        "solve": lambda: pruning.solve(moments),
        "solve+refit": lambda: refit.solve(moments),
        "SPADE(Saliency)": lambda: spade.attribute(x, target=0),
        "Saliency": lambda: dense.attribute(x, target=0),
    }
    log(f"{name}: warm-up")
    for run in runners.values():
        run()
    times = interleaved_times(runners, reps, dev, log)
    pruned = sum(round(sparsity * dict(model.named_parameters())[n].numel()) for n in moments)
    rows = []
    for phase, values in times.items():
        rows.append((name, phase, f"{median(values):.3f}", f"{min(values):.3f}", str(len(moments)), f"{pruned:,}"))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, 16 views")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per phase (default 3)")
    parser.add_argument("--augmentations", type=int, default=64, help="calibration views (default 64)")
    parser.add_argument("--sparsity", type=float, default=0.9, help="sparsity of every layer (default 0.9)")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = parser.parse_args(argv)
    reps = 1 if args.quick else args.reps
    augmentations = 16 if args.quick else args.augmentations
    log = make_logger()
    has_cuda = torch.cuda.is_available()
    rows: List[Tuple[str, ...]] = []
    lines = [f"sparsity {args.sparsity:g} of every Linear/Conv2d weight, {augmentations} calibration views, "
             f"median and minimum of {reps} interleaved repetitions, seconds per sample."]
    devices = ["cpu"]
    for name in args.cases:
        if CASES[name][2] == "cuda" and not has_cuda:
            lines.append(f"{name}: not run, no CUDA device on this machine.")
            continue
        if CASES[name][2] == "cuda":
            devices.append("cuda")
        rows += run_case(name, reps, augmentations, args.sparsity, log)
    print_report(devices, HEADER, rows, lines, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
