"""The recurrent rules (``RNN`` tanh / relu, ``GRU``, ``LSTM`` with and without projections)
against a naive per-sample autograd loop, called directly with batch-first tensors.

Each configuration (layers, directions, bias, batch_first, initial state) runs a batch of 5
sequences of 4 steps in float64; ``grad_output`` is autograd's gradient of a random linear
function of every output (``output``, ``h_n``, ``c_n``), and each parameter's per-sample
gradient must match the loop's to 1e-10. The second-order path (gradients that carry a graph
back to ``x`` and ``hx``) is checked against a naive double backward.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn

from captum_paramsal.per_sample.call import CallInputs
from captum_paramsal.per_sample.grads import DenseGrad, LowRankGrad
from captum_paramsal.per_sample.registry import default_grouping, default_params, explain_rule, find_rule
from captum_paramsal.per_sample.rules.recurrent import (
    MAX_LAYERS,
    recurrent_batch_dims,
    recurrent_forward,
    recurrent_per_sample_grads,
)

B, T, IN, H, PROJ = 5, 4, 3, 6, 2
KINDS = ("rnn_tanh", "rnn_relu", "gru", "lstm", "lstm_proj")


def build(kind: str, num_layers: int = 1, bidirectional: bool = False, bias: bool = True, batch_first: bool = True):
    torch.manual_seed(0)
    options: Dict[str, Any] = dict(
        num_layers=num_layers, bidirectional=bidirectional, bias=bias, batch_first=batch_first
    )
    if kind.startswith("rnn"):
        module = nn.RNN(IN, H, nonlinearity=kind[4:], **options)
    elif kind == "gru":
        module = nn.GRU(IN, H, **options)
    else:
        module = nn.LSTM(IN, H, proj_size=PROJ if kind == "lstm_proj" else 0, **options)
    with torch.no_grad():  # a wider spread than the default init, so that every gate saturates a bit
        for p in module.parameters():
            p.uniform_(-0.7, 0.7)
    return module.double().eval()


def is_lstm(module: nn.Module) -> bool:
    return isinstance(module, nn.LSTM)


def state_sizes(module: nn.Module) -> Tuple[int, int, int]:
    """``(L*D, H_out, H)``"""
    directions = 2 if module.bidirectional else 1
    h_out = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    return module.num_layers * directions, h_out, module.hidden_size


def batch_first_inputs(module: nn.Module, with_hx: bool, seed: int = 1) -> Tuple[Tensor, Any]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, IN, generator=gen, dtype=torch.float64)
    if not with_hx:
        return x, None
    states, h_out, hidden = state_sizes(module)
    h0 = 0.5 * torch.randn(B, states, h_out, generator=gen, dtype=torch.float64)
    if is_lstm(module):
        return x, (h0, 0.5 * torch.randn(B, states, hidden, generator=gen, dtype=torch.float64))
    return x, h0


def module_layout(module: nn.Module, x: Tensor, hx: Any) -> Tuple[Tensor, Any]:
    """Batch-first ``x`` / ``hx`` as the module takes them (``hx`` always keeps the batch on dim 1)."""
    xm = x if module.batch_first else x.transpose(0, 1)
    if hx is None:
        return xm, None
    if isinstance(hx, tuple):
        return xm, tuple(h.transpose(0, 1) for h in hx)
    return xm, hx.transpose(0, 1)


def run_module(module: nn.Module, x: Tensor, hx: Any) -> List[Tensor]:
    """``[output, h_n(, c_n)]``, batch first, from the module's own forward."""
    xm, hxm = module_layout(module, x, hx)
    output, state = module(xm) if hxm is None else module(xm, hxm)
    output = output if module.batch_first else output.transpose(0, 1)
    states = list(state) if isinstance(state, tuple) else [state]
    return [output] + [s.transpose(0, 1) for s in states]


def coefficients(outputs: List[Tensor], seed: int = 2) -> List[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outputs]


def per_sample_objective(outputs: List[Tensor], coeffs: List[Tensor], nonlinear: bool = False) -> Tensor:
    """``(n,)``: a random linear (or, for the second order, nonlinear) function of every output."""
    total = 0
    for o, c in zip(outputs, coeffs):
        value = torch.tanh(o) + 0.5 * o * o if nonlinear else o
        total = total + (value * c).flatten(1).sum(1)
    return total


