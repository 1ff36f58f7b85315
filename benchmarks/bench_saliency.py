"""Benchmark: ParameterSaliency's batched engine against the other ways to get per-sample unit saliency.

What is measured
----------------
Every method computes the same thing (docs/METHOD.md, "Parameter-space saliency"): for each
sample ``i`` of a batch, the gradient
of its own cross-entropy loss over the selected weights (the default selection of
``ParameterSaliency(model)``: every Conv2d / Linear ``weight`` of a torchvision ResNet; every
Linear weight and attention in-projection of the encoder), reduced per unit (conv filter /
linear row / in-projection row) to the mean of ``|grad|``, giving a ``(B, F)`` matrix whose
columns follow ``ParameterSaliency(model).layout``.

Cases: ``resnet18`` (CPU, 32x32, batch 64), ``resnet50`` (CPU, 224x224, batch 8),
``resnet50-b64`` (CUDA, batch 64): torchvision models with seeded random weights, 10 or 1000
classes; ``encoder`` (CPU): ``nn.TransformerEncoder`` of 2 layers (d_model 256, 4 heads,
feed-forward 1024, batch first; ``bench_common.EncoderClassifier``, as in
bench_transformers.py) over ``(32, 64, 256)`` float inputs, mean-pooled, a Linear head of 10
classes (``--quick``: 1 layer, ``(8, 32, 256)``).

* ``fwd+bwd``  the bar to compare against, not a saliency method: one plain forward and backward
  of the whole batch (``model.zero_grad()``, ``model(x)``, mean cross-entropy, ``.backward()``).
* ``engine``   ``ParameterSaliency(model).attribute(x, target=y)``: the library under test.
* ``compiled`` the same with ``ParameterSaliency(model, compile_kernels=True)``: the layers of
  rank 2..16 reduced by ``torch.compile``d kernels (opt-in). Compiling happens in the warm-up
  call, which is not timed (it takes seconds: see the summary line); its CPU peak memory is not
  measured (a cold call's would be the compiler's). On the encoder no layer has rank 2..16 (the
  per-sample gradients have rank up to the sequence length, the head's rank 1): nothing is
  compiled, the row is the engine's path.
* ``rms``      ``ParameterSaliency(model, reduction="rms")``: the root-mean-square reduction
  (closed form by the Gram matrix of the layer's factors where that is cheaper); checked
  against a naive loop with the same reduction, not against the ``mean_abs`` methods.
* ``naive``    what the paper authors' reference code does: for each sample, a forward of that
  one sample, its loss, ``torch.autograd.grad`` over the selected weights, then the per-unit
  mean of ``|grad|``.
* ``vmap``     ``torch.func``: ``vmap(grad(per-sample loss))`` through ``functional_call`` over
  the selected weights (the others held fixed), then the same reduction. It materializes every
  per-sample gradient, so it can run out of memory (``--vmap-chunk`` bounds that); reported as
  ``OOM`` when it does.
* ``captum``   Captum's ``SampleGradientWrapper`` (``captum._utils.sample_gradient``): hooks on
  the Conv2d / Linear layers, one forward and ``compute_param_sample_gradients(loss, "sum")``,
  which fills ``param.sample_grad`` with per-sample gradients (of the biases too: its API has no
  way to skip them), then the same reduction. Its hooks need every hooked layer's input to
  require grad, so the batch is passed with ``requires_grad=True``. ``n/a`` when a selected weight is not a Conv2d or
  Linear weight (the encoder: its attention in-projection).

The peers (``bench_common``), each on a deep copy of the model made by its first (untimed)
call (in a CPU memory child: before the measured call), in which every parameter that is not
selected is frozen (``requires_grad_(False)``): the per-sample losses are summed and
back-propagated once, and the per-sample gradients they leave on the selected weights are
reduced as above.

* ``opacus``   ``opacus.GradSampleModule(copy, loss_reduction="sum", strict=True)``, its default
  hooks mode (a grad sampler per layer type: unfold for Conv2d, einsum for Linear);
  ``p.grad_sample``. On the ResNets it needed (1) the frozen copy: a trainable BatchNorm is
  refused (``strict=True``: "NotImplementedError: Model contains a trainable layer with buffers
  that Opacus doesn't currently support (bn1: BatchNorm2d ...)"; ``strict=False`` then fails in
  the BatchNorm's functorch fallback: "This layer has buffers and is not supported by Opacus"),
  frozen BatchNorms are left alone and pass the check; (2) training mode on the hooked layers
  only (``bench_common.train_mode_where_hooked``): it records a layer's activations only in
  training mode (a copy all in eval mode: "ValueError: No activations detected for <class
  'torch.nn.modules.linear.Linear'>"), and a BatchNorm in training mode normalizes by the
  batch's statistics (``model.train()``: a relative difference of 24 from the naive loop on
  a resnet18 probe of batch 4). On the encoder it does not run:
  Opacus has no grad sampler for ``nn.MultiheadAttention``, so it takes its functorch fallback,
  which calls the layer with its first input alone ("TypeError: MultiheadAttention.forward()
  missing 2 required positional arguments: 'key' and 'value'"). Its own fix,
  ``ModuleValidator.fix`` (``opacus.layers.DPMultiheadAttention``, the same weights), is not
  used: with ``batch_first=True`` that layer (Opacus 1.6.0) computes another function (its output
  reshape mixes heads with positions: 0.7 max abs off ``nn.MultiheadAttention``; exact with
  ``batch_first=False``), 0.048 relative off the naive loop on a 1-layer probe of ``(4, 16, 256)``.
* ``opacus-functorch``  the same with ``force_functorch=True``: every hooked layer's
  per-sample gradient by ``torch.func.vmap(grad(...))`` of that layer alone; the same needs and
  the same refusal on the encoder.
* ``backpack`` BackPACK's ``extend(copy)`` and ``BatchGrad``; ``p.grad_batch``. On the ResNets it
  does not run: its full backward hooks on every module forbid an in-place change of a hooked
  module's output, which the residual ``out += identity`` is (on the BatchNorm's output; also
  with ``ReLU(inplace=False)``): "RuntimeError: Output 0 of BackwardHookFunction is a view and is
  being modified inplace ...". On the encoder: no BatchGrad extension for
  ``nn.MultiheadAttention`` (the in-projection) nor for ``NonDynamicallyQuantizableLinear`` (its
  output projection, a Linear subclass: BackPACK dispatches on the exact type), "RuntimeError: no
  grad_batch for 2 of 5 weights (MultiheadAttention, NonDynamicallyQuantizableLinear)".
* ``backpack-fx`` the same with ``extend(copy, use_converter=True)``: BackPACK first rewrites
  the model by ``torch.fx`` (the residual additions become modules of their own; parameter
  names are kept). This runs on the ResNets (with the frozen copy; BatchNorms in eval mode);
  on the encoder it gives the same refusal as ``backpack``.

A peer that is not installed prints ``not installed``; one that fails prints ``does not run:
<reason>`` (the benchmark goes on); one that differs from the naive loop by more than
``--tolerance`` prints ``wrong: differs by ...`` and is not timed. ``pip install
"captum-paramsal[bench]"`` installs Opacus and BackPACK.

All methods run with the model in eval mode (as the engine does: samples do not interact
through BatchNorm), on the same seeded model, inputs and labels, in ONE process.

How
---
* Correctness first: each method's result is compared with the naive loop's, the max relative
  difference is printed (per parameter, ``max|a - ref| / max|ref|``), so every
  timing below is of equal work. The engine must agree to ``--tolerance`` or the run fails.
* Time: after that warm-up call of every method, ``--reps`` repetitions, the methods
  interleaved within each repetition (their order rotated from one repetition to the next);
  the table shows the median and min wall-clock time (``torch.cuda.synchronize`` around each
  call on CUDA) and ratios of medians: ``/ engine`` (a baseline's time over the engine's: how
  many times faster the engine is) and ``/ fwd+bwd`` (the engine's row is the target metric,
  ``<= 1.5``).
* Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during one call (after
  ``reset_peak_memory_stats``), minus what was allocated before it (model and batch). On CPU
  PyTorch keeps no allocator statistics, so each method runs once in a child process forked
  (``multiprocessing``, ``fork`` start method) before the parent has run any computation (an
  OpenMP thread pool does not survive a fork), which builds the same model and batch, reads
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` before and after the call and reports the
  increase: peak RSS increase in a forked child, first (cold) call included.

Run ``python benchmarks/bench_saliency.py`` (CPU cases; the CUDA case too when a GPU is
present), ``--quick`` for a smoke run, ``--markdown`` for a table for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_paramsal import ParameterSaliency

from bench_common import (
    PEER_PACKAGES,
    EncoderClassifier,
    MethodResult,
    backpack_grads,
    build_torchvision_model,
    cuda_peak_memory,
    fmt,
    forked_peak_rss,
    installed,
    interleaved_times,
    is_oom,
    layout_rel_diff,
    make_logger,
    opacus_grads,
    prepare_backpack,
    prepare_opacus,
    print_report,
    release_free_heap,
    short_reason,
    sync,
    train_mode_where_hooked,
)

PEERS: Tuple[str, ...] = ("opacus", "opacus-functorch", "backpack", "backpack-fx")
METHODS: Tuple[str, ...] = ("fwd+bwd", "engine", "compiled", "rms", "naive", "vmap", "captum", *PEERS)
TARGET_RATIO = 1.5


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: a model, its input size, batch and device."""

    name: str
    arch: str  # a torchvision model, or "encoder" (bench_common.EncoderClassifier)
    num_classes: int
    size: int  # the image side, or the encoder's sequence length
    batch: int
    device: str
    reps: int
    quick_size: int
    quick_batch: int
    layers: int = 0  # the encoder's layers
    quick_layers: int = 0


