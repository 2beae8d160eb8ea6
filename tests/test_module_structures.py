"""Module structures a member group must keep as each member's own fit keeps them: buffers your code rebinds, tied
parameters and buffers seen from hooks, ``self.dtype`` under a true precision, lazy layers.

Member ``i`` of a group is compared with member ``i`` trained alone by a plain ``Trainer`` (``test_groups``'s
references: its seed's initial weights, its own data order).
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import quiet_trainer
from test_groups import FIT, MEMBERS, SEED, Net, assert_same_members, solo_fits, train_loader
from torch import nn

from hqde_lightning import HQDEStrategy


def _group_fit(module: Net, vectorize: bool | str, **trainer_kwargs) -> HQDEStrategy:
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=vectorize)
    quiet_trainer(strategy=strategy, **FIT, **trainer_kwargs).fit(module, train_loader())
    return strategy


class RebindsBuffers(Net):
    """A running mean of the inputs and a step counter kept in buffers that the step *rebinds* (``self.x = f(self.x)``,
    not ``self.x.mul_(...)``)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("running", torch.zeros(64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.running = 0.9 * self.running + 0.1 * x.mean(0)
        self.steps = self.steps + 1
        return F.cross_entropy(self.net(x - self.running), y)


class RebindsInAHook(RebindsBuffers):
    """Also an exponential average of the loss, which a batch-end hook rebinds (such hooks run member by member)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("loss_ema", torch.zeros(()))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.loss_ema = 0.9 * self.loss_ema + 0.1 * outputs["loss"].detach()


@pytest.mark.parametrize(("vectorize", "module"), [(True, RebindsBuffers), (False, RebindsBuffers), ("auto", RebindsInAHook)], ids=["vmap", "loop", "hook"])
def test_buffers_your_code_rebinds_keep_each_members_values(vectorize, module):
    """Before, a group put the original buffers back after every step and hook: every member ended with ``steps == 0``
    and a zero running mean (alone: 16 steps), and its weights drifted from its own fit's."""
    hparams = dict(optimizer="sgd", batchnorm=False)
    solo = [model for model, _ in solo_fits(hparams, module)]
    members = _group_fit(module(**hparams), vectorize).ensemble.members
    assert_same_members([m.state_dict() for m in members], [m.state_dict() for m in solo])
    assert all(int(m.steps) == 16 for m in members)
    assert not torch.equal(members[0].running, members[1].running)


class TiedDecoder(Net):
    """An output layer tied to the input layer (``out.weight`` is ``inp.weight`` transposed in use), and a buffer two
    submodules share; an epoch-end hook reads the tied weight through its second name."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.inp = nn.Linear(64, 32, bias=False)
        self.out = nn.Linear(32, 64, bias=False)
        self.out.weight = self.inp.weight  # (32, 64): `out` uses it transposed
        self.head = nn.Linear(64, 10)
        shift = torch.zeros(64)
        self.first, self.second = nn.Module(), nn.Module()
        self.first.register_buffer("shift", shift)
        self.second.register_buffer("shift", shift)
        self.seen: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        hidden = torch.relu(self.inp(x + self.first.shift))
        return F.cross_entropy(self.head(F.linear(hidden, self.out.weight.t()) + self.second.shift), y)

    def on_train_epoch_end(self):
        self.seen.append(float((self.out.weight - self.inp.weight).abs().sum().detach()))


def test_tied_parameters_and_buffers_are_the_members_own_under_every_name():
    """Hooks see a tied parameter's second name as the member's (before: your module's own stale copy, 40 apart), and
    a buffer two submodules share is in each member's state (before: the fit failed at its end, "Missing key")."""
    solo = [model for model, _ in solo_fits({}, TiedDecoder)]
    members = _group_fit(TiedDecoder(), "auto").ensemble.members
    assert_same_members([m.state_dict() for m in members], [m.state_dict() for m in solo])
    for member in members:
        assert member.seen == [0.0, 0.0]
        assert member.out.weight is member.inp.weight and member.first.shift is member.second.shift


class ReadsItsDtype(Net):
    """Casts its inputs to ``self.dtype``, as modules written for any precision do."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dtypes: set[torch.dtype] = set()

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.dtypes.add(self.dtype)
        loss = F.cross_entropy(self.net(x.to(self.dtype)), y)
        self.log("loss", loss, on_epoch=True)
        return loss


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_self_dtype_is_the_precisions_inside_a_groups_steps(vectorize):
    """Under ``precision="64-true"`` your module's ``self.dtype`` is float64 in its steps, as in a plain fit (before:
    float32, and ``x.to(self.dtype)`` failed against the float64 weights), and what it logs reaches
    ``trainer.callback_metrics`` in float64 (before: float32, 1.0303689 for 1.0303689043)."""
    hparams = dict(optimizer="sgd", batchnorm=False)
    solo = solo_fits(hparams, ReadsItsDtype, precision="64-true")
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=vectorize)
    trainer = quiet_trainer(strategy=strategy, precision="64-true", **FIT)
    trainer.fit(ReadsItsDtype(**hparams), train_loader())
    members = strategy.ensemble.members
    assert_same_members([m.state_dict() for m in members], [m.state_dict() for m, _ in solo])
    assert all(m.dtypes == {torch.float64} for m in members)
    for i, (_, alone) in enumerate(solo):
        for name in ("loss_step", "loss_epoch"):
            own, expected = trainer.callback_metrics[f"member_{i}/{name}"], alone.callback_metrics[name]
            assert own.dtype == expected.dtype == torch.float64
            torch.testing.assert_close(own, expected, rtol=1e-9, atol=1e-12)


class LazyFirstLayer(Net):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net[0] = nn.LazyLinear(32, bias=False)


def test_lazy_layers_that_have_not_taken_their_shapes_are_refused_before_the_fit():
    trainer = quiet_trainer(strategy=HQDEStrategy(num_members=2, seed=SEED), **FIT)
    with pytest.raises(MisconfigurationException, match=r"\['net.0.weight'\] are not initialised yet.*Run one batch through your module"):
        trainer.fit(LazyFirstLayer(), train_loader())
    model = LazyFirstLayer()
    model.net(torch.zeros(2, 64))  # shapes taken: it trains
    strategy = HQDEStrategy(num_members=2, seed=SEED, sync="none")
    quiet_trainer(strategy=strategy, **FIT).fit(model, train_loader())
    assert strategy.ensemble.members[0].net[0].weight.shape == (32, 64)


def test_two_callbacks_that_encode_the_sync_payload_are_refused_before_the_fit():
    """Before, the first of ``ByzantineMembers`` and ``AdaptiveQuantization`` acted and the other was ignored silently
    (no attack, or no quantization)."""
    from hqde_lightning.callbacks import AdaptiveQuantization, ByzantineMembers

    for callbacks in ([ByzantineMembers([1]), AdaptiveQuantization()], [AdaptiveQuantization(), ByzantineMembers([1])]):
        trainer = quiet_trainer(strategy=HQDEStrategy(num_members=2, seed=SEED), callbacks=callbacks, **FIT)
        names = [type(cb).__name__ for cb in callbacks]
        with pytest.raises(MisconfigurationException, match=re.escape(f"the callbacks {names} each encode the weights a member sends")):
            trainer.fit(Net(), train_loader())


class WithExampleInput(Net):
    """An ``example_input_array`` (the model summary runs it through the layers) and a batch hook of its own."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.example_input_array = torch.zeros(2, 64)

    def forward(self, x):
        return self.net(x)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return batch


def test_the_model_summary_runs_your_example_input_through_your_batch_hooks(caplog):
    """Before, a group failed at the start of the fit with the default ``enable_model_summary=True``: Lightning called the
    datamodule's batch hooks ("No LightningDataModule is available to call hooks on")."""
    model = WithExampleInput(batchnorm=False)
    trainer = quiet_trainer(strategy=HQDEStrategy(num_members=2, seed=SEED, sync="none"), enable_model_summary=True, **FIT)
    with caplog.at_level(logging.INFO):
        trainer.fit(model, train_loader())
    assert "[2, 64]" in caplog.text and "[2, 10]" in caplog.text  # the summary's in and out sizes


class DrawsOutsideItsState(Net):
    """A random projection (a non-persistent buffer) and a random input mask (a plain attribute), both drawn in
    ``__init__``: each member's own, and in no state dict."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("projection", torch.randn(64, 64) / 8, persistent=False)
        self.mask = (torch.rand(64) > 0.5).float()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net((x * self.mask) @ self.projection), y)


class DrawsOutsideItsStateInThreads(DrawsOutsideItsState):
    """A hook a member group cannot run (it acts on the whole module): the members train in threads, each by its own fit."""

    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()


@pytest.mark.parametrize("module", [DrawsOutsideItsState, DrawsOutsideItsStateInThreads], ids=["group", "threads"])
def test_a_resumed_fit_keeps_what_each_members_init_draws_outside_its_state(tmp_path, module):
    """Before, a resumed fit gave every member your module's projection and mask (the members were not rebuilt under
    their seeds when resuming): member 1 ended 0.09 away from the uninterrupted fit."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    hparams = dict(optimizer="sgd", batchnorm=False)
    uninterrupted = _group_fit(module(**hparams), False).ensemble.members
    first = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=False)
    quiet_trainer(strategy=first, **{**FIT, "max_epochs": 1}, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)], enable_checkpointing=True).fit(
        module(**hparams), train_loader()
    )
    resumed = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=False)
    quiet_trainer(strategy=resumed, **FIT).fit(module(**hparams), train_loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert_same_members([m.state_dict() for m in resumed.ensemble.members], [m.state_dict() for m in uninterrupted], atol=1e-6)
    for member, alone in zip(resumed.ensemble.members, uninterrupted):
        assert torch.equal(member.projection, alone.projection) and torch.equal(member.mask, alone.mask)


class Parametrized(Net):
    """``Net`` with its first layer under a ``torch.nn.utils.parametrizations`` rule (which pickle refuses to copy)."""

    def __init__(self, rule: str = "weight_norm", **kwargs) -> None:
        super().__init__(**kwargs)
        getattr(torch.nn.utils.parametrizations, rule)(self.net[0])


@pytest.mark.parametrize(("rule", "vectorize"), [("weight_norm", True), ("weight_norm", False), ("spectral_norm", "auto")])
def test_parametrized_modules_train_in_a_group_as_alone(rule, vectorize):
    """Before, the fit failed before training: pickle refuses parametrized modules, and the error's advice (create it in
    ``setup``) sent the members to threads. A member group in this process deep-copies such a fit instead."""
    hparams = dict(rule=rule, optimizer="sgd", batchnorm=False)
    solo = [model.state_dict() for model, _ in solo_fits(hparams, Parametrized)]
    members = _group_fit(Parametrized(**hparams), vectorize).ensemble.members
    assert_same_members([m.state_dict() for m in members], solo)
