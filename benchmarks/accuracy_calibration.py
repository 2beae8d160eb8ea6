"""Benchmark 2, accuracy and calibration: one model vs HQDE ensembles (each sync mode and aggregator).

Same data, same model (``SmallCNN``), same epochs, in one run, for every seed:
* ``single``: one plain Lightning ``Trainer``; NLL and ECE computed here with torchmetrics
  (``MulticlassCalibrationError(n_bins=15)``, as the ensemble's own evaluation does). It is seeded
  as member 0 of the ensembles of the same seed is, so it trains exactly like member 0 of ``none``;
* ``none``: ``HQDEStrategy(num_members=N, sync="none")``, an independent deep ensemble;
* ``elastic/mean`` and ``replace/mean``: the two syncing modes with federated averaging;
* ``elastic/<rule>`` for the superposition, entanglement, geometric-median and trimmed-mean
  (beta = 0.25) aggregators.

Reports test accuracy, NLL, ECE (15 bins) and the members' disagreement (0 for one model) as
mean ± std over the seeds, plus the members' own mean accuracy, and plots accuracy and ECE.

Run: ``python benchmarks/accuracy_calibration.py`` (Fashion-MNIST, needs
``apt-get install -y dataset-fashion-mnist``) or ``--data digits``; ``--quick`` is the CI smoke setting.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import ray
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from common import DATASETS, RESULTS, ImageData, SmallCNN, error_bars, figure, load_data, machine, mean_std, print_table, quiet_trainer, seeded_args, write_results
from hqde_lightning import HQDEStrategy
from hqde_lightning.aggregation import TrimmedMean

METRICS = ("acc", "nll", "ece", "disagreement")


def configs() -> dict[str, dict | None]:
    """Strategy keyword arguments per configuration label (``None``: one plain model)."""
    return {
        "single": None,
        "none": {"sync": "none"},
        "elastic/mean": {"sync": "elastic", "aggregator": "mean"},
        "replace/mean": {"sync": "replace", "aggregator": "mean"},
        "elastic/superposition": {"sync": "elastic", "aggregator": "superposition"},
        "elastic/entanglement": {"sync": "elastic", "aggregator": "entanglement"},
        "elastic/geometric_median": {"sync": "elastic", "aggregator": "geometric_median"},
        "elastic/trimmed_mean(0.25)": {"sync": "elastic", "aggregator": TrimmedMean(beta=0.25)},
    }


QUICK_CONFIGS = ["single", "elastic/mean"]


def evaluate_single(model: SmallCNN, data: ImageData) -> dict[str, float]:
    """Accuracy, NLL (of the softmax probabilities) and 15-bin ECE of one model on the test set."""
    accuracy = MulticlassAccuracy(num_classes=10, average="micro")
    calibration = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")
    nll_sum, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for x, y in data.test_dataloader():
            probs = torch.softmax(model(x).float(), dim=-1)
            accuracy.update(probs, y)
            calibration.update(probs, y)
            nll_sum += float(-torch.log(probs.gather(1, y.view(-1, 1)).clamp_min(1e-12)).sum())
            count += len(y)
    acc = float(accuracy.compute())
    return {"acc": acc, "nll": nll_sum / count, "ece": float(calibration.compute()), "disagreement": 0.0, "member_acc": acc}


def run_single(seed: int, args: argparse.Namespace) -> dict[str, float]:
    data = ImageData(args.data, train_size=args.train_size)
    pl.seed_everything(seed, verbose=False)
    model = SmallCNN()
    pl.seed_everything(seed, workers=True, verbose=False)  # as a member actor does before its fit
    quiet_trainer(max_epochs=args.epochs, limit_val_batches=0).fit(model, datamodule=data)
    data.setup("test")
    return evaluate_single(model, data)


def run_ensemble(seed: int, strategy_kwargs: dict, args: argparse.Namespace) -> dict[str, float]:
    data = ImageData(args.data, train_size=args.train_size)
    pl.seed_everything(seed, verbose=False)
    model = SmallCNN()
    strategy = HQDEStrategy(num_members=args.members, seed=seed, **strategy_kwargs)
    trainer = quiet_trainer(strategy=strategy, max_epochs=args.epochs, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    (results,) = trainer.test(model, datamodule=data, verbose=False)
    members = [float(results[f"member_{i}/test_acc"]) for i in range(args.members) if f"member_{i}/test_acc" in results]
    out = {k: float(results[f"ensemble/test_{k}"]) for k in METRICS}
    out["member_acc"] = float(np.mean(members))
    return out


def summarise(label: str, runs: list[dict[str, float]]) -> dict:
    """Mean and sample standard deviation (0 for one seed) of every metric over the seeds."""
    row: dict = {"config": label, "seeds": len(runs)}
    for key in (*METRICS, "member_acc"):
        row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r[key] for r in runs])
    return row


def table_rows(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        shown = {"config": row["config"], "seeds": row["seeds"]}
        for key in (*METRICS, "member_acc"):
            shown[key] = f"{row[f'{key}_mean']:.4f} ± {row[f'{key}_std']:.4f}"
        out.append(shown)
    return out


def plot(rows: list[dict], title: str, path: Path) -> None:
    labels = [r["config"] for r in rows]
    colours = ["tab:grey" if label == "single" else "tab:blue" for label in labels]
    with figure(path, title, 2, (12, 4.5)) as axes:
        for ax, key, name in ((axes[0], "acc", "test accuracy"), (axes[1], "ece", "ECE (15 bins, lower is better)")):
            error_bars(ax, labels, [r[f"{key}_mean"] for r in rows], [r[f"{key}_std"] for r in rows], colours, rotation=35, zoom=key == "acc")
            ax.set_ylabel(name)


def main() -> None:
    args = seeded_args(__doc__.splitlines()[0], "configs", list(configs()), QUICK_CONFIGS)

    train, _, test = load_data(args.data, args.train_size)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows, runs = [], []
    for label in args.configs:
        per_seed = []
        for seed in args.seeds:
            # member i of an ensemble uses seed * members + i: the seeds' member sets do not overlap
            run_seed = seed * args.members
            started = time.perf_counter()
            kwargs = configs()[label]  # a fresh aggregator instance per run
            result = run_single(run_seed, args) if kwargs is None else run_ensemble(run_seed, kwargs, args)
            result["wall_s"] = time.perf_counter() - started
            per_seed.append(result)
            runs.append({"config": label, "seed": seed, **result})
            print(f"{label:>28} seed {seed}: acc {result['acc']:.4f}, nll {result['nll']:.4f}, ece {result['ece']:.4f}, {result['wall_s']:.0f} s", flush=True)
        rows.append(summarise(label, per_seed))
    ray.shutdown()

    print(f"\n{args.members} members (single: 1 model), {args.epochs} epoch(s), seeds {args.seeds}: test metrics, mean ± std over seeds")
    print_table(table_rows(rows), ["config", "seeds", *METRICS, "member_acc"])
    description = f"{DATASETS[args.data]}; {len(train)} training images, {len(test)} test images"
    print(f"data: {description}; machine: {machine()}")
    name = "accuracy_calibration" + ("_quick" if args.quick else "")
    figure = RESULTS / f"{name}.png"
    plot(rows, f"SmallCNN, {args.data}, {len(train)} train images, {args.epochs} epoch(s), {args.members} members, {len(args.seeds)} seed(s); error bars: std over seeds", figure)
    path = write_results(name, {
        "data": DATASETS[args.data], "train_images": len(train), "test_images": len(test), "epochs": args.epochs,
        "members": args.members, "seeds": args.seeds, "machine": machine(), "rows": rows, "runs": runs, "plot": figure.name,
    })
    print(f"wrote {path} and {figure}")


if __name__ == "__main__":
    main()
