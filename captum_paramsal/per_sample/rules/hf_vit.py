"""Hugging Face's ``ViTEmbeddings``: the ``cls_token``, ``mask_token`` and ``position_embeddings``
that its forward adds to the patch embeddings.

``y = cat(cls, patches * (1 - m) + mask_token * m) + position_embeddings`` (then dropout, off in
eval), so per sample: ``dcls = dY[0]``, ``dpos = dY`` (the whole ``(1, N + 1, D)``, one
unit under the default grouping), ``dmask_token = sum_t m[t] dY[t + 1]`` (zero without
``bool_masked_pos``). The patch projection is the ``Conv2d`` child's (its own rule).

Not supported (a ``ValueError``): ``interpolate_pos_encoding=True`` where it does interpolate
(a bicubic resampling of the position embeddings), dropout in training mode. Not in the
default selection. ``transformers`` is optional: without it this module registers nothing.
"""

from __future__ import annotations

from typing import Dict, FrozenSet

from torch import Tensor, nn

from ..call import CallInputs
from ..grads import DenseGrad, PerSampleGrad
from ..registry import register_rule

try:
    from transformers.models.vit.modeling_vit import ViTEmbeddings
except Exception:  # noqa: BLE001  (transformers not installed, or broken: no rule then)
    ViTEmbeddings = None


def _argument(inputs: CallInputs, index: int, name: str, default):
    if index < len(inputs.args):
        return inputs.args[index]
    return inputs.kwargs.get(name, default)


def vit_embeddings_per_sample_grads(
    module: nn.Module, inputs: CallInputs, grad_output: Tensor, names: FrozenSet[str]
) -> Dict[str, PerSampleGrad]:
    pixel_values = inputs.arg(0, "pixel_values")
    masked = _argument(inputs, 1, "bool_masked_pos", None)
    interpolate = _argument(inputs, 2, "interpolate_pos_encoding", False)
    batch = grad_output.shape[0]
    if module.training and module.dropout.p > 0:
        raise ValueError("vit_embeddings rule: dropout is on (training mode); put the model in eval mode")
    height, width = pixel_values.shape[-2:]
    positions = module.position_embeddings.shape[1]
    if interpolate and not (grad_output.shape[1] == positions and height == width):
        raise ValueError(
            "vit_embeddings rule: interpolate_pos_encoding resamples the position embeddings; not supported"
        )
    grads: Dict[str, PerSampleGrad] = {}
    if "cls_token" in names:
        grads["cls_token"] = DenseGrad(grad_output[:, :1].reshape(batch, *module.cls_token.shape))
    if "position_embeddings" in names:
        grads["position_embeddings"] = DenseGrad(grad_output.reshape(batch, *module.position_embeddings.shape))
    if "mask_token" in names and module.mask_token is not None:
        if masked is None:
            grad = grad_output.new_zeros(batch, *module.mask_token.shape)
        else:
            m = masked.reshape(batch, -1, 1).to(grad_output.dtype)
            grad = (grad_output[:, 1:] * m).sum(1).reshape(batch, *module.mask_token.shape)
        grads["mask_token"] = DenseGrad(grad)
    return grads


if ViTEmbeddings is not None:
    register_rule(
        ViTEmbeddings, params=("cls_token", "mask_token", "position_embeddings"), subclasses=True,
        name="vit_embeddings",
    )(vit_embeddings_per_sample_grads)
