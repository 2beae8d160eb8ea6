"""Benchmark 1, training cost: HQDEStrategy vs the same members trained one after another vs one model.

For N members, same data, same model, same epochs, in one run:
* ``hqde``: ``Trainer(strategy=HQDEStrategy(num_members=N, sync="none"))``, Ray start-up included
  (what a user's script pays);
* ``sequential``: N plain Lightning ``Trainer``s, one after another;
* ``single``: one plain ``Trainer`` (the N = 1 sequential run).

Reports wall time, samples/s (training samples processed by all members per second) and the peak
resident memory of the whole process tree (this process, Ray's daemons and the member actors).

Run: ``python benchmarks/training_cost.py`` (Fashion-MNIST, needs ``apt-get install -y dataset-fashion-mnist``)
or ``python benchmarks/training_cost.py --data digits``; ``--quick`` is the CI smoke setting.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl

from common import DATASETS, RESULTS, ImageData, SmallCNN, TreeMemory, bar_plot, load_data, machine, print_table, quiet_trainer, write_results
from hqde_lightning import HQDEStrategy


def run_hqde(members: int, args: argparse.Namespace) -> dict:
    data = ImageData(args.data, train_size=args.train_size)
    pl.seed_everything(0, verbose=False)
    strategy = HQDEStrategy(num_members=members, sync="none", seed=0)
    with TreeMemory() as memory:
        started = time.perf_counter()
        quiet_trainer(strategy=strategy, max_epochs=args.epochs, limit_val_batches=0).fit(SmallCNN(), datamodule=data)
        wall = time.perf_counter() - started
    return {"wall_s": wall, "peak_mem_mb": memory.peak / 2**20}


def run_sequential(members: int, args: argparse.Namespace) -> dict:
    data = ImageData(args.data, train_size=args.train_size)
    with TreeMemory() as memory:
        started = time.perf_counter()
        for index in range(members):
            pl.seed_everything(index, verbose=False)
            quiet_trainer(max_epochs=args.epochs, limit_val_batches=0).fit(SmallCNN(), datamodule=data)
        wall = time.perf_counter() - started
    return {"wall_s": wall, "peak_mem_mb": memory.peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist", choices=sorted(DATASETS))
    parser.add_argument("--members", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=20_000, help="training images used (Fashion-MNIST)")
    parser.add_argument("--quick", action="store_true", help="tiny CI smoke run: digits, 1-2 members, 1 epoch")
    args = parser.parse_args()
    if args.quick:
        args.data, args.members, args.epochs = "digits", [1, 2], 1
    train_len = len(load_data(args.data, args.train_size)[0])
    rows = []
    for members in args.members:
        sequential = run_sequential(members, args)
        hqde = run_hqde(members, args)
        samples = members * args.epochs * train_len
        for mode, result in (("sequential", sequential), ("hqde", hqde)):
            rows.append({"members": members, "mode": mode, **result, "samples_per_s": samples / result["wall_s"]})
        rows[-1]["hqde/sequential"] = hqde["wall_s"] / sequential["wall_s"]
        print_table(rows, ["members", "mode", "wall_s", "samples_per_s", "peak_mem_mb", "hqde/sequential"])
        print()
    single = next(r for r in rows if r["members"] == min(args.members) and r["mode"] == "sequential")
    print(f"data: {DATASETS[args.data]}; {train_len} training images, {args.epochs} epochs; machine: {machine()}")
    print(f"single model ({min(args.members)} member, plain Trainer): {single['wall_s']:.1f} s, {single['peak_mem_mb']:.0f} MiB")
    name = "training_cost" + ("_quick" if args.quick else "")
    members = [str(m) for m in args.members]
    bar_plot(
        RESULTS / f"{name}.png", f"Training cost ({args.data}, {args.epochs} epochs)", members,
        {mode: [r["wall_s"] for r in rows if r["mode"] == mode] for mode in ("sequential", "hqde")}, "wall time (s) by number of members",
    )
    path = write_results(name, {"data": DATASETS[args.data], "train_images": train_len, "epochs": args.epochs, "machine": machine(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
