"""The digits split the robustness and compression examples share (scikit-learn's bundled digits, no download).

1,797 8×8 images as 64-value vectors in [0, 1]; 1,200 train / 300 test after a fixed permutation.
Member actors import this module too: ``HQDEStrategy`` gives them the driver's import path.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsData"]


class DigitsData(pl.LightningDataModule):
    """Digits as 64-value vectors in [0, 1], split with a fixed permutation."""

    def setup(self, stage: str | None = None) -> None:
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16.0
        y = torch.tensor(y, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x, y = x[order], y[order]
        self.train_set = TensorDataset(x[:1200], y[:1200])
        self.test_set = TensorDataset(x[1497:], y[1497:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=64, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=300)
