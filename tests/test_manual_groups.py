"""Manual optimization in a member group: each member runs your ``training_step`` in turn, with optimizers of its own.

A module that makes its own updates (``self.automatic_optimization = False``) used to train in
threads of the driver, one member's fit after another. In a group, member ``i`` must end exactly
where member ``i`` trained alone by a plain ``Trainer`` ends: with two optimizers stepped one after
the other (as a GAN does), a learning-rate scheduler it steps itself, gradient clipping, dropout,
BatchNorm, code that reads ``self.global_step``, and after resuming from a checkpoint.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning, EarlyStopping, EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.loggers import CSVLogger
from models import quiet_trainer
from test_groups import MEMBERS, SEED, ConvNet, MemberOrderEpochs, SeededDigits, assert_same_members, group_states, solo_states, train_loader
from test_member_threads import ManualDigits
from torch import nn

import hqde_lightning.launcher as launcher
from hqde_lightning import HQDEStrategy
from hqde_lightning.callbacks import AdaptiveQuantization, ByzantineMembers, QuantumNoise
from hqde_lightning.member_data import member_loader

FIT = dict(max_epochs=3, limit_train_batches=6, limit_val_batches=0)


class TwoOptimizers(pl.LightningModule):
    """Under manual optimization: a body (BatchNorm, dropout) with Adam and a head with SGD, stepped one after the other
    as a GAN steps its two networks; the head skips its step every third optimizer step (``self.global_step``), its
    gradients are clipped, and the body's learning rate decays each epoch by a scheduler the module steps itself, at a rate
    each member's initial head chooses."""

    def __init__(self, dropout: float = 0.2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.body = nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(32, 10)
        #: the optimizer step counts the module saw at each batch's start
        self.seen_steps: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen_steps.append(self.global_step)
        body_opt, head_opt = self.optimizers()
        x, y = batch
        self.toggle_optimizer(body_opt)
        loss = F.cross_entropy(self.head(self.body(x)), y)
        body_opt.zero_grad()
        self.manual_backward(loss)
        body_opt.step()
        self.untoggle_optimizer(body_opt)
        if self.global_step % 3 != 2:
            self.toggle_optimizer(head_opt)
            head_loss = F.cross_entropy(self.head(self.body(x).detach()), y)
            head_opt.zero_grad()
            self.manual_backward(head_loss)
            self.clip_gradients(head_opt, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
            head_opt.step()
            self.untoggle_optimizer(head_opt)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def on_train_epoch_end(self):
        self.lr_schedulers().step()

    def configure_optimizers(self):
        body = torch.optim.Adam(self.body.parameters(), lr=0.01)
        head = torch.optim.SGD(self.head.parameters(), lr=0.1, momentum=0.9)
        gamma = 0.5 if float(self.head.bias.detach().sum()) > 0 else 0.8
        return [body, head], [torch.optim.lr_scheduler.StepLR(body, step_size=1, gamma=gamma)]


def _every_epoch(dirpath) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=dirpath, filename="{epoch}", save_top_k=-1, every_n_epochs=1)


def solo_fits(resume_from_epoch: int | None = None, root=None, log_dir=None, extra=lambda: [], module=TwoOptimizers) -> list[tuple[TwoOptimizers, pl.Trainer]]:
    """Each member trained alone (its seed, its data order, a plain ``Trainer``), or resumed at the end of ``resume_from_epoch``;
    with ``log_dir``, logging its learning rates each epoch (``LearningRateMonitor``); with the callbacks ``extra()`` makes."""
    fits = []
    for i in range(MEMBERS):
        ckpt_paths = [None] if resume_from_epoch is None else [None, root / f"solo{i}" / f"epoch={resume_from_epoch}.ckpt"]
        for ckpt_path in ckpt_paths:
            pl.seed_everything(SEED + i, verbose=False)
            model = module(dropout=0.0 if root is not None else 0.2)
            loader = member_loader(train_loader(), SEED, i, 0, False, print, fill_generators=True)
            callbacks = [MemberOrderEpochs(), *extra()] + ([_every_epoch(root / f"solo{i}" / ("resumed" if ckpt_path else ""))] if root is not None else [])
            logged = dict(logger=CSVLogger(log_dir), callbacks=callbacks + [LearningRateMonitor(logging_interval="epoch")]) if log_dir else dict(callbacks=callbacks)
            trainer = quiet_trainer(**FIT, enable_checkpointing=root is not None, **logged)
            trainer.fit(model, loader, ckpt_path=ckpt_path)
        fits.append((model, trainer))
    return fits


def group_fit(resume_from_epoch: int | None = None, root=None, callbacks=(), module=TwoOptimizers, **trainer_kwargs) -> tuple[HQDEStrategy, pl.Trainer]:
    ckpt_paths = [None] if resume_from_epoch is None else [None, root / "group" / f"epoch={resume_from_epoch}.ckpt"]
    for ckpt_path in ckpt_paths:
        strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED)
        own = list(callbacks) + ([_every_epoch(root / "group" / ("resumed" if ckpt_path else ""))] if root is not None else [])
        trainer = quiet_trainer(strategy=strategy, **FIT, callbacks=own, enable_checkpointing=root is not None, **trainer_kwargs)
        trainer.fit(module(dropout=0.0 if root is not None else 0.2), train_loader(), ckpt_path=ckpt_path)
    return strategy, trainer


