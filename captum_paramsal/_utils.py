"""Helpers shared by the attribution methods: inputs, targets, losses, model state."""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TensorOrTupleOfTensors = Union[Tensor, Tuple[Tensor, ...]]
TargetType = Union[None, int, Sequence[int], Tensor]


def outside_stacklevel() -> int:
    """The ``stacklevel`` of a warning that points at the first frame outside this package
    (the user's call), however deep inside it the warning is raised."""
    import sys

    frame, level = sys._getframe(1), 1
    package = __name__.rsplit(".", 1)[0]
    while frame is not None and frame.f_globals.get("__name__", "").startswith((package, "captum.log")):
        frame, level = frame.f_back, level + 1
    return level


def cross_entropy_per_sample(outputs: Tensor, target: Tensor) -> Tensor:
    """The default ``loss_fn``: cross-entropy of each sample, shape ``(B,)``."""
    return F.cross_entropy(outputs, target, reduction="none")


def format_inputs(inputs: TensorOrTupleOfTensors) -> Tuple[Tuple[Tensor, ...], bool]:
    """``(inputs as a tuple, whether they came as a tuple)``, checked for shape and values."""
    is_tuple = isinstance(inputs, tuple)
    as_tuple = inputs if is_tuple else (inputs,)
    if len(as_tuple) == 0:
        raise ValueError("inputs is an empty tuple: pass at least one tensor")
    for i, x in enumerate(as_tuple):
        if not isinstance(x, Tensor):
            raise TypeError(f"inputs[{i}] must be a Tensor, got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError(f"inputs[{i}] is a scalar; inputs need a batch dimension first")
    batch = as_tuple[0].shape[0]
    if batch == 0:
        raise ValueError("inputs hold no samples (batch size 0)")
    for i, x in enumerate(as_tuple[1:], start=1):
        if x.shape[0] != batch:
            raise ValueError(
                f"all inputs must share the batch size: inputs[0] has {batch} samples, "
                f"inputs[{i}] has {x.shape[0]}"
            )
    for i, x in enumerate(as_tuple):
        if x.is_floating_point() or x.is_complex():
            if not bool(torch.isfinite(x).all()):
                bad = "NaN" if bool(torch.isnan(x).any()) else "inf"
                raise ValueError(f"inputs[{i}] contains {bad}; saliency of non-finite inputs is undefined")
    return as_tuple, is_tuple


def format_additional_args(additional_forward_args: Any) -> Tuple[Any, ...]:
    if additional_forward_args is None:
        return ()
    if isinstance(additional_forward_args, tuple):
        return additional_forward_args
    return (additional_forward_args,)


def split_forward_args(additional_forward_args: Any) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """``(positional, keyword)`` extra arguments of the model: a dict is passed by keyword
    (``attention_mask=...``, as Hugging Face models take it); anything else by position, a
    tuple element by element (Captum's convention, so a dict inside a tuple is one positional
    argument)."""
    if isinstance(additional_forward_args, dict):
        positional, keyword = (), additional_forward_args
    else:
        positional, keyword = format_additional_args(additional_forward_args), {}
    for key in keyword:
        if not isinstance(key, str):
            raise TypeError(f"keyword arguments need str names, got {key!r} in additional_forward_args")
    return positional, dict(keyword)


def check_device(
    inputs: Tuple[Tensor, ...],
    additional: Tuple[Any, ...],
    device: torch.device,
    keyword: Optional[Dict[str, Any]] = None,
) -> None:
    """Inputs must live where the model's parameters do (no silent copies)."""
    named = [(f"inputs[{i}]", x) for i, x in enumerate(inputs)]
    named += [(f"additional_forward_args[{i}]", a) for i, a in enumerate(additional) if isinstance(a, Tensor)]
    named += [(f"additional_forward_args[{k!r}]", a) for k, a in (keyword or {}).items() if isinstance(a, Tensor)]
    for what, x in named:
        if x.device != device:
            raise ValueError(
                f"{what} is on {x.device} but the model's parameters are on {device}; "
                f"move the inputs with .to({str(device)!r})"
            )


def check_internal_batch_size(internal_batch_size: Optional[int]) -> None:
    """``internal_batch_size`` is None or a positive int (a NumPy integer too; not a bool,
    which Python counts as an int: ``True`` would silently mean chunks of one sample)."""
    if internal_batch_size is None:
        return
    import numbers  # NumPy's integers are Integral; its bool_ is not

    if (
        isinstance(internal_batch_size, bool)
        or not isinstance(internal_batch_size, numbers.Integral)
        or internal_batch_size < 1
    ):
        raise ValueError(f"internal_batch_size must be a positive int or None, got {internal_batch_size!r}")


def normalize_target(
    target: TargetType, batch: int, device: torch.device, class_labels: bool = False
) -> Optional[Tensor]:
    """``target`` as one entry per sample on ``device`` (None stays None: predicted class).

    ``class_labels``: the target feeds the default cross-entropy loss, so it must be one
    integer class label per sample, shape ``(batch,)``; labels of any integer dtype (int32,
    int16, uint8, ...) come back as int64. A ``(batch, 1)`` target is refused rather than
    guessed at. Without it (a custom ``loss_fn``), the target keeps its dtype and shape (token
    ids ``(B, T)``, regression targets ``(B, ...)``), only its first dimension is checked.
    """
    import operator

    if target is None:
        return None
    if isinstance(target, bool):
        raise TypeError("target must be an int, a sequence of ints or a Tensor, not a bool")
    if not isinstance(target, (Tensor, list, range, tuple)):
        try:
            target = operator.index(target)  # an int, a NumPy integer
        except TypeError:
            raise TypeError(
                f"target must be an int, a list of ints or a Tensor, got {type(target).__name__}"
            ) from None
        return torch.full((batch,), target, dtype=torch.long, device=device)
    if isinstance(target, tuple):
        raise TypeError(
            "target is a tuple; Captum uses tuples to index multi-dimensional outputs, which a "
            "loss does not take. Pass a list or a Tensor with one label per sample."
        )
    if isinstance(target, (list, range)):
        try:
            target = torch.as_tensor(list(target))
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"target must be an int, a list of ints or a Tensor; that list is not: {error}") from None
    if target.dim() == 0:
        target = target.expand(batch)
    if target.shape[0] != batch:
        raise ValueError(f"target has {target.shape[0]} entries for {batch} samples; give one label per sample")
    if class_labels:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(
                f"target: class labels must be integers (any integer dtype) for the default cross-entropy "
                f"loss, got dtype {target.dtype}; pass a loss_fn for other targets"
            )
        if target.dim() != 1:
            raise ValueError(
                f"target has shape {tuple(target.shape)}, but the default cross-entropy loss takes one class "
                f"label per sample, shape ({batch},): pass target.reshape(-1) if that is what it holds, or a "
                "loss_fn for other targets"
            )
        target = target.long()
    return target.to(device)


