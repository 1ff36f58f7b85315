"""The transformer rules (``Embedding`` / ``EmbeddingBag``, Hugging Face's ``Conv1D`` and RMS
norms, ``MultiheadAttention``) against a naive per-sample autograd loop, called directly with
batch-first tensors.

Each case runs a batch in float64; ``grad_output`` is autograd's gradient of a random linear
function of every output of the module (for a linear function, its coefficients), and each
parameter's per-sample gradient must match the loop's to 1e-10: built by the form
(``materialize``, whole and in a range of samples, into a buffer) and reduced to units by the
engine (:func:`~captum_paramsal.per_sample.unit_values.reduce_to_units`: closed forms, a form's
own ``units_by``, or the dense path) for ``mean_abs``, ``rms`` and ``mean``. The second-order
path (input and output gradient requiring grad, the sum of the units differentiated with
respect to them, by autograd through the rule and by the rule's own pull-back) is checked
against a naive double backward to 1e-8.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from captum_paramsal.per_sample.call import CallInputs
from captum_paramsal.per_sample.grads import LowRankGrad
from captum_paramsal.per_sample.policy import KernelPolicy
from captum_paramsal.per_sample.reductions import get_reduction
from captum_paramsal.per_sample.registry import default_grouping, default_params, explain_rule, find_rule, unit_grouping
from captum_paramsal.per_sample.selection import SelectedParameter
from captum_paramsal.per_sample.unit_values import Workspace, reduce_to_units, units_pull_back

from naive import rel_err

try:
    import transformers
except ImportError:  # the Hugging Face rules register nothing then; their tests are skipped
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")

# the Hugging Face rule files are imported by the registry the first time it meets one of
# their layers; these tests call the rules directly, so they import them themselves
from captum_paramsal.per_sample.rules import attention, embedding, hf_conv1d, hf_norms, hf_vit  # noqa: E402,F401

B = 4
DT = torch.float64
REDUCTIONS = ("mean_abs", "rms", "mean")


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


# -- a case: a module, its batch-first tensors, and how to run it --------------------------------------------------


@dataclass
class Case:
    """``tensors``: batch-first (dim 0 the sample) unless ``split`` says otherwise; ``call(tensors)``
    is what the rule is given, ``run(tensors)`` the module's outputs batch-first, ``cotangents`` one per
    output (None: unused), ``grad_output(cotangents)`` what the rule is given for them."""

    module: nn.Module
    tensors: List[Any]
    call: Callable[[List[Any]], CallInputs]
    run: Callable[[List[Any]], Tuple[Optional[Tensor], ...]]
    cotangents: List[Optional[Tensor]]
    names: Sequence[str]
    grad_output: Callable[[List[Optional[Tensor]]], Any] = lambda cots: cots[0]
    split: Optional[Callable[[List[Any], int], List[Any]]] = None
    #: where a parameter's name is a child's ("out_proj.weight"), the module that holds it
    owners: Dict[str, Tuple[nn.Module, str]] = field(default_factory=dict)
    #: tensors shared by every sample (a 2-d attention mask): not differentiated in the second-order check
    shared: Sequence[int] = ()
    #: the same function as ``run`` by ops that autograd differentiates twice (for the naive second order)
    naive_run: Optional[Callable[[List[Any]], Tuple[Optional[Tensor], ...]]] = None

    def sample(self, tensors: List[Any], i: int) -> List[Any]:
        if self.split is not None:
            return self.split(tensors, i)
        return [t[i : i + 1] if isinstance(t, Tensor) and t.dim() > 0 else t for t in tensors]

    def param(self, name: str) -> nn.Parameter:
        return self.module.get_parameter(name)

    def owner(self, name: str) -> Tuple[nn.Module, str]:
        return self.owners.get(name, (self.module, name))


def sample_loss(case: Case, tensors: List[Any], cotangents: List[Optional[Tensor]], i: int) -> Tensor:
    outputs = case.run(case.sample(tensors, i))
    total = 0.0
    for out, cot in zip(outputs, cotangents):
        if cot is not None:
            total = total + (out * cot[i : i + 1]).sum()
    return total


def naive_grads(case: Case) -> Dict[str, Tensor]:
    """``{name: (B, *shape)}``: one forward and backward per sample."""
    params = [case.param(n) for n in case.names]
    rows: Dict[str, List[Tensor]] = {n: [] for n in case.names}
    for i in range(B):
        loss = sample_loss(case, case.tensors, case.cotangents, i)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for name, p, g in zip(case.names, params, grads):
            g = torch.zeros_like(p) if g is None else g
            rows[name].append(g.to_dense() if g.is_sparse else g)
    return {n: torch.stack(r) for n, r in rows.items()}


def rule_grads(case: Case, tensors: Optional[List[Any]] = None, cotangents=None):
    tensors = case.tensors if tensors is None else tensors
    cotangents = case.cotangents if cotangents is None else cotangents
    rule = find_rule(case.module, next(n for n in case.names if "." not in n))
    assert rule is not None
    return rule(case.module, case.call(tensors), case.grad_output(cotangents), frozenset(case.names))


def selected(case: Case, name: str) -> SelectedParameter:
    module, attr = case.owner(name)
    param = case.param(name)
    grouping, units = unit_grouping(module, attr, param.shape)
    return SelectedParameter(name, param, ((module, attr),), grouping, module, units)


def naive_units(p: SelectedParameter, dense: Tensor, reduction: str) -> Tensor:
    grouped = p.grouping(dense, p.grouping_module)
    if reduction == "mean_abs":
        return grouped.abs().mean(-1)
    if reduction == "rms":
        return grouped.square().mean(-1).sqrt()
    return grouped.mean(-1)


def check_first_order(case: Case, tol: float = 1e-10) -> Dict[str, Any]:
    expected = naive_grads(case)
    grads = rule_grads(case)
    assert set(case.names) <= set(grads), f"the rule did not give {set(case.names) - set(grads)}"
    for name in case.names:
        g, e = grads[name], expected[name]
        assert rel_err(g.materialize(0, B), e) < tol, name
        assert rel_err(g.materialize(1, 3), e[1:3]) < tol, name
        buffer = torch.full((2 * e[0].numel(),), float("nan"), dtype=DT)
        assert rel_err(g.materialize(2, 4, out=buffer), e[2:4]) < tol, name
        p = selected(case, name)
        for reduction in REDUCTIONS:
            r = get_reduction(reduction)
            got = reduce_to_units(p, [g], B, r, KernelPolicy(), Workspace())
            want = naive_units(p, e, reduction)
            assert got.shape == (B, p.num_units), name
            if want.abs().max() > 0:
                assert rel_err(got, want) < tol, (name, reduction)
            else:
                assert got.abs().max() < 1e-13, (name, reduction)
        for reduce in (lambda v: v.abs().mean(-1), lambda v: v.square().mean(-1).sqrt()):
            shortcut = g.units_by(reduce, p.grouping)
            if shortcut is not None:
                assert rel_err(shortcut, reduce(p.grouping(e, p.grouping_module))) < tol, name
    return grads


# -- the second-order check ----------------------------------------------------------------------------------------


def check_second_order(
    case: Case, names: Sequence[str], reductions: Sequence[str] = ("mean_abs", "rms"), tol: float = 1e-8
) -> None:
    """d(sum of the units of ``names``)/d(floating inputs, output cotangents), against a naive double backward."""
    floating = [
        i for i, t in enumerate(case.tensors)
        if isinstance(t, Tensor) and t.is_floating_point() and i not in case.shared
    ]
    cot_index = [i for i, c in enumerate(case.cotangents) if c is not None]
    for reduction in reductions:
        r = get_reduction(reduction)
        expected = naive_second_order(case, names, floating, cot_index, reduction)
        for via_pull_back in (False, True):
            tensors = leaves_of(case.tensors, floating)
            cots = [None if c is None else c.detach().clone().requires_grad_() for c in case.cotangents]
            leaves = [tensors[i] for i in floating] + [cots[i] for i in cot_index]
            with torch.enable_grad():
                grads = rule_grads(case, tensors, cots)
                outputs, grad_outputs = [], []
                for name in names:
                    p = selected(case, name)
                    pairs = None
                    if via_pull_back:
                        weights = torch.ones(B, p.num_units, dtype=DT)
                        pairs = units_pull_back(p, [grads[name]], weights, r, KernelPolicy(), Workspace())
                    if pairs is None:
                        pairs = [(reduce_to_units(p, [grads[name]], B, r, KernelPolicy(), Workspace()).sum(), None)]
                    for out, cot in pairs:
                        outputs.append(out)
                        grad_outputs.append(torch.ones_like(out) if cot is None else cot)
                got = torch.autograd.grad(outputs, leaves, grad_outputs, allow_unused=True)
            for g, e in zip(got, expected):
                g = torch.zeros_like(e) if g is None else g
                if e.abs().max() == 0:  # the units do not depend on it (pixels, for ViT's tokens)
                    assert g.abs().max() == 0, (reduction, via_pull_back)
                else:
                    assert rel_err(g, e) < tol, (reduction, via_pull_back)


def leaves_of(tensors: List[Any], floating: Sequence[int]) -> List[Any]:
    """``tensors`` with those at ``floating`` replaced by leaves; one tensor passed several times
    (self-attention's query, key and value) stays one leaf."""
    leaves: Dict[int, Tensor] = {}
    out = list(tensors)
    for i in floating:
        t = tensors[i]
        if id(t) not in leaves:
            leaves[id(t)] = t.detach().clone().requires_grad_()
        out[i] = leaves[id(t)]
    return out


def naive_second_order(case: Case, names, floating, cot_index, reduction: str) -> List[Tensor]:
    params = [case.param(n) for n in names]
    rows: List[List[Tensor]] = [[] for _ in floating + cot_index]
    for i in range(B):
        local = leaves_of(case.sample(case.tensors, i), floating)
        cots = [None if c is None else c.detach().clone() for c in case.cotangents]
        mine = {j: cots[j][i : i + 1].clone().requires_grad_() for j in cot_index}
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no double backward
            outputs = (case.naive_run or case.run)(local)
            loss = sum((out * mine[j]).sum() for j, out in enumerate(outputs) if j in mine)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            total = 0.0
            for name, g in zip(names, grads):
                total = total + naive_units(selected(case, name), g.unsqueeze(0), reduction).sum()
            leaves = [local[j] for j in floating] + [mine[j] for j in cot_index]
            parts = torch.autograd.grad(total, leaves, allow_unused=True)
        for row, part, leaf in zip(rows, parts, leaves):
            row.append(torch.zeros_like(leaf) if part is None else part)
    # the floating inputs may not be sliced per sample along dim 0 (a 1-d bag input): not used here
    return [torch.cat(row) for row in rows]


# -- Embedding ------------------------------------------------------------------------------------------------------


def embedding_case(module: nn.Embedding, ids: Tensor, seed: int = 3) -> Case:
    module = module.double().eval()
    dy = randn(*ids.shape, module.embedding_dim, seed=seed)
    return Case(
        module, [ids],
        call=lambda ts: CallInputs((ts[0],), {}),
        run=lambda ts: (module(ts[0]),),
        cotangents=[dy], names=["weight"],
    )


def token_ids(*shape: int, vocab: int, seed: int = 1) -> Tensor:
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
    ids.view(shape[0], -1)[:, 1] = ids.view(shape[0], -1)[:, 0]  # every sample repeats a token
    return ids


EMBEDDINGS = {
    "plain": lambda: nn.Embedding(11, 5),
    "padding_idx": lambda: nn.Embedding(11, 5, padding_idx=2),
    "negative_padding_idx": lambda: nn.Embedding(11, 5, padding_idx=-1),
    "scale_grad_by_freq": lambda: nn.Embedding(11, 5, padding_idx=2, scale_grad_by_freq=True),
    "sparse": lambda: nn.Embedding(11, 5, sparse=True),
}


@pytest.mark.parametrize("kind", sorted(EMBEDDINGS))
@pytest.mark.parametrize("shape", [(B, 7), (B, 2, 3)])
def test_embedding_matches_naive(kind, shape):
    torch.manual_seed(0)
    ids = token_ids(*shape, vocab=11)
    ids.view(B, -1)[:, -1] = 2  # the padding row (where there is one) is looked up ...
    ids.view(B, -1)[0, 2] = 10  # ... and the last (padding_idx=-1)
    case = embedding_case(EMBEDDINGS[kind](), ids)
    grads = check_first_order(case)
    assert isinstance(grads["weight"], embedding.RowSparseGrad)


def test_embedding_padding_rows_get_no_gradient():
    module = nn.Embedding(11, 5, padding_idx=2).double()
    ids = torch.full((B, 3), 2)
    ids[:, 0] = torch.arange(B) + 3
    grads = rule_grads(embedding_case(module, ids))["weight"]
    dense = grads.materialize(0, B)
    assert dense[:, 2].abs().max() == 0
    units = grads.units_by(lambda v: v.abs().mean(-1), default_grouping)
    assert units[:, 2].abs().max() == 0 and units.shape == (B, 11)
    assert (units > 0).sum() == B  # one touched row each


def test_embedding_units_by_never_builds_the_table():
    module = nn.Embedding(200_000, 64).double()  # B x V x D = 51M values: never built
    ids = torch.randint(0, 200_000, (B, 9), generator=torch.Generator().manual_seed(0))
    grads = rule_grads(embedding_case(module, ids))["weight"]
    seen: List[Tuple[int, ...]] = []

    def reduce(grouped: Tensor) -> Tensor:
        seen.append(tuple(grouped.shape))
        return grouped.abs().mean(-1)

    units = grads.units_by(reduce, default_grouping)
    assert units.shape == (B, 200_000)
    assert all(s[0] * s[1] <= B * 9 for s in seen)
    dy = grads.values.view(B, 9, 64)
    for i in range(B):
        for token in ids[i].unique():
            expected = dy[i][ids[i] == token].sum(0).abs().mean()
            assert torch.allclose(units[i, token], expected, rtol=1e-14, atol=0)
    assert (units != 0).sum() == sum(len(ids[i].unique()) for i in range(B))
    assert grads.units_by(reduce, lambda g, m=None: g) is None  # another grouping: no shortcut


def test_embedding_max_norm_is_refused():
    module = nn.Embedding(11, 5, max_norm=1.0).double()
    case = embedding_case(module, token_ids(B, 3, vocab=11))
    # the registry refuses the configuration (the module goes to the fallback) ...
    rule, why = explain_rule(module, "weight")
    assert rule is None and "max_norm" in why
    # ... and the rule itself, called anyway, raises
    with pytest.raises(ValueError, match="max_norm"):
        embedding.embedding_per_sample_grads(module, case.call(case.tensors), case.grad_output(case.cotangents),
                                             frozenset(case.names))
    assert embedding.embedding_unsupported(module) is not None
    assert embedding.embedding_unsupported(nn.Embedding(3, 2)) is None


def test_embedding_registration():
    module = nn.Embedding(3, 2)
    assert find_rule(module, "weight") is not None
    assert default_params(module) == frozenset()  # selected by name only

    class Tagged(nn.Embedding):  # keeps forward: covered
        pass

    class Overriding(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2

    assert find_rule(Tagged(3, 2), "weight") is not None
    assert find_rule(Overriding(3, 2), "weight") is None


@pytest.mark.parametrize("kind", ["plain", "padding_idx"])
def test_embedding_second_order(kind):
    ids = token_ids(B, 7, vocab=11)
    ids[:, -1] = 2
    check_second_order(embedding_case(EMBEDDINGS[kind](), ids), ["weight"], reductions=("mean_abs",))


def test_embedding_scale_grad_by_freq_second_order_by_finite_differences():
    """torch's double backward of an embedding drops ``scale_grad_by_freq``'s 1/count (so the naive
    double backward is wrong there): the rule's is checked by central differences instead."""
    ids = token_ids(B, 7, vocab=11)
    ids[:, -1] = 2
    case = embedding_case(EMBEDDINGS["scale_grad_by_freq"](), ids)
    p = selected(case, "weight")
    r = get_reduction("rms")

    def total(dy: Tensor) -> Tensor:
        grads = rule_grads(case, cotangents=[dy])["weight"]
        return reduce_to_units(p, [grads], B, r, KernelPolicy(), Workspace()).sum()

    dy = case.cotangents[0].clone().requires_grad_()
    with torch.enable_grad():
        (got,) = torch.autograd.grad(total(dy), [dy])
    h = 1e-6
    for index in [(0, 0, 0), (0, 1, 3), (1, 6, 2), (3, 2, 4)]:
        step = torch.zeros_like(dy)
        step[index] = h
        numeric = (total(dy.detach() + step) - total(dy.detach() - step)) / (2 * h)
        assert abs(float(got[index]) - float(numeric)) < 1e-7
    assert got[:, -1].abs().max() == 0  # padding positions


# -- EmbeddingBag ---------------------------------------------------------------------------------------------------


def bag_case_2d(module: nn.EmbeddingBag, ids: Tensor, weights: Optional[Tensor] = None) -> Case:
    module = module.double().eval()
    dy = randn(B, module.embedding_dim, seed=5)
    extra = [] if weights is None else [weights]

    def call(ts):
        return CallInputs((ts[0],), {} if len(ts) == 1 else {"per_sample_weights": ts[1]})

    def run(ts):
        return (module(ts[0], per_sample_weights=ts[1] if len(ts) > 1 else None),)

    return Case(module, [ids, *extra], call=call, run=run, cotangents=[dy], names=["weight"])


def bag_case_1d(module: nn.EmbeddingBag, lengths: Sequence[int], with_weights: bool = False) -> Case:
    module = module.double().eval()
    total = sum(lengths)
    ids = torch.randint(0, module.num_embeddings, (total,), generator=torch.Generator().manual_seed(2))
    ids[1] = ids[0]
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()])
    offsets = torch.cat([starts, torch.tensor([total])]) if module.include_last_offset else starts
    weights = randn(total, seed=7) if with_weights else None
    dy = randn(B, module.embedding_dim, seed=5)
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]

    def split(ts, i):
        lo, hi = bounds[i], bounds[i + 1]
        offs = torch.tensor([0, hi - lo]) if module.include_last_offset else torch.tensor([0])
        return [ts[0][lo:hi], offs, None if ts[2] is None else ts[2][lo:hi]]

    return Case(
        module, [ids, offsets, weights],
        call=lambda ts: CallInputs((ts[0], ts[1]), {"per_sample_weights": ts[2]}),
        run=lambda ts: (module(ts[0], ts[1], per_sample_weights=ts[2]),),
        cotangents=[dy], names=["weight"], split=split,
    )


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("options", [{}, {"padding_idx": 2}, {"scale_grad_by_freq": True}])
def test_embedding_bag_2d_matches_naive(mode, options):
    if mode == "max" and options.get("scale_grad_by_freq"):
        pytest.skip("torch: scale_grad_by_freq is not supported with mode='max'")
    ids = token_ids(B, 6, vocab=9)
    ids[:, -1] = 2
    check_first_order(bag_case_2d(nn.EmbeddingBag(9, 5, mode=mode, **options), ids))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_embedding_bag_1d_matches_naive(mode, include_last_offset):
    module = nn.EmbeddingBag(9, 5, mode=mode, include_last_offset=include_last_offset)
    check_first_order(bag_case_1d(module, [3, 1, 4, 2]))


