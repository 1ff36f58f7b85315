"""The calibration batch: a sample and random augmentations of it.

SPADE reconstructs each layer on the inputs it sees for *this* sample's neighbourhood: the sample
itself and random views of it. The default views are those of SPADE's authors: random resized
crops (area scale 0.2 to 1, aspect ratio 3/4 to 4/3), horizontal flips and colour jitter
(brightness 0.5, hue 0.3), drawn from the full-resolution image when one is given (``source=``)
and resized to the model's input size. :class:`DefaultAugmentation` draws all views of a sample at
once, in a few tensor operations (one ``grid_sample`` for the crops, resizes and flips, batched
colour jitter), instead of a Python loop of ``torchvision.transforms.v2`` calls: 1024 views
of a 3x32x32 image in 0.03 s instead of 0.6 s (about 20x), of a 3x224x224 image in 1.2 s instead
of 5 s (4.3 to 4.5x), one thread of a loaded 2-core machine (``benchmarks/bench_spade_views.py``;
at 224x224 a third of the time is the ``grid_sample``, a quarter the first touch of the 616 MB
batch, which the loop pays too). Any callable ``sample -> sample`` (a ``v2.Compose`` of your own
included) can replace it; an object with a ``views`` method of the same signature as
:meth:`DefaultAugmentation.views` is called once for all views.

The building blocks are public, for tests and for reuse: :func:`sample_crop_boxes` (torchvision's
``RandomResizedCrop`` box sampler, vectorized), :func:`crop_resize_flip` (the geometric part),
:func:`adjust_brightness_batch`, :func:`adjust_contrast_batch`, :func:`adjust_saturation_batch`
and :func:`adjust_hue_batch` (torchvision's colour kernels with one factor per image).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

AugmentFn = Callable[[Tensor], Tensor]

#: The colour jitter operations, in the order of torchvision's ``ColorJitter`` (its ``fn_idx``).
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")

# views are rendered in chunks of about this many output values per thread: all the random
# parameters are drawn first (so the views do not depend on the chunking), then each chunk's
# buffers (the sampling grid, the HSV planes) stay small enough to be reused from cache; 2**20
# (7 views at 224x224) was the fastest of 2**17 to 2**23 on one thread of the 2-core
# development machine
_CHUNK_ELEMENTS = 1 << 20

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


# --------------------------------------------------------------------------- the crop boxes


def sample_crop_boxes(
    height: int,
    width: int,
    count: int,
    scale: Tuple[float, float] = (0.2, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    generator: Optional[torch.Generator] = None,
    attempts: int = 10,
) -> Tensor:
    r"""``count`` random crop boxes of a ``height x width`` image, as torchvision's
    ``RandomResizedCrop.get_params`` samples them, for all boxes at once.

    Per box, ``attempts`` (10, as torchvision) candidates are drawn: a target area
    ``U[scale[0], scale[1]] * height * width`` and an aspect ratio ``exp(U[log ratio[0],
    log ratio[1]])``, rounded to ``w = round(sqrt(area * ratio))`` and ``h = round(sqrt(area /
    ratio))``. The first candidate that fits (``0 < w <= width``, ``0 < h <= height``) is kept and
    placed uniformly (``top ~ U{0..height-h}``, ``left ~ U{0..width-w}``); when none fits, the box
    is torchvision's fallback: the central crop of the whole image with its aspect ratio clamped to
    ``ratio``. The candidates of all boxes are drawn in a few tensor operations (float64), from
    ``generator`` only (default: the global CPU generator). The random stream is not torchvision's
    (which draws one candidate at a time), the distribution is.

    Args:
        height, width: the image size in pixels.
        count: the number of boxes.
        scale: the range of the box area, as a fraction of the image area.
        ratio: the range of the aspect ratio ``width / height`` (sampled log-uniformly).
        generator: the source of randomness (default ``torch.default_generator``).
        attempts: candidates per box before the fallback.

    Returns:
        A ``(count, 4)`` int64 tensor of ``(top, left, box_height, box_width)`` rows, on the
        generator's device.

    Examples::

        >>> boxes = sample_crop_boxes(224, 224, 1024, generator=torch.Generator().manual_seed(0))
        >>> top, left, h, w = boxes.unbind(1)
        >>> bool(((h * w) >= 0.19 * 224 * 224).all())        # areas within scale, up to rounding
        True
    """
    for name, value in (("height", height), ("width", width), ("count", count), ("attempts", attempts)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "count" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'count' else 'positive'} int, got {value!r}")
    scale = _range_pair(scale, "crop_scale")
    ratio = _range_pair(ratio, "ratio")
    gen = torch.default_generator if generator is None else generator
    options = dict(generator=gen, device=gen.device, dtype=torch.float64)
    area = float(height * width)
    u_area = torch.rand(count, attempts, **options)
    u_ratio = torch.rand(count, attempts, **options)
    u_place = torch.rand(count, 2, **options)
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * u_ratio)
    w = torch.round(torch.sqrt(target * aspect)).long()  # round half to even, as Python's round
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first candidate that fits
    found = fits.any(dim=1)
    box_w = w.gather(1, first).squeeze(1)
    box_h = h.gather(1, first).squeeze(1)
    # torchvision's fallback: the central crop, its aspect ratio clamped to ``ratio``
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = int(round(height * ratio[1])), height
    else:
        fallback_w, fallback_h = width, height
    box_w = torch.where(found, box_w, torch.full_like(box_w, fallback_w))
    box_h = torch.where(found, box_h, torch.full_like(box_h, fallback_h))
    free_h, free_w = height - box_h, width - box_w
    top = torch.minimum((u_place[:, 0] * (free_h + 1)).floor().long(), free_h)
    left = torch.minimum((u_place[:, 1] * (free_w + 1)).floor().long(), free_w)
    top = torch.where(found, top, free_h // 2)
    left = torch.where(found, left, free_w // 2)
    return torch.stack((top, left, box_h, box_w), dim=1)


# --------------------------------------------------------------------------- crop, resize, flip


def crop_resize_flip(
    image: Tensor,
    boxes: Tensor,
    size: Tuple[int, int],
    flips: Optional[Tensor] = None,
) -> Tensor:
    r"""The crops ``boxes`` of one ``(C, H, W)`` image, each resized to ``size`` (bilinear) and
    mirrored left-right where ``flips`` is True: one ``grid_sample`` for all of them.

    View ``n`` samples the image at the pixel coordinates
    ``x = left + (x_out + 0.5) * box_width / out_width - 0.5`` (the same for ``y``), clamped to the
    box, i.e. ``torch.nn.functional.interpolate(crop, size, mode="bilinear", align_corners=False)``
    of the crop, which is torchvision's ``v2.functional.resized_crop(image, top, left, h, w, size,
    antialias=False)``, to float32 round-off of the sampling coordinates on both sides (~5e-6 on
    images up to 48 pixels, tested to 1e-5; ~2e-5 at 224). The grid is the affine one
    ``F.affine_grid`` would build for ``theta = [[±w/W, 0, (2 left + w)/W - 1], [0, h/H,
    (2 top + h)/H - 1]]`` (``align_corners=False``, the sign the flip), built separably (one row of
    x and one column of y coordinates per view, computed in float64) so that it can be clamped to
    each box cheaply; one ``F.grid_sample`` (bilinear, ``align_corners=False``) samples all views.

    **No antialiasing.** Where a crop is larger than ``size`` (a view drawn from a full-resolution
    ``source`` and shrunk), plain bilinear sampling aliases, while torchvision's default resize
    (``antialias=True``) low-pass filters first. Where the crop is not larger than ``size`` (views
    drawn from the sample itself: a crop is never larger than the sample) antialiasing does
    nothing and the two agree to round-off. Measured on ``grace_hopper.jpg`` (matplotlib's sample
    image, 600x512, values in [0, 1]), 256 random boxes (scale 0.2 to 1, ratio 3/4 to 4/3) each,
    against ``resized_crop(..., antialias=True)`` of the same boxes:

    * from a 224x224 version of it to 224x224 (crops enlarged): mean absolute difference 2e-7,
      max 2e-5, the same as against ``antialias=False`` (round-off only);
    * from the full 600x512 image to 224x224 (crops shrunk 1 to 2.7x): mean 0.009, max 0.48;
      per-view channel means agree to 3e-4;
    * from a 96x96 version to 32x32 (shrunk 1.25 to 3x): mean 0.024, max 0.39; channel means to
      5e-3.

    The large differences are aliasing at sharp edges and fine texture of shrunk crops.

    Args:
        image: one ``(C, H, W)`` floating-point image (any device).
        boxes: ``(N, 4)`` integer ``(top, left, box_height, box_width)`` rows, e.g. from
            :func:`sample_crop_boxes`, within the image.
        size: the output ``(height, width)``.
        flips: ``(N,)`` bool, mirror the view left-right (default: no flips).

    Returns:
        ``(N, C, size[0], size[1])``, the image's dtype and device.

    Examples::

        >>> boxes = torch.tensor([[0, 0, 64, 64], [10, 20, 100, 80]])
        >>> views = crop_resize_flip(image, boxes, (32, 32), flips=torch.tensor([False, True]))
        >>> views.shape                                   # (2, C, 32, 32)
    """
    if image.dim() != 3:
        raise ValueError(f"crop_resize_flip takes one (C, H, W) image, got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"crop_resize_flip needs a floating-point image, got {image.dtype}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) rows of (top, left, height, width), got shape {tuple(boxes.shape)}")
    channels, height, width = image.shape
    out_h, out_w = _size_pair(size, "size")
    count = boxes.shape[0]
    if count == 0:
        return image.new_empty(0, channels, out_h, out_w)
    xs, ys = _grid_axes(boxes, flips, (out_h, out_w), (height, width), image.dtype, image.device)
    return _sample_views(image, xs, ys)


def _grid_axes(
    boxes: Tensor,
    flips: Optional[Tensor],
    size: Tuple[int, int],
    image_size: Tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> Tuple[Tensor, Tensor]:
    """The separable sampling grid of the views: ``(N, out_w)`` normalized x and ``(N, out_h)``
    normalized y coordinates (computed in float64, returned in ``dtype``)."""
    (out_h, out_w), (height, width) = size, image_size
    top, left, box_h, box_w = boxes.to(device=device, dtype=torch.float64).unbind(1)
    xs = _axis_coords(left, box_w, out_w, width)  # (N, out_w) normalized x per view
    ys = _axis_coords(top, box_h, out_h, height)  # (N, out_h) normalized y per view
    if flips is not None:
        flips = flips.to(device=device, dtype=torch.bool)
        xs = torch.where(flips[:, None], xs.flip(1), xs)
    return xs.to(dtype), ys.to(dtype)


def _sample_views(image: Tensor, xs: Tensor, ys: Tensor, grid: Optional[Tensor] = None) -> Tensor:
    """One ``grid_sample`` of ``image`` (``(C, H, W)``) on the grids ``xs`` x ``ys`` of
    :func:`_grid_axes`, the grid built in ``grid`` (a reusable ``(>= N, out_h, out_w, 2)`` buffer)
    when given."""
    count, out_h, out_w = xs.shape[0], ys.shape[1], xs.shape[1]
    if grid is None:
        grid = torch.empty(count, out_h, out_w, 2, dtype=xs.dtype, device=xs.device)
    grid = grid[:count]
    grid[..., 0].copy_(xs[:, None, :])
    grid[..., 1].copy_(ys[:, :, None])
    return F.grid_sample(
        image[None].expand(count, *image.shape), grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def _axis_coords(start: Tensor, extent: Tensor, out: int, full: int) -> Tensor:
    """Normalized grid coordinates (``align_corners=False``) of ``out`` samples over the pixels
    ``[start, start + extent)`` of an axis of ``full`` pixels, clamped to those pixels' centres."""
    steps = torch.arange(out, dtype=torch.float64, device=start.device) + 0.5
    pixel = start[:, None] + steps[None, :] * (extent / out)[:, None] - 0.5
    pixel = torch.minimum(torch.maximum(pixel, start[:, None]), (start + extent - 1)[:, None])
    return (2 * pixel + 1) / full - 1


