"""Lightning's ``WeightAveraging`` and ``EMAWeightAveraging`` in a member group (``GroupWeightAveraging``).

The reference is each member trained alone by a plain ``Trainer`` with the same callback (its seed,
its data order): a group must end every member with the average that member's own fit keeps, stop
early as it would, and write checkpoints that the member's own fit can resume from.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, WeightAveraging
from models import quiet_trainer
from test_groups import FIT, MEMBERS, SEED, MemberOrderEpochs, Net, assert_same_members, train_loader

from hqde_lightning import HQDEStrategy
from hqde_lightning.checkpoint import HQDE_KEY, load_checkpoint_file
from hqde_lightning.embedded import group_blocker
from hqde_lightning.member import MEMBER_KEY
from hqde_lightning.member_data import member_loader


def ema() -> EMAWeightAveraging:
    """Updates after every second step and at each epoch's end from the second epoch on: both of Lightning's update points."""
    return EMAWeightAveraging(decay=0.8, update_every_n_steps=2, update_starting_at_epoch=1)


class EveryUpdate(WeightAveraging):
    """The equal-weighted mean after every step and epoch, chosen by a subclass, as Lightning's docs show: each member's
    count of updates matters."""

    def should_update(self, step_idx=None, epoch_idx=None) -> bool:
        return True


class ChangesTheSwap(WeightAveraging):
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        pass


def _solo_fit(i: int, module: type[Net], callback, ckpt_path: str | None = None, **trainer_kwargs) -> tuple[Net, pl.Trainer]:
    """Member ``i`` alone: its seed's initial weights, its own data order, a plain Trainer with ``callback``."""
    pl.seed_everything(SEED + i, verbose=False)
    model = module()
    loader = member_loader(train_loader(), SEED, i, 0, False, print, fill_generators=True)
    trainer = quiet_trainer(**{**FIT, **trainer_kwargs}, callbacks=[MemberOrderEpochs(), callback()])
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return model, trainer


def _states(models) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]


def _group_fit(vectorize, module: type[Net], callback, **trainer_kwargs) -> HQDEStrategy:
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=vectorize)
    ckpt_path, callbacks = trainer_kwargs.pop("ckpt_path", None), trainer_kwargs.pop("callbacks", [])
    trainer = quiet_trainer(strategy=strategy, **{**FIT, **trainer_kwargs}, callbacks=[callback(), *callbacks])
    assert group_blocker(strategy, trainer, module()) is None  # one group, not each member in a thread of its own
    trainer.fit(module(), train_loader(), ckpt_path=ckpt_path)
    return strategy


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_ema_in_a_group_gives_each_member_its_own_fits_average(vectorize, caplog):
    solo = _states(_solo_fit(i, Net, ema)[0] for i in range(MEMBERS))
    with caplog.at_level(logging.INFO):
        group = _group_fit(vectorize, Net, ema)
    assert "thread" not in caplog.text and "Ray actor" not in caplog.text  # trained as one group, not member by member
    assert_same_members([m.state_dict() for m in group.ensemble.members], solo)


class StopsAtItsStep(Net):
    """Stops after a training step its own RNG stream draws (inside an epoch for some members)."""

    def on_fit_start(self) -> None:
        self.stop_step = int(torch.randint(4, 30, ()))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.trainer.global_step >= self.stop_step:
            self.trainer.should_stop = True


class StopsAtItsEpoch(Net):
    """Stops at the end of an epoch its own RNG stream draws."""

    def on_fit_start(self) -> None:
        self.stop_epoch = int(torch.randint(0, 3, ()))

    def on_train_epoch_end(self) -> None:
        if self.current_epoch >= self.stop_epoch:
            self.trainer.should_stop = True


@pytest.mark.parametrize("module", [StopsAtItsStep, StopsAtItsEpoch])
def test_a_member_that_stops_early_keeps_the_average_of_its_own_fit(module):
    """A stopped member's average takes its last batch's and its last epoch's updates and none after, counted as its own
    (the equal-weighted mean divides by each member's own count of updates)."""
    solo = [_solo_fit(i, module, EveryUpdate, max_epochs=4) for i in range(MEMBERS)]
    steps = [trainer.global_step for _, trainer in solo]
    assert len(set(steps)) == MEMBERS and min(steps) < 4 * FIT["limit_train_batches"], steps  # they stop apart, and early
    group = _group_fit("auto", module, EveryUpdate, max_epochs=4)
    assert_same_members([m.state_dict() for m in group.ensemble.members], _states(model for model, _ in solo))


def test_group_checkpoints_hold_each_members_own_fits_and_resume(tmp_path):
    """Each member's entry is what a checkpoint of its own fit holds: its average as ``state_dict``, its trained weights
    as ``current_model_state``; a group resumes from it, and so does the member's own fit."""
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path), save_top_k=-1)
    whole = _group_fit(False, Net, ema, max_epochs=3, callbacks=[checkpoints], enable_checkpointing=True)
    path = tmp_path / f"epoch=1-step={2 * FIT['limit_train_batches']}.ckpt"
    entries = load_checkpoint_file(path)[HQDE_KEY]["members"]
    for entry in entries:
        assert {"current_model_state", "averaging_state"} <= set(entry)
        assert entry["state_dict"].keys() == entry["current_model_state"].keys() == Net().state_dict().keys()
        assert not torch.allclose(entry["state_dict"]["net.0.weight"], entry["current_model_state"]["net.0.weight"])
        assert int(entry["averaging_state"]["n_averaged"]) == 4 + 4 + 1  # every second of 8 steps in 2 epochs, the second's end
    resumed = _group_fit(False, Net, ema, max_epochs=3, ckpt_path=str(path))
    assert_same_members([m.state_dict() for m in resumed.ensemble.members], [m.state_dict() for m in whole.ensemble.members])
    own = tmp_path / "member_1.ckpt"  # member 1's entry, as a checkpoint of its own fit
    torch.save({k: v for k, v in entries[1].items() if k != MEMBER_KEY}, own)
    alone, _ = _solo_fit(1, Net, ema, ckpt_path=str(own), max_epochs=3)
    assert_same_members([alone.state_dict()], [whole.ensemble.members[1].state_dict()])


def test_weight_averaging_that_only_chooses_when_to_update_runs_once_for_the_group():
    def blocker(callback):
        trainer = pl.Trainer(strategy=HQDEStrategy(num_members=2), callbacks=[callback], logger=False)
        return group_blocker(trainer.strategy, trainer, Net())

    assert blocker(EMAWeightAveraging()) is None
    assert blocker(EveryUpdate()) is None
    assert "ChangesTheSwap overrides WeightAveraging's ['on_validation_epoch_start']" in blocker(ChangesTheSwap())
