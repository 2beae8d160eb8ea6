"""Tests for the aggregation rules and the Byzantine defence (plain torch, no Ray/Lightning)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from hqde_lightning.aggregation import (
    AGGREGATORS,
    AggregationResult,
    Aggregator,
    Entanglement,
    GeometricMedian,
    Krum,
    Mean,
    MultiKrum,
    Reputation,
    RobustAggregator,
    Superposition,
    TrimmedMean,
    coordinate_median,
    krum_ranking,
    krum_scores,
    mad_outliers,
    superposition_weights,
)
from hqde_lightning.aggregation.base import flatten_states
from hqde_lightning.aggregation.entanglement import update_cosines

NAMES = sorted(AGGREGATORS)
FAST = settings(deadline=None, max_examples=25)


def make(name: str, n: int) -> Aggregator | None:
    """A fresh instance of rule ``name`` that accepts ``n`` members, or ``None`` if none does.

    Krum-type rules tolerate one Byzantine member when ``n >= 5`` and none below that
    (``n >= 3``); for ``n < 3`` they fall back to the geometric median (tested separately).
    The trimmed mean trims 20 % per side so that it trims something from five members on.
    """
    if name in ("krum", "multi_krum"):
        byzantine = 1 if n > 4 else 0
        return AGGREGATORS[name](num_byzantine=byzantine) if n > 2 * byzantine + 2 else None
    if name == "trimmed_mean":
        return TrimmedMean(beta=0.2)
    return AGGREGATORS[name]()


def states_of(rows: Tensor) -> list[dict[str, Tensor]]:
    """One state dict per row, split into a matrix and a vector entry plus an integer counter."""
    cut = rows.shape[1] // 2
    return [{"weight": row[:cut].reshape(cut, 1).clone(), "bias": row[cut:].clone(), "steps": torch.tensor(7)} for row in rows]


def consensus_of(result: AggregationResult) -> Tensor:
    """The consensus as one flat float32 row."""
    return flatten_states([result.state])[0][0]


def random_rows(seed: int, n: int, p: int) -> Tensor:
    """A reproducible standard-normal ``(n, p)`` matrix."""
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# properties shared by every registered rule


def test_registry_names() -> None:
    assert NAMES == ["entanglement", "geometric_median", "krum", "mean", "multi_krum", "superposition", "trimmed_mean"]
    assert all(AGGREGATORS[name].name == name for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(n=st.integers(1, 8), p=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_permutation_invariance(name: str, n: int, p: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, p, generator=generator) * 2 + 1
    scores = torch.randn(n, generator=generator)
    counts = torch.randint(1, 50, (n,), generator=generator).to(torch.float64)
    permutation = torch.randperm(n, generator=generator)
    first, second = make(name, n), make(name, n)
    if first is None or second is None:
        with pytest.warns(RuntimeWarning, match="Krum.*needs n > 2f"):
            result = AGGREGATORS[name](num_byzantine=0)(states_of(rows))
        assert result.info["fallback"] == "geometric_median"
        return
    original = first(states_of(rows), scores.tolist(), counts.tolist())
    permuted = second(states_of(rows[permutation]), scores[permutation].tolist(), counts[permutation].tolist())
    tolerance = 1e-4 if name == "geometric_median" else 1e-5
    torch.testing.assert_close(consensus_of(permuted), consensus_of(original), atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(permuted.member_weights, original.member_weights[permutation], atol=tolerance, rtol=tolerance)
    assert math.isclose(float(original.member_weights.sum()), 1.0, rel_tol=1e-9)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_identical_members_give_that_member(name: str, n: int) -> None:
    row = random_rows(0, 1, 16)[0] * 3 + 5
    rows = row.expand(n, -1).clone()
    scores = torch.linspace(-1.0, 2.0, n).tolist()
    aggregator = make(name, n)
    if aggregator is None:
        with pytest.warns(RuntimeWarning, match=rf"Krum\(num_byzantine=0\) needs n > 2f \+ 2 members but this round has n={n}"):
            result = AGGREGATORS[name](num_byzantine=0)(states_of(rows), scores)
        torch.testing.assert_close(consensus_of(result), row, atol=1e-6, rtol=1e-6)
        return
    for _ in range(2):  # the second round exercises state kept between rounds (entanglement's reference)
        result = aggregator(states_of(rows), scores)
        consensus = consensus_of(result)
        assert bool(torch.isfinite(consensus).all())
        torch.testing.assert_close(consensus, row, atol=1e-6, rtol=1e-6)
        assert bool(torch.isfinite(result.member_weights).all())
        assert math.isclose(float(result.member_weights.sum()), 1.0, rel_tol=1e-9)
        assert result.state["steps"].dtype == torch.int64 and int(result.state["steps"]) == 7


@pytest.mark.parametrize("name", [*NAMES, "robust"])
def test_non_finite_member_never_reaches_consensus(name: str) -> None:
    rows = random_rows(1, 7, 12)
    scores = torch.linspace(0.0, 1.0, 7)
    poisoned = rows.clone()
    poisoned[1, 3] = float("nan")
    poisoned[4, 0] = float("inf")
    clean = [0, 2, 3, 5, 6]

    def build() -> Aggregator:
        built = RobustAggregator(Mean()) if name == "robust" else make(name, len(clean))
        assert built is not None
        return built

    result = build()(states_of(poisoned), scores.tolist())
    reference = build()(states_of(rows[clean]), scores[clean].tolist())
    consensus = consensus_of(result)
    assert bool(torch.isfinite(consensus).all())
    torch.testing.assert_close(consensus, consensus_of(reference), atol=1e-6, rtol=1e-6)
    assert result.excluded == [1, 4]
    assert float(result.member_weights[1]) == 0.0 and float(result.member_weights[4]) == 0.0
    torch.testing.assert_close(result.member_weights[clean], reference.member_weights)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=3)
        self.norm = nn.BatchNorm2d(4)
        self.embedding = nn.Embedding(10, 3)


def _net_state(seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    net = _Net().train()
    for _ in range(seed + 1):  # distinct running statistics and num_batches_tracked per member
        net.norm(net.conv(torch.randn(2, 3, 6, 6)))
    return {key: value.detach().clone() for key, value in net.state_dict().items()}


@pytest.mark.parametrize("name", NAMES)
def test_real_module_state_dicts(name: str) -> None:
    states = [_net_state(seed) for seed in range(5)]
    aggregator = make(name, 5)
    assert aggregator is not None
    result = aggregator(states, scores=[0.1, 0.5, 0.2, 0.9, 0.4], sample_counts=[10, 20, 10, 30, 10])
    assert list(result.state) == list(states[0])
    for key, value in result.state.items():
        assert value.shape == states[0][key].shape and value.dtype == states[0][key].dtype, key
    assert result.state["norm.num_batches_tracked"].dtype == torch.int64
    assert int(result.state["norm.num_batches_tracked"]) == int(states[0]["norm.num_batches_tracked"]) == 1
    members, _ = flatten_states(states)
    consensus = consensus_of(result)
    # every rule here returns a convex combination of the members, coordinate by coordinate
    assert bool((consensus >= members.min(dim=0).values - 1e-6).all())
    assert bool((consensus <= members.max(dim=0).values + 1e-6).all())
    assert bool((result.state["norm.running_var"] > 0).all())
    picks_one_member = any(torch.equal(consensus, row) for row in members)
    assert picks_one_member == (name == "krum")
    _Net().load_state_dict(result.state)


@pytest.mark.parametrize(
    ("factory", "parameter"),
    [
        (lambda: Superposition(temperature=0), "temperature"),
        (lambda: Superposition(temperature=float("inf")), "temperature"),
        (lambda: superposition_weights(torch.zeros(2), 1.0, prior=torch.tensor([1.0, -1.0])), "prior"),
        (lambda: Entanglement(strength=-1.0), "strength"),
        (lambda: Entanglement(strength="1"), "strength"),
        (lambda: GeometricMedian(tol=0), "tol"),
        (lambda: GeometricMedian(max_iter=0), "max_iter"),
        (lambda: GeometricMedian(max_iter=2.5), "max_iter"),
        (lambda: GeometricMedian(eps=-1e-8), "eps"),
        (lambda: TrimmedMean(beta=0.5), "beta"),
        (lambda: TrimmedMean(beta=-0.1), "beta"),
        (lambda: Krum(num_byzantine=-1), "num_byzantine"),
        (lambda: Krum(num_byzantine=1.0), "num_byzantine"),
        (lambda: MultiKrum(num_byzantine=True), "num_byzantine"),
        (lambda: MultiKrum(num_selected=0), "num_selected"),
        (lambda: Reputation(0), "num_members"),
        (lambda: Reputation(3, decay=1.5), "decay"),
        (lambda: Reputation(3, recovery=-0.1), "recovery"),
        (lambda: Reputation(3, floor=2.0), "floor"),
        (lambda: RobustAggregator("mean", threshold=0), "threshold"),
        (lambda: RobustAggregator("no_such_rule"), "aggregator"),
        (lambda: mad_outliers(torch.zeros(3, 2), threshold=-1.0), "threshold"),
    ],
)
def test_bad_arguments_name_the_parameter(factory: Callable[[], object], parameter: str) -> None:
    with pytest.raises((TypeError, ValueError), match=f"`{parameter}"):
        factory()


# ---------------------------------------------------------------------------------------------
# robustness against Byzantine members


@pytest.mark.parametrize("attack", ["scaled_x100", "sign_flipped"])
def test_robust_rules_resist_two_bad_members_of_seven(attack: str) -> None:
    generator = torch.Generator().manual_seed(3)
    centre = torch.randn(50, generator=generator)
    honest = centre + 0.01 * torch.randn(5, 50, generator=generator)
    bad = honest[:2] * 100 if attack == "scaled_x100" else -honest[:2]
    rows = torch.cat([honest[:1], bad[:1], honest[1:3], bad[1:], honest[3:]])  # bad members at 1 and 4
    target = honest.mean(dim=0)

    def relative_error(aggregator: Aggregator) -> float:
        consensus = consensus_of(aggregator(states_of(rows)))
        return float(torch.linalg.vector_norm(consensus - target) / torch.linalg.vector_norm(target))

    for aggregator in (
        TrimmedMean(beta=0.3),
        Krum(num_byzantine=2),
        MultiKrum(num_byzantine=2),
        GeometricMedian(),
        RobustAggregator(Mean()),
    ):
        assert relative_error(aggregator) < 0.02, aggregator
    assert relative_error(Mean()) > 0.5


def test_robust_aggregator_flags_and_excludes_scaled_member() -> None:
    generator = torch.Generator().manual_seed(4)
    honest = torch.randn(30, generator=generator) + 0.05 * torch.randn(7, 30, generator=generator)
    rows = honest.clone()
    rows[2] = honest[2] * 100
    robust = RobustAggregator(Mean())
    result = robust(states_of(rows))
    assert result.info["flagged"] == [2]
    assert result.excluded == [2]
    assert float(result.member_weights[2]) == 0.0
    torch.testing.assert_close(consensus_of(result), honest[[0, 1, 3, 4, 5, 6]].mean(dim=0), atol=1e-6, rtol=1e-6)
    assert result.info["reputation"] == [1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0]

    # next round member 2 behaves: not flagged, but it counts half as much and recovers a little
    result = robust(states_of(honest))
    assert result.info["flagged"] == [] and result.excluded == []
    assert math.isclose(float(result.member_weights[2]), 0.5 / 6.5, rel_tol=1e-12)
    assert math.isclose(result.info["reputation"][2], 0.55, rel_tol=1e-12)

    # a non-finite member is excluded (not "flagged") and loses reputation too
    broken = honest.clone()
    broken[5, 0] = float("nan")
    result = robust(states_of(broken))
    assert result.excluded == [5] and result.info["flagged"] == []
    assert math.isclose(result.info["reputation"][5], 0.5, rel_tol=1e-12)


def test_robust_aggregator_resets_reputation_when_member_count_changes() -> None:
    rows = random_rows(5, 6, 10)
    rows[0] *= 100
    robust = RobustAggregator("mean")
    assert robust(states_of(rows)).info["reputation"][0] == 0.5
    with pytest.warns(RuntimeWarning, match="reputation"):
        result = robust(states_of(rows[1:]))
    assert result.info["reputation"] == [1.0] * 5
    assert robust.tracker is not None and robust.tracker.num_members == 5


def test_robust_aggregator_keeps_reputation_per_member_index() -> None:
    """Member 5 stops: the others keep their reputations, member 0's low score follows member 0."""
    rows = random_rows(5, 6, 10)
    rows[0] *= 100
    robust = RobustAggregator("mean")
    first = robust(states_of(rows), members=list(range(6)))
    assert first.info["reputation"] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = robust(states_of(rows[[0, 1, 2, 4]]), members=[0, 1, 2, 4])
    assert second.info["reputation"] == [0.25, 1.0, 1.0, 1.0]
    assert robust.tracker is not None and robust.tracker.weights.tolist() == [0.25, 1.0, 1.0, 1.0, 1.0, 1.0]
    clean = robust(states_of(rows[[1, 3]]), members=[1, 3])  # member 0 absent: its score stays
    assert clean.info["reputation"] == [1.0, 1.0] and robust.tracker.weights.tolist()[0] == 0.25
    restored = RobustAggregator("mean")
    restored.load_state_dict(robust.state_dict())
    assert restored.tracker is not None and restored.tracker.weights.tolist() == robust.tracker.weights.tolist()
    with pytest.raises(ValueError, match="members"):
        robust(states_of(rows[:2]), members=[1, 1])


