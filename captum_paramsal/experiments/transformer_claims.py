"""The paper's claims on a language model: heads and neurons of the embedded colours BERT.

``python -m captum_paramsal.experiments.transformer_claims [--quick] [--out docs]`` writes the
section "transformer_claims" of ``docs/RESULTS.md`` and two figures under ``docs/figures/``.
On the misclassified sentences of the held-out test split of the colour-question language
(:mod:`captum_paramsal.zoo.colours`), with saliency by heads and neurons standardized against the
shipped statistics (validation split, true labels):

1. turning off each error's k most salient heads (ranked among the 8 heads) or neurons (among
   the 256 neurons), against k random and k least salient ones of the same kind: the fraction
   of errors corrected, with 95% bootstrap intervals and the paired differences;
2. saliency-space neighbours among the errors share their (true, predicted) colour pair more
   often than chance (exact chance from the pairs' frequencies, a permutation test, a
   bootstrap interval), beside two controls: neighbours by the model's output probabilities
   and by the sentence's word counts;
3. which heads and neurons are the errors' most salient (culprit) units, and what turning the
   culprit head off does.

Each part ends with a plain statement of whether the claim holds here, and by how much.
Deterministic (seeded draws); ``--quick`` (the first 1500 test sentences, fewer draws) is for
the tests.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .results_markdown import section_command, write_section

SECTION = "transformer_claims"
HEAD_KS = (1, 2, 3)
NEURON_KS = (1, 5, 10, 25)
MODES = ("salient", "random", "least")
#: neighbours per misclassified sentence, searched among the misclassified sentences
NEIGHBOURS = 3
QUICK_SENTENCES = 1500


@dataclass
class Setting:
    """How much to draw: random unit sets per k, bootstrap resamples, label permutations."""

    random_draws: int
    bootstrap: int
    permutations: int


FULL = Setting(random_draws=50, bootstrap=2000, permutations=2000)
QUICK = Setting(random_draws=10, bootstrap=500, permutations=200)


def kind_columns(layout, kind: str) -> Tensor:
    """The layout's columns of the entries of one kind (``"heads"``, ``"neurons"``), in order."""
    parts = [torch.arange(e.slice.start, e.slice.stop) for e in layout if e.kind == kind]
    if not parts:
        raise ValueError(f"the layout has no {kind} entries")
    return torch.cat(parts)


def unit_name(layout, column: int) -> str:
    """``"L1.H2"`` for head 2 of layer 1, ``"L0.N17"`` for neuron 17 of layer 0."""
    name, index = layout.unit_of(int(column))
    entry = layout[name]
    layer = next((part for part in name.split(".") if part.isdigit()), "?")
    letter = {"heads": "H", "kv_heads": "KV", "neurons": "N"}.get(entry.kind, "#")
    return f"L{layer}.{letter}{index}"


