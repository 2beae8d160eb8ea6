"""Member diversity and Lightning conformance: own data order, own initialisation, clone guard,
``prepare_data`` once, the Tuner in the driver. Real fits on bundled digits in Ray actors."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder
from lightning.pytorch.tuner import Tuner
from models import DigitsDataModule, DigitsModule, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, WeightedRandomSampler

import hqde_lightning
from hqde_lightning import Ensemble, HQDEStrategy


def _trainer(strategy: HQDEStrategy, tmp_path, **kwargs) -> pl.Trainer:
    return quiet_trainer(strategy=strategy, default_root_dir=str(tmp_path), **kwargs)


def _digits() -> DigitsDataModule:
    dm = DigitsDataModule()
    dm.setup("fit")
    return dm


def _min_member_distance(ensemble: Ensemble) -> float:
    flats = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in ensemble.members]
    return min(float((a - b).norm()) for a, b in itertools.combinations(flats, 2))


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_seeded_shuffle_loader_trains_distinct_members(ray_session, tmp_path):
    """The issue's case: a loader with a fixed generator and sync='none' used to train N identical models."""
    dm = _digits()
    loader = DataLoader(dm.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    strategy = HQDEStrategy(num_members=2, sync="none", seed=5)
    assert strategy.member_init == "independent"
    trainer = _trainer(strategy, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(DigitsModule(), train_dataloaders=loader)
    assert not [w for w in caught if "identical weights" in str(w.message)]
    assert _min_member_distance(strategy.ensemble) > 0.1
    x, y = dm.test.tensors
    with torch.no_grad():
        members = [m(x).softmax(-1) for m in strategy.ensemble.members]
        ensemble = strategy.ensemble.predict_proba(x)
    assert all(float((ensemble - p).abs().max()) > 1e-3 for p in members), "the ensemble must differ from every member"
    member_nll = [F.nll_loss(p.log(), y).item() for p in members]
    assert F.nll_loss(ensemble.log(), y).item() < max(member_nll)


@pytest.mark.parametrize(
    "make_loader",
    [
        lambda ds: DataLoader(ds, batch_size=64, shuffle=True, generator=_seeded()),
        lambda ds: DataLoader(ds, batch_size=64, sampler=SubsetRandomSampler(range(len(ds)), generator=_seeded())),
        lambda ds: DataLoader(ds, batch_size=64, sampler=WeightedRandomSampler(torch.ones(len(ds)), len(ds), generator=_seeded())),
    ],
    ids=["shuffle-generator", "subset-random", "weighted-random"],
)
def test_each_member_gets_its_own_order_from_seeded_samplers(ray_session, tmp_path, make_loader):
    """Shared initial weights: only the data order can make the members differ."""
    strategy = HQDEStrategy(num_members=2, sync="none", member_init="shared", seed=5)
    _trainer(strategy, tmp_path).fit(DigitsModule(), train_dataloaders=make_loader(_digits().train))
    assert _min_member_distance(strategy.ensemble) > 0.1


def test_bagging_still_draws_bootstrap_samples_with_a_seeded_loader(ray_session, tmp_path):
    loader = DataLoader(_digits().train, batch_size=64, shuffle=True, generator=_seeded())
    strategy = HQDEStrategy(num_members=2, sync="none", member_init="shared", bagging=True, seed=5)
    trainer = _trainer(strategy, tmp_path)
    trainer.fit(DigitsModule(), train_dataloaders=loader)
    assert _min_member_distance(strategy.ensemble) > 0.1
    assert trainer.global_step == 19


class _FixedOrder(torch.utils.data.Sampler):
    """A custom sampler without a ``generator`` attribute: HQDE cannot re-seed it."""

    def __init__(self, n: int) -> None:
        self.order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __iter__(self):
        return iter(self.dataset)


@pytest.mark.parametrize(
    ("make_loader", "message"),
    [
        (lambda ds: DataLoader(ds, batch_size=64, sampler=_FixedOrder(len(ds))), "sampler _FixedOrder has no `generator` attribute"),
        (lambda ds: DataLoader(_Stream(ds), batch_size=64), "the training dataset is iterable \\(_Stream\\)"),
    ],
    ids=["custom-sampler", "iterable-dataset"],
)
def test_orders_hqde_cannot_reseed_are_named_once(ray_session, tmp_path, make_loader, message):
    strategy = HQDEStrategy(num_members=2, sync="none", seed=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(strategy, tmp_path, limit_train_batches=4).fit(DigitsModule(), train_dataloaders=make_loader(_digits().train))
    assert len([w for w in caught if re.search(message, str(w.message))]) == 1


def test_identical_members_are_reported_after_the_first_epoch(ray_session, tmp_path):
    loader = DataLoader(_digits().train, batch_size=64, shuffle=False)
    strategy = HQDEStrategy(num_members=3, sync="none", member_init="shared", seed=5)
    with pytest.warns(UserWarning, match=r"members \[0, 1, 2\] hold identical weights after epoch 0.*member_init='shared'"):
        _trainer(strategy, tmp_path).fit(DigitsModule(), train_dataloaders=loader)
    assert _min_member_distance(strategy.ensemble) == 0.0


def test_independent_init_rebuilds_members_from_hyperparameters(ray_session, tmp_path):
    loader = DataLoader(_digits().train, batch_size=64, shuffle=False)
    strategy = HQDEStrategy(num_members=2, sync="none", seed=5)
    model = DigitsModule()
    initial = model.net[0].weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(strategy, tmp_path).fit(model, train_dataloaders=loader)
    assert not [w for w in caught if "reset_parameters" in str(w.message) or "identical weights" in str(w.message)]
    assert _min_member_distance(strategy.ensemble) > 0.1
    assert all(float((m.net[0].weight.detach() - initial).norm()) > 1.0 for m in strategy.ensemble.members), "members start from fresh weights"


class _NoHyperparameters(DigitsModule):
    """Does not call ``save_hyperparameters``, and owns a parameter without ``reset_parameters``."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.bias

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_independent_init_falls_back_to_reset_parameters(ray_session, tmp_path):
    loader = DataLoader(_digits().train, batch_size=64, shuffle=False)
    strategy = HQDEStrategy(num_members=2, sync="none", member_init="independent", seed=5)
    with pytest.warns(UserWarning, match=r"did not call `save_hyperparameters\(\)`.*reset_parameters.*Parameters of \['_NoHyperparameters'\]"):
        _trainer(strategy, tmp_path, limit_val_batches=0).fit(_NoHyperparameters(), train_dataloaders=loader)
    assert _min_member_distance(strategy.ensemble) > 0.1


class _CountingDataModule(DigitsDataModule):
    def __init__(self, log_path: str) -> None:
        super().__init__()
        self.log_path = log_path

    def prepare_data(self) -> None:
        with open(self.log_path, "a") as f:
            f.write("prepare_data\n")


def test_prepare_data_runs_once_in_the_driver(ray_session, tmp_path):
    log = tmp_path / "calls.txt"
    strategy = HQDEStrategy(num_members=3, sync="elastic", seed=5)
    _trainer(strategy, tmp_path, limit_train_batches=2, limit_val_batches=1).fit(DigitsModule(), datamodule=_CountingDataModule(str(log)))
    assert log.read_text().splitlines() == ["prepare_data"]


_MULTI_NODE_FIT = """
import lightning.pytorch as pl
from ray.cluster_utils import Cluster
from models import DigitsDataModule, DigitsModule, quiet_trainer
from hqde_lightning import HQDEStrategy

class Counting(DigitsDataModule):
    def prepare_data(self):
        with open({log!r}, "a") as f:
            f.write("prepare_data\\n")

cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
cluster.add_node(num_cpus=1)
try:
    strategy = HQDEStrategy(num_members=3, ray_address=cluster.address, resources_per_member={{"num_cpus": 0.5}}, seed=5)
    trainer = pl.Trainer(strategy=strategy, max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(DigitsModule(), datamodule=Counting())
    print("members", len(strategy.ensemble.members))
finally:
    import ray
    ray.shutdown()
    cluster.shutdown()
"""


def test_prepare_data_runs_once_per_node_of_a_cluster(tmp_path):
    """Ray's multi-node test cluster (two raylets on this machine), 3 members: once on the driver's node and once on the other."""
    log = tmp_path / "calls.txt"
    package_root = os.path.dirname(os.path.dirname(hqde_lightning.__file__))
    # the cluster's workers import the test data module (tests/models.py) and the digits it wraps (examples/)
    examples = os.path.join(package_root, "examples")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.path.dirname(__file__), examples, os.environ.get("PYTHONPATH", "")]))
    script = _MULTI_NODE_FIT.format(log=str(log))
    done = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert "members 3" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]
    assert log.read_text().splitlines() == ["prepare_data", "prepare_data"]


def test_lr_find_tunes_in_the_driver(ray_session, tmp_path):
    model = DigitsModule()
    trainer = _trainer(HQDEStrategy(num_members=2, seed=5), tmp_path)
    finder = Tuner(trainer).lr_find(model, datamodule=DigitsDataModule(), num_training=15)
    assert finder is not None and finder.suggestion() is not None
    assert model.hparams.lr == pytest.approx(finder.suggestion())


def test_scale_batch_size_tunes_in_the_driver(ray_session, tmp_path):
    dm = DigitsDataModule()
    trainer = _trainer(HQDEStrategy(num_members=2, seed=5), tmp_path)
    found = Tuner(trainer).scale_batch_size(DigitsModule(), datamodule=dm, mode="power", init_val=4, max_trials=3, steps_per_trial=2)
    assert found == 16 and dm.batch_size == 16
    trainer.fit(DigitsModule(), datamodule=dm)  # the ensemble fit that follows trains with the tuned batch size
    assert trainer.global_step == 75  # 1200 / 16


def test_finder_callbacks_tune_once_in_the_driver_then_stay(ray_session, tmp_path):
    """``Trainer(callbacks=[LearningRateFinder(), BatchSizeFinder()])``: tuned once on your module, every member trains with the values."""
    model, dm = DigitsModule(), DigitsDataModule()
    lr_finder = LearningRateFinder(num_training_steps=15)
    size_finder = BatchSizeFinder(mode="power", init_val=4, max_trials=3, steps_per_trial=2)
    trainer = _trainer(HQDEStrategy(num_members=2, seed=5, sync="none"), tmp_path, callbacks=[lr_finder, size_finder])
    trainer.fit(model, datamodule=dm)
    suggestion = lr_finder.optimal_lr.suggestion()
    assert suggestion is not None and model.hparams.lr == pytest.approx(suggestion) and suggestion != DigitsModule().hparams.lr
    # members that tuned for themselves would each have found their own learning rate
    assert [m.hparams.lr for m in trainer.strategy.ensemble.members] == [model.hparams.lr] * 2
    assert size_finder.optimal_batch_size == dm.batch_size == 16 and trainer.global_step == 75  # 1200 / 16
    assert float(trainer.callback_metrics["val_acc"]) > 0.8
    assert trainer.callbacks[:2] == [lr_finder, size_finder] and not lr_finder._early_exit and not size_finder._early_exit


def test_compiled_module_trains_its_members_uncompiled_and_evaluates_the_ensemble_uncompiled(ray_session, tmp_path):
    """``trainer.fit(torch.compile(model))``, as Lightning's docs show it: the members train the module uncompiled, with a
    warning. ``trainer.test`` evaluates the ensemble with the steps uncompiled (compiled, they traced the ensemble's own
    code: dozens of graph breaks, seconds per call) and your module keeps its compiled functions."""
    from torch._dynamo.utils import counters

    model = DigitsModule()
    compiled = torch.compile(model, backend="eager")
    trainer = _trainer(HQDEStrategy(num_members=2, seed=5, sync="none"), tmp_path)
    with pytest.warns(UserWarning, match="members train `DigitsModule` uncompiled"):
        trainer.fit(compiled, datamodule=DigitsDataModule())
    assert model._compiler_ctx is not None  # your module keeps its compiled functions
    assert float(trainer.callback_metrics["member_0/val_acc"]) > 0.8 and float(trainer.callback_metrics["member_1/val_acc"]) > 0.8
    counters.clear()
    assert trainer.test(compiled, datamodule=DigitsDataModule(), verbose=False)[0]["ensemble/test_acc"] > 0.8
    assert sum(counters["graph_break"].values()) == 0
    kept = {name: model.__dict__[name] for name in ("forward", "test_step")}  # compiled by Lightning's `from_compiled`
    assert all(getattr(function, "_torchdynamo_orig_callable", None) is not None for function in kept.values())
    assert trainer.test(model, datamodule=DigitsDataModule(), verbose=False)[0]["ensemble/test_acc"] > 0.8
    assert sum(counters["graph_break"].values()) == 0 and {name: model.__dict__[name] for name in kept} == kept
