"""Sample-targeted pruning (Moakhar et al., "SPADE", ICML 2024): one sample's sparse network."""

from __future__ import annotations

import contextlib
import difflib
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .._utils import TensorOrTupleOfTensors, evaluation_mode, format_additional_args, format_inputs
from .augment import AugmentFn, augmented_batch
from .second_moments import SUPPORTED_TYPES, SecondMoment, SecondMomentCollector, grouped_weight
from .solver import check_percdamp, check_sparsity, exact_reconstruction, sparsegpt_mask_and_weights

SparsityType = Union[float, Mapping[str, float]]


class SampleTargetedPruning:
    r"""Prune a network down to the connections that matter for one sample.

    For a sample ``x``: a calibration batch of ``x`` and ``n_augmentations - 1`` random views of
    it; one pass of the *dense* model over that batch (in eval mode, under ``no_grad``) records
    each prunable layer's input second moment ``X Xᵀ`` (convolution inputs unfolded); each layer
    is then pruned to its sparsity and reconstructed with the OBS / SparseGPT-style solver
    (:func:`~captum_paramsal.spade.solver.sparsegpt_prune`: column blocks of ``blocksize``,
    dampening ``percdamp``), so that on this sample's neighbourhood each sparse layer computes
    what the dense one did. All layers are solved from the same dense pass (not sequentially on
    the already-pruned network).

    What is pruned: the ``weight`` of every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` whose
    weight is a plain ``nn.Parameter`` (grouped and depthwise convolutions included, solved per
    group with one budget for the whole layer). Biases, norm layers, embeddings, ``Conv3d`` and
    ``ConvTranspose`` stay dense; naming one of them in a ``sparsity`` dict is an error. A layer
    that does not run in the forward pass (e.g. ``nn.MultiheadAttention.out_proj``, whose weight
    is used functionally) has no second moment: it stays dense when chosen by a float
    ``sparsity`` and is listed in :attr:`last_skipped`; when named in a dict it is an error.

    The model is never modified outside :meth:`pruned`, and inside it only the pruned weights'
    values are swapped (``param.data``); on leaving, also on error, each parameter gets its own
    original storage back, so the dense weights are restored bit for bit, and ``requires_grad``,
    ``.grad``, training mode and hooks are untouched.

    Args:
        model: the network.
        sparsity: the fraction of weights to prune in ``[0, 1)``: one float for every prunable
            layer, or a dict ``{layer name: sparsity}`` (names from ``model.named_modules()``) that
            prunes only the named layers. Each layer ends with exactly
            ``round(sparsity * weight.numel())`` zeros.
        n_augmentations: rows of the calibration batch, the sample itself included (default 64).
        augment: ``sample -> sample`` (no batch dimension) making one random view; default
            :class:`~captum_paramsal.spade.augment.DefaultAugmentation` (random resized crop, flip,
            colour jitter). For a model with several inputs it takes and returns the tuple.
        blocksize: columns per solver block (default 128).
        percdamp: Hessian dampening relative to its mean diagonal (default 0.01).
        seed: seed of the augmentations (default 0; the same views for every sample, the global
            random state untouched); None draws from the global random state.
        calibration_batch_size: at most this many calibration rows per forward pass (memory);
            None runs the whole calibration batch at once.
        refit: after SparseGPT has chosen the mask, replace each row's kept weights by the exact
            least-squares reconstruction for that mask
            (:func:`~captum_paramsal.spade.solver.exact_reconstruction`); slower, a smaller error.

    Attributes:
        layer_sparsity (dict): the layers that will be pruned and their sparsity.
        last_skipped (list): layers of the last call that did not run and stayed dense.

    Examples::

        >>> from captum_paramsal.spade import SampleTargetedPruning
        >>> pruning = SampleTargetedPruning(model, sparsity=0.9, n_augmentations=64)
        >>> with pruning.pruned(image[None]) as weights:      # one sample, batch dimension 1
        ...     sparse_logits = model(image[None])             # the sample's sparse network
        >>> # dense again here, bit for bit
        >>> SampleTargetedPruning.prunable_layers(model)       # names for a per-layer dict
        >>> SampleTargetedPruning(model, sparsity={"layer4.1.conv2": 0.95, "fc": 0.5})
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: SparsityType = 0.9,
        n_augmentations: int = 64,
        augment: Optional[AugmentFn] = None,
        blocksize: int = 128,
        percdamp: float = 0.01,
        seed: Optional[int] = 0,
        calibration_batch_size: Optional[int] = None,
        refit: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.layer_sparsity = resolve_sparsity(model, sparsity)
        self._named = isinstance(sparsity, Mapping)
        self.n_augmentations = _positive_int(n_augmentations, "n_augmentations")
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be a callable sample -> sample, got {type(augment).__name__}")
        self.augment = augment
        self.blocksize = _positive_int(blocksize, "blocksize")
        self.percdamp = check_percdamp(percdamp)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        if calibration_batch_size is not None:
            calibration_batch_size = _positive_int(calibration_batch_size, "calibration_batch_size")
        self.calibration_batch_size = calibration_batch_size
        self.refit = bool(refit)
        self.last_skipped: List[str] = []

    @staticmethod
    def prunable_layers(model: nn.Module) -> List[str]:
        """Names of the layers a float ``sparsity`` prunes, in ``model.named_modules()`` order."""
        return [name for name, module in model.named_modules() if _prunable(module) is None]

    def calibration_batch(self, inputs: TensorOrTupleOfTensors) -> Tuple[Tensor, ...]:
        """The sample and its augmentations: a tuple of ``(n_augmentations, ...)`` tensors."""
        inputs_tuple = _one_sample(inputs)
        return augmented_batch(inputs_tuple, self.n_augmentations, self.augment, self.seed)

    def second_moments(
        self,
        inputs: TensorOrTupleOfTensors,
        additional_forward_args: Any = None,
        forward_func: Optional[Callable[..., Any]] = None,
    ) -> Dict[str, SecondMoment]:
        """Each layer's input second moment over the sample's calibration batch (dense model).

        Args:
            inputs: one sample, batch dimension 1 (a tensor, or a tuple for several inputs).
            additional_forward_args: extra model arguments; tensors with first dimension 1 are
                per sample and repeated for every augmentation, anything else is passed as is.
            forward_func: what to run (default the model); e.g. an attribution's ``forward_func``
                that wraps the model. It must run the model's layers.
        """
        batch = self.calibration_batch(inputs)
        extra = format_additional_args(additional_forward_args)
        run = self.model if forward_func is None else forward_func
        modules = dict(self.model.named_modules())
        layers = {name: modules[name] for name, s in self.layer_sparsity.items() if s > 0}
        self.last_skipped = []
        if not layers:  # sparsity 0 everywhere: nothing to reconstruct, no pass needed
            return {}
        total = batch[0].shape[0]
        step = self.calibration_batch_size or total
        collector = SecondMomentCollector(layers)
        with evaluation_mode(self.model), torch.no_grad(), collector:
            for start in range(0, total, step):
                rows = tuple(x[start : start + step] for x in batch)
                run(*rows, *_expand_extra(extra, rows[0].shape[0]))
        missing = [name for name in layers if name not in collector.moments]
        if layers and not collector.moments:
            raise ValueError(
                f"none of the model's prunable layers ran when calling {getattr(run, '__qualname__', run)!r} "
                "on the calibration batch: does forward_func run this model?"
            )
        if missing and self._named:
            raise ValueError(
                f"layer(s) {missing} did not run in the forward pass, so SPADE has no inputs to reconstruct "
                "them from (a weight used functionally, or a branch not taken); remove them from sparsity"
            )
        self.last_skipped = missing
        return collector.moments

    def solve(self, moments: Mapping[str, SecondMoment]) -> Dict[str, Tensor]:
        """The pruned weight of every layer with a second moment, each the shape of the layer's."""
        modules = dict(self.model.named_modules())
        out = {}
        for name, moment in moments.items():
            module = modules[name]
            weight = grouped_weight(module).detach()
            hessian = moment.hessian()
            mask, pruned = sparsegpt_mask_and_weights(
                weight, hessian, self.layer_sparsity[name], self.blocksize, self.percdamp
            )
            if self.refit:
                pruned = exact_reconstruction(weight, hessian, mask, percdamp=self.percdamp)
            out[name] = pruned.reshape(module.weight.shape).to(module.weight.dtype)
        return out

    def pruned_weights(
        self,
        inputs: TensorOrTupleOfTensors,
        additional_forward_args: Any = None,
        forward_func: Optional[Callable[..., Any]] = None,
    ) -> Dict[str, Tensor]:
        """``{layer name: pruned weight}`` for one sample; the model is left untouched."""
        return self.solve(self.second_moments(inputs, additional_forward_args, forward_func))

    @contextlib.contextmanager
    def pruned(
        self,
        inputs: TensorOrTupleOfTensors,
        additional_forward_args: Any = None,
        forward_func: Optional[Callable[..., Any]] = None,
    ) -> Iterator[Dict[str, Tensor]]:
        """Inside, the model is ``inputs``' sparse network; on exit, also on error, the dense one.

        Yields the ``{layer name: pruned weight}`` dict. Arguments as in :meth:`second_moments`.
        """
        weights = self.pruned_weights(inputs, additional_forward_args, forward_func)
        with swapped_weights(self.model, weights):
            yield weights


