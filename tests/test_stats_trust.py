"""Statistics that cannot be trusted are refused (issue 16, items 6-9): corrupt or edited files, a
file without its fingerprint, statistics of other weights or of another anonymous loss, and
files written through links or over read-only files."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import stat
import subprocess
import sys
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import save_file

from captum_paramsal import ParameterGuidedInputSaliency, ParameterSaliency, SaliencyStats
from captum_paramsal.interventions import boost, turn_off
from captum_paramsal.zoo import load_digits_model
from captum_paramsal.zoo.digits import DigitsCNN

from helpers import assert_unchanged, loader, small_cnn, small_data, snapshot

FORMAT = "captum-paramsal/saliency-stats"


@pytest.fixture(scope="module")
def fitted():
    """Statistics of ``small_cnn()`` over 37 samples, and the model's data."""
    model, (x, y) = small_cnn(), small_data(37)
    return ParameterSaliency(model).fit_stats(loader(x, y, 6), progress=False), (x, y)


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def _tensors(stats: SaliencyStats) -> dict:
    return {"count": torch.tensor(stats.count, dtype=torch.int64), "mean": stats.mean,
            "m2": stats.var * (stats.count - 1)}


def _write(path, stats: SaliencyStats, version: str = "2", drop=(), checksummed=None, **tensors) -> str:
    """A statistics file of ``stats`` by hand: its tensors, with those given replaced (``None``
    drops one), the metadata of ``version`` (2: with a checksum of the tensors as written, or of
    ``checksummed``) without the fields named in ``drop``."""
    base = {**_tensors(stats), **tensors}
    base = {name: t for name, t in base.items() if t is not None}
    metadata = {
        "format": FORMAT, "format_version": version, "fingerprint": stats.fingerprint,
        "reduction": stats.reduction, "loss": stats.loss, "layout": json.dumps(stats.layout.description()),
    }
    if version == "2":
        metadata["tensors_sha256"] = json.dumps({name: _sha256(t) for name, t in (checksummed or base).items()})
    for name in drop:
        metadata.pop(name)
    save_file(base, str(path), metadata=metadata)
    return str(path)


# -- 6: a file's tensors are what save wrote, or it is refused ------------------------------------


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("case, tensors, field", [
    ("negative m2", {"m2": "negative"}, r"'m2'.*negative"),
    ("m2 as float32", {"m2": torch.float32}, r"'m2' must be a float64"),
    ("m2 as int64", {"m2": torch.int64}, r"'m2' must be a float64"),
    ("mean as float32", {"mean": torch.float32}, r"'mean' must be a float64"),
    ("fractional count", {"count": torch.tensor(36.5, dtype=torch.float64)}, r"'count' must be an int64"),
    ("boolean count", {"count": torch.tensor(True)}, r"'count' must be an int64"),
    ("count as a vector", {"count": torch.tensor([37])}, r"'count' must be an int64 scalar"),
    ("negative count", {"count": torch.tensor(-3)}, r"'count' is -3"),
    ("extra tensor", {"extra": torch.zeros(3)}, r"unexpected tensor\(s\) \['extra'\]"),
    ("missing m2", {"m2": None}, r"no tensor 'm2'"),
    ("NaN in mean", {"mean": "nan"}, r"'mean' has non-finite"),
])
def test_malformed_tensors_are_refused_naming_the_field(tmp_path, fitted, version, case, tensors, field):
    stats, _ = fitted
    given = {}
    for name, how in tensors.items():
        if isinstance(how, torch.dtype):
            given[name] = getattr(stats, name if name == "mean" else "var").to(how)
        elif how == "negative":
            given[name] = -stats.var * (stats.count - 1)
        elif how == "nan":
            given[name] = torch.full_like(stats.mean, float("nan"))
        else:
            given[name] = how
    path = _write(tmp_path / "bad.safetensors", stats, version, **given)
    with pytest.raises(ValueError, match=field) as error:
        SaliencyStats.load(path)
    assert path in str(error.value)


def test_a_flipped_bit_is_caught_by_the_checksum(tmp_path, fitted):
    stats, _ = fitted
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    payload = bytearray(path.read_bytes())
    header_size = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + header_size])
    data = 8 + header_size
    for name, bit, shown in (("count", 44, "'count'"), ("mean", 3, "'mean'"), ("m2", 61, "'m2'")):
        start = data + header[name]["data_offsets"][0]
        flipped = bytearray(payload)
        flipped[start + bit // 8] ^= 1 << (bit % 8)  # count 37 -> 37 + 2**44 (1.7e13), still plausible
        bad = tmp_path / f"flipped-{name}.safetensors"
        bad.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match=rf"{shown} does not match its checksum"):
            SaliencyStats.load(bad)
    back = SaliencyStats.load(path)  # the unflipped file still loads, bit for bit
    assert back.count == stats.count and torch.equal(back.mean, stats.mean) and torch.equal(back.std, stats.std)
    assert set(json.loads(header["__metadata__"]["tensors_sha256"])) == {"count", "mean", "m2"}


