"""docs/RESULTS.md is shared by several experiments: each owns one marked section of it."""

from __future__ import annotations

import os
import re

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
