"""Each member's own data order (``member_loader``) and a group's stacked loader (``GroupLoader``). No Ray."""

from __future__ import annotations

from collections import namedtuple

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from models import DigitsDataModule, quiet_trainer
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, SubsetRandomSampler, TensorDataset

from hqde_lightning.member_data import (
    GatheredGroupLoader, GroupLoader, MemberValues, group_batch_size, group_loader, member_batch, member_loader, ragged, stack_batches, start_epoch,
)

Sample = namedtuple("Sample", ["x", "y"])


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _indices(n: int = 10) -> TensorDataset:
    """Sample ``i`` is ``i``: a loader's order is the concatenation of its batches."""
    return TensorDataset(torch.arange(n))


def _order(loader) -> list[int]:
    return [int(i) for (batch,) in loader for i in batch]


def _shuffled(n: int = 10, batch_size: int = 4) -> DataLoader:
    return DataLoader(_indices(n), batch_size=batch_size, shuffle=True, generator=_seeded())


class _Named(Dataset):
    """Dict samples with a tensor, a string and an int."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.full((3,), float(i)), "name": f"s{i}", "i": i}


class _Pairs(Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> Sample:
        return Sample(torch.full((2, 2), float(i)), i % 2)


class _Stream(IterableDataset):
    """0..9, counting how often it is read."""

    def __init__(self) -> None:
        self.reads = 0

    def __iter__(self):
        self.reads += 1
        return iter(torch.arange(10))


class _FixedOrder(torch.utils.data.Sampler):
    def __init__(self, order: list[int]) -> None:
        self.order = order

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class _SeededBatches(BatchSampler):
    """A custom batch sampler with a ``generator`` attribute: shuffled batches of 4 out of 12."""

    def __init__(self) -> None:
        super().__init__(range(12), 4, False)
        self.generator = _seeded()

    def __iter__(self):
        order = torch.randperm(12, generator=self.generator).tolist()
        return iter([order[i : i + 4] for i in range(0, 12, 4)])


def _warnings() -> tuple[list[str], object]:
    messages: list[str] = []
    return messages, messages.append


def test_member_order_is_the_seeded_shuffle_of_seed_index_epoch():
    """A shuffled loader with a fixed generator: each member's order comes from SeedSequence([seed, index, epoch, 0])."""
    for index, epoch in [(0, 0), (1, 0), (1, 3)]:
        state = np.random.SeedSequence([5, index, epoch, 0]).generate_state(1)
        expected = torch.randperm(10, generator=torch.Generator().manual_seed(int(state[0]))).tolist()
        assert _order(member_loader(_shuffled(), 5, index, epoch, False, print)) == expected


def _epoch_orders(build, epochs: range, member: int = 0) -> list[list[int]]:
    """Member ``member``'s order in each of ``epochs`` from one loader built at the first, as Lightning iterates it.

    Lightning starts the first epoch's iterator before ``on_train_epoch_start`` (where the
    strategies call ``start_epoch``) and later epochs' iterators after it.
    """
    loader = build(epochs[0])
    orders = []
    for epoch in epochs:
        if epoch == epochs[0]:
            iterator = iter(loader)
            start_epoch(loader, epoch)
        else:
            start_epoch(loader, epoch)
            iterator = iter(loader)
        steps = list(iterator)
        orders.append([int(v) for step in steps for v in (member_batch(step, member) if isinstance(loader, GroupLoader) else step)[0]])
    return orders


