"""ParameterSaliency against the naive per-sample loop (SPEC §1), in float64.

Every case measures the relative error max|a - b| / max|b| per parameter (each layout
entry against its own scale) and over the whole profile, and requires < 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from captum_paramsal import ParameterSaliency

from helpers import seeded_resnet18
from naive import blockwise_rel_err, default_param_names, naive_unit_saliency, rel_err

TOL = 1e-5


# ---------------------------------------------------------------------------------------
# helpers


def check(
    model,
    inputs,
    target,
    params=None,
    reduction="mean_abs",
    loss_fn=None,
    args=None,
    internal_batch_size=None,
    fallback_chunk_size=16,
):
    """Engine vs naive; returns the engine's (B, F) result."""
    ps = ParameterSaliency(
        model, params=params, loss_fn=loss_fn, reduction=reduction, fallback_chunk_size=fallback_chunk_size
    )
    got = ps.attribute(inputs, target=target, additional_forward_args=args, internal_batch_size=internal_batch_size)
    inputs_tuple = inputs if isinstance(inputs, tuple) else (inputs,)
    if isinstance(inputs, tuple):
        assert isinstance(got, tuple) and len(got) == 1
        got = got[0]
    else:
        assert isinstance(got, torch.Tensor)

    names = default_param_names(model) if params is None else [n for n, _ in model.named_parameters() if n in params]
    assert list(ps.layout.names) == names
    naive_args = () if args is None else args
    expected = naive_unit_saliency(model, inputs_tuple, target, names, reduction, loss_fn, naive_args)

    assert got.shape == expected.shape == (inputs_tuple[0].shape[0], ps.layout.num_columns)
    assert got.dtype == torch.float64
    assert torch.isfinite(got).all()
    assert rel_err(got, expected) < TOL
    worst, name = blockwise_rel_err(got, expected, ps.layout)
    assert worst < TOL, f"{name}: relative error {worst:.3e}"
    return got


def with_head(features: nn.Module, example: torch.Tensor, classes: int = 3) -> nn.Module:
    """``features -> flatten -> Linear(classes)``, sized for ``example``, in float64."""
    with torch.no_grad():
        width = features(example).flatten(1).shape[1]
    return nn.Sequential(features, nn.Flatten(), nn.Linear(width, classes)).double()


def labels(batch: int, classes: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed))


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------
# torchvision models


def test_resnet18():
    model = seeded_resnet18(num_classes=10)
    check(model, randn(2, 3, 32, 32), labels(2, 10))


@pytest.mark.parametrize("budget", [
    pytest.param(0, id="each_at_once", marks=pytest.mark.slow),  # resnet18 in float64: seconds each
    pytest.param(20_000, id="a_few_at_a_time"),
    pytest.param(1 << 40, id="all_after", marks=pytest.mark.slow),
])
@pytest.mark.parametrize("reduction", ["mean_abs", pytest.param("mean", marks=pytest.mark.slow)])
def test_rules_deferred_past_the_backward_in_any_batches(monkeypatch, budget, reduction):
    """On CPU the rules run after the backward in batches of layers up to a byte budget."""
    import captum_paramsal.per_sample.policy as policy

    monkeypatch.setattr(policy, "DEFERRED_BYTES", {"cpu": budget})
    model = seeded_resnet18(num_classes=10)
    check(model, randn(3, 3, 32, 32), labels(3, 10), reduction=reduction)
    check(ConvTwice().double(), randn(3, 3, 5, 5), labels(3), reduction=reduction)


@pytest.mark.slow
def test_mobilenet_v3_small():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10).double()
    check(model, randn(2, 3, 64, 64), labels(2, 10))


# ---------------------------------------------------------------------------------------
# convolutions

