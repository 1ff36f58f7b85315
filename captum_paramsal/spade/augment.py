"""The calibration batch: a sample and random augmentations of it.

SPADE reconstructs each layer on the inputs it sees for *this* sample's neighbourhood: the sample
itself and random views of it. The default views are torchvision ``transforms.v2`` random resized
crops, horizontal flips and colour jitter; any callable ``sample -> sample`` (a ``v2.Compose`` of
your own included) can replace them.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

AugmentFn = Callable[[Tensor], Tensor]


class DefaultAugmentation:
    r"""Random resized crop, horizontal flip and colour jitter of one ``(C, H, W)`` image.

    Works for inputs in any value range (normalized ImageNet inputs included): the colour jitter
    (``v2.ColorJitter``, which assumes values in [0, 1] and clamps to them) is applied to the
    image rescaled by its own minimum and maximum, and the result mapped back, so the values stay
    within the sample's own range. Saturation and hue jitter apply to 3-channel images, brightness
    and contrast to 1- and 3-channel images; other channel counts get the geometric part only.

    Args:
        crop_scale: area fraction range of ``v2.RandomResizedCrop`` (default ``(0.35, 1.0)``:
            views that keep most of the sample, since the point is its neighbourhood).
        flip: random horizontal flips (default True).
        brightness, contrast, saturation, hue: ``v2.ColorJitter`` strengths.

    Examples::

        >>> augment = DefaultAugmentation(crop_scale=(0.5, 1.0), flip=False)
        >>> SPADE(Saliency(model), augment=augment).attribute(images, target=labels)
    """

    def __init__(
        self,
        crop_scale: Tuple[float, float] = (0.35, 1.0),
        flip: bool = True,
        brightness: float = 0.3,
        contrast: float = 0.3,
        saturation: float = 0.3,
        hue: float = 0.05,
    ) -> None:
        self.crop_scale = tuple(crop_scale)
        self.flip = flip
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def __repr__(self) -> str:
        return (
            f"DefaultAugmentation(crop_scale={self.crop_scale}, flip={self.flip}, brightness={self.brightness}, "
            f"contrast={self.contrast}, saturation={self.saturation}, hue={self.hue})"
        )

    def __call__(self, sample: Tensor) -> Tensor:
        """One random view of one ``(C, H, W)`` image, the same shape, within its value range.

        Examples::

            >>> DefaultAugmentation()(image).shape == image.shape
            True
        """
        from torchvision.transforms import v2

        if sample.dim() != 3:
            raise ValueError(
                f"the default augmentation is for images (C, H, W); got a sample of shape {tuple(sample.shape)}. "
                "Pass augment= (a callable sample -> sample) for other inputs."
            )
        channels, height, width = sample.shape
        geometric = [v2.RandomResizedCrop((height, width), scale=self.crop_scale, antialias=True)]
        if self.flip:
            geometric.append(v2.RandomHorizontalFlip())
        out = v2.Compose(geometric)(sample)
        if channels in (1, 3) and (self.brightness or self.contrast or self.saturation or self.hue):
            colour = v2.ColorJitter(
                brightness=self.brightness,
                contrast=self.contrast,
                saturation=self.saturation if channels == 3 else 0,
                hue=self.hue if channels == 3 else 0,
            )
            low, high = sample.min(), sample.max()
            span = high - low
            if float(span) > 0:
                out = colour((out - low) / span).clamp(0, 1) * span + low
        return out


def augmented_batch(
    inputs: Tuple[Tensor, ...],
    n_augmentations: int,
    augment: Optional[AugmentFn] = None,
    seed: Optional[int] = 0,
) -> Tuple[Tensor, ...]:
    """``n_augmentations`` rows per input: row 0 the sample itself, then ``augment(sample)``.

    ``inputs`` holds one sample (batch size 1). For a single input, ``augment`` gets the sample
    without its batch dimension and returns a tensor of the same shape; for a tuple of inputs it
    gets the tuple of samples and returns a tuple. With ``seed`` set the views are drawn from a
    fork of the CPU random state seeded with it, which leaves the global random state untouched
    and gives every sample the same random crops, flips and jitter (so one sample's explanation
    does not depend on the others in its batch). ``seed=None`` draws from the global state.

    Examples::

        >>> (batch,) = augmented_batch((image[None],), 16, seed=0)
        >>> batch.shape                      # (16, C, H, W); batch[0] is the image itself
        >>> pair = augmented_batch((x[:1], mask[:1]), 8, augment=lambda t: (t[0].flip(-1), t[1].flip(-1)))
    """
    if augment is None:
        if len(inputs) != 1:
            raise ValueError(
                "the default augmentation handles a single image input; for a model with several inputs "
                "pass augment= (a callable taking and returning the tuple of samples)"
            )
        augment = DefaultAugmentation()
    samples = tuple(x[0] for x in inputs)
    rows = [[s] for s in samples]
    if seed is None:
        _draw(augment, samples, rows, n_augmentations - 1)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            _draw(augment, samples, rows, n_augmentations - 1)
    return tuple(torch.stack(r) for r in rows)


def _draw(augment: AugmentFn, samples: Sequence[Tensor], rows: list, count: int) -> None:
    single = len(samples) == 1
    for _ in range(count):
        view = augment(samples[0]) if single else augment(tuple(samples))
        views = (view,) if single else view
        if not isinstance(views, (tuple, list)) or len(views) != len(samples):
            raise ValueError(f"augment must return {len(samples)} tensor(s), got {type(view).__name__}")
        for i, (v, s) in enumerate(zip(views, samples)):
            if not isinstance(v, Tensor) or v.shape != s.shape:
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"augment must keep the sample's shape {tuple(s.shape)}; input {i} came back as {got}")
            rows[i].append(v.to(device=s.device, dtype=s.dtype))
