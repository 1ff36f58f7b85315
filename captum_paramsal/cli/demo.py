"""A short example: a torchvision ResNet-18 with random weights on a few generated images,
and each image's most salient filters."""

from __future__ import annotations

import math

import torch
import torchvision

from .._core.parameter_saliency import ParameterSaliency


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


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "demo",
        help="a ResNet-18 with random weights on generated images: each image's top salient filters",
        description="Run ParameterSaliency on a torchvision ResNet-18 with random weights and a few "
        "generated images, and print each image's most salient filters.",
    )
    parser.add_argument("--images", type=int, default=4, help="how many images (default 4)")
    parser.add_argument("--top-k", type=int, default=5, help="filters to list per image (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.set_defaults(run=run)


def run(args) -> int:
    if args.images < 1 or args.top_k < 1:
        raise ValueError("--images and --top-k must be at least 1")
    run_demo(num_images=args.images, top_k=args.top_k, seed=args.seed, device=args.device)
    return 0