# (name, layer factory, input shape (without batch)). Spatial sizes give output-position
# counts both below and above the engine's im2col / weight-gradient-kernel switch.
CONV_CASES = [
    ("conv1d_stack_short", lambda: nn.Sequential(
        nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 6, 5, stride=2, dilation=2)), (3, 20)),
    ("conv1d_stack_long", lambda: nn.Sequential(
        nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 6, 5, stride=2, dilation=2)), (3, 150)),
    ("conv3d_stack_small", lambda: nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 2, stride=2, groups=2)), (2, 4, 4, 4)),
    ("conv3d_stack_large", lambda: nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1, dilation=1), nn.ReLU(),
        nn.Conv3d(4, 4, (2, 3, 1), stride=(2, 1, 1), dilation=(1, 2, 1), groups=2)), (2, 6, 6, 6)),
    ("conv3d_same_circular", lambda: nn.Sequential(
        nn.Conv3d(2, 4, 2, padding="same"), nn.ReLU(),
        nn.Conv3d(4, 3, 3, padding=1, padding_mode="circular")), (2, 5, 5, 5)),
]
for size in (5, 12):
    CONV_CASES += [
        (f"grouped_{size}", lambda: nn.Conv2d(4, 6, 3, groups=2), (4, size, size)),
        (f"depthwise_{size}", lambda: nn.Sequential(
            nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, groups=4)), (4, size, size)),
        (f"dilated_{size}", lambda: nn.Conv2d(3, 5, 3, dilation=2), (3, size, size)),
        (f"same_odd_{size}", lambda: nn.Conv2d(3, 5, 3, padding="same"), (3, size, size)),
        (f"same_even_{size}", lambda: nn.Conv2d(3, 5, 4, padding="same"), (3, size, size)),
        (f"same_even_dilated_{size}", lambda: nn.Conv2d(3, 5, (2, 3), padding="same", dilation=(1, 2)),
         (3, size, size)),
        (f"reflect_{size}", lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), (3, size, size)),
        (f"circular_{size}", lambda: nn.Conv2d(3, 5, 3, padding=2, padding_mode="circular"), (3, size, size)),
        (f"stride2_pad1_{size}", lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), (3, size, size)),
        (f"pointwise_stride2_{size}", lambda: nn.Conv2d(3, 5, 1, stride=2), (3, size, size)),
        (f"pointwise_pad1_{size}", lambda: nn.Conv2d(3, 5, 1, padding=1), (3, size, size)),
        (f"rect_kernel_stride_{size}", lambda: nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=(1, 0)),
         (3, size, size)),
    ]
CONV_CASES += [
    ("conv1d_same_even_reflect", lambda: nn.Conv1d(3, 4, 4, padding="same", padding_mode="reflect"), (3, 9)),
    ("conv1d_grouped_circular", lambda: nn.Conv1d(4, 6, 3, groups=2, padding=1, padding_mode="circular"),
     (4, 80)),
]


@pytest.mark.parametrize("make, shape", [c[1:] for c in CONV_CASES], ids=[c[0] for c in CONV_CASES])
def test_conv(make, shape):
    torch.manual_seed(0)
    features = make().double()
    x = randn(2, *shape)
    check(with_head(features, x), x, labels(2))


