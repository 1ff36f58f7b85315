"""The one loop over a data set of ``(inputs, labels)`` batches.

Everything in the library that streams a data set (the reference statistics
``ParameterSaliency.fit_stats``, :func:`~captum_paramsal.analysis.dataset_profiles`,
:meth:`~captum_paramsal.analysis.SaliencyIndex.from_saliency`) reads it through
:func:`labelled_batches`: the same batch forms, the same checks and messages, the same
``max_samples`` cut, the same round-robin sharding and the same progress bar.

Examples::

    >>> from captum_paramsal.data import labelled_batches
    >>> for inputs, labels in labelled_batches(val_loader, device="cuda", max_samples=1000):
    ...     sal = ps.attribute(inputs, target=labels)      # inputs: a tuple of tensors
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

from ._utils import format_inputs, split_labelled_batch
from .per_sample.batching import is_per_sample

__all__ = ["LabelledBatch", "labelled_batches"]

#: What :func:`labelled_batches` yields: ``(inputs as a tuple of tensors, labels)``.
LabelledBatch = Tuple[Tuple[Tensor, ...], Tensor]


def labelled_batches(
    data: Iterable[Any],
    *,
    device: Union[str, torch.device, None] = None,
    max_samples: Optional[int] = None,
    shard: Optional[Tuple[int, int]] = None,
    progress: bool = False,
    desc: Optional[str] = None,
    total: Optional[int] = None,
    class_labels: bool = True,
    keyword_inputs: bool = False,
) -> Iterator[LabelledBatch]:
    r"""``(inputs, labels)`` per batch of ``data``, checked, on ``device``, cut at ``max_samples``.

    For each batch (its index ``i`` counts every batch of ``data``, taken or not):

    1. with ``shard=(rank, world)``, batches with ``i % world != rank`` are skipped (round
       robin: each of ``world`` processes takes its own batches, without loading the others'
       inputs onto the device);
    2. the batch is split into inputs and labels: an ``(inputs, labels)`` pair (tuple or list)
       or a dict with ``"inputs"`` and ``"labels"`` keys
       (:func:`captum_paramsal._utils.split_labelled_batch`);
    3. ``inputs`` (a tensor, or a tuple of tensors for a model with several inputs) becomes a
       tuple, checked like every attribution's inputs (a batch dimension, one batch size, no
       NaN / inf; :func:`captum_paramsal._utils.format_inputs`), and moved to ``device``;
    4. ``labels`` must hold one label per sample (see ``class_labels``) and are moved to
       ``device``;
    5. the batch that crosses ``max_samples`` is cut to end exactly there, and the loop stops.

    A progress bar (``tqdm.auto``, unit "sample") counts the samples yielded; it shows only
    with ``progress=True`` and, under an initialized ``torch.distributed``, on rank 0 only. It
    is closed when the loop ends, breaks or raises.

    Args:
        data: an iterable of batches, a ``DataLoader`` included.
        device: where inputs and labels go; None leaves them where they are.
        max_samples: stop after this many samples (of this process, when sharded); a positive
            int, or None for all.
        shard: ``(rank, world)`` with ``0 <= rank < world``: take every ``world``-th batch
            starting at ``rank``; None takes every batch.
        progress: show the progress bar.
        desc: the bar's description.
        total: the bar's total in samples; default ``max_samples`` if given, else
            ``len(data.dataset)`` when ``data`` has one (a ``DataLoader``), unless the data are
            split between processes (``shard`` given or ``torch.distributed`` initialized),
            where that length is not this process's share.
        class_labels: True (default): labels are class indices, a 1-D integer tensor (or
            anything ``torch.as_tensor`` makes one of) with one entry per sample, returned as
            int64. False: labels are any per-sample targets (for a custom loss: float, one-hot,
            several per sample), a tensor whose first dimension is the batch size, returned
            with their own dtype.

    Yields:
        ``(inputs, labels)``: ``inputs`` a tuple of tensors of ``B`` samples each, ``labels``
        a tensor of ``B`` labels, both on ``device``.

    Raises:
        ValueError: a bad ``max_samples`` / ``shard`` / ``total`` (when called), and, while
            iterating, a batch that is not an ``(inputs, labels)`` pair, malformed inputs, or
            labels that do not give one per sample (class labels: not integers); the message
            names the batch by its index in ``data``.
        TypeError: inputs that are not tensors.

    Examples::

        >>> from captum_paramsal.data import labelled_batches
        >>> batches = labelled_batches(loader, device="cuda", max_samples=500, progress=True,
        ...                            desc="profiles")
        >>> for inputs, labels in batches:
        ...     sal = ps.attribute(inputs, target=labels)
        >>> # two processes, each its own half of the batches
        >>> mine = labelled_batches(loader, shard=(rank, 2))
        >>> # a custom loss with float targets
        >>> for inputs, targets in labelled_batches(loader, class_labels=False):
        ...     ...
    """
    if max_samples is not None and (
        not isinstance(max_samples, int) or isinstance(max_samples, bool) or max_samples < 1
    ):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    if shard is not None:
        if (
            not isinstance(shard, tuple)
            or len(shard) != 2
            or any(not isinstance(v, int) or isinstance(v, bool) for v in shard)
            or not 0 <= shard[0] < shard[1]
        ):
            raise ValueError(f"shard must be a (rank, world) pair of ints with 0 <= rank < world, got {shard!r}")
    if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total < 0):
        raise ValueError(f"total must be a non-negative int or None, got {total!r}")
    if not isinstance(class_labels, bool):
        raise TypeError(f"class_labels must be True or False, got {class_labels!r}")
    if isinstance(data, (Tensor, str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(
            f"data must be an iterable of (inputs, labels) batches (a DataLoader, a list of pairs), "
            f"got {type(data).__name__}"
        )
    distributed = _distributed_rank()
    if total is None:
        total = max_samples
        dataset = getattr(data, "dataset", None)
        if total is None and shard is None and distributed is None and hasattr(dataset, "__len__"):
            total = len(dataset)
    show = bool(progress) and (distributed is None or distributed == 0)
    return _batches(data, None if device is None else torch.device(device), max_samples, shard, show, desc, total,
                    class_labels, keyword_inputs)


def _batches(
    data: Iterable[Any],
    device: Optional[torch.device],
    max_samples: Optional[int],
    shard: Optional[Tuple[int, int]],
    show: bool,
    desc: Optional[str],
    total: Optional[int],
    class_labels: bool,
    keyword_inputs: bool = False,
) -> Iterator[LabelledBatch]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, disable=not show, unit="sample", desc=desc)
    seen = 0
    try:
        for index, batch in enumerate(data):
            if shard is not None and index % shard[1] != shard[0]:
                continue
            inputs, labels, keyword = split_labelled_batch(batch, index)
            if keyword and not keyword_inputs:
                raise ValueError(
                    f"batch {index} of data carries keyword inputs {sorted(keyword)}, which {desc or 'this loop'} "
                    "does not pass to the model; give (inputs, labels) batches"
                )
            inputs_tuple, _ = format_inputs(inputs)
            size = inputs_tuple[0].shape[0]
            labels = _check_labels(labels, size, index, class_labels)
            full = size
            if max_samples is not None and seen + size > max_samples:
                size = max_samples - seen
                inputs_tuple, labels = tuple(x[:size] for x in inputs_tuple), labels[:size]
                keyword = {k: v[:size] if is_per_sample(v, full) else v for k, v in keyword.items()}
            if device is not None:
                inputs_tuple = tuple(x.to(device) for x in inputs_tuple)
                labels = labels.to(device)
                keyword = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in keyword.items()}
            yield (inputs_tuple, labels, keyword) if keyword_inputs else (inputs_tuple, labels)
            seen += size
            bar.update(size)
            if max_samples is not None and seen >= max_samples:
                break
    finally:
        bar.close()


def _check_labels(labels: Any, batch: int, index: int, class_labels: bool) -> Tensor:
    if labels is None:
        raise ValueError(f"labels of batch {index} are None; each batch must be an (inputs, labels) pair")
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as error:
        what = "a tensor of class indices" if class_labels else "a tensor"
        raise ValueError(f"labels of batch {index} are not {what}: {error}") from None
    if class_labels:
        if labels.dim() != 1 or labels.shape[0] != batch:
            raise ValueError(
                f"labels of batch {index} must be one class per sample, shape ({batch},), got {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels of batch {index} must be integer class indices, got dtype {labels.dtype}")
        return labels.long()
    if labels.dim() == 0 or labels.shape[0] != batch:
        raise ValueError(
            f"labels of batch {index} must have one entry per sample (first dimension {batch}), "
            f"got shape {tuple(labels.shape)}"
        )
    return labels


def _distributed_rank() -> Optional[int]:
    """This process's rank under an initialized ``torch.distributed``, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return None
