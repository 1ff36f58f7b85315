"""input_saliency_check (the paper's sanity check of filter boosting, quantitative) against plain
computations: Spearman by hand, object shares by hand, a deletion curve by a plain loop, z of the
top units by a naive recomputation; the trojan digits' masks; the experiment's quick run."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn as nn
from matplotlib.figure import Figure

from captum_paramsal import ParameterGuidedInputSaliency, ParameterSaliency
from captum_paramsal.analysis.input_saliency_check import (
    CURVES,
    ORDERS,
    InputSaliencyCheck,
    average_ranks,
    input_saliency_check,
    spearman_rows,
)

from helpers import assert_unchanged, small_cnn, snapshot
from naive import naive_boosting, naive_unit_saliency, rel_err


def bn_cnn(seed: int = 0) -> nn.Module:
    """Two convolutions with BatchNorm (running statistics set away from 0/1) and a Linear
    layer on ``(B, 2, 6, 6)``, float64, four classes."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 4),
    ).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model


CASES = {
    "small_cnn": (small_cnn, (1, 8, 8), 5),
    "bn_cnn": (bn_cnn, (2, 6, 6), 4),
}


def setup_case(name: str, n: int = 5):
    make, shape, classes = CASES[name]
    model = make()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    ps = ParameterSaliency(model)
    reference = [
        (torch.randn(8, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (8,), generator=g))
        for _ in range(2)
    ]
    ps.stats = ps.fit_stats(reference, progress=False)
    masks = torch.rand(n, *shape[1:], generator=g) < 0.3
    masks[:, 0, 0] = True  # none empty
    return model, ps, x, y, masks


def naive_z(model, ps, x, y):
    s = naive_unit_saliency(model, (x,), y, list(ps.layout.names))
    return (s - ps.stats.mean) / ps.stats.scale


def hand_ranks(v: torch.Tensor) -> list:
    """1-based ranks by a plain loop, tied values sharing their average rank (a map's pixels
    that no path reaches are tied at 0)."""
    values = v.tolist()
    return [1 + sum(u < w for u in values) + (sum(u == w for u in values) - 1) / 2 for w in values]


def hand_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman by hand: the Pearson correlation of the two vectors' ranks."""
    ra, rb = np.array(hand_ranks(a)), np.array(hand_ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra**2).sum() * (rb**2).sum()))


def pixel_scores(m: torch.Tensor) -> torch.Tensor:
    return m.abs().sum(1).flatten(1)


