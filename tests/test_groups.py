"""Member groups: k members stacked in one process train exactly as each would alone.

Member ``i`` trained inside a group (vectorized with vmap, and looped) is compared with member
``i`` trained alone by a plain Lightning ``Trainer`` from the same initial weights (its seed)
and the same data order (``member_data.member_loader``), after several optimizer steps.
"""

from __future__ import annotations

import copy
import logging
import warnings
import re
from contextlib import nullcontext
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import DigitsDataModule, DigitsModule, digits, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from lightning.pytorch.plugins.precision import MixedPrecision
from torchmetrics.classification import MulticlassAccuracy

import hqde_lightning.group as group_module
import hqde_lightning.group_strategy as group_strategy
import hqde_lightning.actor_fit as actor_fit
from hqde_lightning import HQDEStrategy
from hqde_lightning.callbacks import AdaptiveQuantization, QuantumNoise
from hqde_lightning.checkpoint import HQDE_KEY, load_checkpoint_file
from hqde_lightning.embedded import group_blocker
from hqde_lightning.group import MemberGroup, member_optimizer_state, stacked_optimizer_state
from hqde_lightning.member_data import member_loader, start_epoch
from hqde_lightning.stacking import StackedMembers

SEED = 7
MEMBERS = 3


class Net(pl.LightningModule):
    """An MLP with optional BatchNorm and dropout; the optimizer is chosen by name."""

    def __init__(self, optimizer: str = "adam", batchnorm: bool = True, dropout: float = 0.0, scheduler: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        # no bias before BatchNorm: its gradient is rounding noise, which Adam turns into full steps
        layers: list[nn.Module] = [nn.Linear(64, 32, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(32))
        layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 10)]
        self.net = nn.Sequential(*layers)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        if not self.hparams.scheduler:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5), "interval": "step"}}


class ConvNet(Net):
    """A small CNN on the 8x8 digits (the same steps and optimizers as :class:`Net`)."""

    def __init__(self, optimizer: str = "sgd", **kwargs) -> None:
        super().__init__(optimizer=optimizer, **kwargs)  # `Net`'s hyperparameters: the members are rebuilt from them
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10),
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[:4](x)


def train_loader() -> DataLoader:
    x, y = digits()
    # the loader's own generator: every draw of a member's order comes from it, none from the global RNG
    return DataLoader(TensorDataset(x[:640], y[:640]), batch_size=32, shuffle=True, generator=torch.Generator())


FIT = dict(max_epochs=2, limit_train_batches=8, limit_val_batches=0)


class MemberOrderEpochs(pl.Callback):
    """What HQDE's strategies do with a member's loader at each epoch's start: seed its order of that epoch."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start_epoch(trainer.train_dataloader, trainer.current_epoch)


def solo_fits(hparams: dict, module: type[Net] = Net, fit: dict = FIT, val=None, **trainer_kwargs) -> list[tuple[Net, pl.Trainer]]:
    """Each member trained alone: its seed's initial weights, its own data order, a plain Trainer (validated on ``val()``)."""
    fits, callbacks = [], trainer_kwargs.pop("callbacks", [])
    for i in range(MEMBERS):
        pl.seed_everything(SEED + i, verbose=False)
        model = module(**hparams)
        loader = member_loader(train_loader(), SEED, i, 0, False, print, fill_generators=True)
        trainer = quiet_trainer(**fit, callbacks=[MemberOrderEpochs(), *copy.deepcopy(callbacks)], **trainer_kwargs)
        trainer.fit(model, loader, val() if val else None)
        fits.append((model, trainer))
    return fits


def solo_states(hparams: dict, module: type[Net] = Net, **trainer_kwargs) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in model.state_dict().items()} for model, _ in solo_fits(hparams, module, **trainer_kwargs)]


def group_states(hparams: dict, vectorize: bool | str, module: type[Net] = Net, **trainer_kwargs) -> list[dict[str, torch.Tensor]]:
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=vectorize)
    quiet_trainer(strategy=strategy, **FIT, **trainer_kwargs).fit(module(**hparams), train_loader())
    return [m.state_dict() for m in strategy.ensemble.members]


def assert_same_members(group: list[dict], solo: list[dict], atol: float = 1e-5) -> None:
    for i, (g, s) in enumerate(zip(group, solo)):
        assert g.keys() == s.keys()
        for key in s:
            torch.testing.assert_close(g[key], s[key], rtol=1e-4, atol=atol, msg=lambda m, i=i, key=key: f"member {i} {key}: {m}")


class Projected(Net):
    """``Net`` on a fixed random projection of its input, drawn in ``__init__``, and a running mean of its inputs that its
    step updates: buffers its state dict leaves out (``persistent=False``)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("projection", torch.randn(64, 64) / 8, persistent=False)
        self.register_buffer("input_mean", torch.zeros(64), persistent=False)

    def forward(self, x):
        return self.net((x - self.input_mean) @ self.projection)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.input_mean.mul_(0.9).add_(0.1 * x.mean(0))
        return F.cross_entropy(self(x), y)


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_buffers_a_state_dict_leaves_out_are_each_members_own(vectorize):
    """A non-persistent buffer drawn in ``__init__`` is the one each member's seed draws alone (members are rebuilt from
    your hyperparameters), and one your step updates ends in each ensemble member as in its own fit's module: the same
    weights, buffers and predictions (a state dict alone would leave the driver's projection and a zero mean)."""
    hparams = dict(optimizer="sgd", batchnorm=False)
    solo = [model for model, _ in solo_fits(hparams, Projected)]
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=vectorize)
    quiet_trainer(strategy=strategy, **FIT).fit(Projected(**hparams), train_loader())
    members = strategy.ensemble.members
    assert_same_members([m.state_dict() for m in members], [m.state_dict() for m in solo])
    x = digits()[0][:16]
    for member, alone in zip(members, solo):
        for name in ("projection", "input_mean"):
            torch.testing.assert_close(member.get_buffer(name), alone.get_buffer(name))
        torch.testing.assert_close(member(x), alone.eval()(x))
    assert not torch.equal(members[0].projection, members[1].projection)
    assert float(members[0].input_mean.abs().sum()) > 0


class DrawnMask(Net):
    """``Net`` on a random mask of its input and with a random temperature, both drawn in ``__init__`` as plain attributes
    (not buffers)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mask = (torch.rand(64) > 0.5).float()
        self.temperature = 0.5 + float(torch.rand(()))

    def forward(self, x):
        return self.net(x * self.mask) / self.temperature

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


class DrawnMaskInThreads(DrawnMask):
    def on_validation_model_eval(self) -> None:  # a hook a member group does not run: the members train in threads
        super().on_validation_model_eval()


@pytest.mark.parametrize("vectorize, module", [(True, DrawnMask), (False, DrawnMask), ("auto", DrawnMaskInThreads)], ids=["vmap", "loop", "threads"])
def test_attributes_init_draws_at_random_are_each_members_own(vectorize, module):
    """Each member trains with the mask and temperature its own seed draws (a group's steps then run looped, saying why: vmap
    would run every member with one member's), and the ensemble's members keep theirs: their outputs are each member's own
    fit's, although vmap evaluates ensembles of such small MLPs (it would use the first member's mask for all)."""
    hparams = dict(optimizer="sgd", batchnorm=False)
    solo = [model for model, _ in solo_fits(hparams, module)]
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=vectorize)
    with pytest.warns(UserWarning, match=r"attributes \['mask', 'temperature'\] differ") if vectorize is True else nullcontext():
        quiet_trainer(strategy=strategy, **FIT).fit(module(**hparams), train_loader())
    members = strategy.ensemble.members
    assert_same_members([m.state_dict() for m in members], [m.state_dict() for m in solo])
    assert [m.temperature for m in members] == [m.temperature for m in solo]
    assert len({m.temperature for m in members}) == MEMBERS
    x = digits()[0][:16]
    strategy.ensemble.vectorize = True
    torch.testing.assert_close(strategy.ensemble.member_outputs(x), torch.stack([m.eval()(x) for m in solo]))


class PixelTokens(Net):
    """The digits' pixel intensities (0-16) as tokens of an ``nn.Embedding`` whose padding index is the background's 0."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.embedding = nn.Embedding(17, 8, padding_idx=0)
        self.net = nn.Linear(8 * 64, 10)

    def forward(self, x):
        return self.net(self.embedding(x.long()).flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


@pytest.mark.parametrize("vectorize", [True, "auto"])
def test_an_embeddings_padding_row_stays_untrained_as_alone(vectorize, caplog):
    """torch.func.vmap's backward pass of an embedding keeps the padding row at 0 for the first member only: such a module
    trains member by member, saying why, and every member's padding row stays 0 as in its own fit."""
    hparams = dict(optimizer="sgd", batchnorm=False)
    solo = solo_states(hparams, PixelTokens)
    with pytest.warns(UserWarning, match="have a `padding_idx`") if vectorize is True else caplog.at_level(logging.INFO):
        group = group_states(hparams, vectorize, PixelTokens)
    assert vectorize is True or "have a `padding_idx`" in caplog.text
    assert_same_members(group, solo)
    assert all(float(g["embedding.weight"][0].abs().sum()) == 0 for g in group)


class LayerFromSetup(Net):
    """``Net`` whose first layer your ``setup`` creates (as Lightning suggests for layers built at fit time)."""

    def __init__(self, batchnorm: bool = False, **kwargs) -> None:
        super().__init__(batchnorm=batchnorm, **kwargs)
        self.net = nn.Linear(32, 10)

    def setup(self, stage: str) -> None:
        if not hasattr(self, "first"):
            self.first = nn.Linear(64, 32)

    def forward(self, x):
        return self.net(self.first(x).relu())

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


def test_a_layer_your_setup_creates_is_each_members_own(caplog):
    """A group stacks the layers ``__init__`` creates; one that ``setup`` adds would be shared by every member (trained by
    the sum of their gradients). Found before the first step, the members train their own fits instead (saying why):
    every member ends where its own fit ends, and the ensemble's members, your module too, have the layer."""
    solo = solo_states(dict(optimizer="sgd"), LayerFromSetup)
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED)
    trainer = quiet_trainer(strategy=strategy, **FIT)
    model = LayerFromSetup(optimizer="sgd")
    with caplog.at_level(logging.INFO):
        trainer.fit(model, train_loader())
    assert "your module gained ['first.weight', 'first.bias'] after its members were stacked" in caplog.text
    assert_same_members([m.state_dict() for m in strategy.ensemble.members], solo)
    assert hasattr(model, "first")
    predictions = torch.cat(trainer.predict(model, DataLoader(digits()[0][:8], batch_size=8)))
    assert predictions.shape[0] == 8


