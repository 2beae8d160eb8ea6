"""Weighted arithmetic mean (federated averaging)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from hqde_lightning.aggregation.base import Aggregator, normalise

__all__ = ["Mean"]


class Mean(Aggregator):
    """Coordinate-wise mean, weighted by the prior (sample counts × reputation).

    With equal sample counts this is the plain average of the members (FedAvg).
    """

    name = "mean"

    def combine(self, matrix: Tensor, scores: Tensor | None, prior: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        weights = normalise(prior)
        return weights.to(matrix.dtype) @ matrix, weights, {}