CASES: Dict[str, Case] = {
    "resnet18": Case("resnet18", "resnet18", 10, 32, 64, "cpu", reps=5, quick_size=32, quick_batch=8),
    "resnet50": Case("resnet50", "resnet50", 1000, 224, 8, "cpu", reps=3, quick_size=64, quick_batch=2),
    "resnet50-b64": Case("resnet50-b64", "resnet50", 1000, 224, 64, "cuda", reps=5, quick_size=224, quick_batch=8),
    # quick: sequence 32, so that (as at 64) no layer has rank 2..16 and nothing is compiled
    "encoder": Case("encoder", "encoder", 10, 64, 32, "cpu", reps=5, quick_size=32, quick_batch=8, layers=2,
                    quick_layers=1),
}


@dataclass
class Setup:
    """A built case: the model in eval mode, its batch, labels and the selected weights."""

    model: nn.Module
    x: Tensor
    y: Tensor
    saliency: ParameterSaliency
    compiled: ParameterSaliency
    rms: ParameterSaliency
    names: List[str]
    vmap_chunk: Optional[int] = None
    copies: Dict[str, Any] = field(default_factory=dict)  # the peers' prepared model copies

    @property
    def device(self) -> torch.device:
        return self.x.device


def make_setup(model: nn.Module, x: Tensor, y: Tensor, vmap_chunk: Optional[int] = None) -> Setup:
    """Put ``model`` in eval mode and bundle what every method needs (built outside the timing)."""
    model.eval()
    saliency = ParameterSaliency(model)
    names = [entry.name for entry in saliency.layout]
    params = dict(model.named_parameters())
    for entry in saliency.layout:
        if params[entry.name].shape[0] != entry.num_units:
            raise NotImplementedError(f"the baselines take units along dim 0; {entry.name} has other units")
    compiled = ParameterSaliency(model, compile_kernels=True)
    rms = ParameterSaliency(model, reduction="rms")
    return Setup(model, x, y, saliency, compiled, rms, names, vmap_chunk)