def test_robust_aggregator_state_dict_round_trip() -> None:
    rows = random_rows(6, 7, 20)
    rows[3] *= 100
    robust = RobustAggregator(Entanglement())
    first = robust(states_of(rows))
    saved = robust.state_dict()
    assert 3 in first.info["flagged"]
    assert saved["reputation"]["scores"].tolist() == first.info["reputation"]
    assert float(saved["reputation"]["scores"][3]) == 0.5
    assert isinstance(saved["inner"]["reference"], Tensor) and saved["inner"]["reference"].shape == (20,)
    restored = RobustAggregator(Entanglement())
    restored.load_state_dict(saved)
    next_rows = rows + 0.1 * random_rows(7, 7, 20)
    expected, actual = robust(states_of(next_rows)), restored(states_of(next_rows))
    assert torch.equal(consensus_of(actual), consensus_of(expected))
    assert actual.info == expected.info
    assert actual.info["reference"] == "previous_consensus"


def test_robust_aggregator_without_reputation() -> None:
    rows = random_rows(8, 6, 10)
    rows[4] *= -100
    robust = RobustAggregator("geometric_median", reputation=False)
    result = robust(states_of(rows))
    assert result.info["flagged"] == [4] and result.info["reputation"] is None and robust.tracker is None
    assert robust.state_dict()["reputation"] is None


