"""Per-sample loss families: ``loss(outputs, target) -> (B,)``, one loss per sample, for
``ParameterSaliency(model, loss_fn=...)`` (and ``ParameterGuidedInputSaliency``).

``outputs`` is what ``output_fn`` picks from the model's output (by default the output
itself, a Hugging Face ``ModelOutput``'s ``logits``, or a tuple's first element); ``target``
is the ``target`` given to ``attribute`` (or the ``labels`` of a data set's batch in
``fit_stats``), whose first dimension is the batch. ``B`` is the batch, ``T`` the sequence
length, ``V`` the vocabulary, ``C`` the classes or labels:

==========================  ======================  ===================================================
family                      ``outputs``             ``target``
==========================  ======================  ===================================================
:class:`CrossEntropy`       ``(B, C)`` logits       ``(B,)`` int class ids
:class:`CausalLM`           ``(B, T, V)`` logits    ``(B, T)`` int ids, Hugging Face ``labels``: aligned
                                                    with the input ids, shifted inside, -100 ignored
:class:`MaskedLM`           ``(B, T, V)`` logits    ``(B, T)`` int ids at the masked positions, -100
                                                    elsewhere; no shift
:class:`Contrastive`        ``(B, V)`` logits, or   ``(B, 2)`` int ``(right id, foil id)``; or
                            ``(B, T, V)`` at        ``(B, 3)`` ``(right id, foil id, position)`` for
                            ``position=``           ``(B, T, V)`` outputs
:class:`MeanSquaredError`   ``(B, ...)``            floats, the shape of ``outputs``
:class:`BCEWithLogits`      ``(B, C)`` logits       ``(B, C)`` floats in ``[0, 1]``
==========================  ======================  ===================================================

Their ``loss_name``: ``"cross_entropy"``, ``"causal_lm(reduction='sum')"``,
``"masked_lm(reduction='sum')"``, ``"contrastive"`` (``"contrastive(position=-1)"``), ``"mse"``,
``"bce_with_logits(reduction='mean')"`` (with the options given).

Each loss is a small object whose ``loss_name`` names the family and its options: statistics
(``fit_stats``) record it, and statistics of another loss are refused. :class:`CrossEntropy`
is the library's default loss as an object; its name ``"cross_entropy"`` is the default's, so
statistics fitted with either standardize both.

Every loss checks its shapes and dtypes and says what is wrong; the token losses also refuse a
sample with no position to predict (all ``-100``) rather than give it a loss of 0 and a
saliency of 0. A sample's loss depends on that sample alone: padding, marked ``-100`` in the
labels (and masked out by the model's ``attention_mask``), never reaches it.
:func:`causal_lm_labels` builds padding-safe causal-LM labels from ``input_ids`` and an
``attention_mask``, right or left padded.

Examples::

    >>> from captum_paramsal import ParameterSaliency
    >>> from captum_paramsal.losses import CausalLM, causal_lm_labels
    >>> labels = causal_lm_labels(input_ids, attention_mask, prompt_lengths=prompt_lengths)
    >>> ps = ParameterSaliency(gpt2, loss_fn=CausalLM(reduction="sum"))   # each continuation's NLL
    >>> sal = ps.attribute(input_ids, target=labels, additional_forward_args={"attention_mask": attention_mask})
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import cross_entropy_per_sample

__all__ = [
    "IGNORE_INDEX",
    "BCEWithLogits",
    "CausalLM",
    "Contrastive",
    "CrossEntropy",
    "MaskedLM",
    "MeanSquaredError",
    "causal_lm_labels",
    "loss_name",
]

#: the label of a position that has no loss (Hugging Face's and PyTorch's ``ignore_index``)
IGNORE_INDEX = -100

_REDUCTIONS = ("sum", "mean")

#: how the token losses count the samples they name in an error
_COUNTED = "(counted in the batch the loss is given: with internal_batch_size, in its chunk)"


# -- checks -------------------------------------------------------------------------------------


def _values_readable(*tensors: Tensor) -> bool:
    """Whether the tensors' values can be inspected: False inside ``torch.func`` transforms.

    The engine's fallback calls the loss one sample at a time under ``vmap(grad(...))``, where
    a data-dependent check cannot run; the same batch has then already gone through the loss
    whole (in the rule pass, or the check before the fallback), with every check.
    """
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    if wrapped is None:  # pragma: no cover - a torch without it: check anyway (vmap then loops)
        return True
    return not any(wrapped(t) for t in tensors)


def _check_tensors(name: str, outputs: Tensor, target: Tensor) -> None:
    if not isinstance(outputs, Tensor):
        raise TypeError(f"{name}: outputs must be a Tensor, got {type(outputs).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"{name}: target must be a Tensor, got {type(target).__name__}")
    if outputs.dim() == 0 or target.dim() == 0 or outputs.shape[0] != target.shape[0]:
        raise ValueError(
            f"{name}: outputs {tuple(outputs.shape)} and target {tuple(target.shape)} must share the batch "
            "size in their first dimension"
        )


def _check_integer(name: str, target: Tensor, what: str) -> None:
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"{name}: target holds {what}, which must be integers; got dtype {target.dtype}")


def _check_floating(name: str, outputs: Tensor, target: Tensor, what: str) -> None:
    if not outputs.is_floating_point():
        raise TypeError(f"{name}: outputs must be floating point, got dtype {outputs.dtype}")
    if not target.is_floating_point():
        raise TypeError(
            f"{name}: target holds {what}, which must be floating point; got dtype {target.dtype} "
            "(use target.to(outputs.dtype))"
        )


def _check_ids(name: str, ids: Tensor, size: int, what: str, ignore_index: Optional[int] = None) -> None:
    """Every id in ``[0, size)`` (or ``ignore_index``); outside transforms only."""
    if not _values_readable(ids) or ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= size)
    if ignore_index is not None:
        bad &= ids != ignore_index
    if bool(bad.any()):
        value = int(ids[bad][0])
        allowed = f"0..{size - 1}" + ("" if ignore_index is None else f" or {ignore_index} (ignored)")
        raise ValueError(f"{name}: {what} {value} is out of range for {size} outputs ({allowed})")


def _check_reduction(reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


# -- sequence classification --------------------------------------------------------------------


class CrossEntropy:
    r"""Cross-entropy of each sample: ``L_i = -log softmax(outputs[i])[target[i]]``.

    The library's default loss (:func:`captum_paramsal._utils.cross_entropy_per_sample`) as a
    loss object, with its checks; ``loss_name`` is ``"cross_entropy"``, the default's, so
    statistics fitted with the default standardize profiles of this loss and back.

    Shapes:
        ``outputs``: ``(B, C)`` logits (a sequence classifier's, an image classifier's).
        ``target``: ``(B,)`` integer class ids in ``0..C-1``.

    Returns:
        ``(B,)`` losses.

    Raises:
        ValueError: outputs that are not ``(B, C)``, a target that is not ``(B,)``, a class
            id out of range. TypeError: a target that is not integer.

    Examples::

        >>> from captum_paramsal.losses import CrossEntropy
        >>> ps = ParameterSaliency(bert_classifier, loss_fn=CrossEntropy())
        >>> sal = ps.attribute(input_ids, target=torch.tensor([0, 2, 1]),
        ...                    additional_forward_args={"attention_mask": attention_mask})
    """

    loss_name = "cross_entropy"

    def __call__(self, outputs: Tensor, target: Tensor) -> Tensor:
        name = "CrossEntropy"
        _check_tensors(name, outputs, target)
        if outputs.dim() != 2:
            raise ValueError(
                f"{name}: outputs must be (batch, classes) logits, got shape {tuple(outputs.shape)}; for "
                "per-token logits use CausalLM or MaskedLM, or pick one position with output_fn"
            )
        if target.dim() != 1:
            raise ValueError(f"{name}: target must be one class id per sample, shape ({outputs.shape[0]},), "
                             f"got {tuple(target.shape)}")
        _check_integer(name, target, "class ids")
        _check_ids(name, target, outputs.shape[1], "class id")
        return cross_entropy_per_sample(outputs, target.long())

    def __repr__(self) -> str:
        return "CrossEntropy()"


# -- token losses -------------------------------------------------------------------------------


class _TokenLoss:
    """Cross-entropy over the labelled positions of ``(B, T, V)`` logits, summed or averaged per
    sample; the subclasses say which logits predict which labels (``_pairs``)."""

    family = ""

    def __init__(self, reduction: str = "sum", ignore_index: int = IGNORE_INDEX) -> None:
        self.reduction = _check_reduction(reduction)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or ignore_index >= 0:
            raise ValueError(f"ignore_index must be a negative int (it must not be a token id), got {ignore_index!r}")
        self.ignore_index = ignore_index

    @property
    def _options(self) -> str:
        extra = "" if self.ignore_index == IGNORE_INDEX else f", ignore_index={self.ignore_index}"
        return f"reduction={self.reduction!r}{extra}"

    @property
    def loss_name(self) -> str:
        return f"{self.family}({self._options})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._options})"

    def _pairs(self, logits: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        """``(logits, labels)`` of the positions that predict each label: ``(B, P, V)``, ``(B, P)``."""
        raise NotImplementedError

    def _no_target_message(self, samples: Sequence[int]) -> str:
        raise NotImplementedError

    def __call__(self, outputs: Tensor, target: Tensor) -> Tensor:
        name = type(self).__name__
        _check_tensors(name, outputs, target)
        if outputs.dim() != 3:
            raise ValueError(f"{name}: outputs must be (batch, positions, vocabulary) logits, got shape "
                             f"{tuple(outputs.shape)}")
        if tuple(target.shape) != tuple(outputs.shape[:2]):
            raise ValueError(
                f"{name}: target must be token ids of shape (batch, positions) = {tuple(outputs.shape[:2])}, "
                f"aligned with the logits (Hugging Face labels), got {tuple(target.shape)}"
            )
        _check_integer(name, target, "token ids")
        logits, labels = self._pairs(outputs, target)
        vocab = outputs.shape[2]
        _check_ids(name, labels, vocab, "token id", self.ignore_index)
        counted = labels != self.ignore_index
        counts = counted.sum(dim=1)
        if _values_readable(counts):
            empty = (counts == 0).nonzero().flatten().tolist()
            if empty:
                raise ValueError(self._no_target_message(empty))
        nll = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1).long(), ignore_index=self.ignore_index,
                              reduction="none").reshape(labels.shape)
        total = nll.sum(dim=1)
        return total / counts.to(total.dtype) if self.reduction == "mean" else total


class CausalLM(_TokenLoss):
    r"""Next-token cross-entropy of a causal language model, per sample, in Hugging Face's
    ``labels`` convention.

    ``target`` is aligned with the input ids and shifted inside: the logits at position ``t``
    predict ``target[:, t + 1]``, so ``target[:, 0]`` is never predicted and the logits at the
    last position predict nothing. Positions labelled ``ignore_index`` (-100) have no loss.
    Per sample, over its labelled positions ``t >= 1``:

    * ``reduction="sum"`` (default): ``L_i = -sum_t log p(target[i, t] | tokens before t)``,
      the negative log-likelihood of the labelled tokens; with the prompt labelled -100 it is
      the NLL of the whole continuation, ``-log p(continuation | prompt)``;
    * ``reduction="mean"``: that sum divided by the number of labelled positions (the
      per-token loss Hugging Face models report, per sample).

    One labelled position explains one token: label only the position of the token to explain
    (``labels = full_like(ids, -100); labels[i, t] = ids[i, t]``).

    Padding: label every padding position -100 and pass the ``attention_mask``. With **left**
    padding also label each sample's first real token -100 (nothing real predicts it: the
    padding before it would), and give models with absolute positions (GPT-2) their
    ``position_ids`` (``(mask.cumsum(1) - 1).clamp(min=0)``) in ``additional_forward_args``.
    :func:`causal_lm_labels` builds such labels.

    A sample with no labelled position ``t >= 1`` (all -100, or only ``target[:, 0]``) is an
    error, not a loss of 0: its saliency would be 0 everywhere and read as "nothing wrong".

    Args:
        reduction: ``"sum"`` or ``"mean"`` over each sample's labelled positions.
        ignore_index: the label of positions without a loss (negative); default -100.

    Shapes:
        ``outputs``: ``(B, T, V)`` logits, ``T >= 2``. ``target``: ``(B, T)`` integer ids.

    Returns:
        ``(B,)`` losses. ``loss_name``: ``"causal_lm(reduction='sum')"`` (or ``'mean'``, and
        ``ignore_index`` when it is not -100).

    Raises:
        ValueError: a target not shaped like the logits' first two dims, an id out of range,
            a sample with nothing to predict. TypeError: float ids.

    Examples::

        >>> from captum_paramsal.losses import CausalLM, causal_lm_labels
        >>> # the NLL of each sample's continuation after a prompt of prompt_lengths[i] tokens
        >>> labels = causal_lm_labels(input_ids, attention_mask, prompt_lengths=prompt_lengths)
        >>> ps = ParameterSaliency(gpt2, loss_fn=CausalLM(reduction="sum"))
        >>> sal = ps.attribute(input_ids, target=labels, additional_forward_args={"attention_mask": attention_mask})
        >>> # or over a tokenized data set of {"input_ids", "attention_mask", "labels"} batches
        >>> stats = ps.fit_stats(loader)
    """

    family = "causal_lm"

    def _pairs(self, logits: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        if logits.shape[1] < 2:
            raise ValueError(
                f"CausalLM: a sequence of {logits.shape[1]} position(s) has no next token to predict; the labels "
                "are shifted inside (logits at t predict target[:, t + 1]), so T must be at least 2"
            )
        return logits[:, :-1], labels[:, 1:]

    def _no_target_message(self, samples: Sequence[int]) -> str:
        return (
            f"CausalLM: sample(s) {samples} {_COUNTED} have no token to predict: every label after the first is "
            f"{self.ignore_index} (the labels are shifted inside, so target[:, 0] is never predicted). Label at "
            "least one position t >= 1 of each sample with its token id"
        )


class MaskedLM(_TokenLoss):
    r"""Masked-language-model cross-entropy per sample: the logits at position ``t`` predict
    ``target[:, t]`` (no shift), over the positions whose label is not ``ignore_index``.

    ``target`` is Hugging Face's masked-LM ``labels``: the original token id at each masked
    position and -100 everywhere else (unmasked and padding positions). ``reduction="sum"``
    (default) adds the masked positions' losses, ``"mean"`` averages them. A sample with no
    labelled position is an error.

    Args:
        reduction: ``"sum"`` or ``"mean"`` over each sample's labelled positions.
        ignore_index: the label of positions without a loss (negative); default -100.

    Shapes:
        ``outputs``: ``(B, T, V)`` logits. ``target``: ``(B, T)`` integer ids.

    Returns:
        ``(B,)`` losses. ``loss_name``: ``"masked_lm(reduction='sum')"`` (or ``'mean'``).

    Raises:
        ValueError: a target not shaped like the logits' first two dims, an id out of range,
            a sample with no labelled position. TypeError: float ids.

    Examples::

        >>> from captum_paramsal.losses import MaskedLM
        >>> labels = torch.full_like(input_ids, -100)
        >>> labels[masked] = input_ids[masked]                # the original tokens
        >>> input_ids = input_ids.masked_fill(masked, tokenizer.mask_token_id)
        >>> ps = ParameterSaliency(bert_mlm, loss_fn=MaskedLM())
        >>> sal = ps.attribute(input_ids, target=labels, additional_forward_args={"attention_mask": attention_mask})
    """

    family = "masked_lm"

    def _pairs(self, logits: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        return logits, labels

    def _no_target_message(self, samples: Sequence[int]) -> str:
        return (f"MaskedLM: sample(s) {samples} {_COUNTED} have no masked position: every label is "
                f"{self.ignore_index}. "
                "Label each sample's masked positions with their original token ids")


def causal_lm_labels(
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    prompt_lengths: Union[None, int, Sequence[int], Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Padding-safe :class:`CausalLM` labels: ``input_ids`` with ``ignore_index`` at the padding,
    at each sample's first real token, and at its first ``prompt_lengths[i]`` real tokens.

    Right or left padding alike: a sample's loss is then what it is alone, unpadded (with
    left padding the first real token would otherwise be "predicted" by the padding before
    it). With ``prompt_lengths`` the loss is the NLL of each sample's continuation (the real
    tokens after its prompt).

    Args:
        input_ids: ``(B, T)`` integer ids.
        attention_mask: ``(B, T)``, 1 at real tokens and 0 at padding; None: no padding.
        prompt_lengths: real tokens of each sample not to predict (an int for all, or one per
            sample); None: predict every real token after the first.
        ignore_index: the label of ignored positions; default -100.

    Returns:
        ``(B, T)`` int64 labels.

    Examples::

        >>> labels = causal_lm_labels(ids, mask, prompt_lengths=[3, 5])  # continuations only
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError("causal_lm_labels: input_ids must be a (batch, positions) tensor")
    _check_integer("causal_lm_labels", input_ids, "token ids")
    if attention_mask is None:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask)
            raise ValueError(f"causal_lm_labels: attention_mask must be shaped like input_ids "
                             f"{tuple(input_ids.shape)}, got {shape}")
        real = attention_mask != 0
    before = real.long().cumsum(dim=1) - real.long()  # real tokens before each position
    skip = torch.ones(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)
    if prompt_lengths is not None:
        prompts = torch.as_tensor(prompt_lengths, dtype=torch.long, device=input_ids.device).reshape(-1, 1)
        if prompts.shape[0] not in (1, input_ids.shape[0]) or bool((prompts < 0).any()):
            raise ValueError(f"causal_lm_labels: prompt_lengths must be a non-negative int or one per sample "
                             f"({input_ids.shape[0]}), got {prompt_lengths!r}")
        skip = torch.maximum(skip, prompts)
    keep = real & (before >= skip)
    return torch.where(keep, input_ids.long(), torch.full_like(input_ids, ignore_index, dtype=torch.long))


# -- contrastive --------------------------------------------------------------------------------


class Contrastive:
    r"""The contrast between a right token (or class) and a foil:
    ``L_i = outputs[i, foil_i] - outputs[i, right_i]``.

    The sign: the loss is the foil's logit minus the right one's, so minimizing it favours the
    right token over the foil, and ``L_i < 0`` where the model already prefers the right one.
    Its gradient is that of the logit difference; the parameter saliency says which units
    drive the model's choice between the two (``reduction="mean_abs"`` and ``"rms"`` do not
    depend on the sign, ``"mean"`` flips with it).

    Target formats:

    * ``(B, 2)`` integer ``(right id, foil id)`` per sample, on ``(B, V)`` outputs (a
      classifier, or ``output_fn=lambda out: out.logits[:, -1]``), or on ``(B, T, V)`` outputs
      at ``position`` (an int, negative from the end: ``-1`` is the last position, every
      sample's last real token when the batch is padded on the left);
    * ``(B, 3)`` integer ``(right id, foil id, position)``, on ``(B, T, V)`` outputs with
      ``position=None``: each sample at its own position (with right padding, its last real
      token is ``attention_mask.sum(1) - 1``).

    Args:
        position: the position of ``(B, T, V)`` outputs to contrast; None for ``(B, V)``
            outputs or a position per sample in the target.

    Returns:
        ``(B,)`` losses. ``loss_name``: ``"contrastive"``, or ``"contrastive(position=-1)"``.

    Raises:
        ValueError: a target that is not ``(B, 2)`` / ``(B, 3)`` as above, outputs of the
            wrong rank, an id or position out of range. TypeError: float ids.

    Examples::

        >>> from captum_paramsal.losses import Contrastive
        >>> # "Paris" rather than "London" as the next token after each (left-padded) prompt
        >>> ps = ParameterSaliency(gpt2, loss_fn=Contrastive(position=-1))
        >>> sal = ps.attribute(ids, target=torch.tensor([[paris, london]] * len(ids)),
        ...                    additional_forward_args={"attention_mask": mask, "position_ids": positions})
        >>> # right padding: each sample's last real position, in the target
        >>> last = mask.sum(1) - 1
        >>> ps = ParameterSaliency(gpt2, loss_fn=Contrastive())
        >>> sal = ps.attribute(ids, target=torch.stack([right, foil, last], 1),
        ...                    additional_forward_args={"attention_mask": mask})
    """

    def __init__(self, position: Optional[int] = None) -> None:
        if position is not None and (isinstance(position, bool) or not isinstance(position, int)):
            raise TypeError(f"position must be an int or None, got {position!r}")
        self.position = position

    @property
    def loss_name(self) -> str:
        return "contrastive" if self.position is None else f"contrastive(position={self.position})"

    def __repr__(self) -> str:
        return "Contrastive()" if self.position is None else f"Contrastive(position={self.position})"

    def __call__(self, outputs: Tensor, target: Tensor) -> Tensor:
        name = repr(self)
        _check_tensors(name, outputs, target)
        _check_integer(name, target, "token ids")
        batch = outputs.shape[0]
        per_sample = target.dim() == 2 and target.shape[1] == 3
        if target.dim() != 2 or target.shape[1] not in (2, 3):
            raise ValueError(f"{name}: target must be ({batch}, 2) (right id, foil id) or ({batch}, 3) (right id, "
                             f"foil id, position) integers, got shape {tuple(target.shape)}")
        if self.position is None and not per_sample:
            if outputs.dim() != 2:
                raise ValueError(
                    f"{name}: a (B, 2) target contrasts (batch, vocabulary) outputs, got shape "
                    f"{tuple(outputs.shape)}; give Contrastive(position=...) or a (B, 3) target with a position "
                    "per sample for per-position outputs"
                )
            scores = outputs
        else:
            if outputs.dim() != 3:
                raise ValueError(f"{name}: a position needs (batch, positions, vocabulary) outputs, got shape "
                                 f"{tuple(outputs.shape)}")
            if per_sample and self.position is not None:
                raise ValueError(f"{name}: the target gives a position per sample and position= gives "
                                 f"{self.position}; give one of them")
            length = outputs.shape[1]
            if per_sample:
                where = target[:, 2].long()
                _check_ids(name, where, length, "position")
                scores = outputs.gather(1, where.reshape(batch, 1, 1).expand(batch, 1, outputs.shape[2]))[:, 0]
            else:
                if not -length <= self.position < length:
                    raise ValueError(f"{name}: position {self.position} is out of range for {length} positions")
                scores = outputs[:, self.position]
        ids = target[:, :2].long()
        _check_ids(name, ids, scores.shape[1], "token id")
        chosen = scores.gather(1, ids)
        return chosen[:, 1] - chosen[:, 0]


# -- regression and multi-label -----------------------------------------------------------------


class MeanSquaredError:
    r"""Squared error per sample, averaged over the output's non-batch entries:
    ``L_i = mean_j (outputs[i, j] - target[i, j])^2``.

    For any model with a real-valued output (a regressor, a Hugging Face model with
    ``problem_type="regression"``, an autoencoder's reconstruction).

    Shapes:
        ``outputs``: ``(B, ...)``, floating point. ``target``: the same shape, floating point
        (converted to the outputs' dtype).

    Returns:
        ``(B,)`` losses. ``loss_name``: ``"mse"``.

    Raises:
        ValueError: a target of another shape (no broadcasting: a ``(B,)`` target for
            ``(B, 1)`` outputs is refused). TypeError: integer outputs or target.

    Examples::

        >>> from captum_paramsal.losses import MeanSquaredError
        >>> ps = ParameterSaliency(regressor, loss_fn=MeanSquaredError())
        >>> sal = ps.attribute(x, target=y.reshape(-1, 1))     # outputs (B, 1): target (B, 1)
    """

    loss_name = "mse"

    def __call__(self, outputs: Tensor, target: Tensor) -> Tensor:
        name = "MeanSquaredError"
        _check_tensors(name, outputs, target)
        if tuple(target.shape) != tuple(outputs.shape):
            raise ValueError(f"{name}: target must have the outputs' shape {tuple(outputs.shape)}, got "
                             f"{tuple(target.shape)}")
        _check_floating(name, outputs, target, "regression values")
        diff = outputs - target.to(outputs.dtype)
        return diff.pow(2).reshape(outputs.shape[0], -1).mean(dim=1)

    def __repr__(self) -> str:
        return "MeanSquaredError()"


class BCEWithLogits:
    r"""Multi-label binary cross-entropy on logits, per sample:
    ``L_i = mean_c [-y_ic log sigmoid(z_ic) - (1 - y_ic) log(1 - sigmoid(z_ic))]``
    (``reduction="mean"``, default) or the sum over the ``C`` labels (``"sum"``).

    For any model with one logit per label (a Hugging Face model with
    ``problem_type="multi_label_classification"``, a tagger).

    Args:
        reduction: ``"mean"`` or ``"sum"`` over each sample's labels.

    Shapes:
        ``outputs``: ``(B, C)`` logits. ``target``: ``(B, C)`` floats in ``[0, 1]`` (0/1
        labels or probabilities), converted to the outputs' dtype.

    Returns:
        ``(B,)`` losses. ``loss_name``: ``"bce_with_logits(reduction='mean')"`` (or ``'sum'``).

    Raises:
        ValueError: outputs that are not ``(B, C)``, a target of another shape, a value outside
            ``[0, 1]``. TypeError: an integer or bool target.

    Examples::

        >>> from captum_paramsal.losses import BCEWithLogits
        >>> ps = ParameterSaliency(tagger, loss_fn=BCEWithLogits())
        >>> sal = ps.attribute(x, target=tags.float())           # (B, C) of 0. and 1.
    """

    def __init__(self, reduction: str = "mean") -> None:
        self.reduction = _check_reduction(reduction)

    @property
    def loss_name(self) -> str:
        return f"bce_with_logits(reduction={self.reduction!r})"

    def __repr__(self) -> str:
        return f"BCEWithLogits(reduction={self.reduction!r})"

    def __call__(self, outputs: Tensor, target: Tensor) -> Tensor:
        name = "BCEWithLogits"
        _check_tensors(name, outputs, target)
        if outputs.dim() != 2:
            raise ValueError(f"{name}: outputs must be (batch, labels) logits, got shape {tuple(outputs.shape)}")
        if tuple(target.shape) != tuple(outputs.shape):
            raise ValueError(f"{name}: target must be one float per label, shape {tuple(outputs.shape)}, got "
                             f"{tuple(target.shape)}")
        _check_floating(name, outputs, target, "multi-label targets")
        if _values_readable(target) and bool(((target < 0) | (target > 1) | target.isnan()).any()):
            raise ValueError(f"{name}: target values must lie in [0, 1] (labels or probabilities)")
        per_label = F.binary_cross_entropy_with_logits(outputs, target.to(outputs.dtype), reduction="none")
        return per_label.mean(dim=1) if self.reduction == "mean" else per_label.sum(dim=1)


# -- what statistics record a loss as ------------------------------------------------------------


def loss_name(fn: Callable) -> str:
    """What statistics record ``fn`` as (their fingerprint includes it; another name is refused).

    A loss object's own ``loss_name`` (the families above name their options there); else the
    callable's dotted name, ``"module.qualname"``. An anonymous loss, a lambda or a function
    (or a callable class) defined in a local scope (``<lambda>`` or ``<locals>`` in its
    qualname), gets ``@`` and a digest of its code after the name: its bytecode, constants and
    names (nested code objects included), its defaults and the values its closure captured
    (numbers, strings, tensors by value; other objects by their type), and a callable object's
    attributes alike. Two different lambdas
    then differ, and the same lambda matches in another process (of the same Python).

    Examples::

        >>> loss_name(CausalLM())
        "causal_lm(reduction='sum')"
        >>> loss_name(my_module.focal_loss)
        'my_module.focal_loss'
        >>> loss_name(lambda out, y: F.cross_entropy(out, y, reduction="none"))
        '__main__.<lambda>@6f0c2e8d1a9b'
    """
    named = getattr(fn, "loss_name", None)
    if isinstance(named, str) and named:
        return named
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    dotted = f"{module}.{name}" if module else name
    if "<lambda>" not in name and "<locals>" not in name:
        return dotted
    instance = not hasattr(fn, "__code__")  # a callable object of a class defined locally
    function = type(fn).__call__ if instance else fn
    if getattr(function, "__code__", None) is None:
        return dotted
    h = hashlib.sha256()
    _hash_code(h, function.__code__)
    if instance:  # its options
        for key, value in sorted(getattr(fn, "__dict__", {}).items()):
            h.update(key.encode())
            _hash_value(h, value)
    for value in (function.__defaults__ or ()):
        _hash_value(h, value)
    for key, value in sorted((function.__kwdefaults__ or {}).items()):
        h.update(key.encode())
        _hash_value(h, value)
    for cell in function.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            value = None
        _hash_value(h, value)
    return f"{dotted}@{h.hexdigest()[:12]}"


def _hash_code(h: Any, code: Any) -> None:
    """Feed a code object's bytecode, constants (recursively) and names: the same source
    compiled in another process gives the same bytes."""
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_freevars, code.co_argcount, code.co_kwonlyargcount)).encode())
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            _hash_code(h, const)
        else:
            _hash_value(h, const)


def _hash_value(h: Any, value: Any) -> None:
    """Feed a value in a form that does not depend on the process (no ids, no set order)."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, (tuple, list)):
        h.update(f"{type(value).__name__}[{len(value)}](".encode())
        for item in value:
            _hash_value(h, item)
        h.update(b")")
    elif isinstance(value, (frozenset, set)):
        h.update(f"{type(value).__name__}:{sorted(repr(item) for item in value)!r};".encode())
    elif isinstance(value, Tensor):
        data = value.detach().cpu().contiguous()
        h.update(f"tensor:{data.dtype}:{tuple(data.shape)}:".encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    elif callable(value) and hasattr(value, "__qualname__"):
        h.update(f"callable:{getattr(value, '__module__', '')}.{value.__qualname__};".encode())
    else:
        h.update(f"object:{type(value).__module__}.{type(value).__qualname__};".encode())
