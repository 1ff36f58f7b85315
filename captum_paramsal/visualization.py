"""Figures: matplotlib ``Figure`` objects built without pyplot, so they work headless, leave a
notebook's backend alone and show inline when a notebook cell returns them
(``fig.savefig(path)`` writes a file).

The plotting functions take plain values and the :class:`~.layout.SaliencyLayout` that names
their columns; :meth:`.SaliencyProfile.plot` and :meth:`.SaliencyProfile.plot_top_k` call them
with a profile's row, its value label and the sample's name.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .layout import SaliencyLayout


def _figure_and_axes(ax: Optional[Any], figsize: Tuple[float, float]):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, layout="constrained")
    return figure, figure.subplots()


def _one_sample(values, layout: SaliencyLayout) -> torch.Tensor:
    values = torch.as_tensor(values).detach().double().cpu()
    if values.dim() != 1 or values.numel() != layout.num_columns:
        raise ValueError(f"values must be one sample's {layout.num_columns} columns, got shape {tuple(values.shape)}")
    return values


def plot_profile(
    values: torch.Tensor,
    layout: SaliencyLayout,
    k: int = 10,
    value_label: str = "saliency",
    title: Optional[str] = None,
    ax: Optional[Any] = None,
) -> Any:
    """The paper's profile figure of one sample: each parameter's units sorted by value,
    descending, concatenated in network order; vertical lines between parameters; the
    sample's top-``k`` units in red.

    Args:
        values: the sample's ``(layout.num_columns,)`` values (a tensor or array).
        layout: the layout naming the columns.
        value_label: the y axis, what the values are (e.g. ``"z-score of mean |grad|"``).
        title: the figure's title (default ``"parameter saliency profile"``).
        ax: a matplotlib axes to draw into; default: a new ``Figure``.

    Returns:
        the ``Figure``.
    """
    values = _one_sample(values, layout)
    figure, ax = _figure_and_axes(ax, (10, 3.5))
    top = set(values.topk(min(k, values.numel())).indices.tolist()) if k > 0 else set()
    x0, hx, hy, boundaries = 0, [], [], []
    for index, entry in enumerate(layout):
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
    ax.set_ylabel(value_label)
    ax.set_title(title if title is not None else "parameter saliency profile")
    ax.legend(loc="upper right", fontsize="small")
    return figure


def plot_top_units(
    values: torch.Tensor,
    layout: SaliencyLayout,
    k: int = 10,
    value_label: str = "saliency",
    title: Optional[str] = None,
    ax: Optional[Any] = None,
) -> Any:
    """A horizontal bar chart of one sample's ``k`` largest units, the largest on top.

    Arguments as :func:`plot_profile` (default title: ``"top k units"``). Returns the ``Figure``.
    """
    values = _one_sample(values, layout)
    if not 1 <= k <= layout.num_columns:
        raise ValueError(f"k must be between 1 and {layout.num_columns}, got {k}")
    top_values, columns = values.topk(k)
    labels = ["{} [{}]".format(*layout.unit_of(column)) for column in columns.tolist()][::-1]
    figure, ax = _figure_and_axes(ax, (7, 0.35 * k + 1.2))
    ax.barh(range(k), top_values.tolist()[::-1], color="tab:red")
    ax.set_yticks(range(k), labels, fontsize="small")
    ax.set_xlabel(value_label)
    ax.set_ylabel("parameter [unit]")
    ax.set_title(title if title is not None else f"top {k} units")
    return figure


def paper_heatmap(
    attr: Any,
    image: Any,
    alpha: float = 0.5,
    cmap: str = "jet",
    low_percentile: float = 90.0,
    high_percentile: float = 99.0,
    path: Optional[str] = None,
) -> Any:
    """Render an input attribution the way the paper does, over its image.

    Steps: the channel max of the signed gradient, its absolute value, values above the
    ``high_percentile`` clipped down to it and values below the ``low_percentile`` raised
    up to it, min-max normalization, a 3x3 Gaussian blur, a colour map, and an overlay on
    the image with weight ``alpha``.

    Args:
        attr: ``(C, H, W)`` or ``(1, C, H, W)`` attribution (tensor or array).
        image: the image, ``(C, H, W)``/``(1, C, H, W)`` tensor or ``(H, W, C)`` array in any
            range (min-max scaled for display); one channel is shown in grey.
        path: also save the result there as a PNG.

    Returns:
        ``(H, W, 3)`` uint8 RGB array.
    """
    import numpy as np
    from matplotlib import colormaps
    from torchvision.transforms.functional import gaussian_blur

    a = torch.as_tensor(np.asarray(attr) if not isinstance(attr, torch.Tensor) else attr).detach().cpu().double()
    if a.dim() == 4 and a.shape[0] == 1:
        a = a[0]
    if a.dim() != 3:
        raise ValueError(f"attr must be (C, H, W) or (1, C, H, W), got shape {tuple(a.shape)}")
    if not 0 <= low_percentile < high_percentile <= 100:
        raise ValueError("need 0 <= low_percentile < high_percentile <= 100")
    heat = a.max(dim=0).values.abs()
    low, high = np.percentile(heat.numpy(), [low_percentile, high_percentile])
    heat = heat.clamp(min=float(low), max=float(high))
    span = heat.max() - heat.min()
    heat = (heat - heat.min()) / span if span > 0 else torch.zeros_like(heat)
    heat = gaussian_blur(heat[None, None].float(), kernel_size=[3, 3])[0, 0].numpy()
    coloured = colormaps[cmap](heat)[..., :3]

    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    img = img.astype(np.float64)
    if img.ndim == 4 and img.shape[0] == 1:
        img = img[0]
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.transpose(1, 2, 0)  # CHW -> HWC
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[:2] != heat.shape:
        raise ValueError(f"image is {img.shape[:2]} but the attribution is {heat.shape}")
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    span = img.max() - img.min()
    img = (img - img.min()) / span if span > 0 else np.zeros_like(img)
    rgb = np.clip((1 - alpha) * img + alpha * coloured, 0, 1)
    out = (rgb * 255).round().astype(np.uint8)
    if path is not None:
        from PIL import Image

        Image.fromarray(out).save(path)
    return out