def test_robust_combine_on_a_matrix_filters_without_reputation() -> None:
    rows = random_rows(20, 6, 10)
    rows[1] *= 100
    robust = RobustAggregator(Mean())
    consensus, weights, info = robust.combine(rows, None, torch.ones(6, dtype=torch.float64))
    assert info["flagged"] == [1] and float(weights[1]) == 0.0 and robust.tracker is None
    torch.testing.assert_close(consensus, rows[[0, 2, 3, 4, 5]].mean(dim=0), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# MAD outlier test and reputation


@FAST
@given(n=st.integers(1, 9), p=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), scale=st.floats(1.0, 1e4))
def test_mad_outliers_never_flag_the_majority(n: int, p: int, seed: int, scale: float) -> None:
    rows = random_rows(seed, n, p)
    rows[: n // 2] *= scale
    flagged = mad_outliers(rows)
    assert flagged.dtype == torch.bool and flagged.shape == (n,)
    assert int(flagged.sum()) <= n // 2


def test_coordinate_median_averages_the_middle_pair() -> None:
    rows = torch.tensor([[0.0, 5.0], [1.0, -1.0], [2.0, 4.0], [10.0, 0.0]])
    assert coordinate_median(rows).tolist() == [1.5, 2.0]
    assert coordinate_median(rows[:3]).tolist() == [1.0, 4.0]


def test_mad_outliers_flags_far_member_only() -> None:
    rows = random_rows(9, 7, 8)
    rows[6] *= 100
    assert mad_outliers(rows).tolist() == [False] * 6 + [True]
    assert not bool(mad_outliers(rows, threshold=1e9).any())
    assert not bool(mad_outliers(rows[:2]).any())


def test_mad_outliers_never_flag_one_of_two_members() -> None:
    """With two rows both are exactly as far from their midpoint; float rounding used to flag one below threshold 1.349."""
    generator = np.random.default_rng(1)
    for threshold in (0.5, 1.0, 1.3, 3.5):
        for _ in range(300):
            pair = torch.tensor(generator.normal(size=(2, 5)))
            assert not bool(mad_outliers(pair, threshold).any())
            assert not bool(mad_outliers(torch.tensor(np.round(pair.numpy(), 3)), threshold).any())
    assert mad_outliers(torch.tensor([[1.0, 2.0]]), 0.1).tolist() == [False]
    assert mad_outliers(torch.tensor([[0.0], [1e30]]), 0.1).tolist() == [False, False]


def test_mad_outliers_when_mad_is_zero() -> None:
    row = random_rows(10, 1, 8)[0] + 3
    rows = row.expand(5, -1).clone()
    assert not bool(mad_outliers(rows).any())
    rows[3, 2] = torch.nextafter(rows[3, 2], torch.tensor(1e9))  # one-ulp rounding difference: not an outlier
    assert not bool(mad_outliers(rows).any())
    rows[3, 2] += 0.01  # a real difference from an exactly agreeing majority
    assert mad_outliers(rows).tolist() == [False, False, False, True, False]


def test_reputation_decay_recovery_and_floor() -> None:
    reputation = Reputation(3, decay=0.5, recovery=0.1, floor=0.2)
    assert reputation.weights.tolist() == [1.0, 1.0, 1.0]
    expected = [[0.5, 1.0, 1.0], [0.25, 1.0, 0.5], [0.2, 1.0, 0.55], [0.28, 1.0, 0.595]]
    rounds = [[True, False, False], [True, False, True], [True, False, False], [False, False, False]]
    for flagged, scores in zip(rounds, expected):
        reputation.update(flagged)
        np.testing.assert_allclose(reputation.weights.numpy(), scores, rtol=1e-12)
    with pytest.raises(ValueError, match="`flagged` has 2 entries for 3 members"):
        reputation.update([True, False])


def test_reputation_state_dict_round_trip() -> None:
    reputation = Reputation(4, decay=0.3)
    reputation.update([False, True, True, False])
    reputation.update([False, True, False, False])
    saved = reputation.state_dict()
    restored = Reputation(4, decay=0.3)
    restored.load_state_dict(saved)
    assert torch.equal(restored.weights, reputation.weights)
    saved["scores"][0] = 0.0  # the saved state is a copy
    assert float(reputation.weights[0]) == 1.0
    with pytest.raises(ValueError, match="3 members"):
        Reputation(3).load_state_dict(reputation.state_dict())


# ---------------------------------------------------------------------------------------------
# superposition


def test_superposition_with_equal_scores_is_exactly_the_mean() -> None:
    states = states_of(random_rows(11, 5, 20))
    counts = [3, 1, 4, 1, 5]
    mean = Mean()(states, sample_counts=counts)
    for scores in (None, [0.7] * 5):
        result = Superposition(temperature=0.3)(states, scores=scores, sample_counts=counts)
        assert torch.equal(consensus_of(result), consensus_of(mean))
        assert torch.equal(result.member_weights, mean.member_weights)


def test_superposition_weights_numbers() -> None:
    scores = torch.tensor([0.0, math.log(3.0)])
    torch.testing.assert_close(superposition_weights(scores, 1.0), torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(
        superposition_weights(scores, 1.0, prior=torch.tensor([3.0, 1.0])), torch.tensor([0.5, 0.5], dtype=torch.float64)
    )
    root = math.sqrt(3.0)
    torch.testing.assert_close(
        superposition_weights(scores, 2.0), torch.tensor([1 / (1 + root), root / (1 + root)], dtype=torch.float64)
    )
    rows = torch.tensor([[0.0, 8.0], [4.0, 0.0]])
    result = Superposition()(states_of(rows), scores=scores.tolist())
    torch.testing.assert_close(consensus_of(result), torch.tensor([3.0, 2.0]))
    np.testing.assert_allclose(result.info["amplitudes"], [0.5, math.sqrt(0.75)], rtol=1e-6)


def test_superposition_weights_where_scores_over_temperature_overflow() -> None:
    """c / T beyond float64 (T = 1e-310, or c = 1e300 with T = 1e-10) gave NaN; the limit puts all weight on the best."""
    scores = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert superposition_weights(scores, 1e-310).tolist() == [0.0, 0.0, 1.0]
    assert superposition_weights(torch.tensor([1e300, 0.0, -1.0], dtype=torch.float64), 1e-10).tolist() == [1.0, 0.0, 0.0]
    assert superposition_weights(torch.tensor([-1e308, 1e308], dtype=torch.float64), 1.0).tolist() == [0.0, 1.0]
    # tied best members share the weight in proportion to their prior; a best member of zero prior gets none
    tied = superposition_weights(torch.tensor([3.0, 3.0, 1.0]), 1e-310, prior=torch.tensor([1.0, 3.0, 1.0]))
    assert tied.tolist() == [0.25, 0.75, 0.0]
    assert superposition_weights(torch.tensor([5.0, 3.0, 1.0]), 1e-310, prior=torch.tensor([0.0, 1.0, 1.0])).tolist() == [0.0, 1.0, 0.0]
    # ordinary temperatures are unchanged: softmax(c / T + log prior)
    prior = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    expected = torch.softmax(torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64) / 0.7 + prior.log(), dim=0)
    torch.testing.assert_close(superposition_weights(torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64), 0.7, prior), expected, rtol=1e-12, atol=0)
    rows = random_rows(31, 3, 6)
    result = Superposition(temperature=1e-310)(states_of(rows), scores=[1.0, 2.0, 3.0])
    assert torch.equal(consensus_of(result), rows[2]) and result.member_weights.tolist() == [0.0, 0.0, 1.0]


