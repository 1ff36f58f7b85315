"""Benchmark: seconds per sample to draw SPADE's calibration views, batched against a v2 loop.

What is measured
----------------
For one ``3 x S x S`` image (values in [0, 1], seeded) and ``V`` views (default 1024, the paper's
count), the calibration batch ``(V, 3, S, S)``: row 0 the image, then ``V - 1`` random views with
the paper's settings (random resized crop of area scale 0.2 to 1 and aspect ratio 3/4 to 4/3,
horizontal flip with probability 1/2, colour jitter of brightness 0.5 and hue 0.3):

* ``v2 loop``  the baseline: a plain Python loop of ``v2.Compose([RandomResizedCrop(S,
  scale=(0.2, 1), antialias=True), RandomHorizontalFlip(), ColorJitter(brightness=0.5,
  hue=0.3)])`` on the image, one view at a time, then ``torch.stack``.
* ``batched``  ``captum_paramsal.spade.augmented_batch((image,), V, seed=0)``: the default
  ``DefaultAugmentation`` draws all views at once (one ``grid_sample`` for crops, resizes and
  flips; batched colour jitter; see ``captum_paramsal/spade/augment.py``).
* ``previous default``  context (leave it out with ``--no-previous``): what ``augmented_batch``
  did before by default, the previous ``DefaultAugmentation`` (crop scale 0.35 to 1, brightness,
  contrast and saturation 0.3, hue 0.05, jitter on the image rescaled by its min and max) one
  view at a time; other settings than the paper's, so not the bar, but the old cost of a sample.

``v2 loop`` and ``batched`` make the same batch shape from the same distribution of crops, flips
and colour factors (the batched crops are not antialiased, which changes nothing here: a crop of
the image itself is never larger than the output). The methods run interleaved in one process,
the order rotated from one repetition to the next (``bench_common.interleaved_times``), after one
untimed warm-up call each; the table gives the median and minimum seconds per sample and
``v2 loop / method``, the speed-up. Cases: ``S = 32`` and ``S = 224`` on the CPU, with torch's
default thread count unless ``--threads`` is given. Both methods write a fresh ``(V, 3, S, S)``
batch, whose first touch (page faults: ~0.3 s for 616 MB at ``S = 224``) both pay. CPU load
from other processes slows both; with intra-op threads competing for the cores it slows them
erratically, so on a loaded machine compare with ``--threads 1``.

Run ``python benchmarks/bench_spade_views.py`` (``--quick`` for a smoke run: 1 repetition,
64 views; ``--markdown`` for docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from captum_paramsal.spade import augmented_batch

from bench_common import interleaved_times, make_logger, median, print_report

SIZES = (32, 224)
HEADER = ("case", "method", "median s", "min s", "v2 loop / method")


def v2_loop(image: Tensor, n_views: int) -> Callable[[], Tensor]:
    """The baseline: one torchvision v2 pipeline call per view, stacked behind the image."""
    from torchvision.transforms import v2

    size = image.shape[-1]
    pipeline = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.5, hue=0.3),
        ]
    )
    sample = image[0]

    def run() -> Tensor:
        return torch.stack([sample] + [pipeline(sample) for _ in range(n_views - 1)])

    return run


def previous_default_loop(image: Tensor, n_views: int) -> Callable[[], Tensor]:
    """Context: what the previous ``DefaultAugmentation`` did (crop scale 0.35 to 1, brightness,
    contrast and saturation 0.3, hue 0.05, jitter on the image rescaled by its min and max), one
    view at a time, the v2 transforms built at every call as it built them."""
    from torchvision.transforms import v2

    sample = image[0]
    height, width = sample.shape[-2:]

    def view() -> Tensor:
        geometric = v2.Compose(
            [v2.RandomResizedCrop((height, width), scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        )
        out = geometric(sample)
        colour = v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05)
        low, high = sample.min(), sample.max()
        span = high - low
        return colour((out - low) / span).clamp(0, 1) * span + low

    def run() -> Tensor:
        return torch.stack([sample] + [view() for _ in range(n_views - 1)])

    return run


def batched(image: Tensor, n_views: int) -> Callable[[], Tensor]:
    """The new default: ``augmented_batch``, all views drawn at once."""

    def run() -> Tensor:
        return augmented_batch((image,), n_views, seed=0)[0]

    return run


def run_case(
    size: int, n_views: int, reps: int, previous: bool, log: Callable[[str], None]
) -> Tuple[List[Tuple[str, ...]], Dict[str, float]]:
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    runners: Dict[str, Callable[[], Tensor]] = {"v2 loop": v2_loop(image, n_views), "batched": batched(image, n_views)}
    if previous:
        runners["previous default"] = previous_default_loop(image, n_views)
    name = f"3x{size}x{size}, {n_views} views"
    log(f"{name}: warm-up")
    for method, run in runners.items():
        out = run()
        if out.shape != (n_views, 3, size, size):
            raise RuntimeError(f"{method} made a batch of shape {tuple(out.shape)}")
        if float(out.min()) < -1e-5 or float(out.max()) > 1 + 1e-5:
            raise RuntimeError(f"{method} left the image's value range [0, 1]")
        del out
    times = interleaved_times(runners, reps, torch.device("cpu"), log)
    baseline = median(times["v2 loop"])
    rows = []
    for method, values in times.items():
        rows.append((name, method, f"{median(values):.3f}", f"{min(values):.3f}", f"{baseline / median(values):.1f}x"))
    return rows, {method: median(values) for method, values in times.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, 64 views")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--views", type=int, default=1024, help="views per sample, the sample included (default 1024)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="image sizes S (default 32 224)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--no-previous", action="store_true", help="leave out the previous default (context row)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reps = 1 if args.quick else args.reps
    n_views = 64 if args.quick else args.views
    if reps < 1 or n_views < 2 or any(s < 1 for s in args.sizes):
        parser.error("--reps must be at least 1, --views at least 2 and --sizes positive")
    log = make_logger()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows: List[Tuple[str, ...]] = []
    medians = []
    for size in args.sizes:
        case_rows, case_medians = run_case(size, n_views, reps, not args.no_previous, log)
        rows += case_rows
        medians.append((size, case_medians))
    lines = [
        f"{n_views} views per sample (the sample included), median and minimum of {reps} interleaved repetitions, "
        "seconds per sample, CPU.",
        "batched is "
        + ", ".join(f"{m['v2 loop'] / m['batched']:.1f}x faster at 3x{size}x{size}" for size, m in medians)
        + " than the v2 loop (the paper's settings, one view at a time).",
    ]
    if not args.no_previous:
        lines.append(
            "batched (the new default) against the previous default: "
            + ", ".join(f"{m['previous default'] / m['batched']:.1f}x at 3x{size}x{size}" for size, m in medians)
            + "."
        )
    lines += [
        f"load average (1 min) at the start: {load:.2f} on {os.cpu_count()} CPUs; on a loaded machine prefer "
        "--threads 1 (intra-op threads competing with other processes for the cores slow both methods erratically).",
    ]
    print_report(["cpu"], HEADER, rows, lines, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