def test_sparse_embeddings_train_each_member_its_own_fit(caplog):
    """``nn.Embedding(sparse=True)`` gives sparse gradients, which cannot be stacked: the members train their own fits, and
    the info line says why (it failed inside torch's backward pass)."""

    class SparseTokens(PixelTokens):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.embedding = nn.Embedding(17, 8, sparse=True)

    strategy = HQDEStrategy(num_members=2, sync="none", seed=SEED)
    with caplog.at_level(logging.INFO):
        quiet_trainer(strategy=strategy, max_epochs=1, limit_train_batches=3, limit_val_batches=0).fit(SparseTokens(optimizer="sgd", batchnorm=False), train_loader())
    assert "the embeddings ['embedding'] have `sparse=True`" in caplog.text
    first, second = strategy.ensemble.members
    assert not torch.equal(first.embedding.weight, second.embedding.weight)


class KeepsHistory(Net):
    """Keeps, on the module, the sum of its first layer's weights at the end of each epoch (as a plain fit leaves it)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history: list[float] = []

    def on_train_epoch_end(self) -> None:
        self.history.append(float(self.net[0].weight.sum()))


class KeepsHistoryInThreads(KeepsHistory):
    """``KeepsHistory`` with a hook a group cannot run: its members train their own fits, in threads."""

    def on_validation_model_zero_grad(self) -> None:
        super().on_validation_model_zero_grad()


@pytest.mark.parametrize("module", [KeepsHistory, KeepsHistoryInThreads], ids=["group", "threads"])
def test_what_a_fit_stores_on_your_module_is_there_afterwards(module):
    """Attributes your hooks set during the fit are each member's own afterwards, as on the module of its own fit, in
    ``strategy.ensemble``; your module gets member 0's (they were lost: the fit trains copies of your module)."""
    solo = [model.history for model, _ in solo_fits(dict(optimizer="sgd"), module)]
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED)
    model = module(optimizer="sgd")
    quiet_trainer(strategy=strategy, **FIT).fit(model, train_loader())
    for member, alone in zip(strategy.ensemble.members, solo):
        assert member.history == pytest.approx(alone, rel=1e-5)
    assert len(solo[0]) == FIT["max_epochs"] and solo[0] != solo[1]
    assert model.history == pytest.approx(solo[0])
    assert model.history is not strategy.ensemble.members[0].history


class EpochHistory(pl.Callback):
    """A callback of yours that collects each epoch's ``train_loss`` for a plot after the fit (no ``state_dict``)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.losses.append(float(trainer.callback_metrics["train_loss_epoch"]))


@pytest.mark.parametrize("module", [Net, KeepsHistoryInThreads], ids=["group", "threads"])
def test_what_your_callback_collects_is_there_afterwards(module):
    """Your callback's plain attributes come back from the first member's copy, as its own fit leaves them (they were lost:
    the members run copies of your callbacks)."""
    solo = EpochHistory()
    pl.seed_everything(SEED, verbose=False)
    model = module(optimizer="sgd")
    quiet_trainer(**FIT, callbacks=[MemberOrderEpochs(), solo]).fit(model, member_loader(train_loader(), SEED, 0, 0, False, print, fill_generators=True))
    history = EpochHistory()
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED)
    quiet_trainer(strategy=strategy, **FIT, callbacks=[history]).fit(module(optimizer="sgd"), train_loader())
    assert len(history.losses) == FIT["max_epochs"]
    assert history.losses == pytest.approx(solo.losses, rel=1e-5)


class CountsSteps(Net):
    """Counts its training steps on the module, and keeps its latest batch's size (no hook: the steps may be vmapped)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps, self.batch_sizes = 0, []

    def training_step(self, batch, batch_idx):
        self.steps += 1
        self.batch_sizes.append(len(batch[1]))
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("vectorize", [True, False, "auto"])
def test_what_your_step_stores_counts_each_members_steps_once(vectorize):
    """Vmapped, your step runs once for every member; looped, once as each member (on the member's own attributes, which
    follow it across the ways ``vectorize="auto"`` times): either way each member ends with its own fit's count (looped, a
    shared attribute counted every member's steps)."""
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=vectorize)
    model = CountsSteps(optimizer="sgd", batchnorm=False)
    quiet_trainer(strategy=strategy, **FIT).fit(model, train_loader())
    steps = FIT["max_epochs"] * FIT["limit_train_batches"]
    assert model.steps == steps and [m.steps for m in strategy.ensemble.members] == [steps] * MEMBERS
    assert [len(m.batch_sizes) for m in strategy.ensemble.members] == [steps] * MEMBERS


class Validated(Net):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))


@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
def test_dropout_draws_as_alone_when_validation_loaders_draw_from_the_global_rng(shuffle):
    """A validation ``DataLoader`` without a generator draws its seeds from torch's global RNG at every validation pass (the
    sanity check's too): the member's stream in its own fit. A group validates its members in one pass, and makes as many
    draws from each member's stream, so looped dropout masks stay each member's own fit's."""
    x, y = digits()
    val = lambda: DataLoader(TensorDataset(x[1000:1064], y[1000:1064]), batch_size=32, shuffle=shuffle)  # noqa: E731
    fit = {**FIT, "limit_val_batches": 2}
    hparams = dict(optimizer="sgd", batchnorm=False, dropout=0.3)
    solo = [m.state_dict() for m, _ in solo_fits(hparams, Validated, fit=fit, val=val)]
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=False)
    quiet_trainer(strategy=strategy, **fit).fit(Validated(**hparams), train_loader(), val())
    assert_same_members([m.state_dict() for m in strategy.ensemble.members], solo)


class OldWeightNorm(Net):
    """``Net`` whose first layer uses torch's hook-based ``weight_norm``: its computed weight is not a leaf tensor."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch deprecates it for `parametrizations.weight_norm`
            self.net[0] = torch.nn.utils.weight_norm(nn.Linear(64, 32))

    def forward(self, x):
        return self.net(x)


def test_a_module_deepcopy_refuses_still_becomes_an_ensemble():
    """``copy.deepcopy`` refuses a module with torch's hook-based ``weight_norm`` (a computed, non-leaf weight): the fit
    used to train every member and then fail building the ensemble. It is copied through pickle instead."""
    strategy = HQDEStrategy(num_members=2, sync="none", seed=SEED)
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    model = OldWeightNorm(optimizer="sgd", batchnorm=False)
    trainer.fit(model, train_loader())
    first, second = strategy.ensemble.members
    assert not torch.equal(first.net[0].weight_v, second.net[0].weight_v)
    assert torch.cat(trainer.predict(model, DataLoader(digits()[0][:8], batch_size=8))).shape[0] == 8


class OverflowsOnce(Net):
    """``Net`` whose loss, at batch 3, is large enough to overflow float16 gradients in the members whose head's first
    bias is positive."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * torch.where(self.net[-1].bias[0] > 0, 1e4, 1.0) if batch_idx == 3 else loss


def float16_with_a_scaler() -> MixedPrecision:
    """What ``precision="16-mixed"`` is on a GPU (on a CPU Lightning makes it bfloat16, without a scaler)."""
    return MixedPrecision(precision="16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))


def test_float16_gradient_scaling_skips_only_the_overflowing_members_update(caplog):
    """A gradient scaler skips an optimizer step whose gradients overflow: one scaler over a group would skip it for every
    member. So each member trains its own fit (saying why), with its own scaler: only the members that overflow skip it,
    as alone."""
    solo = solo_states(dict(optimizer="sgd"), OverflowsOnce, plugins=[float16_with_a_scaler()])
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED)
    with caplog.at_level(logging.INFO):
        quiet_trainer(strategy=strategy, **FIT, plugins=[float16_with_a_scaler()]).fit(OverflowsOnce(optimizer="sgd"), train_loader())
    assert_same_members([m.state_dict() for m in strategy.ensemble.members], solo)
    assert "gradient scaler would skip the update of every member" in caplog.text
    assert len({float(s["net.4.bias"][0] > 0) for s in solo}) == 2  # some members overflowed, others did not


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_a_value_lightning_cannot_log_is_named_as_lightning_names_it(vectorize, caplog):
    """``self.log`` of a dict or a string raises Lightning's own error, naming the call, under vmap too (it used to be a bare
    ``float()`` error, and vmap first fell back to the loop as if it could not batch the step)."""

    class LogsADict(Net):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("parts", {"loss": loss})
            return loss

    strategy = HQDEStrategy(num_members=2, sync="none", seed=SEED, vectorize=vectorize)
    with caplog.at_level(logging.INFO), pytest.raises(ValueError, match=r"`self.log\('parts', ...\)` was called, but `dict` values cannot be logged"):
        quiet_trainer(strategy=strategy, **FIT).fit(LogsADict(), train_loader())
    assert "member by member" not in caplog.text


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
@pytest.mark.parametrize(
    "hparams, trainer_kwargs",
    [
        (dict(optimizer="adam"), {}),
        (dict(optimizer="sgd"), {}),
        (dict(optimizer="sgd", batchnorm=False), dict(accumulate_grad_batches=2)),
        (dict(optimizer="adam"), dict(gradient_clip_val=0.05)),
        (dict(optimizer="sgd", scheduler=True), {}),
        (dict(optimizer="adam"), dict(precision="bf16-mixed")),
    ],
    ids=["adam+batchnorm", "sgd-momentum+batchnorm", "accumulate-2", "clip-norm", "step-lr-scheduler", "bf16-mixed"],
)
def test_member_in_group_trains_as_alone(vectorize, hparams, trainer_kwargs):
    solo = solo_states(hparams, **trainer_kwargs)
    assert_same_members(group_states(hparams, vectorize, **trainer_kwargs), solo)
    # the members really differ (own initial weights, own data order)
    assert not torch.allclose(solo[0]["net.0.weight"], solo[1]["net.0.weight"])


