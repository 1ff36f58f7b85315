"""``captum-paramsal explain``: the demo's report for your own images, model and statistics."""

from __future__ import annotations

import argparse
import os

from ._common import (
    add_model_arguments,
    add_overwrite_argument,
    check_at_least_one,
    check_device,
    check_labels,
    check_report_folder,
    check_torchvision_model,
    check_torchvision_name,
    make_room_for_report,
    read_stats,
)


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
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (by default one shows once the report has taken 3 s)")
    parser.add_argument("--out", default="paramsal-report",
                        help="report folder (default ./paramsal-report); an existing one is updated in place")
    add_overwrite_argument(parser, "an existing file at --out by the report folder (else refused)")
    parser.set_defaults(run=run)


def _check_image_arguments(args: argparse.Namespace) -> None:
    if args.data is not None:
        if args.labels is not None:
            raise ValueError("--labels goes with --images; with --data the labels are the class folders")
        if not os.path.isdir(args.data):
            raise FileNotFoundError(f"image folder not found: {args.data}")
        return
    if not args.labels or len(args.labels) != len(args.images):
        raise ValueError(f"give one --labels entry per image: {len(args.images)} images, "
                         f"{len(args.labels or [])} labels")
    for path in args.images:
        if os.path.isdir(path):
            raise ValueError(f"{path} is a folder, not an image (give a folder of class folders as --data)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image not found: {path}")


def _load_images(args: argparse.Namespace, transform):
    import torch

    from ..images import _read_rgb, image_folder, stack_batch

    if args.data is not None:
        dataset = image_folder(args.data, transform=transform)
        count = min(len(dataset), 256)
        x, y = stack_batch([dataset[i] for i in range(count)])
        return x, y, list(dataset.classes)
    x = torch.stack([transform(_read_rgb(path)) for path in args.images])
    return x, torch.tensor(args.labels), None


def run(args: argparse.Namespace) -> int:
    from .._core.parameter_saliency import ParameterSaliency
    from ..html_report import write_report
    from ..images import imagenet_transform

    # every check first (arguments, model name, device, output path, statistics, images): a
    # mistake is reported before any model is built
    check_at_least_one(args, ("max_samples", "top_k", "image_size", "num_classes"))
    _check_image_arguments(args)
    device = check_device(args.device)
    digits = args.model == "digits"
    if digits:
        from torchvision import transforms

        from ..zoo.digits import CLASSES

        for flag, value in (("--weights", args.weights), ("--weights-name", args.weights_name),
                            ("--num-classes", args.num_classes)):
            if value is not None:
                raise ValueError(f"{flag} does not apply to --model digits (the embedded CNN, with its own weights)")
        num_classes = len(CLASSES)
        # the digits are 8x8 grey with values in [0, 1]: any image is shown to the model that way
        transform = transforms.Compose([transforms.Grayscale(), transforms.Resize((8, 8)), transforms.ToTensor()])
        low_percentile = 50.0
    else:
        check_torchvision_name(args.model, or_digits=True)
        if args.stats is None:
            raise ValueError("--stats is required for a torchvision model (make it with 'captum-paramsal stats')")
        num_classes = check_torchvision_model(args)  # weights file, and whether it takes --image-size images
        transform, low_percentile = imagenet_transform(args.image_size), 90.0
    check_report_folder(args.out, args.overwrite)
    stats = read_stats(args.stats) if args.stats is not None else None
    x, y, classes = _load_images(args, transform)
    if num_classes is not None:
        check_labels(y, num_classes)

    if digits:
        from ..zoo import load_digits_model

        model, bundled, _ = load_digits_model(with_stats=stats is None)
        stats = bundled if stats is None else stats
    else:
        from ..models import load_torchvision_model

        model = load_torchvision_model(args.model, args.weights, args.weights_name, args.num_classes)
    model = model.to(device)
    if num_classes is None:  # not known before the model was built
        check_labels(y, model(x[:1].to(device)).shape[-1])
    ps = ParameterSaliency(model, stats=stats)  # refuses statistics of another model
    make_room_for_report(args.out)
    path = write_report(
        model, ps, x, y, args.out, classes=classes, title=f"Why {args.model} decides as it does on these images",
        max_samples=args.max_samples, k=args.top_k, low_percentile=low_percentile, noun="image",
        progress=False if args.no_progress else None,
    )
    print(f"Report: {os.path.abspath(path)}")
    return 0
