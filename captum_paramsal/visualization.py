"""Figures: matplotlib ``Figure`` objects built without pyplot, so they work headless and
show inline in notebooks (``fig.savefig(path)`` writes a file)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Tuple

import torch

if TYPE_CHECKING:
    from .profile import SaliencyProfile


def _figure_and_axes(ax: Optional[Any], figsize: Tuple[float, float]):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, layout="constrained")
    return figure, figure.subplots()


def plot_profile(profile: SaliencyProfile, sample: int, k: int = 10, ax: Optional[Any] = None):
    """Each parameter's units sorted by value, descending, concatenated in network order;
    vertical lines between parameters; the sample's top-``k`` units in red."""
    figure, ax = _figure_and_axes(ax, (10, 3.5))
    values = profile.values[sample].detach().double().cpu()
    top = set(values.topk(min(k, values.numel())).indices.tolist()) if k > 0 else set()
    x0, hx, hy, boundaries = 0, [], [], []
    for index, entry in enumerate(profile.layout):
        block = values[entry.slice]
        order = torch.argsort(block, descending=True)
        positions = list(range(x0, x0 + entry.num_units))
        # one line per layer: values of different layers are not a curve
        ax.plot(positions, block[order].tolist(), linewidth=0.8, color="tab:blue",
                marker="." if entry.num_units < 20 else None,
                label="units, sorted within each layer" if index == 0 else None)
        for position, unit in zip(positions, order.tolist()):
            if entry.slice.start + unit in top:
                hx.append(position)
                hy.append(float(block[unit]))
        x0 += entry.num_units
        boundaries.append(x0)
    ax.scatter(hx, hy, color="tab:red", s=18, zorder=3, label=f"top {len(hx)} units")
    for boundary in boundaries[:-1]:
        ax.axvline(boundary, color="0.8", linewidth=0.6, zorder=0)
    ax.set_xlim(0, max(x0, 1))
    ax.set_xlabel("units: each layer sorted descending, layers in network order")
    ax.set_ylabel(profile.value_label)
    ax.set_title(f"parameter saliency profile, sample {sample}")
    ax.legend(loc="upper right", fontsize="small")
    return figure


def plot_top_units(profile: SaliencyProfile, sample: int, k: int = 10, ax: Optional[Any] = None):
    """A horizontal bar chart of the sample's ``k`` most salient units, most salient on top."""
    rows = profile.top_k(k)[sample]
    figure, ax = _figure_and_axes(ax, (7, 0.35 * len(rows) + 1.2))
    labels = [f"{row.param} [{row.unit}]" for row in rows][::-1]
    ax.barh(range(len(rows)), [row.value for row in rows][::-1], color="tab:red")
    ax.set_yticks(range(len(rows)), labels, fontsize="small")
    ax.set_xlabel(profile.value_label)
    ax.set_ylabel("parameter [unit]")
    ax.set_title(f"top {len(rows)} units, sample {sample}")
    return figure
