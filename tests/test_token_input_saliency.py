"""ParameterGuidedInputSaliency at a layer's output (``layer=``): token ids in, ``dO/dh`` at the
embeddings out, against a plain per-sample loop on Hugging Face models (BERT, GPT-2, a
Llama-style model) with attention masks, through the torch.func fallback (a custom embedding
whose own parameters are selected), and beside Captum's LayerIntegratedGradients."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_paramsal import ParameterGuidedInputSaliency, ParameterSaliency
from captum_paramsal.visualization import plot_token_attributions, token_scores

from helpers import assert_unchanged, snapshot
from naive import rel_err

pytest.importorskip("transformers")
from test_hf_models import VOCAB, B, _quiet, _unit_rows, make_case  # noqa: E402  (the small HF models)

BOOST = 100.0


def _cross_entropy(outputs: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(outputs, target, reduction="none")


def _logits(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output.logits


def naive_at_layer(
    model: nn.Module,
    layer: nn.Module,
    inputs: Tensor,
    kwargs: Dict[str, Tensor],
    target: Tensor,
    names: Sequence[str],
    k: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = _cross_entropy,
    stats: Any = None,
    units: Optional[Sequence[Sequence[int]]] = None,
) -> List[Tensor]:
    """Per sample, alone and unpadded (its real positions only): a forward in which a hook
    replaces ``layer``'s output by a leaf ``e``; the profile over ``names`` by
    ``torch.autograd.grad(create_graph=True)``, one value per unit (mean |g| of a row; the
    columns of GPT-2's ``(in, out)`` Conv1D weight), standardized by ``stats`` if given; the
    top-``k`` units (or ``units[i]``, columns) of a detached copy ``b`` multiplied by the boost;
    ``dO/de`` for ``O = cos(z, b)``. Returns one ``(length, ...)`` tensor per sample.

    The leaf cuts the graph from the loss to the layer's own parameters and to everything
    before the layer: where a selected parameter is used there (GPT-2's word embeddings, tied
    to its head; a convolution before an inner layer), that use is added by the chain rule,
    ``dL/dW += (dh/dW)^T dL/de``, from a second call of the layer on the inputs it was given.
    """
    params = dict(model.named_parameters())
    selected = [params[n] for n in names]
    rows_of = _unit_rows(model)
    mask = kwargs.get("attention_mask")
    modes = [(m, m.training) for m in model.modules()]
    results = []
    try:
        model.eval()
        for i in range(inputs.shape[0]):
            length = int(mask[i].sum()) if mask is not None else inputs.shape[1]
            x = inputs[i : i + 1, :length]
            kw = {key: value[i : i + 1, :length] for key, value in kwargs.items()}
            seen: Dict[str, Any] = {}

            def replace(module, args, call_kwargs, output, seen=seen):
                seen["call"] = (args, call_kwargs)
                seen["e"] = output.detach().clone().requires_grad_(True)
                return seen["e"]

            handle = layer.register_forward_hook(replace, with_kwargs=True)
            try:
                out = _logits(model(x, **kw))
            finally:
                handle.remove()
            e = seen["e"]
            loss = loss_fn(out, target[i : i + 1]).sum()
            grads = list(torch.autograd.grad(loss, selected, create_graph=True, allow_unused=True))
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(selected, grads)]
            args, call_kwargs = seen["call"]  # still attached to the graph before the layer
            again = layer(*args, **call_kwargs)
            if again.requires_grad:
                dl_de = torch.autograd.grad(loss, e, create_graph=True)[0]
                extra = torch.autograd.grad(again, selected, dl_de, create_graph=True, allow_unused=True)
                grads = [g if more is None else g + more for g, more in zip(grads, extra)]
            s = torch.cat([rows_of(n, g).abs().mean(1) for n, g in zip(names, grads)])
            z = (s - stats.mean) / stats.scale if stats is not None else s
            chosen = z.detach().topk(k).indices if units is None else torch.tensor(units[i])
            b = z.detach().clone()
            b[chosen] = b[chosen] * BOOST
            objective = F.cosine_similarity(z, b, dim=0)
            results.append(torch.autograd.grad(objective, e)[0][0])
    finally:
        for m, training in modes:
            m.training = training
    return results


def assert_matches(got: Tensor, expected: List[Tensor]) -> None:
    """Each sample within 1e-8 of the naive one on its real positions, exactly 0 on its padding."""
    for i, reference in enumerate(expected):
        length = reference.shape[0]
        assert rel_err(got[i, :length], reference) < 1e-8, i
        assert torch.equal(got[i, length:], torch.zeros_like(got[i, length:])), i


EMBEDDINGS = {
    "bert": lambda m: m.bert.embeddings,
    "gpt2": lambda m: m.transformer.wte,  # its weight is selected (tied to the head): its own graph stays
    "llama": lambda m: m.model.embed_tokens,
}


def _reference_stats(ps: ParameterSaliency, name: str) -> Any:
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(2):
        ids = torch.randint(2, VOCAB, (2, 5), generator=g)
        if name == "bert":
            target = torch.randint(0, 3, (2,), generator=g)
        else:
            target = torch.stack([torch.randint(2, VOCAB, (2,), generator=g), torch.full((2,), 4)], 1)
        batches.append((ids, target, {"attention_mask": torch.ones(2, 5, dtype=torch.long)}))
    return ps.fit_stats(batches, progress=False)


@pytest.mark.parametrize("name, with_stats", [("bert", False), ("gpt2", False), ("llama", True)])
def test_matches_naive_on_hf_models_with_padding(name, with_stats):
    case = make_case(name, padded=True)
    model = _quiet(case.build)
    config_before = model.config.to_dict()
    before = snapshot(model)
    layer = EMBEDDINGS[name](model)
    ps = ParameterSaliency(model, loss_fn=case.loss_fn)
    if with_stats:
        ps.stats = _reference_stats(ps, name)
    pgis = ParameterGuidedInputSaliency.from_parameter_saliency(ps, k=3, layer=layer)
    got = pgis.attribute(case.inputs, target=case.target, additional_forward_args=case.kwargs)
    with torch.no_grad():
        width = layer(case.inputs).shape[-1]
    assert isinstance(got, Tensor) and got.shape == (B, case.inputs.shape[1], width) and got.dtype == torch.float64
    names = list(ps.layout.names)
    if name == "gpt2":
        assert "transformer.wte.weight" in names
    expected = naive_at_layer(model, layer, case.inputs, case.kwargs, case.target, names, 3,
                              case.loss_fn or _cross_entropy, stats=ps.stats)
    assert_matches(got, expected)
    assert_unchanged(model, before)
    assert model.config.to_dict() == config_before


def test_units_random_units_and_chunks_on_bert():
    case = make_case("bert", padded=True)
    model = _quiet(case.build)
    before = snapshot(model)
    layer = model.bert.embeddings
    pgis = ParameterGuidedInputSaliency(model, k=3, layer=layer)
    run = dict(target=case.target, additional_forward_args=case.kwargs)
    names = list(pgis.layout.names)
    layout = pgis.layout
    # units whose saliency is not negligible (a unit of tiny saliency gives a gradient at the
    # level of rounding: the comparison would measure cancellation, not the method)
    per_sample = [[layout.column(names[-1], 0), layout.column(names[-2], 3)], [layout.column(names[-1], 1)],
                  [layout.column(names[-2], 5), layout.column(names[-3], 2)]]
    chosen = pgis.attribute(case.inputs, units=per_sample, **run)
    assert_matches(chosen, naive_at_layer(model, layer, case.inputs, case.kwargs, case.target, names, 3,
                                          units=per_sample))
    # chunks of internal_batch_size samples give what one pass gives
    whole = pgis.attribute(case.inputs, **run)
    with torch.no_grad():  # as Captum's wrappers call it
        assert torch.equal(pgis.attribute(case.inputs, **run), whole)
    assert torch.allclose(pgis.attribute(case.inputs, internal_batch_size=2, **run), whole, rtol=1e-10, atol=0)
    assert torch.allclose(pgis.attribute(case.inputs, units=per_sample, internal_batch_size=1, **run), chosen,
                          rtol=1e-10, atol=0)
    # the random baseline: reproducible with a seed, other units than the top k
    first = pgis.attribute(case.inputs, random_units=True, seed=3, **run)
    assert torch.equal(first, pgis.attribute(case.inputs, random_units=True, seed=3, **run))
    assert not torch.allclose(first, whole)
    assert not torch.allclose(first, pgis.attribute(case.inputs, random_units=True, seed=4, **run))
    drawn = torch.rand(B, layout.num_columns, generator=torch.Generator().manual_seed(3)).topk(3).indices
    assert_matches(first, naive_at_layer(model, layer, case.inputs, case.kwargs, case.target, names, 3,
                                         units=drawn.tolist()))
    assert_unchanged(model, before)


# -- the torch.func fallback: a custom embedding no rule covers, its own parameters selected -------


class GainEmbedding(nn.Module):
    """A lookup times a per-feature gain: no per-layer rule knows it."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, dim))
        self.gain = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, ids: Tensor) -> Tensor:
        return self.table[ids] * self.gain