class RecordsBackward(Net):
    """``Net`` recording, per training step, when each member's forward pass ran and when its loss was back-propagated."""

    events: list[tuple[str, int]] = []

    def training_step(self, batch, batch_idx):
        member = self.trainer.strategy.member_index
        RecordsBackward.events.append(("forward", member))
        loss = super().training_step(batch, batch_idx)
        loss.register_hook(lambda grad, member=member: RecordsBackward.events.append(("backward", member)))
        return loss


class HooksAfterBackward(pl.Callback):
    """Records each member's gradient norm after the backward pass (Lightning calls it between the step and the optimizer)."""

    norms: list[tuple[int | None, float]] = []

    def on_after_backward(self, trainer, pl_module):
        HooksAfterBackward.norms.append((getattr(trainer.strategy, "member_index", None), float(pl_module.net[0].weight.grad.norm())))


@pytest.mark.parametrize("trainer_kwargs", [{}, dict(accumulate_grad_batches=2)], ids=["plain", "accumulate-2"])
def test_a_looped_step_back_propagates_each_members_loss_as_the_member_runs(monkeypatch, trainer_kwargs):
    """Looped with a backward pass per member (the way ``vectorize="auto"`` keeps when it is the fastest; here the only
    one), a group back-propagates member i's loss before member i+1's forward pass (its activations still in the caches,
    freed before the next member's), zeroing the gradients where Lightning would: the members still train as alone."""
    monkeypatch.setattr(group_module, "WAYS", {"loop, backward per member": ("loop", False, True)})
    RecordsBackward.events = []
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED)
    quiet_trainer(strategy=strategy, **FIT, **trainer_kwargs).fit(RecordsBackward(), train_loader())
    steps = 2 * FIT["limit_train_batches"]
    assert RecordsBackward.events == [(kind, i) for _ in range(steps) for i in range(MEMBERS) for kind in ("forward", "backward")]
    assert_same_members([m.state_dict() for m in strategy.ensemble.members], solo_states({}, **trainer_kwargs))


def test_a_hook_between_step_and_backward_sees_one_backward_over_the_group_as_before(monkeypatch):
    """With a callback's ``on_after_backward`` (it must run after the backward pass of every member), ``vectorize="auto"``
    does not time a backward pass per member: Lightning's runs, once over the sum of the losses, and each member's hook
    sees the member's whole gradient."""
    monkeypatch.setattr(group_module, "WAYS", {"loop": ("loop", False, False), "loop, backward per member": ("loop", False, True)})
    RecordsBackward.events, HooksAfterBackward.norms = [], []
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED)
    quiet_trainer(strategy=strategy, **FIT, callbacks=[HooksAfterBackward()]).fit(RecordsBackward(), train_loader())
    forwards, backwards = [("forward", i) for i in range(MEMBERS)], [("backward", i) for i in reversed(range(MEMBERS))]
    assert RecordsBackward.events == (forwards + backwards) * 2 * FIT["limit_train_batches"]
    by_member = [[norm for member, norm in HooksAfterBackward.norms if member == i] for i in range(MEMBERS)]
    HooksAfterBackward.norms = []
    solo_fits({}, callbacks=[HooksAfterBackward()])
    steps = 2 * FIT["limit_train_batches"]
    alone = [[norm for _, norm in HooksAfterBackward.norms[i * steps : (i + 1) * steps]] for i in range(MEMBERS)]
    assert len(by_member[0]) == steps
    torch.testing.assert_close(torch.tensor(by_member), torch.tensor(alone), rtol=1e-4, atol=1e-6)


class RecordsBackwardConv(RecordsBackward, ConvNet):
    """:class:`ConvNet` recording when each member's forward and backward passes ran."""


def test_a_way_named_in_vectorize_trains_that_way_and_times_nothing(monkeypatch, caplog):
    """``vectorize`` naming a way, as ``vectorize="auto"``'s log line gives it: the group is laid out for it once, at fit
    start (here channels-last, a backward pass per member), no other way runs, nothing is timed, and the members train as
    alone (to the tolerance of channels-last rounding, see the test above)."""
    layouts = []
    lay_out = StackedMembers.set_channels_last
    monkeypatch.setattr(StackedMembers, "set_channels_last", lambda self, on, optimizers=(): (layouts.append(on), lay_out(self, on, optimizers))[1])
    RecordsBackward.events = []
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize="loop, channels-last, backward per member")
    with caplog.at_level(logging.INFO):
        quiet_trainer(strategy=strategy, **FIT).fit(RecordsBackwardConv(), train_loader())
    assert layouts.count(True) == 1  # laid out once (stacks are built contiguous, as the module is)
    assert "timed" not in caplog.text
    steps = 2 * FIT["limit_train_batches"]
    assert RecordsBackward.events == [(kind, i) for _ in range(steps) for i in range(MEMBERS) for kind in ("forward", "backward")]
    solo = solo_states({}, ConvNet)
    for i, (g, s) in enumerate(zip([m.state_dict() for m in strategy.ensemble.members], solo)):
        for key in s:
            torch.testing.assert_close(g[key], s[key], rtol=0, atol=2e-3, msg=lambda m, i=i, key=key: f"member {i} {key}: {m}")


@pytest.mark.parametrize("name, as_flag", [("vmap", True), ("loop", False)])
def test_vmap_and_loop_named_in_vectorize_are_true_and_false(name, as_flag):
    named = MemberGroup(ConvNet(), [ConvNet(), ConvNet()], [0, 1], vectorize=name)
    flag = MemberGroup(ConvNet(), [ConvNet(), ConvNet()], [0, 1], vectorize=as_flag)
    assert named.vectorize is as_flag and named.modes == flag.modes == {"training_step": name}


def test_a_named_backward_per_member_gives_way_to_a_hook_between_step_and_backward():
    """A backward pass per member named in ``vectorize`` where a callback's ``on_after_backward`` must see every member's
    gradients: Lightning's one backward pass over the group runs instead, and the warning says why."""
    RecordsBackward.events = []
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize="loop, backward per member")
    with pytest.warns(UserWarning, match=r"vectorize='loop, backward per member'`: Lightning's one backward pass .* runs instead"):
        quiet_trainer(strategy=strategy, **FIT, callbacks=[HooksAfterBackward()]).fit(RecordsBackward(), train_loader())
    forwards, backwards = [("forward", i) for i in range(MEMBERS)], [("backward", i) for i in reversed(range(MEMBERS))]
    assert RecordsBackward.events == (forwards + backwards) * 2 * FIT["limit_train_batches"]


class LogsStepLoss(Net):
    """Logs its loss per step only (Lightning's default in ``training_step``)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("step_loss", loss)
        return loss


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_after_a_fit_callback_metrics_hold_each_members_last_step_value(vectorize):
    # 16 steps, fewer than `log_every_n_steps` (50): no step is written to the loggers, yet a plain fit's
    # `trainer.callback_metrics` hold the last step's value, and a member's own entry must too
    solo = [float(trainer.callback_metrics["step_loss"]) for _, trainer in solo_fits({}, LogsStepLoss)]
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=vectorize)
    trainer = quiet_trainer(strategy=strategy, **FIT)
    trainer.fit(LogsStepLoss(), train_loader())
    group = [float(trainer.callback_metrics[f"member_{i}/step_loss"]) for i in range(MEMBERS)]
    assert group == pytest.approx(solo, rel=1e-4)
    assert len(set(solo)) == MEMBERS  # each member's own value


class RecordingLogger(Logger):
    """Keeps every row it is asked to log, in memory, with the row's step."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []
        self.steps: list[int | None] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append(dict(metrics))
        self.steps.append(step)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def logged(self, key: str) -> list[float]:
        return [row[key] for row in self.rows if key in row]


