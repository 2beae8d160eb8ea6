"""Byzantine members: 2 of 7 members send scaled-up weights; mean vs geometric median vs trimmed mean.

Data: scikit-learn's bundled digits (1,797 8×8 grey images, 10 classes, BSD-3; no download),
split as in the other examples: the first 1,200 of a fixed permutation train, the last 300 test.

Run from the repository root::

    python examples/robust_ensemble.py            # 4 fits of 7 members, about 3-4 min on 2 CPU cores
    python examples/robust_ensemble.py --epochs 2 --scale 10

What it shows: members 5 and 6 are made Byzantine with
:class:`~hqde_lightning.callbacks.ByzantineMembers` (``attack="scale"``): at every sync they send
``scale × w`` instead of their weights ``w`` (they keep training honestly themselves). The
plain mean lets them drag the consensus, and with it every member (elastic sync), far from the
honest weights; the geometric median (breakdown point 1/2) and the coordinate-wise trimmed mean
with ``beta=0.3`` (drops the 2 largest and 2 smallest of 7 values per coordinate) ignore them.

The network is a Tanh MLP without BatchNorm on purpose: a BatchNorm or ReLU-only network is
(nearly) invariant to scaling its weights, so a scaling attack would barely hurt even the mean.
The printed table has, per aggregator: the ensemble's test accuracy and NLL, the accuracy of
the consensus weights alone, and the share of the last sync's aggregation weight the rule gave
to the two Byzantine members.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
from torch import nn

from digits_data import DigitsData, SimpleClassifier, print_table
from hqde_lightning import Aggregator, HQDEStrategy
from hqde_lightning.aggregation import TrimmedMean
from hqde_lightning.callbacks import ByzantineMembers

NUM_MEMBERS = 7
BYZANTINE = (5, 6)


class TanhMLP(SimpleClassifier):
    """64 → hidden → hidden → 10 with Tanh activations and no normalisation layers."""

    def __init__(self, hidden: int = 64, lr: float = 0.05) -> None:
        super().__init__(lr=lr)
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def run(name: str, aggregator: str | Aggregator, attack_scale: float | None, epochs: int) -> dict[str, object]:
    """One 7-member fit; returns the table row."""
    pl.seed_everything(0, verbose=False)
    model, data = TanhMLP(), DigitsData()
    callbacks = [] if attack_scale is None else [ByzantineMembers(BYZANTINE, attack="scale", scale=attack_scale)]
    strategy = HQDEStrategy(num_members=NUM_MEMBERS, aggregator=aggregator, seed=0)
    trainer = pl.Trainer(
        strategy=strategy, max_epochs=epochs, callbacks=callbacks,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    (results,) = trainer.test(model, datamodule=data, verbose=False)
    x, y = data.test.tensors
    with torch.no_grad():  # outside `test`, the module's forward is its own: the consensus weights
        consensus_acc = float((model(x).argmax(-1) == y).float().mean())
    last = strategy.sync_history[-1]
    byzantine_weight = sum(w for m, w in zip(last["members"], last["member_weights"]) if m in BYZANTINE)
    return {
        "aggregator": name,
        "attack": "none" if attack_scale is None else f"scale x{attack_scale:g}",
        "ensemble acc": results["ensemble/test_acc"],
        "ensemble NLL": results["ensemble/test_nll"],
        "consensus acc": consensus_acc,
        "weight on byzantine": byzantine_weight,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--scale", type=float, default=100.0, help="factor the Byzantine members multiply their weights by")
    args = parser.parse_args()

    runs = [
        ("mean", "mean", None),
        ("mean", "mean", args.scale),
        ("geometric_median", "geometric_median", args.scale),
        ("trimmed_mean(0.3)", TrimmedMean(beta=0.3), args.scale),
    ]
    rows = [run(name, aggregator, scale, args.epochs) for name, aggregator, scale in runs]
    print_table(f"{NUM_MEMBERS} members, members {list(BYZANTINE)} Byzantine, {args.epochs} epochs, elastic sync (strength 0.5), digits test set (300)", rows, 3)


if __name__ == "__main__":
    main()
