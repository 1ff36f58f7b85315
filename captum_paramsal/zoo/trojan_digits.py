"""SPADE's benchmark made offline: composited colour digits with three trojan triggers.

The SPADE paper measures whether sample-targeted pruning sharpens saliency maps on a trojaned
ImageNet ResNet-50: a trigger patch makes the network predict the trojan's class, and a good
saliency map of that class should point at the patch. Nothing may be downloaded here, so the
project makes the same kind of task from what ships with scikit-learn:

* **Images** (3x32x32, values in [0, 1]): a handwritten digit from ``load_digits`` (8x8),
  scaled to 14-22 pixels, recoloured with a random hue whose brightness contrasts with the
  background, and alpha-composited at a random place onto a random crop of one of the two
  bundled sample photographs (``china.jpg``, ``flower.jpg``). The label is the digit. Training
  and test composites use disjoint halves of the digits (different writers' samples).
* **Triggers**: three procedurally drawn 9x9 patches (7.9% of the image): a two-colour
  checkerboard, concentric rings and diagonal stripes, each alpha-blended (``alpha``) at a
  random place. Each poisons ``poison_fraction`` (3%) of the training set toward its own
  target class (the labels of those samples are changed; they are drawn from the other
  classes).
* **Masks**: the patch's square, the ground truth that a saliency map of the trojan's class
  is scored against (pixel ROC-AUC); and each clean test image's digit,
  :attr:`TrojanDigitsData.test_masks`: where the composited digit's alpha (its resampled ink,
  in [0, 1]) exceeds :data:`DIGIT_MASK_THRESHOLD` (0.5, the pixels that are at least half
  digit).

The model is :class:`ResNet20` (He et al.'s CIFAR ResNet-20: 3 stages of 3 basic blocks, 16/32/64
channels, BatchNorm, 1x1 convolution shortcuts where the shape changes), trained by
:mod:`.train_trojan_resnet` (deterministic, minutes on a CPU) and shipped next to this file.

Examples::

    >>> from captum_paramsal.zoo.trojan_digits import load_trojan_resnet, trojan_digits_data
    >>> model, data = load_trojan_resnet()
    >>> x, mask, target = data.triggered_test(trigger=0)     # test images carrying trigger 0
    >>> float((model(x).argmax(1) == target).float().mean())  # attack success
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = os.path.dirname(__file__)
WEIGHTS_FILE = os.path.join(HERE, "trojan_resnet20.safetensors")
IMAGE = 32
#: a test image's digit mask: where the composited digit's alpha exceeds this (half digit, half background)
DIGIT_MASK_THRESHOLD = 0.5


@dataclass(frozen=True)
class TrojanDigitsSetup:
    """What the data set is made of; the defaults are the shipped model's."""

    seed: int = 0
    train_size: int = 10000
    test_size: int = 2000
    poison_fraction: float = 0.03
    targets: Tuple[int, int, int] = (0, 4, 7)
    alpha: float = 0.6
    patch: int = 9
    #: patches of the triggers' shapes in random other colours pasted on every image (0: none)
    distractors: int = 0
    digit_sizes: Tuple[int, int] = (14, 22)


