"""Benchmark: ``ParameterSaliency.fit_stats`` against the naive per-sample loop over the same data.

What is measured
----------------
Both compute the reference statistics (docs/METHOD.md, "Standardization") (per-unit mean and standard deviation of the
per-sample saliency over a data set) of a torchvision model with seeded random weights over
generated images, one DataLoader of ``(inputs, labels)`` batches:

* ``fit_stats``  ``ParameterSaliency(model).fit_stats(loader, progress=False)``: one batched
  forward and backward per batch, streaming float64 Welford/Chan accumulation.
* ``compiled``   the same from ``ParameterSaliency(model, compile_kernels=True)``; compiling
  happens in its untimed warm-up pass (its time is in the summary), and its statistics are
  checked against ``fit_stats``'s (float32, relative difference).
* ``naive``      what the paper authors' reference code does: for every sample, a forward of
  that one sample, ``torch.autograd.grad`` over the selected weights, the per-unit mean of
  ``|grad|`` kept; at the end the mean and std of the stacked profiles.
* ``fwd+bwd``    context, not a method: one plain forward+backward of every batch.

The two results are compared first on a float64 copy of the model (max relative difference
of mean and std; see :func:`check_float64`), then timed interleaved in float32; the table
gives samples per second and ``fit_stats / naive``, the speed-up.

Run ``python benchmarks/bench_stats.py`` (``--quick`` for a smoke run, ``--markdown`` for
docs/PERFORMANCE.md). The CUDA case runs when a GPU is present.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from captum_paramsal import ParameterSaliency

from bench_common import build_torchvision_model, interleaved_times, make_logger, median, print_report


@dataclass(frozen=True)
class Case:
    name: str
    arch: str
    image_size: int
    samples: int
    batch: int
    device: str


CASES = {
    "resnet18-cpu": Case("resnet18-cpu", "resnet18", 32, 256, 64, "cpu"),
    "resnet18-cuda": Case("resnet18-cuda", "resnet18", 32, 2048, 256, "cuda"),
}
NUM_CLASSES = 10


def make_loader(case: Case, quick: bool) -> DataLoader:
    samples = 32 if quick else case.samples
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(samples, 3, case.image_size, case.image_size, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (samples,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=min(case.batch, samples))


def naive_stats(model, names: Sequence[str], loader: DataLoader, device: torch.device) -> Tuple[torch.Tensor, ...]:
    params = dict(model.named_parameters())
    weights = [params[n] for n in names]
    rows = []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        for i in range(x.shape[0]):
            loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            grads = torch.autograd.grad(loss, weights)
            rows.append(torch.cat([g.abs().flatten(1).mean(1) for g in grads]).to(torch.float64))
    profiles = torch.stack(rows)
    return profiles.mean(0), profiles.std(0)  # sample std (N - 1), as docs/METHOD.md says


def fwd_bwd(model, loader: DataLoader, device: torch.device) -> None:
    for x, y in loader:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
    model.zero_grad(set_to_none=True)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max() / b.double().abs().max().cpu())


def check_float64(model, loader: DataLoader, device: torch.device, samples: int = 64) -> float:
    """fit_stats against the naive loop on a float64 copy of the model and the first samples.

    In float32 the two differ by up to ~1e-3 (relative) in the early layers of a randomly
    initialized ResNet: batched and one-sample convolutions round differently, and a ReLU or
    max-pool tie that flips in one sample moves that sample's gradient. In float64 they agree
    to round-off, which is what shows that the timed runs do the same work."""
    model64 = copy.deepcopy(model).double()
    x, y = loader.dataset.tensors
    loader64 = DataLoader(TensorDataset(x[:samples].double(), y[:samples]), batch_size=loader.batch_size)
    ps = ParameterSaliency(model64)
    stats = ps.fit_stats(loader64, progress=False)
    mean, std = naive_stats(model64, ps.layout.names, loader64, device)
    return max(rel_diff(stats.mean, mean), rel_diff(stats.std, std))


def run_case(case: Case, device: str, quick: bool, reps: int, log) -> Tuple[List[Tuple[str, ...]], str]:
    model = build_torchvision_model(case.arch, NUM_CLASSES).to(device)
    loader = make_loader(case, quick)
    samples = len(loader.dataset)
    ps = ParameterSaliency(model)
    dev = torch.device(device)

    log(f"{case.name}: check (float64) and warm-up")
    diff = check_float64(model, loader, dev)
    if diff > 1e-8:
        raise AssertionError(f"{case.name}: fit_stats differs from the naive loop by {diff:.3g}")
    eager = ps.fit_stats(loader, progress=False)
    compiled_ps = ParameterSaliency(model, compile_kernels=True)
    started = time.perf_counter()
    compiled = compiled_ps.fit_stats(loader, progress=False)
    compile_s = time.perf_counter() - started
    diff_compiled = max(rel_diff(compiled.mean, eager.mean), rel_diff(compiled.std, eager.std))
    if diff_compiled > 1e-4:
        raise AssertionError(f"{case.name}: compiled fit_stats differs from fit_stats by {diff_compiled:.3g}")
    naive_stats(model, ps.layout.names, loader, dev)
    fwd_bwd(model, loader, dev)

    runners = {
        "fwd+bwd": lambda: fwd_bwd(model, loader, dev),
        "fit_stats": lambda: ps.fit_stats(loader, progress=False),
        "compiled": lambda: compiled_ps.fit_stats(loader, progress=False),
        "naive": lambda: naive_stats(model, ps.layout.names, loader, dev),
    }
    times = {name: median(values) for name, values in interleaved_times(runners, reps, dev, log).items()}
    size = case.image_size
    label = f"{case.name} ({device}, {samples} samples of 3x{size}x{size}, batch {loader.batch_size})"
    rows = [
        (label, name, f"{times[name]:.2f}", f"{samples / times[name]:.0f}",
         f"{times['naive'] / times[name]:.2f}", f"{times[name] / times['fwd+bwd']:.2f}")
        for name in ("fwd+bwd", "fit_stats", "compiled", "naive")
    ]
    summary = (
        f"{case.name}: fit_stats {samples / times['fit_stats']:.0f} samples/s, naive loop "
        f"{samples / times['naive']:.0f} samples/s: "
        f"fit_stats / naive speed-up = {times['naive'] / times['fit_stats']:.2f}; "
        f"max rel diff of mean and std vs naive (float64) = {diff:.1e}; compiled: "
        f"{samples / times['compiled']:.0f} samples/s, {times['compiled'] / times['fwd+bwd']:.2f} fwd+bwd, "
        f"its first pass (compiling) {compile_s:.1f} s, max rel diff vs fit_stats (float32) {diff_compiled:.1e}; "
        f"{reps} reps"
    )
    return rows, summary


HEADER = ("case", "method", "median s", "samples/s", "naive / this", "/ fwd+bwd")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, out of {', '.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 samples, 1 repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    log = make_logger()
    rows, lines, devices = [], [], []
    for name in args.cases.split(","):
        case = CASES[name.strip()]
        if case.device == "cuda" and not torch.cuda.is_available():
            lines.append(f"{case.name}: skipped, no CUDA device on this machine")
            continue
        case_rows, summary = run_case(case, case.device, args.quick, 1 if args.quick else args.reps, log)
        rows += case_rows
        lines.insert(0, summary)
        devices.append(case.device)
    lines.append("Times: median over the repetitions, methods interleaved; 'naive / this' = the naive loop's time "
                 "over this method's (the speed-up); '/ fwd+bwd' = time over plain forward+backward passes of the "
                 "same batches.")
    print_report(sorted(set(devices)), HEADER, rows, lines, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
