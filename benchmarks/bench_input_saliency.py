"""Benchmark: ParameterGuidedInputSaliency against a plain forward+backward and the naive loop.

What is measured
----------------
The filter-boosting input saliency (docs/METHOD.md, "Which input features make the units
malfunction") of a batch, with reference statistics (fitted on
other generated images before the timing, as a user would), ``k = 10``:

* ``fwd+bwd``  the bar, not a method: one plain forward and backward of the batch.
* ``ours``     ``ParameterGuidedInputSaliency.from_parameter_saliency(ps).attribute(x, target=y)``:
  the saliency kept differentiable through the per-layer rules and one more backward to the
  input, for the whole batch at once.
* ``compiled`` the same from ``ParameterSaliency(model, compile_kernels=True)`` (opt-in
  ``torch.compile``d kernels for the low-rank layers); compiling happens in its untimed
  warm-up call, whose time the summary gives.
* ``naive``    what the paper authors' reference code does, per sample: a forward, the
  parameter gradients with ``create_graph=True``, the standardized profile, top-k, the boosted
  copy, the cosine, and ``torch.autograd.grad`` of it to the input.

Both results are compared first (max relative difference), then timed interleaved. The
targets: ``ours / fwd+bwd`` at most 5; ``naive / ours`` is the speed-up over the loop.

Run ``python benchmarks/bench_input_saliency.py`` (``--quick`` for a smoke run, ``--markdown``
for docs/PERFORMANCE.md). The CUDA case runs when a GPU is present.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from captum_paramsal import ParameterGuidedInputSaliency, ParameterSaliency

from bench_common import build_torchvision_model, interleaved_times, make_logger, median, print_report, sync

TARGET_RATIO = 5.0
NUM_CLASSES = 10
K = 10
CASES = {"resnet18-cpu": ("resnet18", 32, 64, "cpu"), "resnet18-cuda": ("resnet18", 32, 64, "cuda")}


def naive_boosting(model, x, y, names, stats, k=K, boost=100.0):
    params = dict(model.named_parameters())
    weights = [params[n] for n in names]
    rows = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        loss = F.cross_entropy(model(xi), y[i : i + 1])
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        s = torch.cat([g.abs().flatten(1).mean(1) for g in grads])
        z = (s - stats.mean.to(s)) / stats.scale.to(s)
        boosted = z.detach().clone()
        top = boosted.topk(k).indices
        boosted[top] = boosted[top] * boost
        rows.append(torch.autograd.grad(F.cosine_similarity(z, boosted, dim=0), xi)[0])
    return torch.cat(rows)


def fwd_bwd(model, x, y) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


HEADER = ("case", "method", "median ms", "min ms", "/ fwd+bwd", "naive / this")


def run_case(name: str, quick: bool, reps: int, log) -> Tuple[List[Tuple[str, ...]], str]:
    arch, size, batch, device = CASES[name]
    batch = 8 if quick else batch
    dev = torch.device(device)
    model = build_torchvision_model(arch, NUM_CLASSES).to(dev)
    generator = torch.Generator().manual_seed(1)
    reference = [
        (torch.randn(batch, 3, size, size, generator=generator), torch.randint(0, NUM_CLASSES, (batch,)))
        for _ in range(2)
    ]
    x = torch.randn(batch, 3, size, size, generator=generator).to(dev)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(dev)
    ps = ParameterSaliency(model)
    ps.stats = ps.fit_stats(reference, progress=False)
    pgis = ParameterGuidedInputSaliency.from_parameter_saliency(ps, k=K)
    compiled_ps = ParameterSaliency(model, stats=ps.stats, compile_kernels=True)
    compiled = ParameterGuidedInputSaliency.from_parameter_saliency(compiled_ps, k=K)

    log(f"{name}: warm-up and check")
    ours = pgis.attribute(x, target=y)
    naive = naive_boosting(model, x, y, ps.layout.names, ps.stats)
    diff = float((ours - naive).abs().max() / naive.abs().max())
    if diff > 1e-3:
        raise AssertionError(f"{name}: ours differs from the naive loop by {diff:.3g}")
    started = time.perf_counter()
    ours_compiled = compiled.attribute(x, target=y)
    sync(dev)
    compile_s = time.perf_counter() - started
    diff_compiled = float((ours_compiled - naive).abs().max() / naive.abs().max())
    if diff_compiled > 1e-3:
        raise AssertionError(f"{name}: compiled differs from the naive loop by {diff_compiled:.3g}")
    fwd_bwd(model, x, y)

    runners = {
        "fwd+bwd": lambda: fwd_bwd(model, x, y),
        "ours": lambda: pgis.attribute(x, target=y),
        "compiled": lambda: compiled.attribute(x, target=y),
        "naive": lambda: naive_boosting(model, x, y, ps.layout.names, ps.stats),
    }
    times = interleaved_times(runners, reps, dev, lambda m: log(f"{name}: {m}"))
    med = {method: median(values) for method, values in times.items()}
    label = f"{name} ({device}, {batch}x3x{size}x{size})"
    rows = [
        (label, method, f"{med[method] * 1e3:.1f}", f"{min(times[method]) * 1e3:.1f}",
         f"{med[method] / med['fwd+bwd']:.2f}", f"{med['naive'] / med[method]:.2f}")
        for method in runners
    ]
    ratio = med["ours"] / med["fwd+bwd"]
    ratio_compiled = med["compiled"] / med["fwd+bwd"]
    summary = (
        f"{name}: ours / fwd+bwd = {ratio:.2f} (target <= {TARGET_RATIO:g}: "
        f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}); compiled / fwd+bwd = {ratio_compiled:.2f} "
        f"({'met' if ratio_compiled <= TARGET_RATIO else 'NOT met'}; its first call, compiling, took "
        f"{compile_s:.1f} s); naive / ours = {med['naive'] / med['ours']:.2f}; "
        f"max rel diff vs naive = {diff:.1e} (compiled: {diff_compiled:.1e}); {reps} reps"
    )
    return rows, summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, out of {', '.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 8, 1 repetition")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    log = make_logger()
    rows, lines, devices = [], [], []
    for name in (n.strip() for n in args.cases.split(",")):
        if CASES[name][3] == "cuda" and not torch.cuda.is_available():
            lines.append(f"{name}: skipped, no CUDA device on this machine")
            continue
        case_rows, summary = run_case(name, args.quick, 1 if args.quick else args.reps, log)
        rows += case_rows
        lines.insert(0, summary)
        devices.append(CASES[name][3])
    lines.append("Times: median (and min) over the repetitions, methods interleaved.")
    print_report(sorted(set(devices)), HEADER, rows, lines, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
