"""Geometric median of the members by smoothed Weiszfeld iterations.

The consensus is ``argmin_z sum_i p_i * ||w_i - z||`` (``p`` = prior: sample counts ×
reputation). Unlike the mean, fewer than half of the (prior-weighted) members cannot move it
arbitrarily far: its breakdown point is 1/2.

Smoothed Weiszfeld (Pillutla, Kakade & Harchaoui, "Robust Aggregation for Federated
Learning", 2022): starting from the prior-weighted mean ``z_0``,

    beta_i = p_i / max(eps, ||w_i - z_k||),   z_{k+1} = sum_i beta_i w_i / sum_i beta_i

``eps`` bounds the weight of a member that sits on the current estimate. The iterations run
on the members centred at ``z_0`` so float32 rounding is relative to the members' spread,
not to the size of the weights. They stop when the step ``||z_{k+1} - z_k||`` is at most
``tol`` times the current prior-weighted mean distance of the members to the estimate
(a relative change that does not depend on the scale or offset of the weights), or after
``max_iter`` iterations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hqde_lightning.aggregation.base import Aggregator, normalise
from hqde_lightning.validation import check_int, check_number

__all__ = ["GeometricMedian"]


class GeometricMedian(Aggregator):
    """Prior-weighted geometric median (robust to fewer than half bad members).

    Args:
        tol: relative stopping tolerance (> 0), see the module docstring.
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
        prior = normalise(prior)
        if bool((matrix == matrix[0]).all()):
            return matrix[0].clone(), prior, {"iterations": 0, "converged": True}
        anchor = prior.to(matrix.dtype) @ matrix
        centred = matrix - anchor
        estimate = torch.zeros_like(anchor)
        weights = prior
        converged = False
        iterations = 0
        while iterations < self.max_iter and not converged:
            iterations += 1
            distances = torch.linalg.vector_norm(centred - estimate, dim=1).to(torch.float64)
            weights = normalise(prior / distances.clamp_min(self.eps))
            step_to = weights.to(matrix.dtype) @ centred
            step = float(torch.linalg.vector_norm(step_to - estimate))
            converged = step <= self.tol * max(float(prior @ distances), self.eps)
            estimate = step_to
        return anchor + estimate, weights, {"iterations": iterations, "converged": converged}
