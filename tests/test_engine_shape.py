"""The engine's shape: reductions as objects (the ``rms`` one added as proof), rules that see
all of a call's inputs, rules that cover subclasses, the default selection derived from the
registry, the norm-layer rule, and the routing report. Every value against the naive loop."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_paramsal import ParameterGuidedInputSaliency, ParameterSaliency
from captum_paramsal.per_sample import registry
from captum_paramsal.per_sample.grads import DenseGrad, LowRankGrad
from captum_paramsal.per_sample.reductions import REDUCTIONS, get_reduction

from naive import naive_unit_saliency, rel_err


def _labels(n: int, classes: int, seed: int = 3) -> Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


class SequenceClassifier(nn.Module):
    """Linear layers over T steps (rank T), a LayerNorm, an RMSNorm, a conv over the steps."""

    def __init__(self, steps: int = 3, width: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(5, width)
        self.norm = nn.LayerNorm(width)
        self.conv = nn.Conv1d(width, width, 2, padding=1)
        self.rms = nn.RMSNorm(width)
        self.mlp = nn.Linear(width, 2 * width)
        self.head = nn.Linear(2 * width, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(torch.tanh(self.inp(x)))  # (B, T, W)
        h = torch.tanh(self.conv(h.transpose(1, 2))).transpose(1, 2)
        h = torch.tanh(self.mlp(self.rms(h)))
        return self.head(h.mean(1))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)  # 36 positions: no rms closed form
        self.b = nn.Conv2d(4, 8, 3, stride=3)  # 4 positions: rms by the Gram matrix
        self.up = nn.ConvTranspose2d(8, 3, 2, stride=2)
        self.head = nn.Linear(3 * 16, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return self.head(torch.tanh(self.up(h)).flatten(1))


MODELS = {
    "sequence": (SequenceClassifier, (5, 3, 5), 4),
    "conv": (ConvNet, (5, 3, 6, 6), 5),
}


@pytest.mark.parametrize("reduction", sorted(REDUCTIONS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_reduction_against_the_naive_loop(name, reduction):
    make, shape, classes = MODELS[name]
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = _labels(shape[0], classes)
    names = [n for n, _ in model.named_parameters()]  # weights, biases and the norm layers
    ps = ParameterSaliency(model, params=names, reduction=reduction)
    assert ps.routing(x).fallback == ()  # every one of them by a rule
    got = ps.attribute(x, target=y, internal_batch_size=3)
    assert rel_err(got, naive_unit_saliency(model, (x,), y, names, reduction=reduction)) < 1e-10


def test_rms_closed_form_is_taken_where_it_is_cheaper_and_matches_the_dense_path():
    rms = get_reduction("rms")
    assert rms.has_low_rank(rank=3, rows=12, entries=6)  # a Linear over 3 steps
    assert not rms.has_low_rank(rank=36, rows=4, entries=27)  # a conv over 36 positions
    torch.manual_seed(0)
    left = torch.randn(4, 2, 5, 3, dtype=torch.float64)
    right = torch.randn(4, 2, 3, 7, dtype=torch.float64)
    dense = (left @ right).reshape(4, 10, 7)
    assert rel_err(rms.low_rank(left, right), rms.reduce(dense)) < 1e-12
    for reduction in REDUCTIONS.values():
        if reduction.has_low_rank(rank=1, rows=5, entries=7):
            one = left[..., :1], right[..., :1, :]
            assert rel_err(reduction.low_rank(*one), reduction.reduce((one[0] @ one[1]).reshape(4, 10, 7))) < 1e-12


def test_reduction_objects_and_their_labels():
    assert get_reduction("mean_abs").label == "mean |grad|"
    assert get_reduction("mean").label != get_reduction("mean_abs").label  # the signed mean says so
    assert get_reduction(get_reduction("rms")) is REDUCTIONS["rms"]
    with pytest.raises(ValueError, match="reduction must be one of"):
        get_reduction("median")
    ps = ParameterSaliency(ConvNet(), reduction="rms")
    assert ps.reduction == "rms" and ps.value_label == "rms grad"


def naive_boosting(model, x, y, names, k, reduction):
    """Per sample: its profile with create_graph, top-k boosted by 100, d cos / dx."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        loss = F.cross_entropy(model(xi), y[i : i + 1])
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        units = []
        for n, g in zip(names, grads):
            owner = model.get_submodule(n.rsplit(".", 1)[0])
            if isinstance(owner, nn.ConvTranspose2d) and n.endswith("weight"):
                g = g.transpose(0, 1)
            g = g.reshape(g.shape[0], -1) if g.dim() > 1 else g.reshape(-1, 1)
            units.append({"mean_abs": g.abs().mean(1), "mean": g.mean(1), "rms": g.pow(2).mean(1).sqrt()}[reduction])
        s = torch.cat(units)
        b = s.detach().clone()
        top = b.topk(k).indices
        b[top] = b[top] * 100.0
        rows.append(torch.autograd.grad(F.cosine_similarity(s, b, dim=0), xi)[0])
    return torch.cat(rows)


