"""pruning_curves' vmapped path against its loop (one turn_off block and one forward per
intervention) and against the loop as it was written before the vmapped path: the same records
(flags equal, probability changes to float round-off) on an MLP, a CNN with BatchNorm and a
transposed convolution, ResNet-20, a model with extra forward arguments (positional and
keyword), a transformer with heads and neurons as units and tied weights; the model left as
found; tiny chunks; the automatic fallback where vmap cannot run the model or runs it otherwise."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_paramsal import ParameterSaliency
from captum_paramsal.analysis import pruning_curves, turn_off_curves
from captum_paramsal.interventions import edited_values, turn_off
from captum_paramsal.units import UnitEntries

from helpers import TiedLinears, assert_unchanged, snapshot

LOGGER = "captum_paramsal.analysis.turn_off_curves"


# the loop runs many one-sample forward passes: one thread (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_records(got: List[Dict[str, Any]], want: List[Dict[str, Any]], atol: float = 1e-6) -> None:
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert (a["sample"], a["k"], a["mode"], a["corrected"]) == (b["sample"], b["k"], b["mode"], b["corrected"])
        assert a["delta_true_prob"] == pytest.approx(b["delta_true_prob"], abs=atol)
        assert a["delta_wrong_prob"] == pytest.approx(b["delta_wrong_prob"], abs=atol)


def reference_records(model, ps, inputs, labels, ks, modes=("salient", "random", "least"), seed=0, extra=()):
    """The loop as pruning_curves ran it before the vmapped path (positional extra arguments)."""
    ks = sorted(set(ks))
    layout = ps.layout
    with torch.no_grad():
        before = torch.softmax(model(inputs, *extra), -1)
    predicted = before.argmax(-1)
    wrong = (predicted != labels).nonzero().flatten()
    x, y = inputs[wrong], labels[wrong]
    cut = tuple(a[wrong] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == len(inputs) else a for a in extra)
    z = ps.attribute(x, target=y, additional_forward_args=cut or None).detach()
    generator = torch.Generator().manual_seed(seed)
    records = []
    for i in range(len(wrong)):
        order = z[i].argsort(descending=True)
        true, bad = int(y[i]), int(predicted[wrong[i]])
        p0 = before[wrong[i]]
        for k in ks:
            chosen = {"salient": order[:k], "least": order[-k:],
                      "random": torch.randperm(layout.num_columns, generator=generator)[:k]}
            for mode in modes:
                # per sample: what was per sample among all inputs (not what matches the number of errors)
                one = tuple(c[i : i + 1] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == len(inputs) else c
                            for a, c in zip(extra, cut))
                with turn_off(model, chosen[mode].tolist(), layout=layout), torch.no_grad():
                    p = torch.softmax(model(x[i : i + 1], *one), -1)[0]
                records.append({"sample": int(wrong[i]), "k": k, "mode": mode, "corrected": bool(p.argmax() == true),
                                "delta_true_prob": float(p[true] - p0[true]),
                                "delta_wrong_prob": float(p[bad] - p0[bad])})
    return records


def both(model, ps, x, y, ks, caplog, expect="masks", **kwargs):
    """``(default, looped)`` results: the default checked to have taken ``expect`` (``"masks"``
    or ``"vmap"``) without a fallback; where it took the masks, ``method="vmap"`` checked
    against the loop too."""
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        fast = pruning_curves(model, ps, x, y, ks=ks, **kwargs)
    assert not [r.getMessage() for r in caplog.records if r.name == LOGGER], "the default path fell back"
    assert fast.method == expect
    slow = pruning_curves(model, ps, x, y, ks=ks, method="loop", **kwargs)
    assert slow.method == "loop"
    if expect == "masks":
        vmapped = pruning_curves(model, ps, x, y, ks=ks, method="vmap", **kwargs)
        assert vmapped.method == "vmap"
        assert_same_records(vmapped.records, slow.records)
    return fast, slow


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 4))


def bn_cnn() -> nn.Module:
    """Conv, BatchNorm (running statistics far from 0 / 1), a transposed convolution, a Linear head."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.ConvTranspose2d(6, 4, 2, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def test_mlp_matches_the_loop_and_the_old_loop(caplog):
    model = mlp().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
    ps = ParameterSaliency(model)
    before = snapshot(model)
    fast, slow = both(model, ps, x, y, (1, 3, 10), caplog)
    assert_unchanged(model, before)
    assert_same_records(fast.records, slow.records)
    assert slow.records == reference_records(model, ps, x, y, (1, 3, 10))  # the loop is the old code, bit for bit
    assert fast.table[0].keys() == slow.table[0].keys() and fast.ks == slow.ks and fast.modes == slow.modes
    assert (fast.num_misclassified, fast.num_samples) == (slow.num_misclassified, slow.num_samples)
    # the forward that finds the misclassified samples in pieces (internal_batch_size): the same records
    pieces = pruning_curves(model, ps, x, y, ks=(1, 3, 10), internal_batch_size=5)
    assert_same_records(pieces.records, slow.records)
    # a subset of the modes: the random draws still come for every k, so seed 3's random units stay
    only_random = pruning_curves(model, ps, x, y, ks=(1, 3, 10), modes=("random",), seed=3)
    want = [r for r in pruning_curves(model, ps, x, y, ks=(1, 3, 10), seed=3, method="loop").records
            if r["mode"] == "random"]
    assert_same_records(only_random.records, want)


