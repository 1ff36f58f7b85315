"""A short example: a torchvision ResNet-18 with random weights on a few generated images,
and each image's most salient filters."""

from __future__ import annotations

import math

import torch
import torchvision

from ._core.parameter_saliency import ParameterSaliency


def generated_images(count: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth coloured patterns (sums of random plane waves), one per image, in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    images = torch.zeros(count, 3, size, size)
    for _ in range(4):
        freq = torch.rand(count, 3, 2, generator=generator) * 6 * math.pi
        phase = torch.rand(count, 3, 1, 1, generator=generator) * 2 * math.pi
        wave = freq[..., 0, None, None] * xx + freq[..., 1, None, None] * yy
        images += torch.sin(wave + phase) / 4
    return images


def run_demo(num_images: int = 4, top_k: int = 5, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """Print each generated image's top-``top_k`` salient filters; return the saliency."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10).to(device)
    images = generated_images(num_images, seed=seed).to(device)
    saliency_method = ParameterSaliency(model)
    saliency = saliency_method.attribute(images)  # target=None: each image's predicted class
    with torch.no_grad():
        predicted = model.eval()(images).argmax(1)
    layout = saliency_method.layout
    print(
        f"ResNet-18 (random weights), {num_images} generated 64x64 images, "
        f"{layout.num_columns} filters/neurons in {len(layout)} layers.\n"
        "Saliency = mean |d loss / d weight| per filter, loss at the predicted class "
        "(raw; standardized z-scores need reference statistics)."
    )
    values, columns = saliency.topk(top_k, dim=1)
    for i in range(num_images):
        print(f"\nimage {i}: predicted class {int(predicted[i])}")
        for rank, (value, column) in enumerate(zip(values[i].tolist(), columns[i].tolist()), start=1):
            name, unit = layout.unit_of(column)
            print(f"  {rank}. {name:<28} unit {unit:>4}   saliency {value:.3e}")
    return saliency
