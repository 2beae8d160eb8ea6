"""The driver/member split: a single-device strategy inside each member, typed events, a frozen facade configuration."""

from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from models import DigitsDataModule, DigitsModule

from hqde_lightning import HQDEStrategy
from hqde_lightning.compat import SystemConfig
from hqde_lightning.events import SyncRecord
from hqde_lightning.forwarder import EventForwarder
from hqde_lightning.progress import EnsembleProgress


class RecordStrategy(pl.Callback):
    """Writes what the member's ``trainer.strategy`` is into ``folder/member_{i}.json``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_start(self, trainer, pl_module):
        strategy = trainer.strategy
        record = {
            "type": type(strategy).__name__,
            "single_device": isinstance(strategy, SingleDeviceStrategy),
            "hqde": isinstance(strategy, HQDEStrategy),
            "launcher": strategy.launcher is not None,
            "device": str(strategy.root_device),
        }
        with open(os.path.join(self.folder, f"member_{strategy.member_index}.json"), "w") as f:
            json.dump(record, f)


@pytest.fixture(scope="module")
def fit(ray_session, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("architecture"))
    strategy = HQDEStrategy(num_members=2, sync="elastic", seed=3, members_per_worker=1)  # one member actor each
    trainer = pl.Trainer(
        strategy=strategy, max_epochs=2, limit_train_batches=3, limit_val_batches=1, callbacks=[RecordStrategy(folder)],
        default_root_dir=folder, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    return trainer, strategy, folder


def test_members_train_with_a_single_device_strategy(fit):
    trainer, strategy, folder = fit
    for index in range(2):
        with open(os.path.join(folder, f"member_{index}.json")) as f:
            record = json.load(f)
        assert record == {"type": "MemberStrategy", "single_device": True, "hqde": False, "launcher": False, "device": "cpu"}
    assert trainer.strategy is strategy, "the driver's trainer keeps the HQDEStrategy"


def test_sync_history_holds_frozen_records(fit):
    _, strategy, _ = fit
    assert len(strategy.sync_history) == 2
    record = strategy.sync_history[0]
    assert isinstance(record, SyncRecord)
    assert record.members == record["members"] == [0, 1] and record.round == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.round = 5
    with pytest.raises(KeyError):
        record["no_such_field"]


def test_forwarder_refuses_events_it_does_not_know():
    forwarder = EventForwarder(trainer=SimpleNamespace(loggers=[]), strategy=None, progress=EnsembleProgress(1, enabled=False))
    with pytest.raises(TypeError, match="unknown event"):
        forwarder.handle([("progress", 0, (0, 2, 10, 0.5))])


def test_system_config_is_frozen_and_rebuilds_by_name():
    config = SystemConfig(
        model_class=DigitsModule, model_kwargs=None, num_workers=2, quantization_config={"base_bits": 8}, aggregation_config=None,
        loss_fn=None, optimizer=torch.optim.SGD, optimizer_kwargs=None, strategy_kwargs={"seed": 1}, trainer_kwargs={},
    )
    assert config.optimizer_kwargs == {"lr": 1e-3} and config.model_kwargs == {} and config.aggregation_config == {}
    assert SystemConfig(**config.as_dict()) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_workers = 3
    with pytest.raises(ValueError, match="num_workers"):
        SystemConfig(**{**config.as_dict(), "num_workers": 0})
