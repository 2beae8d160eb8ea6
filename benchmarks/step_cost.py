"""Per-step cost: a member group's training step against a plain Lightning ``Trainer``'s, fixed costs left out.

A fit's wall time is its fixed cost (start-up, building and stacking members, the
``vectorize="auto"`` timing) plus its steps. This script separates the two: each setting is fitted
for ``--short`` and for ``--long`` epochs, and the difference in wall time over the difference in
steps is the cost of one step in steady state (each fit ``--repeats`` times, the shortest counted). With the default model (``ReluMLP``, 64 -> 64 -> 10,
on digits) the compute is negligible, so the table shows what Lightning's loop and the group's own
bookkeeping cost per step: the part that bounds throughput on a GPU for small models.

Settings: ``plain`` (one plain ``Trainer``, one model), ``group-1`` and ``group-N`` (``HQDEStrategy``
with 1 and N members in one group, ``vectorize=True``, ``sync="none"``). The model logs its training
loss per step only (Lightning's default in ``training_step``); with ``--on-epoch`` it logs it as many
modules do, ``on_step=True, on_epoch=True, prog_bar=True``, which a group relays once per member at
every step (through ``hqde_lightning/quick_log.py``).

Run: ``python benchmarks/step_cost.py [--members 8] [--accelerator gpu] [--on-epoch]``; prints a table and
writes ``results/step_cost.json`` (``--on-epoch``: ``results/step_cost_on_epoch.json``; ``--quick``, the CI
smoke setting, adds ``_quick``).
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from common import ImageData, ReluMLP, load_data, machine, print_table, quiet_trainer, write_results
from hqde_lightning import HQDEStrategy


class LogsForTheEpoch(ReluMLP):
    """``ReluMLP`` logging its training loss per step and for the epoch, in the progress bar too."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss


def fit(members: int | None, epochs: int, accelerator: str, model: type[ReluMLP] = ReluMLP) -> tuple[float, int]:
    """Wall time and steps of one fit of ``model``: a plain ``Trainer`` (``members=None``) or a group of ``members``."""
    pl.seed_everything(0, verbose=False)
    strategy = {} if members is None else {"strategy": HQDEStrategy(num_members=members, sync="none", seed=0, vectorize=True)}
    trainer = quiet_trainer(accelerator=accelerator, max_epochs=epochs, limit_val_batches=0, **strategy)
    started = time.perf_counter()
    trainer.fit(model(), datamodule=ImageData("digits"))
    if accelerator == "gpu":
        torch.cuda.synchronize()
    return time.perf_counter() - started, trainer.global_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--short", type=int, default=5, help="epochs of the short fit")
    parser.add_argument("--long", type=int, default=45, help="epochs of the long fit")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the training_cost.py setting)")
    parser.add_argument("--repeats", type=int, default=3, help="fits of each length; the shortest counts")
    parser.add_argument("--on-epoch", action="store_true", help="the model logs its loss with on_step=True, on_epoch=True, prog_bar=True")
    parser.add_argument("--quick", action="store_true", help="tiny CI smoke run: 2 members, fits of 1 and 3 epochs, once each")
    args = parser.parse_args()
    if args.quick:
        args.members, args.short, args.long, args.repeats = 2, 1, 3, 1
    torch.set_num_threads(args.threads)
    train_images = len(load_data("digits")[0])
    model = LogsForTheEpoch if args.on_epoch else ReluMLP
    fit(None, 1, args.accelerator)  # warm-up: first-use costs of this process stay out of the table
    rows = []
    for name, members in (("plain", None), ("group-1", 1), (f"group-{args.members}", args.members)):
        # the shortest of the repeats of each fit: the run least slowed down by other work on the machine
        (short_s, short_steps), (long_s, long_steps) = (min(fit(members, e, args.accelerator, model) for _ in range(args.repeats)) for e in (args.short, args.long))
        step_ms = 1000 * (long_s - short_s) / (long_steps - short_steps)
        rows.append({"setting": name, "members": members or 1, "ms/step": step_ms, "ms/member-step": step_ms / (members or 1), "fixed_s": short_s - short_steps * step_ms / 1000})
    print_table(rows, ["setting", "members", "ms/step", "ms/member-step", "fixed_s"])
    logging = "per step and for the epoch" if args.on_epoch else "per step"
    print(f"\nmodel ReluMLP on digits ({train_images} images, batches of 128), logging its loss {logging}; fits of {args.short} and {args.long} epochs, the shortest of {args.repeats} each; machine: {machine()}")
    payload = {"model": "ReluMLP", "logging": logging, "train_images": train_images, "epochs": [args.short, args.long], "repeats": args.repeats, "accelerator": args.accelerator, "threads": args.threads, "machine": machine(), "rows": rows}
    name = "step_cost" + ("_on_epoch" if args.on_epoch else "") + ("_quick" if args.quick else "")
    print(f"wrote {write_results(name, payload)}")


if __name__ == "__main__":
    main()
