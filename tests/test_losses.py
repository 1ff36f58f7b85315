"""The per-sample loss families of ``captum_paramsal.losses``, each against a naive loop.

The reference runs the model on ONE sample ALONE, unpadded (its real tokens only, no mask),
writes the loss by hand with ``torch.nn.functional``, takes ``torch.autograd.grad`` over the
selected parameters and reduces each gradient per unit (rows of Linear and Embedding weights,
columns of GPT-2's ``Conv1D`` (in, out) weights). ``ParameterSaliency`` runs on the whole
padded batch (right padded, and left padded for the causal models) with its attention mask,
in float64: a sample's saliency in a padded batch must equal its saliency alone. Also: the
statistics over a data set of Hugging Face dict batches against numpy, one process and two
gloo processes, the loss names the statistics record, and the errors of bad targets.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, List, Sequence, Tuple

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from captum_paramsal import ParameterSaliency, SaliencyStats
from captum_paramsal.losses import (
    IGNORE_INDEX,
    BCEWithLogits,
    CausalLM,
    Contrastive,
    CrossEntropy,
    MaskedLM,
    MeanSquaredError,
    causal_lm_labels,
)

from helpers import assert_unchanged, snapshot
from naive import rel_err

transformers = pytest.importorskip("transformers")

VOCAB, T = 40, 7
LENGTHS = [5, 7, 4]  # real tokens of each sample of a padded batch (one sample is not padded)
PROMPTS = [2, 3, 1]  # for the continuation losses: real tokens of each sample that are its prompt
PAD, MASK_ID = 0, 1

# -- tiny models from configs (random weights, nothing downloaded) ------------------------------


def _build(make: Callable[[], nn.Module]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return make().double().eval()


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return _build(lambda: transformers.GPT2LMHeadModel(config))


def llama() -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=24, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=0)
    return _build(lambda: transformers.LlamaForCausalLM(config))


def _bert_config(**extra):
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=24, max_position_embeddings=16, **extra)


def bert_mlm() -> nn.Module:
    return _build(lambda: transformers.BertForMaskedLM(_bert_config()))


def bert_classifier(num_labels: int) -> nn.Module:
    return _build(lambda: transformers.BertForSequenceClassification(_bert_config(num_labels=num_labels)))


class Tagger(nn.Module):
    """A small non-transformer model; ``gain``, a raw parameter of the root module, has no
    per-layer rule, so the engine's torch.func fallback (vmap) computes it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.gain = nn.Parameter(torch.randn(8))
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)) * self.gain)