@pytest.mark.parametrize("case", list(CASES))
def test_every_measure_against_plain_computations(case):
    model, ps, x, y, masks = setup_case(case)
    if case == "bn_cnn":
        model.train()  # left in training mode: the check must run in eval and put it back
        baseline = torch.tensor([0.25, -0.5], dtype=torch.float64)[:, None, None]
    else:
        baseline = 0.0
    pgis = ParameterGuidedInputSaliency.from_parameter_saliency(ps, k=3)
    before = snapshot(model)
    rng = torch.get_rng_state()
    steps = 4
    check = input_saliency_check(pgis, x, y, random_draws=3, object_masks=masks, nt_samples=1, stdevs=0.0,
                                 deletion_steps=steps, baseline=baseline, seed=5, resamples=200)
    assert_unchanged(model, before)
    assert torch.equal(rng, torch.get_rng_state())  # the global random state is left alone
    assert isinstance(check, InputSaliencyCheck) and check.num_samples == len(y)

    names = list(ps.layout.names)
    n, pixels = x.shape[0], x[0, 0].numel()
    # units: the top-k of the naive z; random units are k others
    z = naive_z(model, ps, x, y)
    assert torch.equal(check.top_units.sort(1).values, z.topk(3, dim=1).indices.sort(1).values)
    for i in range(n):
        for d in range(3):
            chosen = set(check.random_units[i, d].tolist())
            assert len(chosen) == 3 and not chosen & set(check.top_units[i].tolist())
    assert torch.allclose(check.per_sample["z_topk"], z.gather(1, check.top_units).mean(1))

    # maps (no noise): the naive double-backprop loop with the same units, and a plain input gradient
    top_map = naive_boosting(model, x, y, names, k=3, stats=ps.stats, units=check.top_units.tolist())
    assert rel_err(check.scores["top-k"], pixel_scores(top_map)) < 1e-6
    random_maps = [naive_boosting(model, x, y, names, k=3, stats=ps.stats, units=check.random_units[:, d].tolist())
                   for d in range(3)]
    for d in range(3):
        assert rel_err(check.scores["random-unit"][:, d], pixel_scores(random_maps[d])) < 1e-6
    model.eval()
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    grad = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), xg)[0]
    assert rel_err(check.scores["Saliency"], pixel_scores(grad)) < 1e-10

    # Spearman by hand, magnitude, object share by hand
    t, r, s = check.scores["top-k"], check.scores["random-unit"], check.scores["Saliency"]
    for i in range(n):
        topk_random = np.mean([hand_spearman(t[i], r[i, d]) for d in range(3)])
        random_random = np.mean([hand_spearman(r[i, a], r[i, b]) for a, b in ((0, 1), (0, 2), (1, 2))])
        assert check.per_sample["spearman_topk_random"][i] == pytest.approx(topk_random, abs=1e-12)
        assert check.per_sample["spearman_random_random"][i] == pytest.approx(random_random, abs=1e-12)
        assert check.per_sample["spearman_topk_saliency"][i] == pytest.approx(hand_spearman(t[i], s[i]), abs=1e-12)
        ratio = float(top_map[i].norm() / np.mean([float(m[i].norm()) for m in random_maps]))
        assert check.per_sample["magnitude_ratio"][i] == pytest.approx(ratio, rel=1e-6)
        on = masks[i].flatten()
        assert check.per_sample["share_topk"][i] == pytest.approx(float(t[i][on].sum() / t[i].sum()), rel=1e-12)
        assert check.per_sample["share_saliency"][i] == pytest.approx(float(s[i][on].sum() / s[i].sum()), rel=1e-12)
        shares = [float(r[i, d][on].sum() / r[i, d].sum()) for d in range(3)]
        assert check.per_sample["share_random"][i] == pytest.approx(np.mean(shares), rel=1e-12)
        assert check.per_sample["area"][i] == pytest.approx(float(on.double().mean()))

    # a deletion curve by hand for one sample: a plain loop over the steps and the pixels
    i = 1
    with torch.no_grad():
        predicted = int(model(x[i : i + 1]).argmax())
    fill = torch.broadcast_to(torch.as_tensor(baseline, dtype=x.dtype), x.shape[1:])
    for order_name, score in (("top-k", t[i]), ("random-unit", r[i, 0]), ("Saliency", s[i])):
        order = sorted(range(pixels), key=lambda p: (-float(score[p]), p))
        p_curve, z_curve, changed = [], [], []
        for j in range(steps + 1):
            count = round(j / steps * pixels)
            image = x[i].clone()
            for p in order[:count]:
                row, col = divmod(p, x.shape[3])
                image[:, row, col] = fill[:, row, col]
            with torch.no_grad():
                prob = torch.softmax(model(image[None]), -1)[0]
            p_curve.append(float(prob[predicted]))
            changed.append(float(int(prob.argmax()) != predicted))
            z_curve.append(float(naive_z(model, ps, image[None], y[i : i + 1])[0, check.top_units[i]].mean()))
        assert np.allclose(check.curves["p"][order_name][i].numpy(), p_curve, rtol=1e-9, atol=1e-12)
        assert np.allclose(check.curves["z"][order_name][i].numpy(), z_curve, rtol=1e-6, atol=1e-9)
        assert check.curves["changed"][order_name][i].tolist() == changed
        fractions = np.linspace(0, 1, steps + 1)
        area = np.sum((np.array(p_curve[1:]) + np.array(p_curve[:-1])) / 2 * np.diff(fractions))
        assert check.per_sample[f"auc_p/{order_name}"][i] == pytest.approx(area, rel=1e-9)
        zn = np.array(z_curve) / z_curve[0]
        area_z = np.sum((zn[1:] + zn[:-1]) / 2 * np.diff(fractions))
        if z_curve[0] > 0:
            assert check.per_sample[f"auc_z/{order_name}"][i] == pytest.approx(area_z, rel=1e-6)
    # every order starts at the clean input and ends at the all-baseline image
    for curve in CURVES:
        first = check.curves[curve]["top-k"][:, 0]
        last = check.curves[curve]["top-k"][:, -1]
        for order_name in ORDERS:
            assert torch.allclose(check.curves[curve][order_name][:, 0], first)
            assert torch.allclose(check.curves[curve][order_name][:, -1], last)
    assert torch.allclose(check.curves["z"]["top-k"][:, 0], check.per_sample["z_topk"], rtol=1e-6)

    # summary: bootstrap Estimates of the per-sample values; the paired differences pair samples
    summary = check.summary
    e = summary["object share: top-k - random-unit"]
    diff = check.per_sample["share_topk"] - check.per_sample["share_random"]
    assert e.n == n and e.value == pytest.approx(float(diff.mean())) and e.low <= e.value <= e.high
    geometric = float(check.per_sample["magnitude_ratio"].log().mean().exp())
    assert summary["magnitude ratio top-k / random-unit"].value == pytest.approx(geometric)
    text = check.to_markdown()
    assert "spearman: top-k vs random-unit" in text and "deletion p: top-k - random pixels" in text
    fig = check.plot(examples=2)
    assert isinstance(fig, Figure)


