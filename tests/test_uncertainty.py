"""The uncertainty maths (no Lightning, no Ray): entropy and mutual information, AURC, OOD metrics,
temperature fitting, reliability bins, and the ensemble's temperature."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

from hqde_lightning.ensemble import Ensemble
from hqde_lightning.uncertainty import (
    TEMPERATURE_RANGE,
    aurc,
    check_temperature,
    combine_log_probabilities,
    combine_probabilities,
    fit_temperature,
    log_mean_probs,
    mutual_information,
    ood_detection_metrics,
    predictive_entropy,
    reliability_bins,
    temper,
    uncertainty_decomposition,
)


def test_entropy_and_mutual_information_bounds():
    one_hot = torch.eye(4)
    agree = one_hot[[0, 0, 0]].unsqueeze(1)  # (3 members, 1 input, 4 classes), all sure of class 0
    disagree = one_hot[[0, 1, 2, 3]].unsqueeze(1)  # every member sure of another class
    assert float(mutual_information(agree)) == pytest.approx(0.0, abs=1e-6)
    assert float(mutual_information(disagree)) == pytest.approx(math.log(4), abs=1e-5)
    assert float(predictive_entropy(torch.full((4,), 0.25))) == pytest.approx(math.log(4))
    weighted = mutual_information(disagree[:2], torch.tensor([0.75, 0.25]))
    assert float(weighted) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_entropy_of_one_hot_low_precision_probabilities_is_exact(dtype):
    """0·log 0 = 0 in every dtype: float16 probabilities used to give NaN (a 1e-12 clamp rounds to 0 in float16)."""
    one_hot = torch.eye(3, dtype=dtype)
    members = one_hot[[0, 1]].unsqueeze(1)  # (2 members, 1 input, 3 classes), sure of different classes
    entropy, information = predictive_entropy(members[0]), mutual_information(members)
    assert entropy.dtype == information.dtype == torch.promote_types(dtype, torch.float32)
    assert torch.isfinite(entropy).all() and torch.isfinite(information).all()
    assert float(entropy) == 0.0
    assert float(information) == pytest.approx(math.log(2), abs=1e-6)
    assert float(mutual_information(members, torch.tensor([0.7, 0.3]))) == pytest.approx(-(0.7 * math.log(0.7) + 0.3 * math.log(0.3)), abs=1e-6)
    tiny = torch.tensor([1 - 2e-30, 1e-30, 1e-30], dtype=torch.float64)  # no clamp: exact for tiny probabilities
    assert float(predictive_entropy(tiny)) == pytest.approx(2e-30 * (1 + math.log(1e30)), rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weights", [None, [0.2, 0.3, 0.5]])
def test_low_precision_logits_combine_to_a_distribution(dtype, weights):
    """The member weights are not rounded to the logits' dtype: the ensemble's probabilities sum to 1
    (bfloat16 used to give 1.00195) and entropy − MI (the aleatoric part) is >= 0."""
    logits = torch.randn(3, 64, 10, generator=torch.Generator().manual_seed(0)).to(dtype)
    w = None if weights is None else torch.tensor(weights)
    eps = torch.finfo(torch.float32).eps
    _, log_probs = combine_log_probabilities(logits, w)
    assert log_probs.dtype == torch.float32
    assert (log_probs.exp().sum(-1) - 1).abs().max() <= 4 * eps
    parts = uncertainty_decomposition(logits, w)
    assert (parts["probs"].sum(-1) - 1).abs().max() <= 4 * eps
    assert (parts["entropy"] - parts["mutual_information"]).min() >= -1e-6
    reference = (torch.softmax(logits.double(), -1) * (torch.full((3,), 1 / 3) if w is None else w).double().view(-1, 1, 1)).sum(0)
    assert torch.allclose(parts["probs"].double(), reference, atol=1e-6)
    # two confident members that disagree, weighted 0.7 / 0.3: all the uncertainty is disagreement
    confident = torch.zeros(2, 1, 4)
    confident[0, 0, 0] = confident[1, 0, 1] = 50.0
    parts = uncertainty_decomposition(confident.to(dtype), torch.tensor([0.7, 0.3]))
    binary = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    assert float(parts["entropy"]) == pytest.approx(binary, abs=1e-6)
    assert float(parts["mutual_information"]) == pytest.approx(binary, abs=1e-6)
    assert float(parts["entropy"] - parts["mutual_information"]) >= -1e-6


def test_log_mean_probs_and_temperature():
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    weights = torch.tensor([0.5, 0.3, 0.2])
    expected = (torch.softmax(logits, -1) * weights.view(-1, 1, 1)).sum(0)
    assert torch.allclose(log_mean_probs(logits, weights).exp(), expected, atol=1e-6)
    member_probs, probs = combine_probabilities(logits, weights)
    assert torch.allclose(probs, expected, atol=1e-6) and torch.allclose(member_probs, torch.softmax(logits, -1))
    _, hot = combine_probabilities(logits, weights, temperature=2.0)
    assert torch.allclose(hot, torch.softmax(torch.log(expected) / 2.0, -1), atol=1e-6)
    assert torch.equal(hot.argmax(-1), expected.argmax(-1))  # the class never changes
    assert torch.equal(temper(expected.log(), 1), expected.log())
    for bad in (0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="temperature"):
            check_temperature(bad)


def _exact_minimum_aurc(n: int, errors: int) -> float:
    return sum((k - (n - errors)) / k for k in range(n - errors + 1, n + 1)) / n


def test_aurc_of_a_perfect_ranking_is_the_analytic_minimum():
    n, errors = 200, 30
    correct = torch.ones(n, dtype=torch.bool)
    correct[:errors] = False
    confidence = torch.where(correct, 0.9 + 0.1 * torch.rand(n), 0.5 * torch.rand(n))  # every error below every success
    perm = torch.randperm(n)
    value = float(aurc(confidence[perm], correct[perm]))
    assert value == pytest.approx(_exact_minimum_aurc(n, errors), abs=1e-12)
    e = errors / n
    assert value == pytest.approx(e + (1 - e) * math.log(1 - e), abs=0.01)  # the continuous limit
    worst = float(aurc(-confidence, correct))  # every error first
    assert worst > float(aurc(torch.rand(n), correct)) > value
    assert float(aurc(confidence, torch.ones(n))) == 0.0
    with pytest.raises(ValueError):
        aurc(torch.rand(3), torch.ones(4))


def test_ood_metrics_separable_and_identical_scores():
    inside = torch.rand(300) * 0.5
    outside = 1.0 + torch.rand(200) * 3.0  # above every in-distribution score, and outside [0, 1]
    separable = ood_detection_metrics(inside, outside)
    assert float(separable["auroc"]) == pytest.approx(1.0)
    assert float(separable["aupr"]) == pytest.approx(1.0)
    assert float(separable["fpr95"]) == pytest.approx(0.0)
    same = ood_detection_metrics(inside, inside.clone())
    assert float(same["auroc"]) == pytest.approx(0.5)
    assert float(same["fpr95"]) >= 0.9
    flipped = ood_detection_metrics(outside, inside)
    assert float(flipped["auroc"]) == pytest.approx(0.0) and float(flipped["fpr95"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="NaN"):
        ood_detection_metrics(torch.tensor([0.1, float("nan")]), inside)


def _overconfident(scale: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z) and logits z * scale: the true temperature is ``scale``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4000, 10, generator=g) * 2.0
    target = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    return z * scale, target


@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_fit_temperature_recovers_the_scale_and_lowers_the_nll(scale):
    logits, target = _overconfident(scale)
    t = fit_temperature(logits, target)
    assert t == pytest.approx(scale, rel=0.1)
    assert F.cross_entropy(logits / t, target) < F.cross_entropy(logits, target)


def test_fit_temperature_never_raises_the_nll():
    for seed in range(5):
        logits, target = _overconfident(1.0, seed)  # already calibrated: T near 1, or exactly 1
        t = fit_temperature(logits, target)
        assert float(F.cross_entropy(logits / t, target)) <= float(F.cross_entropy(logits, target))
    # the NLL falls without bound as T grows: T stops at the top of the allowed range
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    target = torch.tensor([0, 0])
    assert fit_temperature(logits, target) == pytest.approx(TEMPERATURE_RANGE[1])
    # a single input classified right: the NLL falls as T -> 0, T ends small but within the range
    assert TEMPERATURE_RANGE[0] <= fit_temperature(torch.tensor([[1.0, 0.0]]), torch.tensor([0])) < 0.1
    with pytest.raises(ValueError):
        fit_temperature(torch.randn(3, 4), torch.zeros(2, dtype=torch.long))


def test_reliability_bins_match_torchmetrics_ece():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(500, 10, generator=g) * 3, -1)
    target = torch.randint(0, 10, (500,), generator=g)
    confidence, predicted = probs.max(-1)
    bins = reliability_bins(confidence, predicted == target, n_bins=15)
    assert int(bins["counts"].sum()) == 500 and bins["edges"].shape == (16,)
    assert float(bins["ece"]) == pytest.approx(float(multiclass_calibration_error(probs, target, 10, n_bins=15)), abs=1e-5)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="n_bins"):
            reliability_bins(confidence, predicted == target, n_bins=bad)


class _Fixed(torch.nn.Module):
    """A 'model' returning fixed logits for input indices."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.table[index]


