"""Edge cases of the sync maths in real fits (issue 8, A7): tied, float64, complex and frozen
weights, members stopping early under Krum, the score's epoch and sample counts."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Callback
from models import DigitsDataModule, DigitsModule
from torch import nn

from hqde_lightning import HQDEStrategy
from hqde_lightning.aggregation import Krum
from hqde_lightning.callbacks import AdaptiveQuantization

TRAIN_BATCHES = 5  # 5 batches of 64 digits per epoch


class EdgeModule(DigitsModule):
    """The digits MLP plus a second head tied to the first (one storage under two keys), a
    float64 output scale, a complex buffer and a frozen parameter of 300 values."""

    def __init__(self, lr: float = 0.0) -> None:
        super().__init__(hidden=32, lr=lr)
        self.mirror = nn.Linear(32, 10)
        self.mirror.weight = self.net[3].weight
        self.scale64 = nn.Parameter(torch.ones(10, dtype=torch.float64))
        self.register_buffer("phase", torch.complex(torch.randn(6), torch.randn(6)))
        self.frozen = nn.Parameter(torch.randn(300), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.net(x).double() * self.scale64).float() + 0 * self.frozen.sum()


class Perturb(Callback):
    """Member i moves the tied head by 0.1 i, the float64 scale by 1e-10 i and the complex buffer by (1+1j) i."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: EdgeModule) -> None:
        i = trainer.strategy.member_index
        with torch.no_grad():
            pl_module.net[3].weight.add_(0.1 * i)
            pl_module.scale64.add_(1e-10 * i)
            pl_module.phase.add_((1 + 1j) * i)


class StopMember(Callback):
    """Member ``index`` stops (as early stopping would) at the end of epoch 0."""

    def __init__(self, index: int) -> None:
        self.index = index

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.strategy.member_index == self.index:
            trainer.should_stop = True


def _fit(tmp_path, module: pl.LightningModule, callbacks: list[Callback] | None = None, max_epochs: int = 1, **strategy_kwargs) -> tuple[HQDEStrategy, pl.Trainer]:
    strategy = HQDEStrategy(seed=3, **strategy_kwargs)
    trainer = pl.Trainer(
        strategy=strategy,
        max_epochs=max_epochs,
        limit_train_batches=TRAIN_BATCHES,
        limit_val_batches=1,
        callbacks=callbacks or [],
        default_root_dir=str(tmp_path),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=DigitsDataModule())
    return strategy, trainer


@pytest.fixture(scope="module")
def elastic_fit(ray_session, tmp_path_factory):
    """Two members, no training (lr 0), elastic sync with alpha 0.5 after member-specific offsets."""
    torch.manual_seed(0)
    module = EdgeModule()
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    strategy, _ = _fit(tmp_path_factory.mktemp("elastic"), module, [Perturb()], num_members=2, aggregator="mean", sync="elastic", sync_strength=0.5)
    return strategy, initial, EdgeModule()


def test_tied_parameters_are_pulled_and_counted_once(elastic_fit):
    """Consensus = W + 0.05; alpha 0.5 moves member i's head to W + 0.025 + 0.05 i (pulled twice: W + 0.0375 for member 0)."""
    strategy, initial, template = elastic_fit
    (record,) = strategy.sync_history
    for i, member in enumerate(strategy.ensemble.members):
        moved = member.net[3].weight.detach() - initial["net.3.weight"]
        torch.testing.assert_close(moved, torch.full_like(moved, 0.025 + 0.05 * i), atol=1e-6, rtol=0)
        assert member.mirror.weight.data_ptr() == member.net[3].weight.data_ptr()
    sent = {k: v for k, v in template.state_dict().items() if (v.is_floating_point() or v.is_complex()) and k not in ("mirror.weight", "frozen")}
    assert record["bytes_received"] == 2 * sum(v.numel() * v.element_size() for v in sent.values())


def test_float64_weights_are_not_rounded_to_float32(elastic_fit):
    strategy, _, _ = elastic_fit
    for i, member in enumerate(strategy.ensemble.members):
        assert member.scale64.dtype == torch.float64
        offset = member.scale64.detach() - 1.0  # 1 + 1e-10 is 1 in float32
        torch.testing.assert_close(offset, torch.full_like(offset, (0.25 + 0.5 * i) * 1e-10), atol=1e-16, rtol=0)


def test_complex_tensors_keep_their_imaginary_part(elastic_fit):
    strategy, initial, _ = elastic_fit
    for i, member in enumerate(strategy.ensemble.members):
        assert member.phase.dtype == torch.complex64
        torch.testing.assert_close(member.phase - initial["phase"], torch.full((6,), (0.25 + 0.5 * i) * (1 + 1j), dtype=torch.complex64))


def test_frozen_parameters_stay_bit_exact_under_quantization(ray_session, tmp_path):
    """Identical frozen weights, 4-16 bit sync with error feedback: they come back unchanged to the bit."""
    torch.manual_seed(1)
    module = EdgeModule(lr=0.05)
    frozen = module.frozen.detach().clone()
    quantization = AdaptiveQuantization(base_bits=8, min_bits=4, max_bits=16)
    strategy, _ = _fit(tmp_path, module, [quantization], max_epochs=2, num_members=2, aggregator="mean", sync="elastic", sync_strength=0.5)
    assert len(strategy.sync_history) == 2 and strategy.sync_history[0]["bytes_received"] < strategy.sync_history[0]["fp32_bytes"]
    for member in strategy.ensemble.members:
        assert torch.equal(member.frozen.detach(), frozen)
        assert not member.frozen.requires_grad


def test_krum_keeps_syncing_after_a_member_stops_early(ray_session, tmp_path):
    """Krum(f=0) needs 3 members; member 2 stops after epoch 0 and the 2 others finish epoch 1's sync."""
    torch.manual_seed(2)
    strategy, trainer = _fit(tmp_path, DigitsModule(), [StopMember(2)], max_epochs=2, num_members=3, aggregator=Krum(num_byzantine=0), sync="replace")
    first, second = strategy.sync_history
    assert first["members"] == [0, 1, 2] and "fallback" not in first["info"]
    assert second["members"] == [0, 1] and second["info"]["fallback"] == "geometric_median"
    assert trainer.state.finished and len(strategy.ensemble.members) == 3


def test_score_metric_of_epoch_0_is_used_at_epoch_0(ray_session, tmp_path):
    """The sync runs after the epoch's validation: round 0 weighs members by their epoch-0 val_acc."""
    torch.manual_seed(3)
    strategy, trainer = _fit(tmp_path, DigitsModule(), num_members=2, aggregator="superposition", sync="elastic", score_metric="val_acc")
    (record,) = strategy.sync_history
    expected = [float(trainer.callback_metrics[f"member_{i}/val_acc"]) for i in range(2)]
    assert record["scores"] == pytest.approx(expected)


def test_sample_counts_run_since_the_last_sync(ray_session, tmp_path):
    """Syncing every 2 epochs, each member reports the samples of both epochs."""
    torch.manual_seed(4)
    strategy, _ = _fit(tmp_path, DigitsModule(), max_epochs=4, num_members=2, aggregator="mean", sync="replace", sync_every_n_epochs=2)
    assert [r["round"] for r in strategy.sync_history] == [1, 3]
    for record in strategy.sync_history:
        assert record["sample_counts"] == [2 * TRAIN_BATCHES * 64] * 2