TRANSPOSED_CASES = [
    ("t1d_groups_stride_outpad", lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1, groups=2), (4, 7)),
    ("t1d_long", lambda: nn.ConvTranspose1d(4, 6, 3, stride=1, padding=1, groups=2), (4, 70)),
    ("t2d_stride_pad_outpad", lambda: nn.ConvTranspose2d(3, 5, 3, stride=2, padding=1, output_padding=1), (3, 4, 4)),
    ("t2d_groups_dilation", lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, dilation=2), (4, 4, 5)),
    ("t2d_groups_stride_dilation_outpad", lambda: nn.ConvTranspose2d(
        4, 2, 2, groups=2, stride=2, dilation=3, output_padding=2), (4, 3, 3)),
    ("t2d_groups_stride2_dilation2_outpad1", lambda: nn.ConvTranspose2d(
        4, 6, 3, groups=2, stride=2, dilation=2, padding=1, output_padding=1), (4, 3, 4)),
    # output_padding >= stride is legal when output_padding < dilation
    ("t1d_outpad_ge_stride", lambda: nn.ConvTranspose1d(2, 3, 3, stride=1, dilation=2, output_padding=1), (2, 4)),
    ("t2d_large", lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, stride=2, padding=1), (4, 10, 10)),
    ("t3d_groups_stride_outpad", lambda: nn.ConvTranspose3d(
        4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (4, 3, 3, 3)),
    ("t3d_dilation", lambda: nn.ConvTranspose3d(2, 3, 2, dilation=2), (2, 3, 3, 3)),
    ("t2d_stack", lambda: nn.Sequential(
        nn.ConvTranspose2d(3, 4, 2, stride=2), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(4, 6, 3, groups=2, stride=2, output_padding=1)), (3, 3, 3)),
]


@pytest.mark.parametrize("make, shape", [c[1:] for c in TRANSPOSED_CASES], ids=[c[0] for c in TRANSPOSED_CASES])
def test_conv_transpose(make, shape):
    torch.manual_seed(0)
    features = make().double()
    x = randn(2, *shape)
    check(with_head(features, x), x, labels(2))


def test_conv_transpose_units_are_output_channels():
    """The layout gives a ConvTranspose weight one unit per output channel."""
    torch.manual_seed(0)
    features = nn.ConvTranspose2d(4, 6, 3, groups=2).double()
    x = randn(2, 4, 3, 3)
    model = with_head(features, x)
    entry = ParameterSaliency(model).layout["0.weight"]
    assert entry.shape == (4, 3, 3, 3)
    assert entry.num_units == 6


# ---------------------------------------------------------------------------------------
# Linear, reuse, sharing


class SequenceLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):  # (B, T, D)
        return self.head(torch.tanh(self.proj(x)).mean(1))


def test_linear_over_sequences():
    torch.manual_seed(0)
    check(SequenceLinear().double(), randn(3, 4, 5), labels(3))


class LinearTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


class ConvTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 5 * 5, 3)

    def forward(self, x):
        return self.head(self.conv(F.relu(self.conv(x))).flatten(1))


@pytest.mark.parametrize("reduction", ["mean_abs", "mean"])
@pytest.mark.parametrize("make, shape", [(LinearTwice, (6,)), (ConvTwice, (3, 5, 5))], ids=["linear", "conv"])
def test_module_called_twice(make, shape, reduction):
    torch.manual_seed(0)
    check(make().double(), randn(3, *shape), labels(3), reduction=reduction)


class FunctionalReuse(nn.Module):
    """fc.weight is also used by F.linear outside fc."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(h + F.linear(h, self.fc.weight))


def test_weight_also_used_functionally():
    torch.manual_seed(0)
    check(FunctionalReuse().double(), randn(3, 6), labels(3))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc2.weight = self.fc1.weight
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def test_tied_weights():
    torch.manual_seed(0)
    model = Tied().double()
    got = check(model, randn(3, 6), labels(3))
    assert got.shape[1] == 6 + 3  # the shared weight appears once


def test_tied_weights_mean():
    torch.manual_seed(0)
    check(Tied().double(), randn(3, 6), labels(3), reduction="mean")


class TiedEmbeddingHead(nn.Module):
    """An embedding reused as the output projection (a language-model style tie)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.mix = nn.Linear(4, 4)
        self.out = nn.Linear(4, 5, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.emb(tokens).mean(1))))


def test_tied_embedding_and_output_projection():
    torch.manual_seed(0)
    model = TiedEmbeddingHead().double()
    tokens = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(1))
    check(model, tokens, labels(3, 5))
    check(model, tokens, labels(3, 5), params=["emb.weight", "mix.weight", "mix.bias"])


