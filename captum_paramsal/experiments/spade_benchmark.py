"""SPADE's claim on a benchmark that can show it: do sample-targeted sparse networks sharpen maps?

``python -m captum_paramsal.experiments.spade_benchmark`` (``--help`` for the options;
``--quick`` for a smoke run of about a minute). After the SPADE paper's trojan experiment
(Moakhar et al., ICML 2024: a trojaned ImageNet ResNet-50, emoji triggers, pixel ROC-AUC of
about ten Captum methods' maps against the patch), made offline
(:mod:`captum_paramsal.zoo.trojan_digits`): 32x32 composited colour digits on photographs, three
alpha-blended trigger patches, a trojaned ResNet-20 the project trains deterministically.

1. **Gate, printed before any SPADE number**: clean accuracy >= 85%, attack success >= 90%
   (every trigger), dense method-averaged pixel AUC <= 92 on the reported samples. A benchmark
   where dense maps already find the patch cannot show a gain: if the gate fails the command
   stops (exit status 3) and reports no SPADE number.
2. **Samples**: triggered test images whose clean version the model classifies correctly and
   whose triggered version it classifies as the trojan's class (the patch switched the
   decision), round robin over the three triggers, in a seeded order: the first ``--tune`` (32)
   tune the layer profile, the next ``--report`` (100) are reported.
3. **Maps**: Saliency, InputXGradient, IntegratedGradients, DeepLift, GuidedBackprop,
   GuidedGradCam (on ``layer3``), Occlusion and GradientShap explain the trojan's class; a map's
   pixel score is its absolute value summed over channels; pixel ROC-AUC against the patch.
4. **Configurations**, per solver (SparseGPT with its mask re-chosen every kernel, OBC):
   uniform sparsity 0.5 / 0.8 / 0.9 / 0.95 / 0.99 of every convolution but the stem and the
   classifier; a late-heavy profile; the profile tuned on the tuning samples (the grid below),
   reported on the others. Controls at the same sparsities: the same solver with second moments
   from random other images (``--views`` clean test images: not sample-targeted), and magnitude
   pruning. The dense network is the baseline of every paired gain.
5. **Statistics**: per sample, the gain of the method-averaged AUC over dense; the mean with a
   95% bootstrap interval (2000 resamples of the samples, seeded); the paired difference of the
   tuned targeted configuration and its untargeted control, with its interval. How often the
   pruned network keeps the sample's prediction.

Per-sample results go to ``--out`` (JSON lines, one per sample): an interrupted run resumes
where it stopped; ``--fresh`` starts over. The pruning of a sample depends on the sample only,
so each sample's second moments are computed once and every solver and sparsity is solved from
them (:meth:`~captum_paramsal.spade.SampleTargetedPruning.solve`); OBC's greedy run is shared by
all of the sample's OBC configurations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .trojan import roc_auc

MapFn = Callable[[Tensor, int], Tensor]
METHODS = (
    "Saliency",
    "InputXGradient",
    "IntegratedGradients",
    "DeepLift",
    "GuidedBackprop",
    "GuidedGradCam",
    "Occlusion",
    "GradientShap",
)
GATE = {"clean_accuracy": 0.85, "attack_success": 0.90, "dense_auc": 92.0}
UNIFORM = (0.5, 0.8, 0.9, 0.95, 0.99)
LATE_HEAVY = {"layer1.*": 0.2, "layer2.*": 0.8, "layer3.*": 0.95, "fc.weight": 0.95}
#: the tuning grid: early stage, middle stage, last stage and classifier
TUNE_GRID = {"layer1.*": (0.0, 0.2), "layer2.*": (0.8, 0.9), "layer3.*": (0.95, 0.99)}


@dataclass(frozen=True)
class BenchmarkSetup:
    """What one run measures; the defaults are the full run's."""

    tune: int = 32
    report: int = 100
    views: int = 1024
    sparsities: Tuple[float, ...] = UNIFORM
    solvers: Tuple[str, ...] = ("sparsegpt", "obc")
    tune_grid: Dict[str, Tuple[float, ...]] = field(default_factory=lambda: dict(TUNE_GRID))
    seed: int = 0
    late_heavy: bool = True
    #: False only for the smoke run, whose 3 samples are too few for the gate to mean anything
    enforce_gate: bool = True


