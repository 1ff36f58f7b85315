"""torch's attention through the whole engine: torchvision's ViT and TransformerEncoder layers
(sequence first or batch first, a shared causal mask, a per-sample key padding mask), with
MultiheadAttention's in-projection and out_proj by its rule, in the default selection, exact
against the naive loop in both passes."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import Tensor, nn

from captum_paramsal import ParameterGuidedInputSaliency, ParameterSaliency

from naive import default_param_names, naive_unit_saliency, rel_err


def _vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=24, num_classes=5
    ).double().eval()
    with torch.no_grad():  # torchvision starts the head (and the position embedding) at zero:
        for name, param in model.named_parameters():  # every gradient but the head's would vanish
            if name.startswith(("heads.", "encoder.pos_embedding", "class_token")):
                param.normal_(0.0, 0.5)
    return model


class Encoder(nn.Module):
    """Two encoder layers over token embeddings, with a shared causal mask and each sample's
    padding mask; the classifier reads the mean of the real positions."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        steps = x.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(steps, dtype=x.dtype)
        h = self.emb(x)
        h = h if self.batch_first else h.transpose(0, 1)
        h = self.enc(h, mask=causal, src_key_padding_mask=padding)
        h = h if self.batch_first else h.transpose(0, 1)
        keep = (~padding).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


def test_vit_attention_weights_by_their_rule():
    model = _vit()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([0, 3, 4])
    ps = ParameterSaliency(model)
    names = list(ps.layout.names)
    assert set(names) == set(default_param_names(model)) | {n for n, _ in model.named_parameters()
                                                            if n.endswith("out_proj.weight")}
    assert any(n.endswith("in_proj_weight") for n in names) and any(n.endswith("out_proj.weight") for n in names)
    report = ps.routing(x)
    assert report.fallback == ()
    assert {row.rule for row in report if "self_attention" in row.parameter} == {"multihead_attention"}
    assert rel_err(ps.attribute(x, target=y), naive_unit_saliency(model, (x,), y, names)) < 1e-10


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
def test_encoder_with_shared_and_per_sample_masks(batch_first):
    torch.manual_seed(0)
    model = Encoder(batch_first).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 4, generator=g, dtype=torch.float64)
    padding = torch.zeros(4, 5, dtype=torch.bool)
    padding[0, 3:] = True
    padding[2, 4:] = True
    y = torch.randint(0, 3, (4,), generator=g)
    names = [n for n, _ in model.named_parameters()]
    ps = ParameterSaliency(model, params=names)
    report = ps.routing(x, additional_forward_args=(padding,))
    attention = [row for row in report if ".self_attn." in row.parameter]
    assert attention and all(row.rule == "multihead_attention" for row in attention), str(report)
    assert report.fallback == (), str(report)  # sequence first too: position-wise layers move their batch
    got = ps.attribute(x, target=y, additional_forward_args=(padding,), internal_batch_size=3)
    expected = naive_unit_saliency(model, (x,), y, names, additional_forward_args=(padding,))
    assert rel_err(got, expected) < 1e-10


def test_vit_input_saliency_through_attention():
    """ViT's attention runs a fused kernel without a second derivative; the input saliency
    (and this naive reference) run the math kernel."""
    from test_engine_shape import naive_boosting
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _vit()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([1, 2])
    pgis = ParameterGuidedInputSaliency(model, k=4)
    with sdpa_kernel([SDPBackend.MATH]):
        expected = naive_boosting(model, x, y, list(pgis.layout.names), 4, "mean_abs")
    assert rel_err(pgis.attribute(x, target=y), expected) < 1e-8