# ---------------------------------------------------------------------------------------
# transformer, norms, embeddings, biases (the fallback and mixed routing)


class EncoderClassifier(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: (B, T, 8) always
        if not self.batch_first:
            x = x.transpose(0, 1)
        h = self.enc(x)
        return self.head(h.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("seq_len", [3, 5], ids=["T_eq_B", "T_ne_B"])
def test_transformer_encoder_layer(batch_first, seq_len):
    torch.manual_seed(0)
    model = EncoderClassifier(batch_first).double()
    names = [n for n, _ in model.named_parameters()]
    check(model, randn(3, seq_len, 8), labels(3), params=names)


def test_transformer_encoder_layer_default_params_mean():
    torch.manual_seed(0)
    model = EncoderClassifier(False).double()
    check(model, randn(3, 3, 8), labels(3), reduction="mean")


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 3 * 3, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).flatten(1))


def test_batchnorm_params():
    torch.manual_seed(0)
    model = ConvBN().double()
    check(model, randn(3, 3, 5, 5), labels(3), params=["bn.weight", "bn.bias"])
    check(model, randn(3, 3, 5, 5), labels(3), params=["conv.weight", "bn.weight", "bn.bias", "head.weight"])


def test_batchnorm_params_train_mode_model_uses_eval():
    """A model in train mode is evaluated in eval mode (running statistics)."""
    torch.manual_seed(0)
    model = ConvBN().double().train()
    ps = ParameterSaliency(model, params=["conv.weight", "bn.weight", "bn.bias"])
    x, y = randn(3, 3, 5, 5), labels(3)
    got = ps.attribute(x, target=y)
    expected = naive_unit_saliency(model, (x,), y, ["conv.weight", "bn.weight", "bn.bias"])
    assert model.training
    assert rel_err(got, expected) < TOL


class EmbedNormClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):  # (B, T) integers
        return self.head(self.norm(self.emb(tokens)).mean(1))


def test_embedding_and_layernorm():
    torch.manual_seed(0)
    model = EmbedNormClassifier().double()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    tokens = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1))
    names = ["emb.weight", "norm.weight", "norm.bias", "head.weight", "head.bias"]
    got = check(model, tokens, labels(4), params=names)
    assert got.shape == (4, 11 + 6 + 6 + 3 + 3)


class ConvLinearBiases(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.convt = nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2)
        self.fc = nn.Linear(4 * 8 * 8, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.convt(F.relu(self.conv(x))))
        return self.head(torch.tanh(self.fc(h.flatten(1))))


@pytest.mark.parametrize("reduction", ["mean_abs", "mean"])
def test_conv_and_linear_biases(reduction):
    torch.manual_seed(0)
    model = ConvLinearBiases().double()
    names = [n for n, _ in model.named_parameters()]  # weights and biases
    check(model, randn(3, 2, 4, 4), labels(3), params=names, reduction=reduction)
    check(model, randn(3, 2, 4, 4), labels(3), params=["conv.bias", "convt.bias", "fc.bias"], reduction=reduction)


# ---------------------------------------------------------------------------------------
# reductions, targets, losses, arguments


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 5), nn.Tanh(), nn.Linear(5, 4),
    ).double()


def test_reduction_mean_cnn():
    check(small_cnn(), randn(3, 3, 7, 7), labels(3, 4), reduction="mean")


def test_reduction_mean_resnet18():
    model = seeded_resnet18(num_classes=10)
    check(model, randn(2, 3, 32, 32), labels(2, 10), reduction="mean")


def test_target_none_is_predicted_class():
    model = small_cnn()
    x = randn(4, 3, 7, 7)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    got = ParameterSaliency(model).attribute(x)
    names = default_param_names(model)
    assert rel_err(got, naive_unit_saliency(model, (x,), predicted, names)) < TOL
    assert rel_err(got, naive_unit_saliency(model, (x,), None, names)) < TOL