# --------------------------------------------------------------------------- colour jitter
#
# Each operation has an in-place kernel working on reusable scratch planes (``_Scratch``): on the
# CPU, elementwise operations on buffers that stay in cache are markedly faster than the same
# operations each allocating a fresh output (the hue shift of 4 to 8 views at 224x224: 0.3 ms
# a view against 0.5, measured), so :meth:`DefaultAugmentation.render` keeps a few ``(views, H,
# W)`` planes for its chunks of views and reuses them. The public ``adjust_*_batch`` functions
# wrap the kernels with fresh buffers.


class _Scratch:
    """Reusable buffers for the colour kernels: ``planes`` ``(n, H, W)`` and an ``(n, C, H, W)``
    image, sliced to the first ``n`` views of each chunk."""

    def __init__(self, count: int, channels: int, height: int, width: int, dtype: torch.dtype, device: torch.device):
        self._planes = [torch.empty(count, height, width, dtype=dtype, device=device) for _ in range(7)]
        self._image = torch.empty(count, channels, height, width, dtype=dtype, device=device)
        self.grid = torch.empty(count, height, width, 2, dtype=dtype, device=device)  # for _sample_views

    def planes(self, n: int) -> List[Tensor]:
        return [p[:n] for p in self._planes]

    def image(self, n: int) -> Tensor:
        return self._image[:n]


