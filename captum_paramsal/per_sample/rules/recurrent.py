"""``RNN`` (tanh and relu), ``GRU``, ``LSTM``: exact per-sample gradients of every parameter.

The rule recomputes the layer's recurrence in plain PyTorch ops for the whole batch, from
the input ``x`` (and the initial state ``hx`` where one was passed), with the module's
weights *detached*, and backpropagates the given output gradients through it once, with
one ``torch.autograd.grad`` call. Samples do not interact inside the layer (eval mode: no
dropout between layers), so this yields, for every sample and step ``t`` of each layer
``k`` and direction, the gradient ``d_a[t]`` at the gate pre-activations and the vectors
that multiply the weights. Then, per sample,

* ``dW_ih = sum_t d_a[t]^T u[t]`` with ``u`` the layer's input sequence (``x``, or the
  previous layer's outputs of both directions): a :class:`~..grads.LowRankGrad` of rank
  ``T``, one unit per row (gate and hidden unit);
* ``dW_hh = sum_t d_a'[t]^T h[t-1]``, ``h[t-1]`` the state the step started from (in the
  direction's own order); ``d_a' = d_a`` except for the GRU's candidate gate, where
  ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))`` puts the reset gate between the two:
  ``d_a'_n = r * d_a_n``;
* ``db_ih = sum_t d_a[t]``, ``db_hh = sum_t d_a'[t]``;
* an LSTM with ``proj_size > 0``: ``h[t] = W_hr (o[t] * tanh(c[t]))``, so
  ``dW_hr = sum_t d_h[t]^T (o[t] * tanh(c[t]))``.

The recomputation keeps autograd's graph back to ``x``, ``hx`` and the output gradients
(only the weights are detached), so that the second-order pass can differentiate a
reduction of these gradients with respect to them. Its cost is one extra forward and
backward of the layer in plain ops.

Tensors come batch first (the engine moves the batch of a sequence-first layer, and of
``hx``, ``h_n``, ``c_n``, which always keep it on dim 1, to dim 0: :func:`recurrent_batch_dims`):
``x (B, T, I)``, ``hx (B, L*D, H_out)`` (an LSTM: ``(h_0, c_0)``), and ``grad_output`` as
the module's output structure, ``(d_output (B, T, D*H_out), d_h_n (B, L*D, H_out))`` or
for an LSTM ``(d_output, (d_h_n, d_c_n (B, L*D, H)))``, an entry None where it is zero.

Not covered: a :class:`~torch.nn.utils.rnn.PackedSequence` input (a TypeError: pad the
batch instead), unbatched 2-D inputs, and a training-mode layer with dropout between
layers (its random masks cannot be replayed). The registered parameter names are a fixed
union over layers ``0 .. MAX_LAYERS - 1`` and both directions; the parameters of deeper
layers go to the fallback. The default selection takes every weight matrix
(``weight_ih_l*``, ``weight_hh_l*``, an LSTM's ``weight_hr_l*``), not the biases.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..call import CallInputs
from ..grads import DenseGrad, LowRankGrad, PerSampleGrad
from ..registry import register_rule

#: the layers whose parameter names are registered (``weight_ih_l0`` .. ``weight_ih_l7``)
MAX_LAYERS = 8

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}


def _suffixes(max_layers: int = MAX_LAYERS) -> List[str]:
    return [f"_l{k}{rev}" for k in range(max_layers) for rev in ("", "_reverse")]


def _names(kinds: Sequence[str]) -> Tuple[str, ...]:
    return tuple(f"{kind}{sfx}" for sfx in _suffixes() for kind in kinds)


_WEIGHTS = ("weight_ih", "weight_hh")
_BIASES = ("bias_ih", "bias_hh")


def _not_packed(x: Any) -> None:
    if isinstance(x, PackedSequence):
        raise TypeError(
            "per-sample gradients of a recurrent layer need a padded batch, not a PackedSequence: "
            "pad the sequences (torch.nn.utils.rnn.pad_sequence) and call the layer on the padded "
            "tensor, masking the padded steps in the loss"
        )


def recurrent_batch_dims(module: nn.Module, inputs: CallInputs, output: Any) -> Tuple[List[int], List[int]]:
    """Which dim holds the batch, for each tensor input and each tensor output (in flattened order).

    ``x`` and ``output``: 0 if ``batch_first`` else 1; ``hx``, ``h_n``, ``c_n``: always 1
    (PyTorch keeps the states ``(L*D, B, H)`` whatever ``batch_first`` says).
    """
    x = inputs.arg(0, "input")
    _not_packed(x)
    seq = 0 if module.batch_first else 1
    from torch.utils._pytree import tree_flatten

    in_leaves = [t for t in tree_flatten((tuple(inputs.args), dict(inputs.kwargs)))[0] if isinstance(t, Tensor)]
    out_leaves = [t for t in tree_flatten(output)[0] if isinstance(t, Tensor)]
    in_dims = [seq if t is x else 1 for t in in_leaves]
    out_dims = [seq if i == 0 else 1 for i in range(len(out_leaves))]
    return in_dims, out_dims


def _split_grad_output(grad_output: Any, lstm: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(d_output, d_h_n, d_c_n)`` from the output structure (None where absent)."""
    if grad_output is None or isinstance(grad_output, Tensor):
        return grad_output, None, None
    d_out, d_state = (tuple(grad_output) + (None, None))[:2]
    if lstm and d_state is not None and not isinstance(d_state, Tensor):
        d_h, d_c = (tuple(d_state) + (None, None))[:2]
        return d_out, d_h, d_c
    return d_out, d_state, None