@contextlib.contextmanager
def swapped_weights(model: nn.Module, weights: Mapping[str, Tensor]) -> Iterator[None]:
    """Each named layer's ``weight`` shows ``weights[name]`` inside; its own storage on exit.

    Only ``param.data`` is replaced, so the parameter object, ``requires_grad``, ``.grad`` and
    its version counter stay as they are, and the original storage is never written to: putting
    it back restores the dense values bit for bit.
    """
    modules = dict(model.named_modules())
    saved: List[Tuple[nn.Parameter, Tensor]] = []
    try:
        for name, value in weights.items():
            param = modules[name].weight
            if value.shape != param.shape:
                raise ValueError(f"weight for {name!r} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            saved.append((param, param.data))
            param.data = value.to(device=param.device, dtype=param.dtype)
        yield
    finally:
        for param, data in reversed(saved):
            param.data = data


def resolve_sparsity(model: nn.Module, sparsity: SparsityType) -> Dict[str, float]:
    """``{layer name: sparsity}``: every prunable layer for a float, the named ones for a dict."""
    if isinstance(sparsity, Mapping):
        if not sparsity:
            raise ValueError("sparsity is an empty dict: name at least one layer, or give one float")
        modules = dict(model.named_modules())
        resolved = {}
        for name, value in sparsity.items():
            if not isinstance(name, str):
                raise TypeError(f"sparsity keys must be layer names (str), got {name!r}")
            module = modules.get(name) if name else None
            if module is None:
                raise ValueError(_unknown_layer_message(model, name))
            reason = _prunable(module)
            if reason is not None:
                raise ValueError(f"layer {name!r} cannot be pruned: {reason}")
            resolved[name] = check_sparsity(value, what=f"sparsity[{name!r}]")
        return resolved
    value = check_sparsity(sparsity)
    layers = SampleTargetedPruning.prunable_layers(model)
    if not layers:
        raise ValueError("the model has no prunable layer (Linear, Conv1d or Conv2d with a parameter weight)")
    return {name: value for name in layers}


def _prunable(module: nn.Module) -> Optional[str]:
    """None when SPADE prunes ``module``'s weight, else the reason it does not."""
    if not isinstance(module, SUPPORTED_TYPES):
        kind = type(module).__name__
        if isinstance(module, (nn.Conv3d, nn.modules.conv._ConvTransposeNd)):
            return f"it is a {kind}; SPADE prunes the weights of Linear, Conv1d and Conv2d layers only"
        return f"it is a {kind}, which stays dense (SPADE prunes Linear, Conv1d and Conv2d weights)"
    if not isinstance(getattr(module, "weight", None), nn.Parameter):
        return "its weight is not a plain nn.Parameter (a parametrization or a lazy module)"
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return "its weight is not initialized yet (a lazy module: run it once first)"
    return None


def _unknown_layer_message(model: nn.Module, name: str) -> str:
    layers = SampleTargetedPruning.prunable_layers(model)
    message = f"no layer named {name!r} in the model"
    if name.endswith(".weight") and name[: -len(".weight")] in layers:
        return message + f"; name the layer, {name[: -len('.weight')]!r}, not its parameter"
    close = difflib.get_close_matches(name, layers, n=3)
    if close:
        return message + f"; did you mean {', '.join(map(repr, close))}?"
    shown = ", ".join(map(repr, layers[:12])) + (", ..." if len(layers) > 12 else "")
    return message + f"; prunable layers: {shown}"


def _one_sample(inputs: TensorOrTupleOfTensors) -> Tuple[Tensor, ...]:
    inputs_tuple, _ = format_inputs(inputs)
    batch = inputs_tuple[0].shape[0]
    if batch != 1:
        raise ValueError(
            f"sample-targeted pruning explains one sample, but inputs hold {batch}; pass x[i:i+1] "
            "(SPADE(...).attribute loops over a batch for you)"
        )
    return inputs_tuple


def _expand_extra(extra: Tuple[Any, ...], rows: int) -> Tuple[Any, ...]:
    return tuple(a.expand(rows, *a.shape[1:]) if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == 1 else a
                 for a in extra)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value
