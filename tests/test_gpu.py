"""GPU placement (run where CUDA exists; skipped elsewhere)."""

from __future__ import annotations

import logging
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import DigitsDataModule, DigitsModule
from test_member_threads import ManualDigits

import hqde_lightning.actor_fit as actor_fit
from hqde_lightning import HQDEStrategy


class RecordDevice(pl.Callback):
    """Logs which physical GPU (Ray's CUDA_VISIBLE_DEVICES) and device type each member trained on."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "-1").split(",")[0]
        pl_module.log("gpu_id", float(visible))
        pl_module.log("on_cuda", float(pl_module.device.type == "cuda"))


@pytest.mark.gpu
def test_two_members_share_one_gpu(ray_session, tmp_path):
    strategy = HQDEStrategy(num_members=2, sync="elastic", seed=0, members_per_worker=1)
    trainer = pl.Trainer(
        strategy=strategy, accelerator="gpu", devices=1, max_epochs=2, callbacks=[RecordDevice()],
        default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
    )
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    metrics = trainer.callback_metrics
    assert float(metrics["member_0/on_cuda"]) == 1.0 and float(metrics["member_1/on_cuda"]) == 1.0
    assert float(metrics["member_0/gpu_id"]) == float(metrics["member_1/gpu_id"]), "both members on the same GPU"
    (results,) = trainer.test(trainer.lightning_module, datamodule=DigitsDataModule(), verbose=False)
    assert results["ensemble/test_acc"] > 0.8


@pytest.mark.gpu
def test_more_gpus_than_exist_rejected_at_trainer_time():
    gpus = torch.cuda.device_count()
    with pytest.raises(MisconfigurationException, match="GPUs, but only"):
        pl.Trainer(strategy=HQDEStrategy(num_members=gpus + 1, resources_per_member={"num_gpus": 1}), accelerator="gpu", devices=gpus)


class DeviceDigits(DigitsModule):
    """Logs whether its training step ran on CUDA (inside the group: per member, vectorized)."""

    def training_step(self, batch, batch_idx):
        self.log("on_cuda", float(self.device.type == "cuda"))
        return super().training_step(batch, batch_idx)


@pytest.mark.gpu
def test_vmap_and_loop_groups_agree_on_gpu(tmp_path):
    states = {}
    for vectorize in (True, False):
        strategy = HQDEStrategy(num_members=3, sync="none", seed=3, vectorize=vectorize)
        trainer = pl.Trainer(
            strategy=strategy, accelerator="gpu", devices=1, max_epochs=1, limit_val_batches=0, default_root_dir=str(tmp_path),
            logger=False, enable_progress_bar=False, enable_checkpointing=False,
        )
        trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
        states[vectorize] = [m.state_dict() for m in strategy.ensemble.members]
    for vmapped, looped in zip(states[True], states[False]):
        for key in looped:
            torch.testing.assert_close(vmapped[key].cpu(), looped[key].cpu(), rtol=1e-3, atol=1e-4)


class ManualDeviceDigits(ManualDigits):
    """Manual optimization with a hook a group cannot run (members in threads), logging whether its training step ran on CUDA."""

    def training_step(self, batch, batch_idx):
        self.log("on_cuda", float(self.device.type == "cuda"))
        super().training_step(batch, batch_idx)


class ManualGroupDeviceDigits(ManualDeviceDigits):
    """Manual optimization only (a member group: each member steps its own optimizer), logging whether it ran on CUDA."""

    on_validation_model_eval = pl.LightningModule.on_validation_model_eval


@pytest.mark.gpu
@pytest.mark.parametrize(
    "module, strategy_kwargs, min_accuracy",
    [(DeviceDigits, {"vectorize": True}, 0.85), (DeviceDigits, {"vectorize": False}, 0.85), (ManualGroupDeviceDigits, {}, 0.8), (ManualDeviceDigits, {}, 0.8)],
    ids=["group-vmap", "group-loop", "group-manual", "member-threads"],
)
def test_members_train_on_one_gpu_without_ray(monkeypatch, tmp_path, module, strategy_kwargs, min_accuracy):
    """A member group (vectorized or looped) or, for a module a group cannot run, member threads: all on the one GPU, no Ray."""

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a one-GPU fit")

    monkeypatch.setattr(actor_fit, "start_ray", no_ray)
    strategy = HQDEStrategy(num_members=3, sync="elastic", seed=0, **strategy_kwargs)
    trainer = pl.Trainer(
        strategy=strategy, accelerator="gpu", devices=1, max_epochs=2, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
    )
    trainer.fit(module(), datamodule=DigitsDataModule())
    assert all(float(trainer.callback_metrics[f"member_{i}/on_cuda"]) == 1.0 for i in range(3))
    assert [r.round for r in strategy.sync_history] == [0, 1]
    (results,) = trainer.test(trainer.lightning_module, datamodule=DigitsDataModule(), verbose=False)
    assert results["ensemble/test_acc"] > min_accuracy


class HostGathered(DigitsDataModule):
    """Digits with a batch hook (one that changes nothing): the group gathers the members' batches on the host, then moves them."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        return batch


@pytest.mark.gpu
def test_group_gathers_its_batches_on_the_gpu(tmp_path, caplog):
    """The training TensorDataset is copied to the GPU and the members' batches gathered there: the same members as gathered on the host."""
    states, told = {}, {}
    for datamodule in (DigitsDataModule, HostGathered):
        strategy = HQDEStrategy(num_members=3, sync="none", seed=3, vectorize=True)
        trainer = pl.Trainer(
            strategy=strategy, accelerator="gpu", devices=1, max_epochs=2, limit_val_batches=0, default_root_dir=str(tmp_path),
            logger=False, enable_progress_bar=False, enable_checkpointing=False,
        )
        caplog.clear()
        with caplog.at_level(logging.INFO):
            trainer.fit(DigitsModule(), datamodule=datamodule())
        told[datamodule] = caplog.text.count("the members' batches are gathered there")
        states[datamodule] = [m.state_dict() for m in strategy.ensemble.members]
    assert told == {DigitsDataModule: 1, HostGathered: 0}
    for on_gpu, on_host in zip(states[DigitsDataModule], states[HostGathered]):
        for key in on_host:
            torch.testing.assert_close(on_gpu[key].cpu(), on_host[key].cpu(), rtol=1e-5, atol=1e-6)
