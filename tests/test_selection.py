"""Tests for QUBO member selection and simulated annealing (hqde_lightning.selection)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hqde_lightning.selection import (
    SelectionResult,
    anneal,
    brute_force,
    build_qubo,
    exact_k_cost_weight,
    prediction_similarity,
    qubo_energy,
    qubo_offset,
    select_members,
)


def _problem(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    accuracy = rng.uniform(0.5, 0.95, size)
    similarity = prediction_similarity(rng.integers(0, 3, (size, 40)))
    return accuracy, similarity


def _formula(accuracy, similarity, k, lam, mu, x) -> float:
    x = np.asarray(x, dtype=float)
    pairs = sum(similarity[i, j] * x[i] * x[j] for i in range(x.size) for j in range(i + 1, x.size))
    size_term = (x.sum() - k) ** 2 if k is not None else x.sum()
    return float(-(accuracy * x).sum() + lam * pairs + mu * size_term)


@settings(deadline=None, max_examples=25)
@given(
    size=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    lam=st.floats(0, 3),
    mu=st.floats(0, 3),
    k_choice=st.integers(0, 6),
)
def test_energy_identity_on_all_subsets(size: int, seed: int, lam: float, mu: float, k_choice: int) -> None:
    accuracy, similarity = _problem(seed, size)
    k = None if k_choice == 0 else min(k_choice, size)
    q = build_qubo(accuracy, similarity, k, lam, mu)
    assert np.allclose(np.tril(q, -1), 0.0)
    offset = qubo_offset(k, mu)
    subsets = np.array(list(itertools.product((0, 1), repeat=size)))
    batch = qubo_energy(q, subsets, offset)
    for x, energy in zip(subsets, batch):
        expected = _formula(accuracy, similarity, k, lam, mu, x)
        assert energy == pytest.approx(expected, abs=1e-9)
        assert qubo_energy(q, x, offset) == pytest.approx(expected, abs=1e-9)


def test_qubo_energy_accepts_symmetric_and_bool() -> None:
    q = np.triu(np.random.default_rng(0).normal(size=(5, 5)))
    symmetric = (q + q.T) / 2
    x = np.array([True, False, True, True, False])
    assert qubo_energy(q, x) == pytest.approx(qubo_energy(symmetric, x.astype(int)))


def _random_qubo(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    size = int(rng.integers(4, 13))
    if seed % 2:
        return np.triu(rng.normal(size=(size, size)))
    accuracy, similarity = _problem(seed, size)
    return build_qubo(accuracy, similarity, int(rng.integers(1, size + 1)), 0.7, 0.3)


def test_anneal_finds_brute_force_optimum() -> None:
    hits = 0
    for seed in range(40):
        q = _random_qubo(seed)
        result = anneal(q, num_reads=32, num_sweeps=300, seed=seed)
        _, optimum = brute_force(q)
        hits += bool(np.isclose(result.best_energy, optimum, atol=1e-9))
        assert result.best_energy >= optimum - 1e-9
    assert hits >= 38, f"annealing hit the optimum on {hits}/40 seeds"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_anneal_result_is_consistent(seed: int) -> None:
    accuracy, similarity = _problem(seed, 9)
    q = build_qubo(accuracy, similarity, 3, 0.5, 0.4)
    offset = qubo_offset(3, 0.4)
    result = anneal(q, num_reads=16, num_sweeps=100, seed=seed, offset=offset)
    assert isinstance(result, SelectionResult)
    assert result.best_x.dtype == bool and result.best_x.shape == (9,) and result.best_x.any()
    assert result.best_energy == qubo_energy(q, result.best_x, offset)
    assert result.best_energy == pytest.approx(_formula(accuracy, similarity, 3, 0.5, 0.4, result.best_x))
    assert result.energies.shape == (16,) and result.samples.shape == (16, 9)
    np.testing.assert_allclose(result.energies, qubo_energy(q, result.samples, offset))
    assert result.best_energy <= result.energies.min()


def test_anneal_is_reproducible() -> None:
    q = _random_qubo(3)
    first, second = anneal(q, seed=11, num_sweeps=50), anneal(q, seed=11, num_sweeps=50)
    np.testing.assert_array_equal(first.best_x, second.best_x)
    np.testing.assert_array_equal(first.energies, second.energies)


def test_never_returns_empty_subset() -> None:
    accuracy = np.array([0.6, 0.9, 0.7])
    # every member costs more than it is worth: the empty subset has the lowest energy
    q = build_qubo(accuracy, np.eye(3), None, 1.0, 5.0)
    result = anneal(q, num_reads=8, num_sweeps=50, seed=0)
    np.testing.assert_array_equal(result.best_x, [False, True, False])
    x, energy = brute_force(q)
    np.testing.assert_array_equal(x, result.best_x)
    assert energy == result.best_energy == pytest.approx(-0.9 + 5.0)


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("seed", [0, 1])
def test_k_constraint_respected_for_large_mu(k: int, seed: int) -> None:
    accuracy, similarity = _problem(seed, 10)
    lam = 2.0
    mu = exact_k_cost_weight(accuracy, similarity, lam)
    q = build_qubo(accuracy, similarity, k, lam, mu)
    result = anneal(q, num_reads=32, num_sweeps=200, seed=seed, offset=qubo_offset(k, mu))
    assert result.best_x.sum() == k
    x, _ = brute_force(q)
    assert x.sum() == k


def test_brute_force_matches_enumeration() -> None:
    q = np.triu(np.random.default_rng(5).normal(size=(8, 8)))
    subsets = np.array([s for s in itertools.product((0, 1), repeat=8) if any(s)])
    energies = qubo_energy(q, subsets, 1.5)
    x, energy = brute_force(q, 1.5)
    assert energy == pytest.approx(energies.min())
    assert qubo_energy(q, x, 1.5) == energy


def test_prediction_similarity() -> None:
    predictions = np.array([[0, 1, 2, 3], [0, 1, 2, 0], [3, 3, 3, 3]])
    expected = np.array([[1.0, 0.75, 0.25], [0.75, 1.0, 0.0], [0.25, 0.0, 1.0]])
    np.testing.assert_allclose(prediction_similarity(predictions), expected)


def test_select_members_prefers_diverse_members() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200)
    other = rng.integers(0, 10, 200)
    predictions = np.stack([labels, labels, other, labels])
    accuracy = np.array([0.90, 0.91, 0.80, 0.89])
    chosen = select_members(accuracy, predictions, k=2, diversity_weight=1.0, seed=0)
    np.testing.assert_array_equal(chosen, [False, True, True, False])
    best_only = select_members(accuracy, predictions, k=1, seed=0)
    np.testing.assert_array_equal(best_only, [False, True, False, False])
    free = select_members(accuracy, predictions, diversity_weight=1.0, seed=0)
    assert free.any()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda a, s: build_qubo(a, s, 0, 1.0, 1.0), "`k`"),
        (lambda a, s: build_qubo(a, s, 5, 1.0, 1.0), "`k`"),
        (lambda a, s: build_qubo(a, s, 2, -1.0, 1.0), "`diversity_weight`"),
        (lambda a, s: build_qubo(a, s, 2, 1.0, np.inf), "`cost_weight`"),
        (lambda a, s: build_qubo(a[:2], s, 2, 1.0, 1.0), "`similarity`"),
        (lambda a, s: build_qubo(a, s + np.triu(s, 1), 2, 1.0, 1.0), "symmetric"),
        (lambda a, s: build_qubo(np.array([np.nan, 1, 1, 1]), s, 2, 1.0, 1.0), "`accuracy`"),
        (lambda a, s: anneal(s, num_reads=0), "`num_reads`"),
        (lambda a, s: anneal(s, num_sweeps=-1), "`num_sweeps`"),
        (lambda a, s: anneal(s, beta_range=(2.0, 1.0)), "`beta_range`"),
        (lambda a, s: anneal(s, seed=-1), "`seed`"),
        (lambda a, s: anneal(np.ones((2, 3))), "`q`"),
        (lambda a, s: brute_force(np.zeros((21, 21))), "N <= 20"),
        (lambda a, s: qubo_energy(s, np.array([0, 2, 1, 0])), "0/1"),
        (lambda a, s: qubo_energy(s, np.ones(3)), "`x`"),
        (lambda a, s: prediction_similarity(np.ones((2, 3)) * 0.5), "integer"),
        (lambda a, s: prediction_similarity(np.zeros(3, dtype=int)), "`predictions`"),
        (lambda a, s: qubo_offset(-1, 1.0), "`k`"),
    ],
)
def test_validation(call, match: str) -> None:
    accuracy = np.array([0.9, 0.8, 0.7, 0.6])
    similarity = prediction_similarity(np.random.default_rng(0).integers(0, 2, (4, 10)))
    with pytest.raises(ValueError, match=match):
        call(accuracy, similarity)
