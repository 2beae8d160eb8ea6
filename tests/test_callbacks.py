"""The callbacks of ``hqde_lightning.callbacks`` on real fits: plain Trainers and HQDE ensembles on digits."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import DigitsDataModule, DigitsModule, quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

import hqde_lightning.actor_fit as actor_fit
from hqde_lightning import Ensemble, HQDEStrategy
from hqde_lightning.callbacks import AdaptiveQuantization, EnsembleSelection, PerformanceMonitor, QuantumNoise
from hqde_lightning.checkpoint import HQDE_KEY, load_checkpoint_file

# hidden=256 makes every float tensor but the last bias large enough to be quantized (plan_bits
# sends float tensors with fewer than 256 values at 32 bits), so the byte ratios measure the codec
WIDE = 256
#: the mixed 4/8/16 setting: 10% of blocks at 16 bits, 70% at 4 bits, the rest at 8 bits
MIXED = {"base_bits": 8, "min_bits": 4, "max_bits": 16, "high_fraction": 0.1, "low_fraction": 0.7}


class OrderedDigits(DigitsDataModule):
    """Digits in a fixed order: members that start from the same weights see the same batches."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=False)


def _plain_trainer(tmp_path, callbacks=(), **kwargs) -> pl.Trainer:
    return quiet_trainer(default_root_dir=str(tmp_path), deterministic=True, callbacks=list(callbacks), **kwargs)


def _plain_fit(tmp_path, callbacks=(), make_model: Callable[[], DigitsModule] = DigitsModule, **kwargs) -> tuple[pl.Trainer, DigitsModule]:
    """A seeded, deterministic single-model fit (same seed: same initial weights and data order)."""
    pl.seed_everything(0, verbose=False)
    model = make_model()
    trainer = _plain_trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(model, datamodule=DigitsDataModule())
    return trainer, model


def _hqde_fit(tmp_path, num_members: int, sync: str, callbacks=(), hidden: int = 32, max_epochs: int = 2, datamodule=None, **strategy_kwargs):
    strategy = HQDEStrategy(num_members=num_members, sync=sync, seed=7, **strategy_kwargs)
    trainer = quiet_trainer(strategy=strategy, max_epochs=max_epochs, default_root_dir=str(tmp_path), callbacks=list(callbacks))
    model = DigitsModule(hidden=hidden)
    dm = datamodule or DigitsDataModule()
    trainer.fit(model, datamodule=dm)
    return trainer, strategy, model, dm


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _val_accuracy(ensemble: Ensemble, dm: DigitsDataModule) -> float:
    x, y = dm.val.tensors
    return float((ensemble.predict_proba(x).argmax(-1) == y).float().mean())