def states(models) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]


def test_each_member_of_a_group_steps_its_own_optimizers_as_alone(in_a_group):
    """Two optimizers, a scheduler, clipping, dropout and BatchNorm: every member of the group ends where its own fit ends,
    the trainer counts the optimizer steps one member's fit counts, and each member saw its own fit's step counts."""
    solo = solo_fits()
    strategy, trainer = group_fit()
    assert_same_members(states(strategy.ensemble.members), states(m for m, _ in solo))
    assert trainer.global_step == solo[0][1].global_step  # 2 steps a batch, 1 every third: not counted once per member
    assert not torch.allclose(solo[0][0].head.weight, solo[1][0].head.weight)  # the members differ
    for i, (_, solo_trainer) in enumerate(solo):  # what each member logged is its own fit's
        torch.testing.assert_close(trainer.callback_metrics[f"member_{i}/train_loss_epoch"], solo_trainer.callback_metrics["train_loss_epoch"])


def test_a_group_under_manual_optimization_resumes_each_members_optimizers(in_a_group, tmp_path):
    """Resumed from a whole-ensemble checkpoint of epoch 1, each member gets back its own optimizers' and scheduler's states
    and ends where its own resumed fit ends (no dropout: a plain fit does not resume its RNG stream, a group does)."""
    solo = solo_fits(resume_from_epoch=1, root=tmp_path)
    strategy, _ = group_fit(resume_from_epoch=1, root=tmp_path)
    assert_same_members(states(strategy.ensemble.members), states(m for m, _ in solo))


def test_members_stop_on_their_own_under_manual_optimization(in_a_group):
    """``EarlyStopping`` stops each member by its own metric: a stopped member no longer runs your step."""
    strategy, trainer = group_fit(callbacks=[EarlyStopping(monitor="train_loss_epoch", stopping_threshold=100.0, check_on_train_epoch_end=True)])
    assert trainer.current_epoch == 1  # every member stopped after its first epoch
    pl.seed_everything(SEED, verbose=False)
    fresh = TwoOptimizers()
    assert not torch.allclose(strategy.ensemble.members[0].head.weight, fresh.head.weight)


def test_learning_rate_monitor_logs_each_members_own_rates_under_manual_optimization(in_a_group, tmp_path):
    """``LearningRateMonitor`` logs each member's own optimizers' rates under the names its own fit gives them
    (``lr-Adam``, ``lr-SGD``), the body's decaying at the rate the member chose."""
    solo = solo_fits(log_dir=tmp_path / "solo")
    _, trainer = group_fit(callbacks=[LearningRateMonitor(logging_interval="epoch")], logger=CSVLogger(tmp_path / "group"))
    alone = [float(t.callback_metrics["lr-Adam"]) for _, t in solo]
    assert len(set(alone)) == 2  # the members chose different decays
    for i, (_, solo_trainer) in enumerate(solo):
        for name in ("lr-Adam", "lr-SGD"):
            assert float(trainer.callback_metrics[f"member_{i}/{name}"]) == float(solo_trainer.callback_metrics[name])


def _count_threads(monkeypatch) -> list[bool]:
    """A list that grows by one each time a fit trains its members in threads."""
    started = []
    original = launcher.MemberThreads

    def threads(*args, **kwargs):
        started.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(launcher, "MemberThreads", threads)
    return started