def test_cnn_with_batchnorm_in_train_mode_is_left_as_found(caplog):
    model = bn_cnn().train()  # evaluated in eval mode (running statistics), left in train mode
    model[4].eval()  # and a submodule's own flag kept
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[8].bias.requires_grad_(False)
    calls = []
    model[2].register_forward_hook(lambda m, a, out: calls.append(1))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 2, 6, 6, generator=g), torch.randint(0, 5, (6,), generator=g)
    ps = ParameterSaliency(model)
    assert "3.weight" in ps.layout.names  # the transposed convolution's output channels are units
    before = snapshot(model)
    fast, slow = both(model, ps, x, y, (1, 9), caplog)
    assert_unchanged(model, before)
    assert model.training and not model[4].training
    assert_same_records(fast.records, slow.records)
    assert calls  # the hook ran (it is the model's, in both paths)


def test_resnet20_matches_the_loop(caplog):
    from captum_paramsal.zoo.trojan_digits import ResNet20

    torch.manual_seed(0)
    model = ResNet20().eval()
    with torch.no_grad():  # BatchNorm statistics of its own, so eval mode is not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(5, 3, 32, 32, generator=g), torch.randint(0, 10, (5,), generator=g)
    ps = ParameterSaliency(model)
    before = snapshot(model)
    fast, slow = both(model, ps, x, y, (1, 8, 40), caplog)
    tiny = pruning_curves(model, ps, x, y, ks=(1, 8, 40), chunk_size=4)
    assert_unchanged(model, before)
    assert_same_records(fast.records, slow.records)
    assert_same_records(tiny.records, slow.records)


