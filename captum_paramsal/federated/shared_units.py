"""The encoder as layers of units: what a client selects from and sends, unit by unit.

A *layer* is a weight whose dim-0 slices are its units (a conv filter, a Linear row), with
the tensors that share those units: the module's bias, and a normalization right after it
with one entry per unit (its weight, bias and running statistics), so that a selected filter
travels with its bias and its norm entries. Every other shared tensor is a layer of its own
(units: its dim-0 slices, or one unit for a scalar). Every shared tensor is in exactly one
layer, and all of a layer's tensors have its number of units as their dim 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

from torch import nn

from .split import ModelSplit

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d,
          nn.InstanceNorm2d, nn.InstanceNorm3d)


@dataclass(frozen=True)
class SharedLayer:
    """One selectable layer: ``main`` (the weight whose units are selected; a parameter) and
    every shared tensor that has the same units along dim 0 (``tensors``, ``main`` first)."""

    name: str
    main: str
    tensors: Tuple[str, ...]
    num_units: int


def shared_layers(model: nn.Module, split: ModelSplit) -> Tuple[SharedLayer, ...]:
    """The encoder of ``model`` grouped into :class:`SharedLayer` s, in model order."""
    state = model.state_dict()
    shared = set(split.encoder)
    layers: List[Dict] = []
    taken: set = set()
    last = None  # the last weight layer, which a norm right after it joins
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        own = [prefix + n for n, _ in module.named_parameters(recurse=False) if prefix + n in shared]
        own += [prefix + n for n, _ in module.named_buffers(recurse=False) if prefix + n in shared]
        own = [n for n in own if n not in taken]
        if not own:
            continue
        weight = prefix + "weight"
        if isinstance(module, _NORMS) and last is not None and weight in own \
                and state[weight].dim() == 1 and state[weight].shape[0] == last["units"]:
            joining = [n for n in own if state[n].dim() >= 1 and state[n].shape[0] == last["units"]]
            last["tensors"].extend(joining)
            taken.update(joining)
            own = [n for n in own if n not in joining]
        elif weight in own and state[weight].dim() >= 2:
            units = state[weight].shape[0]
            joining = [weight] + [n for n in own if n != weight and state[n].dim() >= 1 and state[n].shape[0] == units]
            last = {"name": module_name or weight, "main": weight, "tensors": joining, "units": units}
            layers.append(last)
            taken.update(joining)
            own = [n for n in own if n not in joining]
        for name in own:  # anything else: a layer of its own
            tensor = state[name]
            entry = {"name": name, "main": name, "tensors": [name], "units": tensor.shape[0] if tensor.dim() else 1}
            layers.append(entry)
            taken.add(name)
    missing = [n for n in split.encoder if n not in taken]
    if missing:  # a shared tensor held by no module (impossible for a state dict, but say so)
        raise ValueError(f"shared tensors outside every module: {missing[:5]}")
    params = set(split.encoder_parameters)
    result = []
    for entry in layers:
        main = entry["main"]
        if main not in params:  # a buffer alone (running statistics of an unmatched norm): not selectable by saliency
            main = next((n for n in entry["tensors"] if n in params), main)
        result.append(SharedLayer(entry["name"], main, tuple(entry["tensors"]), int(entry["units"])))
    return tuple(result)