@pytest.mark.parametrize("reduction", ["rms", "mean_abs"])
def test_input_saliency_with_every_pull_back(reduction):
    """The second-order pass through the rms closed form (autograd), the rms and mean_abs
    dense pull-backs (by hand, through the rules) and the norm-layer rule."""
    torch.manual_seed(0)
    model = ConvNet().double().eval()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    y = _labels(3, 5)
    names = ["a.weight", "b.weight", "up.weight", "head.weight", "a.bias"]
    pgis = ParameterGuidedInputSaliency(model, params=names, k=3, reduction=reduction)
    got = pgis.attribute(x, target=y, internal_batch_size=2)
    assert rel_err(got, naive_boosting(model, x, y, names, 3, reduction)) < 1e-8

    seq = SequenceClassifier().double().eval()
    xs = torch.randn(3, 3, 5, dtype=torch.float64)
    ys = _labels(3, 4)
    names = ["inp.weight", "norm.weight", "norm.bias", "mlp.weight", "rms.weight"]
    got = ParameterGuidedInputSaliency(seq, params=names, k=4, reduction=reduction).attribute(xs, target=ys)
    assert rel_err(got, naive_boosting(seq, xs, ys, names, 4, reduction)) < 1e-8


# -- rules that see every input ----------------------------------------------------------


class Gated(nn.Module):
    """``y = (x @ W^T) * sigmoid(gate)``, the gate a second tensor input passed by keyword."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)

    def forward(self, x: Tensor, *, gate: Tensor) -> Tensor:
        return (x @ self.weight.T) * torch.sigmoid(gate)


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_of = nn.Linear(4, 3)
        self.layer = Gated(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.layer(x, gate=self.gate_of(x))))


@pytest.fixture
def gated_rule():
    """A rule for ``Gated`` that needs both of its inputs; unregistered afterwards."""

    def rule(module, inputs, grad_output, names):
        x, gate = inputs.arg(0, "x"), inputs.kwargs["gate"]
        left = (grad_output * torch.sigmoid(gate)).unsqueeze(-1).unsqueeze(1)  # (B, 1, O, 1)
        return {"weight": LowRankGrad(left, lambda a, b: x[a:b].reshape(b - a, 1, 1, -1), module.weight.shape)}

    registry.register_rule(Gated, params=("weight",), default=("weight",), name="gated")(rule)
    yield
    del registry._RULES[Gated]


@pytest.mark.parametrize("reduction", sorted(REDUCTIONS))
def test_a_rule_sees_keyword_inputs(gated_rule, reduction):
    torch.manual_seed(0)
    model = GatedNet().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), _labels(6, 2)
    ps = ParameterSaliency(model, reduction=reduction)  # the default now includes layer.weight
    assert "layer.weight" in ps.layout
    report = ps.routing(x)
    assert [row.rule for row in report if row.parameter == "layer.weight"] == ["gated"]
    got = ps.attribute(x, target=y)
    assert rel_err(got, naive_unit_saliency(model, (x,), y, list(ps.layout.names), reduction=reduction)) < 1e-10
    boosted = ParameterGuidedInputSaliency(model, k=2, reduction=reduction).attribute(x, target=y)
    assert rel_err(boosted, naive_boosting(model, x, y, list(ps.layout.names), 2, reduction)) < 1e-8


def test_without_its_rule_the_layer_is_not_selected_by_default():
    assert "layer.weight" not in ParameterSaliency(GatedNet()).layout


# -- subclasses -------------------------------------------------------------------------


class PlainLinear(nn.Linear):
    """A Linear subclass that keeps Linear's forward (like NonDynamicallyQuantizableLinear)."""


