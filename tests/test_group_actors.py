"""Member groups inside Ray actors (``members_per_worker=k``): the same members as one group in the driver.

Four members in two actors of two train exactly as the four in one embedded group (the
coordinator reduces each round over both actors), log every member, write checkpoints holding
all four, restart a killed actor's members from their snapshots, let early-stopped members leave
the rounds, and fall back to one member per actor for a module a group cannot run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import ray
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import DigitsDataModule, DigitsModule, quiet_trainer
from test_groups import LBFGSModule, SeededDigits

import hqde_lightning.resources as resources
from hqde_lightning import HQDEStrategy
from hqde_lightning.checkpoint import HQDE_KEY, load_checkpoint_file


def _fit(root: Path, members_per_worker, epochs: int = 2, sync: str = "elastic", callbacks=(), ckpt_path=None, datamodule=None, **kwargs):
    strategy = HQDEStrategy(num_members=4, sync=sync, seed=0, members_per_worker=members_per_worker, vectorize=False, **kwargs)
    trainer = quiet_trainer(strategy=strategy, max_epochs=epochs, callbacks=list(callbacks), default_root_dir=str(root), enable_checkpointing=True)
    pl.seed_everything(0, verbose=False)
    trainer.fit(DigitsModule(), datamodule=datamodule or SeededDigits(), ckpt_path=ckpt_path)
    return strategy, trainer


def _assert_same_members(a: HQDEStrategy, b: HQDEStrategy) -> None:
    assert a.ensemble.member_ids == b.ensemble.member_ids
    for x, y in zip(a.ensemble.members, b.ensemble.members):
        for key, value in x.state_dict().items():
            torch.testing.assert_close(y.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_two_group_actors_train_the_members_as_one_embedded_group(ray_session, tmp_path):
    embedded, _ = _fit(tmp_path / "embedded", "auto")
    logger = CSVLogger(str(tmp_path / "logs"), name="run")
    every_epoch = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1)
    strategy = HQDEStrategy(num_members=4, sync="elastic", seed=0, members_per_worker=2, vectorize=False)
    trainer = pl.Trainer(strategy=strategy, max_epochs=2, logger=logger, callbacks=[every_epoch], enable_progress_bar=False, enable_model_summary=False)
    pl.seed_everything(0, verbose=False)
    trainer.fit(DigitsModule(), datamodule=SeededDigits())

    assert sorted(set(strategy._launcher.member_nodes)) == [0, 1, 2, 3]
    assert [r.members for r in strategy.sync_history] == [[0, 1, 2, 3]] * 2, "each round is reduced over both actors' members"
    _assert_same_members(embedded, strategy)
    assert trainer.current_epoch == 2 and strategy.excluded_members == []

    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {f"member_{i}/train_loss_epoch" for i in range(4)} <= set(header)
    assert {f"member_{i}/val_acc" for i in range(4)} <= set(header) and "epoch" in header
    assert "ensemble/sync_round" in header and "member_3/hqde/distance_to_consensus" in header

    section = load_checkpoint_file(str(tmp_path / "ckpt" / "epoch=0-step=19.ckpt"))[HQDE_KEY]
    assert [entry["hqde_member"]["index"] for entry in section["members"]] == [0, 1, 2, 3], "the writer holds the other actor's members too"
    assert all(entry["hqde_member"]["round"] == 0 for entry in section["members"])


def test_a_group_actor_checkpoint_resumes_in_the_driver(ray_session, tmp_path):
    every_epoch = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1)
    _fit(tmp_path / "first", 2, epochs=1, callbacks=[every_epoch])
    path = str(tmp_path / "ckpt" / "epoch=0-step=19.ckpt")
    embedded, embedded_trainer = _fit(tmp_path / "embedded", "auto", ckpt_path=path)
    actors, actors_trainer = _fit(tmp_path / "actors", 2, ckpt_path=path)
    assert embedded_trainer.current_epoch == actors_trainer.current_epoch == 2
    assert [r.round for r in embedded.sync_history] == [r.round for r in actors.sync_history] == [0, 1]  # the resumed fit's round first (since 2026-11-29)
    _assert_same_members(embedded, actors)


class KillingDigits(DigitsModule):
    """Kills its own Ray actor (once, marked by a file) in the middle of the second epoch of a group of two, looped."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1  # one call per member and step: 2 x 19 per epoch
        if self.calls == 50 and ray.get_runtime_context().get_actor_id() is not None and not os.path.exists(self.marker):
            Path(self.marker).touch()
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
        return super().training_step(batch, batch_idx)