def build_model(case: Case, quick: bool) -> nn.Module:
    """The case's model with seeded random weights (no download), in eval mode."""
    if case.arch == "encoder":
        torch.manual_seed(0)
        return EncoderClassifier(layers=case.quick_layers if quick else case.layers, classes=case.num_classes).eval()
    return build_torchvision_model(case.arch, case.num_classes)


def build_setup(case: Case, device: str, quick: bool, vmap_chunk: Optional[int]) -> Setup:
    """The seeded model, batch and labels of ``case`` (identical in every process)."""
    size, batch = (case.quick_size, case.quick_batch) if quick else (case.size, case.batch)
    model = build_model(case, quick).to(device)
    torch.manual_seed(1)
    if case.arch == "encoder":
        x = torch.randn(batch, size, model.head.in_features).to(device)
    else:
        x = torch.randn(batch, 3, size, size).to(device)
    y = torch.randint(0, case.num_classes, (batch,)).to(device)
    return make_setup(model, x, y, vmap_chunk)


# ----------------------------------------------------------------------------------------------
# Methods: each returns the (B, F) saliency (fwd+bwd returns None)
# ----------------------------------------------------------------------------------------------


def _selected(setup: Setup) -> List[nn.Parameter]:
    params = dict(setup.model.named_parameters())
    return [params[name] for name in setup.names]


