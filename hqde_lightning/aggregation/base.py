"""The aggregator interface: member state dicts (+ per-member scores) in, one consensus out.

An aggregator sees the floating-point entries of every member's state dict flattened into
one matrix ``X`` of shape ``(num_members, num_values)`` and returns one row: the consensus.
Integer and boolean entries (``num_batches_tracked``, masks, step counters) are never
combined; the consensus takes them from the first member. Members whose floats contain NaN
or Inf are dropped before the rule runs, whatever the rule, so they never reach the
consensus. A value on which every member taking part agrees exactly is that value in the
consensus, to the bit (a weighted mean of identical floats can be one rounding off), so
identical weights, frozen layers for instance, never drift.

Plain torch only: no Ray, no Lightning.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["AggregationResult", "Aggregator", "Round", "StateDict", "flatten_states", "keep_unanimous", "normalise", "unflatten"]

StateDict = Mapping[str, Tensor]


@dataclass
class AggregationResult:
    """What one aggregation round produced.

    Attributes:
        state: the consensus state dict (same keys, shapes and dtypes as the members').
        member_weights: the weight each member received in the consensus (zeros for
            excluded members), summing to one over the members that took part.
        excluded: indices of members left out of this round (non-finite values, or flagged
            by a robust pre-filter).
        info: rule-specific diagnostics (e.g. ``{"iterations": 12}`` for the geometric median).
    """

    state: dict[str, Tensor]
    member_weights: Tensor
    excluded: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Round:
    """One checked aggregation call, flattened.

    Attributes:
        states: the member state dicts of the call.
        matrix: :func:`flatten_states` of ``states``, shape ``(n, P)``.
        keys: the state-dict keys ``matrix`` holds, in order.
        finite: which rows of ``matrix`` are finite (bool, at least one is).
        scores: the per-member confidence of the call, or ``None``.
        prior: the per-member prior (sample counts × prior weights; all ones when not given).
        members: the members' indices in the ensemble, or ``None`` (their positions in the call).
    """

    states: Sequence[StateDict]
    matrix: Tensor
    keys: list[str]
    finite: Tensor
    scores: Sequence[float] | None
    prior: Tensor
    members: Sequence[int] | None

    def combine(self, rule: Aggregator, use: Tensor) -> AggregationResult:
        """Combines the rows marked in ``use`` with ``rule.combine``; the other rows are excluded.

        The consensus keeps every value on which the rows in use agree exactly (:func:`keep_unanimous`)
        and takes the dtypes and non-float entries from the first member in use.
        """
        rule.num_excluded = int((~use).sum())
        scores = None if self.scores is None else torch.tensor([float(s) for s in self.scores], dtype=torch.float64)[use]
        consensus, sub_weights, info = rule.combine(self.matrix[use], scores, self.prior[use])
        consensus = keep_unanimous(consensus, self.matrix[use])
        weights = torch.zeros(len(self.states), dtype=torch.float64)
        weights[use] = sub_weights.to(torch.float64)
        excluded = torch.nonzero(~use).flatten().tolist()
        template = self.states[int(torch.nonzero(use)[0])]
        return AggregationResult(unflatten(consensus, self.keys, template), weights, excluded, info)


def _is_aggregatable(tensor: Tensor) -> bool:
    return torch.is_floating_point(tensor) or torch.is_complex(tensor)


def _matrix_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float64 when any entry is float64 or complex128, float32 otherwise (half types widen to it)."""
    wide = any(t.dtype in (torch.float64, torch.complex128) for t in tensors)
    return torch.float64 if wide else torch.float32


def _as_real(tensor: Tensor) -> Tensor:
    """A complex tensor as (..., 2) real and imaginary parts; a real one unchanged."""
    return torch.view_as_real(tensor.resolve_conj()) if torch.is_complex(tensor) else tensor


def flatten_states(states: Sequence[StateDict]) -> tuple[Tensor, list[str]]:
    """Stacks the floating-point and complex entries of ``states`` into a ``(num_members, P)`` real matrix.

    The matrix is float64 when any entry is float64 or complex128 and float32 otherwise, so no
    value is rounded; a complex entry contributes its real and imaginary parts as two columns
    per value (distances and norms are then those of the complex numbers). Returns the matrix
    and the keys it holds, in order. Every state must have the same keys and shapes; a clear
    ``ValueError`` names the first mismatch.
    """
    reference = states[0]
    keys = [k for k, v in reference.items() if _is_aggregatable(v)]
    for index, state in enumerate(states[1:], start=1):
        if set(state.keys()) != set(reference.keys()):
            missing = sorted(set(reference.keys()) ^ set(state.keys()))
            raise ValueError(f"member {index}'s state dict has different keys from member 0's: {missing[:5]}")
        for key in keys:
            if state[key].shape != reference[key].shape:
                raise ValueError(
                    f"member {index}'s {key!r} has shape {tuple(state[key].shape)},"
                    f" member 0's has {tuple(reference[key].shape)}"
                )
    if not keys:
        return torch.zeros(len(states), 0), keys
    dtype = _matrix_dtype([state[k] for state in states for k in keys])
    rows = [torch.cat([_as_real(state[k].detach()).reshape(-1).to(dtype) for k in keys]) for state in states]
    return torch.stack(rows), keys


def unflatten(vector: Tensor, keys: Sequence[str], template: StateDict) -> dict[str, Tensor]:
    """Inverse of :func:`flatten_states` for one row, in ``template``'s dtypes; other entries are copied from ``template``."""
    out: dict[str, Tensor] = {}
    offset = 0
    chunks: dict[str, Tensor] = {}
    for key in keys:
        size = template[key].numel() * (2 if torch.is_complex(template[key]) else 1)
        chunks[key] = vector[offset : offset + size]
        offset += size
    for key, value in template.items():
        if key not in chunks:
            out[key] = value.detach().clone()
        elif torch.is_complex(value):
            real = chunks[key].to(value.real.dtype).reshape(*value.shape, 2)
            out[key] = torch.view_as_complex(real.contiguous()).to(value.dtype).clone()
        else:
            out[key] = chunks[key].reshape(value.shape).to(value.dtype).clone()
    return out


class Aggregator(ABC):
    """Combines member state dicts into a consensus.

    Subclasses implement :meth:`combine` on the flattened matrix. Call the instance:
    ``aggregator(states, scores=None, sample_counts=None, prior_weights=None, members=None)``.

    Args of ``__call__``:
        states: one state dict per member (torch tensors; same keys and shapes).
        scores: optional per-member confidence, higher is better (e.g. validation accuracy
            or negative loss). Rules that do not use confidence ignore it.
        sample_counts: optional number of samples each member trained on since the last sync.
        prior_weights: optional non-negative per-member weights from outside the rule
            (e.g. reputation); multiplied into the rule's own weighting where it has one.
        members: optional index of each state's member in the ensemble; rules that keep
            per-member state across rounds (reputations) key it by these, so a round without
            some members leaves the others' state in place. ``None``: the position in the call.
    """

    #: the name accepted by ``HQDEStrategy(aggregator=...)``
    name: str = ""
    #: whether the rule has a breakdown guarantee (a minority of arbitrary members cannot move the
    #: consensus arbitrarily far); topologies that would break the guarantee refuse such rules
    robust: bool = False
    #: members the current call already left out as non-finite (known-bad) before :meth:`combine`
    num_excluded: int = 0

    def __call__(
        self,
        states: Sequence[StateDict],
        scores: Sequence[float] | None = None,
        sample_counts: Sequence[float] | None = None,
        prior_weights: Sequence[float] | None = None,
        members: Sequence[int] | None = None,
    ) -> AggregationResult:
        self._check_call(states, scores, sample_counts, prior_weights, members)
        matrix, keys = flatten_states(states)
        finite = torch.isfinite(matrix).all(dim=1)
        if not bool(finite.any()):
            raise ValueError("every member state holds NaN or Inf values; there is nothing to aggregate")
        prior = self._prior(len(states), sample_counts, prior_weights)
        return self._aggregate(Round(states, matrix, keys, finite, scores, prior, members))

    def _aggregate(self, round_: Round) -> AggregationResult:
        """One checked round: combines the finite rows (wrapper rules override this)."""
        return round_.combine(self, round_.finite)

    @staticmethod
    def _check_call(
        states: Sequence[StateDict],
        scores: Sequence[float] | None,
        sample_counts: Sequence[float] | None,
        prior_weights: Sequence[float] | None,
        members: Sequence[int] | None = None,
    ) -> int:
        """Checks that there are states and one score/count/weight/index per state; returns their number."""
        if len(states) == 0:
            raise ValueError("`states` must hold at least one member state dict")
        n = len(states)
        for argname, values in (("scores", scores), ("sample_counts", sample_counts), ("prior_weights", prior_weights), ("members", members)):
            if values is not None and len(values) != n:
                raise ValueError(f"`{argname}` has {len(values)} entries for {n} member states")
        if members is not None and (len(set(members)) != n or min(int(m) for m in members) < 0):
            raise ValueError(f"`members` must be distinct non-negative member indices, got {list(members)}")
        return n

    @staticmethod
    def _prior(n: int, sample_counts: Sequence[float] | None, prior_weights: Sequence[float] | None) -> Tensor:
        prior = torch.ones(n, dtype=torch.float64)
        if sample_counts is not None:
            prior = prior * torch.tensor([float(c) for c in sample_counts], dtype=torch.float64)
        if prior_weights is not None:
            prior = prior * torch.tensor([float(w) for w in prior_weights], dtype=torch.float64)
        if bool((prior < 0).any()) or not bool(torch.isfinite(prior).all()):
            raise ValueError("`sample_counts` and `prior_weights` must be finite and non-negative")
        return prior

    @abstractmethod
    def combine(self, matrix: Tensor, scores: Tensor | None, prior: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Combines the rows of ``matrix`` (finite, shape ``(n, P)``) into one row.

        Args:
            matrix: one flattened member per row.
            scores: per-row confidence (float64) or ``None``.
            prior: per-row non-negative prior weight (float64; all ones when nothing is known).

        Returns:
            ``(consensus of shape (P,), per-row weight of shape (n,), info dict)``. For rules
            that are not a weighted mean, the weights say how much each row counted
            (e.g. the final Weiszfeld weights), normalised to sum to one.
        """

    def partial_score(self, scores: Sequence[float], weights: Sequence[float]) -> float:
        """The score a partial result of members with these ``scores`` and ``weights`` carries on.

        A topology that combines partial results (``tree``) gives each one the total weight of
        its members and this score. This default is the weight-averaged finite score (NaN when
        no member with a positive weight has one); rules that use the scores override it so
        that combining partial results equals combining the members
        (:meth:`Superposition.partial_score <hqde_lightning.aggregation.superposition.Superposition.partial_score>`).
        """
        usable = [(float(s), float(w)) for s, w in zip(scores, weights) if math.isfinite(float(s)) and float(w) > 0]
        total = sum(w for _, w in usable)
        if not usable or total <= 0:
            return float("nan")
        return sum(s * w for s, w in usable) / total

    def shard_rule(self, shard: str) -> Aggregator:
        """The instance of this rule to apply to one shard of the parameters (``mapreduce``).

        This default is a new copy of the rule every time, so partial inputs never advance the
        rule's state; rules whose state belongs to the parameters they saw (entanglement's
        reference) override it to keep one instance per shard across rounds, inside their
        :meth:`state_dict`. The topology loads the state the shard's task ended with back into
        the instance (the task may run elsewhere).
        """
        return copy.deepcopy(self)

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (stateful rules override this)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def keep_unanimous(consensus: Tensor, rows: Tensor) -> Tensor:
    """``consensus`` with every coordinate on which all ``rows`` agree exactly set to that value."""
    agree = (rows == rows[0]).all(dim=0)
    return torch.where(agree, rows[0], consensus)


def normalise(weights: Tensor) -> Tensor:
    """Scales non-negative ``weights`` to sum to one; all-zero weights become uniform."""
    total = weights.sum()
    if not bool(total > 0):
        return torch.full_like(weights, 1.0 / weights.numel())
    return weights / total
