"""Each member's own learning rates and its own decision to stop, in a member group.

Members trained alone can take different learning rates (a ``ReduceLROnPlateau`` follows each
one's own metric, a scheduler your hooks step follows each one's calls) and can stop at different
times (a hook that sets ``trainer.should_stop`` on the member's own metric). A group steps all its
members with one optimizer in one fit loop; each member must still train as it does alone.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import pytest
import test_groups
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor, StochasticWeightAveraging
from models import quiet_trainer
from test_groups import MEMBERS, SEED, MemberOrderEpochs, Net, RecordingLogger, assert_same_members, group_states, train_loader

from hqde_lightning import HQDEStrategy
from hqde_lightning.checkpoint import HQDE_KEY, load_checkpoint_file
from hqde_lightning.member_data import member_loader

EPOCHS = 6


@pytest.fixture(autouse=True)
def _six_epochs(monkeypatch):
    """Enough epochs for the members' plateaus and stops to differ."""
    monkeypatch.setitem(test_groups.FIT, "max_epochs", EPOCHS)


class FinalRates(pl.Callback):
    """Records the learning rate a member ends with."""

    def __init__(self) -> None:
        self.lr: float | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]


def solo(module: type[Net], **trainer_kwargs: Any) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """Each member trained alone (its seed, its data order, a plain Trainer): its final weights and learning rate."""
    states, rates = [], []
    for i in range(MEMBERS):
        pl.seed_everything(SEED + i, verbose=False)
        model, rate = module(), FinalRates()
        loader = member_loader(train_loader(), SEED, i, 0, False, print, fill_generators=True)
        quiet_trainer(**test_groups.FIT, callbacks=[MemberOrderEpochs(), rate], **trainer_kwargs).fit(model, loader)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        rates.append(rate.lr)
    return states, rates


class Plateau(Net):
    """SGD with momentum and a ``ReduceLROnPlateau`` on the epoch's training loss: each member's loss, each member's decisions."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=0, threshold=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "train_loss_epoch"}}


class StepPlateau(Net):
    """A ``ReduceLROnPlateau`` stepped after every batch on the batch's loss (logged per step)."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=2)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "train_loss_step", "interval": "step"}}


def _member_rates(path: str) -> list[float]:
    """Each member's learning rate in a whole-ensemble checkpoint (its own optimizer state)."""
    members = load_checkpoint_file(path)[HQDE_KEY]["members"]
    return [m["optimizer_states"][0]["param_groups"][0]["lr"] for m in members]


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
@pytest.mark.parametrize("module", [Plateau, StepPlateau], ids=["epoch-loss", "step-loss"])
def test_reduce_on_plateau_follows_each_members_own_metric(module, vectorize, tmp_path):
    """Every member's learning rate is cut on its own loss, as alone; its checkpoint entry holds its own rate.

    A per-step value is every member's own at every step, not only at the steps written to the loggers.
    """
    solo_states, solo_rates = solo(module)
    assert len(set(solo_rates)) > 1  # the members' plateaus differ: one learning rate for all could not match them
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=vectorize)
    trainer = quiet_trainer(strategy=strategy, **test_groups.FIT)
    trainer.fit(module(), train_loader())
    assert_same_members([m.state_dict() for m in strategy.ensemble.members], solo_states)
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    assert _member_rates(str(tmp_path / "end.ckpt")) == pytest.approx(solo_rates)


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_learning_rate_monitor_logs_each_members_own_rates(interval):
    """``LearningRateMonitor`` in a group logs ``member_{i}/lr-SGD`` (as member actors name it), each member's own
    rates at the steps and epochs its own fit logs them; the plain name shows the first member's."""
    solo_rates = []
    for i in range(MEMBERS):
        pl.seed_everything(SEED + i, verbose=False)
        logger = RecordingLogger()
        loader = member_loader(train_loader(), SEED, i, 0, False, print, fill_generators=True)
        callbacks = [MemberOrderEpochs(), LearningRateMonitor(logging_interval=interval)]
        quiet_trainer(**test_groups.FIT, callbacks=callbacks, logger=logger, log_every_n_steps=4).fit(Plateau(), loader)
        solo_rates.append(logger.logged("lr-SGD"))
    assert len({tuple(r) for r in solo_rates}) > 1  # the members' rates differ
    logger = RecordingLogger()
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED)
    trainer = quiet_trainer(strategy=strategy, **test_groups.FIT, callbacks=[LearningRateMonitor(logging_interval=interval)], logger=logger, log_every_n_steps=4)
    trainer.fit(Plateau(), train_loader())
    for i in range(MEMBERS):
        assert logger.logged(f"member_{i}/lr-SGD") == pytest.approx(solo_rates[i])
    assert not logger.logged("lr-SGD")  # loggers get the members' names only, as from member actors
    assert float(trainer.callback_metrics["lr-SGD"]) == pytest.approx(solo_rates[0][-1])


