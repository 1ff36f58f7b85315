"""Execute the tutorial notebooks in place, so that they are committed with their outputs.

    python tutorials/run_notebooks.py                  # every tutorials/*.ipynb
    python tutorials/run_notebooks.py 01 02_input...   # those whose file name starts so
    python tutorials/run_notebooks.py --small          # the quick sizes the tests use

Each notebook runs top to bottom in a fresh ``python3`` kernel of this interpreter (the
kernel spec's ``python`` is this script's ``sys.executable``, so run it with the project's
``.venv/bin/python``), with a time limit per cell, ``PYTHONHASHSEED=0`` and the notebooks'
own seeds, in a temporary working folder (files a notebook writes land there, not in the
repository). Outputs are written back into the notebook only when every cell succeeded; a
failing cell's traceback is printed and the notebook is left as it was.

So that the committed notebooks stay small, the kernel gets an IPython configuration of its
own (a temporary ``IPYTHONDIR``): inline figures are PNGs at ``DPI`` dots per inch. tqdm's
warning that ipywidgets is missing (progress bars are then plain text) is not recorded.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from typing import List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL = "python3"
DPI = 80
KERNEL_CONFIG = f"""\
c.InlineBackend.print_figure_kwargs = {{"bbox_inches": "tight", "dpi": {DPI}, "pil_kwargs": {{"optimize": True}}}}
c.IPKernelApp.exec_lines = ["__import__('warnings').filterwarnings('ignore', message='IProgress not found')"]
"""


def notebooks(names: Sequence[str] = ()) -> List[str]:
    """The tutorials' paths, all of them or those whose file name starts with one of ``names``."""
    paths = sorted(glob.glob(os.path.join(HERE, "*.ipynb")))
    if not names:
        return paths
    chosen = [p for p in paths if any(os.path.basename(p).startswith(n) for n in names)]
    missing = [n for n in names if not any(os.path.basename(p).startswith(n) for p in paths)]
    if missing:
        raise SystemExit(f"no tutorial notebook starts with {', '.join(missing)} (have: "
                         f"{', '.join(os.path.basename(p) for p in paths)})")
    return chosen


def execute(path: str, timeout: int = 600, small: bool = False, write: bool = True):
    """Run the notebook at ``path`` top to bottom; write it back with its outputs if ``write``.
    Returns the executed notebook (raises nbclient's ``CellExecutionError`` on a failing cell)."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("MPLBACKEND", None)  # the kernel's inline backend, whatever this shell uses
    if small:
        env["PARAMSAL_TUTORIAL_SMALL"] = "1"
    else:
        env.pop("PARAMSAL_TUTORIAL_SMALL", None)
    with tempfile.TemporaryDirectory(prefix="paramsal-tutorial-") as workdir:
        ipython_dir = os.path.join(workdir, ".ipython")
        os.makedirs(os.path.join(ipython_dir, "profile_default"))
        with open(os.path.join(ipython_dir, "profile_default", "ipython_kernel_config.py"), "w") as f:
            f.write(KERNEL_CONFIG)
        env["IPYTHONDIR"] = ipython_dir
        client = NotebookClient(
            notebook, timeout=timeout, kernel_name=KERNEL, record_timing=False,
            resources={"metadata": {"path": workdir}},
        )
        client.execute(env=env)
    if write:
        nbformat.write(notebook, path)
    return notebook


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("names", nargs="*", help="notebooks to run, by the start of their file name (default all)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    parser.add_argument("--small", action="store_true", help="PARAMSAL_TUTORIAL_SMALL=1: the tests' quick sizes")
    args = parser.parse_args(argv)
    from nbclient.exceptions import CellExecutionError

    failed = []
    for path in notebooks(args.names):
        started = time.perf_counter()
        name = os.path.relpath(path)
        try:
            execute(path, timeout=args.timeout, small=args.small)
        except CellExecutionError as error:
            print(f"{name}: FAILED, left unchanged\n{error}", file=sys.stderr)
            failed.append(name)
            continue
        print(f"{name}: executed in {time.perf_counter() - started:.0f} s, {os.path.getsize(path) / 1024:.0f} KiB")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