@pytest.mark.parametrize("bagging", [False, True], ids=["own-order", "bagging"])
@pytest.mark.parametrize("kind", ["member", "gathered-group", "stacked-group"])
def test_a_loader_built_at_a_later_epoch_reads_the_uninterrupted_order(kind, bagging):
    """A fit resumed at epoch 2 reads member orders identical to those of a fit that ran from epoch 0."""
    loader = _shuffled(n=40, batch_size=8)
    if kind == "stacked-group":  # not gatherable: collated in the loaders
        loader = DataLoader(_indices(40), batch_size=8, shuffle=True, collate_fn=lambda batch: [torch.stack([b[0] for b in batch])])
    builders = {
        "member": lambda epoch: member_loader(loader, 5, 1, epoch, bagging, _fail),
        "gathered-group": lambda epoch: group_loader(loader, 5, [0, 1], epoch, bagging, _fail),
        "stacked-group": lambda epoch: group_loader(loader, 5, [0, 1], epoch, bagging, _fail),
    }
    build = builders[kind]
    uninterrupted = _epoch_orders(build, range(0, 4), member=1)
    resumed = _epoch_orders(build, range(2, 4), member=1)
    assert resumed == uninterrupted[2:]
    assert len({tuple(o) for o in uninterrupted}) == 4, "every epoch has its own order"
    if kind != "member":
        assert isinstance(build(0), GatheredGroupLoader) == (kind == "gathered-group")


def test_member_orders_differ_between_members_and_are_reproducible():
    orders = [_order(member_loader(_shuffled(), 5, index, 0, False, print)) for index in range(3)]
    assert len({tuple(o) for o in orders}) == 3
    assert all(sorted(o) == list(range(10)) for o in orders)
    assert _order(member_loader(_shuffled(), 5, 1, 0, False, print)) == orders[1]
    assert _order(member_loader(_shuffled(), 6, 1, 0, False, print)) != orders[1], "another seed, another order"


def test_member_loader_leaves_the_users_loader_unchanged():
    loader = _shuffled()
    plain = _order(_shuffled())
    sampler, generator = loader.sampler, loader.generator
    state = generator.get_state()
    copies = [member_loader(loader, 5, index, 0, False, print) for index in range(2)]
    for copied in copies:
        _order(copied)
    assert loader.sampler is sampler and loader.sampler.generator is generator and loader.generator is generator
    assert torch.equal(generator.get_state(), state)
    assert _order(loader) == plain
    assert copies[0].sampler is not sampler and copies[0].sampler.generator is not copies[1].sampler.generator


def test_group_member_loaders_are_independent():
    """Iterating one member's loader does not move another's order."""
    group = group_loader(_shuffled(), 5, [0, 1, 2], 0, False, print)
    expected = _order(member_loader(_shuffled(), 5, 1, 0, False, print, fill_generators=True))
    _order(group.loaders[0])
    _order(group.loaders[2])
    assert _order(group.loaders[1]) == expected


def test_group_stacks_tuple_batches_and_gives_each_member_its_own_batch():
    loader = _shuffled(n=10, batch_size=4)
    group = group_loader(loader, 5, [0, 1, 2], 0, False, print)
    alone = [list(member_loader(loader, 5, i, 0, False, print, fill_generators=True)) for i in range(3)]
    steps = list(group)
    assert len(group) == len(loader) == len(steps) == 3
    assert [tuple(step[0].shape) for step in steps] == [(3, 4), (3, 4), (3, 2)], "the last partial batch is kept"
    assert [group_batch_size(step) for step in steps] == [4, 4, 2]
    for s, step in enumerate(steps):
        for i in range(3):
            own = member_batch(step, i)
            assert isinstance(own, list) and len(own) == 1
            assert torch.equal(own[0], alone[i][s][0])


def test_each_member_sees_every_sample_once_per_epoch():
    group = group_loader(_shuffled(n=10, batch_size=4), 5, [0, 1], 0, False, print)
    for i in range(2):
        seen = [int(v) for step in group for v in member_batch(step, i)[0]]
        assert sorted(seen) == list(range(10))
    first = torch.cat([step[0] for step in group], dim=1)
    assert not torch.equal(first[0], first[1]), "members read different orders"


def test_each_pass_over_a_group_draws_new_orders_as_the_member_loaders_do():
    group = group_loader(_shuffled(), 5, [0, 1], 0, False, print)
    alone = member_loader(_shuffled(), 5, 1, 0, False, print, fill_generators=True)
    passes = [[int(v) for step in group for v in member_batch(step, 1)[0]] for _ in range(2)]
    assert passes[0] != passes[1]
    assert passes == [_order(alone), _order(alone)]


