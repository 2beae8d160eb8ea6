"""The digits data and classifier steps the examples, tests and benchmarks share (and the examples' table printer).

scikit-learn's bundled digits (1,797 8×8 grey images, 10 classes, BSD-3; no download) as
64-value vectors in [0, 1], in one fixed permutation: 1,200 train / 297 validation / 300 test.
Member actors import this module too: ``HQDEStrategy`` gives them the driver's import path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsData", "SimpleClassifier", "digits", "print_table"]

#: validation images after the training ones
VAL_SIZE = 297


def digits() -> tuple[Tensor, Tensor]:
    """All 1,797 digits in the fixed permutation: float32 inputs ``(1797, 64)`` in [0, 1] and int64 labels."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]


class DigitsData(pl.LightningDataModule):
    """Digits split ``train_size`` train / 297 validation / the rest test (300 by default).

    Args:
        batch_size: training batch size (shuffled); evaluation batches hold 256.
        train_size: training images taken from the start of the permutation.
    """

    def __init__(self, batch_size: int = 64, train_size: int = 1200) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train_size = train_size

    def setup(self, stage: str | None = None) -> None:
        x, y = digits()
        n, m = self.train_size, self.train_size + VAL_SIZE
        self.train = TensorDataset(x[:n], y[:n])
        self.val = TensorDataset(x[n:m], y[n:m])
        self.test = TensorDataset(x[m:], y[m:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=256)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.test.tensors[0]), batch_size=256)


class SimpleClassifier(pl.LightningModule):
    """An ordinary classification LightningModule around ``self.net`` (set by subclasses).

    Cross-entropy training (``train_loss``), ``val_loss``/``val_acc`` and ``test_acc``, SGD with
    momentum 0.9 at ``lr``.
    """

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # the parameters that train: a fine-tuning callback adds the ones it froze later, in a group of their own
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr, momentum=0.9)


def print_table(title: str, rows: Sequence[dict[str, Any]], decimals: int) -> None:
    """Prints ``title`` and ``rows`` (dicts with the same keys) as an aligned text table, floats with ``decimals`` decimals."""
    columns = list(rows[0])
    cells = [[f"{v:.{decimals}f}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
