"""Members taking turns in threads of the driver: the one-device runtime for modules a member group cannot run.

A module a member group cannot run (here: its ``on_validation_model_eval`` keeps dropout on, which
acts on the whole module) trains each member in a thread of this process, one at a time, without Ray actors; every member ends exactly where its member actor ends (same random numbers,
same syncs), checkpoints resume the same run, and a failing member or Ctrl-C ends the fit as a
plain fit ends.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import threading

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from models import DigitsDataModule, DigitsModule, quiet_trainer
from test_conformance import LoggerSeen
from test_groups import SeededDigits, assert_same_members

import hqde_lightning.actor_fit as actor_fit
from hqde_lightning import HQDEStrategy
from hqde_lightning.checkpoint import HQDE_KEY, load_checkpoint_file

MEMBERS = 3
FIT = dict(limit_train_batches=6, limit_val_batches=2)


class ManualDigits(DigitsModule):
    """Manual optimization, drawing random numbers at every step (input noise, dropout), with Monte Carlo dropout in
    validation (``on_validation_model_eval``, a hook a member group cannot run per member: so its members train in threads)."""

    def __init__(self, hidden: int = 32, lr: float = 0.05, fail_member: int | None = None, interrupt: bool = False) -> None:
        super().__init__(hidden=hidden, lr=lr)
        self.automatic_optimization = False
        self.dropout = torch.nn.Dropout(0.2)

    def training_step(self, batch, batch_idx):
        if self.hparams.fail_member == self.trainer.strategy.member_index and self.current_epoch == 1 and batch_idx == 2:
            raise (KeyboardInterrupt if self.hparams.interrupt else ValueError)("raised by training_step at epoch 1")
        x, y = batch
        optimizer = self.optimizers()
        loss = F.cross_entropy(self(self.dropout(x + 0.1 * torch.randn_like(x))), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.log("train_loss", loss)

    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        self.dropout.train()


class NoMemberActors:
    def __init__(self, *args, **kwargs) -> None:
        raise AssertionError("a member actor was started")


def _fit(
    members_per_worker="auto", epochs: int = 2, ckpt_path=None, callbacks=(), root=None, datamodule=DigitsDataModule, **module_kwargs
) -> tuple[HQDEStrategy, pl.Trainer]:
    strategy = HQDEStrategy(num_members=MEMBERS, sync="elastic", sync_strength=0.5, seed=11, members_per_worker=members_per_worker)
    options = dict(enable_checkpointing=bool(callbacks), default_root_dir=str(root)) if root is not None else {}
    trainer = quiet_trainer(strategy=strategy, max_epochs=epochs, callbacks=list(callbacks), **FIT, **options)
    torch.manual_seed(0)  # the members' shared initial weights (elastic sync) are the module's
    trainer.fit(ManualDigits(**module_kwargs), datamodule=datamodule(), ckpt_path=ckpt_path)
    return strategy, trainer


def _assert_same_members(a: HQDEStrategy, b: HQDEStrategy) -> None:
    """Equal to float tolerance: a member actor's torch uses its share of the cores, a member thread all of them."""
    assert_same_members([m.state_dict() for m in a.ensemble.members], [m.state_dict() for m in b.ensemble.members], atol=1e-6)


def _member_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hqde-member-")]


def test_a_module_a_group_cannot_run_trains_in_turns_without_actors_and_ends_where_member_actors_end(ray_session, monkeypatch, caplog):
    with monkeypatch.context() as patch, caplog.at_level(logging.INFO):
        patch.setattr(actor_fit, "MemberPool", NoMemberActors)
        threads, trainer = _fit()
    assert "the members train in turns, each in a thread of this process (no Ray): ManualDigits overrides ['on_validation_model_eval']" in caplog.text
    assert trainer.current_epoch == 2 and trainer.global_step == 2 * FIT["limit_train_batches"]
    assert not _member_threads()
    actors, _ = _fit(members_per_worker=1)
    # the same random numbers (noise, dropout, data order) and the same syncs, member by member
    _assert_same_members(threads, actors)
    assert [h["members"] for h in threads.sync_history] == [[0, 1, 2]] * 2
    assert [h["member_weights"] for h in threads.sync_history] == [h["member_weights"] for h in actors.sync_history]
    flats = [torch.cat([p.flatten() for p in m.parameters()]) for m in threads.ensemble.members]
    assert min(float((a - b).norm()) for a in flats for b in flats if a is not b) > 1e-3, "members drew their own numbers"
    assert {f"member_{i}/train_loss" for i in range(MEMBERS)} <= set(trainer.callback_metrics)


