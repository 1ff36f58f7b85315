"""The command line's promise under misuse (issue 16, item 10): every mistake is one line on
stderr (``captum-paramsal <command>: error: ...``), a non-zero exit, no traceback, and it is
found before any work: no model built, no pass run, no report written.

"No work" is checked by replacing the functions that build models, run passes and write
reports by ones that fail the test when called."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from captum_paramsal import SaliencyStats
from captum_paramsal.cli.main import main


def one_line_error(capsys, argv):
    """Run the command line in-process: the error it prints, checked to be one line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0, f"{argv} succeeded"
    assert "Traceback" not in err, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"captum-paramsal {argv[0]}: error: "), err
    return lines[0]


def _forbidden(what):
    def call(*args, **kwargs):
        pytest.fail(f"{what} was called before the check that should have refused the command")
    return call


@pytest.fixture
def no_work(monkeypatch):
    """Building a model, fitting statistics or writing a report fails the test."""
    import captum_paramsal.html_report
    import captum_paramsal.models
    import captum_paramsal.zoo
    from captum_paramsal import ParameterSaliency

    monkeypatch.setattr(captum_paramsal.zoo, "load_digits_model", _forbidden("load_digits_model"))
    monkeypatch.setattr(captum_paramsal.models, "load_torchvision_model", _forbidden("load_torchvision_model"))
    monkeypatch.setattr(ParameterSaliency, "fit_stats", _forbidden("fit_stats"))
    monkeypatch.setattr(captum_paramsal.html_report, "write_report", _forbidden("write_report"))


@pytest.fixture
def no_folder_scan(monkeypatch):
    """For ``stats``: reading the image folder fails the test (its checks come first)."""
    import captum_paramsal.images

    monkeypatch.setattr(captum_paramsal.images, "image_folder", _forbidden("image_folder"))


