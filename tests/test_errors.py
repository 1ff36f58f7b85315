"""Bad inputs are refused with a message that names the problem."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from captum_paramsal import ParameterSaliency

from helpers import TiedLinears


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5)
    )


def inputs(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 5, 5, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("params", [None, ["1.weight"]], ids=["rules", "fallback"])
@pytest.mark.parametrize("bad", [5, 17, -1], ids=["num_classes", "far_above", "negative"])
def test_label_out_of_range(params, bad):
    ps = ParameterSaliency(make_model(), params=params)
    with pytest.raises(ValueError, match=rf"label {bad} is out of range.*5 classes"):
        ps.attribute(inputs(), target=torch.tensor([0, bad, 1]))
    with pytest.raises(ValueError, match=rf"label {bad} is out of range"):
        ps.attribute(inputs(), target=bad)


@pytest.mark.parametrize("target", [torch.tensor([0, 1]), [0, 1, 2, 3]], ids=["short_tensor", "long_list"])
def test_target_of_wrong_length(target):
    with pytest.raises(ValueError, match=r"target has \d entries for 3 samples"):
        ParameterSaliency(make_model()).attribute(inputs(), target=target)


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "inf"), (float("-inf"), "inf")])
def test_non_finite_inputs(value, word):
    x = inputs()
    x[1, 0, 2, 2] = value
    with pytest.raises(ValueError, match=rf"inputs\[0\] contains {word}"):
        ParameterSaliency(make_model()).attribute(x, target=0)


def test_non_finite_second_input():
    x = inputs()
    bad = torch.full((3, 2), float("nan"))
    with pytest.raises(ValueError, match=r"inputs\[1\] contains NaN"):
        ParameterSaliency(make_model()).attribute((x, bad), target=0)


def test_unknown_parameter_name():
    with pytest.raises(ValueError, match=r"no parameter named '4\.wieght'.*did you mean"):
        ParameterSaliency(make_model(), params=["0.weight", "4.wieght"])
    with pytest.raises(ValueError, match=r"no parameter named 'head\.weight'"):
        ParameterSaliency(make_model(), params=["head.weight"])


def test_parameter_listed_twice():
    with pytest.raises(ValueError, match=r"'0\.weight' is listed twice"):
        ParameterSaliency(make_model(), params=["0.weight", "4.weight", "0.weight"])


def test_tied_parameter_listed_under_both_names():
    with pytest.raises(ValueError, match=r"listed twice"):
        ParameterSaliency(TiedLinears(), params=["a.weight", "b.weight"])


def test_nothing_to_select():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten())
    with pytest.raises(ValueError, match=r"no Conv, ConvTranspose or Linear weight"):
        ParameterSaliency(model)
    with pytest.raises(ValueError, match=r"params= is empty"):
        ParameterSaliency(make_model(), params=[])


def test_model_without_parameters():
    with pytest.raises(ValueError, match=r"no Conv, ConvTranspose or Linear weight"):
        ParameterSaliency(nn.Sequential(nn.ReLU(), nn.Flatten()))


def test_inputs_on_another_device_than_the_model():
    ps = ParameterSaliency(make_model().to("meta"))
    with pytest.raises(ValueError, match=r"inputs\[0\] is on cpu but the model's parameters are on meta"):
        ps.attribute(inputs(), target=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inputs on another real device need CUDA")
def test_inputs_on_cuda_model_on_cpu():
    # (meta inputs cannot be used here: the NaN/inf check cannot read a meta tensor)
    ps = ParameterSaliency(make_model())
    with pytest.raises(ValueError, match=r"inputs\[0\] is on cuda:0 but the model's parameters are on cpu"):
        ps.attribute(inputs().to("cuda"), target=0)
    ps = ParameterSaliency(make_model().to("cuda"))
    with pytest.raises(ValueError, match=r"inputs\[0\] is on cpu but the model's parameters are on cuda:0"):
        ps.attribute(inputs(), target=0)


def test_additional_arg_on_another_device():
    class WithArg(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, s):
            return self.fc(x * s)

    ps = ParameterSaliency(WithArg())
    with pytest.raises(ValueError, match=r"additional_forward_args\[0\] is on meta"):
        ps.attribute(torch.randn(2, 3), target=0, additional_forward_args=torch.ones(2, 3, device="meta"))


def test_bogus_reduction():
    with pytest.raises(ValueError, match=r"reduction must be one of.*'bogus'"):
        ParameterSaliency(make_model(), reduction="bogus")


@pytest.mark.parametrize("size", [0, -2, 1.5])
def test_bad_internal_batch_size(size):
    with pytest.raises(ValueError, match=r"internal_batch_size must be a positive int"):
        ParameterSaliency(make_model()).attribute(inputs(), target=0, internal_batch_size=size)


@pytest.mark.parametrize("size", [0, -1])
def test_bad_fallback_chunk_size(size):
    with pytest.raises(ValueError, match=r"fallback_chunk_size must be a positive int"):
        ParameterSaliency(make_model(), fallback_chunk_size=size)


def scalar_loss(outputs, target):
    return nn.functional.cross_entropy(outputs, target)  # mean over the batch: one number


@pytest.mark.parametrize("params", [None, ["1.weight"]], ids=["rules", "fallback"])
def test_loss_fn_returning_a_scalar(params):
    ps = ParameterSaliency(make_model(), params=params, loss_fn=scalar_loss)
    with pytest.raises(ValueError, match=r"loss_fn must return one loss per sample, shape \(3,\); got \(\)"):
        ps.attribute(inputs(), target=torch.tensor([0, 1, 2]))


def test_inputs_with_different_batch_sizes():
    with pytest.raises(ValueError, match=r"share the batch size.*inputs\[0\] has 3.*inputs\[1\] has 2"):
        ParameterSaliency(make_model()).attribute((inputs(3), torch.randn(2, 4)), target=0)


def test_float_labels_with_default_loss():
    with pytest.raises(TypeError, match=r"class labels must be integers"):
        ParameterSaliency(make_model()).attribute(inputs(), target=torch.tensor([0.0, 1.0, 2.0]))


def test_inference_mode_is_refused():
    ps = ParameterSaliency(make_model())
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inference_mode"):
        ps.attribute(inputs(), target=0)
