"""The base of the parameter-space methods: what they share before the method itself.

Both :class:`~.parameter_saliency.ParameterSaliency` and
:class:`~.parameter_guided_input_saliency.ParameterGuidedInputSaliency` select parameters,
take a per-sample loss and a reduction, route the selection to rules or the fallback,
format inputs and targets the way Captum does, keep the model in eval mode while they
work, and cut a batch into chunks of ``internal_batch_size`` samples, each one
:class:`~captum_paramsal.per_sample.engine.SaliencyPass`. This class does those things
once.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from captum.attr import GradientAttribution
from torch import Tensor, nn

from .._utils import (
    TargetType,
    TensorOrTupleOfTensors,
    check_device,
    check_internal_batch_size,
    cross_entropy_per_sample,
    evaluation_mode,
    format_inputs,
    label_resolver,
    model_device,
    normalize_target,
    outside_stacklevel,
    split_forward_args,
)
from ..layout import SaliencyLayout
from ..per_sample import (
    KernelPolicy,
    RoutingCache,
    RoutingReport,
    SaliencyPass,
    get_reduction,
    routing_report,
    select_parameters,
)
from ..per_sample.batching import slice_batch, slice_kwargs
from ..per_sample.compiled import CompiledKernels, CompileSetting, check_compile_setting
from ..per_sample.engine import model_output_tensor
from ..per_sample.reductions import Reduction
from ..unit_schemes import UnitPlan, UnitsSpec, plan_units

LossFn = Callable[[Tensor, Tensor], Tensor]


#: seconds a call runs before ``show_progress=None`` shows its bar over the chunks
PROGRESS_DELAY = 3.0


@dataclass(frozen=True)
class PreparedBatch:
    """A checked batch: inputs as a tuple, extra arguments as a tuple, labels on the device
    (None: each sample's predicted class), and whether the inputs came as a tuple."""

    inputs: Tuple[Tensor, ...]
    additional_forward_args: Tuple[Any, ...]
    labels: Optional[Tensor]
    is_tuple: bool
    forward_kwargs: Dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.inputs[0].shape[0]


class ParameterSpaceAttribution(GradientAttribution):
    """Shared base of the parameter-space attribution methods (see the module docstring).

    Args:
        model: the network.
        params: names from ``model.named_parameters()``; None for the default selection
            (the weight of every convolution, transposed convolution and Linear layer).
        loss_fn: ``loss_fn(outputs, target) -> (B,)``; default cross-entropy per sample.
        reduction: ``"mean_abs"``, ``"mean"`` or ``"rms"`` (:mod:`..per_sample.reductions`).
        fallback_chunk_size: samples per chunk of the generic ``torch.func`` fallback.
        compile_kernels: reduce low-rank layers with compiled kernels where they apply:
            True, False, or ``"auto"`` (compile once the method's eager passes have taken
            about what compiling costs; see :mod:`captum_paramsal.per_sample.compiled`).
        output_fn: ``output_fn(model output) -> Tensor``, what the loss is computed on.
            Default: the output itself, the ``logits`` of a Hugging Face ``ModelOutput``, or
            the first element of a tuple.
        share: another method of the same model whose selection, loss, reduction, routing
            cache and kernels this one uses (the other arguments must then be left at
            their defaults).
        units: what a column is (:mod:`captum_paramsal.unit_schemes`): ``"rows"`` (each
            parameter's output rows), ``"heads"``, ``"neurons"``, several, or
            ``{module name prefix: scheme}``.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Optional[Sequence[str]] = None,
        loss_fn: Optional[LossFn] = None,
        reduction: str = "mean_abs",
        fallback_chunk_size: int = 16,
        compile_kernels: CompileSetting = "auto",
        share: Optional[ParameterSpaceAttribution] = None,
        output_fn: Optional[Callable[[Any], Tensor]] = None,
        units: UnitsSpec = "rows",
    ) -> None:
        GradientAttribution.__init__(self, model)
        self.model = model
        if share is not None:
            if not (isinstance(units, str) and units == "rows"):
                raise ValueError("with share=, units come from the shared method; leave units out")
            self._share(share, params, loss_fn, reduction, fallback_chunk_size, compile_kernels, output_fn)
            return
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable, got {type(output_fn).__name__}")
        self.output_fn: Callable[[Any], Tensor] = output_fn or model_output_tensor
        self._reduction: Reduction = get_reduction(reduction)
        self._selection = select_parameters(model, params)
        # the unit scheme: which axis the engine slices each parameter along, and how the
        # slices' values make the columns (heads, neurons); rows: the slices are the columns
        self._plan: UnitPlan = plan_units(
            model, [(p.name, tuple(p.param.shape), p.num_units) for p in self._selection.params], units
        )
        if self._plan.axes:
            self._selection = select_parameters(model, params, axes=self._plan.axes)
        # the one-sample probe of the model, once per input signature (re-validated every pass)
        self._routing_cache = RoutingCache()
        self._default_loss = loss_fn is None
        self.loss_fn: LossFn = cross_entropy_per_sample if loss_fn is None else loss_fn
        self.loss_name = "cross_entropy" if loss_fn is None else _callable_name(loss_fn)
        if isinstance(fallback_chunk_size, bool) or not isinstance(fallback_chunk_size, int) or fallback_chunk_size < 1:
            raise ValueError(f"fallback_chunk_size must be a positive int, got {fallback_chunk_size!r}")
        self.fallback_chunk_size = fallback_chunk_size
        self.compile_kernels: CompileSetting = check_compile_setting(compile_kernels)
        self._kernels = CompiledKernels()
        # rule-covered default parameters that a probe sent to the fallback, already warned about
        self._warned_routes: set = set()
        self._default_selection = params is None
        if params is None:
            self._warn_default_fallback()

    def _share(self, other, params, loss_fn, reduction, fallback_chunk_size, compile_kernels, output_fn) -> None:
        if not isinstance(other, ParameterSpaceAttribution):
            raise TypeError(f"share must be a ParameterSaliency or similar, got {type(other).__name__}")
        if other.model is not self.model:
            raise ValueError("share= must be a method of the same model")
        given = dict(params=params, loss_fn=loss_fn, fallback_chunk_size=fallback_chunk_size != 16,
                     reduction=reduction != "mean_abs", compile_kernels=compile_kernels != "auto", output_fn=output_fn)
        clashing = [name for name, value in given.items() if value not in (None, False)]
        if clashing:
            raise ValueError(f"with share=, {', '.join(clashing)} come from the shared method; leave them out")
        for attr in ("_reduction", "_selection", "_plan", "_routing_cache", "_default_loss", "loss_fn", "loss_name",
                     "fallback_chunk_size", "compile_kernels", "_kernels", "output_fn", "_warned_routes",
                     "_default_selection"):
            setattr(self, attr, getattr(other, attr))

    def _warn_default_fallback(self) -> None:
        """The default selection holds only layers the registry knows; where a rule still
        does not cover one (a subclass that overrides ``forward``), say so once."""
        slow = [(p.name, why) for p in self._selection.params if (why := p.why_no_rule()) is not None]
        _warn_slow_path(slow, "have no per-layer rule and go to the exact but slower torch.func fallback")

    def _warn_probe_fallback(self, routing: Any) -> None:
        """Default-selected parameters whose layer has a rule but that the probe sent to the
        fallback (a weight read outside its module, a layer fed sequence-first tensors): say so
        once per parameter, so that nothing takes the slow path silently."""
        if not self._default_selection or not routing.reasons:  # every pass: the usual case costs nothing
            return
        fresh = {name: why for name, why in routing.reasons.items() if name not in self._warned_routes}
        if not fresh:
            return
        slow = [(p.name, fresh[p.name]) for p in self._selection.params if p.name in fresh and p.has_rule]
        self._warned_routes.update(fresh)  # the rule-less ones were said at construction
        _warn_slow_path(
            slow, "whose layer has a per-layer rule go to the exact but slower torch.func fallback for these inputs"
        )

    @property
    def layout(self) -> SaliencyLayout:
        """The columns of a profile, in model order: one entry per selected parameter (its
        rows), or per head / neuron group under a unit scheme."""
        return self._plan.layout

    @property
    def _identity_layout(self) -> SaliencyLayout:
        """:attr:`layout` with what wraps the model taken off its names: what statistics are
        keyed by, so that they do not depend on how the model is wrapped."""
        prefix = self._selection.wrapper_prefix
        if not prefix:
            return self.layout
        return self.layout.renamed(lambda name: name[len(prefix):] if name.startswith(prefix) else name)

    def _columns(self, slices: Tensor) -> Tensor:
        """The engine's per-slice values ``(B, S)`` as the layout's columns ``(B, F)``."""
        return self._plan.combine(slices, self._reduction)

    @property
    def reduction(self) -> str:
        """The reduction's name (``"mean_abs"``, ``"mean"`` or ``"rms"``)."""
        return self._reduction.name

    @property
    def value_label(self) -> str:
        """What the raw values are, for axes and tables (e.g. ``"mean |grad|"``)."""
        return self._reduction.label

    def _device(self) -> torch.device:
        return model_device([p.param for p in self._selection.params])

    def _prepare(
        self, inputs: TensorOrTupleOfTensors, target: TargetType, additional_forward_args: Any,
        internal_batch_size: Optional[int], inputs_checked: bool = False,
    ) -> PreparedBatch:
        """Captum's conventions, checked: tuple in, one label per sample, inputs on the
        model's device, a positive ``internal_batch_size``; autograd available.
        ``inputs_checked``: ``inputs`` is a tuple that ``format_inputs`` already checked (a
        data loop's batch), so its values are not scanned a second time."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} needs autograd, which torch.inference_mode() disables; "
                "call it outside inference_mode (torch.no_grad() is fine)"
            )
        inputs_tuple, is_tuple = (inputs, True) if inputs_checked else format_inputs(inputs)
        extra, keyword = split_forward_args(additional_forward_args)
        check_internal_batch_size(internal_batch_size)
        device = self._device()
        check_device(inputs_tuple, extra, device, keyword)
        labels = normalize_target(target, inputs_tuple[0].shape[0], device, class_labels=self._default_loss)
        return PreparedBatch(inputs_tuple, extra, labels, is_tuple, keyword)

    def _passes(
        self, prepared: PreparedBatch, internal_batch_size: Optional[int], show_progress: Optional[bool] = False
    ) -> Iterator[SaliencyPass]:
        """One :class:`SaliencyPass` per chunk of samples. Call it inside
        ``evaluation_mode(self.model)``: the probe runs on the first chunk. ``show_progress``:
        a tqdm bar over the samples, chunk by chunk; None: only where the batch is cut into
        chunks, and only once the call has run :data:`PROGRESS_DELAY` seconds."""
        passes = self._chunk_passes(prepared, internal_batch_size)
        step = internal_batch_size or prepared.batch
        if show_progress is False or (show_progress is None and step >= prepared.batch):
            yield from passes
            return
        from tqdm.auto import tqdm

        with tqdm(total=prepared.batch, unit="sample", desc=type(self).__name__,
                  delay=0.0 if show_progress else PROGRESS_DELAY) as bar:
            for run in passes:
                yield run
                bar.update(run.batch)

    def _chunk_passes(self, prepared: PreparedBatch, internal_batch_size: Optional[int]) -> Iterator[SaliencyPass]:
        batch, extra, keyword = prepared.batch, prepared.additional_forward_args, prepared.forward_kwargs
        routing = self._routing_cache.routing(self.model, self._selection, prepared.inputs, extra, keyword)
        self._warn_probe_fallback(routing)
        device = self._device()
        step = internal_batch_size or batch
        for start in range(0, batch, step):
            stop = min(start + step, batch)
            labels = None if prepared.labels is None else prepared.labels[start:stop]
            compiles = self._kernels.should_compile(self.compile_kernels, device.type)
            policy = KernelPolicy.for_device(device, compiles, self._kernels)
            began = time.perf_counter()
            yield SaliencyPass(
                self.model, self._selection, routing,
                slice_batch(prepared.inputs, batch, start, stop), slice_batch(extra, batch, start, stop),
                label_resolver(labels, self._default_loss), self.loss_fn, self._reduction, policy,
                self.fallback_chunk_size, slice_kwargs(keyword, batch, start, stop), self.output_fn,
            )
            if not compiles:  # the time until the caller asks for the next pass: this one's
                self._kernels.eager_seconds += time.perf_counter() - began

    @property
    def compiles_next(self) -> bool:
        """Whether the next pass reduces with compiled kernels (``compile_kernels=True``, or
        ``"auto"`` once it pays; see :mod:`captum_paramsal.per_sample.compiled`).

        Examples::

            >>> ps = ParameterSaliency(model)          # compile_kernels="auto"
            >>> ps.compiles_next
            False
            >>> ps.stats = ps.fit_stats(loader)         # a long pass: switches on the way
            >>> ps.compiles_next
            True
        """
        return self._kernels.should_compile(self.compile_kernels, self._device().type)

    def routing(self, inputs: TensorOrTupleOfTensors, additional_forward_args: Any = None) -> RoutingReport:
        """For each selected parameter, which rule computes it or why the fallback does.

        Runs the same one-sample probe as :meth:`attribute` on the first sample of
        ``inputs`` (the route can depend on the input's shape). Print the result for a
        table.

        Examples::

            >>> print(ps.routing(images))
            parameter        module   route       reason
            conv1.weight     Conv2d   rule: conv
            ...
        """
        prepared = self._prepare(inputs, None, additional_forward_args, None)
        with evaluation_mode(self.model):
            routing = self._routing_cache.routing(
                self.model, self._selection, prepared.inputs, prepared.additional_forward_args,
                prepared.forward_kwargs,
            )
        return routing_report(self._selection, routing)

    def has_convergence_delta(self) -> bool:
        return False


def _warn_slow_path(slow: Sequence[Tuple[str, str]], what: str) -> None:
    """One warning naming the (first few) parameters on the fallback and why; none if none."""
    if not slow:
        return
    shown = "; ".join(f"{name}: {why}" for name, why in slow[:3]) + ("; ..." if len(slow) > 3 else "")
    warnings.warn(
        f"{len(slow)} default-selected parameter(s) {what} ({shown}); see .routing(inputs)",
        UserWarning,
        stacklevel=outside_stacklevel(),
    )


def _callable_name(fn: Callable) -> str:
    """What statistics record the loss as: a loss object's own ``loss_name`` (the loss families of
    :mod:`captum_paramsal.losses` name their options there), else the callable's dotted name
    (with a digest of its code for a lambda or a local function): :func:`captum_paramsal.losses.loss_name`."""
    from ..losses import loss_name

    return loss_name(fn)
