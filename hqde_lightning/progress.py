"""The driver's progress display for a fit: one bar per member, fed by the members' reports."""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

__all__ = ["EnsembleProgress"]


class EnsembleProgress:
    """One Lightning ``Tqdm`` bar per member: epoch, batches done this epoch, last loss.

    Args:
        num_members: ensemble size.
        enabled: ``False`` when the Trainer has no progress bar (``enable_progress_bar=False``).
    """

    def __init__(self, num_members: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bars: list[Tqdm] = []
        if enabled:
            self._bars = [
                Tqdm(desc=f"member {i}", position=i, total=None, leave=True, dynamic_ncols=True, file=sys.stderr, unit="batch")
                for i in range(num_members)
            ]

    def update(self, member: int, epoch: int, batch: int, total: int | None, loss: float | None) -> None:
        """Shows that ``member`` has done ``batch`` of ``total`` batches of ``epoch``."""
        if not self.enabled or member >= len(self._bars):
            return
        bar = self._bars[member]
        bar.set_description(f"member {member} epoch {epoch}", refresh=False)
        if total is not None and bar.total != total:
            bar.reset(total=total)
        bar.n = batch
        postfix: dict[str, Any] = {} if loss is None else {"loss": f"{loss:.4g}"}
        bar.set_postfix(postfix, refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self._bars:
            bar.close()
        self._bars = []