class LogsEveryReduction(Net):
    """Logs a mean per step and for the epoch, a sum, a max, and a validation mean (batches of unequal size)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("seen", torch.tensor(float(len(y))), on_epoch=True, reduce_fx="sum")
        self.log("worst", loss, on_step=False, on_epoch=True, reduce_fx="max")
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))


def _uneven_loaders() -> tuple[DataLoader, DataLoader]:
    x, y = digits()
    # 600 and 300 examples in batches of 32: each epoch ends with a smaller batch, which weighs less in the means
    train = DataLoader(TensorDataset(x[:600], y[:600]), batch_size=32, shuffle=True, generator=torch.Generator())
    return train, DataLoader(TensorDataset(x[600:900], y[600:900]), batch_size=32)


def _member_rows(logger: RecordingLogger, prefix: str = "") -> list[tuple[int, dict[str, float]]]:
    """The logged rows' (step, values named ``prefix<name>``, as ``<name>``), rows without such values left out."""
    kept = [(step, {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix) and k != "epoch"}) for step, metrics in zip(logger.steps, logger.rows)]
    return [(step, metrics) for step, metrics in kept if metrics]


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_each_members_logged_values_reach_the_logger_as_its_own_fit_logs_them(vectorize):
    # the group logs each member's values straight into Lightning's results once a name is registered
    # (`quick_log.QuickLog`): the weighted means, sums, maxima, epoch resets and written steps must be a plain fit's
    fit = dict(max_epochs=2, log_every_n_steps=4, enable_progress_bar=True)
    solo = []
    for i in range(MEMBERS):
        pl.seed_everything(SEED + i, verbose=False)
        train, val = _uneven_loaders()
        logger = RecordingLogger()
        quiet_trainer(**fit, logger=logger, callbacks=[MemberOrderEpochs()]).fit(LogsEveryReduction(), member_loader(train, SEED, i, 0, False, print, fill_generators=True), val)
        solo.append(_member_rows(logger))
    logger = RecordingLogger()
    train, val = _uneven_loaders()
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=vectorize)
    quiet_trainer(**fit, logger=logger, strategy=strategy).fit(LogsEveryReduction(), train, val)
    for i in range(MEMBERS):
        group = _member_rows(logger, f"member_{i}/")
        assert [step for step, _ in group] == [step for step, _ in solo[i]]
        for (_, got), (_, want) in zip(group, solo[i]):
            assert got.keys() == want.keys()
            assert got == pytest.approx(want, rel=1e-4), f"member {i}"
    assert [m["seen_epoch"] for _, m in solo[0] if "seen_epoch" in m] == [600, 600]  # sums restart each epoch
    assert {"loss_step", "loss_epoch", "seen_step", "worst", "val_loss"} <= {k for _, m in solo[0] for k in m}
    assert solo[0] != solo[1]  # each member's own values


class LogsAMetricThenATensor(Net):
    """Logs a torchmetrics object under a name, then a tensor under the same name: Lightning refuses that."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.acc = MulticlassAccuracy(num_classes=10, average="micro")

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        if batch_idx == 0:
            self.acc(logits, y)
        self.log("acc", self.acc if batch_idx == 0 else (logits.argmax(-1) == y).float().mean(), on_epoch=True)
        return F.cross_entropy(logits, y)


def test_a_name_logged_as_a_metric_and_then_as_a_tensor_is_refused_as_lightning_refuses_it():
    # the group's quick path must not write a tensor into the result of a logged Metric object
    with pytest.raises(MisconfigurationException, match="twice in"):
        quiet_trainer(**FIT).fit(LogsAMetricThenATensor(), train_loader())
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=False)
    with pytest.raises(MisconfigurationException, match="twice in"):
        quiet_trainer(strategy=strategy, **FIT).fit(LogsAMetricThenATensor(), train_loader())


class ChannelsLastConvNet(ConvNet):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.to(memory_format=torch.channels_last)


def test_channels_last_module_trains_in_a_looped_group_as_alone():
    """A module moved to channels-last keeps that layout in the group: looped, its members train exactly as alone."""
    hparams = dict(optimizer="sgd")
    assert_same_members(group_states(hparams, False, ChannelsLastConvNet), solo_states(hparams, ChannelsLastConvNet))


def test_auto_times_channels_last_convolutions_and_members_still_train_as_alone(caplog):
    """``vectorize="auto"`` also times a CNN's loop with channels-last weights, switching layouts between steps.

    With gradients accumulated over two steps, a switch falls between a gradient's two halves
    and after momentum exists. Channels-last convolutions round differently, and training
    amplifies it: a plain model moved to channels-last ends these 16 steps up to 2e-4 away
    from the contiguous one (measured), hence the tolerance; losing a gradient half or the
    momentum at a switch moves weights by more than 1e-2.
    """
    hparams = dict(optimizer="sgd")
    with caplog.at_level(logging.INFO):
        group = group_states(hparams, "auto", ConvNet, accumulate_grad_batches=2)
    assert "ms/step loop, channels-last" in caplog.text
    solo = solo_states(hparams, ConvNet, accumulate_grad_batches=2)
    for i, (g, s) in enumerate(zip(group, solo)):
        for key in s:
            torch.testing.assert_close(g[key], s[key], rtol=0, atol=2e-3, msg=lambda m, i=i, key=key: f"member {i} {key}: {m}")


@pytest.mark.parametrize(
    "costs, steps, kept",
    [
        ((1.0, 1.1, 2.5, 2.6, 10.0), (3, 3, 1, 1, 1), "loop"),
        ((1.5, 1.6, 1.0, 1.05, 1.4), (3, 3, 3, 3, 2), "loop, channels-last"),
        ((2.4, 2.3, 2.0, 2.1, 1.0), (3, 3, 3, 3, 3), "vmap"),
        ((1.2, 1.0, 1.1, 0.9, 5.0), (3, 3, 3, 3, 1), "loop, channels-last, backward per member"),
    ],
    ids=["first-steps-twice-the-best", "counted-step-over-1.3x", "close-calls-timed-fully", "backward-per-member-fastest"],
)
def test_auto_cuts_a_clearly_slower_way_short(monkeypatch, caplog, costs, steps, kept):
    """On a CPU the looped ways are timed first; a way clearly slower than the best before it stops being timed."""
    order = ("loop", "loop, backward per member", "loop, channels-last", "loop, channels-last, backward per member", "vmap")
    costs, steps = dict(zip(order, costs)), dict(zip(order, steps))
    now, timed = [0.0], []
    choose = MemberGroup._training_mode

    def training_mode(self):  # each probe step takes its way's cost on a fake clock
        mode = choose(self)
        if "training_step" not in self.modes:
            timed.append(self._way)
            now[0] += costs[self._way] / 1000
        return mode

    monkeypatch.setattr(MemberGroup, "_training_mode", training_mode)
    monkeypatch.setattr(MemberGroup, "_probe_clock", lambda self: now[0])
    with caplog.at_level(logging.INFO):
        group_states(dict(optimizer="sgd"), "auto", ConvNet)
    assert timed == [way for way in order for _ in range(steps[way])]
    assert f"training the {kept} way" in caplog.text
    assert caplog.text.count("(cut after") == sum(n < 3 for n in steps.values())


class BranchesOnItsLoss(ConvNet):
    """Data-dependent control flow in ``training_step`` (``.item()``): vmap cannot run it."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        return loss * 0 if loss.item() > 100 else loss


def test_auto_falls_back_to_the_loop_when_vmap_fails_after_the_other_ways(caplog):
    # on a CPU vmap is timed last, after both looped ways: its failure ends the timing, and the members train as alone
    with caplog.at_level(logging.INFO):
        group = group_states({}, "auto", BranchesOnItsLoss)
    assert "`BranchesOnItsLoss.training_step` runs member by member" in caplog.text
    looped = ", ".join(rf"[\d.]+ ms/step {re.escape(way)}( \(cut after \d steps\))?" for way in ("loop", "loop, backward per member", "loop, channels-last", "loop, channels-last, backward per member"))
    assert re.search(rf"timed 3 members: {looped}; training the loop", caplog.text)
    solo = solo_states({}, BranchesOnItsLoss)
    for i, (g, s) in enumerate(zip(group, solo)):  # the channels-last way rounds differently (see the test above)
        for key in s:
            torch.testing.assert_close(g[key], s[key], rtol=0, atol=2e-3, msg=lambda m, i=i, key=key: f"member {i} {key}: {m}")


def test_channels_last_lays_out_each_members_convolution_weights():
    group = MemberGroup(ConvNet(), [ConvNet(), ConvNet()], [0, 1], vectorize=False)
    stack = group.stack
    optimizer = torch.optim.SGD(stack.params, lr=0.1, momentum=0.9)
    for p in stack.params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    params = list(stack.params)
    before = [(p.detach().clone(), p.grad.clone(), optimizer.state[p]["momentum_buffer"].clone()) for p in params]
    x = torch.randn(4, 64)
    contiguous_features, _ = stack.call(1, "features", (x,))
    assert not stack.channels_last and contiguous_features.is_contiguous()

    stack.set_channels_last(True, [optimizer])
    assert stack.channels_last and list(stack.params) == params  # the same parameter objects: the optimizer still steps them
    for p, (value, grad, momentum) in zip(params, before):
        laid_out = [p, p.grad, optimizer.state[p]["momentum_buffer"]]
        for tensor, want in zip(laid_out, (value, grad, momentum)):
            torch.testing.assert_close(tensor, want, rtol=0, atol=0)
            if p.dim() == 5:  # a convolution weight: every member's slice is channels-last
                assert all(tensor[i].is_contiguous(memory_format=torch.channels_last) and tensor[i].stride(1) == 1 for i in range(2))
    features, _ = stack.call(1, "features", (x,))
    assert features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous()
    torch.testing.assert_close(features, contiguous_features)

    stack.set_channels_last(False, [optimizer])
    assert all(t.is_contiguous() for p in params for t in (p, p.grad, optimizer.state[p]["momentum_buffer"]))