class CheckedGainEmbedding(GainEmbedding):
    """The same, with data-dependent control flow that vmap cannot trace: the fallback's loop."""

    def forward(self, ids: Tensor) -> Tensor:
        if bool((ids < 0).any()):
            raise ValueError("negative token id")
        return super().forward(ids)


class Tagger(nn.Module):
    """Embedding, a position-wise Linear and a masked mean over the real tokens."""

    def __init__(self, embedding: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.emb = embedding if embedding is not None else GainEmbedding(VOCAB, 5)
        self.lin = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: Tensor, attention_mask: Tensor) -> Tensor:
        keep = attention_mask.unsqueeze(-1).to(torch.float64)
        hidden = torch.tanh(self.lin(self.emb(ids))) * keep
        return self.head(hidden.sum(1) / keep.sum(1))


def _tagger(embedding: Optional[nn.Module] = None) -> nn.Module:
    torch.manual_seed(0)
    return Tagger(embedding).double()


@pytest.mark.parametrize("names", [
    ["emb.table", "emb.gain", "lin.weight", "head.weight"],  # the fallback and the rules in one pass
    ["emb.table", "emb.gain"],  # the fallback alone
    ["lin.weight", "head.weight"],  # the rules alone; the layer itself on no path
], ids=["fallback_and_rules", "fallback_only", "rules_only"])
def test_fallback_with_the_layers_own_parameters(names):
    model = _tagger()
    before = snapshot(model)
    case = make_case("bert", padded=True)
    ids, mask = case.inputs, case.kwargs["attention_mask"]
    target = torch.tensor([0, 2, 1])
    pgis = ParameterGuidedInputSaliency(model, params=names, k=2, layer=model.emb, fallback_chunk_size=2)
    routes = {row.parameter: row.rule for row in pgis.routing(ids, additional_forward_args={"attention_mask": mask})}
    assert all((routes[n] is None) == n.startswith("emb.") for n in names), routes
    got = pgis.attribute(ids, target=target, additional_forward_args={"attention_mask": mask})
    assert got.shape == (B, ids.shape[1], 5)
    expected = naive_at_layer(model, model.emb, ids, {"attention_mask": mask}, target, names, 2)
    assert_matches(got, expected)
    chunked = pgis.attribute(ids, target=target, additional_forward_args={"attention_mask": mask},
                             internal_batch_size=2)
    assert torch.allclose(chunked, got, rtol=1e-10, atol=0)
    assert_unchanged(model, before)


