"""Re-create the embedded colours BERT and its statistics: ``python -m captum_paramsal.zoo.train_colours``.

Deterministic: the sentences come from a seeded stream (:func:`.colours.colours_data`), the
initialization and the shuffling are seeded, training runs on one thread with
``torch.use_deterministic_algorithms(True)`` in full-precision CPU arithmetic; the same command
gives the same files on the same software stack. About a minute on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .colours import (
    SPLIT_SIZES,
    STATS_FILE,
    UNITS,
    WEIGHTS_FILE,
    ColoursData,
    ColourSplit,
    colours_data,
    colours_model,
)

#: the recipe: AdamW with a one-cycle schedule over 20 epochs of the 8000 training sentences;
#: the model counts almost perfectly and still gets some tie-breaks wrong (a few percent of the
#: test sentences), so that there are errors to explain
RECIPE = {"seed": 0, "epochs": 20, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.01}


def predict(model: nn.Module, split: ColourSplit, batch_size: int = 2000) -> torch.Tensor:
    """The predicted colour of every sentence of ``split`` (the model in eval mode)."""
    model.eval()
    with torch.no_grad():
        return torch.cat([
            model(input_ids=split.input_ids[i : i + batch_size],
                  attention_mask=split.attention_mask[i : i + batch_size]).logits.argmax(-1)
            for i in range(0, len(split), batch_size)
        ])


def accuracy(model: nn.Module, split: ColourSplit) -> float:
    return float((predict(model, split) == split.labels).float().mean())


def train(
    data: ColoursData, seed: int, epochs: int, batch_size: int, lr: float, weight_decay: float
) -> nn.Module:
    """The colours BERT on the training split; comes back in eval mode. One thread and
    deterministic algorithms (both restored afterwards): the same weights on every run."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        model = colours_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        split = data.train
        steps_per_epoch = (len(split) + batch_size - 1) // batch_size
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
        shuffle = torch.Generator().manual_seed(seed + 1)
        for _ in range(epochs):
            model.train()
            for batch in torch.randperm(len(split), generator=shuffle).split(batch_size):
                optimizer.zero_grad()
                logits = model(input_ids=split.input_ids[batch], attention_mask=split.attention_mask[batch]).logits
                F.cross_entropy(logits, split.labels[batch]).backward()
                optimizer.step()
                schedule.step()
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    return model.eval()


def build(
    out_dir: Optional[str] = None, recipe: Optional[Dict] = None, quiet: bool = False
) -> Tuple[nn.Module, Dict[str, float]]:
    """Generate the sentences, train, fit statistics over the validation split (true labels,
    ``units=("heads", "neurons")``), write both files; returns the model and its scores
    (accuracies and the training time in seconds, which is not written into the files)."""
    from safetensors.torch import save

    from .._core.parameter_saliency import ParameterSaliency
    from .._utils import atomic_write

    recipe = {**RECIPE, **(recipe or {})}
    data = colours_data(seed=0)
    started = time.perf_counter()
    model = train(data, **recipe)
    seconds = time.perf_counter() - started
    scores = {
        "train_accuracy": accuracy(model, data.train),
        "validation_accuracy": accuracy(model, data.validation),
        "test_accuracy": accuracy(model, data.test),
        "seconds": seconds,
    }
    weights = os.path.join(out_dir, os.path.basename(WEIGHTS_FILE)) if out_dir else WEIGHTS_FILE
    stats_path = os.path.join(out_dir, os.path.basename(STATS_FILE)) if out_dir else STATS_FILE
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    metadata = {
        "format": "captum-paramsal colours model 1",
        "architecture": "transformers.BertForSequenceClassification(captum_paramsal.zoo.colours.colours_config())",
        "recipe": json.dumps(recipe),
        "data": json.dumps({"seed": 0, "sizes": SPLIT_SIZES, "checksum": data.checksum()}),
        "units": json.dumps(list(UNITS)),
        **{key: f"{value:.6f}" for key, value in scores.items() if key.endswith("accuracy")},
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights, save(state, metadata=metadata))
    ps = ParameterSaliency(model, units=UNITS)
    stats = ps.fit_stats(data.validation.batches(500), progress=False)  # with the weights' digest
    stats.save(stats_path)
    if not quiet:
        wrong = int(round((1 - scores["test_accuracy"]) * len(data.test)))
        print(
            f"colours BERT: train accuracy {scores['train_accuracy']:.4f}, "
            f"validation {scores['validation_accuracy']:.4f}, "
            f"test {scores['test_accuracy']:.4f} ({wrong} of {len(data.test)} test sentences wrong), "
            f"trained in {seconds:.1f} s -> {weights}, {stats_path}"
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
