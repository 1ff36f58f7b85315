"""Salient-parameter federated learning measured: accuracy against rounds and against bytes.

``python -m captum_paramsal.experiments.federated [--quick] [--out docs]`` runs the compared
methods of :mod:`captum_paramsal.federated.digits_task` (FedAvg, FedProx, SCAFFOLD, FedPer,
SPATL as its code means it: L2 selection + SCAFFOLD + private head, saliency selection +
SCAFFOLD + private head, random selection + SCAFFOLD + private head; the selection methods at
equal rho) on the bundled digits, 10 clients, a Dirichlet label split with alpha 0.1 and 0.5,
3 seeds, all in ONE Flower simulation (one Ray start-up). It writes the section "federated" of
``docs/RESULTS.md`` (the settings, a table per alpha: rounds to 80% accuracy, MB per round per
client down and up, total MB to 80%, final accuracy over seeds; plain statements computed from
the numbers), the figure ``docs/figures/federated_accuracy.png`` and the raw per-round results
``docs/federated_runs.json``, from which ``--from-json`` writes the section and figure again
without running anything.

Accuracy is personalised: each client's own held-out quarter, with its own head where the head
is private, weighted by held-out samples. Bytes are what the messages carry
(``ArrayRecord.count_bytes()``), per client, MB = 10^6 bytes. Deterministic given the seeds:
each client's steps are seeded, and the server sums the replies in float64 in client order (not
in the order Flower hands them over, which depends on which client finishes first). ``--quick``
(5 clients, one alpha, one seed, six methods, rho 0.1, 5 rounds) is for the tests. Progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .results_markdown import write_section

SECTION = "federated"
FIGURE = "federated_accuracy.png"
RAW = "federated_runs.json"
#: the accuracy "rounds to target" counts to: the paper's 80% (CIFAR-10), fixed, not tuned to the results
TARGET = 0.80
#: what "close" means for SPATL's rounds against SCAFFOLD's (the paper: 52 against 49)
CLOSE = 0.25
#: the paper's figures (CIFAR-10, ResNet-20, 10 clients, 80%; ../shared/RESEARCH.md)
PAPER_ROUNDS = {"fedavg": 203, "fedprox": 288, "scaffold": 49, "spatl": 52}
PAPER_BYTES_RATIO = 3.8  # FedAvg's total bytes to 80% over SPATL's

DENSE = ("fedavg", "fedprox", "scaffold", "fedper")
LABELS = {"fedavg": "FedAvg", "fedprox": "FedProx", "scaffold": "SCAFFOLD", "fedper": "FedPer",
          "spatl-l2": "SPATL (L2)", "saliency": "saliency", "random": "random"}
COLOURS = {"fedavg": "black", "fedprox": "0.55", "scaffold": "tab:brown", "fedper": "tab:purple",
           "spatl-l2": "tab:blue", "saliency": "tab:red", "random": "tab:green"}
# two-sided 95% Student t quantiles by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass(frozen=True)
class Setting:
    """What is run: clients, label skews, seeds (each seed draws its own Dirichlet split and its
    own local shuffles), methods, rho of the selection methods, and every client's training."""

    clients: int
    alphas: Tuple[float, ...]
    seeds: Tuple[int, ...]
    methods: Tuple[str, ...]
    rhos: Tuple[float, ...]
    rounds: int
    lr: float
    epochs: int
    batch_size: int = 32


FULL = Setting(clients=10, alphas=(0.1, 0.5), seeds=(0, 1, 2),
               methods=("fedavg", "fedprox", "scaffold", "fedper", "spatl-l2", "saliency", "random"),
               rhos=(0.1, 0.3, 0.5), rounds=20, lr=0.05, epochs=2)
QUICK = Setting(clients=5, alphas=(0.5,), seeds=(0,),
                methods=("fedavg", "scaffold", "fedper", "spatl-l2", "saliency", "random"), rhos=(0.1,), rounds=5,
                lr=0.05, epochs=2)


