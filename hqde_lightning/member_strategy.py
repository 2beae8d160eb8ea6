"""``MemberStrategy``: the strategy of the user's ``Trainer`` inside one member actor.

The driver's :class:`~hqde_lightning.HQDEStrategy` travels to each member actor inside the
pickled ``Trainer``; the actor swaps this strategy in (:meth:`MemberStrategy.install`) before
the fit starts. It is Lightning's single-device strategy on the member's device (every member
is a world of its own, so Lightning's rank-0 code paths run in each of them) and overrides
what makes the process a member:

* :attr:`is_global_zero`: only the member writing checkpoints now (the lowest-index member
  still training) is global zero;
* :meth:`process_dataloader`: the training loader gets the member's own data order (or its
  bootstrap sample);
* :meth:`save_checkpoint` / :meth:`load_checkpoint`: a checkpoint holds the whole ensemble, and
  resuming gives the member its own entry.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from hqde_lightning.checkpoint import EXTRAS_CANDIDATES, HQDE_KEY, capture_rng_states, ensemble_section, module_extras_candidates, member_resume_checkpoint, read_checkpoint, seal_checkpoint
from hqde_lightning.events import Notice
from hqde_lightning.member import MEMBER_KEY, MemberContext, MemberSync
from hqde_lightning.member_data import member_loader
from hqde_lightning.strategy import HQDEStrategy
from hqde_lightning.turns import resolve
from hqde_lightning.worker_strategy import CheckpointWriter, WorkerStrategy, checkpoint_round

__all__ = ["MemberStrategy"]


class MemberStrategy(WorkerStrategy):
    """Member ``context.index``'s single-device strategy, configured by the run's :class:`HQDEStrategy`.

    Args:
        hqde: the driver's strategy (the run's settings: ensemble size, seed, bagging, aggregator).
        context: this member's part of the fit (index, coordinator handle).
        member_sync: the member's sync callback (its ``synced_epoch`` tells which sync round a
            checkpoint written now pairs with).
    """

    strategy_name = "hqde_member"

    def __init__(self, hqde: HQDEStrategy, context: MemberContext, member_sync: MemberSync) -> None:
        # inside a member, Ray's CUDA_VISIBLE_DEVICES shows the member's own GPU as device 0
        device = torch.device("cuda", 0) if isinstance(hqde.accelerator, CUDAAccelerator) else torch.device("cpu")
        super().__init__(hqde, device)
        self.context = context
        self._member_sync = member_sync
        self._writer = CheckpointWriter(context.coordinator, [context.index])

    @property
    def member_index(self) -> int:
        """This member's position in the ensemble."""
        return self.context.index

    # ----------------------------------------------------------- writer role
    @property
    def is_global_zero(self) -> bool:
        """Whether this member writes checkpoints now: the lowest-index member that trains in the current epoch (see
        :class:`~hqde_lightning.worker_strategy.CheckpointWriter`)."""
        return self._writer.holds(self)

    # ------------------------------------------------------------------ data
    def process_dataloader(self, dataloader: object) -> object:
        """The training loader with the member's own data order (:func:`~hqde_lightning.member_data.member_loader`).

        A copy of the loader whose generators are re-seeded from ``(seed, member index, epoch)``,
        or, with ``bagging=True``, a loader over the member's bootstrap sample. Orders the member
        cannot be given (custom samplers without a ``generator`` attribute, iterable datasets) are
        named once in the driver.
        """
        if self.lightning_module is None:
            return dataloader
        trainer = self.lightning_module.trainer
        if not trainer.training or not isinstance(dataloader, DataLoader):
            return dataloader
        return member_loader(dataloader, self.seed, self.context.index, trainer.current_epoch, self.hqde.bagging, self._warn_driver)

    def _warn_driver(self, message: str) -> None:
        """Has the driver show ``message`` as a warning (once, however many members send it)."""
        self.context.coordinator.emit.remote(Notice(self.context.index, f"HQDEStrategy: {message}", warning=True))

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """The member writing checkpoints now writes ``checkpoint`` with every member in ``checkpoint['hqde']``.

        Its ``state_dict`` is the members' consensus; the other members' entries are their
        latest snapshots of the same sync round (see :meth:`_member_checkpoint_section`).
        """
        if not self.is_global_zero:
            return
        section, consensus = self._member_checkpoint_section(checkpoint)
        self.checkpoint_io.save_checkpoint(seal_checkpoint({**checkpoint, "state_dict": consensus}, section), filepath, storage_options=storage_options)

    def _member_checkpoint_section(self, checkpoint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The writing member's own state plus every other member's latest snapshot."""
        assert self.lightning_module is not None
        trainer = self.lightning_module.trainer
        index = self.context.index
        epoch = trainer.current_epoch
        round_id = checkpoint_round(epoch, self._member_sync.synced_epoch)
        own = {k: v for k, v in checkpoint.items() if k != HQDE_KEY}
        own[MEMBER_KEY] = {"index": index, "round": round_id, "rng": capture_rng_states()}
        own[EXTRAS_CANDIDATES] = module_extras_candidates(self.lightning_module)
        members: list[dict[str, Any]] = [{} for _ in range(self.num_members)]
        members[index] = own
        coordinator = self.context.coordinator
        if self.num_members > 1:
            if round_id != epoch:
                rank_zero_warn("HQDEStrategy: a checkpoint written mid-epoch holds the other members as of their last epoch end (or their start).")
            for other, snapshot in resolve(coordinator.snapshots_at.remote(round_id, [index])).items():
                members[other] = snapshot
        coordinator_state = resolve(coordinator.state_dict.remote())
        # the other members' snapshots are on the CPU; this member's own weights may be on its GPU
        states = [{k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in m["state_dict"].items()} for m in members if m]
        return ensemble_section(self.hqde, members, None, None, coordinator_state), self.hqde.module_state(states)

    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self.is_global_zero:
            self.checkpoint_io.remove_checkpoint(filepath)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Loads a checkpoint; from an HQDE checkpoint this member resumes its own full state.

        The file is read as :meth:`HQDEStrategy.load_checkpoint` reads it (``weights_only=True``
        unless you pass ``False``; damaged files and checksum mismatches raise). The whole
        checkpoint is then replaced by this member's entry (weights, optimizer, loops, callback
        states, RNG); a member without an entry starts from the consensus, and an entry holding
        weights only (files of older versions) is completed from the checkpoint's top level with
        a fresh optimizer state.
        """
        load = super().load_checkpoint
        checkpoint = read_checkpoint(checkpoint_path, lambda: load(checkpoint_path, weights_only=weights_only is not False))
        section = checkpoint.get(HQDE_KEY)
        index = self.context.index
        if section and section.get("members"):  # (one saved before any fit holds none: its top level is the module's)
            saved = int(section["num_members"])
            if saved != self.num_members:
                raise MisconfigurationException(
                    f"{checkpoint_path} holds {saved} members but `HQDEStrategy(num_members={self.num_members})`;"
                    f" resume with `num_members={saved}`."
                )
            own = self.lightning_module.state_dict() if self.hqde.members_are_independent else None
            checkpoint = member_resume_checkpoint(checkpoint, section["members"][index], index, own)
            if index == 0 and section.get("coordinator"):
                self.context.coordinator.load_state_dict.remote(section["coordinator"])
        if MEMBER_KEY in checkpoint:
            self._member_sync.ctx.resume = checkpoint[MEMBER_KEY]
        return checkpoint

    def __repr__(self) -> str:
        return f"MemberStrategy(member_index={self.context.index}, device={self.root_device})"
