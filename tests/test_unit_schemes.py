"""Unit schemes: attention heads and MLP neurons as units, against a naive per-sample loop that
groups each sample's gradient by hand (the architecture's head and neuron slices written out
per family here, not read from the library's layout), on BERT, GPT-2, a Llama-style model with
grouped-query attention and torch's nn.TransformerEncoder, with padded batches and attention
masks, float64; then statistics, interventions, profiles and the input saliency on those units."""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_paramsal import ParameterGuidedInputSaliency, ParameterSaliency, SaliencyStats
from captum_paramsal.interventions import boost, turn_off
from captum_paramsal.units import resolve_entries, resolve_units

from helpers import assert_unchanged, snapshot
from naive import rel_err

transformers = pytest.importorskip("transformers")
from test_hf_models import _quiet, gpt2, last_token_loss, llama, make_case  # noqa: E402

REDUCE = {
    "mean_abs": lambda v: v.abs().mean(),
    "mean": lambda v: v.mean(),
    "rms": lambda v: v.pow(2).mean().sqrt(),
}

# -- the units of each family, by hand -----------------------------------------------------------
# Each maps one sample's gradients {parameter name: grad} to {entry name: [unit's entries, ...]}.


def bert_heads(g: Dict[str, Tensor], layers=2, heads=2, d=8) -> Dict[str, List[Tensor]]:
    out = {}
    for n_layer in range(layers):
        a = f"bert.encoder.layer.{n_layer}.attention"
        q, k, v = (g[f"{a}.self.{n}.weight"] for n in ("query", "key", "value"))
        o = g[f"{a}.output.dense.weight"]
        out[a] = [torch.cat([q[h * d:(h + 1) * d].flatten(), k[h * d:(h + 1) * d].flatten(),
                             v[h * d:(h + 1) * d].flatten(), o[:, h * d:(h + 1) * d].flatten()])
                  for h in range(heads)]
    return out


def bert_neurons(g: Dict[str, Tensor], layers=2, width=24) -> Dict[str, List[Tensor]]:
    out = {}
    for n_layer in range(layers):
        layer = f"bert.encoder.layer.{n_layer}"
        up, down = g[f"{layer}.intermediate.dense.weight"], g[f"{layer}.output.dense.weight"]
        out[f"bert.encoder.layer.{n_layer}.intermediate"] = [torch.cat([up[i], down[:, i]]) for i in range(width)]
    return out


def gpt2_heads(g: Dict[str, Tensor], layers=2, heads=2, d=8, e=16) -> Dict[str, List[Tensor]]:
    out = {}
    for n_layer in range(layers):
        attn = f"transformer.h.{n_layer}.attn"
        qkv, proj = g[f"{attn}.c_attn.weight"], g[f"{attn}.c_proj.weight"]  # (e, 3e), (e, e)
        out[f"transformer.h.{n_layer}.attn"] = [
            torch.cat([qkv[:, h * d:(h + 1) * d].flatten(), qkv[:, e + h * d:e + (h + 1) * d].flatten(),
                       qkv[:, 2 * e + h * d:2 * e + (h + 1) * d].flatten(), proj[h * d:(h + 1) * d].flatten()])
            for h in range(heads)
        ]
    return out


def gpt2_neurons(g: Dict[str, Tensor], layers=2, width=64) -> Dict[str, List[Tensor]]:
    out = {}
    for n_layer in range(layers):
        mlp = f"transformer.h.{n_layer}.mlp"
        fc, proj = g[f"{mlp}.c_fc.weight"], g[f"{mlp}.c_proj.weight"]  # (e, 4e), (4e, e)
        out[f"transformer.h.{n_layer}.mlp"] = [torch.cat([fc[:, i], proj[i]]) for i in range(width)]
    return out


