"""The 60-second tour: 4 members of an ordinary LightningModule trained as Ray actors.

Data: scikit-learn's bundled digits (1,797 8×8 images, 10 classes; no download).
Run: ``python examples/quick_start.py`` (about 20 s on 2 idle CPU cores, Ray start-up included).
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hqde_lightning import HQDEStrategy


class DigitsData(pl.LightningDataModule):
    def setup(self, stage: str | None = None) -> None:
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16.0
        y = torch.tensor(y)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x, y = x[order], y[order]
        self.train, self.val, self.test = (TensorDataset(x[a:b], y[a:b]) for a, b in ((0, 1200), (1200, 1497), (1497, 1797)))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=64, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=256)


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main() -> None:
    started = time.perf_counter()
    model, data = Classifier(), DigitsData()
    strategy = HQDEStrategy(num_members=4, sync="elastic", sync_strength=0.5, seed=0)  # the one new line
    trainer = pl.Trainer(strategy=strategy, max_epochs=5, default_root_dir="lightning_logs/quick_start")
    trainer.fit(model, datamodule=data)
    (results,) = trainer.test(model, datamodule=data, verbose=False)
    members = [results[f"member_{i}/test_acc"] for i in range(strategy.num_members)]
    print(f"member test accuracy: {', '.join(f'{a:.3f}' for a in members)}")
    print(f"ensemble test accuracy: {results['ensemble/test_acc']:.3f}  (NLL {results['ensemble/test_nll']:.3f}, ECE {results['ensemble/test_ece']:.3f})")
    out = strategy.ensemble.predict_with_uncertainty(data.test.tensors[0][:5])
    print(f"first 5 test digits: predicted {out['probs'].argmax(-1).tolist()}, entropy {[round(v, 3) for v in out['entropy'].tolist()]}")
    print(f"wall time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