def test_a_channels_last_module_is_stacked_channels_last():
    """Your module's own layout is kept: ``vectorize="auto"`` then times vmap and the loop in it."""
    template = ConvNet().to(memory_format=torch.channels_last)
    group = MemberGroup(template, [ConvNet(), ConvNet()], [0, 1])
    assert group.stack.channels_last
    weight = group.stack.params[0]
    assert weight.dim() == 5 and weight[1].is_contiguous(memory_format=torch.channels_last)
    assert MemberGroup(ConvNet(), [ConvNet(), ConvNet()], [0, 1]).stack.channels_last is False


class SoloNoise(QuantumNoise):
    """QuantumNoise of member ``index`` in a plain run (a plain Trainer has no member index)."""

    def __init__(self, index: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.index = index

    def _member_index_in(self, trainer) -> int:
        return self.index


@pytest.mark.parametrize("target", ["weights", "gradients"])
def test_member_in_group_gets_the_exploration_noise_it_gets_alone(target):
    """QuantumNoise in a group: one copy per member, each drawing the member's own stream on its own slices."""
    hparams, noise = dict(optimizer="sgd"), dict(scale=0.05, target=target, seed=3)
    solo = []
    for i in range(MEMBERS):
        pl.seed_everything(SEED + i, verbose=False)
        model = Net(**hparams)
        loader = member_loader(train_loader(), SEED, i, 0, False, print, fill_generators=True)
        quiet_trainer(**FIT, callbacks=[MemberOrderEpochs(), SoloNoise(i, **noise)]).fit(model, loader)
        solo.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert_same_members(group_states(hparams, False, callbacks=[QuantumNoise(**noise)]), solo)
    quiet = group_states(hparams, False)
    assert not torch.allclose(quiet[0]["net.0.weight"], solo[0]["net.0.weight"])  # the noise changed the weights


def test_looped_members_draw_their_own_dropout_masks_as_alone():
    """Looped, each member draws dropout from its own RNG stream: the masks it would draw alone."""
    hparams = dict(optimizer="adam", dropout=0.3)
    assert_same_members(group_states(hparams, vectorize=False), solo_states(hparams))


def test_vectorized_dropout_differs_per_member():
    """With vmap (``randomness="different"``) identical members on identical data still draw different masks."""
    model = Net(dropout=0.5, batchnorm=False)
    group = MemberGroup(model, [model, model], [0, 1], vectorize=True)
    x = torch.ones(2, 16, 64)
    y = torch.zeros(2, 16, dtype=torch.long)
    group.train()
    losses, _ = group.stack.vmap_call("training_step", ((x, y), 0), (0, None))
    assert losses[0] != losses[1]


def test_gradient_clipping_by_norm_is_per_member():
    """Each member's gradients are clipped as ``clip_grad_norm_`` clips them when it trains alone."""
    group = MemberGroup(Net(), [Net(), Net()], [0, 1], vectorize=True)
    for p in group.stack.params:  # member 0's gradient norm is far below the threshold, member 1's far above
        p.grad = torch.randn_like(p) * torch.tensor([0.001, 100.0]).reshape(-1, *[1] * (p.dim() - 1))
    expected = []
    for i in range(2):
        alone = [nn.Parameter(p[i].detach().clone()) for p in group.stack.params]
        for q, p in zip(alone, group.stack.params):
            q.grad = p.grad[i].clone()
        torch.nn.utils.clip_grad_norm_(alone, 1.0)
        expected.append([q.grad for q in alone])
    group.configure_gradient_clipping(torch.optim.SGD(group.stack.params, lr=0.1), gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    for i in range(2):
        for p, want in zip(group.stack.params, expected[i]):
            torch.testing.assert_close(p.grad[i], want)
    norms = [float(torch.linalg.vector_norm(torch.stack([p.grad[i].norm() for p in group.stack.params]))) for i in range(2)]
    assert norms[0] < 0.1 and abs(norms[1] - 1.0) < 1e-4


class ClipsFromSecondEpoch(Net):
    """Your own clipping rule (Lightning's documented pattern): clip by norm, from the second epoch on."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.current_epoch >= 1:
            self.clip_gradients(optimizer, gradient_clip_val=0.05, gradient_clip_algorithm="norm")


def test_your_configure_gradient_clipping_clips_each_members_own_gradients(caplog):
    """Your ``configure_gradient_clipping`` runs as each member: ``self.clip_gradients`` clips that member's norm, as alone
    (it used to need one Ray actor per member)."""
    solo = solo_states({}, ClipsFromSecondEpoch)
    with caplog.at_level(logging.INFO):
        assert_same_members(group_states({}, "auto", ClipsFromSecondEpoch), solo)
    assert "one Ray actor each" not in caplog.text
    unclipped = solo_states({}, Net)
    assert not torch.allclose(unclipped[0]["net.0.weight"], solo[0]["net.0.weight"], atol=1e-3)  # the clipping mattered


class ScalesGradientsThroughItsOptimizer(Net):
    """Changes the gradients it finds in the optimizer's parameter groups before the update."""

    def on_before_optimizer_step(self, optimizer) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad.mul_(0.5)


def test_optimizer_hooks_get_the_optimizer_as_their_member_sees_it():
    """``on_before_optimizer_step`` runs once per member with that member's parameters in the optimizer's groups: each
    member's gradients are halved once, as alone (the group's optimizer would have them halved once per member)."""
    solo = solo_states(dict(optimizer="sgd"), ScalesGradientsThroughItsOptimizer)
    assert_same_members(group_states(dict(optimizer="sgd"), "auto", ScalesGradientsThroughItsOptimizer), solo)


class FreezesItsFirstLayer(Net):
    """Freezes its first layer from the second epoch (``requires_grad_(False)`` in a hook, a fine-tuning pattern);
    with ``when="by_weights"`` only if its own weights say so, so that some members of a group do and others not."""

    decisions: list[bool] = []

    def __init__(self, when: str = "always", **kwargs) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            weight = self.net[0].weight
            freezes = self.hparams.when == "always" or float(weight[0, :4].sum()) > 0
            FreezesItsFirstLayer.decisions.append(freezes)
            weight.requires_grad_(not freezes)


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
@pytest.mark.parametrize("when, optimizer", [("always", "adam"), ("by_weights", "sgd"), ("by_weights", "adam")])
def test_a_layer_your_hooks_freeze_stays_as_alone(vectorize, when, optimizer):
    """``requires_grad_(False)`` in a hook freezes the member's own layer, as in its own fit: a frozen parameter gets no
    gradient and the optimizer leaves it and its state (before, the group's parameters did not see it and kept training).
    Where only some members freeze it, the others' training and per-member clipping by norm are unchanged."""
    hparams = dict(when=when, optimizer=optimizer, batchnorm=False)
    FreezesItsFirstLayer.decisions = []
    solo = solo_states(hparams, FreezesItsFirstLayer, gradient_clip_val=0.5)
    assert len(FreezesItsFirstLayer.decisions) == MEMBERS and (when == "always" or 0 < sum(FreezesItsFirstLayer.decisions) < MEMBERS)
    shared_step = when == "by_weights" and optimizer == "adam"
    with pytest.warns(UserWarning, match="step count .* shared by the stack") if shared_step else nullcontext():
        assert_same_members(group_states(hparams, vectorize, FreezesItsFirstLayer, gradient_clip_val=0.5), solo)


class KeepsItsBatchNormStatistics(Net):
    """From the second epoch its BatchNorm keeps its running statistics (eval mode set in a hook), a fine-tuning pattern."""

    def on_train_epoch_start(self) -> None:
        if self.current_epoch >= 1:
            self.net[1].eval()


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_a_submodule_your_hooks_put_in_eval_mode_stays_in_it_as_alone(vectorize):
    """A plain fit leaves the modes your hooks give submodules; the group did not (it put your module back in train mode
    at every step, so the BatchNorm kept updating its statistics)."""
    solo = solo_states(dict(optimizer="sgd"), KeepsItsBatchNormStatistics)
    assert_same_members(group_states(dict(optimizer="sgd"), vectorize, KeepsItsBatchNormStatistics), solo)


class OwnOptimizerHooks(Net):
    """Overrides Lightning's three optimizer hooks: a linear warm-up set before each step, gradients zeroed every
    other step (summed over two steps, each step still updating), and a backward that doubles the loss."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        for group in optimizer.param_groups:
            group["lr"] = 0.1 * min(1.0, (self.trainer.global_step + 1) / 6)
        optimizer.step(closure=optimizer_closure)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer) -> None:
        if batch_idx % 2 == 0:
            optimizer.zero_grad()

    def backward(self, loss, *args, **kwargs) -> None:
        (2.0 * loss).backward(*args, **kwargs)


class WarmsUpAfterTheStep(Net):
    """Lightning's documented warm-up: the learning rate for the next step set after this step's update."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        optimizer.step(closure=optimizer_closure)
        for group in optimizer.param_groups:
            group["lr"] = 0.1 * min(1.0, (self.trainer.global_step + 1) / 6)


@pytest.mark.parametrize(
    "module, vectorize", [(OwnOptimizerHooks, True), (OwnOptimizerHooks, False), (WarmsUpAfterTheStep, "auto")], ids=["vmap", "loop", "warm-up-after-the-step"]
)
def test_your_optimizer_step_zero_grad_and_backward_run_for_the_group_as_alone(module, vectorize, caplog):
    """Your ``optimizer_step``, ``optimizer_zero_grad`` and ``backward`` run once per step for the whole group (one update of
    the stacked optimizer): each member trains exactly as alone (they used to need one Ray actor per member)."""
    solo = solo_states(dict(optimizer="sgd"), module)
    with caplog.at_level(logging.INFO):
        assert_same_members(group_states(dict(optimizer="sgd"), vectorize, module), solo)
    assert "one Ray actor each" not in caplog.text
    plain = solo_states(dict(optimizer="sgd"), Net)
    assert not torch.allclose(plain[0]["net.0.weight"], solo[0]["net.0.weight"], atol=1e-3)  # the hooks mattered


class WarmsUpWithPlateau(OwnOptimizerHooks):
    """Its own ``optimizer_step`` and a ``ReduceLROnPlateau`` on each member's own loss."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "train_loss_epoch"}}


def test_your_optimizer_step_with_per_member_learning_rates_trains_in_member_threads(ray_session, caplog):
    """With a ``ReduceLROnPlateau`` the members' learning rates differ, so your ``optimizer_step``, which runs once for a
    group, would not see each member's own: on one device the members train in turns in threads, with the reason logged."""
    strategy = HQDEStrategy(num_members=2, sync="none", seed=0)
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    with caplog.at_level(logging.INFO):
        trainer.fit(WarmsUpWithPlateau(), train_loader())
    assert "each in a thread of this process (no Ray): your `optimizer_step` runs once for a group" in caplog.text
    assert strategy.ensemble is not None and strategy.ensemble.num_members == 2


class AugmentsItsBatches(Net):
    """Lightning's batch hooks: a fixed scaling before the transfer, a shift in its own transfer, random noise after it
    (training only)."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x * 0.5, y

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        x, y = batch
        return super().transfer_batch_to_device((x + 1.0, y), device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return (x + 0.3 * torch.randn_like(x) if self.trainer.training else x), y

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))


def test_your_batch_hooks_change_each_members_own_batch_as_alone(caplog):
    """The batch hooks (``on_before_batch_transfer``, ``transfer_batch_to_device``, ``on_after_batch_transfer``) run on
    each member's own training batch, with its own RNG stream (its own random augmentation), as alone; on the shared
    validation batch once (they used to need one Ray actor per member)."""
    solo = solo_states({}, AugmentsItsBatches)
    with caplog.at_level(logging.INFO):
        assert_same_members(group_states({}, "auto", AugmentsItsBatches), solo)
    assert "one Ray actor each" not in caplog.text
    assert not torch.allclose(solo_states({}, Net)[0]["net.0.weight"], solo[0]["net.0.weight"], atol=1e-3)  # the hooks mattered
    x, y = digits()
    val = DataLoader(TensorDataset(x[640:704], y[640:704]), batch_size=64)
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED)
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, limit_train_batches=4)
    trainer.fit(AugmentsItsBatches(), train_loader(), val)
    with torch.no_grad():
        for i, member in enumerate(strategy.ensemble.members):
            expected = F.cross_entropy(member.eval().net(x[640:704] * 0.5 + 1.0), y[640:704])
            torch.testing.assert_close(trainer.callback_metrics[f"member_{i}/val_loss"], expected, rtol=1e-4, atol=1e-5)


class AugmentingDigits(DigitsDataModule):
    """A datamodule whose ``on_after_batch_transfer`` adds noise to training batches, and records the shapes it gets."""

    shapes: list[tuple[int, ...]] = []

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        AugmentingDigits.shapes.append(tuple(x.shape))
        return (x + 0.3 * torch.randn_like(x) if self.trainer.training else x), y


def test_your_datamodules_batch_hooks_get_each_members_own_batch():
    """A datamodule's batch hook (Lightning prefers it to the module's) gets each member's own ``[B, ...]`` batch in
    training, as in the member's own fit (it used to get the members' batches stacked, ``[k, B, ...]``), and the
    validation batch once."""
    AugmentingDigits.shapes.clear()
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED)
    quiet_trainer(strategy=strategy, max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0).fit(DigitsModule(), datamodule=AugmentingDigits())
    assert [len(shape) for shape in AugmentingDigits.shapes] == [2] * (2 * MEMBERS + 1)


def test_optimizer_state_splits_into_member_states_and_back():
    group = MemberGroup(Net(), [Net(), Net()], [0, 1], vectorize=True)
    optimizer = torch.optim.Adam(group.stack.params, lr=0.01)
    for p in group.stack.params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    state = optimizer.state_dict()
    members = [member_optimizer_state(optimizer, state, i) for i in range(2)]
    first = members[0]["state"][0]
    assert first["exp_avg"].shape == group.stack.params[0].shape[1:] and first["step"].shape == ()
    rebuilt = stacked_optimizer_state(optimizer, members)
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(rebuilt["state"][pid][key], value)


def test_one_device_fit_starts_no_ray(monkeypatch, caplog):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a one-device fit")

    monkeypatch.setattr(actor_fit, "start_ray", no_ray)
    strategy = HQDEStrategy(num_members=4, sync="elastic", seed=0)
    trainer = quiet_trainer(strategy=strategy, max_epochs=2)
    with caplog.at_level(logging.INFO):
        trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    assert "vectorize='auto' timed 4 members" in caplog.text
    assert [r.round for r in strategy.sync_history] == [0, 1]
    assert {f"member_{i}/val_acc" for i in range(4)} <= set(trainer.callback_metrics)
    (results,) = trainer.test(trainer.lightning_module, datamodule=DigitsDataModule(), verbose=False)
    assert results["ensemble/test_acc"] > 0.85


def test_group_blocker_names_what_needs_actors():
    trainer = pl.Trainer(strategy=HQDEStrategy(num_members=2), logger=False)
    assert group_blocker(trainer.strategy, trainer, DigitsModule()) is None
    stopping = pl.Trainer(strategy=HQDEStrategy(num_members=2), callbacks=[EarlyStopping("val_loss")], logger=False)
    assert group_blocker(stopping.strategy, stopping, DigitsModule()) is None  # one copy per member
    actors = pl.Trainer(strategy=HQDEStrategy(num_members=2, members_per_worker=1), logger=False)
    assert "members_per_worker=1" in group_blocker(actors.strategy, actors, DigitsModule())


class LBFGSModule(DigitsModule):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.1)


def test_non_elementwise_optimizer_trains_in_member_threads(ray_session, caplog):
    strategy = HQDEStrategy(num_members=2, sync="none", seed=0)
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    with caplog.at_level(logging.INFO):
        trainer.fit(LBFGSModule(), datamodule=DigitsDataModule())
    assert "each in a thread of this process (no Ray): the optimizer LBFGS is not element-wise" in caplog.text
    assert strategy.ensemble is not None and strategy.ensemble.num_members == 2


def _members_after(epochs: int, sync: str, callbacks=()) -> tuple[HQDEStrategy, pl.Trainer]:
    # looped: "auto" may pick vmap in one fit and the loop in another, whose results differ in the last bits
    strategy = HQDEStrategy(num_members=4, sync=sync, seed=1, vectorize=False)
    trainer = quiet_trainer(strategy=strategy, max_epochs=epochs, callbacks=list(callbacks))
    pl.seed_everything(0, verbose=False)  # the shared initial weights of elastic members
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    return strategy, trainer


def _split_after_first_epoch(sync: str) -> tuple[HQDEStrategy, float, list[int]]:
    """A 1-epoch fit, a validation accuracy threshold between its members', and the members at or above it."""
    strategy, trainer = _members_after(1, sync)
    accuracy = [float(trainer.callback_metrics[f"member_{i}/val_acc"]) for i in range(4)]
    threshold = (min(accuracy) + max(accuracy)) / 2
    stopped = [i for i, a in enumerate(accuracy) if a >= threshold]
    assert 0 < len(stopped) < 4
    return strategy, threshold, stopped