def _progress(text: str) -> None:
    print(f"[federated] {text}", file=sys.stderr, flush=True)


# -- running ------------------------------------------------------------------------------------------


def planned(setting: Setting) -> List[Dict]:
    """One entry per federation: method, rho (1.0 for the dense methods), alpha, seed, name."""
    from ..federated.digits_task import SELECTION_METHODS

    plan = []
    for alpha in setting.alphas:
        for seed in setting.seeds:
            for method in setting.methods:
                for rho in (setting.rhos if method in SELECTION_METHODS else (1.0,)):
                    label = f"{method}@{rho:g}" if method in SELECTION_METHODS else method
                    plan.append({"method": method, "rho": float(rho), "alpha": float(alpha), "seed": int(seed),
                                 "name": f"{label} alpha={alpha:g} seed={seed}"})
    return plan


def run_record(entry: Dict, result) -> Dict:
    """A federation's result as JSON values: per round the accuracy of the encoder the clients
    received (round 1's is the initial model), per client too, bytes down and up per client,
    coverage, rejected replies; the final accuracy."""
    rounds = [{"round": r.round, "accuracy_received": r.accuracy_received,
               "client_accuracy_received": list(r.client_accuracy_received),
               "bytes_down": [int(b) for b in r.bytes_down], "bytes_up": [int(b) for b in r.bytes_up],
               "coverage": dict(r.coverage), "rejected": [list(x) for x in r.rejected]} for r in result.rounds]
    return dict(entry, rounds=rounds, final_accuracy=result.final_accuracy,
                final_client_accuracy=list(result.final_client_accuracy))


def run_federations(setting: Setting, temp_dir: Optional[str] = None) -> List[Dict]:
    """Every planned federation in one :func:`~captum_paramsal.federated.simulate` call."""
    from ..federated import simulate
    from ..federated.digits_task import digits_clients, method_federation

    plan = planned(setting)
    federations = [
        method_federation(e["method"], digits_clients(setting.clients, e["alpha"], e["seed"]), setting.rounds,
                          rho=e["rho"], seed=e["seed"], lr=setting.lr, epochs=setting.epochs,
                          batch_size=setting.batch_size, name=e["name"])
        for e in plan
    ]
    started = time.perf_counter()
    results, first = [], []

    def on_result(result) -> None:
        results.append(result)
        k = len(results)
        elapsed = time.perf_counter() - started
        first.append(elapsed) if k == 1 else None
        left = "" if k == 1 else f", about {(elapsed - first[0]) / (k - 1) * (len(plan) - k):.0f} s to go"
        _progress(f"federation {k} of {len(plan)}: {result.name}: final accuracy {result.final_accuracy:.3f}; "
                  f"{elapsed:.0f} s elapsed{left}")

    _progress(f"{len(plan)} federations of {setting.clients} clients, {setting.rounds} rounds each, "
              f"in one Flower simulation (Ray starts first, about 15 s)")
    with tempfile.TemporaryDirectory(prefix="cps-fl-exp-", dir=temp_dir) as folder:
        simulate(federations, temp_dir=folder, on_result=on_result)
    return [run_record(e, r) for e, r in zip(plan, results)]


# -- what the runs say ----------------------------------------------------------------------------------


def accuracy_curve(run: Dict) -> List[float]:
    """Accuracy after round 0 (the initial model), 1, ..., R."""
    return [r["accuracy_received"] for r in run["rounds"]] + [run["final_accuracy"]]


def megabytes(run: Dict) -> Tuple[List[float], List[float]]:
    """Per round, MB per client (mean over clients), (down, up)."""
    down = [sum(r["bytes_down"]) / len(r["bytes_down"]) / 1e6 for r in run["rounds"]]
    up = [sum(r["bytes_up"]) / max(1, len(r["bytes_up"])) / 1e6 for r in run["rounds"]]
    return down, up


