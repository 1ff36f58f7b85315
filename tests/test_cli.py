"""The command line end to end: demo, and stats over a small local image folder (one process
and two under torchrun, gloo), with every error path answered in one clear line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from captum_paramsal import ParameterSaliency, SaliencyStats
from captum_paramsal.cli.main import main
from captum_paramsal.images import image_folder, stack_batch

from helpers import seeded_resnet18
from naive import rel_err


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of small generated images, and a resnet18 (2 classes) weights file."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / "images" / cls).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / cls / f"{i}.png")
    save_file(seeded_resnet18(num_classes=2, dtype=torch.float32).state_dict(), str(root / "resnet18.safetensors"))
    return root


def stats_args(folder, out, *extra):
    return ["stats", "--model", "resnet18", "--num-classes", "2", "--weights", str(folder / "resnet18.safetensors"),
            "--data", str(folder / "images"), "--image-size", "32", "--batch-size", "4", "--out", str(out),
            "--no-progress", *extra]


def reference_stats(folder, max_samples=None):
    from captum_paramsal.models import load_torchvision_model

    model = load_torchvision_model("resnet18", str(folder / "resnet18.safetensors"), num_classes=2)
    # the CLI's batches (4 images), so that the float32 per-sample values are the same
    loader = DataLoader(image_folder(str(folder / "images"), 32), batch_size=4, collate_fn=stack_batch)
    return ParameterSaliency(model).fit_stats(loader, progress=False, max_samples=max_samples)


def referenced_files_exist(report):
    html = report.read_text()
    sources = re.findall(r"src='([^']+)'|src=\"([^\"]+)\"", html)
    sources = [a or b for a, b in sources]
    assert sources, "the report shows no figures"
    for source in sources:
        assert (report.parent / source).read_bytes()[:4] == b"\x89PNG", source
    return html


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "report"), "--samples", "2", "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "misclassified" in out and out.count("z =") == 6
    assert "| 1 | salient |" in out
    report = tmp_path / "report" / "report.html"
    assert f"Report: {report}" in out
    html = referenced_files_exist(report)
    assert html.count("<section>") == 2 and "pruning_curves.png" in html and "IntegratedGradients" in html
    # the error groups: printed, and a section with one figure per group
    assert "Error groups" in out and "| group | samples |" in out
    assert "<h2>Error groups</h2>" in html and "figures/error_group0.png" in html


def test_explain_digits_images(tmp_path, capsys):
    from captum_paramsal.zoo import load_digits_model

    _, _, data = load_digits_model(with_stats=False)
    x, y = data.test_set()
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray((x[i, 0] * 255).round().byte().numpy()).save(paths[-1])
    labels = [str(int(v)) for v in y[:3]]
    assert main(["explain", "--model", "digits", "--images", *paths, "--labels", *labels,
                 "--out", str(tmp_path / "r")]) == 0
    assert "Report:" in capsys.readouterr().out
    html = referenced_files_exist(tmp_path / "r" / "report.html")
    assert html.count("<section>") >= 1


@pytest.mark.slow
def test_explain_torchvision_model_on_a_folder(folder, tmp_path, capsys):
    stats = tmp_path / "s.safetensors"
    assert main(stats_args(folder, stats)) == 0
    assert main(["explain", "--model", "resnet18", "--num-classes", "2", "--weights",
                 str(folder / "resnet18.safetensors"), "--stats", str(stats), "--data", str(folder / "images"),
                 "--image-size", "32", "--max-samples", "2", "--out", str(tmp_path / "r")]) == 0
    html = referenced_files_exist(tmp_path / "r" / "report.html")
    assert html.count("<section>") == 2 and ("cat" in html or "dog" in html)


def test_explain_errors(folder, tmp_path, capsys):
    def error_of(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    images = str(folder / "images")
    one = str(folder / "images" / "cat" / "0.png")
    assert "--stats is required" in error_of(["explain", "--model", "resnet18", "--data", images])
    assert "image not found" in error_of(["explain", "--model", "digits", "--images", str(tmp_path / "x.png"),
                                          "--labels", "1"])
    assert "one --labels entry per image" in error_of(["explain", "--model", "digits", "--images", one])
    assert "class indices in [0, 10)" in error_of(["explain", "--model", "digits", "--images", one,
                                                   "--labels", "12", "--out", str(tmp_path / "r")])
    digits_stats = os.path.join(os.path.dirname(__import__("captum_paramsal").zoo.digits.__file__),
                                "digits_cnn_stats.safetensors")
    assert "statistics from another model" in error_of(
        ["explain", "--model", "resnet18", "--num-classes", "2", "--weights", str(folder / "resnet18.safetensors"),
         "--stats", digits_stats, "--data", images, "--image-size", "32", "--out", str(tmp_path / "r")])
    assert "statistics file not found" in error_of(["explain", "--model", "digits", "--stats",
                                                    str(tmp_path / "none.safetensors"), "--images", one,
                                                    "--labels", "1"])


@pytest.mark.slow
def test_stats_one_process_matches_fit_stats(folder, tmp_path, capsys):
    out = tmp_path / "stats.safetensors"
    assert main(stats_args(folder, out)) == 0
    assert str(out) in capsys.readouterr().out
    got, expected = SaliencyStats.load(str(out)), reference_stats(folder)
    assert got.count == expected.count == 10
    assert rel_err(got.mean, expected.mean) < 1e-10 and rel_err(got.std, expected.std) < 1e-10
    assert got.fingerprint == expected.fingerprint
    assert main(stats_args(folder, tmp_path / "four.safetensors", "--max-samples", "4")) == 0
    four = SaliencyStats.load(str(tmp_path / "four.safetensors"))
    assert four.count == 4 and rel_err(four.mean, reference_stats(folder, max_samples=4).mean) < 1e-10


@pytest.mark.slow
def test_stats_with_compiled_kernels_matches_fit_stats(folder, tmp_path):
    from captum_paramsal.per_sample import compiled

    out = tmp_path / "stats.safetensors"
    runs_before = compiled.run_counts().get("low_rank_abs_mean", 0)
    assert main(stats_args(folder, out, "--compile-kernels")) == 0
    # the compiled kernel ran, rather than a failed compilation falling back to the eager path
    assert compiled.run_counts().get("low_rank_abs_mean", 0) > runs_before
    got, expected = SaliencyStats.load(str(out)), reference_stats(folder)
    # float32, the sums over positions in another order than the eager matmul's
    assert got.count == expected.count
    assert rel_err(got.mean, expected.mean) < 1e-5 and rel_err(got.std, expected.std) < 1e-4


@pytest.mark.slow
def test_stats_under_torchrun_equals_one_process(folder, tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    assert main(stats_args(folder, one)) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
               "-m", "captum_paramsal", *stats_args(folder, two)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    a, b = SaliencyStats.load(str(one)), SaliencyStats.load(str(two))
    assert a.count == b.count == 10
    # each rank's batches hold other images than one process's, and a float32 network's
    # per-sample saliency moves with its batch at round-off level; the merge itself is exact
    # to 1e-10 (tests/test_stats.py, float64, 2 gloo processes)
    assert rel_err(b.mean, a.mean) < 1e-5 and rel_err(b.std, a.std) < 1e-5
    assert a.fingerprint == b.fingerprint


def test_stats_errors(folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.safetensors"

    def error_of(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    images = str(folder / "images")
    assert "image folder not found" in error_of(stats_args(folder, out)[:9] + ["--data", str(tmp_path / "nope"),
                                                                              "--out", str(out)])
    (tmp_path / "empty").mkdir()
    assert "no images in" in error_of(["stats", "--model", "resnet18", "--data", str(tmp_path / "empty"),
                                       "--out", str(out)])
    assert "unknown torchvision model 'resnet9000'" in error_of(["stats", "--model", "resnet9000", "--data", images,
                                                                 "--out", str(out)])
    assert "weights file not found" in error_of(["stats", "--model", "resnet18", "--weights", str(tmp_path / "w.pt"),
                                                 "--data", images, "--out", str(out)])
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    assert "cannot read weights file" in error_of(["stats", "--model", "resnet18", "--weights",
                                                   str(tmp_path / "bad.safetensors"), "--data", images,
                                                   "--out", str(out)])
    assert "does not fit resnet18" in error_of(["stats", "--model", "resnet18", "--weights",
                                                str(folder / "resnet18.safetensors"), "--data", images,
                                                "--out", str(out)])  # 1000 classes expected, the file has 2
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    assert "not in the local cache" in error_of(["stats", "--model", "resnet18", "--weights-name", "IMAGENET1K_V1",
                                                 "--data", images, "--out", str(out)])
    assert "output folder does not exist" in error_of(stats_args(folder, tmp_path / "no" / "s.safetensors"))
    assert "--batch-size must be at least 1" in error_of(stats_args(folder, out, "--batch-size", "0"))
    broken = tmp_path / "broken"
    (broken / "cls").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(broken / "cls" / "ok.png")
    (broken / "cls" / "truncated.png").write_bytes((broken / "cls" / "ok.png").read_bytes()[:20])
    err = error_of(["stats", "--model", "resnet18", "--data", str(broken), "--out", str(out), "--image-size", "32",
                    "--no-progress"])
    assert "cannot read image" in err and "truncated.png" in err
    assert not out.exists()


def test_help_of_each_subcommand(capsys):
    for command in ("demo", "stats", "explain"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"captum-paramsal {command}" in capsys.readouterr().out