def _plateau_fit(tmp_path, name: str, epochs: int, members_per_worker: Any, ckpt_path: str | None = None) -> tuple[HQDEStrategy, pl.Trainer]:
    strategy = HQDEStrategy(num_members=2, sync="none", seed=SEED, members_per_worker=members_per_worker, vectorize=False)
    trainer = quiet_trainer(strategy=strategy, **{**test_groups.FIT, "max_epochs": epochs}, enable_checkpointing=True, default_root_dir=str(tmp_path / name))
    trainer.fit(Plateau(), train_loader(), ckpt_path=ckpt_path)
    return strategy, trainer


def test_a_group_checkpoint_resumes_each_members_plateau_in_either_runtime(ray_session, tmp_path):
    """Stopped halfway, a group's checkpoint resumes each member's learning rate and plateau state, in a group and as
    member actors: both end where the uninterrupted fit ends."""
    _, first = _plateau_fit(tmp_path, "first", 4, "auto")
    path = str(tmp_path / "first.ckpt")
    first.save_checkpoint(path)  # after the fourth epoch's plateau step (a checkpoint callback saves before it, alone too)
    assert len(set(_member_rates(path))) > 1  # the members' learning rates differ when the fit stops
    _, reloaded = _plateau_fit(tmp_path, "reloaded", 4, "auto", path)  # loaded, nothing left to train, saved again
    reloaded.save_checkpoint(tmp_path / "reloaded.ckpt")
    for saved, again in zip(*(load_checkpoint_file(p)[HQDE_KEY]["members"] for p in (path, str(tmp_path / "reloaded.ckpt")))):
        assert again["lr_schedulers"] == saved["lr_schedulers"]
        assert again["optimizer_states"][0]["param_groups"] == saved["optimizer_states"][0]["param_groups"]
    group, group_trainer = _plateau_fit(tmp_path, "group", EPOCHS, "auto", path)
    actors, _ = _plateau_fit(tmp_path, "actors", EPOCHS, 1, path)
    whole, whole_trainer = _plateau_fit(tmp_path, "whole", EPOCHS, "auto")
    for name, trainer in (("group", group_trainer), ("whole", whole_trainer)):
        trainer.save_checkpoint(tmp_path / f"{name}.ckpt")
    ends = [load_checkpoint_file(str(tmp_path / f"{name}.ckpt"))[HQDE_KEY]["members"] for name in ("group", "whole")]
    for resumed, whole_member in zip(*ends):  # each member's plateau (its best loss, its bad epochs) went on from its own
        assert {k: resumed["lr_schedulers"][0][k] for k in ("best", "num_bad_epochs", "_last_lr")} == {
            k: whole_member["lr_schedulers"][0][k] for k in ("best", "num_bad_epochs", "_last_lr")
        }
    uninterrupted = [m.state_dict() for m in whole.ensemble.members]
    assert_same_members([m.state_dict() for m in group.ensemble.members], uninterrupted)
    assert_same_members([m.state_dict() for m in actors.ensemble.members], uninterrupted)