def cumulative_megabytes(run: Dict) -> List[float]:
    """Per client, MB down + up after round 0 (nothing), 1, ..., R."""
    down, up = megabytes(run)
    total, out = 0.0, [0.0]
    for d, u in zip(down, up):
        total += d + u
        out.append(total)
    return out


def rounds_to(run: Dict, target: float = TARGET) -> Optional[int]:
    """The first round after which the accuracy is at least ``target`` (None: never)."""
    return next((r for r, a in enumerate(accuracy_curve(run)) if r > 0 and a >= target), None)


@dataclass
class Spread:
    """Mean, sample standard deviation and 95% t-interval half-width (mean +- t sd / sqrt(n)) over n values."""

    mean: float
    sd: float
    half: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        n = len(values)
        if n == 0:
            return cls(math.nan, math.nan, math.nan, 0)
        mean = sum(values) / n
        if n == 1:
            return cls(mean, math.nan, math.nan, 1)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        return cls(mean, sd, _T95.get(n - 1, 1.96) * sd / math.sqrt(n), n)

    @property
    def interval(self) -> Tuple[float, float]:
        return self.mean - self.half, self.mean + self.half


@dataclass
class Row:
    """One method (at one rho) at one alpha, over seeds."""

    method: str
    rho: float
    down: float  # MB per round per client
    up: float
    rounds: List[Optional[int]]  # to the target, per seed
    total: List[Optional[float]]  # MB per client to the target, per seed
    final: Spread

    @property
    def label(self) -> str:
        return LABELS[self.method] + ("" if self.method in DENSE else f" rho={self.rho:g}")

    @property
    def reached(self) -> List[int]:
        return [r for r in self.rounds if r is not None]

    @property
    def mean_rounds(self) -> Optional[float]:
        """Mean rounds to the target, only where every seed reached it."""
        return sum(self.rounds) / len(self.rounds) if self.rounds and len(self.reached) == len(self.rounds) else None

    @property
    def mean_total(self) -> Optional[float]:
        return sum(self.total) / len(self.total) if self.mean_rounds is not None else None


def runs_of(runs: Sequence[Dict], method: str, rho: float, alpha: float) -> List[Dict]:
    return sorted((r for r in runs if r["method"] == method and r["rho"] == rho and r["alpha"] == alpha),
                  key=lambda r: r["seed"])


def rows_of(runs: Sequence[Dict], setting: Setting, alpha: float, target: float = TARGET) -> List[Row]:
    rows = []
    for method in setting.methods:
        for rho in ((1.0,) if method in DENSE else setting.rhos):
            chosen = runs_of(runs, method, rho, alpha)
            if not chosen:
                continue
            downs, ups = zip(*(megabytes(r) for r in chosen))
            down = sum(sum(d) / len(d) for d in downs) / len(downs)
            up = sum(sum(u) / len(u) for u in ups) / len(ups)
            reach = [rounds_to(r, target) for r in chosen]
            total = [None if k is None else cumulative_megabytes(r)[k] for r, k in zip(chosen, reach)]
            rows.append(Row(method, rho, down, up, reach, total, Spread.of([r["final_accuracy"] for r in chosen])))
    return rows


def _pm(s: Spread, percent: bool = True, digits: int = 1) -> str:
    scale = 100 if percent else 1
    if s.n == 0:
        return "-"
    if s.n == 1:
        return f"{s.mean * scale:.{digits}f}"
    return f"{s.mean * scale:.{digits}f} ± {s.sd * scale:.{digits}f}"


def _interval(s: Spread, percent: bool = True, digits: int = 1, signed: bool = False, clip: bool = False) -> str:
    if s.n < 2:
        return "-"
    scale = 100 if percent else 1
    low, high = s.interval
    if clip:  # an accuracy's interval, clipped to [0, 1]
        low, high = max(0.0, low), min(1.0, high)
    sign = "+" if signed else ""
    return f"[{low * scale:{sign}.{digits}f}, {high * scale:{sign}.{digits}f}]"


