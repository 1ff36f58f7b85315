"""Parameter-guided input saliency: filter boosting (Levin et al., NeurIPS 2022, §3)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
from captum.log import log_usage
from torch import Tensor, nn

from .._utils import TargetType, TensorOrTupleOfTensors, evaluation_mode
from ..per_sample.compiled import CompileSetting
from ..per_sample.second_order import weighted_saliency_input_grads
from ..saliency_profile import UnitScore
from ..stats import SaliencyStats
from ..unit_schemes import UnitsSpec
from ..units import iter_units, resolve_columns
from .parameter_saliency import ParameterSaliency
from .parameter_space_attribution import ParameterSpaceAttribution

UnitsType = Union[None, Sequence[int], Sequence[Tuple[str, int]], Sequence[Sequence[Any]], Tensor]


def boosting_weights(profile: Tensor, chosen: Tensor, boost_factor: float) -> Tensor:
    """``dO/dprofile`` for ``O_i = cos(z_i, b_i)``, ``b_i`` = detached ``z_i`` with the chosen
    units multiplied by ``boost_factor``: ``b/(|z||b|) - O z/|z|^2``.

    The cosine of an all-zero profile (a sample on which no selected parameter has any
    gradient, e.g. a saturated softmax) is undefined; its weights, and so its attribution,
    are zero. In float64: in float32 ``|z|^2`` of a small profile underflows to 0.
    """
    z = profile.double()
    b = z.clone()
    b[chosen] = b[chosen] * boost_factor
    z_norm = z.norm(dim=1, keepdim=True)
    b_norm = b.norm(dim=1, keepdim=True)
    defined = (z_norm > 0) & (b_norm > 0)
    z_norm = torch.where(defined, z_norm, torch.ones_like(z_norm))
    b_norm = torch.where(defined, b_norm, torch.ones_like(b_norm))
    cosine = (z * b).sum(1, keepdim=True) / (z_norm * b_norm)
    weights = b / (z_norm * b_norm) - cosine * (z / z_norm) / z_norm
    return torch.where(defined, weights, torch.zeros_like(weights)).to(profile.dtype)


class ParameterGuidedInputSaliency(ParameterSpaceAttribution):
    r"""Which input features make a sample's most salient filters malfunction.

    For each sample ``i`` with (standardized, when ``stats`` are given) saliency
    profile ``z_i`` (see :class:`ParameterSaliency`): ``T_i`` = its ``k`` units of
    largest ``z`` (or units you pass); ``b_i`` = a detached copy of ``z_i`` whose
    entries in ``T_i`` are multiplied by ``boost_factor``; the attribution is
    ``dO_i/dx_i`` for ``O_i = cos(z_i, b_i)``: the input change that would make the
    network lean even harder on those units. Signed, the shape of the input.

    This is a second-order gradient (the profile is itself a gradient), computed
    for the whole batch with a small constant number of passes: one tapped
    forward, one backward with ``create_graph``, the per-layer rules rebuilt on
    each layer's saved tensors to differentiate the objective, and one backward to
    the inputs. No per-sample Python loop; memory bounded by ``internal_batch_size``.

    Args:
        model: the network, ``(B, classes)`` outputs for the default loss.
        stats: reference :class:`SaliencyStats`; without them the raw profile is used.
            Checked as in :class:`ParameterSaliency`: statistics of another layout,
            reduction, loss or other weights are refused.
        check_weights: as in :class:`ParameterSaliency`: False accepts statistics fitted on
            other weights (a fine-tuned model). Left out with ``parameter_saliency=``.
        k: how many top units to boost (default 10).
        boost_factor: the factor for the chosen units (default 100; must be > 0).
        loss_fn, params, reduction, fallback_chunk_size, compile_kernels, output_fn: as in
            :class:`ParameterSaliency` (``compile_kernels`` speeds up both the
            saliency that picks the units and, for ``mean_abs``, the pull-back of
            its gradient through the same low-rank layers).
        parameter_saliency: a :class:`ParameterSaliency` of the same model whose
            selection, loss, reduction, kernels and (live) statistics this method
            uses; ``stats`` and the arguments above are then left out. Same as
            :meth:`from_parameter_saliency`.
        units: the unit scheme, as in :class:`ParameterSaliency` (``"heads"``: boost each
            sample's most salient attention heads).
        layer: a submodule of ``model`` (as ``captum.attr.LayerIntegratedGradients``
            takes one): attribute its output instead of the inputs, ``dO_i/dh_i`` for
            ``h_i`` = the layer's output on sample ``i``, shaped like that output
            (``(B, T, D)`` for an embedding). The inputs may then be token ids. The
            layer must be called exactly once per forward and return one
            floating-point, batch-first Tensor. Its own parameters may be selected
            (the gradient is taken at a zero probe added to its output, not by
            replacing the output). :func:`captum_paramsal.visualization.token_scores`
            turns ``(B, T, D)`` into one score per token.

    Examples::

        >>> from captum_paramsal import ParameterGuidedInputSaliency
        >>> pgis = ParameterGuidedInputSaliency(model, stats=stats, k=10)
        >>> attr = pgis.attribute(images, target=labels)        # images' shape, signed
        >>> # the paper's random-filter baseline, and chosen units
        >>> base = pgis.attribute(images, target=labels, random_units=True, seed=0)
        >>> mine = pgis.attribute(images, target=labels, units=[("layer4.1.conv2.weight", 97)])
        >>> # with Captum: noise averaging as in the paper, and its visualization
        >>> from captum.attr import NoiseTunnel, visualization as viz
        >>> smooth = NoiseTunnel(pgis).attribute(images, nt_type="smoothgrad", nt_samples=10,
        ...                                      stdevs=0.1, target=labels)
        >>> viz.visualize_image_attr(smooth[0].permute(1, 2, 0).cpu().numpy(),   # CHW -> HWC
        ...                          images[0].permute(1, 2, 0).cpu().numpy(), sign="absolute_value")
        >>> # token ids: attribute the embedding output, beside Captum's LayerIntegratedGradients
        >>> from captum.attr import LayerIntegratedGradients
        >>> from captum_paramsal.visualization import plot_token_attributions, token_scores
        >>> pgis = ParameterGuidedInputSaliency(bert, k=10, layer=bert.bert.embeddings)
        >>> attr = pgis.attribute(ids, target=labels, additional_forward_args={"attention_mask": mask})
        >>> attr.shape                                           # (B, T, hidden): the embeddings' output
        >>> ours = token_scores(attr, attention_mask=mask)       # (B, T): summed over hidden, per token
        >>> lig = LayerIntegratedGradients(lambda i, m: bert(i, attention_mask=m).logits, bert.bert.embeddings)
        >>> theirs = token_scores(lig.attribute(ids, target=labels, additional_forward_args=(mask,)),
        ...                       attention_mask=mask)
        >>> fig = plot_token_attributions(tokens_of_sample_0, {"filter boosting": ours[0], "LayerIG": theirs[0]})
    """

    def __init__(
        self,
        model: nn.Module,
        stats: Optional[SaliencyStats] = None,
        k: int = 10,
        boost_factor: float = 100.0,
        loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        params: Optional[Sequence[str]] = None,
        reduction: str = "mean_abs",
        fallback_chunk_size: int = 16,
        compile_kernels: CompileSetting = "auto",
        parameter_saliency: Optional[ParameterSaliency] = None,
        output_fn: Optional[Callable[[Any], Tensor]] = None,
        layer: Optional[nn.Module] = None,
        units: UnitsSpec = "rows",
        check_weights: bool = True,
    ) -> None:
        if parameter_saliency is None:
            # the saliency that picks the units, with its statistics checked against its layout
            parameter_saliency = ParameterSaliency(
                model, params, loss_fn, reduction, fallback_chunk_size, stats, compile_kernels, output_fn, units=units,
                check_weights=check_weights,
            )
            super().__init__(model, share=parameter_saliency)
        else:
            if not isinstance(parameter_saliency, ParameterSaliency):
                raise TypeError(
                    f"parameter_saliency must be a ParameterSaliency, got {type(parameter_saliency).__name__}"
                )
            if stats is not None:
                raise ValueError("with parameter_saliency=, the statistics are its own: leave stats out")
            if check_weights is not True:
                raise ValueError("with parameter_saliency=, its check_weights applies: leave check_weights out")
            super().__init__(
                model, params, loss_fn, reduction, fallback_chunk_size, compile_kernels, share=parameter_saliency,
                output_fn=output_fn, units=units,
            )
        self.parameter_saliency = parameter_saliency
        self.k = self._check_k(k)
        if isinstance(boost_factor, bool) or not isinstance(boost_factor, (int, float)) or not boost_factor > 0:
            raise ValueError(f"boost_factor must be a positive number, got {boost_factor!r}")
        self.boost_factor = float(boost_factor)
        if layer is not None:
            if not isinstance(layer, nn.Module):
                raise TypeError(f"layer must be a submodule of the model (an nn.Module), got {type(layer).__name__}")
            if not any(m is layer for m in model.modules()):
                raise ValueError(
                    f"layer ({type(layer).__name__}) is not a submodule of the model: pass the module object "
                    "itself, e.g. model.bert.embeddings"
                )
        #: the submodule whose output is attributed (None: the inputs)
        self.layer: Optional[nn.Module] = layer

    @classmethod
    def from_parameter_saliency(
        cls, ps: ParameterSaliency, k: int = 10, boost_factor: float = 100.0, layer: Optional[nn.Module] = None
    ) -> ParameterGuidedInputSaliency:
        """Share ``ps``'s model, parameter selection, loss, reduction and statistics (``layer``:
        as in the constructor)."""
        return cls(ps.model, k=k, boost_factor=boost_factor, parameter_saliency=ps, layer=layer)

    @property
    def stats(self) -> Optional[SaliencyStats]:
        return self.parameter_saliency.stats

    def _check_k(self, k: int) -> int:
        units = self.layout.num_columns
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= units:
            raise ValueError(f"k must be an int between 1 and the number of units ({units}), got {k!r}")
        return k

    def _unit_mask(self, profile: Tensor, units: UnitsType, random_units: bool, generator) -> Tensor:
        """Boolean ``(B, F)``: the units to boost for each sample."""
        batch, columns = profile.shape
        mask = torch.zeros(batch, columns, dtype=torch.bool, device=profile.device)
        if units is not None:
            per_sample = _units_per_sample(units, batch)
            for i, chosen in enumerate(per_sample):
                mask[i, self._columns(chosen)] = True
            return mask
        if random_units:
            scores = torch.rand(batch, columns, generator=generator).to(profile.device)
        else:
            scores = profile
        mask.scatter_(1, scores.topk(self.k, dim=1).indices, True)
        return mask

    def _columns(self, chosen: Sequence[Any]) -> list:
        columns = resolve_columns(chosen, self.layout)
        if not columns:
            raise ValueError("units is empty: give at least one unit to boost")
        return columns

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTupleOfTensors,
        target: TargetType = None,
        units: UnitsType = None,
        random_units: bool = False,
        seed: Optional[int] = None,
        additional_forward_args: Any = None,
        internal_batch_size: Optional[int] = None,
        show_progress: Optional[bool] = None,
    ) -> TensorOrTupleOfTensors:
        r"""Per-sample ``dO/dx`` (docs/METHOD.md, "Which input features make the units malfunction"), the shape
        of ``inputs``; with the constructor's ``layer``, ``dO/dh`` at that layer's output, its shape.

        Args:
            inputs: a floating-point batch, or a tuple of batches; with ``layer``, anything
                the model takes (token ids).
            target: labels for the loss (int, list or tensor); None = predicted class.
            units: boost these units instead of each sample's top ``k``: one
                collection for all samples, or one per sample; a unit is a layout
                column (int), a ``(parameter name, unit index)`` pair or a
                :class:`~captum_paramsal.UnitScore` (:mod:`captum_paramsal.units`).
            random_units: boost ``k`` random units per sample (the paper's baseline).
            seed: seed for ``random_units``.
            additional_forward_args, internal_batch_size, show_progress: as in
                :meth:`ParameterSaliency.attribute`.

        Returns:
            Attributions with the shape of ``inputs`` (a tuple for a tuple); with ``layer``,
            one Tensor shaped like the layer's output (for any form of ``inputs``, as
            Captum's layer methods return), zero where the output does not reach the
            objective (padded positions behind an attention mask).

        Examples::

            >>> pgis = ParameterGuidedInputSaliency(gpt2, k=5, layer=gpt2.transformer.wte,
            ...                                     output_fn=lambda out: out.logits[:, -1])
            >>> attr = pgis.attribute(prompts, target=next_tokens)   # (B, T, n_embd)
            >>> per_token = attr.sum(-1)                              # (B, T), as with LayerIG
        """
        prepared = self._prepare(inputs, target, additional_forward_args, internal_batch_size)
        if self.layer is None:
            for i, x in enumerate(prepared.inputs):
                if not x.is_floating_point():
                    raise TypeError(
                        f"inputs[{i}] has dtype {x.dtype}; an input gradient needs floating-point inputs (for token "
                        "ids, pass layer= to the constructor, e.g. layer=model.bert.embeddings, and attribute that "
                        "layer's output)"
                    )
        if units is not None and random_units:
            raise ValueError("give either units= or random_units=True, not both")
        batch = prepared.batch
        per_sample_units = None if units is None else _units_per_sample(units, batch)  # checked before any work
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        step = internal_batch_size or batch
        stats = self.stats

        parts = []
        with evaluation_mode(self.model):
            for index, run in enumerate(self._passes(prepared, internal_batch_size, show_progress)):
                start = index * step
                chunk_units = None if per_sample_units is None else per_sample_units[start : start + run.batch]

                def weights_of(saliency: Tensor, chunk_units=chunk_units) -> Tensor:
                    # z in float64 (stats.standardize), as ParameterSaliency gives it
                    profile = stats.standardize(saliency) if stats is not None else saliency
                    mask = self._unit_mask(profile, chunk_units, random_units, generator)
                    weights = boosting_weights(profile, mask, self.boost_factor)
                    if stats is not None:  # z is affine in s: dO/ds = dO/dz / std'
                        weights = stats.standardize(weights + stats.mean.to(weights))
                    return weights.to(saliency.dtype)

                # the weights are on the layout's columns; the pass needs them on the engine's slices
                on_slices = self._plan.slice_weights(weights_of, self._reduction)
                parts.append(weighted_saliency_input_grads(run, on_slices, self.layer)[2])
        if self.layer is not None:  # the layer's output, one tensor
            return torch.cat([p[0] for p in parts])
        inputs_tuple = prepared.inputs
        result = tuple(torch.cat([p[i] for p in parts]) for i in range(len(inputs_tuple)))
        result = tuple(r.to(x.dtype) for r, x in zip(result, inputs_tuple))
        return result if prepared.is_tuple else result[0]


def _units_per_sample(units: UnitsType, batch: int) -> list:
    """``units`` as one list of units per sample (one shared list is repeated): a collection
    of collections is one per sample, anything else (one unit, or a collection of units in
    any of :mod:`captum_paramsal.units`' forms) is shared by all samples."""
    if isinstance(units, Tensor) and units.dim() == 2:  # (B, k) columns, e.g. from topk
        units = list(units)
    shared = list(iter_units(units))
    nested = len(shared) > 0 and all(_is_collection_of_units(u) for u in shared)
    if nested:
        if len(shared) != batch:
            raise ValueError(f"units gives {len(shared)} lists for {batch} samples; give one per sample or one for all")
        return [list(iter_units(u)) for u in shared]
    return [shared] * batch


def _is_collection_of_units(value: Any) -> bool:
    """A list, tuple or 1-d tensor that is not itself one unit (a pair, a UnitScore)."""
    if isinstance(value, Tensor):
        return value.dim() == 1
    if not isinstance(value, (list, tuple)) or isinstance(value, UnitScore):
        return False
    return not (len(value) == 2 and isinstance(value[0], str))
