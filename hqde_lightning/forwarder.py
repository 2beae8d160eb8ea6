"""``EventForwarder``: in the driver, hands what the members report to the user's loggers and the progress bars.

Members queue their events at the coordinator; the member pool drains them while the fit runs
and passes them to :meth:`EventForwarder.handle`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from hqde_lightning.events import ClonesEvent, DistanceEvent, Event, FinishedEvent, HparamsEvent, MetricsEvent, Notice, ProgressEvent, SyncRecord
from hqde_lightning.progress import EnsembleProgress

__all__ = ["EventForwarder"]


class EventForwarder:
    """Hands the members' metrics to the driver's loggers and their progress to the progress bars.

    Member metrics are logged under ``member_{i}/`` at the member's own step; the rows of the
    writer (the lowest-index member still training, member 0 unless it finished early) also
    carry Lightning's plain ``epoch``, as a run without the strategy logs it. Each sync round's
    ``ensemble/...`` row and the members' ``member_{i}/hqde/distance_to_consensus`` are logged at
    the step of that epoch's end-of-epoch rows (the members report it with the sync).
    """

    def __init__(self, trainer: Trainer, strategy: Any, progress: EnsembleProgress) -> None:
        self.trainer = trainer
        self.strategy = strategy
        self.progress = progress
        self.last_step = 0
        #: each member's measured training speed, fed to placement when the member finishes
        self.batches_per_second: dict[int, float] = {}
        self._first_report: dict[int, tuple[float, int]] = {}
        self._notices: set[str] = set()
        #: members whose fit ended (they sent a :class:`FinishedEvent`)
        self._finished: set[int] = set()

    def _writer(self) -> int | None:
        """The lowest-index member still training: the one whose rows carry the plain ``epoch``."""
        gone = self._finished | set(self.strategy.dropped_members)
        return next((m for m in range(self.strategy.num_members) if m not in gone), None)

    def forget(self, member: int) -> None:
        """A restarted member counts its speed afresh."""
        self._first_report.pop(member, None)

    def _measure(self, member: int, epoch: int, batch: int, total: int | None) -> None:
        if total is None:
            return
        done, now = epoch * total + batch, time.monotonic()
        started, done_then = self._first_report.setdefault(member, (now, done))
        if now > started and done > done_then:
            self.batches_per_second[member] = (done - done_then) / (now - started)

    def handle(self, events: list[Event]) -> None:
        """Passes each of ``events`` (in the order they were queued) on to where it belongs in the driver."""
        loggers = self.trainer.loggers
        for event in events:
            if isinstance(event, MetricsEvent):
                self.last_step = max(self.last_step, event.step or 0)
                row = self._row(event)
                if row:
                    loggers[event.logger_index].log_metrics(row, event.step)
            elif isinstance(event, FinishedEvent):
                self._finished.add(event.member)
            elif isinstance(event, DistanceEvent):
                name = f"member_{event.member}/hqde/distance_to_consensus"
                self.trainer.callback_metrics[name] = torch.tensor(event.distance)
                for logger in loggers:
                    logger.log_metrics({name: event.distance}, event.step)
            elif isinstance(event, HparamsEvent):
                loggers[event.logger_index].log_hyperparams(event.params)
            elif isinstance(event, Notice):
                if event.message not in self._notices:  # every member sends the same notice; show it once
                    self._notices.add(event.message)
                    (rank_zero_warn if event.warning else rank_zero_info)(event.message)
            elif isinstance(event, ClonesEvent):
                self._warn_clones(event.members, event.round)
            elif isinstance(event, ProgressEvent):
                self.progress.update(event.member, event.epoch, event.batch, event.total, event.loss)
                self._measure(event.member, event.epoch, event.batch, event.total)
            elif isinstance(event, SyncRecord):
                self.strategy.sync_history.append(event)
                for logger in loggers:
                    logger.log_metrics(_sync_summary(event), self.last_step if event.step is None else event.step)
            else:
                raise TypeError(f"HQDEStrategy: unknown event {event!r} from the members")

    def _row(self, event: MetricsEvent) -> dict[str, float | int]:
        """A member's row under ``member_{i}/``; a group actor's row as it is. Only the writer's rows keep plain keys (``epoch``)."""
        if event.group is None:
            row = {f"member_{event.member}/{k}": v for k, v in event.metrics.items()}
            if "epoch" in event.metrics and event.member == self._writer():
                row["epoch"] = event.metrics["epoch"]
            return row
        writes = self._writer() in event.group
        return {k: v for k, v in event.metrics.items() if k.startswith("member_") or writes}

    def _warn_clones(self, members: list[int], round_id: int) -> None:
        if self.strategy.member_init == "shared":
            cause = (
                "they started from the same weights (`member_init='shared'`) and read the same data order"
                " (`shuffle=False`, an iterable dataset or a sampler HQDEStrategy cannot re-seed: see the warnings above)."
                " Use `member_init='independent'`, `bagging=True` or a shuffling sampler"
            )
        else:
            cause = (
                "re-initialisation gave them the same weights (e.g. `__init__` loads fixed weights) and they read the same"
                " data order (`shuffle=False`, an iterable dataset or a sampler HQDEStrategy cannot re-seed: see the warnings"
                " above). Use `bagging=True` or a shuffling sampler"
            )
        rank_zero_warn(
            f"HQDEStrategy: members {members} hold identical weights after epoch {round_id}: they train as copies of one"
            f" model and the ensemble is no better than one member. Probable cause: {cause}."
        )


def _sync_summary(record: SyncRecord) -> dict[str, float]:
    """What the loggers get for one sync round: ``ensemble/sync_*`` and, with reputations, ``ensemble/reputation_{i}``."""
    summary = {
        "ensemble/sync_round": float(record.round),
        "ensemble/sync_comm_rounds": float(record.comm_rounds),
        "ensemble/sync_bytes_moved": float(record.bytes_moved),
        "ensemble/sync_seconds": float(record.aggregation_seconds),
        "ensemble/sync_bytes": float(record.bytes_received),
        "ensemble/sync_fp32_bytes": float(record.fp32_bytes),
        "ensemble/sync_excluded_members": float(len(record.excluded)),
    }
    summary.update({f"ensemble/sync_{k}": float(v) for k, v in record.info.items() if isinstance(v, (int, float))})
    reputation = record.info.get("reputation")
    if isinstance(reputation, list):
        summary.update({f"ensemble/reputation_{m}": float(r) for m, r in zip(record.members, reputation)})
    return summary
