"""What the trained ensemble outputs after real fits: NaN members left out, the combine rule, reshaping steps.

Each test trains 2-3 real members on the bundled digits in Ray actors, then evaluates the
ensemble in the driver with ``trainer.test``/``trainer.predict``.
"""

from __future__ import annotations

import csv
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from models import DigitsDataModule, DigitsModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hqde_lightning import Ensemble, HQDEStrategy
from hqde_lightning.ensemble import ProbabilityCombiner, weighted_vote


def _trainer(strategy: HQDEStrategy, tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        strategy=strategy,
        max_epochs=1,
        default_root_dir=str(tmp_path),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def _stacked_member_outputs(ensemble: Ensemble, x: torch.Tensor):
    with torch.no_grad():
        return [m.eval()(x) for m in ensemble.members]


# ------------------------------------------------------------------ NaN members (issue 8, A2)
class NaNMemberModule(DigitsModule):
    """Member ``nan_member``'s training loss is NaN from the first step (so are its weights after it)."""

    def __init__(self, nan_member: int | None = 1, hidden: int = 32, lr: float = 0.05) -> None:
        super().__init__(hidden=hidden, lr=lr)
        self.nan_member = nan_member

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.nan_member is None or self.trainer.strategy.member_index == self.nan_member:
            loss = loss * float("nan")
        return loss


def _csv_column(log_dir: str, column: str) -> list[float]:
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


def test_nan_member_leaves_the_ensemble(ray_session, tmp_path):
    # elastic sync: the NaN member is also left out of every sync; one actor per member, since the
    # module reads `trainer.strategy.member_index`, which only a member's own process has
    strategy = HQDEStrategy(num_members=3, seed=0, members_per_worker=1)
    trainer = _trainer(strategy, tmp_path, max_epochs=2, logger=CSVLogger(str(tmp_path)), enable_checkpointing=True)
    model, dm = NaNMemberModule(nan_member=1), DigitsDataModule()
    with pytest.warns(UserWarning, match=r"members \[1\] hold NaN or Inf weights"):
        trainer.fit(model, datamodule=dm)
    assert strategy.excluded_members == [1]
    assert strategy.ensemble.member_ids == [0, 2]
    assert float(trainer.callback_metrics["ensemble/excluded_members"]) == 1.0
    assert _csv_column(trainer.logger.log_dir, "ensemble/excluded_members")[-1] == 1.0
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())

    (results,) = trainer.test(model, datamodule=dm, verbose=False)
    healthy = [results["member_0/test_acc"], results["member_2/test_acc"]]
    assert "member_1/test_acc" not in results
    assert min(healthy) > 0.8
    assert results["ensemble/test_acc"] >= min(healthy) - 0.02
    assert results["test_acc"] == pytest.approx(results["ensemble/test_acc"], abs=1e-6)

    # the checkpoint member 0 wrote holds all three members; loading leaves the NaN one out again
    path = trainer.checkpoint_callback.best_model_path
    with pytest.warns(UserWarning, match=r"members \[1\] hold NaN or Inf"):
        loaded = Ensemble.load_from_checkpoint(path, NaNMemberModule)
    assert loaded.member_ids == [0, 2] and loaded.excluded_members == [1]
    assert torch.isfinite(loaded.predict_proba(dm.test.tensors[0])).all()
    reloaded = HQDEStrategy(num_members=3, seed=0, members_per_worker=1)
    with pytest.warns(UserWarning, match=r"members \[1\] hold NaN or Inf"):
        (from_ckpt,) = _trainer(reloaded, tmp_path).test(NaNMemberModule(), datamodule=dm, ckpt_path=path, verbose=False)
    assert reloaded.excluded_members == [1]
    assert from_ckpt["ensemble/test_acc"] >= min(healthy) - 0.02


def test_fit_fails_clearly_when_every_member_is_nan(ray_session, tmp_path):
    strategy = HQDEStrategy(num_members=2, sync="none", seed=0)
    trainer = _trainer(strategy, tmp_path, limit_train_batches=2, limit_val_batches=0)
    with pytest.raises(RuntimeError, match=r"without a usable member.*every member \(\[0, 1\]\) hold NaN or Inf"):
        trainer.fit(NaNMemberModule(nan_member=None), datamodule=DigitsDataModule())
    assert strategy.ensemble is None


# ------------------------------------------------------------------ the combine rule (A3)
class RegressionDigits(DigitsDataModule):
    """Digits with three float targets per image: the digit / 9, the mean and the std of the pixels."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        for name in ("train", "val", "test"):
            x, y = getattr(self, name).tensors
            setattr(self, name, TensorDataset(x, torch.stack([y / 9.0, x.mean(1), x.std(1)], dim=1)))


class RegressionModule(pl.LightningModule):
    """A 3-output regression MLP (MSE)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_mse", F.mse_loss(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_mse", F.mse_loss(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_regression_predictions_are_the_members_mean(ray_session, tmp_path):
    strategy = HQDEStrategy(num_members=2, sync="none", seed=0)
    trainer = _trainer(strategy, tmp_path)
    model, dm = RegressionModule(), RegressionDigits()
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    x = dm.test.tensors[0]
    (predictions,) = trainer.predict(model, dataloaders=DataLoader(TensorDataset(x), batch_size=len(x)))
    expected = torch.stack(_stacked_member_outputs(strategy.ensemble, x)).mean(0)
    torch.testing.assert_close(predictions, expected)


class LogitsAndFeatures(DigitsModule):
    """``forward`` returns ``(logits (batch, 10), features (batch, 32))``."""

    def forward(self, x: torch.Tensor):
        features = self.net[:3](x)
        return self.net[3](features), features

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x)[0], y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", self.val_acc(self(x)[0], y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self(x)[0], y)
        self.log("test_acc", self.test_acc)