def _split_hx(hx: Any, lstm: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    if hx is None:
        return None, None
    if lstm:
        if isinstance(hx, Tensor) or len(hx) != 2:
            raise TypeError("an LSTM's hx is a tuple (h_0, c_0)")
        return hx[0], hx[1]
    if not isinstance(hx, Tensor):
        raise TypeError(f"hx of {type(hx).__name__}: expected a tensor")
    return hx, None


class _Record:
    """What the recomputation kept of one layer and direction (all batch first, time order)."""

    __slots__ = ("suffix", "pre", "inputs", "h_prev", "reset", "hs", "cells")

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.pre: Tensor  # (B, T, G*H): the input projection plus biases, whose gradient is d_a
        self.inputs: Tensor  # (B, T, I_k): the layer's input sequence
        self.h_prev: Tensor  # (B, T, H_out): the state each step started from
        self.reset: Optional[Tensor] = None  # GRU: (B, T, H), the reset gate
        self.hs: List[Tensor] = []  # LSTM with proj: each step's projected state, time order
        self.cells: Optional[Tensor] = None  # LSTM with proj: (B, T, H), o * tanh(c)


def _recurrence(
    module: nn.Module, x: Tensor, hx: Any, need_leaf: bool = False
) -> Tuple[Tensor, Tensor, Optional[Tensor], List[_Record]]:
    """The layer's forward in plain ops, batch first: ``(output, h_n, c_n or None, records)``.

    Weights are detached; everything else keeps its graph. ``need_leaf``: give each input
    projection ``requires_grad`` even where nothing it depends on does (for the rule's own
    backward).
    """
    mode = module.mode
    if mode not in _GATES:
        raise NotImplementedError(f"recurrent mode {mode!r} has no rule")
    lstm, gru = mode == "LSTM", mode == "GRU"
    layers, directions = module.num_layers, 2 if module.bidirectional else 1
    hidden = module.hidden_size
    proj = getattr(module, "proj_size", 0) or 0
    h_out = proj if proj > 0 else hidden
    batch, steps = x.shape[0], x.shape[1]
    h0, c0 = _split_hx(hx, lstm)
    if h0 is not None and tuple(h0.shape) != (batch, layers * directions, h_out):
        raise ValueError(f"hx of shape {tuple(h0.shape)}: expected batch first {(batch, layers * directions, h_out)}")
    if c0 is not None and tuple(c0.shape) != (batch, layers * directions, hidden):
        raise ValueError(f"c_0 of shape {tuple(c0.shape)}: expected batch first {(batch, layers * directions, hidden)}")
    zeros_h = x.new_zeros(batch, h_out)
    zeros_c = x.new_zeros(batch, hidden)
    act = torch.relu if mode == "RNN_RELU" else torch.tanh

    records: List[_Record] = []
    h_n: List[Tensor] = []
    c_n: List[Tensor] = []
    layer_input = x
    for k in range(layers):
        outputs = []
        for d in range(directions):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            rec = _Record(sfx)
            w_ih = getattr(module, "weight_ih" + sfx).detach()
            w_hh_t = getattr(module, "weight_hh" + sfx).detach().t()
            b_ih = getattr(module, "bias_ih" + sfx).detach() if module.bias else None
            b_hh = getattr(module, "bias_hh" + sfx).detach() if module.bias else None
            w_hr_t = getattr(module, "weight_hr" + sfx).detach().t() if proj > 0 else None
            pre = torch.matmul(layer_input, w_ih.t())
            if b_ih is not None:
                # RNN and LSTM add both biases to the same pre-activation; the GRU's b_hn sits
                # behind the reset gate, so its hh bias stays with the hh product
                pre = pre + (b_ih if gru else b_ih + b_hh)
            if need_leaf and not pre.requires_grad:
                pre.requires_grad_()
            rec.pre, rec.inputs = pre, layer_input
            index = k * directions + d
            h = h0[:, index] if h0 is not None else zeros_h
            c = (c0[:, index] if c0 is not None else zeros_c) if lstm else None
            per_step = pre.unbind(1)
            order = range(steps) if d == 0 else range(steps - 1, -1, -1)
            h_prev: List[Optional[Tensor]] = [None] * steps
            hs: List[Optional[Tensor]] = [None] * steps
            resets: List[Optional[Tensor]] = [None] * steps
            cells: List[Optional[Tensor]] = [None] * steps
            for t in order:
                h_prev[t] = h
                if gru:
                    gh = torch.addmm(b_hh, h, w_hh_t) if b_hh is not None else h @ w_hh_t
                    gi_r, gi_z, gi_n = per_step[t].chunk(3, 1)
                    gh_r, gh_z, gh_n = gh.chunk(3, 1)
                    r = torch.sigmoid(gi_r + gh_r)
                    z = torch.sigmoid(gi_z + gh_z)
                    n = torch.tanh(gi_n + r * gh_n)
                    h = n + z * (h - n)
                    resets[t] = r
                elif lstm:
                    a = torch.addmm(per_step[t], h, w_hh_t)
                    i, f, g, o = a.chunk(4, 1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    m = torch.sigmoid(o) * torch.tanh(c)
                    if w_hr_t is not None:
                        cells[t] = m
                        h = m @ w_hr_t
                    else:
                        h = m
                else:
                    h = act(torch.addmm(per_step[t], h, w_hh_t))
                hs[t] = h
            rec.h_prev = torch.stack(h_prev, 1)
            if gru:
                rec.reset = torch.stack(resets, 1)
            if w_hr_t is not None:
                rec.hs = hs
                rec.cells = torch.stack(cells, 1)
            records.append(rec)
            outputs.append(torch.stack(hs, 1))
            h_n.append(h)
            if lstm:
                c_n.append(c)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, -1)
        if k < layers - 1 and module.dropout > 0 and module.training:
            raise NotImplementedError(
                "a recurrent layer in training mode with dropout between layers: its dropout masks "
                "are random and cannot be recomputed; put the model in eval mode"
            )
    return layer_input, torch.stack(h_n, 1), (torch.stack(c_n, 1) if lstm else None), records


def recurrent_forward(module: nn.Module, x: Tensor, hx: Any = None) -> Tuple[Any, ...]:
    """The rule's recomputation of ``module(x, hx)``, batch first: ``(output, h_n)`` or for an
    LSTM ``(output, (h_n, c_n))`` (what the tests compare with the module's own forward)."""
    output, h_n, c_n, _ = _recurrence(module, x, hx)
    return (output, (h_n, c_n)) if c_n is not None else (output, h_n)


def _low_rank(left: Tensor, right: Tensor, shape: torch.Size) -> LowRankGrad:
    """``sum_t left[:, t]^T right[:, t]`` per sample: ``left (B, T, R)``, ``right (B, T, J)``."""
    factor_left = left.transpose(1, 2).unsqueeze(1)  # (B, 1, R, T)
    factor_right = right.unsqueeze(1)  # (B, 1, T, J)
    return LowRankGrad(factor_left, lambda start, stop: factor_right[start:stop], shape)


def recurrent_per_sample_grads(
    module: nn.Module, inputs: CallInputs, grad_output: Any, names: FrozenSet[str]
) -> Dict[str, PerSampleGrad]:
    x = inputs.arg(0, "input")
    _not_packed(x)
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(
            f"the recurrent rule needs a batched input (B, T, I), got "
            f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
        )
    hx = inputs.args[1] if len(inputs.args) > 1 else inputs.kwargs.get("hx")
    lstm = module.mode == "LSTM"
    d_out, d_h, d_c = _split_grad_output(grad_output, lstm)
    hx_tensors = [t for t in ((hx,) if isinstance(hx, Tensor) else tuple(hx or ())) if isinstance(t, Tensor)]
    tracked = [x, *hx_tensors, *(g for g in (d_out, d_h, d_c) if g is not None)]
    create_graph = torch.is_grad_enabled() and any(t.requires_grad for t in tracked)

    with torch.enable_grad():
        output, h_n, c_n, records = _recurrence(module, x, hx, need_leaf=True)
        wanted: List[Tuple[_Record, str]] = []  # which tensors' gradients are needed
        for rec in records:
            sfx = rec.suffix
            if any(f"{kind}{sfx}" in names for kind in (*_WEIGHTS, *_BIASES)):
                wanted.append((rec, "pre"))
            if f"weight_hr{sfx}" in names and rec.cells is not None:
                wanted.append((rec, "hs"))
        if not wanted:
            return {}
        targets: List[Tensor] = []
        for rec, what in wanted:
            targets.extend([rec.pre] if what == "pre" else rec.hs)
        outs, cots = [], []
        for what, value, grad in (("output", output, d_out), ("h_n", h_n, d_h), ("c_n", c_n, d_c)):
            if value is not None and grad is not None:
                if grad.shape != value.shape:
                    raise ValueError(
                        f"the gradient at {what} has shape {tuple(grad.shape)}, expected batch first "
                        f"{tuple(value.shape)}"
                    )
                outs.append(value)
                cots.append(grad)
        if outs:
            found = torch.autograd.grad(outs, targets, cots, create_graph=create_graph, allow_unused=True)
        else:
            found = (None,) * len(targets)
        grads_at = [torch.zeros_like(t) if g is None else g for t, g in zip(targets, found)]

    def keep(t: Tensor) -> Tensor:
        return t if create_graph else t.detach()

    result: Dict[str, PerSampleGrad] = {}
    position = 0
    for rec, what in wanted:
        sfx = rec.suffix
        if what == "hs":
            d_hs = torch.stack(grads_at[position : position + len(rec.hs)], 1)  # (B, T, H_out)
            position += len(rec.hs)
            name = f"weight_hr{sfx}"
            result[name] = _low_rank(keep(d_hs), keep(rec.cells), getattr(module, name).shape)
            continue
        d_pre = grads_at[position]  # (B, T, G*H)
        position += 1
        if rec.reset is not None:  # GRU: the hh product of the candidate gate is behind r
            hidden = module.hidden_size
            d_hh = torch.cat([d_pre[..., : 2 * hidden], d_pre[..., 2 * hidden :] * rec.reset], -1)
        else:
            d_hh = d_pre
        d_pre, d_hh = keep(d_pre), keep(d_hh)
        for kind, left, right in (("weight_ih", d_pre, rec.inputs), ("weight_hh", d_hh, rec.h_prev)):
            name = f"{kind}{sfx}"
            if name in names:
                result[name] = _low_rank(left, keep(right), getattr(module, name).shape)
        for kind, left in (("bias_ih", d_pre), ("bias_hh", d_hh)):
            name = f"{kind}{sfx}"
            if name in names:
                result[name] = DenseGrad(left.sum(1))
    return result


def _register(module_type: type, name: str, weights: Tuple[str, ...]) -> None:
    options: Dict[str, Any] = {}
    if "batch_dims" in inspect.signature(register_rule).parameters:  # the engine's batch-dim option
        options["batch_dims"] = recurrent_batch_dims
    register_rule(
        module_type, params=_names(weights + _BIASES), default=_names(weights), subclasses=True, name=name, **options
    )(recurrent_per_sample_grads)


_register(nn.RNN, "rnn", _WEIGHTS)
_register(nn.GRU, "gru", _WEIGHTS)
_register(nn.LSTM, "lstm", (*_WEIGHTS, "weight_hr"))
