"""``PerformanceMonitor``: throughput and memory per member, traffic per sync, one summary table."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from hqde_lightning.group import MemberGroup
from hqde_lightning.member_data import group_batch_size
from hqde_lightning.misconfiguration import lightning_arguments
from hqde_lightning.validation import check_int, check_optional

__all__ = ["PerformanceMonitor"]

_MEMBER_METRICS = ("samples_per_sec", "step_time_ms", "cpu_rss_mb", "cuda_max_allocated_mb")


class PerformanceMonitor(Callback):
    """Logs training speed and memory inside each member and summarises the ensemble after ``fit``.

    Inside every member (or a plain ``Trainer``), at the end of each window of
    ``log_every_n_steps`` training batches and at the end of each epoch, it logs:

    - ``perf/samples_per_sec``: samples trained per second of wall time over the window
      (data loading included);
    - ``perf/step_time_ms``: mean time of one training batch (forward, backward, optimizer
      step and whatever the other callbacks do in the batch hooks, such as a sync);
    - ``perf/cpu_rss_mb``: the process's peak resident memory so far (sampled with ``psutil``
      when it is installed, otherwise the kernel's maximum RSS from ``resource.getrusage``);
    - ``perf/cuda_max_allocated_mb``: ``torch.cuda.max_memory_allocated`` when the module is on
      a CUDA device.

    With ``HQDEStrategy`` these reach your loggers as ``member_{i}/perf/...``. Members trained
    together in a member group share one process and one step: each member's
    ``samples_per_sec`` counts its own samples (the group's are their sum), and its
    ``step_time_ms`` and memory are the group's. When the fit ends,
    the driver prints a table of every member's final values and of every sync round (bytes
    moved, their float32 equivalent, aggregation time, members excluded by the aggregator),
    with ``rich`` when it is installed and as plain text otherwise, and keeps it in
    :attr:`summary`.

    Args:
        log_every_n_steps: training batches per measurement window, an integer >= 1; ``None``
            uses the Trainer's ``log_every_n_steps``.

    Attributes:
        summary: after an ``HQDEStrategy`` fit, ``{"members": [...], "syncs": [...],
            "total_bytes": int, "total_fp32_bytes": int}``: one dict per member with its
            ``member`` index and the metrics above it logged, and one dict per sync round with
            ``round``, ``bytes``, ``fp32_bytes``, ``ratio``, ``aggregation_seconds`` and
            ``excluded`` (a count).

    Raises:
        InvalidArgument: (a ``MisconfigurationException`` and a ``ValueError``) for a
            ``log_every_n_steps`` that is neither None nor an integer >= 1.
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        with lightning_arguments("PerformanceMonitor"):
            self.log_every_n_steps = check_optional(check_int, log_every_n_steps, "log_every_n_steps", 1)
        self.summary: dict[str, Any] = {}
        self._window_start: float | None = None
        self._batch_start = 0.0
        self._batches = 0
        self._samples = 0
        self._busy_seconds = 0.0
        self._peak_rss_mb = 0.0

    # ------------------------------------------------------- inside a member
    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset_window()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._window_start is None:
            self._window_start = now
        self._batch_start = now

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        self._busy_seconds += now - self._batch_start
        self._batches += 1
        try:  # a group's batch holds each member's batch: a member's samples are one of them
            self._samples += int(group_batch_size(batch) if isinstance(pl_module, MemberGroup) else extract_batch_size(batch))
        except Exception:  # batches Lightning cannot size count as one sample
            self._samples += 1
        window = self.log_every_n_steps or trainer.log_every_n_steps or 1
        total = trainer.num_training_batches
        epoch_done = not math.isinf(total) and batch_idx + 1 >= total
        if self._batches >= window or epoch_done:
            self._log_window(pl_module, now)

    def _log_window(self, pl_module: LightningModule, now: float) -> None:
        assert self._window_start is not None
        elapsed = max(now - self._window_start, 1e-9)
        metrics = {
            "perf/samples_per_sec": self._samples / elapsed,
            "perf/step_time_ms": 1000.0 * self._busy_seconds / self._batches,
        }
        rss = _cpu_rss_mb()
        if rss is not None:
            self._peak_rss_mb = max(self._peak_rss_mb, rss)
            metrics["perf/cpu_rss_mb"] = self._peak_rss_mb
        device = pl_module.device
        if device.type == "cuda":
            metrics["perf/cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        # in a member group the values are each training member's (its samples, the group's step and memory)
        prefixes = [f"member_{m}/" for m, frozen in zip(pl_module.member_ids, pl_module.frozen) if not frozen] if isinstance(pl_module, MemberGroup) else [""]
        for prefix in prefixes:
            for name, value in metrics.items():
                pl_module.log(prefix + name, value, on_step=True, on_epoch=False)
        self._reset_window()

    def _reset_window(self) -> None:
        self._window_start = None
        self._batches = 0
        self._samples = 0
        self._busy_seconds = 0.0

    # ------------------------------------------------------- in the driver
    def on_ensemble_fit_end(self, trainer: Trainer, strategy: Any, val_dataloaders: Callable[[], Any] | None) -> None:
        """Builds :attr:`summary` from the members' final metrics and the sync history, and prints it."""
        metrics = trainer.callback_metrics
        members = []
        for index in range(strategy.num_members):
            row: dict[str, Any] = {"member": index}
            for name in _MEMBER_METRICS:
                value = metrics.get(f"member_{index}/perf/{name}")
                if value is not None:
                    row[name] = float(value)
            members.append(row)
        syncs = []
        for record in strategy.sync_history:
            sent, fp32 = int(record.bytes_received), int(record.fp32_bytes)
            syncs.append(
                {
                    "round": int(record.round),
                    "bytes": sent,
                    "fp32_bytes": fp32,
                    "ratio": sent / fp32 if fp32 else 1.0,
                    "aggregation_seconds": float(record.aggregation_seconds),
                    "excluded": len(record.excluded),
                }
            )
        self.summary = {
            "members": members,
            "syncs": syncs,
            "total_bytes": sum(s["bytes"] for s in syncs),
            "total_fp32_bytes": sum(s["fp32_bytes"] for s in syncs),
        }
        member_rows = [[str(m["member"])] + [_format(m.get(name)) for name in _MEMBER_METRICS] for m in members]
        sync_rows = [
            [str(s["round"]), f"{s['bytes']:,}", f"{s['fp32_bytes']:,}", f"{s['ratio']:.3f}", f"{1000 * s['aggregation_seconds']:.1f}", str(s["excluded"])]
            for s in syncs
        ]
        _print_table("HQDE members", ["member", "samples/s", "step ms", "CPU RSS MB", "CUDA max MB"], member_rows)
        if sync_rows:
            _print_table("HQDE syncs", ["round", "bytes", "fp32 bytes", "ratio", "aggregation ms", "excluded"], sync_rows)


def _cpu_rss_mb() -> float | None:
    """The process's resident memory in MiB: ``psutil`` when installed, else the peak from ``getrusage``."""
    try:
        import psutil
    except ImportError:  # a dev extra only
        pass
    else:
        return psutil.Process().memory_info().rss / 2**20
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _format(value: float | None) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:,.1f}"


def _print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        lines = [title, "  ".join(h.rjust(w) for h, w in zip(headers, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
        rank_zero_info("\n".join(lines))
        return
    table = Table(title=title)
    for header in headers:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
