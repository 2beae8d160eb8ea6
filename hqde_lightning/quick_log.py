"""``QuickLog``: a group's many ``self.log`` calls per step, at a fraction of their cost.

A member group logs each value your steps log once per member (``member_{i}/<name>``), so a value
logged ``on_epoch=True`` costs k ``self.log`` calls at every step. Each call costs Lightning about half
a millisecond, mostly checks and moving the value's result metric to the value's device, which for
an 8-member group of small models was a third of the step (``benchmarks/step_cost.py --on-epoch``).

Once a name has been logged through ``self.log`` in a loop, its result (a ``_ResultMetric`` in the
loop's result collection) exists, on the right device, with the options it was logged with. Logging
the same name with the same options again only has to update that result, which is what
``self.log`` ends with: :class:`QuickLog` does that update directly (the same accumulation, the
same step value, the same batch-size weighting) and goes through ``self.log`` whenever anything
else could happen: the name's first value in this loop, other options, a value that is not a
tensor on the result's device, the first value of a new epoch (when Lightning resets the results),
or a batch size the call leaves to Lightning to find.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule
from torch import Tensor

__all__ = ["QuickLog"]


class QuickLog:
    """Logs through ``module.log``, or straight into the result a previous identical ``module.log`` made."""

    def __init__(self, module: LightningModule) -> None:
        self.module = module
        #: per result key, the options (batch size aside) ``module.log`` registered it with, and the collection holding it
        self._registered: dict[str, tuple[dict[str, Any], Any]] = {}

    def __call__(self, name: str, value: Any, options: dict[str, Any]) -> None:
        """``module.log(name, value, **options)``."""
        trainer = self.module.trainer
        results, fx = trainer._results, self.module._current_fx_name
        key = f"{fx}.{name}"
        if options.get("add_dataloader_idx", True) and results.dataloader_idx is not None:
            key += f".{results.dataloader_idx}"
        batch_size = options.get("batch_size")
        same = {k: v for k, v in options.items() if k != "batch_size"}
        registered = self._registered.get(key)
        result = results.get(key) if registered is not None and registered[0] == same and registered[1] is results else None
        if (
            result is not None and result.is_tensor and batch_size is not None and isinstance(value, Tensor) and value.numel() == 1
            and result.value.device == value.device and not trainer._logger_connector.should_reset_tensors(fx)
        ):
            if not options.get("enable_graph", False):
                value = value.detach()
            results.update_metrics(key, value.squeeze(), batch_size)
            trainer._logger_connector._current_fx = fx  # as `module.log` leaves it
            return
        self.module.log(name, value, **options)
        self._registered[key] = (same, results)
