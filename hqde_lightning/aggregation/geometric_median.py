"""Geometric median of the members by smoothed Weiszfeld iterations.

The consensus is ``argmin_z sum_i p_i * ||w_i - z||`` (``p`` = prior: sample counts ×
reputation, normalised to sum to one). Unlike the mean, fewer than half of the
(prior-weighted) members cannot move it arbitrarily far: its breakdown point is 1/2.

Smoothed Weiszfeld (Pillutla, Kakade & Harchaoui, "Robust Aggregation for Federated
Learning", 2022):

    beta_i = p_i / max(eps, ||w_i - z_k||),   z_{k+1} = sum_i beta_i w_i / sum_i beta_i

``eps`` bounds the weight of a member that sits on the current estimate. Every step of the
computation is robust too, so a minority far away (1e9, 1e20, ...) changes neither where the
iterations start nor when they stop:

* the iterations run on the members centred at their prior-weighted coordinate-wise median,
  in float64, with distances that cannot overflow (a norm that would is rescaled by the
  row's largest entry), so float32 members lose no precision to the size of a far member;
* they start from the median moved by one Weiszfeld step whose distances are clipped below
  at the prior-weighted median distance ``s`` (members of prior ``q`` in all, however far, move
  it by at most ``2 q s``; and it is seldom exactly on a member, where Weiszfeld would crawl);
* they stop when the step ``||z_{k+1} - z_k||`` is at most ``tol`` times the prior-weighted
  harmonic mean of the smoothed distances, ``1 / sum_i beta_i`` — equivalently, when the
  smoothed objective's gradient ``sum_i p_i (z_k - w_i) / max(eps, ||w_i - z_k||)`` (a sum
  of at most unit vectors) has norm at most ``tol`` — or after ``max_iter`` iterations. A
  far member adds almost nothing to ``sum_i beta_i``, so unlike the mean distance, it cannot
  loosen the rule; the rule does not depend on the scale or offset of the weights (beyond
  ``eps``), and ``converged`` says whether it was met.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hqde_lightning.aggregation.base import Aggregator, normalise
from hqde_lightning.validation import check_int, check_number

__all__ = ["GeometricMedian", "weighted_coordinate_median"]

#: values per chunk of columns processed at once (small float64 temporaries stay in cache and are not mmapped)
_CHUNK_VALUES = 1 << 16


def _chunks(matrix: Tensor) -> list[slice]:
    width = max(1, _CHUNK_VALUES // max(1, matrix.shape[0]))
    return [slice(start, start + width) for start in range(0, matrix.shape[1], width)]


def weighted_coordinate_median(matrix: Tensor, prior: Tensor) -> Tensor:
    """Prior-weighted coordinate-wise median of the rows of ``matrix``, in float64.

    In every column, the value at which the prior of the rows at or below it first reaches half
    the total; where exactly half the prior lies on either side, the mean of the two values
    that split it (so equal priors give the usual median). Rows of zero prior count for nothing.

    Args:
        matrix: shape ``(n, P)``, finite.
        prior: shape ``(n,)``, non-negative float64 with a positive sum.

    Returns:
        float64 tensor of shape ``(P,)``.
    """
    prior = prior.to(torch.float64)
    n = matrix.shape[0]
    total = float(prior.sum())
    out = torch.empty(matrix.shape[1], dtype=torch.float64)
    uniform = bool((prior == prior[0]).all())
    for part in _chunks(matrix):
        if uniform:  # the usual median: the middle value, or the mean of the two middle values
            values = torch.sort(matrix[:, part], dim=0).values.to(torch.float64)
            out[part] = values[(n - 1) // 2] / 2 + values[n // 2] / 2
            continue
        values, order = torch.sort(matrix[:, part], dim=0)
        reached = torch.cumsum(prior[order], dim=0) * 2  # twice the prior at or below each sorted value
        lower = (reached < total).sum(dim=0, keepdim=True).clamp_max(n - 1)
        upper = (reached <= total).sum(dim=0, keepdim=True).clamp_max(n - 1)
        out[part] = values.gather(0, lower)[0].to(torch.float64) / 2 + values.gather(0, upper)[0].to(torch.float64) / 2
    return out


def _norm(vector: Tensor) -> float:
    """Euclidean norm of a float64 vector that does not overflow while the result fits in a float64."""
    value = float(torch.linalg.vector_norm(vector))
    if value == float("inf"):
        largest = float(vector.abs().max())
        if largest > 0:
            value = largest * float(torch.linalg.vector_norm(vector / largest))
    return value


def _distances(matrix: Tensor, anchor: Tensor, estimate: Tensor) -> Tensor:
    """float64 ``||(matrix_i - anchor) - estimate||`` per row, overflow-safe (``anchor``, ``estimate`` float64)."""
    squares = torch.zeros(matrix.shape[0], dtype=torch.float64)
    for part in _chunks(matrix):
        squares += ((matrix[:, part].to(torch.float64) - anchor[part]) - estimate[part]).square().sum(dim=1)
    distances = squares.sqrt()
    for row in torch.nonzero(~torch.isfinite(distances)).flatten().tolist():
        distances[row] = _norm((matrix[row].to(torch.float64) - anchor) - estimate)
    return distances


def _weighted_mean(matrix: Tensor, anchor: Tensor, weights: Tensor) -> Tensor:
    """float64 ``weights @ (matrix - anchor)`` (``weights`` float64 summing to one), column chunk by chunk."""
    out = torch.empty(matrix.shape[1], dtype=torch.float64)
    for part in _chunks(matrix):
        out[part] = weights @ (matrix[:, part].to(torch.float64) - anchor[part])
    return out


def _weighted_median(values: Tensor, prior: Tensor) -> float:
    return float(weighted_coordinate_median(values.unsqueeze(1), prior)[0])


class GeometricMedian(Aggregator):
    """Prior-weighted geometric median (robust to fewer than half bad members).

    Args:
        tol: stopping tolerance (> 0) on the norm of the smoothed objective's gradient, a
            number between 0 and 1 that does not depend on the scale of the weights; see the
            module docstring.
        max_iter: maximum number of Weiszfeld iterations (int >= 1).
        eps: smoothing distance (> 0): distances below it count as ``eps``.

    ``info`` holds ``{"iterations": k, "converged": bool}``; the per-member weights are the
    final normalised Weiszfeld weights ``beta``, so the consensus is ``beta @ members``.
    """

    name = "geometric_median"
    robust = True

    def __init__(self, tol: float = 1e-6, max_iter: int = 100, eps: float = 1e-8) -> None:
        self.tol = check_number(tol, "tol", 0, open_low=True)
        self.max_iter = check_int(max_iter, "max_iter", 1)
        self.eps = check_number(eps, "eps", 0, open_low=True)

    def combine(self, matrix: Tensor, scores: Tensor | None, prior: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        prior = normalise(prior.to(torch.float64))
        if bool((matrix == matrix[0]).all()):
            return matrix[0].clone(), prior, {"iterations": 0, "converged": True}
        # anchor: the weighted coordinate-wise median; the members are used as ``matrix - anchor`` in float64
        anchor = weighted_coordinate_median(matrix, prior)
        estimate = torch.zeros_like(anchor)
        distances = _distances(matrix, anchor, estimate)
        spread = _weighted_median(distances, prior)
        weights = normalise(prior / distances.clamp_min(max(spread, self.eps)))
        estimate = _weighted_mean(matrix, anchor, weights)
        converged = False
        iterations = 0
        while iterations < self.max_iter and not converged:
            iterations += 1
            beta = prior / _distances(matrix, anchor, estimate).clamp_min(self.eps)
            weights = normalise(beta)
            step_to = _weighted_mean(matrix, anchor, weights)
            step = _norm(step_to - estimate)
            converged = step * float(beta.sum()) <= self.tol
            estimate = step_to
        consensus = (anchor + estimate).to(matrix.dtype)
        return consensus, weights, {"iterations": iterations, "converged": converged}