class TinyLM(nn.Module):
    """Embedding, a raw ``gain`` (fallback), a causal running mean over the real positions, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.gain = nn.Parameter(torch.randn(8))
        self.head = nn.Linear(8, VOCAB)

    def forward(self, ids: Tensor, attention_mask: Tensor = None) -> Tensor:
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        h = torch.tanh(self.embed(ids) * self.gain) * mask.unsqueeze(-1).to(self.gain.dtype)
        counts = mask.cumsum(1).clamp(min=1).unsqueeze(-1).to(h.dtype)
        return self.head(h.cumsum(1) / counts)


# -- data ---------------------------------------------------------------------------------------


def real_tokens(seed: int = 1, lengths: Sequence[int] = LENGTHS) -> List[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g) for n in lengths]


def pad(reals: Sequence[Tensor], side: str, width: int = T) -> Tuple[Tensor, Tensor]:
    """``(ids, attention_mask)`` of ``reals`` padded to ``width`` on ``side``."""
    ids = torch.full((len(reals), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(reals), width, dtype=torch.long)
    for i, r in enumerate(reals):
        where = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, where], mask[i, where] = r, 1
    return ids, mask


def forward_kwargs(mask: Tensor, side: str) -> Dict[str, Tensor]:
    """The attention mask, and with left padding the position ids a model with absolute positions
    needs (each sample's real tokens at positions 0, 1, ...)."""
    kwargs = {"attention_mask": mask}
    if side == "left":
        kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    return kwargs


# -- the naive reference ------------------------------------------------------------------------


def unit_rows(model: nn.Module, name: str, grad: Tensor) -> Tensor:
    """``(units, entries)`` of one sample's gradient of parameter ``name``."""
    from transformers.pytorch_utils import Conv1D

    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    if isinstance(owner, Conv1D) and name.endswith("weight"):
        grad = grad.T  # stored (in, out): a unit is an output feature, a column
    return grad.reshape(grad.shape[0], -1) if grad.dim() > 1 else grad.reshape(-1, 1)


def naive_profiles(model: nn.Module, names: Sequence[str], samples: Sequence[Tuple[tuple, dict]],
                   hand_loss: Callable[[int, Tensor], Tensor], reduction: str = "mean_abs") -> Tensor:
    """Per sample ``i``: ``out = model(*args_i, **kwargs_i)`` alone, ``hand_loss(i, out)`` (a
    scalar), its gradient over ``names``, reduced per unit."""
    params = dict(model.named_parameters())
    rows = []
    for i, (args, kwargs) in enumerate(samples):
        loss = hand_loss(i, model(*args, **kwargs))
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        row = []
        for n, g in zip(names, grads):
            units = unit_rows(model, n, torch.zeros_like(params[n]) if g is None else g)
            row.append(units.abs().mean(1) if reduction == "mean_abs" else units.mean(1))
        rows.append(torch.cat(row))
    return torch.stack(rows)


def alone(reals: Sequence[Tensor]) -> List[Tuple[tuple, dict]]:
    """Each sample by itself: its real tokens only, no mask, no position ids."""
    return [((r.unsqueeze(0),), {}) for r in reals]


def logits_of(out) -> Tensor:
    return out.logits if hasattr(out, "logits") else out


def assert_exact(got: Tensor, expected: Tensor, layout) -> None:
    """Relative error < 1e-8 overall and within each parameter's block (against the block's own
    scale); a block that is zero up to rounding (a signed mean that cancels: with a LayerNorm
    after it, an embedding row's gradient sums to zero) is held to 1e-13 of the whole scale."""
    assert got.dtype == torch.float64 and got.shape == expected.shape
    assert rel_err(got, expected) < 1e-8
    total = float(expected.abs().max())
    for entry in layout:
        a, b = got[:, entry.slice], expected[:, entry.slice]
        scale = float(b.abs().max())
        if scale < 1e-12 * total:
            assert float((a - b).abs().max()) < 1e-13 * total, entry.name
        else:
            assert rel_err(a, b) < 1e-8, entry.name


def causal_hand_loss(reals: Sequence[Tensor], first: Sequence[int], reduction: str):
    """The NLL of tokens ``first[i]..`` of sample ``i``, each predicted from the tokens before it."""

    def loss(i: int, out) -> Tensor:
        logp = F.log_softmax(logits_of(out)[0], dim=-1)
        r = reals[i]
        terms = [-logp[t - 1, r[t]] for t in range(max(1, first[i]), len(r))]
        total = torch.stack(terms).sum()
        return total / len(terms) if reduction == "mean" else total

    return loss


# -- causal LM ----------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_causal_lm_continuation_nll_exact_and_padding_safe(build, side):
    """``CausalLM`` on each sample's continuation (the prompt labelled -100): reduction ``sum`` is
    the continuation's NLL, ``mean`` the per-token average; in a batch padded on either side
    each sample's saliency equals its saliency alone."""
    model = build()
    reals = real_tokens()
    ids, mask = pad(reals, side)
    labels = causal_lm_labels(ids, mask, prompt_lengths=PROMPTS)
    kwargs = forward_kwargs(mask, side)
    before = snapshot(model)
    for reduction in ("sum", "mean"):
        ps = ParameterSaliency(model, loss_fn=CausalLM(reduction=reduction))
        assert ps.routing(ids, additional_forward_args=kwargs).fallback == ()
        got = ps.attribute(ids, target=labels, additional_forward_args=kwargs, internal_batch_size=2)
        expected = naive_profiles(model, ps.layout.names, alone(reals), causal_hand_loss(reals, PROMPTS, reduction))
        assert_exact(got, expected, ps.layout)
    assert_unchanged(model, before)


def test_causal_lm_one_token_per_sample_and_every_token():
    """Two more target formats on GPT-2, right padded: one labelled position per sample (a chosen
    token) and every real token after the first (the whole sequence's NLL)."""
    model = gpt2()
    reals = real_tokens(seed=4)
    ids, mask = pad(reals, "right")
    chosen = [3, 6, 1]  # the position of the token to explain, per sample
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, t in enumerate(chosen):
        labels[i, t] = ids[i, t]
    ps = ParameterSaliency(model, loss_fn=CausalLM())
    got = ps.attribute(ids, target=labels, additional_forward_args={"attention_mask": mask})

    def one_token(i: int, out) -> Tensor:
        t = chosen[i]
        return F.cross_entropy(out.logits[0, t - 1 : t], reals[i][t : t + 1])

    assert_exact(got, naive_profiles(model, ps.layout.names, alone(reals), one_token), ps.layout)

    every = ps.attribute(ids, target=causal_lm_labels(ids, mask), additional_forward_args={"attention_mask": mask})
    expected = naive_profiles(model, ps.layout.names, alone(reals), causal_hand_loss(reals, [1, 1, 1], "sum"))
    assert_exact(every, expected, ps.layout)


def test_causal_lm_labels_by_hand():
    ids = torch.tensor([[5, 6, 7, 0], [0, 0, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    assert causal_lm_labels(ids, mask).tolist() == [[-100, 6, 7, -100], [-100, -100, -100, 9]]
    assert causal_lm_labels(ids, mask, prompt_lengths=[2, 0]).tolist() == [[-100, -100, 7, -100],
                                                                           [-100, -100, -100, 9]]
    assert causal_lm_labels(ids, prompt_lengths=3, ignore_index=-1).tolist() == [[-1, -1, -1, 0], [-1, -1, -1, 9]]
    with pytest.raises(ValueError, match="attention_mask must be shaped like input_ids"):
        causal_lm_labels(ids, mask[:, :3])
    with pytest.raises(ValueError, match="prompt_lengths"):
        causal_lm_labels(ids, mask, prompt_lengths=[1, 2, 3])
    with pytest.raises(TypeError, match="must be integers"):
        causal_lm_labels(ids.double(), mask)


# -- masked LM, sequence classification, contrastive -------------------------------------------


def test_masked_lm_on_bert_exact_and_padding_safe():
    model = bert_mlm()
    originals = real_tokens(seed=2)
    masked_at = [[1, 3], [0, 4, 6], [2]]
    reals = [r.clone() for r in originals]
    for r, where in zip(reals, masked_at):
        r[where] = MASK_ID
    ids, mask = pad(reals, "right")
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, where in enumerate(masked_at):
        labels[i, where] = originals[i][where]
    for reduction in ("sum", "mean"):
        ps = ParameterSaliency(model, loss_fn=MaskedLM(reduction=reduction))
        got = ps.attribute(ids, target=labels, additional_forward_args={"attention_mask": mask})

        def hand(i: int, out, reduction=reduction) -> Tensor:
            logp = F.log_softmax(out.logits[0], dim=-1)
            terms = torch.stack([-logp[t, originals[i][t]] for t in masked_at[i]])
            return terms.mean() if reduction == "mean" else terms.sum()

        assert_exact(got, naive_profiles(model, ps.layout.names, alone(reals), hand), ps.layout)


def test_cross_entropy_on_a_bert_classifier_is_the_default_loss():
    """Exact against the loop, equal to the default loss, and statistics of either standardize
    the other (the same loss name)."""
    model = bert_classifier(3)
    reals = real_tokens(seed=3)
    ids, mask = pad(reals, "right")
    y = torch.tensor([2, 0, 1])
    kwargs = {"attention_mask": mask}
    ps = ParameterSaliency(model, loss_fn=CrossEntropy())
    got = ps.attribute(ids, target=y, additional_forward_args=kwargs)
    expected = naive_profiles(model, ps.layout.names, alone(reals),
                              lambda i, out: F.cross_entropy(out.logits, y[i : i + 1]))
    assert_exact(got, expected, ps.layout)
    default = ParameterSaliency(model)
    assert torch.equal(default.attribute(ids, target=y, additional_forward_args=kwargs), got)
    assert ps.loss_name == default.loss_name == "cross_entropy"
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2], "labels": y[:2]},
               {"input_ids": ids[2:], "attention_mask": mask[2:], "labels": y[2:]}]
    stats = default.fit_stats(batches, progress=False)
    z = ParameterSaliency(model, loss_fn=CrossEntropy(), stats=stats).attribute(ids, target=y,
                                                                              additional_forward_args=kwargs)
    assert rel_err(z, stats.standardize(got)) < 1e-12


@pytest.mark.parametrize("side", ["left", "right"])
def test_contrastive_on_gpt2_sign_and_padding(side):
    """Left padded: ``Contrastive(position=-1)`` and a (B, 2) target; right padded: a (B, 3)
    target with each sample's last real position. The signed mean reduction shows the sign
    (foil logit minus right logit)."""
    model = gpt2()
    reals = real_tokens(seed=5)
    ids, mask = pad(reals, side)
    pairs = torch.tensor([[3, 9], [17, 4], [25, 30]])  # (right id, foil id)
    if side == "left":
        loss, target = Contrastive(position=-1), pairs
    else:
        loss, target = Contrastive(), torch.cat([pairs, (mask.sum(1) - 1).unsqueeze(1)], 1)

    def hand(i: int, out) -> Tensor:
        last = out.logits[0, len(reals[i]) - 1]
        return last[pairs[i, 1]] - last[pairs[i, 0]]

    for reduction in ("mean_abs", "mean"):
        ps = ParameterSaliency(model, loss_fn=loss, reduction=reduction)
        got = ps.attribute(ids, target=target, additional_forward_args=forward_kwargs(mask, side))
        expected = naive_profiles(model, ps.layout.names, alone(reals), hand, reduction=reduction)
        assert_exact(got, expected, ps.layout)
    # the signed profile of the opposite contrast is the negative one
    swapped = target.clone()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    flipped = ps.attribute(ids, target=swapped, additional_forward_args=forward_kwargs(mask, side))
    assert rel_err(flipped, -got) < 1e-10


def test_contrastive_values():
    logits = torch.tensor([[0.5, 2.0, -1.0], [1.0, 0.0, 3.0]], dtype=torch.float64)
    got = Contrastive()(logits, torch.tensor([[1, 0], [0, 2]]))
    assert got.tolist() == [0.5 - 2.0, 3.0 - 1.0]  # foil logit minus right logit
    per_position = torch.stack([logits, 2 * logits], 1)  # (2, 2, 3)
    assert Contrastive(position=0)(per_position, torch.tensor([[1, 0], [0, 2]])).tolist() == got.tolist()
    assert Contrastive(position=-1)(per_position, torch.tensor([[1, 0], [0, 2]])).tolist() == (2 * got).tolist()
    chosen = Contrastive()(per_position, torch.tensor([[1, 0, 1], [0, 2, 0]]))
    assert chosen.tolist() == [2 * (0.5 - 2.0), 3.0 - 1.0]


# -- regression and multi-label, on BERT and on a small non-transformer model -------------------


def _float_targets(shape, seed: int, binary: bool) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(shape, generator=g, dtype=torch.float64)
    return (values > 0.5).double() if binary else torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("family", ["mse", "bce"])
def test_mse_and_bce_on_bert_with_num_labels(family):
    model = bert_classifier(4)
    reals = real_tokens(seed=6)
    ids, mask = pad(reals, "right")
    target = _float_targets((3, 4), seed=7, binary=family == "bce")
    target[1, 2] = 0.25  # a soft label
    loss = MeanSquaredError() if family == "mse" else BCEWithLogits()

    def hand(i: int, out) -> Tensor:
        if family == "mse":
            return ((out.logits[0] - target[i]) ** 2).mean()
        return F.binary_cross_entropy_with_logits(out.logits[0], target[i])

    ps = ParameterSaliency(model, loss_fn=loss)
    got = ps.attribute(ids, target=target, additional_forward_args={"attention_mask": mask})
    assert_exact(got, naive_profiles(model, ps.layout.names, alone(reals), hand), ps.layout)


@pytest.mark.parametrize("family", ["mse", "bce-mean", "bce-sum"])
def test_mse_and_bce_on_a_small_model_through_the_fallback(family):
    """A raw parameter goes to the torch.func fallback, which calls the loss under vmap: the
    loss's checks must not break vmap (no warning that it loops instead)."""
    torch.manual_seed(0)
    model = Tagger().double().eval()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    target = _float_targets((5, 4), seed=9, binary=family != "mse")
    loss = {"mse": MeanSquaredError(), "bce-mean": BCEWithLogits(), "bce-sum": BCEWithLogits("sum")}[family]

    def hand(i: int, out) -> Tensor:
        if family == "mse":
            return ((out[0] - target[i]) ** 2).mean()
        return F.binary_cross_entropy_with_logits(out[0], target[i], reduction=family.split("-")[1])

    names = ["fc1.weight", "gain", "fc2.weight", "fc2.bias"]
    ps = ParameterSaliency(model, params=names, loss_fn=loss, fallback_chunk_size=2)
    assert ps.routing(x).fallback == ("gain",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ps.attribute(x, target=target)
    samples = [((x[i : i + 1],), {}) for i in range(5)]
    assert_exact(got, naive_profiles(model, ps.layout.names, samples, hand), ps.layout)


@pytest.mark.parametrize("family", ["causal", "masked"])
def test_token_losses_through_the_fallback(family):
    """The token losses under the fallback's vmap, on right-padded batches."""
    torch.manual_seed(0)
    model = TinyLM().double().eval()
    reals = real_tokens(seed=10)
    ids, mask = pad(reals, "right")
    if family == "causal":
        loss, labels = CausalLM(reduction="mean"), causal_lm_labels(ids, mask, prompt_lengths=PROMPTS)
        hand = causal_hand_loss(reals, PROMPTS, "mean")
    else:
        masked_at = [[0, 4], [2], [1, 2, 3]]
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, where in enumerate(masked_at):
            labels[i, where] = reals[i][where]
        loss = MaskedLM()

        def hand(i: int, out) -> Tensor:
            return F.cross_entropy(out[0, masked_at[i]], reals[i][masked_at[i]], reduction="sum")

    names = ["embed.weight", "gain", "head.weight"]
    ps = ParameterSaliency(model, params=names, loss_fn=loss, fallback_chunk_size=2)
    assert ps.routing(ids, additional_forward_args={"attention_mask": mask}).fallback == ("gain",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ps.attribute(ids, target=labels, additional_forward_args={"attention_mask": mask})
    assert_exact(got, naive_profiles(model, ps.layout.names, alone(reals), hand), ps.layout)


# -- statistics over a token data set -----------------------------------------------------------

STATS_LENGTHS = [5, 7, 4, 6, 3, 7, 2, 5]  # 8 samples, in batches of 2


def token_data_set() -> Tuple[List[Tensor], List[Dict[str, Tensor]]]:
    """Real tokens of each sample, and the Hugging Face dict batches a DataLoader over the
    tokenized set would yield (right padded, labels -100 at the padding and the first token)."""
    reals = real_tokens(seed=11, lengths=STATS_LENGTHS)
    batches = []
    for start in range(0, len(reals), 2):
        ids, mask = pad(reals[start : start + 2], "right")
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": causal_lm_labels(ids, mask)})
    return reals, batches


def test_fit_stats_over_a_token_data_set_matches_numpy():
    model = gpt2()
    reals, batches = token_data_set()
    ps = ParameterSaliency(model, loss_fn=CausalLM())
    stats = ps.fit_stats(batches, progress=False)
    naive = naive_profiles(model, ps.layout.names, alone(reals),
                           causal_hand_loss(reals, [1] * len(reals), "sum")).numpy()
    assert stats.count == len(reals)
    assert stats.loss == "causal_lm(reduction='sum')"
    assert rel_err(stats.mean, torch.from_numpy(naive.mean(0))) < 1e-10
    assert rel_err(stats.std, torch.from_numpy(naive.std(0, ddof=1))) < 1e-8
    with pytest.raises(ValueError, match="causal_lm"):  # statistics of another loss are refused
        ParameterSaliency(model, loss_fn=CausalLM(reduction="mean"), stats=stats)


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        _, batches = token_data_set()
        stats = ParameterSaliency(gpt2(), loss_fn=CausalLM()).fit_stats(batches, progress=False)
        stats.save(os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fit_stats_over_a_token_data_set_two_gloo_processes_equal_one(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    _, batches = token_data_set()
    one = ParameterSaliency(gpt2(), loss_fn=CausalLM()).fit_stats(batches, progress=False)
    ranks = [SaliencyStats.load(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    assert torch.equal(ranks[0].mean, ranks[1].mean) and torch.equal(ranks[0].std, ranks[1].std)
    for stats in ranks:
        assert stats.count == one.count == len(STATS_LENGTHS)
        assert stats.loss == one.loss
        assert rel_err(stats.mean, one.mean) < 1e-10
        assert rel_err(stats.std, one.std) < 1e-10


# -- names and errors ---------------------------------------------------------------------------


def test_loss_names_record_the_options():
    names = {
        CrossEntropy(): "cross_entropy",
        CausalLM(): "causal_lm(reduction='sum')",
        CausalLM(reduction="mean", ignore_index=-1): "causal_lm(reduction='mean', ignore_index=-1)",
        MaskedLM(): "masked_lm(reduction='sum')",
        MaskedLM("mean"): "masked_lm(reduction='mean')",
        Contrastive(): "contrastive",
        Contrastive(position=-1): "contrastive(position=-1)",
        MeanSquaredError(): "mse",
        BCEWithLogits(): "bce_with_logits(reduction='mean')",
        BCEWithLogits("sum"): "bce_with_logits(reduction='sum')",
    }
    model = Tagger().double()
    for loss, name in names.items():
        assert loss.loss_name == name
        assert ParameterSaliency(model, loss_fn=loss).loss_name == name
    assert repr(CausalLM("mean")) == "CausalLM(reduction='mean')"


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="reduction must be one of"):
        CausalLM(reduction="none")
    with pytest.raises(ValueError, match="reduction must be one of"):
        BCEWithLogits(reduction="max")
    with pytest.raises(ValueError, match="ignore_index must be a negative int"):
        MaskedLM(ignore_index=3)
    with pytest.raises(TypeError, match="position must be an int or None"):
        Contrastive(position="last")


def test_bad_token_targets_give_clear_errors():
    logits = torch.randn(2, 4, VOCAB, dtype=torch.float64)
    ids = torch.randint(2, VOCAB, (2, 4))
    for loss in (CausalLM(), MaskedLM()):
        with pytest.raises(ValueError, match=r"shape \(batch, positions\) = \(2, 4\).*got \(2, 3\)"):
            loss(logits, ids[:, :3])
        with pytest.raises(ValueError, match=r"got \(2,\)"):
            loss(logits, ids[:, 0])
        with pytest.raises(TypeError, match="token ids, which must be integers; got dtype torch.float64"):
            loss(logits, ids.double())
        with pytest.raises(ValueError, match="outputs must be \\(batch, positions, vocabulary\\)"):
            loss(logits[:, 0], ids)
        with pytest.raises(ValueError, match="share the batch size"):
            loss(logits, ids[:1])
        too_big = ids.clone()
        too_big[1, 2] = VOCAB
        with pytest.raises(ValueError, match=f"token id {VOCAB} is out of range"):
            loss(logits, too_big)
        nothing = ids.clone()
        nothing[1] = IGNORE_INDEX
        with pytest.raises(ValueError, match=r"sample\(s\) \[1\] \(counted in the batch.*have no"):
            loss(logits, nothing)
    only_first = torch.full_like(ids, IGNORE_INDEX)
    only_first[:, 0] = ids[:, 0]
    only_first[0, 2] = ids[0, 2]
    with pytest.raises(ValueError, match=r"CausalLM: sample\(s\) \[1\] .* have no token to predict"):
        CausalLM()(logits, only_first)  # target[:, 0] is never predicted
    assert MaskedLM()(logits, only_first).shape == (2,)  # no shift: position 0 counts
    with pytest.raises(ValueError, match="T must be at least 2"):
        CausalLM()(logits[:, :1], ids[:, :1])


def test_bad_class_and_float_targets_give_clear_errors():
    logits = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="class ids, which must be integers"):
        CrossEntropy()(logits, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"one class id per sample, shape \(3,\), got \(3, 1\)"):
        CrossEntropy()(logits, torch.tensor([[0], [1], [2]]))
    with pytest.raises(ValueError, match="class id 4 is out of range for 4 outputs"):
        CrossEntropy()(logits, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="CausalLM or MaskedLM"):
        CrossEntropy()(logits.unsqueeze(1), torch.tensor([0, 1, 2]))

    with pytest.raises(ValueError, match=r"target must be \(3, 2\) \(right id, foil id\)"):
        Contrastive()(logits, torch.tensor([[0, 1, 2, 3]] * 3))
    with pytest.raises(TypeError, match="must be integers"):
        Contrastive()(logits, torch.tensor([[0.0, 1.0]] * 3))
    with pytest.raises(ValueError, match="give Contrastive\\(position=...\\)"):
        Contrastive()(logits.unsqueeze(1), torch.tensor([[0, 1]] * 3))
    with pytest.raises(ValueError, match="give one of them"):
        Contrastive(position=0)(logits.unsqueeze(1), torch.tensor([[0, 1, 0]] * 3))
    with pytest.raises(ValueError, match="position 2 is out of range for 1 positions"):
        Contrastive(position=2)(logits.unsqueeze(1), torch.tensor([[0, 1]] * 3))
    with pytest.raises(ValueError, match="position 1 is out of range"):
        Contrastive()(logits.unsqueeze(1), torch.tensor([[0, 1, 1]] * 3))
    with pytest.raises(ValueError, match="token id 7 is out of range"):
        Contrastive()(logits, torch.tensor([[0, 7]] * 3))

    with pytest.raises(ValueError, match=r"the outputs' shape \(3, 1\), got \(3,\)"):
        MeanSquaredError()(logits[:, :1], torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="regression values, which must be floating point"):
        MeanSquaredError()(logits, torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="multi-label targets, which must be floating point; got dtype torch.int64"):
        BCEWithLogits()(logits, torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        BCEWithLogits()(logits, torch.full((3, 4), 2.0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(3, 4\), got \(3, 3\)"):
        BCEWithLogits()(logits, torch.zeros(3, 3, dtype=torch.float64))


def test_an_all_ignored_sample_fails_the_attribution_and_leaves_the_model():
    """Through ParameterSaliency on GPT-2: the error names the sample, the model is as found."""
    model = gpt2()
    ids, mask = pad(real_tokens(), "right")
    labels = causal_lm_labels(ids, mask)
    labels[2] = IGNORE_INDEX
    before = snapshot(model)
    ps = ParameterSaliency(model, loss_fn=CausalLM())
    with pytest.raises(ValueError, match=r"sample\(s\) \[2\] .* have no token to predict"):
        ps.attribute(ids, target=labels, additional_forward_args={"attention_mask": mask})
    with pytest.raises(ValueError, match=r"sample\(s\) \[0\] \(counted in .* in its chunk\) have no token"):
        ps.attribute(ids, target=labels, additional_forward_args={"attention_mask": mask}, internal_batch_size=2)
    with pytest.raises(TypeError, match="must be integers"):
        ps.attribute(ids, target=labels.double(), additional_forward_args={"attention_mask": mask})
    assert_unchanged(model, before)