def _predict(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.softmax(model(input_ids=ids, attention_mask=mask).logits, dim=-1)


def salient_columns(z: Tensor, columns: Tensor, k: int, largest: bool = True) -> Tensor:
    """``(E, k)``: per row of ``z``, the ``k`` columns (among ``columns``) of largest (or smallest) z."""
    top = torch.topk(z[:, columns], k, dim=1, largest=largest).indices
    return columns[top]


def corrected_with(
    model: nn.Module, layout, ids: Tensor, mask: Tensor, labels: Tensor, chosen: Tensor
) -> Tuple[Tensor, Tensor]:
    """Turn off row ``i`` of ``chosen`` (layout columns) for sentence ``i``: ``(corrected (E,) bool,
    p(true class) (E,))``. Sentences with the same set of units share one forward pass."""
    from ..interventions import turn_off

    corrected = torch.zeros(len(labels), dtype=torch.bool)
    p_true = torch.zeros(len(labels))
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for i, row in enumerate(chosen.tolist()):
        groups.setdefault(tuple(sorted(row)), []).append(i)
    for units, rows in groups.items():
        index = torch.tensor(rows)
        with turn_off(model, list(units), layout=layout):
            p = _predict(model, ids[index], mask[index])
        corrected[index] = p.argmax(-1) == labels[index]
        p_true[index] = p.gather(1, labels[index, None])[:, 0]
    return corrected, p_true


def bootstrap_interval(values: Tensor, resamples: int, generator: torch.Generator) -> Tuple[float, float]:
    """95% percentile interval of the mean of ``values`` (resampled with replacement), drawn from
    ``generator`` (:func:`~captum_paramsal.analysis.intervals.bootstrap_mean`)."""
    from ..analysis.intervals import bootstrap_mean

    e = bootstrap_mean(values, resamples=resamples, generator=generator)
    return e.low, e.high


def _paired(difference: Tensor, resamples: int, generator: torch.Generator) -> Tuple[float, float, float]:
    """The mean of per-sentence differences and its bootstrap interval."""
    return (float(difference.mean()), *bootstrap_interval(difference, resamples, generator))


@dataclass
class TurnOffRow:
    kind: str
    k: int
    rates: Dict[str, float]  # mode -> fraction corrected
    intervals: Dict[str, Tuple[float, float]]
    salient_count: int
    num_errors: int
    minus_random: Tuple[float, float, float]  # paired difference, its interval
    minus_least: Tuple[float, float, float]
    delta_true: Dict[str, float]  # mode -> mean change of p(true class)

    @property
    def beats_both(self) -> bool:
        """Salient above random and least, both paired intervals above 0."""
        return self.minus_random[1] > 0 and self.minus_least[1] > 0


def turn_off_test(
    model: nn.Module, layout, z: Tensor, ids: Tensor, mask: Tensor, labels: Tensor, p0: Tensor,
    kind: str, ks: Sequence[int], setting: Setting, seed: int = 0,
) -> Tuple[List[TurnOffRow], Dict[Tuple[int, str], Tensor]]:
    """Per k: salient / random / least units of ``kind`` turned off, per error; random: the
    same ``setting.random_draws`` sets of k random units for every error, a sentence's rate the
    fraction of draws that correct it. Returns the rows and the per-sentence outcomes."""
    columns = kind_columns(layout, kind)
    draws = torch.Generator().manual_seed(seed)
    resample = torch.Generator().manual_seed(seed + 1)
    rows, outcomes = [], {}
    n = len(labels)
    base = p0.gather(1, labels[:, None])[:, 0]
    for k in ks:
        per_mode: Dict[str, Tensor] = {}
        delta: Dict[str, float] = {}
        for mode in ("salient", "least"):
            chosen = salient_columns(z, columns, k, largest=mode == "salient")
            corrected, p_true = corrected_with(model, layout, ids, mask, labels, chosen)
            per_mode[mode] = corrected.double()
            delta[mode] = float((p_true - base).mean())
        hits = torch.zeros(n, dtype=torch.float64)
        shift = torch.zeros(n, dtype=torch.float64)
        for _ in range(setting.random_draws):
            chosen = columns[torch.randperm(len(columns), generator=draws)[:k]].expand(n, k)
            corrected, p_true = corrected_with(model, layout, ids, mask, labels, chosen)
            hits += corrected.double()
            shift += (p_true - base).double()
        per_mode["random"] = hits / setting.random_draws
        delta["random"] = float(shift.mean() / setting.random_draws)
        for mode, values in per_mode.items():
            outcomes[(k, mode)] = values
        paired = {
            other: _paired(per_mode["salient"] - per_mode[other], setting.bootstrap, resample)
            for other in ("random", "least")
        }
        rows.append(TurnOffRow(
            kind=kind, k=k,
            rates={m: float(per_mode[m].mean()) for m in MODES},
            intervals={m: bootstrap_interval(per_mode[m], setting.bootstrap, resample) for m in MODES},
            salient_count=int(per_mode["salient"].sum()), num_errors=n,
            minus_random=paired["random"], minus_least=paired["least"], delta_true=delta,
        ))
    return rows, outcomes


def _percent(value: float, interval: Optional[Tuple[float, float]] = None, signed: bool = False) -> str:
    text = f"{value * 100:+.1f}%" if signed else f"{value * 100:.1f}%"
    if interval is not None:
        text += f" [{interval[0] * 100:.1f}, {interval[1] * 100:.1f}]"
    return text


def turn_off_table(rows: Sequence[TurnOffRow]) -> str:
    lines = [
        "| units | k | salient corrected | salient | random | least | salient − random | salient − least "
        "| mean Δ p(true), salient / random |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.kind} | {r.k} | {r.salient_count} of {r.num_errors} | "
            + " | ".join(_percent(r.rates[m], r.intervals[m]) for m in MODES)
            + f" | {_percent(r.minus_random[0], r.minus_random[1:], signed=True)}"
            + f" | {_percent(r.minus_least[0], r.minus_least[1:], signed=True)}"
            + f" | {r.delta_true['salient']:+.3f} / {r.delta_true['random']:+.3f} |"
        )
    return "\n".join(lines)


@dataclass
class AgreementRow:
    space: str
    same_pair: float
    interval: Tuple[float, float]
    chance: float
    null_high: float  # 97.5th percentile of the permutation null
    p_value: float

    @property
    def ratio(self) -> float:
        return self.same_pair / max(self.chance, 1e-12)


def pair_agreement(
    space: str, profiles: Tensor, labels: Tensor, predicted: Tensor, m: int, setting: Setting, seed: int
) -> AgreementRow:
    """Among the rows of ``profiles`` (the errors): how often a sentence's ``m`` cosine
    neighbours share its (true, predicted) pair, the exact chance (:func:`semantic_agreement`),
    a bootstrap interval over sentences and a permutation test (the pairs shuffled over the
    fixed neighbour graph)."""
    from ..analysis import SaliencyIndex, semantic_agreement

    index = SaliencyIndex(profiles)
    agreement = semantic_agreement(index, labels, predicted, m=m)
    _, neighbours = index.neighbours_of_all(m)
    _, pair = torch.unique(torch.stack([labels, predicted], 1), dim=0, return_inverse=True)
    shared = (pair[neighbours] == pair[:, None]).double().mean(1)
    if abs(float(shared.mean()) - agreement.same_pair) > 1e-9:  # the library's number, recounted
        raise RuntimeError("semantic_agreement and the recount of its neighbours disagree")
    generator = torch.Generator().manual_seed(seed)
    null = torch.empty(setting.permutations, dtype=torch.float64)
    for i in range(setting.permutations):
        shuffled = pair[torch.randperm(len(pair), generator=generator)]
        null[i] = (shuffled[neighbours] == shuffled[:, None]).double().mean()
    p_value = (1 + int((null >= shared.mean()).sum())) / (1 + setting.permutations)
    return AgreementRow(
        space, agreement.same_pair, bootstrap_interval(shared, setting.bootstrap, generator),
        agreement.same_pair_chance, float(torch.quantile(null, 0.975)), p_value,
    )


def agreement_table(rows: Sequence[AgreementRow], m: int, n: int) -> str:
    lines = [
        f"| neighbours by | share the (true, predicted) pair, {m} nearest among {n} errors | chance | ratio "
        "| permutation null, 97.5th percentile | p |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.space} | {_percent(r.same_pair, r.interval)} | {_percent(r.chance)} | {r.ratio:.1f}× | "
            f"{_percent(r.null_high)} | {r.p_value:.4f} |"
        )
    return "\n".join(lines)


def word_counts(ids: Tensor) -> Tensor:
    """``(N, vocabulary)`` counts of each word (padding and markers left out): the input baseline."""
    from ..zoo.colours import VOCAB

    counts = torch.zeros(ids.shape[0], len(VOCAB))
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    counts[:, :3] = 0
    return counts


def _plot_turn_off(rows: Sequence[TurnOffRow], path: str) -> None:
    from matplotlib.figure import Figure

    kinds = list(dict.fromkeys(r.kind for r in rows))
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    axes = fig.subplots(1, len(kinds))
    for axis, kind in zip(axes, kinds):
        mine = [r for r in rows if r.kind == kind]
        ks = [r.k for r in mine]
        for mode, marker in zip(MODES, "osv"):
            rate = [r.rates[mode] for r in mine]
            low = [r.rates[mode] - r.intervals[mode][0] for r in mine]
            high = [r.intervals[mode][1] - r.rates[mode] for r in mine]
            axis.errorbar(ks, rate, yerr=[low, high], marker=marker, capsize=3, label=f"{mode} {kind}")
        axis.set_xticks(ks)
        axis.set_xlabel(f"{kind} turned off (k)")
        axis.set_ylabel("fraction of errors corrected")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(f"Colours BERT: turning off units of its {rows[0].num_errors} misclassified test sentences "
                 "(95% bootstrap intervals)")
    fig.savefig(path, dpi=100)


def _plot_culprits(head_counts, head_labels, neuron_counts, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.6])
    bottom = [0] * len(head_labels)
    for question in ("most", "least"):
        values = [head_counts[question].get(h, 0) for h in head_labels]
        left.bar(head_labels, values, bottom=bottom, label=f'"{question}" questions')
        bottom = [b + v for b, v in zip(bottom, values)]
    left.set_ylabel("errors whose most salient head it is")
    left.set_title("culprit heads")
    left.legend()
    names = [name for name, _ in neuron_counts]
    right.bar(names, [count for _, count in neuron_counts], color="tab:green")
    right.set_ylabel("errors whose most salient neuron it is")
    right.set_title("culprit neurons (the most frequent)")
    right.tick_params(axis="x", rotation=60)
    fig.savefig(path, dpi=100)


