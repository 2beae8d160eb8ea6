"""``WorkerStrategy``: the base of the strategies that train members for the driver's ``HQDEStrategy``.

The driver's :class:`~hqde_lightning.HQDEStrategy` never trains itself: a copy of your ``Trainer``
does, with one of these installed (:meth:`WorkerStrategy.install`) before its fit starts:
:class:`~hqde_lightning.member_strategy.MemberStrategy` (one member, in a Ray actor or a member thread) or
:class:`~hqde_lightning.group_strategy.GroupStrategy` (every member, stacked, in this process).
Both are Lightning's single-device strategy with the run's accelerator, checkpoint IO and
precision plugin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import SingleDeviceStrategy, Strategy

from hqde_lightning.turns import resolve

__all__ = ["CheckpointWriter", "WorkerStrategy", "checkpoint_round"]


class WorkerStrategy(SingleDeviceStrategy):
    """A single-device strategy on ``device`` configured by the run's strategy ``hqde``."""

    def __init__(self, hqde: Any, device: torch.device) -> None:
        super().__init__(device=device, accelerator=hqde.accelerator, checkpoint_io=hqde.checkpoint_io, precision_plugin=hqde.precision_plugin)
        self.hqde = hqde

    @property
    def seed(self) -> int:
        """The run's seed (member ``i``'s own seed is ``seed + i``)."""
        return self.hqde.seed

    @property
    def num_members(self) -> int:
        return self.hqde.num_members

    def install(self, trainer: Trainer) -> None:
        """Makes this the strategy of ``trainer`` (whose strategy is :attr:`hqde`), before its fit starts.

        Values logged before (a ``Tuner`` run in the driver) are dropped: Lightning keeps the
        strategy's ``reduce`` with each logged key and refuses the same key logged with another.
        """
        trainer._accelerator_connector.strategy = self
        for loop in (trainer.fit_loop.epoch_loop, trainer.fit_loop.epoch_loop.val_loop):
            loop._results.clear()


def checkpoint_round(epoch: int, synced_epoch: int) -> int:
    """The sync round a checkpoint written now, in epoch ``epoch``, pairs with.

    The members' snapshots of round r are taken at the end of epoch r, after its sync point
    (``synced_epoch`` is the last epoch whose sync point the worker passed). A save before this
    epoch's sync point (a mid-epoch, step-based checkpoint) can only pair with round ``epoch - 1``
    (round -1: the snapshots every member posts when its training starts).
    """
    return epoch if synced_epoch == epoch else epoch - 1


class CheckpointWriter:
    """Whether a worker in a Ray actor (or a member thread) writes the ensemble's checkpoints now (its strategy's ``is_global_zero``).

    The writer of an epoch is the worker holding the lowest-index member that trains in it:
    member 0's while it runs, then the next one's when member 0 stops early or is given up on
    (``Coordinator.is_writer``). A worker that became the writer stays it for the epoch.

    Args:
        coordinator: handle of the fit's coordinator actor.
        members: the members the worker trains (one in a member actor or thread, a group's in a group actor).
    """

    def __init__(self, coordinator: Any, members: Sequence[int]) -> None:
        self.coordinator = coordinator
        self.members = sorted(members)
        self.member = self.members[0]
        self._epoch: int | None = None
        self._stops_after: int | None = None

    def holds(self, strategy: Strategy) -> bool:
        """Whether the worker of ``strategy`` writes checkpoints in its trainer's current epoch.

        A worker whose fit stops after this epoch says so first, for each of its members (:meth:`Coordinator.stops_after`),
        so that the next member writes the next epoch's checkpoints even while this one still saves its last.
        """
        module = strategy.lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        epoch = trainer.current_epoch if trainer is not None else 0
        if trainer is not None and trainer.should_stop and trainer.fit_loop._can_stop_early and self._stops_after is None:
            self._stops_after = epoch
            for member in self.members:
                resolve(self.coordinator.stops_after.remote(member, epoch))
        if self.member == 0:
            return True
        if self._epoch == epoch:
            return True
        if resolve(self.coordinator.is_writer.remote(self.member, epoch)):
            self._epoch = epoch  # the lower members have finished
            return True
        return False