def structured(module: nn.Module, grads: List[Tensor]) -> Any:
    """Batch-first gradients in the module's output structure."""
    if is_lstm(module):
        return grads[0], (grads[1], grads[2])
    return grads[0], grads[1]


def call_inputs(x: Tensor, hx: Any, as_keyword: bool = False) -> CallInputs:
    if hx is None:
        return CallInputs(args=(x,), kwargs={})
    if as_keyword:
        return CallInputs(args=(x,), kwargs={"hx": hx})
    return CallInputs(args=(x, hx), kwargs={})


def hx_slice(hx: Any, i: int) -> Any:
    if hx is None:
        return None
    if isinstance(hx, tuple):
        return tuple(h[i : i + 1] for h in hx)
    return hx[i : i + 1]


def naive_grads(module: nn.Module, x: Tensor, hx: Any, coeffs: List[Tensor]) -> Dict[str, Tensor]:
    """``{name: (B, *shape)}`` by one forward and one backward per sample."""
    named = dict(module.named_parameters())
    rows: Dict[str, List[Tensor]] = {n: [] for n in named}
    for i in range(B):
        outputs = run_module(module, x[i : i + 1], hx_slice(hx, i))
        loss = per_sample_objective(outputs, [c[i : i + 1] for c in coeffs]).sum()
        grads = torch.autograd.grad(loss, list(named.values()))
        for n, g in zip(named, grads):
            rows[n].append(g)
    return {n: torch.stack(r) for n, r in rows.items()}


def dense(grad) -> Tensor:
    if isinstance(grad, DenseGrad):
        return grad.values
    assert isinstance(grad, LowRankGrad)
    return grad.materialize(0, grad.batch)


