"""Per-member copies of the callbacks that act on one member, for a member group.

With actors, each member's process runs its own copy of every callback. Inside a member group
(:mod:`hqde_lightning.embedded`), the callbacks that act on one member's metrics or weights are
replaced by one copy per member (:func:`member_callbacks`), each acting on its member only:

* :class:`MemberEarlyStopping`: your ``EarlyStopping``, watching ``member_{i}/<monitor>``. When
  it decides to stop, the member is frozen (:meth:`~hqde_lightning.group.MemberGroup.freeze`:
  its weights no longer move, it logs nothing more and leaves later sync rounds); the fit stops
  once every member of the group has stopped.
* :class:`MemberQuantumNoise`: ``QuantumNoise`` drawing from member ``i``'s own generator and
  perturbing member ``i``'s slices of the stacked parameters (or gradients), logged as
  ``member_{i}/noise_scale``.
* :class:`MemberAdaptiveQuantization`: ``AdaptiveQuantization`` encoding member ``i``'s weights
  for the group's sync (bit widths ranked by member ``i``'s own gradients, its own error
  feedback), logged as ``member_{i}/quant/...``.
* :class:`MemberByzantine`: ``ByzantineMembers`` corrupting what member ``i`` sends when ``i`` is
  one of its Byzantine members.

Each copy keeps the original's state key in :attr:`MemberCopy.original_state_key`, so that
whole-ensemble checkpoints hold each member's callback state under the key it has with actors.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import EarlyStopping
from torch import Tensor
from torch.optim import Optimizer

from hqde_lightning.callbacks.byzantine import ByzantineMembers
from hqde_lightning.callbacks.noise import QuantumNoise
from hqde_lightning.callbacks.quantization import AdaptiveQuantization
from hqde_lightning.group import MemberGroup

__all__ = ["MemberAdaptiveQuantization", "MemberByzantine", "MemberCopy", "MemberEarlyStopping", "MemberQuantumNoise", "member_callbacks"]


class MemberCopy:
    """A callback's copy for the member at ``position`` in ``group`` (build it with :meth:`of`)."""

    group: MemberGroup
    position: int
    #: the state key of the callback this copy was made from
    original_state_key: str

    @classmethod
    def of(cls, original: Callback, group: MemberGroup, position: int) -> Any:
        """A copy of ``original`` (settings and state) for the member at ``position``."""
        member = cls.__new__(cls)
        member.__dict__.update(copy.deepcopy(original.__dict__))
        member.group = group
        member.position = position
        member.original_state_key = original.state_key
        member._for_member()
        return member

    @property
    def member_id(self) -> int:
        return self.group.member_ids[self.position]

    def _for_member(self) -> None:
        """Adapts the copied settings to the member (e.g. the monitored metric's name)."""

    def __deepcopy__(self, memo: dict) -> Any:  # the group is shared, not copied
        clone = type(self).__new__(type(self))
        clone.__dict__.update({k: v if k == "group" else copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return clone


class MemberEarlyStopping(MemberCopy, EarlyStopping):
    """Your ``EarlyStopping`` for one member: it freezes the member instead of stopping the fit."""

    def _for_member(self) -> None:
        self.monitor = f"member_{self.member_id}/{self.monitor}"

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        if self.group.frozen[self.position]:
            return
        stopping = trainer.should_stop
        super()._run_early_stopping_check(trainer)
        if trainer.should_stop and not stopping:
            self.group.freeze(self.position)
            trainer.should_stop = all(self.group.frozen)


class _IndexedCopy(MemberCopy):
    """A copy of a callback that keys its state by member index (``QuantumNoise``, ``AdaptiveQuantization``)."""

    @property
    def state_key(self) -> str:
        return f"{self.original_state_key}[member_{self.member_id}]"

    def _member_index_in(self, trainer: pl.Trainer) -> int:
        return self.member_id


class MemberQuantumNoise(_IndexedCopy, QuantumNoise):
    """``QuantumNoise`` for one member: its own noise stream on its own slices of the stack."""

    def _log_name(self) -> str:
        return f"member_{self.member_id}/noise_scale"

    def _weights(self, pl_module: pl.LightningModule) -> Iterator[Tensor]:
        return (p[self.position] for p in self.group.stack.params if p.requires_grad)

    def _gradients(self, optimizer: Optimizer) -> Iterator[Tensor]:
        return (g[self.position] for g in super()._gradients(optimizer))


class MemberAdaptiveQuantization(_IndexedCopy, AdaptiveQuantization):
    """``AdaptiveQuantization`` for one member: it encodes that member's weights (ranked by its own gradients) with its own error feedback."""

    def _log_name(self, name: str) -> str:
        return f"member_{self.member_id}/quant/{name}"

    def _named_gradients(self, pl_module: pl.LightningModule) -> Iterator[tuple[str, Tensor]]:
        stack = self.group.stack
        return ((name, p.grad[self.position]) for name, p in zip(stack.param_names, stack.params) if p.grad is not None)


class MemberByzantine(_IndexedCopy, ByzantineMembers):
    """``ByzantineMembers`` for one member: it corrupts what that member sends when the member is one of the Byzantine ones."""


#: the callbacks a member group replaces by one copy per member
_COPIES: dict[type[Callback], type[MemberCopy]] = {
    EarlyStopping: MemberEarlyStopping, QuantumNoise: MemberQuantumNoise, AdaptiveQuantization: MemberAdaptiveQuantization,
    ByzantineMembers: MemberByzantine,
}


def member_callbacks(callbacks: Sequence[Callback], group: MemberGroup) -> list[Callback]:
    """``callbacks`` with each ``EarlyStopping``, ``QuantumNoise``, ``AdaptiveQuantization`` and ``ByzantineMembers``
    (exactly those classes) replaced by one copy per member."""
    out: list[Callback] = []
    for callback in callbacks:
        member_copy = _COPIES.get(type(callback))
        if member_copy is None:
            out.append(callback)
        else:
            out += [member_copy.of(callback, group, i) for i in range(group.num_members)]
    return out