def label_resolver(target: Optional[Tensor], check_classes: bool) -> Callable[[Tensor], Tensor]:
    """``output -> labels``: the given labels, checked against the output, or the predicted class."""

    def resolve(output: Tensor) -> Tensor:
        if target is None:
            if output.dim() != 2:
                raise ValueError(
                    f"target=None takes the predicted class, which needs (batch, classes) outputs; "
                    f"the model returned shape {tuple(output.shape)}. Pass target= explicitly."
                )
            return output.argmax(dim=1)
        if check_classes:
            if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
                raise TypeError(f"target: class labels must be integers, got dtype {target.dtype}")
            if target.dim() != 1:
                raise ValueError(
                    f"target has shape {tuple(target.shape)}, but the default cross-entropy loss takes one "
                    f"class label per sample, shape ({target.shape[0]},)"
                )
            if output.dim() != 2:
                raise ValueError(
                    f"the default cross-entropy loss needs (batch, classes) outputs; the model returned "
                    f"shape {tuple(output.shape)}. Pass a loss_fn for other outputs."
                )
            classes = output.shape[1]
            low, high = int(target.min()), int(target.max())
            if low < 0 or high >= classes:
                bad = low if low < 0 else high
                raise ValueError(f"label {bad} is out of range for a model with {classes} classes (0..{classes - 1})")
            return target.long()  # any integer dtype is a class label
        return target

    return resolve


