"""Unit groups: units that span several parameters, and the finders that recognize them.

A *finder* looks at one module and, where it recognizes an attention block or an MLP,
says which parameters form its units: ``finder(module) -> [FoundGroup]`` or None. Finders
are registered per scheme by :func:`register_finder`, one small function per model family
(:mod:`.heads`, :mod:`.neurons`), and :func:`find_groups` runs them over a model. Names are
relative to the module in a finder and full (as in ``model.named_parameters()``) in a
:class:`UnitGroup`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

from ..layout import UnitPart

#: the schemes a user can ask for; "rows" is one unit per output row of each parameter
UNIT_SCHEMES = ("rows", "heads", "neurons")


@dataclass(frozen=True)
class FoundGroup:
    """What a finder returns: a group of ``num_units`` units of ``kind`` named ``suffix``
    (appended to the module's name with a dot; ``""``: the module's own name), made of
    ``parts``, each ``(parameter name relative to the module, axis, start, size)``."""

    suffix: str
    kind: str
    num_units: int
    parts: Tuple[Tuple[str, int, int, int], ...]


@dataclass(frozen=True)
class UnitGroup:
    """Units spanning parameters, located in a model.

    Attributes:
        name: the module's name (``"transformer.h.3.attn"``), what the layout calls the entry.
        kind: ``"heads"``, ``"kv_heads"`` or ``"neurons"``.
        scheme: the scheme it belongs to (``"heads"`` for both kinds of head).
        num_units: heads, kv heads or neurons.
        parts: where each unit lies in each parameter (:class:`~captum_paramsal.layout.UnitPart`).
    """

    name: str
    kind: str
    scheme: str
    num_units: int
    parts: Tuple[UnitPart, ...]

    @property
    def params(self) -> Tuple[str, ...]:
        """The parameters of its parts, each once, in part order."""
        return tuple(dict.fromkeys(part.param for part in self.parts))


Finder = Callable[[nn.Module], Optional[Sequence[FoundGroup]]]
_FINDERS: Dict[str, List[Finder]] = {"heads": [], "neurons": []}


def register_finder(scheme: str) -> Callable[[Finder], Finder]:
    """Register the decorated ``finder(module) -> [FoundGroup] or None`` for ``scheme``.

    Examples::

        >>> from captum_paramsal.unit_schemes import FoundGroup, register_finder
        >>> @register_finder("neurons")
        ... def my_mlp(module):
        ...     if not isinstance(module, MyMLP):
        ...         return None
        ...     n = module.up.out_features       # neuron i: row i of up, column i of down
        ...     return [FoundGroup("", "neurons", n, (("up.weight", 0, 0, 1), ("down.weight", 1, 0, 1)))]
    """
    if scheme not in _FINDERS:
        raise ValueError(f"finders are registered for {sorted(_FINDERS)}, not {scheme!r}")

    def decorator(finder: Finder) -> Finder:
        _FINDERS[scheme].append(finder)
        return finder

    return decorator


def find_groups(model: nn.Module, scheme: str) -> List[UnitGroup]:
    """Every group of ``scheme`` (``"heads"`` or ``"neurons"``) that the finders recognize in
    ``model``, in module order; parameter names as in ``model.named_parameters()``.

    Examples::

        >>> from captum_paramsal.unit_schemes import find_groups
        >>> [(g.name, g.kind, g.num_units) for g in find_groups(gpt2, "heads")][:1]
        [('transformer.h.0.attn', 'heads', 12)]
    """
    if scheme not in _FINDERS:
        raise ValueError(f"scheme must be one of {sorted(_FINDERS)}, got {scheme!r}")
    from . import heads, neurons  # noqa: F401  (the finders register themselves)

    canonical = {id(param): name for name, param in model.named_parameters()}
    groups: List[UnitGroup] = []
    for module_name, module in model.named_modules():
        for finder in _FINDERS[scheme]:
            found = finder(module)
            if not found:
                continue
            for group in found:
                name = ".".join(n for n in (module_name, group.suffix) if n)
                parts = []
                for relative, axis, start, size in group.parts:
                    param = module.get_parameter(relative)
                    parts.append(UnitPart(canonical[id(param)], tuple(param.shape), axis, start, size))
                groups.append(UnitGroup(name, group.kind, scheme, group.num_units, tuple(parts)))
            break  # one finder per module
    return groups


def linear_like(module: object) -> bool:
    """An ``nn.Linear`` (or subclass) or Hugging Face's ``Conv1D`` (a Linear stored transposed)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_conv1d(module: object) -> bool:
    """Hugging Face's ``Conv1D``, recognized without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def output_axis(module: nn.Module) -> int:
    """The weight axis of a Linear-like layer's output features: 0 for Linear, 1 for Conv1D."""
    return 1 if is_conv1d(module) else 0


def out_features(module: nn.Module) -> int:
    return module.nf if is_conv1d(module) else module.out_features


def in_features(module: nn.Module) -> int:
    return module.nx if is_conv1d(module) else module.in_features