def _against_control(main: AgreementRow, control: AgreementRow) -> str:
    """How the saliency neighbours compare with the output-probability neighbours, from the
    saliency row's bootstrap interval."""
    if main.interval[1] < control.same_pair:
        verdict = "less than"
    elif main.interval[0] > control.same_pair:
        verdict = "more than"
    else:
        verdict = "about as much as"
    return (
        f"That is {verdict} the control of neighbours by the model's output probabilities gives "
        f"({_percent(control.same_pair, control.interval)}): much of the agreement is carried by what the model "
        "predicts, which needs no parameter saliency."
        if verdict != "more than" else
        f"That is more than the control of neighbours by the model's output probabilities gives "
        f"({_percent(control.same_pair, control.interval)}): the profiles carry more than the prediction."
    )


def _holds(condition: bool) -> str:
    return "Holds here" if condition else "Does not hold here"


def run(out_dir: str = "docs", quick: bool = False) -> str:
    """Run the three parts, write the figures and the RESULTS.md section; returns the section.

    Runs on one thread (restored afterwards): the model is tiny, and on a shared machine a
    second thread waiting for a busy core makes each small forward pass many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out_dir, quick)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir: str, quick: bool) -> str:
    from .._core.parameter_saliency import ParameterSaliency
    from ..zoo.colours import COLOURS, QUESTIONS, UNITS, load_colours_model, read_metadata

    started = time.perf_counter()
    setting = QUICK if quick else FULL
    figures = os.path.join(out_dir, "figures")
    os.makedirs(figures, exist_ok=True)
    model, stats, data = load_colours_model()
    split = data.test[:QUICK_SENTENCES] if quick else data.test
    ps = ParameterSaliency(model, units=UNITS, stats=stats)
    layout = ps.layout
    p_all = torch.cat([_predict(model, split.input_ids[i : i + 2000], split.attention_mask[i : i + 2000])
                       for i in range(0, len(split), 2000)])
    predicted = p_all.argmax(-1)
    wrong = (predicted != split.labels).nonzero().flatten()
    errors = split[wrong]
    ids, mask, labels = errors.input_ids, errors.attention_mask, errors.labels
    bad = predicted[wrong]
    n = len(wrong)
    z = ps.attribute(ids, target=labels, additional_forward_args={"attention_mask": mask}).detach()
    num_heads = len(kind_columns(layout, "heads"))
    num_neurons = len(kind_columns(layout, "neurons"))

    # 1. turning off salient heads / neurons
    head_rows, head_outcomes = turn_off_test(model, layout, z, ids, mask, labels, p_all[wrong], "heads",
                                             HEAD_KS, setting, seed=0)
    neuron_rows, _ = turn_off_test(model, layout, z, ids, mask, labels, p_all[wrong], "neurons",
                                   NEURON_KS, setting, seed=10)
    rows = head_rows + neuron_rows
    _plot_turn_off(rows, os.path.join(figures, "transformer_turn_off.png"))

    def turn_off_claim(kind_rows: Sequence[TurnOffRow], total: int) -> str:
        kind = kind_rows[0].kind
        winning = [r.k for r in kind_rows if r.beats_both]
        first = kind_rows[0]
        best = max(kind_rows, key=lambda r: r.minus_random[0])
        text = (
            f"**Claim: turning off the most salient {kind} corrects more errors than random or least salient "
            f"{kind}. {_holds(len(winning) == len(kind_rows))}**: the single most salient of the {total} {kind} "
            f"corrects {_percent(first.rates['salient'])} of the {n} errors "
            f"(random: {_percent(first.rates['random'])}, "
            f"least: {_percent(first.rates['least'])}); the largest margin over random is at k = {best.k}, "
            f"{_percent(best.minus_random[0], best.minus_random[1:], signed=True)} points. "
        )
        lost = [r.k for r in kind_rows if not r.beats_both]
        if not winning:
            return text + "Salient beats both baselines (paired 95% intervals above 0) at no k tried."
        text += f"Salient beats both baselines (paired 95% intervals above 0) at k = {', '.join(map(str, winning))}"
        return text + (f", not at k = {', '.join(map(str, lost))}." if lost else ".")

    # 2. saliency-space neighbours share their (true, predicted) pair
    heads_neurons = torch.cat([kind_columns(layout, "heads"), kind_columns(layout, "neurons")]).sort().values
    spaces = [
        ("saliency, heads and neurons", z[:, heads_neurons]),
        ("saliency, heads only", z[:, kind_columns(layout, "heads")]),
        (f"saliency, every unit ({layout.num_columns}: also the pooler's and classifier's rows)", z),
        ("control: the model's output probabilities", p_all[wrong]),
        ("control: the sentence's word counts", word_counts(ids)),
    ]
    agreement = [pair_agreement(name, values, labels, bad, NEIGHBOURS, setting, seed=20 + i)
                 for i, (name, values) in enumerate(spaces)]
    pairs = Counter(zip(labels.tolist(), bad.tolist()))
    main_row, output_row = agreement[0], agreement[3]
    agreement_claim = (
        f"**Claim: saliency-space neighbours share their (true, predicted) pair above chance. "
        f"{_holds(main_row.ratio > 1.5 and main_row.p_value < 0.01)}**: by heads and neurons, "
        f"{_percent(main_row.same_pair, main_row.interval)} of each error's {NEIGHBOURS} nearest errors share its "
        f"pair, chance {_percent(main_row.chance)} ({main_row.ratio:.1f}×, permutation p = {main_row.p_value:.4f}). "
        + _against_control(main_row, output_row)
    )

    # 3. culprits: each error's most salient head and neuron
    top_head = salient_columns(z, kind_columns(layout, "heads"), 1)[:, 0]
    top_neuron = salient_columns(z, kind_columns(layout, "neurons"), 1)[:, 0]
    head_labels = [unit_name(layout, c) for c in kind_columns(layout, "heads").tolist()]
    head_counts = {q: Counter() for q in QUESTIONS}
    for column, question in zip(top_head.tolist(), errors.question.tolist()):
        head_counts[QUESTIONS[question]][unit_name(layout, column)] += 1
    neuron_counts = Counter(unit_name(layout, c) for c in top_neuron.tolist()).most_common(12)
    _plot_culprits(head_counts, head_labels, neuron_counts, os.path.join(figures, "transformer_culprits.png"))
    corrected_1 = head_outcomes[(1, "salient")]
    culprit_lines = [
        "| head | most salient head of | of which \"most\" / \"least\" questions | turning it off corrects those "
        f"| turning it off corrects, over all {n} errors |",
        "|---|---:|---:|---:|---:|",
    ]
    every_error = {}
    for column in kind_columns(layout, "heads").tolist():
        mine = top_head == column
        count = int(mine.sum())
        name = unit_name(layout, column)
        fixed, _ = corrected_with(model, layout, ids, mask, labels, torch.full((n, 1), column))
        every_error[name] = float(fixed.double().mean())
        culprit_lines.append(
            f"| {name} | {count} error{'' if count == 1 else 's'} | "
            f"{head_counts['most'][name]} / {head_counts['least'][name]} | "
            + (f"{int(corrected_1[mine].sum())} of {count}" if count else "—")
            + f" | {_percent(every_error[name])} |"
        )
    best_single = max(every_error, key=every_error.get)
    dominant, dominant_count = max(((h, head_counts["most"][h] + head_counts["least"][h]) for h in head_labels),
                                   key=lambda item: item[1])

    meta = read_metadata()
    tied = float(errors.tied.double().mean())
    least = float((errors.question == 1).double().mean())
    frequent_pairs = ", ".join(f"({COLOURS[t]}, {COLOURS[p]}) {c}" for (t, p), c in pairs.most_common(3))
    seconds = time.perf_counter() - started
    command = "python -m captum_paramsal.experiments.transformer_claims" + (" --quick" if quick else "")
    text = f"""## Heads and neurons of a language model: the colours BERT

