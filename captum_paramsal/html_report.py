"""An HTML report of why a model gets samples wrong: one folder, ``report.html`` and its PNGs.

For each explained sample: the image with its true and predicted class, its standardized
parameter-saliency profile (the paper's figure), its top salient units, and input saliency
maps side by side: this library's parameter-guided input saliency, Captum's ``Saliency`` and
``IntegratedGradients``, all rendered the paper's way (:func:`~.visualization.paper_heatmap`).
For the set: the turn-off test (pruning curves) when there are misclassified samples, and,
when given, the error groups (:func:`~.analysis.error_groups`): which misclassified samples
share their culprit units, with a figure per group.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence

import torch
from torch import Tensor

from ._utils import evaluation_mode

if TYPE_CHECKING:
    from ._core.parameter_saliency import ParameterSaliency


@dataclass
class ExplainedSample:
    index: int
    true: int
    predicted: int
    top_units: List[tuple]
    figure: str
    profile_figure: str


def _name(classes: Optional[Sequence[str]], c: int) -> str:
    return str(classes[c]) if classes is not None and 0 <= c < len(classes) else str(c)


def _maps_figure(path: str, image: Tensor, maps: dict, title: str, low_percentile: float) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figure registry are left alone

    from .visualization import paper_heatmap

    fig = Figure(figsize=(2.8 * (1 + len(maps)), 3.2))
    axes = fig.subplots(1, 1 + len(maps))
    shown = image.detach().cpu()
    shown = (shown - shown.min()) / (shown.max() - shown.min() + 1e-12)
    axes[0].imshow(shown.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if shown.shape[0] == 1 else None,
                   interpolation="nearest")
    axes[0].set_title("input", fontsize=9)
    for axis, (name, attr) in zip(axes[1:], maps.items()):
        axis.imshow(paper_heatmap(attr, image, low_percentile=low_percentile), interpolation="nearest")
        axis.set_title(name, fontsize=9)
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=100)


def write_report(
    model: torch.nn.Module,
    ps: ParameterSaliency,
    inputs: Tensor,
    labels: Tensor,
    out_dir: str,
    classes: Optional[Sequence[str]] = None,
    title: str = "Parameter-space saliency report",
    max_samples: int = 8,
    k: int = 10,
    only_misclassified: bool = True,
    low_percentile: float = 90.0,
    pruning_ks: Sequence[int] = (1, 5, 10, 25, 50),
    notes: Sequence[str] = (),
    pruning=None,
    indices: Optional[Sequence[int]] = None,
    noun: str = "sample",
    groups=None,
    max_groups: int = 6,
    progress: Optional[bool] = None,
) -> str:
    """Write ``out_dir/report.html`` (and its figures) for ``inputs``; return its path.

    Args:
        model, ps: the model and a :class:`~captum_paramsal.ParameterSaliency` of it (with
            statistics, for z-scores).
        inputs, labels: images ``(B, C, H, W)`` and their true labels.
        classes: class names, indexed by label.
        max_samples: how many samples get their own section (misclassified first).
        only_misclassified: explain only misclassified samples when there are any.
        low_percentile: the heat maps' lower clip (the paper: 90; lower for tiny images).
        pruning_ks: the turn-off test's k values (those above the number of units are dropped).
        pruning: a :class:`~captum_paramsal.analysis.PruningResult` of these inputs already
            computed (else it is computed here).
        indices: each input's index in its data set, which names it in the report (default:
            its position in ``inputs``).
        noun: what a sample is called in the report: ``"digit"`` titles a profile
            ``"digit 35 (label 3, predicted 5)"``.
        groups: an :class:`~captum_paramsal.analysis.ErrorGroups` of these (or other) data:
            a section lists the groups, their (true, predicted) pairs and culprit units, with
            a figure for each of the ``max_groups`` largest.
        progress: a tqdm bar over the report's steps (profiles, maps, figures, turn-off
            test, groups, page): None (the default) shows it once the report has taken 3 s;
            True from the start; False never.

    Figures are built without pyplot and written with ``Figure.savefig``: the caller's
    matplotlib backend (a notebook's, say) is left as it is.
    """
    from captum.attr import IntegratedGradients, Saliency
    from matplotlib.figure import Figure
    from tqdm.auto import tqdm

    from ._core.parameter_guided_input_saliency import ParameterGuidedInputSaliency
    from ._core.parameter_space_attribution import PROGRESS_DELAY
    from .analysis import pruning_curves

    if indices is None:
        indices = list(range(len(labels)))
    indices = [int(i) for i in indices]
    if len(indices) != len(labels):
        raise ValueError(f"indices must name each of the {len(labels)} inputs, got {len(indices)}")
    os.makedirs(out_dir, exist_ok=True)
    figures = os.path.join(out_dir, "figures")
    os.makedirs(figures, exist_ok=True)
    device = next(model.parameters()).device
    inputs, labels = inputs.to(device), labels.to(device)
    with evaluation_mode(model), torch.no_grad():
        predicted = model(inputs).argmax(1)
    wrong = (predicted != labels).nonzero().flatten().tolist()
    chosen = wrong if (wrong and only_misclassified) else list(range(len(labels)))
    chosen = chosen[:max_samples]

    # a bar over the report's steps: None shows it once the report has taken 3 s (a torchvision model's)
    bar = tqdm(total=6, unit="step", desc="report", disable=progress is False,
               delay=0.0 if progress else PROGRESS_DELAY)
    step = _stepper(bar)
    x, y, p = inputs[chosen], labels[chosen], predicted[chosen]
    step("profiles")
    prof = ps.profile(x, target=y)  # loss at the true label: what would fix the mistake
    step("input saliency and Captum's maps")
    pgis = ParameterGuidedInputSaliency.from_parameter_saliency(ps, k=k)
    leaf = x.detach().clone().requires_grad_()  # Captum warns when it has to set this itself
    maps = {
        f"parameter-guided\n(top {k} units, true class)": pgis.attribute(x, target=y),
        "Captum Saliency\n(predicted class)": Saliency(model).attribute(leaf, target=p, abs=False).detach(),
        "Captum IntegratedGradients\n(predicted class)": IntegratedGradients(model).attribute(
            leaf, target=p, n_steps=32, internal_batch_size=64
        ).detach(),
    }
    step("figures")
    samples: List[ExplainedSample] = []
    tops = prof.top_k(k)
    for row, position in enumerate(chosen):
        index = indices[position]
        true, guess = _name(classes, int(y[row])), _name(classes, int(p[row]))
        verdict = "misclassified" if position in wrong else "correct"
        caption = f"{noun} {index}: true {true}, predicted {guess} ({verdict})"
        figure = f"figures/sample{index}_maps.png"
        _maps_figure(os.path.join(out_dir, figure), x[row], {n: m[row] for n, m in maps.items()}, caption,
                     low_percentile)
        profile_figure = f"figures/sample{index}_profile.png"
        fig = prof.plot(row, k=k, name=f"{noun} {index} (label {true}, predicted {guess})")
        fig.savefig(os.path.join(out_dir, profile_figure), dpi=100)
        samples.append(ExplainedSample(index, int(y[row]), int(p[row]),
                                       [(u.param, u.unit, u.value) for u in tops[row]], figure, profile_figure))

    step("turn-off test")
    pruning_html = "<p>No misclassified samples among these inputs: no turn-off test.</p>"
    if wrong:
        if pruning is None:
            ks = [kk for kk in pruning_ks if kk <= ps.layout.num_columns] or [1]
            pruning = pruning_curves(model, ps, inputs, labels, ks=ks)
        fig = Figure(figsize=(13, 3.6))
        pruning.plot(ax=fig.subplots(1, 3))  # our own Figure: pyplot's registry is never touched
        fig.savefig(os.path.join(figures, "pruning_curves.png"), dpi=100)
        pruning_html = (
            f"<p>{pruning.num_misclassified} of {pruning.num_samples} samples are misclassified. For each, the k "
            "most salient units (by z), k random units and the k least salient units are turned off in turn; "
            "the table gives the share of them the model then classifies correctly.</p>"
            + _table_html(pruning.COLUMNS, pruning.formatted_rows())
            + '<img src="figures/pruning_curves.png" alt="pruning curves">'
        )
    step("error groups")
    groups_html = _groups_html(groups, out_dir, classes, max_groups) if groups is not None else ""
    step("page")
    path = os.path.join(out_dir, "report.html")
    with open(path, "w") as f:
        f.write(_html(title, samples, classes, pruning_html, notes, prof.value_label, noun, groups_html))
    bar.update(1)
    bar.close()
    return path


def _stepper(bar: Any) -> Callable[[str], None]:
    """``step(name)``: the bar's previous step done, ``name`` the one now running."""
    started = [False]

    def step(name: str) -> None:
        if started[0]:
            bar.update(1)
        started[0] = True
        bar.set_postfix_str(name, refresh=False)

    return step


def _groups_html(groups, out_dir: str, classes: Optional[Sequence[str]], max_groups: int) -> str:
    parts = [
        "<h2>Error groups</h2>",
        f"<p>The {groups.num_misclassified} misclassified samples grouped by the cosine similarity of their "
        f"standardized profiles ({len(groups)} groups; number of groups: {html.escape(groups.criterion)}). "
        "A group's culprit units have the highest mean z over its samples; the percentage is the share of "
        f"the group's samples on which the unit's z reaches {groups[0].z_threshold:g}. Exemplars: the "
        "reference samples on which a culprit unit is most salient.</p>",
    ]
    rows = []
    for g in groups:
        pairs = ", ".join(f"{_name(classes, t)}→{_name(classes, p)} ({n})" for (t, p), n in g.pairs[:3])
        units = "; ".join(f"{c.name}[{c.unit}] (z {c.score:.1f}, {c.consistency:.0%})" for c in g.culprits[:3])
        rows.append((str(g.id), str(len(g)), pairs, units))
    parts.append(_table_html(("group", "samples", "true → predicted", "top culprit units"), rows))
    for g in list(groups)[:max_groups]:
        figure = f"figures/error_group{g.id}.png"
        g.plot().savefig(os.path.join(out_dir, figure), dpi=90)
        parts.append(f"<div class='group'><h3>Group {g.id}</h3><img src='{figure}' alt='error group {g.id}'></div>")
    return "\n".join(parts)


def _table_html(columns, rows) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(title, samples, classes, pruning_html, notes, value, noun, groups_html="") -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
        "text-align:right}img{max-width:100%}section{border-top:1px solid #ddd;margin-top:1.5em}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Parameter-space saliency (Levin et al., NeurIPS 2022): for each sample, the gradient of its "
        "loss at the true label over the network's parameters, reduced to one number per conv filter / neuron "
        f"and, with reference statistics, standardized. Values shown: {html.escape(value)}. Units that stand "
        "out are the ones that malfunction on the sample. Input maps: parameter-guided input saliency asks "
        "which pixels drive those units; Captum's Saliency and IntegratedGradients show what drives the "
        "predicted class.</p>",
    ]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    parts.append("<h2>Turning off salient units</h2>" + pruning_html)
    if groups_html:
        parts.append(groups_html)
    parts.append("<h2>Samples</h2>")
    for s in samples:
        rows = "".join(
            f"<tr><td>{i + 1}</td><td style='text-align:left'>{html.escape(param)}</td><td>{unit}</td>"
            f"<td>{val:.3g}</td></tr>"
            for i, (param, unit, val) in enumerate(s.top_units)
        )
        parts.append(
            f"<section><h3>{html.escape(noun.capitalize())} {s.index}: true "
            f"{html.escape(_name(classes, s.true))}, predicted {html.escape(_name(classes, s.predicted))}</h3>"
            f"<img src='{s.figure}' alt='input saliency maps of {html.escape(noun)} {s.index}'>"
            f"<img src='{s.profile_figure}' alt='saliency profile of {html.escape(noun)} {s.index}'>"
            f"<table><thead><tr><th>#</th><th>parameter</th><th>unit</th><th>{html.escape(value)}</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></section>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