def test_early_stopping_freezes_each_member_on_its_own():
    """In a group, EarlyStopping stops members one by one: a stopped member keeps its weights; the others train on."""
    first, threshold, stopped = _split_after_first_epoch("none")
    strategy, trainer = _members_after(3, "none", [EarlyStopping("val_acc", mode="max", stopping_threshold=threshold)])
    assert trainer.current_epoch >= 2  # the members still training went on after the others stopped
    for i in range(4):
        kept = all(torch.equal(a, b) for a, b in zip(strategy.ensemble.members[i].state_dict().values(), first.ensemble.members[i].state_dict().values()))
        assert kept == (i in stopped), f"member {i}: stopped after epoch 0: {i in stopped}, kept its epoch-0 weights: {kept}"


def test_stopped_members_leave_the_sync_rounds():
    _, threshold, stopped = _split_after_first_epoch("elastic")
    strategy, _ = _members_after(3, "elastic", [EarlyStopping("val_acc", mode="max", stopping_threshold=threshold)])
    rounds = [record.members for record in strategy.sync_history]
    # EarlyStopping checks at the end of the training epoch, after that epoch's sync: members stopped
    # at epoch 0 take part in round 0 and in no later one
    assert rounds[0] == [0, 1, 2, 3]
    assert rounds[1] == [i for i in range(4) if i not in stopped]
    assert all(set(later) <= set(earlier) for earlier, later in zip(rounds, rounds[1:]))


