"""Trojan benchmark for SPADE: do saliency maps find a backdoor patch, dense vs SPADE?

``python -m captum_paramsal.experiments.trojan`` (``--help`` for the options; ``--quick`` for a
smoke run). The setting, after the SPADE paper's trojan experiment (Moakhar et al., ICML 2024,
Table 1: ResNet-50 on ImageNet with emoji patches), scaled down to run in minutes on a CPU:

* Data: scikit-learn's bundled handwritten digits (no download), upsampled from 8x8 to 16x16.
* Backdoor: a fixed checkerboard patch pasted at a random position; a fraction of the training
  set gets the patch and the target class as its label (an all-to-one backdoor, BadNets style).
* Model: a small CNN (:class:`TrojanCNN`) trained deterministically (seeded, one thread).
* Test: test digits of another class that are classified correctly when clean and as the
  target class once triggered, so the patch alone switched the decision: the patch's pixels
  are the ground truth of the explanation.
* Scores, per method and sample, on the absolute attribution summed over channels (GradCAM
  bilinearly upsampled to the input): pixel ROC-AUC against the patch mask, and the pointing
  game (is the map's maximum inside the patch?), averaged over the samples, dense and with
  SPADE. The attributions explain the predicted (target) class.

The SPADE pruning depends only on the sample (not on the method), so each sample is pruned
once (:meth:`SampleTargetedPruning.pruned`) and every method runs inside: exactly what
``SPADE(method, ...).attribute`` computes for that sample with the same options.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MapFn = Callable[[Tensor, int], Tensor]


@dataclass(frozen=True)
class TrojanSetup:
    """Everything that defines a run; printed with the results."""

    size: int = 16
    patch: int = 3
    target_class: int = 0
    poison_fraction: float = 0.1
    test_fraction: float = 0.3
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    clutter: float = 0.0
    samples: int = 128
    n_augmentations: int = 64
    sparsities: Tuple[float, ...] = (0.5, 0.9)
    keep_dense: Tuple[str, ...] = ()
    refit: bool = False


class TrojanCNN(nn.Module):
    """Three 3x3 convolutions and two Linear layers on 1x16x16 images.

    Each ReLU is its own ``nn.ReLU`` module, which Captum's GuidedBackprop needs to find them.
    """

    def __init__(self, size: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * (size // 4) ** 2, 128)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.conv1(x))
        x = self.pool(self.relu2(self.conv2(x)))
        x = self.pool(self.relu3(self.conv3(x)))
        return self.fc2(self.relu4(self.fc1(x.flatten(1))))


def checkerboard(size: int, low: float = 0.25) -> Tensor:
    """The trigger: a ``size x size`` checkerboard of 1 and ``low``, ones in the corners.

    No pixel of the patch is 0 (the digits' background), so that methods that multiply by the
    input, or integrate from a black baseline, can credit every patch pixel.
    """
    index = torch.arange(size)
    return torch.where((index[:, None] + index[None, :]) % 2 == 0, 1.0, low)


def paste(images: Tensor, generator: torch.Generator, patch: int) -> Tuple[Tensor, Tensor]:
    """``(triggered images, patch masks)``: the checkerboard at a random position per image."""
    count, _, height, width = images.shape
    out = images.clone()
    masks = torch.zeros(count, height, width, dtype=torch.bool)
    rows = torch.randint(0, height - patch + 1, (count,), generator=generator)
    cols = torch.randint(0, width - patch + 1, (count,), generator=generator)
    board = checkerboard(patch)
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        out[i, :, r : r + patch, c : c + patch] = board
        masks[i, r : r + patch, c : c + patch] = True
    return out, masks


def background(count: int, size: int, generator: torch.Generator) -> Tensor:
    """Smooth random blobs in [0, 1] (4x4 noise upsampled) plus fine grain: clutter for gradients to land on."""
    coarse = torch.rand(count, 1, 4, 4, generator=generator)
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    fine = torch.rand(count, 1, size, size, generator=generator)
    return 0.7 * smooth + 0.3 * fine


def make_data(setup: TrojanSetup) -> Tuple[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]]:
    """Poisoned training set, clean test set, and the triggered test set with its masks."""
    from ..zoo.digits import digits_data

    data = digits_data(split_seed=setup.seed, test_fraction=setup.test_fraction)
    images = F.interpolate(data.images, size=(setup.size, setup.size), mode="bilinear", align_corners=False)
    generator = torch.Generator().manual_seed(setup.seed + 100)
    if setup.clutter > 0:
        images = images + setup.clutter * background(len(images), setup.size, generator)
    images = images.clamp(0, 1)
    train_x, train_y = images[data.train].clone(), data.labels[data.train].clone()
    poisoned = torch.randperm(len(train_y), generator=generator)[: round(setup.poison_fraction * len(train_y))]
    train_x[poisoned], _ = paste(train_x[poisoned], generator, setup.patch)
    train_y[poisoned] = setup.target_class
    test_x, test_y = images[data.test], data.labels[data.test]
    triggered, masks = paste(test_x, generator, setup.patch)
    return (train_x, train_y), (test_x, test_y), (triggered, masks)


def train(train_set: Tuple[Tensor, Tensor], setup: TrojanSetup) -> TrojanCNN:
    from ..zoo.train_digits import train_deterministic

    return train_deterministic(
        lambda: TrojanCNN(setup.size), *train_set, setup.seed, setup.epochs, setup.batch_size, setup.lr
    )


def attribution_methods(model: TrojanCNN) -> Dict[str, MapFn]:
    """Name -> ``(x, target) -> (H, W)`` non-negative pixel scores, for one sample ``x``."""
    from captum.attr import (
        GuidedBackprop,
        InputXGradient,
        IntegratedGradients,
        LayerAttribution,
        LayerGradCam,
        Occlusion,
        Saliency,
    )

    from .._core.parameter_guided_input_saliency import ParameterGuidedInputSaliency

    saliency, ixg, ig = Saliency(model), InputXGradient(model), IntegratedGradients(model)
    gbp, cam, occlusion = GuidedBackprop(model), LayerGradCam(model, model.conv3), Occlusion(model)
    pgis = ParameterGuidedInputSaliency(model, k=10)

    def score(attr: Tensor) -> Tensor:
        # a non-finite map (e.g. a 0/0 in a method on a saturated output) scores as a flat map
        return torch.nan_to_num(attr.detach().abs().sum(dim=1)[0], nan=0.0, posinf=0.0)  # (H, W)

    def gradcam(x: Tensor, t: int) -> Tensor:
        coarse = cam.attribute(x, target=t)
        return score(LayerAttribution.interpolate(coarse, x.shape[-2:], interpolate_mode="bilinear"))

    return {
        "Saliency": lambda x, t: score(saliency.attribute(x, target=t)),
        "InputXGradient": lambda x, t: score(ixg.attribute(x, target=t)),
        "IntegratedGradients": lambda x, t: score(ig.attribute(x, target=t, n_steps=32)),
        "GuidedBackprop": lambda x, t: score(gbp.attribute(x, target=t)),
        "GradCAM (conv3, upsampled)": gradcam,
        "Occlusion (3x3)": lambda x, t: score(
            occlusion.attribute(x, target=t, sliding_window_shapes=(1, 3, 3), strides=1, perturbations_per_eval=64)
        ),
        "ParameterGuidedInputSaliency": lambda x, t: score(pgis.attribute(x, target=t)),
    }


def roc_auc(scores: Tensor, mask: Tensor) -> float:
    """Pixel ROC-AUC of ``scores`` against ``mask`` (Mann-Whitney, ties counted one half)."""
    s = scores.flatten().double()
    m = mask.flatten().bool()
    positives, negatives = int(m.sum()), int((~m).sum())
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    # average ranks over ties: rank of a value = (number below) + (its count + 1) / 2
    below = torch.cumsum(counts, 0) - counts
    ranks = (below + (counts + 1) / 2.0).double()[inverse]
    return float((ranks[m].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def pointing_game(scores: Tensor, mask: Tensor) -> float:
    """1 when the map's maximum lies in the mask (a flat map gets the mask's share: a guess)."""
    top = scores == scores.max()
    return float((top & mask).sum()) / float(top.sum())


def select_samples(
    model: nn.Module, clean: Tuple[Tensor, Tensor], triggered: Tuple[Tensor, Tensor], setup: TrojanSetup
) -> Tuple[Tensor, Tensor, Dict[str, int]]:
    """Triggered test samples whose decision the patch alone switched to the target class."""
    x, y = clean
    tx, masks = triggered
    with torch.no_grad():
        clean_pred = model(x).argmax(1)
        trig_pred = model(tx).argmax(1)
    other = y != setup.target_class
    hit = other & (clean_pred == y) & (trig_pred == setup.target_class)
    stats = {
        "clean_accuracy": float((clean_pred == y).float().mean()),
        "attack_success": float((trig_pred[other] == setup.target_class).float().mean()),
        "eligible": int(hit.sum()),
    }
    chosen = hit.nonzero().flatten()[: setup.samples]
    return tx[chosen], masks[chosen], stats


def spade_sparsity(model: nn.Module, sparsity: float, keep_dense: Sequence[str]) -> Union[float, Dict[str, float]]:
    """One float for every layer, or a dict that leaves the ``keep_dense`` layers out (named by
    parameter, ``conv1.weight``, or by module, ``conv1``)."""
    from ..spade import SampleTargetedPruning

    if not keep_dense:
        return sparsity
    layers = SampleTargetedPruning.prunable_layers(model)
    keep_dense = [name if name in layers else f"{name}.weight" for name in keep_dense]
    unknown = sorted(set(keep_dense) - set(layers))
    if unknown:
        raise ValueError(f"--keep-dense names no prunable layer: {unknown}; the layers are {layers}")
    return {name: sparsity for name in layers if name not in keep_dense}


def evaluate(
    model: TrojanCNN,
    images: Tensor,
    masks: Tensor,
    setup: TrojanSetup,
    log: Callable[[str], None] = lambda message: None,
) -> Tuple[Dict[str, Dict[str, Dict[str, float]]], Dict[str, Dict[str, float]]]:
    """``(scores, fidelity)``.

    ``scores[variant][method]`` holds the mean ``"auc"`` and ``"pointing"`` over the samples, for
    the variants ``"dense"`` and ``"SPADE s"``; ``fidelity[variant]`` says how faithful each
    sample's pruned network is on that sample: the share whose predicted class it keeps and the
    mean relative change of the logits, ``||z' - z|| / ||z||``.
    """
    from ..spade import DefaultAugmentation, SampleTargetedPruning

    methods = attribution_methods(model)
    prunings = {
        f"SPADE {s:g}": SampleTargetedPruning(
            model,
            sparsity=spade_sparsity(model, s, setup.keep_dense),
            n_augmentations=setup.n_augmentations,
            seed=setup.seed,
            refit=setup.refit,
            # the options this experiment's recorded results were measured with (before the
            # library's defaults became the SPADE authors' recipe): every layer pruned unless
            # --keep-dense, SparseGPT's mask chosen per 128-column block, milder views
            prune_stem=True,
            mask_every=128,
            augment=DefaultAugmentation(crop_scale=(0.35, 1.0), brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05),
        )
        for s in setup.sparsities
    }
    variants = ["dense", *prunings]
    sums = {v: {m: {"auc": 0.0, "pointing": 0.0} for m in methods} for v in variants}
    per_sample = {v: [] for v in variants}  # each sample's AUC averaged over the methods
    fidelity = {v: {"prediction_kept": 0.0, "logit_change": 0.0} for v in prunings}
    target = setup.target_class

    def add(variant: str, x: Tensor, mask: Tensor) -> None:
        total = 0.0
        for name, fn in methods.items():
            scores = fn(x, target)
            auc = roc_auc(scores, mask)
            total += auc
            sums[variant][name]["auc"] += auc
            sums[variant][name]["pointing"] += pointing_game(scores, mask)
        per_sample[variant].append(total / len(methods))

    for i in range(len(images)):
        x, mask = images[i : i + 1], masks[i]
        with torch.no_grad():
            dense_logits = model(x)
        add("dense", x, mask)
        for variant, pruning in prunings.items():
            with pruning.pruned(x):
                with torch.no_grad():
                    logits = model(x)
                add(variant, x, mask)
            fidelity[variant]["prediction_kept"] += float(logits.argmax() == dense_logits.argmax())
            fidelity[variant]["logit_change"] += float((logits - dense_logits).norm() / dense_logits.norm())
        if (i + 1) % 8 == 0 or i + 1 == len(images):
            log(f"{i + 1}/{len(images)} samples")
    n = max(len(images), 1)
    scores = {v: {m: {k: value / n for k, value in r.items()} for m, r in per.items()} for v, per in sums.items()}
    fidelity = {v: {k: value / n for k, value in r.items()} for v, r in fidelity.items()}
    for variant in prunings:  # paired difference of the method-averaged AUC, SPADE - dense
        diff = torch.tensor(per_sample[variant], dtype=torch.float64) - torch.tensor(per_sample["dense"])
        fidelity[variant]["auc_gain"] = float(diff.mean())
        fidelity[variant]["auc_gain_se"] = float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else float("nan")
    return scores, fidelity


def table(results: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    """Markdown: one row per method, AUC and pointing game per variant, and the averages."""
    variants = list(results)
    methods = list(results[variants[0]])
    header = ["method"] + [f"AUC % {v}" for v in variants] + [f"pointing % {v}" for v in variants]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]

    def value(method: str, variant: str, key: str) -> str:
        if method == "average":
            return f"{100 * sum(results[variant][k][key] for k in methods) / len(methods):.1f}"
        return f"{100 * results[variant][method][key]:.1f}"

    for m in methods + ["average"]:
        cells = [value(m, v, "auc") for v in variants] + [value(m, v, "pointing") for v in variants]
        name = f"**{m}**" if m == "average" else m
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def fidelity_table(fidelity: Dict[str, Dict[str, float]]) -> str:
    lines = [
        "| variant | average AUC gain over dense, % points (± 1.96 s.e., paired) "
        "| sample's prediction kept % | relative logit change on the sample |",
        "|---|---:|---:|---:|",
    ]
    for variant, f in fidelity.items():
        gain = f"{100 * f['auc_gain']:+.1f} ± {196 * f['auc_gain_se']:.1f}"
        lines.append(f"| {variant} | {gain} | {100 * f['prediction_kept']:.1f} | {f['logit_change']:.3f} |")
    return "\n".join(lines)


def run_experiment(setup: TrojanSetup, log: Callable[[str], None] = lambda message: None) -> Dict:
    """Train, select, evaluate; a JSON-able dict with the setup, the model's scores and results."""
    from ..spade.solver import check_sparsity

    for sparsity in setup.sparsities:  # bad options fail before the training, not after it
        check_sparsity(sparsity)
    spade_sparsity(TrojanCNN(setup.size), 0.5, setup.keep_dense)
    started = time.perf_counter()
    train_set, clean, triggered = make_data(setup)
    log(f"training the trojaned CNN ({len(train_set[1])} images, {setup.epochs} epochs)")
    model = train(train_set, setup)
    trained = time.perf_counter()
    images, masks, stats = select_samples(model, clean, triggered, setup)
    log(
        f"clean accuracy {stats['clean_accuracy']:.3f}, attack success {stats['attack_success']:.3f}; "
        f"explaining {len(images)} of {stats['eligible']} switched test samples"
    )
    if len(images) == 0:
        raise RuntimeError("the backdoor switched no test sample; nothing to explain (train longer?)")
    results, fidelity = evaluate(model, images, masks, setup, log)
    return {
        "setup": asdict(setup),
        "model": {**stats, "explained": len(images), "train_seconds": trained - started},
        "results": results,
        "fidelity": fidelity,
        "seconds": time.perf_counter() - started,
    }