def _per_image(factor: Union[Tensor, float], images: Tensor) -> Tensor:
    """``factor`` as a tensor broadcasting per image over ``images`` (a number stays 0-d)."""
    factor = torch.as_tensor(factor, dtype=images.dtype, device=images.device)
    return factor.reshape(-1, *([1] * (images.dim() - 1))) if factor.dim() else factor


def _grayscale_into(images: Tensor, out: Tensor) -> Tensor:
    """torchvision's ``rgb_to_grayscale`` of ``(N, 3, H, W)`` into the ``(N, H, W)`` plane ``out``."""
    r, g, b = images.unbind(1)
    torch.mul(r, _GRAY_WEIGHTS[0], out=out)
    return out.add_(g, alpha=_GRAY_WEIGHTS[1]).add_(b, alpha=_GRAY_WEIGHTS[2])


def _brightness_(images: Tensor, factors: Tensor, scratch: _Scratch) -> Tensor:
    return images.mul_(_per_image(factors, images)).clamp_(0, 1)


def _contrast_(images: Tensor, factors: Tensor, scratch: _Scratch) -> Tensor:
    ratio = _per_image(factors, images)
    if images.shape[1] == 3:
        mean = _grayscale_into(images, scratch.planes(images.shape[0])[0]).mean(dim=(1, 2))
    else:
        mean = images.mean(dim=(1, 2, 3))
    mean = _per_image(mean, images)
    return images.mul_(ratio).add_(mean * (1 - ratio)).clamp_(0, 1)


def _saturation_(images: Tensor, factors: Tensor, scratch: _Scratch) -> Tensor:
    if images.shape[1] != 3:  # torchvision: one-channel images are left alone
        return images
    ratio = _per_image(factors, images)
    gray = _grayscale_into(images, scratch.planes(images.shape[0])[0])
    gray.mul_(1 - ratio.reshape(ratio.shape[0], 1, 1) if ratio.dim() else 1 - ratio)
    return images.mul_(ratio).add_(gray.unsqueeze(1)).clamp_(0, 1)


def _hue_into(images: Tensor, factors: Union[Tensor, float], scratch: _Scratch) -> Tensor:
    """The hue shift of ``images`` (``(N, 3, H, W)`` in [0, 1]) into ``scratch.image``: the kernel
    of :func:`adjust_hue_batch`, on reusable buffers, inputs untouched."""
    if images.shape[1] != 3:
        return images
    n = images.shape[0]
    out = scratch.image(n)
    maxc, minc, chroma, t1, t2, t3, t4 = scratch.planes(n)
    shift = torch.as_tensor(factors, dtype=images.dtype, device=images.device)
    shift = (shift.reshape(-1, 1, 1) if shift.dim() else shift) * 6  # turns to sextants
    r, g, b = images.unbind(1)
    torch.maximum(torch.maximum(r, g, out=maxc), b, out=maxc)
    torch.minimum(torch.minimum(r, g, out=minc), b, out=minc)
    torch.sub(maxc, minc, out=chroma)
    # The hue in sextants, as torchvision's _rgb_to_hsv: (g - b) / chroma where the maximum is red,
    # 2 + (b - r) / chroma where it is green (and not red), 4 + (r - g) / chroma where it is blue.
    # The cases as 0/1 float masks (max - channel is exactly 0 where the channel is the maximum),
    # several times faster on the CPU than boolean masks and torch.where: not_red = sign(max - r),
    # blue = not_red * sign(max - g), green = not_red - blue, red = 1 - not_red.
    not_red = torch.sub(maxc, r, out=t1).sign_()
    blue = torch.sub(maxc, g, out=t2).sign_().mul_(not_red)
    green = torch.sub(not_red, blue, out=t3)
    numerator = torch.sub(g, b, out=t4)
    numerator.addcmul_(not_red, numerator, value=-1)  # red * (g - b)
    numerator.addcmul_(green, torch.sub(b, r, out=out[:, 0]))  # the output planes as scratch
    numerator.addcmul_(blue, torch.sub(r, g, out=out[:, 1]))
    hue = torch.add(shift.expand_as(not_red), not_red.add_(blue), alpha=2, out=not_red)  # 2 green + 4 blue + shift
    # grey pixels (chroma 0) have numerator 0, so any positive divisor does
    hue.addcdiv_(numerator, torch.clamp_min(chroma, torch.finfo(images.dtype).tiny, out=t2))
    hue.add_(torch.div(hue, 6, out=t3).floor_(), alpha=-6)  # modulo 6 (torch.remainder is slower)
    # red = min + chroma * clamp(|hue - 3| - 1, 0, 1), green = min + chroma * clamp(2 - |hue - 2|, 0, 1),
    # blue = min + chroma * clamp(2 - |hue - 4|, 0, 1): torchvision's _hsv_to_rgb (v = max,
    # v * s = chroma) without its gather, one multiply-add per channel from min - chroma or max + chroma
    low, high = minc.sub_(chroma), maxc.add_(chroma)
    torch.addcmul(low, chroma, torch.sub(hue, 3, out=t4).abs_().clamp_(1, 2), out=out[:, 0])
    torch.addcmul(high, chroma, torch.sub(hue, 2, out=t4).abs_().clamp_(1, 2), value=-1, out=out[:, 1])
    torch.addcmul(high, chroma, hue.sub_(4).abs_().clamp_(1, 2), value=-1, out=out[:, 2])
    return out


def _fresh(images: Tensor) -> _Scratch:
    n, c, h, w = images.shape
    return _Scratch(n, c, h, w, images.dtype, images.device)


def _check_batch(images: Tensor, name: str) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} takes floating-point images (N, C, H, W), got {got}")


