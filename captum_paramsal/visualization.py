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


_KIND_WORDS = {"heads": "head", "kv_heads": "kv head", "neurons": "neuron"}


def unit_label(layout: SaliencyLayout, column: int) -> str:
    """How a figure names a column: ``"fc.weight [3]"`` for a row, ``"h.3.attn head 7"`` for a
    head (``kv head``, ``neuron`` likewise)."""
    name, unit = layout.unit_of(column)
    word = _KIND_WORDS.get(layout[name].kind)
    return f"{name} {word} {unit}" if word else f"{name} [{unit}]"


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
    labels = [unit_label(layout, column) for column in columns.tolist()][::-1]
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


# -- per-token attributions (an input saliency at an embedding layer, beside Captum's) -------------


def token_scores(
    attributions: torch.Tensor,
    reduction: str = "sum",
    normalize: bool = False,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One score per token from an attribution at a token-wise layer, ``(B, T, D)`` (or one
    sample's ``(T, D)``) to ``(B, T)`` (``(T,)``).

    ``reduction="sum"`` (the default) adds the ``D`` features of each token, signed: what
    Captum's tutorials do with ``LayerIntegratedGradients`` on an embedding layer, so that
    scores of :class:`~captum_paramsal.ParameterGuidedInputSaliency` and of Captum's layer
    methods are read the same way; for a gradient it is the change of the objective when
    every feature of the token's vector moves by the same small amount. ``"l2"`` takes the
    Euclidean norm over ``D`` instead: how strongly the token's vector matters, whatever
    the direction (unsigned).

    Args:
        attributions: ``(B, T, D)`` or ``(T, D)``.
        reduction: ``"sum"`` or ``"l2"``.
        normalize: divide each sample's scores by their Euclidean norm over its tokens (as
            Captum's tutorials do before showing them); a sample whose scores are all zero
            stays zero.
        attention_mask: ``(B, T)`` (or ``(T,)``); scores where it is 0 (padding) are set to 0
            and left out of the normalization.

    Returns:
        the scores, detached, float, on the attributions' device.
    """
    a = torch.as_tensor(attributions).detach()
    if a.dim() not in (2, 3):
        raise ValueError(f"attributions must be (B, T, D) or (T, D), got shape {tuple(a.shape)}")
    a = a if a.is_floating_point() else a.double()
    if reduction == "sum":
        scores = a.sum(dim=-1)
    elif reduction == "l2":
        scores = a.norm(dim=-1)
    else:
        raise ValueError(f"reduction must be 'sum' or 'l2', got {reduction!r}")
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask, device=scores.device)
        if mask.shape != scores.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, the scores {tuple(scores.shape)}")
        scores = torch.where(mask != 0, scores, torch.zeros_like(scores))
    if normalize:
        norm = scores.norm(dim=-1, keepdim=True)
        scores = torch.where(norm > 0, scores / torch.where(norm > 0, norm, torch.ones_like(norm)), scores)
    return scores


def plot_token_attributions(
    tokens: list[str] | tuple[str, ...],
    scores: dict[str, Any],
    kind: str = "bars",
    normalize: bool = True,
    title: Optional[str] = None,
    ax: Optional[Any] = None,
) -> Any:
    """Several methods' per-token scores of one sample, side by side.

    Args:
        tokens: the sample's ``T`` tokens, as text (e.g. ``tokenizer.convert_ids_to_tokens``).
        scores: ``{method name: (T,) scores}`` (tensors or arrays, e.g. a row of
            :func:`token_scores`), in the order to show them.
        kind: ``"bars"``: for each token one bar per method, grouped; ``"heatmap"``: one row
            per method, one column per token, red positive and blue negative.
        normalize: divide each method's scores by their largest absolute value, so that
            methods on different scales (a second-order gradient, integrated gradients)
            share one axis; the signs are kept.
        title: the figure's title (default ``"per-token attributions"``).
        ax: a matplotlib axes to draw into; default: a new ``Figure``.

    Returns:
        the ``Figure``.
    """
    tokens = [str(t) for t in tokens]
    if not tokens:
        raise ValueError("tokens is empty")
    if not scores:
        raise ValueError("scores is empty: give at least one {method name: scores}")
    if kind not in ("bars", "heatmap"):
        raise ValueError(f"kind must be 'bars' or 'heatmap', got {kind!r}")
    rows = []
    for name, values in scores.items():
        row = torch.as_tensor(values).detach().double().cpu().reshape(-1)
        if row.numel() != len(tokens):
            raise ValueError(f"scores[{name!r}] has {row.numel()} values for {len(tokens)} tokens")
        if normalize and row.abs().max() > 0:
            row = row / row.abs().max()
        rows.append(row)
    names = list(scores)
    count = len(tokens)
    figure, ax = _figure_and_axes(ax, (max(6.0, 0.55 * count + 2.0), 3.5 if kind == "bars" else 0.5 * len(names) + 2))
    if kind == "bars":
        width = 0.8 / len(rows)
        for index, (name, row) in enumerate(zip(names, rows)):
            offsets = [t - 0.4 + width * (index + 0.5) for t in range(count)]
            ax.bar(offsets, row.tolist(), width=width, label=name)
        ax.axhline(0.0, color="0.5", linewidth=0.6)
        ax.set_xticks(range(count), tokens, rotation=60, ha="right", fontsize="small")
        ax.set_xlim(-0.6, count - 0.4)
        ax.set_ylabel("score / max |score|" if normalize else "score")
        ax.legend(loc="upper right", fontsize="small")
    else:
        table = torch.stack(rows)
        limit = float(table.abs().max()) or 1.0
        image = ax.imshow(table.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_xticks(range(count), tokens, rotation=60, ha="right", fontsize="small")
        ax.set_yticks(range(len(names)), names)
        figure.colorbar(image, ax=ax, label="score / max |score|" if normalize else "score")
    ax.set_title(title if title is not None else "per-token attributions")
    return figure