Command: `{command}` ({seconds:.0f} s on this machine).
Model: the embedded colours BERT (`captum_paramsal.zoo.load_colours_model()`; 2 layers, hidden size 64,
{num_heads} heads, {num_neurons} MLP neurons), trained by `python -m captum_paramsal.zoo.train_colours` on 8000
generated sentences of the form `most|least` + 6-14 colour words + fillers, whose answer is the most (or
least) often mentioned colour, ties broken by the first (for `least`: the last) mention. Test accuracy
{float(meta.get("test_accuracy", "nan")):.1%}. Below: {len(split)} held-out test sentences, of which {n} are
misclassified; {tied:.0%} of those needed a tie-break and {least:.0%} are `least` questions (most frequent
(true, predicted) pairs: {frequent_pairs}). Saliency: `ParameterSaliency(model, units=("heads",
"neurons"))`, `mean_abs`, loss at the true label, standardized against the shipped statistics (the 2000
validation sentences); heads are ranked among heads, neurons among neurons.

### Turning off salient heads and neurons

Each error's k most salient units of one kind turned off (a head: its q, k, v rows and the output
projection's columns that read it; a neuron: its row of the up projection and column of the down
projection), against k least salient ones and against {setting.random_draws} draws of k random units of
that kind (the same draws for every error; a sentence's rate is the fraction of draws that correct
it). In brackets: 95% bootstrap intervals over the {n} errors ({setting.bootstrap} resamples), paired for
the differences.

