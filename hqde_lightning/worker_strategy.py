"""``WorkerStrategy``: the base of the strategies that train members for the driver's ``HQDEStrategy``.

The driver's :class:`~hqde_lightning.HQDEStrategy` never trains itself: a copy of your ``Trainer``
does, with one of these installed (:meth:`WorkerStrategy.install`) before its fit starts:
:class:`~hqde_lightning.member_strategy.MemberStrategy` (one member in a Ray actor) or
:class:`~hqde_lightning.group_strategy.GroupStrategy` (every member, stacked, in this process).
Both are Lightning's single-device strategy with the run's accelerator, checkpoint IO and
precision plugin.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import SingleDeviceStrategy

__all__ = ["WorkerStrategy"]


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
