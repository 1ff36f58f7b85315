"""MLP neurons: one finder per family of feed-forward block.

Neuron ``i`` of an MLP is row ``i`` of its up projection (and of its gate projection, in a
gated MLP) and column ``i`` of its down projection: the weights that compute the hidden
unit and the weights that read it.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from torch import nn

from .groups import FoundGroup, in_features, linear_like, out_features, output_axis, register_finder


def _neurons(suffix: str, ups: Sequence[str], down: str, modules) -> Optional[List[FoundGroup]]:
    """The group of an MLP whose up (and gate) layers ``ups`` feed the ``down`` layer."""
    width = out_features(modules[ups[0]])
    if any(out_features(modules[u]) != width for u in ups) or in_features(modules[down]) != width:
        return None
    parts = [(f"{u}.weight", output_axis(modules[u]), 0, 1) for u in ups]
    parts.append((f"{down}.weight", 1 - output_axis(modules[down]), 0, 1))
    return [FoundGroup(suffix, "neurons", width, tuple(parts))]


def _layers(module: nn.Module, names: Sequence[str]):
    """``{dotted name: layer}`` where every name is a Linear-like layer of ``module``, else None."""
    found = {}
    for name in names:
        layer = module
        for step in name.split("."):
            layer = getattr(layer, step, None)
        if not linear_like(layer):
            return None
        found[name] = layer
    return found


#: (up layers, down layer, suffix of the group's name) of the MLP layouts the finder knows
_LAYOUTS = (
    (("gate_proj", "up_proj"), "down_proj", ""),  # Llama, Mistral, Qwen (gated)
    (("up_proj",), "down_proj", ""),
    (("c_fc",), "c_proj", ""),  # GPT-2 (Conv1D)
    (("fc1",), "fc2", ""),  # ViT, BART, OPT ...
    (("wi_0", "wi_1"), "wo", ""),  # T5, gated
    (("wi",), "wo", ""),  # T5
    (("linear1",), "linear2", "linear1"),  # nn.TransformerEncoderLayer / DecoderLayer
    (("intermediate.dense",), "output.dense", "intermediate"),  # BERT-like layers
)


@register_finder("neurons")
def feed_forward(module: nn.Module) -> Optional[List[FoundGroup]]:
    """An MLP in one of the layouts of :data:`_LAYOUTS`: its own name names the group, or,
    where the layers sit directly in a transformer layer (``nn.TransformerEncoderLayer``'s
    ``linear1/linear2``, BERT's ``intermediate.dense/output.dense``), the up layer's."""
    for ups, down, suffix in _LAYOUTS:
        modules = _layers(module, (*ups, down))
        if modules is not None:
            return _neurons(suffix, ups, down, modules)
    return None
