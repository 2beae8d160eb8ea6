"""Shared pieces of the benchmark scripts: real data, a small CNN, a process-tree memory sampler."""

from __future__ import annotations

import gzip
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

RESULTS = Path(__file__).resolve().parent / "results"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = {
    "digits": "scikit-learn digits: 1,797 8x8 grey images, 10 classes (BSD-3), bundled with scikit-learn",
    "fashion-mnist": "Fashion-MNIST: 60,000 train + 10,000 test 28x28 grey images, 10 classes (MIT), Debian package dataset-fashion-mnist",
}


def _idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def load_data(name: str, train_size: int | None = None, test_size: int | None = None) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """(train, val, test) as image tensors ``(N, 1, H, W)`` in [0, 1] with integer labels."""
    if name == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        y = torch.tensor(y)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x, y = x[order], y[order]
        splits = ((0, 1200), (1200, 1497), (1497, 1797))
        return tuple(TensorDataset(x[a:b], y[a:b]) for a, b in splits)  # type: ignore[return-value]
    if name == "fashion-mnist":
        files = {k: FASHION_DIR / f"{k}-ubyte.gz" for k in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
        missing = [str(p) for p in files.values() if not p.exists()]
        if missing:
            raise SystemExit(f"Fashion-MNIST files are missing ({missing[0]} ...): install them with `apt-get install -y dataset-fashion-mnist`, or pass `--data digits`.")
        x_train = torch.tensor(_idx(files["train-images-idx3"], 16).reshape(-1, 1, 28, 28), dtype=torch.float32) / 255.0
        y_train = torch.tensor(_idx(files["train-labels-idx1"], 8).astype(np.int64))
        x_test = torch.tensor(_idx(files["t10k-images-idx3"], 16).reshape(-1, 1, 28, 28), dtype=torch.float32) / 255.0
        y_test = torch.tensor(_idx(files["t10k-labels-idx1"], 8).astype(np.int64))
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
        x_train, y_train = x_train[order], y_train[order]
        n_train = train_size or 50_000
        n_test = test_size or len(x_test)
        val = TensorDataset(x_train[-5000:], y_train[-5000:])
        return TensorDataset(x_train[:n_train], y_train[:n_train]), val, TensorDataset(x_test[:n_test], y_test[:n_test])
    raise SystemExit(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")


class ImageData(pl.LightningDataModule):
    def __init__(self, name: str, batch_size: int = 128, train_size: int | None = None, test_size: int | None = None) -> None:
        super().__init__()
        self.name, self.batch_size, self.train_size, self.test_size = name, batch_size, train_size, test_size

    def setup(self, stage: str | None = None) -> None:
        self.train, self.val, self.test = load_data(self.name, self.train_size, self.test_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=512)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=512)


class SmallCNN(pl.LightningModule):
    """Two conv blocks and a linear head (~20k parameters for 28x28 inputs)."""

    def __init__(self, lr: float = 0.05, channels: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.BatchNorm2d(2 * channels), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(2 * channels * 16, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("test_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class TreeMemory:
    """Samples the resident memory of this process and all its descendants; keeps the peak (bytes).

    Ray's own daemons started by this process count too, which is the honest total.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        root = psutil.Process()
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()}: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {gpu}, torch {torch.__version__}"


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    defaults = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-+-".join("-" * widths[c] for c in columns))
    for row in rows:
        print(" | ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def timed(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


class TanhMLP(SmallCNN):
    """A tanh MLP without normalisation (weight-scaling attacks are not absorbed by BatchNorm)."""

    def __init__(self, lr: float = 0.1, in_features: int = 64, hidden: int = 64) -> None:
        super().__init__(lr=lr)
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def bar_plot(path: Path, title: str, labels: list[str], series: dict[str, list[float]], ylabel: str) -> Path:
    """A grouped bar chart of ``series`` (name -> one value per label), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) * max(1, len(series))), 4.0))
    width = 0.8 / max(1, len(series))
    for offset, (name, values) in enumerate(series.items()):
        axis.bar([i + offset * width for i in range(len(labels))], values, width=width, label=name)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    axis.set_xticklabels(labels, rotation=30, ha="right")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
