"""Sample-targeted pruning (Moakhar et al., "SPADE", ICML 2024): one sample's sparse network.

Layers are named by their weight parameter, as everywhere in the library
(``"layer1.0.conv1.weight"``, a name from ``model.named_parameters()``): in a per-layer
``sparsity`` dict, in :attr:`SampleTargetedPruning.layer_sparsity`, in the pruned-weights dicts.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import math
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .._utils import TensorOrTupleOfTensors, evaluation_mode, format_additional_args, format_inputs
from ..interventions import swapped_parameters
from .augment import AugmentFn, augmented_batch
from .obc import OBCTrajectory, obc_trajectory
from .second_moments import SecondMoment, SecondMomentCollector, grouped_weight, groups_of, supported_types
from .solver import check_percdamp, check_sparsity, exact_reconstruction, sparsegpt_mask_and_weights

SparsityType = Union[float, Mapping[str, float]]
#: the layer solvers SampleTargetedPruning runs
SOLVERS = ("sparsegpt", "obc")


class SampleTargetedPruning:
    r"""Prune a network down to the connections that matter for one sample.

    For a sample ``x``: a calibration batch of ``x`` and ``n_augmentations - 1`` random views of
    it (by default the paper's 1024: random resized crops of scale 0.2-1, flips, brightness and
    hue jitter, drawn from a full-resolution ``source`` when one is given); one pass of the
    *dense* model over that batch (in eval mode, under ``no_grad``) records each prunable
    layer's input second moment ``X Xᵀ`` (convolution inputs unfolded); each layer is then
    pruned to its sparsity and reconstructed so that on this sample's neighbourhood each sparse
    layer computes what the dense one did. All layers are solved from the same dense pass (not
    sequentially on the already-pruned network), as the SPADE authors do.

    Two solvers (``solver=``):

    * ``"sparsegpt"`` (default; :func:`~captum_paramsal.spade.solver.sparsegpt_prune`): one
      sweep over the columns with OBS corrections, the mask re-chosen every ``mask_every``
      columns (by default every kernel, ``kh*kw`` columns, for a convolution and every column
      for a Linear layer: the authors' fast variant). Seconds per sample.
    * ``"obc"`` (:func:`~captum_paramsal.spade.obc.obc_prune`): Optimal Brain Compression's
      greedy per-row optimal brain surgeon with full inverse-Hessian updates, the layer's budget
      spread over its rows by their loss: the solver of the paper's headline numbers.
      ``O(rows * columns³)`` per layer: seconds on a CIFAR ResNet-20, tens of minutes per
      sample on an ImageNet ResNet-50 on a CPU.

    What is pruned: the ``weight`` of every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` whose
    weight is a plain ``nn.Parameter`` (grouped and depthwise convolutions included, solved per
    group with one budget for the whole layer), except the *stem*, the first convolution in
    parameter order, which stays dense unless ``prune_stem=True`` or it is named exactly (the
    authors' recipe: it sees raw pixels, and pruning it for one sample hurts every map). Layers
    are named by that weight's parameter name (``"fc1.weight"``, from
    ``model.named_parameters()``), like everywhere in the library. Biases, norm layers,
    embeddings, ``Conv3d`` and ``ConvTranspose`` stay dense; naming one of them in a
    ``sparsity`` dict is an error. A weight shared by several layers (tied) is pruned once,
    reconstructed for the inputs of all of them. A layer that does not run in the forward pass
    (e.g. ``nn.MultiheadAttention.out_proj``, whose weight is used functionally) has no second
    moment: it stays dense when chosen by a float or a pattern and is listed in
    :attr:`last_skipped`; when named exactly it is an error.

    Per-layer sparsity: a dict whose keys are weight parameter names or glob patterns over them
    (``fnmatch``: ``"layer3.*"`` matches ``"layer3.0.conv1.weight"``; only prunable weights are
    matched, so a pattern may also cover norm layers' weights harmlessly). An exact name wins
    over patterns; a weight matched by two patterns with different values, or a pattern that
    matches no prunable weight, is an error. Weights not covered stay dense.

    A sweep (several sparsities or solvers for one sample) computes the second moments once:
    ``moments = pruning.second_moments(x)``, then ``pruning.solve(moments, sparsity=...,
    solver=...)`` as often as needed; pass ``trajectories={}`` to keep OBC's greedy runs too, so
    that a second sparsity costs only a reconstruction.

    The model is never modified outside :meth:`pruned`, and inside it only the pruned weights'
    values are swapped (:func:`~captum_paramsal.interventions.swapped_parameters`); on leaving,
    also on error, each parameter gets its own original storage back, so the dense weights are
    restored bit for bit, and ``requires_grad``, ``.grad``, training mode and hooks are untouched.

    Args:
        model: the network.
        sparsity: the fraction of weights to prune in ``[0, 1)``: one float for every prunable
            layer but the stem, or a dict ``{weight parameter name or pattern: sparsity}`` (e.g.
            ``{"layer3.*": 0.95, "fc.weight": 0.95, "layer1.*": 0.2}``) that prunes only the
            layers it covers. Each layer ends with exactly ``round(sparsity * weight.numel())``
            zeros (with ``obc_block`` > 1: that many rounded to whole blocks).
        n_augmentations: rows of the calibration batch, the sample itself included (default
            1024, the paper's).
        augment: the views; default :class:`~captum_paramsal.spade.augment.DefaultAugmentation`
            (the paper's RandomResizedCrop(scale=(0.2, 1)), horizontal flip,
            ColorJitter(brightness=0.5, hue=0.3), all views drawn at once). Any callable
            ``sample -> sample`` (no batch dimension) making one random view works too; for a
            model with several inputs it takes and returns the tuple.
        solver: ``"sparsegpt"`` (default) or ``"obc"``.
        mask_every: SparseGPT re-chooses its mask every this many columns; default None: the
            kernel size ``kh*kw`` for a convolution, 1 for a Linear layer.
        obc_block: OBC removes blocks of this many consecutive columns together; 1 (default)
            is unstructured, ``"kernel"`` removes whole ``kh*kw`` kernels of a convolution.
        prune_stem: also prune the first convolution under a float sparsity or a pattern
            (default False).
        blocksize: columns per SparseGPT lazy-update block (default 128; speed only when
            ``mask_every`` is smaller).
        percdamp: Hessian dampening relative to its mean diagonal (default 0.01).
        seed: seed of the augmentations (default 0; the same views for every sample, the global
            random state untouched); None draws from the global random state.
        internal_batch_size: at most this many calibration rows per forward pass, which bounds
            memory (as Captum's ``internal_batch_size``; default 256); None runs the whole
            calibration batch at once.
        refit: after SparseGPT has chosen the mask, replace each row's kept weights by the exact
            least-squares reconstruction for that mask
            (:func:`~captum_paramsal.spade.solver.exact_reconstruction`); slower, a smaller error.
            (OBC's weights are that reconstruction already.)

    Attributes:
        layer_sparsity (dict): ``{weight parameter name: sparsity}`` of the layers that will be
            pruned.
        stem (str or None): the first convolution's weight name (None without a convolution).
        last_skipped (list): weights of the last call whose layers did not run and stayed dense.

    Examples::

        >>> from captum_paramsal.spade import SampleTargetedPruning
        >>> pruning = SampleTargetedPruning(model, sparsity=0.9)
        >>> with pruning.pruned(image[None]) as weights:      # one sample, batch dimension 1
        ...     sparse_logits = model(image[None])             # the sample's sparse network
        >>> # dense again here, bit for bit
        >>> SampleTargetedPruning.prunable_layers(model)       # names for a per-layer dict
        ['conv1.weight', 'layer1.0.conv1.weight', ..., 'fc.weight']
        >>> late = SampleTargetedPruning(model, sparsity={"layer3.*": 0.95, "fc.weight": 0.95}, solver="obc")
        >>> moments = late.second_moments(image[None])         # once per sample
        >>> for s in (0.5, 0.9, 0.99):                         # a sweep: no new pass
        ...     weights = late.solve(moments, sparsity={"layer3.*": s, "fc.weight": s})
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: SparsityType = 0.9,
        n_augmentations: int = 1024,
        augment: Optional[AugmentFn] = None,
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
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.prune_stem = bool(prune_stem)
        self.stem = stem_weight(model)
        self.layer_sparsity = resolve_sparsity(model, sparsity, prune_stem=self.prune_stem)
        self._exact_names = _exact_names(model, sparsity)
        self.solver = check_solver(solver)
        if mask_every is not None:
            mask_every = _positive_int(mask_every, "mask_every")
        self.mask_every = mask_every
        if obc_block != "kernel":
            obc_block = _positive_int(obc_block, "obc_block (a positive int or 'kernel')")
        self.obc_block = obc_block
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
        """The parameter names of every weight SPADE can prune, in ``model.named_parameters()``
        order: the keys a per-layer ``sparsity`` dict takes (a float prunes all of them but the
        stem, :func:`stem_weight`).

        Examples::

            >>> SampleTargetedPruning.prunable_layers(torchvision.models.resnet18())[:2]
            ['conv1.weight', 'layer1.0.conv1.weight']
        """
        return list(prunable_weights(model))

    def calibration_batch(self, inputs: TensorOrTupleOfTensors, source: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
        """The sample and its augmentations: a tuple of ``(n_augmentations, ...)`` tensors.

        ``source``: the sample at full resolution (``(1, C, H', W')``), from which the views are
        drawn and resized to the sample's size, as the paper does; default the sample itself.

        Examples::

            >>> pruning.calibration_batch(image[None])[0].shape   # (n_augmentations, C, H, W)
        """
        return augmented_batch(_one_sample(inputs), self.n_augmentations, self.augment, self.seed, source=source)

    def second_moments(
        self,
        inputs: TensorOrTupleOfTensors,
        additional_forward_args: Any = None,
        forward_func: Optional[Callable[..., Any]] = None,
        source: Optional[Tensor] = None,
    ) -> Dict[str, SecondMoment]:
        """Each layer's input second moment over the sample's calibration batch (dense model),
        keyed by the layer's weight parameter name: computed once per sample, then reused by
        :meth:`solve` for every sparsity and solver asked.

        Args:
            inputs: one sample, batch dimension 1 (a tensor, or a tuple for several inputs).
            additional_forward_args: extra model arguments; tensors with first dimension 1 are
                per sample and repeated for every augmentation, anything else is passed as is.
            forward_func: what to run (default the model); e.g. an attribution's ``forward_func``
                that wraps the model. It must run the model's layers.
            source: the sample at full resolution, to draw the views from (see
                :meth:`calibration_batch`).

        Examples::

            >>> moments = pruning.second_moments(image[None])
            >>> moments["fc.weight"].hessian().shape     # (1, in_features, in_features)
        """
        return self.batch_moments(self.calibration_batch(inputs, source), additional_forward_args, forward_func)

    def batch_moments(
        self,
        batch: Tuple[Tensor, ...],
        additional_forward_args: Any = None,
        forward_func: Optional[Callable[..., Any]] = None,
    ) -> Dict[str, SecondMoment]:
        """The second moments of the layers this pruning prunes over any ``batch`` (a tuple of
        input tensors, one dense pass of at most ``internal_batch_size`` rows at a time): what
        :meth:`second_moments` runs on the sample's calibration batch. Given other images, it
        gives an untargeted pruning (the control that is not sample-targeted).

        Examples::

            >>> untargeted = pruning.solve(pruning.batch_moments((other_images,)))
        """
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
        named = [name for name in missing if name in self._exact_names]
        if named:
            raise ValueError(
                f"the layer(s) of {named} did not run in the forward pass, so SPADE has no inputs to "
                "reconstruct them from (a weight used functionally, or a branch not taken); remove them from "
                "sparsity"
            )
        self.last_skipped = missing
        return collector.moments

    def solve(
        self,
        moments: Mapping[str, SecondMoment],
        sparsity: Optional[SparsityType] = None,
        solver: Optional[str] = None,
        trajectories: Optional[Dict[str, OBCTrajectory]] = None,
    ) -> Dict[str, Tensor]:
        """``{weight parameter name: pruned weight}`` of the layers to prune, each the shape and
        dtype of the weight, from second moments computed once (:meth:`second_moments`).

        Args:
            moments: from :meth:`second_moments`; every layer to prune needs its moment (a layer
                that did not run is skipped as there).
            sparsity: another sparsity for this call (a float or a dict, resolved by the same
                rules as the constructor's); default the constructor's. A sweep calls
                :meth:`solve` once per sparsity on the same moments: no new forward pass.
            solver: ``"sparsegpt"`` or ``"obc"`` for this call; default the constructor's.
            trajectories: a dict that keeps OBC's greedy runs per layer between calls on the
                same moments (pass the same dict for every call of a sweep over one sample): a
                run to sparsity s serves every smaller sparsity with only a reconstruction.

        Examples::

            >>> moments = pruning.second_moments(image[None])
            >>> weights = pruning.solve(moments)
            >>> cache = {}
            >>> sweep = {s: pruning.solve(moments, sparsity=s, solver="obc", trajectories=cache) for s in (0.99, 0.9)}
        """
        layer_sparsity = self.layer_sparsity if sparsity is None else resolve_sparsity(
            self.model, sparsity, prune_stem=self.prune_stem
        )
        solver = self.solver if solver is None else check_solver(solver)
        owners = prunable_weights(self.model)
        unknown = [name for name in moments if name not in owners]
        if unknown:
            raise ValueError(f"{unknown} are not weights this pruning prunes ({list(owners)})")
        exact = self._exact_names if sparsity is None else _exact_names(self.model, sparsity)
        lacking = [name for name, s in layer_sparsity.items() if s > 0 and name not in moments and name in exact]
        if lacking:
            raise ValueError(
                f"no second moment for {lacking}: compute the moments with a pruning that covers these layers "
                "(they did not run, or the pruning that computed the moments does not prune them)"
            )
        out = {}
        for name, moment in moments.items():
            target = layer_sparsity.get(name, 0.0)
            if target == 0:
                continue
            module = owners[name][0]
            weight = grouped_weight(module).detach()
            hessian = moment.hessian()
            if solver == "obc":
                block = _kernel_size(module) if self.obc_block == "kernel" else self.obc_block
                key = f"{name}|{block}|{self.percdamp}"
                trajectory = None if trajectories is None else trajectories.get(key)
                if trajectory is None or trajectory.max_sparsity < target:
                    trajectory = obc_trajectory(weight, hessian, self.percdamp, block=block, max_sparsity=target)
                    if trajectories is not None:
                        trajectories[key] = trajectory
                _, pruned = trajectory.at(target)
            else:
                every = self.mask_every or _kernel_size(module)
                mask, pruned = sparsegpt_mask_and_weights(
                    weight, hessian, target, self.blocksize, self.percdamp, mask_every=every
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
        source: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        """``{weight parameter name: pruned weight}`` for one sample; the model is left untouched.

        Arguments as in :meth:`second_moments`.

        Examples::

            >>> weights = pruning.pruned_weights(image[None])
            >>> float((weights["fc.weight"] == 0).float().mean())   # the layer's sparsity
            0.9
        """
        return self.solve(self.second_moments(inputs, additional_forward_args, forward_func, source))

    @contextlib.contextmanager
    def pruned(
        self,
        inputs: TensorOrTupleOfTensors,
        additional_forward_args: Any = None,
        forward_func: Optional[Callable[..., Any]] = None,
        source: Optional[Tensor] = None,
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
        weights = self.pruned_weights(inputs, additional_forward_args, forward_func, source)
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


def resolve_sparsity(model: nn.Module, sparsity: SparsityType, prune_stem: bool = False) -> Dict[str, float]:
    """``{weight parameter name: sparsity}``: every prunable weight but the stem for a float,
    the covered ones for a dict of names and glob patterns (each checked, with a hint for a
    module name or a near miss). The rules are :class:`SampleTargetedPruning`'s.

    Examples::

        >>> resolve_sparsity(model, 0.5)                  # the stem, conv1.weight, stays dense
        {'layer1.0.conv1.weight': 0.5, ..., 'fc.weight': 0.5}
        >>> resolve_sparsity(model, {"layer3.*": 0.95, "layer3.0.conv1.weight": 0.5})
        {'layer3.0.conv1.weight': 0.5, 'layer3.0.conv2.weight': 0.95, ...}
    """
    stem = None if prune_stem else stem_weight(model)
    if isinstance(sparsity, Mapping):
        if not sparsity:
            raise ValueError("sparsity is an empty dict: name at least one weight, or give one float")
        owners = _weight_owners(model)
        prunable = list(prunable_weights(model))
        aliases = dict(model.named_parameters(remove_duplicate=False))
        canonical = {id(param): name for name, param in model.named_parameters()}
        exact: Dict[str, float] = {}
        by_pattern: Dict[str, Tuple[str, float]] = {}
        for name, value in sparsity.items():
            if not isinstance(name, str):
                raise TypeError(f"sparsity keys must be weight parameter names or patterns (str), got {name!r}")
            if _is_pattern(name):
                value = check_sparsity(value, what=f"sparsity[{name!r}]")
                matched = [w for w in prunable if fnmatch.fnmatchcase(w, name) and w != stem]
                if not matched:
                    raise ValueError(_pattern_matches_nothing(name, prunable, stem))
                for weight in matched:
                    if weight in by_pattern and by_pattern[weight][1] != value:
                        other = by_pattern[weight][0]
                        raise ValueError(
                            f"{weight!r} is matched by the patterns {other!r} ({by_pattern[weight][1]}) and "
                            f"{name!r} ({value}): name it exactly to say which sparsity it gets"
                        )
                    by_pattern.setdefault(weight, (name, value))
                continue
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
            if own in exact:
                raise ValueError(f"sparsity names the weight {own!r} twice (as {name!r} too: a tied alias)")
            exact[own] = check_sparsity(value, what=f"sparsity[{name!r}]")
        covered = {**{w: v for w, (_, v) in by_pattern.items()}, **exact}
        return {name: covered[name] for name in prunable if name in covered}  # parameter order
    value = check_sparsity(sparsity)
    layers = SampleTargetedPruning.prunable_layers(model)
    if not layers:
        raise ValueError("the model has no prunable layer (Linear, Conv1d or Conv2d with a parameter weight)")
    return {name: value for name in layers if name != stem}


def stem_weight(model: nn.Module) -> Optional[str]:
    """The weight name of the model's first convolution in parameter order (its stem), or None.

    Examples::

        >>> stem_weight(torchvision.models.resnet18())
        'conv1.weight'
    """
    for name, layers in prunable_weights(model).items():
        if isinstance(layers[0], nn.modules.conv._ConvNd):
            return name
    return None


def check_solver(solver: object) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(map(repr, SOLVERS))}, got {solver!r}")
    return str(solver)


def _is_pattern(name: str) -> bool:
    return any(char in name for char in "*?[")


def _exact_names(model: nn.Module, sparsity: SparsityType) -> List[str]:
    """The canonical weight names a dict names exactly (an error if such a layer does not run)."""
    if not isinstance(sparsity, Mapping):
        return []
    canonical = {id(param): name for name, param in model.named_parameters()}
    aliases = dict(model.named_parameters(remove_duplicate=False))
    return [canonical[id(aliases[k])] for k in sparsity if isinstance(k, str) and k in aliases]


def _kernel_size(module: nn.Module) -> int:
    """Columns of one input channel's kernel: ``kh*kw`` (``k`` for Conv1d), 1 for a Linear layer."""
    return math.prod(getattr(module, "kernel_size", (1,)))


def _pattern_matches_nothing(pattern: str, prunable: List[str], stem: Optional[str]) -> str:
    hint = ""
    if stem is not None and fnmatch.fnmatchcase(stem, pattern):
        hint = (
            f" (it matches only the stem {stem!r}, which patterns leave dense: name it exactly or pass "
            "prune_stem=True)"
        )
    elif not pattern.endswith("*") and not pattern.endswith(".weight"):
        hint = f" (patterns match weight parameter names: did you mean {pattern + '.weight'!r} or {pattern + '*'!r}?)"
    shown = ", ".join(map(repr, prunable[:8])) + (", ..." if len(prunable) > 8 else "")
    return f"the pattern {pattern!r} matches no prunable weight{hint}; prunable weights: {shown}"


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
