"""``compile_kernels="auto"``'s decision without compiling anything: the price by the inductor
cache's marker (written, read, validated), no compiler means eager, the command line's choices.
The switch itself, with compiled passes, is in tests/test_compiled.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import captum_paramsal.per_sample.compiled as compiled
from captum_paramsal import ParameterSaliency


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An inductor cache folder of the test's own."""
    folder = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder))
    monkeypatch.setattr(compiled, "AUTO_AFTER_SECONDS", {"warm": 2.0, "cold": 50.0})
    monkeypatch.setattr(compiled, "compiler_missing", lambda device_type: None)
    return folder


def test_the_price_is_the_warm_one_where_the_marker_says_kernels_compiled_before(cache):
    kernels = compiled.CompiledKernels()
    assert compiled.inductor_cache_dir() == str(cache)
    assert not compiled.warm_cache("cpu")
    kernels.eager_seconds = 1.0
    assert not kernels.should_compile("auto", "cpu")  # under either price
    kernels.eager_seconds = 10.0
    assert not kernels.should_compile("auto", "cpu")  # past the warm price, under the cold one
    compiled._mark_warm("cpu")
    marker = json.loads((cache / compiled.MARKER).read_text())
    assert marker == {"format": 1, "torch": torch.__version__, "devices": ["cpu"]}
    assert compiled.warm_cache("cpu") and not compiled.warm_cache("cuda")
    assert kernels.should_compile("auto", "cpu")
    assert not kernels.should_compile("auto", "cuda")
    kernels.eager_seconds = 60.0
    assert kernels.should_compile("auto", "cuda")  # the cold price paid
    compiled._mark_warm("cuda")
    assert json.loads((cache / compiled.MARKER).read_text())["devices"] == ["cpu", "cuda"]
    assert not [name for name in os.listdir(cache) if name.endswith(".tmp")]
    assert kernels.should_compile(True, "cpu") and not kernels.should_compile(False, "cpu")


def _marker(**fields) -> str:
    return json.dumps({"format": 1, "torch": torch.__version__, "devices": ["cpu"], **fields})


@pytest.mark.parametrize("text", [
    "not json", "[]", _marker(format=2), _marker(torch="0.0.1"), _marker(devices="cpu"), _marker(devices=[1]),
])
def test_a_marker_of_another_torch_or_malformed_counts_as_cold(cache, text):
    cache.mkdir()
    (cache / compiled.MARKER).write_text(text)
    assert not compiled.warm_cache("cpu")
    compiled._mark_warm("cpu")  # replaced by a valid one
    assert compiled.warm_cache("cpu")


def test_no_compiler_or_a_failed_compile_keeps_auto_eager(cache, monkeypatch):
    kernels = compiled.CompiledKernels()
    kernels.eager_seconds = 1e6
    assert kernels.should_compile("auto", "cpu")
    monkeypatch.setattr(compiled, "compiler_missing", lambda device_type: "no C++ compiler on the PATH")
    assert not kernels.should_compile("auto", "cpu") and kernels.should_compile(True, "cpu")
    monkeypatch.setattr(compiled, "compiler_missing", lambda device_type: None)
    kernels.failed[("low_rank_abs_mean", "cpu")] = "RuntimeError: broken"
    assert not kernels.should_compile("auto", "cpu") and kernels.should_compile("auto", "cuda")


def test_compiler_missing_reads_the_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    assert "no C++ compiler (g++, c++, clang++)" in compiled.compiler_missing("cpu")
    fake = tmp_path / "my-cxx"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", "my-cxx")
    assert compiled.compiler_missing("cpu") is None
    assert "not set up for mps" in compiled.compiler_missing("mps")


def test_the_eager_seconds_count_each_pass(cache):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    ps = ParameterSaliency(model)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    ps.attribute(x, target=y, internal_batch_size=2)
    spent = ps._kernels.eager_seconds
    assert spent > 0
    ps.attribute(x, target=y)
    assert ps._kernels.eager_seconds > spent
    assert not ps.compiles_next  # 2 s of eager passes are far off


def test_the_command_line_choices():
    import argparse

    from captum_paramsal.cli import stats

    parser = argparse.ArgumentParser()
    stats.add_parser(parser.add_subparsers())
    base = ["stats", "--model", "resnet18", "--data", "images", "--out", "out.safetensors"]
    read = {tuple(extra): parser.parse_args(base + list(extra)).compile_kernels
            for extra in ([], ["--compile-kernels"], ["--compile-kernels", "no"], ["--compile-kernels", "auto"])}
    assert read == {(): "auto", ("--compile-kernels",): "yes", ("--compile-kernels", "no"): "no",
                    ("--compile-kernels", "auto"): "auto"}
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--compile-kernels", "sometimes"])
