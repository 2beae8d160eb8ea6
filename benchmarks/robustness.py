"""Benchmark 4, robustness: ensemble accuracy under Byzantine members, and aggregation time by topology.

Part 1: aggregator × attack × fraction of Byzantine members → ensemble test accuracy. Members
0..f-1 send corrupted weights at every sync (``ByzantineMembers``); ``sync="replace"``; a tanh MLP
without normalisation on digits (scale-invariant nets would hide what the mean suffers).

Part 2: per-sync aggregation time of a ~10M-parameter model with 8 members, flat vs tree vs
map-reduce, through the same Ray tasks the coordinator uses.

Run: ``python benchmarks/robustness.py`` (about 10 minutes on 2 cores); ``--quick`` for the CI smoke.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import numpy as np
import ray
import torch
from torch import nn

from common import DATASETS, RESULTS, ImageData, TanhMLP, bar_plot, machine, print_table, quiet_trainer, write_results
from hqde_lightning import HQDEStrategy
from hqde_lightning.actors import RayExecutor
from hqde_lightning.aggregation import GeometricMedian, Krum, Mean, TrimmedMean
from hqde_lightning.callbacks import ByzantineMembers
from hqde_lightning.codec import payload_layout, payload_nbytes
from hqde_lightning.topology import Flat, MapReduce, Tree


def aggregators(num_members: int, byzantine: int) -> dict[str, dict]:
    """Strategy keyword arguments per aggregator label."""
    f = max(1, byzantine)
    rules = {
        "mean": {"aggregator": "mean"},
        "mean+MAD": {"aggregator": "mean", "outlier_threshold": 3.5},
        "geometric_median": {"aggregator": GeometricMedian()},
        "trimmed_mean(0.3)": {"aggregator": TrimmedMean(beta=0.3)},
    }
    if num_members > 2 * f + 2:
        rules[f"krum(f={f})"] = {"aggregator": Krum(num_byzantine=f)}
    return rules


def ensemble_accuracy(num_members: int, byzantine: int, attack: str | None, strategy_kwargs: dict, epochs: int) -> float:
    pl.seed_everything(0, verbose=False)
    strategy = HQDEStrategy(num_members=num_members, sync="replace", seed=1, **strategy_kwargs)
    callbacks = [ByzantineMembers(range(byzantine), attack=attack)] if attack and byzantine else []
    trainer = quiet_trainer(strategy=strategy, max_epochs=epochs, callbacks=callbacks)
    model, data = TanhMLP(), ImageData("digits")
    trainer.fit(model, datamodule=data)
    (results,) = trainer.test(model, datamodule=data, verbose=False)
    return float(results["ensemble/test_acc"])


def big_payloads(num_members: int, width: int) -> list[dict[str, np.ndarray]]:
    """``num_members`` copies of an MLP of about ``3 * width**2`` parameters, as sync payloads."""
    out = []
    for seed in range(num_members):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width))
        out.append({k: v.detach().numpy() for k, v in model.state_dict().items()})
    return out


def aggregation_times(num_members: int, width: int, repeats: int) -> list[dict]:
    payloads = big_payloads(num_members, width)
    refs = [ray.put(p) for p in payloads]
    sizes = [payload_nbytes(p) for p in payloads]
    layout = payload_layout(payloads[0])
    params = sum(layout.values())
    executor = RayExecutor()
    rows = []
    for rule_name, rule in (("mean", Mean()), ("geometric_median", GeometricMedian())):
        for topology in (Flat(), Tree(), MapReduce(num_reducers=4)):
            if rule.robust and isinstance(topology, Tree):
                continue  # the tree refuses robust rules (no honest majority in a pair)
            topology.reduce(refs, sizes, rule, None, [1.0] * num_members, executor, layout)  # warm-up: task workers start
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                _, comm = topology.reduce(refs, sizes, rule, None, [1.0] * num_members, executor, layout)
                seconds.append(time.perf_counter() - started)
            rows.append({
                "rule": rule_name, "topology": topology.name, "members": num_members, "params_M": params / 1e6,
                "seconds_mean": float(np.mean(seconds)), "seconds_min": float(np.min(seconds)),
                "rounds": comm.rounds, "tasks": comm.tasks, "MB_moved": comm.bytes_moved / 2**20,
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=7)
    parser.add_argument("--fractions", type=int, nargs="+", default=[1, 2, 3], help="numbers of Byzantine members")
    parser.add_argument("--attacks", nargs="+", default=["sign_flip", "scale", "gaussian", "nan"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--width", type=int, default=1826, help="MLP width for part 2 (1826 -> ~10M parameters)")
    parser.add_argument("--agg-members", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--aggregators", nargs="+", default=None, help="labels to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="CI smoke: 4 members, 1 epoch, one attack, two rules, a small model in part 2")
    args = parser.parse_args()
    if args.quick:
        args.members, args.fractions, args.attacks, args.epochs, args.width, args.agg_members, args.repeats = 4, [1], ["scale"], 1, 256, 4, 1
        args.aggregators = ["mean", "geometric_median"]

    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = [{"aggregator": "mean", "attack": "none", "byzantine": f"0/{args.members}", "test_acc": ensemble_accuracy(args.members, 0, None, {"aggregator": "mean"}, args.epochs)}]
    print_table(rows, ["aggregator", "attack", "byzantine", "test_acc"])
    for byzantine in args.fractions:
        for attack in args.attacks:
            for label, kwargs in aggregators(args.members, byzantine).items():
                if args.aggregators is not None and label not in args.aggregators:
                    continue
                accuracy = ensemble_accuracy(args.members, byzantine, attack, kwargs, args.epochs)
                rows.append({"aggregator": label, "attack": attack, "byzantine": f"{byzantine}/{args.members}", "test_acc": accuracy})
                print(f"{label:>20} {attack:>10} {byzantine}/{args.members}: {accuracy:.4f}", flush=True)
    print("\nPart 1: ensemble test accuracy under Byzantine members")
    print_table(rows, ["aggregator", "attack", "byzantine", "test_acc"])

    timing = aggregation_times(args.agg_members, args.width, args.repeats)
    print("\nPart 2: per-sync aggregation time")
    print_table(timing, ["rule", "topology", "members", "params_M", "seconds_mean", "seconds_min", "rounds", "tasks", "MB_moved"])
    print(f"\ndata: {DATASETS['digits']}; machine: {machine()}")
    name = "robustness" + ("_quick" if args.quick else "")
    cases = rows[1:]
    labels = sorted({f"{r['attack']} {r['byzantine']}" for r in cases})
    rules = sorted({r["aggregator"] for r in cases})
    lookup = {(r["aggregator"], f"{r['attack']} {r['byzantine']}"): r["test_acc"] for r in cases}
    bar_plot(
        RESULTS / f"{name}.png", f"Ensemble test accuracy under Byzantine members (clean: {rows[0]['test_acc']:.3f})", labels,
        {rule: [lookup.get((rule, label), 0.0) for label in labels] for rule in rules}, "test accuracy",
    )
    path = write_results(name, {"machine": machine(), "accuracy": rows, "aggregation": timing, "epochs": args.epochs, "members": args.members})
    print(f"wrote {path}")
    ray.shutdown()


if __name__ == "__main__":
    main()
