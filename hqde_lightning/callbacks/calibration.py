"""Calibration of ``HQDEStrategy`` ensembles: temperature scaling after ``fit`` and reliability diagrams.

* :class:`EnsembleCalibration`: after ``fit``, fits the ensemble's temperature on the validation
  data (:meth:`hqde_lightning.ensemble.Ensemble.calibrate`).
* :class:`ReliabilityDiagram`: in ``test`` (or ``validate``), draws the ensemble's and its best
  member's reliability diagram from the built-in metrics' data, writes it as PNG and sends it
  to the loggers that take figures (TensorBoard's ``add_figure``). Needs matplotlib.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from hqde_lightning.callbacks.selection import fit_validation_data
from hqde_lightning.ensemble import Ensemble
from hqde_lightning.evaluation import EnsembleEvaluationCallback, EnsembleMetrics, reliability_diagram
from hqde_lightning.misconfiguration import lightning_arguments
from hqde_lightning.validation import check_choice, check_int

__all__ = ["EnsembleCalibration", "ReliabilityDiagram"]

_STAGES = ("val", "test")


class EnsembleCalibration(Callback):
    """Temperature-scales ``HQDEStrategy``'s ensemble on the fit's validation data once ``fit`` ends.

    Runs in the driver once the members are back (``on_ensemble_fit_end``): one temperature T is
    fitted by minimising the NLL of the ensemble's probabilities softmax(log p̄ / T) on the
    validation loader(s) (T stays 1 when no T lowers it) and stored in ``strategy.ensemble``, so
    that ``test``/``predict``, ``predict_proba`` and checkpoints written afterwards use it. Put it
    after ``EnsembleSelection`` in ``callbacks`` when you use both, so the chosen members are calibrated.

    Attributes:
        temperature: the fitted temperature (``None`` before a fit ended).
    """

    def __init__(self) -> None:
        self.temperature: float | None = None

    def on_ensemble_fit_end(self, trainer: Trainer, strategy: Any, val_dataloaders: Callable[[], Any] | None) -> None:
        """Calibrates ``strategy.ensemble`` on the fit's validation data (called by ``HQDEStrategy``)."""
        ensemble, loaders = fit_validation_data(trainer, strategy, val_dataloaders, "EnsembleCalibration", "fits a temperature on the validation data")
        self.temperature = ensemble.calibrate(itertools.chain.from_iterable(loaders))
        rank_zero_info(f"EnsembleCalibration: temperature {self.temperature:.4f} fitted on the validation data.")

    def state_dict(self) -> dict[str, Any]:
        return {} if self.temperature is None else {"temperature": self.temperature}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.temperature = state_dict.get("temperature")


class ReliabilityDiagram(EnsembleEvaluationCallback):
    """Draws the reliability diagram of ``HQDEStrategy``'s ensemble and its most accurate member.

    At the end of each ``stage`` epoch (``trainer.test`` by default) it bins the inputs by
    confidence (largest class probability) and draws the accuracy per bin against the diagonal,
    with the number of inputs per bin (:func:`hqde_lightning.evaluation.reliability_diagram`),
    from the data of the built-in metrics (classification batches only). The figure is written
    to ``dirpath/reliability_{stage}[_dataloader_idx_k].png`` and passed to every logger whose
    ``experiment`` has ``add_figure`` (TensorBoard), tagged ``ensemble/reliability_{stage}[...]``.

    Args:
        dirpath: folder of the PNG files; ``None``: ``trainer.log_dir`` (the logger's folder, or
            ``default_root_dir`` without one).
        n_bins: number of equal-width confidence bins, an integer >= 1.
        stage: ``"test"`` or ``"val"``.

    Attributes:
        paths: the PNG files written so far.

    Raises:
        MisconfigurationException: for a bad argument, or when matplotlib is not installed.
    """

    def __init__(self, dirpath: str | os.PathLike[str] | None = None, n_bins: int = 15, stage: str = "test") -> None:
        if importlib.util.find_spec("matplotlib") is None:
            raise MisconfigurationException("ReliabilityDiagram draws with matplotlib: `pip install 'hqde-lightning[plot]'` (or `pip install matplotlib`).")
        with lightning_arguments("ReliabilityDiagram"):
            check_int(n_bins, "n_bins", 1)
            check_choice(stage, "stage", _STAGES)
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.n_bins = n_bins
        self.stage = stage
        self.paths: list[Path] = []

    def on_ensemble_epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: str, ensemble: Ensemble, metrics: Mapping[int, EnsembleMetrics]) -> None:
        if stage != self.stage or trainer.sanity_checking:
            return
        folder = self.dirpath if self.dirpath is not None else Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        member_ids = ensemble.active_member_ids()
        for dataloader_idx, data in sorted(metrics.items()):
            suffix = f"_dataloader_idx_{dataloader_idx}" if len(metrics) > 1 else ""
            temperature = float(ensemble.temperature)
            title = f"{stage}{suffix}: {len(member_ids)} members" + (f", temperature {temperature:.3f}" if temperature != 1.0 else "")
            figure = reliability_diagram(data.reliability(member_ids, self.n_bins), title=title)
            path = folder / f"reliability_{stage}{suffix}.png"
            figure.savefig(path, dpi=100)
            self.paths.append(path)
            for logger in trainer.loggers:
                add_figure = getattr(getattr(logger, "experiment", None), "add_figure", None)
                if callable(add_figure):
                    add_figure(f"ensemble/reliability_{stage}{suffix}", figure, global_step=trainer.global_step)