def _reduce_per_sample(grads: Sequence[Tensor]) -> Tensor:
    """``(B, *shape)`` per-sample gradients -> ``(B, F)`` mean of ``|grad|`` per unit (dim 1)."""
    return torch.cat([g.abs().flatten(2).mean(2) for g in grads], dim=1)


def run_fwd_bwd(setup: Setup) -> None:
    setup.model.zero_grad(set_to_none=True)
    F.cross_entropy(setup.model(setup.x), setup.y).backward()
    setup.model.zero_grad(set_to_none=True)


def run_engine(setup: Setup) -> Tensor:
    return setup.saliency.attribute(setup.x, target=setup.y, internal_batch_size=None)


def run_compiled(setup: Setup) -> Tensor:
    return setup.compiled.attribute(setup.x, target=setup.y, internal_batch_size=None)


def run_rms(setup: Setup) -> Tensor:
    return setup.rms.attribute(setup.x, target=setup.y, internal_batch_size=None)


def run_naive(setup: Setup, reduction: str = "mean_abs") -> Tensor:
    weights = _selected(setup)
    rows = []
    for i in range(setup.x.shape[0]):
        loss = F.cross_entropy(setup.model(setup.x[i : i + 1]), setup.y[i : i + 1])
        grads = torch.autograd.grad(loss, weights)
        if reduction == "rms":
            rows.append(torch.cat([g.flatten(1).pow(2).mean(1).sqrt() for g in grads]))
        else:
            rows.append(torch.cat([g.abs().flatten(1).mean(1) for g in grads]))
    return torch.stack(rows)