class ScaledLinear(nn.Linear):
    """A Linear subclass that uses its weight differently (like a LoRA or quantized layer)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, 2 * self.weight, self.bias)


class Subclassed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.plain = PlainLinear(4, 5)
        self.scaled = ScaledLinear(5, 3)
        self.torchs = nn.modules.linear.NonDynamicallyQuantizableLinear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.torchs(torch.tanh(self.scaled(torch.tanh(self.plain(x)))))


def test_subclasses_keeping_forward_take_the_rule_and_the_others_say_why_not():
    torch.manual_seed(0)
    model = Subclassed().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), _labels(5, 2)
    with pytest.warns(UserWarning, match="scaled.weight: ScaledLinear subclasses Linear but overrides forward"):
        ps = ParameterSaliency(model)
    report = ps.routing(x)
    routes = {row.parameter: row.rule for row in report}
    assert routes == {"plain.weight": "linear", "scaled.weight": None, "torchs.weight": "linear"}
    assert report.fallback == ("scaled.weight",)
    assert "overrides forward" in [row.reason for row in report if row.rule is None][0]
    got = ps.attribute(x, target=y)
    assert rel_err(got, naive_unit_saliency(model, (x,), y, list(ps.layout.names))) < 1e-10


# -- the routing report -----------------------------------------------------------------


class Mixed(nn.Module):
    """A weight read outside its module, a sequence-first call (which Linear's position-wise rule
    takes), a layer without a rule."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.act = nn.PReLU(4)  # no rule
        self.seq = nn.Linear(4, 4)
        self.tied = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.act(self.emb(tokens).transpose(1, 2)).transpose(1, 2)  # (B, T, 4)
        h = torch.tanh(self.seq(h.transpose(0, 1))).transpose(0, 1)  # called sequence-first
        h = torch.tanh(self.tied(h) + h @ self.tied.weight)  # also read outside its module
        return self.head(h.mean(1))


def test_the_routing_report_names_each_reason():
    torch.manual_seed(0)
    model = Mixed().double()
    tokens, y = torch.randint(0, 7, (4, 3)), _labels(4, 3)
    names = ["emb.weight", "act.weight", "seq.weight", "tied.weight", "head.weight", "head.bias"]
    ps = ParameterSaliency(model, params=names)
    report = ps.routing(tokens)
    reasons = {row.parameter: row.reason for row in report}
    assert report.fallback == ("act.weight", "tied.weight")
    assert reasons["act.weight"] == "no rule for PReLU"
    assert reasons["emb.weight"] == ""  # the embedding's rule
    assert reasons["seq.weight"] == ""  # called sequence first: a position-wise rule moves the batch
    assert "used outside a call of the module that holds it" in reasons["tied.weight"]
    assert reasons["head.weight"] == reasons["head.bias"] == ""
    text = str(report)
    assert text.splitlines()[0].split() == ["parameter", "module", "route", "reason"]
    assert "rule: linear" in text and "fallback" in text
    assert text.endswith("4 of 6 parameters by rules, 2 by the fallback")
    assert report.to_markdown().count("\n") == len(names) + 1
    got = ps.attribute(tokens, target=y)
    assert rel_err(got, naive_unit_saliency(model, (tokens,), y, names)) < 1e-10


def test_the_registry_states_what_it_covers():
    linear = registry.find_rule(nn.Linear(2, 2), "weight")
    assert linear.name == "linear" and linear.subclasses and linear.default == {"weight"}
    assert registry.find_rule(nn.Linear(2, 2), "bias") is linear
    assert registry.find_rule(nn.LayerNorm(3), "weight").name == "layer_norm"
    assert registry.default_params(nn.LayerNorm(3)) == frozenset()  # norms are selected by name
    assert set(registry.prunable_types()) == {nn.Linear, nn.Conv1d, nn.Conv2d}
    rule, why = registry.explain_rule(nn.BatchNorm2d(3), "weight")
    assert rule is None and why == "no rule for BatchNorm2d"
    with pytest.raises(ValueError, match="default"):
        registry.register_rule(Gated, params=("weight",), default=("bias",))
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        registry.register_rule(int)


def test_dense_grad_rule_in_a_registered_scale_layer():
    """The registry's docstring example, registered and run: a one-file rule is exact."""

    class Scale(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

        def forward(self, x: Tensor) -> Tensor:
            return x * self.weight

    def scale_rule(module, inputs, grad_output, names):
        x = inputs.arg(0, "x")
        return {"weight": DenseGrad((grad_output * x).reshape(x.shape[0], -1, module.weight.shape[0]).sum(1))}

    registry.register_rule(Scale, params=("weight",), default=("weight",))(scale_rule)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Tanh(), nn.Linear(4, 2)).double()
        x, y = torch.randn(5, 2, 3, dtype=torch.float64), _labels(5, 2)
        model[3] = nn.Sequential(nn.Flatten(), nn.Linear(8, 2)).double()
        ps = ParameterSaliency(model, reduction="rms")
        assert ps.routing(x).fallback == () and "1.weight" in ps.layout
        assert rel_err(ps.attribute(x, target=y), naive_unit_saliency(model, (x,), y, list(ps.layout.names),
                                                                    reduction="rms")) < 1e-10
    finally:
        del registry._RULES[Scale]


