"""A fault-injection harness: chosen members send corrupted weights at every sync.

For tests, benchmarks and demonstrations of the Byzantine defences. The corrupted copy is only
what crosses the wire: the member keeps training its own honest weights, as a real faulty or
malicious participant would appear to the others. It takes the place of any other sync codec
(e.g. :class:`~hqde_lightning.callbacks.AdaptiveQuantization`): use one or the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from hqde_lightning.codec import state_to_numpy
from hqde_lightning.misconfiguration import lightning_arguments
from hqde_lightning.validation import check_choice, check_number

__all__ = ["ATTACKS", "ByzantineMembers"]

#: attack name -> what the member sends instead of its weights w
ATTACKS = {
    "sign_flip": "-w",
    "scale": "scale * w",
    "gaussian": "w + N(0, noise_std^2)",
    "nan": "NaN everywhere",
    "inf": "+Inf everywhere",
}


class ByzantineMembers(Callback):
    """Makes ``members`` send corrupted weights at every sync point.

    Args:
        members: indices of the Byzantine members.
        attack: one of :data:`ATTACKS`.
        scale: the factor of the ``"scale"`` attack.
        noise_std: the standard deviation of the ``"gaussian"`` attack.
        seed: seed of the ``"gaussian"`` attack's generator (combined with the member index).
    """

    def __init__(self, members: Iterable[int], attack: str = "sign_flip", scale: float = 100.0, noise_std: float = 10.0, seed: int = 0) -> None:
        self.members = sorted({int(m) for m in members})
        with lightning_arguments("ByzantineMembers"):
            if any(m < 0 for m in self.members):
                raise ValueError(f"`members` must be non-negative member indices, got {self.members}")
            self.attack = check_choice(attack, "attack", sorted(ATTACKS))
            self.scale = check_number(scale, "scale")
            self.noise_std = check_number(noise_std, "noise_std", 0)
        self.seed = seed

    def encode_for_sync(self, trainer: Trainer, pl_module: LightningModule, state: dict[str, Tensor]) -> dict[str, np.ndarray]:
        """The member's weights as numpy arrays, corrupted when this member is Byzantine."""
        index = self._member_index_in(trainer)
        arrays = state_to_numpy(state)
        if index not in self.members:
            return arrays
        rng = np.random.default_rng([self.seed, index, trainer.current_epoch])
        for key, value in arrays.items():
            arrays[key] = self._corrupt(value, rng)
        return arrays

    def _member_index_in(self, trainer: Trainer) -> int | None:
        """The index of the member whose weights are being sent (a member group's copies answer for their member)."""
        return getattr(trainer.strategy, "member_index", None)

    def _corrupt(self, value: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.attack == "sign_flip":
            return -value
        if self.attack == "scale":
            return value * self.scale
        if self.attack == "gaussian":
            return value + rng.normal(0.0, self.noise_std, size=value.shape).astype(value.dtype)
        return np.full_like(value, np.nan if self.attack == "nan" else np.inf)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"members": self.members, "attack": self.attack}

    def __repr__(self) -> str:
        return f"ByzantineMembers(members={self.members}, attack={self.attack!r})"