# --------------------------------------------------------------- argument checks
@pytest.mark.parametrize(
    ("factory", "kwargs", "name"),
    [
        (QuantumNoise, {"scale": -1.0}, "scale"),
        (QuantumNoise, {"scale": float("nan")}, "scale"),
        (QuantumNoise, {"target": "biases"}, "target"),
        (QuantumNoise, {"schedule": "exponential"}, "schedule"),
        (QuantumNoise, {"anneal_epochs": 0}, "anneal_epochs"),
        (QuantumNoise, {"relative": "yes"}, "relative"),
        (QuantumNoise, {"seed": -3}, "seed"),
        (AdaptiveQuantization, {"base_bits": 6}, "base_bits"),
        (AdaptiveQuantization, {"min_bits": 2}, "min_bits"),
        (AdaptiveQuantization, {"max_bits": 32}, "max_bits"),
        (AdaptiveQuantization, {"min_bits": 16, "base_bits": 8}, "min_bits"),
        (AdaptiveQuantization, {"high_fraction": 1.5}, "high_fraction"),
        (AdaptiveQuantization, {"low_fraction": -0.1}, "low_fraction"),
        (AdaptiveQuantization, {"high_fraction": 0.6, "low_fraction": 0.6}, "high_fraction"),
        (AdaptiveQuantization, {"block_size": 0}, "block_size"),
        (AdaptiveQuantization, {"error_feedback": 1}, "error_feedback"),
        (AdaptiveQuantization, {"warmup_syncs": -1}, "warmup_syncs"),
        (EnsembleSelection, {"k": 0}, "k"),
        (EnsembleSelection, {"diversity_weight": -1.0}, "diversity_weight"),
        (EnsembleSelection, {"cost_weight": float("inf")}, "cost_weight"),
        (EnsembleSelection, {"solver": "quantum"}, "solver"),
        (EnsembleSelection, {"num_reads": 0}, "num_reads"),
        (EnsembleSelection, {"num_sweeps": 1.5}, "num_sweeps"),
        (EnsembleSelection, {"seed": "a"}, "seed"),
        (PerformanceMonitor, {"log_every_n_steps": 0}, "log_every_n_steps"),
    ],
)
def test_bad_arguments_name_the_parameter(factory, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        factory(**kwargs)


def test_allowed_values_are_listed():
    with pytest.raises(ValueError, match=r"\['weights', 'gradients'\]"):
        QuantumNoise(target="biases")
    with pytest.raises(ValueError, match=r"\['cosine', 'linear', 'constant'\]"):
        QuantumNoise(schedule="step")
    with pytest.raises(ValueError, match=r"\['annealing', 'brute_force'\]"):
        EnsembleSelection(solver="exact")


# ------------------------------------------------------------ QuantumNoise, plain
@pytest.fixture(scope="module")
def reference_model(tmp_path_factory) -> DigitsModule:
    """The seeded plain fit without any callback."""
    return _plain_fit(tmp_path_factory.mktemp("reference"))[1]


def test_zero_noise_is_bit_identical_to_no_noise(tmp_path, reference_model):
    reference = reference_model
    noise = QuantumNoise(scale=0.0)
    trainer, noisy = _plain_fit(tmp_path, [noise])
    for (key, expected), actual in zip(reference.state_dict().items(), noisy.state_dict().values()):
        assert torch.equal(expected, actual), key
    assert float(trainer.callback_metrics["noise_scale"]) == 0.0


@pytest.mark.parametrize("target", ["weights", "gradients"])
def test_noise_perturbs_training_reproducibly_and_anneals_to_zero(tmp_path, reference_model, target):
    reference = reference_model
    first = QuantumNoise(scale=0.05, target=target, seed=1)
    trainer, noisy = _plain_fit(tmp_path, [first])
    _, again = _plain_fit(tmp_path, [QuantumNoise(scale=0.05, target=target, seed=1)])
    _, other_seed = _plain_fit(tmp_path, [QuantumNoise(scale=0.05, target=target, seed=2)])
    assert float((_flat(noisy) - _flat(reference)).norm()) > 1e-3
    assert torch.equal(_flat(noisy), _flat(again)), "same seed, same noise"
    assert not torch.equal(_flat(noisy), _flat(other_seed))
    assert first.current_scale == 0.0, "the cosine schedule ends at exactly 0"
    assert float(trainer.callback_metrics["noise_scale"]) == 0.0


def test_noise_skips_frozen_parameters_and_buffers(tmp_path):
    def frozen_first_layer() -> DigitsModule:
        model = DigitsModule()
        model.net[0].requires_grad_(False)
        return model

    _, reference = _plain_fit(tmp_path, make_model=frozen_first_layer)
    _, noisy = _plain_fit(tmp_path, [QuantumNoise(scale=0.05, seed=0)], make_model=frozen_first_layer)
    # the frozen layer feeds BatchNorm: its statistics only stay equal if neither was perturbed
    for key in ("net.0.weight", "net.0.bias", "net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked"):
        assert torch.equal(reference.state_dict()[key], noisy.state_dict()[key]), key
    assert not torch.equal(reference.net[3].weight, noisy.net[3].weight)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_reaches_zero_at_the_step_limit(tmp_path, schedule):
    noise = QuantumNoise(scale=0.01, schedule=schedule)
    _plain_fit(tmp_path, [noise], max_epochs=-1, max_steps=25)
    assert noise.current_scale == 0.0


def test_schedule_follows_anneal_epochs(tmp_path):
    noise = QuantumNoise(scale=0.01, schedule="linear", anneal_epochs=2)
    _plain_fit(tmp_path, [noise])
    # after one of two annealing epochs the linear schedule is half way down
    assert noise.current_scale == pytest.approx(0.005)


def test_schedule_without_horizon_is_rejected(tmp_path):
    with pytest.raises(MisconfigurationException, match="anneal_epochs"):
        _plain_fit(tmp_path, [QuantumNoise()], max_epochs=-1, max_steps=-1)
    _plain_fit(tmp_path, [QuantumNoise(schedule="constant")], max_epochs=-1, max_steps=5)


def test_noise_state_holds_the_generator(tmp_path):
    noise = QuantumNoise(scale=0.01, seed=5)
    trainer, _ = _plain_fit(tmp_path, [noise])
    saved = noise.state_dict()
    restored = QuantumNoise(scale=0.01, seed=5)
    restored.load_state_dict(saved)
    restored.setup(trainer, trainer.lightning_module, "fit")
    assert torch.equal(restored.state_dict()["generator_state"], saved["generator_state"])
    fresh = QuantumNoise(scale=0.01, seed=5)
    fresh.setup(trainer, trainer.lightning_module, "fit")
    assert not torch.equal(fresh.state_dict()["generator_state"], saved["generator_state"])


# ---------------------------------------------------- AdaptiveQuantization, plain
class _SyncAtEpochEnd(pl.Callback):
    """Encodes the float weights at the last batch of every epoch, as ``HQDEStrategy``'s sync does."""

    def __init__(self, codec: AdaptiveQuantization) -> None:
        self.codec = codec
        self.sent: list[tuple[dict[str, torch.Tensor], object]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == trainer.num_training_batches:
            floats = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if torch.is_floating_point(v)}
            self.sent.append((floats, self.codec.encode_for_sync(trainer, pl_module, floats)))


def test_quantization_warmup_error_feedback_and_state(tmp_path):
    codec = AdaptiveQuantization(warmup_syncs=1)
    sync = _SyncAtEpochEnd(codec)
    trainer, _ = _plain_fit(tmp_path, [codec, sync], make_model=lambda: DigitsModule(hidden=WIDE), max_epochs=3)
    (state0, warm), (state1, first), (state2, second) = sync.sent
    assert warm.nbytes == warm.fp32_nbytes and warm.bits_histogram() == {32: sum(v.numel() for v in state0.values())}
    for key, value in warm.decode().items():
        assert torch.equal(value, state0[key])
    assert first.compression_ratio < 0.3 and set(first.bits_histogram()) == {4, 8, 16, 32}
    # error feedback: the second payload carries the first one's residual
    residual = {k: state1[k] - v for k, v in first.decode().items()}
    compensated = {k: state2[k] + residual[k] for k in state2}
    decoded = second.decode()
    for key, kept in codec.state_dict()["residuals"].items():
        torch.testing.assert_close(kept, compensated[key] - decoded[key], rtol=0, atol=1e-6)
    assert codec.num_syncs == 3
    metrics = trainer.callback_metrics
    assert float(metrics["quant/bytes"]) == second.nbytes
    assert float(metrics["quant/ratio"]) == pytest.approx(second.compression_ratio)
    fractions = [float(metrics[f"quant/bits_{b}"]) for b in (4, 8, 16, 32)]
    assert sum(fractions) == pytest.approx(1.0)
    assert 0.0 < float(metrics["quant/reconstruction_error"]) < 0.1
    restored = AdaptiveQuantization(warmup_syncs=1)
    restored.load_state_dict(codec.state_dict())
    assert restored.num_syncs == 3
    for key, value in codec.state_dict()["residuals"].items():
        assert torch.equal(restored.state_dict()["residuals"][key], value)


# -------------------------------------------------- PerformanceMonitor, plain
def test_monitor_logs_in_a_plain_trainer(tmp_path):
    trainer, _ = _plain_fit(tmp_path, [PerformanceMonitor(log_every_n_steps=5)])
    for name in ("samples_per_sec", "step_time_ms", "cpu_rss_mb"):
        assert float(trainer.callback_metrics[f"perf/{name}"]) > 0, name
    assert "perf/cuda_max_allocated_mb" not in trainer.callback_metrics


def test_monitor_falls_back_to_getrusage_without_psutil(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` now raises ImportError
    trainer, _ = _plain_fit(tmp_path, [PerformanceMonitor()])
    assert float(trainer.callback_metrics["perf/cpu_rss_mb"]) > 10


# ------------------------------------------------------------- HQDE ensembles
def test_monitor_runs_in_a_member_group_without_ray(tmp_path, monkeypatch):
    """In a member group the monitor logs each member's own samples and the group's shared step time and memory."""

    def no_ray(*args, **kwargs):
        raise AssertionError("PerformanceMonitor sent the members to Ray actors")

    monkeypatch.setattr(actor_fit, "start_ray", no_ray)
    monitor = PerformanceMonitor(log_every_n_steps=5)
    _, _, _, dm = _hqde_fit(tmp_path, 3, "none", [monitor], max_epochs=1)
    rows = monitor.summary["members"]
    assert [m["member"] for m in rows] == [0, 1, 2]
    assert all(m["samples_per_sec"] > 0 and m["step_time_ms"] > 0 and m["cpu_rss_mb"] > 0 for m in rows)
    assert len({m["step_time_ms"] for m in rows}) == len({m["cpu_rss_mb"] for m in rows}) == 1, "one process, one step"
    # each member counts its own batch of `dm.batch_size` per step (the stacked batch's first dimension is the members)
    per_step = [m["samples_per_sec"] * m["step_time_ms"] / 1000 for m in rows]
    assert all(0.2 * dm.batch_size <= n <= dm.batch_size * 1.0001 for n in per_step), per_step


@pytest.fixture(scope="module")
def noise_fits(ray_session, tmp_path_factory):
    """Two 2-member independent fits from one shared start on identically ordered data: without and with noise."""
    out = {}
    for name, callbacks in (("plain", []), ("noise", [QuantumNoise(scale=0.01, seed=0)])):
        out[name] = _hqde_fit(tmp_path_factory.mktemp(name), 2, "none", callbacks, max_epochs=1, datamodule=OrderedDigits(), member_init="shared")
    return out


def test_noise_makes_members_from_the_same_start_diverge(noise_fits):
    plain = noise_fits["plain"][1].ensemble.members
    assert torch.equal(_flat(plain[0]), _flat(plain[1])), "without noise, same start and same data give equal members"
    trainer, strategy, *_ = noise_fits["noise"]
    members = strategy.ensemble.members
    assert float((_flat(members[0]) - _flat(members[1])).norm()) > 0.05
    assert float(trainer.callback_metrics["member_0/noise_scale"]) == 0.0
    assert float(trainer.callback_metrics["member_1/noise_scale"]) == 0.0


@pytest.fixture(scope="module")
def quant_fits(ray_session, tmp_path_factory):
    """3-member elastic fits of the wide digits MLP: fp32 sync, 8-bit sync, mixed 4/8/16 sync (+ monitor)."""
    settings = {
        "fp32": [],
        "8bit": [AdaptiveQuantization(base_bits=8, min_bits=8, max_bits=8)],
        "mixed": [AdaptiveQuantization(**MIXED), PerformanceMonitor()],
    }
    out = {}
    for name, callbacks in settings.items():
        trainer, strategy, model, dm = _hqde_fit(tmp_path_factory.mktemp(name), 3, "elastic", callbacks, hidden=WIDE)
        fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}  # `test` replaces them
        (results,) = trainer.test(model, datamodule=dm, verbose=False)
        out[name] = (trainer, strategy, results, fit_metrics, callbacks)
    return out


def _bytes_ratio(strategy: HQDEStrategy) -> float:
    history = strategy.sync_history
    assert history, "the fit synced"
    return sum(h["bytes_received"] for h in history) / sum(h["fp32_bytes"] for h in history)


def test_fp32_sync_sends_float32(quant_fits):
    assert _bytes_ratio(quant_fits["fp32"][1]) == 1.0


def test_8bit_sync_matches_fp32_accuracy_at_a_quarter_of_the_bytes(quant_fits):
    """8-bit blocks everywhere (``min_bits = base_bits = max_bits = 8``)."""
    fp32_acc = quant_fits["fp32"][2]["ensemble/test_acc"]
    _, strategy, results, fit_metrics, _ = quant_fits["8bit"]
    assert fp32_acc > 0.9
    assert abs(results["ensemble/test_acc"] - fp32_acc) <= 0.01
    assert _bytes_ratio(strategy) <= 0.27
    for i in range(3):
        assert fit_metrics[f"member_{i}/quant/bits_8"] > 0.99


def test_mixed_sync_sends_at_most_a_fifth_of_the_bytes(quant_fits):
    """The mixed setting ``MIXED``: 10% of blocks at 16 bits, 70% at 4 bits, 20% at 8 bits.

    With the default fractions (10% at 16, 30% at 4) the codec sends about 0.246× the fp32 bytes;
    a 0.2× budget needs most blocks at 4 bits.
    """
    fp32_acc = quant_fits["fp32"][2]["ensemble/test_acc"]
    _, strategy, results, fit_metrics, _ = quant_fits["mixed"]
    assert _bytes_ratio(strategy) <= 0.2
    assert abs(results["ensemble/test_acc"] - fp32_acc) <= 0.02
    assert fit_metrics["member_0/quant/bits_4"] == pytest.approx(0.7, abs=0.02)
    assert fit_metrics["member_0/quant/ratio"] == pytest.approx(_bytes_ratio(strategy), rel=1e-6)


def test_monitor_summarises_members_and_syncs(quant_fits, caplog, monkeypatch):
    trainer, strategy, _, _, callbacks = quant_fits["mixed"]
    monitor = callbacks[1]
    summary = monitor.summary
    assert [m["member"] for m in summary["members"]] == [0, 1, 2]
    for member in summary["members"]:
        assert member["samples_per_sec"] > 0 and member["step_time_ms"] > 0 and member["cpu_rss_mb"] > 0
    assert len(summary["syncs"]) == len(strategy.sync_history) == 2
    assert all(s["bytes"] > 0 and s["bytes"] < s["fp32_bytes"] for s in summary["syncs"])
    assert summary["total_bytes"] == sum(h["bytes_received"] for h in strategy.sync_history)
    # without rich the table is plain text in the log
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    monkeypatch.setitem(sys.modules, "rich.table", None)
    with caplog.at_level(logging.INFO):
        monitor.on_ensemble_fit_end(trainer, strategy, None)
    assert "HQDE members" in caplog.text and "HQDE syncs" in caplog.text and "samples/s" in caplog.text


@pytest.fixture(scope="module")
def selection_fit(ray_session, tmp_path_factory):
    """A 5-member independent ensemble; EnsembleSelection runs in the driver after fit."""
    selection = EnsembleSelection(seed=0)
    trainer, strategy, model, dm = _hqde_fit(tmp_path_factory.mktemp("selection"), 5, "none", [selection])
    return trainer, strategy, model, dm, selection


def test_selection_keeps_fewer_members_without_losing_accuracy(selection_fit):
    _, strategy, _, dm, selection = selection_fit
    ensemble = strategy.ensemble
    assert selection.selected is not None and ensemble.active.tolist() == selection.selected.tolist()
    kept = int(selection.selected.sum())
    assert 1 <= kept < 5
    selected_acc = _val_accuracy(ensemble, dm)
    ensemble.set_active(torch.ones(5, dtype=torch.bool))
    try:
        full_acc = _val_accuracy(ensemble, dm)
    finally:
        ensemble.set_active(torch.as_tensor(selection.selected))
    assert selected_acc >= full_acc - 0.005
    assert selection.member_accuracy.shape == (5,) and np.all(selection.member_accuracy > 0.8)


def test_selection_annealing_finds_the_exact_optimum(selection_fit):
    _, strategy, _, dm, selection = selection_fit
    exact = EnsembleSelection(solver="brute_force")
    mask = exact.select(strategy.ensemble, dm.val_dataloader())
    assert mask.tolist() == selection.selected.tolist()
    assert exact.energy == pytest.approx(selection.energy)
    assert strategy.ensemble.active.tolist() == selection.selected.tolist(), "select() leaves the ensemble as it was"
    # with k, exactly k members
    assert int(EnsembleSelection(k=3, seed=0).select(strategy.ensemble, dm.val_dataloader()).sum()) == 3


def test_selection_is_saved_in_driver_checkpoints(selection_fit, tmp_path):
    trainer, _, _, _, selection = selection_fit
    path = str(tmp_path / "selected.ckpt")
    trainer.save_checkpoint(path)
    checkpoint = load_checkpoint_file(path)
    assert checkpoint[HQDE_KEY]["active"].tolist() == selection.selected.tolist()
    assert Ensemble.load_from_checkpoint(path, DigitsModule).active.tolist() == selection.selected.tolist()
    restored = EnsembleSelection()
    restored.load_state_dict(checkpoint["callbacks"][selection.state_key])
    assert restored.selected.tolist() == selection.selected.tolist() and restored.energy == selection.energy


def test_selection_errors_are_clear(selection_fit):
    trainer, strategy, _, dm, _ = selection_fit
    with pytest.raises(MisconfigurationException, match="no validation data"):
        EnsembleSelection().on_ensemble_fit_end(trainer, strategy, lambda: None)
    unlabeled = DataLoader(TensorDataset(dm.val.tensors[0]), batch_size=64)
    with pytest.raises(ValueError, match="integer class targets"):
        EnsembleSelection().select(strategy.ensemble, unlabeled)
    with pytest.raises(ValueError, match="`k`"):
        EnsembleSelection(k=6).select(strategy.ensemble, dm.val_dataloader())