def test_noise_is_shared_and_units_fixed():
    """Under NoiseTunnel: the top-k map is the mean over the noisy copies of boosting the clean
    input's top-k units (the same noise draws as Saliency's), drawn from a seeded global stream
    that is put back afterwards."""
    model, ps, x, y, _ = setup_case("small_cnn", n=3)
    pgis = ParameterGuidedInputSaliency.from_parameter_saliency(ps, k=2)
    nt, stdev, seed = 3, 0.2, 11
    check = input_saliency_check(pgis, x, y, random_draws=2, nt_samples=nt, stdevs=stdev, deletion_steps=2,
                                 seed=seed, resamples=100)
    torch.manual_seed(seed)  # NoiseTunnel: torch.normal on the inputs repeated sample by sample
    noise = torch.normal(0, torch.tensor(stdev).repeat((x.shape[0] * nt,) + x.shape[1:]))
    noisy = x.repeat_interleave(nt, 0) + noise
    units = check.top_units.repeat_interleave(nt, 0).tolist()
    per_copy = naive_boosting(model, noisy, y.repeat_interleave(nt), list(ps.layout.names), k=2, stats=ps.stats,
                              units=units)
    smoothed = per_copy.reshape(x.shape[0], nt, *x.shape[1:]).mean(1)
    assert rel_err(check.scores["top-k"], pixel_scores(smoothed)) < 1e-6
    xg = noisy.clone().requires_grad_(True)
    grad = torch.autograd.grad(model(xg).gather(1, y.repeat_interleave(nt)[:, None]).sum(), xg)[0]
    assert rel_err(check.scores["Saliency"], pixel_scores(grad.reshape(x.shape[0], nt, *x.shape[1:]).mean(1))) < 1e-9


def test_spearman_and_ranks_with_ties():
    from scipy.stats import rankdata, spearmanr

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (3, 12), generator=g).double()  # many ties
    b = torch.randint(0, 5, (3, 12), generator=g).double()
    assert np.allclose(average_ranks(a).numpy(), rankdata(a.numpy(), axis=1))
    ours = spearman_rows(a, b)
    for i in range(3):
        assert float(ours[i]) == pytest.approx(spearmanr(a[i].numpy(), b[i].numpy()).statistic, abs=1e-12)
    assert torch.isnan(spearman_rows(torch.ones(1, 5), torch.arange(5.0)[None]))[0]
    with pytest.raises(ValueError, match=r"\(N, P\)"):
        spearman_rows(torch.ones(5), torch.ones(5))