def test_members_in_turns_see_your_log_dir_and_are_told_where_the_experiment_is(ray_session, tmp_path):
    """``trainer.log_dir`` in a member thread is your TensorBoardLogger's ``log_dir`` (a plain fit's), not its ``save_dir``."""
    seen, logger = LoggerSeen(), TensorBoardLogger(str(tmp_path), name="tb")
    trainer = quiet_trainer(strategy=HQDEStrategy(num_members=2, seed=11), logger=logger, callbacks=[seen], **FIT)
    trainer.fit(ManualDigits(), datamodule=DigitsDataModule())
    assert seen.log_dir == os.path.abspath(logger.log_dir) == os.path.abspath(trainer.log_dir) == str(tmp_path / "tb" / "version_0")
    assert "stands in for your TensorBoardLogger" in seen.experiment and "`self.trainer.log_dir`" in seen.experiment


class SetsUpItsData(DigitsDataModule):
    """Counts its ``setup`` calls: the datasets exist only once ``setup`` ran."""

    setups = 0

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.setups += 1


def test_your_datamodule_is_set_up_and_attached_after_a_fit_in_turns():
    """Member 0 fits your datamodule itself, as a plain fit does, the others a copy of it: after the fit it is set up once and
    attached, so ``trainer.estimated_stepping_batches`` reads it (it failed: the driver's datamodule was never set up)."""
    dm = SetsUpItsData()
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=11)
    trainer = quiet_trainer(strategy=strategy, **FIT)
    trainer.fit(ManualDigits(), datamodule=dm)
    assert dm.setups == 1 and trainer.datamodule is dm and dm.trainer is trainer
    assert trainer.estimated_stepping_batches == FIT["limit_train_batches"]


def test_checkpoints_written_in_turns_hold_every_member_and_resume_the_same_run(ray_session, tmp_path):
    """With the loader's own generator, each member's order of a resumed epoch is the uninterrupted one's (with a shuffle
    drawn from the global RNG it is not, in member actors either); the noise and dropout draws continue from the checkpoint."""
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    whole, _ = _fit(epochs=3, callbacks=[every_epoch], root=tmp_path, datamodule=SeededDigits)
    saved = load_checkpoint_file(str(tmp_path / "ckpt" / "epoch=1.ckpt"))
    assert saved["epoch"] == 1 and len(saved[HQDE_KEY]["members"]) == MEMBERS
    resumed, trainer = _fit(epochs=3, ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt"), callbacks=[ModelCheckpoint(dirpath=tmp_path / "again")], root=tmp_path, datamodule=SeededDigits)
    assert trainer.current_epoch == 3
    _assert_same_members(resumed, whole)


class RecordExceptions(pl.Callback):
    """Appends ``<thread name> <exception class>`` to ``path`` in ``on_exception`` (each member has its own copy of a callback)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_exception(self, trainer, pl_module, exception):
        with open(self.path, "a") as f:
            f.write(f"{threading.current_thread().name} {type(exception).__name__}\n")


def test_a_failing_member_ends_the_fit_with_its_error_and_stops_the_others(ray_session, tmp_path):
    record = tmp_path / "exceptions.txt"
    strategy = HQDEStrategy(num_members=MEMBERS, sync="elastic", seed=11)
    trainer = quiet_trainer(strategy=strategy, max_epochs=3, callbacks=[RecordExceptions(str(record))], **FIT)
    with pytest.raises(ValueError, match="member 1 failed: raised by training_step at epoch 1"):
        trainer.fit(ManualDigits(fail_member=1), datamodule=DigitsDataModule())
    assert trainer.interrupted
    assert not _member_threads(), "no member thread outlives the fit"
    seen = {tuple(line.split()) for line in record.read_text().splitlines()}
    # the failing member's callbacks saw its error, the other members were stopped, the driver's fit saw the error
    assert seen == {("hqde-member-1", "ValueError"), ("hqde-member-0", "MemberCancelled"), ("hqde-member-2", "MemberCancelled"), ("MainThread", "ValueError")}


class CtrlC(pl.Callback):
    """Presses Ctrl-C (``KeyboardInterrupt`` in the main thread) while member 1 trains its second epoch."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.strategy.member_index == 1 and trainer.current_epoch == 1 and batch_idx == 1:
            _thread.interrupt_main()


@pytest.mark.parametrize("where", ["ctrl-c", "raised by a member"])
def test_an_interrupt_ends_the_fit_as_it_ends_a_plain_fit(ray_session, where):
    strategy = HQDEStrategy(num_members=MEMBERS, sync="elastic", seed=11)
    callbacks = [CtrlC()] if where == "ctrl-c" else []
    trainer = quiet_trainer(strategy=strategy, max_epochs=3, callbacks=callbacks, **FIT)
    module = ManualDigits() if where == "ctrl-c" else ManualDigits(fail_member=1, interrupt=True)
    handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt (whatever earlier tests left)
    try:
        with pytest.raises(SystemExit):  # a plain fit answers KeyboardInterrupt with its graceful shutdown and `sys.exit(1)`
            trainer.fit(module, datamodule=DigitsDataModule())
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning's shutdown ignores further Ctrl-C
    assert trainer.interrupted
    assert not _member_threads()