def test_fallback_loop_where_vmap_cannot_trace_the_layer():
    torch.manual_seed(0)
    model = _tagger(CheckedGainEmbedding(VOCAB, 5))
    case = make_case("bert", padded=True)
    ids, mask = case.inputs, case.kwargs["attention_mask"]
    target = torch.tensor([1, 0, 2])
    names = ["emb.table", "emb.gain", "lin.weight"]
    pgis = ParameterGuidedInputSaliency(model, params=names, k=2, layer=model.emb)
    with pytest.warns(RuntimeWarning, match="could not vmap"):
        got = pgis.attribute(ids, target=target, additional_forward_args={"attention_mask": mask})
    assert_matches(got, naive_at_layer(model, model.emb, ids, {"attention_mask": mask}, target, names, 2))


def test_float_inputs_at_an_inner_layer_whose_weight_is_selected():
    """Not only tokens: any submodule, its output attributed, for tuple inputs a Tensor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 3, 3, stride=2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(12, 5)).double()
    x = torch.randn(3, 2, 10, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    pgis = ParameterGuidedInputSaliency(model, k=3, layer=model[2])
    got = pgis.attribute((x,), target=y)
    assert isinstance(got, Tensor) and got.shape == (3, 3, 4)
    expected = naive_at_layer(model, model[2], x, {}, y, list(pgis.layout.names), 3)
    assert rel_err(got, torch.stack(expected)) < 1e-8


# -- errors, the model left as found -------------------------------------------------------------


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head((self.emb(ids) + self.emb(ids.flip(1))).mean(1))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)
        self.unused = nn.Linear(5, 5)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.lstm(self.emb(ids))[0][:, -1])


class IdsFirst(nn.Module):
    """A submodule whose output holds integers."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Identity()
        self.emb = nn.Embedding(VOCAB, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.emb(self.shift(ids)).mean(1))


def _trained_state(model: nn.Module) -> nn.Module:
    model = model.double().train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    return model


