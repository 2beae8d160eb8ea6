"""Lightning's fine-tuning callbacks (``BackboneFinetuning``, your ``BaseFinetuning``) inside a member group.

Each member freezes its backbone, unfreezes it at an epoch and adds it to its optimizer as a new
parameter group with its own learning rate, exactly as in its own fit: member ``i`` of a group
(vectorized and looped) ends where member ``i`` trained alone by a plain ``Trainer`` ends, also
after resuming from a checkpoint written after the backbone was unfrozen.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BackboneFinetuning, BaseFinetuning, LambdaCallback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import quiet_trainer
from test_groups import MEMBERS, SEED, MemberOrderEpochs, assert_same_members, train_loader
from torch import nn

from hqde_lightning import HQDEStrategy
from hqde_lightning.member_callbacks import needs_member_attributes
from hqde_lightning.member_data import member_loader

FIT = dict(max_epochs=3, limit_train_batches=6, limit_val_batches=0)


class Backboned(pl.LightningModule):
    """A backbone (with BatchNorm) and a head; the optimizer takes the parameters that require a gradient, as Lightning's docs say."""

    def __init__(self, optimizer: str = "adam") -> None:
        super().__init__()
        self.save_hyperparameters()
        # no bias before BatchNorm: its gradient is rounding noise, which Adam turns into full steps
        self.backbone = nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.head(self.backbone(x)), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(params, lr=0.01)
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def backbone_finetuning() -> BackboneFinetuning:
    return BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.5, backbone_initial_ratio_lr=0.1)


class UnfreezesByItsWeights(BaseFinetuning):
    """Your fine-tuning: the backbone unfreezes at epoch 1 with a learning rate the member's own head chooses; with
    ``all_members=False`` only members whose head says so unfreeze it."""

    #: the learning rate each member chose, in the order they chose
    chosen: list[float] = []

    def __init__(self, all_members: bool = True) -> None:
        super().__init__()
        self.all_members = all_members

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.backbone, train_bn=False)

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch != 1:
            return
        lr = 0.02 if float(pl_module.head.bias.sum()) > 0 else 0.002
        UnfreezesByItsWeights.chosen.append(lr)
        if self.all_members or lr > 0.01:
            self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, lr=lr, train_bn=False)


def solo_states(callback, optimizer: str = "adam", resume_from_epoch: int | None = None, root=None) -> list[dict[str, torch.Tensor]]:
    """Each member trained alone (its seed, its data order, a plain ``Trainer``), or resumed at the end of ``resume_from_epoch``."""
    states = []
    for i in range(MEMBERS):
        fits = [None] if resume_from_epoch is None else [None, root / f"solo{i}" / f"epoch={resume_from_epoch}.ckpt"]
        for ckpt_path in fits:
            pl.seed_everything(SEED + i, verbose=False)
            model = Backboned(optimizer)
            loader = member_loader(train_loader(), SEED, i, 0, False, print, fill_generators=True)
            callbacks = [MemberOrderEpochs(), callback()]
            if resume_from_epoch is not None:
                callbacks.append(_every_epoch(root / f"solo{i}" / ("resumed" if ckpt_path else "")))
            quiet_trainer(**FIT, callbacks=callbacks, enable_checkpointing=resume_from_epoch is not None).fit(model, loader, ckpt_path=ckpt_path)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def group_states(callback, vectorize: bool, optimizer: str = "adam", resume_from_epoch: int | None = None, root=None) -> list[dict[str, torch.Tensor]]:
    """The members of one group; with ``vectorize=True`` their steps must really run under vmap."""
    fits = [None] if resume_from_epoch is None else [None, root / "group" / f"epoch={resume_from_epoch}.ckpt"]
    for ckpt_path in fits:
        strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=vectorize)
        callbacks = [callback()] + ([_every_epoch(root / "group" / ("resumed" if ckpt_path else ""))] if resume_from_epoch is not None else [])
        trainer = quiet_trainer(strategy=strategy, **FIT, callbacks=callbacks, enable_checkpointing=resume_from_epoch is not None)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*`vectorize=True` is ignored")
            trainer.fit(Backboned(optimizer), train_loader(), ckpt_path=ckpt_path)
    return [m.state_dict() for m in strategy.ensemble.members]


def _every_epoch(dirpath) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=dirpath, filename="{epoch}", save_top_k=-1, every_n_epochs=1)


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_backbone_finetuning_trains_each_member_of_a_group_as_alone(in_a_group, vectorize, optimizer):
    """The backbone stays as initialised for an epoch, then trains in a parameter group of its own whose learning rate
    grows each epoch; every member of the group ends exactly where its own fit ends."""
    solo = solo_states(backbone_finetuning, optimizer)
    assert_same_members(group_states(backbone_finetuning, vectorize, optimizer), solo)
    pl.seed_everything(SEED, verbose=False)
    assert not torch.allclose(Backboned().backbone[0].weight, solo[0]["backbone.0.weight"])  # the backbone did train


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_your_finetuning_gives_each_member_its_own_learning_rate_for_the_group_it_adds(in_a_group, vectorize):
    """Your ``BaseFinetuning`` subclass adds the backbone with a learning rate each member's own weights choose: the group
    adds it once to the stacked optimizer and each member steps it with its own rate, as in its own fit."""
    UnfreezesByItsWeights.chosen = []
    solo = solo_states(UnfreezesByItsWeights)
    alone, UnfreezesByItsWeights.chosen = UnfreezesByItsWeights.chosen, []
    assert len(set(alone)) == 2  # the members chose different rates
    assert_same_members(group_states(UnfreezesByItsWeights, vectorize), solo)
    assert UnfreezesByItsWeights.chosen == alone


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_a_group_resumes_the_parameter_groups_each_member_added(in_a_group, tmp_path, vectorize):
    """Resumed from a checkpoint written after the backbone was unfrozen, each member gets back the parameter group it
    added (``BackboneFinetuning``'s state is the member's own) and ends where its own resumed fit ends."""
    solo = solo_states(backbone_finetuning, resume_from_epoch=1, root=tmp_path)
    assert_same_members(group_states(backbone_finetuning, vectorize, resume_from_epoch=1, root=tmp_path), solo)


def test_members_that_add_different_parameter_groups_are_refused_by_name(in_a_group):
    """One optimizer steps a group's members: members that would add a parameter group the others do not add cannot
    train in one group, and the error names them and the way out (each member in its own fit)."""
    with pytest.raises(MisconfigurationException, match=r"members \[\d(, \d)*\] have parameter group 1 .* members \[\d(, \d)*\] do not.*members_per_worker=1"):
        group_states(lambda: UnfreezesByItsWeights(all_members=False), vectorize=False)


class LogsItsBackboneNorm(UnfreezesByItsWeights):
    def on_train_epoch_end(self, trainer, pl_module):
        pl_module.log("backbone_norm", pl_module.backbone[0].weight.norm())


def test_finetuning_that_only_chooses_what_to_freeze_and_when_keeps_the_steps_vectorized():
    """``BaseFinetuning`` sets ``requires_grad`` and parameter groups, which a vectorized step keeps per member; a subclass
    that also overrides a fit hook may keep attributes on your module, so the steps then run member by member."""
    assert not needs_member_attributes(BackboneFinetuning())
    assert not needs_member_attributes(UnfreezesByItsWeights())
    assert needs_member_attributes(LogsItsBackboneNorm())
    assert needs_member_attributes(LambdaCallback(on_train_epoch_end=lambda trainer, pl_module: None))