def test_group_stacks_dict_batches_and_keeps_non_tensor_values_per_member():
    loader = DataLoader(_Named(), batch_size=4, shuffle=True)
    step = next(iter(group_loader(loader, 5, [0, 1], 0, False, print)))
    assert set(step) == {"x", "name", "i"}
    assert step["x"].shape == (2, 4, 3) and step["i"].shape == (2, 4)
    assert isinstance(step["name"][0], MemberValues) and len(step["name"]) == 4 and len(step["name"][0]) == 2
    for i in range(2):
        own = member_batch(step, i)
        assert own["name"] == [f"s{int(v)}" for v in own["x"][:, 0]]
        assert torch.equal(own["i"], own["x"][:, 0].long())


def test_group_stacks_namedtuple_batches():
    loader = DataLoader(_Pairs(), batch_size=3, shuffle=True)
    steps = list(group_loader(loader, 5, [0, 1], 0, False, print))
    assert all(type(step) is Sample and step.x.shape == (2, 3, 2, 2) and step.y.shape == (2, 3) for step in steps)
    assert type(member_batch(steps[0], 1)) is Sample


def test_group_orders_do_not_depend_on_the_global_rng_or_the_group():
    """``shuffle=True`` without a generator: in a group each member's order is seeded from (seed, index, epoch)."""
    loader = DataLoader(_indices(), batch_size=4, shuffle=True)
    torch.manual_seed(0)
    pair = [_order(member) for member in group_loader(loader, 5, [0, 1], 0, False, print).loaders]
    torch.manual_seed(1)
    trio = [_order(member) for member in group_loader(loader, 5, [2, 1, 0], 0, False, print).loaders]
    assert pair == [trio[2], trio[1]]
    assert pair[0] != pair[1]


def test_group_loaders_leave_the_global_rng_alone():
    """Neither the samplers nor the worker base seeds of a group's loaders draw from torch's global RNG."""
    group = group_loader(DataLoader(_indices(), batch_size=4, shuffle=True), 5, [0, 1], 0, False, print)
    state = torch.get_rng_state()
    list(group)
    assert torch.equal(torch.get_rng_state(), state)


def test_sequential_sampler_keeps_the_users_order_for_every_member():
    loader = DataLoader(_indices(), batch_size=4, shuffle=False)
    group = group_loader(loader, 5, [0, 1, 2], 0, False, print)
    for i in range(3):
        assert [int(v) for step in group for v in member_batch(step, i)[0]] == list(range(10))


def test_bagging_draws_a_bootstrap_sample_per_member():
    loader = _shuffled(n=50, batch_size=8)
    group = group_loader(loader, 5, [0, 1], 0, True, print)
    samples = [sorted(int(v) for step in group for v in member_batch(step, i)[0]) for i in range(2)]
    assert all(len(s) == 50 for s in samples) and len(group) == len(loader)
    assert all(len(set(s)) < 50 for s in samples), "drawn with replacement"
    assert samples[0] != samples[1]
    expected = np.random.default_rng([5, 1]).integers(0, 50, size=50)
    assert samples[1] == sorted(expected.tolist())
    assert isinstance(loader.sampler, torch.utils.data.RandomSampler), "the user's loader keeps its sampler"


def test_bagging_needs_a_map_style_dataset():
    loader = DataLoader(_Stream(), batch_size=4)
    with pytest.raises(MisconfigurationException, match=r"bagging=True.*map-style.*got _Stream"):
        group_loader(loader, 5, [0, 1], 0, True, print)
    with pytest.raises(MisconfigurationException, match=r"bagging=True.*map-style.*got _Stream"):
        member_loader(loader, 5, 0, 0, True, print)


def test_iterable_dataset_shares_one_stream_across_the_group_with_one_warning():
    messages, warn = _warnings()
    stream = _Stream()
    group = group_loader(DataLoader(stream, batch_size=4), 5, [0, 1, 2], 0, False, warn)
    steps = list(group)
    assert stream.reads == 1, "the stream is read once, not once per member"
    assert len(messages) == 1 and "members [0, 1, 2]" in messages[0] and "map-style" in messages[0]
    assert [tuple(step.shape) for step in steps] == [(3, 4), (3, 4), (3, 2)]
    assert all(torch.equal(step[0], step[i]) for step in steps for i in range(3))
    assert torch.cat([step[0] for step in steps]).tolist() == list(range(10))


