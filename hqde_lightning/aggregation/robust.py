"""Byzantine defence: a MAD outlier test, reputation scores, and a wrapper using both.

* :func:`mad_outliers` measures each member's Euclidean distance ``d_i`` to the
  coordinate-wise median of the members and flags members whose modified z-score
  (Iglewicz & Hoaglin) ``0.6745 * (d_i - median(d)) / MAD(d)`` exceeds ``threshold``. Only
  members *far* from the median are flagged, never ones that are unusually close.
* :class:`Reputation` keeps one score per member in ``[floor, 1]``: flagged members are
  multiplied by ``decay``, clean ones recover ``score += recovery * (1 - score)``.
* :class:`RobustAggregator` wraps any rule: each round it drops non-finite and flagged
  members, multiplies the prior by the reputation scores, runs the inner rule, and updates
  the reputations.

Plain torch only: no Ray, no Lightning.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hqde_lightning.aggregation.base import AggregationResult, Aggregator, Round
from hqde_lightning.validation import check_bool, check_int, check_number

__all__ = ["RobustAggregator", "Reputation", "coordinate_median", "mad_outliers"]

#: relative margin used when the MAD is zero, see :func:`mad_outliers`
MAD_ZERO_MARGIN = 1e-6


def coordinate_median(matrix: Tensor) -> Tensor:
    """Coordinate-wise median of the rows (the mean of the two middle values for even ``n``).

    Args:
        matrix: shape ``(n, P)`` with ``n >= 1``.

    Returns:
        shape ``(P,)``, same dtype as ``matrix``.
    """
    n = matrix.shape[0]
    ordered = torch.sort(matrix, dim=0).values
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def mad_outliers(matrix: Tensor, threshold: float = 3.5) -> Tensor:
    """Flags rows far from the coordinate-wise median by a robust (MAD) z-score.

    ``d_i = ||x_i - median||``, ``z_i = 0.6745 * (d_i - median(d)) / MAD`` with
    ``MAD = median(|d - median(d)|)``; row ``i`` is flagged when ``z_i > threshold``.

    When ``MAD == 0`` (at least half the rows are exactly as far from the median as the
    median distance, typically because they are identical), a row is flagged when
    ``d_i > median(d) + 1e-6 * max(median(d), ||median||)``: any row measurably farther out
    than the agreeing majority, with a relative slack so float rounding is not flagged.

    Only rows with ``d_i > median(d)`` can be flagged, so at most ``n // 2`` rows are
    flagged and the majority is never thrown away; with ``n <= 2`` nothing is flagged.

    Args:
        matrix: shape ``(n, P)``, finite.
        threshold: z-score above which a row is flagged (> 0; 3.5 is the usual choice).

    Returns:
        bool tensor of shape ``(n,)``.

    Raises:
        ValueError: for a non-2-D or non-finite ``matrix`` or a bad ``threshold``.
    """
    threshold = check_number(threshold, "threshold", 0, open_low=True)
    if matrix.dim() != 2:
        raise ValueError(f"`matrix` must have shape (num_members, num_values), got {tuple(matrix.shape)}")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("`matrix` must be finite; drop NaN/Inf rows before the outlier test")
    if matrix.shape[0] <= 2:  # one row, or two rows equally far from their midpoint: no majority to compare with
        return torch.zeros(matrix.shape[0], dtype=torch.bool)
    median = coordinate_median(matrix)
    distances = torch.linalg.vector_norm(matrix - median, dim=1).to(torch.float64)
    centre = coordinate_median(distances.unsqueeze(1))[0]
    mad = coordinate_median((distances - centre).abs().unsqueeze(1))[0]
    if bool(mad > 0):
        return 0.6745 * (distances - centre) / mad > threshold
    margin = MAD_ZERO_MARGIN * max(float(centre), float(torch.linalg.vector_norm(median)))
    return distances > centre + margin


class Reputation:
    """One trust score per member: decays when flagged, recovers on clean rounds.

    Scores start at 1. After a round, a flagged member's score becomes
    ``max(floor, score * decay)``; a clean member's becomes ``score + recovery * (1 - score)``.

    Args:
        num_members: number of members tracked (int >= 1).
        decay: multiplier for flagged members, in [0, 1].
        recovery: fraction of the gap to 1 regained per clean round, in [0, 1].
        floor: lowest score a member can fall to, in [0, 1].
    """

    def __init__(self, num_members: int, decay: float = 0.5, recovery: float = 0.1, floor: float = 0.0) -> None:
        self.num_members = check_int(num_members, "num_members", 1)
        self.decay = check_number(decay, "decay", 0, 1)
        self.recovery = check_number(recovery, "recovery", 0, 1)
        self.floor = check_number(floor, "floor", 0, 1)
        self._scores = torch.ones(num_members, dtype=torch.float64)

    @property
    def weights(self) -> Tensor:
        """The current scores (float64, shape ``(num_members,)``), used as prior weights."""
        return self._scores.clone()

    def update(self, flagged: Sequence[bool], members: Sequence[int] | None = None) -> None:
        """Applies one round: decay for flagged members, recovery for the others.

        Args:
            flagged: one bool per member that took part in the round.
            members: the indices of those members; ``None`` means every member, in order.
                Members not listed keep their scores.

        Raises:
            ValueError: when ``flagged`` and ``members`` (or ``num_members``) differ in length,
                or a member index is out of range.
        """
        index = torch.arange(self.num_members) if members is None else torch.as_tensor([int(m) for m in members], dtype=torch.long)
        mask = torch.as_tensor([bool(f) for f in flagged], dtype=torch.bool)
        if mask.numel() != index.numel():
            raise ValueError(f"`flagged` has {mask.numel()} entries for {index.numel()} members")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_members):
            raise ValueError(f"`members` {index.tolist()} must be indices in [0, {self.num_members})")
        scores = self._scores[index]
        decayed = (scores * self.decay).clamp_min(self.floor)
        recovered = scores + self.recovery * (1.0 - scores)
        self._scores[index] = torch.where(mask, decayed, recovered)

    def grow(self, num_members: int) -> None:
        """Tracks ``num_members`` members (at least as many as now); new members start at 1."""
        if num_members > self.num_members:
            self._scores = torch.cat([self._scores, torch.ones(num_members - self.num_members, dtype=torch.float64)])
            self.num_members = num_members

    def state_dict(self) -> dict[str, Any]:
        """Returns ``{"scores": float64 tensor of shape (num_members,)}``."""
        return {"scores": self._scores.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores the scores saved by :meth:`state_dict`.

        Args:
            state: a mapping with key ``"scores"``.

        Raises:
            ValueError: when the number of scores differs from ``num_members``.
        """
        scores = torch.as_tensor(state["scores"], dtype=torch.float64).reshape(-1)
        if scores.numel() != self.num_members:
            raise ValueError(f"the saved reputation has {scores.numel()} scores for {self.num_members} members")
        self._scores = scores.clone()

    def __repr__(self) -> str:
        return (
            f"Reputation(num_members={self.num_members}, decay={self.decay}, recovery={self.recovery},"
            f" floor={self.floor}, scores={self._scores.tolist()})"
        )