def test_weight_averaging_keeps_each_members_own_average_under_manual_optimization(in_a_group, tmp_path):
    """``EMAWeightAveraging`` averages what each member's own optimizers make of its weights: every member ends the fit with
    the average its own fit ends with (the module's two optimizers count two steps a batch, one every third), and so it does
    resumed from a whole-ensemble checkpoint (each member's average and trained weights come back)."""
    average = lambda: [EMAWeightAveraging(decay=0.7)]  # noqa: E731
    solo = solo_fits(extra=average)
    strategy, _ = group_fit(callbacks=average())
    assert_same_members(states(strategy.ensemble.members), states(m for m, _ in solo))
    assert not torch.allclose(solo_fits()[0][0].head.weight, solo[0][0].head.weight)  # the average is not the trained weights
    solo = solo_fits(resume_from_epoch=1, root=tmp_path, extra=average)
    strategy, _ = group_fit(resume_from_epoch=1, root=tmp_path, callbacks=average())
    assert_same_members(states(strategy.ensemble.members), states(m for m, _ in solo))


class BodyFromEpochOne(TwoOptimizers):
    """``TwoOptimizers`` whose body optimizer starts with the BatchNorm only: its first layer is fine-tuned from epoch 1."""

    def configure_optimizers(self):
        optimizers, schedulers = super().configure_optimizers()
        optimizers[0] = torch.optim.Adam(self.body[1].parameters(), lr=0.01)
        schedulers[0] = torch.optim.lr_scheduler.StepLR(optimizers[0], step_size=1, gamma=schedulers[0].gamma)
        return optimizers, schedulers


class UnfreezeFirstLayer(BaseFinetuning):
    """Freezes the body's first layer, and adds it to the body's optimizer at epoch 1 with a rate of its own."""

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.body[0])

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == 1 and isinstance(optimizer, torch.optim.Adam):  # the body's (the head's is SGD)
            self.unfreeze_and_add_param_group(pl_module.body[0], optimizer, lr=0.005)


def test_fine_tuning_adds_to_each_members_own_optimizer_under_manual_optimization(in_a_group, tmp_path):
    """Your ``BaseFinetuning`` freezes each member's layer and adds it to the member's own optimizer (the one it names):
    every member ends where its own fit ends, the layer trained from epoch 1 on, and so after resuming from epoch 1."""
    pl.seed_everything(SEED, verbose=False)
    initial = BodyFromEpochOne().body[0].weight.detach().clone()
    solo = solo_fits(extra=lambda: [UnfreezeFirstLayer()], module=BodyFromEpochOne)
    strategy, _ = group_fit(callbacks=[UnfreezeFirstLayer()], module=BodyFromEpochOne)
    assert_same_members(states(strategy.ensemble.members), states(m for m, _ in solo))
    assert not torch.allclose(strategy.ensemble.members[0].body[0].weight, initial)  # it trained once unfrozen
    assert len(solo[0][1].optimizers[0].param_groups) == 2
    solo = solo_fits(resume_from_epoch=1, root=tmp_path, extra=lambda: [UnfreezeFirstLayer()], module=BodyFromEpochOne)
    strategy, _ = group_fit(resume_from_epoch=1, root=tmp_path, callbacks=[UnfreezeFirstLayer()], module=BodyFromEpochOne)
    assert_same_members(states(strategy.ensemble.members), states(m for m, _ in solo))


def test_stochastic_weight_averaging_keeps_manual_optimization_in_threads(monkeypatch, caplog):
    """``StochasticWeightAveraging`` schedules a group's one stacked optimizer (``SWALR``): with it, a module under manual
    optimization trains its members in threads, and the info line says why."""
    started = _count_threads(monkeypatch)
    strategy = HQDEStrategy(num_members=2, sync="none", seed=SEED)
    trainer = quiet_trainer(strategy=strategy, max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[StochasticWeightAveraging(swa_lrs=0.01)])
    with caplog.at_level("INFO"):
        trainer.fit(GroupManualDigits(), datamodule=SeededDigits())
    assert started
    assert "manual optimization, and ['StochasticWeightAveraging'] act on a group's one stacked optimizer" in caplog.text


class GroupManualDigits(ManualDigits):
    """``ManualDigits`` without its Monte Carlo dropout hook: a member group runs it."""

    on_validation_model_eval = pl.LightningModule.on_validation_model_eval


