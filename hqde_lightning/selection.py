"""Ensemble member selection as a QUBO, solved by classical simulated annealing.

This is classical maths in numpy (no Ray, no Lightning, no quantum hardware); "QUBO" and
"annealing" are the quantum-inspired names of an ordinary binary optimisation problem. We
choose a subset ``x ∈ {0, 1}^N`` of members minimising

    E(x) = −Σ_i acc_i x_i + λ Σ_{i<j} sim_ij x_i x_j + μ (Σ_i x_i − k)²

(accurate members, little agreement between chosen members, about ``k`` of them). Because
``x_i² = x_i`` this is ``xᵀ Q x + μ k²`` for the upper-triangular ``Q`` of :func:`build_qubo`:

    Q_ii = −acc_i + μ (1 − 2k),   Q_ij = λ sim_ij + 2μ   (i < j).

:func:`qubo_offset` gives the constant ``μ k²`` so that ``qubo_energy(Q, x, offset)`` is the
formula exactly. Without ``k`` the size term is a cost per member, ``μ Σ_i x_i``
(``Q_ii = −acc_i + μ``, ``Q_ij = λ sim_ij``, offset 0).

The empty subset is never an answer: :func:`anneal` and :func:`brute_force` search the
non-empty subsets only (see :func:`anneal` for how).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hqde_lightning.validation import check_int, check_number, check_optional

__all__ = [
    "SelectionResult",
    "anneal",
    "brute_force",
    "build_qubo",
    "exact_k_cost_weight",
    "prediction_similarity",
    "qubo_energy",
    "qubo_offset",
    "select_members",
]

_BRUTE_FORCE_MAX = 20
_BRUTE_FORCE_CHUNK = 1 << 15


@dataclass(eq=False)
class SelectionResult:
    """What :func:`anneal` found.

    Attributes:
        best_x: boolean mask of the chosen members (never all False).
        best_energy: ``qubo_energy(Q, best_x, offset)``.
        energies: the best non-empty energy each read reached (``inf`` for a read that never
            left the empty subset), shape ``(num_reads,)``.
        samples: the corresponding best state of each read, boolean ``(num_reads, N)``.
    """

    best_x: np.ndarray
    best_energy: float
    energies: np.ndarray
    samples: np.ndarray


def _check_square(name: str, matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty square matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"`{name}` must be finite")
    return matrix


def _check_inputs(accuracy: np.ndarray, similarity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    accuracy = np.asarray(accuracy, dtype=np.float64)
    if accuracy.ndim != 1 or accuracy.size == 0 or not np.isfinite(accuracy).all():
        raise ValueError(f"`accuracy` must be a non-empty finite 1-D array, got shape {accuracy.shape}")
    similarity = _check_square("similarity", similarity)
    if similarity.shape[0] != accuracy.size:
        raise ValueError(f"`similarity` must be ({accuracy.size}, {accuracy.size}), got {similarity.shape}")
    if not np.allclose(similarity, similarity.T):
        raise ValueError("`similarity` must be symmetric")
    return accuracy, similarity


def build_qubo(
    accuracy: np.ndarray,
    similarity: np.ndarray,
    k: int | None,
    diversity_weight: float,
    cost_weight: float,
) -> np.ndarray:
    """The upper-triangular QUBO matrix of the selection problem (see the module docstring).

    Args:
        accuracy: ``(N,)`` member scores (higher is better), finite.
        similarity: ``(N, N)`` symmetric agreement between members (the diagonal is ignored).
        k: target number of members in [1, N], or ``None`` for a per-member cost instead.
        diversity_weight: λ ≥ 0, penalty per unit of similarity between two chosen members.
        cost_weight: μ ≥ 0, weight of ``(Σx − k)²`` (or of ``Σx`` when ``k`` is None).

    Returns:
        ``Q`` of shape ``(N, N)``, zero below the diagonal, with
        ``qubo_energy(Q, x, qubo_offset(k, cost_weight))`` equal to the objective for every ``x``.

    Raises:
        ValueError: for wrong shapes, non-finite or asymmetric inputs, negative weights or ``k``
            outside [1, N].
    """
    accuracy, similarity = _check_inputs(accuracy, similarity)
    check_optional(check_int, k, "k", 1, accuracy.size)
    check_number(diversity_weight, "diversity_weight", 0)
    check_number(cost_weight, "cost_weight", 0)
    size = accuracy.size
    upper = np.triu(np.ones((size, size), dtype=bool), k=1)
    pair = diversity_weight * similarity + (2.0 * cost_weight if k is not None else 0.0)
    linear = -accuracy + (cost_weight * (1 - 2 * k) if k is not None else cost_weight)
    return np.where(upper, pair, 0.0) + np.diag(linear)


def qubo_offset(k: int | None, cost_weight: float) -> float:
    """The constant ``μ k²`` dropped from ``Q`` by :func:`build_qubo` (0 when ``k`` is None).

    Args:
        k: the target size given to :func:`build_qubo`, or ``None``.
        cost_weight: the μ given to :func:`build_qubo`.

    Returns:
        The offset to pass to :func:`qubo_energy`.

    Raises:
        ValueError: for a negative ``cost_weight`` or a ``k`` that is not a positive integer.
    """
    check_number(cost_weight, "cost_weight", 0)
    if k is None:
        return 0.0
    return float(cost_weight) * float(check_int(k, "k", 1)) ** 2


def qubo_energy(q: np.ndarray, x: np.ndarray, offset: float = 0.0) -> float | np.ndarray:
    """``xᵀ Q x + offset`` for one subset or a batch of subsets.

    Args:
        q: ``(N, N)`` QUBO matrix (upper-triangular or symmetric).
        x: ``(N,)`` or ``(R, N)`` 0/1 or boolean array.
        offset: constant added to every energy (see :func:`qubo_offset`).

    Returns:
        A float for one subset, a ``(R,)`` array for a batch.

    Raises:
        ValueError: for mismatched shapes or entries of ``x`` other than 0 and 1.
    """
    q = _check_square("q", q)
    x = np.asarray(x)
    if x.ndim not in (1, 2) or x.shape[-1] != q.shape[0]:
        raise ValueError(f"`x` must have shape ({q.shape[0]},) or (R, {q.shape[0]}), got {x.shape}")
    if not np.isin(x, (0, 1)).all():
        raise ValueError("`x` must hold only 0/1 (or booleans)")
    values = x.astype(np.float64)
    energies = np.einsum("...i,ij,...j->...", values, q, values) + float(offset)
    return float(energies) if x.ndim == 1 else energies


def _default_beta_range(q: np.ndarray) -> tuple[float, float]:
    """Hot end accepts the largest flip cost with probability 1/2, cold end the smallest with 1/100."""
    coupling = q + q.T
    np.fill_diagonal(coupling, 0.0)
    linear = np.abs(np.diag(q))
    largest = float((linear + np.abs(coupling).sum(axis=1)).max())
    magnitudes = np.concatenate([linear, np.abs(coupling[np.triu_indices_from(coupling, k=1)])])
    nonzero = magnitudes[magnitudes > 0]
    if largest == 0.0 or nonzero.size == 0:
        return 0.1, 1.0
    smallest = float(nonzero.min())
    hot, cold = math.log(2.0) / largest, math.log(100.0) / smallest
    return hot, max(hot, cold)


def anneal(
    q: np.ndarray,
    num_reads: int = 64,
    num_sweeps: int = 500,
    beta_range: tuple[float, float] | None = None,
    seed: int | None = None,
    offset: float = 0.0,
) -> SelectionResult:
    """Simulated annealing of ``xᵀ Q x`` over non-empty subsets, all reads in parallel.

    Each sweep visits every spin once in order and proposes a single-bit flip, accepted with
    the Metropolis rule ``min(1, exp(−β ΔE))``; all reads are updated together per spin (numpy,
    no loop over reads). β follows a geometric schedule over the sweeps. Each read remembers the
    best non-empty state it held at the end of a sweep. The answer is the best of those and of
    the N single-member subsets; from a :func:`build_qubo` matrix the best single member is the
    most accurate one, so when annealing only ever sat on the empty subset the most accurate
    member is returned rather than nothing.

    Args:
        q: ``(N, N)`` QUBO matrix (upper-triangular or symmetric), finite.
        num_reads: independent chains, ≥ 1.
        num_sweeps: sweeps per chain, ≥ 1.
        beta_range: ``(hot, cold)`` inverse temperatures, ``0 < hot <= cold``; by default the
            hot end accepts the largest possible flip cost with probability 1/2 and the cold end
            the smallest non-zero coefficient with probability 1/100.
        seed: seed of the random initial states and acceptance draws, or ``None``.
        offset: constant added to every reported energy (see :func:`qubo_offset`).

    Returns:
        A :class:`SelectionResult`; ``best_energy == qubo_energy(q, best_x, offset)``.

    Raises:
        ValueError: for a non-square or non-finite ``q``, non-positive ``num_reads`` or
            ``num_sweeps``, an invalid ``beta_range`` or a negative ``seed``.
    """
    q = _check_square("q", q)
    check_int(num_reads, "num_reads", 1)
    check_int(num_sweeps, "num_sweeps", 1)
    check_optional(check_int, seed, "seed", 0)
    if beta_range is None:
        beta_range = _default_beta_range(q)
    elif not (
        len(beta_range) == 2
        and all(math.isfinite(b) and b > 0 for b in beta_range)
        and beta_range[0] <= beta_range[1]
    ):
        raise ValueError(f"`beta_range` must be (hot, cold) with 0 < hot <= cold, got {beta_range!r}")
    rng = np.random.default_rng(seed)
    size = q.shape[0]
    linear = np.diag(q).copy()
    coupling = q + q.T
    np.fill_diagonal(coupling, 0.0)

    # spins-major layout: state[i] holds spin i of every read, so per-spin updates are contiguous
    state = rng.integers(0, 2, size=(size, num_reads)).astype(np.float64)
    field = coupling @ state  # field[i, r] = Σ_j (Q_ij + Q_ji) x_j for read r
    energy = linear @ state + 0.5 * np.einsum("ir,ir->r", state, field)
    best_energy = np.full(num_reads, np.inf)
    best_state = np.zeros((size, num_reads))
    for beta in np.geomspace(beta_range[0], beta_range[1], num_sweeps):
        log_uniform = np.log(rng.random((size, num_reads)))
        for i in range(size):
            sign = 1.0 - 2.0 * state[i]
            delta = sign * (linear[i] + field[i])
            accept = -beta * delta >= log_uniform[i]
            change = sign * accept
            state[i] += change
            field += np.outer(coupling[:, i], change)
            energy += delta * accept
        improved = (energy < best_energy) & state.any(axis=0)
        best_energy = np.where(improved, energy, best_energy)
        best_state[:, improved] = state[:, improved]

    samples = best_state.T.astype(bool)
    found = np.isfinite(best_energy)
    energies = np.full(num_reads, np.inf)
    if found.any():
        energies[found] = qubo_energy(q, samples[found], offset)
    singles = linear + float(offset)
    best_read = int(np.argmin(energies))
    if energies[best_read] <= singles.min():
        best_x = samples[best_read].copy()
    else:
        best_x = np.zeros(size, dtype=bool)
        best_x[int(np.argmin(singles))] = True
    return SelectionResult(
        best_x=best_x, best_energy=qubo_energy(q, best_x, offset), energies=energies, samples=samples
    )


def brute_force(q: np.ndarray, offset: float = 0.0) -> tuple[np.ndarray, float]:
    """The exact minimiser of ``xᵀ Q x`` over the non-empty subsets (for checking :func:`anneal`).

    Args:
        q: ``(N, N)`` QUBO matrix with ``N <= 20``.
        offset: constant added to the energy.

    Returns:
        ``(x, energy)``: the boolean mask (lowest index order wins ties) and its energy.

    Raises:
        ValueError: for a non-square, non-finite or too large ``q``.
    """
    q = _check_square("q", q)
    size = q.shape[0]
    if size > _BRUTE_FORCE_MAX:
        raise ValueError(f"`q` is {size}x{size}; brute_force enumerates 2^N subsets and allows N <= {_BRUTE_FORCE_MAX}")
    powers = 1 << np.arange(size, dtype=np.int64)
    best_code, best_energy = 0, np.inf
    for start in range(1, 1 << size, _BRUTE_FORCE_CHUNK):
        codes = np.arange(start, min(start + _BRUTE_FORCE_CHUNK, 1 << size), dtype=np.int64)
        subsets = (codes[:, None] & powers) > 0
        energies = qubo_energy(q, subsets, offset)
        index = int(np.argmin(energies))
        if energies[index] < best_energy:
            best_code, best_energy = int(codes[index]), float(energies[index])
    best_x = (best_code & powers) > 0
    return best_x, best_energy


def prediction_similarity(predictions: np.ndarray) -> np.ndarray:
    """Fraction of samples on which two members predict the same label.

    Args:
        predictions: ``(N, S)`` integer labels, one row per member, ``S >= 1``.

    Returns:
        Symmetric ``(N, N)`` float64 matrix with ones on the diagonal.

    Raises:
        ValueError: if ``predictions`` is not a non-empty 2-D integer array.
    """
    predictions = np.asarray(predictions)
    if predictions.ndim != 2 or predictions.shape[0] == 0 or predictions.shape[1] == 0:
        raise ValueError(f"`predictions` must be a non-empty (N, S) array, got shape {predictions.shape}")
    if not np.issubdtype(predictions.dtype, np.integer):
        raise ValueError(f"`predictions` must hold integer labels, got dtype {predictions.dtype}")
    return np.stack([(predictions == row).mean(axis=1) for row in predictions])


def exact_k_cost_weight(accuracy: np.ndarray, similarity: np.ndarray, diversity_weight: float) -> float:
    """A μ large enough that every minimiser of the QUBO has exactly ``k`` members.

    Moving one member in or out changes the accuracy and diversity terms by at most
    ``B = max|acc_i| + λ · max_i Σ_{j≠i} |sim_ij|`` and, away from ``k``, the size term by at
    least μ; so any ``μ > B`` makes a subset of the wrong size improvable. Returns ``B + 1``.

    Args:
        accuracy: ``(N,)`` member scores.
        similarity: ``(N, N)`` symmetric similarity.
        diversity_weight: λ ≥ 0.

    Returns:
        The cost weight μ.

    Raises:
        ValueError: for invalid inputs, as in :func:`build_qubo`.
    """
    accuracy, similarity = _check_inputs(accuracy, similarity)
    check_number(diversity_weight, "diversity_weight", 0)
    off_diagonal = np.abs(similarity) * (1.0 - np.eye(accuracy.size))
    bound = float(np.abs(accuracy).max()) + float(diversity_weight) * float(off_diagonal.sum(axis=1).max())
    return bound + 1.0


def select_members(
    accuracy: np.ndarray,
    predictions: np.ndarray,
    k: int | None = None,
    diversity_weight: float = 0.5,
    cost_weight: float | None = None,
    num_reads: int = 64,
    num_sweeps: int = 500,
    seed: int | None = None,
) -> np.ndarray:
    """Chooses accurate, mutually diverse members from their validation predictions.

    Args:
        accuracy: ``(N,)`` validation accuracy (or any higher-is-better score) per member.
        predictions: ``(N, S)`` integer labels each member predicted on the same ``S`` samples.
        k: target ensemble size in [1, N], or ``None`` to let the trade-off decide.
        diversity_weight: λ ≥ 0, penalty per unit of prediction agreement between chosen members.
        cost_weight: μ ≥ 0; ``None`` means :func:`exact_k_cost_weight` when ``k`` is given (exactly
            ``k`` members) and 0 (no per-member cost) otherwise.
        num_reads: annealing chains.
        num_sweeps: sweeps per chain.
        seed: annealing seed, or ``None``.

    Returns:
        Boolean mask of the chosen members (at least one).

    Raises:
        ValueError: for invalid inputs, as in :func:`build_qubo` and :func:`anneal`.
    """
    similarity = prediction_similarity(predictions)
    if cost_weight is None:
        cost_weight = 0.0 if k is None else exact_k_cost_weight(accuracy, similarity, diversity_weight)
    q = build_qubo(accuracy, similarity, k, diversity_weight, cost_weight)
    result = anneal(q, num_reads=num_reads, num_sweeps=num_sweeps, seed=seed, offset=qubo_offset(k, cost_weight))
    return result.best_x
