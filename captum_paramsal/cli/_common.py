"""Arguments that several subcommands share, and the checks of them that run before any work
(a model built, an image read, a pass run), each failing with one clear error."""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence


def add_model_arguments(parser: argparse.ArgumentParser, model_help: str) -> None:
    """``--model`` and where its weights come from (never a download)."""
    parser.add_argument("--model", required=True, help=model_help)
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="local weights file (.safetensors, or a torch.save state dict)")
    weights.add_argument("--weights-name", help="torchvision weights enum, e.g. IMAGENET1K_V2 (must be cached)")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")


def add_overwrite_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what}")


# -- checks that run before any model is built or any image is read ------------------------
def check_at_least_one(args: argparse.Namespace, names: Sequence[str]) -> None:
    """Each of the integer options ``names`` (attribute names) is None or at least 1."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def check_device(text: str):
    """``--device`` as a ``torch.device``: cpu, cuda, cuda:N or mps, and present here."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = "" if torch.version.cuda else " (this torch is built without CUDA)"
            raise ValueError(f"--device {text}: no CUDA GPU is available here{built}; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {text}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {text}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"--device {text}: use cpu, cuda or cuda:N")
    return device


def check_torchvision_name(name: str, or_digits: bool = False) -> None:
    from ..models import torchvision_model_names

    names = torchvision_model_names()
    if name not in names:
        if or_digits:
            raise ValueError(f"unknown model {name!r}: neither 'digits' (the embedded CNN) nor a torchvision "
                             f"model ({', '.join(names)})")
        raise ValueError(f"unknown torchvision model {name!r}; known: {', '.join(names)}")


def check_torchvision_model(args: argparse.Namespace) -> Optional[int]:
    """``--model`` names a torchvision classification model, ``--weights`` exists, and the model
    takes ``--image-size`` images; the model's number of classes (None when not known
    without building it)."""
    check_torchvision_name(args.model)
    if args.weights is not None and not os.path.isfile(args.weights):
        raise FileNotFoundError(f"weights file not found: {args.weights}")
    if args.weights_name is not None:
        from ..models import _cached_weights

        _cached_weights(args.model, args.weights_name)  # a known enum, already in the local cache
    return check_input_size(args.model, args.num_classes, args.image_size)


def check_input_size(name: str, num_classes: Optional[int], image_size: int) -> Optional[int]:
    """Whether torchvision model ``name`` takes ``image_size`` x ``image_size`` images, found on
    the meta device (no memory, no arithmetic, no weights): a ValueError if not, else the
    number of classes it outputs (None where the meta device cannot tell)."""
    import warnings

    import torch
    import torchvision

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                model = torchvision.models.get_model(name, **kwargs).eval()
        except Exception:  # some initializations read values (regnet): the real build will tell
            return None
        try:
            with torch.device("meta"), torch.no_grad():
                out = model(torch.empty(1, 3, image_size, image_size))
        except NotImplementedError:
            return None
        except (AssertionError, RuntimeError, ValueError, IndexError) as error:
            reason = " ".join(str(error).split()) or type(error).__name__
            if "meta" in reason.lower():  # an operation the meta device cannot run: inconclusive
                return None
            raise ValueError(f"{name} does not take {image_size}x{image_size} images (--image-size "
                             f"{image_size}): {reason}") from None
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        return int(out.shape[-1])
    return None


def check_labels(labels, num_classes: int) -> None:
    values = sorted(set(int(v) for v in labels))
    if values and (values[0] < 0 or values[-1] >= num_classes):
        raise ValueError(f"labels must be class indices in [0, {num_classes}), got {values}")


def _nearest_existing_folder(path: str) -> str:
    """The folder that ``path`` would be created in: its nearest existing ancestor, which must
    be a folder this process can write in."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: no permission to write in {parent}")
    return parent


def check_report_folder(path: str, overwrite: bool) -> None:
    """``--out`` of a report: an existing folder (updated in place), or a path where one can be
    made; an existing file only with ``--overwrite`` (it is replaced by the folder)."""
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"--out {path}: no permission to write in this folder")
        return
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"--out {path} is an existing file, not a report folder (pass --overwrite to replace it)")
    _nearest_existing_folder(path)


def make_room_for_report(path: str) -> None:
    """Remove the file at ``path`` that ``--overwrite`` allowed to replace by the report folder."""
    if os.path.lexists(path) and not os.path.isdir(path):
        os.remove(path)


def check_output_file(path: str, overwrite: bool) -> None:
    """``--out`` of a file: not a folder, in an existing folder this process can write in, and
    not an existing file unless ``--overwrite``."""
    if os.path.isdir(path):
        raise ValueError(f"--out {path} is a folder; name the file to write, e.g. "
                         f"{os.path.join(path, 'stats.safetensors')}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.lexists(directory):
        raise FileNotFoundError(f"output folder does not exist: {directory}")
    if not os.path.isdir(directory):
        raise ValueError(f"--out {path}: {directory} is a file, not a folder")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: no permission to write in {directory}")
    if os.path.lexists(path):
        if not overwrite:
            raise ValueError(f"--out {path} exists (pass --overwrite to replace it)")
        if os.path.isfile(path) and (not os.access(path, os.W_OK) or not os.stat(path).st_mode & 0o222):
            raise ValueError(f"--out {path} is read-only")


def read_stats(path: str):
    """``--stats`` as :class:`~captum_paramsal.SaliencyStats`; any problem as one clear error."""
    from ..stats import SaliencyStats

    if os.path.isdir(path):
        raise ValueError(f"--stats {path} is a folder, not a statistics file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"statistics file not found: {path}")
    try:
        return SaliencyStats.load(path)
    except KeyError as error:  # an incomplete file that SaliencyStats.load does not name itself
        raise ValueError(f"statistics file {path} lacks the field {error}") from None
    except OSError as error:
        raise ValueError(f"cannot read statistics file {path}: {error.strerror or error}") from None
