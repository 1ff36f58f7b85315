"""Edit chosen units of a model for the length of a ``with`` block (docs/METHOD.md, "The paper's validation
experiments").

``turn_off`` zeroes each unit's weight slice (and, with ``bias=True``, its bias entry),
``boost`` multiplies them by a factor, ``perturb`` adds noise. Units are named as everywhere
in the library (:mod:`captum_paramsal.units`): ``(parameter name, unit index)`` pairs,
``UnitScore`` rows of ``profile.top_k()``, or columns of a
:class:`~captum_paramsal.layout.SaliencyLayout` (the default selection's layout unless
``layout=`` is given). A unit is what the saliency calls one: a conv filter, a Linear row, a
ConvTranspose output channel, index 0 of anything else; under a unit scheme
(:mod:`captum_paramsal.unit_schemes`) also an attention head (its q, k, v rows and the output
projection's columns that read it) or an MLP neuron (its up/gate rows and down column), named
``("transformer.h.3.attn", 7)`` or by a column of ``ps.layout``.

All three run on :func:`swapped_parameters`, the library's one way to show a model other
weights for a while (the fine-tuning test and SPADE use it too): each edited parameter's
``param.data`` is replaced by an edited copy, and on exit, also when the block raises, the
parameter gets its own original storage back. That storage is never written, so the values
come back bit for bit (nothing is recomputed), and the parameter object, ``requires_grad`` and
``.grad`` are never touched.

Examples::

    >>> from captum_paramsal.interventions import boost, swapped_parameters, turn_off
    >>> with turn_off(model, [("layer4.1.conv2.weight", 97), ("fc.weight", 3)]):
    ...     fixed = model(image).argmax(1)
    >>> with boost(model, [4711], factor=10.0, layout=ps.layout):   # a layout column
    ...     boosted = model(image)
    >>> with swapped_parameters(model, {"fc.weight": torch.zeros_like(model.fc.weight)}):
    ...     silenced = model(image)
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .layout import SaliencyLayout
from .per_sample.selection import SelectedParameter, wrapper_prefix
from .units import Unit, Units, resolve_entries, resolve_units

__all__ = [
    "NOISES",
    "Unit",
    "Units",
    "boost",
    "edited_values",
    "perturb",
    "resolve_entries",
    "resolve_units",
    "swapped_parameters",
    "turn_off",
    "unit_entries",
]

NOISES = ("gaussian", "proportional")


@contextlib.contextmanager
def swapped_parameters(model: nn.Module, values: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    r"""Inside the block, each named parameter of ``model`` holds ``values[name]``; on exit,
    also on error, its own original storage again.

    Only ``param.data`` is replaced: the parameter object stays the same (so optimizers,
    hooks and tied modules still see it), ``requires_grad`` and ``.grad`` are untouched, and
    the original storage is never written to, so putting it back restores the values bit for
    bit (and leaves the parameter's version counter as it was). Inside, each parameter holds a
    fresh copy of its value, converted to the parameter's dtype and device and laid out like
    the parameter (a ``channels_last`` weight stays ``channels_last``, a transposed one keeps
    its strides; one whose strides leave gaps, a slice of a larger tensor, gets a dense copy),
    and on exit the parameter has its own storage, strides and memory format back. Changing
    the model in the block (an optimizer step, say) never writes the tensors you passed, and
    changing those never writes the model. Nested blocks restore in order.

    Everything is checked before anything is swapped, so a bad entry leaves the model as it
    was. Note: a tensor that shares the parameter's storage without being the parameter (a
    view taken before the block, a second ``nn.Parameter`` over the same memory) keeps showing
    the original values.

    Args:
        model: the network.
        values: ``{parameter name: new value}``, names as in ``model.named_parameters()`` (an
            alias of a tied parameter works too, and a wrapped model's parameter may be named
            without the wrapper's prefix, as ``params=`` takes it), each value a tensor of the
            parameter's shape.

    Yields:
        ``model``.

    Raises:
        TypeError: ``values`` is not a mapping of names to tensors.
        ValueError: a name the model has no parameter for (with a "did you mean" hint, and the
            module's parameter names when a module name is given), two names for one
            parameter, a value of another shape, or a complex / floating-point value for a
            real / integer parameter.

    Examples::

        >>> from captum_paramsal.interventions import swapped_parameters
        >>> pruned = model.fc.weight.detach() * (model.fc.weight.abs() > 0.01)
        >>> with swapped_parameters(model, {"fc.weight": pruned}) as m:
        ...     sparse_logits = m(images)
        >>> # the dense weights are back here, bit for bit, also had the block raised
    """
    swaps = _checked_swaps(model, values)
    saved: List[Tuple[nn.Parameter, Tensor]] = []
    try:
        with torch.no_grad():
            for param, value in swaps:
                new = torch.empty_like(param.data, memory_format=torch.preserve_format)
                new.copy_(value.detach())
                saved.append((param, param.data))
                param.data = new
        yield model
    finally:
        for param, original in reversed(saved):
            param.data = original


def _checked_swaps(model: nn.Module, values: Mapping[str, Tensor]) -> List[Tuple[nn.Parameter, Tensor]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(values, Mapping):
        raise TypeError(f"values must be a mapping {{parameter name: tensor}}, got {type(values).__name__}")
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight's aliases too
    prefix = wrapper_prefix(model)
    swaps: List[Tuple[nn.Parameter, Tensor]] = []
    named: Dict[int, str] = {}
    for name, value in values.items():
        if not isinstance(name, str):
            raise TypeError(f"values must be keyed by parameter names (str), got the key {name!r}")
        if name not in params and prefix and prefix + name in params:  # named without the wrapper, as params= takes it
            name = prefix + name
        if name not in params:
            raise ValueError(_unknown_parameter(model, name, params))
        param = params[name]
        if id(param) in named:
            raise ValueError(f"{named[id(param)]!r} and {name!r} name the same (tied) parameter; give it once")
        named[id(param)] = name
        if not isinstance(value, Tensor):
            raise TypeError(f"the value for {name!r} must be a Tensor, got {type(value).__name__}")
        if value.shape != param.shape:
            raise ValueError(
                f"the value for {name!r} has shape {tuple(value.shape)}, but the parameter has {tuple(param.shape)}"
            )
        if value.is_complex() and not param.is_complex():
            raise ValueError(f"the value for {name!r} is complex ({value.dtype}) but the parameter is {param.dtype}")
        if value.is_floating_point() and not (param.is_floating_point() or param.is_complex()):
            raise ValueError(
                f"the value for {name!r} is floating point ({value.dtype}) but the parameter is {param.dtype}"
            )
        swaps.append((param, value))
    return swaps


def _unknown_parameter(model: nn.Module, name: str, params: Mapping[str, Tensor]) -> str:
    message = f"the model has no parameter named {name!r}"
    modules = dict(model.named_modules())
    if name in modules and name:
        own = [f"{name}.{attr}" for attr, p in modules[name]._parameters.items() if p is not None]
        if own:
            return message + f"; {name!r} is a module, name its parameter: {', '.join(map(repr, own))}"
    close = difflib.get_close_matches(name, list(params), n=3)
    return message + (f"; did you mean {', '.join(map(repr, close))}?" if close else "")


def unit_entries(p: SelectedParameter) -> Tensor:
    """``(units, entries)`` flat indices into ``p.param`` (row-major) of each unit, from the
    registry's grouping (so a transposed convolution's output channels come out right, as in
    the saliency).

    Examples::

        >>> from captum_paramsal.per_sample.selection import select_parameters
        >>> (p,) = select_parameters(model, ["fc.weight"]).params
        >>> unit_entries(p)[3]        # the flat positions of fc.weight's row 3
    """
    flat = torch.arange(p.param.numel(), device=p.param.device).view(1, *p.param.shape)
    return p.grouping(flat, p.grouping_module)[0]


def edited_values(
    model: nn.Module,
    units: Units,
    edit: Callable[[Tensor], Tensor],
    bias: bool = False,
    layout: Optional[SaliencyLayout] = None,
) -> Dict[str, Tensor]:
    """``{parameter name: new value}`` with ``edit`` applied to every chosen unit; the model is
    only read.

    ``edit`` gets the values of the chosen units in one parameter as ``(units, entries of each
    there)`` and returns new values of that shape: a row unit's whole row; a head's or a
    neuron's part of each parameter it spans, one parameter at a time. With ``bias=True`` it
    is also called on the bias entries of those units (a row's entry; a head's q, k and v
    entries, not the output projection's bias, which no head owns). Parameters in model
    order. The result is what :func:`turn_off`, :func:`boost` and :func:`perturb` hand to
    :func:`swapped_parameters`.

    Examples::

        >>> values = edited_values(model, [("fc.weight", 3)], torch.zeros_like, bias=True)
        >>> sorted(values)
        ['fc.bias', 'fc.weight']
        >>> with swapped_parameters(model, values):
        ...     out = model(images)          # the same as inside turn_off(model, ..., bias=True)
    """
    blocks = resolve_entries(model, units, layout, bias=bias)
    if not blocks:
        return {}
    params = dict(model.named_parameters())
    targets = [(name, entries) for name, entries_list in blocks.items() for entries in entries_list]
    new: Dict[str, Tensor] = {}
    with torch.no_grad():
        for name, index in targets:
            # a parameter named twice (a bias that is itself a chosen unit) gets both edits
            values = new.get(name)
            if values is None:
                values = torch.clone(params[name].detach(), memory_format=torch.contiguous_format)
            flat = values.view(-1)
            index = index.to(flat.device)
            flat[index] = edit(flat[index])
            new[name] = values
    order = {n: i for i, n in enumerate(params)}
    return {name: new[name] for name in sorted(new, key=order.__getitem__)}


@contextlib.contextmanager
def _edited(
    model: nn.Module,
    units: Units,
    edit: Callable[[Tensor], Tensor],
    bias: bool,
    layout: Optional[SaliencyLayout],
) -> Iterator[nn.Module]:
    with swapped_parameters(model, edited_values(model, units, edit, bias, layout)):
        yield model


def turn_off(
    model: nn.Module, units: Units, bias: bool = False, layout: Optional[SaliencyLayout] = None
) -> contextlib.AbstractContextManager:
    """Zero the chosen units' weights (and their bias entries with ``bias=True``) inside the block.

    Args:
        model: the network.
        units: the units (see :mod:`captum_paramsal.units`): ``(parameter name, unit index)``
            pairs, ``UnitScore`` rows of ``profile.top_k()``, or layout columns.
        bias: also zero each unit's entry of its layer's bias.
        layout: the layout that columns index; default the default selection's.

    Returns:
        A context manager yielding ``model``; on exit, also on error, every edited parameter
        has its original values back bit for bit (see :func:`swapped_parameters`).

    Raises:
        TypeError, ValueError: a unit that is malformed, names no parameter or is out of range
            (raised on entering the block, before anything changes).

    Examples::

        >>> from captum_paramsal.interventions import turn_off
        >>> with turn_off(model, [("layer4.1.conv2.weight", 97), ("fc.weight", 3)], bias=True):
        ...     fixed = model(images).argmax(1)
        >>> top = ps.profile(images[:1], target=labels[:1]).top_k(10)[0]
        >>> with turn_off(model, top):                  # sample 0's ten most salient units
        ...     p = model(images[:1]).softmax(1)
    """
    return _edited(model, units, torch.zeros_like, bias, layout)


def boost(
    model: nn.Module,
    units: Units,
    factor: float,
    bias: bool = False,
    layout: Optional[SaliencyLayout] = None,
) -> contextlib.AbstractContextManager:
    """Multiply the chosen units' weights (and bias entries with ``bias=True``) by ``factor``.

    Args:
        model, units, bias, layout: as in :func:`turn_off`.
        factor: the multiplier, a finite or infinite number (not NaN).

    Returns:
        A context manager yielding ``model``, restoring every bit on exit.

    Examples::

        >>> from captum_paramsal.interventions import boost
        >>> with boost(model, [4711], factor=10.0, layout=ps.layout):   # a layout column
        ...     boosted = model(images)
    """
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor != factor:
        raise ValueError(f"factor must be a number, got {factor!r}")
    return _edited(model, units, lambda values: values * factor, bias, layout)


def perturb(
    model: nn.Module,
    units: Units,
    noise: str = "gaussian",
    scale: float = 0.1,
    seed: Optional[int] = None,
    layout: Optional[SaliencyLayout] = None,
) -> contextlib.AbstractContextManager:
    """Add noise to the chosen units' weights inside the block.

    ``noise="gaussian"``: ``w + scale * std(unit) * N(0, 1)`` (noise on the unit's own scale;
    ``|w|`` for a unit of one entry); ``"proportional"``: ``w * (1 + scale * N(0, 1))``.

    Args:
        model, units, layout: as in :func:`turn_off`.
        noise: ``"gaussian"`` or ``"proportional"``.
        scale: the noise's strength, ``>= 0``.
        seed: makes the noise repeatable (a private generator; the global random state is not
            used); None draws a fresh seed.

    Returns:
        A context manager yielding ``model``, restoring every bit on exit.

    Examples::

        >>> from captum_paramsal.interventions import perturb
        >>> with perturb(model, [("fc.weight", 3)], noise="proportional", scale=0.5, seed=0):
        ...     noisy = model(images)
    """
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale >= 0:
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

