"""Agreement-weighted averaging ("entanglement").

The name is borrowed from quantum mechanics; the maths is classical cosine similarity.
Each member's *update* is ``u_i = w_i - r``, where the reference ``r`` is the previous
round's consensus (kept as aggregator state) or, on the first round, the coordinate-wise
mean of the members. The "entanglement" matrix is

    E_ij = strength * cos(u_i, u_j)

with ``cos(0, 0) = 1`` and ``cos(0, u) = 0`` for ``u != 0``, so identical members never
produce NaN. Member ``i``'s agreement is the row sum of ``E`` without the diagonal,
``s_i = sum_{j != i} E_ij``; the weights are ``softmax(s) × prior``, renormalised, and the
consensus is the weighted mean of the members. Members whose update points the same way as
the others weigh more; a member that disagrees with everyone weighs less.

The reference is a single flattened vector. When a call has a different number of columns
from the stored reference, that call uses the members' mean as the reference. A topology that
shards the parameters across calls (``mapreduce``) applies :meth:`Entanglement.shard_rule`, one
instance per shard that keeps that shard's own reference across rounds; those instances are
part of :meth:`Entanglement.state_dict`, so checkpoints keep every shard's reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hqde_lightning.aggregation.base import Aggregator
from hqde_lightning.aggregation.superposition import superposition_weights
from hqde_lightning.validation import check_number

__all__ = ["Entanglement", "update_cosines"]


def update_cosines(updates: Tensor) -> Tensor:
    """Pairwise cosine similarity of the rows of ``updates``, defined for zero rows.

    Args:
        updates: shape ``(n, P)``, finite.

    Returns:
        float64 ``(n, n)`` matrix in ``[-1, 1]``; two zero rows have cosine 1, a zero row
        and a non-zero row have cosine 0. A row whose norm underflows to below the
        smallest normal float counts as zero.
    """
    norms = torch.linalg.vector_norm(updates, dim=1)
    zero = norms <= torch.finfo(norms.dtype).tiny
    unit = updates * torch.where(zero, 0.0, 1.0 / norms.clamp_min(torch.finfo(norms.dtype).tiny)).unsqueeze(1)
    cosines = (unit @ unit.T).to(torch.float64).clamp(-1.0, 1.0)
    return cosines.masked_fill(zero.unsqueeze(0) & zero.unsqueeze(1), 1.0)


class Entanglement(Aggregator):
    """Weighted mean where members whose updates agree with the others' weigh more.

    Args:
        strength: non-negative scale of the cosine matrix; 0 gives the prior-weighted
            mean, larger values sharpen the preference for agreeing members.
    """

    name = "entanglement"

    def __init__(self, strength: float = 1.0) -> None:
        self.strength = check_number(strength, "strength", 0)
        self._reference: Tensor | None = None
        self._shards: dict[str, Entanglement] = {}

    def combine(self, matrix: Tensor, scores: Tensor | None, prior: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        if self._reference is not None and self._reference.numel() == matrix.shape[1]:
            reference, source = self._reference.to(matrix.dtype), "previous_consensus"
        else:
            reference, source = matrix.mean(dim=0, dtype=torch.float64).to(matrix.dtype), "mean"
        entanglement = self.strength * update_cosines(matrix - reference)
        agreement = entanglement.sum(dim=1) - entanglement.diagonal()
        weights = superposition_weights(agreement, 1.0, prior)
        consensus = weights.to(matrix.dtype) @ matrix
        self._reference = consensus.detach().clone()
        return consensus, weights, {"reference": source, "agreement": agreement.tolist()}

    def shard_rule(self, shard: str) -> Entanglement:
        """This rule's own instance for the shard named ``shard``, kept across rounds.

        Created on first use with the same strength and no reference (its first round uses the
        members' mean); after that it holds the shard's previous consensus.
        """
        if shard not in self._shards:
            self._shards[shard] = Entanglement(self.strength)
        return self._shards[shard]

    def state_dict(self) -> dict[str, Any]:
        """Returns ``{"reference": previous consensus (1-D tensor in the members' matrix dtype) or None,
        "shards": {shard name: the shard instance's state dict}}``."""
        return {
            "reference": None if self._reference is None else self._reference.clone(),
            "shards": {name: rule.state_dict() for name, rule in self._shards.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores the reference and the shards' references saved by :meth:`state_dict`.

        Args:
            state: a mapping with key ``"reference"`` holding a tensor or ``None``, and
                optionally ``"shards"`` (older checkpoints have none: no shard has a reference).
        """
        reference = state.get("reference")
        self._reference = None if reference is None else torch.as_tensor(reference).reshape(-1).clone()
        self._shards = {}
        for name, saved in dict(state.get("shards") or {}).items():
            self.shard_rule(name).load_state_dict(saved)
