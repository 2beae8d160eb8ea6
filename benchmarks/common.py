"""Shared pieces of the benchmark scripts: real data, a small CNN, a process-tree memory sampler, plots.

The digits data and the classifier steps come from ``examples/digits_data.py`` (one copy for the
examples, tests and benchmarks).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import psutil
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from digits_data import SimpleClassifier, digits  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: where the Fashion-MNIST files are: the Debian package's folder, or ``$FASHION_MNIST_DIR``
FASHION_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
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
        x, y = digits()
        x = x.view(-1, 1, 8, 8)
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


class SmallCNN(SimpleClassifier):
    """Two conv blocks and a linear head (~20k parameters for 28x28 inputs)."""

    def __init__(self, lr: float = 0.05, channels: int = 16) -> None:
        super().__init__(lr=lr)
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.BatchNorm2d(2 * channels), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(2 * channels * 16, 10),
        )


class ReluMLP(SimpleClassifier):
    """Flatten, ``Linear(in_features, hidden)``, ReLU, ``Linear(hidden, 10)``: the digits MLP (64 -> 64 -> 10 by default)."""

    def __init__(self, lr: float = 0.05, in_features: int = 64, hidden: int = 64) -> None:
        super().__init__(lr=lr)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 10))


class TreeMemory:
    """Samples the resident memory of a process (``root``, a pid; this one by default) and all its descendants; keeps the peak (bytes).

    Ray's own daemons started by the process count too, which is the honest total.
    """

    def __init__(self, interval: float = 0.2, root: int | None = None) -> None:
        self.interval = interval
        self.root = root
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        try:
            root = psutil.Process(self.root)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:  # it ended
            return 0
        total = 0
        for proc in processes:
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


def seeded_args(description: str, option: str, choices: list[str], quick: list[str], add: Callable[[argparse.ArgumentParser], Any] | None = None) -> argparse.Namespace:
    """Parses the arguments of a benchmark that repeats each of its settings over seeds.

    ``--data``, ``--seeds``, ``--members``, ``--epochs``, ``--train-size``, ``--<option>`` (a subset
    of ``choices``, all by default), whatever ``add`` adds, and ``--quick`` (CI smoke: digits, 1 seed,
    1 epoch, 2 members and the ``quick`` subset).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", default="fashion-mnist", choices=sorted(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2, help="one sync per epoch")
    parser.add_argument("--train-size", type=int, default=10_000, help="training images used (Fashion-MNIST)")
    parser.add_argument(f"--{option}", nargs="+", default=choices, choices=choices, metavar=option[:-1].upper(), help=f"subset of {choices}")
    parser.add_argument("--quick", action="store_true", help=f"CI smoke: digits, 1 seed, 1 epoch, 2 members, {quick}")
    if add is not None:
        add(parser)
    args = parser.parse_args()
    if args.quick:
        args.data, args.seeds, args.epochs, args.members = "digits", [0], 1, 2
        setattr(args, option, quick)
    return args


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


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of ``values``, e.g. a metric over seeds."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


@contextmanager
def figure(path: Path, title: str | None, ncols: int, figsize: tuple[float, float]) -> Iterator[Any]:
    """A row of ``ncols`` matplotlib axes (one axis when ``ncols == 1``), saved as PNG at ``path`` on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    yield axes
    if title is not None:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def error_bars(axis: Any, labels: list[str], means: list[float], stds: list[float], colour: Any, rotation: float = 30, zoom: bool = True) -> Any:
    """Bars of ``means`` with ``stds`` as error bars, labelled below; returns the bars.

    With ``zoom`` (for accuracies) the y range runs from just under the lowest bar to just over the
    highest, within [0, 1].
    """
    positions = np.arange(len(labels))
    bars = axis.bar(positions, means, yerr=stds, capsize=4, color=colour)
    axis.set_xticks(positions, labels, rotation=rotation, ha="right", fontsize=8)
    if zoom:
        axis.set_ylim(max(0.0, min(m - s for m, s in zip(means, stds)) - 0.05), min(1.0, max(m + s for m, s in zip(means, stds)) + 0.02))
    return bars


def bar_plot(path: Path, title: str, labels: list[str], series: dict[str, list[float]], ylabel: str, log: bool = False, width_per_bar: float = 0.9) -> Path:
    """A grouped bar chart of ``series`` (name -> one value per label), saved as PNG; ``log``: logarithmic y axis."""
    with figure(path, None, 1, (max(6.0, width_per_bar * len(labels) * max(1, len(series))), 4.0)) as axis:
        width = 0.8 / max(1, len(series))
        for offset, (name, values) in enumerate(series.items()):
            axis.bar([i + offset * width for i in range(len(labels))], values, width=width, label=name)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
        axis.set_xticklabels(labels, rotation=30, ha="right")
        axis.set_ylabel(ylabel)
        if log:
            axis.set_yscale("log")
        axis.set_title(title)
        axis.legend()
    return path