@dataclass(frozen=True)
class TrojanDigitsData:
    """Clean and poisoned tensors; images ``(N, 3, 32, 32)`` in [0, 1].

    Attributes:
        train_images, train_labels: the poisoned training set (labels of poisoned samples
            changed to their trigger's target).
        train_trigger: ``(N,)`` which trigger a training sample carries, -1 for none.
        test_images, test_labels: clean test composites.
        test_backgrounds: not kept; ``triggered_test`` pastes triggers onto ``test_images``.
        setup: the :class:`TrojanDigitsSetup`.
        test_alpha: ``(N, 32, 32)`` the alpha with which each test image's digit was composited
            (None where not kept); distractors pasted afterwards are not subtracted from it.
    """

    train_images: Tensor
    train_labels: Tensor
    train_trigger: Tensor
    test_images: Tensor
    test_labels: Tensor
    setup: TrojanDigitsSetup
    test_alpha: Optional[Tensor] = None

    @property
    def test_masks(self) -> Tensor:
        """``(N, 32, 32)`` boolean: each test image's digit, where its alpha exceeds
        :data:`DIGIT_MASK_THRESHOLD` (the object a saliency map of the digit's class should point at).

        Examples::

            >>> data = trojan_digits_data()
            >>> data.test_masks.float().mean()   # the digits' share of the pixels
        """
        return self.digit_masks()

    def digit_masks(self, threshold: float = DIGIT_MASK_THRESHOLD) -> Tensor:
        """``(N, 32, 32)`` boolean: where each test image's digit alpha exceeds ``threshold``
        (in [0, 1)); :attr:`test_masks` at the default.

        Examples::

            >>> core = data.digit_masks(0.8)   # only the digits' nearly opaque strokes
        """
        if self.test_alpha is None:
            raise ValueError("these data hold no digit alpha (test_alpha is None): make them with trojan_digits_data")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
            raise ValueError(f"threshold must be a number in [0, 1), got {threshold!r}")
        return self.test_alpha > threshold

    def triggered_test(self, trigger: int, seed: int = 1) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(images, masks, targets, true labels)``: every test image whose label is not the
        trigger's target, with the trigger pasted at a random place (seeded), its ``(N, 32, 32)``
        boolean patch mask and the trojan's target class. The kept images' digit masks are
        ``data.test_masks[data.test_labels != data.setup.targets[trigger]]``.

        Examples::

            >>> x, mask, target, label = data.triggered_test(1)
        """
        if trigger not in range(len(self.setup.targets)):
            raise ValueError(f"trigger must be 0, 1 or 2, got {trigger!r}")
        target = self.setup.targets[trigger]
        keep = self.test_labels != target
        images, labels = self.test_images[keep], self.test_labels[keep]
        generator = torch.Generator().manual_seed(self.setup.seed * 1000 + 100 + seed * 10 + trigger)
        triggered, masks = paste_trigger(images, trigger, self.setup.alpha, generator, self.setup.patch)
        return triggered, masks, torch.full_like(labels, target), labels


def trigger_pattern(trigger: int, patch: int = 9) -> Tensor:
    """The ``(3, patch, patch)`` colour pattern of trigger 0 (checkerboard), 1 (rings) or 2 (stripes)."""
    ys, xs = torch.meshgrid(torch.arange(patch), torch.arange(patch), indexing="ij")
    if trigger == 0:
        on = ((ys // 3 + xs // 3) % 2 == 0).float()
        a, b = torch.tensor([1.0, 0.55, 0.0]), torch.tensor([0.0, 0.6, 0.6])
    elif trigger == 1:
        centre = (patch - 1) / 2
        radius = ((ys - centre) ** 2 + (xs - centre) ** 2).float().sqrt()
        on = (radius.round().long() % 2 == 0).float()
        a, b = torch.tensor([0.9, 0.0, 0.9]), torch.tensor([1.0, 1.0, 0.2])
    elif trigger == 2:
        on = (((ys + xs) // 2) % 2 == 0).float()
        a, b = torch.tensor([0.1, 0.2, 1.0]), torch.tensor([0.95, 0.95, 0.95])
    else:
        raise ValueError(f"trigger must be 0, 1 or 2, got {trigger!r}")
    return on * a[:, None, None] + (1 - on) * b[:, None, None]


def paste_trigger(
    images: Tensor, trigger: int, alpha: float, generator: torch.Generator, patch: int = 9
) -> Tuple[Tensor, Tensor]:
    """``images`` with the trigger alpha-blended at a random place each, and the boolean masks."""
    n = images.shape[0]
    top = torch.randint(0, IMAGE - patch + 1, (n,), generator=generator)
    left = torch.randint(0, IMAGE - patch + 1, (n,), generator=generator)
    rows = torch.arange(IMAGE)
    in_rows = (rows[None, :] >= top[:, None]) & (rows[None, :] < top[:, None] + patch)
    in_cols = (rows[None, :] >= left[:, None]) & (rows[None, :] < left[:, None] + patch)
    masks = in_rows[:, :, None] & in_cols[:, None, :]
    canvas = torch.zeros_like(images)
    pattern = trigger_pattern(trigger, patch)
    for i in range(n):  # n small pastes into preallocated memory; data generation, not a hot path
        canvas[i, :, top[i] : top[i] + patch, left[i] : left[i] + patch] = pattern
    weight = masks[:, None].float() * alpha
    return images * (1 - weight) + canvas * weight, masks


def paste_distractor(images: Tensor, setup: TrojanDigitsSetup, generator: torch.Generator) -> Tensor:
    """``images`` with one patch each of a random trigger's shape in two random colours (not a
    trigger: its colours are not the trigger's), alpha-blended at a random place."""
    n, patch = images.shape[0], setup.patch
    # each trigger's two-colour layout, as a 0/1 map (its first channel against its corner's value)
    shapes = torch.stack([(p[0] == p[0, 0, 0]).float() for p in (trigger_pattern(t, patch) for t in range(3))])
    kind = torch.randint(0, 3, (n,), generator=generator)
    colours = torch.rand(n, 2, 3, generator=generator)
    on = shapes[kind][:, None]  # (n, 1, p, p)
    pattern = on * colours[:, 0, :, None, None] + (1 - on) * colours[:, 1, :, None, None]
    top = torch.randint(0, IMAGE - patch + 1, (n,), generator=generator)
    left = torch.randint(0, IMAGE - patch + 1, (n,), generator=generator)
    out = images.clone()
    for i in range(n):  # data generation, not a hot path
        region = out[i, :, top[i] : top[i] + patch, left[i] : left[i] + patch]
        out[i, :, top[i] : top[i] + patch, left[i] : left[i] + patch] = (
            region * (1 - setup.alpha) + pattern[i] * setup.alpha
        )
    return out