class Masked(nn.Module):
    """``forward(x, mask, shift, scale=1.0, offset=None)``: a per-sample mask and a shared
    shift by position, a float and a per-sample offset by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: Tensor, mask: Tensor, shift: Tensor, scale: float = 1.0,
                offset: Tensor = None) -> Tensor:
        h = F.relu(self.a(x * mask + shift)) * scale
        if offset is not None:
            h = h + offset
        return self.b(h)


def test_additional_forward_args_positional_and_keyword(caplog):
    torch.manual_seed(0)
    model = Masked().eval()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
    mask = (torch.rand(12, 5, generator=g) > 0.3).float()
    shift = torch.randn(5, generator=g)
    offset = torch.randn(12, 8, generator=g)
    ps = ParameterSaliency(model)
    before = snapshot(model)
    fast, slow = both(model, ps, x, y, (1, 4), caplog, additional_forward_args=(mask, shift, 0.5))
    assert_same_records(fast.records, slow.records)
    assert slow.records == reference_records(model, ps, x, y, (1, 4), extra=(mask, shift, 0.5))
    kw = {"mask": mask, "shift": shift, "scale": 2.0, "offset": offset}
    fast, slow = both(model, ps, x, y, (1, 4), caplog, additional_forward_args=kw)
    assert_same_records(fast.records, slow.records)
    assert_unchanged(model, before)


def encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor with batch_first
        torch.manual_seed(0)
        return nn.Sequential(nn.TransformerEncoder(layer, 2), nn.Flatten(), nn.Linear(16 * 5, 3)).eval()


def test_transformer_heads_and_neurons_as_units(caplog):
    model = encoder()
    ps = ParameterSaliency(model, units=("heads", "neurons"))
    assert {e.kind for e in ps.layout} == {"heads", "neurons", "rows"}
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 5, 16, generator=g), torch.randint(0, 3, (8,), generator=g)
    before = snapshot(model)
    fast, slow = both(model, ps, x, y, (1, 2, 10), caplog, expect="vmap")  # heads and neurons are no channels
    assert_unchanged(model, before)
    assert_same_records(fast.records, slow.records)
    with pytest.raises(ValueError, match="method='masks' needs every unit"):
        pruning_curves(model, ps, x, y, ks=(1,), method="masks")
    # rows only: the encoder's Linear layers take (B, T, d) and MultiheadAttention reads its
    # projections functionally (a check finds the masks miss them): vmap
    rows = ParameterSaliency(model)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        auto = pruning_curves(model, rows, x, y, ks=(1, 4))
    assert auto.method in ("vmap", "masks")
    assert_same_records(auto.records, pruning_curves(model, rows, x, y, ks=(1, 4), method="loop").records)
    assert_unchanged(model, before)


def test_each_units_entries_turn_off_what_turn_off_does():
    """The edited copies are edited_values' (turn_off's) values exactly, heads and neurons
    (spanning q, k, v and the output projection) and transposed convolutions included."""
    for model, units_scheme in [(encoder(), ("heads", "neurons")), (bn_cnn(), "rows")]:
        layout = ParameterSaliency(model, units=units_scheme).layout
        units = UnitEntries(model, layout)
        params = dict(model.named_parameters())
        g = torch.Generator().manual_seed(6)
        sets = [torch.randperm(layout.num_columns, generator=g)[:k].tolist() for k in (1, 2, 5, layout.num_columns)]
        copies = turn_off_curves._zeroed_copies(params, units, sets)
        for n, columns in enumerate(sets):
            want = edited_values(model, columns, torch.zeros_like, layout=layout)
            assert set(units.names(columns)) == set(want)
            for name, value in want.items():
                assert torch.equal(copies[name][n], value), (name, columns)
            for name in set(copies) - set(want):
                assert torch.equal(copies[name][n], params[name].detach())


def test_tied_weights(caplog):
    torch.manual_seed(0)
    model = TiedLinears().eval()
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(10, 3, generator=g), torch.randint(0, 3, (10,), generator=g)
    ps = ParameterSaliency(model)
    before = snapshot(model)
    fast, slow = both(model, ps, x, y, (1, 2), caplog)
    assert_unchanged(model, before)
    assert_same_records(fast.records, slow.records)


def test_tiny_chunks_and_oom_splitting(monkeypatch):
    model = bn_cnn().eval()
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
    ps = ParameterSaliency(model)
    slow = pruning_curves(model, ps, x, y, ks=(1, 3), method="loop")
    for chunk_size in (1, 2, 5, 1000):
        got = pruning_curves(model, ps, x, y, ks=(1, 3), method="vmap", chunk_size=chunk_size)
        assert_same_records(got.records, slow.records)
        got = pruning_curves(model, ps, x, y, ks=(1, 3), method="masks", chunk_size=chunk_size)
        assert_same_records(got.records, slow.records)
    for method, name in (("vmap", "_vmapped_chunk"), ("masks", "_masked_chunk")):
        sizes = []
        real = getattr(turn_off_curves, name)

        def short_of_memory(model, output_fn, weights, samples, chunk, units, real=real, sizes=sizes):
            sizes.append(len(chunk))
            if len(chunk) > 3:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(model, output_fn, weights, samples, chunk, units)

        monkeypatch.setattr(turn_off_curves, name, short_of_memory)
        got = pruning_curves(model, ps, x, y, ks=(1, 3), method=method, chunk_size=16)
        assert_same_records(got.records, slow.records)
        assert max(sizes) == 16 and sizes[-1] <= 3  # halved until it fits
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        pruning_curves(model, ps, x, y, ks=(1,), chunk_size=0)
    with pytest.raises(ValueError, match="method must be one of"):
        pruning_curves(model, ps, x, y, ks=(1,), method="batched")


class Branchy(nn.Module):
    """Data-dependent control flow, sample by sample: vmap cannot run it (the masks can: it
    is a plain forward of the batch, whose samples do not interact)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.stack([row * 2 if row.sum() > 0 else row for row in self.a(x).unbind(0)])
        return self.b(F.relu(h))