def run_vmap(setup: Setup) -> Tensor:
    from torch.func import functional_call, grad, vmap

    model = setup.model
    selected = {name: p.detach() for name, p in zip(setup.names, _selected(setup))}
    fixed = {name: p.detach() for name, p in model.named_parameters() if name not in selected}
    buffers = dict(model.named_buffers())

    def loss_one(weights: Dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, ({**fixed, **weights}, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=setup.vmap_chunk)(selected, setup.x, setup.y)
    return _reduce_per_sample([per_sample[name] for name in setup.names])


def captum_applies(setup: Setup) -> bool:
    """Captum's wrapper covers the selection when every selected tensor is a Conv2d/Linear weight."""
    for name in setup.names:
        owner, _, leaf = name.rpartition(".")
        module = setup.model.get_submodule(owner)
        if leaf != "weight" or type(module) not in (nn.Conv2d, nn.Linear):
            return False
    return True


def run_captum(setup: Setup) -> Tensor:
    from captum._utils.sample_gradient import SampleGradientWrapper

    model = setup.model
    modules = [model.get_submodule(name.rpartition(".")[0]) for name in setup.names]
    wrapper = SampleGradientWrapper(model, layer_modules=modules)
    wrapper.add_hooks()
    try:
        # its hooks register a gradient hook on every hooked layer's input, the first conv's too
        x = setup.x.detach().requires_grad_(True)
        losses = F.cross_entropy(model(x), setup.y, reduction="none")
        wrapper.compute_param_sample_gradients(losses, loss_mode="sum")
        saliency = _reduce_per_sample([m.weight.sample_grad for m in modules])
    finally:
        wrapper.remove_hooks()
        for m in modules:
            for p in (m.weight, m.bias):
                if p is not None and hasattr(p, "sample_grad"):
                    del p.sample_grad
        model.zero_grad(set_to_none=True)
    return saliency


# the peers (bench_common): each on its own frozen copy of the model, made by its first call
PREPARERS: Dict[str, Callable[[Setup], Any]] = {
    # Opacus: only the hooked layers in training mode (a BatchNorm stays on its running statistics)
    "opacus": lambda s: prepare_opacus(s.model, s.names, train_mode=train_mode_where_hooked, strict=True),
    "opacus-functorch": lambda s: prepare_opacus(
        s.model, s.names, force_functorch=True, train_mode=train_mode_where_hooked, strict=True
    ),
    "backpack": lambda s: prepare_backpack(s.model, s.names),
    "backpack-fx": lambda s: prepare_backpack(s.model, s.names, use_converter=True),
}


def prepared(setup: Setup, method: str) -> Any:
    """The peer ``method``'s model copy (made once: set-up, not part of a call)."""
    if method not in setup.copies:
        setup.copies[method] = PREPARERS[method](setup)
    return setup.copies[method]


def run_peer(setup: Setup, method: str) -> Tensor:
    """An Opacus or BackPACK row: one forward of the copy, the summed per-sample losses' backward."""
    grads_of = opacus_grads if method.startswith("opacus") else backpack_grads

    def losses_of(model: nn.Module) -> Tensor:
        return F.cross_entropy(model(setup.x), setup.y, reduction="none")

    return _reduce_per_sample(grads_of(prepared(setup, method), setup.names, setup.model, losses_of))


RUNNERS: Dict[str, Callable[[Setup], Optional[Tensor]]] = {
    "fwd+bwd": run_fwd_bwd,
    "engine": run_engine,
    "compiled": run_compiled,
    "rms": run_rms,
    "naive": run_naive,
    "vmap": run_vmap,
    "captum": run_captum,
    **{peer: partial(run_peer, method=peer) for peer in PEERS},
}


def peer_failure(error: BaseException) -> str:
    """A peer's status when it raised: ``OOM`` or ``does not run: <short reason>``."""
    return "OOM" if is_oom(error) else f"does not run: {short_reason(error)}"


# ----------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------


def check_engine_matches_naive(setup: Setup) -> float:
    """The engine's max relative difference from the naive per-sample loop on ``setup``'s batch."""
    engine = run_engine(setup)
    naive = run_naive(setup)
    if engine.shape != naive.shape:
        raise AssertionError(f"engine gives {tuple(engine.shape)}, naive loop {tuple(naive.shape)}")
    return layout_rel_diff(engine, naive, setup.saliency.layout)


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    case: Case
    device: str
    input_shape: Tuple[int, ...] = ()
    num_units: int = 0
    num_params: int = 0
    reps: int = 0
    methods: Dict[str, MethodResult] = field(default_factory=lambda: {m: MethodResult() for m in METHODS})
    note: str = ""


def cpu_peak_memory(case: Case, quick: bool, vmap_chunk: Optional[int], method: str) -> Tuple[str, Optional[float]]:
    """Peak RSS increase (MiB) of one call of ``method`` in a forked child process."""

    def prepare():
        setup = build_setup(case, "cpu", quick, vmap_chunk)
        if method == "captum" and not captum_applies(setup):
            return "n/a"
        if method in PEERS:
            prepared(setup, method)  # the model copy is set-up, not part of the call
        return lambda: RUNNERS[method](setup)

    if method in PEERS:
        return forked_peak_rss(prepare, peer_failure)
    return forked_peak_rss(prepare, lambda error: f"error: {type(error).__name__}: {error}"[:200])


def measure_case(
    result: CaseResult,
    setup: Setup,
    reps: int,
    tolerance: float,
    log: Callable[[str], None],
    cuda_memory: bool = True,
) -> None:
    """Warm-up and correctness, then interleaved timing (and CUDA memory) of every method."""
    methods = result.methods
    result.input_shape = tuple(setup.x.shape)
    result.num_units = setup.saliency.layout.num_columns
    result.num_params = len(setup.saliency.layout)
    result.reps = reps
    if not captum_applies(setup):
        methods["captum"].status = "n/a"
    for method in PEERS:
        if not installed(method):
            methods[method].status = "not installed"
    active = [m for m in METHODS if methods[m].status == "ok"]

    # warm-up call of every method; its result is checked against the naive loop's
    outputs: Dict[str, Optional[Tensor]] = {}
    for method in ["naive"] + [m for m in active if m != "naive"]:
        log(f"  {result.case.name}: warm-up + check {method}")
        try:
            started = time.perf_counter()
            outputs[method] = RUNNERS[method](setup)
            sync(setup.device)
            methods[method].warmup_s = time.perf_counter() - started
        except Exception as error:  # noqa: BLE001 - a failing baseline is reported, not fatal
            if method in ("fwd+bwd", "engine", "compiled", "rms", "naive"):
                raise
            if method in PEERS:
                methods[method].status = peer_failure(error)
                log(f"  {result.case.name}: {method}: {methods[method].status}")
            else:
                methods[method].status = "OOM" if is_oom(error) else f"error: {type(error).__name__}"
            outputs[method] = None
            if setup.device.type == "cuda":
                torch.cuda.empty_cache()
    reference = outputs["naive"]
    assert reference is not None
    for method, out in outputs.items():
        if out is not None:
            methods[method].rel_diff = layout_rel_diff(out, reference, setup.saliency.layout)
    if outputs.get("rms") is not None:  # its own reference: the naive loop with the same reduction
        log(f"  {result.case.name}: check rms against a naive rms loop")
        methods["rms"].rel_diff = layout_rel_diff(outputs["rms"], run_naive(setup, "rms"), setup.saliency.layout)
    outputs.clear()
    for ours in ("engine", "compiled", "rms"):
        diff = methods[ours].rel_diff
        assert diff is not None
        if not diff <= tolerance:
            raise AssertionError(
                f"{result.case.name}: {ours} differs from the naive loop by {diff:.3g} "
                f"(relative; tolerance {tolerance:g}): the timings would not be of equal work"
            )
    for peer in PEERS:  # a peer that computes something else is not timed
        diff = methods[peer].rel_diff
        if diff is not None and not diff <= tolerance:
            methods[peer].status = f"wrong: differs by {diff:.2g}"
    active = [m for m in METHODS if methods[m].status == "ok"]

    if setup.device.type == "cuda" and cuda_memory:
        for method in active:
            log(f"  {result.case.name}: CUDA peak memory of {method}")
            try:
                methods[method].peak_mib = cuda_peak_memory(partial(RUNNERS[method], setup), setup.device)
            except Exception as error:  # noqa: BLE001
                if not is_oom(error) or method in ("engine", "fwd+bwd"):
                    raise
                methods[method].status = "OOM"
                torch.cuda.empty_cache()
        active = [m for m in METHODS if methods[m].status == "ok"]

    runners = {method: (lambda method=method: RUNNERS[method](setup)) for method in active}
    # freeze_gc: the objects alive now (Opacus and BackPACK imported: ~370k) stay out of the per-call collections
    times = interleaved_times(runners, reps, setup.device, lambda m: log(f"  {result.case.name}: {m}"),
                              freeze_gc=True)
    for method, values in times.items():
        methods[method].times = values


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

HEADER = ("case", "method", "median ms", "min ms", "/ engine", "/ fwd+bwd", "peak MiB", "max rel diff vs naive")


def table_rows(results: Sequence[CaseResult]) -> List[Tuple[str, ...]]:
    rows = []
    for res in results:
        engine = res.methods["engine"].median
        fwd_bwd = res.methods["fwd+bwd"].median
        label = f"{res.case.name} ({res.device}, {'x'.join(map(str, res.input_shape))})"
        for method in METHODS:
            m = res.methods[method]
            if m.status != "ok":
                rows.append((label, method, m.status, "", "", "", "", ""))
                continue
            rows.append(
                (
                    label,
                    method,
                    fmt(m.median * 1e3, ".1f"),
                    fmt(min(m.times) * 1e3 if m.times else None, ".1f"),
                    fmt(m.median / engine, ".2f"),
                    fmt(m.median / fwd_bwd, ".2f"),
                    fmt(m.peak_mib, ".0f"),
                    "-" if method == "naive" else fmt(m.rel_diff, ".1e"),
                )
            )
    return rows


def summary_lines(results: Sequence[CaseResult]) -> List[str]:
    lines = []
    for res in results:
        m = res.methods
        engine = m["engine"].median
        ratio = engine / m["fwd+bwd"].median
        verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
        speedups = ", ".join(
            f"{name}/engine = {m[name].median / engine:.2f}"
            if m[name].status == "ok"
            else f"{name}: {m[name].status.split(':')[0]}"  # the table has the reason
            for name in ("naive", "vmap", "captum", *PEERS)
        )
        compiled = m["compiled"].median / m["fwd+bwd"].median
        rms = m["rms"].median / m["fwd+bwd"].median
        lines.append(
            f"{res.case.name} ({res.device}, {res.num_params} weights, {res.num_units} units, {res.reps} reps): "
            f"engine/fwd+bwd = {ratio:.2f} (target <= {TARGET_RATIO}: {verdict}); "
            f"compiled/fwd+bwd = {compiled:.2f} ({'met' if compiled <= TARGET_RATIO else 'NOT met'}; "
            f"its first call, compiling, took {fmt(m['compiled'].warmup_s, '.1f')} s); "
            f"rms/fwd+bwd = {rms:.2f}; {speedups}; "
            f"engine vs naive max rel diff = {fmt(m['engine'].rel_diff, '.1e')}"
        )
    return lines


def memory_note(devices: Sequence[str]) -> str:
    parts = []
    if "cpu" in devices:
        parts.append(
            "CPU memory: peak RSS increase (ru_maxrss) of one cold call in a forked child process "
            "that built the same model and batch"
        )
    if "cuda" in devices:
        parts.append("CUDA memory: torch.cuda.max_memory_allocated during one call, above the allocation before it")
    return "; ".join(parts) + "."


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated cases out of {', '.join(CASES)} (default: all; a CUDA case is skipped without a GPU)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: each case on its own device (resnet18, resnet50, encoder on CPU, resnet50-b64 on CUDA); "
        "cpu / cuda: every selected case there",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: smaller inputs and batches, 2 repetitions")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per method (default: per case)")
    parser.add_argument("--vmap-chunk", type=int, default=None, help="vmap chunk_size (default: the whole batch)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max relative difference engine vs naive")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table for docs/PERFORMANCE.md")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)

    log = make_logger()

    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    notes: List[str] = []
    planned: List[CaseResult] = []
    for name in names:
        case = CASES[name]
        device = case.device if args.device == "auto" else args.device
        if device == "cuda" and not torch.cuda.is_available():
            notes.append(f"{name}: skipped, CUDA is not available")
            continue
        planned.append(CaseResult(case if args.reps is None else replace(case, reps=args.reps), device))

    # import the peers once, here (importing computes nothing), not in every child
    for package in sorted({PEER_PACKAGES[m] for m in PEERS if installed(m)}):
        importlib.import_module(package)
        if package == "backpack":
            importlib.import_module("backpack.extensions")

    # CPU memory first, in children forked before this process has run any computation
    if not args.no_memory:
        for res in planned:
            if res.device != "cpu":
                continue
            for method in METHODS:
                if method == "compiled" or not installed(method):  # a cold call's peak would be the compiler's
                    continue
                log(f"  {res.case.name}: peak memory of {method} (forked child)")
                status, peak = cpu_peak_memory(res.case, args.quick, args.vmap_chunk, method)
                res.methods[method].peak_mib = peak
                if status != "ok":
                    res.methods[method].status = status
                    if method in ("fwd+bwd", "engine", "naive"):
                        raise SystemExit(f"{res.case.name}: {method} failed in the memory child: {status}")

    for res in planned:
        setup = build_setup(res.case, res.device, args.quick, args.vmap_chunk)
        reps = 2 if args.quick and args.reps is None else res.case.reps
        measure_case(res, setup, reps, args.tolerance, log, cuda_memory=not args.no_memory)
        del setup
        release_free_heap()
        if res.device == "cuda":
            torch.cuda.empty_cache()

    devices = sorted({res.device for res in planned})
    mem = memory_note(devices) if not args.no_memory else "Memory not measured (--no-memory)."
    ratios = (
        "Times: median (and min) over the repetitions, methods interleaved; '/ engine' = median time over the "
        "engine's (a baseline's row: how many times faster the engine is), '/ fwd+bwd' = median time over one "
        f"plain forward+backward of the batch (the engine's row is the target metric, <= {TARGET_RATIO})."
    )
    print_report(devices, HEADER, table_rows(planned), [*summary_lines(planned), *notes, ratios, mem], args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