_MODEL_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock that serializes this library's calls on ``model`` (re-entrant: a call may call
    another). Calls on different models run in parallel."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; every submodule's own ``training`` flag restored on exit, also on error.

    Holds :func:`model_lock` throughout: two threads using one model would otherwise see each
    other's hooks and modes (one saving the flags the other had just set to eval)."""
    with model_lock(model):
        modes = [(module, module.training) for module in model.modules()]
        try:
            model.eval()
            yield
        finally:
            for module, training in modes:
                module.training = training


def model_device(params: Sequence[nn.Parameter]) -> torch.device:
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"the selected parameters span several devices {sorted(map(str, devices))}")
    return next(iter(devices))


def atomic_write(path: Union[str, os.PathLike], payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file beside it, fsync, rename.

    A reader never sees a half-written file, and an interrupted write leaves the old one.
    A symbolic link is written through: the file it names (at the end of a chain of links)
    is replaced, beside itself, and the link stays a link. An existing file keeps its
    permission bits; a new one gets the usual ``0666`` less the umask, not mkstemp's
    ``0600``. A read-only file (no write permission for anyone, or none for this process)
    is refused with a ``PermissionError`` naming it, and so is a directory
    (``IsADirectoryError``); nothing is written then. (The rename gives the file a new
    inode: other hard links to it keep the old content.)
    """
    import os
    import stat
    import tempfile

    path = os.fspath(path)
    target = os.path.realpath(path)  # through every link; a dangling link's target is created
    try:
        existing = os.stat(target)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if stat.S_ISDIR(existing.st_mode):
            raise IsADirectoryError(f"cannot write {path}: it is a directory")
        if not existing.st_mode & 0o222 or not os.access(target, os.W_OK):
            shown = path if target == os.path.abspath(path) else f"{path} (a link to {target})"
            raise PermissionError(
                f"cannot write {shown}: the file is read-only (mode {stat.S_IMODE(existing.st_mode):04o}); "
                "make it writable or write elsewhere"
            )
    directory = os.path.dirname(target)
    fd, tmp = tempfile.mkstemp(prefix=".captum-paramsal-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if existing is not None:
            mode = stat.S_IMODE(existing.st_mode)
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


#: the keys under which a Hugging Face batch (a dict from a tokenizer or an image processor,
#: collated by a DataLoader) holds the model's main input, in the order they are looked for
MAIN_INPUT_KEYS = ("input_ids", "pixel_values", "inputs_embeds", "input_values", "input_features")


def split_labelled_batch(batch: Any, index: int) -> Tuple[Any, Any, Dict[str, Any]]:
    """``(inputs, labels, keyword inputs)`` of one batch of a data set.

    The forms: an ``(inputs, labels)`` pair; an ``(inputs, labels, {keyword: value})`` triple; a
    dict with ``"inputs"`` and ``"labels"`` keys; or a Hugging Face batch, a dict with
    ``"labels"`` (or ``"label"``) and a main input (:data:`MAIN_INPUT_KEYS`, the first found),
    whose other entries (``attention_mask``, ``token_type_ids`` ...) are keyword inputs.
    """
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        keyword = batch[2] if len(batch) == 3 else {}
        if not isinstance(keyword, dict):
            raise ValueError(
                f"batch {index} of data is a triple whose third element is a {type(keyword).__name__}; "
                "it must be a dict of keyword inputs"
            )
        return batch[0], batch[1], dict(keyword)
    if isinstance(batch, dict) and {"inputs", "labels"} <= set(batch):
        return batch["inputs"], batch["labels"], {}
    if isinstance(batch, dict):
        label_key = next((k for k in ("labels", "label") if k in batch), None)
        input_key = next((k for k in MAIN_INPUT_KEYS if k in batch), None)
        if label_key is not None and input_key is not None:
            keyword = {k: v for k, v in batch.items() if k not in (label_key, input_key)}
            return batch[input_key], batch[label_key], keyword
    raise ValueError(
        f"batch {index} of data is a {type(batch).__name__}; each batch must be an (inputs, labels) pair "
        "(inputs a tensor or a tuple of tensors, labels one class per sample), an (inputs, labels, "
        "keyword inputs) triple, or a dict with 'labels' and one of " + ", ".join(map(repr, MAIN_INPUT_KEYS))
    )