def test_target_int_and_list():
    model = small_cnn()
    x = randn(3, 3, 7, 7)
    names = default_param_names(model)
    ps = ParameterSaliency(model)
    expected = naive_unit_saliency(model, (x,), torch.tensor([2, 2, 2]), names)
    assert rel_err(ps.attribute(x, target=2), expected) < TOL
    expected = naive_unit_saliency(model, (x,), torch.tensor([0, 3, 1]), names)
    assert rel_err(ps.attribute(x, target=[0, 3, 1]), expected) < TOL


def mse_per_sample(outputs, target):
    return ((outputs - target) ** 2).mean(dim=1)


def test_custom_loss_fn():
    model = small_cnn()
    x = randn(3, 3, 7, 7)
    soft_target = randn(3, 4, seed=5)
    check(model, x, soft_target, loss_fn=mse_per_sample)
    check(model, x, soft_target, loss_fn=mse_per_sample, reduction="mean")


def test_custom_loss_fn_on_fallback_params():
    torch.manual_seed(0)
    model = EmbedNormClassifier().double()
    tokens = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    check(model, tokens, randn(3, 3, seed=5), params=["norm.weight", "head.weight"], loss_fn=mse_per_sample)


class WithArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x, per_sample, scale):
        return self.head(self.norm(torch.tanh(self.fc(x * per_sample))) * scale)


def test_additional_forward_args():
    torch.manual_seed(0)
    model = WithArgs().double()
    x, s = randn(4, 6), randn(4, 6, seed=3)
    names = ["fc.weight", "norm.weight", "head.weight"]
    got = check(model, x, labels(4), params=names, args=(s, 1.7))
    # the arguments matter: a different scalar gives a different result
    other = ParameterSaliency(model, params=names).attribute(x, target=labels(4), additional_forward_args=(s, 0.3))
    assert not torch.allclose(got, other)


def test_internal_batch_size():
    torch.manual_seed(0)
    model = EncoderClassifier(True).double()
    names = ["enc.linear1.weight", "enc.norm1.weight", "enc.self_attn.in_proj_weight", "head.weight"]
    x, y = randn(5, 4, 8), labels(5)
    full = check(model, x, y, params=names)
    for size in (1, 3):
        part = check(model, x, y, params=names, internal_batch_size=size)
        assert rel_err(part, full) < 1e-12


def test_internal_batch_size_with_additional_args():
    torch.manual_seed(0)
    model = WithArgs().double()
    x, s, y = randn(5, 6), randn(5, 6, seed=3), labels(5)
    names = ["fc.weight", "norm.weight", "head.weight"]
    full = check(model, x, y, params=names, args=(s, 1.7))
    for size in (1, 3):
        part = check(model, x, y, params=names, args=(s, 1.7), internal_batch_size=size)
        assert rel_err(part, full) < 1e-12


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(3 * 3 * 3 + 5, 3)

    def forward(self, image, vector):
        return self.head(torch.cat([F.relu(self.conv(image)).flatten(1), torch.tanh(self.fc(vector))], dim=1))


def test_tuple_inputs():
    torch.manual_seed(0)
    model = TwoInputs().double()
    check(model, (randn(3, 2, 5, 5), randn(3, 4, seed=1)), labels(3))


def test_fallback_chunk_size():
    torch.manual_seed(0)
    model = EmbedNormClassifier().double()
    tokens = torch.randint(0, 11, (5, 4), generator=torch.Generator().manual_seed(1))
    names = ["emb.weight", "norm.weight", "norm.bias", "head.weight"]
    one = check(model, tokens, labels(5), params=names, fallback_chunk_size=1)
    many = check(model, tokens, labels(5), params=names, fallback_chunk_size=16)
    two = check(model, tokens, labels(5), params=names, fallback_chunk_size=2)
    assert rel_err(one, many) < 1e-12
    assert rel_err(two, many) < 1e-12