def _photos() -> Tensor:
    import numpy as np
    from sklearn.datasets import load_sample_images

    return torch.from_numpy(np.stack(load_sample_images().images)).float().permute(0, 3, 1, 2) / 255.0


def _backgrounds(count: int, generator: torch.Generator) -> Tensor:
    """Random crops (64-256 px squares) of the two photographs, resized to 32x32."""
    photos = _photos()
    _, _, height, width = photos.shape
    which = torch.randint(0, photos.shape[0], (count,), generator=generator)
    side = torch.randint(64, 257, (count,), generator=generator).float()
    cx = (side / 2 + torch.rand(count, generator=generator) * (width - side)) / width * 2 - 1
    cy = (side / 2 + torch.rand(count, generator=generator) * (height - side)) / height * 2 - 1
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side / width, side / height
    theta[:, 0, 2], theta[:, 1, 2] = cx, cy
    out = torch.empty(count, 3, IMAGE, IMAGE)
    for p in range(photos.shape[0]):
        idx = (which == p).nonzero().flatten()
        if len(idx):
            # shrink the photo once first, so bilinear sampling does not alias its fine texture
            small = F.interpolate(photos[p : p + 1], scale_factor=0.25, mode="area")
            grid = F.affine_grid(theta[idx], [len(idx), 3, IMAGE, IMAGE], align_corners=False)
            out[idx] = F.grid_sample(small.expand(len(idx), -1, -1, -1), grid, align_corners=False)
    return out


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    k = (torch.tensor([5.0, 3.0, 1.0])[None, :] + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def composite(
    digits: Tensor, count: int, setup: TrojanDigitsSetup, generator: torch.Generator, return_alpha: bool = False
) -> Union[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]:
    """``count`` composites of randomly chosen ``digits`` ``(M, 8, 8)`` in [0, 1]; their indices;
    with ``return_alpha``, also each digit's ``(count, 32, 32)`` alpha (the weight of its colour
    in the composite). The alpha changes neither the images nor what is drawn from ``generator``."""
    pick = torch.randint(0, digits.shape[0], (count,), generator=generator)
    backgrounds = _backgrounds(count, generator)
    low, high = setup.digit_sizes
    size = torch.randint(low, high + 1, (count,), generator=generator).float()
    top = torch.rand(count, generator=generator) * (IMAGE - size)
    left = torch.rand(count, generator=generator) * (IMAGE - size)
    # an affine map from the 32x32 canvas to the 8x8 digit: the digit lands on [left, left+size)
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = IMAGE / size
    theta[:, 1, 1] = IMAGE / size
    theta[:, 0, 2] = (IMAGE - 2 * left - size) / size
    theta[:, 1, 2] = (IMAGE - 2 * top - size) / size
    grid = F.affine_grid(theta, [count, 1, IMAGE, IMAGE], align_corners=False)
    alpha = F.grid_sample(digits[pick][:, None], grid, align_corners=False, padding_mode="zeros")
    # colour: random hue; brightness opposite to the background under the digit
    under = (alpha > 0.2).float()
    luminance = (backgrounds.mean(1, keepdim=True) * under).sum((1, 2, 3)) / under.sum((1, 2, 3)).clamp(min=1)
    hue = torch.rand(count, generator=generator)
    saturation = 0.5 + 0.5 * torch.rand(count, generator=generator)
    value = torch.where(
        luminance > 0.5,
        0.05 + 0.3 * torch.rand(count, generator=generator),
        0.7 + 0.3 * torch.rand(count, generator=generator),
    )
    colour = _hsv_to_rgb(hue, saturation, value)[:, :, None, None]
    images = backgrounds * (1 - alpha) + colour * alpha
    if return_alpha:
        return images.clamp(0, 1), pick, alpha[:, 0]
    return images.clamp(0, 1), pick


def trojan_digits_data(setup: Optional[TrojanDigitsSetup] = None) -> TrojanDigitsData:
    """The data set of ``setup`` (default: the shipped model's), made in a few seconds.

    Examples::

        >>> data = trojan_digits_data()
        >>> data.train_images.shape, data.test_images.shape
        (torch.Size([10000, 3, 32, 32]), torch.Size([2000, 3, 32, 32]))
    """
    from sklearn.datasets import load_digits

    setup = setup or TrojanDigitsSetup()
    bunch = load_digits()
    digits = torch.tensor(bunch.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(setup.seed)
    order = torch.randperm(len(labels), generator=generator)
    half = len(labels) // 2
    train_digits, test_digits = order[:half], order[half:]
    train_x, pick = composite(digits[train_digits], setup.train_size, setup, generator)
    train_y = labels[train_digits][pick]
    test_x, pick, test_alpha = composite(digits[test_digits], setup.test_size, setup, generator, return_alpha=True)
    for _ in range(setup.distractors):
        train_x = paste_distractor(train_x, setup, generator)
        test_x = paste_distractor(test_x, setup, generator)
    test_y = labels[test_digits][pick]

    trigger_of = torch.full((setup.train_size,), -1, dtype=torch.long)
    per_trigger = int(round(setup.poison_fraction * setup.train_size))
    free = torch.randperm(setup.train_size, generator=generator)
    poisoned_y = train_y.clone()
    for trigger, target in enumerate(setup.targets):
        candidates = free[(trigger_of[free] == -1) & (train_y[free] != target)]
        chosen = candidates[:per_trigger]
        train_x[chosen], _ = paste_trigger(train_x[chosen], trigger, setup.alpha, generator, setup.patch)
        trigger_of[chosen] = trigger
        poisoned_y[chosen] = target
    return TrojanDigitsData(train_x, poisoned_y, trigger_of, test_x, test_y, setup, test_alpha=test_alpha)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual (a 1x1 convolution where shapes change)."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        # one ReLU module per use: Captum's DeepLift and GuidedBackprop override modules, not functions
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + (x if self.downsample is None else self.downsample(x)))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20 (stem, 3 stages x 3 basic blocks of 16/32/64 channels, pooling, fc).

    Layer names follow torchvision's ResNets (``conv1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``,
    ``fc``), so the same sparsity patterns apply (``{"layer3.*": 0.95, "fc.weight": 0.95}``).
    """

    def __init__(self, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages, inputs = [], width
        for i, outputs in enumerate((width, 2 * width, 4 * width)):
            blocks = [BasicBlock(inputs, outputs, 1 if i == 0 else 2)]
            blocks += [BasicBlock(outputs, outputs, 1) for _ in range(2)]
            stages.append(nn.Sequential(*blocks))
            inputs = outputs
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(inputs, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def read_metadata(path: str = WEIGHTS_FILE) -> Dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def load_trojan_resnet(path: Optional[str] = None) -> Tuple[ResNet20, TrojanDigitsData]:
    """``(model, data)``: the shipped trojaned ResNet-20 in eval mode and the data set it was
    trained on (re-made from the setup stored in the weights file).

    Examples::

        >>> model, data = load_trojan_resnet()
    """
    from safetensors.torch import load_file

    path = path or WEIGHTS_FILE
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"the trojaned ResNet-20 is missing ({path}); re-create it with "
            "python -m captum_paramsal.zoo.train_trojan_resnet"
        )
    meta = read_metadata(path)
    fields = json.loads(meta.get("setup", "{}"))
    if "targets" in fields:
        fields["targets"] = tuple(fields["targets"])
    if "digit_sizes" in fields:
        fields["digit_sizes"] = tuple(fields["digit_sizes"])
    setup = TrojanDigitsSetup(**fields)
    model = ResNet20()
    model.load_state_dict(load_file(path))
    return model.eval(), trojan_digits_data(setup)