{turn_off_table(rows)}

![turning off heads and neurons](figures/transformer_turn_off.png)

{turn_off_claim(head_rows, num_heads)} Each of the {num_heads} heads, turned off for every error, corrects
between {_percent(min(every_error.values()))} and {_percent(max(every_error.values()))} of them (the culprit
table below): the errors are near-ties that removing any head can tip over, and here the most salient head
is no better a choice than any other.

{turn_off_claim(neuron_rows, num_neurons)}

### Saliency-space neighbours share their (true, predicted) pair

Among the {n} errors, each one's {NEIGHBOURS} nearest others by cosine similarity. Chance: the exact
expectation for random neighbours, from the pairs' frequencies; permutation null: the pairs shuffled
over the same neighbour graph ({setting.permutations} shuffles); in brackets, a 95% bootstrap interval over the
errors. The two controls say how much of the agreement needs no parameter saliency at all.

{agreement_table(agreement, NEIGHBOURS, n)}

{agreement_claim}

### Which heads and neurons are the culprits

{chr(10).join(culprit_lines)}

![culprit heads and neurons](figures/transformer_culprits.png)

{dominant} is the most salient head of {dominant_count} of the {n} errors ({dominant_count / n:.0%}). Turned off for
every error, the head that corrects the most is {best_single} ({_percent(every_error[best_single])} of the errors); the
culprit head, chosen per error, corrects {_percent(head_rows[0].rates["salient"])}. The most frequent culprit
neurons: {", ".join(f"{name} ({count})" for name, count in neuron_counts[:5])}.
"""
    write_section(os.path.join(out_dir, "RESULTS.md"), SECTION, text)
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    return section_command(__doc__.split("\n", 1)[0], run, "a smaller run, for tests", argv)


if __name__ == "__main__":
    sys.exit(main())
