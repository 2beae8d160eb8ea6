"""Bad input fails early, at ``HQDEStrategy(...)``, ``Trainer(...)`` or before any actor starts."""

from __future__ import annotations

import subprocess
import sys
import threading

import lightning.pytorch as pl
import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import DigitsDataModule, DigitsModule

from hqde_lightning import HQDEStrategy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_members": 0}, "num_members"),
        ({"num_members": 2.5}, "num_members"),
        ({"aggregator": "majority_vote"}, "aggregator='majority_vote'"),
        ({"aggregator": 3}, "aggregator"),
        ({"sync": "sometimes"}, "choose one of \\['none', 'elastic', 'replace'\\]"),
        ({"vectorize": "loop, channels_last"}, "choose one of \\['auto', True, False, 'vmap', 'loop', 'loop, backward per member', 'loop, channels-last'"),
        ({"sync_strength": 1.5}, "sync_strength"),
        ({"sync_strength": -0.1}, "sync_strength"),
        ({"sync_every_n_epochs": 0}, "sync_every_n_epochs"),
        ({"combine": "vote"}, "combine='vote'"),
        ({"score_mode": "best"}, "score_mode"),
        ({"seed": -1}, "seed"),
        ({"resources_per_member": {"cpus": 1}}, "unknown keys \\['cpus'\\]"),
        ({"resources_per_member": {"num_cpus": -1}}, "num_cpus"),
        ({"resources_per_member": {"num_gpus": 2}}, "a member trains on one device"),
        ({"ray_address": 6379}, "ray_address"),
        ({"bagging": "no"}, "`bagging` must be True or False"),
        ({"bagging": 1}, "`bagging` must be True or False"),
        ({"member_init": "random"}, "member_init='random'.*\\['independent', 'shared'\\]"),
        ({"score_metric": 5}, "score_metric=5"),
        ({"ray_init_kwargs": "x"}, "ray_init_kwargs='x'.*must be a dict"),
        ({"ray_init_kwargs": {"address": "auto"}}, "ray_address='auto'"),
        # member i draws from seed + i: Lightning refused 2**32 deep in `fit`, naming no parameter
        ({"seed": 2**32 - 1, "num_members": 2}, r"seed=4294967295.*<= 4294967294 with num_members=2"),
        ({"outlier_threshold": -1}, r"HQDEStrategy\(outlier_threshold=-1\)"),  # it named `threshold`
        # these reached Ray unchecked: a raw AttributeError at `Trainer(...)`, or Ray's own errors in `fit`
        ({"resources_per_member": {"resources": "x"}}, r"resources_per_member\['resources'\]` must be a dict"),
        ({"resources_per_member": {"resources": {"CPU": 1}}}, r"names Ray's own resources \['CPU'\]: give CPUs"),
        ({"resources_per_member": {"resources": {"accelerator": -1}}}, r"resources_per_member\['resources'\]\['accelerator'\]` must be finite and >= 0"),
    ],
)
def test_bad_strategy_arguments(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        HQDEStrategy(**kwargs)


def test_cpu_devices_above_one_rejected_at_trainer_time():
    with pytest.raises(MisconfigurationException, match="devices=2"):
        pl.Trainer(strategy=HQDEStrategy(num_members=2), accelerator="cpu", devices=2)


def test_num_nodes_rejected_at_trainer_time():
    with pytest.raises(MisconfigurationException, match="num_nodes"):
        pl.Trainer(strategy=HQDEStrategy(num_members=2), accelerator="cpu", num_nodes=2)


def test_gpus_on_cpu_accelerator_rejected_at_trainer_time():
    with pytest.raises(MisconfigurationException, match="num_gpus"):
        pl.Trainer(strategy=HQDEStrategy(num_members=2, resources_per_member={"num_gpus": 0.5}), accelerator="cpu")


def test_unreachable_ray_address_rejected_at_trainer_time():
    # in a fresh interpreter: this test session's own Ray instance would otherwise be reused
    code = (
        "import lightning.pytorch as pl\n"
        "from hqde_lightning import HQDEStrategy\n"
        "try:\n"
        "    pl.Trainer(strategy=HQDEStrategy(num_members=2, ray_address='127.0.0.1:1'), accelerator='cpu')\n"
        "except Exception as err:\n"
        "    print(type(err).__name__, err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "MisconfigurationException" in out
    assert "ray_address='127.0.0.1:1'" in out and "RAY_AUTH_MODE=token" in out


class _Unpicklable(DigitsModule):
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()


def test_unpicklable_module_named_before_actors_start(tmp_path):
    import ray

    trainer = pl.Trainer(strategy=HQDEStrategy(num_members=2), max_epochs=1, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False)
    started_before = ray.is_initialized()
    with pytest.raises(MisconfigurationException, match="`model.lock` \\(lock\\)"):
        trainer.fit(_Unpicklable(), datamodule=DigitsDataModule())
    assert ray.is_initialized() == started_before, "no Ray instance or actor may start for a module that cannot be shipped"


def test_member_init_default_follows_sync():
    assert HQDEStrategy(sync="none").member_init == "independent"
    assert HQDEStrategy(sync="elastic").member_init == "shared"
    assert HQDEStrategy(sync="replace").member_init == "shared"
    assert HQDEStrategy(sync="elastic", member_init="independent").member_init == "independent"


def test_missing_ckpt_path_rejected_before_ray_starts(tmp_path):
    import ray

    trainer = pl.Trainer(strategy=HQDEStrategy(num_members=2), max_epochs=1, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False)
    started_before = ray.is_initialized()
    missing = str(tmp_path / "nope.ckpt")
    with pytest.raises(MisconfigurationException, match="ckpt_path=.*nope.ckpt.*no such file"):
        trainer.fit(DigitsModule(), datamodule=DigitsDataModule(), ckpt_path=missing)
    assert ray.is_initialized() == started_before, "no Ray instance or actor may start for a checkpoint that does not exist"


def test_score_metric_never_logged_warns_naming_what_was_logged(ray_session, tmp_path):
    strategy = HQDEStrategy(num_members=2, sync="elastic", aggregator="superposition", score_metric="val_accuracy", seed=1)
    trainer = pl.Trainer(
        strategy=strategy, max_epochs=1, limit_train_batches=3, limit_val_batches=1, default_root_dir=str(tmp_path),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match="`score_metric='val_accuracy'` was never logged.*'val_acc'"):
        trainer.fit(DigitsModule(), datamodule=DigitsDataModule())


def test_ray_init_kwargs_that_ray_init_does_not_take_are_named():
    """Before, a typo reached `ray.init`, whose error read as an unreachable cluster (with a token-authentication hint)."""
    from hqde_lightning.ray_runtime import check_init_kwargs

    check_init_kwargs({"num_cpus": 2, "_temp_dir": "/tmp"})
    with pytest.raises(MisconfigurationException, match=r"keys `ray.init` does not take: \['num_cpu'\]. Its arguments are \[.*'num_cpus'"):
        check_init_kwargs({"num_cpu": 2})


def test_ray_init_kwargs_a_fit_in_this_process_does_not_use_are_warned_about():
    trainer = pl.Trainer(
        strategy=HQDEStrategy(num_members=2, ray_init_kwargs={"num_cpus": 1}), max_epochs=1, limit_train_batches=2, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match=r"`ray_init_kwargs` \(\['num_cpus'\]\) are not used: this fit trains its members in this process"):
        trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