class AdamDigits(DigitsModule):
    """Adam: its state has step counts, which the stacked members share."""

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("module", [DigitsModule, AdamDigits], ids=["sgd-momentum", "adam"])
def test_a_stopped_members_optimizer_state_stops_with_it(ray_session, tmp_path, module):
    """The group's final checkpoint holds a stopped member's optimizer state as of its stop (momentum, moments, step
    counts), as its actor's does, though its slices still run in every later step of the stack."""
    def fit(epochs: int, members_per_worker, callbacks=()) -> pl.Trainer:
        strategy = HQDEStrategy(num_members=4, sync="none", seed=1, vectorize=False, members_per_worker=members_per_worker)
        trainer = quiet_trainer(strategy=strategy, max_epochs=epochs, callbacks=list(callbacks))
        trainer.fit(module(), datamodule=SeededDigits())
        return trainer

    accuracy = [float(fit(1, "auto").callback_metrics[f"member_{i}/val_acc"]) for i in range(4)]
    threshold = (min(accuracy) + max(accuracy)) / 2
    stopped = [i for i, a in enumerate(accuracy) if a >= threshold]
    assert 0 < len(stopped) < 4
    entries = []
    for members_per_worker in ("auto", 1):
        trainer = fit(3, members_per_worker, [EarlyStopping("val_acc", mode="max", stopping_threshold=threshold)])
        trainer.save_checkpoint(tmp_path / f"{members_per_worker}.ckpt")
        entries.append(load_checkpoint_file(str(tmp_path / f"{members_per_worker}.ckpt"))[HQDE_KEY]["members"])
    for i in stopped:
        in_group, as_actor = (e[i]["optimizer_states"][0]["state"] for e in entries)
        assert in_group.keys() == as_actor.keys()
        for pid, state in as_actor.items():
            for key, value in state.items():
                torch.testing.assert_close(in_group[pid][key], value, rtol=1e-4, atol=1e-6, msg=lambda m, i=i, key=key: f"member {i} {key}: {m}")


class SeededDigits(DigitsDataModule):
    """Digits whose training loader carries a generator: both runtimes give member i the order seeded by (seed, i, epoch)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, generator=torch.Generator())


def _fit(tmp_path, name: str, epochs: int, members_per_worker, ckpt_path=None) -> tuple[HQDEStrategy, pl.Trainer]:
    strategy = HQDEStrategy(num_members=2, sync="elastic", seed=0, members_per_worker=members_per_worker, vectorize=False)
    trainer = quiet_trainer(strategy=strategy, max_epochs=epochs, limit_val_batches=0, enable_checkpointing=True, default_root_dir=str(tmp_path / name))
    pl.seed_everything(0, verbose=False)
    trainer.fit(DigitsModule(), datamodule=SeededDigits(), ckpt_path=ckpt_path)
    return strategy, trainer


@pytest.mark.parametrize("writer", ["auto", 1], ids=["group-writes", "actors-write"])
def test_checkpoints_resume_in_either_runtime(ray_session, tmp_path, writer):
    """A checkpoint written by a member group or by member actors resumes, in both runtimes, the members of an uninterrupted fit.

    The second epoch's data orders are the uninterrupted fit's (``member_data.start_epoch``).
    """
    _, first = _fit(tmp_path, "first", 1, writer)
    path = first.checkpoint_callback.best_model_path
    group, group_trainer = _fit(tmp_path, "group", 2, "auto", path)
    actors, actors_trainer = _fit(tmp_path, "actors", 2, 1, path)
    whole, _ = _fit(tmp_path, "whole", 2, "auto")
    assert group_trainer.current_epoch == actors_trainer.current_epoch == 2
    # the resumed fit's earlier round first, as in the uninterrupted fit's history (since 2026-11-29: it listed [1])
    assert [r.round for r in group.sync_history] == [r.round for r in actors.sync_history] == [r.round for r in whole.sync_history] == [0, 1]
    for resumed_in_group, resumed_as_actor, uninterrupted in zip(group.ensemble.members, actors.ensemble.members, whole.ensemble.members):
        for key, value in uninterrupted.state_dict().items():
            torch.testing.assert_close(resumed_in_group.state_dict()[key], value, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(resumed_as_actor.state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_quantized_sync_in_a_group_matches_member_actors(ray_session, tmp_path):
    """AdaptiveQuantization in a group: each member encodes its own weights as its actor would; the bytes shrink alike."""
    runs = {}
    for members_per_worker in ("auto", 1):
        strategy = HQDEStrategy(num_members=2, sync="elastic", seed=0, members_per_worker=members_per_worker, vectorize=False)
        trainer = quiet_trainer(strategy=strategy, max_epochs=2, limit_val_batches=0, callbacks=[AdaptiveQuantization(warmup_syncs=0)])
        pl.seed_everything(0, verbose=False)
        trainer.fit(DigitsModule(hidden=64), datamodule=SeededDigits())
        runs[members_per_worker] = strategy
    group, actors = runs["auto"], runs[1]
    for g, a in zip(group.sync_history, actors.sync_history):
        assert g.bytes_received == a.bytes_received < 0.5 * g.fp32_bytes
    # a member's steps in a group and in its actor can round differently in the last bits (seen on one 2-core VM, not on
    # another, with the code unchanged), and a weight that lands on the other side of a quantization level then moves
    # further (6e-5 for 1 of 640 weights there): within 1e-4 + 1e-3 relative
    for in_group, as_actor in zip(group.ensemble.members, actors.ensemble.members):
        for key, value in as_actor.state_dict().items():
            torch.testing.assert_close(in_group.state_dict()[key], value, rtol=1e-3, atol=1e-4)


def test_group_step_checkpoint_holds_every_member_as_of_that_step(tmp_path):
    """A mid-epoch checkpoint written by a group holds every member's own state at that very step."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from hqde_lightning.checkpoint import HQDE_KEY, load_checkpoint_file
    from hqde_lightning.ensemble import Ensemble

    strategy = HQDEStrategy(num_members=3, sync="elastic", seed=5, vectorize=False)
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=5, save_top_k=-1)
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, enable_checkpointing=True, callbacks=[checkpoints, AdaptiveQuantization(), QuantumNoise(scale=1e-3)])
    trainer.fit(DigitsModule(), datamodule=DigitsDataModule())
    path = str(tmp_path / "ckpt" / "epoch=0-step=5.ckpt")
    section = load_checkpoint_file(path)[HQDE_KEY]
    assert [m["global_step"] for m in section["members"]] == [5, 5, 5]
    weights = [m["state_dict"]["net.0.weight"] for m in section["members"]]
    assert not torch.equal(weights[0], weights[1])  # each member's own weights
    # each member's noise and quantization state sits under the key it has with actors
    assert all({"QuantumNoise", "AdaptiveQuantization"} <= set(m["callbacks"]) for m in section["members"])
    assert [m["callbacks"]["QuantumNoise"]["member_index"] for m in section["members"]] == [0, 1, 2]
    assert Ensemble.load_from_checkpoint(path, DigitsModule).num_members == 3


class FailsAtEpoch1(Net):
    """``Net`` whose training step raises at epoch 1, batch 2 (``fails=True``)."""

    def __init__(self, fails: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)

    def training_step(self, batch, batch_idx):
        if self.hparams.fails and self.current_epoch == 1 and batch_idx == 2:
            raise ValueError("raised by training_step at epoch 1")
        return super().training_step(batch, batch_idx)


def test_a_failing_group_fit_runs_on_exception_as_each_members_fit_and_resumes_from_its_checkpoint(tmp_path):
    """When the step raises, each member's copy of ``OnExceptionCheckpoint`` runs, and the file holds every member at the
    failing step; resuming from it ends where each member alone, failed and resumed the same way, ends (before, the
    group's trainer never ran ``on_exception`` and the driver wrote a file holding no member over it)."""
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    from hqde_lightning.checkpoint import HQDE_KEY, load_checkpoint_file

    hparams = dict(optimizer="adam", batchnorm=False)
    fit = dict(FIT, max_epochs=3, enable_checkpointing=True)
    solo = []
    for i in range(MEMBERS):
        pl.seed_everything(SEED + i, verbose=False)
        model = FailsAtEpoch1(**hparams)
        saving = OnExceptionCheckpoint(str(tmp_path / f"alone{i}"))
        with pytest.raises(ValueError, match="at epoch 1"):
            quiet_trainer(**fit, callbacks=[MemberOrderEpochs(), saving]).fit(model, member_loader(train_loader(), SEED, i, 0, False, print, fill_generators=True))
        resumed = FailsAtEpoch1(fails=False, **hparams)
        loader = member_loader(train_loader(), SEED, i, 1, False, print, fill_generators=True)  # the order of the epoch it resumes
        quiet_trainer(**fit, callbacks=[MemberOrderEpochs()]).fit(resumed, loader, ckpt_path=saving.ckpt_path)
        solo.append(resumed.state_dict())
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=False)
    saving = OnExceptionCheckpoint(str(tmp_path / "group"))
    with pytest.raises(ValueError, match="at epoch 1"):
        quiet_trainer(strategy=strategy, **fit, callbacks=[saving]).fit(FailsAtEpoch1(**hparams), train_loader())
    section = load_checkpoint_file(saving.ckpt_path)[HQDE_KEY]
    assert [m["global_step"] for m in section["members"]] == [10] * MEMBERS  # 8 steps of epoch 0, 2 of epoch 1
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=False)
    quiet_trainer(strategy=strategy, **fit).fit(FailsAtEpoch1(fails=False, **hparams), train_loader(), ckpt_path=saving.ckpt_path)
    assert_same_members([m.state_dict() for m in strategy.ensemble.members], solo)


class StopsMember0(Net):
    """Member 0 stops at the end of epoch 0 (``trainer.should_stop`` in its own hook stops that member only)."""

    def on_train_epoch_end(self) -> None:
        if self.trainer.strategy.member_index == 0 and self.current_epoch == 0:
            self.trainer.should_stop = True


