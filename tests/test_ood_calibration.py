"""Ensemble quality after a real fit: OOD detection, temperature scaling, AURC, reliability diagrams.

One 3-member independent ensemble is trained on the bundled digits in Ray actors with
``EnsembleCalibration``; the tests evaluate it in the driver with ``trainer.test``.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import DigitsDataModule, DigitsModule, quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from hqde_lightning import Ensemble, HQDEStrategy
from hqde_lightning.callbacks import EnsembleCalibration, OODEvaluation, ReliabilityDiagram
from hqde_lightning.checkpoint import HQDE_KEY, load_checkpoint_file

MEMBERS = 3


class TwoLoaderDigits(DigitsModule):
    """``DigitsModule`` whose ``test_step`` takes the ``dataloader_idx`` that several test loaders need."""

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        return super().test_step(batch, batch_idx)


@pytest.fixture(scope="module")
def calibrated_fit(ray_session, tmp_path_factory):
    calibration = EnsembleCalibration()
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=0)
    trainer = quiet_trainer(strategy=strategy, max_epochs=3, default_root_dir=str(tmp_path_factory.mktemp("ood")), callbacks=[calibration])
    model, dm = TwoLoaderDigits(), DigitsDataModule()
    trainer.fit(model, datamodule=dm)
    dm.setup("test")
    return trainer, strategy, model, dm, calibration


def _test_with(trainer, model, loaders, *callbacks):
    """``trainer.test`` with ``callbacks`` added for this call only."""
    trainer.callbacks.extend(callbacks)
    try:
        return trainer.test(model, dataloaders=loaders, verbose=False)
    finally:
        for callback in callbacks:
            trainer.callbacks.remove(callback)


def _merged(results: list[dict]) -> dict:
    return {k: v for per_loader in results for k, v in per_loader.items()}


def _labelled(x: torch.Tensor) -> DataLoader:
    """OOD inputs with dummy labels, so that the module's ``test_step`` can unpack them."""
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=128)


def test_calibration_callback_fits_the_temperature_on_the_validation_data(calibrated_fit):
    _, strategy, _, dm, calibration = calibrated_fit
    ensemble = strategy.ensemble
    assert calibration.temperature is not None and calibration.temperature != 1.0
    assert float(ensemble.temperature) == pytest.approx(calibration.temperature)
    assert ensemble.calibrate(dm.val_dataloader()) == pytest.approx(calibration.temperature, rel=1e-6)


def test_calibration_lowers_the_nll_on_its_fitting_data_and_test_uses_it(calibrated_fit):
    trainer, strategy, model, dm, _ = calibrated_fit
    ensemble = strategy.ensemble
    fitted = float(ensemble.temperature)
    ensemble.temperature.fill_(1.0)
    try:
        (before,) = trainer.test(model, dataloaders=dm.val_dataloader(), verbose=False)
        plain_probs = ensemble.predict_proba(dm.val.tensors[0])
    finally:
        ensemble.temperature.fill_(fitted)
    (after,) = trainer.test(model, dataloaders=dm.val_dataloader(), verbose=False)
    assert after["ensemble/test_nll"] < before["ensemble/test_nll"]
    assert after["ensemble/test_acc"] == before["ensemble/test_acc"]  # the temperature never changes the class
    assert after["ensemble/test_ece"] != before["ensemble/test_ece"]
    probs = ensemble.predict_proba(dm.val.tensors[0])
    expected = torch.softmax(torch.log(plain_probs) / fitted, dim=-1)
    assert torch.allclose(probs, expected, atol=1e-5)
    # the module's own forward in predict is the calibrated ensemble (log-probabilities)
    predictions = torch.cat(trainer.predict(model, dataloaders=DataLoader(TensorDataset(dm.val.tensors[0]), batch_size=256)))
    assert torch.allclose(predictions.exp(), probs, atol=1e-5)


def test_ood_auroc_is_one_for_uniform_noise_and_half_for_a_copy(calibrated_fit):
    trainer, _, model, dm, _ = calibrated_fit
    test_x = dm.test.tensors[0]
    noise = torch.rand(len(test_x), test_x.shape[1], generator=torch.Generator().manual_seed(0))
    ood = OODEvaluation()
    results = _test_with(trainer, model, [dm.test_dataloader(), _labelled(noise)], ood)
    logged = _merged(results)
    assert logged["ensemble/ood_auroc"] > 0.95
    assert logged["ensemble/ood_auroc_mi"] > 0.9
    assert 0.0 <= logged["ensemble/ood_fpr95"] < 0.5 and 0.9 < logged["ensemble/ood_aupr"] <= 1.0
    assert all(logged[f"member_{i}/ood_auroc"] > 0.9 for i in range(MEMBERS))
    assert ood.results["ensemble/ood_auroc"] == pytest.approx(logged["ensemble/ood_auroc"])
    # the OOD loader's (dummy) labels are ignored: the built-in metrics are the in-distribution loader's alone
    assert "ensemble/test_acc" in logged and not any("dataloader_idx_1" in k and k.startswith("ensemble/") for k in logged)

    copy = _merged(_test_with(trainer, model, [dm.test_dataloader(), _labelled(test_x.clone())], OODEvaluation()))
    assert copy["ensemble/ood_auroc"] == pytest.approx(0.5, abs=0.01)
    assert copy["ensemble/ood_auroc_mi"] == pytest.approx(0.5, abs=0.01)
    assert copy["ensemble/ood_fpr95"] > 0.9


