"""The seed-compatible facade ``create_hqde_system`` on real data (digits as 3×8×8 images)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from models import digits
from original_package import MyModel, digit_loaders
from torch.utils.data import DataLoader, TensorDataset

from hqde_lightning.compat import HQDESystem, create_hqde_system

#: the original package's README quick start, its import line changed (``tests/models.py`` puts its folder on the path)
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "original_package.py")
QUANTIZATION = {"base_bits": 8, "min_bits": 4, "max_bits": 16}
AGGREGATION = {"noise_scale": 0.005, "exploration_factor": 0.1, "entanglement_strength": 0.1}


def digits_datasets() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Digits as standardised 3×8×8 images (the grey channel repeated): 1,200 train / 297 val / 300 test."""
    x, y = digits()
    x = x.view(-1, 1, 8, 8).repeat(1, 3, 1, 1)
    x = (x - x[:1200].mean()) / x[:1200].std()
    return TensorDataset(x[:1200], y[:1200]), TensorDataset(x[1200:1497], y[1200:1497]), TensorDataset(x[1497:], y[1497:])


def digits_loaders() -> tuple[DataLoader, DataLoader, DataLoader]:
    train, val, test = digits_datasets()
    return DataLoader(train, batch_size=8, shuffle=True), DataLoader(val, batch_size=256), DataLoader(test, batch_size=256)


@pytest.fixture(scope="module")
def trained(ray_session):
    """The snippet's system with 2 workers, trained for 2 epochs in this process."""
    train_loader, val_loader, test_loader = digits_loaders()
    system = create_hqde_system(
        model_class=MyModel,
        model_kwargs={"num_classes": 10},
        num_workers=2,
        quantization_config=QUANTIZATION,
        aggregation_config=AGGREGATION,
        strategy_kwargs={"seed": 0},
        enable_progress_bar=False,
    )
    metrics = system.train(train_loader, num_epochs=2, val_loader=val_loader)
    yield system, metrics, test_loader
    system.cleanup()


