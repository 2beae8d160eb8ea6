"""Coordinate-wise trimmed mean (Yin et al., "Byzantine-Robust Distributed Learning", 2018).

For every coordinate separately, the ``k = floor(beta * n)`` largest and ``k`` smallest
member values are dropped and the remaining ``n - 2k`` are averaged, weighted by the prior
(sample counts × reputation; the plain average where the surviving priors are all zero).
Up to ``k`` arbitrarily bad members per coordinate cannot move the result outside the range
of the honest values.

The per-member weight reported is the fraction of coordinates in which the member survived
trimming, times its prior, normalised to sum to one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from hqde_lightning.aggregation.base import Aggregator, normalise
from hqde_lightning.validation import check_number

__all__ = ["TrimmedMean"]


class TrimmedMean(Aggregator):
    """Coordinate-wise mean after dropping the ``floor(beta * n)`` extremes on each side.

    Args:
        beta: fraction trimmed from each side, ``0 <= beta < 0.5``; 0 is the plain
            prior-weighted mean.
    """

    name = "trimmed_mean"
    robust = True

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = check_number(beta, "beta", 0, 0.5, open_high=True)

    def num_trimmed(self, num_members: int) -> int:
        """Members dropped from each side per coordinate: ``floor(beta * n)``.

        A ``1e-9`` slack keeps products such as ``0.29 * 100`` from flooring one short.
        """
        return math.floor(self.beta * num_members + 1e-9)

    def combine(self, matrix: Tensor, scores: Tensor | None, prior: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        n = matrix.shape[0]
        trimmed = self.num_trimmed(n)
        if 2 * trimmed >= n:
            raise ValueError(
                f"TrimmedMean(beta={self.beta}) drops {trimmed} members from each side and needs at least"
                f" {2 * trimmed + 1} members, got {n}"
            )
        values, order = torch.sort(matrix, dim=0)
        values, order = values[trimmed : n - trimmed], order[trimmed : n - trimmed]
        survivor_prior = prior.to(matrix.dtype)[order]
        totals = survivor_prior.sum(dim=0)
        survivor_prior = torch.where(totals > 0, survivor_prior, torch.ones_like(survivor_prior))
        consensus = (values * survivor_prior).sum(dim=0) / survivor_prior.sum(dim=0)
        survived = torch.bincount(order.reshape(-1), minlength=n).to(torch.float64)
        weights = normalise(survived * prior)
        return consensus, weights, {"trimmed_per_side": trimmed}