def test_a_plateau_with_stochastic_weight_averaging_trains_in_member_threads(ray_session, caplog):
    """SWA anneals each member from its own learning rate: with a plateau's per-member rates, each member trains alone, in its thread."""
    strategy = HQDEStrategy(num_members=2, sync="none", seed=SEED)
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, limit_train_batches=2, callbacks=[StochasticWeightAveraging(swa_lrs=0.01)])
    with caplog.at_level(logging.INFO):
        trainer.fit(Plateau(), train_loader())
    assert "each in a thread of this process (no Ray): StochasticWeightAveraging anneals each member from its own learning rate" in caplog.text
    assert len(strategy.ensemble.members) == 2


class KeptScheduler(Net):
    """A scheduler kept in an attribute and stepped by an epoch-end hook (not handed to Lightning)."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.3)
        return optimizer

    def on_train_epoch_end(self) -> None:
        self.scheduler.step()


def test_a_scheduler_your_hook_steps_is_each_members_own():
    """Each member steps its own copy once per epoch (one shared scheduler would be stepped once per member)."""
    solo_states, solo_rates = solo(KeptScheduler)
    assert solo_rates[0] == pytest.approx(0.1 * 0.3**3)
    assert_same_members(group_states({}, False, KeptScheduler), solo_states)


class Halving:
    """A scheduler that is not torch's (as timm's are): it halves the learning rate every ``every`` calls."""

    def __init__(self, optimizer: torch.optim.Optimizer, every: int) -> None:
        self.optimizer, self.every, self.calls = optimizer, every, 0

    def step(self, epoch: int) -> None:
        self.calls += 1
        if self.calls % self.every == 0:
            for group in self.optimizer.param_groups:
                group["lr"] *= 0.5

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.every, self.calls = state["every"], state["calls"]


class OwnSchedulerStep(Net):
    """Lightning steps a scheduler that is not torch's through the module's ``lr_scheduler_step``."""

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": Halving(optimizer, every=5), "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step(epoch=self.current_epoch)


def test_your_lr_scheduler_step_runs_once_per_member_in_a_group(caplog):
    """A module overriding ``lr_scheduler_step`` trains in a group (it used to need one Ray actor per member)."""
    solo_states, solo_rates = solo(OwnSchedulerStep)
    assert solo_rates[0] == pytest.approx(0.01 * 0.5 ** (EPOCHS * 8 // 5))
    with caplog.at_level(logging.INFO):
        assert_same_members(group_states({}, "auto", OwnSchedulerStep), solo_states)
    assert "one Ray actor each" not in caplog.text


class StopsAtEpochEnd(Net):
    """Stops its own fit once its epoch loss is below 0.28: members stop after different epochs."""

    def on_train_epoch_end(self) -> None:
        if self.trainer.callback_metrics["train_loss_epoch"] < 0.28:
            self.trainer.should_stop = True


class StopsInAStep(Net):
    """Stops its own fit from inside a training step, once a batch's loss is below 0.6: its last update still happens."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if loss < 0.6:
            self.trainer.should_stop = True
        return loss


def _steps(states: list[dict[str, torch.Tensor]]) -> list[int]:
    """How many steps each member trained (its BatchNorm's batch count)."""
    return [int(s["net.1.num_batches_tracked"]) for s in states]


@pytest.mark.parametrize(
    "module, trainer_kwargs",
    [(StopsAtEpochEnd, {}), (StopsInAStep, {}), (StopsInAStep, dict(min_steps=20)), (StopsInAStep, dict(min_epochs=3))],
    ids=["epoch-end-hook", "training-step", "training-step-min-steps", "training-step-min-epochs"],
)
def test_your_module_stopping_the_fit_stops_only_its_member(module, trainer_kwargs):
    """Each member stops when its own fit would: the others train on, a stop asked in a step keeps that step's
    update, and ``min_steps``/``min_epochs`` hold a member's stop back as they hold back its own fit's."""
    solo_states, _ = solo(module, **trainer_kwargs)
    steps = _steps(solo_states)
    assert min(steps) < EPOCHS * 8  # a member stops before the last epoch ends
    if trainer_kwargs:
        assert steps != _steps(solo(module)[0])  # the minimum held a member's stop back
    else:
        assert len(set(steps)) > 1  # the members stop after different numbers of steps
    assert_same_members(group_states({}, False, module, **trainer_kwargs), solo_states)
