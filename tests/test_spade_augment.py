"""SPADE's batched calibration views (captum_paramsal.spade.augment): the box sampler, the one
grid_sample crop/resize/flip and the batched colour kernels against torchvision, the views end to
end against torchvision's functional ops on the same parameters, seeds and the global random state,
the full-resolution ``source``, user callables, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import captum_paramsal.spade.augment as augment_module
from captum_paramsal.spade.augment import (
    DefaultAugmentation,
    adjust_brightness_batch,
    adjust_contrast_batch,
    adjust_hue_batch,
    adjust_saturation_batch,
    augmented_batch,
    crop_resize_flip,
    sample_crop_boxes,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def image():
    return torch.rand(3, 20, 24, generator=gen(1))


# --------------------------------------------------------------------------- shapes, seeds, state


def test_views_shapes_and_dtypes(image):
    augment = DefaultAugmentation()
    assert augment.views(image, 7, gen()).shape == (7, 3, 20, 24)
    assert augment.views(image, 5, gen(), size=(10, 12)).shape == (5, 3, 10, 12)
    assert augment.views(image, 2, gen(), size=16).shape == (2, 3, 16, 16)
    assert DefaultAugmentation(size=(8, 9)).views(image, 3, gen()).shape == (3, 3, 8, 9)
    assert augment.views(image, 0, gen()).shape == (0, 3, 20, 24)
    assert augment(image).shape == image.shape  # one view, the old protocol
    assert augment.views(image.double(), 3, gen()).dtype == torch.float64
    grey = torch.randint(0, 256, (1, 12, 12), dtype=torch.uint8, generator=gen(2))
    views = augment.views(grey, 4, gen())
    assert views.dtype == torch.uint8 and int(views.min()) >= int(grey.min()) and int(views.max()) <= int(grey.max())
    assert augment.jitter_ops(3) == ("brightness", "hue") and augment.jitter_ops(1) == ("brightness",)
    assert augment.jitter_ops(4) == ()
    assert DefaultAugmentation(contrast=0.2, saturation=(0.5, 1.5)).jitter_ops(3) == tuple(augment_module.JITTER_OPS)
    assert "crop_scale=(0.2, 1.0)" in repr(augment) and "hue=0.3" in repr(augment)


def test_paper_defaults():
    augment = DefaultAugmentation()
    assert augment.crop_scale == (0.2, 1.0) and augment.ratio == (3 / 4, 4 / 3) and augment.flip
    assert (augment.brightness, augment.contrast, augment.saturation, augment.hue) == (0.5, 0.0, 0.0, 0.3)
    params = augment.draw(torch.rand(3, 32, 32), 4000, gen(3))
    b, h = params.factors["brightness"], params.factors["hue"]
    assert float(b.min()) >= 0.5 and float(b.max()) <= 1.5 and abs(float(b.mean()) - 1.0) < 0.02
    assert float(h.min()) >= -0.3 and float(h.max()) <= 0.3 and abs(float(h.mean())) < 0.01
    # a uniform random order of the two operations per view
    assert abs(float((params.order[:, 0] == 0).double().mean()) - 0.5) < 0.03


def test_determinism_and_the_global_random_state():
    x = torch.randn(1, 3, 16, 16, generator=gen(8))  # normalized-like values
    state = torch.get_rng_state()
    first = augmented_batch((x,), 12, seed=3)[0]
    assert torch.equal(torch.get_rng_state(), state)  # a seed leaves the global state alone
    assert first.shape == (12, 3, 16, 16)
    assert torch.equal(first[0], x[0])  # row 0 is the sample itself
    assert torch.equal(augmented_batch((x,), 12, seed=3)[0], first)
    assert not torch.equal(augmented_batch((x,), 12, seed=4)[0], first)
    # the same generator state, the same views; augmented_batch is DefaultAugmentation.views behind row 0
    torch.testing.assert_close(first[1:], DefaultAugmentation().views(x[0], 11, gen(3)), rtol=0, atol=0)
    # seed=None: drawn from the global state, which advances, so successive calls differ
    torch.manual_seed(5)
    a = augmented_batch((x,), 6, seed=None)[0]
    b = augmented_batch((x,), 6, seed=None)[0]
    assert not torch.equal(a, b)
    torch.manual_seed(5)
    torch.testing.assert_close(augmented_batch((x,), 6, seed=None)[0], a, rtol=0, atol=0)
    # __call__ draws from the global generator
    torch.manual_seed(6)
    one = DefaultAugmentation()(x[0])
    torch.manual_seed(6)
    torch.testing.assert_close(DefaultAugmentation()(x[0]), one, rtol=0, atol=0)


def test_value_range_is_kept():
    x = torch.randn(1, 3, 16, 16, generator=gen(9)) * 2 + 1
    contrasty = DefaultAugmentation(brightness=0.9, contrast=0.8, saturation=0.8, hue=0.5)
    for augment in (None, contrasty):
        views = augmented_batch((x,), 64, augment=augment, seed=0)[0]
        assert float(views.min()) >= float(x.min()) and float(views.max()) <= float(x.max())
        assert not torch.allclose(views[1], x[0])


def test_channel_counts_and_constant_images():
    grey = torch.rand(1, 1, 10, 10, generator=gen(2))
    assert augmented_batch((grey,), 4)[0].shape == (4, 1, 10, 10)
    four = torch.rand(1, 4, 6, 6, generator=gen(3))  # geometric views only
    still = DefaultAugmentation(crop_scale=(1.0, 1.0), flip=False)
    torch.testing.assert_close(augmented_batch((four,), 3, augment=still)[0], four.expand(3, 4, 6, 6))
    flat = torch.full((1, 3, 8, 8), 0.25)
    torch.testing.assert_close(augmented_batch((flat,), 5)[0], flat.expand(5, 3, 8, 8))


@pytest.mark.parametrize("jitter", [{}, {"contrast": 0.4, "saturation": 0.4}])  # two, four operations
def test_chunking_and_grouping_do_not_change_the_views(monkeypatch, jitter):
    x = torch.rand(3, 12, 14, generator=gen(4))
    augment = DefaultAugmentation(**jitter)
    whole = augment.views(x, 50, gen(7))
    monkeypatch.setattr(augment_module, "_CHUNK_ELEMENTS", 3 * 12 * 14)  # one to a few views a chunk
    torch.testing.assert_close(augment.views(x, 50, gen(7)), whole, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- geometry


def test_flips_happen_half_the_time():
    x = torch.rand(3, 16, 16, generator=gen(5))
    mirror_only = DefaultAugmentation(crop_scale=(1.0, 1.0), brightness=0, hue=0)
    views = mirror_only.views(x, 400, gen(11))
    same = (views - x).abs().flatten(1).amax(1) < 1e-5
    flipped = (views - x.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert bool((same ^ flipped).all())  # every view is the image or its mirror
    assert 0.4 < float(flipped.double().mean()) < 0.6  # Binomial(400, 1/2): 4 standard deviations
    assert not DefaultAugmentation(crop_scale=(1.0, 1.0), flip=False).draw(x, 50, gen()).flips.any()


def test_crop_boxes_within_scale_and_ratio():
    height, width = 1000, 800
    boxes = sample_crop_boxes(height, width, 4000, generator=gen(12))
    top, left, h, w = boxes.unbind(1)
    assert boxes.dtype == torch.int64
    assert bool((top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all())
    area = (h * w).double() / (height * width)
    ratio = w.double() / h.double()
    # no fallback at these sizes: areas in [0.2, 1] and ratios in [3/4, 4/3], up to rounding h and w
    assert float(area.min()) >= 0.2 * (1 - 5e-3) and float(area.max()) <= 1 + 5e-3
    assert float(ratio.min()) >= 0.75 * (1 - 5e-3) and float(ratio.max()) <= 4 / 3 * (1 + 5e-3)
    assert float(area.min()) < 0.22 and float(area.max()) > 0.9  # the whole range is drawn
    assert torch.equal(sample_crop_boxes(height, width, 4000, generator=gen(12)), boxes)  # seeded
    # small image: still within the image, areas within scale up to the rounding of h and w
    top, left, h, w = sample_crop_boxes(32, 32, 2000, generator=gen(13)).unbind(1)
    assert bool((top + h <= 32).all() and (left + w <= 32).all() and (h >= 1).all() and (w >= 1).all())
    assert float(((h + 0.5) * (w + 0.5)).min()) >= 0.2 * 32 * 32


def test_crop_boxes_distribution_matches_torchvision():
    boxes = sample_crop_boxes(64, 48, 3000, generator=gen(14))
    ours = (boxes[:, 2] * boxes[:, 3]).double().mean() / (64 * 48)
    crop = v2.RandomResizedCrop(16, scale=(0.2, 1.0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        theirs = [crop.make_params([torch.zeros(1, 64, 48)]) for _ in range(3000)]
    theirs = sum(p["height"] * p["width"] for p in theirs) / (3000 * 64 * 48)
    assert abs(float(ours) - theirs) < 0.02  # mean area fraction (~0.6, sd of a mean ~0.005)


@pytest.mark.parametrize("shape", [(4, 100), (100, 4)])
def test_crop_box_fallback_is_torchvisions_central_crop(shape):
    height, width = shape  # no candidate of area 1 fits: the fallback, the ratio clamped
    boxes = sample_crop_boxes(height, width, 5, scale=(1.0, 1.0), generator=gen())
    expected = v2.RandomResizedCrop(8, scale=(1.0, 1.0)).make_params([torch.zeros(1, height, width)])
    assert boxes.tolist() == [[expected["top"], expected["left"], expected["height"], expected["width"]]] * 5


def test_crop_resize_flip_matches_torchvision_resized_crop():
    x = torch.rand(3, 40, 48, generator=gen(15))
    boxes = torch.tensor([[0, 0, 40, 48], [3, 5, 17, 30], [10, 0, 30, 11], [39, 47, 1, 1], [7, 9, 25, 25]])
    for size in [(32, 32), (40, 48), (64, 80), (17, 23)]:
        flips = torch.tensor([False, True, False, True, True])
        got = crop_resize_flip(x, boxes, size, flips)
        for n, (top, left, h, w) in enumerate(boxes.tolist()):
            expected = TF.resized_crop(x, top, left, h, w, list(size), antialias=False)
            if flips[n]:
                expected = TF.horizontal_flip(expected)
            torch.testing.assert_close(got[n], expected, rtol=0, atol=1e-5)
    assert crop_resize_flip(x, boxes[:0], (8, 8)).shape == (0, 3, 8, 8)


# --------------------------------------------------------------------------- colour


def test_hue_shift_matches_torchvision():
    images = torch.rand(12, 3, 17, 23, generator=gen(16))
    quantized = torch.randint(0, 4, (12, 3, 9, 9), generator=gen(17)).float() / 3  # ties, greys, primaries
    factors = torch.rand(12, generator=gen(18)) - 0.5
    factors[:3] = torch.tensor([-0.5, 0.0, 0.5])
    for batch in (images, quantized):
        got = adjust_hue_batch(batch, factors)
        for n in range(12):
            torch.testing.assert_close(got[n], TF.adjust_hue(batch[n], float(factors[n])), rtol=0, atol=1e-5)
    torch.testing.assert_close(adjust_hue_batch(images, 0.25)[3], TF.adjust_hue(images[3], 0.25), rtol=0, atol=1e-5)
    before = images.clone()
    adjust_hue_batch(images, factors)
    assert torch.equal(images, before)  # inputs untouched
    grey = torch.rand(2, 1, 5, 5)
    assert torch.equal(adjust_hue_batch(grey, torch.tensor([0.2, 0.4])), grey)


def test_brightness_contrast_saturation_match_torchvision():
    images = torch.rand(6, 3, 11, 13, generator=gen(19))
    factors = torch.rand(6, generator=gen(20)) * 2
    for batched, single in (
        (adjust_brightness_batch, TF.adjust_brightness),
        (adjust_contrast_batch, TF.adjust_contrast),
        (adjust_saturation_batch, TF.adjust_saturation),
    ):
        got = batched(images, factors)
        for n in range(6):
            torch.testing.assert_close(got[n], single(images[n], float(factors[n])), rtol=0, atol=1e-6)
    grey = images[:, :1]
    for n, view in enumerate(adjust_contrast_batch(grey, factors)):
        torch.testing.assert_close(view, TF.adjust_contrast(grey[n], float(factors[n])), rtol=0, atol=1e-6)
    assert torch.equal(adjust_saturation_batch(grey, factors), grey)


JITTERS = {
    "paper": {},  # brightness and hue: one schedule for both orders
    "all four": {"contrast": 0.4, "saturation": 0.6},  # 24 orders: views grouped by order
    "no hue": {"hue": 0.0, "contrast": 0.5},
    "hue only": {"brightness": 0.0},
}


@pytest.mark.parametrize("jitter", sorted(JITTERS))
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_views_match_torchvision_on_the_same_parameters(scale, jitter):
    # every view by torchvision's functional ops, with the boxes, flips, factors and orders drawn
    x = torch.rand(3, 18, 22, generator=gen(21)) * scale - scale / 3  # not in [0, 1] for scale 4
    augment = DefaultAugmentation(**JITTERS[jitter])
    params = augment.draw(x, 40, gen(22))
    views = augment.render(x, params, size=(16, 20))
    low, span = x.min(), x.max() - x.min()
    kernels = {
        "brightness": TF.adjust_brightness,
        "contrast": TF.adjust_contrast,
        "saturation": TF.adjust_saturation,
        "hue": TF.adjust_hue,
    }
    orders = len({tuple(row) for row in params.order.tolist()})
    assert orders == math.factorial(len(params.ops)) if len(params.ops) < 4 else orders > 10  # of 24
    for n in range(40):
        top, left, h, w = params.boxes[n].tolist()
        expected = TF.resized_crop((x - low) / span, top, left, h, w, [16, 20], antialias=False)
        if params.flips[n]:
            expected = TF.horizontal_flip(expected)
        for op_id in params.order[n].tolist():
            op = params.ops[op_id]
            expected = kernels[op](expected, float(params.factors[op][n]))
        torch.testing.assert_close(views[n], expected.clamp(0, 1) * span + low, rtol=0, atol=2e-5 * scale)


# --------------------------------------------------------------------------- the full-resolution source


def test_views_from_a_full_resolution_source():
    source = torch.rand(1, 3, 96, 96, generator=gen(23))
    sample = TF.resize(source, [32, 32], antialias=True)
    batch = augmented_batch((sample,), 9, source=source, seed=2)[0]
    assert batch.shape == (9, 3, 32, 32) and torch.equal(batch[0], sample[0])
    expected = DefaultAugmentation().views(source[0], 8, gen(2), size=(32, 32))
    torch.testing.assert_close(batch[1:], expected, rtol=0, atol=0)
    torch.testing.assert_close(augmented_batch((sample,), 9, source=source[0], seed=2)[0], batch, rtol=0, atol=0)
    # the boxes are in the source's pixels: a box of the whole source is the sample's whole field of view
    whole = DefaultAugmentation(crop_scale=(1.0, 1.0), flip=False, brightness=0, hue=0)
    seen = augmented_batch((sample,), 2, augment=whole, source=source)[0][1]
    torch.testing.assert_close(seen, TF.resize(source[0], [32, 32], antialias=False), rtol=0, atol=1e-5)
    # a per-view callable gets the source and returns the sample's shape
    crop = v2.RandomResizedCrop(32, scale=(0.2, 1.0), antialias=True)
    assert augmented_batch((sample,), 4, augment=crop, source=source)[0].shape == (4, 3, 32, 32)


def test_source_errors():
    sample = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="source has 1 channel.*sample has 3"):
        augmented_batch((sample,), 3, source=torch.rand(1, 1, 24, 24))
    with pytest.raises(ValueError, match="batch size 1, got 2"):
        augmented_batch((sample,), 3, source=torch.rand(2, 3, 24, 24))
    with pytest.raises(ValueError, match="must be an image"):
        augmented_batch((sample,), 3, source=torch.rand(24, 24))
    with pytest.raises(TypeError, match="source must be a tensor"):
        augmented_batch((sample,), 3, source=[[0.0]])
    with pytest.raises(ValueError, match="single image input; inputs hold 2"):
        augmented_batch((sample, sample), 3, augment=lambda t: t, source=torch.rand(3, 24, 24))
    with pytest.raises(ValueError, match="needs an image input"):
        augmented_batch((torch.rand(1, 5),), 3, augment=lambda s: s, source=torch.rand(3, 24, 24))
    with pytest.raises(ValueError, match="keep the sample's shape"):
        augmented_batch((sample,), 3, augment=lambda s: s, source=torch.rand(3, 24, 24))


# --------------------------------------------------------------------------- other augmentations


def test_user_callables_and_tuples_still_work():
    x = torch.rand(1, 5)
    batch = augmented_batch((x,), 4, augment=lambda s: s + 1)[0]
    torch.testing.assert_close(batch, torch.cat([x, x + 1, x + 1, x + 1]))
    pair = augmented_batch((x, x * 2), 3, augment=lambda t: (t[0] * 0, t[1] * 0))
    assert pair[0].shape == (3, 5) and float(pair[1][1:].abs().sum()) == 0
    image = torch.rand(1, 3, 8, 8)
    state = torch.get_rng_state()
    noisy = augmented_batch((image,), 5, augment=lambda s: s + torch.rand(()), seed=1)[0]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(augmented_batch((image,), 5, augment=lambda s: s + torch.rand(()), seed=1)[0], noisy)
    composed = v2.Compose([v2.RandomResizedCrop(8, scale=(0.2, 1.0)), v2.RandomHorizontalFlip()])
    assert augmented_batch((image,), 6, augment=composed)[0].shape == (6, 3, 8, 8)


def test_an_object_with_views_is_called_once():
    calls = []

    class Shifts:
        def views(self, sample, count, generator, size=None):
            calls.append((count, size, isinstance(generator, torch.Generator)))
            return sample + torch.arange(1, count + 1, dtype=sample.dtype).view(-1, 1, 1, 1)

        def __call__(self, sample):
            raise AssertionError("the per-view call is not used when there is a views method")

    image = torch.zeros(1, 2, 4, 4)
    batch = augmented_batch((image,), 6, augment=Shifts())[0]
    assert calls == [(5, (4, 4), True)]
    assert batch[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]

    class Wrong(Shifts):
        def views(self, sample, count, generator, size=None):
            return sample[None]

    with pytest.raises(ValueError, match=r"augment.views must return a tensor of shape \(5, 2, 4, 4\)"):
        augmented_batch((image,), 6, augment=Wrong())


# --------------------------------------------------------------------------- bad input


def test_bad_input():
    image = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match="0 < min <= max"):
        DefaultAugmentation(crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="0 < min <= max"):
        DefaultAugmentation(crop_scale=(0.0, 1.0))
    with pytest.raises(TypeError, match="ratio must be a"):
        DefaultAugmentation(ratio=1.0)
    with pytest.raises(ValueError, match="hue factors must lie within"):
        DefaultAugmentation(hue=0.6)
    with pytest.raises(ValueError, match="brightness must be non-negative"):
        DefaultAugmentation(brightness=-0.1)
    with pytest.raises(TypeError, match="contrast must be a number"):
        DefaultAugmentation(contrast="0.2")
    with pytest.raises(ValueError, match="size must be a positive int"):
        DefaultAugmentation(size=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        DefaultAugmentation().views(image, 3, 0)
    with pytest.raises(ValueError, match="count must be a non-negative int"):
        DefaultAugmentation().views(image, -1, gen())
    with pytest.raises(ValueError, match="default augmentation is for images"):
        DefaultAugmentation().views(torch.rand(8, 8), 3, gen())
    with pytest.raises(ValueError, match="default augmentation is for images"):
        DefaultAugmentation()((image, image))
    with pytest.raises(ValueError, match="default augmentation is for images"):
        augmented_batch((torch.rand(1, 5),), 3)
    with pytest.raises(ValueError, match="single image input"):
        augmented_batch((torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4)), 3)
    with pytest.raises(ValueError, match="n_augmentations must be a positive int"):
        augmented_batch((torch.rand(1, 3, 4, 4),), 0)
    augment = DefaultAugmentation()
    with pytest.raises(ValueError, match="out must be a tensor of shape"):
        augment.render(image, augment.draw(image, 3, gen()), out=torch.empty(2, 3, 8, 8))
    with pytest.raises(ValueError, match="takes floating-point images"):
        adjust_hue_batch(torch.rand(3, 4, 4), 0.1)
    with pytest.raises(ValueError, match="must be a positive int"):
        sample_crop_boxes(0, 8, 3)
    assert math.isclose(DefaultAugmentation(brightness=(0.8, 1.2))._ranges["brightness"][1], 1.2)
