"""The one loop over (inputs, labels) data: forms, sharding, the max_samples cut, the bar, errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import captum_paramsal.data as data_module
from captum_paramsal.data import labelled_batches


def batches(sizes, features=3):
    out, start = [], 0
    for size in sizes:
        x = torch.arange(start, start + size, dtype=torch.float32)[:, None].repeat(1, features)
        out.append((x, torch.arange(start, start + size)))
        start += size
    return out


def test_forms_and_formatting():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1], dtype=torch.int32)
    data = [(x, y), [(x, x[:, :1]), y.tolist()], {"inputs": x, "labels": y, "extra": 1}]
    got = list(labelled_batches(data))
    assert len(got) == 3
    for inputs, labels in got:
        assert isinstance(inputs, tuple) and labels.dtype == torch.int64 and torch.equal(labels, y.long())
        assert torch.equal(inputs[0], x)
    assert len(got[1][0]) == 2  # a tuple of inputs stays a tuple
    ((inputs, labels),) = labelled_batches([(x, y)], device="cpu")
    assert inputs[0].device.type == "cpu" and labels.device.type == "cpu"


def test_max_samples_cuts_the_crossing_batch_and_stops():
    seen = []

    def data():
        for batch in batches([4, 4, 4, 4]):
            seen.append(1)
            yield batch

    got = list(labelled_batches(data(), max_samples=6))
    assert [b[1].tolist() for b in got] == [[0, 1, 2, 3], [4, 5]]
    assert got[1][0][0].shape == (2, 3)
    assert len(seen) == 2  # nothing read after the cut
    assert sum(len(b[1]) for b in labelled_batches(batches([4, 4]), max_samples=8)) == 8
    assert sum(len(b[1]) for b in labelled_batches(batches([4, 4]), max_samples=100)) == 8


def test_round_robin_shards_cover_the_data_once():
    data = batches([2, 3, 1, 4, 2])
    parts = [[b[1].tolist() for b in labelled_batches(data, shard=(rank, 2))] for rank in range(2)]
    assert parts == [[[0, 1], [5], [10, 11]], [[2, 3, 4], [6, 7, 8, 9]]]
    # max_samples counts this process's samples
    assert [b[1].tolist() for b in labelled_batches(data, shard=(1, 2), max_samples=4)] == [[2, 3, 4], [6]]
    assert list(labelled_batches(data, shard=(0, 1))) != []


def test_per_sample_targets_for_a_custom_loss():
    x = torch.randn(3, 2)
    targets = torch.randn(3, 4)
    ((inputs, got),) = labelled_batches([(x, targets)], class_labels=False)
    assert got.dtype == torch.float32 and torch.equal(got, targets)
    ((_, cut),) = labelled_batches([(x, targets)], class_labels=False, max_samples=2)
    assert torch.equal(cut, targets[:2])
    with pytest.raises(ValueError, match=r"one entry per sample \(first dimension 3\), got shape \(2, 4\)"):
        list(labelled_batches([(x, targets[:2])], class_labels=False))


class FakeBar:
    made = []

    def __init__(self, total=None, disable=False, unit=None, desc=None):
        self.total, self.disable, self.desc, self.n, self.closed = total, disable, desc, 0, False
        FakeBar.made.append(self)

    def update(self, n):
        self.n += n

    def close(self):
        self.closed = True


@pytest.fixture
def fake_bar(monkeypatch):
    import tqdm.auto

    FakeBar.made = []
    monkeypatch.setattr(tqdm.auto, "tqdm", FakeBar)
    return FakeBar.made


def test_progress_bar_total_and_closing(fake_bar, monkeypatch):
    x, y = torch.randn(10, 2), torch.arange(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    list(labelled_batches(loader, progress=True, desc="statistics"))
    bar = fake_bar[-1]
    assert (bar.total, bar.disable, bar.desc, bar.n, bar.closed) == (10, False, "statistics", 10, True)
    list(labelled_batches(loader, max_samples=5))
    assert (fake_bar[-1].total, fake_bar[-1].disable, fake_bar[-1].n) == (5, True, 5)
    list(labelled_batches(loader, shard=(0, 2)))
    assert fake_bar[-1].total is None  # the data set's length is not this shard's
    list(labelled_batches(loader, total=7))
    assert fake_bar[-1].total == 7
    # a loop left early, or one that raises, closes its bar
    for _ in labelled_batches(loader):
        break
    assert fake_bar[-1].closed
    with pytest.raises(ValueError):
        list(labelled_batches([(x, y), (x, y[:3])]))
    assert fake_bar[-1].closed
    # under torch.distributed: the bar on rank 0 only, and no total from the data set
    monkeypatch.setattr(data_module, "_distributed_rank", lambda: 1)
    list(labelled_batches(loader, progress=True))
    assert fake_bar[-1].disable and fake_bar[-1].total is None
    monkeypatch.setattr(data_module, "_distributed_rank", lambda: 0)
    list(labelled_batches(loader, progress=True))
    assert not fake_bar[-1].disable


@pytest.mark.parametrize(
    "data, match",
    [
        ([torch.randn(2, 3)], "batch 0 of data is a Tensor; each batch must be an"),
        ([(torch.randn(2, 3), torch.tensor([0, 1])), (torch.randn(2, 3),)], "batch 1 of data is a tuple"),
        ([(torch.randn(2, 3), torch.tensor([0, 1, 2]))], r"labels of batch 0 must be one class per sample, shape \(2"),
        ([(torch.randn(2, 3), torch.tensor(1))], r"one class per sample, shape \(2,\), got \(\)"),
        ([(torch.randn(2, 3), torch.tensor([0.0, 1.0]))], "must be integer class indices, got dtype torch.float32"),
        ([(torch.randn(2, 3), torch.tensor([True, False]))], "must be integer class indices, got dtype torch.bool"),
        ([(torch.randn(2, 3), ["a", "b"])], "labels of batch 0 are not a tensor of class indices"),
        ([(torch.randn(2, 3), None)], "labels of batch 0 are None"),
        ([(torch.full((2, 3), float("nan")), torch.tensor([0, 1]))], "contains NaN"),
        ([(torch.randn(0, 3), torch.tensor([], dtype=torch.long))], "batch size 0"),
        ([((torch.randn(2, 3), torch.randn(3, 3)), torch.tensor([0, 1]))], "share the batch size"),
    ],
)
def test_malformed_batches(data, match):
    with pytest.raises(ValueError, match=match):
        list(labelled_batches(data))


def test_bad_arguments_fail_when_called():
    data = batches([2])
    for max_samples in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="max_samples must be a positive int or None"):
            labelled_batches(data, max_samples=max_samples)
    for shard in ((2, 2), (-1, 2), (0, 0), [0, 2], (0, 2, 1), (0.0, 2), (True, 2)):
        with pytest.raises(ValueError, match=r"shard must be a \(rank, world\) pair"):
            labelled_batches(data, shard=shard)
    with pytest.raises(ValueError, match="total must be"):
        labelled_batches(data, total=-1)
    with pytest.raises(TypeError, match="data must be an iterable of"):
        labelled_batches(torch.randn(3, 2))
    with pytest.raises(TypeError, match="data must be an iterable of"):
        labelled_batches(5)
    with pytest.raises(TypeError, match="inputs\\[0\\] must be a Tensor"):
        list(labelled_batches([([1.0, 2.0], torch.tensor([0, 1]))]))
