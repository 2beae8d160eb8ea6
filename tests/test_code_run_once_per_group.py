"""Your code that a member group runs once, on your module, for all its members (probe L): your data hooks (``setup``,
``prepare_data``), ``configure_optimizers``, ``optimizer_step``/``backward``/``optimizer_zero_grad``, batch hooks on
validation batches. What it does must reach every member as each member's own fit would have it.

Truth: member i trained alone by a plain ``Trainer`` (seed + i, its own data order).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import quiet_trainer
from test_groups import FIT, MEMBERS, SEED, Net, assert_same_members, solo_fits, train_loader

from hqde_lightning import HQDEStrategy

STEPS = FIT["max_epochs"] * FIT["limit_train_batches"]
CLIP = 0.05


class SetsAttributesOnce(Net):
    """``setup`` sets a loss scale the steps use, ``optimizer_step`` counts the steps and clips the first layer's weights
    after each update (a WGAN critic's constraint)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = 1.0
        self.steps = 0
        self.prepared_in: str | None = None
        self.set_up_for: int | None = None

    def prepare_data(self) -> None:
        self.prepared_in = str(self.trainer.state.fn)

    def setup(self, stage: str) -> None:
        self.set_up_for = self.trainer.max_epochs
        self.scale = 0.5

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y) * self.scale

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.steps += 1
        with torch.no_grad():
            self.net[0].weight.clamp_(-CLIP, CLIP)


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_what_your_setup_and_optimizer_step_do_reaches_every_member(vectorize):
    """Before: the members trained with the loss scale they were built with (1.0, not `setup`'s 0.5), counted no
    steps, and the clipping reached no member (its weights up to 0.15)."""
    hparams = dict(optimizer="sgd", batchnorm=False)
    solo = [model for model, _ in solo_fits(hparams, SetsAttributesOnce)]
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=vectorize)
    model = SetsAttributesOnce(**hparams)
    quiet_trainer(strategy=strategy, **FIT).fit(model, train_loader())
    members = strategy.ensemble.members
    assert_same_members([m.state_dict() for m in members], [m.state_dict() for m in solo])
    assert [(m.scale, m.steps, m.set_up_for) for m in members] == [(0.5, STEPS, FIT["max_epochs"])] * MEMBERS
    assert all(float(m.net[0].weight.abs().max()) <= CLIP + 1e-7 for m in members)
    # `self.trainer` works in `prepare_data` and `setup` (above), as in a plain fit (before: "not attached to a `Trainer`")
    assert model.prepared_in == "TrainerFn.FITTING"


class ReturnsOutputs(Net):
    """A ``validation_step`` returning a dict without ``"loss"`` (Lightning allows any dict there), collected per member."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.correct = 0

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return {"preds": self.net(x).argmax(-1), "target": y}

    def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        self.correct += int((outputs["preds"] == outputs["target"]).sum())


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_a_validation_step_may_return_a_dict_without_loss(vectorize):
    """Before: `KeyError: 'loss'` in every group fit."""
    hparams = dict(optimizer="sgd", batchnorm=False)
    fit = {**FIT, "limit_val_batches": 2}
    solo = [model for model, _ in solo_fits(hparams, ReturnsOutputs, fit=fit, val=train_loader)]
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=vectorize)
    quiet_trainer(strategy=strategy, **fit).fit(ReturnsOutputs(**hparams), train_loader(), train_loader())
    assert [m.correct for m in strategy.ensemble.members] == [m.correct for m in solo]
    assert all(m.correct > 0 for m in solo)


class ReturnsNoLoss(Net):
    def training_step(self, batch, batch_idx):
        return {"logits": self.net(batch[0])}


def test_a_training_step_dict_without_loss_is_refused_as_lightning_refuses_it():
    with pytest.raises(MisconfigurationException, match="the 'loss' key needs to be present"):
        quiet_trainer(strategy=HQDEStrategy(num_members=2, vectorize=False), **FIT).fit(ReturnsNoLoss(), train_loader())


class ChecksItsOptimizer(Net):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.kinds: set[tuple[bool, bool]] = set()

    def on_before_optimizer_step(self, optimizer):
        self.kinds.add((isinstance(optimizer, torch.optim.SGD), isinstance(optimizer, torch.optim.Optimizer)))


def test_hooks_get_an_optimizer_that_is_an_instance_of_yours():
    """As a plain fit passes your optimizer itself (before: the member's view failed both checks)."""
    strategy = HQDEStrategy(num_members=2, sync="none", seed=SEED)
    quiet_trainer(strategy=strategy, **FIT).fit(ChecksItsOptimizer(optimizer="sgd", batchnorm=False), train_loader())
    assert [m.kinds for m in strategy.ensemble.members] == [{(True, True)}] * 2
