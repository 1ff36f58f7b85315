"""Benchmark: this checkout's engine against another checkout's, side by side in one process.

A refactor must not make the engine slower. Two separate benchmark runs cannot show that on
a noisy machine (their plain forward+backward already differ by 15% from run to run), so this
script imports both versions into ONE process, the other one under another package name, and
times them interleaved on the same model and batch:

* ``fwd+bwd``   one plain forward and backward of the batch (the yardstick);
* ``baseline``  ``ParameterSaliency(model).attribute(x, target=y)`` of the other checkout;
* ``current``   the same with this checkout's package;
* ``baseline input`` / ``current input``: ``ParameterGuidedInputSaliency(...).attribute``.

Both results are checked equal first (max relative difference printed), so the times are of
equal work. The other checkout only needs its ``captum_paramsal`` folder: it is copied into a
temporary folder as ``captum_paramsal_baseline`` (the package uses relative imports only).

Run ``python benchmarks/bench_versions.py --baseline /path/to/other/checkout`` (a ``git
worktree add /tmp/before <commit>`` gives one), ``--reps`` for more repetitions, ``--quick``
for a smoke run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision

import captum_paramsal


def load_baseline(checkout: str):
    """The other checkout's package, imported as ``captum_paramsal_baseline``."""
    source = os.path.join(checkout, "captum_paramsal")
    if not os.path.isfile(os.path.join(source, "__init__.py")):
        raise SystemExit(f"{checkout} has no captum_paramsal package")
    folder = tempfile.mkdtemp(prefix="paramsal-baseline-")
    shutil.copytree(source, os.path.join(folder, "captum_paramsal_baseline"))
    sys.path.insert(0, folder)
    return importlib.import_module("captum_paramsal_baseline")


def interleaved(runners: Dict[str, Callable[[], object]], reps: int) -> Dict[str, List[float]]:
    """Each runner ``reps`` times, in an order rotated from one repetition to the next."""
    names = list(runners)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            started = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - started)
    return times


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="path of the other checkout")
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="batch 8, 2 repetitions")
    args = parser.parse_args(argv)
    base = load_baseline(args.baseline)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    batch = 8 if args.quick else 64
    reps = 2 if args.quick else args.reps
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    saliency = {"baseline": base.ParameterSaliency(model), "current": captum_paramsal.ParameterSaliency(model)}
    boosting = {
        "baseline input": base.ParameterGuidedInputSaliency.from_parameter_saliency(saliency["baseline"], k=10),
        "current input": captum_paramsal.ParameterGuidedInputSaliency.from_parameter_saliency(saliency["current"],
                                                                                              k=10),
    }
    runners: Dict[str, Callable[[], object]] = {"fwd+bwd": fwd_bwd}
    runners.update({name: (lambda ps=ps: ps.attribute(x, target=y)) for name, ps in saliency.items()})
    runners.update({name: (lambda m=m: m.attribute(x, target=y)) for name, m in boosting.items()})
    checks = {name: run() for name, run in runners.items()}  # warm-up, and equal work
    print(f"saliency: current vs baseline max rel diff {rel(checks['current'], checks['baseline']):.1e}; "
          f"input saliency: {rel(checks['current input'], checks['baseline input']):.1e}")
    times = interleaved(runners, reps)
    yardstick = statistics.median(times["fwd+bwd"])
    print(f"\nresnet18 (cpu, {batch}x3x32x32), {reps} interleaved repetitions, torch threads "
          f"{torch.get_num_threads()}\n")
    print("| method | median ms | min ms | / fwd+bwd |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.1f} | {min(values) * 1e3:.1f} | {median / yardstick:.2f} |")
    ratio = statistics.median(times["current"]) / statistics.median(times["baseline"])
    ratio_input = statistics.median(times["current input"]) / statistics.median(times["baseline input"])
    print(f"\ncurrent / baseline: saliency {ratio:.3f}, input saliency {ratio_input:.3f} (medians)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