def test_superposition_partial_score_carries_the_members_weight() -> None:
    """W * exp(S / T) of a partial result equals the sum of its members' w_i * exp(c_i / T)."""
    rule = Superposition(temperature=0.5)
    scores, weights = [0.2, -1.0, 1.5], [1.0, 4.0, 2.0]
    carried = rule.partial_score(scores, weights)
    total = sum(w * math.exp(c / 0.5) for c, w in zip(scores, weights))
    assert math.isclose(sum(weights) * math.exp(carried / 0.5), total, rel_tol=1e-12)
    assert rule.partial_score([1.0, 1.0], [2.0, 3.0]) == 1.0  # equal scores carry that score exactly
    assert math.isclose(rule.partial_score([1.0, float("nan")], [1.0, 1.0]), 1.0 + 0.5 * math.log(0.5), rel_tol=1e-12)
    assert math.isnan(rule.partial_score([float("nan"), float("-inf")], [1.0, 1.0]))
    assert math.isclose(Superposition(temperature=1e-310).partial_score([1e300, 0.0], [1.0, 1.0]), 1e300)


# ---------------------------------------------------------------------------------------------
# entanglement


def test_entanglement_down_weights_disagreeing_member() -> None:
    generator = torch.Generator().manual_seed(12)
    reference = torch.randn(40, generator=generator)
    entanglement = Entanglement()
    first = entanglement(states_of(reference.expand(5, -1).clone()))
    assert first.info["reference"] == "mean"
    torch.testing.assert_close(first.member_weights, torch.full((5,), 0.2, dtype=torch.float64))

    direction = torch.randn(40, generator=generator)
    signs = torch.tensor([1.0, 1.0, 1.0, -1.0, 1.0])
    rows = reference + 0.1 * signs[:, None] * direction + 0.01 * torch.randn(5, 40, generator=generator)
    result = entanglement(states_of(rows))
    assert result.info["reference"] == "previous_consensus"
    weights = result.member_weights
    assert float(weights[3]) < 0.01 * float(weights[[0, 1, 2, 4]].min())

    updates = (rows - reference).double().numpy()
    unit = updates / np.linalg.norm(updates, axis=1, keepdims=True)
    cosines = unit @ unit.T
    agreement = cosines.sum(axis=1) - np.diag(cosines)
    expected = np.exp(agreement) / np.exp(agreement).sum()
    np.testing.assert_allclose(weights.numpy(), expected, atol=1e-6)
    torch.testing.assert_close(consensus_of(result), (torch.from_numpy(expected).float() @ rows), atol=1e-5, rtol=1e-5)