def table(rows: Sequence[Row], seeds: int, target: float = TARGET) -> str:
    head = (f"| method | MB/round down | MB/round up | rounds to {target:.0%} | total MB to {target:.0%} "
            f"| final accuracy % (mean ± sd) | 95% interval |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for row in rows:
        reached = len(row.reached)
        if reached == 0:
            rounds = total = "not reached"
        elif reached < seeds:
            rounds = f"{sum(row.reached) / reached:.1f} ({reached}/{seeds} seeds)"
            totals = [t for t in row.total if t is not None]
            total = f"{sum(totals) / len(totals):.2f} ({reached}/{seeds} seeds)"
        else:
            rounds = f"{row.mean_rounds:.1f}" + (f" ({min(row.rounds)}-{max(row.rounds)})" if seeds > 1 else "")
            total = f"{row.mean_total:.2f}"
        lines.append(f"| {row.label} | {row.down:.3f} | {row.up:.3f} | {rounds} | {total} | {_pm(row.final)} "
                     f"| {_interval(row.final, clip=True)} |")
    return "\n".join(lines)


def _verdict(s: Spread) -> str:
    """"beats" / "loses to" where the 95% interval of the paired differences excludes 0, else
    "does not separate from"; with one seed the sign only ("ahead of" / "behind")."""
    if s.n < 2:
        return "ahead of" if s.mean > 0 else ("behind" if s.mean < 0 else "even with")
    low, high = s.interval
    return "beats" if low > 0 else ("loses to" if high < 0 else "does not separate from")


@dataclass
class Comparison:
    """Saliency selection against another selection method at one alpha and rho: paired by seed
    (the same split and the same bytes), final accuracy and mean accuracy over the rounds."""

    alpha: float
    rho: float
    other: str
    final: Spread  # saliency - other, final accuracy
    area: Spread  # saliency - other, mean accuracy over rounds 1..R (area under the curve)
    same_bytes: bool

    @property
    def verdict(self) -> str:
        return _verdict(self.final)


def comparisons(runs: Sequence[Dict], setting: Setting) -> List[Comparison]:
    out = []
    if "saliency" not in setting.methods:
        return out
    for alpha in setting.alphas:
        for rho in setting.rhos:
            mine = runs_of(runs, "saliency", rho, alpha)
            for other in ("spatl-l2", "random"):
                theirs = runs_of(runs, other, rho, alpha)
                if other not in setting.methods or not mine or len(theirs) != len(mine):
                    continue
                final = [a["final_accuracy"] - b["final_accuracy"] for a, b in zip(mine, theirs)]
                area = [sum(accuracy_curve(a)[1:]) / setting.rounds - sum(accuracy_curve(b)[1:]) / setting.rounds
                        for a, b in zip(mine, theirs)]
                same = all(cumulative_megabytes(a) == cumulative_megabytes(b) for a, b in zip(mine, theirs))
                out.append(Comparison(alpha, rho, other, Spread.of(final), Spread.of(area), same))
    return out


def _points(s: Spread) -> str:
    text = f"{s.mean * 100:+.1f} points"
    if s.n >= 2:
        text += f" (sd {s.sd * 100:.1f}, 95% interval {_interval(s, signed=True)})"
    return text


def _counts(verdicts: Sequence[str], seeds: int) -> str:
    if seeds < 2:
        return f"ahead in {sum(v == 'ahead of' for v in verdicts)} of {len(verdicts)}"
    beats, loses = sum(v == "beats" for v in verdicts), sum(v == "loses to" for v in verdicts)
    even = len(verdicts) - beats - loses
    return f"beats it in {beats} of {len(verdicts)}, loses in {loses}, does not separate in {even}"


def selection_statement(found: Sequence[Comparison], seeds: int) -> str:
    if not found:
        return "No saliency-selection comparison in this run."
    lines = []
    how = (f"paired by seed: same split, same bytes; \"beats\" / \"loses\": the 95% t-interval of the {seeds} "
           f"paired differences excludes 0" if seeds >= 2 else "one seed: the sign only, no interval")
    for other in ("spatl-l2", "random"):
        mine = [c for c in found if c.other == other]
        if not mine:
            continue
        name = LABELS[other] + " selection"
        head = (f"**Saliency selection against {name} at equal bytes (equal rho), {len(mine)} settings (alpha x rho): "
                f"on final accuracy it {_counts([c.verdict for c in mine], seeds)}; on the mean accuracy over the "
                f"rounds it {_counts([_verdict(c.area) for c in mine], seeds)}** ({how}).")
        details = "; ".join(
            f"alpha {c.alpha:g}, rho {c.rho:g}: final {_points(c.final)}, mean over rounds {_points(c.area)}"
            + ("" if c.same_bytes else " (bytes differ!)") for c in mine)
        lines.append(f"{head} Saliency minus {LABELS[other]}: {details}.")
    return "\n\n".join(lines)


def coverage_statement(runs: Sequence[Dict], setting: Setting) -> str:
    """The share of each shared layer's units that some client sent, per selection method: what
    the union of the clients' choices updates each round."""
    methods = [m for m in ("spatl-l2", "saliency", "random") if m in setting.methods]
    if not methods:
        return ""
    parts = []
    for rho in setting.rhos:
        values = []
        for method in methods:
            chosen = [r for r in runs if r["method"] == method and r["rho"] == rho]
            shares = [v for r in chosen for x in r["rounds"] for v in x["coverage"].values()]
            values.append(f"{LABELS[method]} {sum(shares) / max(1, len(shares)):.0%}")
        parts.append(f"rho {rho:g}: " + ", ".join(values))
    return ("Coverage, the share of a shared layer's units that at least one client sent in a round (mean over "
            "layers, rounds, alphas and seeds): " + "; ".join(parts) + ". Where the clients' criteria agree on "
            "the same units, the rest of the encoder is never updated.")


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def shape_statement(rows_by_alpha: Dict[float, List[Row]], setting: Setting) -> str:
    """SPATL's rounds against SCAFFOLD's, its total bytes against FedAvg's, and SCAFFOLD's rounds
    against FedAvg's, beside the paper's (CIFAR-10, ResNet-20)."""
    if not {"fedavg", "scaffold", "spatl-l2"} <= set(setting.methods):
        return "(This run lacks FedAvg, SCAFFOLD or SPATL: no comparison with the paper's shapes.)"
    paper_close = PAPER_ROUNDS["spatl"] / PAPER_ROUNDS["scaffold"]
    lines = [f"**The paper's shapes** (CIFAR-10, ResNet-20, 10 clients, 80%): SPATL's rounds close to SCAFFOLD's "
             f"({PAPER_ROUNDS['spatl']} against {PAPER_ROUNDS['scaffold']}, {paper_close:.2f}x), SCAFFOLD "
             f"{PAPER_ROUNDS['scaffold'] / PAPER_ROUNDS['fedavg']:.2f}x FedAvg's rounds, and SPATL's total bytes "
             f"{PAPER_BYTES_RATIO}x below FedAvg's. Here the task is the bundled 8x8 digits with a small CNN, not "
             f"CIFAR-10; \"close\" means within {CLOSE:.0%}; a ratio needs every seed to reach {TARGET:.0%}.", ""]
    for alpha, rows in rows_by_alpha.items():
        by = {(r.method, r.rho): r for r in rows}
        fedavg, scaffold = by[("fedavg", 1.0)], by[("scaffold", 1.0)]
        parts = []
        ratio = _ratio(scaffold.mean_rounds, fedavg.mean_rounds)
        parts.append("FedAvg or SCAFFOLD misses the target in some seed" if ratio is None else
                     f"SCAFFOLD takes {scaffold.mean_rounds:.1f} rounds against FedAvg's {fedavg.mean_rounds:.1f} "
                     f"({ratio:.2f}x; the paper: {PAPER_ROUNDS['scaffold'] / PAPER_ROUNDS['fedavg']:.2f}x)")
        for rho in setting.rhos:
            spatl = by.get(("spatl-l2", rho))
            if spatl is None:
                continue
            rounds = _ratio(spatl.mean_rounds, scaffold.mean_rounds)
            missed = len(spatl.rounds) - len(spatl.reached)
            if rounds is None:
                theirs = "not reached" if scaffold.mean_rounds is None else f"{scaffold.mean_rounds:.1f}"
                close = (f"SPATL misses {TARGET:.0%} within {setting.rounds} rounds in {missed} of "
                         f"{len(spatl.rounds)} seeds (SCAFFOLD: {theirs}): not close, does not hold here" if missed
                         else "SCAFFOLD misses the target in some seed: no ratio")
            else:
                verdict = ("close: holds here" if abs(rounds - 1) <= CLOSE else
                           "fewer: not close, does not hold here" if rounds < 1 else "more: does not hold here")
                close = (f"SPATL takes {spatl.mean_rounds:.1f} rounds against SCAFFOLD's {scaffold.mean_rounds:.1f} "
                         f"({rounds:.2f}x, {verdict})")
            saving = _ratio(fedavg.mean_total, spatl.mean_total)
            if saving is None:
                bytes_text = "no total-bytes ratio (a target not reached)"
            else:
                verdict = (f"below FedAvg's: the direction holds, {saving:.2f}x against the paper's "
                           f"{PAPER_BYTES_RATIO}x" if saving > 1 else "not below FedAvg's: does not hold here")
                bytes_text = (f"its total bytes to {TARGET:.0%} are {spatl.mean_total:.2f} MB per client against "
                              f"FedAvg's {fedavg.mean_total:.2f} (FedAvg / SPATL = {saving:.2f}x; {verdict})")
            parts.append(f"rho {rho:g}: {close}; {bytes_text}")
        lines.append(f"- alpha {alpha:g}: " + "; ".join(parts) + ".")
    dense = next(iter(rows_by_alpha.values()))
    by = {(r.method, r.rho): r for r in dense}
    fedavg, scaffold = by[("fedavg", 1.0)], by[("scaffold", 1.0)]
    per_round = ", ".join(f"rho {r.rho:g}: {r.down + r.up:.3f}" for r in dense if r.method == "spatl-l2")
    lines.append("")
    lines.append(
        f"Per round and client, SCAFFOLD's downlink carries the server variate beside the encoder "
        f"({scaffold.down:.3f} MB against FedAvg's {fedavg.down:.3f}; the paper's SCAFFOLD: 4.3 MB against 2.1), and "
        f"every SCAFFOLD-based selection method (SPATL, saliency, random) pays it too: SPATL's down + up per round "
        f"({per_round} MB) against FedAvg's {fedavg.down + fedavg.up:.3f} MB (the paper's SPATL: 2.1, as FedAvg's).")
    return "\n".join(lines)


# -- the figure -------------------------------------------------------------------------------------------


def _mean_band(curves: Sequence[Sequence[float]]):
    import numpy as np

    values = np.asarray(curves, dtype=float)
    mean = values.mean(0)
    sd = values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
    return mean, sd


def plot(runs: Sequence[Dict], setting: Setting, path: str) -> None:
    """Rows: rho of the selection methods; per alpha two panels: accuracy against rounds and
    against cumulative MB per client (down + up). Lines: means over seeds; bands: +- 1 sd."""
    from matplotlib.figure import Figure  # no pyplot: the figure is only written to a file

    rhos, alphas = setting.rhos, setting.alphas
    fig = Figure(figsize=(4.2 * 2 * len(alphas), 3.3 * len(rhos) + 0.6))
    axes = fig.subplots(len(rhos), 2 * len(alphas), squeeze=False)
    for i, rho in enumerate(rhos):
        for j, alpha in enumerate(alphas):
            by_rounds, by_bytes = axes[i][2 * j], axes[i][2 * j + 1]
            for method in setting.methods:
                chosen = runs_of(runs, method, 1.0 if method in DENSE else rho, alpha)
                if not chosen:
                    continue
                mean, sd = _mean_band([accuracy_curve(r) for r in chosen])
                mb, _ = _mean_band([cumulative_megabytes(r) for r in chosen])
                style = dict(color=COLOURS[method], lw=1.6 if method not in DENSE else 1.2,
                             ls="-" if method not in DENSE else "--", label=LABELS[method])
                x = list(range(len(mean)))
                by_rounds.plot(x, mean, **style)
                by_rounds.fill_between(x, mean - sd, mean + sd, color=COLOURS[method], alpha=0.12, lw=0)
                by_bytes.plot(mb, mean, **style)
                by_bytes.fill_between(mb, mean - sd, mean + sd, color=COLOURS[method], alpha=0.12, lw=0)
            for ax, xlabel in ((by_rounds, "round"), (by_bytes, "cumulative MB per client (down + up)")):
                ax.axhline(TARGET, color="0.7", lw=0.8, ls=":")
                ax.set_ylim(0, 1)
                ax.set_xlabel(xlabel)
                ax.grid(alpha=0.3)
                ax.set_title(f"alpha {alpha:g}, selection rho {rho:g}", fontsize=9)
            by_rounds.set_ylabel("personalised accuracy")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Digits, {setting.clients} clients, Dirichlet label split; mean over {len(setting.seeds)} seed(s), "
                 f"band +-1 sd; dotted: {TARGET:.0%}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)


# -- the section ------------------------------------------------------------------------------------------


def section(runs: Sequence[Dict], setting: Setting, quick: bool, wall_seconds: float, raw_path: str) -> str:
    rows_by_alpha = {alpha: rows_of(runs, setting, alpha) for alpha in setting.alphas}
    found = comparisons(runs, setting)
    seeds = len(setting.seeds)
    command = "python -m captum_paramsal.experiments.federated" + (" --quick" if quick else "")
    tables = "\n\n".join(f"### alpha = {alpha:g}\n\n{table(rows, seeds)}" for alpha, rows in rows_by_alpha.items())
    rejected = sum(len(r["rejected"]) for run in runs for r in run["rounds"])
    from ..federated.digits_task import METHODS

    methods = ", ".join(LABELS[m] + (f" (mu {METHODS[m][3]:g})" if METHODS[m][3] else "") for m in setting.methods)
    return f"""## Salient-parameter federated learning on the digits: accuracy against rounds and bytes

`{command}` ({len(runs)} federations in one Flower simulation, {wall_seconds / 60:.1f} min on this machine's
2 cores, Ray's start-up included; `--from-json {raw_path}` writes this section and the figure again from the raw
per-round results without running anything).

**Settings.** The bundled digits (1,797 8x8 images), {setting.clients} clients, a Dirichlet(alpha) label split
per seed (alpha {", ".join(f"{a:g}" for a in setting.alphas)}; seeds {", ".join(map(str, setting.seeds))}: each seed
draws its own split and its own local shuffles), each client's quarter held out. The small CNN of
`digits_task.DigitsNet` (two conv + BatchNorm layers and a Linear layer: the shared encoder; a Linear classifier: the
head, private for FedPer and the selection methods, shared otherwise). Every client takes part every round:
{setting.rounds} rounds of {setting.epochs} local epochs of SGD, lr {setting.lr:g}, batches of {setting.batch_size},
the same for every method (not tuned per method; chosen so that FedAvg plateaus inside the run and the methods
separate). Methods: {methods}; SPATL as its code means it = L2-norm selection + SCAFFOLD +
private head; saliency and random selection the same with their criterion; the selection methods at equal rho
{", ".join(f"{r:g}" for r in setting.rhos)} (each shared layer sends that fraction of its units: the same bytes).
**Accuracy** is personalised: each client's held-out split with its own head, weighted by held-out samples;
round r's value is the model after r rounds. **Bytes** are what the messages carry, per client per round
(MB = 10^6 bytes): down = the dense encoder (+ SCAFFOLD's server variate), up = the reply (the selected units'
updates, with SCAFFOLD the variate's change under the same mask). **Rounds to {TARGET:.0%}**: the paper's target,
fixed beforehand; the mean over seeds (range in brackets) where every seed reaches it, else over the seeds that
do; total MB = cumulative down + up per client at that round. **Final accuracy**: mean ± sample sd over seeds,
and the 95% interval mean ± t(0.975, n-1)·sd/√n (clipped to [0, 100]). Replies rejected: {rejected}.
**Deterministic**: each client's steps are seeded and the server sums the replies in client order (Flower hands them
over in the order the clients finish, and the float sums depend on the order), so a rerun gives the same numbers.

{tables}

![accuracy against rounds and MB](figures/{FIGURE})

{selection_statement(found, seeds)}

{coverage_statement(runs, setting)}

{shape_statement(rows_by_alpha, setting)}
"""


def write(runs: Sequence[Dict], setting: Setting, out_dir: str, quick: bool, wall_seconds: float) -> str:
    figures = os.path.join(out_dir, "figures")
    os.makedirs(figures, exist_ok=True)
    plot(runs, setting, os.path.join(figures, FIGURE))
    text = section(runs, setting, quick, wall_seconds, os.path.join(out_dir, RAW))
    write_section(os.path.join(out_dir, "RESULTS.md"), SECTION, text)
    return text


def save_raw(path: str, runs: Sequence[Dict], setting: Setting, quick: bool, wall_seconds: float) -> None:
    from .._utils import atomic_write

    payload = {"setting": asdict(setting), "quick": quick, "target": TARGET, "wall_seconds": wall_seconds,
               "runs": list(runs)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, (json.dumps(payload, indent=None, separators=(",", ":")) + "\n").encode())


def load_raw(path: str) -> Tuple[List[Dict], Setting, bool, float]:
    with open(path) as f:
        payload = json.load(f)
    s = payload["setting"]
    setting = Setting(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
    return payload["runs"], setting, bool(payload["quick"]), float(payload["wall_seconds"])


def run(out_dir: str = "docs", quick: bool = False, from_json: Optional[str] = None,
        temp_dir: Optional[str] = None) -> str:
    """Run the federations (or read them from ``from_json``), write the raw results, the figure
    and the RESULTS.md section; returns the section."""
    if from_json is not None:
        runs, setting, quick, wall = load_raw(from_json)
    else:
        setting = QUICK if quick else FULL
        started = time.perf_counter()
        runs = run_federations(setting, temp_dir)
        wall = time.perf_counter() - started
        save_raw(os.path.join(out_dir, RAW), runs, setting, quick, wall)
        _progress(f"all {len(runs)} federations in {wall:.0f} s")
    return write(runs, setting, out_dir, quick, wall)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", default="docs", help="folder of RESULTS.md, figures/ and the raw JSON (default docs)")
    parser.add_argument("--quick", action="store_true", help="a smaller run, for tests (under 2 minutes)")
    parser.add_argument("--from-json", default=None, help="write the section and figure from saved raw results")
    args = parser.parse_args(argv)
    run(args.out, args.quick, args.from_json)
    raw = "" if args.from_json else f" and {os.path.join(args.out, RAW)}"
    print(f"wrote {os.path.join(args.out, 'RESULTS.md')} (section {SECTION!r}), "
          f"{os.path.join(args.out, 'figures', FIGURE)}{raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