def test_snippet_trains_and_predicts_well_above_chance(trained, ray_session):
    system, metrics, test_loader = trained
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["training_time"] > 0 and metrics["compression_ratio"] > 2.0  # mostly 4/8-bit payloads
    assert 0.3 < metrics["ensemble/val_acc"] <= 1.0
    predictions = system.predict(test_loader)
    targets = test_loader.dataset.tensors[1]
    assert predictions.shape == (300, 10)
    assert torch.allclose(predictions.sum(-1), torch.ones(300), atol=1e-5)
    accuracy = (predictions.argmax(-1) == targets).float().mean().item()
    assert accuracy > 0.3, f"ensemble accuracy {accuracy:.3f} is not well above chance (0.1)"
    # inputs without targets give the same predictions
    bare = DataLoader(test_loader.dataset.tensors[0], batch_size=64)
    assert torch.allclose(system.predict(bare), predictions, atol=1e-6)
    scores = system.evaluate(test_loader)
    assert scores["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert {"nll", "ece", "brier", "disagreement", "member_0/accuracy", "member_1/accuracy"} <= set(scores)
    # the system did not start the session's Ray instance, so cleanup leaves it running
    system.cleanup()
    system.cleanup()
    assert ray_session.is_initialized()


def test_save_load_round_trip_gives_identical_predictions(trained, tmp_path):
    system, _, test_loader = trained
    path = tmp_path / "ensemble.pt"
    system.save(str(path))
    assert os.listdir(tmp_path) == ["ensemble.pt"]  # no temporary file left behind
    loaded = HQDESystem.load(str(path))
    assert loaded.num_workers == 2 and loaded.ensemble is not None
    # the loaded ensemble times vmap and the loop afresh (`Ensemble(vectorize="auto")`) and may keep the other way,
    # whose outputs can differ in the last bits
    torch.testing.assert_close(loaded.predict(test_loader), system.predict(test_loader), rtol=0, atol=1e-6)
    assert loaded.evaluate(test_loader) == pytest.approx(system.evaluate(test_loader), abs=1e-6)


def test_original_readme_example_trains_without_ray_and_its_classes_reach_ray_actors_by_value(tmp_path):
    """The original README's quick start (``examples/original_package.py``) in a fresh interpreter trains on one device
    without importing Ray. The same system with one Ray actor per member starts Ray, the script's ``MyModel`` (defined
    in ``__main__``) reaches the actors and the saved file by value, and ``cleanup`` shuts Ray down."""
    path, predictions_path = str(tmp_path / "system.pt"), str(tmp_path / "predictions.pt")
    script = textwrap.dedent(
        f"""
        import os, runpy, sys
        sys.argv = ["original_package.py", "--workers", "2", "--epochs", "1"]
        sys.path.insert(0, os.path.dirname({EXAMPLE!r}))
        example = runpy.run_path({EXAMPLE!r}, run_name="__main__")
        assert "ray" not in sys.modules, "on one device the system trains in this process, without Ray"
        import torch
        from torch.utils.data import DataLoader, Subset
        train_loader, test_loader = example["digit_loaders"]()
        with example["create_hqde_system"](example["MyModel"], num_workers=2, strategy_kwargs={{"members_per_worker": 1}}) as system:
            system.train(DataLoader(Subset(train_loader.dataset, range(64)), batch_size=32), num_epochs=1)
            import ray
            assert ray.is_initialized() and system.strategy._launcher.member_nodes.keys() == {{0, 1}}
            system.save({path!r})
            torch.save(system.predict(test_loader), {predictions_path!r})
        assert not ray.is_initialized(), "cleanup() must shut down the Ray instance the system started"
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ensemble test accuracy" in done.stdout
    loaded = HQDESystem.load(path)  # the script's MyModel was stored by value: this process cannot import it
    assert type(loaded.module.model).__name__ == "MyModel" and type(loaded.module.model) is not MyModel
    assert torch.allclose(loaded.predict(digit_loaders()[1]), torch.load(predictions_path), atol=1e-5)


def test_context_manager_calls_cleanup(monkeypatch):
    calls: list[HQDESystem] = []
    monkeypatch.setattr(HQDESystem, "cleanup", lambda self: calls.append(self))
    with create_hqde_system(MyModel, {"num_classes": 10}, num_workers=2) as system:
        assert isinstance(system, HQDESystem)
    assert calls == [system]
    with pytest.raises(KeyError), create_hqde_system(MyModel, num_workers=2) as failing:
        raise KeyError("boom")
    assert calls == [system, failing]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"quantization_config": {"base_bits": 8, "bits": 4}}, "bits"),
        ({"aggregation_config": {"noise_scale": 0.01, "temperature": 2.0}}, "temperature"),
        ({"quantization_config": {"base_bits": 5}}, "base_bits"),
        ({"aggregation_config": {"exploration_factor": 1.5}}, "exploration_factor"),
        ({"aggregation_config": {"entanglement_strength": -1.0}}, "entanglement_strength"),
        ({"aggregation_config": {"noise_scale": -0.1}}, "noise_scale"),
        ({"num_workers": 0}, "num_workers"),
        ({"strategy": "ddp"}, "strategy"),
        ({"max_epochs": 3}, "max_epochs"),
        ({"max_epoch": 3}, "max_epoch"),
        ({"aggregation_config": {"entanglement_strength": 0.1}, "strategy_kwargs": {"aggregator": "mean"}}, "aggregator"),
        ({"strategy_kwargs": {"num_members": 3}}, "num_members"),
        ({"strategy_kwargs": {"sync_every": 2}}, "sync_every"),
    ],
)
def test_bad_configuration_raises_naming_the_key(kwargs, named):
    arguments = {"model_class": MyModel, "model_kwargs": {"num_classes": 10}, **kwargs}
    with pytest.raises(ValueError, match=named):
        create_hqde_system(**arguments)


def test_unknown_key_error_lists_the_allowed_keys():
    with pytest.raises(ValueError) as info:
        create_hqde_system(MyModel, aggregation_config={"noise": 0.1})
    assert "'noise'" in str(info.value)
    assert all(key in str(info.value) for key in ("noise_scale", "exploration_factor", "entanglement_strength"))


def test_predict_before_train_is_an_error():
    with pytest.raises(RuntimeError, match="train"):
        create_hqde_system(MyModel).predict([torch.zeros(1, 3, 8, 8)])
