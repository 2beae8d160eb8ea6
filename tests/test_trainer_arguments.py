"""``Trainer`` arguments a Lightning user sets: member ``i`` of a member group ends as member ``i`` trained alone.

Each member is compared with a plain ``Trainer`` given the same arguments, the member's seed and data order
(``member_data.member_loader``): its steps, the validation passes and epoch ends its fit runs, and its metrics.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.profilers import SimpleProfiler
from models import digits, quiet_trainer
from test_groups import MEMBERS, SEED, MemberOrderEpochs, Net, assert_same_members, train_loader
from torch.utils.data import DataLoader, TensorDataset

from hqde_lightning import HQDEStrategy
from hqde_lightning.member_data import member_loader

#: per member (``None``: a member trained alone), what its fit ran (see :class:`FitEvents`)
EVENTS: dict[int | None, list[tuple]] = defaultdict(list)


class FitEvents(pl.Callback):
    """Records the validation passes (at which step, on how many batches) and the epoch ends of each member's fit."""

    def _record(self, trainer: pl.Trainer, *event: object) -> None:
        EVENTS[getattr(trainer.strategy, "member_index", None)].append(event)  # in a group, the member the hook runs as

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._record(trainer, "validation", trainer.global_step)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._record(trainer, "validation batch")

    def on_train_epoch_end(self, trainer, pl_module):
        self._record(trainer, "epoch end", trainer.current_epoch, trainer.global_step)


class Validated(Net):
    """``Net`` with a validation step; ``stop_at`` asks to stop in ``training_step`` at that global step."""

    def __init__(self, stop_at: int = -1, **kwargs) -> None:
        super().__init__(**kwargs)  # (`Net` saves this class's arguments as its hyperparameters too)

    def training_step(self, batch, batch_idx):
        if self.global_step == self.hparams.stop_at:
            self.trainer.should_stop = True
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))


def val_loader() -> DataLoader:
    x, y = digits()
    return DataLoader(TensorDataset(x[1200:1328], y[1200:1328]), batch_size=32)


def stopper() -> list[pl.Callback]:
    """An ``EarlyStopping`` that asks to stop at its second check (nothing improves by 10)."""
    return [EarlyStopping("val_loss", patience=0, min_delta=10.0)]


def alone(hparams: dict, callbacks: Callable[[], list[pl.Callback]] = list, **trainer_kwargs) -> list[tuple[Validated, pl.Trainer, list[tuple]]]:
    """Each member trained alone by a plain ``Trainer``: its seed's initial weights, its own data order."""
    fits = []
    for i in range(MEMBERS):
        EVENTS.clear()
        pl.seed_everything(SEED + i, verbose=False)
        model = Validated(**hparams)
        trainer = quiet_trainer(callbacks=[MemberOrderEpochs(), FitEvents(), *callbacks()], **trainer_kwargs)
        trainer.fit(model, member_loader(train_loader(), SEED, i, 0, False, print, fill_generators=True), val_loader())
        fits.append((model, trainer, list(EVENTS[None])))
    return fits


def grouped(hparams: dict, vectorize: bool, callbacks: Callable[[], list[pl.Callback]] = list, **trainer_kwargs) -> tuple[HQDEStrategy, pl.Trainer]:
    """The members trained as one member group (``sync="none"``), looped ones recording their events."""
    EVENTS.clear()
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=vectorize)
    recorded = [] if vectorize else [FitEvents()]  # (a callback of yours runs as each member: the steps would run looped)
    trainer = quiet_trainer(strategy=strategy, callbacks=[*recorded, *callbacks()], **trainer_kwargs)
    trainer.fit(Validated(**hparams), train_loader(), val_loader())
    return strategy, trainer


STOPS = {
    # every member's EarlyStopping stops at epoch 1's end, held back until step 25 (mid-epoch 2): Lightning then validates
    # once more and ends that epoch
    "min_steps": (dict(optimizer="sgd", batchnorm=False), True, dict(max_epochs=5, min_steps=25, limit_train_batches=10)),
    # every member asks in its step at global step 13: its fit validates after that batch and ends the epoch
    "in_training_step": (dict(optimizer="sgd", batchnorm=False, stop_at=13), False, dict(max_epochs=4, limit_train_batches=10)),
    # checked when validation ends (it runs every other epoch): the epoch's end still runs, as each member's own
    "at_validation_end": (dict(optimizer="sgd", batchnorm=False), True, dict(max_epochs=5, check_val_every_n_epoch=2, limit_train_batches=5)),
}


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
@pytest.mark.parametrize("case", list(STOPS))
def test_members_that_all_stop_together_end_as_their_own_fits(case, vectorize):
    """When every member stops at once, each runs what its own fit runs before it ends: the validation Lightning runs
    when a stop comes inside an epoch (or ``min_steps`` lets it through there) and the epoch's end, with its callbacks.
    Before, a group froze them first: that validation logged nothing for them (their ``val_loss`` was an epoch older) and
    their callbacks' ``on_train_epoch_end`` was skipped."""
    hparams, uses_stopper, fit = STOPS[case]
    callbacks = stopper if uses_stopper else list
    solo = alone(hparams, callbacks, **fit)
    strategy, trainer = grouped(hparams, vectorize, callbacks, **fit)
    assert trainer.global_step == solo[0][1].global_step < fit["max_epochs"] * fit["limit_train_batches"]
    assert_same_members([m.state_dict() for m in strategy.ensemble.members], [model.state_dict() for model, _, _ in solo])
    for i, (_, alone_trainer, events) in enumerate(solo):
        torch.testing.assert_close(trainer.callback_metrics[f"member_{i}/val_loss"], alone_trainer.callback_metrics["val_loss"])
        if not vectorize:
            assert EVENTS[i] == events, f"member {i}"


def test_a_member_group_records_into_your_profiler():
    """``Trainer(profiler=...)`` profiles the group's fit into your profiler, as a plain fit does: after the fit its
    ``recorded_durations`` hold the fit's actions (Lightning's and your hooks'). Before, the group profiled a copy: yours
    stayed empty (``summary()`` showed no action), although the copy printed its report."""
    hparams = dict(optimizer="sgd", batchnorm=False)
    plain = SimpleProfiler()
    pl.seed_everything(SEED, verbose=False)
    quiet_trainer(profiler=plain, max_epochs=1, limit_train_batches=3).fit(Validated(**hparams), train_loader())
    profiler = SimpleProfiler()
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED)
    quiet_trainer(strategy=strategy, profiler=profiler, max_epochs=1, limit_train_batches=3).fit(Validated(**hparams), train_loader())
    assert len(plain.recorded_durations["run_training_batch"]) == len(profiler.recorded_durations["run_training_batch"]) == 3
    assert len(profiler.recorded_durations["[LightningModule]MemberGroup.configure_optimizers"]) == 1