def test_a_format_2_file_without_its_checksum_is_refused(tmp_path, fitted):
    stats, _ = fitted
    path = _write(tmp_path / "nochecksum.safetensors", stats, "2", drop=("tensors_sha256",))
    with pytest.raises(ValueError, match="'tensors_sha256'"):
        SaliencyStats.load(path)
    # an edited mean, well formed, with the checksum of the original values
    edited = _write(tmp_path / "edited.safetensors", stats, "2", checksummed=_tensors(stats), mean=stats.mean * 2)
    with pytest.raises(ValueError, match="'mean' does not match its checksum"):
        SaliencyStats.load(edited)


# -- 7: metadata without a field --------------------------------------------------------------------


@pytest.mark.parametrize("field", ["fingerprint", "layout", "loss", "reduction"])
def test_metadata_without_a_field_is_a_clear_value_error(tmp_path, fitted, field):
    stats, _ = fitted
    for version in ("1", "2"):
        path = _write(tmp_path / f"no-{field}-{version}.safetensors", stats, version, drop=(field,))
        with pytest.raises(ValueError, match=rf"has no '{field}' field") as error:
            SaliencyStats.load(path)
        assert path in str(error.value) and "\n" not in str(error.value)


# -- 8: statistics know the weights they were fitted on ----------------------------------------------


def test_digits_statistics_are_refused_for_a_randomly_initialised_model():
    shipped, stats, data = load_digits_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped files record their weights: no warning
        ParameterSaliency(shipped, stats=stats)
    torch.manual_seed(0)
    random = DigitsCNN().eval()
    before = snapshot(random)
    with pytest.raises(ValueError, match="fitted on other weights"):
        ParameterSaliency(random, stats=stats)
    assert_unchanged(random, before)
    ps = ParameterSaliency(random)
    with pytest.raises(ValueError, match="fitted on other weights"):
        ps.stats = stats
    assert ps.stats is None
    assert_unchanged(random, before)
    with pytest.raises(ValueError, match="fitted on other weights"):
        ParameterGuidedInputSaliency(random, stats=stats, k=3)
    assert_unchanged(random, before)
    # the explicit opt-out: standardize on purpose with statistics of other weights
    x, y = data.test_set()
    z = ParameterSaliency(random, stats=stats, check_weights=False).attribute(x[:8], target=y[:8])
    assert float(z.abs().max()) > 100  # why it is refused by default: meaningless z-scores
    pgis = ParameterGuidedInputSaliency(random, stats=stats, k=3, check_weights=False)
    assert pgis.attribute(x[:2], target=y[:2]).shape == x[:2].shape
    assert_unchanged(random, before)


def test_fit_stats_records_the_weights_and_a_fine_tuned_model_needs_the_opt_out(fitted, tmp_path):
    stats, (x, y) = fitted
    model = small_cnn()
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned[0].weight[0, 0, 0, 0] += 1e-6  # one entry of one filter
    before = snapshot(tuned)
    with pytest.raises(ValueError, match="fitted on other weights"):
        ParameterSaliency(tuned, stats=stats)
    assert_unchanged(tuned, before)
    stats.save(tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="fitted on other weights"):
        ParameterSaliency(tuned, stats=SaliencyStats.load(tmp_path / "s.safetensors"))
    assert_unchanged(tuned, before)
    ps = ParameterSaliency(model)
    assert stats.weights_digest == ps.weights_digest() and len(stats.weights_digest) == 64
    assert SaliencyStats.load(tmp_path / "s.safetensors").weights_digest == stats.weights_digest
    opted = ParameterSaliency(tuned)
    opted.check_weights = False
    opted.stats = stats
    relabelled = stats.for_weights(ParameterSaliency(tuned))
    assert relabelled.weights_digest != stats.weights_digest and torch.equal(relabelled.mean, stats.mean)
    z = ParameterSaliency(tuned, stats=relabelled).attribute(x[:3], target=y[:3])
    assert torch.equal(z, opted.attribute(x[:3], target=y[:3]))
    with pytest.raises(TypeError, match="check_weights must be a bool"):
        ParameterSaliency(model, check_weights="no")
    # a parameter outside the selection (a bias) is not part of what the statistics describe
    biased = copy.deepcopy(model)
    with torch.no_grad():
        biased[0].bias.add_(1.0)
    ParameterSaliency(biased, stats=stats)


