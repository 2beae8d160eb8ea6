"""Typical Lightning code (a LightningModule and a LightningDataModule), trained as an HQDE ensemble.

Data: scikit-learn's bundled digits (1,797 8×8 grey images, 10 classes, BSD-3; no download),
split 1,200 train / 297 validation / 300 test by the LightningDataModule ``DigitsData`` of
``examples/digits_data.py``.

Run from the repository root::

    python examples/existing_lightning_code.py           # a 4-member HQDE ensemble (about 1 min on 2 CPU cores)
    python examples/existing_lightning_code.py --plain   # the same code with a plain Trainer, for contrast
    python examples/existing_lightning_code.py --ray-address 127.0.0.1:6379   # on a running Ray cluster

(``examples/ray_cluster.md`` shows the cluster run step by step.)

What it shows: nothing in the module, the data module, the checkpoint callback or the
``fit``/``test`` calls changes. The one changed line is the ``Trainer``'s ``strategy`` argument.
With HQDE, ``trainer.test`` reports your own ``test_acc`` measured on the ensemble (``self(x)``
is the ensemble's output during evaluation), plus the ensemble's NLL/ECE and every member's
accuracy; the best checkpoint holds every member and rebuilds the ensemble without Ray.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from digits_data import DigitsData
from hqde_lightning import Ensemble, HQDEStrategy


class LitClassifier(pl.LightningModule):
    """An MLP classifier with torchmetrics accuracy, as found in many Lightning projects."""

    def __init__(self, hidden: int = 128, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 10))
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", action="store_true", help="train one model with a plain Trainer instead")
    parser.add_argument("--members", type=int, default=4, help="ensemble size (HQDE only)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster ('auto', 'host:port', 'ray://host:10001') instead of starting Ray locally")
    args = parser.parse_args()

    started = time.perf_counter()
    pl.seed_everything(0, verbose=False)
    model, data = LitClassifier(), DigitsData()
    checkpoint = ModelCheckpoint(monitor="val_acc", mode="max")
    root = "lightning_logs/existing_code_" + ("plain" if args.plain else "hqde")
    if args.plain:
        trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[checkpoint], default_root_dir=root)
    else:
        trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[checkpoint], default_root_dir=root,
                             strategy=HQDEStrategy(num_members=args.members, seed=0, ray_address=args.ray_address))  # <- the one line that changes
    trainer.fit(model, datamodule=data)
    (results,) = trainer.test(model, datamodule=data, verbose=False)

    print(f"\n{'plain Trainer, 1 model' if args.plain else f'HQDEStrategy, {args.members} members'}: {args.epochs} epochs")
    print(f"test_acc (your own metric): {results['test_acc']:.4f}")
    if not args.plain:
        members = ", ".join(f"{results[f'member_{i}/test_acc']:.4f}" for i in range(args.members))
        print(f"member test accuracy:        {members}")
        print(f"ensemble NLL {results['ensemble/test_nll']:.4f}, ECE {results['ensemble/test_ece']:.4f}, "
              f"member disagreement {results['ensemble/test_disagreement']:.4f}")
        rebuilt = Ensemble.load_from_checkpoint(checkpoint.best_model_path, LitClassifier)
        print(f"best checkpoint {checkpoint.best_model_path} holds {rebuilt.num_members} members (rebuilt without Ray)")
    print(f"wall time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
