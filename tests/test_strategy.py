"""End-to-end: real Lightning fits of real members on bundled digits, in Ray actors."""

from __future__ import annotations

import csv
import gc
import glob
import itertools
import os
import sys
import threading
import types

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import DigitsDataModule, DigitsModule

from hqde_lightning import Ensemble, HQDEStrategy
from hqde_lightning.checkpoint import HQDE_KEY, load_checkpoint_file

MAX_EPOCHS = 3


def _trainer(strategy: HQDEStrategy, tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        strategy=strategy,
        max_epochs=MAX_EPOCHS,
        default_root_dir=str(tmp_path),
        logger=CSVLogger(str(tmp_path)),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def _member_distances(ensemble: Ensemble) -> list[float]:
    flats = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in ensemble.members]
    return [float((a - b).norm()) for a, b in itertools.combinations(flats, 2)]


@pytest.fixture(scope="module")
def fits(ray_session, tmp_path_factory):
    """One 3-member fit per sync mode (same seed, same data)."""
    out = {}
    for sync in ("none", "elastic", "replace"):
        tmp = tmp_path_factory.mktemp(f"fit_{sync}")
        strategy = HQDEStrategy(num_members=3, sync=sync, sync_strength=0.5, seed=7)
        trainer = _trainer(strategy, tmp)
        model = DigitsModule()
        dm = DigitsDataModule()
        trainer.fit(model, datamodule=dm)
        out[sync] = (trainer, strategy, model, dm, tmp)
    return out


def test_sync_modes_control_member_diversity(fits):
    distances = {sync: _member_distances(fits[sync][1].ensemble) for sync in fits}
    assert min(distances["none"]) > 0.1, "independent members must differ"
    assert max(distances["replace"]) < 1e-5, "replace leaves every member equal to the consensus"
    assert 1e-4 < max(distances["elastic"]) < min(distances["none"]), "elastic sits between none and replace"


def test_ensemble_beats_mean_member_on_test(fits):
    trainer, strategy, model, dm, _ = fits["none"]
    (results,) = trainer.test(model, datamodule=dm, verbose=False)
    member_accs = [results[f"member_{i}/test_acc"] for i in range(3)]
    member_nlls = [results[f"member_{i}/test_nll"] for i in range(3)]
    # averaging probabilities never does worse than the mean member in NLL (Jensen); accuracy on 300
    # images is too coarse to rank independently initialised members at ~95% against their ensemble
    assert results["ensemble/test_nll"] < sum(member_nlls) / 3
    assert results["ensemble/test_acc"] >= min(member_accs)
    assert results["ensemble/test_acc"] > 0.85
    # the user's own test_step ran on the ensemble's forward
    assert results["test_acc"] == pytest.approx(results["ensemble/test_acc"], abs=1e-6)
    for key in ("ensemble/test_nll", "ensemble/test_ece", "ensemble/test_brier"):
        assert 0.0 <= results[key] < 1.0


def test_driver_state_matches_plain_fit(fits, tmp_path):
    trainer, strategy, model, dm, _ = fits["elastic"]
    plain = pl.Trainer(max_epochs=MAX_EPOCHS, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False, enable_model_summary=False)
    plain.fit(DigitsModule(), datamodule=DigitsDataModule())
    assert trainer.current_epoch == plain.current_epoch == MAX_EPOCHS
    assert trainer.global_step == plain.global_step
    assert trainer.state.fn == plain.state.fn and trainer.state.status == plain.state.status
    assert trainer.state.stage == plain.state.stage
    assert set(plain.callback_metrics) <= set(trainer.callback_metrics)
    assert {f"member_{i}/val_acc" for i in range(3)} <= set(trainer.callback_metrics)
    assert trainer.lightning_module is model
    assert os.path.isfile(trainer.checkpoint_callback.best_model_path)


@pytest.mark.parametrize("sync", ["none", "elastic"])
def test_driver_module_holds_the_consensus_of_synced_members_and_member_0_of_independent_ones(fits, sync):
    """Members pulled together each epoch (``elastic``) leave your module their consensus; independently initialised,
    never synced members (``none``, a deep ensemble) leave it member 0's own weights, a trained model (their average is
    none: before, it was the module)."""
    _, strategy, model, _, _ = fits[sync]
    members = [m.state_dict() for m in strategy.ensemble.members]
    for key, value in model.state_dict().items():
        if torch.is_floating_point(value):
            expected = torch.stack([m[key] for m in members]).mean(0) if sync == "elastic" else members[0][key]
            torch.testing.assert_close(value, expected)


def test_loggers_get_member_and_ensemble_metrics(fits):
    trainer, *_ = fits["elastic"]
    (metrics_file,) = glob.glob(os.path.join(trainer.logger.log_dir, "metrics.csv"))
    with open(metrics_file) as f:
        columns = set(next(csv.reader(f)))
    assert {f"member_{i}/val_acc" for i in range(3)} <= columns
    assert {f"member_{i}/train_loss_step" for i in range(3)} <= columns
    assert {"ensemble/sync_seconds", "ensemble/sync_bytes", "ensemble/sync_bytes_moved"} <= columns
    assert {f"member_{i}/hqde/distance_to_consensus" for i in range(3)} <= columns
    assert len(fits["elastic"][1].sync_history) == MAX_EPOCHS


