"""Hugging Face models, built from small configs with random weights (nothing downloaded), run
directly and exactly: BERT (sequence classification), GPT-2 and a Llama-style model (causal
LM, next token at each sample's last real position), T5 (encoder-decoder) and ViT (image
classification), with and without attention masks, against a plain per-sample loop; the
routing report shows no fallback for any layer a rule covers; padding never leaks; the
model (its config flags included) is left as found."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_paramsal import ParameterGuidedInputSaliency, ParameterSaliency

from helpers import assert_unchanged, snapshot
from naive import rel_err

transformers = pytest.importorskip("transformers")

VOCAB, B, T = 40, 3, 6


def _quiet(build: Callable[[], nn.Module]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return build().double().eval()


def bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, num_labels=3, attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(config)


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config)


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=24, max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config)


def t5() -> nn.Module:
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation="eager",
    )
    return transformers.T5ForConditionalGeneration(config)


def vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, num_labels=3, attn_implementation="eager",
    )
    return transformers.ViTForImageClassification(config)


def _ids_and_mask(padded: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padded:  # right padding: sample 0 has 4 real tokens, sample 2 has 5
        mask[0, 4:] = 0
        mask[2, 5:] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def last_token_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Next-token cross-entropy at each sample's chosen position: ``target[:, 0]`` is the token,
    ``target[:, 1]`` the position (its last real one)."""
    chosen = logits[torch.arange(logits.shape[0]), target[:, 1]]
    return F.cross_entropy(chosen, target[:, 0], reduction="none")


class Case:
    def __init__(self, build, inputs, kwargs, target, loss_fn=None, output_fn=None):
        self.build, self.inputs, self.kwargs, self.target = build, inputs, kwargs, target
        self.loss_fn, self.output_fn = loss_fn, output_fn


def make_case(name: str, padded: bool) -> Case:
    ids, mask = _ids_and_mask(padded)
    kwargs: Dict[str, Any] = {"attention_mask": mask} if padded else {}
    labels = torch.tensor([0, 2, 1])
    if name == "bert":
        return Case(bert, ids, kwargs, labels)
    if name in ("gpt2", "llama"):
        last = mask.sum(1) - 1
        target = torch.stack([torch.randint(2, VOCAB, (B,), generator=torch.Generator().manual_seed(2)), last], 1)
        return Case(gpt2 if name == "gpt2" else llama, ids, kwargs, target, loss_fn=last_token_loss)
    if name == "t5":
        decoder = torch.randint(2, VOCAB, (B, 4), generator=torch.Generator().manual_seed(3))
        kwargs = {**kwargs, "decoder_input_ids": decoder}
        target = torch.stack([torch.randint(2, VOCAB, (B,), generator=torch.Generator().manual_seed(2)),
                              torch.full((B,), 3)], 1)
        return Case(t5, ids, kwargs, target, loss_fn=last_token_loss)
    if name == "vit":
        pixels = torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        return Case(vit, pixels, {}, labels)
    raise KeyError(name)


def naive_saliency(model: nn.Module, case: Case, names: List[str], unit_rows: Callable[[str, Tensor], Tensor],
                   loss_fn: Callable, output_fn: Callable) -> Tensor:
    """One forward and one autograd.grad per sample, the sample alone (its own mask)."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(case.inputs.shape[0]):
        kwargs = {k: v[i : i + 1] for k, v in case.kwargs.items()}
        out = output_fn(model(case.inputs[i : i + 1], **kwargs))
        loss = loss_fn(out, case.target[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        row = []
        for n, g in zip(names, grads):
            g = torch.zeros_like(params[n]) if g is None else g
            row.append(unit_rows(n, g).abs().mean(1))
        rows.append(torch.cat(row))
    return torch.stack(rows)


def _unit_rows(model: nn.Module):
    from transformers.pytorch_utils import Conv1D

    def rows(name: str, grad: Tensor) -> Tensor:
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(owner, Conv1D) and name.endswith("weight"):
            grad = grad.T  # GPT-2's Conv1D stores (in, out): a unit is an output feature
        return grad.reshape(grad.shape[0], -1) if grad.dim() > 1 else grad.reshape(-1, 1)

    return rows


def _default_loss(outputs: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(outputs, target, reduction="none")


MODELS = ["bert", "gpt2", "llama", "t5", "vit"]


CASES = [(name, padded) for name in MODELS for padded in (False, True) if not (name == "vit" and padded)]


@pytest.mark.slow
@pytest.mark.parametrize("name, padded", CASES, ids=[f"{n}-{'mask' if p else 'no_mask'}" for n, p in CASES])
def test_hf_model_exact_and_on_its_rules(name, padded):  # ViT takes no attention mask: no masked case
    case = make_case(name, padded)
    model = _quiet(case.build)
    config_before = model.config.to_dict()
    before = snapshot(model)
    ps = ParameterSaliency(model, loss_fn=case.loss_fn, output_fn=case.output_fn)
    report = ps.routing(case.inputs, additional_forward_args=case.kwargs)
    assert report.fallback == (), str(report)  # every weight matrix of every block by a rule
    kinds = {row.module for row in report}
    assert kinds & {"Linear", "Conv1D"}, kinds
    got = ps.attribute(case.inputs, target=case.target, additional_forward_args=case.kwargs, internal_batch_size=2)
    loss_fn = case.loss_fn or _default_loss
    expected = naive_saliency(model, case, list(ps.layout.names), _unit_rows(model), loss_fn, ps.output_fn)
    assert rel_err(got, expected) < 1e-8
    assert_unchanged(model, before)
    assert model.config.to_dict() == config_before


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_every_parameter_of_a_hf_model(name):
    """Embeddings and norms too, when asked: their rules where a rule covers them, the
    fallback (exact, named in the report) for the rest."""
    case = make_case(name, padded=True)
    model = _quiet(case.build)
    names = [n for n, _ in model.named_parameters()]
    ps = ParameterSaliency(model, params=names, loss_fn=case.loss_fn)
    report = ps.routing(case.inputs, additional_forward_args=case.kwargs)
    for row in report:
        if row.module in ("Linear", "Conv1D", "LayerNorm", "LlamaRMSNorm"):
            assert row.rule is not None, str(report)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ps.attribute(case.inputs, target=case.target, additional_forward_args=case.kwargs)
    expected = naive_saliency(model, case, list(ps.layout.names), _unit_rows(model), case.loss_fn or _default_loss,
                              ps.output_fn)
    assert rel_err(got, expected) < 1e-8


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_padding_never_leaks(name):
    """A sample's saliency in a right-padded batch equals its saliency alone, unpadded."""
    case = make_case(name, padded=True)
    model = _quiet(case.build)
    ps = ParameterSaliency(model, loss_fn=case.loss_fn)
    batched = ps.attribute(case.inputs, target=case.target, additional_forward_args=case.kwargs)
    for i in range(B):
        length = int(case.kwargs["attention_mask"][i].sum())
        alone = ps.attribute(case.inputs[i : i + 1, :length], target=case.target[i : i + 1],
                             additional_forward_args={"attention_mask": torch.ones(1, length, dtype=torch.long)})
        assert rel_err(batched[i : i + 1], alone) < 1e-8, i