def test_sampler_without_generator_is_reported_once_per_group():
    messages, warn = _warnings()
    loader = DataLoader(_indices(), batch_size=4, sampler=_FixedOrder([3, 1, 2, 0, 4, 5, 6, 7, 8, 9]))
    group = group_loader(loader, 5, [0, 1, 2], 0, False, warn)
    assert len(messages) == 1 and "sampler _FixedOrder has no `generator` attribute" in messages[0]
    assert all(_order(member) == [3, 1, 2, 0, 4, 5, 6, 7, 8, 9] for member in group.loaders)


def test_custom_batch_sampler_is_reseeded_in_a_copy():
    loader = DataLoader(_indices(12), batch_sampler=_SeededBatches())
    user_generator = loader.batch_sampler.generator
    orders = [_order(member_loader(loader, 5, i, 0, False, print)) for i in range(2)]
    assert orders[0] != orders[1] and all(sorted(o) == list(range(12)) for o in orders)
    assert loader.batch_sampler.generator is user_generator


def test_subset_sampler_is_reseeded_per_member():
    loader = DataLoader(_indices(), batch_size=4, sampler=SubsetRandomSampler(range(10), generator=_seeded()))
    orders = [_order(member_loader(loader, 5, i, 0, False, print)) for i in range(2)]
    assert orders[0] != orders[1]
    assert loader.sampler.generator.initial_seed() == 0


def test_members_batches_of_different_shapes_stay_each_members_own():
    """Tensors whose shapes differ between the members are not stacked: each member gets its own (the group then runs the
    step member by member, see test_group_data.py); a tensor for some members only is refused."""
    data = _indices(8)
    group = GroupLoader([DataLoader(data, batch_size=4), DataLoader(TensorDataset(torch.arange(12)), batch_size=6)])
    batch = next(iter(group))
    assert ragged(batch) and not ragged(next(iter(GroupLoader([DataLoader(data, batch_size=4)] * 2))))
    assert [tuple(member_batch(batch, i)[0].shape) for i in range(2)] == [(4,), (6,)]
    with pytest.raises(ValueError, match=r"at step 3 the members' batches differ at batch\[0\]: \[\(4,\), 'str'\] \(one per member\): a tensor for some"):
        stack_batches([(torch.zeros(4),), ("a",)], step=3)
    with pytest.raises(ValueError, match=r"same length; got lengths \[2, 3\]"):
        GroupLoader([DataLoader(data, batch_size=4), DataLoader(data, batch_size=3)])
    with pytest.raises(ValueError, match="at least one member"):
        group_loader(DataLoader(data), 5, [], 0, False, print)


class _LoopedDigits(pl.LightningModule):
    """Trains one linear layer per member on the members' digits batches of a stacked batch."""

    def __init__(self, members: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(64, 10) for _ in range(members))
        self.sizes: list[int] = []

    def training_step(self, batch, batch_idx):
        self.sizes.append(group_batch_size(batch))
        losses = [F.cross_entropy(head(x), y) for head, (x, y) in ((h, member_batch(batch, i)) for i, h in enumerate(self.heads))]
        loss = torch.stack(losses).sum()
        self.log("train_loss", loss, batch_size=group_batch_size(batch))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fits_on_a_group_loader(tmp_path):
    """Lightning's fit loop takes a GroupLoader as a training loader: its length, every batch, the last partial one."""
    dm = DigitsDataModule()
    dm.setup("fit")
    group = group_loader(dm.train_dataloader(), 5, [0, 1], 0, False, print)
    model = _LoopedDigits(2)
    trainer = quiet_trainer(default_root_dir=str(tmp_path), limit_val_batches=0)
    trainer.fit(model, train_dataloaders=group)
    assert trainer.num_training_batches == len(group) == 19
    assert model.sizes == [64] * 18 + [48]
    assert trainer.global_step == 19
    assert not torch.equal(model.heads[0].weight, model.heads[1].weight)


def _fail(message: str) -> None:
    raise AssertionError(f"unexpected warning: {message}")


