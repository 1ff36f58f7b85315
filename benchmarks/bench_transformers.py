"""Benchmark: the engine on transformers against a plain forward+backward and the other per-sample methods.

What is measured
----------------
Every method computes the same thing: for each sample of a batch, the gradient of its own
loss over the selected weights (the default selection of ``ParameterSaliency(model)``: every
Linear / HF ``Conv1D`` / attention in-projection weight, and the token embedding where it is
tied to the language-model head), reduced per unit (a Linear's output row, a ``Conv1D``'s
output column) to the mean of ``|grad|`` (``mean_abs``) or, for the ``rms`` row, the root mean
square. Models are built from configs with seeded random weights (nothing is downloaded), in
eval mode:

* ``encoder``  ``nn.TransformerEncoder`` (d_model 256, 4 heads, feed-forward 1024, 2 layers,
  batch first) over ``(B, 64, 256)`` float inputs, mean-pooled, a Linear classifier; class
  cross-entropy. Batch 32: the case the issue measured (1.84x fwd+bwd).
* ``gpt2``     ``GPT2LMHeadModel`` of GPT-2-small shape (n_embd 768, 12 heads, 12 layers;
  ``--layers`` shrinks it), sequence 128, vocabulary 50257 (the head tied to the embedding).
* ``llama``    ``LlamaForCausalLM``: hidden 512, 8 heads, 2 key/value heads, intermediate 1376,
  4 layers, vocabulary 32000 (untied head), sequence 128.
* ``long-512``, ``long-1024``: the Llama shape with one layer at sequences 512 and 1024 (batch
  8) under the whole-sequence causal-LM loss (every position has a loss, so every layer's
  per-sample gradient has full rank T; vocabulary 8192, so that the head does not dominate a
  one-layer model): ``mean_abs`` builds each gradient a workspace at a time and ``rms`` picks the
  Gram form ``O(T^2 (in + out))`` or the dense one ``O(in x out x T)``, whichever is cheaper;
  peak memory shows that neither holds a whole per-sample gradient of the batch.

The language models' loss (``--loss``): ``last`` (default), the cross-entropy of a random next
token at the last position, as README's transformer section writes it
(``output_fn=lambda out: out.logits[:, -1]``), with ``logits_to_keep=1`` passed to the model so
that the head runs on the last position only (every method alike; ``--full-logits`` leaves it
out); ``lm``, the whole-sequence causal-LM loss (each sample's summed next-token cross-entropy
over its 127 positions; full logits).

Methods (rows):

* ``fwd+bwd``  the bar, not a saliency method: one plain forward and backward of the batch
  (the batch-mean loss, ``.backward()`` into every parameter's ``.grad``).
* ``engine``   ``ParameterSaliency(model).attribute(...)`` (``mean_abs``).
* ``rms``      the same with ``reduction="rms"``, checked against a naive rms loop.
* ``compiled`` ``compile_kernels=True``: timed only where a compiled kernel ran (a layer of
  rank 2..16, e.g. ``--seq 16``); otherwise it is the engine's path and says so.
* ``naive``    the per-sample loop: one forward and ``torch.autograd.grad`` per sample, reduced.
* ``vmap``     ``torch.func``: ``vmap(grad(loss))`` over ``functional_call`` with the selected
  weights, ``--vmap-chunk`` samples at a time (default 4: the whole batch's per-sample
  gradients of GPT-2 would take ~8 GB), reduced chunk by chunk.
* ``opacus``   ``opacus.GradSampleModule`` (``loss_reduction="sum"``) on a copy of the model whose
  unselected parameters are frozen; ``p.grad_sample`` reduced.
* ``backpack`` BackPACK's ``BatchGrad`` on an ``extend``-ed copy (unselected parameters frozen),
  summed per-sample losses; ``p.grad_batch`` reduced.

A peer that is not installed prints ``not installed``; one that fails, or does not give every
selected weight's per-sample gradient, prints ``does not run: <reason>``; one that differs from
the naive loop by more than ``--tolerance`` prints ``wrong: ...``. ``pip install
"captum-paramsal[bench]"`` installs Opacus and BackPACK.

How
---
Correctness first: each method's result against the naive loop's (max over parameters of
``max|a - ref| / max|ref|``); the engine must agree to ``--tolerance`` or the run fails. Then a
warm-up call of every method and ``--reps`` repetitions, the methods interleaved within each
repetition, their order rotated; the table shows median and min wall-clock time and ratios of
medians. Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during one call above what
was allocated before it; on CPU (the ``long-*`` cases, or every case with ``--cpu-memory``), the
peak RSS increase of one cold call in a child process forked before this one has computed
anything, which builds the same model and batch.

Bars (the issue): on CPU, ``rms`` at most 1.5x and ``engine`` (``mean_abs``) at most 2x a plain
forward+backward; on a GPU, the engine at least 10x faster than the per-sample loop at batch 16.

``python benchmarks/bench_transformers.py`` runs every case on CUDA when it is there, else on
CPU (``--device`` chooses); ``--quick`` is a smoke run of tiny shapes (under a minute on two
cores); ``--markdown`` prints tables for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_paramsal import ParameterSaliency
from captum_paramsal.per_sample import compiled as compiled_kernels
from captum_paramsal.per_sample import policy

from bench_common import (
    EncoderClassifier,
    MethodResult,
    backpack_grads,
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
)

METHODS: Tuple[str, ...] = ("fwd+bwd", "engine", "rms", "compiled", "naive", "vmap", "opacus", "backpack")
PEERS = ("vmap", "opacus", "backpack")
OURS = ("engine", "rms", "compiled")
RMS_BAR, MEAN_ABS_BAR, GPU_SPEEDUP_BAR = 1.5, 2.0, 10.0


# ----------------------------------------------------------------------------------------------
# Cases and models
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    family: str  # "encoder", "gpt2" or "llama"
    seq: int
    batch: int
    layers: int
    reps: int
    quick: Dict[str, int] = field(default_factory=dict)  # --quick overrides of seq, batch, layers, vocab
    vocab: Optional[int] = None  # None: the model family's own (GPT-2 50257, Llama 32000)
    cpu_memory: bool = False  # peak memory measured on CPU by default (the long cases)
    loss: Optional[str] = None  # the case's own loss ("lm"), else --loss


CASES: Dict[str, Case] = {
    "encoder": Case("encoder", "encoder", 64, 32, 2, reps=5, quick={"seq": 16, "batch": 8, "layers": 1}),
    "gpt2": Case("gpt2", "gpt2", 128, 16, 12, reps=3, quick={"seq": 32, "batch": 4, "layers": 1, "vocab": 2048}),
    "llama": Case("llama", "llama", 128, 16, 4, reps=5, quick={"seq": 32, "batch": 4, "layers": 1, "vocab": 2048}),
    "long-512": Case("long-512", "llama", 512, 8, 1, reps=3, quick={"seq": 128, "batch": 2, "vocab": 2048},
                     cpu_memory=True, loss="lm", vocab=8192),
    "long-1024": Case("long-1024", "llama", 1024, 8, 1, reps=3, quick={"seq": 256, "batch": 2, "vocab": 2048},
                      cpu_memory=True, loss="lm", vocab=8192),
}


def build_model(case: Case, layers: int) -> nn.Module:
    """The case's model with seeded random weights, in eval mode (identical in every process)."""
    torch.manual_seed(0)
    if case.family == "encoder":
        return EncoderClassifier(layers=layers).eval()
    if case.family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_embd=768, n_head=12, n_layer=layers, n_positions=max(1024, case.seq),
                            vocab_size=case.vocab or 50257)
        return GPT2LMHeadModel(config).eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=case.vocab or 32000, hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=1376, num_hidden_layers=layers, max_position_embeddings=max(2048, case.seq),
    )
    return LlamaForCausalLM(config).eval()