def test_tuple_output_combines_logits_as_probabilities_and_averages_features(ray_session, tmp_path):
    strategy = HQDEStrategy(num_members=2, sync="none", seed=0)
    trainer = _trainer(strategy, tmp_path)
    model, dm = LogitsAndFeatures(), DigitsDataModule()
    trainer.fit(model, datamodule=dm)
    dm.setup("test")  # the members set up their own copies; the driver's is not yet
    x = dm.test.tensors[0][:256]
    outputs = _stacked_member_outputs(strategy.ensemble, x)
    logits, features = torch.stack([o[0] for o in outputs]), torch.stack([o[1] for o in outputs])
    weights = strategy.ensemble.active_weights()

    # before any evaluation nothing says which output holds class logits: both are averaged
    before_logits, before_features = trainer.predict(model, datamodule=dm)[0]
    torch.testing.assert_close(before_logits, logits.mean(0))
    torch.testing.assert_close(before_features, features.mean(0))

    (results,) = trainer.test(model, datamodule=dm, verbose=False)
    assert results["ensemble/test_acc"] == pytest.approx(results["test_acc"], abs=1e-6)
    assert strategy.ensemble.combiner.logits.path == "[0]"
    after_logits, after_features = trainer.predict(model, datamodule=dm)[0]
    torch.testing.assert_close(after_logits, ProbabilityCombiner()(logits, weights))
    torch.testing.assert_close(after_features, features.mean(0))


# ------------------------------------------------------------------ a test_step that reshapes (A4)
class ImageDigits(DigitsDataModule):
    """Digits as 8x8 images."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        for name in ("train", "val", "test"):
            x, y = getattr(self, name).tensors
            setattr(self, name, TensorDataset(x.view(-1, 8, 8), y))


class FlatteningModule(DigitsModule):
    """Every step flattens its images before ``self(x)`` (the MLP takes 64 features)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return super().training_step((x.view(x.size(0), -1), y), batch_idx)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return super().validation_step((x.view(x.size(0), -1), y), batch_idx)

    def test_step(self, batch, batch_idx):
        x, y = batch
        x = x.view(x.size(0), -1)
        return super().test_step((x, y), batch_idx)


def test_test_step_that_reshapes_its_input_gets_ensemble_metrics(ray_session, tmp_path):
    strategy = HQDEStrategy(num_members=2, sync="none", seed=0)
    trainer = _trainer(strategy, tmp_path)
    model, dm = FlatteningModule(), ImageDigits()
    trainer.fit(model, datamodule=dm)
    (results,) = trainer.test(model, datamodule=dm, verbose=False)
    assert results["ensemble/test_acc"] == pytest.approx(results["test_acc"], abs=1e-6)
    assert {"member_0/test_acc", "member_1/test_acc", "ensemble/test_nll"} <= set(results)