def report(outcome: Dict) -> str:
    setup, model = outcome["setup"], outcome["model"]
    pruned = "every Linear/Conv2d layer"
    if setup["keep_dense"]:
        pruned += f" except {', '.join(setup['keep_dense'])}"
    return "\n".join(
        [
            f"Trojaned digits CNN ({setup['size']}x{setup['size']}, {setup['patch']}x{setup['patch']} checkerboard "
            f"at a random position, {setup['poison_fraction']:.0%} of the training set poisoned to class "
            f"{setup['target_class']}" + (f", clutter {setup['clutter']:g}" if setup["clutter"] else "")
            + f"): clean test accuracy {model['clean_accuracy']:.1%}, attack success {model['attack_success']:.1%}.",
            f"{model['explained']} triggered test samples (of {model['eligible']} whose decision the patch switched); "
            f"SPADE prunes {pruned}, {setup['n_augmentations']} calibration views, seed {setup['seed']}"
            + (", exact refit" if setup["refit"] else "")
            + f"; {outcome['seconds']:.0f} s in all.",
            "",
            table(outcome["results"]),
            "",
            fidelity_table(outcome["fidelity"]),
        ]
    )


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``trojan`` as a subcommand of an ``argparse`` subparsers object (the CLI's)."""
    parser = commands.add_parser(
        "trojan",
        help="trojan benchmark: saliency maps against a backdoor patch, dense vs SPADE",
        description=__doc__.split("\n\n")[0],
    )
    _arguments(parser)
    parser.set_defaults(run=run)


def _arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrojanSetup()
    parser.add_argument("--samples", type=int, default=defaults.samples, help="triggered samples to explain (128)")
    parser.add_argument("--sparsity", type=float, nargs="+", default=list(defaults.sparsities),
                        help="SPADE sparsities to compare with the dense model (default 0.5 0.9)")
    parser.add_argument("--keep-dense", nargs="+", default=[], metavar="LAYER",
                        help="layers SPADE leaves dense (e.g. conv1)")
    parser.add_argument("--augmentations", type=int, default=defaults.n_augmentations,
                        help="calibration views per sample (default 64)")
    parser.add_argument("--refit", action="store_true", help="exact least-squares refit of the SparseGPT masks")
    parser.add_argument("--clutter", type=float, default=defaults.clutter,
                        help="strength of a random background added to every image (default 0: plain digits)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs (default 30)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of split, trigger, model, views")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 8 samples, 16 views, 10 epochs")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--results", metavar="PATH",
                        help="also write the tables into this Markdown file (e.g. docs/RESULTS.md), in a section "
                        "of their own named after the options")