def llama_heads(g: Dict[str, Tensor], layers=2, heads=4, kv=2, d=4) -> Dict[str, List[Tensor]]:
    out = {}
    for n_layer in range(layers):
        a = f"model.layers.{n_layer}.self_attn"
        q, k, v, o = (g[f"{a}.{n}_proj.weight"] for n in ("q", "k", "v", "o"))
        out[a] = [torch.cat([q[h * d:(h + 1) * d].flatten(), o[:, h * d:(h + 1) * d].flatten()]) for h in range(heads)]
        out[f"{a}.kv"] = [torch.cat([k[j * d:(j + 1) * d].flatten(), v[j * d:(j + 1) * d].flatten()])
                          for j in range(kv)]
    return out


def llama_neurons(g: Dict[str, Tensor], layers=2, width=24) -> Dict[str, List[Tensor]]:
    out = {}
    for n_layer in range(layers):
        m = f"model.layers.{n_layer}.mlp"
        gate, up, down = (g[f"{m}.{n}_proj.weight"] for n in ("gate", "up", "down"))
        out[m] = [torch.cat([gate[i], up[i], down[:, i]]) for i in range(width)]
    return out


def mha_heads(g: Dict[str, Tensor], layers=2, heads=2, d=8, e=16) -> Dict[str, List[Tensor]]:
    out = {}
    for n_layer in range(layers):
        a = f"layers.{n_layer}.self_attn"
        w, o = g[f"{a}.in_proj_weight"], g[f"{a}.out_proj.weight"]
        out[a] = [torch.cat([w[h * d:(h + 1) * d].flatten(), w[e + h * d:e + (h + 1) * d].flatten(),
                             w[2 * e + h * d:2 * e + (h + 1) * d].flatten(), o[:, h * d:(h + 1) * d].flatten()])
                  for h in range(heads)]
    return out


def mha_neurons(g: Dict[str, Tensor], layers=2, width=24) -> Dict[str, List[Tensor]]:
    out = {}
    for n_layer in range(layers):
        up, down = g[f"layers.{n_layer}.linear1.weight"], g[f"layers.{n_layer}.linear2.weight"]
        out[f"layers.{n_layer}.linear1"] = [torch.cat([up[i], down[:, i]]) for i in range(width)]
    return out


def encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor with batch_first
        torch.manual_seed(0)
        return nn.Sequential(nn.TransformerEncoder(layer, 2), nn.Flatten(), nn.Linear(16 * 5, 3)).double().eval()


class _Encoder(nn.Module):
    """The encoder with its head, names as the hand-written groups expect (``layers.0...``)."""

    def __init__(self):
        super().__init__()
        net = encoder()
        self.layers = net[0].layers
        self.head = net[2]

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x.flatten(1))


SCHEMES = {
    "bert": (bert_heads, bert_neurons),
    "gpt2": (gpt2_heads, gpt2_neurons),
    "llama": (llama_heads, llama_neurons),
}