def adjust_brightness_batch(images: Tensor, factors: Union[Tensor, float]) -> Tensor:
    """torchvision's ``adjust_brightness`` with one factor per image: ``(images * factor).clamp(0, 1)``.

    Args:
        images: ``(N, C, H, W)`` floating point, values in [0, 1] (not modified).
        factors: ``(N,)`` non-negative factors (or one number for all).

    Examples::

        >>> adjust_brightness_batch(images, torch.tensor([0.5, 1.5]))   # two images, two factors
    """
    _check_batch(images, "adjust_brightness_batch")
    return _brightness_(images.clone(), torch.as_tensor(factors), _fresh(images[:0]))


def adjust_contrast_batch(images: Tensor, factors: Union[Tensor, float]) -> Tensor:
    """torchvision's ``adjust_contrast`` with one factor per image: a blend with the mean of the
    image's grayscale (of the image itself for one channel), clamped to [0, 1].

    Args:
        images: ``(N, 1 or 3, H, W)`` floating point, values in [0, 1] (not modified).
        factors: ``(N,)`` non-negative factors (or one number for all).

    Examples::

        >>> adjust_contrast_batch(images, torch.tensor([0.5, 1.5]))
    """
    _check_batch(images, "adjust_contrast_batch")
    return _contrast_(images.clone(), torch.as_tensor(factors), _fresh(images))


def adjust_saturation_batch(images: Tensor, factors: Union[Tensor, float]) -> Tensor:
    """torchvision's ``adjust_saturation`` with one factor per image: a blend with the image's
    grayscale, clamped to [0, 1]. One-channel images come back unchanged (as torchvision).

    Args:
        images: ``(N, 1 or 3, H, W)`` floating point, values in [0, 1] (not modified).
        factors: ``(N,)`` non-negative factors (or one number for all).

    Examples::

        >>> adjust_saturation_batch(images, torch.tensor([0.0, 2.0]))   # grey, then vivid
    """
    _check_batch(images, "adjust_saturation_batch")
    return _saturation_(images.clone(), torch.as_tensor(factors), _fresh(images))


def adjust_hue_batch(images: Tensor, factors: Union[Tensor, float]) -> Tensor:
    r"""torchvision's ``adjust_hue`` with one factor per image: RGB to HSV, the hue shifted by the
    factor (in turns, modulo 1), back to RGB; vectorized over the batch, no per-image loop.

    The hue is computed in sextants ``[0, 6)`` as torchvision's ``_rgb_to_hsv`` does (from the
    channel maximum, the minimum and which channel is the maximum, here as 0/1 float masks rather
    than boolean ones, which are slow on the CPU), shifted by ``6 * factor`` modulo 6, and the colour
    rebuilt from ``max``, ``min`` and ``chroma = max - min`` (torchvision's value and
    ``value * saturation``) in closed form: ``red = min + chroma * clamp(|hue - 3| - 1, 0, 1)``,
    ``green = min + chroma * clamp(2 - |hue - 2|, 0, 1)``, ``blue = min + chroma * clamp(2 - |hue -
    4|, 0, 1)``, which is the piecewise ``(v, p, q, t)`` selection of torchvision's ``_hsv_to_rgb``
    without its gather. About 40 elementwise operations on ``(N, H, W)`` planes, no loop over
    images. Matches ``v2.functional.adjust_hue`` to ~1e-6 on random images in [0, 1] and on
    quantized ones (tested to 1e-5). Grey pixels (``max == min``) are unchanged; one-channel images
    come back unchanged (as torchvision).

    Args:
        images: ``(N, 3, H, W)`` floating point, values in [0, 1] (not modified).
        factors: ``(N,)`` hue shifts in [-0.5, 0.5] (or one number for all).

    Examples::

        >>> shifted = adjust_hue_batch(images, torch.tensor([0.1, -0.3]))
        >>> torch.allclose(shifted[0], v2.functional.adjust_hue(images[0], 0.1), atol=1e-5)
        True
    """
    _check_batch(images, "adjust_hue_batch")
    if images.shape[1] != 3:
        return images.clone()
    return _hue_into(images, factors, _fresh(images))


# op name -> kernel(images, factors, scratch) -> result (``images`` itself, or the scratch image)
_KERNELS: Dict[str, Callable[[Tensor, Tensor, _Scratch], Tensor]] = {
    "brightness": _brightness_,
    "contrast": _contrast_,
    "saturation": _saturation_,
    "hue": _hue_into,
}


# --------------------------------------------------------------------------- the augmentation


class ViewParams(NamedTuple):
    """The random draws behind a batch of views (see :meth:`DefaultAugmentation.draw`).

    Attributes:
        boxes: ``(count, 4)`` int64 ``(top, left, box_height, box_width)`` in the source's pixels.
        flips: ``(count,)`` bool, mirrored left-right.
        ops: the colour jitter operations in play (names from :data:`JITTER_OPS`, in that order).
        factors: each op's ``(count,)`` factors.
        order: ``(count, len(ops))`` int64: view ``n`` applies ``ops[order[n, 0]]`` first, then
            ``ops[order[n, 1]]``, ... (a uniform random permutation per view, as ``ColorJitter``).

    Examples::

        >>> params = DefaultAugmentation().draw(image, 4, torch.Generator().manual_seed(0))
        >>> top, left, h, w = params.boxes[0].tolist()
        >>> [params.ops[i] for i in params.order[0].tolist()]      # e.g. ['hue', 'brightness']
    """

    boxes: Tensor
    flips: Tensor
    ops: Tuple[str, ...]
    factors: Dict[str, Tensor]
    order: Tensor


