"""Small real-data fixtures for the tests: scikit-learn's bundled digits (no download)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A one-epoch ``Trainer`` without logger, checkpoints, progress bar or model summary; ``kwargs`` override."""
    options = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    options.update(kwargs)
    return pl.Trainer(**options)


class DigitsDataModule(pl.LightningDataModule):
    """1,797 8×8 digits, split 1,200 train / 297 val / 300 test with a fixed permutation."""

    def __init__(self, batch_size: int = 64, train_size: int = 1200) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train_size = train_size

    def setup(self, stage: str | None = None) -> None:
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16.0
        y = torch.tensor(y, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x, y = x[order], y[order]
        n = self.train_size
        self.train = TensorDataset(x[:n], y[:n])
        self.val = TensorDataset(x[n : n + 297], y[n : n + 297])
        self.test = TensorDataset(x[n + 297 :], y[n + 297 :])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=256)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.test.tensors[0]), batch_size=256)


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