def test_input_saliency_takes_units_in_every_form():
    """Columns, (name, index) pairs, UnitScores (a profile's top_k), per sample or shared,
    a (B, k) tensor of columns: the same units give the same attribution."""
    torch.manual_seed(0)
    model = ConvNet().double().eval()
    x, y = torch.randn(2, 3, 6, 6, dtype=torch.float64), _labels(2, 5)
    ps = ParameterSaliency(model)
    pgis = ParameterGuidedInputSaliency.from_parameter_saliency(ps, k=2)
    top = ps.profile(x, target=y).top_k(2)  # per sample: [UnitScore, UnitScore]
    columns = [[score.column for score in row] for row in top]
    pairs = [[(score.param, score.unit) for score in row] for row in top]
    reference = pgis.attribute(x, target=y, units=columns)
    assert rel_err(reference, pgis.attribute(x, target=y)) < 1e-12  # the top 2 are the default
    for units in (pairs, top, torch.tensor(columns)):
        assert rel_err(pgis.attribute(x, target=y, units=units), reference) < 1e-12
    shared = pgis.attribute(x, target=y, units=top[0])
    assert rel_err(shared, pgis.attribute(x, target=y, units=[columns[0]] * 2)) < 1e-12


# -- rules with several outputs and declared batch dims ------------------------------------