def test_embedding_bag_per_sample_weights():
    ids = token_ids(B, 6, vocab=9)
    check_first_order(bag_case_2d(nn.EmbeddingBag(9, 5, mode="sum"), ids, randn(B, 6, seed=8)))
    check_first_order(bag_case_1d(nn.EmbeddingBag(9, 5, mode="sum", padding_idx=3), [3, 1, 4, 2], with_weights=True))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_second_order(mode):
    """torch has no double backward of embedding_bag: the naive side runs the same bag as an
    Embedding lookup and a weighted sum / mean / max over the bag (checked equal first)."""
    ids = token_ids(B, 6, vocab=9)
    ids[:, -1] = 2
    weights = randn(B, 6, seed=8) if mode == "sum" else None
    case = bag_case_2d(nn.EmbeddingBag(9, 5, mode=mode, padding_idx=2), ids, weights)
    module = case.module

    def as_lookup(ts):
        rows = nn.functional.embedding(ts[0], module.weight)  # (n, N, D)
        keep = (ts[0] != module.padding_idx).unsqueeze(-1)
        if mode == "sum":
            return ((rows * ts[1].unsqueeze(-1) * keep).sum(1),)
        if mode == "mean":
            return ((rows * keep).sum(1) / keep.sum(1),)
        return (rows.masked_fill(~keep, float("-inf")).amax(1),)

    assert rel_err(as_lookup(case.tensors)[0].detach(), case.run(case.tensors)[0].detach()) < 1e-14
    case.naive_run = as_lookup
    check_second_order(case, ["weight"], reductions=("mean_abs",))