# ----------------------------------------------------------------------------------------------
# Setup: model, batch, target, loss, and the engine's attribution objects
# ----------------------------------------------------------------------------------------------


def _last_token(out: Any) -> Tensor:
    return out.logits[:, -1]


def _all_logits(out: Any) -> Tensor:
    return out.logits


def causal_lm_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """``(B,)``: each sample's summed next-token cross-entropy over its positions."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(shifted, ids[:, 1:].reshape(-1), reduction="none").view(ids.shape[0], -1).sum(1)


def class_loss(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits, target, reduction="none")


@dataclass
class Setup:
    """A built case: everything every method needs, made outside the timing."""

    case: Case
    model: nn.Module
    x: Tensor
    target: Tensor
    kwargs: Dict[str, Any]  # keyword arguments of the model (logits_to_keep)
    output_fn: Callable[[Any], Tensor]
    loss_fn: Callable[[Tensor, Tensor], Tensor]  # (outputs, target) -> (B,)
    params: Optional[List[str]]  # None: the default selection
    vmap_chunk: int
    names: List[str] = field(default_factory=list)
    unit_dims: List[int] = field(default_factory=list)
    engines: Dict[str, ParameterSaliency] = field(default_factory=dict)
    copies: Dict[str, Any] = field(default_factory=dict)  # the peers' prepared model copies

    @property
    def device(self) -> torch.device:
        return self.x.device

    def outputs(self, model: nn.Module, x: Tensor) -> Tensor:
        return self.output_fn(model(x, **self.kwargs))

    def losses(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        return self.loss_fn(self.outputs(model, x), target)

    def attribute(self, method: str) -> Tensor:
        args = self.kwargs or None
        return self.engines[method].attribute(self.x, target=self.target, additional_forward_args=args)


def unit_dim(model: nn.Module, name: str) -> int:
    """The axis of the weight ``name`` along which its units lie: HF ``Conv1D`` stores its weight
    transposed (units = output features = columns), everything else along dim 0."""
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return 1 if type(owner).__name__ == "Conv1D" else 0


def build_setup(case: Case, device: str, args: argparse.Namespace) -> Setup:
    quick = case.quick if args.quick else {}
    seq = args.seq or quick.get("seq", case.seq)
    batch = args.batch or quick.get("batch", case.batch)
    layers = args.layers or quick.get("layers", case.layers)
    case = replace(case, seq=seq, batch=batch, layers=layers, vocab=quick.get("vocab", case.vocab))
    model = build_model(case, layers).to(device)
    torch.manual_seed(1)
    if case.family == "encoder":
        x = torch.randn(batch, seq, 256, device=device)
        target = torch.randint(0, 10, (batch,), device=device)
        setup = Setup(case, model, x, target, {}, lambda out: out, class_loss, None, args.vmap_chunk)
    else:
        vocab = model.config.vocab_size
        x = torch.randint(0, vocab, (batch, seq), device=device)
        if (case.loss or args.loss) == "lm":
            setup = Setup(case, model, x, x, {}, _all_logits, causal_lm_loss, None, args.vmap_chunk)
        else:
            target = torch.randint(0, vocab, (batch,), device=device)
            kwargs = {} if args.full_logits else {"logits_to_keep": 1}
            setup = Setup(case, model, x, target, kwargs, _last_token, class_loss, None, args.vmap_chunk)
    common = dict(output_fn=setup.output_fn, loss_fn=setup.loss_fn)
    probe = ParameterSaliency(model, **common)
    names = [entry.name for entry in probe.layout]
    if args.selection == "no-embedding":
        names = [n for n in names if not isinstance(model.get_submodule(n.rsplit(".", 1)[0]), nn.Embedding)]
    setup.params = None if args.selection == "default" else names
    common["params"] = setup.params
    setup.names = names
    setup.unit_dims = [unit_dim(model, n) for n in names]
    setup.engines = {
        "engine": ParameterSaliency(model, **common),
        "rms": ParameterSaliency(model, reduction="rms", **common),
        "compiled": ParameterSaliency(model, compile_kernels=True, **common),
    }
    return setup


# ----------------------------------------------------------------------------------------------
# Methods: each returns the (B, F) saliency (fwd+bwd returns None)
# ----------------------------------------------------------------------------------------------


def _selected(setup: Setup, model: Optional[nn.Module] = None) -> List[nn.Parameter]:
    params = dict((model or setup.model).named_parameters())
    return [params[name] for name in setup.names]


def reduce_units(grads: Sequence[Tensor], dims: Sequence[int], reduction: str = "mean_abs") -> Tensor:
    """``(n, *shape)`` per-sample gradients -> ``(n, F)``: per unit (along ``dims``), mean |g| or rms."""
    columns = []
    for g, dim in zip(grads, dims):
        g = g.movedim(dim + 1, 1).flatten(2)
        columns.append(g.abs().mean(2) if reduction == "mean_abs" else g.square().mean(2).sqrt())
    return torch.cat(columns, dim=1)


def run_fwd_bwd(setup: Setup) -> None:
    setup.model.zero_grad(set_to_none=True)
    setup.losses(setup.model, setup.x, setup.target).mean().backward()
    setup.model.zero_grad(set_to_none=True)


def run_naive(setup: Setup, reduction: str = "mean_abs") -> Tensor:
    weights = _selected(setup)
    rows = []
    for i in range(setup.x.shape[0]):
        loss = setup.losses(setup.model, setup.x[i : i + 1], setup.target[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, weights)
        rows.append(reduce_units([g.unsqueeze(0) for g in grads], setup.unit_dims, reduction))
    return torch.cat(rows)


def run_vmap(setup: Setup) -> Tensor:
    from torch.func import functional_call, grad, vmap

    model = setup.model
    selected = {name: p.detach() for name, p in zip(setup.names, _selected(setup))}
    # every other parameter and buffer held fixed; tied weights appear once (under the selected name)
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in selected}
    buffers = dict(model.named_buffers())

    def loss_one(weights: Dict[str, Tensor], xi: Tensor, ti: Tensor) -> Tensor:
        out = functional_call(model, ({**fixed, **weights}, buffers), (xi.unsqueeze(0),), dict(setup.kwargs),
                              tie_weights=True)
        return setup.loss_fn(setup.output_fn(out), ti.unsqueeze(0)).sum()

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    rows = []
    for start in range(0, setup.x.shape[0], setup.vmap_chunk):
        stop = start + setup.vmap_chunk
        grads = per_sample(selected, setup.x[start:stop], setup.target[start:stop])
        rows.append(reduce_units([grads[n] for n in setup.names], setup.unit_dims))
        del grads
    return torch.cat(rows)


def _losses_of(setup: Setup) -> Callable[[nn.Module], Tensor]:
    return lambda model: setup.losses(model, setup.x, setup.target)


def run_opacus(setup: Setup) -> Tensor:
    if "opacus" not in setup.copies:
        setup.copies["opacus"] = prepare_opacus(setup.model, setup.names)
    grads = opacus_grads(setup.copies["opacus"], setup.names, setup.model, _losses_of(setup))
    return reduce_units(grads, setup.unit_dims)


def run_backpack(setup: Setup) -> Tensor:
    if "backpack" not in setup.copies:
        setup.copies["backpack"] = prepare_backpack(setup.model, setup.names)
    grads = backpack_grads(setup.copies["backpack"], setup.names, setup.model, _losses_of(setup))
    return reduce_units(grads, setup.unit_dims)


RUNNERS: Dict[str, Callable[[Setup], Optional[Tensor]]] = {
    "fwd+bwd": run_fwd_bwd,
    "engine": lambda s: s.attribute("engine"),
    "rms": lambda s: s.attribute("rms"),
    "compiled": lambda s: s.attribute("compiled"),
    "naive": run_naive,
    "vmap": run_vmap,
    "opacus": run_opacus,
    "backpack": run_backpack,
}
PACKAGES = {"opacus": "opacus", "backpack": "backpack"}


# ----------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    case: Case
    device: str
    label: str = ""
    num_params: int = 0
    num_units: int = 0
    reps: int = 0
    methods: Dict[str, MethodResult] = field(default_factory=lambda: {m: MethodResult() for m in METHODS})
    notes: List[str] = field(default_factory=list)


def cpu_peak_memory(case: Case, args: argparse.Namespace, method: str) -> Tuple[str, Optional[float]]:
    """Peak RSS increase (MiB) of one call of ``method`` in a forked child process."""

    def prepare():
        torch.set_num_threads(args.threads or torch.get_num_threads())
        if args.workspace_values:
            policy.WORKSPACE_VALUES["cpu"] = args.workspace_values
        setup = build_setup(case, "cpu", args)
        if method in PACKAGES:  # the peers' model copies are set-up, not part of the call
            RUNNERS[method](setup)
        return lambda: RUNNERS[method](setup)

    return forked_peak_rss(prepare, lambda error: f"does not run: {short_reason(error)}")


def measure_case(result: CaseResult, setup: Setup, reps: int, tolerance: float, log: Callable[[str], None],
                 cuda_memory: bool) -> None:
    methods, name = result.methods, result.case.name
    case = setup.case
    shape = "x".join(map(str, setup.x.shape))
    result.label = f"{name} ({setup.device.type}, {case.layers} layer{'s' if case.layers > 1 else ''}, {shape})"
    layout = setup.engines["engine"].layout
    result.num_params, result.num_units, result.reps = len(layout), layout.num_columns, reps
    for method in PEERS:
        if not installed(method):
            methods[method].status = "not installed"

    outputs: Dict[str, Optional[Tensor]] = {}
    runs_before = sum(compiled_kernels.run_counts().values())
    for method in ["naive"] + [m for m in METHODS if m != "naive" and methods[m].status == "ok"]:
        log(f"  {name}: warm-up + check {method}")
        try:
            started = time.perf_counter()
            outputs[method] = RUNNERS[method](setup)
            sync(setup.device)
            methods[method].warmup_s = time.perf_counter() - started
        except Exception as error:  # noqa: BLE001 - a failing peer is reported, not fatal
            if method not in PEERS:
                raise
            methods[method].status = "OOM" if is_oom(error) else f"does not run: {short_reason(error)}"
            log(f"  {name}: {method}: {methods[method].status}")
            outputs[method] = None
            if setup.device.type == "cuda":
                torch.cuda.empty_cache()
        if method == "compiled" and sum(compiled_kernels.run_counts().values()) == runs_before:
            methods[method].status = "= engine (no layer of rank 2-16)"
    reference = outputs["naive"]
    assert reference is not None
    for method, out in outputs.items():
        if out is not None and method != "rms":
            methods[method].rel_diff = layout_rel_diff(out, reference, setup.engines["engine"].layout)
    log(f"  {name}: check rms against a naive rms loop")
    methods["rms"].rel_diff = layout_rel_diff(outputs["rms"], run_naive(setup, "rms"), setup.engines["engine"].layout)
    outputs.clear()
    for method in METHODS:
        m = methods[method]
        if m.rel_diff is None or m.rel_diff <= tolerance:
            continue
        if method in OURS:
            raise AssertionError(f"{name}: {method} differs from the naive loop by {m.rel_diff:.3g} (relative; "
                                 f"tolerance {tolerance:g}): the timings would not be of equal work")
        m.status = f"wrong: differs by {m.rel_diff:.2g}"
    active = [m for m in METHODS if methods[m].status == "ok"]

    if setup.device.type == "cuda" and cuda_memory:
        for method in active:
            log(f"  {name}: CUDA peak memory of {method}")
            try:
                methods[method].peak_mib = cuda_peak_memory(partial(RUNNERS[method], setup), setup.device)
            except Exception as error:  # noqa: BLE001
                if not is_oom(error) or method not in PEERS:
                    raise
                methods[method].status = "OOM"
                torch.cuda.empty_cache()
        active = [m for m in METHODS if methods[m].status == "ok"]

    runners = {method: (lambda method=method: RUNNERS[method](setup)) for method in active}
    # freeze_gc: the objects alive now (a transformers process holds ~500k) stay out of the per-call collections
    times = interleaved_times(runners, reps, setup.device, lambda m: log(f"  {name}: {m}"), freeze_gc=True)
    for method, values in times.items():
        methods[method].times = values


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

HEADER = ("case", "method", "median ms", "min ms", "/ fwd+bwd", "naive / this", "peak MiB", "max rel diff vs naive")


def table_rows(results: Sequence[CaseResult]) -> List[Tuple[str, ...]]:
    rows = []
    for res in results:
        fwd_bwd, naive = res.methods["fwd+bwd"].median, res.methods["naive"].median
        for method in METHODS:
            m = res.methods[method]
            if m.status != "ok":
                rows.append((res.label, method, m.status, "", "", "", "", ""))
                continue
            rows.append((
                res.label, method, fmt(m.median * 1e3, ".1f"), fmt(min(m.times) * 1e3, ".1f"),
                fmt(m.median / fwd_bwd, ".2f"), fmt(naive / m.median, ".2f"), fmt(m.peak_mib, ".0f"),
                "-" if method in ("naive", "fwd+bwd") else fmt(m.rel_diff, ".1e"),
            ))
    return rows


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def summary_lines(results: Sequence[CaseResult]) -> List[str]:
    lines = []
    for res in results:
        m = res.methods
        fwd_bwd, naive = m["fwd+bwd"].median, m["naive"].median
        engine, rms = m["engine"].median / fwd_bwd, m["rms"].median / fwd_bwd
        head = f"{res.label} ({res.num_params} weights, {res.num_units} units, {res.reps} reps): "
        if res.device == "cuda":
            speedup = naive / m["engine"].median
            bars = (f"naive/engine = {speedup:.1f} (bar >= {GPU_SPEEDUP_BAR:g} at batch 16: "
                    f"{_verdict(speedup >= GPU_SPEEDUP_BAR)}), naive/rms = {naive / m['rms'].median:.1f}; "
                    f"engine/fwd+bwd = {engine:.2f}, rms/fwd+bwd = {rms:.2f}")
        else:
            bars = (f"rms/fwd+bwd = {rms:.2f} (bar <= {RMS_BAR:g}: {_verdict(rms <= RMS_BAR)}), "
                    f"engine (mean_abs)/fwd+bwd = {engine:.2f} (bar <= {MEAN_ABS_BAR:g}: "
                    f"{_verdict(engine <= MEAN_ABS_BAR)}); naive/engine = {naive / m['engine'].median:.2f}")
        ceiling = f"; naive/fwd+bwd = {naive / fwd_bwd:.1f} (what a method as fast as one plain pass would gain)"
        lines.append(head + bars + ceiling + "".join(f"; {note}" for note in res.notes))
    return lines


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, out of {', '.join(CASES)}")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (default): cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, 2 repetitions")
    parser.add_argument("--layers", type=int, default=None, help="transformer layers (default: per case; gpt2 12)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: per case)")
    parser.add_argument("--batch", type=int, default=None, help="batch (default: per case; 16, encoder 32, long 8)")
    parser.add_argument("--loss", choices=("last", "lm"), default="last",
                        help="language models: next token at the last position (default) or the causal-LM loss")
    parser.add_argument("--full-logits", action="store_true",
                        help="with --loss last: do not pass logits_to_keep=1 (the head runs on every position)")
    parser.add_argument("--selection", choices=("default", "no-embedding"), default="default",
                        help="no-embedding: the default selection without GPT-2's tied token embedding")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default: per case)")
    parser.add_argument("--vmap-chunk", type=int, default=4, help="samples per vmap call (default 4)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--workspace-values", type=int, default=None,
                        help="the engine's workspace on this device, in values (policy.WORKSPACE_VALUES; default 2^22)")
    parser.add_argument("--cpu-memory", action="store_true", help="peak memory on CPU for every case, not only long-*")
    parser.add_argument("--no-memory", action="store_true", help="no peak-memory measurement")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max relative difference vs the naive loop")
    parser.add_argument("--markdown", action="store_true", help="Markdown tables for docs/PERFORMANCE.md")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = make_logger()
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if any(CASES[n].family != "encoder" for n in names) and importlib.util.find_spec("transformers") is None:
        raise SystemExit('the gpt2, llama and long cases need transformers: pip install "captum-paramsal[hf]"')
    planned = [CaseResult(CASES[n], device) for n in names]
    if args.workspace_values:
        policy.WORKSPACE_VALUES[device] = args.workspace_values

    # import what the children need once, here (importing computes nothing)
    if any(CASES[n].family == "gpt2" for n in names):
        importlib.import_module("transformers.models.gpt2.modeling_gpt2")
    if any(CASES[n].family == "llama" for n in names):
        importlib.import_module("transformers.models.llama.modeling_llama")
    for method in PEERS:
        if method in PACKAGES and installed(method):
            importlib.import_module(PACKAGES[method])

    # CPU memory first, in children forked before this process has computed anything
    if device == "cpu" and not args.no_memory:
        for res in planned:
            if not (res.case.cpu_memory or args.cpu_memory):
                continue
            for method in METHODS:
                if method == "compiled" or not installed(method):
                    continue
                log(f"  {res.case.name}: peak memory of {method} (forked child)")
                status, peak = cpu_peak_memory(res.case, args, method)
                res.methods[method].peak_mib = peak
                if status != "ok" and method not in PEERS:
                    raise SystemExit(f"{res.case.name}: {method} failed in the memory child: {status}")

    for res in planned:
        setup = build_setup(res.case, device, args)
        reps = args.reps or (2 if args.quick else res.case.reps)
        measure_case(res, setup, reps, args.tolerance, log, cuda_memory=not args.no_memory)
        del setup
        release_free_heap()
        if device == "cuda":
            torch.cuda.empty_cache()

    last = "next token at the last position" + ("" if args.full_logits else " (logits_to_keep=1)")
    lm = "causal-LM loss summed over positions"
    losses = [f"{n}: {lm if (CASES[n].loss or args.loss) == 'lm' else last}"
              for n in names if CASES[n].family != "encoder"]
    notes = [
        "Loss: " + "; ".join(losses + (["encoder: class cross-entropy"] if "encoder" in names else []))
        + f". Selection: {args.selection}; vmap chunk {args.vmap_chunk}"
        + (f"; engine workspace {args.workspace_values} values." if args.workspace_values else "."),
        "Times: median (and min) over the repetitions, methods interleaved; '/ fwd+bwd' = median over one plain "
        "forward+backward of the batch; 'naive / this' = the per-sample loop's median over this method's.",
    ]
    if not args.no_memory:
        notes.append("Peak MiB: CUDA max_memory_allocated above the allocation before the call; CPU (long-* cases, "
                     "or --cpu-memory): peak RSS increase of one cold call in a forked child.")
    print_report([device], HEADER, table_rows(planned), [*summary_lines(planned), *notes], args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
