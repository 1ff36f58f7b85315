"""Parameter-space saliency (Levin et al., NeurIPS 2022)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from captum.log import log_usage
from torch import Tensor, nn

from .._utils import TargetType, TensorOrTupleOfTensors, evaluation_mode
from ..data import labelled_batches
from ..per_sample import unit_saliency
from ..per_sample.compiled import CompileSetting
from ..saliency_profile import SaliencyProfile
from ..stats import SaliencyStats, layout_fingerprint, weights_digest
from ..unit_schemes import UnitsSpec
from .parameter_space_attribution import ParameterSpaceAttribution, PreparedBatch


class ParameterSaliency(ParameterSpaceAttribution):
    r"""Which of a network's own parameters are responsible for its loss on a sample.

    For each sample ``i`` with label ``y_i`` this computes the per-sample loss
    ``L_i = loss_fn(model(x_i), y_i)``, its gradient ``g_i`` over the selected
    parameters, and, per *unit* (one conv filter / one output neuron, i.e. one
    output slice of a weight), the mean over the unit's entries of ``|g_i|``
    (``reduction="mean_abs"``), of ``g_i`` (``"mean"``) or the root mean square of
    ``g_i`` (``"rms"``). The result is one row per sample and one column per unit: a
    *saliency profile*.

    The batch costs one forward and one backward pass. Conv, ConvTranspose, Linear
    and LayerNorm / RMSNorm layers have exact per-layer rules that turn each layer's
    inputs and output gradient into per-sample unit saliency and free it at once;
    every other selected parameter (embeddings, attention's ``in_proj_weight``, a
    custom layer) goes through a generic ``torch.func`` per-sample method in chunks of
    ``fallback_chunk_size`` samples. :meth:`routing` says which is which, and why.

    The model runs in eval mode, so samples in a batch do not interact. It is
    left exactly as found: parameter values, ``requires_grad``, ``.grad``,
    each module's training flag and its hooks, also when an error interrupts.

    Args:
        model: the network. Its output for a batch is ``(B, classes)`` for the
            default loss.
        params: names from ``model.named_parameters()`` to explain. Default: the
            registry's default selection, the ``weight`` of every Conv1d/2d/3d,
            ConvTranspose1d/2d/3d and Linear (their subclasses included).
        loss_fn: ``loss_fn(outputs, target) -> (B,)``, one loss per sample,
            with no interaction between samples; ``outputs`` is the model's
            output for the batch and ``target`` holds one entry per sample.
            Default: cross-entropy (``reduction="none"``).
        reduction: ``"mean_abs"`` (default), ``"mean"`` or ``"rms"``. ``rms`` has a closed
            form for layers with few positions (a Linear over a short sequence, a late
            convolution) that never builds the per-sample gradient.
        fallback_chunk_size: samples per chunk in the generic fallback; bounds
            its memory at that many per-sample gradients of the fallback
            parameters.
        stats: reference :class:`SaliencyStats` (from :meth:`fit_stats` or
            ``SaliencyStats.load``); when given, :meth:`attribute` returns
            standardized saliency ``z = (s - mean) / std`` per unit. Statistics of
            another layout, reduction or loss are refused, and so are statistics fitted on
            other weights (their :attr:`~SaliencyStats.weights_digest` is not this model's
            :meth:`weights_digest`), when they are given or assigned to :attr:`stats`;
            changing the weights afterwards (``turn_off``, ``boost``) is not checked.
        compile_kernels: reduce the layers whose per-sample gradient has rank 2 to
            16 (a convolution with few output positions, a Linear over a short
            sequence) with kernels compiled by ``torch.compile``, which never write
            the per-sample gradient: several times faster on those layers, but the
            first compiled pass of a process takes seconds (about 30 s for a
            ResNet-18 on an empty inductor cache on 2 cores, 6 s warm), and a CPU
            needs a C++ compiler (a GPU, triton). ``"auto"`` (the default): eager
            until this method's passes have taken about what compiling costs (30 s
            of eager passes, 6 s where kernels of this library compiled before into
            the inductor cache), then compiled: a long pass (:meth:`fit_stats` over a
            data set, an analysis over many batches, a loop of calls) switches on
            the way, one small call never compiles; and eager throughout where no
            compiler is found. ``True``: compile from the first pass; ``False``:
            never. Where compiling fails it warns once and goes on without.
            :attr:`compiles_next` says what the next pass does.
        output_fn: ``output_fn(model output) -> Tensor``: the tensor the loss is computed
            on. Default: the output itself, the ``logits`` of a Hugging Face ``ModelOutput``,
            or a tuple's first element. For a causal language model's next token, for
            example, ``output_fn=lambda out: out.logits[:, -1]``.
        units: what one column is (:mod:`captum_paramsal.unit_schemes`): ``"rows"`` (default:
            each parameter's output rows: conv filters, Linear neurons), ``"heads"`` (an
            attention head: its q, k, v rows and the output projection's columns that read
            it), ``"neurons"`` (an MLP neuron: its up/gate rows and its down projection's
            column), several (``("heads", "neurons")``), or ``{module name prefix: scheme}``.
            Selected parameters outside every head or neuron stay rows.
        check_weights: refuse statistics fitted on other weights (default True). False is the
            opt-out for a model whose weights differ on purpose, a fine-tuned model standardized
            by its base model's statistics; it also silences the warning about statistics that
            do not know their weights (a file of format 1). Kept as :attr:`check_weights`, read
            each time :attr:`stats` is assigned. Layout, reduction and loss are always checked.

    Attributes:
        layout (SaliencyLayout): the columns of the result: one entry per
            selected parameter (``.name``, ``.num_units``, ``.slice``) in
            ``model.named_parameters()`` order.

    Examples::

        >>> import torch, torchvision
        >>> from captum_paramsal import ParameterSaliency
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> ps = ParameterSaliency(model)
        >>> images, labels = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
        >>> sal = ps.attribute(images, target=labels)      # (4, ps.layout.num_columns)
        >>> entry = ps.layout["layer1.0.conv1.weight"]
        >>> sal[:, entry.slice].shape                       # that layer's 64 filters
        torch.Size([4, 64])
        >>> # which filter of the whole network is most salient for sample 0?
        >>> ps.layout.unit_of(int(sal[0].argmax()))
        >>> # standardized against a reference set, as in the paper
        >>> ps.stats = ps.fit_stats(val_loader)             # iterable of (inputs, labels)
        >>> z = ps.attribute(images, target=labels)          # z-scores per unit
        >>> ps.profile(images, target=labels).plot(0)        # the paper's figure
        >>> print(ps.routing(images))                        # which layers take the fast path
        >>> # a language model by attention heads and MLP neurons
        >>> ps = ParameterSaliency(gpt2, units=("heads", "neurons"), loss_fn=CausalLM())
        >>> ps.profile(ids, target=ids).top_k(3)[0]         # UnitScore('transformer.h.5.attn', 7, ...)
    """

    def __init__(
        self,
        model: nn.Module,
        params: Optional[Sequence[str]] = None,
        loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        reduction: str = "mean_abs",
        fallback_chunk_size: int = 16,
        stats: Optional[SaliencyStats] = None,
        compile_kernels: CompileSetting = "auto",
        output_fn: Optional[Callable[[Any], Tensor]] = None,
        units: UnitsSpec = "rows",
        check_weights: bool = True,
    ) -> None:
        super().__init__(
            model, params, loss_fn, reduction, fallback_chunk_size, compile_kernels, output_fn=output_fn, units=units
        )
        # statistics are keyed by the parameters' identity: their names without what wraps the
        # model, so that statistics of a bare model standardize it inside DataParallel and back
        self.fingerprint = layout_fingerprint(self._identity_layout, self.reduction, self.loss_name)
        if not isinstance(check_weights, bool):
            raise TypeError(f"check_weights must be a bool, got {check_weights!r}")
        self.check_weights = check_weights
        self.stats = stats

    @property
    def stats(self) -> Optional[SaliencyStats]:
        return self._stats

    @stats.setter
    def stats(self, stats: Optional[SaliencyStats]) -> None:
        if stats is not None:
            if not isinstance(stats, SaliencyStats):
                raise TypeError(f"stats must be SaliencyStats or None, got {type(stats).__name__}")
            stats.check_compatible(self.fingerprint, what="this ParameterSaliency's profiles")
            if self.check_weights:  # at assignment only: an intervention later changes weights on purpose
                stats.check_weights_digest(self.weights_digest(), what="this model")
        self._stats = stats

    def weights_digest(self) -> str:
        """SHA-256 of the selected parameters' current values (:func:`~captum_paramsal.stats.weights_digest`,
        in the order of the layout, names without what wraps the model): what :meth:`fit_stats`
        records and what assigning :attr:`stats` compares."""
        prefix = self._selection.wrapper_prefix
        return weights_digest(
            (p.name[len(prefix):] if prefix and p.name.startswith(prefix) else p.name, p.param)
            for p in self._selection.params
        )

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTupleOfTensors,
        target: TargetType = None,
        additional_forward_args: Any = None,
        internal_batch_size: Optional[int] = None,
        standardize: bool = True,
        show_progress: Optional[bool] = None,
    ) -> TensorOrTupleOfTensors:
        r"""Per-sample unit saliency of ``inputs``, standardized when :attr:`stats` is set.

        Args:
            inputs: a batch ``(B, ...)``, or a tuple of batches for a model with
                several inputs. Called as ``model(*inputs, *additional_forward_args)``.
            target: labels for the loss: an int for all samples, a list or
                tensor with one per sample, or None for each sample's predicted
                class.
            additional_forward_args: extra arguments to the model after the
                inputs: a tuple is passed by position, a dict by keyword (for example
                ``{"attention_mask": mask}`` for a Hugging Face model); a tensor whose
                first dimension is ``B`` is per sample, anything else is passed
                unchanged to every sample.
            internal_batch_size: at most this many samples per forward/backward,
                which bounds memory; None processes the batch at once.
            standardize: with :attr:`stats` set, return z-scores (default) or,
                with False, the raw profile. Ignored without statistics.
            show_progress: a tqdm bar over the samples, chunk by chunk of
                ``internal_batch_size``: None (the default) shows it only where the
                batch is cut into chunks and the call runs longer than 3 s; True
                always; False never.

        Returns:
            ``(B, F)`` saliency, columns as in :attr:`layout`; a 1-tuple holding
            it when ``inputs`` is a tuple. Raw saliency has the model's dtype; z-scores are
            float64 (the statistics' precision) whatever the model's: a confidently right
            sample has tiny gradients, so ``s - mean`` is nearly ``-mean`` for all such
            samples, and what tells them apart (their nearest neighbours) would not survive
            the subtraction in float32.
        """
        prepared = self._prepare(inputs, target, additional_forward_args, internal_batch_size)
        saliency = self._raw_saliency(prepared, internal_batch_size, show_progress)
        if standardize and self._stats is not None:
            saliency = self._stats.standardize(saliency)  # float64: see "Returns"
        return (saliency,) if prepared.is_tuple else saliency

    def _raw_saliency(self, prepared: PreparedBatch, internal_batch_size: Optional[int],
                      show_progress: Optional[bool] = False) -> Tensor:
        """``(B, F)`` raw saliency of a checked batch."""
        with evaluation_mode(self.model):
            rows = [unit_saliency(run) for run in self._passes(prepared, internal_batch_size, show_progress)]
        return self._columns(torch.cat(rows) if len(rows) > 1 else rows[0])

    def profile(
        self,
        inputs: TensorOrTupleOfTensors,
        target: TargetType = None,
        additional_forward_args: Any = None,
        internal_batch_size: Optional[int] = None,
        standardize: bool = True,
        show_progress: Optional[bool] = None,
    ) -> SaliencyProfile:
        """:meth:`attribute` wrapped in a :class:`SaliencyProfile` (values with their layout)."""
        prepared = self._prepare(inputs, target, additional_forward_args, internal_batch_size)
        values = self._raw_saliency(prepared, internal_batch_size, show_progress)
        standardized = standardize and self._stats is not None
        if standardized:
            values = self._stats.standardize(values)  # float64, as in attribute
        return SaliencyProfile(values.detach(), self.layout, standardized, self.reduction)

    def fit_stats(
        self,
        data: Iterable,
        progress: bool = True,
        max_samples: Optional[int] = None,
        internal_batch_size: Optional[int] = None,
        shard: Optional[bool] = None,
    ) -> SaliencyStats:
        """Reference statistics over ``data`` in one streaming pass (docs/METHOD.md, "Standardization").

        Args:
            data: an iterable of batches, a DataLoader included, each one of: an
                ``(inputs, labels)`` pair (``inputs`` a tensor or a tuple of tensors); an
                ``(inputs, labels, {keyword: value})`` triple; a dict with ``"inputs"`` and
                ``"labels"``; or a Hugging Face batch, a dict with ``"labels"`` and
                ``"input_ids"`` (or ``"pixel_values"``, ...) whose other entries
                (``attention_mask`` ...) are passed by keyword. Batches are moved to the
                model's device. The paper uses the whole validation set with its true
                labels.
            progress: show a tqdm progress bar (on rank 0 only when distributed).
            max_samples: stop after this many samples (of this process).
            internal_batch_size: as in :meth:`attribute`.
            shard: under ``torch.distributed``, whether this rank takes every
                ``world_size``-th batch of ``data`` (round robin). Default: yes,
                unless ``data`` is a DataLoader with a ``DistributedSampler``,
                which already gives each rank its own shard. The ranks' partial
                statistics are then combined, so every rank returns the
                statistics of the whole set.

        Returns:
            :class:`SaliencyStats` (float64 Welford/Chan accumulation) that record the
            :meth:`weights_digest` of the weights they were fitted on. It does not set
            :attr:`stats`; assign it to standardize.
        """
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        if shard is None:
            shard = distributed and not _has_distributed_sampler(data)
        batches = labelled_batches(
            data,
            device=self._device(),
            max_samples=max_samples,
            shard=(dist.get_rank(), dist.get_world_size()) if shard and distributed else None,
            progress=progress,
            desc="saliency statistics",
            class_labels=self._default_loss,
            keyword_inputs=True,
        )
        stats = SaliencyStats.empty(self._identity_layout, self.reduction, self.loss_name, self.weights_digest())
        for inputs_tuple, labels, keyword in batches:
            prepared = self._prepare(inputs_tuple, labels, keyword or None, internal_batch_size, inputs_checked=True)
            stats.partial_fit(self._raw_saliency(prepared, internal_batch_size))
        if distributed:
            stats = stats.all_reduce()
        if stats.count == 0:
            raise ValueError("fit_stats saw no samples: data is empty")
        return stats

def _has_distributed_sampler(data: Any) -> bool:
    from torch.utils.data.distributed import DistributedSampler

    return isinstance(getattr(data, "sampler", None), DistributedSampler) or isinstance(
        getattr(getattr(data, "batch_sampler", None), "sampler", None), DistributedSampler
    )
