"""Quantized sync: the bytes each member sends per sync, fp32 vs 8-bit vs mixed 4/8/16-bit, and the accuracy.

Data: scikit-learn's bundled digits (1,797 8×8 grey images, 10 classes, BSD-3; no download),
split as in the other examples: the first 1,200 of a fixed permutation train, the last 300 test.

Run from the repository root::

    python examples/compressed_sync.py            # 4 fits of 4 members, about 2 min on 2 CPU cores
    python examples/compressed_sync.py --epochs 5

What it shows: :class:`~hqde_lightning.callbacks.AdaptiveQuantization` packs the weights a member
sends at every sync into 4/8/16-bit blocks (with a float32 scale and minimum per 256-value
block, and error feedback that carries each sync's rounding error into the next). The table
gives, per setting, the bytes actually received by the coordinator per sync and member (from
``strategy.sync_history[i]["bytes_received"]``), their float32 size
(``["fp32_bytes"]``), the ratio, the relative reconstruction error of the last payload, and the
ensemble's test accuracy and NLL. The MLP has 256 hidden units so that its tensors are
quantized: float tensors with fewer than 256 values (here only the last layer's 10 biases)
always travel at 32 bits.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
from lightning.pytorch import Callback
from torch import nn

from digits_data import DigitsData, SimpleClassifier, print_table
from hqde_lightning import HQDEStrategy
from hqde_lightning.callbacks import AdaptiveQuantization

NUM_MEMBERS = 4


class WideMLP(SimpleClassifier):
    """64 → 256 → 10 with BatchNorm: 20,234 float values (18,944 of them in the two weight matrices)."""

    def __init__(self, hidden: int = 256, lr: float = 0.05) -> None:
        super().__init__(lr=lr)
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 10))


def run(name: str, callbacks: list[Callback], epochs: int) -> dict[str, object]:
    """One 4-member fit with the given sync codec; returns the table row."""
    pl.seed_everything(0, verbose=False)
    model, data = WideMLP(), DigitsData()
    strategy = HQDEStrategy(num_members=NUM_MEMBERS, seed=0)
    trainer = pl.Trainer(
        strategy=strategy, max_epochs=epochs, callbacks=callbacks,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - started
    error = trainer.callback_metrics.get("quant/reconstruction_error")
    (results,) = trainer.test(model, datamodule=data, verbose=False)
    history = strategy.sync_history
    received = sum(r["bytes_received"] for r in history) / sum(len(r["members"]) for r in history)
    fp32 = sum(r["fp32_bytes"] for r in history) / sum(len(r["members"]) for r in history)
    return {
        "sync": name,
        "bytes/sync/member": f"{received:,.0f}",
        "fp32 bytes": f"{fp32:,.0f}",
        "ratio": received / fp32,
        "recon. error": 0.0 if error is None else float(error),
        "ensemble acc": results["ensemble/test_acc"],
        "ensemble NLL": results["ensemble/test_nll"],
        "fit seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    settings: list[tuple[str, list[Callback]]] = [
        ("fp32", []),
        ("8-bit", [AdaptiveQuantization(base_bits=8, min_bits=8, max_bits=8)]),
        # the most important 10% of the blocks at 16 bits, the least important 30% (or 70%) at 4 bits, the rest at 8
        ("mixed 4/8/16, 30% 4-bit", [AdaptiveQuantization(base_bits=8, min_bits=4, max_bits=16)]),
        ("mixed 4/8/16, 70% 4-bit", [AdaptiveQuantization(base_bits=8, min_bits=4, max_bits=16, low_fraction=0.7)]),
    ]
    rows = [run(name, callbacks, args.epochs) for name, callbacks in settings]
    print_table(f"{NUM_MEMBERS} members, {args.epochs} epochs (one sync per epoch), elastic sync (strength 0.5), digits test set (300)", rows, 4)


if __name__ == "__main__":
    main()