class SequenceFirst(nn.Module):
    """``x (T, B, I) -> (y = x W^T (T, B, O), y.sum(0) (B, O))``: batch on dim 1, then on 0."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4) / 2)

    def forward(self, x: Tensor):
        y = x @ self.weight.T
        return y, y.sum(0)


class SequenceFirstNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = SequenceFirst()
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        y, total = self.layer(x.transpose(0, 1))  # the model's batch-first input, fed sequence-first
        return self.head(torch.tanh(y[-1]) + total)


@pytest.fixture
def sequence_first_rule():
    def rule(module, inputs, grad_output, names):
        x = inputs.arg(0, "x")  # (B, T, I): the engine moved the batch to dim 0
        d_y, d_total = grad_output  # (B, T, O) and (B, O)
        d = d_y + d_total.unsqueeze(1)  # the gradient at y itself
        return {"weight": LowRankGrad(d.transpose(1, 2).unsqueeze(1), lambda a, b: x[a:b].unsqueeze(1),
                                      module.weight.shape)}

    def batch_dims(module, inputs, output):
        return [1], [1, 0]

    registry.register_rule(SequenceFirst, params=("weight",), default=("weight",), batch_dims=batch_dims)(rule)
    yield
    del registry._RULES[SequenceFirst]


@pytest.mark.parametrize("reduction", sorted(REDUCTIONS))
def test_a_rule_with_two_outputs_and_declared_batch_dims(sequence_first_rule, reduction):
    torch.manual_seed(0)
    model = SequenceFirstNet().double()
    x, y = torch.randn(5, 6, 4, dtype=torch.float64), _labels(5, 2)  # 6 steps: T != B
    ps = ParameterSaliency(model, reduction=reduction)
    assert ps.routing(x).fallback == ()
    got = ps.attribute(x, target=y, internal_batch_size=3)
    names = list(ps.layout.names)
    assert rel_err(got, naive_unit_saliency(model, (x,), y, names, reduction=reduction)) < 1e-10
    boosted = ParameterGuidedInputSaliency(model, k=2, reduction=reduction).attribute(x, target=y)
    assert rel_err(boosted, naive_boosting(model, x, y, names, 2, reduction)) < 1e-8


def test_without_declared_batch_dims_a_sequence_first_layer_goes_to_the_fallback(sequence_first_rule):
    rule = registry._RULES[SequenceFirst]
    registry._RULES[SequenceFirst] = dataclasses.replace(rule, batch_dims=None)
    torch.manual_seed(0)
    model = SequenceFirstNet().double()
    x, y = torch.randn(5, 6, 4, dtype=torch.float64), _labels(5, 2)
    ps = ParameterSaliency(model)
    with pytest.warns(UserWarning, match="layer.weight: call 0 of its SequenceFirst: input tensor 0 .* batch on dim 0"):
        got = ps.attribute(x, target=y)  # a rule-covered default parameter on the slow path is not silent
    assert rel_err(got, naive_unit_saliency(model, (x,), y, list(ps.layout.names))) < 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per parameter
        ps.attribute(x, target=y)
    report = ps.routing(x)
    assert report.fallback == ("layer.weight",)
    assert "does not have the batch on dim 0" in report[0].reason


class ReadsMetadata(nn.Module):
    """Reads a weight's dtype, shape and size outside its module, as T5's
    ``h.to(self.wo.weight.dtype)`` does, and uses its values outside only in ``uses_values``."""

    def __init__(self, uses_values: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
        self.uses_values = uses_values

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x)).to(self.b.weight.dtype)
        assert self.b.weight.shape[0] == 3 and self.b.weight.size(1) == 5 and self.b.weight.dim() == 2
        if self.uses_values:
            h = h + self.b.weight.sum() * 0.1
        return self.b(h)


def test_reading_a_weights_metadata_outside_its_module_keeps_the_rule():
    torch.manual_seed(0)
    x, y = torch.randn(4, 4, dtype=torch.float64), _labels(4, 3)
    for uses_values, fallback in ((False, ()), (True, ("b.weight",))):
        model = ReadsMetadata(uses_values).double()
        ps = ParameterSaliency(model)
        assert ps.routing(x).fallback == fallback
        assert rel_err(ps.attribute(x, target=y), naive_unit_saliency(model, (x,), y, list(ps.layout.names))) < 1e-10


def test_a_rule_can_refuse_a_configuration_of_its_layer():
    """An Embedding with max_norm renormalizes its weight inside the forward: its rule says so,
    and the parameter goes to the fallback, named in the report."""
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Flatten(), nn.Linear(12, 3)).double()
    report = ParameterSaliency(model, params=["0.weight", "2.weight"]).routing(torch.randint(0, 10, (2, 3)))
    assert report.fallback == ("0.weight",) and "max_norm" in report[0].reason
    plain = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3)).double()
    assert ParameterSaliency(plain, params=["0.weight"]).routing(torch.randint(0, 10, (2, 3))).fallback == ()


class DataDependent(nn.Module):
    """A forward with data-dependent control flow (as Hugging Face's mask code has), around a
    parameter no rule covers: vmap cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.PReLU(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if bool(mask.all()):  # vmap refuses a tensor's value in Python control flow
            x = x * 1.0
        return self.head(self.act(x) * mask)


def test_the_fallback_loops_over_samples_where_vmap_cannot_trace_the_model():
    torch.manual_seed(0)
    model = DataDependent().double()
    x, y = torch.randn(4, 4, dtype=torch.float64), _labels(4, 3)
    mask = torch.ones(4, 4, dtype=torch.float64)
    mask[1, 2:] = 0
    names = ["act.weight", "head.weight"]
    ps = ParameterSaliency(model, params=names)
    with pytest.warns(RuntimeWarning, match="fallback for act.weight could not vmap the model.*one sample at a time"):
        got = ps.attribute(x, target=y, additional_forward_args={"mask": mask})
    expected = naive_unit_saliency(model, (x,), y, names, additional_forward_args=(mask,))
    assert rel_err(got, expected) < 1e-10
    with pytest.warns(RuntimeWarning, match="could not vmap"):
        boosted = ParameterGuidedInputSaliency(model, params=names, k=2).attribute(
            x, target=y, additional_forward_args={"mask": mask})
    assert torch.isfinite(boosted).all() and boosted.abs().sum() > 0


class SequenceFirstBlock(nn.Module):
    """Position-wise layers (Linear, LayerNorm, Embedding) fed sequence first, (T, B, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.lin = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.norm(torch.tanh(self.lin(self.emb(tokens.T))))  # (T, B, 6)
        return self.head(h.mean(0))


@pytest.mark.parametrize("steps", [5, 1], ids=["T5", "T1"])
@pytest.mark.parametrize("reduction", ["mean_abs", "rms"])
def test_position_wise_rules_take_sequence_first_calls(monkeypatch, steps, reduction):
    """Sequence first, the batch is dim 1; with one step the probe's (1, 1) cannot tell, and
    the pass finds it. Both by the rules: the fallback would fail this test."""
    import captum_paramsal.per_sample.engine as engine

    def no_fallback(*args, **kwargs):
        raise AssertionError("the fallback ran")

    monkeypatch.setattr(engine, "fallback_unit_saliency", no_fallback)
    torch.manual_seed(0)
    model = SequenceFirstBlock().double()
    tokens, y = torch.randint(0, 9, (4, steps)), _labels(4, 3)
    names = [n for n, _ in model.named_parameters()]
    ps = ParameterSaliency(model, params=names, reduction=reduction)
    assert ps.routing(tokens).fallback == ()
    got = ps.attribute(tokens, target=y, internal_batch_size=3)
    assert rel_err(got, naive_unit_saliency(model, (tokens,), y, names, reduction=reduction)) < 1e-10
