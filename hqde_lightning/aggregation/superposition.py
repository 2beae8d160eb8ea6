"""Confidence-weighted averaging ("superposition").

The name is borrowed from quantum mechanics; the maths is classical. Member ``i`` with
confidence score ``c_i`` (higher is better, e.g. validation accuracy or negative loss) gets
the amplitude ``a_i = sqrt(softmax(c / T)_i)``, so its probability ``a_i**2`` is a
temperature-``T`` softmax of the scores. The consensus is the weighted mean
``sum_i a_i**2 * w_i`` after the probabilities are multiplied by the prior (sample counts ×
reputation) and renormalised:

    weight_i = softmax(c / T)_i * prior_i / sum_j softmax(c / T)_j * prior_j

which equals ``softmax(c / T + log prior)`` and is computed that way to avoid underflow,
with the best score (among members of positive prior) subtracted before the division by ``T``
so that no ``c / T`` overflows. A small ``T`` approaches picking the best member (where
``c / T`` would overflow, the weights are that limit: all on the best-scored members, in
proportion to their prior); a large ``T`` approaches the plain prior-weighted mean. With no scores, or all scores equal, the weights are exactly the
normalised prior, so the consensus is exactly :class:`~hqde_lightning.aggregation.mean.Mean`'s.

The same rule combines member predictions: ``sum_i weight_i * p_i`` over member
probabilities, using :func:`superposition_weights`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from hqde_lightning.aggregation.base import Aggregator, normalise
from hqde_lightning.validation import check_number

__all__ = ["Superposition", "superposition_weights"]


def superposition_weights(scores: Tensor, temperature: float, prior: Tensor | None = None) -> Tensor:
    """Per-member weights ``a_i**2 * prior_i`` (renormalised) from confidence scores.

    A non-finite score (a member whose mean loss is inf or NaN) is the lowest confidence there
    is: that member gets weight zero. When no score is finite, the weights are the prior's.

    Args:
        scores: shape ``(n,)``, one confidence per member, higher is better.
        temperature: softmax temperature ``T > 0``.
        prior: optional shape ``(n,)`` non-negative weights (sample counts × reputation);
            all ones when ``None``. An all-zero prior counts as uniform.

    Returns:
        float64 weights of shape ``(n,)`` summing to one. When every score is equal the
        result is exactly ``prior / prior.sum()``.

    Raises:
        ValueError: for a bad temperature, a bad prior, or shapes that disagree.
    """
    temperature = check_number(temperature, "temperature", 0, open_low=True)
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    prior = torch.ones_like(scores) if prior is None else torch.as_tensor(prior, dtype=torch.float64).reshape(-1)
    if prior.shape != scores.shape:
        raise ValueError(f"`prior` has {prior.numel()} entries for {scores.numel()} scores")
    if bool((prior < 0).any()) or not bool(torch.isfinite(prior).all()):
        raise ValueError("`prior` must be finite and non-negative")
    finite = torch.isfinite(scores)
    if not bool(finite.any()):
        return normalise(prior)
    if not bool(finite.all()):
        weights = torch.zeros_like(scores)
        weights[finite] = superposition_weights(scores[finite], temperature, prior[finite])
        return weights
    if not bool(prior.sum() > 0):
        prior = torch.ones_like(prior)
    if scores.numel() == 0 or bool((scores == scores[0]).all()):
        return normalise(prior)
    # softmax(c / T + log prior), with the best score among members of positive prior subtracted
    # first so that c / T cannot overflow: (c - best) / T is <= 0 for those members, -inf where it
    # underflows (T -> 0 keeps all the weight on the best members, in proportion to their prior)
    positive = prior > 0
    best = scores[positive].max()
    logits = ((scores - best) / temperature).nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    logits = torch.where(positive, logits + torch.log(torch.where(positive, prior, 1.0)), float("-inf"))
    return torch.softmax(logits, dim=0)


class Superposition(Aggregator):
    """Weighted mean with weights ``softmax(scores / temperature) × prior`` (renormalised).

    Args:
        temperature: softmax temperature ``T > 0``; smaller trusts the best-scored
            members more.
    """

    name = "superposition"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = check_number(temperature, "temperature", 0, open_low=True)

    def combine(self, matrix: Tensor, scores: Tensor | None, prior: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        if scores is None:
            weights = normalise(prior)
            probabilities = torch.full_like(prior, 1.0 / prior.numel())
        else:
            weights = superposition_weights(scores, self.temperature, prior)
            probabilities = superposition_weights(scores, self.temperature)
        info = {"amplitudes": probabilities.sqrt().tolist(), "temperature": self.temperature}
        return weights.to(matrix.dtype) @ matrix, weights, info

    def partial_score(self, scores: Sequence[float], weights: Sequence[float]) -> float:
        """The log-mean-exp ``T * log(sum_i w_i exp(c_i / T) / sum_i w_i)`` of the finite scores.

        A partial result (the superposition of some members) that carries the total weight
        ``W = sum_i w_i`` of its members and this score gets ``W * exp(S / T)``, exactly the
        sum of its members' ``w_i * exp(c_i / T)``, so combining partial results (a tree)
        gives every member the weight it gets when all are combined at once. Members without
        a finite score add nothing (they have weight zero in the superposition); NaN when no
        member of positive weight has a finite score. Computed with the best such score taken
        out first, so no ``exp`` overflows.
        """
        pairs = [(float(c), float(w)) for c, w in zip(scores, weights)]
        total = sum(w for _, w in pairs)
        usable = [(c, w) for c, w in pairs if math.isfinite(c) and w > 0]
        if not usable or total <= 0:
            return float("nan")
        best = max(c for c, _ in usable)
        mass = sum(w * math.exp((c - best) / self.temperature) for c, w in usable)  # >= the best's weight > 0
        return best + self.temperature * math.log(mass / total)