class DefaultAugmentation:
    r"""SPADE's calibration views of a ``(C, H, W)`` image: random resized crop, horizontal flip
    and colour jitter, all views of a sample drawn at once (:meth:`views`).

    The defaults are those of SPADE's authors (1024 views per sample in the paper):
    ``RandomResizedCrop(scale=(0.2, 1.0), ratio=(3/4, 4/3))``, ``RandomHorizontalFlip(p=0.5)``,
    ``ColorJitter(brightness=0.5, hue=0.3)``. Each view is, in distribution, torchvision's
    ``v2.Compose([RandomResizedCrop(size, scale, ratio, antialias=False), RandomHorizontalFlip(),
    ColorJitter(brightness, contrast, saturation, hue)])`` of the image:

    * a crop box sampled as ``RandomResizedCrop`` does (10 attempts, then the central fallback;
      :func:`sample_crop_boxes`), cropped, resized to ``size`` (bilinear, **not antialiased**: see
      :func:`crop_resize_flip` for how far that is from torchvision's antialiased resize; it
      matters only when shrinking a full-resolution ``source``) and flipped with probability 1/2,
      all views by one ``grid_sample``;
    * colour jitter with per-view factors, ``b ~ U[max(0, 1 - brightness), 1 + brightness]`` and
      likewise for contrast and saturation, ``hue ~ U[-hue, hue]``, each applied by torchvision's
      formula (:func:`adjust_brightness_batch`, ...; the hue by a batched RGB→HSV→RGB shift), in
      an order permuted per view as ``ColorJitter`` does. A strength may also be a ``(min, max)``
      range of factors, as for ``ColorJitter``; 0 (or a range of just the neutral factor) turns
      the operation off.

    Works for inputs in any value range (normalized ImageNet inputs included): the colour jitter
    (torchvision's formulas assume values in [0, 1] and clamp to them) is applied to the image
    rescaled by the sample's own minimum and maximum, and the result mapped back, so the values
    stay within the sample's range. Saturation and hue jitter apply to 3-channel images,
    brightness and contrast to 1- and 3-channel images; other channel counts get the geometric
    part only (constant images too).

    All randomness comes from the generator given to :meth:`views` (no global state); calling the
    object (``augment(sample)``, one view, the protocol of any ``sample -> sample`` callable)
    draws from the global generator ``torch.default_generator``. The random stream is not
    torchvision's, so the views differ from a ``v2`` pipeline's under the same seed; their
    distribution is the same.

    Args:
        crop_scale: area fraction range of the crop (default ``(0.2, 1.0)``).
        ratio: aspect ratio range ``width / height`` of the crop (default ``(3/4, 4/3)``).
        flip: random horizontal flips with probability 1/2 (default True).
        brightness, contrast, saturation, hue: the ``ColorJitter`` strengths (default 0.5, 0, 0,
            0.3): a number ``s >= 0`` for factors in ``[max(0, 1 - s), 1 + s]`` (hue: ``[-s, s]``,
            ``s <= 0.5``), or a ``(min, max)`` range.
        size: the views' ``(height, width)`` (an int for square views); default None, the size of
            the image the views are drawn from, or the ``size`` given to :meth:`views` (as
            :func:`augmented_batch` does: the sample's size).

    Examples::

        >>> augment = DefaultAugmentation()                               # the paper's settings
        >>> views = augment.views(image, 1023, torch.Generator().manual_seed(0))   # (1023, C, H, W)
        >>> small = augment.views(full_res, 64, torch.Generator().manual_seed(0), size=(32, 32))
        >>> gentle = DefaultAugmentation(crop_scale=(0.5, 1.0), flip=False, hue=0.05)
        >>> SPADE(Saliency(model), augment=gentle).attribute(images, target=labels)
    """

    def __init__(
        self,
        crop_scale: Tuple[float, float] = (0.2, 1.0),
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        brightness: Union[float, Tuple[float, float]] = 0.5,
        contrast: Union[float, Tuple[float, float]] = 0.0,
        saturation: Union[float, Tuple[float, float]] = 0.0,
        hue: Union[float, Tuple[float, float]] = 0.3,
        size: Optional[Union[int, Tuple[int, int]]] = None,
    ) -> None:
        self.crop_scale = _range_pair(crop_scale, "crop_scale")
        self.ratio = _range_pair(ratio, "ratio")
        self.flip = bool(flip)
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self._ranges: Dict[str, Optional[Tuple[float, float]]] = {
            "brightness": _jitter_range(brightness, "brightness"),
            "contrast": _jitter_range(contrast, "contrast"),
            "saturation": _jitter_range(saturation, "saturation"),
            "hue": _jitter_range(hue, "hue", center=0.0, bound=(-0.5, 0.5), clip_first_on_zero=False),
        }
        self.size = None if size is None else _size_pair(size, "size")

    def __repr__(self) -> str:
        return (
            f"DefaultAugmentation(crop_scale={self.crop_scale}, ratio={self.ratio}, flip={self.flip}, "
            f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, "
            f"hue={self.hue}, size={self.size})"
        )

    def jitter_ops(self, channels: int) -> Tuple[str, ...]:
        """The colour jitter operations applied to an image of ``channels`` channels (names from
        :data:`JITTER_OPS`): brightness and contrast for 1 or 3 channels, saturation and hue for 3
        only, each if its strength is not zero.

        Examples::

            >>> DefaultAugmentation().jitter_ops(3), DefaultAugmentation().jitter_ops(1)
            (('brightness', 'hue'), ('brightness',))
        """
        allowed = JITTER_OPS if channels == 3 else JITTER_OPS[:2] if channels == 1 else ()
        return tuple(op for op in allowed if self._ranges[op] is not None)

    def draw(self, sample: Tensor, count: int, generator: Optional[torch.Generator] = None) -> ViewParams:
        """The random parameters of ``count`` views of ``sample`` (``(C, H, W)``), all drawn from
        ``generator`` in a fixed order (boxes, flips, each op's factors, the op orders), so that
        :meth:`views` is a function of the generator's state. Tensors on the generator's device.

        Examples::

            >>> params = DefaultAugmentation().draw(image, 8, torch.Generator().manual_seed(0))
            >>> params.boxes.shape, params.ops                       # (8, 4), ('brightness', 'hue')
        """
        _check_image(sample)
        count = _count(count)
        generator = torch.default_generator if generator is None else generator
        channels, height, width = sample.shape
        boxes = sample_crop_boxes(height, width, count, self.crop_scale, self.ratio, generator)
        options = dict(generator=generator, device=generator.device)
        if self.flip:
            flips = torch.rand(count, dtype=torch.float64, **options) < 0.5
        else:
            flips = torch.zeros(count, dtype=torch.bool, device=generator.device)
        ops = self.jitter_ops(channels)
        factors = {}
        for op in ops:
            low, high = self._ranges[op]
            factors[op] = low + (high - low) * torch.rand(count, dtype=torch.float64, **options)
        if len(ops) > 1:
            order = torch.rand(count, len(ops), dtype=torch.float64, **options).argsort(dim=1)
        else:
            order = torch.zeros(count, len(ops), dtype=torch.long, device=generator.device)
        return ViewParams(boxes, flips, ops, factors, order)

    def render(
        self,
        sample: Tensor,
        params: ViewParams,
        size: Optional[Union[int, Tuple[int, int]]] = None,
        *,
        out: Optional[Tensor] = None,
    ) -> Tensor:
        """The views of ``sample`` (``(C, H, W)``) that ``params`` (from :meth:`draw`) describe:
        ``(count, C, h, w)``, ``(h, w)`` = ``size``, else the object's ``size``, else the sample's.

        The views are computed in chunks of a few views (about a million output values per
        thread: one ``grid_sample``, then each colour operation on the whole chunk, on scratch
        buffers reused from chunk to chunk). With one or two colour operations (the paper's
        brightness and hue) the chunks follow the view order and both orders are one schedule:
        the first operation for the views that have it first, the second (the hue) for all, the
        first again for the others, each view skipping a step through the neutral factor 1 (an
        exact no-op); with three or four, the views are grouped by their order and each group is
        chunked. The parameters are all drawn already, so neither changes the result. Without
        autograd, in float32 (float64 for float64 samples). Returned in the sample's dtype
        (rounded for integer dtypes) on its device, or written into ``out`` (a ``(count, C, h,
        w)`` tensor on the sample's device, any dtype), which is returned.

        Examples::

            >>> augment = DefaultAugmentation()
            >>> views = augment.render(image, augment.draw(image, 8, torch.Generator().manual_seed(0)))
            >>> batch = torch.empty(9, *image.shape); batch[0] = image
            >>> _ = augment.render(image, augment.draw(image, 8, torch.Generator()), out=batch[1:])
        """
        _check_image(sample)
        channels = sample.shape[0]
        out_h, out_w = self._output_size(sample, size)
        count = params.boxes.shape[0]
        device = sample.device
        expected = (count, channels, out_h, out_w)
        if out is None:
            out = torch.empty(expected, dtype=sample.dtype, device=device)
        elif not isinstance(out, Tensor) or tuple(out.shape) != expected or out.device != device:
            got = f"{tuple(out.shape)} on {out.device}" if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"out must be a tensor of shape {expected} on {device}, got {got}")
        if count == 0:
            return out
        work = torch.float64 if sample.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            image = sample.detach().to(work)
            ops = params.ops
            low, span = image.min(), None
            if ops:
                high = image.max()
                span_value = float(high - low)
                if span_value > 0 and math.isfinite(span_value):
                    span = high - low
                    image = (image - low) / span  # grid_sample is convex: rescaling first is the same
            xs, ys = _grid_axes(params.boxes, params.flips, (out_h, out_w), sample.shape[1:], work, device)
            factors = {op: f.to(device=device, dtype=work) for op, f in params.factors.items()}
            # chunks of about _CHUNK_ELEMENTS output values per thread: each parallel operation
            # then gives every thread as much work as one thread gets alone (and fewer, larger
            # operations also suffer less when other processes compete for the cores)
            chunk = _CHUNK_ELEMENTS * (max(1, torch.get_num_threads()) if device.type == "cpu" else 16)
            step = max(1, chunk // max(1, channels * out_h * out_w))
            scratch = _Scratch(min(step, count), channels, out_h, out_w, work, device)
            if span is None:  # geometric views only
                for start in range(0, count, step):
                    stop = min(start + step, count)
                    _store(out[start:stop], None, _sample_views(image, xs[start:stop], ys[start:stop], scratch.grid))
                return out
            steps = _masked_steps(ops, params.order.cpu())
            if steps is not None:
                # one or two operations: every chunk in view order, the second operation of a view
                # whose order differs applied with the other's neutral factor 1 (exactly a no-op)
                for start in range(0, count, step):
                    stop = min(start + step, count)
                    batch = _sample_views(image, xs[start:stop], ys[start:stop], scratch.grid)
                    for op, which in steps:
                        chunk_factors = factors[op][start:stop]
                        if which is not None:
                            chosen = which[start:stop]
                            if not bool(chosen.any()):
                                continue
                            chunk_factors = torch.where(chosen.to(device), chunk_factors, 1.0)
                        batch = _KERNELS[op](batch, chunk_factors, scratch)
                    if steps[-1][0] == "hue":  # the others clamp; the hue is exact to round-off
                        batch.clamp_(0, 1)
                    _store(out[start:stop], None, batch, low, span)
                return out
            # three or four operations: the views grouped by their order of operations (all views at
            # once, so that chunks hold one order each), each chunk jittered as one batch
            groups, perm = _group_by_order(params.order.cpu(), len(ops), device)
            first = 0
            for sequence, group_size in groups:
                for start in range(first, first + group_size, step):
                    stop = min(start + step, first + group_size)
                    pick = slice(start, stop) if perm is None else perm[start:stop]
                    batch = _sample_views(image, xs[pick], ys[pick], scratch.grid)
                    for op_id in sequence:
                        batch = _KERNELS[ops[op_id]](batch, factors[ops[op_id]][pick], scratch)
                    if ops[sequence[-1]] == "hue":
                        batch.clamp_(0, 1)
                    if perm is None:
                        _store(out[pick], None, batch, low, span)
                    else:
                        _store(out, pick, batch, low, span)
                first += group_size
        return out

    def views(
        self,
        sample: Tensor,
        count: int,
        generator: torch.Generator,
        size: Optional[Union[int, Tuple[int, int]]] = None,
    ) -> Tensor:
        r"""``count`` random views of one ``(C, H, W)`` image, all at once: ``(count, C, h, w)``.

        ``(h, w)`` is ``size``, else the object's ``size``, else the sample's own: pass the
        full-resolution image as ``sample`` and the model's input size as ``size`` to draw the
        views as SPADE's authors do (crop boxes in full-resolution pixels, then resized; not
        antialiased, see :func:`crop_resize_flip`). The views are :meth:`render` of :meth:`draw`:
        the random parameters from ``generator`` only (the same generator state, the same views),
        then one ``grid_sample`` for crops, resizes and flips and batched colour jitter, in chunks
        of views. Values stay within the sample's ``[min, max]``; the dtype and device are the
        sample's.

        Args:
            sample: one image ``(C, H, W)``, any value range, any device.
            count: the number of views (0 gives an empty batch).
            generator: the source of all randomness, e.g. ``torch.Generator().manual_seed(0)``
                (a CPU generator; the parameters are moved to the sample's device).
            size: the views' ``(height, width)`` (an int for square views).

        Examples::

            >>> views = DefaultAugmentation().views(image, 1023, torch.Generator().manual_seed(0))
            >>> views.shape == (1023, *image.shape)
            True
            >>> DefaultAugmentation().views(full_res, 16, torch.Generator(), size=224).shape[-2:]
            torch.Size([224, 224])
        """
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        _check_image(sample)
        return self.render(sample, self.draw(sample, count, generator), size)

    def __call__(self, sample: Tensor) -> Tensor:
        """One random view of one ``(C, H, W)`` image (the object's ``size``, else the same shape),
        within its value range, drawn from the global generator: ``views(sample, 1,
        torch.default_generator)[0]``. :func:`augmented_batch` calls :meth:`views` instead.

        Examples::

            >>> DefaultAugmentation()(image).shape == image.shape
            True
        """
        return self.views(sample, 1, torch.default_generator)[0]

    def _output_size(self, sample: Tensor, size: Optional[Union[int, Tuple[int, int]]]) -> Tuple[int, int]:
        if size is not None:
            return _size_pair(size, "size")
        if self.size is not None:
            return self.size
        return int(sample.shape[1]), int(sample.shape[2])


def _masked_steps(ops: Tuple[str, ...], order: Tensor) -> Optional[List[Tuple[str, Optional[Tensor]]]]:
    """For one or two colour operations, the order of every view as one schedule of ``(op, which)``
    steps, ``which`` the views that apply ``op`` at that step (None: all): the second operation
    (the hue when there is one) in the middle for all views, the other before it for the views
    that have it first and after it for the others. The other is never the hue, so its neutral
    factor 1 for the views that skip a step is exactly the identity. None for more operations."""
    if len(ops) == 1:
        return [(ops[0], None)]
    if len(ops) != 2:
        return None
    middle = ops.index("hue") if "hue" in ops else 1
    other = 1 - middle
    first = order[:, 0] == other
    return [(ops[other], first), (ops[middle], None), (ops[other], ~first)]

def _group_by_order(
    order: Tensor, n_ops: int, device: torch.device
) -> Tuple[List[Tuple[List[int], int]], Optional[Tensor]]:
    """The views grouped by their colour-op order (rows of ``order``): ``([(sequence, size), ...],
    perm)``, the groups consecutive in ``perm``, each in increasing view order (None: one group,
    the views in their own order)."""
    if n_ops == 1 or order.shape[0] == 1:
        return [(order[0].tolist(), order.shape[0])], None
    distinct, inverse = torch.unique(order, dim=0, return_inverse=True)
    if distinct.shape[0] == 1:
        return [(distinct[0].tolist(), order.shape[0])], None
    sizes = torch.bincount(inverse, minlength=distinct.shape[0]).tolist()
    perm = torch.argsort(inverse, stable=True).to(device)
    return [(seq, size) for seq, size in zip(distinct.tolist(), sizes) if size], perm


def _store(
    target: Tensor, index: Optional[Tensor], batch: Tensor, low: Optional[Tensor] = None, span: Optional[Tensor] = None
) -> None:
    """``target[index[j]] = batch[j] * span + low`` (``target[j]`` when ``index`` is None; no
    mapping when ``span`` is None), cast to ``target``'s dtype (rounded for integers). Rows are
    written one by one with the mapping fused in (``torch.index_copy_`` is several times slower
    than a copy on the CPU), or by ``index_copy_`` when rows are small."""
    fused = target.dtype == batch.dtype
    rows = range(batch.shape[0]) if index is None else index.tolist()
    if span is not None and fused and (index is None or batch[0].numel() >= 4096):
        scale = float(span)
        if index is None:
            torch.add(low, batch, alpha=scale, out=target)
        else:
            for j, row in enumerate(rows):
                torch.add(low, batch[j], alpha=scale, out=target[row])
        return
    if span is not None:
        batch = torch.add(low, batch, alpha=float(span))
    if not target.is_floating_point() and not target.is_complex():
        batch = batch.round()
    batch = batch.to(target.dtype)
    if index is None:
        target.copy_(batch)
    elif batch[0].numel() >= 4096:
        for j, row in enumerate(rows):
            target[row].copy_(batch[j])
    else:
        target.index_copy_(0, index, batch)


def _check_image(sample: object) -> None:
    if not isinstance(sample, Tensor) or sample.dim() != 3:
        got = f"a sample of shape {tuple(sample.shape)}" if isinstance(sample, Tensor) else type(sample).__name__
        raise ValueError(
            f"the default augmentation is for images (C, H, W); got {got}. "
            "Pass augment= (a callable sample -> sample) for other inputs."
        )
    if sample.shape[1] < 1 or sample.shape[2] < 1:
        raise ValueError(f"the default augmentation needs a non-empty image, got shape {tuple(sample.shape)}")


def _count(count: object) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    return count


def _range_pair(value: object, name: str) -> Tuple[float, float]:
    if not isinstance(value, Sequence) or len(value) != 2 or not all(_is_number(v) for v in value):
        raise TypeError(f"{name} must be a (min, max) pair of numbers, got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not (0 < low <= high < math.inf):
        raise ValueError(f"{name} must be (min, max) with 0 < min <= max, got {value!r}")
    return low, high


def _size_pair(value: object, name: str) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(pair, torch.Size):
        pair = tuple(pair)
    if (
        not isinstance(pair, Sequence)
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)
    ):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair of positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _jitter_range(
    value: object,
    name: str,
    center: float = 1.0,
    bound: Tuple[float, float] = (0.0, math.inf),
    clip_first_on_zero: bool = True,
) -> Optional[Tuple[float, float]]:
    """``ColorJitter._check_input``: a strength or a range to a range of factors (None: off)."""
    if _is_number(value):
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value!r}")
        pair = [center - float(value), center + float(value)]
        if clip_first_on_zero:
            pair[0] = max(pair[0], 0.0)
    elif isinstance(value, Sequence) and len(value) == 2 and all(_is_number(v) for v in value):
        pair = [float(v) for v in value]
    else:
        raise TypeError(f"{name} must be a number or a (min, max) pair of numbers, got {value!r}")
    if not bound[0] <= pair[0] <= pair[1] <= bound[1]:
        raise ValueError(f"{name} factors must lie within {bound} and increase, got {tuple(pair)}")
    return None if pair[0] == pair[1] == center else (pair[0], pair[1])


