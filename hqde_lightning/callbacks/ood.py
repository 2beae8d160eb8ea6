"""``OODEvaluation``: how well the ensemble's uncertainty flags out-of-distribution inputs in ``trainer.test``.

A thin Lightning wrapper over :func:`hqde_lightning.uncertainty.ood_detection_metrics` (torchmetrics
AUROC, average precision and ROC).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from hqde_lightning.ensemble import Ensemble
from hqde_lightning.evaluation import EnsembleEvaluationCallback, EnsembleMetrics
from hqde_lightning.misconfiguration import InvalidArgument, lightning_arguments
from hqde_lightning.uncertainty import ood_detection_metrics, predictive_entropy, uncertainty_decomposition
from hqde_lightning.validation import check_int

__all__ = ["OODEvaluation"]


class OODEvaluation(EnsembleEvaluationCallback):
    """Logs out-of-distribution detection metrics of an ``HQDEStrategy`` ensemble in ``trainer.test``.

    Use it with two test loaders, ``trainer.test(model, dataloaders=[in_distribution, ood])``
    (Lightning then needs ``test_step(self, batch, batch_idx, dataloader_idx=0)``).
    The OOD inputs are the positives; the scores are computed from the member logits your
    ``test_step``'s ``self(...)`` produced (the OOD loader's labels are ignored: it may carry any,
    e.g. zeros, so that your ``test_step`` can unpack its batches). It logs

    * ``ensemble/ood_auroc``, ``ensemble/ood_aupr``, ``ensemble/ood_fpr95`` scored by the
      predictive entropy of the ensemble's probabilities (with its temperature),
    * ``ensemble/ood_auroc_mi`` scored by the mutual information (member disagreement),
    * ``member_{i}/ood_auroc`` scored by member ``i``'s own predictive entropy.

    AUPR is the average precision with OOD as the positive class; FPR95 is the share of
    in-distribution inputs flagged when 95 % of the OOD inputs are. The built-in accuracy and
    calibration metrics skip the OOD loader. Which output holds the class logits is learnt from
    the in-distribution loader, so it should come first (the default indices).

    Args:
        ood_dataloader_idx: index of the OOD loader among the test loaders.
        in_dataloader_idx: index of the in-distribution loader.

    Attributes:
        results: the metrics of the last ``test`` (``{}`` before one).

    Raises:
        MisconfigurationException: for indices that are not distinct integers >= 0.
    """

    def __init__(self, ood_dataloader_idx: int = 1, in_dataloader_idx: int = 0) -> None:
        with lightning_arguments("OODEvaluation"):
            check_int(ood_dataloader_idx, "ood_dataloader_idx", 0)
            check_int(in_dataloader_idx, "in_dataloader_idx", 0)
        if ood_dataloader_idx == in_dataloader_idx:
            raise InvalidArgument(
                f"`OODEvaluation(ood_dataloader_idx={ood_dataloader_idx}, in_dataloader_idx={in_dataloader_idx})`: the two loaders must differ."
            )
        self.ood_dataloader_idx = ood_dataloader_idx
        self.in_dataloader_idx = in_dataloader_idx
        self.results: dict[str, float] = {}
        self._scores: dict[int, dict[str, list[Tensor]]] = {}

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._scores = {}

    def ignores_targets(self, stage: str, dataloader_idx: int) -> bool:
        return stage == "test" and dataloader_idx == self.ood_dataloader_idx

    def on_ensemble_batch(self, trainer: Trainer, stage: str, dataloader_idx: int, member_logits: Tensor, ensemble: Ensemble) -> None:
        if stage != "test" or dataloader_idx not in (self.in_dataloader_idx, self.ood_dataloader_idx):
            return
        parts = uncertainty_decomposition(member_logits, ensemble.active_weights(), ensemble.temperature)
        scores = self._scores.setdefault(dataloader_idx, {"entropy": [], "mutual_information": [], "members": []})
        scores["entropy"].append(parts["entropy"].cpu())
        scores["mutual_information"].append(parts["mutual_information"].cpu())
        scores["members"].append(predictive_entropy(parts["member_probs"]).cpu())

    def on_ensemble_epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: str, ensemble: Ensemble, metrics: Mapping[int, EnsembleMetrics]) -> None:
        if stage != "test":
            return
        missing = [name for name, idx in (("in-distribution", self.in_dataloader_idx), ("OOD", self.ood_dataloader_idx)) if idx not in self._scores]
        if missing:
            rank_zero_warn(
                f"OODEvaluation logs nothing: no class logits from the {' and '.join(missing)} test loader (indices: in-distribution"
                f" {self.in_dataloader_idx}, OOD {self.ood_dataloader_idx}). Pass `trainer.test(model, dataloaders=[in_loader, ood_loader])`"
                " with a `test_step` that calls `self(inputs)`."
            )
            return
        scores = {idx: {k: torch.cat(v, dim=-1) for k, v in parts.items()} for idx, parts in self._scores.items()}
        inside, outside = scores[self.in_dataloader_idx], scores[self.ood_dataloader_idx]
        by_entropy = ood_detection_metrics(inside["entropy"], outside["entropy"])
        values = {f"ensemble/ood_{k}": v for k, v in by_entropy.items()}
        values["ensemble/ood_auroc_mi"] = ood_detection_metrics(inside["mutual_information"], outside["mutual_information"])["auroc"]
        for position, index in enumerate(ensemble.active_member_ids()):
            values[f"member_{index}/ood_auroc"] = ood_detection_metrics(inside["members"][position], outside["members"][position])["auroc"]
        self.results = {k: float(v) for k, v in values.items()}
        pl_module.log_dict({k: v.float() for k, v in values.items()}, add_dataloader_idx=False)