def run(args: argparse.Namespace) -> int:
    setup = TrojanSetup(
        samples=8 if args.quick else args.samples,
        n_augmentations=16 if args.quick else args.augmentations,
        epochs=10 if args.quick else args.epochs,
        sparsities=tuple(args.sparsity),
        keep_dense=tuple(args.keep_dense),
        refit=args.refit,
        clutter=args.clutter,
        seed=args.seed,
    )
    if setup.samples < 1 or setup.n_augmentations < 1 or setup.epochs < 1:
        raise ValueError("--samples, --augmentations and --epochs must be at least 1")
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    outcome = run_experiment(setup, log)
    text = report(outcome)
    print(text)
    if args.results:
        from .results_markdown import write_section

        options = _options_of(args)
        command = "python -m captum_paramsal.experiments.trojan" + (f" {options}" if options else "")
        write_section(args.results, f"trojan {options or 'default'}", f"### `{command}`\n\n{text}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(outcome, f, indent=2)
    return 0


def _options_of(args: argparse.Namespace) -> str:
    """The options that differ from the defaults, as they would be typed."""
    defaults = TrojanSetup()
    parts = []
    if args.quick:
        parts.append("--quick")
    if args.samples != defaults.samples:
        parts.append(f"--samples {args.samples}")
    if tuple(args.sparsity) != tuple(defaults.sparsities):
        parts.append("--sparsity " + " ".join(f"{s:g}" for s in args.sparsity))
    if args.keep_dense:
        parts.append("--keep-dense " + " ".join(args.keep_dense))
    if args.augmentations != defaults.n_augmentations:
        parts.append(f"--augmentations {args.augmentations}")
    if args.refit:
        parts.append("--refit")
    if args.clutter != defaults.clutter:
        parts.append(f"--clutter {args.clutter:g}")
    if args.epochs != defaults.epochs:
        parts.append(f"--epochs {args.epochs}")
    if args.seed != defaults.seed:
        parts.append(f"--seed {args.seed}")
    return " ".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m captum_paramsal.experiments.trojan", description=__doc__.split("\n\n")[0]
    )
    _arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, RuntimeError) as error:
        print(f"trojan: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__: List[str] = [
    "TrojanCNN",
    "TrojanSetup",
    "attribution_methods",
    "checkerboard",
    "evaluate",
    "main",
    "pointing_game",
    "roc_auc",
    "run_experiment",
]