def test_step_checkpoints_hold_a_stopped_member_as_it_stopped(tmp_path):
    """Checkpoints written at a batch's end after a member stopped hold it as it stopped (before, its entry had moved by
    the step the group had just made: it runs in the stack all the same and is put back later)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from hqde_lightning.checkpoint import HQDE_KEY, load_checkpoint_file

    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED)
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=3, save_top_k=-1)
    trainer = quiet_trainer(strategy=strategy, **dict(FIT, max_epochs=3), callbacks=[checkpoints], enable_checkpointing=True)
    trainer.fit(StopsMember0(optimizer="sgd", batchnorm=False), train_loader())
    stopped = strategy.ensemble.members[0].state_dict()
    later = [load_checkpoint_file(str(tmp_path / f"epoch={s // 8}-step={s}.ckpt"))[HQDE_KEY]["members"] for s in (9, 12, 15, 18, 21)]
    for members in later:
        for key, value in stopped.items():
            torch.testing.assert_close(members[0]["state_dict"][key], value, rtol=0, atol=0)
    assert not torch.equal(later[0][1]["state_dict"]["net.0.weight"], later[-1][1]["state_dict"]["net.0.weight"])  # member 1 trains on
    # the plain names show the values of the member that trained longest (the first of them), as with member actors
    metrics = trainer.callback_metrics
    assert float(metrics["train_loss_epoch"]) == float(metrics["member_1/train_loss_epoch"]) != float(metrics["member_0/train_loss_epoch"])


def test_throughput_monitor_counts_the_samples_every_member_trains(tmp_path):
    """``ThroughputMonitor``'s ``batch_size_fn`` gets each member's own batch in a group, as in the member's fit, and the
    samples add up: k members x steps x batch size (before, it got the stacked batch and counted members)."""
    import csv

    from lightning.pytorch.callbacks import ThroughputMonitor
    from lightning.pytorch.loggers import CSVLogger

    def batch_size(batch):
        assert batch[0].shape == (32, 64), "a member's own batch"
        return batch[0].size(0)

    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED)
    logger = CSVLogger(str(tmp_path), name="", version="")
    trainer = quiet_trainer(strategy=strategy, **FIT, logger=logger, log_every_n_steps=1, callbacks=[ThroughputMonitor(batch_size_fn=batch_size, window_size=2)])
    trainer.fit(Net(optimizer="sgd", batchnorm=False), train_loader())
    with open(tmp_path / "metrics.csv") as f:
        samples = [float(row["train/samples"]) for row in csv.DictReader(f) if row.get("train/samples")]
    steps = FIT["max_epochs"] * FIT["limit_train_batches"]
    assert samples[-1] == MEMBERS * 32 * steps


class LogsToTheBar(Net):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("bar_only", 2 * loss, prog_bar=True, logger=False)
        return loss


@pytest.mark.parametrize("module", [LogsToTheBar, "threads"], ids=["group", "threads"])
def test_logged_and_progress_bar_metrics_are_what_a_plain_fit_leaves(module):
    """``trainer.logged_metrics`` and ``trainer.progress_bar_metrics`` after the fit hold a plain fit's names with the
    first member's values (and ``logged_metrics`` every member's as ``member_{i}/...``); before, both were empty."""
    if module == "threads":
        module = type("LogsToTheBarInThreads", (LogsToTheBar, NetInThreads), {})
    hparams = dict(optimizer="sgd", batchnorm=False)
    (alone, plain), *_ = solo_fits(hparams, module)
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED)
    trainer = quiet_trainer(strategy=strategy, **FIT)
    trainer.fit(module(**hparams), train_loader())
    for name, value in plain.logged_metrics.items():
        assert float(trainer.logged_metrics[name]) == pytest.approx(float(value), abs=1e-5)
        assert float(trainer.logged_metrics[f"member_0/{name}"]) == pytest.approx(float(value), abs=1e-5)
    assert f"member_{MEMBERS - 1}/train_loss_epoch" in trainer.logged_metrics
    assert trainer.progress_bar_metrics.keys() == plain.progress_bar_metrics.keys() == {"bar_only"}
    assert trainer.progress_bar_metrics["bar_only"] == pytest.approx(plain.progress_bar_metrics["bar_only"], abs=1e-5)


class NetInThreads(Net):
    def on_validation_model_eval(self) -> None:  # a hook a member group does not run: the members train in threads
        super().on_validation_model_eval()


@pytest.mark.parametrize("module", [Net, NetInThreads], ids=["group", "threads"])
def test_fitting_the_same_module_again_goes_on_from_where_the_members_ended(module):
    """The same trainer fits the same module again with more epochs: each member goes on from its weights, as a plain fit
    goes on from the module's (before, the members were drawn afresh and the first fit's training was lost)."""
    hparams = dict(optimizer="sgd", batchnorm=False)
    solo = []
    for i in range(MEMBERS):
        pl.seed_everything(SEED + i, verbose=False)
        model, trainer = module(**hparams), quiet_trainer(**FIT, callbacks=[MemberOrderEpochs()])
        loader = member_loader(train_loader(), SEED, i, 0, False, print, fill_generators=True)
        trainer.fit(model, loader)
        trainer.fit_loop.max_epochs = 4
        trainer.fit(model, loader)
        solo.append(model.state_dict())
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=False)
    model, trainer = module(**hparams), quiet_trainer(strategy=strategy, **FIT)
    trainer.fit(model, train_loader())
    trainer.fit_loop.max_epochs = 4
    trainer.fit(model, train_loader())
    assert trainer.global_step == 4 * FIT["limit_train_batches"]
    assert_same_members([m.state_dict() for m in strategy.ensemble.members], solo)


def test_byzantine_members_in_a_group_send_what_their_actors_send(ray_session):
    """ByzantineMembers in a group: member 1's copy corrupts only member 1's payload, and the rounds match member actors'."""
    from hqde_lightning.callbacks import ByzantineMembers

    runs = {}
    for members_per_worker in ("auto", 1):
        strategy = HQDEStrategy(num_members=3, sync="elastic", aggregator="geometric_median", seed=0, members_per_worker=members_per_worker, vectorize=False)
        trainer = quiet_trainer(strategy=strategy, max_epochs=2, limit_val_batches=0, callbacks=[ByzantineMembers([1], attack="scale")])
        pl.seed_everything(0, verbose=False)
        trainer.fit(DigitsModule(), datamodule=SeededDigits())
        runs[members_per_worker] = strategy
    group, actors = runs["auto"], runs[1]
    assert [r.members for r in group.sync_history] == [r.members for r in actors.sync_history] == [[0, 1, 2]] * 2
    for g, a in zip(group.sync_history, actors.sync_history):
        assert g.member_weights == pytest.approx(a.member_weights, abs=1e-4)
        assert g.member_weights[1] < min(g.member_weights[0], g.member_weights[2]), "the scaled member is outvoted"
    for in_group, as_actor in zip(group.ensemble.members, actors.ensemble.members):
        for key, value in as_actor.state_dict().items():
            torch.testing.assert_close(in_group.state_dict()[key], value, rtol=1e-4, atol=1e-5)


class MovesBatches(DigitsDataModule):
    """Digits whose datamodule changes each batch once it is on the device (a hook a group runs per member)."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return batch


CHANGES_BATCHES: list[bool] = []


class RecordsBatchChanges(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        CHANGES_BATCHES.append(trainer.strategy.group.changes_batches)


@pytest.mark.parametrize("datamodule, changes", [(DigitsDataModule, False), (MovesBatches, True)], ids=["plain", "batch-hook"])
def test_group_knows_whether_your_code_changes_its_batches(datamodule, changes):
    CHANGES_BATCHES.clear()
    trainer = quiet_trainer(strategy=HQDEStrategy(num_members=2, sync="none", seed=0), max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[RecordsBatchChanges()])
    trainer.fit(DigitsModule(), datamodule=datamodule())
    assert CHANGES_BATCHES == [changes, changes]  # once per member


def test_a_group_on_a_gpu_gathers_there_when_the_training_set_fits(monkeypatch):
    """`GroupStrategy` gathers on the GPU a dataset that takes at most GATHER_ON_GPU_BYTES and a quarter of the free memory,
    unless your code changes batches before they are on the device, and says so once; on a CPU it gathers where the data is."""
    notices = []
    changes = SimpleNamespace(changes_batches=False)
    fake = SimpleNamespace(root_device=torch.device("cuda", 0), group=changes, sync=SimpleNamespace(forwarder=SimpleNamespace(handle=notices.extend)))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**20, 16 * 2**20))  # 8 MiB free: a quarter is 2 MiB
    gather_on = lambda dataset: group_strategy.GroupStrategy._gather_on(fake, dataset)  # noqa: E731
    mib = lambda n: TensorDataset(torch.zeros(n * 2**16, 2), torch.zeros(n * 2**16, dtype=torch.int64))  # noqa: E731  # n MiB

    assert gather_on(mib(2)) == torch.device("cuda", 0)
    assert [n.message for n in notices] == ["HQDEStrategy: the training TensorDataset (2.0 MB) is copied to cuda:0 at each epoch's start; the members' batches are gathered there."]
    assert not notices[0].warning
    assert gather_on(mib(3)) is None, "over a quarter of the free memory"
    monkeypatch.setattr(group_strategy, "GATHER_ON_GPU_BYTES", 2**20)
    assert gather_on(mib(2)) is None, "over GATHER_ON_GPU_BYTES"
    assert gather_on(mib(1)) == torch.device("cuda", 0)
    changes.changes_batches = True
    assert gather_on(mib(1)) is None, "a batch hook sees batches before they are on the device"
    changes.changes_batches, fake.root_device = False, torch.device("cpu")
    assert gather_on(mib(1)) is None