def test_ood_evaluation_arguments_and_missing_loader(calibrated_fit):
    trainer, _, model, dm, _ = calibrated_fit
    for kwargs, name in (({"ood_dataloader_idx": -1}, "ood_dataloader_idx"), ({"in_dataloader_idx": 1.0}, "in_dataloader_idx"), ({"ood_dataloader_idx": 0}, "differ")):
        with pytest.raises(MisconfigurationException, match=name):
            OODEvaluation(**kwargs)
    with pytest.warns(UserWarning, match="OODEvaluation logs nothing"):
        results = _test_with(trainer, model, dm.test_dataloader(), OODEvaluation())
    assert "ensemble/ood_auroc" not in _merged(results)


def test_aurc_is_logged_and_no_lower_than_the_analytic_minimum(calibrated_fit):
    trainer, _, model, dm, _ = calibrated_fit
    (results,) = trainer.test(model, dataloaders=dm.test_dataloader(), verbose=False)
    n = len(dm.test)
    errors = round((1 - results["ensemble/test_acc"]) * n)
    minimum = sum((k - (n - errors)) / k for k in range(n - errors + 1, n + 1)) / n
    assert minimum - 1e-6 <= results["ensemble/test_aurc"] < errors / n + 0.01


def test_reliability_diagram_png_and_tensorboard(calibrated_fit, tmp_path):
    pytest.importorskip("matplotlib")
    image = pytest.importorskip("PIL.Image")
    trainer, _, model, dm, _ = calibrated_fit
    diagram = ReliabilityDiagram(dirpath=tmp_path / "plots")
    _test_with(trainer, model, dm.test_dataloader(), diagram)
    (path,) = diagram.paths
    assert path == tmp_path / "plots" / "reliability_test.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with image.open(path) as png:
        png.verify()
    with image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 400 and png.size[1] > 300
    with pytest.raises(MisconfigurationException, match="n_bins"):
        ReliabilityDiagram(n_bins=0)
    with pytest.raises(MisconfigurationException, match="stage"):
        ReliabilityDiagram(stage="fit")

    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    previous = trainer.loggers
    trainer.loggers = [TensorBoardLogger(str(tmp_path / "tb"))]
    try:
        _test_with(trainer, model, dm.test_dataloader(), ReliabilityDiagram())
        log_dir = trainer.loggers[0].log_dir
        trainer.loggers[0].experiment.flush()
    finally:
        trainer.loggers = previous
    assert (tmp_path / "tb").exists() and any(p.name == "reliability_test.png" for p in (tmp_path / "tb").rglob("*.png"))
    events = EventAccumulator(log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "ensemble/reliability_test" in events.Tags()["images"]


def test_temperature_travels_in_checkpoints_and_old_ones_load(calibrated_fit, tmp_path):
    trainer, strategy, model, dm, _ = calibrated_fit
    fitted = float(strategy.ensemble.temperature)
    path = str(tmp_path / "calibrated.ckpt")
    trainer.save_checkpoint(path)
    checkpoint = load_checkpoint_file(path)
    assert checkpoint[HQDE_KEY]["temperature"] == pytest.approx(fitted)
    assert float(Ensemble.load_from_checkpoint(path, TwoLoaderDigits).temperature) == pytest.approx(fitted)

    del checkpoint[HQDE_KEY]["temperature"]  # as files written before temperatures existed
    old = str(tmp_path / "old.ckpt")
    torch.save(checkpoint, old)
    assert float(Ensemble.load_from_checkpoint(old, TwoLoaderDigits).temperature) == 1.0
    try:
        trainer.test(model, dataloaders=dm.test_dataloader(), ckpt_path=old, verbose=False)
        assert float(strategy.ensemble.temperature) == 1.0
    finally:
        trainer.test(model, dataloaders=dm.test_dataloader(), ckpt_path=path, verbose=False)
    assert float(strategy.ensemble.temperature) == pytest.approx(fitted)
    assert math.isfinite(fitted)


def test_calibration_needs_validation_data(calibrated_fit):
    trainer, strategy, _, _, _ = calibrated_fit
    with pytest.raises(MisconfigurationException, match="EnsembleCalibration fits a temperature on the validation data, but this fit has no validation data"):
        EnsembleCalibration().on_ensemble_fit_end(trainer, strategy, lambda: None)
