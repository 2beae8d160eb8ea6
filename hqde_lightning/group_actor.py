"""Member groups inside Ray actors: several members stacked in one actor (``members_per_worker``).

When the members cannot all train in the driver (several GPUs, a Ray cluster, or
``members_per_worker=k``), each Ray actor trains a share of them. An actor holding several
members runs them as one member group (:mod:`hqde_lightning.group`), as the embedded runtime
does in the driver, but its group talks to the fit's coordinator as one-member actors do, so the
coordinator, aggregators, topologies, checkpoints and restarts still see ``num_members`` members:

* :class:`CoordinatorChannel`: the group's reports (notices, distances, progress) go to the
  coordinator's queue, which the driver drains;
* :class:`RemoteGroupSync`: at a sync point each training member of the group sends its
  payload to the coordinator, which reduces the round over every actor's members; the group posts
  each member's snapshot when training starts, at every epoch end and when the fit ends, and a
  member that stops early (``EarlyStopping``) leaves the rounds (``Coordinator.finish``);
* :class:`GroupActorStrategy`: the group holding the lowest-index member still training writes
  the whole-ensemble checkpoints, with the other actors' members from their latest snapshots;
* :class:`GroupActor`: the actor; a restarted one resumes every member of its group from the
  member's last snapshot.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from ray import cloudpickle

from hqde_lightning.actors import MemberActor, MemberResult, worker_fit
from hqde_lightning.checkpoint import AtomicCheckpointIO, ensemble_section, seal_checkpoint
from hqde_lightning.codec import payload_layout, payload_nbytes
from hqde_lightning.embedded import GroupSync, fit_group
from hqde_lightning.events import Event, FinishedEvent, ProgressEvent
from hqde_lightning.group import MemberGroup
from hqde_lightning.group_strategy import GroupStrategy
from hqde_lightning.member import MEMBER_KEY, MirrorLogger, tree_to_cpu, use_mirror_loggers
from hqde_lightning.worker_strategy import CheckpointWriter, checkpoint_round

__all__ = ["CoordinatorChannel", "GroupActor", "GroupActorStrategy", "GroupContext", "RemoteGroupSync"]

_PROGRESS_INTERVAL_S = 0.5


@dataclass
class GroupContext:
    """What a group actor needs besides the pickled ``Trainer``.

    Attributes:
        member_ids: the members it trains (their indices in the ensemble).
        coordinator: handle of the coordinator actor.
        mirrors: per user logger, the attributes the stand-in logger must show.
        restart_from: for a restarted actor, one ``ObjectRef`` per member of its last snapshot.
    """

    member_ids: list[int]
    coordinator: Any
    mirrors: list[dict[str, Any]] = field(default_factory=list)
    restart_from: list[Any] | None = None


class CoordinatorChannel:
    """Hands a group's events to the coordinator's queue for the driver (the embedded group hands them to the driver's forwarder)."""

    def __init__(self, coordinator: Any) -> None:
        self.coordinator = coordinator

    def handle(self, events: Sequence[Event]) -> None:
        for event in events:
            self.coordinator.emit.remote(event)


class RemoteGroupSync(GroupSync):
    """A group's sync through the fit's coordinator, its snapshots and progress reports (see the module docstring)."""

    def __init__(self, hqde: Any, group: MemberGroup, channel: CoordinatorChannel) -> None:
        super().__init__(hqde, group, channel)
        self.coordinator = channel.coordinator
        self.check_clones = False  # the coordinator compares the members' first snapshots, over every actor
        #: members whose fit ended here (stopped early, or the group's fit ended)
        self.finished: set[int] = set()
        self._last_report = 0.0

    # ----------------------------------------------------- coordinator state
    def sync_state(self) -> dict[str, Any]:
        return ray.get(self.coordinator.state_dict.remote())

    def load_sync_state(self, state: dict[str, Any]) -> None:
        """A resumed fit: the group holding member 0 gives the coordinator the checkpoint's state (as member 0's actor does)."""
        if state and 0 in self.group.member_ids:
            ray.get(self.coordinator.load_state_dict.remote(state))

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the state the members start (or resume) from, for checkpoints written before their next epoch end
        self._post_snapshots(trainer, trainer.current_epoch - 1, range(self.group.num_members))
        self._starts_epoch(trainer)  # (a fit resumed mid-epoch calls no `on_train_epoch_start` for that epoch)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._starts_epoch(trainer)

    def _starts_epoch(self, trainer: Trainer) -> None:
        """The group's training members train ``trainer.current_epoch``: they write its checkpoints, not a higher member."""
        for i in self._unfinished():
            if not self.group.frozen[i]:
                self.coordinator.starts_epoch.remote(self.group.member_ids[i], trainer.current_epoch)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        now = time.monotonic()
        if now - self._last_report > _PROGRESS_INTERVAL_S:
            self._last_report = now
            self._report_progress(trainer, batch_idx + 1, self.group.last_losses)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.synced_epoch == epoch:
            return
        self._finish_frozen(trainer, epoch, in_this_epoch=False)  # before the round: the coordinator must not wait for them
        super().on_train_epoch_end(trainer, pl_module)  # members that stopped in this epoch take part in its round
        self._finish_frozen(trainer, epoch, in_this_epoch=True)  # and then leave
        self._post_snapshots(trainer, epoch, self._unfinished())
        if self._loss_sum is not None and self._num_batches is not None:
            batches = torch.tensor(self._num_batches, device=self._loss_sum.device).clamp_min(1)
            self._report_progress(trainer, max(self._num_batches), self._loss_sum / batches)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self._post_snapshots(trainer, trainer.current_epoch - 1, self._unfinished(), final=True)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # the members where the fit failed: what the driver keeps of them (`strategy.ensemble`, an exception checkpoint)
        try:
            self._post_snapshots(trainer, trainer.current_epoch - 1, self._unfinished(), final=True)
        except Exception as err:  # your exception goes on as it is
            warnings.warn(f"HQDEStrategy: members {self.group.member_ids}'s states where the fit failed could not be kept ({type(err).__name__}: {err}).")

    # ---------------------------------------------------------------- helpers
    def _consensus(self, epoch: int, members: list[int], payloads: list[Any], scores: list[float | None], num_samples: list[int], step: int) -> tuple[dict[str, Any], list[Any]]:
        """Sends each member's payload to the coordinator (by value: it keeps its own copy) and waits for the round's consensus."""
        calls = [
            self.coordinator.sync.remote(member, epoch, payload, payload_nbytes(payload), payload_layout(payload), score, samples, step)
            for member, payload, score, samples in zip(members, payloads, scores, num_samples)
        ]
        (consensus_ref,) = ray.get(calls)[0]
        return ray.get(consensus_ref), []

    def _finish_frozen(self, trainer: Trainer, epoch: int, in_this_epoch: bool) -> None:
        """Members frozen since the last epoch end (early stopping) post their final snapshot and leave the rounds: those that
        stopped in this epoch (``in_this_epoch``, after its round, which they take part in) or in an earlier one (stopped
        after that epoch's end: before this epoch's round).

        Each snapshot is a checkpoint dump of the group (one per stopped member: rare, and the
        group's state is what a snapshot cuts the member out of).
        """
        stopped = [i for i in self._unfinished() if self.group.frozen[i] and (self.group.frozen_at.get(i) == epoch) == in_this_epoch]
        for i in stopped:  # a member's snapshot round is its last trained epoch: the one it stopped in
            self._post_snapshots(trainer, self.group.frozen_at.get(i, epoch - 1), [i], final=True)
            self.finish(self.group.member_ids[i])

    def _unfinished(self) -> list[int]:
        """The positions in the group of the members whose fit has not ended here."""
        return [i for i, member in enumerate(self.group.member_ids) if member not in self.finished]

    def finish(self, member: int) -> None:
        """``member``'s fit ended: the driver hears of it and open rounds no longer wait for it."""
        if member in self.finished:
            return
        self.finished.add(member)
        self.coordinator.emit.remote(FinishedEvent(member))
        self.coordinator.finish.remote(member)

    def _post_snapshots(self, trainer: Trainer, epoch: int, positions: Sequence[int], final: bool = False) -> None:
        """Sends the coordinator the full Lightning checkpoint of the members at ``positions``, after epoch ``epoch``."""
        if not positions:
            return
        strategy = trainer.strategy
        assert isinstance(strategy, GroupStrategy)
        snapshot = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        posted = [
            self.coordinator.post_snapshot.remote(self.group.member_ids[i], epoch, tree_to_cpu(strategy.member_checkpoint(snapshot, i)), final)
            for i in positions
        ]
        if final:
            ray.get(posted)

    def _report_progress(self, trainer: Trainer, batch: int, losses: Any) -> None:
        total = trainer.num_training_batches if isinstance(trainer.num_training_batches, int) else None
        for i, member in enumerate(self.group.member_ids):
            if not self.group.frozen[i]:
                loss = None if losses is None else float(losses[i])
                self.coordinator.emit.remote(ProgressEvent(member, trainer.current_epoch, batch, total, loss))


class GroupActorStrategy(GroupStrategy):
    """:class:`GroupStrategy` inside a group actor: only the group holding the checkpoint writer writes, with every member."""

    strategy_name = "hqde_group_actor"

    def __init__(self, hqde: Any, group: MemberGroup, sync: RemoteGroupSync) -> None:
        super().__init__(hqde, group, sync)
        self.coordinator = sync.coordinator
        self._writer = CheckpointWriter(sync.coordinator, group.member_ids)

    @property
    def is_global_zero(self) -> bool:
        """Whether this group writes checkpoints now: it holds the lowest-index member that trains in the current epoch
        (see :class:`~hqde_lightning.worker_strategy.CheckpointWriter`)."""
        return self._writer.holds(self)

    def ensemble_entries(self, checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
        """This group's members from ``checkpoint``, every other member from its latest snapshot of the same sync round."""
        entries = super().ensemble_entries(checkpoint)
        own = set(self.group.member_ids)
        round_id = checkpoint_round(self.lightning_module.trainer.current_epoch, self.sync.synced_epoch)
        for other, snapshot in ray.get(self.coordinator.snapshots_at.remote(round_id, sorted(own))).items():
            entries[other] = snapshot
        return entries

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        if self.is_global_zero:
            super().save_checkpoint(checkpoint, filepath, storage_options)

    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self.is_global_zero:
            self.checkpoint_io.remove_checkpoint(filepath)


class GroupActor(MemberActor):
    """Runs the Lightning fit loop of a group of members (``GroupContext.member_ids``) in one Ray actor."""

    def run(self, payload: bytes, context: GroupContext) -> list[MemberResult]:
        """Unpickles ``(trainer, function name, args, kwargs)`` and fits the group's members.

        A restarted actor resumes each member from its last snapshot, through a whole-ensemble
        checkpoint of the group written to a temporary ``hqde-restart-*`` directory. A
        ``KeyboardInterrupt`` reaches the driver as :class:`~hqde_lightning.actors.MemberInterrupted`.

        Raises:
            GroupUnsupported: before any training step, when the module cannot run as a group;
                the driver then trains one member per actor.
        """
        trainer, function_name, args, kwargs = cloudpickle.loads(payload)
        hqde = trainer.strategy
        bound = inspect.signature(getattr(trainer, function_name)).bind(*args, **kwargs)
        restart_dir: str | None = None
        if context.restart_from is not None:
            snapshots = ray.get(context.restart_from)
            if any(s is not None for s in snapshots):
                restart_dir = tempfile.mkdtemp(prefix="hqde-restart-")
                bound.arguments["ckpt_path"] = _write_group_resume(hqde, context.member_ids, snapshots, restart_dir)
        coordinator, ids = context.coordinator, list(context.member_ids)
        use_mirror_loggers(trainer, [MirrorLogger(m, j, min(ids), coordinator, group=ids) for j, m in enumerate(context.mirrors)])
        unwanted: tuple[type, ...] = (ProgressBar,) if 0 in ids else (ProgressBar, ModelSummary)
        trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, unwanted)]
        channel = CoordinatorChannel(coordinator)
        with worker_fit(trainer, f"members {ids}'", restart_dir):
            results, sync = fit_group(hqde, trainer, function_name, bound, ids, channel, lambda group: RemoteGroupSync(hqde, group, channel), GroupActorStrategy)
        for member in ids:
            sync.finish(member)
        return results


def _write_group_resume(hqde: Any, member_ids: Sequence[int], snapshots: Sequence[dict[str, Any] | None], directory: str) -> str:
    """A whole-ensemble checkpoint holding the group's members' ``snapshots`` (others empty), for a restarted group to resume from."""
    entries: list[dict[str, Any]] = [{} for _ in range(hqde.num_members)]
    for member, snapshot in zip(member_ids, snapshots):
        if snapshot is not None:
            entries[member] = snapshot
    first = next(s for s in snapshots if s is not None)
    top = {k: v for k, v in first.items() if k != MEMBER_KEY}
    path = os.path.join(directory, "group.ckpt")
    AtomicCheckpointIO().save_checkpoint(seal_checkpoint(top, ensemble_section(hqde, entries, None, None, {})), path)
    return path
