"""Sample-targeted pruning (Moakhar et al., "SPADE", ICML 2024): one sample's sparse network.

Layers are named by their weight parameter, as everywhere in the library
(``"layer1.0.conv1.weight"``, a name from ``model.named_parameters()``): in a per-layer
``sparsity`` dict, in :attr:`SampleTargetedPruning.layer_sparsity`, in the pruned-weights dicts.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .._utils import TensorOrTupleOfTensors, evaluation_mode, format_additional_args, format_inputs
from ..interventions import swapped_parameters
from .augment import AugmentFn, augmented_batch
from .second_moments import SecondMoment, SecondMomentCollector, grouped_weight, groups_of, supported_types
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
    group with one budget for the whole layer). Layers are named by that weight's parameter
    name (``"fc1.weight"``, from ``model.named_parameters()``), like everywhere in the library.
    Biases, norm layers, embeddings, ``Conv3d`` and ``ConvTranspose`` stay dense; naming one of
    them in a ``sparsity`` dict is an error. A weight shared by several layers (tied) is pruned
    once, reconstructed for the inputs of all of them. A layer that does not run in the forward
    pass (e.g. ``nn.MultiheadAttention.out_proj``, whose weight is used functionally) has no
    second moment: it stays dense when chosen by a float ``sparsity`` and is listed in
    :attr:`last_skipped`; when named in a dict it is an error.

    The model is never modified outside :meth:`pruned`, and inside it only the pruned weights'
    values are swapped (:func:`~captum_paramsal.interventions.swapped_parameters`); on leaving,
    also on error, each parameter gets its own original storage back, so the dense weights are
    restored bit for bit, and ``requires_grad``, ``.grad``, training mode and hooks are untouched.

    Args:
        model: the network.
        sparsity: the fraction of weights to prune in ``[0, 1)``: one float for every prunable
            layer, or a dict ``{weight parameter name: sparsity}`` (names from
            ``model.named_parameters()``, e.g. ``"layer4.1.conv2.weight"``) that prunes only
            the named layers. Each layer ends with exactly ``round(sparsity * weight.numel())``
            zeros.
        n_augmentations: rows of the calibration batch, the sample itself included (default 64).
        augment: ``sample -> sample`` (no batch dimension) making one random view; default
            :class:`~captum_paramsal.spade.augment.DefaultAugmentation` (random resized crop, flip,
            colour jitter). For a model with several inputs it takes and returns the tuple.
        blocksize: columns per solver block (default 128).
        percdamp: Hessian dampening relative to its mean diagonal (default 0.01).
        seed: seed of the augmentations (default 0; the same views for every sample, the global
            random state untouched); None draws from the global random state.
        internal_batch_size: at most this many calibration rows per forward pass, which bounds
            memory (as Captum's ``internal_batch_size``); None runs the whole calibration batch
            at once.
        refit: after SparseGPT has chosen the mask, replace each row's kept weights by the exact
            least-squares reconstruction for that mask
            (:func:`~captum_paramsal.spade.solver.exact_reconstruction`); slower, a smaller error.

    Attributes:
        layer_sparsity (dict): ``{weight parameter name: sparsity}`` of the layers that will be
            pruned.
        last_skipped (list): weights of the last call whose layers did not run and stayed dense.

    Examples::

        >>> from captum_paramsal.spade import SampleTargetedPruning
        >>> pruning = SampleTargetedPruning(model, sparsity=0.9, n_augmentations=64)
        >>> with pruning.pruned(image[None]) as weights:      # one sample, batch dimension 1
        ...     sparse_logits = model(image[None])             # the sample's sparse network
        >>> # dense again here, bit for bit
        >>> SampleTargetedPruning.prunable_layers(model)       # names for a per-layer dict
        ['conv1.weight', 'layer1.0.conv1.weight', ..., 'fc.weight']
        >>> SampleTargetedPruning(model, sparsity={"layer4.1.conv2.weight": 0.95, "fc.weight": 0.5})
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
        internal_batch_size: Optional[int] = None,
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
        if internal_batch_size is not None:
            internal_batch_size = _positive_int(internal_batch_size, "internal_batch_size")
        self.internal_batch_size = internal_batch_size
        self.refit = bool(refit)
        self.last_skipped: List[str] = []

    @staticmethod
    def prunable_layers(model: nn.Module) -> List[str]:
        """The parameter names of the weights a float ``sparsity`` prunes, in
        ``model.named_parameters()`` order: the keys a per-layer ``sparsity`` dict takes.

        Examples::

            >>> SampleTargetedPruning.prunable_layers(torchvision.models.resnet18())[:2]
            ['conv1.weight', 'layer1.0.conv1.weight']
        """
        return list(prunable_weights(model))

    def calibration_batch(self, inputs: TensorOrTupleOfTensors) -> Tuple[Tensor, ...]:
        """The sample and its augmentations: a tuple of ``(n_augmentations, ...)`` tensors.

        Examples::

            >>> pruning.calibration_batch(image[None])[0].shape   # (n_augmentations, C, H, W)
        """
        inputs_tuple = _one_sample(inputs)
        return augmented_batch(inputs_tuple, self.n_augmentations, self.augment, self.seed)

    def second_moments(
        self,
        inputs: TensorOrTupleOfTensors,
        additional_forward_args: Any = None,
        forward_func: Optional[Callable[..., Any]] = None,
    ) -> Dict[str, SecondMoment]:
        """Each layer's input second moment over the sample's calibration batch (dense model),
        keyed by the layer's weight parameter name.

        Args:
            inputs: one sample, batch dimension 1 (a tensor, or a tuple for several inputs).
            additional_forward_args: extra model arguments; tensors with first dimension 1 are
                per sample and repeated for every augmentation, anything else is passed as is.
            forward_func: what to run (default the model); e.g. an attribution's ``forward_func``
                that wraps the model. It must run the model's layers.

        Examples::

            >>> moments = pruning.second_moments(image[None])
            >>> moments["fc.weight"].hessian().shape     # (1, in_features, in_features)
        """
        batch = self.calibration_batch(inputs)
        extra = format_additional_args(additional_forward_args)
        run = self.model if forward_func is None else forward_func
        owners = prunable_weights(self.model)
        gone = [name for name in self.layer_sparsity if name not in owners]
        if gone:
            raise ValueError(
                f"the model no longer has the prunable weight(s) {gone}: was it changed after the pruning was made?"
            )
        layers = {name: owners[name] for name, s in self.layer_sparsity.items() if s > 0}
        self.last_skipped = []
        if not layers:  # sparsity 0 everywhere: nothing to reconstruct, no pass needed
            return {}
        total = batch[0].shape[0]
        step = self.internal_batch_size or total
        collector = SecondMomentCollector(layers)
        with evaluation_mode(self.model), torch.no_grad(), collector:
            for start in range(0, total, step):
                rows = tuple(x[start : start + step] for x in batch)
                run(*rows, *_expand_extra(extra, rows[0].shape[0]))
        missing = [name for name in layers if name not in collector.moments]
        if not collector.moments:
            raise ValueError(
                f"none of the model's prunable layers ran when calling {_describe(run)} "
                "on the calibration batch: does forward_func run this model?"
            )
        if missing and self._named:
            raise ValueError(
                f"the layer(s) of {missing} did not run in the forward pass, so SPADE has no inputs to "
                "reconstruct them from (a weight used functionally, or a branch not taken); remove them from "
                "sparsity"
            )
        self.last_skipped = missing
        return collector.moments

    def solve(self, moments: Mapping[str, SecondMoment]) -> Dict[str, Tensor]:
        """``{weight parameter name: pruned weight}`` for every layer with a second moment,
        each the shape and dtype of the weight.

        Examples::

            >>> weights = pruning.solve(pruning.second_moments(image[None]))
        """
        owners = prunable_weights(self.model)
        out = {}
        for name, moment in moments.items():
            if name not in owners or name not in self.layer_sparsity:
                raise ValueError(
                    f"{name!r} is not one of the weights this pruning prunes ({list(self.layer_sparsity)})"
                )
            module = owners[name][0]
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
        """``{weight parameter name: pruned weight}`` for one sample; the model is left untouched.

        Arguments as in :meth:`second_moments`.

        Examples::

            >>> weights = pruning.pruned_weights(image[None])
            >>> float((weights["fc.weight"] == 0).float().mean())   # the layer's sparsity
            0.9
        """
        return self.solve(self.second_moments(inputs, additional_forward_args, forward_func))

    @contextlib.contextmanager
    def pruned(
        self,
        inputs: TensorOrTupleOfTensors,
        additional_forward_args: Any = None,
        forward_func: Optional[Callable[..., Any]] = None,
    ) -> Iterator[Dict[str, Tensor]]:
        """Inside, the model is ``inputs``' sparse network; on exit, also on error, the dense one.

        Yields the ``{weight parameter name: pruned weight}`` dict (copies: the model's own
        values inside are fresh tensors, see
        :func:`~captum_paramsal.interventions.swapped_parameters`). Arguments as in
        :meth:`second_moments`.

        Examples::

            >>> with pruning.pruned(image[None]) as weights:
            ...     sparse_logits = model(image[None])
        """
        weights = self.pruned_weights(inputs, additional_forward_args, forward_func)
        with swapped_parameters(self.model, weights):
            yield weights


def prunable_weights(model: nn.Module) -> Dict[str, List[nn.Module]]:
    """``{weight parameter name: the layers using it}`` of every weight SPADE prunes, in
    ``model.named_parameters()`` order (more than one layer only for a tied weight).

    Examples::

        >>> prunable_weights(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
        {'0.weight': [Linear(...)], '2.weight': [Linear(...)]}
    """
    owners = _weight_owners(model)
    return {name: layers for name, layers in owners.items() if _shared_reason(layers) is None}


def _weight_owners(model: nn.Module) -> Dict[str, List[nn.Module]]:
    """``{parameter name: modules holding it as their weight}`` (all modules, prunable or not)."""
    canonical = {id(param): name for name, param in model.named_parameters()}
    holders: Dict[str, List[nn.Module]] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None and id(weight) in canonical:
            holders.setdefault(canonical[id(weight)], []).append(module)
    return {name: holders[name] for name in canonical.values() if name in holders}


def _shared_reason(layers: List[nn.Module]) -> Optional[str]:
    """None when SPADE prunes the weight these layers share, else why not."""
    for module in layers:
        reason = _prunable(module)
        if reason is not None:
            return reason
    kinds = {(type(module), groups_of(module)) for module in layers}
    if len(kinds) > 1:
        return "it is shared by layers of different kinds or groups, which have no common second moment"
    return None


def resolve_sparsity(model: nn.Module, sparsity: SparsityType) -> Dict[str, float]:
    """``{weight parameter name: sparsity}``: every prunable weight for a float, the named ones
    for a dict (each name checked, with a hint for a module name or a near miss).

    Examples::

        >>> resolve_sparsity(model, 0.5)
        {'conv1.weight': 0.5, ..., 'fc.weight': 0.5}
        >>> resolve_sparsity(model, {"fc.weight": 0.9})
        {'fc.weight': 0.9}
    """
    if isinstance(sparsity, Mapping):
        if not sparsity:
            raise ValueError("sparsity is an empty dict: name at least one weight, or give one float")
        owners = _weight_owners(model)
        aliases = dict(model.named_parameters(remove_duplicate=False))
        canonical = {id(param): name for name, param in model.named_parameters()}
        resolved: Dict[str, float] = {}
        for name, value in sparsity.items():
            if not isinstance(name, str):
                raise TypeError(f"sparsity keys must be weight parameter names (str), got {name!r}")
            if name not in aliases:
                raise ValueError(_unknown_weight_message(model, name, owners))
            own = canonical[id(aliases[name])]
            if own not in owners:
                raise ValueError(_not_a_prunable_weight(model, name))
            reason = _shared_reason(owners[own])
            if reason is not None:
                names = {id(module): layer for layer, module in model.named_modules()}
                layers = ", ".join(repr(names.get(id(module), "?")) for module in owners[own])
                raise ValueError(f"{name!r} cannot be pruned (the weight of layer {layers}): {reason}")
            if own in resolved:
                raise ValueError(f"sparsity names the weight {own!r} twice (as {name!r} too: a tied alias)")
            resolved[own] = check_sparsity(value, what=f"sparsity[{name!r}]")
        return resolved
    value = check_sparsity(sparsity)
    layers = SampleTargetedPruning.prunable_layers(model)
    if not layers:
        raise ValueError("the model has no prunable layer (Linear, Conv1d or Conv2d with a parameter weight)")
    return {name: value for name in layers}


def _prunable(module: nn.Module) -> Optional[str]:
    """None when SPADE prunes ``module``'s weight, else the reason it does not."""
    if not isinstance(module, supported_types()):
        kind = type(module).__name__
        if isinstance(module, (nn.Conv3d, nn.modules.conv._ConvTransposeNd)):
            return f"it is a {kind}; SPADE prunes the weights of Linear, Conv1d and Conv2d layers only"
        return f"it is a {kind}, which stays dense (SPADE prunes Linear, Conv1d and Conv2d weights)"
    if not isinstance(getattr(module, "weight", None), nn.Parameter):
        return "its weight is not a plain nn.Parameter (a parametrization or a lazy module)"
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return "its weight is not initialized yet (a lazy module: run it once first)"
    return None


def _not_a_prunable_weight(model: nn.Module, name: str) -> str:
    """Why parameter ``name`` (not any module's weight) cannot be pruned."""
    prefix, _, attr = name.rpartition(".")
    module = dict(model.named_modules()).get(prefix)
    kind = f" of a {type(module).__name__}" if module is not None else ""
    return (
        f"{name!r} cannot be pruned: it is the {attr!r} parameter{kind}; SPADE prunes the weight of "
        "Linear, Conv1d and Conv2d layers (biases and other parameters stay dense)"
    )


def _unknown_weight_message(model: nn.Module, name: str, owners: Mapping[str, List[nn.Module]]) -> str:
    modules = dict(model.named_modules())
    prunable = list(prunable_weights(model))
    module = modules.get(name) if name else None
    if module is not None:  # a module name where a parameter name belongs
        weight = f"{name}.weight"
        if weight in prunable:
            return (
                f"sparsity names the module {name!r}; layers are named by their weight parameter, "
                f"as everywhere in the library: use {weight!r}"
            )
        reason = _prunable(module)
        if reason is None and weight in owners:
            reason = _shared_reason(owners[weight])
        return (
            f"{name!r} is a module, and it cannot be pruned: {reason or 'it has no weight'} (layers are named by "
            "their weight parameter, e.g. 'fc.weight')"
        )
    prefix, _, attr = name.rpartition(".")
    if attr == "weight" and prefix in modules and prefix:  # e.g. a parametrized or lazy weight
        reason = _prunable(modules[prefix])
        if reason is not None:
            return f"{name!r} cannot be pruned: {reason}"
    message = f"the model has no parameter named {name!r}"
    # a near miss of a weight's name or of its layer's name, both shown as the weight's name
    candidates = {weight: weight for weight in prunable}
    candidates.update({weight[: -len(".weight")]: weight for weight in prunable if weight.endswith(".weight")})
    close = list(dict.fromkeys(candidates[c] for c in difflib.get_close_matches(name, list(candidates), n=3)))
    if close:
        return message + f"; did you mean {', '.join(map(repr, close))}?"
    shown = ", ".join(map(repr, prunable[:12])) + (", ..." if len(prunable) > 12 else "")
    return message + f"; prunable weights: {shown}"


def _describe(run: Callable[..., Any]) -> str:
    name = getattr(run, "__qualname__", None)
    return repr(name) if isinstance(name, str) else f"{type(run).__name__}(...)"


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