def test_entanglement_first_round_uses_the_mean_and_strength_zero_is_the_mean() -> None:
    rows = random_rows(13, 4, 9)
    counts = [1, 2, 3, 4]
    result = Entanglement(strength=2.0)(states_of(rows), sample_counts=counts)
    updates = (rows - rows.mean(dim=0)).double().numpy()
    unit = updates / np.linalg.norm(updates, axis=1, keepdims=True)
    cosines = 2.0 * unit @ unit.T
    logits = cosines.sum(axis=1) - np.diag(cosines) + np.log(counts)
    np.testing.assert_allclose(result.member_weights.numpy(), np.exp(logits) / np.exp(logits).sum(), atol=1e-6)
    plain = Entanglement(strength=0.0)(states_of(rows), sample_counts=counts)
    assert torch.equal(consensus_of(plain), consensus_of(Mean()(states_of(rows), sample_counts=counts)))


def test_entanglement_state_dict_and_sharded_calls() -> None:
    rows = random_rows(14, 5, 30)
    entanglement = Entanglement()
    entanglement(states_of(rows))
    saved = entanglement.state_dict()
    assert saved["reference"].shape == (30,) and saved["reference"].dtype == torch.float32
    restored = Entanglement()
    restored.load_state_dict(saved)
    moved = rows + 0.05 * random_rows(15, 5, 30)
    assert torch.equal(consensus_of(restored(states_of(moved))), consensus_of(entanglement(states_of(moved))))

    shard = entanglement(states_of(rows[:, :10]))  # fewer columns than the stored reference
    assert shard.info["reference"] == "mean"
    assert bool(torch.isfinite(consensus_of(shard)).all())
    empty = Entanglement()
    empty.load_state_dict({"reference": None})
    assert empty.state_dict() == {"reference": None, "shards": {}}


def test_update_cosines_for_zero_updates() -> None:
    torch.testing.assert_close(update_cosines(torch.zeros(3, 4)), torch.ones(3, 3, dtype=torch.float64))
    updates = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, -3.0]])
    expected = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64
    )
    torch.testing.assert_close(update_cosines(updates), expected)


# ---------------------------------------------------------------------------------------------
# geometric median