@pytest.mark.parametrize("bagging", [False, True], ids=["own-order", "bagging"])
@pytest.mark.parametrize(
    "options",
    [{"shuffle": True}, {"shuffle": True, "generator": torch.Generator().manual_seed(3)}, {"shuffle": False}, {"shuffle": True, "drop_last": True}],
    ids=["global-rng", "generator", "sequential", "drop-last"],
)
def test_gathered_group_batches_are_the_stacked_member_batches(options, bagging):
    """Over a TensorDataset, the group gathers its members' batches itself; they are exactly the member loaders' batches, stacked."""
    images = torch.randn(300, 2, 3, 3).to(memory_format=torch.channels_last)  # rows that are not contiguous in memory
    loader = DataLoader(TensorDataset(torch.randn(300, 4), images, torch.randint(0, 10, (300,))), batch_size=64, **options)
    for epoch in (0, 1):
        gathered = group_loader(loader, 5, [0, 2, 3], epoch, bagging, _fail)
        assert isinstance(gathered, GatheredGroupLoader)
        stacked = GroupLoader([member_loader(loader, 5, i, epoch, bagging, _fail, fill_generators=True) for i in [0, 2, 3]])
        fast, reference = list(gathered), list(stacked)
        assert len(fast) == len(reference) == len(gathered) > 0
        for a, b in zip(fast, reference):
            assert type(a) is type(b) is list and len(a) == len(b) == 3
            for x, y in zip(a, b):
                assert x.dtype == y.dtype and torch.equal(x, y)


def test_gathered_group_copies_the_dataset_where_it_gathers(monkeypatch):
    """With a `device`, the dataset's tensors are copied there at each pass and the batches are gathered from the copies."""
    data = TensorDataset(torch.arange(40.0).view(20, 2), torch.arange(20))
    loader = DataLoader(data, batch_size=5, shuffle=True)
    reference = list(group_loader(loader, 5, [0, 1], 0, False, _fail))
    copied = []
    real_to = torch.Tensor.to

    def marking_to(tensor, *args, **kwargs):  # a dataset tensor's copy is marked (+1000 for the inputs) to tell it from the original
        out = real_to(tensor, *args, **kwargs)
        if tensor.dim() > 0 and tensor.shape[0] == 20:
            copied.append(tensor)
            out = out + 1000 if out.is_floating_point() else out.clone()
        return out

    monkeypatch.setattr(torch.Tensor, "to", marking_to)
    gathered = group_loader(loader, 5, [0, 1], 0, False, _fail, lambda dataset: torch.device("cpu"))
    assert isinstance(gathered, GatheredGroupLoader) and gathered.device == torch.device("cpu")
    passes = []
    for _ in range(2):
        copied.clear()
        passes.append(list(gathered))
        assert copied == list(data.tensors), "each dataset tensor copied once per pass"
    batches = passes[0]  # (a second pass draws new orders, as the member loaders do)
    assert len(batches) == len(reference) == 4
    for (x, y), (x_ref, y_ref) in zip(batches, reference):
        assert torch.equal(x, x_ref + 1000) and torch.equal(y, y_ref)


def test_gathered_batches_of_a_dataset_on_another_device_come_from_there():
    """Dataset tensors on a device the indices are not on (a TensorDataset on the GPU) are gathered where they are."""
    data = TensorDataset(torch.randn(30, 3, device="meta"), torch.zeros(30, dtype=torch.long, device="meta"))
    (first, *_) = list(group_loader(DataLoader(data, batch_size=10, shuffle=True), 0, [0, 1, 2], 0, False, _fail))
    assert [t.device.type for t in first] == ["meta", "meta"] and first[0].shape == (3, 10, 3) and first[1].shape == (3, 10)


def test_loaders_the_group_cannot_gather_are_stacked():
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 10, (64,)))
    for loader in (DataLoader(data, batch_size=16, collate_fn=lambda batch: batch), DataLoader(data, batch_size=16, num_workers=1), DataLoader(list(data), batch_size=16)):
        group = group_loader(loader, 0, [0, 1], 0, False, _fail)
        assert type(group) is GroupLoader