def test_predict_returns_combined_probabilities(fits):
    trainer, strategy, model, dm, _ = fits["none"]
    trainer.validate(model, datamodule=dm, verbose=False)  # its (x, int y) batches show the output is class logits
    batches = trainer.predict(model, datamodule=dm)
    assert len(batches) == 2 and batches[0].shape == (256, 10)
    probs = batches[0].exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(256))
    x = dm.test.tensors[0][:256]
    torch.testing.assert_close(probs, strategy.ensemble.predict_proba(x), atol=1e-5, rtol=1e-5)
    assert "forward" not in vars(model), "the evaluation-time forward must be removed afterwards"


def test_checkpoint_holds_every_member_and_rebuilds_without_ray(fits):
    trainer, strategy, model, dm, _ = fits["none"]
    path = trainer.checkpoint_callback.best_model_path
    checkpoint = load_checkpoint_file(path)
    section = checkpoint[HQDE_KEY]
    assert section["num_members"] == 3 and len(section["members"]) == 3
    assert all(m["optimizer_states"] for m in section["members"])
    # each member's entry is its own full Lightning state: it resumes its loops and callbacks
    assert all({"loops", "callbacks", "hqde_member"} <= set(m) for m in section["members"])
    assert [m["hqde_member"]["index"] for m in section["members"]] == [0, 1, 2]
    ensemble = Ensemble.load_from_checkpoint(path, DigitsModule)
    x = dm.test.tensors[0][:64]
    torch.testing.assert_close(ensemble.predict_proba(x), strategy.ensemble.predict_proba(x))
    # the checkpoint's state_dict is what the module holds after the fit (independent members: member 0's own)
    loaded = DigitsModule.load_from_checkpoint(path)
    torch.testing.assert_close(loaded.net[0].weight, model.net[0].weight)
    torch.testing.assert_close(loaded.net[0].weight, section["members"][0]["state_dict"]["net.0.weight"])


def test_resume_reproduces_saved_members(ray_session, tmp_path):
    checkpoint_cb = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    strategy = HQDEStrategy(num_members=2, sync="none", seed=3)
    _trainer(strategy, tmp_path, max_epochs=2, callbacks=[checkpoint_cb]).fit(DigitsModule(), datamodule=DigitsDataModule())
    saved = load_checkpoint_file(checkpoint_cb.last_model_path)
    assert saved["epoch"] == 1

    resumed = HQDEStrategy(num_members=2, sync="none", seed=3)
    trainer = _trainer(resumed, tmp_path, max_epochs=2)
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule(), ckpt_path=checkpoint_cb.last_model_path)
    for member, entry in zip(resumed.ensemble.members, saved[HQDE_KEY]["members"]):
        for key, value in entry["state_dict"].items():
            torch.testing.assert_close(member.state_dict()[key], value)

    continued = HQDEStrategy(num_members=2, sync="none", seed=3)
    trainer = _trainer(continued, tmp_path, max_epochs=3)
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule(), ckpt_path=checkpoint_cb.last_model_path)
    assert trainer.current_epoch == 3
    moved = [float((m.net[0].weight - e["state_dict"]["net.0.weight"]).norm()) for m, e in zip(continued.ensemble.members, saved[HQDE_KEY]["members"])]
    assert min(moved) > 0, "the resumed run trained one more epoch from the saved members"


def test_resume_with_wrong_member_count_fails_before_training(fits, tmp_path):
    path = fits["none"][0].checkpoint_callback.best_model_path
    trainer = _trainer(HQDEStrategy(num_members=2), tmp_path)
    with pytest.raises(Exception, match="holds 3 members"):
        trainer.fit(DigitsModule(), datamodule=DigitsDataModule(), ckpt_path=path)


def test_bagging_members_see_bootstrap_samples(ray_session, tmp_path):
    strategy = HQDEStrategy(num_members=2, sync="none", bagging=True, seed=11)
    trainer = _trainer(strategy, tmp_path, max_epochs=1)
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    assert min(_member_distances(strategy.ensemble)) > 0.1
    assert trainer.global_step == 19  # a bootstrap sample has the training set's size


def test_member_failure_surfaces_the_original_error(ray_session, tmp_path):
    class Exploding(DigitsModule):
        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                raise ValueError("boom in training_step")
            return super().training_step(batch, batch_idx)

    trainer = _trainer(HQDEStrategy(num_members=2), tmp_path, max_epochs=1)
    with pytest.raises(ValueError, match="boom in training_step"):
        trainer.fit(Exploding(), datamodule=DigitsDataModule())