def _objective(points: np.ndarray, weights: np.ndarray, z: np.ndarray) -> float:
    return float(weights @ np.linalg.norm(points - z, axis=1))


def _subgradient_gap(points: np.ndarray, weights: np.ndarray, z: np.ndarray, at_point: float) -> float:
    """How far ``z`` is from satisfying the optimality condition of ``sum_i weights_i ||points_i - z||``.

    Away from the points the gradient ``sum_i weights_i (z - x_i) / ||z - x_i||`` must vanish;
    a point within ``at_point`` of ``z`` may contribute any vector of length up to its weight
    (its subdifferential). Returns the excess pull of the other points, relative to
    ``weights.sum()`` (0 for an exact minimiser; the objective is convex).
    """
    offsets = z - points
    distances = np.linalg.norm(offsets, axis=1)
    far = distances > at_point
    pull = np.linalg.norm((weights[far] / distances[far]) @ offsets[far])
    return max(pull - float(weights[~far].sum()), 0.0) / float(weights.sum())


@settings(deadline=None, max_examples=40)
@given(n=st.integers(3, 8), d=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_geometric_median_satisfies_the_optimality_condition(n: int, d: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, d, generator=generator)
    counts = (torch.rand(n, generator=generator) + 0.2).tolist()
    result = GeometricMedian(tol=1e-8, max_iter=3000)(states_of(rows), sample_counts=counts)
    z = consensus_of(result).double().numpy()
    points, weights = rows.double().numpy(), np.asarray(counts)
    assert _subgradient_gap(points, weights, z, at_point=1e-3) < 1e-3
    assert _objective(points, weights, z) <= min(_objective(points, weights, p) for p in points) * (1 + 1e-3)
    torch.testing.assert_close(
        consensus_of(result), result.member_weights.float() @ rows, atol=1e-5, rtol=1e-5
    )  # the reported weights reproduce the consensus


def test_geometric_median_beats_a_dense_grid_in_2d() -> None:
    generator = torch.Generator().manual_seed(21)
    rows = torch.randn(6, 2, generator=generator)
    counts = [1.0, 2.0, 1.0, 3.0, 1.0, 1.0]
    z = consensus_of(GeometricMedian()(states_of(rows), sample_counts=counts)).double().numpy()
    points, weights = rows.double().numpy(), np.asarray(counts)
    axis = np.linspace(-3.0, 3.0, 601)  # spacing 0.01
    grid = np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 1, 2)
    values = (np.linalg.norm(grid - points, axis=2) * weights).sum(axis=1)
    best = grid[int(np.argmin(values)), 0]
    assert _objective(points, weights, z) <= float(values.min()) + 1e-9
    assert np.linalg.norm(z - best) < 0.02


def test_geometric_median_known_answers() -> None:
    triangle = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3.0) / 2]])
    result = GeometricMedian()(states_of(triangle))
    torch.testing.assert_close(consensus_of(result), torch.tensor([0.5, math.sqrt(3.0) / 6]), atol=1e-5, rtol=0)
    assert result.info["converged"] is True and result.info["iterations"] <= 100

    line = torch.tensor([[0.0], [1.0], [10.0]])  # in one dimension the geometric median is the median
    torch.testing.assert_close(consensus_of(GeometricMedian()(states_of(line))), torch.tensor([1.0]), atol=1e-4, rtol=0)

    cut_short = GeometricMedian(max_iter=1)(states_of(random_rows(16, 6, 5)))
    assert cut_short.info == {"iterations": 1, "converged": False}


def _exact_geometric_median(points: np.ndarray, weights: np.ndarray | None = None, iterations: int = 3000) -> np.ndarray:
    """A long float64 Weiszfeld run from the coordinate-wise median: the reference geometric median."""
    weights = np.ones(len(points)) if weights is None else weights
    z = np.median(points, axis=0)
    for _ in range(iterations):
        beta = weights / np.maximum(np.linalg.norm(points - z, axis=1), 1e-12)
        z = beta @ points / beta.sum()
    return z


