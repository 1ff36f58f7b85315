"""Recurrent models through the whole engine: RNN, GRU and LSTM weights selected by default,
computed by their rules (no fallback), exact against the naive loop, batch-first and
sequence-first, in both passes, and the model left as found."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from captum_paramsal import ParameterGuidedInputSaliency, ParameterSaliency

from helpers import assert_unchanged, snapshot
from naive import naive_unit_saliency, rel_err

LAYERS = {
    "rnn": lambda batch_first: nn.RNN(4, 5, num_layers=2, batch_first=batch_first, nonlinearity="relu"),
    "gru": lambda batch_first: nn.GRU(4, 5, bidirectional=True, batch_first=batch_first),
    "lstm": lambda batch_first: nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3, batch_first=batch_first),
}


class Classifier(nn.Module):
    """A recurrent encoder whose last output and final hidden state both reach the loss."""

    def __init__(self, kind: str, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rnn = LAYERS[kind](batch_first)
        out = self.rnn.hidden_size if getattr(self.rnn, "proj_size", 0) == 0 else self.rnn.proj_size
        out *= 2 if self.rnn.bidirectional else 1
        self.head = nn.Linear(out + (self.rnn.proj_size or self.rnn.hidden_size), 3)

    def forward(self, x: Tensor) -> Tensor:
        seq = x if self.batch_first else x.transpose(0, 1)
        output, state = self.rnn(seq)
        h_n = state[0] if isinstance(state, tuple) else state
        last = output[:, -1] if self.batch_first else output[-1]
        return self.head(torch.cat([last, h_n[-1]], dim=1))


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_recurrent_models_by_their_rules(kind, batch_first):
    torch.manual_seed(0)
    model = Classifier(kind, batch_first).double()
    x = torch.randn(5, 7, 4, dtype=torch.float64)  # 7 steps: T != B, so a wrong batch dim shows
    y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(1))
    names = [n for n, _ in model.named_parameters()]
    ps = ParameterSaliency(model, params=names)
    assert ps.routing(x).fallback == ()
    default = ParameterSaliency(model)
    assert {n for n in default.layout.names if n.startswith("rnn.")} == {
        n for n in names if n.startswith("rnn.weight_")
    }
    before = snapshot(model)
    got = ps.attribute(x, target=y, internal_batch_size=3)
    assert_unchanged(model, before)
    assert rel_err(got, naive_unit_saliency(model, (x,), y, names)) < 1e-10
    rms = ParameterSaliency(model, params=names, reduction="rms").attribute(x, target=y)
    assert rel_err(rms, naive_unit_saliency(model, (x,), y, names, reduction="rms")) < 1e-10


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_recurrent_models_in_the_input_saliency(kind):
    from test_engine_shape import naive_boosting

    torch.manual_seed(0)
    model = Classifier(kind, batch_first=False).double().eval()
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (3,), generator=torch.Generator().manual_seed(1))
    pgis = ParameterGuidedInputSaliency(model, k=3)
    names = list(pgis.layout.names)
    assert rel_err(pgis.attribute(x, target=y), naive_boosting(model, x, y, names, 3, "mean_abs")) < 1e-8
