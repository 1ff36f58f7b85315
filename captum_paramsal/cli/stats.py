"""``captum-paramsal stats``: reference statistics of a torchvision model over an image folder.

One process, or one per GPU under ``torchrun``: each rank reads its own share of the images
(every ``world_size``-th, no repeats), the partial statistics are all-reduced, rank 0 writes
the file.
"""

from __future__ import annotations

import argparse
import os

import torch

from ._common import (
    add_model_arguments,
    add_overwrite_argument,
    check_at_least_one,
    check_device,
    check_output_file,
    check_torchvision_model,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "stats",
        help="fit standardization statistics of a torchvision model over an image folder",
        description="Fit ParameterSaliency reference statistics (each unit's mean and sample standard "
        "deviation of the saliency over the images; \"Standardization\" in the project's docs/METHOD.md) of a "
        "torchvision model over an image folder (root/<class>/<image>, labels from the class folders, in sorted "
        "order as torchvision's ImageFolder gives them) and write them as safetensors. Under torchrun, every "
        "process takes its own share of the images.",
    )
    add_model_arguments(parser, "torchvision model name, e.g. resnet50")
    parser.add_argument("--data", required=True, help="image folder: root/<class>/<image>")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    add_overwrite_argument(parser, "an existing --out file (else refused)")
    parser.add_argument("--image-size", type=int, default=224, help="centre-crop size (default 224)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--internal-batch-size", type=int, default=None, help="bound memory: samples per pass")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    parser.add_argument("--max-samples", type=int, default=None, help="use only the first N images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--compile-kernels", nargs="?", const="yes", default="auto", choices=("auto", "yes", "no"),
        help="reduce the low-rank layers with torch.compile'd kernels (seconds to compile, then faster passes): "
             "auto (the default) compiles once the eager passes have taken about what compiling costs; "
             "yes (or the bare flag) from the first batch; no never",
    )
    parser.set_defaults(run=run)


def _check(args: argparse.Namespace) -> torch.device:
    """Every check before any work (arguments, device, model name and input size, output
    path, image folder); the device."""
    check_at_least_one(args, ("image_size", "batch_size", "max_samples", "internal_batch_size", "num_classes"))
    if args.workers < 0:
        raise ValueError(f"--workers must be at least 0, got {args.workers}")
    device = check_device(args.device)
    check_output_file(args.out, args.overwrite)
    check_torchvision_model(args)
    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"image folder not found: {args.data}")
    return device


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from .._core.parameter_saliency import ParameterSaliency
    from ..images import image_folder, shard, stack_batch
    from ..models import load_torchvision_model

    device = _check(args)
    dataset = image_folder(args.data, args.image_size)  # refuses an empty folder before the model is built
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started_group = False
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started_group = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    try:
        model = load_torchvision_model(args.model, args.weights, args.weights_name, args.num_classes).to(device)
        loader = DataLoader(
            shard(dataset, rank, world, args.max_samples), batch_size=args.batch_size,
            num_workers=args.workers, collate_fn=stack_batch, pin_memory=device.type == "cuda",
        )
        ps = ParameterSaliency(model, compile_kernels={"auto": "auto", "yes": True, "no": False}[args.compile_kernels])
        stats = ps.fit_stats(
            loader, progress=not args.no_progress, internal_batch_size=args.internal_batch_size, shard=False
        )
        if rank == 0:
            stats.save(args.out)
            print(
                f"statistics of {args.model} over {stats.count} images of {args.data} "
                f"({ps.layout.num_columns} units in {len(ps.layout)} parameters, {world} process(es)) -> {args.out}"
            )
    finally:
        if started_group:
            dist.destroy_process_group()
    return 0