def test_the_digest_ignores_device_wrappers_memory_format_and_exact_casts():
    model = small_cnn().float()
    digest = ParameterSaliency(model).weights_digest()
    assert ParameterSaliency(copy.deepcopy(model).double()).weights_digest() == digest  # exact cast
    assert ParameterSaliency(torch.nn.DataParallel(model)).weights_digest() == digest
    assert ParameterSaliency(copy.deepcopy(model).to(memory_format=torch.channels_last)).weights_digest() == digest
    assert ParameterSaliency(copy.deepcopy(model).half()).weights_digest() != digest  # rounded: other weights
    assert ParameterSaliency(model, params=["0.weight"]).weights_digest() != digest


def test_interventions_after_assignment_keep_working(fitted):
    stats, (x, y) = fitted
    model = small_cnn()
    ps = ParameterSaliency(model, stats=stats)
    pgis = ParameterGuidedInputSaliency.from_parameter_saliency(ps, k=2)
    plain = ps.attribute(x[:4], target=y[:4])
    before = snapshot(model)
    with turn_off(model, [("0.weight", 1)]):
        off = ps.attribute(x[:4], target=y[:4])
        assert pgis.attribute(x[:2], target=y[:2]).shape == x[:2].shape
    with boost(model, [("2.weight", 0)], 3.0):
        boosted = ps.attribute(x[:4], target=y[:4])
    assert not torch.equal(off, plain) and not torch.equal(boosted, plain)
    assert torch.equal(ps.attribute(x[:4], target=y[:4]), plain)
    assert_unchanged(model, before)


def test_merge_of_statistics_of_different_weights_is_refused(fitted):
    stats, (x, y) = fitted
    other = small_cnn(seed=5)
    theirs = ParameterSaliency(other).fit_stats(loader(x, y, 6), progress=False)
    with pytest.raises(ValueError, match="different weights"):
        stats.merge(theirs)
    assert theirs.fingerprint == stats.fingerprint and theirs.weights_digest != stats.weights_digest
    ps = ParameterSaliency(small_cnn())
    again = ps.fit_stats(loader(x[:10], y[:10], 5), progress=False)
    assert stats.merge(again).weights_digest == stats.weights_digest
    by_hand = SaliencyStats.empty(ps.layout, ps.reduction, ps.loss_name).partial_fit(ps.attribute(x[:3], target=y[:3]))
    assert stats.merge(by_hand).weights_digest is None  # unknown stays unknown, never claimed


def _all_reduce_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, (x, y) = small_cnn(seed=rank), small_data(37)  # each rank its own weights
        try:
            ParameterSaliency(model).fit_stats(loader(x, y, 5), progress=False)
            outcome = "accepted"
        except ValueError as error:
            outcome = str(error)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(outcome)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_of_ranks_with_different_weights_is_refused_on_every_rank(tmp_path):
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert "fitted on different weights" in (tmp_path / f"rank{rank}.txt").read_text()


def named_loss(outputs, target):
    return F.cross_entropy(outputs, target, reduction="none")


def _scaled_loss(scale):
    def loss(outputs, target):
        return scale * F.cross_entropy(outputs, target, reduction="none")

    return loss


def test_anonymous_losses_do_not_match_each_other(fitted):
    _, (x, y) = fitted
    model = small_cnn()
    first = lambda o, t: F.cross_entropy(o, t, reduction="none")  # noqa: E731
    second = lambda o, t: 2 * F.cross_entropy(o, t, reduction="none")  # noqa: E731
    ps_first, ps_second = ParameterSaliency(model, loss_fn=first), ParameterSaliency(model, loss_fn=second)
    assert ps_first.loss_name != ps_second.loss_name
    assert ps_first.loss_name.startswith(f"{__name__}.test_anonymous_losses_do_not_match_each_other.<locals>.<lambda>@")
    stats = ps_first.fit_stats(loader(x, y, 10), progress=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match="fingerprint"):
        ps_second.stats = stats
    assert_unchanged(model, before)
    ps_first.stats = stats  # the same lambda matches
    same_code = lambda o, t: F.cross_entropy(o, t, reduction="none")  # noqa: E731
    assert ParameterSaliency(model, loss_fn=same_code).loss_name == ps_first.loss_name  # the code decides
    # functions from one factory differ by what they captured
    names = {ParameterSaliency(model, loss_fn=_scaled_loss(s)).loss_name for s in (1.0, 2.0)}
    assert len(names) == 2
    with pytest.raises(ValueError, match="fingerprint"):
        ParameterSaliency(model, loss_fn=_scaled_loss(2.0), stats=ParameterSaliency(
            model, loss_fn=_scaled_loss(1.0)).fit_stats(loader(x, y, 10), progress=False))
    assert_unchanged(model, before)
    # named losses keep their names (files that record them stay valid)
    assert ParameterSaliency(model, loss_fn=named_loss).loss_name == f"{__name__}.named_loss"
    assert ParameterSaliency(model).loss_name == "cross_entropy"