def test_errors():
    model, ps, x, y, masks = setup_case("small_cnn", n=3)
    pgis = ParameterGuidedInputSaliency.from_parameter_saliency(ps, k=2)

    def run(**kwargs):
        args = {"inputs": x, "labels": y, "nt_samples": 1, "stdevs": 0.0, "deletion_steps": 1, "random_draws": 2}
        args.update(kwargs)
        return input_saliency_check(pgis, args.pop("inputs"), args.pop("labels"), **args)

    with pytest.raises(ValueError, match="object_masks must be"):
        run(object_masks=masks[:2])
    with pytest.raises(ValueError, match="object_masks must be"):
        run(object_masks=masks[:, :4])
    with pytest.raises(ValueError, match="boolean"):
        run(object_masks=masks.double() * 0.5)
    empty = masks.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"samples \[1\] are empty"):
        run(object_masks=empty)
    with pytest.raises(TypeError, match="object_masks must be a Tensor"):
        run(object_masks=masks.tolist())
    run(object_masks=masks[:, None].long())  # (N, 1, H, W) of 0/1 is accepted
    with pytest.raises(ValueError, match="one label per input"):
        run(labels=y[:2])
    with pytest.raises(TypeError, match="integer class labels"):
        run(labels=y.double())
    with pytest.raises(TypeError, match="floating-point Tensor"):
        run(inputs=(x,))
    with pytest.raises(TypeError, match="floating-point Tensor"):
        run(inputs=x[:, 0, 0])
    with pytest.raises(ValueError, match="k must be"):
        run(k=ps.layout.num_columns)
    with pytest.raises(ValueError, match="random_draws"):
        run(random_draws=1)
    with pytest.raises(ValueError, match="deletion_steps"):
        run(deletion_steps=0)
    with pytest.raises(ValueError, match="stdevs"):
        run(stdevs=-1.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        run(baseline=torch.zeros(3, 1, 1))
    with pytest.raises(TypeError, match="baseline"):
        run(baseline="zero")
    with pytest.raises(TypeError, match="ParameterGuidedInputSaliency"):
        input_saliency_check(ps, x, y)
    layered = ParameterGuidedInputSaliency(model, k=2, layer=model[0])
    with pytest.raises(ValueError, match="layer"):
        input_saliency_check(layered, x, y)


# -- the trojan digits' masks ------------------------------------------------------------------

# sha256 of the default data set's tensors, computed before the digit masks were added: the
# shipped ResNet-20 was trained on exactly these images
TROJAN_HASHES = {
    "train_images": "ebd0850b35061137511adaafc5225c934d13bd648d2a0dbcc87fa39ca658d458",
    "test_images": "1099c9386e75484eafc1fa37b7ef04e6a90403ace2a0f995d14881ea4f738724",
    "train_labels": "b1b314f15479a5d1b93c003afd5c97d1d75220d38916c255b4f8f36d3b879c7c",
    "test_labels": "6e4984b7ba5984630e319e705690a1eba438b8b0ad2d7e92f54bdb4154ef1db2",
    "train_trigger": "07b15740d83f6d5b56829475c4b1325d4caa06a85500665220cb485f1a86bdc3",
}


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def test_trojan_digits_images_unchanged_and_masks():
    from captum_paramsal.zoo.trojan_digits import DIGIT_MASK_THRESHOLD, trojan_digits_data

    data = trojan_digits_data()
    for name, expected in TROJAN_HASHES.items():
        assert _sha(getattr(data, name)) == expected, f"{name} changed: the shipped model was trained on other data"
    x, mask, target, label = data.triggered_test(0)  # still four values
    assert _sha(x) == "50648c615014fa987b90f123097ad26add081a158f673f3d5864a5affc92d700"
    masks = data.test_masks
    assert masks.shape == (len(data.test_labels), 32, 32) and masks.dtype == torch.bool
    assert torch.equal(masks, data.test_alpha > DIGIT_MASK_THRESHOLD)
    assert bool(masks.flatten(1).any(1).all())  # every test image has a digit
    assert torch.equal(data.digit_masks(0.0), data.test_alpha > 0)
    with pytest.raises(ValueError, match="threshold"):
        data.digit_masks(1.0)


def test_composite_alpha_leaves_images_and_stream():
    from captum_paramsal.zoo.trojan_digits import TrojanDigitsSetup, composite

    digits = torch.rand(7, 8, 8, generator=torch.Generator().manual_seed(0))
    setup = TrojanDigitsSetup()
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    images, pick = composite(digits, 5, setup, g1)
    images2, pick2, alpha = composite(digits, 5, setup, g2, return_alpha=True)
    assert torch.equal(images, images2) and torch.equal(pick, pick2)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # the stream is where it was
    assert alpha.shape == (5, 32, 32) and float(alpha.min()) >= 0 and float(alpha.max()) <= 1


# -- the experiment ----------------------------------------------------------------------------


@pytest.mark.slow
def test_experiment_quick(tmp_path):
    from captum_paramsal.experiments import pgis_check

    assert pgis_check.main(["--quick", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- begin: pgis check quick -->" in text and "### Verdicts" in text
    for key in ("digits_wrong", "resnet20_wrong"):
        assert (tmp_path / "figures" / f"pgis_check_{key}_quick.png").is_file()
    for verdict_row in ("pixel order", "magnitude", "point at the object"):
        assert verdict_row in text