# --------------------------------------------------------------------------- the calibration batch


def augmented_batch(
    inputs: Tuple[Tensor, ...],
    n_augmentations: int,
    augment: Optional[AugmentFn] = None,
    seed: Optional[int] = 0,
    source: Optional[Tensor] = None,
) -> Tuple[Tensor, ...]:
    """``n_augmentations`` rows per input: row 0 the sample itself, then random views of it.

    ``inputs`` holds one sample (batch size 1). ``augment`` (default :class:`DefaultAugmentation`,
    the paper's views) makes the views in one of two ways:

    * **batched**, when it has a ``views`` method (:class:`DefaultAugmentation` does) and there is
      a single input: one call ``augment.views(sample, n_augmentations - 1, generator, size=(H, W))``
      for all views (``size=`` only for a ``(C, H, W)`` sample: the sample's own size), which
      returns a ``(n_augmentations - 1, *sample.shape)`` tensor. ``generator`` is
      ``torch.Generator(device="cpu").manual_seed(seed)``: the global random state is left
      untouched and every sample gets the same random draws (so one sample's explanation does not
      depend on the others in its batch). ``seed=None`` seeds the generator from the global state
      (one ``torch.randint`` draw), so the global state advances and successive calls differ.
    * **one view per call** otherwise (any callable): for a single input ``augment`` gets the
      sample without its batch dimension and returns a tensor of the same shape; for a tuple of
      inputs it gets the tuple of samples and returns a tuple. With ``seed`` set the views are
      drawn from a fork of the CPU random state seeded with it (the global state untouched);
      ``seed=None`` draws from the global state.

    ``source`` is an optional full-resolution version of the (single, image) input sample,
    ``(1, C, H', W')`` or ``(C, H', W')``, with the sample's channels: the views are drawn from
    it (crop boxes in its pixels) and resized to the sample's ``(H, W)``, as SPADE's authors draw
    them from the full-resolution image; a per-view callable then gets the source and must return
    the sample's shape (e.g. a ``v2.RandomResizedCrop((H, W))``). Row 0 stays the sample. Without
    ``source`` the views are drawn from the sample itself.

    The views are cast to each sample's dtype and device.

    Examples::

        >>> (batch,) = augmented_batch((image[None],), 16, seed=0)
        >>> batch.shape                      # (16, C, H, W); batch[0] is the image itself
        >>> (batch,) = augmented_batch((image_32[None],), 1024, source=image_full_res)  # (1024, C, 32, 32)
        >>> pair = augmented_batch((x[:1], mask[:1]), 8, augment=lambda t: (t[0].flip(-1), t[1].flip(-1)))
    """
    if isinstance(n_augmentations, bool) or not isinstance(n_augmentations, int) or n_augmentations < 1:
        raise ValueError(f"n_augmentations must be a positive int, got {n_augmentations!r}")
    if augment is None:
        if len(inputs) != 1:
            raise ValueError(
                "the default augmentation handles a single image input; for a model with several inputs "
                "pass augment= (a callable taking and returning the tuple of samples)"
            )
        augment = DefaultAugmentation()
    samples = tuple(x[0] for x in inputs)
    origin = None if source is None else _source_sample(source, samples)
    count = n_augmentations - 1
    batched = getattr(augment, "views", None)
    if callable(batched) and len(samples) == 1:
        sample = samples[0]
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, (1,)).item())  # advances the global state
        generator = torch.Generator(device="cpu").manual_seed(seed)
        drawn_from = sample if origin is None else origin
        if (
            isinstance(augment, DefaultAugmentation)
            and type(augment).views is DefaultAugmentation.views
            and sample.dim() == 3
            and drawn_from.device == sample.device
        ):  # the same as the views call below, written straight into the batch (no copy)
            out = torch.empty(n_augmentations, *sample.shape, dtype=sample.dtype, device=sample.device)
            out[0] = sample
            params = augment.draw(drawn_from, count, generator)
            augment.render(drawn_from, params, size=(int(sample.shape[1]), int(sample.shape[2])), out=out[1:])
            return (out,)
        if sample.dim() == 3:
            views = batched(drawn_from, count, generator, size=(int(sample.shape[1]), int(sample.shape[2])))
        else:
            views = batched(drawn_from, count, generator)
        expected = (count, *sample.shape)
        if not isinstance(views, Tensor) or tuple(views.shape) != expected:
            got = tuple(views.shape) if isinstance(views, Tensor) else type(views).__name__
            raise ValueError(f"augment.views must return a tensor of shape {expected} (the views), got {got}")
        out = torch.empty(n_augmentations, *sample.shape, dtype=sample.dtype, device=sample.device)
        out[0] = sample
        out[1:] = views
        return (out,)
    drawn = samples if origin is None else (origin,)
    rows: List[List[Tensor]] = [[s] for s in samples]
    if seed is None:
        _draw(augment, drawn, samples, rows, count)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            _draw(augment, drawn, samples, rows, count)
    return tuple(torch.stack(r) for r in rows)