def test_ensemble_calibrate_stores_the_temperature_everywhere():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(600, 10, generator=g)
    target = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    members = [_Fixed(4.0 * z + 0.3 * torch.randn(600, 10, generator=g)) for _ in range(3)]  # overconfident members
    ensemble = Ensemble(members, combine="probability")
    index = torch.arange(600)
    loader = [(index[i : i + 100], target[i : i + 100]) for i in range(0, 600, 100)]
    before = F.nll_loss(torch.log(ensemble.predict_proba(index)), target)
    t = ensemble.calibrate(loader)
    assert t > 1.5 and float(ensemble.temperature) == pytest.approx(t)
    probs = ensemble.predict_proba(index)
    assert F.nll_loss(torch.log(probs), target) < before
    assert torch.allclose(ensemble.predict_with_uncertainty(index)["probs"], probs)
    assert torch.allclose(ensemble(index).exp(), probs, atol=1e-5)  # forward: the calibrated log-probabilities
    assert torch.equal(probs.argmax(-1), Ensemble(members, combine="probability").predict_proba(index).argmax(-1))
    assert ensemble.calibrate(loader) == pytest.approx(t)  # refitted from the uncalibrated ensemble, not compounded
    with pytest.raises(ValueError, match="integer class targets"):
        ensemble.calibrate([(index[:10], torch.rand(10))])
    with pytest.raises(ValueError, match="temperature"):
        Ensemble(members, temperature=0.0)
