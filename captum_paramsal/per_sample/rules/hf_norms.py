"""Hugging Face's RMS norms: ``LlamaRMSNorm`` and ``T5LayerNorm``.

Both scale each position by the reciprocal root mean square over the last dim and then
by ``weight`` elementwise, so per sample ``dweight = sum_t dY[t] * x_hat[t]`` over the
sample's positions ``t``, with ``x_hat`` recomputed exactly as each layer does:

* ``LlamaRMSNorm`` (equal to Mistral's, Qwen2's, ... copies): in float32, then cast back
  to the input's dtype before the product with ``weight``;
* ``T5LayerNorm``: the variance in float32, the input scaled in its own dtype (promoted),
  cast to the weight's dtype where that is half precision.

These are the only modules with parameters of their own in the BERT, GPT-2, Llama, T5
and ViT modeling code besides ``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``,
``nn.Conv2d`` and ``Conv1D`` whose forward uses them (``ViTEmbeddings``' ``cls_token``,
``mask_token`` and ``position_embeddings`` are covered in :mod:`.hf_vit`; BERT's
``BertLMPredictionHead.bias`` is the decoder Linear's bias, tied).

Not in the default selection (norm parameters are selected by name). ``transformers`` is
optional, and importing its Llama and T5 modeling code costs a few seconds: without it this
module registers nothing. :func:`register_hf_rms_norm` registers the Llama rule for another
class with the same forward.
"""

from __future__ import annotations

from typing import Dict, FrozenSet

import torch
from torch import Tensor, nn

from ..call import CallInputs
from ..grads import DenseGrad, PerSampleGrad
from ..registry import register_rule


def _per_sample_sum(values: Tensor, batch: int) -> Tensor:
    return values.reshape(batch, -1, values.shape[-1]).sum(1)


def llama_rms_norm_per_sample_grads(
    module: nn.Module, inputs: CallInputs, grad_output: Tensor, names: FrozenSet[str]
) -> Dict[str, PerSampleGrad]:
    x = inputs.arg(0, "hidden_states")
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    x_hat = h.to(x.dtype)
    grad = _per_sample_sum(grad_output * x_hat, x.shape[0]).to(module.weight.dtype)
    return {"weight": DenseGrad(grad)}


def t5_layer_norm_per_sample_grads(
    module: nn.Module, inputs: CallInputs, grad_output: Tensor, names: FrozenSet[str]
) -> Dict[str, PerSampleGrad]:
    x = inputs.arg(0, "hidden_states")
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x_hat = x * torch.rsqrt(variance + module.variance_epsilon)
    if module.weight.dtype in (torch.float16, torch.bfloat16):
        x_hat = x_hat.to(module.weight.dtype)
    grad = _per_sample_sum(grad_output * x_hat, x.shape[0]).to(module.weight.dtype)
    return {"weight": DenseGrad(grad)}


def register_hf_rms_norm(*module_types: type) -> None:
    """Register the ``LlamaRMSNorm`` rule for classes with the same ``forward`` (and the
    ``weight`` and ``variance_epsilon`` attributes)."""
    register_rule(
        *module_types, params=("weight",), default=(), subclasses=True, name="hf_rms_norm", positionwise=True
    )(llama_rms_norm_per_sample_grads)


try:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
except Exception:  # noqa: BLE001  (transformers not installed, or broken: no rule then)
    LlamaRMSNorm = None
try:
    from transformers.models.t5.modeling_t5 import T5LayerNorm
except Exception:  # noqa: BLE001
    T5LayerNorm = None

if LlamaRMSNorm is not None:
    register_hf_rms_norm(LlamaRMSNorm)
if T5LayerNorm is not None:
    register_rule(
        T5LayerNorm, params=("weight",), default=(), subclasses=True, name="hf_t5_layer_norm", positionwise=True
    )(
        t5_layer_norm_per_sample_grads
    )