def _smoothed_gradient(points: np.ndarray, z: np.ndarray, eps: float = 1e-8) -> float:
    """Norm of sum_i p_i (z - x_i) / max(eps, ||z - x_i||) with equal p_i summing to one: GeometricMedian's stop rule."""
    offsets = z - points
    return float(np.linalg.norm((offsets / np.maximum(np.linalg.norm(offsets, axis=1), eps)[:, None]).mean(axis=0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("magnitude", [1e9, 1e20])
@pytest.mark.parametrize("num_bad", [1, 2, 3, 4])
def test_geometric_median_a_far_minority_moves_it_no_further_than_the_exact_median(
    dtype: torch.dtype, magnitude: float, num_bad: int
) -> None:
    """f of 2f + 1 members at 1e9 or 1e20: the result is the exact geometric median, and says it converged.

    The stop rule used the prior-weighted mean distance, which the far members inflate: one member at
    1e9 of five stopped it 1885 away from the honest members (the exact median is 0.36 away), and in
    float32 a member at 1e20 overflowed every distance and gave the plain mean; both said converged.
    """
    n = 2 * num_bad + 1
    generator = np.random.default_rng(num_bad)
    rows = np.vstack([generator.normal(size=(n - num_bad, 300)) * 0.05, np.full((num_bad, 300), magnitude)])
    members = torch.tensor(rows, dtype=dtype)
    points = members.double().numpy()
    honest = points[: n - num_bad]
    spread = float(np.linalg.norm(honest - honest.mean(axis=0), axis=1).mean())
    exact = _exact_geometric_median(points)
    result = GeometricMedian()(states_of(members))
    z = consensus_of(result).double().numpy()
    assert result.info["converged"] is True
    assert _smoothed_gradient(points, z) < 1e-5  # what converged=True promises
    assert np.linalg.norm(z - exact) < 1e-3 * spread
    assert np.linalg.norm(z - honest.mean(axis=0)) <= np.linalg.norm(exact - honest.mean(axis=0)) + 1e-3 * spread
    assert float(result.member_weights[n - num_bad :].sum()) < 1e-6


@pytest.mark.parametrize("scale", [-100.0, 1e3, 1e5])
@pytest.mark.parametrize("num_bad", [1, 2])
def test_geometric_median_resists_the_scale_attack(scale: float, num_bad: int) -> None:
    """``ByzantineMembers(attack="scale")``: bad members send ``scale`` times their honest float32 weights."""
    generator = np.random.default_rng(0)
    n = 2 * num_bad + 3
    shared = generator.normal(size=4000) * 0.05
    honest = shared + generator.normal(size=(n, 4000)) * 0.0005
    rows = honest.copy()
    rows[:num_bad] *= scale
    members = torch.tensor(rows, dtype=torch.float32)
    points = members.double().numpy()
    spread = float(np.linalg.norm(points[num_bad:] - points[num_bad:].mean(axis=0), axis=1).mean())
    exact = _exact_geometric_median(points)
    result = GeometricMedian()(states_of(members))
    assert result.info["converged"] is True
    assert np.linalg.norm(consensus_of(result).double().numpy() - exact) < 1e-2 * spread


def test_geometric_median_stop_rule_ignores_scale_and_offset() -> None:
    rows = random_rows(30, 6, 40).double()
    counts = [1.0, 2.0, 1.0, 3.0, 1.0, 2.0]
    base = GeometricMedian()(states_of(rows), sample_counts=counts)
    for scale, offset in ((1e-3, 0.0), (1e4, 0.0), (1.0, 1e6), (-7.0, 3e3)):
        moved = GeometricMedian()(states_of(rows * scale + offset), sample_counts=counts)
        assert moved.info == base.info
        torch.testing.assert_close(moved.member_weights, base.member_weights, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(consensus_of(moved), consensus_of(base) * scale + offset, rtol=1e-9, atol=1e-9 * abs(scale))


# ---------------------------------------------------------------------------------------------
# trimmed mean and Krum


def test_trimmed_mean_numbers() -> None:
    rows = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, -5.0], [4.0, 40.0], [100.0, 50.0]])
    result = TrimmedMean(beta=0.2)(states_of(rows))
    torch.testing.assert_close(consensus_of(result), torch.tensor([3.0, 70.0 / 3.0]))
    torch.testing.assert_close(result.member_weights, torch.tensor([1.0, 2.0, 1.0, 2.0, 0.0], dtype=torch.float64) / 6)
    weighted = TrimmedMean(beta=0.2)(states_of(rows), sample_counts=[1, 3, 1, 1, 1])
    torch.testing.assert_close(consensus_of(weighted), torch.tensor([2.6, 22.0]))
    assert result.info == {"trimmed_per_side": 1}
    assert TrimmedMean(beta=0.29).num_trimmed(100) == 29


def test_trimmed_mean_needs_enough_members() -> None:
    aggregator = TrimmedMean(beta=0.4)
    aggregator.beta = 0.5  # a value changed after construction is checked at call time
    with pytest.raises(ValueError, match="needs at least 5 members, got 4"):
        aggregator(states_of(random_rows(17, 4, 3)))
    with pytest.raises(ValueError, match=r"`beta` must be in \[0, 0\.5\)"):
        TrimmedMean(beta=0.6)


def test_krum_and_multi_krum_numbers() -> None:
    rows = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    torch.testing.assert_close(krum_scores(rows, 1), torch.tensor([5.0, 2.0, 5.0, 65.0, 82.0], dtype=torch.float64))
    krum = Krum(num_byzantine=1)(states_of(rows))
    assert consensus_of(krum).tolist() == [1.0] and krum.info["selected"] == [1]
    assert krum.member_weights.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    multi = MultiKrum(num_byzantine=1)(states_of(rows))
    assert multi.info["selected"] == [0, 1, 2, 3]
    torch.testing.assert_close(consensus_of(multi), torch.tensor([3.25]))
    weighted = MultiKrum(num_byzantine=1, num_selected=3)(states_of(rows), sample_counts=[2, 1, 1, 1, 1])
    torch.testing.assert_close(consensus_of(weighted), torch.tensor([0.75]))
    torch.testing.assert_close(weighted.member_weights, torch.tensor([0.5, 0.25, 0.25, 0.0, 0.0], dtype=torch.float64))


def test_krum_breaks_closest_pair_tie_by_total_distance() -> None:
    rows = torch.tensor([[0.0], [1.0], [3.0]])  # f = 0: members 0 and 1 share the score 1
    scores, order = krum_ranking(rows, 0)
    assert scores.tolist() == [1.0, 1.0, 4.0] and order.tolist() == [1, 0, 2]
    for permutation in ([0, 1, 2], [1, 0, 2], [2, 0, 1]):
        assert consensus_of(Krum(num_byzantine=0)(states_of(rows[permutation]))).tolist() == [1.0]


@pytest.mark.parametrize("rule", [Krum, MultiKrum])
def test_krum_too_few_members_falls_back_to_the_geometric_median_warning_once(rule: Callable[..., Aggregator]) -> None:
    rows = random_rows(18, 4, 3)
    aggregator = rule(num_byzantine=1)
    with pytest.warns(RuntimeWarning, match=r"Krum\(num_byzantine=1\) needs n > 2f \+ 2 members but this round has n=4"):
        result = aggregator(states_of(rows))
    expected = GeometricMedian()(states_of(rows))
    assert result.info["fallback"] == "geometric_median"
    torch.testing.assert_close(consensus_of(result), consensus_of(expected))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert aggregator(states_of(rows[:3])).info["fallback"] == "geometric_median"  # no second warning
    with pytest.raises(ValueError, match=r"Krum needs n > 2f \+ 2 members: got n=4, f=1"):
        krum_scores(rows, 1)


@pytest.mark.parametrize("rule", [Krum, MultiKrum])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_krum_fallback_is_as_robust_as_the_exact_geometric_median(rule: Callable[..., Aggregator], dtype: torch.dtype) -> None:
    """n <= 2f + 2 falls back to the geometric median, which must not be dragged by far members either."""
    generator = np.random.default_rng(5)
    rows = np.vstack([generator.normal(size=(3, 300)) * 0.05, np.full((2, 300), 1e20)])
    members = torch.tensor(rows, dtype=dtype)
    with pytest.warns(RuntimeWarning, match="needs n > 2f"):
        result = rule(num_byzantine=2)(states_of(members))
    assert result.info["fallback"] == "geometric_median" and result.info["converged"] is True
    points = members.double().numpy()
    spread = float(np.linalg.norm(points[:3] - points[:3].mean(axis=0), axis=1).mean())
    assert np.linalg.norm(consensus_of(result).double().numpy() - _exact_geometric_median(points)) < 1e-3 * spread


def test_multi_krum_needs_num_selected_members() -> None:
    with pytest.raises(ValueError, match="num_selected=6"):
        MultiKrum(num_byzantine=0, num_selected=6)(states_of(random_rows(19, 5, 3)))



def test_krum_counts_non_finite_members_against_f():
    """Two NaN members out of 7 with f=2: they are the Byzantine ones, Krum runs on the 5 left."""
    torch.manual_seed(0)
    states = [{"w": torch.randn(4)} for _ in range(7)]
    states[0]["w"][:] = float("nan")
    states[1]["w"][:] = float("inf")
    for rule in (Krum(num_byzantine=2), MultiKrum(num_byzantine=2)):
        result = rule(states)
        assert result.excluded == [0, 1]
        assert torch.isfinite(result.state["w"]).all()
    with pytest.warns(RuntimeWarning, match="n > 2f"):
        Krum(num_byzantine=2)(states[2:])


# ---------------------------------------------------------------------------------------------
# edge cases of the sync maths (issue 8, A7)


@pytest.mark.parametrize("name", NAMES)
def test_float64_and_complex_entries_keep_dtype_and_precision(name: str) -> None:
    """float64 values differing below float32's resolution and complex values come back exactly."""
    n = 5
    generator = torch.Generator().manual_seed(3)
    base = 1.0 + 1e-10 * torch.arange(12, dtype=torch.float64)  # indistinguishable in float32
    spectrum = torch.complex(torch.randn(4, generator=generator), torch.randn(4, generator=generator))
    states = [{"w": base.clone(), "z": spectrum.clone(), "steps": torch.tensor(3)} for _ in range(n)]
    result = make(name, n)(states)
    assert result.state["w"].dtype == torch.float64 and result.state["z"].dtype == torch.complex64
    torch.testing.assert_close(result.state["w"], base, atol=1e-14, rtol=0)
    torch.testing.assert_close(result.state["z"], spectrum, atol=1e-6, rtol=1e-6)
    assert float(result.state["z"].imag.abs().sum()) > 0
    # two different complex members: the mean is the complex mean
    pair = [{"z": spectrum}, {"z": spectrum * 1j}]
    torch.testing.assert_close(Mean()(pair).state["z"], (spectrum + spectrum * 1j) / 2)


def test_non_finite_score_is_the_lowest_confidence() -> None:
    """A member whose mean loss is inf/NaN (finite weights) gets weight zero; no exception."""
    rows = random_rows(4, 4, 6)
    result = Superposition()(states_of(rows), scores=[0.5, float("nan"), float("-inf"), 1.0])
    weights = result.member_weights
    assert weights[1] == 0 and weights[2] == 0 and math.isclose(float(weights.sum()), 1.0)
    expected = superposition_weights(torch.tensor([0.5, 1.0]), 1.0)
    torch.testing.assert_close(weights[[0, 3]], expected)
    assert superposition_weights(torch.tensor([float("inf"), 0.0]), 1.0).tolist() == [0.0, 1.0]
    everything = Superposition()(states_of(rows), scores=[float("nan")] * 4)
    torch.testing.assert_close(everything.member_weights, torch.full((4,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [3, 5, 7])
def test_values_all_members_share_come_back_bit_exact(name: str, n: int) -> None:
    """Identical (e.g. frozen) weights: a weighted mean of equal floats is not always that float; the consensus is."""
    shared = random_rows(21, 1, 400)[0]
    states = [{"frozen": shared.clone(), "trained": row} for row in random_rows(22, n, 8)]
    for rule in (make(name, n), RobustAggregator(make(name, n))):
        result = rule(states, scores=list(range(n)), sample_counts=[1 + i for i in range(n)])
        assert torch.equal(result.state["frozen"], shared)