def _source_sample(source: object, samples: Sequence[Tensor]) -> Tensor:
    """The full-resolution source as ``(C, H', W')``, checked against the (single) sample."""
    if len(samples) != 1:
        raise ValueError(f"source= is the full-resolution version of a single image input; inputs hold {len(samples)}")
    if not isinstance(source, Tensor):
        raise TypeError(f"source must be a tensor (1, C, H', W') or (C, H', W'), got {type(source).__name__}")
    if source.dim() == 4:
        if source.shape[0] != 1:
            raise ValueError(
                f"source is the full-resolution version of the one input sample: batch size 1, got {source.shape[0]}"
            )
        source = source[0]
    elif source.dim() != 3:
        raise ValueError(f"source must be an image (1, C, H', W') or (C, H', W'), got shape {tuple(source.shape)}")
    sample = samples[0]
    if sample.dim() != 3:
        raise ValueError(
            f"source= needs an image input (1, C, H, W) to resize the views to; the sample has shape "
            f"{tuple(sample.shape)}"
        )
    if source.shape[0] != sample.shape[0]:
        raise ValueError(
            f"source has {source.shape[0]} channel(s) but the input sample has {sample.shape[0]}: "
            "it must be the same image at full resolution"
        )
    return source


def _draw(augment: AugmentFn, drawn: Sequence[Tensor], samples: Sequence[Tensor], rows: list, count: int) -> None:
    single = len(samples) == 1
    for _ in range(count):
        view = augment(drawn[0]) if single else augment(tuple(drawn))
        views = (view,) if single else view
        if not isinstance(views, (tuple, list)) or len(views) != len(samples):
            raise ValueError(f"augment must return {len(samples)} tensor(s), got {type(view).__name__}")
        for i, (v, s) in enumerate(zip(views, samples)):
            if not isinstance(v, Tensor) or v.shape != s.shape:
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"augment must keep the sample's shape {tuple(s.shape)}; input {i} came back as {got}")
            rows[i].append(v.to(device=s.device, dtype=s.dtype))