def test_superposition_weights_predictions_by_member_confidence(ray_session, tmp_path):
    from hqde_lightning.aggregation import Superposition, superposition_weights

    strategy = HQDEStrategy(num_members=2, sync="elastic", aggregator=Superposition(temperature=0.05), score_metric="val_acc", seed=2)
    trainer = _trainer(strategy, tmp_path, max_epochs=1)
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    scores = torch.tensor([float(trainer.callback_metrics[f"member_{i}/val_acc"]) for i in range(2)], dtype=torch.float64)
    torch.testing.assert_close(strategy.ensemble.weights, superposition_weights(scores, 0.05))


class HoldsALock(DigitsModule):
    """A module with an attribute pickle refuses (a lock), one level down."""

    def __init__(self) -> None:
        super().__init__()
        self.helper = torch.nn.Module()
        self.helper.guard = threading.Lock()


@pytest.mark.parametrize("where", [{}, {"members_per_worker": 1}], ids=["in-process", "ray-actors"])
def test_an_unpicklable_module_fails_naming_the_attribute(ray_session, tmp_path, where):
    trainer = _trainer(HQDEStrategy(num_members=2, **where), tmp_path, max_epochs=1)
    with pytest.raises(MisconfigurationException, match=r"`model\.helper\.guard` \(lock\) cannot be pickled"):
        trainer.fit(HoldsALock(), datamodule=DigitsDataModule())


class HoldsAHandle(DigitsDataModule):
    """A datamodule holding what pickle refuses once it is set up, as one reading an HDF5 file holds its open handle."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.handle = threading.Lock()


def test_the_fits_data_stays_attached_as_after_a_plain_fit_and_never_travels_inside_the_trainer(tmp_path):
    """After a fit, ``trainer.datamodule`` and ``trainer.estimated_stepping_batches`` are what a plain fit leaves. The
    members' copies of the trainer never carry the data an earlier ``validate`` or ``fit`` attached to it (it would be
    copied into every member): a datamodule that cannot be pickled validates, then fits, twice."""
    dm, model = HoldsAHandle(), DigitsModule()
    trainer = _trainer(HQDEStrategy(num_members=2, sync="none", seed=0), tmp_path, max_epochs=1, logger=False)
    trainer.validate(model, datamodule=dm, verbose=False)
    trainer.fit(model, datamodule=dm)
    assert trainer.datamodule is dm and dm.trainer is trainer
    assert trainer.estimated_stepping_batches == len(dm.train_dataloader())
    # the group of the first fit gone: your trainer's profiler (which recorded it) must not point at it through a dead
    # weak proxy, which pickle refuses when the next fit copies your trainer
    gc.collect()
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model, datamodule=dm)
    assert trainer.current_epoch == 2 and trainer.datamodule is dm


@pytest.mark.parametrize("precision, dtype", [("64-true", torch.float64), ("bf16-true", torch.bfloat16)])
def test_true_precision_leaves_your_module_and_the_members_in_its_dtype_and_they_evaluate(tmp_path, precision, dtype):
    """A plain fit leaves your module in a "true" precision's dtype; so does HQDE, with the ensemble's members, so that
    ``test`` after the fit, and a new trainer testing the fit's checkpoint, evaluate (they failed with a dtype mismatch)."""
    model = DigitsModule()
    trainer = _trainer(HQDEStrategy(num_members=2, sync="none", seed=0), tmp_path, max_epochs=1, logger=False, precision=precision)
    trainer.fit(model, datamodule=DigitsDataModule())
    assert next(model.parameters()).dtype == dtype
    assert all(p.dtype == dtype for member in trainer.strategy.ensemble.members for p in member.parameters())
    assert trainer.test(model, datamodule=DigitsDataModule(), verbose=False)[0]["ensemble/test_acc"] > 0.7
    fresh = _trainer(HQDEStrategy(num_members=2), tmp_path, logger=False, precision=precision)
    results = fresh.test(DigitsModule(), datamodule=DigitsDataModule(), ckpt_path=trainer.checkpoint_callback.best_model_path, verbose=False)
    assert results[0]["ensemble/test_acc"] > 0.7


def test_a_module_registered_by_value_with_ray_cloudpickle_reaches_the_actors(ray_session, tmp_path, monkeypatch):
    """Actors get the fit pickled by Ray's own cloudpickle, so ``ray.cloudpickle.register_pickle_by_value`` (as Ray
    documents for code the workers cannot import) applies: the module below exists in this process only."""
    from ray import cloudpickle

    module = types.ModuleType("hqde_models_in_this_process_only")
    exec("from models import DigitsModule\n\nclass ByValue(DigitsModule):\n    pass\n", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    cloudpickle.register_pickle_by_value(module)
    try:
        strategy = HQDEStrategy(num_members=2, members_per_worker=1, seed=0)
        trainer = _trainer(strategy, tmp_path, max_epochs=1, limit_train_batches=4, limit_val_batches=2)
        trainer.fit(module.ByValue(), datamodule=DigitsDataModule())
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    assert sorted(strategy._launcher.member_nodes) == [0, 1]
    assert strategy.ensemble.num_members == 2
