"""The ``captum-paramsal`` command line (also ``python -m captum_paramsal``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..experiments import trojan
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        # a user's mistake (a missing file, an unknown model, an unreadable image): one line
        print(f"captum-paramsal {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