@dataclass(frozen=True)
class Config:
    """One pruned network per sample: ``kind`` targeted / untargeted / magnitude."""

    name: str
    solver: str
    kind: str
    profile: str
    sparsity: Union[float, Dict[str, float]]


def profile_dict(stages: Dict[str, float]) -> Dict[str, float]:
    """A stage profile as a sparsity dict (the last stage's value also for the classifier)."""
    out = dict(stages)
    out.setdefault("fc.weight", out.get("layer3.*", 0.0))
    return out


def grid_profiles(grid: Dict[str, Tuple[float, ...]]) -> List[Dict[str, float]]:
    profiles: List[Dict[str, float]] = [{}]
    for pattern, values in grid.items():
        profiles = [{**p, pattern: v} for p in profiles for v in values]
    return [profile_dict(p) for p in profiles]


def profile_name(profile: Dict[str, float]) -> str:
    return "/".join(f"{v:g}" for k, v in profile.items() if k != "fc.weight")


def configurations(setup: BenchmarkSetup, tuned: Optional[Dict[str, Dict[str, float]]] = None) -> List[Config]:
    """Every configuration of the report set (``tuned``: solver -> profile, after tuning)."""
    out: List[Config] = []
    for solver in setup.solvers:
        for kind in ("targeted", "untargeted"):
            for s in setup.sparsities:
                out.append(Config(f"{kind} {solver} {s:g}", solver, kind, "uniform", s))
            if setup.late_heavy:
                out.append(Config(f"{kind} {solver} late", solver, kind, "late", dict(LATE_HEAVY)))
            if tuned is not None:
                out.append(Config(f"{kind} {solver} tuned", solver, kind, "tuned", tuned[solver]))
    for s in setup.sparsities:
        out.append(Config(f"magnitude {s:g}", "magnitude", "magnitude", "uniform", s))
    if setup.late_heavy:
        out.append(Config("magnitude late", "magnitude", "magnitude", "late", dict(LATE_HEAVY)))
    if tuned is not None:
        for solver in setup.solvers:
            out.append(Config(f"magnitude tuned-{solver}", "magnitude", "magnitude", "tuned", tuned[solver]))
    return out


def attribution_methods(model: nn.Module) -> Dict[str, MapFn]:
    """Name -> ``(x, target) -> (H, W)`` non-negative pixel scores of one sample ``x``.

    The methods hold the model, not its weights: inside
    :func:`~captum_paramsal.interventions.swapped_parameters` they explain the swapped network.
    """
    from captum.attr import (
        DeepLift,
        GradientShap,
        GuidedBackprop,
        GuidedGradCam,
        InputXGradient,
        IntegratedGradients,
        Occlusion,
        Saliency,
    )

    saliency, ixg, ig = Saliency(model), InputXGradient(model), IntegratedGradients(model)
    deeplift, gbp = DeepLift(model), GuidedBackprop(model)
    ggc, occlusion, shap = GuidedGradCam(model, model.layer3), Occlusion(model), GradientShap(model)

    def score(attr: Tensor) -> Tensor:
        # a non-finite map (a 0/0 in a method on a saturated output) scores as a flat map
        return torch.nan_to_num(attr.detach().abs().sum(dim=1)[0], nan=0.0, posinf=0.0, neginf=0.0)

    def gradient_shap(x: Tensor, t: int) -> Tensor:
        # GradientShap draws from torch's and numpy's global generators: fixed forks of both
        import numpy as np

        state = np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            np.random.seed(0)
            baselines = torch.cat([torch.zeros_like(x), torch.rand(3, *x.shape[1:])])
            try:
                return score(shap.attribute(x, baselines=baselines, target=t, n_samples=16, stdevs=0.1))
            finally:
                np.random.set_state(state)

    return {
        "Saliency": lambda x, t: score(saliency.attribute(x, target=t)),
        "InputXGradient": lambda x, t: score(ixg.attribute(x, target=t)),
        "IntegratedGradients": lambda x, t: score(ig.attribute(x, target=t, n_steps=32)),
        "DeepLift": lambda x, t: score(deeplift.attribute(x, target=t)),
        "GuidedBackprop": lambda x, t: score(gbp.attribute(x, target=t)),
        "GuidedGradCam": lambda x, t: score(ggc.attribute(x, target=t)),
        "Occlusion": lambda x, t: score(
            occlusion.attribute(
                x, target=t, sliding_window_shapes=(3, 4, 4), strides=(3, 2, 2), perturbations_per_eval=64
            )
        ),
        "GradientShap": gradient_shap,
    }