class Flattened(nn.Module):
    """A Linear over every token of every sample at once, ``(B * T, d)``: the hooked layer's
    output does not have the samples first, so the masks give way to vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(18, 3)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        return self.b(F.relu(self.a(x.reshape(batch * tokens, width))).reshape(batch, -1))


class Aliased(nn.Module):
    """Reads its weight through a reference of its own, not the module attribute: functional_call
    (so vmap) does not see the edit, turn_off (which swaps the parameter's storage) does."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.weights = [self.a.weight]

    def forward(self, x: Tensor) -> Tensor:
        return self.b(F.relu(F.linear(x, self.weights[0], self.a.bias)))


@pytest.mark.filterwarnings("ignore:.*torch.func fallback")  # the saliency's own, on Aliased
@pytest.mark.parametrize("cls", [Branchy, Aliased])
def test_falls_back_to_the_loop_where_vmap_cannot_run_the_model(cls, caplog):
    torch.manual_seed(0)
    model = cls().eval()
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    ps = ParameterSaliency(model)
    before = snapshot(model)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        auto = pruning_curves(model, ps, x, y, ks=(1, 3))
    said = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    slow = pruning_curves(model, ps, x, y, ks=(1, 3), method="loop")
    assert slow.records == reference_records(model, ps, x, y, (1, 3))
    if cls is Branchy:  # the masks run it; vmap does not
        assert auto.method == "masks" and not said
        assert_same_records(auto.records, slow.records)
        with pytest.raises(RuntimeError, match="data-dependent control flow"):
            pruning_curves(model, ps, x, y, ks=(1, 3), method="vmap")
    else:  # the masks' hook never sees the aliased weight, nor does vmap's functional_call: a check finds both
        assert auto.method == "loop"
        assert auto.records == slow.records  # the loop's own, bit for bit
        assert any("masks runs this model otherwise" in m and "trying vmap" in m for m in said), said
        assert any("vmap runs this model otherwise" in m and "one intervention at a time" in m for m in said), said
    assert_unchanged(model, before)


@pytest.mark.filterwarnings("ignore:.*torch.func fallback")  # the saliency's own: a.weight sees (B * T, d)
def test_masks_give_way_to_vmap_where_a_layer_mixes_samples_and_tokens(caplog):
    torch.manual_seed(0)
    model = Flattened().eval()
    g = torch.Generator().manual_seed(10)
    x, y = torch.randn(10, 3, 4, generator=g), torch.randint(0, 3, (10,), generator=g)
    ps = ParameterSaliency(model)
    before = snapshot(model)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        auto = pruning_curves(model, ps, x, y, ks=(1, 3))
    said = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert auto.method == "vmap"
    # the probes' batch (3 rows of 3 tokens) reaches the Linear as 9 rows
    assert any("masks cannot run this model (_NotRowwise: Linear gave (9, 6) for 3 rows)" in m for m in said), said
    assert_same_records(auto.records, pruning_curves(model, ps, x, y, ks=(1, 3), method="loop").records)
    with pytest.raises(turn_off_curves._NotRowwise, match="Linear gave"):
        pruning_curves(model, ps, x, y, ks=(1, 3), method="masks")
    assert_unchanged(model, before)  # the hooks are gone, also after the error


class Normed(nn.Module):
    """Conv (with bias), BatchNorm, GroupNorm, a Conv1d over the rows, LayerNorm and Linear
    layers: every layer type the masks path hooks, each weight a layout entry."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.gn = nn.GroupNorm(3, 6)
        self.line = nn.Conv1d(6, 4, 2)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4 * 15, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.gn(self.bn(self.conv(x))))  # (B, 6, 4, 4)
        h = self.line(h.flatten(2))  # (B, 4, 15)
        return self.head(F.relu(self.ln(h.transpose(1, 2))).flatten(1))


def test_every_hooked_layer_type_matches_the_loop(caplog):
    torch.manual_seed(0)
    model = Normed()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        for norm in (model.bn, model.gn, model.ln):  # weights and biases far from 1 / 0
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    model.eval()
    names = [n for n, p in model.named_parameters() if n.endswith("weight")]
    ps = ParameterSaliency(model, params=names)
    assert set(ps.layout.names) == set(names)
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(12, 2, 4, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    before = snapshot(model)
    fast, slow = both(model, ps, x, y, (1, 3, 12), caplog)
    assert_unchanged(model, before)
    assert_same_records(fast.records, slow.records)