# -- Hugging Face Conv1D --------------------------------------------------------------------------------------------


def conv1d_case(shape: Tuple[int, ...], nf: int = 7, names=("weight", "bias")) -> Case:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    module = Conv1D(nf, shape[-1]).double().eval()
    with torch.no_grad():
        module.bias.normal_()
    x = randn(*shape, seed=1)
    dy = randn(*shape[:-1], nf, seed=2)
    return Case(
        module, [x], call=lambda ts: CallInputs((ts[0],), {}), run=lambda ts: (module(ts[0]),),
        cotangents=[dy], names=list(names),
    )


@needs_transformers
@pytest.mark.parametrize("shape", [(B, 5), (B, 3, 5), (B, 2, 3, 5), (B, 1, 5)])
def test_hf_conv1d_matches_naive(shape):
    case = conv1d_case(shape)
    grads = check_first_order(case)
    weight = grads["weight"]
    assert isinstance(weight, hf_conv1d.TransposedLowRankGrad)
    p = selected(case, "weight")
    assert p.grouping is hf_conv1d.output_feature_units and p.num_units == 7
    assert weight.rows_are_units(p.grouping) and not weight.rows_are_units(default_grouping)


@needs_transformers
def test_hf_conv1d_registration():
    from transformers.pytorch_utils import Conv1D

    module = Conv1D(4, 3)
    assert find_rule(module, "weight") is not None and find_rule(module, "bias") is not None
    assert default_params(module) == frozenset({"weight"})


