"""torchvision models by name, with weights from a local file or torchvision's local cache.

Nothing is downloaded: a weights enum is used only when its file is already in torch hub's
cache, and a weights file is read without unpickling code (safetensors, or ``torch.load``
with ``weights_only=True``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn


def torchvision_model_names() -> list:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def load_state_dict(path: str) -> dict:
    """A state dict from ``path``: ``.safetensors``, or a tensors-only ``torch.save`` file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupted, truncated, or a pickle with code in it
        raise ValueError(f"cannot read weights file {path}: {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a state dict of tensors")
    return state


def _cached_weights(name: str, weights: str):
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
        chosen = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except (KeyError, ValueError) as error:
        raise ValueError(f"{name} has no weights {weights!r}") from error
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(chosen.url))
    if not os.path.isfile(cached):
        raise FileNotFoundError(
            f"weights {name} {chosen} are not in the local cache ({cached}) and nothing is downloaded "
            "here: fetch them where there is internet, or pass a weights file"
        )
    return chosen, cached


def load_torchvision_model(
    name: str,
    weights_path: Optional[str] = None,
    weights: Optional[str] = None,
    num_classes: Optional[int] = None,
) -> nn.Module:
    """A torchvision model by name in eval mode: random weights, ``weights_path`` (a local file),
    or ``weights`` (an enum name such as ``IMAGENET1K_V2`` or ``DEFAULT``, when cached)."""
    import torchvision

    names = torchvision_model_names()
    if name not in names:
        raise ValueError(f"unknown torchvision model {name!r}; known: {', '.join(names)}")
    if weights_path is not None and weights is not None:
        raise ValueError("pass a weights file or a weights name, not both")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if weights is not None:
        chosen, cached = _cached_weights(name, weights)
        model = torchvision.models.get_model(name, **kwargs)
        model.load_state_dict(load_state_dict(cached))
        return model.eval()
    model = torchvision.models.get_model(name, **kwargs)
    if weights_path is not None:
        state = load_state_dict(weights_path)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"weights file {weights_path} does not fit {name}: {error}") from error
    return model.eval()
