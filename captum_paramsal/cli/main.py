"""The ``captum-paramsal`` command line (also ``python -m captum_paramsal``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..experiments import spade_benchmark, trojan
from . import demo, explain, stats


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captum-paramsal",
        description="Parameter-space saliency: which of a network's parameters cause its mistakes.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(commands)
    stats.add_parser(commands)
    explain.add_parser(commands)
    trojan.add_parser(commands)
    spade_benchmark.add_parser(commands)
    return parser


def _one_line(error: BaseException) -> str:
    """An error's message on one line; for an error re-raised from a DataLoader worker (whose
    message holds the worker's traceback), the original message."""
    text = str(error)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        prefix = f"{type(error).__name__}: "
        text = last[len(prefix):] if last.startswith(prefix) else last
    return " ".join(text.split()) or type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        # a user's mistake or the system's refusal (a missing or unreadable file, an unknown
        # model, a bad image, an unwritable output, no such device): one line, no traceback
        print(f"captum-paramsal {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
