"""docs/RESULTS.md is shared by several experiments: each owns one marked section of it."""

from __future__ import annotations

import argparse
import os
import re
from typing import Callable, Optional, Sequence

from .._utils import atomic_write

HEADER = (
    "# Results\n\nWhat the experiments measure here, each written by its own command; "
    "regenerate a section by running that command again.\n"
)


def write_section(path: str, name: str, text: str) -> None:
    """Replace (or append) the section ``name`` of the Markdown file ``path`` with ``text``."""
    begin, end = f"<!-- begin: {name} -->", f"<!-- end: {name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    current = open(path).read() if os.path.exists(path) else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", flags=re.S)
    if pattern.search(current):
        updated = pattern.sub(lambda _: block, current)
    else:
        updated = current.rstrip() + "\n\n" + block
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, updated.encode())


def section_command(
    description: str,
    run: Callable[[str, bool], str],
    quick_help: str,
    argv: Optional[Sequence[str]] = None,
    print_text: bool = False,
) -> int:
    """The command line of an experiment that writes one section of RESULTS.md:
    ``--out`` (default docs) and ``--quick``, then ``run(out, quick)``; prints where it wrote
    (or, with ``print_text``, the section itself). Returns the exit status, 0."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default="docs", help="folder of RESULTS.md and figures/ (default docs)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args(argv)
    text = run(args.out, args.quick)
    wrote = f"wrote {os.path.join(args.out, 'RESULTS.md')} and {os.path.join(args.out, 'figures')}/"
    print(text if print_text else wrote)
    return 0
