"""Edit chosen units of a model for the length of a ``with`` block (SPEC §4).

``turn_off`` zeroes each unit's weight slice (and, with ``bias=True``, its bias entry),
``boost`` multiplies them by a factor, ``perturb`` adds noise. Units are ``(parameter name,
unit index)`` pairs, or columns of a :class:`~captum_paramsal.layout.SaliencyLayout` (the
default selection's layout unless ``layout=`` is given). A unit is what the saliency calls
one: a conv filter, a Linear row, a ConvTranspose output channel, index 0 of anything else.

On exit, also when the block raises, every touched parameter gets its original values back
bit for bit (copied back from a saved clone; nothing is recomputed).

Examples::

    >>> with turn_off(model, [("layer4.1.conv2.weight", 97), ("fc.weight", 3)]):
    ...     fixed = model(image).argmax(1)
    >>> with boost(model, [4711], factor=10.0, layout=ps.layout):   # a layout column
    ...     boosted = model(image)
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .layout import SaliencyLayout
from .per_sample.selection import SelectedParameter, select_parameters

Unit = Union[int, Tuple[str, int]]
NOISES = ("gaussian", "proportional")


def resolve_units(
    model: nn.Module, units: Iterable[Unit], layout: Optional[SaliencyLayout] = None
) -> Dict[str, List[int]]:
    """``{parameter name: [unit indices]}`` (in model order, duplicates dropped) for ``units``."""
    units = list(units)
    wanted: Dict[str, List[int]] = {}
    for unit in units:
        if isinstance(unit, (int, torch.Tensor)) and not isinstance(unit, bool):
            if layout is None:
                layout = select_parameters(model).layout
            column = int(unit)
            if not 0 <= column < layout.num_columns:
                raise ValueError(f"unit column {column} is out of range for a layout of {layout.num_columns} columns")
            name, index = layout.unit_of(column)
        elif isinstance(unit, tuple) and len(unit) == 2 and isinstance(unit[0], str):
            name, index = unit[0], int(unit[1])
        else:
            raise TypeError(f"a unit is a layout column (int) or a (parameter name, unit index) pair, got {unit!r}")
        wanted.setdefault(name, [])
        if index not in wanted[name]:
            wanted[name].append(index)
    if not wanted:
        return {}
    selection = _selection(model, list(wanted))
    for p in selection.params:
        bad = [i for i in wanted[p.name] if not 0 <= i < p.num_units]
        if bad:
            raise ValueError(f"unit {bad[0]} of {p.name} is out of range: it has {p.num_units} units")
    return {p.name: sorted(wanted[p.name]) for p in selection.params}


def _selection(model: nn.Module, names: Sequence[str]):
    known = dict(model.named_parameters())
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"the model has no parameter named {missing[0]!r}")
    return select_parameters(model, names)


def unit_entries(p: SelectedParameter) -> Tensor:
    """``(units, entries)`` flat indices into ``p.param`` of each unit, from the registry's grouping
    (so a transposed convolution's output channels come out right, as in the saliency)."""
    flat = torch.arange(p.param.numel(), device=p.param.device).view(1, *p.param.shape)
    return p.grouping(flat, p.grouping_module)[0]


def _bias_of(p: SelectedParameter) -> Optional[Tensor]:
    """The bias whose entry ``u`` belongs to unit ``u`` of a weight, if the owner has one."""
    module = p.grouping_module
    if module is None or not p.name.endswith("weight"):
        return None
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor) and bias.dim() == 1 and bias.shape[0] == p.num_units:
        return bias
    return None


@contextlib.contextmanager
def _edited(
    model: nn.Module,
    units: Iterable[Unit],
    edit: Callable[[Tensor], Tensor],
    bias: bool,
    layout: Optional[SaliencyLayout],
) -> Iterator[nn.Module]:
    """Apply ``edit(values of one unit, entries x ...) -> new values`` to every chosen unit."""
    wanted = resolve_units(model, units, layout)
    saved: List[Tuple[Tensor, Tensor]] = []
    try:
        with torch.no_grad():
            selection = _selection(model, list(wanted)) if wanted else None
            for p in selection.params if selection else ():
                index = unit_entries(p)[wanted[p.name]]  # (chosen units, entries)
                targets = [(p.param, index)]
                owner_bias = _bias_of(p) if bias else None
                if owner_bias is not None:
                    targets.append((owner_bias, torch.tensor(wanted[p.name], device=owner_bias.device)[:, None]))
                for tensor, idx in targets:
                    original = tensor.detach().clone()
                    saved.append((tensor, original))
                    values = original.clone().view(-1)
                    values[idx] = edit(values[idx])
                    tensor.copy_(values.view_as(tensor))
        yield model
    finally:
        with torch.no_grad():
            for tensor, original in reversed(saved):
                tensor.copy_(original)


def turn_off(
    model: nn.Module, units: Iterable[Unit], bias: bool = False, layout: Optional[SaliencyLayout] = None
) -> contextlib.AbstractContextManager:
    """Zero the chosen units' weights (and their bias entries with ``bias=True``) inside the block."""
    return _edited(model, units, torch.zeros_like, bias, layout)


def boost(
    model: nn.Module,
    units: Iterable[Unit],
    factor: float,
    bias: bool = False,
    layout: Optional[SaliencyLayout] = None,
) -> contextlib.AbstractContextManager:
    """Multiply the chosen units' weights (and bias entries with ``bias=True``) by ``factor``."""
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor != factor:
        raise ValueError(f"factor must be a number, got {factor!r}")
    return _edited(model, units, lambda values: values * factor, bias, layout)


def perturb(
    model: nn.Module,
    units: Iterable[Unit],
    noise: str = "gaussian",
    scale: float = 0.1,
    seed: Optional[int] = None,
    layout: Optional[SaliencyLayout] = None,
) -> contextlib.AbstractContextManager:
    """Add noise to the chosen units' weights inside the block.

    ``noise="gaussian"``: ``w + scale * std(unit) * N(0, 1)`` (noise on the unit's own scale);
    ``"proportional"``: ``w * (1 + scale * N(0, 1))``. ``seed`` makes it repeatable.
    """
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    if not isinstance(scale, (int, float)) or not scale >= 0:
        raise ValueError(f"scale must be a non-negative number, got {scale!r}")
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()

    def add_noise(values: Tensor) -> Tensor:
        draw = torch.randn(values.shape, generator=generator, dtype=values.dtype).to(values.device)
        if noise == "gaussian":
            spread = values.std(dim=-1, keepdim=True) if values.shape[-1] > 1 else values.abs()
            return values + scale * spread * draw
        return values * (1 + scale * draw)

    return _edited(model, units, add_noise, False, layout)
