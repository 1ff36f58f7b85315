"""The README's Python examples run as written, each block on its own.

Every ```python block runs in a fresh interpreter (its own subprocess, in its own empty
folder), so a block that leans on an earlier block's imports or variables fails. A block the
README marks with an HTML comment on the line just before it,

    <!-- not run: REASON -->

is skipped, and the test says which block and why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import List, NamedTuple, Optional

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->")
# files a block writes by name: obj.save("f"), fig.savefig("f"), path="f"
WRITES = re.compile(r"""(?:\.save|\.savefig)\(\s*["']([^"']+)["']|\bpath\s*=\s*["']([^"']+)["']""")


class Block(NamedTuple):
    index: int
    line: int
    code: str
    skip_reason: Optional[str]

    @property
    def id(self) -> str:
        return f"block{self.index}-line{self.line}"


def python_blocks() -> List[Block]:
    with open(README) as f:
        text = f.read()
    blocks = []
    for index, match in enumerate(re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.fullmatch(before.strip())
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(index, line, match.group(1), marker.group(1) if marker else None))
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 5
    # every "not run" comment on a line of its own marks a python block: a misplaced one
    # (before a bash block, or a paragraph away from its block) would otherwise skip nothing, silently
    with open(README) as f:
        markers = sum(bool(NOT_RUN.fullmatch(line.strip())) for line in f)
    assert markers == sum(b.skip_reason is not None for b in BLOCKS), "a <!-- not run --> comment marks no block"


@pytest.mark.slow  # a fresh interpreter per block
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs_on_its_own(block, tmp_path):
    if block.skip_reason is not None:
        pytest.skip(f"README.md python block {block.index} (line {block.line}) is marked not run: {block.skip_reason}")
    script = tmp_path / f"readme_block_{block.index}.py"
    script.write_text(block.code)
    env = dict(os.environ, MPLBACKEND="Agg")
    done = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (
        f"README.md python block {block.index} (line {block.line}) failed on its own:\n{done.stderr[-4000:]}"
    )
    for written in (a or b for a, b in WRITES.findall(block.code)):
        assert (tmp_path / written).is_file(), f"block {block.index} should have written {written}"


def test_readme_claims_about_the_demo_model():
    """The README's example digit is corrected by turning off its most salient unit."""
    import torch

    from captum_paramsal import ParameterSaliency
    from captum_paramsal.interventions import turn_off
    from captum_paramsal.zoo import load_digits_model

    model, stats, data = load_digits_model()
    x, y = data.test_set()
    ps = ParameterSaliency(model, stats=stats)
    with torch.no_grad():
        assert int(y[172]) == 1 and int(model(x[172:173]).argmax(1)) == 8
        top = [(u.param, u.unit) for u in ps.profile(x[172:173], target=y[172:173]).top_k(1)[0]]
        with turn_off(model, top):
            assert int(model(x[172:173]).argmax(1)) == 1
