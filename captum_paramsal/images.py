"""Image folders (``root/<class>/<image>``) as (inputs, labels) batches for statistics."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

#: torchvision's ImageNet normalization, what its pretrained weights expect
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_transform(image_size: int = 224) -> Callable[[Any], Tensor]:
    """Resize the short side to 8/7 of ``image_size``, centre crop, tensor, normalize."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(round(image_size * 8 / 7)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _read_rgb(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError:
        # refused, not read: PIL's limit guards memory against a small file of huge declared size
        size = _declared_size(path)
        shape = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels" if size else "more pixels than that"
        raise ValueError(
            f"image {path} is too large to read: {shape} ({os.path.getsize(path):,} bytes on disk), "
            f"over PIL's limit of {2 * Image.MAX_IMAGE_PIXELS:,} pixels (a decompression bomb?)"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def _declared_size(path: str) -> Optional[Tuple[int, int]]:
    """The (width, height) an image file's header declares, read without decoding its pixels
    and without PIL's decompression-bomb check (None when no PIL format reads the header)."""
    from PIL import Image

    Image.init()
    try:
        with open(path, "rb") as fp:
            prefix = fp.read(16)
            for format_id in Image.ID:
                factory, accept = Image.OPEN[format_id]
                if accept is not None and not accept(prefix):
                    continue
                fp.seek(0)
                try:
                    return tuple(factory(fp, path).size)
                except Exception:  # not this format
                    continue
    except OSError:
        pass
    return None


def image_folder(root: str, image_size: int = 224, transform: Optional[Callable[[Any], Tensor]] = None) -> Dataset:
    """``torchvision.datasets.ImageFolder`` with clear errors for a missing or empty folder and
    an unreadable image (named in the message)."""
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    try:
        return ImageFolder(root, transform=transform or imagenet_transform(image_size), loader=_read_rgb)
    except FileNotFoundError as error:  # no class folders, or no images in them
        raise ValueError(f"no images in {root} (expected {root}/<class>/<image>): {error}") from error


def shard_indices(size: int, rank: int, world_size: int, max_samples: Optional[int] = None) -> Sequence[int]:
    """The indices of rank ``rank``: every ``world_size``-th of the first ``max_samples``."""
    limit = size if max_samples is None else min(size, max_samples)
    return range(rank, limit, world_size)


def shard(dataset: Dataset, rank: int = 0, world_size: int = 1, max_samples: Optional[int] = None) -> Dataset:
    """This rank's part of ``dataset`` (no padding or repeats, unlike a DistributedSampler)."""
    return Subset(dataset, list(shard_indices(len(dataset), rank, world_size, max_samples)))


def stack_batch(items: Sequence[Tuple[Tensor, int]]) -> Tuple[Tensor, Tensor]:
    images, labels = zip(*items)
    return torch.stack(images), torch.as_tensor(labels)
