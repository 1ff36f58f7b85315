"""Benchmark: ``pruning_curves`` by its batched paths (channel masks, vmap) against its loop, on a ResNet-20.

What is measured
----------------
The paper's pruning test (docs/METHOD.md, "The paper's validation experiments") on the clean
test set of the trojaned digits ResNet-20 (``load_trojan_resnet()``: 2000 composites, about 78
of them misclassified), ``ks=(1, 5, 10, 25, 50)``, the three modes, so 15 interventions per
misclassified sample, with a ``ParameterSaliency`` standardized by statistics fitted on
``--stats`` training images:

* ``loop``   ``pruning_curves(..., method="loop")``: one ``turn_off`` block and one
  one-sample forward per intervention (what pruning_curves did before the batched paths).
* ``vmap``   ``pruning_curves(..., method="vmap")``: the interventions by ``torch.func.vmap``
  over edited weight copies, up to 64 at once.
* ``default``  ``pruning_curves(...)`` (``method="auto"``, which takes the masks path here):
  up to 64 interventions as the rows of one batched forward, each hooked convolution and
  Linear setting the row's turned-off output channels to their bias, checked against the loop
  on a few first.
All share the rest of the call: the forward over all inputs (to find the misclassified ones)
and the saliency of those. The methods run interleaved (the order rotated every repetition);
the table gives the median and minimum wall-clock seconds of the whole call, its CPU seconds,
the seconds spent on the interventions alone (timed inside the same calls), and ``loop /
this``, the speed-up, from the medians. On a shared machine the loop of many small one-sample
forwards suffers most from other processes' load (its threads wait on each other every op),
so the ratio grows with the load; compare the cpu seconds too. The records of each against the
loop's are compared (samples, k, mode and ``corrected`` flags equal; the largest difference of a
probability change, float32 round-off).

Run ``python benchmarks/bench_pruning_curves.py`` (``--quick`` for a smoke run on the first 200
test images, ``--markdown`` for docs/PERFORMANCE.md). The CUDA case runs when a GPU is present.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from captum_paramsal import ParameterSaliency
from captum_paramsal.analysis import pruning_curves, turn_off_curves
from captum_paramsal.analysis.turn_off_curves import PruningResult

from bench_common import interleaved_times, make_logger, median, print_report

HEADER = ("case", "method", "median s", "min s", "cpu s", "interventions s", "interventions/s", "loop / this")
#: the benchmark's rows: (name, pruning_curves' method)
METHODS = (("loop", "loop"), ("vmap", "vmap"), ("default", "auto"))
KS = (1, 5, 10, 25, 50)


def compare(fast: PruningResult, slow: PruningResult) -> Tuple[bool, float]:
    """``(flags and keys equal, largest difference of a probability change)``."""
    same = len(fast.records) == len(slow.records) and all(
        (a["sample"], a["k"], a["mode"], a["corrected"]) == (b["sample"], b["k"], b["mode"], b["corrected"])
        for a, b in zip(fast.records, slow.records)
    )
    worst = max(
        max(abs(a["delta_true_prob"] - b["delta_true_prob"]), abs(a["delta_wrong_prob"] - b["delta_wrong_prob"]))
        for a, b in zip(fast.records, slow.records)
    )
    return same, worst


@contextlib.contextmanager
def phase_timer(seconds: List[float]) -> Iterator[None]:
    """Inside, the wall-clock seconds that each pruning_curves call spends evaluating its
    interventions (its outermost ``_batched`` or ``_looped`` call) are appended to ``seconds``."""
    originals = {name: getattr(turn_off_curves, name) for name in ("_batched", "_looped")}
    depth = [0]

    def timed(function):
        def run(*args, **kwargs):
            depth[0] += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    seconds.append(time.perf_counter() - start)
        return run

    for name, function in originals.items():
        setattr(turn_off_curves, name, timed(function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(turn_off_curves, name, function)


def run_case(device: str, images: int, stats: int, reps: int, log) -> Tuple[List[Tuple[str, ...]], List[str]]:
    from captum_paramsal.zoo.trojan_digits import load_trojan_resnet

    log(f"{device}: loading the trojaned ResNet-20 and its data")
    model, data = load_trojan_resnet()
    model = model.to(device)
    x, y = data.test_images[:images].to(device), data.test_labels[:images].to(device)
    ps = ParameterSaliency(model)
    if stats:
        log(f"{device}: fitting statistics on {stats} training images")
        train = torch.utils.data.TensorDataset(data.train_images[:stats], data.train_labels[:stats])
        ps.stats = ps.fit_stats(torch.utils.data.DataLoader(train, batch_size=64), progress=False)
    results: Dict[str, PruningResult] = {}
    cpu: Dict[str, List[float]] = {name: [] for name, _ in METHODS}
    phase: Dict[str, List[float]] = {name: [] for name, _ in METHODS}

    def runner(name: str, method: str, inputs: torch.Tensor, labels: torch.Tensor, timed: bool = True):
        def run() -> PruningResult:
            start = time.process_time()
            with phase_timer(phase[name] if timed else []):
                results[name] = pruning_curves(model, ps, inputs, labels, ks=KS, method=method)
            if timed:
                cpu[name].append(time.process_time() - start)
            return results[name]
        return run

    log(f"{device}: warm-up on the first 100 images")
    for name, method in METHODS:
        runner(name, method, x[:100], y[:100], timed=False)()
    runners = {name: runner(name, method, x, y) for name, method in METHODS}
    times = interleaved_times(runners, reps, torch.device(device), log)
    slow = results["loop"]
    count = len(slow.records)
    case = f"resnet20-trojan-{device}"
    rows = []
    for name, _ in METHODS:
        ratio = "-"
        if name != "loop":
            ratio = (f"{median(times['loop']) / median(times[name]):.1f}x "
                     f"({median(phase['loop']) / median(phase[name]):.1f}x)")
        rows.append((case, f"{name} ({results[name].method})", f"{median(times[name]):.2f}", f"{min(times[name]):.2f}",
                     f"{median(cpu[name]):.2f}", f"{median(phase[name]):.2f}", f"{count / median(phase[name]):.0f}",
                     ratio))
    checks = []
    for name, _ in METHODS[1:]:
        same, worst = compare(results[name], slow)
        checks.append(f"{name}: {'yes' if same else 'NO'}, largest difference of a probability change {worst:.1e}")
    lines = [
        f"{case}: {x.shape[0]} test images, {slow.num_misclassified} misclassified, {count} interventions "
        f"(ks={KS}, 3 modes); records equal to the loop's (samples, k, mode and corrected flags): "
        + "; ".join(checks) + ".",
    ]
    return rows, lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the first 200 test images, statistics from 64, 1 repetition")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--images", type=int, default=2000, help="test images (default 2000, all)")
    parser.add_argument("--stats", type=int, default=256, help="training images for the statistics (0: none)")
    parser.add_argument("--devices", nargs="+", choices=("cpu", "cuda"), default=None,
                        help="default: cpu, and cuda when a GPU is present")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 1 if args.quick else args.reps
    images = 200 if args.quick else args.images
    stats = min(args.stats, 64) if args.quick else args.stats
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    log = make_logger()
    rows: List[Tuple[str, ...]] = []
    lines = [
        f"median and minimum wall-clock seconds of {reps} interleaved repetitions of one pruning_curves call; cpu s: "
        "the process's CPU seconds (median); interventions s: the part of the call spent evaluating the "
        "interventions (median), the rest (the forward over all images, the saliency) is the same in all; "
        "loop / this: of the whole call (of the interventions alone). "
        + (f"Saliency standardized by statistics from {stats} training images." if stats else "No statistics.")
    ]
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            lines.append("cuda: not run, no CUDA device on this machine.")
            continue
        found, said = run_case(device, images, stats, reps, log)
        rows += found
        lines += said
    print_report([d for d in devices if d == "cpu" or torch.cuda.is_available()], HEADER, rows, lines, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
