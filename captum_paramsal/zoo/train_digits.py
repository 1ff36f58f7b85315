"""Re-create the embedded digits model and its statistics: ``python -m captum_paramsal.zoo.train_digits``.

Deterministic: seeded initialization, seeded shuffling, one thread, full-precision CPU
arithmetic; the same command gives the same files on the same software stack.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .digits import STATS_FILE, WEIGHTS_FILE, DigitsCNN, DigitsData, digits_data

#: the recipe; kept short on purpose: a model that still makes mistakes on the test half
#: (a few percent), so that there are misclassified samples to explain
RECIPE = {"seed": 0, "epochs": 6, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-4}


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(images).argmax(1) == labels).float().mean())


def train_deterministic(
    make_model: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
) -> nn.Module:
    """Adam on cross-entropy, seeded initialization and shuffling, one thread (reductions in one
    fixed order: the same weights on every run); the model comes back in eval mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = make_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        shuffle = torch.Generator().manual_seed(seed + 1)
        for _ in range(epochs):
            model.train()
            for batch in torch.randperm(len(y), generator=shuffle).split(batch_size):
                optimizer.zero_grad()
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def train(data: DigitsData, seed: int, epochs: int, batch_size: int, lr: float, weight_decay: float) -> nn.Module:
    """The embedded digits CNN on the training half."""
    return train_deterministic(DigitsCNN, *data.train_set(), seed, epochs, batch_size, lr, weight_decay)


def build(
    out_dir: Optional[str] = None, recipe: Optional[Dict] = None, quiet: bool = False
) -> Tuple[nn.Module, Dict[str, float]]:
    """Train, fit statistics over the test half, write both files; returns the model and its scores."""
    from safetensors.torch import save

    from .._core.parameter_saliency import ParameterSaliency
    from .._utils import atomic_write

    recipe = {**RECIPE, **(recipe or {})}
    data = digits_data(split_seed=0, test_fraction=0.5)
    started = time.perf_counter()
    model = train(data, **recipe)
    scores = {
        "train_accuracy": accuracy(model, *data.train_set()),
        "test_accuracy": accuracy(model, *data.test_set()),
        "seconds": time.perf_counter() - started,
    }
    weights = os.path.join(out_dir, os.path.basename(WEIGHTS_FILE)) if out_dir else WEIGHTS_FILE
    stats_path = os.path.join(out_dir, os.path.basename(STATS_FILE)) if out_dir else STATS_FILE
    metadata = {
        "format": "captum-paramsal digits model 1",
        "recipe": json.dumps(recipe),
        # the split itself, not only its seed: a later torch may permute differently
        "split": json.dumps({
            "seed": 0, "test_fraction": 0.5, "dataset": "sklearn.datasets.load_digits",
            "test_indices": data.test.tolist(),
        }),
        "train_accuracy": f"{scores['train_accuracy']:.6f}",
        "test_accuracy": f"{scores['test_accuracy']:.6f}",
    }
    atomic_write(weights, save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata=metadata))
    x, y = data.test_set()
    # true labels, as the paper; the file records the weights' digest (checked when assigned)
    stats = ParameterSaliency(model).fit_stats([(x, y)], progress=False)
    stats.save(stats_path)
    if not quiet:
        print(
            f"digits CNN: train accuracy {scores['train_accuracy']:.4f}, test accuracy {scores['test_accuracy']:.4f}, "
            f"{int(round((1 - scores['test_accuracy']) * len(y)))} misclassified test digits, "
            f"trained in {scores['seconds']:.1f} s -> {weights}, {stats_path}"
        )
    return model, scores


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out-dir", default=None, help="write here instead of into the package")
    args = parser.parse_args(argv)
    build(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
