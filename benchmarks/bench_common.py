"""What every benchmark script shares: the seeded models, interleaved timing, the environment
lines and the tables. Each script measures ratios against a baseline run side by side in the
same process (machines are noisy: ratios, not seconds)."""

from __future__ import annotations

import copy
import ctypes
import gc
import importlib.util
import math
import multiprocessing
import platform
import resource
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

import captum_paramsal


def build_torchvision_model(arch: str, num_classes: int, seed: int = 0) -> nn.Module:
    """A torchvision model with seeded random weights (no download), in eval mode."""
    import torchvision

    torch.manual_seed(seed)
    return getattr(torchvision.models, arch)(num_classes=num_classes).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_free_heap() -> None:
    """Collect garbage and hand freed heap back to the OS, so one method's peak does not carry."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def interleaved_times(
    runners: Dict[str, Callable[[], object]],
    reps: int,
    device: torch.device,
    log: Optional[Callable[[str], None]] = None,
    freeze_gc: bool = False,
) -> Dict[str, List[float]]:
    """Wall-clock seconds of each runner, ``reps`` times, interleaved within each repetition with
    the order rotated from one repetition to the next, so that drifting machine load touches every
    method alike. Warm the runners up before calling this. ``freeze_gc``: the objects alive now
    are left out of the collection run before each call (``gc.freeze``), so that it takes
    milliseconds, not tenths of a second, in a process that imported large libraries (Opacus,
    BackPACK, transformers); the timed calls are the same either way."""
    names = list(runners)
    times: Dict[str, List[float]] = {name: [] for name in names}
    if freeze_gc:
        gc.collect()
        gc.freeze()
    try:
        for rep in range(reps):
            if log is not None:
                log(f"repetition {rep + 1}/{reps}")
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                gc.collect()
                sync(device)
                start = time.perf_counter()
                out = runners[name]()
                sync(device)
                times[name].append(time.perf_counter() - start)
                del out
    finally:
        if freeze_gc:
            gc.unfreeze()
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment_lines(devices: Sequence[str]) -> List[str]:
    """The command and the versions and hardware behind a table."""
    import captum
    import torchvision

    lines = [
        f"command: {shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}",
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, captum {captum.__version__}, "
        f"captum_paramsal {captum_paramsal.__version__}, Python {platform.python_version()}",
        f"CPU: {cpu_model()}, torch threads: {torch.get_num_threads()}",
    ]
    if "cuda" in devices:
        lines.append(f"GPU: {torch.cuda.get_device_name()}")
    return lines


def cuda_devices_note(devices: Sequence[str], wanted_cuda: bool) -> List[str]:
    if wanted_cuda and "cuda" not in devices:
        return ["CUDA case skipped: no CUDA device on this machine."]
    return []


def format_plain(header: Sequence[str], rows: Sequence[Tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [tuple(header), *rows]) for i in range(len(header))]
    out = []
    for i, row in enumerate([tuple(header), *rows]):
        out.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_markdown(header: Sequence[str], rows: Sequence[Tuple[str, ...]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)


def print_report(
    devices: Sequence[str],
    header: Sequence[str],
    rows: Sequence[Tuple[str, ...]],
    lines: Sequence[str],
    markdown: bool,
) -> None:
    """The environment, the table and the summary lines, as plain text or Markdown."""
    env = environment_lines(devices)
    if markdown:
        print("```\n" + "\n".join(env) + "\n```\n")
        print(format_markdown(header, rows) if rows else "(no case ran)")
        print()
        for line in lines:
            print(f"- {line}")
    else:
        print("\n".join(env) + "\n")
        print(format_plain(header, rows) if rows else "(no case ran)")
        print()
        print("\n".join(lines))


def make_logger() -> Callable[[str], None]:
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return log


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` says memory ran out (CPU or CUDA)."""
    text = str(error).lower()
    return (isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in text
            or "can't allocate" in text)


