"""Evaluating the ensemble in ``validate``/``test``/``predict`` (in the driver, no Ray needed).

While one of these runs, your module's ``forward`` is the ensemble's: ``self(x)`` inside your
``validation_step``/``test_step``/``predict_step`` returns the combined output of every
active member (for class logits: the log of the mean member probabilities; which outputs
count as class logits is decided as :mod:`hqde_lightning.ensemble` describes). Your own
metrics therefore measure the ensemble.

The classification contract: when a batch is ``(inputs, target, ...)`` with an integer
``target`` of shape ``(batch,)`` and a call of ``self(...)`` in the step returns logits of shape
``(batch, classes)`` with ``classes > target`` (alone, or as one leaf of a tuple/dict output),
this callback also logs, with torchmetrics:

* ``ensemble/{stage}_acc``, ``_nll``, ``_ece`` (expected calibration error, 15 bins),
  ``_brier`` and ``_disagreement`` (mean pairwise disagreement of the members' classes),
* ``member_{i}/{stage}_acc`` and ``_nll`` for every active member,

where ``stage`` is ``val`` or ``test``. They are computed from the member outputs of the first
such call in the step, i.e. from what your ``forward`` actually received (after any reshaping
in your step); the members are never run again on the raw batch. A step that calls no
``self(...)`` (or none returning such logits) gets no built-in metrics, with a one-time notice.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from hqde_lightning.ensemble import AutoCombiner, ClassLogitsLeaf, Ensemble, is_class_target, is_stacked_logits, leaf_paths

__all__ = ["EnsembleEvaluation", "EnsembleMetrics", "classification_batch"]


class _EnsembleForward:
    """Stands in for a module's ``forward``: the ensemble's output.

    For the current batch it remembers the stacked member outputs of every call (``calls``)
    and hands them, with the batch's integer class targets if it has some, to the combiner.
    """

    def __init__(self, ensemble: Ensemble) -> None:
        self.ensemble = ensemble
        self.target: Tensor | None = None
        self.calls: list[Any] = []
        self._noticed_mean = False

    def begin_batch(self, target: Tensor | None) -> None:
        """Forgets the previous batch's calls; ``target`` is this batch's class targets or ``None``."""
        self.target, self.calls = target, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.ensemble.member_outputs(*args, **kwargs)
        if self.target is not None:
            self.ensemble.combiner.observe_targets(outputs, self.target)
        self.calls.append(outputs)
        self._notice_averaged_logits(outputs)
        return self.ensemble.combine_outputs(outputs)

    def _notice_averaged_logits(self, outputs: Any) -> None:
        """Says once when ``combine="auto"`` averages ``(batch, k >= 2)`` outputs for want of targets."""
        combiner = self.ensemble.combiner
        if self._noticed_mean or self.target is not None or not isinstance(combiner, AutoCombiner) or combiner.logits.path is not None:
            return
        shapes = [tuple(leaf.shape[1:]) for _, leaf in leaf_paths(outputs) if is_stacked_logits(leaf)]
        if shapes:
            self._noticed_mean = True
            rank_zero_info(
                f"HQDEStrategy(combine='auto') averages the members' {shapes[0]} outputs: no evaluation batch with integer class"
                " targets showed them to be class logits. Run `trainer.validate`/`trainer.test` first, or pass"
                " `combine='probability'`, to combine them as probabilities."
            )


def classification_batch(batch: Any) -> tuple[Tensor, Tensor] | None:
    """``(inputs, target)`` when ``batch`` follows the classification contract, else ``None``."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        return None
    inputs, target = batch[0], batch[1]
    return (inputs, target) if is_class_target(target) else None


class EnsembleMetrics:
    """Ensemble and per-member torchmetrics (accuracy, NLL, ECE, Brier, disagreement) for one stage and dataloader."""

    def __init__(self, num_members: int, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
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
        self._logits = ClassLogitsLeaf()
        self._warned_contract = False

    # ------------------------------------------------------------- forward
    def _begin(self, pl_module: LightningModule) -> None:
        self._metrics = {}
        self._logits = ClassLogitsLeaf()
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
    def _begin_batch(self, batch: Any) -> None:
        if self._forward is not None:
            pair = classification_batch(batch)
            self._forward.begin_batch(None if pair is None else pair[1])

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._begin_batch(batch)

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._begin_batch(batch)

    def on_predict_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._begin_batch(batch)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(dataloader_idx)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(dataloader_idx)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(pl_module, "test")

    def _update(self, dataloader_idx: int) -> None:
        """Updates the built-in metrics from the member outputs this step's ``self(...)`` calls produced."""
        if self._forward is None:
            return
        target = self._forward.target
        calls = self._forward.calls if target is not None else []
        for outputs in calls:
            self._logits.observe(outputs, target)
        logits = next((leaf for leaf in map(self._logits.select, calls) if leaf is not None and leaf.shape[1] == target.shape[0]), None)
        metrics = self._metrics.get(dataloader_idx)
        if logits is None or (metrics is not None and metrics.num_classes != logits.shape[-1]):
            if not self._warned_contract:
                self._warned_contract = True
                rank_zero_warn(
                    "HQDEStrategy logs ensemble accuracy/calibration only for `(inputs, int target)` batches whose step calls"
                    " `self(...)` and gets `(batch, classes)` logits (alone or inside a tuple/dict); this step does not, so only"
                    " your own logged metrics (computed on the ensemble's forward) are reported."
                )
            return
        ensemble = self._forward.ensemble
        if dataloader_idx not in self._metrics:
            self._metrics[dataloader_idx] = EnsembleMetrics(logits.shape[0], logits.shape[-1], logits.device)
        self._metrics[dataloader_idx].update(logits.detach(), ensemble.active_weights(), target)

    def _log(self, pl_module: LightningModule, stage: str) -> None:
        if self._forward is None or not self._metrics:
            return
        member_ids = self._forward.ensemble.active_member_ids()
        values: dict[str, Tensor] = {}
        for dataloader_idx, metrics in sorted(self._metrics.items()):
            suffix = f"/dataloader_idx_{dataloader_idx}" if len(self._metrics) > 1 else ""
            values.update(metrics.compute(stage, member_ids, suffix))
        pl_module.log_dict({k: v.float() for k, v in values.items()}, add_dataloader_idx=False)