@pytest.mark.parametrize("make, layer_of, params, error, match", [
    (Twice, lambda m: m.emb, None, RuntimeError, "exactly once"),
    (Twice, lambda m: m.emb, ["emb.weight"], RuntimeError, "exactly once"),  # the fallback-free rule pass
    (Recurrent, lambda m: m.lstm, None, TypeError, "one Tensor"),
    (Recurrent, lambda m: m.unused, None, RuntimeError, "not called"),
    (IdsFirst, lambda m: m.shift, None, TypeError, "floating-point"),
], ids=["called_twice", "called_twice_embedding_selected", "tuple_output", "not_called", "integer_output"])
def test_layer_errors_leave_the_model_as_found(make, layer_of, params, error, match):
    torch.manual_seed(0)
    model = _trained_state(make())
    ids = torch.randint(0, VOCAB, (2, 5))
    before = snapshot(model)
    pgis = ParameterGuidedInputSaliency(model, params=params, k=1, layer=layer_of(model))
    with pytest.raises(error, match=match):
        pgis.attribute(ids, target=torch.tensor([0, 1]))
    assert_unchanged(model, before)


def test_constructor_and_integer_input_errors():
    torch.manual_seed(0)
    model = _trained_state(Twice())
    ids = torch.randint(0, VOCAB, (2, 5))
    before = snapshot(model)
    with pytest.raises(TypeError, match="pass layer="):
        ParameterGuidedInputSaliency(model, k=1).attribute(ids, target=0)
    with pytest.raises(ValueError, match="not a submodule"):
        ParameterGuidedInputSaliency(model, k=1, layer=nn.Embedding(VOCAB, 4))
    with pytest.raises(TypeError, match="nn.Module"):
        ParameterGuidedInputSaliency(model, k=1, layer="emb")
    assert_unchanged(model, before)


# -- beside Captum's LayerIntegratedGradients, and the per-token figures ----------------------------


def test_beside_captums_layer_integrated_gradients(tmp_path):
    from captum.attr import LayerIntegratedGradients
    from matplotlib.figure import Figure

    case = make_case("bert", padded=True)
    model = _quiet(case.build)
    before = snapshot(model)
    mask = case.kwargs["attention_mask"]
    layer = model.bert.embeddings
    ours = ParameterGuidedInputSaliency(model, k=3, layer=layer).attribute(
        case.inputs, target=case.target, additional_forward_args={"attention_mask": mask})

    def forward(ids: Tensor, attention_mask: Tensor) -> Tensor:
        return model(ids, attention_mask=attention_mask).logits

    lig = LayerIntegratedGradients(forward, layer)
    theirs = lig.attribute(case.inputs, baselines=torch.zeros_like(case.inputs), target=case.target,
                           additional_forward_args=(mask,), n_steps=8)
    assert theirs.shape == ours.shape  # both (B, T, hidden): the same layer's output
    assert torch.isfinite(theirs).all() and theirs.abs().max() > 0
    ours_per_token = token_scores(ours, attention_mask=mask, normalize=True)
    theirs_per_token = token_scores(theirs, attention_mask=mask, normalize=True)
    assert ours_per_token.shape == theirs_per_token.shape == case.inputs.shape
    tokens = [f"t{int(t)}" for t in case.inputs[0]]
    for kind in ("bars", "heatmap"):
        figure = plot_token_attributions(tokens, {"filter boosting": ours_per_token[0],
                                                  "LayerIntegratedGradients": theirs_per_token[0]}, kind=kind)
        assert isinstance(figure, Figure)
        labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
        assert labels == tokens
        figure.savefig(tmp_path / f"{kind}.png")
        assert (tmp_path / f"{kind}.png").stat().st_size > 1000
    assert_unchanged(model, before)


def test_token_scores_and_plot_arguments():
    a = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [5.0, 5.0]]], dtype=torch.float64)
    assert torch.equal(token_scores(a), torch.tensor([[3.0, -1.0, 10.0]], dtype=torch.float64))
    assert torch.allclose(token_scores(a[0], reduction="l2"), torch.tensor([5 ** 0.5, 5.0, 50 ** 0.5],
                                                                            dtype=torch.float64))
    masked = token_scores(a, attention_mask=torch.tensor([[1, 1, 0]]), normalize=True)
    assert torch.allclose(masked, torch.tensor([[3.0, -1.0, 0.0]], dtype=torch.float64) / 10 ** 0.5)
    assert torch.equal(token_scores(torch.zeros(2, 3, 4), normalize=True), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="reduction"):
        token_scores(a, reduction="max")
    with pytest.raises(ValueError, match=r"\(B, T, D\)"):
        token_scores(torch.zeros(3))
    with pytest.raises(ValueError, match="attention_mask"):
        token_scores(a, attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="2 values for 3 tokens"):
        plot_token_attributions(["a", "b", "c"], {"m": [1.0, 2.0]})
    with pytest.raises(ValueError, match="kind"):
        plot_token_attributions(["a"], {"m": [1.0]}, kind="pie")
    with pytest.raises(ValueError, match="scores is empty"):
        plot_token_attributions(["a"], {})