@pytest.mark.slow
def test_hf_input_saliency_on_vit():
    """The second-order pass through a Hugging Face model's rules."""
    case = make_case("vit", padded=False)
    model = _quiet(case.build)
    pgis = ParameterGuidedInputSaliency(model, k=3)
    got = pgis.attribute(case.inputs, target=case.target)
    params = dict(model.named_parameters())
    names = list(pgis.layout.names)
    rows = []
    for i in range(B):
        x = case.inputs[i : i + 1].clone().requires_grad_(True)
        loss = F.cross_entropy(model(x).logits, case.target[i : i + 1])
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        s = torch.cat([g.reshape(g.shape[0], -1).abs().mean(1) for g in grads])
        b = s.detach().clone()
        top = b.topk(3).indices
        b[top] *= 100.0
        rows.append(torch.autograd.grad(F.cosine_similarity(s, b, dim=0), x)[0])
    assert rel_err(got, torch.cat(rows)) < 1e-8


def test_a_sequence_classifier_and_a_causal_lm_in_five_lines():
    """The README's two examples, as written there."""
    model = _quiet(bert)
    ids, mask = _ids_and_mask(padded=True)
    ps = ParameterSaliency(model)
    saliency = ps.attribute(ids, target=torch.tensor([0, 2, 1]), additional_forward_args={"attention_mask": mask})
    assert saliency.shape == (B, ps.layout.num_columns)

    lm = _quiet(gpt2)
    ps = ParameterSaliency(lm, output_fn=lambda out: out.logits[:, -1])  # the next token after the prompt
    saliency = ps.attribute(ids[:, :4], target=ids[:, 4])
    assert saliency.shape == (B, ps.layout.num_columns) and torch.isfinite(saliency).all()


def test_output_fn_and_model_outputs_errors():
    model = _quiet(bert)
    ids, _ = _ids_and_mask(padded=False)
    with pytest.raises(TypeError, match="output_fn must be callable"):
        ParameterSaliency(model, output_fn="logits")
    ps = ParameterSaliency(model, output_fn=lambda out: out.hidden_states)  # None: not asked for
    with pytest.raises(TypeError, match="output_fn must return a Tensor, got NoneType"):
        ps.attribute(ids, target=torch.tensor([0, 1, 2]))

    class Scores(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return {"scores": self.lin(x)}

    with pytest.raises(TypeError, match="pass output_fn="):
        ParameterSaliency(Scores()).attribute(torch.randn(2, 4), target=torch.tensor([0, 1]))
    got = ParameterSaliency(Scores(), output_fn=lambda out: out["scores"]).attribute(torch.randn(2, 4), target=[0, 1])
    assert got.shape == (2, 3)


def test_fit_stats_on_a_tokenized_data_set():
    """Dict batches as a DataLoader over a tokenized data set yields them, padding and all:
    the statistics equal those of the same samples passed as (inputs, labels, keywords)."""
    model = _quiet(bert)
    ids, mask = _ids_and_mask(padded=True)
    labels = torch.tensor([0, 2, 1])
    ps = ParameterSaliency(model)
    as_dicts = [{"input_ids": ids[:2], "attention_mask": mask[:2], "labels": labels[:2]},
                {"input_ids": ids[2:], "attention_mask": mask[2:], "labels": labels[2:]}]
    stats = ps.fit_stats(as_dicts, progress=False)
    rows = ps.attribute(ids, target=labels, additional_forward_args={"attention_mask": mask})
    assert stats.count == 3 and rel_err(stats.mean, rows.double().mean(0)) < 1e-10
    triples = ps.fit_stats([(ids, labels, {"attention_mask": mask})], progress=False)
    assert rel_err(triples.mean, stats.mean) < 1e-10 and rel_err(triples.std, stats.std) < 1e-8
    capped = ps.fit_stats(as_dicts, progress=False, max_samples=1)
    assert capped.count == 1