def forked_peak_rss(
    prepare: Callable[[], Union[str, Callable[[], Any]]], error_status: Callable[[BaseException], str]
) -> Tuple[str, Optional[float]]:
    """``(status, MiB)``: the peak RSS increase of one call, measured in a forked child process
    (so that what the parent already holds does not count). In the child, ``prepare()`` builds
    what the call needs and returns it (or a status to report instead, e.g. ``"n/a"``); the free
    heap is released, and the call runs between two reads of the peak RSS. ``error_status``
    turns an error in the child into its status ("OOM" when the kernel killed it silently)."""
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)

    def child_main() -> None:
        try:
            call = prepare()
            if isinstance(call, str):
                sender.send((call, None))
                return
            release_free_heap()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            call()
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            sender.send(("ok", (after - before) / 1024.0))  # ru_maxrss is in KiB on Linux
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            sender.send(("OOM" if is_oom(error) else error_status(error), None))
        finally:
            sender.close()

    child = ctx.Process(target=child_main)
    child.start()
    sender.close()
    message: Optional[Tuple[str, Optional[float]]] = None
    try:
        message = receiver.recv()
    except EOFError:
        pass
    child.join()
    if message is None:
        # killed without a word: the kernel's OOM killer (SIGKILL) is the usual reason
        return ("OOM" if child.exitcode == -9 else f"child died (exit code {child.exitcode})", None)
    return message


def cuda_peak_memory(call: Callable[[], Any], device: torch.device) -> float:
    """Peak of allocated CUDA memory (MiB) during one ``call()``, above what was allocated before it."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


@dataclass
class MethodResult:
    """One method's figures in one case."""

    times: List[float] = field(default_factory=list)
    peak_mib: Optional[float] = None
    rel_diff: Optional[float] = None
    warmup_s: Optional[float] = None  # the first, untimed call (compiling, for "compiled")
    status: str = "ok"  # "ok", "OOM", "n/a" or an error summary

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else math.nan


def fmt(value: Optional[float], spec: str) -> str:
    """``value`` formatted by ``spec``; "-" for None or NaN."""
    return "-" if value is None or math.isnan(value) else format(value, spec)


def layout_rel_diff(result: torch.Tensor, reference: torch.Tensor, layout: Any) -> float:
    """Max over the layout's parameters of ``max|a - ref| / max|ref|`` over that parameter's
    columns (inf where the shapes differ).

    Scaled per parameter, not per entry: a unit whose saliency is 1e-5 of its layer's largest
    carries float32 round-off of its own size (the naive loop in float32 differs from a float64
    run by ~1e-3 per entry there), which says nothing about whether the work is the same.
    """
    result, reference = result.double().cpu(), reference.double().cpu()
    if result.shape != reference.shape:
        return math.inf
    worst = 0.0
    for entry in layout:
        a, ref = result[:, entry.slice], reference[:, entry.slice]
        worst = max(worst, float((a - ref).abs().max()) / max(float(ref.abs().max()), 1e-30))
    return worst


# ----------------------------------------------------------------------------------------------
# A transformer model (bench_transformers.py's and bench_saliency.py's ``encoder`` case)
# ----------------------------------------------------------------------------------------------


class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoder`` over ``(B, T, d_model)`` inputs, mean-pooled, a Linear classifier."""

    def __init__(self, d_model: int = 256, heads: int = 4, feedforward: int = 1024, layers: int = 2,
                 classes: int = 10) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, heads, feedforward, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(1))


# ----------------------------------------------------------------------------------------------
# Peers: Opacus and BackPACK per-sample gradients of the selected weights
# ----------------------------------------------------------------------------------------------

#: the package each peer method needs (methods not listed need none)
PEER_PACKAGES: Dict[str, str] = {
    "opacus": "opacus",
    "opacus-functorch": "opacus",
    "backpack": "backpack",
    "backpack-fx": "backpack",
}


def installed(method: str) -> bool:
    """Whether the package ``method`` needs (``PEER_PACKAGES``) is installed."""
    package = PEER_PACKAGES.get(method)
    return package is None or importlib.util.find_spec(package) is not None


def short_reason(error: BaseException) -> str:
    """``error`` on one line, cut to a table cell."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:110]


def frozen_copy(model: nn.Module, names: Sequence[str]) -> Tuple[nn.Module, List[nn.Parameter]]:
    """A deep copy of ``model`` (tied weights stay tied) with only the parameters ``names`` trainable,
    and those parameters of the copy, in that order."""
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    selected = [params[name] for name in names]
    keep = {id(p) for p in selected}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model, selected


def _dropout_off(module: nn.Module) -> None:
    if isinstance(module, nn.Dropout):
        module.p = 0.0
    for attr in ("attention_dropout", "dropout"):  # HF attention modules keep plain floats
        if isinstance(getattr(module, attr, None), float):
            setattr(module, attr, 0.0)


def train_mode_without_dropout(model: nn.Module) -> None:
    """Training mode (Opacus records activations only in training mode) with every dropout off,
    so that the copy computes what the eval-mode model does (where nothing else, e.g. a
    BatchNorm, depends on the mode)."""
    model.train()
    for module in model.modules():
        _dropout_off(module)


