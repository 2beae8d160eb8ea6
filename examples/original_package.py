"""The original HQDE package's README quick start, run by this package: only its import line changes.

``create_hqde_system`` (``hqde_lightning.compat``) maps the original configuration onto
``HQDEStrategy``: on one device the 4 workers train together in this process and Ray is not
started. Data: scikit-learn's bundled digits (no download) as standardised 3×8×8 images, so that
the snippet's small CNN runs as written; 1,200 train / 300 test, as in the other examples.

Run: ``python examples/original_package.py [--workers 4] [--epochs 10]``; prints the ensemble's
test accuracy and the wall time of the snippet.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from digits_data import VAL_SIZE, digits
from hqde_lightning import create_hqde_system


class MyModel(nn.Module):
    """The original README's model."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def digit_loaders(train_size: int = 1200, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    """Training (shuffled) and test loaders of digits as 3×8×8 images standardised on the training ones."""
    x, y = digits()
    x = x.view(-1, 1, 8, 8).repeat(1, 3, 1, 1)
    x = (x - x[:train_size].mean()) / x[:train_size].std()
    test = slice(train_size + VAL_SIZE, None)
    return DataLoader(TensorDataset(x[:train_size], y[:train_size]), batch_size=batch_size, shuffle=True), DataLoader(TensorDataset(x[test], y[test]), batch_size=256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    train_loader, test_loader = digit_loaders()
    started = time.perf_counter()
    # the original README's lines (its `num_workers=4` and `num_epochs=10` are the defaults of --workers and --epochs)
    hqde_system = create_hqde_system(
        model_class=MyModel,
        model_kwargs={"num_classes": 10},
        num_workers=args.workers,
        quantization_config={"base_bits": 8, "min_bits": 4, "max_bits": 16},
        aggregation_config={"noise_scale": 0.005, "exploration_factor": 0.1, "entanglement_strength": 0.1},
    )
    metrics = hqde_system.train(train_loader, num_epochs=args.epochs)
    predictions = hqde_system.predict(test_loader)
    hqde_system.cleanup()
    accuracy = (predictions.argmax(-1) == test_loader.dataset.tensors[1]).float().mean().item()
    print(f"ensemble test accuracy: {accuracy:.3f} ({args.workers} workers, {args.epochs} epochs, sync payloads {metrics['compression_ratio']:.1f}x smaller than float32)")
    print(f"wall time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