#: HQDE's own callbacks, each acting on what a member's own optimizer steps: its weights after the step, its gradients
#: before it, the gradients a sync's bit widths follow, what a Byzantine member sends
HQDE_CALLBACKS = {
    "none": lambda: [],
    "noise-weights": lambda: [QuantumNoise(scale=0.05)],
    "noise-gradients": lambda: [QuantumNoise(scale=0.5, target="gradients", schedule="linear")],
    "quantization": lambda: [AdaptiveQuantization(base_bits=4, warmup_syncs=0)],
    "byzantine": lambda: [ByzantineMembers(members=[1], attack="scale", scale=3.0)],
}


@pytest.mark.parametrize("callbacks", list(HQDE_CALLBACKS))
def test_a_group_under_manual_optimization_syncs_and_draws_as_member_threads_do(callbacks, monkeypatch):
    """With elastic syncs, input noise and dropout, and each of HQDE's callbacks, the members of a group end where the
    members trained in threads (one fit each, as member actors) end: same random numbers, same consensus at every sync.
    (The loaders carry their generators and no validation runs; validation loaders without one, whose draws a group makes
    from each member's stream, are ``test_groups.py``'s.)"""
    threads = _count_threads(monkeypatch)
    ends = {}
    for name, module in (("group", GroupManualDigits), ("threads", ManualDigits)):
        strategy = HQDEStrategy(num_members=MEMBERS, sync="elastic", sync_strength=0.5, seed=11, aggregator="geometric_median")
        trainer = quiet_trainer(strategy=strategy, max_epochs=2, limit_train_batches=6, limit_val_batches=0, callbacks=HQDE_CALLBACKS[callbacks]())
        torch.manual_seed(0)  # the members' shared initial weights (elastic sync) are the module's
        trainer.fit(module(), datamodule=SeededDigits())
        ends[name] = (strategy, trainer)
        assert len(threads) == (name == "threads")
    (group, group_trainer), (threads, threads_trainer) = ends["group"], ends["threads"]
    assert_same_members([m.state_dict() for m in group.ensemble.members], [m.state_dict() for m in threads.ensemble.members], atol=1e-6)
    assert [h["member_weights"] for h in group.sync_history] == [h["member_weights"] for h in threads.sync_history]
    assert len(group.sync_history) == 2
    if callbacks == "byzantine":  # the geometric median outvoted the member that sent its weights scaled
        assert all(h["member_weights"][1] < 0.05 for h in group.sync_history)
    for name in (n for n in threads_trainer.callback_metrics if n.startswith("member_") and ("noise" in n or "quant" in n)):
        torch.testing.assert_close(group_trainer.callback_metrics[name], threads_trainer.callback_metrics[name])


class ManualConvNet(ConvNet):
    """``ConvNet``'s step and SGD update under manual optimization."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


def test_under_manual_optimization_auto_times_channels_last_convolutions_and_members_still_train_as_alone(in_a_group, caplog):
    """``vectorize="auto"`` times the looped step with the members' convolution weights as they are and laid out
    channels-last (vmap cannot run a step that makes its own updates), switching layouts under the members' own optimizers.
    Channels-last convolutions round differently (see ``test_groups.py``), hence the tolerance; a lost update or momentum
    moves weights by more than 1e-2."""
    hparams = dict(optimizer="sgd")
    with caplog.at_level(logging.INFO):
        group = group_states(hparams, "auto", ManualConvNet)
    assert "ms/step loop, channels-last" in caplog.text and "with torch.func.vmap" not in caplog.text
    solo = solo_states(hparams, ManualConvNet)
    for i, (g, s) in enumerate(zip(group, solo)):
        for key in s:
            torch.testing.assert_close(g[key], s[key], rtol=0, atol=2e-3, msg=lambda m, i=i, key=key: f"member {i} {key}: {m}")


def test_group_actors_train_a_manual_module_as_a_group_in_the_driver_does(ray_session):
    """``members_per_worker=2`` (two Ray actors, 2 and 1 members) ends with the members of one group in this process."""
    ends = {}
    for members_per_worker in ("auto", 2):
        strategy = HQDEStrategy(num_members=MEMBERS, sync="elastic", sync_strength=0.5, seed=11, members_per_worker=members_per_worker)
        trainer = quiet_trainer(strategy=strategy, max_epochs=2, limit_train_batches=6, limit_val_batches=0)
        torch.manual_seed(0)
        trainer.fit(GroupManualDigits(), datamodule=SeededDigits())
        assert trainer.global_step == 2 * 6
        ends[members_per_worker] = [m.state_dict() for m in strategy.ensemble.members]
    assert_same_members(ends["auto"], ends[2], atol=1e-6)