# ------------------------------------------------------------------ integer outputs, class-ordered data, ignore labels
def test_integer_outputs_are_the_members_weighted_majority_vote():
    """An integer or boolean output (a predicted class, a flag) is the value the largest weight of members gave, a tie going
    to the first of the tied members, under every combine rule (before, it was the first member's)."""
    votes = torch.tensor([[1, 7], [2, 7], [2, 3]])
    torch.testing.assert_close(weighted_vote(votes, torch.tensor([0.4, 0.3, 0.3])), torch.tensor([2, 7]))
    torch.testing.assert_close(weighted_vote(votes, torch.tensor([0.5, 0.25, 0.25])), torch.tensor([1, 7]))  # 1 ties with 2
    torch.testing.assert_close(weighted_vote(votes > 2, torch.tensor([0.2, 0.2, 0.6])), torch.tensor([False, True]))

    class ClassAndLogits(nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            self.net = nn.Linear(64, 10)
            torch.manual_seed(seed)
            nn.init.normal_(self.net.weight)

        def forward(self, x):
            logits = self.net(x)
            return logits, logits.argmax(-1)

    members = [ClassAndLogits(s) for s in range(3)]
    x = torch.randn(200, 64)
    classes = torch.stack([m(x)[1] for m in members])
    majority = torch.where(classes[1] == classes[2], classes[1], classes[0])
    for combine in ("auto", "mean", "probability"):
        with torch.no_grad():
            torch.testing.assert_close(Ensemble(members, combine=combine)(x)[1], majority)
    assert not torch.equal(majority, classes[0])


def _fitted_on_digits(module: type[DigitsModule], tmp_path) -> tuple[pl.Trainer, HQDEStrategy, DigitsModule, list[torch.Tensor]]:
    """``module`` fitted as a 2-member ensemble on the digits: the trainer, its strategy, the module and the test tensors."""
    strategy = HQDEStrategy(num_members=2, sync="none", seed=0)
    trainer = _trainer(strategy, tmp_path)
    model, dm = module(), DigitsDataModule()
    trainer.fit(model, datamodule=dm)
    dm.setup("test")
    return trainer, strategy, model, dm.test.tensors


class ClassOrderedTest(LogitsAndFeatures):
    """``forward`` returns ``(logits (batch, 10), features (batch, 8))``: fewer feature columns than classes, so the
    targets of a test set ordered by class fit the features too on its first batches."""

    def forward(self, x: torch.Tensor):
        return self.net(x), self.net[0](x)[:, :8]


def test_class_ordered_evaluation_data_counts_every_batch_with_the_class_logits(ray_session, tmp_path):
    """The features fit the targets of the first batches (classes 0-4), the logits every batch: the built-in metrics
    are those of the logits over every batch, and a warning says the first batches' combined output used the features
    (before, the metrics came from the features' batches only: 0.120 against 0.277 for one member)."""
    trainer, strategy, model, (x, y) = _fitted_on_digits(ClassOrderedTest, tmp_path)
    order = y.argsort(stable=True)
    x, y = x[order], y[order]
    with pytest.warns(UserWarning, match=r"output '\[0\]' holds the class logits: targets up to \d showed that '\[1\]'"):
        (results,) = trainer.test(model, DataLoader(TensorDataset(x, y), batch_size=50), verbose=False)
    logits = torch.stack([o[0] for o in _stacked_member_outputs(strategy.ensemble, x)])
    combined = ProbabilityCombiner()(logits, strategy.ensemble.active_weights())
    assert results["ensemble/test_acc"] == pytest.approx(float((combined.argmax(-1) == y).float().mean()), abs=1e-6)
    assert results["ensemble/test_nll"] == pytest.approx(float(F.cross_entropy(combined, y)), abs=1e-5)
    for i in range(2):
        assert results[f"member_{i}/test_acc"] == pytest.approx(float((logits[i].argmax(-1) == y).float().mean()), abs=1e-6)


class IgnoredLabels(DigitsModule):
    """Its test loss is ``F.cross_entropy``'s, which leaves out targets of -100 (its ``ignore_index``: no label)."""

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))


def test_ignore_labels_count_in_no_built_in_metric(ray_session, tmp_path):
    """Targets of -100 are left out of the ensemble's and the members' metrics, as ``F.cross_entropy`` leaves them out
    of the loss (before, the evaluation failed with an index error)."""
    trainer, strategy, model, (x, y) = _fitted_on_digits(IgnoredLabels, tmp_path)
    with_ignored = y.clone()
    with_ignored[::7] = -100
    (results,) = trainer.test(model, DataLoader(TensorDataset(x, with_ignored), batch_size=100), verbose=False)
    labelled = torch.arange(len(y)) % 7 != 0
    logits = torch.stack(_stacked_member_outputs(strategy.ensemble, x))[:, labelled]
    combined = ProbabilityCombiner()(logits, strategy.ensemble.active_weights())
    assert results["ensemble/test_nll"] == pytest.approx(float(F.cross_entropy(combined, y[labelled])), abs=1e-5)
    for i in range(2):
        assert results[f"member_{i}/test_acc"] == pytest.approx(float((logits[i].argmax(-1) == y[labelled]).float().mean()), abs=1e-6)


def test_a_saved_ensemble_combines_as_the_one_it_was_saved_from(ray_session, tmp_path):
    """Which output evaluation showed to hold class logits is in the checkpoint: an ensemble loaded from it combines the
    logits as probabilities, as the saved one did (before, it averaged them: other predictions from the same file)."""
    trainer, strategy, model, (x, y) = _fitted_on_digits(LogitsAndFeatures, tmp_path)
    trainer.test(model, DataLoader(TensorDataset(x, y), batch_size=100), verbose=False)
    path = str(tmp_path / "ensemble.ckpt")
    trainer.save_checkpoint(path)
    x = x[:128]
    with torch.no_grad():
        saved_logits, _ = strategy.ensemble(x)
        loaded_logits, _ = Ensemble.load_from_checkpoint(path, LogitsAndFeatures)(x)
    torch.testing.assert_close(loaded_logits, saved_logits)
    fresh = _trainer(HQDEStrategy(num_members=2, sync="none", seed=0), tmp_path)
    (predicted_logits, _), *_ = fresh.predict(LogitsAndFeatures(), DataLoader(TensorDataset(x), batch_size=128), ckpt_path=path)
    torch.testing.assert_close(predicted_logits, saved_logits)
    assert not torch.allclose(saved_logits, torch.stack([o[0] for o in _stacked_member_outputs(strategy.ensemble, x)]).mean(0))
