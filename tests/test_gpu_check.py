"""benchmarks/gpu_check.sh without a CUDA device: it says so, skips every step and exits 0.

The rehearsal (``--rehearse``, every step in its quickest CPU mode) takes minutes and is not
run here; the GPU run needs a GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = (
    "test_cuda",
    "bench_saliency",
    "bench_stats",
    "bench_input_saliency",
    "bench_transformers",
    "bench_spade_r20",
    "bench_spade_r50",
    "bench_pruning_curves",
)

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_gpu_check_without_cuda_skips_every_step(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("OUT", None)
    # from another folder: the script finds the repository itself
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert "torch.cuda.is_available(): False" in proc.stdout, text
    assert "no CUDA device" in proc.stdout, text

    summary = proc.stdout[proc.stdout.index("] summary (") :]
    rows = re.findall(r"^\s+(\d+)/(\d+) (\S+)\s+(.*?)\s*$", summary, flags=re.MULTILINE)
    assert [name for _, _, name, _ in rows] == list(STEPS), summary
    assert {total for _, total, _, _ in rows} == {str(len(STEPS))}
    for _, _, name, rest in rows:
        assert rest.startswith("skipped: no CUDA device"), (name, rest)
    # the summary is also written out, and no step left a table behind
    written = (out / "summary.txt").read_text()
    assert written.endswith(summary) and written in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["environment.txt", "summary.txt"]
