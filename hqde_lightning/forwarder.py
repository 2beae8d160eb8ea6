"""``EventForwarder``: in the driver, hands what the members report to the user's loggers and the progress bars.

Members queue their events at the coordinator; the member pool drains them while the fit runs
and passes them to :meth:`EventForwarder.handle`.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from hqde_lightning.progress import EnsembleProgress

__all__ = ["EventForwarder"]


class EventForwarder:
    """Hands the members' metrics to the driver's loggers and their progress to the progress bars."""

    def __init__(self, trainer: Trainer, strategy: Any, progress: EnsembleProgress) -> None:
        self.trainer = trainer
        self.strategy = strategy
        self.progress = progress
        self.last_step = 0
        #: each member's measured training speed, fed to placement when the member finishes
        self.batches_per_second: dict[int, float] = {}
        self._first_report: dict[int, tuple[float, int]] = {}
        self._notices: set[str] = set()

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

    def handle(self, events: list[tuple[Any, ...]]) -> None:
        loggers = self.trainer.loggers
        for kind, member, data in events:
            if kind == "metrics":
                logger_index, values, step = data
                self.last_step = max(self.last_step, step or 0)
                loggers[logger_index].log_metrics({f"member_{member}/{k}": v for k, v in values.items()}, step)
            elif kind == "hparams":
                logger_index, params = data
                loggers[logger_index].log_hyperparams(params)
            elif kind in ("warning", "info"):
                if data not in self._notices:  # every member sends the same notice; show it once
                    self._notices.add(data)
                    (rank_zero_warn if kind == "warning" else rank_zero_info)(data)
            elif kind == "clones":
                self._warn_clones(*data)
            elif kind == "progress":
                self.progress.update(member, *data)
                self._measure(member, *data[:3])
            elif kind == "sync":
                self.strategy.sync_history.append(data)
                summary = {
                    "ensemble/sync_round": float(data["round"]),
                    "ensemble/sync_comm_rounds": float(data["comm_rounds"]),
                    "ensemble/sync_bytes_moved": float(data["bytes_moved"]),
                    "ensemble/sync_seconds": float(data["aggregation_seconds"]),
                    "ensemble/sync_bytes": float(data["bytes_received"]),
                    "ensemble/sync_fp32_bytes": float(data["fp32_bytes"]),
                    "ensemble/sync_excluded_members": float(len(data["excluded"])),
                }
                summary.update({f"ensemble/sync_{k}": float(v) for k, v in data["info"].items() if isinstance(v, (int, float))})
                reputation = data["info"].get("reputation")
                if isinstance(reputation, list):
                    summary.update({f"ensemble/reputation_{m}": float(r) for m, r in zip(data["members"], reputation)})
                for logger in loggers:
                    logger.log_metrics(summary, self.last_step)

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
