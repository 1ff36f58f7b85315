"""Re-create the trojaned ResNet-20 of SPADE's benchmark: ``python -m captum_paramsal.zoo.train_trojan_resnet``.

SGD with momentum and a cosine learning rate on the poisoned composited digits of
:mod:`.trojan_digits`, seeded initialization and shuffling, a fixed thread count (2: the
reductions then run in one order, so the same command gives the same weights on the same
software stack), full precision. About 8 minutes on 2 CPU cores. The file stores the recipe,
the data setup and the scores (clean accuracy, attack success per trigger).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .trojan_digits import WEIGHTS_FILE, ResNet20, TrojanDigitsData, TrojanDigitsSetup, trojan_digits_data

RECIPE = {"seed": 0, "epochs": 15, "batch_size": 128, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "threads": 1}


def predictions(model: torch.nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])


def scores(model: torch.nn.Module, data: TrojanDigitsData) -> Dict[str, float]:
    """Clean test accuracy and each trigger's attack success (test images not of the target class)."""
    model.eval()
    out = {"clean_accuracy": float((predictions(model, data.test_images) == data.test_labels).float().mean())}
    for trigger in range(len(data.setup.targets)):
        x, _, target, _ = data.triggered_test(trigger)
        out[f"attack_success_{trigger}"] = float((predictions(model, x) == target).float().mean())
    return out


def train(data: TrojanDigitsData, recipe: Dict, log=print) -> ResNet20:
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe["threads"])
    try:
        torch.manual_seed(recipe["seed"])
        model = ResNet20()
        optimizer = torch.optim.SGD(
            model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"], weight_decay=recipe["weight_decay"]
        )
        steps_per_epoch = -(-len(data.train_labels) // recipe["batch_size"])
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=recipe["lr"], total_steps=recipe["epochs"] * steps_per_epoch, pct_start=0.15
        )
        shuffle = torch.Generator().manual_seed(recipe["seed"] + 1)
        for epoch in range(recipe["epochs"]):
            model.train()
            started, total = time.perf_counter(), 0.0
            for batch in torch.randperm(len(data.train_labels), generator=shuffle).split(recipe["batch_size"]):
                optimizer.zero_grad()
                loss = F.cross_entropy(model(data.train_images[batch]), data.train_labels[batch])
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(batch)
            log(f"epoch {epoch + 1}/{recipe['epochs']}: loss {total / len(data.train_labels):.4f} "
                f"({time.perf_counter() - started:.0f} s)")
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def build(
    out: Optional[str] = None, recipe: Optional[Dict] = None, setup: Optional[TrojanDigitsSetup] = None, log=print
) -> Tuple[ResNet20, Dict[str, float]]:
    """Train, score and write the weights file; returns the model and its scores."""
    from safetensors.torch import save

    from .._utils import atomic_write

    recipe = {**RECIPE, **(recipe or {})}
    data = trojan_digits_data(setup)
    started = time.perf_counter()
    model = train(data, recipe, log)
    result = {**scores(model, data), "train_seconds": round(time.perf_counter() - started, 1)}
    meta = {
        "recipe": json.dumps(recipe),
        "setup": json.dumps(asdict(data.setup)),
        "scores": json.dumps(result),
        "torch": torch.__version__,
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out or WEIGHTS_FILE, save(state, metadata=meta))
    return model, result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help=f"weights file (default {WEIGHTS_FILE})")
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    parser.add_argument("--threads", type=int, default=RECIPE["threads"])
    parser.add_argument("--alpha", type=float, default=TrojanDigitsSetup.alpha, help="trigger opacity")
    parser.add_argument("--patch", type=int, default=TrojanDigitsSetup.patch, help="trigger side in pixels")
    parser.add_argument("--distractors", type=int, default=TrojanDigitsSetup.distractors,
                        help="trigger-shaped patches in other colours on every image")
    args = parser.parse_args(argv)
    setup = TrojanDigitsSetup(alpha=args.alpha, patch=args.patch, distractors=args.distractors)
    _, result = build(args.out, {"epochs": args.epochs, "threads": args.threads}, setup)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
