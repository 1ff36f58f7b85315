"""Benchmark: seconds per sample of SPADE's sample-targeted pruning, by phase and solver.

What is measured
----------------
For one sample, with the library's defaults (the SPADE authors' recipe: every convolution and
the classifier pruned but the stem, sparsity 0.9 here, views drawn at once, percdamp 0.01):

* ``views``            the calibration batch: the sample and its random views (the paper's
  RandomResizedCrop(0.2, 1), flip, ColorJitter(brightness 0.5, hue 0.3)).
* ``moments``          the views plus one dense forward pass with hooks accumulating each
  layer's ``X Xᵀ`` (convolution inputs unfolded).
* ``solve sparsegpt``  SparseGPT with the mask re-chosen every kernel (``kh*kw`` columns; every
  column for Linear) for every layer.
* ``solve obc``        OBC (greedy per-row optimal brain surgeon) for every layer.
* ``attribution``      Captum's ``Saliency`` on the pruned network (what SPADE adds to a dense
  method's cost is everything above).

Cases: the benchmark's ResNet-20 at 32x32 (random weights: the cost does not depend on them)
with 1024 views, and a torchvision ResNet-50 at 224x224. On the ResNet-50 on a CPU, 1024 views
and a full OBC are far too long for a benchmark: its ``moments`` run on ``--r50-views`` views
(default 32) and are scaled linearly to 1024 (the pass and the ``X Xᵀ`` sums are linear in the
rows), and its OBC runs on ``--r50-rows`` rows (default 4) of every layer and is scaled by the
layer's rows (the rows are independent and equally costly): those rows are marked
"extrapolated". The paper quotes 41 minutes per sample for OBC on a ResNet-50 on one RTX 2080.
A ``-cuda`` case runs where a GPU is present.

Run ``python benchmarks/bench_spade.py`` (``--quick`` for a smoke run, ``--markdown`` for
docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from captum.attr import Saliency

from captum_paramsal.interventions import swapped_parameters
from captum_paramsal.spade import SampleTargetedPruning, obc_trajectory
from captum_paramsal.spade.sample_pruning import prunable_weights
from captum_paramsal.spade.second_moments import grouped_weight

from bench_common import build_torchvision_model, interleaved_times, make_logger, median, print_report, sync

CASES = {
    "resnet20-32-cpu": ("resnet20", 32, "cpu"),
    "resnet50-224-cpu": ("resnet50", 224, "cpu"),
    "resnet20-32-cuda": ("resnet20", 32, "cuda"),
    "resnet50-224-cuda": ("resnet50", 224, "cuda"),
}
HEADER = ("case", "phase", "median s", "min s", "how")


def build(arch: str, size: int, device: torch.device):
    if arch == "resnet20":
        from captum_paramsal.zoo.trojan_digits import ResNet20

        torch.manual_seed(0)
        model = ResNet20().eval().to(device)
    else:
        model = build_torchvision_model(arch, num_classes=10).to(device)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    return model, x


def obc_rows_seconds(pruning: SampleTargetedPruning, moments, rows: Optional[int], device) -> float:
    """Seconds of OBC over every layer; with ``rows``, on that many rows of each, scaled up."""
    owners = prunable_weights(pruning.model)
    total = 0.0
    for name, moment in moments.items():
        weight = grouped_weight(owners[name][0]).detach()
        hessian = moment.hessian()
        scale = 1.0
        if rows is not None and weight.shape[1] > rows:
            scale = weight.shape[1] / rows
            weight = weight[:, :rows]
        sync(device)
        started = time.perf_counter()
        obc_trajectory(weight, hessian, pruning.percdamp, max_sparsity=pruning.layer_sparsity[name]).at(
            pruning.layer_sparsity[name]
        )
        sync(device)
        total += (time.perf_counter() - started) * scale
    return total


def run_case(name: str, reps: int, views: int, sparsity: float, args, log) -> List[Tuple[str, ...]]:
    arch, size, device = CASES[name]
    dev = torch.device(device)
    model, x = build(arch, size, dev)
    big = arch == "resnet50" and device == "cpu"
    used_views = min(views, args.r50_views) if big else views
    pruning = SampleTargetedPruning(model, sparsity=sparsity, n_augmentations=used_views, internal_batch_size=64)
    saliency = Saliency(model)
    moments = pruning.second_moments(x)
    weights = pruning.solve(moments)

    def attribution():
        with swapped_parameters(model, weights):
            saliency.attribute(x, target=0)

    runners: Dict[str, Callable[[], object]] = {
        "views": lambda: pruning.calibration_batch(x),
        "moments": lambda: pruning.second_moments(x),
        "solve sparsegpt": lambda: pruning.solve(moments),
        "attribution": attribution,
    }
    log(f"{name}: warm-up ({used_views} views)")
    for run in runners.values():
        run()
    times = interleaved_times(runners, reps, dev, log)
    scale = views / used_views
    rows = []
    for phase, values in times.items():
        how = "measured"
        if phase in ("views", "moments") and scale != 1:
            values = [v * scale for v in values]
            how = f"{used_views} views, scaled to {views}"
        rows.append((name, phase, f"{median(values):.3f}", f"{min(values):.3f}", how))
    if not args.no_obc:
        obc_rows = args.r50_rows if big else None
        log(f"{name}: OBC" + (f" on {obc_rows} rows per layer" if obc_rows else ""))
        values = [obc_rows_seconds(pruning, moments, obc_rows, dev) for _ in range(1 if big else reps)]
        how = f"{obc_rows} rows per layer, scaled to all rows" if obc_rows else "measured"
        rows.append((name, "solve obc", f"{median(values):.3f}", f"{min(values):.3f}", how))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, 64 views, ResNet-20 only")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per phase (default 3)")
    parser.add_argument("--views", type=int, default=1024, help="calibration views (default 1024, the paper's)")
    parser.add_argument("--sparsity", type=float, default=0.9, help="sparsity of every layer but the stem (0.9)")
    parser.add_argument("--r50-views", type=int, default=32, help="views measured on the CPU ResNet-50 (32)")
    parser.add_argument("--r50-rows", type=int, default=4, help="OBC rows per layer measured on the CPU ResNet-50 (4)")
    parser.add_argument("--no-obc", action="store_true", help="skip the OBC solver")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = parser.parse_args(argv)
    reps = 1 if args.quick else args.reps
    views = 64 if args.quick else args.views
    cases = ["resnet20-32-cpu"] if args.quick else args.cases
    log = make_logger()
    has_cuda = torch.cuda.is_available()
    rows: List[Tuple[str, ...]] = []
    lines = [
        f"sparsity {args.sparsity:g} of every convolution and the classifier but the stem, {views} calibration "
        f"views, median and minimum of {reps} interleaved repetitions, seconds per sample."
    ]
    devices = ["cpu"]
    for name in cases:
        if CASES[name][2] == "cuda" and not has_cuda:
            lines.append(f"{name}: not run, no CUDA device on this machine.")
            continue
        if CASES[name][2] == "cuda" and "cuda" not in devices:
            devices.append("cuda")
        rows += run_case(name, reps, views, args.sparsity, args, log)
    print_report(devices, HEADER, rows, lines, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