def map_aucs(methods: Dict[str, MapFn], x: Tensor, target: int, mask: Tensor) -> Dict[str, float]:
    """Pixel ROC-AUC (in %) of each method's map of ``target`` against ``mask``."""
    import warnings

    with warnings.catch_warnings():
        # DeepLift and GuidedBackprop warn about reused modules / setting eval mode on every call
        warnings.simplefilter("ignore")
        return {name: 100.0 * roc_auc(fn(x, target), mask) for name, fn in methods.items()}


def triggered_sets(data) -> List[Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Each trigger's :meth:`~captum_paramsal.zoo.trojan_digits.TrojanDigitsData.triggered_test`,
    made once (pasting the triggers is a loop over the test set) for the samples to index."""
    return [data.triggered_test(trigger) for trigger in range(len(data.setup.targets))]


def select_samples(model: nn.Module, data, seed: int, triggered: Optional[Sequence] = None) -> List[Dict]:
    """Triggered test samples whose trigger switched a correct decision to the trojan's class,
    round robin over the triggers in a seeded order: ``[{trigger, index, label}, ...]``.
    ``triggered``: :func:`triggered_sets` of ``data``, when already made."""
    triggered = triggered_sets(data) if triggered is None else triggered
    per_trigger = []
    for trigger, target in enumerate(data.setup.targets):
        x, _, _, labels = triggered[trigger]
        clean = data.test_images[data.test_labels != target]
        with torch.no_grad():
            ok = (model(clean).argmax(1) == labels) & (model(x).argmax(1) == target)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed * 10 + trigger))
        per_trigger.append([{"trigger": trigger, "index": int(i), "label": int(labels[i])} for i in order if ok[i]])
    out = []
    for row in range(max(len(p) for p in per_trigger)):
        out.extend(p[row] for p in per_trigger if row < len(p))
    return out


def sample_of(triggered: Sequence, entry: Dict) -> Tuple[Tensor, Tensor, int]:
    """``(x (1, 3, 32, 32), patch mask (32, 32), trojan class)`` of a :func:`select_samples` entry,
    from :func:`triggered_sets`."""
    x, masks, targets, _ = triggered[entry["trigger"]]
    return x[entry["index"] : entry["index"] + 1], masks[entry["index"]], int(targets[entry["index"]])


def magnitude_weights(model: nn.Module, layer_sparsity: Dict[str, float]) -> Dict[str, Tensor]:
    """Each layer with its ``round(s * n)`` smallest-magnitude weights set to zero, the rest kept."""
    params = dict(model.named_parameters())
    out = {}
    for name, s in layer_sparsity.items():
        weight = params[name].detach()
        k = round(s * weight.numel())
        if k == 0:
            continue
        flat = weight.flatten().clone()
        flat[flat.abs().topk(k, largest=False).indices] = 0.0
        out[name] = flat.reshape(weight.shape)
    return out


def pruned_fraction(model: nn.Module, layer_sparsity: Dict[str, float]) -> float:
    """Share of the covered-or-not prunable weights (the stem excluded) a configuration zeroes."""
    from ..spade.sample_pruning import prunable_weights, stem_weight

    params = dict(model.named_parameters())
    stem = stem_weight(model)
    names = [n for n in prunable_weights(model) if n != stem]
    total = sum(params[n].numel() for n in names)
    return sum(round(layer_sparsity.get(n, 0.0) * params[n].numel()) for n in names) / total


class Runner:
    """The model, its methods and the sample-independent pruned networks of one run."""

    def __init__(self, setup: BenchmarkSetup, log: Callable[[str], None]) -> None:
        from ..spade import SampleTargetedPruning
        from ..zoo.trojan_digits import load_trojan_resnet

        self.setup, self.log = setup, log
        self.model, self.data = load_trojan_resnet()
        self.methods = attribution_methods(self.model)
        self.triggered = triggered_sets(self.data)
        # every layer a configuration may prune (all but the stem) gets a second moment
        self.pruning = SampleTargetedPruning(self.model, sparsity=0.5, n_augmentations=setup.views, seed=setup.seed)
        self._untargeted_moments = None
        self._global: Dict[str, Dict[str, Tensor]] = {}

    def untargeted_moments(self):
        """Second moments of ``views`` random clean test images (one batch, not the sample's views)."""
        if self._untargeted_moments is None:
            pick = torch.randperm(len(self.data.test_labels), generator=torch.Generator().manual_seed(self.setup.seed))
            self._untargeted_moments = self.pruning.batch_moments((self.data.test_images[pick[: self.setup.views]],))
        return self._untargeted_moments

    def global_weights(self, config: Config) -> Dict[str, Tensor]:
        """The pruned weights of a configuration that does not depend on the sample (cached)."""
        from ..spade.sample_pruning import resolve_sparsity

        if config.name not in self._global:
            if config.kind == "magnitude":
                self._global[config.name] = magnitude_weights(self.model, resolve_sparsity(self.model, config.sparsity))
            else:
                self._global[config.name] = self.pruning.solve(
                    self.untargeted_moments(), sparsity=config.sparsity, solver=config.solver
                )
        return self._global[config.name]

    def sample(self, entry: Dict) -> Tuple[Tensor, Tensor, int]:
        return sample_of(self.triggered, entry)

    def evaluate(self, entry: Dict, configs: Sequence[Config], dense: Optional[Dict[str, float]] = None) -> Dict:
        """Dense and every configuration's AUCs for one sample, with phase timings; ``dense``:
        the sample's dense AUCs when already computed (the gate computes them)."""
        from ..interventions import swapped_parameters

        x, mask, target = self.sample(entry)
        times = {"moments": 0.0, "solve": 0.0, "attribution": 0.0}
        if dense is None:
            started = time.perf_counter()
            dense = map_aucs(self.methods, x, target, mask)
            times["attribution"] += time.perf_counter() - started
        out: Dict = {**entry, "target": target, "dense": dense, "configs": {}}
        moments, cache = None, {}
        # the sparsest OBC configuration first, so that one greedy run serves the others
        ordered = sorted(configs, key=lambda c: -_max_sparsity(c.sparsity) if c.solver == "obc" else 0.0)
        for config in ordered:
            started = time.perf_counter()
            if config.kind == "targeted":
                if moments is None:
                    moments = self.pruning.second_moments(x)
                    times["moments"] += time.perf_counter() - started
                    started = time.perf_counter()
                weights = self.pruning.solve(
                    moments, sparsity=config.sparsity, solver=config.solver, trajectories=cache
                )
            else:
                weights = self.global_weights(config)
            times["solve"] += time.perf_counter() - started
            started = time.perf_counter()
            with swapped_parameters(self.model, weights):
                with torch.no_grad():
                    prediction = int(self.model(x).argmax(1))
                aucs = map_aucs(self.methods, x, target, mask)
            times["attribution"] += time.perf_counter() - started
            out["configs"][config.name] = {"auc": aucs, "kept": prediction == target}
        out["seconds"] = {k: round(v, 3) for k, v in times.items()}
        return out


def _max_sparsity(sparsity: Union[float, Dict[str, float]]) -> float:
    return max(sparsity.values()) if isinstance(sparsity, dict) else float(sparsity)


def mean_auc(aucs: Dict[str, float]) -> float:
    return sum(aucs.values()) / len(aucs)


def bootstrap_interval(values: Sequence[float], seed: int = 0, resamples: int = 2000) -> Tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its 95% percentile bootstrap interval
    (:func:`~captum_paramsal.analysis.intervals.bootstrap_mean`)."""
    from ..analysis.intervals import bootstrap_mean

    e = bootstrap_mean(list(values), resamples=resamples, seed=seed)
    return e.value, e.low, e.high


def gains(rows: Sequence[Dict], name: str) -> List[float]:
    """Per sample: method-averaged AUC of configuration ``name`` minus dense."""
    return [mean_auc(r["configs"][name]["auc"]) - mean_auc(r["dense"]) for r in rows]


def summarize(rows: Sequence[Dict], configs: Sequence[Config], model: nn.Module) -> Dict[str, Dict]:
    from ..spade.sample_pruning import resolve_sparsity

    out = {}
    for config in configs:
        mean, low, high = bootstrap_interval(gains(rows, config.name))
        kept = [float(r["configs"][config.name]["kept"]) for r in rows]
        per_method = {
            m: sum(r["configs"][config.name]["auc"][m] - r["dense"][m] for r in rows) / len(rows) for m in METHODS
        }
        out[config.name] = {
            **asdict(config),
            "fraction": pruned_fraction(model, resolve_sparsity(model, config.sparsity)),
            "gain": mean,
            "low": low,
            "high": high,
            "kept": sum(kept) / len(kept),
            "per_method_gain": per_method,
        }
    return out


def _read_rows(path: str) -> List[Dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def _append_row(path: str, row: Dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _run_rows(
    runner: Runner,
    entries: Sequence[Dict],
    configs: Sequence[Config],
    path: str,
    desc: str,
    show: bool,
    dense: Optional[Dict[Tuple[int, int], Dict[str, float]]] = None,
) -> List[Dict]:
    from tqdm.auto import tqdm

    names = [c.name for c in configs]
    rows = [r for r in _read_rows(path) if all(n in r["configs"] for n in names)]
    done = {(r["trigger"], r["index"]) for r in rows}
    todo = [e for e in entries if (e["trigger"], e["index"]) not in done]
    for entry in tqdm(todo, desc=desc, unit="sample", disable=not show):
        row = runner.evaluate(entry, configs, (dense or {}).get((entry["trigger"], entry["index"])))
        _append_row(path, row)
        rows.append(row)
    order = {(e["trigger"], e["index"]): i for i, e in enumerate(entries)}
    kept = [r for r in rows if (r["trigger"], r["index"]) in order]
    return sorted(kept, key=lambda r: order[(r["trigger"], r["index"])])


def gate(runner: Runner, rows: Sequence[Dict]) -> Dict:
    """The benchmark's gate: the model's scores and the dense maps' method-averaged AUC."""
    from ..zoo.train_trojan_resnet import scores

    s = scores(runner.model, runner.data)
    attacks = [v for k, v in s.items() if k.startswith("attack_success_")]
    dense = sum(mean_auc(r["dense"]) for r in rows) / max(1, len(rows))
    checks = {
        "clean_accuracy": s["clean_accuracy"] >= GATE["clean_accuracy"],
        "attack_success": min(attacks) >= GATE["attack_success"],
        "dense_auc": dense <= GATE["dense_auc"],
    }
    per_method = {m: sum(r["dense"][m] for r in rows) / max(1, len(rows)) for m in METHODS}
    return {**s, "dense_auc": dense, "dense_per_method": per_method, "checks": checks, "passed": all(checks.values())}


def dense_rows(runner: Runner, entries: Sequence[Dict]) -> List[Dict]:
    out = []
    for e in entries:
        x, mask, target = runner.sample(e)
        out.append({**e, "dense": map_aucs(runner.methods, x, target, mask)})
    return out


def run_benchmark(setup: BenchmarkSetup, out_dir: str, log: Callable[[str], None], show: bool = True) -> Dict:
    """Gate, tuning, report; returns everything the report and the figure need."""
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "run.json")
    meta = {"setup": asdict(setup)}
    if os.path.exists(meta_path):
        previous = json.load(open(meta_path))
        if previous.get("setup") != json.loads(json.dumps(meta["setup"])):
            raise ValueError(f"{out_dir} holds a run with other options; pass --fresh or another --out")
        meta = previous
    runner = Runner(setup, log)
    entries = select_samples(runner.model, runner.data, setup.seed, runner.triggered)
    if len(entries) < setup.tune + setup.report:
        raise ValueError(f"only {len(entries)} samples qualify; ask for fewer than --tune + --report")
    tune_entries, report_entries = entries[: setup.tune], entries[setup.tune : setup.tune + setup.report]

    log("gate: clean accuracy, attack success and the dense maps' AUC on the reported samples")
    report_dense = dense_rows(runner, report_entries)
    checked = gate(runner, report_dense)
    log(
        f"gate: clean accuracy {100 * checked['clean_accuracy']:.1f}% (>= 85), attack success "
        + ", ".join(f"{100 * checked[f'attack_success_{t}']:.1f}%" for t in range(3))
        + f" (>= 90), dense method-averaged AUC {checked['dense_auc']:.1f} (<= {GATE['dense_auc']:g}): "
        + ("passed" if checked["passed"] else "FAILED")
        + ("" if setup.enforce_gate else " (smoke run: shown, not enforced)")
    )
    meta["gate"] = checked
    json.dump(meta, open(meta_path, "w"), indent=1)
    if setup.enforce_gate and not checked["passed"]:
        return {"setup": asdict(setup), "gate": checked}

    tuned = meta.get("tuned")
    profiles = grid_profiles(setup.tune_grid)
    if tuned is None:
        tune_configs = [
            Config(f"tune {solver} {profile_name(p)}", solver, "targeted", "grid", p)
            for solver in setup.solvers
            for p in profiles
        ]
        log(f"tuning: {len(profiles)} profiles x {len(setup.solvers)} solvers on {len(tune_entries)} samples")
        rows = _run_rows(runner, tune_entries, tune_configs, os.path.join(out_dir, "tune.jsonl"), "tune", show)
        tuned, tuning = {}, {}
        for solver in setup.solvers:
            scored = {profile_name(p): (sum(gains(rows, f"tune {solver} {profile_name(p)}")) / len(rows), p)
                      for p in profiles}
            best = max(scored, key=lambda k: scored[k][0])
            tuned[solver] = scored[best][1]
            tuning[solver] = {k: v[0] for k, v in scored.items()}
            log(f"tuned {solver}: {best} (mean gain on the tuning samples {scored[best][0]:+.2f})")
        meta["tuned"], meta["tuning"] = tuned, tuning
        json.dump(meta, open(meta_path, "w"), indent=1)
    configs = configurations(setup, tuned)
    log(f"report: {len(configs)} configurations on {len(report_entries)} samples")
    dense = {(r["trigger"], r["index"]): r["dense"] for r in report_dense}  # computed once, for the gate
    rows = _run_rows(runner, report_entries, configs, os.path.join(out_dir, "report.jsonl"), "report", show, dense)
    summary = summarize(rows, configs, runner.model)
    claims = {}
    for solver in setup.solvers:
        targeted, control = gains(rows, f"targeted {solver} tuned"), gains(rows, f"untargeted {solver} tuned")
        paired = [a - b for a, b in zip(targeted, control)]
        mean, low, high = bootstrap_interval(paired)
        tuned_row = summary[f"targeted {solver} tuned"]
        claims[solver] = {
            "gain": tuned_row["gain"],
            "low": tuned_row["low"],
            "high": tuned_row["high"],
            "over_untargeted": mean,
            "over_untargeted_low": low,
            "over_untargeted_high": high,
            "holds": tuned_row["low"] > 0 and low > 0,
        }
    seconds = {k: sum(r["seconds"][k] for r in rows) / len(rows) for k in rows[0]["seconds"]}
    return {
        "setup": asdict(setup),
        "gate": checked,
        "tuned": tuned,
        "tuning": meta.get("tuning"),
        "summary": summary,
        "claims": claims,
        "samples": len(rows),
        "dense": {m: sum(r["dense"][m] for r in rows) / len(rows) for m in METHODS},
        "seconds_per_sample": seconds,
    }


def report(outcome: Dict) -> str:
    """The Markdown tables of a finished run."""
    g = outcome["gate"]
    lines = [
        f"Gate: clean accuracy {100 * g['clean_accuracy']:.1f}% (bar 85), attack success "
        + " / ".join(f"{100 * g[f'attack_success_{t}']:.1f}%" for t in range(3))
        + f" (bar 90), dense method-averaged pixel AUC {g['dense_auc']:.1f} (bar <= {GATE['dense_auc']:g}): "
        + ("**passed**." if g["passed"] else "**failed**")
        + (": no SPADE number is reported on this model." if "summary" not in outcome else ""),
    ]
    if "dense_per_method" in g:
        lines.append(
            "Dense pixel AUC per method: " + ", ".join(f"{m} {v:.1f}" for m, v in g["dense_per_method"].items()) + "."
        )
    if "summary" not in outcome:
        return "\n".join(lines)
    if not outcome["setup"]["enforce_gate"]:
        lines.append("A smoke run (`--quick`): the gate is shown, not enforced; its numbers are not a result.")
    s = outcome["setup"]
    lines += [
        "",
        f"{outcome['samples']} reported samples, {s['tune']} other samples for tuning, {s['views']} views per sample. "
        "Gain = method-averaged pixel AUC of the pruned network minus dense, per sample; mean and 95% bootstrap "
        "interval. Kept = share of samples whose prediction the pruned network keeps.",
        "",
        "| configuration | weights pruned | gain [95% CI] | kept |",
        "|---|---:|---|---:|",
    ]
    for name, row in outcome["summary"].items():
        lines.append(
            f"| {name} | {100 * row['fraction']:.0f}% | {row['gain']:+.2f} [{row['low']:+.2f}, {row['high']:+.2f}] "
            f"| {100 * row['kept']:.0f}% |"
        )
    lines += ["", "Tuned profiles (layer1 / layer2 / layer3 and fc): " + ", ".join(
        f"{solver} {profile_name(p)}" for solver, p in outcome["tuned"].items())]
    lines += ["", "| method | dense AUC | " + " | ".join(f"gain, tuned {k}" for k in outcome["tuned"]) + " |",
              "|---|---:|" + "---:|" * len(outcome["tuned"])]
    for m in METHODS:
        cells = " | ".join(
            f"{outcome['summary'][f'targeted {k} tuned']['per_method_gain'][m]:+.2f}" for k in outcome["tuned"]
        )
        lines.append(f"| {m} | {outcome['dense'][m]:.1f} | {cells} |")
    lines.append("")
    for solver, c in outcome["claims"].items():
        verdict = "holds" if c["holds"] else "does not hold"
        lines.append(
            f"- **{solver}**: tuned gain {c['gain']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]; over its untargeted "
            f"control {c['over_untargeted']:+.2f} [{c['over_untargeted_low']:+.2f}, {c['over_untargeted_high']:+.2f}]: "
            f"the claim {verdict} here."
        )
    sec = outcome["seconds_per_sample"]
    per_phase = ", ".join(f"{k} {v:.1f}" for k, v in sec.items())
    lines += ["", f"Seconds per reported sample (all configurations): {per_phase}"]
    return "\n".join(lines)


def plot(outcome: Dict, path: str) -> None:
    """The figure: gain over dense against sparsity with intervals, and the kept predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = outcome["summary"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    lines = [(f"targeted {s}", f"SPADE {s}") for s in outcome["setup"]["solvers"]]
    lines += [(f"untargeted {s}", f"untargeted {s} (control)") for s in outcome["setup"]["solvers"]]
    lines += [("magnitude", "magnitude (control)")]
    for prefix, label in lines:
        rows = [summary[f"{prefix} {s:g}"] for s in outcome["setup"]["sparsities"]]
        x = [r["fraction"] for r in rows]
        y = [r["gain"] for r in rows]
        err = [[r["gain"] - r["low"] for r in rows], [r["high"] - r["gain"] for r in rows]]
        handle = left.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        colour = handle[0].get_color()
        right.plot(x, [100 * r["kept"] for r in rows], marker="o", color=colour, label=label)
        for profile, marker in (("late", "s"), ("tuned", "*")):
            key = f"{prefix} {profile}" if prefix != "magnitude" else None
            if key is None:
                key = "magnitude late" if profile == "late" else None
            if key and key in summary:
                r = summary[key]
                left.errorbar([r["fraction"]], [r["gain"]], yerr=[[r["gain"] - r["low"]], [r["high"] - r["gain"]]],
                              marker=marker, markersize=10 if marker == "*" else 6, color=colour, capsize=3)
    left.axhline(0, color="grey", lw=0.8)
    left.set_xlabel("share of prunable weights pruned (stem dense)")
    left.set_ylabel("gain in method-averaged pixel AUC over dense")
    left.set_title("per-sample paired gain, 95% CI (square: late-heavy, star: tuned)")
    right.set_xlabel("share of prunable weights pruned")
    right.set_ylabel("% of samples whose prediction is kept")
    right.set_ylim(0, 105)
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


QUICK = BenchmarkSetup(
    tune=1,
    report=2,
    views=32,
    sparsities=(0.9,),
    tune_grid={"layer1.*": (0.0,), "layer2.*": (0.8,), "layer3.*": (0.95,)},
    late_heavy=False,
    enforce_gate=False,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``spade-benchmark`` as a subcommand of an ``argparse`` subparsers object (the CLI's)."""
    parser = commands.add_parser(
        "spade-benchmark",
        help="SPADE on the trojaned ResNet-20: gate, tuned profile, controls, intervals",
        description=__doc__.split("\n\n")[0],
    )
    _arguments(parser)
    parser.set_defaults(run=run)


def _arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchmarkSetup()
    parser.add_argument("--tune", type=int, default=d.tune, help="samples that tune the profile (32)")
    parser.add_argument("--report", type=int, default=d.report, help="samples reported (100)")
    parser.add_argument("--views", type=int, default=d.views, help="calibration views per sample (1024, the paper's)")
    parser.add_argument("--solvers", nargs="+", default=list(d.solvers), choices=["sparsegpt", "obc"])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 + 2 samples, 32 views, one sparsity")
    parser.add_argument("--out", default=None, help="per-sample results (resumable); default .spade_benchmark[_quick]")
    parser.add_argument("--fresh", action="store_true", help="discard the results in --out and start over")
    parser.add_argument("--json", metavar="PATH", help="also write the outcome as JSON")
    parser.add_argument("--figure", metavar="PATH", help="write the figure (PNG)")
    parser.add_argument("--results", metavar="PATH", help="write the tables into this Markdown file's section")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    if args.quick:
        setup = QUICK
    else:
        setup = BenchmarkSetup(tune=args.tune, report=args.report, views=args.views, solvers=tuple(args.solvers))
    for value, flag in ((setup.tune, "--tune"), (setup.report, "--report"), (setup.views, "--views")):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    out_dir = args.out or (".spade_benchmark_quick" if args.quick else ".spade_benchmark")
    if args.fresh and os.path.isdir(out_dir):
        for name in ("run.json", "tune.jsonl", "report.jsonl"):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    outcome = run_benchmark(setup, out_dir, log, show=not args.no_progress)
    text = report(outcome)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(outcome, f, indent=1)
    if args.results:  # a failed gate is a result too: the section says so, with no SPADE number
        from .results_markdown import write_section

        command = "python -m captum_paramsal.experiments.spade_benchmark" + (" --quick" if args.quick else "")
        write_section(args.results, "spade benchmark" + (" quick" if args.quick else ""), f"### `{command}`\n\n{text}")
    if "summary" not in outcome:
        return 3
    if args.figure:
        plot(outcome, args.figure)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m captum_paramsal.experiments.spade_benchmark", description=__doc__.split("\n\n")[0]
    )
    _arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        print(f"spade-benchmark: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
