"""Members that stop early inside a member group end as they end in their own fits (member threads here, which train
each member by its own Lightning fit, exactly as its Ray actor does): the sync round of the epoch they stop in, their
aggregation score, what checkpoint callbacks monitor afterwards, and the exploration noise they no longer get."""

from __future__ import annotations

import os
import re

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from models import DigitsModule, quiet_trainer
from test_groups import SeededDigits, assert_same_members

from hqde_lightning import HQDEStrategy
from hqde_lightning.callbacks import QuantumNoise

FIT = dict(max_epochs=3, limit_train_batches=5, limit_val_batches=2)


def _in_threads(module: type[DigitsModule]) -> type[DigitsModule]:
    """``module`` with a hook a member group cannot run (it acts on the whole module): its members train in threads."""

    class InThreads(module):
        def on_validation_model_eval(self) -> None:
            super().on_validation_model_eval()

    return InThreads


def _fit(module: type[DigitsModule], threads: bool, callbacks=(), fit: dict | None = None, **strategy_kwargs) -> tuple[HQDEStrategy, pl.Trainer]:
    strategy = HQDEStrategy(num_members=3, seed=0, vectorize=False, **strategy_kwargs)
    trainer = quiet_trainer(strategy=strategy, callbacks=list(callbacks), **{**FIT, **(fit or {})})
    pl.seed_everything(0, verbose=False)  # the shared initial weights of elastic members
    trainer.fit((_in_threads(module) if threads else module)(), datamodule=SeededDigits())
    return strategy, trainer


def _rounds(strategy: HQDEStrategy) -> list[list[int]]:
    return [list(record.members) for record in strategy.sync_history]


class StopsInItsStep(DigitsModule):
    """Member 0 asks to stop inside ``training_step`` at epoch 1, batch 2 (its own fit ends that epoch, and syncs)."""

    def training_step(self, batch, batch_idx):
        if self.trainer.strategy.member_index == 0 and self.current_epoch == 1 and batch_idx == 2:
            self.trainer.should_stop = True
        return super().training_step(batch, batch_idx)


class StopsAtValidationEnd(DigitsModule):
    """Member 1 asks to stop in ``on_validation_epoch_end`` of epoch 0, which runs before the epoch's sync."""

    def on_validation_epoch_end(self) -> None:
        if self.trainer.strategy.member_index == 1 and self.current_epoch == 0 and not self.trainer.sanity_checking:
            self.trainer.should_stop = True


@pytest.mark.parametrize("module", [StopsInItsStep, StopsAtValidationEnd], ids=["in-step", "validation-end"])
def test_a_member_that_stops_before_its_epochs_sync_takes_part_in_that_round(module):
    """Before, the group left it out of the round of the epoch it stopped in (its own fit syncs at that epoch's end, after
    the stop was asked): rounds and members differed from member threads and actors (up to 8e-3)."""
    # superposition: the round weighs the member by its mean loss over the batches it trained (those before its stop)
    group, _ = _fit(module, threads=False, sync="elastic", aggregator="superposition")
    threads, _ = _fit(module, threads=True, sync="elastic", aggregator="superposition")
    assert _rounds(group) == _rounds(threads)
    for ours, theirs in zip(group.sync_history, threads.sync_history):
        torch.testing.assert_close(torch.as_tensor(ours.member_weights), torch.as_tensor(theirs.member_weights), rtol=0, atol=1e-6)
    stopper = 0 if module is StopsInItsStep else 1
    stop_epoch = 1 if module is StopsInItsStep else 0
    assert stopper in _rounds(group)[stop_epoch] and stopper not in _rounds(group)[stop_epoch + 1]
    assert_same_members([m.state_dict() for m in group.ensemble.members], [m.state_dict() for m in threads.ensemble.members], atol=1e-6)


def test_early_stopping_checked_at_validation_end_stops_after_that_epochs_round():
    """``check_val_every_n_epoch=2``: Lightning's EarlyStopping then checks when validation ends, before the epoch's sync."""
    stopping = lambda: EarlyStopping("val_acc", mode="max", stopping_threshold=0.3)  # noqa: E731
    group, _ = _fit(DigitsModule, threads=False, callbacks=[stopping()], sync="elastic", fit=dict(check_val_every_n_epoch=2, max_epochs=4))
    threads, _ = _fit(DigitsModule, threads=True, callbacks=[stopping()], sync="elastic", fit=dict(check_val_every_n_epoch=2, max_epochs=4))
    assert _rounds(group) == _rounds(threads) and len(_rounds(group)[1]) == 3
    assert_same_members([m.state_dict() for m in group.ensemble.members], [m.state_dict() for m in threads.ensemble.members], atol=1e-6)


class StopsAfterEpochZero(pl.Callback):
    """Member 0 asks to stop at the end of epoch 0, as ``EarlyStopping`` would."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.strategy.member_index == 0 and trainer.current_epoch == 0:
            trainer.should_stop = True


def test_a_stopped_member_keeps_the_superposition_score_of_its_last_epoch():
    """Before, its slices still ran in the stack and the group scored it by their loss on later batches: the ensemble's
    prediction weights and your module's final consensus differed from threads' and actors' (1.1e-3)."""
    group, _ = _fit(DigitsModule, threads=False, callbacks=[StopsAfterEpochZero()], sync="elastic", aggregator="superposition")
    threads, _ = _fit(DigitsModule, threads=True, callbacks=[StopsAfterEpochZero()], sync="elastic", aggregator="superposition")
    torch.testing.assert_close(group.ensemble.weights, threads.ensemble.weights, rtol=0, atol=1e-6)
    assert not torch.allclose(group.ensemble.weights, torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("threads", [False, True], ids=["group", "threads"])
def test_checkpoints_monitor_the_lowest_member_still_training(tmp_path, threads):
    """Before, in a group the plain ``val_acc`` stayed the stopped member 0's: every later file carried its value and the
    epoch-0 file stayed "best" (member actors follow member 1, the member that then writes checkpoints). In threads the
    epoch-1 file was never written: member 0, still saving its last checkpoint, was taken for that epoch's writer."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_acc", mode="max", save_top_k=-1, filename="{epoch}-{val_acc:.4f}")
    _, trainer = _fit(DigitsModule, threads=threads, callbacks=[StopsAfterEpochZero(), checkpoint], sync="none", fit=dict(enable_checkpointing=True))
    scores = {int(m[1]): float(m[2]) for m in (re.match(r"epoch=(\d+)-val_acc=([\d.]+)\.ckpt", f) for f in os.listdir(tmp_path)) if m}
    assert sorted(scores) == [0, 1, 2]
    assert scores[2] == pytest.approx(float(trainer.callback_metrics["member_1/val_acc"]), abs=1e-4)
    assert scores[1] != scores[0] and float(checkpoint.best_model_score) == pytest.approx(max(scores.values()), abs=1e-4)


def test_a_stopped_member_gets_no_more_exploration_noise_and_logs_none():
    group, group_trainer = _fit(DigitsModule, threads=False, callbacks=[StopsAfterEpochZero(), QuantumNoise(scale=0.01)], sync="none")
    threads, threads_trainer = _fit(DigitsModule, threads=True, callbacks=[StopsAfterEpochZero(), QuantumNoise(scale=0.01)], sync="none")
    stopped = float(group_trainer.callback_metrics["member_0/noise_scale"])
    assert stopped > 0 and stopped == pytest.approx(float(threads_trainer.callback_metrics["member_0/noise_scale"]))
    assert_same_members([m.state_dict() for m in group.ensemble.members], [m.state_dict() for m in threads.ensemble.members], atol=1e-6)
