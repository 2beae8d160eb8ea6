"""Small real-data fixtures for the tests: scikit-learn's bundled digits (no download).

The digits split is ``examples/digits_data.py``'s ``DigitsData`` (one copy for the examples,
tests and benchmarks): 1,200 train / 297 val / 300 test with a fixed permutation.
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from digits_data import DigitsData as DigitsDataModule  # noqa: E402
from digits_data import digits  # noqa: E402

__all__ = ["DigitsDataModule", "DigitsModule", "TanhDigitsModule", "digits", "quiet_trainer"]


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A one-epoch ``Trainer`` without logger, checkpoints, progress bar or model summary; ``kwargs`` override."""
    options = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    options.update(kwargs)
    return pl.Trainer(**options)


class DigitsModule(pl.LightningModule):
    """A small MLP (with BatchNorm, so buffers and integer counters are exercised)."""

    def __init__(self, hidden: int = 32, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class TanhDigitsModule(DigitsModule):
    """An MLP with tanh and no normalisation: not scale-invariant, so weight-scaling attacks bite."""

    def __init__(self, hidden: int = 64, lr: float = 0.1) -> None:
        super().__init__(hidden=hidden, lr=lr)
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
