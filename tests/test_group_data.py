"""Training data a member group reads as each member's own fit reads it.

Beyond a ``TensorDataset`` (``test_groups.py``): several training loaders, a dataset that draws a
random augmentation in ``__getitem__`` (from torch's, numpy's and Python's generators), and a
``collate_fn`` that pads sequences to each batch's longest, so that the members' batches differ in
shape. Member ``i`` of the group is compared with member ``i`` trained alone by a plain ``Trainer``.
"""

from __future__ import annotations

import logging
import random
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from models import digits, quiet_trainer
from test_groups import MEMBERS, SEED, MemberOrderEpochs, Net, assert_same_members
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hqde_lightning import HQDEStrategy
from hqde_lightning.member_data import member_loader

FIT = dict(max_epochs=2, limit_train_batches=5, limit_val_batches=0)


class EveryOrderEpochs(pl.Callback):
    """Seeds the order of each of the member's loaders for the epoch at its start (as ``MemberOrderEpochs`` does for one)."""

    def __init__(self, loaders: dict[str, DataLoader]) -> None:
        self.loaders = loaders

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for each in self.loaders.values():
            each.member_order.start_epoch(trainer.current_epoch)


def alone(make_module, make_loaders, fit: dict = FIT) -> list[pl.LightningModule]:
    """Each member trained alone: its seed, its own order of every training loader (a loader or a dict of them)."""
    models = []
    for i in range(MEMBERS):
        pl.seed_everything(SEED + i, verbose=False)
        model = make_module()
        loaders = make_loaders()
        if isinstance(loaders, dict):
            own = {k: member_loader(v, SEED, i, 0, False, print, fill_generators=True) for k, v in loaders.items()}
            callback = EveryOrderEpochs(own)
        else:
            own, callback = member_loader(loaders, SEED, i, 0, False, print, fill_generators=True), MemberOrderEpochs()
        quiet_trainer(**fit, callbacks=[callback]).fit(model, own)
        models.append(model)
    return models


def in_a_group(make_module, make_loaders, vectorize, fit: dict = FIT, **trainer_kwargs) -> list[pl.LightningModule]:
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=vectorize)
    quiet_trainer(strategy=strategy, **fit, **trainer_kwargs).fit(make_module(), make_loaders())
    return list(strategy.ensemble.members)


def same(group: list[pl.LightningModule], solo: list[pl.LightningModule]) -> None:
    assert_same_members([m.state_dict() for m in group], [m.state_dict() for m in solo])


def loader(dataset: Dataset, batch_size: int = 32, **kwargs) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator(), **kwargs)


class TwoLoaders(Net):
    """``Net`` trained on two loaders at once (Lightning combines a dict of loaders): the sum of both losses."""

    def training_step(self, batch, batch_idx):
        return sum(F.cross_entropy(self.net(x), y) for x, y in batch.values())


def two_loaders() -> dict[str, DataLoader]:
    x, y = digits()
    return {"a": loader(torch.utils.data.TensorDataset(x[:320], y[:320]), 16), "b": loader(torch.utils.data.TensorDataset(x[320:480], y[320:480]), 16)}


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_several_training_loaders_each_give_every_member_its_own_order_every_epoch(vectorize):
    """Each member reads every loader of a dict in its own order of each epoch: after two epochs it is where its own fit is
    (before, the orders in a dict of loaders were seeded for the first epoch only)."""
    make = lambda: TwoLoaders(optimizer="sgd", batchnorm=False)  # noqa: E731
    same(in_a_group(make, two_loaders, vectorize), alone(make, two_loaders))


class Augmented(Dataset):
    """Digits with a random augmentation drawn in ``__getitem__``: noise from torch, a flip from numpy, a scale from Python."""

    def __init__(self) -> None:
        self.x, self.y = digits()
        self.x, self.y = self.x[:480], self.y[:480]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i] + 0.1 * torch.randn(64)
        if np.random.rand() < 0.5:
            x = x.view(8, 8).flip(1).reshape(64)
        return x * random.uniform(0.8, 1.2), self.y[i]


@pytest.mark.parametrize("vectorize, dropout", [(True, 0.0), (False, 0.3)], ids=["vmap", "loop-with-dropout"])
def test_a_random_augmentation_in_the_dataset_is_each_members_own_draw(vectorize, dropout):
    """A member's batches are made from its own torch, numpy and Python streams, as in its own fit, also when its looped
    steps draw dropout masks from the same torch stream in between (before, every member's augmentation came from the
    group's streams: 0.17 from alone, silently)."""
    make = lambda: Net(optimizer="sgd", batchnorm=False, dropout=dropout)  # noqa: E731
    data = lambda: loader(Augmented())  # noqa: E731
    same(in_a_group(make, data, vectorize), alone(make, data))


