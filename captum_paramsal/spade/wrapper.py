"""``SPADE``: any Captum attribution, run per sample on that sample's pruned network."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Union

from captum.attr import Attribution
from captum.log import log_usage
from torch import Tensor, nn

from .._utils import format_inputs
from .augment import AugmentFn
from .sample_pruning import SampleTargetedPruning, SparsityType


class SPADE(Attribution):
    r"""Sparsity-guided debugging (Moakhar et al., ICML 2024) around any attribution method.

    In the manner of Captum's ``NoiseTunnel``: wrap an attribution, call :meth:`attribute` as you
    would call the wrapped one. For each sample of the batch, SPADE prunes the network down to
    the connections that matter for that sample (:class:`SampleTargetedPruning`: a batch of
    augmentations of the sample, each layer's input second moment from one dense pass, a
    SparseGPT-style sparse reconstruction of every prunable layer), runs the wrapped method on
    the pruned network for that sample, and restores the dense weights bit for bit (also when an
    error interrupts). The pruning does not depend on the method or the target, only on the
    sample, the model and the options.

    Which model is pruned: ``model=`` when given; otherwise the ``nn.Module`` found on the
    attribution, in this order: ``attribution.forward_func`` when it is a module (Saliency,
    InputXGradient, IntegratedGradients, Occlusion, LayerGradCam, NoiseTunnel's inner method,
    ParameterSaliency, ...), the module of a bound method ``forward_func`` (``model.forward``),
    then ``attribution.model`` (GuidedBackprop, GuidedGradCam). When ``forward_func`` is a plain
    function around the model (say ``lambda x: model(x).softmax(1)``) pass ``model=``. For layer
    methods the explained layer must belong to that model. The calibration pass runs
    ``attribution.forward_func``, i.e. exactly what the method explains.

    Per-sample arguments: ``target`` (a list or tensor with one entry per sample is split; an
    int or a tuple applies to every sample), ``additional_forward_args`` and every other keyword
    argument are passed to the wrapped method for one sample at a time; a tensor (or a tensor
    inside a tuple) whose first dimension equals the batch size (> 1) is sliced to that sample,
    anything else (``baselines`` of batch 1, ``sliding_window_shapes``, ``n_steps``, ...) is
    passed unchanged. The per-sample results are concatenated along the batch dimension
    (convergence deltas included).

    Args:
        attribution: a Captum ``Attribution`` (or this library's ``ParameterSaliency`` /
            ``ParameterGuidedInputSaliency``).
        sparsity, n_augmentations, augment, solver, mask_every, obc_block, prune_stem, blocksize,
            percdamp, seed, internal_batch_size, refit: as in :class:`SampleTargetedPruning`
            (default sparsity 0.9 of every Linear/Conv1d/Conv2d weight but the stem convolution,
            the paper's 1024 calibration views seeded with 0, the SparseGPT solver with its mask
            re-chosen every kernel; a per-layer dict is keyed by weight parameter names or glob
            patterns over them, ``{"layer3.*": 0.95, "fc.weight": 0.95}``).
            ``internal_batch_size`` here bounds the calibration pass; one given to
            :meth:`attribute` goes to the wrapped method, as any keyword argument.
        model: the ``nn.Module`` to prune, overriding the discovery above.

    Attributes:
        attribution: the wrapped method.
        model: the pruned module.
        pruning (SampleTargetedPruning): the pruning with its resolved ``layer_sparsity``.

    Examples::

        >>> from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion
        >>> from captum_paramsal.spade import SPADE
        >>> spade_ig = SPADE(IntegratedGradients(model), sparsity=0.9)
        >>> obc_ig = SPADE(IntegratedGradients(model), sparsity={"layer3.*": 0.95, "fc.weight": 0.95}, solver="obc")
        >>> attr = spade_ig.attribute(images, target=labels, n_steps=32)   # images' shape
        >>> # layer methods: the layer is the model's; interpolate as usual
        >>> cam = SPADE(LayerGradCam(model, model.layer4)).attribute(images, target=labels)
        >>> cam = LayerAttribution.interpolate(cam, images.shape[-2:], interpolate_mode="bilinear")
        >>> # per-layer sparsity; a wrapped forward function needs model=
        >>> occ = SPADE(Occlusion(lambda x: model(x).softmax(1)), model=model,
        ...             sparsity={"layer4.1.conv2.weight": 0.95, "fc.weight": 0.5})
        >>> occ.attribute(images, target=labels, sliding_window_shapes=(3, 8, 8), strides=4)
    """

    def __init__(
        self,
        attribution: Attribution,
        sparsity: SparsityType = 0.9,
        n_augmentations: int = 1024,
        augment: Optional[AugmentFn] = None,
        model: Optional[nn.Module] = None,
        solver: str = "sparsegpt",
        mask_every: Optional[int] = None,
        obc_block: Union[int, str] = 1,
        prune_stem: bool = False,
        blocksize: int = 128,
        percdamp: float = 0.01,
        seed: Optional[int] = 0,
        internal_batch_size: Optional[int] = 256,
        refit: bool = False,
    ) -> None:
        if not isinstance(attribution, Attribution):
            raise TypeError(
                f"attribution must be a captum.attr.Attribution (e.g. IntegratedGradients(model)), "
                f"got {type(attribution).__name__}"
            )
        self.attribution = attribution
        self.model = find_model(attribution, model)
        self.pruning = SampleTargetedPruning(
            self.model,
            sparsity=sparsity,
            n_augmentations=n_augmentations,
            augment=augment,
            solver=solver,
            mask_every=mask_every,
            obc_block=obc_block,
            prune_stem=prune_stem,
            blocksize=blocksize,
            percdamp=percdamp,
            seed=seed,
            internal_batch_size=internal_batch_size,
            refit=refit,
        )
        Attribution.__init__(self, attribution.forward_func)

    @property
    def multiplies_by_inputs(self) -> bool:
        """The wrapped method's ``multiplies_by_inputs``.

        Examples::

            >>> SPADE(IntegratedGradients(model)).multiplies_by_inputs
            True
        """
        return self.attribution.multiplies_by_inputs

    def has_convergence_delta(self) -> bool:
        """The wrapped method's ``has_convergence_delta()``.

        Examples::

            >>> SPADE(IntegratedGradients(model)).has_convergence_delta()
            True
        """
        return self.attribution.has_convergence_delta()

    @log_usage()
    def attribute(
        self,
        inputs: Any,
        target: Any = None,
        additional_forward_args: Any = None,
        **kwargs: Any,
    ) -> Any:
        r"""The wrapped method's attributions, each sample's from its own pruned network.

        Args:
            inputs: a batch, or a tuple of batches, as for the wrapped method.
            target: as for the wrapped method; one entry per sample is split per sample.
            additional_forward_args: as for the wrapped method; per-sample tensors are split.
            **kwargs: passed to the wrapped method's ``attribute`` (per-sample tensors split).

        Returns:
            What the wrapped method returns for the batch (tensor, tuple, or attributions with
            convergence delta), the samples' results concatenated along dimension 0.

        Examples::

            >>> spade_ig = SPADE(IntegratedGradients(model), sparsity=0.9)
            >>> attr, delta = spade_ig.attribute(images, target=labels, n_steps=32,
            ...                                  return_convergence_delta=True)
        """
        inputs_tuple, is_tuple = format_inputs(inputs)
        batch = inputs_tuple[0].shape[0]
        results: List[Any] = []
        for i in range(batch):
            sample = tuple(x[i : i + 1] for x in inputs_tuple)
            extra = _per_sample(additional_forward_args, batch, i)
            options = {key: _per_sample(value, batch, i) for key, value in kwargs.items()}
            if additional_forward_args is not None:
                options["additional_forward_args"] = extra
            with self.pruning.pruned(sample, extra, forward_func=self.forward_func):
                results.append(
                    self.attribution.attribute(
                        sample if is_tuple else sample[0], target=_sample_target(target, batch, i), **options
                    )
                )
        return _concatenate(results)


def find_model(attribution: Attribution, model: Optional[nn.Module] = None) -> nn.Module:
    """The ``nn.Module`` that :class:`SPADE` prunes for ``attribution`` (see its docstring).

    Raises:
        TypeError: no module found (pass ``model=``), or ``model`` that is not a module.
        ValueError: the attribution's layer is not part of the model.

    Examples::

        >>> find_model(IntegratedGradients(model)) is model
        True
        >>> find_model(Saliency(lambda x: model(x).softmax(1)), model=model) is model
        True
    """
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        found = model
    else:
        found = _discover(attribution)
        if found is None:
            raise TypeError(
                f"cannot find the model inside {type(attribution).__name__}: its forward_func is "
                f"{_describe(attribution.forward_func)}, not an nn.Module; pass SPADE(..., model=your_model)"
            )
    layers = getattr(attribution, "layer", None)
    layers = layers if isinstance(layers, (list, tuple)) else [layers]
    members = {id(m) for m in found.modules()}
    for layer in layers:
        if isinstance(layer, nn.Module) and id(layer) not in members:
            raise ValueError(
                f"the attribution's layer ({type(layer).__name__}) is not part of the model SPADE prunes "
                f"({type(found).__name__}); pass model= the network that contains it"
            )
    return found


def _discover(attribution: Attribution) -> Optional[nn.Module]:
    forward = getattr(attribution, "forward_func", None)
    if isinstance(forward, nn.Module):
        return forward
    owner = getattr(forward, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    model = getattr(attribution, "model", None)
    if isinstance(model, nn.Module):
        return model
    inner = getattr(attribution, "attribution_method", None)  # NoiseTunnel
    if isinstance(inner, Attribution):
        return _discover(inner)
    return None


def _describe(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _per_sample(value: Any, batch: int, i: int) -> Any:
    if batch == 1:
        return value
    if isinstance(value, Tensor):
        return value[i : i + 1] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_per_sample(v, batch, i) for v in value)
    return value


def _sample_target(target: Any, batch: int, i: int) -> Any:
    if target is None or batch == 1:
        return target
    if isinstance(target, Tensor):
        if target.dim() == 0 or target.numel() == 1:
            return target
        if target.shape[0] != batch:
            raise ValueError(f"target has {target.shape[0]} entries for {batch} samples")
        return target[i : i + 1]
    if isinstance(target, list):
        if len(target) != batch:
            raise ValueError(f"target has {len(target)} entries for {batch} samples")
        return [target[i]]
    return target  # an int, or a tuple indexing every sample's output alike


def _concatenate(results: List[Any]) -> Any:
    import torch

    first = results[0]
    if isinstance(first, Tensor):
        return torch.cat([r.reshape(1) if r.dim() == 0 else r for r in results])
    if isinstance(first, (tuple, list)):
        parts = [_concatenate([r[j] for r in results]) for j in range(len(first))]
        return tuple(parts) if isinstance(first, tuple) else parts
    raise TypeError(f"the wrapped method returned {type(first).__name__}; SPADE concatenates tensors and tuples")