def rel_error(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


CONFIGS = list(
    itertools.product(KINDS, (1, 2), (False, True), (True, False), (True, False), (False, True))
)


def config_id(config) -> str:
    kind, layers, bidir, bias, batch_first, with_hx = config
    return (
        f"{kind}-L{layers}{'-bidir' if bidir else ''}{'' if bias else '-nobias'}"
        f"-{'bf' if batch_first else 'sf'}{'-hx' if with_hx else ''}"
    )


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_per_sample_grads_match_naive_loop(config):
    kind, layers, bidir, bias, batch_first, with_hx = config
    module = build(kind, layers, bidir, bias, batch_first)
    x, hx = batch_first_inputs(module, with_hx)

    # the rule's recomputation is the module's forward
    with torch.no_grad():
        expected = run_module(module, x, hx)
        mine = recurrent_forward(module, x, hx)
    mine = [mine[0], *(mine[1] if isinstance(mine[1], tuple) else (mine[1],))]
    for a, b in zip(mine, expected):
        assert (a - b).abs().max().item() < 1e-12

    # grad_output: autograd's gradient of a random linear function of every output, batch first
    coeffs = coefficients(expected)
    outputs = run_module(module, x, hx)
    grad_outputs = torch.autograd.grad(per_sample_objective(outputs, coeffs).sum(), outputs)
    names = frozenset(n for n, _ in module.named_parameters())
    with torch.no_grad():  # as in the engine's first-order pass
        grads = recurrent_per_sample_grads(
            module, call_inputs(x, hx, as_keyword=layers == 2), structured(module, list(grad_outputs)), names
        )
    assert set(grads) == names
    reference = naive_grads(module, x, hx, coeffs)
    for name in names:
        got = dense(grads[name])
        assert got.shape == reference[name].shape, name
        assert not got.requires_grad, name
        assert rel_error(got, reference[name]) < 1e-10, (name, rel_error(got, reference[name]))
        if name.startswith("weight"):
            assert isinstance(grads[name], LowRankGrad), name
            assert grads[name].rows_are_units(default_grouping)
            groups, rows, rank, entries = grads[name].factor_shape
            assert (groups, rows, rank) == (1, reference[name].shape[1], T)


SECOND_ORDER = [
    ("rnn_tanh", 1, False, True, True, False),
    ("rnn_relu", 2, True, True, False, True),
    ("gru", 1, False, True, True, False),
    ("gru", 2, True, True, False, True),
    ("lstm", 2, True, False, True, True),
    ("lstm_proj", 2, True, True, False, True),
]


@pytest.mark.parametrize("config", SECOND_ORDER, ids=config_id)
def test_second_order_matches_naive_double_backward(config):
    """d/dx of sum |per-sample gradient| (every parameter), with grad_output itself a function of x."""
    kind, layers, bidir, bias, batch_first, with_hx = config
    module = build(kind, layers, bidir, bias, batch_first)
    x0, hx0 = batch_first_inputs(module, with_hx)
    named = dict(module.named_parameters())
    coeffs = coefficients(run_module(module, x0, hx0))

    def leaf(value):
        if value is None:
            return None
        if isinstance(value, tuple):
            return tuple(v.clone().requires_grad_() for v in value)
        return value.clone().requires_grad_()

    def flat(value) -> List[Tensor]:
        return [] if value is None else list(value) if isinstance(value, tuple) else [value]

    # batched: the module's forward and backward with create_graph, then the rule under autograd
    x, hx = leaf(x0), leaf(hx0)
    outputs = run_module(module, x, hx)
    grad_outputs = torch.autograd.grad(
        per_sample_objective(outputs, coeffs, nonlinear=True).sum(), outputs, create_graph=True
    )
    grads = recurrent_per_sample_grads(
        module, call_inputs(x, hx), structured(module, list(grad_outputs)), frozenset(named)
    )
    total = sum(dense(g).abs().sum() for g in grads.values())
    batched = torch.autograd.grad(total, [x, *flat(hx)])

    # naive: per sample, a gradient with create_graph and its sum of |.| differentiated again
    for i in range(B):
        xi, hxi = leaf(x0[i : i + 1]), leaf(hx_slice(hx0, i))
        outs = run_module(module, xi, hxi)
        loss = per_sample_objective(outs, [c[i : i + 1] for c in coeffs], nonlinear=True).sum()
        g = torch.autograd.grad(loss, list(named.values()), create_graph=True)
        s = sum(t.abs().sum() for t in g)
        naive = torch.autograd.grad(s, [xi, *flat(hxi)])
        for got, want in zip(batched, naive):
            assert rel_error(got[i : i + 1], want) < 1e-8, rel_error(got[i : i + 1], want)


def _grad_outputs(module, x, hx):
    outputs = run_module(module, x, hx)
    return outputs, list(torch.autograd.grad(per_sample_objective(outputs, coefficients(outputs)).sum(), outputs))


def test_only_the_asked_parameters_and_missing_output_grads_are_zeros():
    module = build("lstm_proj", 2, True)
    x, hx = batch_first_inputs(module, True)
    outputs, d = _grad_outputs(module, x, hx)
    names = frozenset({"weight_hr_l1_reverse", "bias_hh_l0"})
    full = recurrent_per_sample_grads(module, call_inputs(x, hx), structured(module, d), names)
    assert set(full) == names
    # d_h_n and d_c_n left out (None) equal zeros there
    none = recurrent_per_sample_grads(module, call_inputs(x, hx), (d[0], None), names)
    zeros = recurrent_per_sample_grads(
        module, call_inputs(x, hx), (d[0], (torch.zeros_like(d[1]), torch.zeros_like(d[2]))), names
    )
    for n in names:
        assert torch.equal(dense(none[n]), dense(zeros[n]))
        assert not torch.equal(dense(none[n]), dense(full[n]))


def test_float32_module():
    module = build("gru", 2, True).float()
    x = torch.randn(B, T, IN)
    _, d = _grad_outputs(module, x, None)
    grads = recurrent_per_sample_grads(module, call_inputs(x, None), structured(module, d), frozenset({"weight_hh_l1"}))
    assert dense(grads["weight_hh_l1"]).dtype == torch.float32


def test_packed_sequence_raises_type_error():
    module = build("lstm")
    padded = torch.randn(B, T, IN, dtype=torch.float64)
    packed = nn.utils.rnn.pack_padded_sequence(padded, [4, 3, 3, 2, 1], batch_first=True)
    with pytest.raises(TypeError, match="pad"):
        recurrent_per_sample_grads(module, CallInputs(args=(packed,), kwargs={}), None, frozenset({"weight_ih_l0"}))
    with pytest.raises(TypeError, match="pad"):
        recurrent_batch_dims(module, CallInputs(args=(packed,), kwargs={}), None)


def test_unbatched_input_and_training_dropout_raise():
    module = build("gru", 2)
    unbatched = CallInputs(args=(torch.randn(T, IN, dtype=torch.float64),), kwargs={})
    with pytest.raises(ValueError, match="batched"):
        recurrent_per_sample_grads(module, unbatched, None, frozenset({"weight_ih_l0"}))
    module.dropout = 0.5
    module.train()
    x = torch.randn(B, T, IN, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="eval mode"):
        recurrent_per_sample_grads(module, call_inputs(x, None), (torch.zeros(B, T, H, dtype=torch.float64), None),
                                   frozenset({"weight_ih_l0"}))


def test_registry_covers_every_parameter_and_defaults_to_the_weight_matrices():
    for kind in KINDS:
        module = build(kind, 2, True, True)
        for name, _ in module.named_parameters():
            assert find_rule(module, name) is not None, (kind, name)
        weights = {n for n, _ in module.named_parameters() if n.startswith("weight")}
        assert weights <= default_params(module)
        assert not {n for n in default_params(module) if n.startswith("bias")}
    deep = nn.GRU(2, 2, num_layers=MAX_LAYERS + 1)
    assert find_rule(deep, f"weight_ih_l{MAX_LAYERS - 1}") is not None
    rule, why = explain_rule(deep, f"weight_ih_l{MAX_LAYERS}")
    assert rule is None and "weight_ih" in why
    assert find_rule(nn.RNN(2, 2), "weight_hr_l0") is None  # only the LSTM has projections


def test_batch_dims():
    for batch_first in (True, False):
        seq = 0 if batch_first else 1
        module = build("lstm", 2, True, batch_first=batch_first)
        x, hx = batch_first_inputs(module, True)
        xm, hxm = module_layout(module, x, hx)
        output = module(xm, hxm)
        assert recurrent_batch_dims(module, CallInputs(args=(xm, hxm), kwargs={}), output) == ([seq, 1, 1], [seq, 1, 1])
        assert recurrent_batch_dims(module, CallInputs(args=(xm,), kwargs={"hx": hxm}), output) == (
            [seq, 1, 1], [seq, 1, 1]
        )
        gru = build("gru", batch_first=batch_first)
        xm = x if batch_first else x.transpose(0, 1)
        assert recurrent_batch_dims(gru, CallInputs(args=(xm,), kwargs={}), gru(xm)) == ([seq], [seq, 1])


class _Tap(torch.autograd.Function):
    """An identity whose backward calls a callback, as the engine's taps do."""

    @staticmethod
    def forward(ctx, callback, *outputs):
        ctx.callback = callback
        return tuple(o.clone() for o in outputs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.callback(list(grads))
        return (None, *grads)


def test_rule_runs_inside_a_backward_as_the_engine_calls_it():
    module = build("lstm_proj", 2, True, batch_first=False)
    x, hx = batch_first_inputs(module, True)
    xm, hxm = module_layout(module, x, hx)
    names = frozenset(n for n, _ in module.named_parameters())
    found = {}

    def on_grad(grads):  # module layout -> batch first
        d_out, d_h, d_c = grads[0].transpose(0, 1), grads[1].transpose(0, 1), grads[2].transpose(0, 1)
        found.update(recurrent_per_sample_grads(module, call_inputs(x, hx), (d_out, (d_h, d_c)), names))

    output, (h_n, c_n) = module(xm, hxm)
    tapped = _Tap.apply(on_grad, output, h_n, c_n)
    outputs = [tapped[0].transpose(0, 1), tapped[1].transpose(0, 1), tapped[2].transpose(0, 1)]
    coeffs = coefficients(outputs)
    anchor = [p for p in module.parameters()]
    torch.autograd.grad(per_sample_objective(outputs, coeffs).sum(), anchor)
    reference = naive_grads(module, x, hx, coeffs)
    for name in names:
        assert rel_error(dense(found[name]), reference[name]) < 1e-10, name


def test_grad_output_in_module_layout_is_refused():
    module = build("gru", 2, batch_first=False)
    x, _ = batch_first_inputs(module, False)
    outputs, d = _grad_outputs(module, x, None)
    with pytest.raises(ValueError, match="batch first"):
        recurrent_per_sample_grads(
            module, call_inputs(x, None), (d[0], d[1].transpose(0, 1)), frozenset({"weight_ih_l0"})
        )