def test_a_resumed_fit_draws_the_augmentation_an_uninterrupted_one_draws(tmp_path):
    """The members' numpy and Python streams are in the group's checkpoints: resuming after the first epoch ends where the
    uninterrupted fit ends."""
    make = lambda: Net(optimizer="sgd", batchnorm=False)  # noqa: E731
    data = lambda: loader(Augmented())  # noqa: E731
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    uninterrupted = in_a_group(make, data, False, callbacks=[checkpoints], enable_checkpointing=True)
    strategy = HQDEStrategy(num_members=MEMBERS, sync="none", seed=SEED, vectorize=False)
    quiet_trainer(strategy=strategy, **FIT).fit(make(), data(), ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    same(list(strategy.ensemble.members), uninterrupted)


class Sequences(Dataset):
    """Digits as sequences of 4 to 16 four-pixel tokens (cut at a length drawn per sample), labelled by digit."""

    def __init__(self) -> None:
        x, self.y = digits()
        self.tokens = x[:480].view(-1, 16, 4)
        self.y = self.y[:480]
        self.lengths = torch.randint(4, 17, (480,), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.tokens[i, : self.lengths[i]], self.y[i]


def pad_to_longest(samples):
    """Pads each batch's sequences to its longest (so batches differ in shape), with a mask of the real tokens."""
    sequences, labels = zip(*samples)
    padded = nn.utils.rnn.pad_sequence(list(sequences), batch_first=True)
    mask = torch.arange(padded.shape[1])[None, :] < torch.tensor([len(s) for s in sequences])[:, None]
    return padded, mask, torch.stack(labels)


class MeanOfTokens(pl.LightningModule):
    """A token MLP averaged over the real tokens of a padded sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Linear(4, 32)
        self.head = nn.Linear(32, 10)

    def training_step(self, batch, batch_idx):
        tokens, mask, y = batch
        h = torch.relu(self.embed(tokens)) * mask[..., None]
        return F.cross_entropy(self.head(h.sum(1) / mask.sum(1, keepdim=True)), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_members_batches_of_different_shapes_train_each_member_as_alone(caplog):
    """Sequences padded to each batch's longest: where the members' batches differ in shape, that step runs member by member
    (saying so once), the others with vmap, and every member ends where its own fit does (before, the fit failed there)."""
    data = lambda: loader(Sequences(), 16, collate_fn=pad_to_longest)  # noqa: E731
    with caplog.at_level(logging.INFO):
        group = in_a_group(MeanOfTokens, data, True)
    assert caplog.text.count("the members' batches differ in shape") == 1
    same(group, alone(MeanOfTokens, data))


class HostAugmented(Net):
    """``Net`` augmenting its training batches in ``on_after_batch_transfer`` with numpy's and Python's global generators
    (noise and a flip)."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        if self.trainer.training:
            x = x + torch.from_numpy(np.random.normal(0.0, 0.1, x.shape).astype(np.float32))
            if random.random() < 0.5:
                x = x.view(-1, 8, 8).flip(2).reshape(-1, 64)
        return x, y


def test_numpy_and_python_draws_in_batch_hooks_are_each_members_own():
    """A member's batch hooks draw from its own numpy and Python streams, as its own fit does (before, from the group's:
    0.02-0.06 from alone)."""
    make = lambda: HostAugmented(optimizer="sgd", batchnorm=False)  # noqa: E731
    data = lambda: loader(torch.utils.data.TensorDataset(*[t[:480] for t in digits()]))  # noqa: E731
    same(in_a_group(make, data, False), alone(make, data))


class GlobalShuffle(torch.utils.data.Sampler):
    """Shuffles with torch's global generator, and has no ``generator`` attribute."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n).tolist())


class OwnShuffle(GlobalShuffle):
    """Shuffles with a numpy generator of its own (seeded once), and has no ``generator`` attribute."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.rng = np.random.default_rng(0)

    def __iter__(self):
        return iter(self.rng.permutation(self.n).tolist())


@pytest.mark.parametrize("sampler", [GlobalShuffle, OwnShuffle])
def test_a_sampler_without_a_generator_orders_each_member_as_its_own_fit(sampler):
    """A sampler without a ``generator`` attribute draws from the member's own streams (torch's global one here), or
    from a random state of its own, copied per member so that members share its order, as the warning says (before, the
    first drew from the group's stream over a TensorDataset, and the members of the second drew successive
    permutations of one generator: 0.08-0.12 from alone either way)."""
    x, y = digits()
    data = lambda: DataLoader(torch.utils.data.TensorDataset(x[:480], y[:480]), batch_size=32, sampler=sampler(480))  # noqa: E731
    make = lambda: Net(optimizer="sgd", batchnorm=False)  # noqa: E731
    with pytest.warns(UserWarning, match="has no `generator` attribute"):
        group = in_a_group(make, data, True)
    same(group, alone(make, data))


def test_bagging_says_it_leaves_a_weighted_sampler_out():
    """``bagging=True`` draws each member's bootstrap sample uniformly: a ``WeightedRandomSampler``'s weights are not used,
    and a warning says so (before, they were dropped silently)."""
    x, y = digits()
    weighted = DataLoader(torch.utils.data.TensorDataset(x[:480], y[:480]), batch_size=32, sampler=torch.utils.data.WeightedRandomSampler(torch.ones(480), 480))
    with pytest.warns(UserWarning, match=r"bagging=True\)` draws each member's bootstrap sample uniformly .* WeightedRandomSampler"):
        member_loader(weighted, SEED, 0, 0, True, lambda message: warnings.warn(message))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        member_loader(loader(torch.utils.data.TensorDataset(x[:480], y[:480])), SEED, 0, 0, True, lambda message: warnings.warn(message))


class SkipsForMember1(Net):
    def on_train_batch_start(self, batch, batch_idx):
        return -1 if self.trainer.strategy.member_index == 1 and batch_idx == 3 else None


def test_a_skip_of_some_members_only_is_reported():
    """``on_train_batch_start`` returning -1 for one member does not skip the group's epoch: a warning says that member
    goes on training (it used to, silently)."""
    with pytest.warns(UserWarning, match="returned -1 .* for some members only"):
        in_a_group(lambda: SkipsForMember1(optimizer="sgd", batchnorm=False), lambda: loader(torch.utils.data.TensorDataset(*[t[:480] for t in digits()])), False)
