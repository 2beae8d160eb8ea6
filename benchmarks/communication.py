"""Benchmark 3, communication: bytes sent per sync and in total, fp32 vs 16/8/mixed-bit sync, and what it costs in accuracy.

Same data, same model, same epochs, same seeds, in one run: ``HQDEStrategy(num_members=N)``
(``sync="elastic"`` unless ``--sync``) with the members' weights sent at every epoch-end sync as
* ``fp32``: float32 tensors (no codec);
* ``16-bit``: ``AdaptiveQuantization(base_bits=16, min_bits=16, max_bits=16)`` (float16);
* ``8-bit``: ``AdaptiveQuantization(base_bits=8, min_bits=8, max_bits=8)``;
* ``mixed 4/8/16``: ``AdaptiveQuantization()`` (defaults: 10 % of the blocks at 16 bits, 30 % at 4, the rest at 8);
* ``mixed, low 0.7``: ``AdaptiveQuantization(low_fraction=0.7)`` (70 % of the blocks at 4 bits).

Bytes are the payload bytes all members sent to the coordinator (``strategy.sync_history[i]
["bytes_received"]``) next to their float32 size (``["fp32_bytes"]``); the consensus travels back
in float32 and is not counted. The model is ``SmallCNN(channels=32)``: 29,450 float values, of
which the three weight tensors (288, 18,432 and 10,240 values) are quantized and the biases and
BatchNorm tensors (at most 64 values each, under the 256-value pass-through size) travel at 32 bits. Accuracy cost: the ensemble's test accuracy minus the fp32
run's of the same seed, mean ± std over seeds.

Run: ``python benchmarks/communication.py`` (Fashion-MNIST, needs ``apt-get install -y dataset-fashion-mnist``)
or ``--data digits``; ``--quick`` is the CI smoke setting.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import ray

from common import DATASETS, RESULTS, ImageData, SmallCNN, error_bars, figure, load_data, machine, mean_std, print_table, quiet_trainer, seeded_args, write_results
from hqde_lightning import HQDEStrategy
from hqde_lightning.callbacks import AdaptiveQuantization

#: AdaptiveQuantization keyword arguments per setting (``None``: float32, no codec)
SETTINGS: dict[str, dict | None] = {
    "fp32": None,
    "16-bit": {"base_bits": 16, "min_bits": 16, "max_bits": 16},
    "8-bit": {"base_bits": 8, "min_bits": 8, "max_bits": 8},
    "mixed 4/8/16": {},
    "mixed, low 0.7": {"low_fraction": 0.7},
}
QUICK_SETTINGS = ["fp32", "mixed 4/8/16"]
CHANNELS = 32


def run(setting: str, seed: int, args: argparse.Namespace) -> dict:
    data = ImageData(args.data, train_size=args.train_size)
    pl.seed_everything(seed, verbose=False)
    model = SmallCNN(channels=CHANNELS)
    quantization = SETTINGS[setting]
    callbacks = [] if quantization is None else [AdaptiveQuantization(**quantization)]
    strategy = HQDEStrategy(num_members=args.members, sync=args.sync, seed=seed)
    trainer = quiet_trainer(strategy=strategy, max_epochs=args.epochs, limit_val_batches=0, callbacks=callbacks)
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - started
    # every member's reconstruction error at the last sync (logged by AdaptiveQuantization; `test` resets these metrics)
    errors = [float(v) for k, v in trainer.callback_metrics.items() if k.startswith("member_") and k.endswith("/quant/reconstruction_error")]
    (results,) = trainer.test(model, datamodule=data, verbose=False)
    history = strategy.sync_history
    sent = [int(h["bytes_received"]) for h in history]
    fp32 = [int(h["fp32_bytes"]) for h in history]
    return {
        "syncs": len(history),
        "bytes_per_sync": float(np.mean(sent)) if sent else 0.0,
        "fp32_bytes_per_sync": float(np.mean(fp32)) if fp32 else 0.0,
        "total_bytes": sum(sent),
        "total_fp32_bytes": sum(fp32),
        "aggregation_ms": 1000 * float(np.mean([h["aggregation_seconds"] for h in history])) if history else 0.0,
        "reconstruction_error": float(np.mean(errors)) if errors else 0.0,
        "test_acc": float(results["ensemble/test_acc"]),
        "test_nll": float(results["ensemble/test_nll"]),
        "fit_s": wall,
    }


def summarise(setting: str, runs: list[dict], baseline: list[dict] | None, members: int) -> dict:
    first = runs[0]
    accuracy = np.array([r["test_acc"] for r in runs])
    row = {
        "setting": setting,
        "syncs": first["syncs"],
        "KiB_per_sync": first["bytes_per_sync"] / 1024,
        "KiB_per_member_sync": first["bytes_per_sync"] / members / 1024,
        "total_KiB": first["total_bytes"] / 1024,
        "bytes/fp32": first["bytes_per_sync"] / first["fp32_bytes_per_sync"] if first["fp32_bytes_per_sync"] else float("nan"),
        "recon_error": float(np.mean([r["reconstruction_error"] for r in runs])),
        "agg_ms": float(np.mean([r["aggregation_ms"] for r in runs])),
        "nll_mean": float(np.mean([r["test_nll"] for r in runs])),
    }
    row["acc_mean"], row["acc_std"] = mean_std(accuracy)
    if baseline is not None:
        row["acc_cost_mean"], row["acc_cost_std"] = mean_std(accuracy - np.array([r["test_acc"] for r in baseline]))
    return row


def table_rows(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        shown = {k: row[k] for k in ("setting", "syncs", "KiB_per_sync", "KiB_per_member_sync", "total_KiB", "bytes/fp32", "agg_ms", "nll_mean")}
        shown["recon_error"] = f"{row['recon_error']:.5f}"
        shown["test_acc"] = f"{row['acc_mean']:.4f} ± {row['acc_std']:.4f}"
        if "acc_cost_mean" in row:
            shown["acc_cost_vs_fp32"] = f"{row['acc_cost_mean']:+.4f} ± {row['acc_cost_std']:.4f}"
        out.append(shown)
    return out


def plot(rows: list[dict], title: str, path: Path) -> None:
    labels = [r["setting"] for r in rows]
    with figure(path, title, 2, (11, 4.2)) as (left, right):
        ratios = [r["bytes/fp32"] for r in rows]
        bars = left.bar(np.arange(len(rows)), ratios, color="tab:blue")
        left.set_xticks(np.arange(len(rows)), labels, rotation=25, ha="right", fontsize=8)
        for bar, ratio, row in zip(bars, ratios, rows):
            left.annotate(f"{ratio:.2f}\n{row['KiB_per_sync']:.0f} KiB", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
        left.set_ylim(0, 1.25)
        left.set_ylabel("bytes per sync / fp32 bytes")
        left.set_title("payload size", fontsize=9)
        means = [r["acc_mean"] for r in rows]
        error_bars(right, labels, means, [r["acc_std"] for r in rows], "tab:orange", rotation=25)
        right.axhline(means[labels.index("fp32")] if "fp32" in labels else means[0], color="k", linestyle="--", linewidth=0.8)
        right.set_ylabel("ensemble test accuracy")
        right.set_title("accuracy (dashed: fp32; error bars: std over seeds)", fontsize=9)


def main() -> None:
    args = seeded_args(
        __doc__.splitlines()[0], "settings", list(SETTINGS), QUICK_SETTINGS,
        add=lambda parser: parser.add_argument("--sync", default="elastic", choices=["elastic", "replace"]),
    )

    train, _, test = load_data(args.data, args.train_size)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    runs: dict[str, list[dict]] = {}
    for setting in args.settings:
        runs[setting] = []
        for seed in args.seeds:
            result = run(setting, seed * args.members, args)  # member i uses seed * members + i
            runs[setting].append(result)
            print(f"{setting:>16} seed {seed}: {result['bytes_per_sync'] / 1024:.1f} KiB per sync (fp32 {result['fp32_bytes_per_sync'] / 1024:.1f}), acc {result['test_acc']:.4f}, fit {result['fit_s']:.0f} s", flush=True)
    ray.shutdown()

    baseline = runs.get("fp32")
    rows = [summarise(setting, per_seed, baseline, args.members) for setting, per_seed in runs.items()]
    print(f"\nSmallCNN(channels={CHANNELS}), {args.members} members, sync={args.sync!r}, {args.epochs} epoch(s) (one sync each), seeds {args.seeds}")
    columns = ["setting", "syncs", "KiB_per_sync", "KiB_per_member_sync", "total_KiB", "bytes/fp32", "recon_error", "agg_ms", "test_acc", "nll_mean"]
    print_table(table_rows(rows), columns + (["acc_cost_vs_fp32"] if baseline is not None else []))
    print(f"data: {DATASETS[args.data]}; {len(train)} training images, {len(test)} test images; machine: {machine()}")
    name = "communication" + ("_quick" if args.quick else "")
    figure = RESULTS / f"{name}.png"
    plot(rows, f"SmallCNN(channels={CHANNELS}), {args.data}, {args.members} members, sync={args.sync}, {args.epochs} epoch(s), {len(args.seeds)} seed(s)", figure)
    path = write_results(name, {
        "data": DATASETS[args.data], "train_images": len(train), "test_images": len(test), "epochs": args.epochs, "members": args.members,
        "sync": args.sync, "seeds": args.seeds, "model": f"SmallCNN(channels={CHANNELS})", "settings": {k: SETTINGS[k] for k in args.settings},
        "machine": machine(), "rows": rows, "runs": runs, "plot": figure.name,
    })
    print(f"wrote {path} and {figure}")


if __name__ == "__main__":
    main()
