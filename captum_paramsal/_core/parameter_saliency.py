"""Parameter-space saliency (Levin et al., NeurIPS 2022)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn

from .._utils import (
    TargetType,
    TensorOrTupleOfTensors,
    check_device,
    check_internal_batch_size,
    cross_entropy_per_sample,
    evaluation_mode,
    format_additional_args,
    format_inputs,
    label_resolver,
    model_device,
    normalize_target,
)
from ..layout import SaliencyLayout
from ..per_sample import per_sample_unit_saliency, route, select_parameters
from ..per_sample.batching import slice_batch
from ..per_sample.reduce import check_reduction


class ParameterSaliency(GradientAttribution):
    r"""Which of a network's own parameters are responsible for its loss on a sample.

    For each sample ``i`` with label ``y_i`` this computes the per-sample loss
    ``L_i = loss_fn(model(x_i), y_i)``, its gradient ``g_i`` over the selected
    parameters, and, per *unit* (one conv filter / one output neuron, i.e. one
    output slice of a weight), the mean over the unit's entries of ``|g_i|``
    (``reduction="mean_abs"``) or of ``g_i`` (``"mean"``). The result is one
    row per sample and one column per unit: a *saliency profile*.

    The batch costs one forward and one backward pass. Conv, ConvTranspose and
    Linear layers have exact per-layer rules that turn each layer's input and
    output gradient into per-sample unit saliency and free it at once; every
    other selected parameter (norm layers, embeddings, attention's
    ``in_proj_weight``, a custom layer) goes through a generic ``torch.func``
    per-sample method in chunks of ``fallback_chunk_size`` samples.

    The model runs in eval mode, so samples in a batch do not interact. It is
    left exactly as found: parameter values, ``requires_grad``, ``.grad``,
    each module's training flag and its hooks, also when an error interrupts.

    Args:
        model: the network. Its output for a batch is ``(B, classes)`` for the
            default loss.
        params: names from ``model.named_parameters()`` to explain. Default: the
            ``weight`` of every Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear.
        loss_fn: ``loss_fn(outputs, target) -> (B,)``, one loss per sample,
            with no interaction between samples; ``outputs`` is the model's
            output for the batch and ``target`` holds one entry per sample.
            Default: cross-entropy (``reduction="none"``).
        reduction: ``"mean_abs"`` (default) or ``"mean"``.
        fallback_chunk_size: samples per chunk in the generic fallback; bounds
            its memory at that many per-sample gradients of the fallback
            parameters.

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
    """

    def __init__(
        self,
        model: nn.Module,
        params: Optional[Sequence[str]] = None,
        loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        reduction: str = "mean_abs",
        fallback_chunk_size: int = 16,
    ) -> None:
        GradientAttribution.__init__(self, model)
        self.model = model
        self.reduction = check_reduction(reduction)
        self._selection = select_parameters(model, params)
        self._default_loss = loss_fn is None
        self.loss_fn = cross_entropy_per_sample if loss_fn is None else loss_fn
        if not isinstance(fallback_chunk_size, int) or fallback_chunk_size < 1:
            raise ValueError(f"fallback_chunk_size must be a positive int, got {fallback_chunk_size!r}")
        self.fallback_chunk_size = fallback_chunk_size

    @property
    def layout(self) -> SaliencyLayout:
        return self._selection.layout

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTupleOfTensors,
        target: TargetType = None,
        additional_forward_args: Any = None,
        internal_batch_size: Optional[int] = None,
    ) -> TensorOrTupleOfTensors:
        r"""Per-sample unit saliency of ``inputs``.

        Args:
            inputs: a batch ``(B, ...)``, or a tuple of batches for a model with
                several inputs. Called as ``model(*inputs, *additional_forward_args)``.
            target: labels for the loss: an int for all samples, a list or
                tensor with one per sample, or None for each sample's predicted
                class.
            additional_forward_args: extra arguments to the model after the
                inputs; a tensor whose first dimension is ``B`` is per sample,
                anything else is passed unchanged to every sample.
            internal_batch_size: at most this many samples per forward/backward,
                which bounds memory; None processes the batch at once.

        Returns:
            ``(B, F)`` saliency, columns as in :attr:`layout`; a 1-tuple holding
            it when ``inputs`` is a tuple.
        """
        inputs_tuple, is_tuple = format_inputs(inputs)
        extra = format_additional_args(additional_forward_args)
        check_internal_batch_size(internal_batch_size)
        device = model_device([p.param for p in self._selection.params])
        check_device(inputs_tuple, extra, device)
        batch = inputs_tuple[0].shape[0]
        labels = normalize_target(target, batch, device)
        step = internal_batch_size or batch
        rows = []
        with evaluation_mode(self.model):
            routing = route(self.model, self._selection, inputs_tuple, extra)
            for start in range(0, batch, step):
                stop = min(start + step, batch)
                rows.append(
                    per_sample_unit_saliency(
                        self.model,
                        self._selection,
                        routing,
                        slice_batch(inputs_tuple, batch, start, stop),
                        slice_batch(extra, batch, start, stop),
                        label_resolver(None if labels is None else labels[start:stop], self._default_loss),
                        self.loss_fn,
                        self.reduction,
                        self.fallback_chunk_size,
                    )
                )
        saliency = torch.cat(rows) if len(rows) > 1 else rows[0]
        return (saliency,) if is_tuple else saliency

    def has_convergence_delta(self) -> bool:
        return False
