"""``MultiheadAttention``: per-sample gradients of the in-projection (and of ``out_proj``).

MHA's forward reads ``in_proj_weight`` (or ``q/k/v_proj_weight``), ``in_proj_bias``,
``bias_k``/``bias_v`` and ``out_proj.weight``/``.bias`` functionally, so only a rule on the
MHA module itself sees them used. The in-projections are Linear maps of the call's
inputs, ``q_p = query @ Wq^T + bq`` (likewise ``k_p``, ``v_p``), so per sample
``dWq = dq_p^T query``, a :class:`~..grads.LowRankGrad` of rank ``L`` (``S`` for the key
and value), once the gradients at ``q_p``, ``k_p``, ``v_p`` are known. The rule gets them by
recomputing the attention of the call from its (batch-first) inputs with the module's
weights detached, the three projections kept as graph nodes, and one
``torch.autograd.grad`` of the output gradient for the whole batch (samples do not
interact in attention). The recomputation is torch's own
``F.multi_head_attention_forward`` given the projected tensors and identity projections
(exact: a product with an identity matrix rounds nothing), so every option it has (masks,
``add_zero_attn``, averaged or per-head weights, ``is_causal``, the SDPA path without weights)
means what it means for the module. Where the gradients must themselves be differentiable (the
second-order pass), SDPA runs its math kernel: the fused ones have no double backward.

The attention output before ``out_proj`` is a node of the recomputation as well: the rule
also returns the per-sample gradients of ``out_proj.weight`` (``left = dY^T``, ``right`` =
that output) and ``out_proj.bias`` under the names ``"out_proj.weight"`` and
``"out_proj.bias"`` when ``names`` asks for them: the rule claims them (dotted names in its
``params``), so the selection makes the MHA module their owner and the forward's functional
read of them is a use inside their owner's call.

What the rule is given (batch-first, whatever the module's ``batch_first``):

* ``inputs``: ``query (B, L, E)``, ``key (B, S, kdim)``, ``value (B, S, vdim)``, then
  ``key_padding_mask (B, S)``, ``need_weights``, ``attn_mask`` (``(L, S)`` shared, or per
  sample ``(B * num_heads, L, S)`` as torch takes it or ``(B, num_heads, L, S)``),
  ``average_attn_weights``, ``is_causal``, positional or by keyword;
* ``grad_output``: ``(d_attn_output (B, L, E), d_attn_weights or None)``, or the first
  alone.

Not supported (a clear ``ValueError``): unbatched (2-d) inputs, dropout in training mode.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..call import CallInputs
from ..grads import DenseGrad, LowRankGrad, PerSampleGrad
from ..registry import register_rule

_IN_PROJ = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_PARAMS = (*_IN_PROJ, "in_proj_bias", "bias_k", "bias_v")
#: the child parameters the rule can also give (see the module docstring)
OUT_PROJ = ("out_proj.weight", "out_proj.bias")

_MISSING = object()


def _argument(inputs: CallInputs, index: int, name: str, default: Any) -> Any:
    value = inputs.args[index] if index < len(inputs.args) else inputs.kwargs.get(name, _MISSING)
    return default if value is _MISSING else value


def _float_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A boolean mask as torch's additive float mask (``-inf`` where True); float masks as they are."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise ValueError(f"multihead_attention rule: masks must be bool or float, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _split_grad_output(grad_output: Any) -> Tuple[Tensor, Optional[Tensor]]:
    if isinstance(grad_output, Tensor):
        return grad_output, None
    if isinstance(grad_output, (tuple, list)) and grad_output and isinstance(grad_output[0], Tensor):
        weights = grad_output[1] if len(grad_output) > 1 else None
        return grad_output[0], weights if isinstance(weights, Tensor) else None
    raise TypeError(
        "multihead_attention rule: grad_output must be (d_attn_output, d_attn_weights or None), "
        f"got {type(grad_output).__name__}"
    )


def _projections(module: nn.MultiheadAttention):
    """``(Wq, Wk, Wv, bq, bk, bv)``, detached."""
    e = module.embed_dim
    if module._qkv_same_embed_dim:
        w = module.in_proj_weight.detach()
        wq, wk, wv = w[:e], w[e : 2 * e], w[2 * e :]
    else:
        wq, wk, wv = (p.detach() for p in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight))
    if module.in_proj_bias is None:
        return wq, wk, wv, None, None, None
    bq, bk, bv = module.in_proj_bias.detach().chunk(3)
    return wq, wk, wv, bq, bk, bv


def _node(t: Tensor) -> Tensor:
    """``t`` as something autograd can differentiate with respect to."""
    return t if t.requires_grad else t.requires_grad_()


def _padded(values: Tensor, positions: int) -> Tensor:
    """``(n, P, J)`` zero-padded to ``positions`` along P (zeros add nothing to a product)."""
    extra = positions - values.shape[1]
    return values if extra == 0 else F.pad(values, (0, 0, 0, extra))


def _low_rank(d_projected: Tensor, x: Tensor, shape: Sequence[int]) -> LowRankGrad:
    """``dW = d_projected^T x`` per sample: ``(n, T, R)``, ``(n, T, J)``."""
    right = x.unsqueeze(1)
    return LowRankGrad(d_projected.transpose(1, 2).unsqueeze(1), lambda start, stop: right[start:stop], shape)


_ARGUMENT_NAMES = (
    "query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal",
)


def multihead_attention_batch_dims(
    module: nn.Module, inputs: CallInputs, output: Any
) -> Tuple[List[Optional[int]], List[int]]:
    """Where the batch is: query, key, value and the attention output on dim 0 with
    ``batch_first``, else dim 1; ``key_padding_mask`` and the attention weights on dim 0; a 2-d
    ``attn_mask`` is shared by all samples. A per-sample ``(B * heads, L, S)`` mask has no
    batch dim of its own: such a call goes to the fallback."""
    sequence = 0 if module.batch_first else 1
    named: List[Tuple[str, Any]] = [(_ARGUMENT_NAMES[i], v) for i, v in enumerate(inputs.args)]
    named += list(inputs.kwargs.items())
    dims: List[Optional[int]] = []
    for name, value in named:
        if not isinstance(value, Tensor):
            continue
        if name in ("query", "key", "value"):
            dims.append(sequence)
        elif name == "key_padding_mask":
            dims.append(0)
        elif name == "attn_mask" and value.dim() == 2:
            dims.append(None)
        else:
            raise ValueError(f"its {name} of shape {tuple(value.shape)} is not split by sample (the rule takes a "
                             "shared (L, S) attn_mask)")
    outputs = [t for t in (output if isinstance(output, tuple) else (output,)) if isinstance(t, Tensor)]
    return dims, [sequence, *[0] * (len(outputs) - 1)]


@register_rule(
    nn.MultiheadAttention, params=(*_PARAMS, *OUT_PROJ), default=_IN_PROJ, subclasses=True,
    name="multihead_attention",
    batch_dims=multihead_attention_batch_dims,
)
def multihead_attention_per_sample_grads(
    module: nn.Module, inputs: CallInputs, grad_output: Any, names: FrozenSet[str]
) -> Dict[str, PerSampleGrad]:
    query, key, value = inputs.arg(0, "query"), inputs.arg(1, "key"), inputs.arg(2, "value")
    key_padding_mask = _argument(inputs, 3, "key_padding_mask", None)
    need_weights = _argument(inputs, 4, "need_weights", True)
    attn_mask = _argument(inputs, 5, "attn_mask", None)
    average = _argument(inputs, 6, "average_attn_weights", True)
    is_causal = _argument(inputs, 7, "is_causal", False)
    d_output, d_weights = _split_grad_output(grad_output)
    if query.dim() != 3:
        raise ValueError("multihead_attention rule: needs batched, batch-first (B, L, E) inputs")
    if module.training and module.dropout > 0:
        raise ValueError("multihead_attention rule: dropout is on (training mode); put the model in eval mode")
    n, e, heads = query.shape[0], module.embed_dim, module.num_heads
    if d_output.shape != query.shape[:2] + (e,):
        raise ValueError(
            f"multihead_attention rule: output gradient {tuple(d_output.shape)} for a query of {tuple(query.shape)}"
        )
    if not need_weights:
        d_weights = None
    if attn_mask is not None and attn_mask.dim() == 4:  # (B, heads, L, S): torch's (B * heads, L, S)
        attn_mask = attn_mask.reshape(-1, *attn_mask.shape[2:])
    given = [t for t in (query, key, value, d_output, d_weights) if t is not None]
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in given)
    same_input = query is key and key is value  # self-attention on one tensor: one right factor
    if not tracked:
        query, key, value, d_output = (t.detach() for t in (query, key, value, d_output))
        if same_input:
            key = value = query
        d_weights = None if d_weights is None else d_weights.detach()
    wq, wk, wv, bq, bk, bv = _projections(module)
    out_weight, out_bias = module.out_proj.weight.detach(), module.out_proj.bias
    out_bias = None if out_bias is None else out_bias.detach()
    key_padding_mask = _float_mask(key_padding_mask, query.dtype)
    attn_mask = _float_mask(attn_mask, query.dtype)

    with torch.enable_grad():
        q_p = _node(F.linear(query, wq, bq))
        k_p = _node(F.linear(key, wk, bk))
        v_p = _node(F.linear(value, wv, bv))
        extra: List[Tensor] = []
        k_all, v_all = k_p, v_p
        if module.bias_k is not None:  # one more key and value position, per-sample copies of the biases
            bias_k = module.bias_k.detach().reshape(1, 1, e).repeat(n, 1, 1).requires_grad_()
            bias_v = module.bias_v.detach().reshape(1, 1, e).repeat(n, 1, 1).requires_grad_()
            extra = [bias_k, bias_v]
            k_all, v_all = torch.cat([k_p, bias_k], 1), torch.cat([v_p, bias_v], 1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        eye = torch.eye(e, dtype=q_p.dtype, device=q_p.device)
        # a second derivative needs SDPA's math kernel (the fused ones have no double backward)
        with sdpa_kernel(SDPBackend.MATH) if tracked else nullcontext():
            attended, weights = F.multi_head_attention_forward(
                q_p.transpose(0, 1), k_all.transpose(0, 1), v_all.transpose(0, 1), e, heads,
                None, None, None, None, module.add_zero_attn, 0.0, eye, None,
                training=False, key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
                use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
                average_attn_weights=average, is_causal=is_causal,
            )
        attended = attended.transpose(0, 1)  # (n, L, E): the attention output before out_proj
        output = F.linear(attended, out_weight, out_bias)
        outputs, cotangents = [output], [d_output]
        if d_weights is not None:
            outputs.append(weights)
            cotangents.append(d_weights)
        targets = [q_p, k_p, v_p, *extra]
        parts = torch.autograd.grad(outputs, targets, cotangents, create_graph=tracked, allow_unused=True)
    d_q, d_k, d_v, *d_extra = (torch.zeros_like(t) if d is None else d for t, d in zip(targets, parts))
    if not tracked:
        attended = attended.detach()

    grads: Dict[str, PerSampleGrad] = {}
    if "in_proj_weight" in names and module.in_proj_weight is not None:
        if same_input:
            grads["in_proj_weight"] = _low_rank(torch.cat([d_q, d_k, d_v], -1), query, module.in_proj_weight.shape)
        else:  # three groups of E rows, their positions padded to the longer sequence
            positions = max(query.shape[1], key.shape[1])
            left = torch.stack([_padded(d, positions).transpose(1, 2) for d in (d_q, d_k, d_v)], 1)  # (n, 3, E, P)

            def right(start: int, stop: int) -> Tensor:
                return torch.stack([_padded(x[start:stop], positions) for x in (query, key, value)], 1)

            grads["in_proj_weight"] = LowRankGrad(left, right, module.in_proj_weight.shape)
    for name, d, x in (("q_proj_weight", d_q, query), ("k_proj_weight", d_k, key), ("v_proj_weight", d_v, value)):
        if name in names and getattr(module, name, None) is not None:
            grads[name] = _low_rank(d, x, getattr(module, name).shape)
    if "in_proj_bias" in names and module.in_proj_bias is not None:
        grads["in_proj_bias"] = DenseGrad(torch.cat([d_q.sum(1), d_k.sum(1), d_v.sum(1)], -1))
    if extra:
        if "bias_k" in names:
            grads["bias_k"] = DenseGrad(d_extra[0].reshape(n, *module.bias_k.shape))
        if "bias_v" in names:
            grads["bias_v"] = DenseGrad(d_extra[1].reshape(n, *module.bias_v.shape))
    if "out_proj.weight" in names:
        grads["out_proj.weight"] = _low_rank(d_output, attended, module.out_proj.weight.shape)
    if "out_proj.bias" in names and module.out_proj.bias is not None:
        grads["out_proj.bias"] = DenseGrad(d_output.sum(1))
    return grads