def test_a_killed_group_actor_restarts_its_members_from_their_snapshots(ray_session, tmp_path):
    marker = tmp_path / "killed"
    strategy = HQDEStrategy(num_members=4, sync="elastic", seed=4, members_per_worker=2, vectorize=False)
    trainer = pl.Trainer(strategy=strategy, max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"the actor of members \[\d, \d\] died .* restarting it"):
        trainer.fit(KillingDigits(str(marker)), datamodule=DigitsDataModule())
    assert marker.exists(), "an actor really was killed"
    assert trainer.current_epoch == 3 and strategy.dropped_members == []
    assert [r.members for r in strategy.sync_history] == [[0, 1, 2, 3]] * 3
    (results,) = trainer.test(trainer.lightning_module, datamodule=DigitsDataModule(), verbose=False)
    assert min(results[f"member_{i}/test_acc"] for i in range(4)) > 0.85, "the restarted members are trained"


def test_early_stopped_members_leave_the_rounds_across_group_actors(ray_session, tmp_path):
    first, first_trainer = _fit(tmp_path / "first", "auto", epochs=1, datamodule=DigitsDataModule())
    accuracy = [float(first_trainer.callback_metrics[f"member_{i}/val_acc"]) for i in range(4)]
    threshold = (min(accuracy) + max(accuracy)) / 2
    stopped = [i for i, a in enumerate(accuracy) if a > threshold]  # EarlyStopping's stopping_threshold is strict
    assert 0 < len(stopped) < 4
    stopping = [EarlyStopping("val_acc", mode="max", stopping_threshold=threshold)]
    embedded, _ = _fit(tmp_path / "embedded", "auto", epochs=3, callbacks=stopping, datamodule=DigitsDataModule())
    actors, _ = _fit(tmp_path / "actors", 2, epochs=3, callbacks=[EarlyStopping("val_acc", mode="max", stopping_threshold=threshold)], datamodule=DigitsDataModule())
    rounds = [record.members for record in actors.sync_history]
    assert rounds == [record.members for record in embedded.sync_history]
    assert rounds[0] == [0, 1, 2, 3] and rounds[1] == [i for i in range(4) if i not in stopped]
    _assert_same_members(embedded, actors)


def test_a_module_groups_cannot_run_trains_one_member_per_actor(ray_session, caplog):
    strategy = HQDEStrategy(num_members=2, sync="none", seed=0, members_per_worker=2)
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    with caplog.at_level(logging.INFO):
        trainer.fit(LBFGSModule(), datamodule=DigitsDataModule())
    assert "one Ray actor each: the optimizer LBFGS is not element-wise" in caplog.text
    assert strategy.ensemble is not None and strategy.ensemble.num_members == 2


