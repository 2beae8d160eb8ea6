"""Evaluating the ensemble in ``validate``/``test``/``predict`` (in the driver, no Ray needed).

While one of these runs, your module's ``forward`` is the ensemble's: ``self(x)`` inside your
``validation_step``/``test_step``/``predict_step`` returns the combined output of every
active member (for class logits: the log of the mean member probabilities). Your own
metrics therefore measure the ensemble.

The classification contract: when a batch is ``(inputs, target, ...)`` with an integer
``target`` of shape ``(batch,)`` and ``module(inputs)`` returns logits of shape
``(batch, classes)``, this callback also logs, with torchmetrics:

* ``ensemble/{stage}_acc``, ``_nll``, ``_ece`` (expected calibration error, 15 bins),
  ``_brier`` and ``_disagreement`` (mean pairwise disagreement of the members' classes),
* ``member_{i}/{stage}_acc`` and ``_nll`` for every active member,

where ``stage`` is ``val`` or ``test``.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from hqde_lightning.ensemble import Ensemble

__all__ = ["EnsembleEvaluation", "EnsembleMetrics", "classification_batch"]


class _EnsembleForward:
    """Stands in for a module's ``forward``: the ensemble's output, remembering member outputs."""

    def __init__(self, ensemble: Ensemble) -> None:
        self.ensemble = ensemble
        self.last: tuple[Any, Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.ensemble.member_outputs(*args, **kwargs)
        if len(args) == 1 and not kwargs:
            self.last = (args[0], outputs)
        return self.ensemble.combine_outputs(outputs)

    def member_outputs_for(self, inputs: Any) -> Any:
        if self.last is not None and self.last[0] is inputs:
            return self.last[1]
        with torch.no_grad():
            return self.ensemble.member_outputs(inputs)


def classification_batch(batch: Any) -> tuple[Tensor, Tensor] | None:
    """``(inputs, target)`` when ``batch`` follows the classification contract, else ``None``."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        return None
    inputs, target = batch[0], batch[1]
    if not isinstance(target, Tensor) or target.dim() != 1 or target.dtype.is_floating_point or target.dtype == torch.bool:
        return None
    return inputs, target


class EnsembleMetrics:
    """Ensemble and per-member torchmetrics (accuracy, NLL, ECE, Brier, disagreement) for one stage and dataloader."""

    def __init__(self, num_members: int, num_classes: int, device: torch.device) -> None:
        self.ensemble = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
                "ece": MulticlassCalibrationError(num_classes=num_classes, n_bins=15, norm="l1"),
                "nll": MeanMetric(),
                "brier": MeanMetric(),
                "disagreement": MeanMetric(),
            }
        ).to(device)
        self.members = [
            MetricCollection({"acc": MulticlassAccuracy(num_classes=num_classes, average="micro"), "nll": MeanMetric()}).to(device)
            for _ in range(num_members)
        ]

    def update(self, member_logits: Tensor, weights: Tensor, target: Tensor) -> None:
        member_probs = torch.softmax(member_logits.float(), dim=-1)
        probs = (member_probs * weights.to(member_probs).view(-1, 1, 1)).sum(0)
        picked = probs.gather(1, target.view(-1, 1)).squeeze(1)
        one_hot = torch.nn.functional.one_hot(target, probs.shape[-1]).to(probs)
        classes = member_probs.argmax(-1)
        pairs = list(itertools.combinations(range(classes.shape[0]), 2))
        disagreement = torch.stack([(classes[i] != classes[j]).float().mean() for i, j in pairs]).mean() if pairs else torch.zeros((), device=probs.device)
        self.ensemble["acc"].update(probs, target)
        self.ensemble["ece"].update(probs, target)
        self.ensemble["nll"].update(-torch.log(picked.clamp_min(1e-12)))
        self.ensemble["brier"].update(((probs - one_hot) ** 2).sum(-1))
        self.ensemble["disagreement"].update(disagreement)
        for metrics, p in zip(self.members, member_probs):
            metrics["acc"].update(p, target)
            metrics["nll"].update(-torch.log(p.gather(1, target.view(-1, 1)).squeeze(1).clamp_min(1e-12)))

    def compute(self, stage: str, member_ids: list[int], suffix: str) -> dict[str, Tensor]:
        out = {f"ensemble/{stage}_{k}{suffix}": v for k, v in self.ensemble.compute().items()}
        for index, metrics in zip(member_ids, self.members):
            out.update({f"member_{index}/{stage}_{k}{suffix}": v for k, v in metrics.compute().items()})
        return out


class EnsembleEvaluation(Callback):
    """Makes ``validate``/``test``/``predict`` evaluate ``strategy.ensemble`` (added by the launcher)."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self._module: LightningModule | None = None
        self._forward: _EnsembleForward | None = None
        self._metrics: dict[int, EnsembleMetrics] = {}
        self._warned_contract = False

    # ------------------------------------------------------------- forward
    def _begin(self, pl_module: LightningModule) -> None:
        self._metrics = {}
        ensemble = self.strategy.ensemble
        if ensemble is None:
            rank_zero_warn("HQDEStrategy has no trained ensemble yet (call `fit` or pass an HQDE `ckpt_path`): evaluating the module itself.")
            return
        ensemble.to(pl_module.device).eval()
        self._forward = _EnsembleForward(ensemble)
        pl_module.forward = self._forward  # an instance attribute shadows the class's forward
        self._module = pl_module

    def restore_forward(self) -> None:
        """Gives the module its own ``forward`` back."""
        if self._module is not None:
            self._module.__dict__.pop("forward", None)
        self._module, self._forward = None, None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._begin(pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin(pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin(pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.restore_forward()

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.restore_forward()

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.restore_forward()

    # ------------------------------------------------------------- metrics
    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(batch, dataloader_idx)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(batch, dataloader_idx)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(pl_module, "test")

    def _update(self, batch: Any, dataloader_idx: int) -> None:
        if self._forward is None:
            return
        pair = classification_batch(batch)
        logits = None if pair is None else self._forward.member_outputs_for(pair[0])
        if pair is None or not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[1] != pair[1].shape[0] or logits.shape[-1] < 2:
            if not self._warned_contract:
                self._warned_contract = True
                rank_zero_warn(
                    "HQDEStrategy logs ensemble accuracy/calibration only for `(inputs, int target)` batches whose"
                    " `module(inputs)` returns `(batch, classes)` logits; this module's batches do not, so only"
                    " your own logged metrics (computed on the ensemble's forward) are reported."
                )
            return
        ensemble = self._forward.ensemble
        if dataloader_idx not in self._metrics:
            self._metrics[dataloader_idx] = EnsembleMetrics(logits.shape[0], logits.shape[-1], logits.device)
        self._metrics[dataloader_idx].update(logits.detach(), ensemble.active_weights(), pair[1])

    def _log(self, pl_module: LightningModule, stage: str) -> None:
        if self._forward is None or not self._metrics:
            return
        member_ids = self._forward.ensemble.active_indices()
        values: dict[str, Tensor] = {}
        for dataloader_idx, metrics in sorted(self._metrics.items()):
            suffix = f"/dataloader_idx_{dataloader_idx}" if len(self._metrics) > 1 else ""
            values.update(metrics.compute(stage, member_ids, suffix))
        pl_module.log_dict({k: v.float() for k, v in values.items()}, add_dataloader_idx=False)