def _png_header_bomb(path, width=20000, height=20000):
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels: 50 KB on disk, 400 million
    pixels declared (PIL refuses it as a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small image, an image folder (2 classes, 1 image each), a decompression bomb, a
    non-image file, and digits statistics whose metadata lacks the fingerprint."""
    root = tmp_path_factory.mktemp("trust")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "ok.png")
    for cls in ("a", "b"):
        (root / "folder" / cls).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "folder" / cls / "0.png")
    _png_header_bomb(root / "bomb.png")
    (root / "bombs" / "a").mkdir(parents=True)
    (root / "bombs" / "a" / "bomb.png").write_bytes((root / "bomb.png").read_bytes())
    (root / "not-an-image.png").write_text("hello")
    from captum_paramsal.zoo import digits

    shipped = os.path.join(os.path.dirname(digits.__file__), "digits_cnn_stats.safetensors")
    with safe_open(shipped, "pt") as f:
        metadata = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    del metadata["fingerprint"]
    save_file(tensors, str(root / "no-fingerprint.safetensors"), metadata=metadata)
    return root


def explain_digits(files, tmp_path, *extra, image="ok.png"):
    return ["explain", "--model", "digits", "--images", str(files / image), "--labels", "1",
            "--out", str(tmp_path / "report"), *extra]


def stats_args(files, out, *extra, model="resnet18", image_size=16):
    return ["stats", "--model", model, "--data", str(files / "folder"), "--image-size", str(image_size),
            "--batch-size", "2",
            "--out", str(out), "--no-progress", *extra]


# -- images --------------------------------------------------------------------------------
def test_decompression_bomb_is_refused_in_one_line_naming_the_file_and_its_size(files, tmp_path, capsys, no_work):
    line = one_line_error(capsys, explain_digits(files, tmp_path, image="bomb.png"))
    assert "bomb.png" in line and "20000x20000" in line and "too large" in line


def test_decompression_bomb_in_a_data_folder_and_a_dataloader_worker(files, tmp_path, capsys):
    # found when the pass reads it (a folder is not read ahead), and re-raised from a worker
    # process with the worker's traceback in its message: still one line
    line = one_line_error(capsys, ["stats", "--model", "resnet18", "--num-classes", "2", "--data",
                                   str(files / "bombs"), "--image-size", "16", "--out", str(tmp_path / "s.safetensors"),
                                   "--no-progress", "--workers", "1"])
    assert "bomb.png" in line and "20000x20000" in line
    assert not (tmp_path / "s.safetensors").exists()


def test_image_that_is_not_an_image_a_folder_or_unreadable(files, tmp_path, capsys, no_work, monkeypatch):
    assert "cannot read image" in one_line_error(capsys, explain_digits(files, tmp_path, image="not-an-image.png"))
    assert "is a folder, not an image" in one_line_error(capsys, explain_digits(files, tmp_path, image="folder"))
    import PIL.Image

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(PIL.Image, "open", denied)
    line = one_line_error(capsys, explain_digits(files, tmp_path))
    assert "cannot read image" in line and "Permission denied" in line


# -- output paths --------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["explain", "demo"])
def test_report_out_naming_an_existing_file_is_refused(files, tmp_path, capsys, no_work, command):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    argv = (explain_digits(files, tmp_path)[:-2] if command == "explain" else ["demo"]) + ["--out", str(existing)]
    line = one_line_error(capsys, argv)
    assert "notes.txt" in line and "existing file" in line and "--overwrite" in line
    assert existing.read_text() == "keep me"


def test_explain_overwrite_replaces_an_existing_file_by_the_report(files, tmp_path, capsys):
    existing = tmp_path / "report"
    existing.write_text("old")
    assert main(explain_digits(files, tmp_path, "--max-samples", "1", "--overwrite")) == 0
    assert "Report:" in capsys.readouterr().out
    assert (existing / "report.html").is_file()


def test_report_out_under_a_file_or_in_an_unwritable_folder(files, tmp_path, capsys, no_work, monkeypatch):
    (tmp_path / "file").write_text("")
    line = one_line_error(capsys, explain_digits(files, tmp_path)[:-2] + ["--out", str(tmp_path / "file" / "r")])
    assert "is a file, not a folder" in line
    line = one_line_error(capsys, ["demo", "--out", str(tmp_path / "file" / "a" / "b")])
    assert "is a file, not a folder" in line
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # root may write anywhere: the folder's permission is simulated
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: str(path) != str(locked) and real_access(path, mode))
    line = one_line_error(capsys, ["demo", "--out", str(locked / "new" / "report")])
    assert "no permission to write" in line
    line = one_line_error(capsys, ["demo", "--out", str(locked)])
    assert "no permission to write" in line


def test_stats_out_naming_a_folder_is_refused_before_the_pass(files, tmp_path, capsys, no_work, no_folder_scan):
    line = one_line_error(capsys, stats_args(files, tmp_path))
    assert "is a folder" in line and str(tmp_path) in line


def test_stats_out_existing_read_only_under_a_file_or_unwritable(files, tmp_path, capsys, no_work, no_folder_scan,
                                                                 monkeypatch):
    existing = tmp_path / "s.safetensors"
    existing.write_bytes(b"previous statistics")
    line = one_line_error(capsys, stats_args(files, existing))
    assert "exists" in line and "--overwrite" in line
    existing.chmod(0o444)
    assert "read-only" in one_line_error(capsys, stats_args(files, existing, "--overwrite"))
    assert existing.read_bytes() == b"previous statistics"
    (tmp_path / "file").write_text("")
    assert "is a file, not a folder" in one_line_error(capsys, stats_args(files, tmp_path / "file" / "s.safetensors"))
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: str(path) != str(locked) and real_access(path, mode))
    assert "no permission to write" in one_line_error(capsys, stats_args(files, locked / "s.safetensors"))


def test_stats_overwrite_replaces_an_existing_file(files, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"previous")
    assert main(stats_args(files, out, "--num-classes", "2", "--overwrite")) == 0
    assert SaliencyStats.load(str(out)).count == 2


# -- devices -------------------------------------------------------------------------------
def test_device_cuda_without_a_gpu_and_a_device_that_is_not_one(files, tmp_path, capsys, no_work, no_folder_scan,
                                                                monkeypatch):
    line = one_line_error(capsys, explain_digits(files, tmp_path, "--device", "banana"))
    assert "--device 'banana' is not a device" in line
    assert "is not a device" in one_line_error(capsys, stats_args(files, tmp_path / "s", "--device", "banana"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA GPU" in one_line_error(capsys, explain_digits(files, tmp_path, "--device", "cuda"))
    assert "no CUDA GPU" in one_line_error(capsys, stats_args(files, tmp_path / "s", "--device", "cuda:0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "1 CUDA GPU(s)" in one_line_error(capsys, explain_digits(files, tmp_path, "--device", "cuda:3"))
    assert "use cpu, cuda or cuda:N" in one_line_error(capsys, explain_digits(files, tmp_path, "--device", "meta"))


# -- statistics files ----------------------------------------------------------------------
def test_stats_file_without_fingerprint(files, tmp_path, capsys, no_work):
    line = one_line_error(capsys, explain_digits(files, tmp_path, "--stats", str(files / "no-fingerprint.safetensors")))
    assert "no-fingerprint.safetensors" in line and "fingerprint" in line


def test_stats_file_that_cannot_be_read(files, tmp_path, capsys, no_work, monkeypatch):
    line = one_line_error(capsys, explain_digits(files, tmp_path, "--stats", str(files / "folder")))
    assert "is a folder, not a statistics file" in line
    (tmp_path / "s.safetensors").write_bytes(b"x" * 64)

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(SaliencyStats, "load", staticmethod(denied))
    line = one_line_error(capsys, explain_digits(files, tmp_path, "--stats", str(tmp_path / "s.safetensors")))
    assert "s.safetensors" in line and "Permission denied" in line


# -- models --------------------------------------------------------------------------------
def test_image_size_the_model_cannot_take_is_refused_before_building_it(files, tmp_path, capsys, no_work,
                                                                         no_folder_scan):
    line = one_line_error(capsys, stats_args(files, tmp_path / "s.safetensors", model="vit_b_16", image_size=64))
    assert "vit_b_16" in line and "64x64" in line
    line = one_line_error(capsys, ["explain", "--model", "vit_b_16", "--stats", str(tmp_path / "none"),
                                   "--images", str(files / "ok.png"), "--labels", "1", "--image-size", "64",
                                   "--out", str(tmp_path / "r")])
    assert "vit_b_16" in line and "64x64" in line


def test_unknown_model_is_named_before_missing_stats(files, tmp_path, capsys, no_work):
    line = one_line_error(capsys, ["explain", "--model", "resnet99", "--data", str(files / "folder"),
                                   "--out", str(tmp_path / "r")])
    assert "unknown model 'resnet99'" in line and "--stats" not in line


def test_explain_labels_and_arguments_checked_before_building(files, tmp_path, capsys, no_work):
    assert "class indices in [0, 10)" in one_line_error(capsys, explain_digits(files, tmp_path)[:-4] + [
        "--labels", "12", "--out", str(tmp_path / "r")])
    assert "--image-size must be at least 1" in one_line_error(capsys, explain_digits(files, tmp_path,
                                                                                      "--image-size", "0"))
    assert "does not apply to --model digits" in one_line_error(capsys, explain_digits(files, tmp_path,
                                                                                       "--num-classes", "3"))
    # the classifier size of a torchvision model is known before it is built (meta device);
    # these statistics are the digits model's, which only the built model can tell
    from captum_paramsal.zoo import digits

    stats = os.path.join(os.path.dirname(digits.__file__), "digits_cnn_stats.safetensors")
    line = one_line_error(capsys, ["explain", "--model", "resnet18", "--num-classes", "2", "--stats", stats,
                                   "--images", str(files / "ok.png"), "--labels", "5", "--out", str(tmp_path / "r")])
    assert "class indices in [0, 2)" in line