@needs_transformers
def test_hf_conv1d_pull_back_in_the_parameter_layout():
    """The form's own pull-back (rows along the parameter's first axis, as the contract says)
    against autograd through its materialize."""
    case = conv1d_case((B, 3, 5))
    x = case.tensors[0].clone().requires_grad_()
    dy = case.cotangents[0].clone().requires_grad_()
    with torch.enable_grad():
        g = rule_grads(case, [x], [dy])["weight"]
        cotangent, row_scale = randn(B, 5, 7, seed=11), randn(B, 5, seed=12)
        expected = torch.autograd.grad((g.materialize(0, B) * cotangent * row_scale[..., None]).sum(), [x, dy])
        pairs = g.pull_back(0, B, cotangent.clone(), row_scale)
        outputs, cots = zip(*pairs)
        got = torch.autograd.grad(outputs, [x, dy], cots)
    for a, b in zip(got, expected):
        assert rel_err(a, b) < 1e-10


@needs_transformers
@pytest.mark.parametrize("shape", [(B, 3, 5), (B, 1, 5)])
def test_hf_conv1d_second_order(shape):
    check_second_order(conv1d_case(shape), ["weight", "bias"])


# -- Hugging Face RMS norms -----------------------------------------------------------------------------------------


def hf_norm(kind: str) -> nn.Module:
    if kind == "llama":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        module = LlamaRMSNorm(6, eps=1e-5)
    else:
        from transformers.models.t5.modeling_t5 import T5LayerNorm

        module = T5LayerNorm(6, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(randn(6, seed=4))
    return module


def norm_case(kind: str, shape=(B, 3, 6), dtype=DT) -> Case:
    module = hf_norm(kind).to(dtype).eval()
    x = randn(*shape, seed=1).to(dtype)
    dy = randn(*shape, seed=2).to(dtype)
    return Case(
        module, [x], call=lambda ts: CallInputs((ts[0],), {}), run=lambda ts: (module(ts[0]),),
        cotangents=[dy], names=["weight"],
    )


@needs_transformers
@pytest.mark.parametrize("kind", ["llama", "t5"])
@pytest.mark.parametrize("shape", [(B, 6), (B, 3, 6), (B, 2, 3, 6)])
def test_hf_norms_match_naive(kind, shape):
    case = norm_case(kind, shape)
    check_first_order(case)
    assert default_params(case.module) == frozenset()


@needs_transformers
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_hf_norms_half_precision_weight(kind):
    """A bfloat16 model: the rule rounds where the layer does (compared at bfloat16's precision)."""
    case = norm_case(kind, dtype=torch.bfloat16)
    expected = naive_grads(case)["weight"].double()
    got = rule_grads(case)["weight"].materialize(0, B)
    assert got.dtype == torch.bfloat16
    assert rel_err(got.double(), expected) < 1e-2


@needs_transformers
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_hf_norms_second_order(kind):
    check_second_order(norm_case(kind), ["weight"])


def test_hf_rms_norm_registers_copies():
    class CopiedRMSNorm(nn.Module):  # what Mistral, Qwen2, ... have
        def __init__(self, size):
            super().__init__()
            self.weight = nn.Parameter(randn(size, seed=3))
            self.variance_epsilon = 1e-6

        def forward(self, hidden_states):
            input_dtype = hidden_states.dtype
            hidden_states = hidden_states.to(torch.float32)
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
            return self.weight * hidden_states.to(input_dtype)

    hf_norms.register_hf_rms_norm(CopiedRMSNorm)
    module = CopiedRMSNorm(6)
    case = Case(
        module, [randn(B, 3, 6, seed=1)], call=lambda ts: CallInputs((ts[0],), {}),
        run=lambda ts: (module(ts[0]),), cotangents=[randn(B, 3, 6, seed=2)], names=["weight"],
    )
    check_first_order(case)


# -- MultiheadAttention ---------------------------------------------------------------------------------------------

E, HEADS, L, S = 6, 2, 3, 4


def mha_case(
    batch_first: bool = True,
    self_attention: bool = True,
    kdim: Optional[int] = None,
    vdim: Optional[int] = None,
    need_weights: bool = True,
    average: bool = True,
    key_padding_mask: bool = False,
    attn_mask: Optional[str] = None,
    bias: bool = True,
    add_bias_kv: bool = False,
    add_zero_attn: bool = False,
    is_causal: bool = False,
    out_proj: bool = True,
    mask_as_torch: bool = False,
) -> Case:
    torch.manual_seed(0)
    module = nn.MultiheadAttention(
        E, HEADS, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim,
        batch_first=batch_first,
    ).double().eval()
    with torch.no_grad():  # nonzero biases everywhere
        for name, p in module.named_parameters():
            if "bias" in name:
                p.copy_(randn(*p.shape, seed=len(name), scale=0.5))
    tgt = L if not self_attention else S
    query = randn(B, tgt, E, seed=1)
    if self_attention:
        key = value = query
    else:
        key = randn(B, S, kdim or E, seed=2)
        value = randn(B, S, vdim or E, seed=3)
    kpm = None
    if key_padding_mask:
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[0, -1] = kpm[2, 1:3] = True
        if attn_mask not in (None, "shared") or (attn_mask == "shared" and not is_causal):  # a float mask: same type
            kpm = torch.zeros(B, S, dtype=DT).masked_fill_(kpm, float("-inf"))
    mask = None
    if attn_mask == "shared":
        mask = torch.triu(torch.ones(tgt, S, dtype=torch.bool), 1) if is_causal else randn(tgt, S, seed=9)
    elif attn_mask == "per_sample":  # batch-first (B, heads, L, S), torch's (B * heads, L, S)
        mask = randn(B, HEADS, tgt, S, seed=9)
    tensors = [query, key, value, kpm, mask]

    def layout(t: Tensor) -> Tensor:
        return t if batch_first else t.transpose(0, 1)

    def module_args(ts):
        q, k, v, kpm_, mask_ = ts
        if ts[0] is ts[1] and ts[1] is ts[2]:
            k = v = q = layout(q)
        else:
            q, k, v = layout(q), layout(k), layout(v)
        if mask_ is not None and mask_.dim() == 4:
            mask_ = mask_.reshape(-1, *mask_.shape[2:])
        return q, k, v, kpm_, mask_

    def run(ts):
        q, k, v, kpm_, mask_ = module_args(ts)
        out, weights = module(
            q, k, v, key_padding_mask=kpm_, need_weights=need_weights, attn_mask=mask_,
            average_attn_weights=average, is_causal=is_causal,
        )
        return layout(out), weights

    def call(ts):
        q, k, v, kpm_, mask_ = ts
        if mask_as_torch and mask_ is not None and mask_.dim() == 4:
            mask_ = mask_.reshape(-1, *mask_.shape[2:])
        kwargs = dict(key_padding_mask=kpm_, need_weights=need_weights, attn_mask=mask_,
                      average_attn_weights=average, is_causal=is_causal)
        return CallInputs((q, k, v), kwargs)

    def split(ts, i):
        if ts[0] is ts[1] and ts[1] is ts[2]:
            q = ts[0][i : i + 1]
            parts = [q, q, q]
        else:
            parts = [t[i : i + 1] for t in ts[:3]]
        kpm_ = None if ts[3] is None else ts[3][i : i + 1]
        mask_ = ts[4] if ts[4] is None or ts[4].dim() == 2 else ts[4][i : i + 1]
        return [*parts, kpm_, mask_]

    with torch.no_grad():
        out, weights = run(tensors)
    cotangents = [randn(*out.shape, seed=21), None if weights is None else randn(*weights.shape, seed=22)]
    names = ["in_proj_weight"] if module._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    if bias:
        names.append("in_proj_bias")
    if add_bias_kv:
        names += ["bias_k", "bias_v"]
    owners = {}
    if out_proj:
        names.append("out_proj.weight")
        owners["out_proj.weight"] = (module.out_proj, "weight")
        if bias:
            names.append("out_proj.bias")
            owners["out_proj.bias"] = (module.out_proj, "bias")
    return Case(
        module, tensors, call=call, run=run, cotangents=cotangents, names=names,
        grad_output=lambda cots: tuple(cots), split=split, owners=owners,
        shared=(4,) if attn_mask == "shared" else (),
    )


MHA_CASES = {
    "self": dict(),
    "self_seq_first": dict(batch_first=False),
    "self_no_weights": dict(need_weights=False),
    "self_per_head_weights": dict(average=False),
    "cross": dict(self_attention=False),
    "cross_seq_first": dict(self_attention=False, batch_first=False),
    "cross_key_padding": dict(self_attention=False, key_padding_mask=True),
    "cross_key_padding_no_weights": dict(self_attention=False, key_padding_mask=True, need_weights=False),
    "cross_shared_mask": dict(self_attention=False, attn_mask="shared"),
    "cross_per_sample_mask": dict(self_attention=False, attn_mask="per_sample", key_padding_mask=True),
    "cross_per_sample_mask_torch_layout": dict(self_attention=False, attn_mask="per_sample", mask_as_torch=True),
    "kdim_vdim": dict(self_attention=False, kdim=5, vdim=3),
    "kdim_vdim_seq_first_masks": dict(
        self_attention=False, kdim=5, vdim=3, batch_first=False, key_padding_mask=True, average=False
    ),
    "no_bias": dict(self_attention=False, bias=False),
    "bias_kv": dict(self_attention=False, add_bias_kv=True, key_padding_mask=True, attn_mask="shared"),
    "zero_attn": dict(self_attention=False, add_zero_attn=True, key_padding_mask=True),
    "bias_kv_zero_attn_per_sample_mask": dict(
        self_attention=False, add_bias_kv=True, add_zero_attn=True, attn_mask="per_sample", need_weights=False
    ),
    "causal": dict(attn_mask="shared", is_causal=True, need_weights=False),
    "causal_weights": dict(attn_mask="shared", is_causal=True),
}


@pytest.mark.parametrize("kind", sorted(MHA_CASES))
def test_multihead_attention_matches_naive(kind):
    case = mha_case(**MHA_CASES[kind])
    grads = check_first_order(case)
    for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"):
        if name in grads:
            assert isinstance(grads[name], LowRankGrad)


def test_multihead_attention_self_attention_on_one_tensor_has_one_right_factor():
    grads = rule_grads(mha_case())
    assert grads["in_proj_weight"].factor_shape[:2] == (1, 3 * E)
    grads = rule_grads(mha_case(self_attention=False))
    assert grads["in_proj_weight"].factor_shape[:3] == (3, E, S)  # positions padded to the longer sequence


def test_multihead_attention_gives_only_what_is_asked():
    case = mha_case(self_attention=False)
    rule = find_rule(case.module, "in_proj_weight")
    grads = rule(case.module, case.call(case.tensors), case.grad_output(case.cotangents), frozenset(["in_proj_bias"]))
    assert set(grads) == {"in_proj_bias"}
    grads = rule(case.module, case.call(case.tensors), case.cotangents[0], frozenset(["in_proj_weight"]))
    assert set(grads) == {"in_proj_weight"}  # the output gradient alone: no gradient at the weights


def test_multihead_attention_registration():
    module = nn.MultiheadAttention(E, HEADS)
    assert default_params(module) == frozenset(attention._IN_PROJ)
    for name in ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v", "q_proj_weight"):
        assert find_rule(module, name) is not None
    assert find_rule(module.out_proj, "weight") is not None  # the Linear rule (never called: MHA reads it)


def test_multihead_attention_refuses_dropout_in_training():
    case = mha_case()
    case.module.dropout = 0.1
    case.module.train()
    with pytest.raises(ValueError, match="dropout"):
        rule_grads(case)


def test_multihead_attention_inside_a_backward():
    """The engine calls a rule from inside the backward (grad mode off): the rule's own
    autograd.grad must work there."""
    case = mha_case(self_attention=False, key_padding_mask=True)
    expected = naive_grads(case)["in_proj_weight"]
    seen = {}

    class Tap(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen["grads"] = rule_grads(case)
            return grad

    x = torch.zeros(1, requires_grad=True)
    Tap.apply(x).sum().backward()
    assert rel_err(seen["grads"]["in_proj_weight"].materialize(0, B), expected) < 1e-10


SECOND_ORDER_MHA = {
    "self": dict(),
    "cross_masks_seq_first": dict(
        self_attention=False, key_padding_mask=True, attn_mask="per_sample", batch_first=False
    ),
    "kdim_vdim_bias_kv_zero_attn": dict(self_attention=False, kdim=5, vdim=3, add_bias_kv=True, add_zero_attn=True),
    "no_weights_causal": dict(attn_mask="shared", is_causal=True, need_weights=False),
}


@pytest.mark.parametrize("kind", sorted(SECOND_ORDER_MHA))
def test_multihead_attention_second_order(kind):
    case = mha_case(**SECOND_ORDER_MHA[kind])
    # in_proj_bias's key block is zero up to rounding (softmax ignores a shift of every key):
    # its |.| has no stable derivative, so only the weights (and bias_k, bias_v) are checked
    names = [n for n in case.names if n.endswith("weight") or n in ("bias_k", "bias_v")]
    check_second_order(case, names)


# -- Hugging Face ViTEmbeddings -------------------------------------------------------------------------------------


def vit_case(masked: bool = False, interpolate: bool = False, size: int = 8) -> Case:
    from transformers import ViTConfig
    from transformers.models.vit.modeling_vit import ViTEmbeddings

    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, hidden_size=6, num_channels=3)
    module = ViTEmbeddings(config, use_mask_token=True).double().eval()
    with torch.no_grad():
        module.mask_token.normal_()
    pixels = randn(B, 3, size, size, seed=1)
    bool_masked_pos = None
    if masked:
        bool_masked_pos = torch.zeros(B, (size // 4) ** 2, dtype=torch.bool)
        bool_masked_pos[0, 1] = bool_masked_pos[1, 0] = bool_masked_pos[2, :2] = bool_masked_pos[3, -1] = True
    tensors = [pixels, bool_masked_pos]

    def run(ts):
        return (module(ts[0], bool_masked_pos=ts[1], interpolate_pos_encoding=interpolate),)

    with torch.no_grad():
        out = run(tensors)[0]
    return Case(
        module, tensors,
        call=lambda ts: CallInputs((ts[0],), {"bool_masked_pos": ts[1], "interpolate_pos_encoding": interpolate}),
        run=run, cotangents=[randn(*out.shape, seed=2)], names=["cls_token", "position_embeddings", "mask_token"],
    )


@needs_transformers
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("interpolate", [False, True])
def test_vit_embeddings_match_naive(masked, interpolate):
    case = vit_case(masked, interpolate)
    if not masked:  # mask_token unused: a zero gradient (the check needs a nonzero reference)
        assert rule_grads(case)["mask_token"].materialize(0, B).abs().max() == 0
        case.names = ["cls_token", "position_embeddings"]
    check_first_order(case)
    assert default_params(case.module) == frozenset()
    assert find_rule(case.module, "cls_token").name == "vit_embeddings" and hf_vit.ViTEmbeddings is not None


@needs_transformers
def test_vit_embeddings_refuse_interpolation():
    case = vit_case(interpolate=True, size=12)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        rule_grads(case)


@needs_transformers
def test_vit_embeddings_second_order():
    check_second_order(vit_case(masked=True), ["cls_token", "position_embeddings", "mask_token"])


# -- end to end: the engine on tiny Hugging Face models ------------------------------------------------------------


class LastToken(nn.Module):
    """A language model as a classifier: the logits at the last position (from ids or embeddings)."""

    def __init__(self, lm: nn.Module, embeds: bool = False) -> None:
        super().__init__()
        self.lm = lm
        self.embeds = embeds

    def forward(self, x: Tensor) -> Tensor:
        out = self.lm(inputs_embeds=x) if self.embeds else self.lm(input_ids=x)
        return out.logits[:, -1]


def tiny_lm(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=13, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0,
            attn_implementation="eager",
        )
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        vocab_size=13, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=8, attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config)


def unit_values(model: nn.Module, name: str, grad: Tensor) -> Tensor:
    module_name, attr = name.rsplit(".", 1)
    module = model.get_submodule(module_name)
    grouping, _ = unit_grouping(module, attr, grad.shape)
    return grouping(grad.unsqueeze(0), module).abs().mean(-1)[0]


E2E_PARAMS = {
    "gpt2": [
        "lm.transformer.wte.weight", "lm.transformer.h.0.attn.c_attn.weight", "lm.transformer.h.0.attn.c_attn.bias",
        "lm.transformer.h.0.mlp.c_fc.weight", "lm.transformer.h.0.mlp.c_proj.weight", "lm.transformer.ln_f.weight",
    ],
    "llama": [
        "lm.model.embed_tokens.weight", "lm.model.layers.0.input_layernorm.weight",
        "lm.model.layers.0.self_attn.q_proj.weight", "lm.model.norm.weight", "lm.lm_head.weight",
    ],
}


@needs_transformers
@pytest.mark.parametrize("kind", sorted(E2E_PARAMS))
def test_engine_on_tiny_language_models(kind):
    """ParameterSaliency with the rules registered: every selected parameter by a rule (GPT-2's
    token embedding tied to its head: the two calls summed), equal to a naive loop."""
    from captum_paramsal import ParameterSaliency

    model = LastToken(tiny_lm(kind)).double().eval()
    ids = torch.randint(0, 13, (3, 5), generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 2, 3])
    ps = ParameterSaliency(model, params=E2E_PARAMS[kind])
    assert ps.routing(ids).fallback == ()
    got = ps.attribute(ids, target=target)
    names = list(ps.layout.names)
    params = [model.get_parameter(n) for n in names]
    rows = []
    for i in range(3):
        loss = nn.functional.cross_entropy(model(ids[i : i + 1]), target[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([unit_values(model, n, g) for n, g in zip(names, grads)]))
    assert rel_err(got, torch.stack(rows)) < 1e-10


@needs_transformers
def test_engine_input_saliency_through_conv1d_and_rms_norm():
    """ParameterGuidedInputSaliency (the second-order pass) on GPT-2 and Llama fed embeddings,
    with Conv1D and RMSNorm weights selected, against a naive double backward (LlamaRMSNorm computes
    in float32 whatever the model's dtype, so its derivatives carry float32 rounding: 1e-5 there)."""
    from captum_paramsal import ParameterGuidedInputSaliency

    for kind, names, tol in (
        ("gpt2", ["lm.transformer.h.0.attn.c_attn.weight", "lm.transformer.h.0.mlp.c_proj.weight",
                  "lm.transformer.ln_f.weight"], 1e-8),
        ("llama", ["lm.model.layers.0.input_layernorm.weight", "lm.model.layers.0.mlp.down_proj.weight"], 1e-5),
    ):
        model = LastToken(tiny_lm(kind), embeds=True).double().eval()
        x = randn(3, 5, 8, seed=4)
        target = torch.tensor([1, 2, 3])
        k = 3
        got = ParameterGuidedInputSaliency(model, params=names, k=k).attribute(x, target=target)
        params = [model.get_parameter(n) for n in names]
        rows = []
        for i in range(3):
            xi = x[i : i + 1].clone().requires_grad_()
            loss = nn.functional.cross_entropy(model(xi), target[i : i + 1])
            grads = torch.autograd.grad(loss, params, create_graph=True)
            s = torch.cat([unit_values(model, n, g) for n, g in zip(names, grads)])
            b = s.detach().clone()
            top = b.topk(k).indices
            b[top] = b[top] * 100.0
            rows.append(torch.autograd.grad(nn.functional.cosine_similarity(s, b, dim=0), xi)[0])
        assert rel_err(got, torch.cat(rows)) < tol, kind


def test_without_transformers_the_hf_rule_files_register_nothing():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from captum_paramsal.per_sample import registry\n"
        "before = (len(registry._RULES), len(registry._UNITS))\n"
        "from captum_paramsal.per_sample.rules import hf_conv1d, hf_norms, hf_vit\n"
        "assert hf_conv1d.Conv1D is None and hf_norms.LlamaRMSNorm is None and hf_vit.ViTEmbeddings is None\n"
        "assert (len(registry._RULES), len(registry._UNITS)) == before\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
