"""The ``captum-paramsal`` command line (also ``python -m captum_paramsal``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captum-paramsal",
        description="Parameter-space saliency: which of a network's parameters cause its mistakes.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="a ResNet-18 with random weights on generated images: each image's top salient filters",
        description="Run ParameterSaliency on a torchvision ResNet-18 with random weights and a few "
        "generated images, and print each image's most salient filters.",
    )
    demo.add_argument("--images", type=int, default=4, help="how many images (default 4)")
    demo.add_argument("--top-k", type=int, default=5, help="filters to list per image (default 5)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        if args.images < 1 or args.top_k < 1:
            print("error: --images and --top-k must be at least 1", file=sys.stderr)
            return 2
        run_demo(num_images=args.images, top_k=args.top_k, seed=args.seed, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
