"""Ensemble inference cost: evaluating N members in one ``torch.func.vmap`` call, one after another, or ``"auto"``.

``Ensemble(members, vectorize=...)`` evaluates its members (``predict_proba``, ``trainer.test``'s
ensemble metrics, the evaluation callbacks) either way. This script times ``predict_proba`` on
batches of 1,000 inputs shaped like each data set's images, for the benchmark models (``ReluMLP``
on digits, ``SmallCNN`` on Fashion-MNIST; untrained: the cost does not depend on the weights), with
``vectorize=True``, ``False`` and ``"auto"`` (which times both ways at its first evaluation, that
evaluation counted in its total).

Run: ``python benchmarks/inference_cost.py [--members 8] [--batches 10] [--accelerator gpu]``;
prints a table and writes ``results/inference_cost.json`` (``--quick``: ``results/inference_cost_quick.json``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from common import ReluMLP, SmallCNN, machine, print_table, write_results
from hqde_lightning.ensemble import Ensemble

#: model, and the shape of one input, per data set
MODELS: dict[str, tuple[type[torch.nn.Module], tuple[int, ...]]] = {"digits": (ReluMLP, (1, 8, 8)), "fashion-mnist": (SmallCNN, (1, 28, 28))}


@torch.no_grad()
def evaluate(data: str, vectorize: Any, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Seconds to evaluate ``args.batches`` batches of 1,000 inputs, and the way ``"auto"`` kept."""
    model, shape = MODELS[data]
    torch.manual_seed(0)
    ensemble = Ensemble([model() for _ in range(args.members)], vectorize=vectorize).eval().to(device)
    batches = [torch.rand(1000, *shape, device=device) for _ in range(args.batches)]
    started = time.perf_counter()
    for batch in batches:
        ensemble.predict_proba(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    kept = {True: "vmap", False: "loop"}.get(ensemble.vmap_is_faster.get(device.type), "") if vectorize == "auto" else ""
    return {"data": data, "model": model.__name__, "vectorize": str(vectorize), "ms_per_1000": 1000 * seconds / args.batches, "auto_kept": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--batches", type=int, default=10, help="batches of 1,000 inputs per setting")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny CI smoke run: 2 members, 2 batches")
    args = parser.parse_args()
    if args.quick:
        args.members, args.batches = 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    rows = [evaluate(data, vectorize, args, device) for data in MODELS for vectorize in (True, False, "auto")]
    for row in rows:
        looped = next(r for r in rows if r["data"] == row["data"] and r["vectorize"] == "False")
        row["vs_loop"] = row["ms_per_1000"] / looped["ms_per_1000"]
    print_table(rows, ["data", "model", "vectorize", "ms_per_1000", "vs_loop", "auto_kept"])
    print(f"\n{args.members} members, {args.batches} batches of 1,000 inputs each; torch threads {torch.get_num_threads()}; machine: {machine()}")
    payload = {"members": args.members, "batches": args.batches, "accelerator": args.accelerator, "threads": torch.get_num_threads(), "machine": machine(), "rows": rows}
    print(f"wrote {write_results('inference_cost_quick' if args.quick else 'inference_cost', payload)}")


if __name__ == "__main__":
    main()
