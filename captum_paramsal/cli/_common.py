"""Arguments that several subcommands share."""

from __future__ import annotations

import argparse


def add_model_arguments(parser: argparse.ArgumentParser, model_help: str) -> None:
    """``--model`` and where its weights come from (never a download)."""
    parser.add_argument("--model", required=True, help=model_help)
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="local weights file (.safetensors, or a torch.save state dict)")
    weights.add_argument("--weights-name", help="torchvision weights enum, e.g. IMAGENET1K_V2 (must be cached)")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