def naive_grouped(model: nn.Module, case, names: List[str], group: Callable, reduction: str,
                  loss_fn: Callable, output_fn: Callable = lambda out: out.logits) -> Dict[str, Tensor]:
    """``{entry name: (B, units)}``: each sample alone (its real tokens only), grouped by hand."""
    params = dict(model.named_parameters())
    per_sample: List[Dict[str, List[Tensor]]] = []
    for i in range(case.inputs.shape[0]):
        kwargs = {}
        inputs = case.inputs[i : i + 1]
        if "attention_mask" in case.kwargs:
            n = int(case.kwargs["attention_mask"][i].sum())
            inputs, kwargs = inputs[:, :n], {"attention_mask": case.kwargs["attention_mask"][i : i + 1, :n]}
        loss = loss_fn(output_fn(model(inputs, **kwargs)), case.target[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        per_sample.append(group(dict(zip(names, grads))))
    return {name: torch.stack([torch.stack([REDUCE[reduction](u) for u in s[name]]) for s in per_sample])
            for name in per_sample[0]}


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("scheme", ["heads", "neurons"])
@pytest.mark.parametrize("reduction", ["mean_abs", "rms", "mean"])
def test_each_scheme_equals_a_hand_grouped_per_sample_loop(family, scheme, reduction):
    case = make_case(family, padded=True)
    model = _quiet(case.build)
    before = snapshot(model)
    ps = ParameterSaliency(model, units=scheme, reduction=reduction, loss_fn=case.loss_fn)
    got = ps.attribute(case.inputs, target=case.target, additional_forward_args=case.kwargs)
    group = SCHEMES[family][0 if scheme == "heads" else 1]
    names = [p.name for p in ps._selection.params]
    loss = case.loss_fn or (lambda out, y: F.cross_entropy(out, y, reduction="none"))
    expected = naive_grouped(model, case, names, group, reduction, loss)
    # a signed mean can cancel to rounding noise (BERT's key rows: softmax ignores a shift):
    # measure its error against the size of the entries it averages
    scale = expected if reduction != "mean" else naive_grouped(model, case, names, group, "mean_abs", loss)
    kinds = {"heads": {"heads", "kv_heads"}, "neurons": {"neurons"}}[scheme]
    assert {e.name for e in ps.layout if e.kind in kinds} == set(expected)
    for name, values in expected.items():
        error = (got[:, ps.layout[name].slice] - values).norm() / scale[name].norm()
        assert error < 1e-8, (name, float(error))
    # what no head or neuron covers stays one unit per output row, as with units="rows"
    rows = ParameterSaliency(model, reduction=reduction, loss_fn=case.loss_fn).attribute(
        case.inputs, target=case.target, additional_forward_args=case.kwargs)
    rows_layout = ParameterSaliency(model).layout
    for entry in ps.layout:
        if entry.kind == "rows":
            assert torch.equal(got[:, entry.slice], rows[:, rows_layout[entry.name].slice]), entry.name
    assert_unchanged(model, before)


def test_heads_and_neurons_together_and_by_module():
    case = make_case("gpt2", padded=True)
    model = _quiet(case.build)
    args = dict(target=case.target, additional_forward_args=case.kwargs)
    both = ParameterSaliency(model, units=("heads", "neurons"), loss_fn=case.loss_fn)
    z = both.attribute(case.inputs, **args)
    heads = ParameterSaliency(model, units="heads", loss_fn=case.loss_fn)
    neurons = ParameterSaliency(model, units="neurons", loss_fn=case.loss_fn)
    zh, zn = heads.attribute(case.inputs, **args), neurons.attribute(case.inputs, **args)
    for entry in both.layout:
        source, values = (heads, zh) if entry.kind == "heads" else (neurons, zn)
        if entry.kind == "rows":
            continue
        assert torch.allclose(z[:, entry.slice], values[:, source.layout[entry.name].slice], rtol=1e-12, atol=0)
    assert [e.kind for e in both.layout] == ["rows", "heads", "neurons", "heads", "neurons"]
    # per module: the longest prefix wins; the rest is rows
    one = ParameterSaliency(model, units={"transformer.h.1": "heads", "transformer.h.1.mlp": "neurons"},
                            loss_fn=case.loss_fn)
    assert [(e.name, e.kind) for e in one.layout if e.kind != "rows"] == [
        ("transformer.h.1.attn", "heads"), ("transformer.h.1.mlp", "neurons")]
    z1 = one.attribute(case.inputs, **args)
    assert torch.allclose(z1[:, one.layout["transformer.h.1.attn"].slice],
                          zh[:, heads.layout["transformer.h.1.attn"].slice], rtol=1e-12, atol=0)


def test_torch_transformer_encoder_heads_neurons_and_input_saliency():
    torch.manual_seed(3)
    model = _Encoder()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    names = [n for n, p in model.named_parameters() if p.dim() == 2]
    for scheme, group in (("heads", mha_heads), ("neurons", mha_neurons)):
        ps = ParameterSaliency(model, units=scheme)
        got = ps.attribute(x, target=y)
        case = type("C", (), {"inputs": x, "kwargs": {}, "target": y})
        expected = naive_grouped(model, case, [p.name for p in ps._selection.params], group, "mean_abs",
                                 lambda out, t: F.cross_entropy(out, t, reduction="none"), output_fn=lambda out: out)
        for name, values in expected.items():
            assert rel_err(got[:, ps.layout[name].slice], values) < 1e-8, name
    assert names  # the encoder has 2-D weights to group

    # the input saliency boosting heads: a naive second derivative through the hand grouping
    pgis = ParameterGuidedInputSaliency(model, units="heads", k=2, boost_factor=10.0)
    got = pgis.attribute(x, target=y)
    params = dict(model.named_parameters())
    selected = [p.name for p in pgis.parameter_saliency._selection.params]
    layout = pgis.layout
    expected = []
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for i in range(3):
        xi = x[i : i + 1].clone().requires_grad_()
        with sdpa_kernel([SDPBackend.MATH]):  # the fused kernels have no second derivative
            loss = F.cross_entropy(model(xi), y[i : i + 1])
        grads = dict(zip(selected, torch.autograd.grad(loss, [params[n] for n in selected], create_graph=True)))
        columns: Dict[int, Tensor] = {}
        for name, units in mha_heads(grads).items():
            for u, entries in enumerate(units):
                columns[layout[name].slice.start + u] = entries.abs().mean()
        for entry in layout:
            if entry.kind == "rows":
                g = grads[entry.name]
                for u in range(entry.num_units):
                    columns[entry.slice.start + u] = g[u].abs().mean()
        z = torch.stack([columns[c] for c in range(layout.num_columns)])
        b = z.detach().clone()
        top = z.detach().topk(2).indices
        b[top] = b[top] * 10.0
        objective = F.cosine_similarity(z, b, dim=0)
        with sdpa_kernel([SDPBackend.MATH]):
            expected.append(torch.autograd.grad(objective, xi)[0][0])
    assert rel_err(got, torch.stack(expected)) < 1e-8


def test_statistics_on_heads_round_trip_and_refuse_other_schemes(tmp_path):
    case = make_case("llama", padded=True)
    model = _quiet(case.build)
    ps = ParameterSaliency(model, units="heads", loss_fn=case.loss_fn)
    batches = [(case.inputs, case.target, case.kwargs)] * 2
    stats = ps.fit_stats(batches, progress=False)
    raw = ps.attribute(case.inputs, target=case.target, additional_forward_args=case.kwargs)
    assert stats.count == 6 and torch.allclose(stats.mean, raw.double().mean(0), rtol=1e-12, atol=0)
    path = tmp_path / "heads.safetensors"
    stats.save(path)
    loaded = SaliencyStats.load(path)
    assert loaded.layout == ps.layout and loaded.fingerprint == stats.fingerprint
    assert loaded.layout["model.layers.0.self_attn.kv"].kind == "kv_heads"
    ps.stats = loaded
    z = ps.attribute(case.inputs, target=case.target, additional_forward_args=case.kwargs)
    assert torch.allclose(z, loaded.standardize(raw))
    rows = ParameterSaliency(model, loss_fn=case.loss_fn)
    with pytest.raises(ValueError, match="fingerprint"):
        rows.stats = loaded
    with pytest.raises(ValueError, match="fingerprint"):
        ParameterSaliency(model, units="neurons", loss_fn=case.loss_fn).stats = loaded


def _manual_head_off(model, layer: int, head: int, d: int = 8, e: int = 16):
    """GPT-2 with one head's q, k, v columns and c_proj rows zeroed, by hand."""
    import copy

    edited = copy.deepcopy(model)
    attn = edited.transformer.h[layer].attn
    with torch.no_grad():
        for offset in (0, e, 2 * e):
            attn.c_attn.weight[:, offset + head * d:offset + (head + 1) * d] = 0
        attn.c_proj.weight[head * d:(head + 1) * d] = 0
    return edited


def test_turning_off_heads_and_neurons_matches_zeroing_by_hand_and_restores_bits():
    case = make_case("gpt2", padded=True)
    model = _quiet(case.build)
    ps = ParameterSaliency(model, units=("heads", "neurons"), loss_fn=case.loss_fn)
    before = snapshot(model)
    expected = _manual_head_off(model, 1, 0)(case.inputs, **case.kwargs).logits
    column = ps.layout.column("transformer.h.1.attn", 0)
    prof = ps.profile(case.inputs, target=case.target, additional_forward_args=case.kwargs)
    score = next(u for u in prof.top_k(ps.layout.num_columns)[0] if u.param == "transformer.h.1.attn" and u.unit == 0)
    for units, layout in (([column], ps.layout), ([("transformer.h.1.attn", 0)], None), ([score], ps.layout)):
        with turn_off(model, units, layout=layout):
            got = model(case.inputs, **case.kwargs).logits
        assert torch.equal(got, expected)
        assert_unchanged(model, before)
    # a neuron: column i of c_fc and row i of c_proj
    entries = resolve_entries(model, [("transformer.h.0.mlp", 5)])
    assert {n: [tuple(b.shape) for b in bs] for n, bs in entries.items()} == {
        "transformer.h.0.mlp.c_fc.weight": [(1, 16)], "transformer.h.0.mlp.c_proj.weight": [(1, 16)]}
    with turn_off(model, [("transformer.h.0.mlp", 5)], bias=True):
        mlp = model.transformer.h[0].mlp
        assert not mlp.c_fc.weight[:, 5].any() and not mlp.c_proj.weight[5].any()
        assert mlp.c_fc.weight[:, 4].any() and mlp.c_proj.weight[4].any()
        assert mlp.c_fc.bias[5] == 0 and before.values["transformer.h.0.mlp.c_proj.bias"].eq(mlp.c_proj.bias).all()
    with boost(model, [("transformer.h.1.attn", 1)], factor=2.0, bias=True):
        attn = model.transformer.h[1].attn
        original = before.values["transformer.h.1.attn.c_attn.weight"]
        assert torch.equal(attn.c_attn.weight[:, 8:16], 2 * original[:, 8:16])
        assert torch.equal(attn.c_attn.weight[:, :8], original[:, :8])
        assert torch.equal(attn.c_attn.bias[40:48], 2 * before.values["transformer.h.1.attn.c_attn.bias"][40:48])
        assert torch.equal(attn.c_proj.bias, before.values["transformer.h.1.attn.c_proj.bias"])  # no head owns it
    assert_unchanged(model, before)


def test_bert_head_off_by_hand_and_llama_kv_heads():
    case = make_case("bert", padded=True)
    model = _quiet(case.build)
    import copy

    by_hand = copy.deepcopy(model)
    attn = by_hand.bert.encoder.layer[0].attention
    with torch.no_grad():
        for layer in (attn.self.query, attn.self.key, attn.self.value):
            layer.weight[8:16] = 0
        attn.output.dense.weight[:, 8:16] = 0
    with turn_off(model, [("bert.encoder.layer.0.attention", 1)]):
        got = model(case.inputs, **case.kwargs).logits
    assert torch.equal(got, by_hand(case.inputs, **case.kwargs).logits)
    llama_model = _quiet(llama)
    entries = resolve_entries(llama_model, [("model.layers.1.self_attn.kv", 1)])
    assert sorted(entries) == ["model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
    k = llama_model.model.layers[1].self_attn.k_proj.weight
    flat = torch.arange(k.numel()).view(k.shape)[4:8].reshape(1, -1)
    assert torch.equal(entries["model.layers.1.self_attn.k_proj.weight"][0], flat)


def test_profiles_top_k_plots_and_records_name_heads(tmp_path):
    case = make_case("bert", padded=True)
    model = _quiet(case.build)
    ps = ParameterSaliency(model, units="heads")
    prof = ps.profile(case.inputs, target=case.target, additional_forward_args=case.kwargs)
    top = prof.top_k(3)
    assert all(u.param in ps.layout for row in top for u in row)
    heads = [u for row in prof.top_k(ps.layout.num_columns) for u in row if ps.layout[u.param].kind == "heads"]
    assert {u.param for u in heads} == {"bert.encoder.layer.0.attention", "bert.encoder.layer.1.attention"}
    only = prof.only("heads")
    assert [e.kind for e in only.layout] == ["heads", "heads"] and only.values.shape == (3, 4)
    for row, full in zip(only.top_k(2), prof.values):
        for u in row:
            assert u.value == pytest.approx(float(full[ps.layout.column(u.param, u.unit)]))
    with pytest.raises(ValueError, match="no neurons entries"):
        prof.only("neurons")
    fig = prof.plot(0)
    fig.savefig(tmp_path / "heads.png")
    prof.plot_top_k(0, k=3).savefig(tmp_path / "top.png")
    records = prof.to_records()
    record = records[ps.layout.column("bert.encoder.layer.0.attention", 1)]
    assert (record["param"], record["unit"]) == ("bert.encoder.layer.0.attention", 1)


def test_bad_unit_schemes_are_clear_errors():
    model = _quiet(gpt2)
    with pytest.raises(ValueError, match="units must name schemes"):
        ParameterSaliency(model, units="filters")
    with pytest.raises(TypeError, match="units must be a scheme"):
        ParameterSaliency(model, units=3)
    with pytest.raises(ValueError, match="no module or parameter.*did you mean"):
        ParameterSaliency(model, units={"transformer.h.7": "heads", "transformer.h.1.atn": "heads"})
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="no attention block of this model"):
        ParameterSaliency(cnn, units="heads")
    # a head whose output projection is not selected is not grouped, and says so
    with pytest.warns(UserWarning, match="not grouped.*c_proj.weight"):
        ps = ParameterSaliency(model, params=["transformer.h.0.attn.c_attn.weight"], units="heads")
    assert [e.kind for e in ps.layout] == ["rows"]
    with pytest.raises(ValueError, match="out of range: transformer.h.0.attn has 2 heads"):
        with turn_off(model, [("transformer.h.0.attn", 2)]):
            pass
    with pytest.raises(ValueError, match="spans parameters"):
        resolve_units(model, [("transformer.h.0.attn", 0)])
    with pytest.raises(ValueError, match="units come from the shared method"):
        ParameterGuidedInputSaliency(model, parameter_saliency=ParameterSaliency(model), units="heads")


def test_chunks_and_the_closed_forms_agree_with_one_pass():
    """internal_batch_size chunks, and rms's Gram-matrix closed form on transposed (column)
    slices, give what one pass with the dense path gives."""
    case = make_case("llama", padded=True)
    model = _quiet(case.build)
    args = dict(target=case.target, additional_forward_args=case.kwargs)
    for reduction in ("rms", "mean_abs"):
        ps = ParameterSaliency(model, units=("heads", "neurons"), reduction=reduction, loss_fn=last_token_loss)
        whole = ps.attribute(case.inputs, **args)
        chunked = ps.attribute(case.inputs, internal_batch_size=2, **args)
        assert rel_err(chunked, whole) < 1e-12


def test_pruning_curves_turn_off_heads_of_a_masked_bert():
    from captum_paramsal.analysis import pruning_curves

    case = make_case("bert", padded=True)
    model = _quiet(case.build)
    before = snapshot(model)
    ps = ParameterSaliency(model, units="heads")
    with torch.no_grad():
        predicted = model(case.inputs, **case.kwargs).logits.argmax(1)
    labels = (predicted + 1) % 3  # every sample "misclassified": each has a culprit to find
    result = pruning_curves(model, ps, case.inputs, labels, ks=(1, 2), seed=0,
                            additional_forward_args=case.kwargs)
    assert result.num_misclassified == 3
    z = ps.attribute(case.inputs, target=labels, additional_forward_args=case.kwargs)
    for i in range(3):  # one record recomputed by hand: the top head of sample i off
        top = int(z[i].argmax())
        with turn_off(model, [top], layout=ps.layout):
            mask = case.kwargs["attention_mask"][i : i + 1]
            n = int(mask.sum())
            logits = model(case.inputs[i : i + 1, :n], attention_mask=mask[:, :n]).logits
        record = next(r for r in result.records if r["sample"] == i and r["k"] == 1 and r["mode"] == "salient")
        assert record["corrected"] == bool(logits.argmax(1) == labels[i])
    assert_unchanged(model, before)
