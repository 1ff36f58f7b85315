"""The embedded default: a small CNN on scikit-learn's bundled handwritten digits.

Real data that ships with scikit-learn (1797 grey 8x8 images of the digits 0-9, no download),
split once by a seeded permutation into a training half and a test half. The CNN is trained
by :mod:`.train_digits` (deterministic, seconds on a CPU) and shipped next to this file with
its reference statistics over the test half (the paper standardizes over its validation set).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..stats import SaliencyStats

HERE = os.path.dirname(__file__)
WEIGHTS_FILE = os.path.join(HERE, "digits_cnn.safetensors")
STATS_FILE = os.path.join(HERE, "digits_cnn_stats.safetensors")
CLASSES = tuple(str(d) for d in range(10))


class DigitsCNN(nn.Module):
    """Three 3x3 conv layers and two Linear layers on 1x8x8 digits: 298 units in all."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 2 * 2, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))  # 4x4
        x = self.pool(torch.relu(self.conv3(x)))  # 2x2
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@dataclass(frozen=True)
class DigitsData:
    """Images ``(N, 1, 8, 8)`` in [0, 1], labels ``(N,)``, and the split's indices."""

    images: Tensor
    labels: Tensor
    train: Tensor
    test: Tensor

    def train_set(self) -> Tuple[Tensor, Tensor]:
        return self.images[self.train], self.labels[self.train]

    def test_set(self) -> Tuple[Tensor, Tensor]:
        return self.images[self.test], self.labels[self.test]


def digits_data(split_seed: int = 0, test_fraction: float = 0.5) -> DigitsData:
    """scikit-learn's digits as tensors, split by a seeded permutation."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(len(labels) * test_fraction))
    return DigitsData(images, labels, train=order[n_test:].sort().values, test=order[:n_test].sort().values)


def read_metadata(path: str = WEIGHTS_FILE) -> Dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def load_digits_model(
    path: Optional[str] = None, with_stats: bool = True
) -> Tuple[nn.Module, Optional[SaliencyStats], DigitsData]:
    """``(model, stats, data)``: the shipped CNN in eval mode, its reference statistics (or
    ``None`` with ``with_stats=False``) and the digits split it was trained and evaluated on."""
    from safetensors.torch import load_file

    from ..stats import SaliencyStats

    path = path or WEIGHTS_FILE
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"the digits model is missing ({path}); re-create it with python -m captum_paramsal.zoo.train_digits"
        )
    meta = read_metadata(path)
    split = json.loads(meta.get("split", "{}"))
    model = DigitsCNN()
    model.load_state_dict(load_file(path))
    model.eval()
    stats = None
    if with_stats:
        stats_path = os.path.join(os.path.dirname(path), os.path.basename(STATS_FILE))
        stats = SaliencyStats.load(stats_path)
    data = digits_data(split.get("seed", 0), split.get("test_fraction", 0.5))
    if "test_indices" in split:  # the shipped split wins over re-drawing it from the seed
        test = torch.tensor(split["test_indices"], dtype=torch.long)
        keep = torch.ones(len(data.labels), dtype=torch.bool)
        keep[test] = False
        data = DigitsData(data.images, data.labels, train=keep.nonzero().flatten(), test=test)
    return model, stats, data
