"""Krum and Multi-Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent", NeurIPS 2017).

With ``n`` members of which at most ``f`` are Byzantine, member ``i``'s score is the sum of
squared Euclidean distances to its ``n - f - 2`` nearest other members. Krum returns the
member with the lowest score (ties, such as the two members of the closest pair when
``n - f - 2 = 1``, go to the member with the smaller total squared distance to all others,
then to the lower index); Multi-Krum averages the ``m``
lowest-scored members (default ``m = n - f``), weighted by the prior (sample counts ×
reputation). Both need ``n > 2f + 2``.

Krum returns one member unchanged, so it does not use the prior; Multi-Krum's average does.

A call with ``n <= 2f + 2`` members (members stopped early or were dropped during a fit) falls
back to the prior-weighted geometric median, whose breakdown point (1/2) is the best any rule
can offer on the members that are left, and warns once per aggregator; ``info`` then holds
``{"fallback": "geometric_median"}``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from hqde_lightning.aggregation.base import Aggregator, normalise
from hqde_lightning.aggregation.geometric_median import GeometricMedian
from hqde_lightning.validation import check_int, check_optional

__all__ = ["Krum", "MultiKrum", "krum_ranking", "krum_scores"]


def _scores_and_totals(matrix: Tensor, num_byzantine: int, rule: str) -> tuple[Tensor, Tensor]:
    n = matrix.shape[0]
    if n <= 2 * num_byzantine + 2:
        raise ValueError(
            f"{rule} needs n > 2f + 2 members: got n={n}, f={num_byzantine}"
            f" (use at least {2 * num_byzantine + 3} members or a smaller `num_byzantine`)"
        )
    distances = torch.cdist(matrix, matrix, compute_mode="donot_use_mm_for_euclid_dist").to(torch.float64) ** 2
    distances = (distances + distances.T) / 2  # exactly symmetric, so mutual nearest pairs tie exactly
    totals = distances.sum(dim=1)
    distances.fill_diagonal_(float("inf"))
    nearest = torch.sort(distances, dim=1).values[:, : n - num_byzantine - 2]
    return nearest.sum(dim=1), totals


def krum_scores(matrix: Tensor, num_byzantine: int, rule: str = "Krum") -> Tensor:
    """Krum score of every row: sum of squared distances to its ``n - f - 2`` nearest rows.

    Args:
        matrix: shape ``(n, P)``, finite.
        num_byzantine: ``f``, the number of Byzantine rows tolerated.
        rule: the rule's name, used in the error message.

    Returns:
        float64 scores of shape ``(n,)``; lower is more central.

    Raises:
        ValueError: when ``n <= 2f + 2``.
    """
    return _scores_and_totals(matrix, num_byzantine, rule)[0]


def krum_ranking(matrix: Tensor, num_byzantine: int, rule: str = "Krum") -> tuple[Tensor, Tensor]:
    """Krum scores and the rows ordered from most to least central.

    Rows are ordered by Krum score; equal scores (which always happen when ``n - f - 2 = 1``:
    the two members of the closest pair share their score) are ordered by the total squared
    distance to all other rows, then by index. The order therefore does not depend on how
    the members are numbered, unless both keys tie.

    Args:
        matrix: shape ``(n, P)``, finite.
        num_byzantine: ``f``, the number of Byzantine rows tolerated.
        rule: the rule's name, used in the error message.

    Returns:
        ``(float64 scores of shape (n,), int64 row indices of shape (n,))``.

    Raises:
        ValueError: when ``n <= 2f + 2``.
    """
    scores, totals = _scores_and_totals(matrix, num_byzantine, rule)
    by_total = torch.argsort(totals, stable=True)
    return scores, by_total[torch.argsort(scores[by_total], stable=True)]


def _too_few(rule: Aggregator, f: int, n: int, matrix: Tensor, prior: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]] | None:
    """The geometric-median fallback when ``n <= 2f + 2`` (warned once per ``rule``), else ``None``."""
    if n > 2 * f + 2:
        return None
    if not getattr(rule, "_warned_too_few", False):
        rule._warned_too_few = True
        warnings.warn(
            f"{type(rule).__name__}(num_byzantine={f}) needs n > 2f + 2 members but this round has n={n} (members stopped"
            " or were dropped); rounds with too few members use the geometric median instead",
            RuntimeWarning,
            stacklevel=3,
        )
    consensus, weights, info = GeometricMedian().combine(matrix, None, prior)
    return consensus, weights, {**info, "fallback": "geometric_median"}


def _tolerated(num_byzantine: int, n: int, num_excluded: int) -> int:
    """``f``, or, when known-bad members were left out and ``n <= 2f + 2``, the largest ``f' < f`` with ``n > 2f' + 2``."""
    if num_excluded and n <= 2 * num_byzantine + 2:
        return max(0, min(num_byzantine, (n - 3) // 2))
    return num_byzantine


class Krum(Aggregator):
    """Selects the single member with the lowest Krum score.

    Args:
        num_byzantine: ``f >= 0``, the number of Byzantine members tolerated; a call needs
            ``n > 2f + 2`` members (fewer fall back to the geometric median, see the module docstring). When members were already left out as NaN/Inf (known
            Byzantine) and too few remain, ``f`` is lowered to the largest value the remaining
            members allow, which is never below ``f`` minus the number left out.
    """

    name = "krum"
    robust = True

    def __init__(self, num_byzantine: int = 1) -> None:
        self.num_byzantine = check_int(num_byzantine, "num_byzantine", 0)

    def combine(self, matrix: Tensor, scores: Tensor | None, prior: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        f = _tolerated(self.num_byzantine, matrix.shape[0], self.num_excluded)
        fallback = _too_few(self, f, matrix.shape[0], matrix, prior)
        if fallback is not None:
            return fallback
        krum, order = krum_ranking(matrix, f, "Krum")
        chosen = int(order[0])
        weights = torch.zeros(matrix.shape[0], dtype=torch.float64)
        weights[chosen] = 1.0
        return matrix[chosen].clone(), weights, {"scores": krum.tolist(), "selected": [chosen]}


class MultiKrum(Aggregator):
    """Prior-weighted mean of the ``num_selected`` members with the lowest Krum scores.

    Args:
        num_byzantine: ``f >= 0``, the number of Byzantine members tolerated; a call needs
            ``n > 2f + 2`` members (members already left out as NaN/Inf count against ``f``).
        num_selected: ``m >= 1`` members averaged; ``None`` means ``n - f``. A call with
            fewer than ``m`` members raises ``ValueError``.
    """

    name = "multi_krum"
    robust = True

    def __init__(self, num_byzantine: int = 1, num_selected: int | None = None) -> None:
        self.num_byzantine = check_int(num_byzantine, "num_byzantine", 0)
        self.num_selected = check_optional(check_int, num_selected, "num_selected", 1)

    def combine(self, matrix: Tensor, scores: Tensor | None, prior: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        n = matrix.shape[0]
        f = _tolerated(self.num_byzantine, n, self.num_excluded)
        fallback = _too_few(self, f, n, matrix, prior)
        if fallback is not None:
            return fallback
        krum, order = krum_ranking(matrix, f, "Multi-Krum")
        selected_count = n - f if self.num_selected is None else self.num_selected
        if selected_count > n:
            raise ValueError(f"MultiKrum(num_selected={selected_count}) needs at least that many members, got n={n}")
        selected = torch.sort(order[:selected_count]).values
        weights = torch.zeros(n, dtype=torch.float64)
        weights[selected] = normalise(prior[selected])
        consensus = weights.to(matrix.dtype) @ matrix
        return consensus, weights, {"scores": krum.tolist(), "selected": selected.tolist()}