def _planned(monkeypatch, members_per_worker, num_members: int = 5, nodes: int = 1, per_member=None, gpus: int = 0) -> list[list[int]]:
    """``worker_members`` for a strategy with these settings, on ``nodes`` CPU nodes or with ``gpus`` GPUs."""
    monkeypatch.setattr(resources, "alive_nodes", lambda: [SimpleNamespace(resources={"CPU": 2.0})] * nodes + [SimpleNamespace(resources={"CPU": 0.0})])
    if gpus:
        monkeypatch.setattr(resources, "CUDAAccelerator", CPUAccelerator)  # the CPU accelerator stands in for CUDA
        monkeypatch.setattr(resources, "available_gpus", lambda strategy, devices: gpus)
    strategy = SimpleNamespace(
        num_members=num_members, members_per_worker=members_per_worker, resources_per_member=per_member or {},
        accelerator=CPUAccelerator(), parallel_devices=[torch.device("cpu")], ray_address=None,
    )
    return resources.worker_members(strategy)


def test_worker_members_split_the_members(monkeypatch):
    assert _planned(monkeypatch, 2) == [[0, 1], [2, 3], [4]]
    assert _planned(monkeypatch, 8) == [[0, 1, 2, 3, 4]]
    assert _planned(monkeypatch, 1) == [[0], [1], [2], [3], [4]]
    assert _planned(monkeypatch, "auto", nodes=2) == [[0, 1, 2], [3, 4]], "CPUs: one actor per node"
    assert _planned(monkeypatch, "auto", nodes=2, per_member={"num_cpus": 1}) == [[0], [1], [2], [3], [4]]
    assert _planned(monkeypatch, "auto", num_members=8, gpus=2) == [[0, 1, 2, 3], [4, 5, 6, 7]], "one actor per GPU"
    assert _planned(monkeypatch, "auto", num_members=3, gpus=4) == [[0], [1], [2]]


def test_group_actor_requests_scale_the_per_member_resources(monkeypatch):
    """An actor of k members asks for k times each member's CPUs, memory and custom resources; actors that fit nowhere fail early."""
    from hqde_lightning.placement import NodeCapacity

    node = NodeCapacity("n1", {"CPU": 4.0, "memory": 8e9, "disk": 4.0})
    monkeypatch.setattr(resources, "alive_nodes", lambda: [node])
    per_member = {"num_cpus": 0.5, "memory": 1e9, "resources": {"disk": 1.0}}
    strategy = SimpleNamespace(resources_per_member=per_member, accelerator=CPUAccelerator(), ray_address="cluster")
    requests, threads = resources.worker_options(strategy, [[0, 1], [2]])
    assert requests == [{"num_cpus": 1.0, "memory": 2e9, "resources": {"disk": 2.0}}, {"num_cpus": 0.5, "memory": 1e9, "resources": {"disk": 1.0}}]
    assert threads == [1, 1]
    with pytest.raises(MisconfigurationException, match=r"cannot place its 2 actors of \[4, 1\] members"):
        resources.worker_options(strategy, [[0, 1, 2, 3], [4]])  # 4 + 1 disk on a node of 4


@pytest.mark.parametrize("value", [0, -1, 1.5, "two"])
def test_bad_members_per_worker(value):
    with pytest.raises(ValueError, match="members_per_worker"):
        HQDEStrategy(num_members=4, members_per_worker=value)


def test_members_per_worker_refuses_gpu_fractions():
    with pytest.raises(MisconfigurationException, match=r"resources_per_member=\{'num_gpus': 0.5\}.*one whole GPU"):
        HQDEStrategy(num_members=4, members_per_worker=2, resources_per_member={"num_gpus": 0.5})


@pytest.mark.gpu
def test_a_group_actor_trains_its_members_on_one_whole_gpu(ray_session, tmp_path):
    strategy = HQDEStrategy(num_members=4, sync="elastic", seed=0, members_per_worker=4, vectorize=True)
    trainer = quiet_trainer(strategy=strategy, accelerator="gpu", devices=1, max_epochs=2, default_root_dir=str(tmp_path))
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    assert [r.members for r in strategy.sync_history] == [[0, 1, 2, 3]] * 2
    (results,) = trainer.test(trainer.lightning_module, datamodule=DigitsDataModule(), verbose=False)
    assert results["ensemble/test_acc"] > 0.85