class RobustAggregator(Aggregator):
    """Runs a MAD outlier filter and reputation weighting in front of another rule.

    Reputations are kept per member index: pass ``members`` (the members' indices in the
    ensemble) and a round without some members (stopped early, dropped) leaves their scores
    as they are. Without ``members`` the position in the call is the index, and a call with a
    different number of members resets the reputations (with a warning), since who is who is
    then unknown. Members with NaN/Inf values are excluded and, like flagged ones, lose
    reputation.

    Args:
        inner: the rule that combines the surviving members (an :class:`Aggregator` or a
            registered name such as ``"mean"`` or ``"geometric_median"``).
        threshold: MAD z-score above which a member is excluded for the round (> 0).
        reputation: whether to keep reputation scores and multiply them into the prior.

    The result's ``excluded`` lists non-finite and flagged members; ``info`` holds the
    inner rule's info plus ``"flagged"`` (indices flagged by the MAD test) and
    ``"reputation"`` (the scores of this call's members after this round, or ``None`` when
    disabled).
    """

    name = "robust"
    robust = True

    def __init__(self, inner: Aggregator | str, threshold: float = 3.5, reputation: bool = True) -> None:
        from hqde_lightning.aggregation import resolve_aggregator

        self.inner = resolve_aggregator(inner)
        self.threshold = check_number(threshold, "threshold", 0, open_low=True)
        self.reputation = check_bool(reputation, "reputation")
        self._tracker: Reputation | None = None

    @property
    def tracker(self) -> Reputation | None:
        """The reputation scores (``None`` before the first round or when disabled)."""
        return self._tracker

    def _aggregate(self, round_: Round) -> AggregationResult:
        """Leaves out MAD outliers and weights the rest by reputation before the inner rule combines them."""
        n, members, prior, finite = len(round_.states), round_.members, round_.prior, round_.finite
        ids = list(range(n)) if members is None else [int(m) for m in members]
        if self.reputation:
            if members is None and self._tracker is not None and self._tracker.num_members != n:
                warnings.warn(
                    f"RobustAggregator saw {n} members after tracking {self._tracker.num_members} and was not told"
                    " which (pass `members`); resetting every member's reputation to 1",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._tracker = None
            if self._tracker is None:
                self._tracker = Reputation(max(ids) + 1)
            self._tracker.grow(max(ids) + 1)
            prior = prior * self._tracker.weights[ids]
        flagged = torch.zeros(n, dtype=torch.bool)
        flagged[finite] = mad_outliers(round_.matrix[finite], self.threshold)
        use = finite & ~flagged
        result = dataclasses.replace(round_, prior=prior).combine(self.inner, use)
        if self._tracker is not None:
            self._tracker.update((~use).tolist(), ids)
        result.info.update(
            flagged=torch.nonzero(flagged).flatten().tolist(),
            reputation=None if self._tracker is None else self._tracker.weights[ids].tolist(),
        )
        return result

    def combine(self, matrix: Tensor, scores: Tensor | None, prior: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Filters the rows of ``matrix`` by :func:`mad_outliers` and combines the rest.

        Used when this rule is called on an already-flattened matrix (e.g. by a topology);
        rows are not tracked across calls here, so reputations are neither applied nor updated.
        """
        flagged = mad_outliers(matrix, self.threshold)
        keep = ~flagged
        sub_scores = None if scores is None else scores[keep]
        consensus, sub_weights, info = self.inner.combine(matrix[keep], sub_scores, prior[keep])
        weights = torch.zeros(matrix.shape[0], dtype=torch.float64)
        weights[keep] = sub_weights.to(torch.float64)
        return consensus, weights, {**info, "flagged": torch.nonzero(flagged).flatten().tolist()}

    def state_dict(self) -> dict[str, Any]:
        """Returns ``{"reputation": Reputation.state_dict() or None, "inner": inner.state_dict()}``."""
        return {
            "reputation": None if self._tracker is None else self._tracker.state_dict(),
            "inner": self.inner.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned.

        Args:
            state: a mapping with keys ``"reputation"`` and ``"inner"``.
        """
        saved = state["reputation"]
        if saved is None:
            self._tracker = None
        else:
            tracker = Reputation(int(torch.as_tensor(saved["scores"]).numel()))
            tracker.load_state_dict(saved)
            self._tracker = tracker
        self.inner.load_state_dict(state["inner"])