SCRIPT = """
import torch.nn.functional as F
from captum_paramsal.losses import loss_name
loss = lambda o, t: F.cross_entropy(o, t, reduction="none") * 0.5
print(loss_name(loss))
"""


def test_the_same_lambda_matches_in_another_process(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    names = set()
    import captum_paramsal

    package_root = os.path.dirname(os.path.dirname(captum_paramsal.__file__))  # the package under test
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed,
               "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
        names.add(subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                                 check=True).stdout.strip())
    assert len(names) == 1 and names.pop().startswith("__main__.<lambda>@")


def test_a_format_1_file_loads_and_warns_that_its_weights_cannot_be_checked(tmp_path, fitted):
    stats, (x, y) = fitted
    path = _write(tmp_path / "old.safetensors", stats, "1")
    old = SaliencyStats.load(path)
    model = small_cnn()
    with pytest.warns(UserWarning, match="do not record which weights"):
        ps = ParameterSaliency(model, stats=old)
    assert old.weights_digest is None and torch.equal(old.mean, stats.mean) and old.count == stats.count
    assert torch.equal(ps.attribute(x[:2], target=y[:2]), ParameterSaliency(model, stats=stats).attribute(
        x[:2], target=y[:2]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ParameterSaliency(model, stats=old, check_weights=False)
        upgraded = tmp_path / "upgraded.safetensors"
        old.for_weights(ParameterSaliency(model)).save(upgraded)
        ParameterSaliency(model, stats=SaliencyStats.load(upgraded))


# -- 9: atomic writes through links, keeping modes, refusing read-only files --------------------------


def _no_temporaries(*folders):
    for folder in folders:
        assert not [p for p in os.listdir(folder) if p.startswith(".captum-paramsal-")], folder


def test_saving_through_a_symlink_writes_its_target(tmp_path, fitted, monkeypatch):
    import tempfile

    stats, _ = fitted
    real_dir, link_dir = tmp_path / "real", tmp_path / "links"
    real_dir.mkdir()
    link_dir.mkdir()
    target = real_dir / "stats.safetensors"
    target.write_bytes(b"old")
    link = link_dir / "stats.safetensors"
    link.symlink_to(target)
    chain = link_dir / "chain.safetensors"
    chain.symlink_to(link)
    temporaries = []
    mkstemp = tempfile.mkstemp

    def recording(*args, **kwargs):
        temporaries.append(kwargs.get("dir"))
        return mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", recording)
    stats.save(chain)
    assert link.is_symlink() and chain.is_symlink() and os.readlink(chain) == str(link)
    assert temporaries == [str(real_dir)]  # the temporary file beside the target: the rename is atomic
    assert SaliencyStats.load(target).count == stats.count
    _no_temporaries(real_dir, link_dir)
    dangling = link_dir / "dangling.safetensors"
    dangling.symlink_to(real_dir / "new.safetensors")
    stats.save(dangling)
    assert dangling.is_symlink() and SaliencyStats.load(real_dir / "new.safetensors").count == stats.count


def test_saving_keeps_the_mode_and_refuses_a_read_only_file(tmp_path, fitted):
    from captum_paramsal._utils import atomic_write

    stats, _ = fitted
    path = tmp_path / "stats.safetensors"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    stats.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 and SaliencyStats.load(path).count == stats.count
    os.chmod(path, 0o444)
    content = path.read_bytes()
    with pytest.raises(PermissionError, match=r"stats\.safetensors.*read-only"):
        stats.save(path)
    with pytest.raises(PermissionError, match="read-only"):
        atomic_write(path, b"other")
    assert path.read_bytes() == content and stat.S_IMODE(os.stat(path).st_mode) == 0o444
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    with pytest.raises(PermissionError, match="read-only"):
        atomic_write(link, b"other")
    assert path.read_bytes() == content and link.is_symlink()
    _no_temporaries(tmp_path)
    with pytest.raises(IsADirectoryError, match="directory"):
        atomic_write(tmp_path, b"x")
