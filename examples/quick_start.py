"""The 60-second tour: 4 members of an ordinary LightningModule, trained stacked in this process.

On one device (here the CPU) ``HQDEStrategy`` trains all members as one member group in this
process, without Ray; the script prints the wall time of the fit and the test.
Data: scikit-learn's bundled digits (1,797 8×8 images, 10 classes; no download).
Run: ``python examples/quick_start.py`` (about 7 s on 2 CPU cores, plus ~5 s of imports).
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
from torch import nn

from digits_data import DigitsData, SimpleClassifier
from hqde_lightning import HQDEStrategy


class Classifier(SimpleClassifier):
    """An ordinary LightningModule (its steps are in ``digits_data.SimpleClassifier``): a 64-64-10 MLP."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(lr=lr)
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


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