def train_mode_where_hooked(model: nn.Module) -> None:
    """Eval mode everywhere except the modules that own a trainable parameter (the ones Opacus
    hooks; it records their activations only in training mode), each set to training mode on its
    own (not its children) with its dropout off: a frozen BatchNorm stays in eval mode, on its
    running statistics, as in the eval-mode model."""
    model.eval()
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.training = True
            _dropout_off(module)


def prepare_opacus(
    model: nn.Module,
    names: Sequence[str],
    *,
    force_functorch: bool = False,
    train_mode: Callable[[nn.Module], None] = train_mode_without_dropout,
    strict: bool = False,
) -> Tuple[Any, List[nn.Parameter]]:
    """``opacus.GradSampleModule`` (``loss_reduction="sum"``, batch first) around a frozen copy of
    ``model`` (``frozen_copy``) put in training mode by ``train_mode``, and the copy's selected
    parameters. ``force_functorch``: Opacus's functorch mode (``vmap`` of each hooked layer's
    own gradient) instead of its per-layer-type hooks."""
    from opacus import GradSampleModule

    copied, selected = frozen_copy(model, names)
    train_mode(copied)
    wrapped = GradSampleModule(copied, batch_first=True, loss_reduction="sum", strict=strict,
                               force_functorch=force_functorch)
    return wrapped, selected


def prepare_backpack(
    model: nn.Module, names: Sequence[str], use_converter: bool = False
) -> Tuple[Any, List[nn.Parameter]]:
    """BackPACK's ``extend`` of a frozen copy of ``model`` (``frozen_copy``), and its selected
    parameters. ``use_converter``: ``extend(..., use_converter=True)``, which first rewrites the
    model by ``torch.fx`` (e.g. a residual ``out += identity`` into a module of its own); the
    selected parameters are then looked up by name in the rewritten model."""
    from backpack import extend

    copied, selected = frozen_copy(model, names)
    if not use_converter:
        return extend(copied), selected
    converted = extend(copied, use_converter=True)
    params = dict(converted.named_parameters())
    return converted, [params[name] for name in names]


def per_sample_grads(
    names: Sequence[str], selected: Sequence[nn.Parameter], attr: str, owner: nn.Module
) -> List[Tensor]:
    """Each selected weight's per-sample gradient (its attribute ``attr``), or a ``RuntimeError``
    naming the layer types (in ``owner``) where a peer left a selected weight without one."""
    missing = [n for n, p in zip(names, selected) if getattr(p, attr, None) is None]
    if missing:
        kinds = sorted({type(owner.get_submodule(n.rsplit(".", 1)[0])).__name__ for n in missing})
        raise RuntimeError(f"no {attr} for {len(missing)} of {len(selected)} weights ({', '.join(kinds)})")
    return [getattr(p, attr) for p in selected]


def opacus_grads(
    prepared: Tuple[Any, List[nn.Parameter]],
    names: Sequence[str],
    owner: nn.Module,
    losses_of: Callable[[nn.Module], Tensor],
) -> List[Tensor]:
    """The per-sample gradients (``p.grad_sample``) of the selected weights from one forward
    (``losses_of(wrapped)``: the ``(B,)`` per-sample losses) and a backward of their sum, with
    ``prepare_opacus``'s ``prepared``; the attributes are cleared again afterwards."""
    wrapped, selected = prepared
    for p in selected:
        p.grad_sample = None
        p.grad = None
    try:
        losses_of(wrapped).sum().backward()
        return per_sample_grads(names, selected, "grad_sample", owner)
    finally:
        for p in selected:
            p.grad_sample = None
            p.grad = None


def backpack_grads(
    prepared: Tuple[Any, List[nn.Parameter]],
    names: Sequence[str],
    owner: nn.Module,
    losses_of: Callable[[nn.Module], Tensor],
) -> List[Tensor]:
    """The per-sample gradients (``p.grad_batch``, BackPACK's ``BatchGrad``) of the selected
    weights from one forward (``losses_of(model)``: the ``(B,)`` per-sample losses) and a backward
    of their sum, with ``prepare_backpack``'s ``prepared``; the attributes are cleared afterwards."""
    from backpack import backpack
    from backpack.extensions import BatchGrad

    model, selected = prepared
    for p in selected:
        p.grad = None
    try:
        losses = losses_of(model)
        with backpack(BatchGrad()):
            losses.sum().backward()
        return per_sample_grads(names, selected, "grad_batch", owner)
    finally:
        for p in selected:
            p.grad = None
            if hasattr(p, "grad_batch"):
                del p.grad_batch
