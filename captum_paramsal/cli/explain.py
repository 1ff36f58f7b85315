"""``captum-paramsal explain``: the demo's report for your own images, model and statistics."""

from __future__ import annotations

import argparse
import os

from ._common import add_model_arguments


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "explain",
        help="an HTML report for given images with their labels, a model and its statistics",
        description="Explain a model's decisions on given images: standardized parameter-saliency profiles, "
        "top salient units, parameter-guided input saliency next to Captum's Saliency and IntegratedGradients, "
        "and the turn-off test for the misclassified ones, in an HTML report. The model is a torchvision "
        "model by name (weights from a local file or a cached weights enum, statistics from 'captum-paramsal "
        "stats'), or 'digits', the embedded digits CNN with its own statistics.",
    )
    add_model_arguments(parser, "torchvision model name, or 'digits' for the embedded CNN")
    parser.add_argument("--stats", help="statistics file from 'captum-paramsal stats' (default for 'digits': its own)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="image folder root/<class>/<image>: labels from the class folders")
    source.add_argument("--images", nargs="+", help="image files (give --labels in the same order)")
    parser.add_argument("--labels", nargs="+", type=int, help="true class index of each of --images")
    parser.add_argument("--image-size", type=int, default=224, help="centre-crop size (default 224; digits: 8)")
    parser.add_argument("--max-samples", type=int, default=8, help="samples explained in the report (default 8)")
    parser.add_argument("--top-k", type=int, default=10, help="salient units per sample (default 10)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--out", default="paramsal-report", help="report folder (default ./paramsal-report)")
    parser.set_defaults(run=run)


def _load_images(args: argparse.Namespace, transform):
    import torch

    from ..images import _read_rgb, image_folder, stack_batch

    if args.data is not None:
        dataset = image_folder(args.data, transform=transform)
        count = min(len(dataset), 256)
        x, y = stack_batch([dataset[i] for i in range(count)])
        return x, y, list(dataset.classes)
    if not args.labels or len(args.labels) != len(args.images):
        raise ValueError(f"give one --labels entry per image: {len(args.images)} images, "
                         f"{len(args.labels or [])} labels")
    for path in args.images:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image not found: {path}")
    x = torch.stack([transform(_read_rgb(path)) for path in args.images])
    return x, torch.tensor(args.labels), None


def run(args: argparse.Namespace) -> int:
    import torch

    from .._core.parameter_saliency import ParameterSaliency
    from ..html_report import write_report
    from ..images import imagenet_transform
    from ..stats import SaliencyStats

    if args.max_samples < 1 or args.top_k < 1:
        raise ValueError("--max-samples and --top-k must be at least 1")
    device = torch.device(args.device)
    if args.model == "digits":
        from torchvision import transforms

        from ..zoo import load_digits_model

        model, stats, _ = load_digits_model()
        # the digits are 8x8 grey with values in [0, 1]: any image is shown to the model that way
        transform = transforms.Compose([transforms.Grayscale(), transforms.Resize((8, 8)), transforms.ToTensor()])
        low_percentile = 50.0
    else:
        from ..models import load_torchvision_model

        if args.stats is None:
            raise ValueError("--stats is required for a torchvision model (make it with 'captum-paramsal stats')")
        model = load_torchvision_model(args.model, args.weights, args.weights_name, args.num_classes)
        stats, transform, low_percentile = None, imagenet_transform(args.image_size), 90.0
    if args.stats is not None:
        if not os.path.isfile(args.stats):
            raise FileNotFoundError(f"statistics file not found: {args.stats}")
        stats = SaliencyStats.load(args.stats)
    model = model.to(device)
    x, y, classes = _load_images(args, transform)
    num_classes = model(x[:1].to(device)).shape[-1]
    if int(y.max()) >= num_classes or int(y.min()) < 0:
        raise ValueError(f"labels must be class indices in [0, {num_classes}), got {sorted(set(y.tolist()))}")
    ps = ParameterSaliency(model, stats=stats)  # refuses statistics of another model
    path = write_report(
        model, ps, x, y, args.out, classes=classes, title=f"Why {args.model} decides as it does on these images",
        max_samples=args.max_samples, k=args.top_k, low_percentile=low_percentile, noun="image",
    )
    print(f"Report: {os.path.abspath(path)}")
    return 0
