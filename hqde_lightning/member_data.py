"""Each member's own training data order, alone or stacked for a member group.

:func:`member_loader` gives the loader member ``index`` trains on: a copy of the user's loader
whose sampler draws from a generator seeded from ``(seed, index, epoch)`` (or, with bagging, a
loader over the member's bootstrap sample). The user's loader is never changed, so one loader
can give any number of members their own loaders. Its :class:`MemberOrder` re-seeds the
generators at the start of every epoch (:func:`start_epoch`), so a member's order in an epoch
depends on ``(seed, index, epoch)`` only: a fit resumed from a checkpoint reads the orders the
uninterrupted fit would have read.

:func:`group_loader` builds the loaders of the k members of one group and wraps them in a
:class:`GroupLoader`, which iterates them in lockstep and yields one batch per step whose tensors
are the k members' batches stacked on a new leading dimension (``[k, B, ...]``).
:func:`member_batch` takes member ``i``'s batch back out of a stacked one, and
:func:`group_batch_size` tells its per-member batch size ``B``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.data import _update_dataloader, extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_leaves, tree_map, tree_unflatten
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler, SubsetRandomSampler, TensorDataset, default_collate

__all__ = [
    "GatheredGroupLoader", "GroupLoader", "MemberOrder", "MemberValues", "group_batch_size", "group_loader", "member_batch", "member_loader", "ragged",
    "stack_batches", "start_epoch",
]

Warn = Callable[[str], None]
#: the context a member's batch is made in, by the member's place in the group (see :class:`GroupLoader`)
FetchingAs = Callable[[int], AbstractContextManager[None]]


def member_loader(
    loader: DataLoader, seed: int, index: int, epoch: int, bagging: bool, warn: Warn, *, fill_generators: bool = False
) -> DataLoader:
    """The loader member ``index`` trains on in epoch ``epoch``: a copy of ``loader`` with the member's own order.

    With ``bagging=True`` the copy draws the member's bootstrap sample: ``len(dataset)`` indices
    drawn with replacement by ``numpy.random.default_rng([seed, index])``, shuffled by a
    ``SubsetRandomSampler``. Otherwise every ``torch.Generator`` the loader carries (its sampler's
    or custom batch sampler's ``generator`` attribute, and the loader's own ``generator``, from
    which worker seeds are drawn) is replaced in the copy by the member's own, seeded from
    ``numpy.random.SeedSequence([seed, index, epoch, role])``, so a loader built with
    ``shuffle=True, generator=torch.Generator().manual_seed(0)`` gives each member its own order.
    The copy's ``member_order`` (a :class:`MemberOrder`) re-seeds them for a later epoch.

    A ``generator`` attribute that is ``None`` (``shuffle=True`` without a generator: the sampler
    draws from torch's global RNG) is left as it is, unless ``fill_generators=True``, which puts
    the member's generator there too, so the order depends on ``(seed, index, epoch)`` only (what
    members sharing one process and its global RNG need). Left as they are: a
    ``SequentialSampler`` (``shuffle=False``: the order the user asked for), custom samplers
    without a ``generator`` attribute and iterable datasets; the last two are reported through
    ``warn(message)``.

    Raises:
        MisconfigurationException: ``bagging=True`` with a dataset that is iterable or has no length.
    """
    order = MemberOrder(seed, index)
    if bagging:
        copied = _bootstrap_loader(loader, seed, index, order.sampler)
        if not isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
            warn(
                f"`HQDEStrategy(bagging=True)` draws each member's bootstrap sample uniformly and shuffles it: the training loader's"
                f" {type(loader.sampler).__name__} (its weights or order) is not used."
            )
    else:
        copied = _copy_loader(loader)
        if isinstance(loader.dataset, IterableDataset):
            warn(
                f"the training dataset is iterable ({type(loader.dataset).__name__}): HQDEStrategy cannot give each member"
                " its own order, so members read the same stream unless the dataset draws from torch's, numpy's or"
                " Python's global RNG (seeded per member). Shuffle inside the dataset with such a draw, or use a map-style dataset."
            )
        else:
            _reseed_sampler(copied, order.sampler, warn, fill_generators)
    if isinstance(copied.generator, torch.Generator) or (fill_generators and copied.generator is None):
        copied.generator = order.loader
    order.start_epoch(epoch)
    copied.member_order = order
    return copied


class MemberOrder:
    """The generators of member ``index``'s loader, seeded per epoch from ``(seed, index, epoch)``.

    ``sampler`` orders the batches (the sampler's or batch sampler's ``generator``), ``loader``
    is the loader's own ``generator``, from which a ``DataLoader`` iterator draws its workers'
    base seed when it starts. They are two generators so that the order does not depend on
    whether that draw came before the epoch's re-seeding: Lightning starts the first epoch's
    iterator (and a resumed fit's) before ``on_train_epoch_start``, later ones after it.
    """

    def __init__(self, seed: int, index: int) -> None:
        self.seed, self.index = seed, index
        self.sampler = torch.Generator()
        self.loader = torch.Generator()

    def start_epoch(self, epoch: int) -> None:
        """Seeds both generators for ``epoch``: the state an uninterrupted fit and a resumed one both start it from."""
        for role, generator in enumerate((self.sampler, self.loader)):
            state = np.random.SeedSequence([self.seed, self.index, epoch, role]).generate_state(1)
            generator.manual_seed(int(state[0]))


def start_epoch(loaders: object, epoch: int) -> None:
    """Re-seeds the member orders in ``loaders`` for ``epoch``: a member loader, a group loader's member loaders, or
    those in a dict, list or tuple of them (several training loaders, which Lightning combines).

    Called from ``on_train_epoch_start`` with ``trainer.train_dataloader``; loaders that are not
    member loaders are left alone.
    """
    for loader in tree_leaves(loaders):
        for each in loader.loaders if isinstance(loader, GroupLoader) else [loader]:
            order = getattr(each, "member_order", None)
            if isinstance(order, MemberOrder):
                order.start_epoch(epoch)


def group_loader(
    loader: Iterable[Any], seed: int, indices: Sequence[int], epoch: int, bagging: bool, warn: Warn,
    gather_on: Callable[[TensorDataset], torch.device | None] | None = None, fetching_as: FetchingAs | None = None,
) -> GroupLoader:
    """The :class:`GroupLoader` of the members ``indices`` of one group, each with its own order.

    Member ``i``'s loader is ``member_loader(loader, seed, i, epoch, bagging, warn,
    fill_generators=True)``: its order depends on ``(seed, i, epoch)`` only, not on which members
    share the group. An iterable dataset (or an iterable that is not a ``DataLoader``) cannot be
    copied into independent orders: the members read one shared stream, each batch going to
    every member, and ``warn`` says so once. Each distinct message reaches ``warn`` once. Over an
    in-memory ``TensorDataset`` the group gathers its batches itself (:class:`GatheredGroupLoader`),
    on the device ``gather_on(dataset)`` names (``None``, or no ``gather_on``: where the dataset is).
    Otherwise each member's batch is made inside ``fetching_as(position)`` (see :class:`GroupLoader`).

    Raises:
        ValueError: ``indices`` is empty.
        MisconfigurationException: ``bagging=True`` without a ``DataLoader`` over a map-style dataset.
    """
    indices = list(indices)
    if not indices:
        raise ValueError("`indices` must name at least one member; got an empty sequence.")
    warn_once = _once(warn)
    if not isinstance(loader, DataLoader):
        if bagging:
            raise MisconfigurationException(
                f"`HQDEStrategy(bagging=True)` needs a torch DataLoader over a map-style training dataset; got {type(loader).__name__}."
            )
        if len(indices) > 1:
            warn_once(
                f"the training loader is a {type(loader).__name__}, not a torch DataLoader: HQDEStrategy cannot copy it, so"
                f" members {indices}, trained in one process, read one shared stream and train on the same order."
                " Use a DataLoader over a map-style dataset to give each member its own order."
            )
        return GroupLoader([loader] * len(indices), fetching_as)
    if len(indices) > 1 and isinstance(loader.dataset, IterableDataset) and not bagging:
        warn_once(
            f"the training dataset is iterable ({type(loader.dataset).__name__}): members {indices}, trained in one process,"
            " read one shared stream (each batch goes to every one of them), so they train on the same order. Use a"
            " map-style dataset (with `__len__` and `__getitem__`) to give each member its own order."
        )
        shared = member_loader(loader, seed, indices[0], epoch, bagging, _ignore, fill_generators=True)
        return GroupLoader([shared] * len(indices), fetching_as)
    loaders = [member_loader(loader, seed, i, epoch, bagging, warn_once, fill_generators=True) for i in indices]
    if not all(map(_gatherable, loaders)):
        return GroupLoader(loaders, fetching_as)
    return GatheredGroupLoader(loaders, None if gather_on is None else gather_on(loader.dataset))  # type: ignore[arg-type]


class MemberValues(list):
    """The k members' values of one non-tensor leaf of a stacked batch (a string, an int, ``None``...), in member order."""


class GroupLoader:
    """Iterates k member loaders in lockstep; each step yields their k batches stacked.

    Every tensor of the stacked batch is the k members' tensors stacked on a new dimension 0
    (``[k, B, ...]``); tuples, lists, dicts and namedtuples keep their structure, and every other
    value becomes the :class:`MemberValues` list of the k members' values, as does a tensor whose
    shape differs between the members' batches (:func:`stack_batches`). A loader object given
    several times is iterated once per step and its batch goes to each of those members (one
    shared stream). ``len()`` is the loaders' common length, when they have one.

    ``fetching_as(position)``, when given, is entered while the member at ``position`` (the first
    of a shared stream's) starts its iterator and makes each batch: the group's member's own random
    streams (:meth:`~hqde_lightning.stacking.StackedMembers.member_rng`), so that what a dataset draws
    in ``__getitem__`` (a random augmentation) is what the member's own fit draws.

    Raises:
        ValueError: no loaders, or loaders of different lengths; while iterating, loaders that
            end at different steps or members' batches of different structure.
    """

    def __init__(self, loaders: Sequence[Iterable[Any]], fetching_as: FetchingAs | None = None) -> None:
        if not loaders:
            raise ValueError("GroupLoader needs at least one member loader; got none.")
        self.loaders: list[Iterable[Any]] = list(loaders)
        self.fetching_as = fetching_as
        self._streams: list[Iterable[Any]] = []
        self._stream_of: list[int] = []  # member position -> index into _streams
        for item in self.loaders:
            found = next((s for s, stream in enumerate(self._streams) if stream is item), None)
            if found is None:
                self._streams.append(item)
                found = len(self._streams) - 1
            self._stream_of.append(found)
        #: per stream, the place of the first member reading it (whose random streams make its batches)
        self._first_reader = [self._stream_of.index(s) for s in range(len(self._streams))]
        lengths = [_length(stream) for stream in self._streams]
        if len({n for n in lengths if n is not None}) > 1:
            raise ValueError(f"the member loaders of a group must have the same length; got lengths {lengths}.")

    def __len__(self) -> int:
        return len(self._streams[0])  # type: ignore[arg-type]  # TypeError for loaders without a length, as for theirs

    def __iter__(self) -> Iterator[Any]:
        iterators = [self._as_member(s, iter, stream) for s, stream in enumerate(self._streams)]
        step = 0
        while True:
            batches = [self._as_member(s, next, it, _END) for s, it in enumerate(iterators)]
            ended = [s for s, batch in enumerate(batches) if batch is _END]
            if len(ended) == len(batches):
                return
            if ended:
                members = [m for m, s in enumerate(self._stream_of) if s in ended]
                raise ValueError(f"the loaders of members {members} (positions in the group) ended after {step} batches, before the others.")
            yield stack_batches([batches[s] for s in self._stream_of], step)
            step += 1


    def _as_member(self, stream: int, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)`` inside ``fetching_as`` of the first member reading ``stream``."""
        if self.fetching_as is None:
            return call(*args)
        with self.fetching_as(self._first_reader[stream]):
            return call(*args)


class GatheredGroupLoader(GroupLoader):
    """A :class:`GroupLoader` over member loaders that read one in-memory ``TensorDataset`` (see :func:`_gatherable`).

    Each step takes the k members' next index batches from their own loaders' samplers and
    gathers them with one ``index_select`` per tensor (the k·B rows, viewed as ``[k, B, ...]``) instead of
    k·B ``__getitem__`` calls, k collations and a stack. The batches are the ones
    :class:`GroupLoader` yields, a list of ``[k, B, ...]`` tensors as the default collation makes
    them; on a GPU, where a small model's step is short, this keeps the data from costing more
    than the step.

    Args:
        loaders: the members' loaders (see :class:`GroupLoader`).
        device: where to gather (default: where the dataset's tensors are). The dataset's tensors
            are copied there when an iteration starts (each epoch), so the batches come out on
            ``device`` and nothing is copied per step but the indices.
    """

    def __init__(self, loaders: Sequence[Iterable[Any]], device: torch.device | None = None) -> None:
        super().__init__(loaders)
        self.device = device

    def __iter__(self) -> Iterator[Any]:
        # a DataLoader's iterator draws its base seed from the loader's generator before the sampler runs: so does this
        iterators = [iter(stream) for stream in self._streams]
        tensors = [t if self.device is None else t.to(self.device) for t in self._streams[0].dataset.tensors]  # type: ignore[attr-defined]
        devices = {t.device for t in tensors}  # the indices go to each of them once a step
        step = 0
        while True:
            indices = [next(it._sampler_iter, _END) for it in iterators]  # type: ignore[attr-defined]
            ended = [s for s, batch in enumerate(indices) if batch is _END]
            if len(ended) == len(indices):
                return
            sizes = [len(batch) if batch is not _END else 0 for batch in indices]
            if ended or len(set(sizes)) > 1:
                raise ValueError(
                    f"at step {step} the members' batches have sizes {[sizes[s] for s in self._stream_of]} (one per member)."
                    " A group stacks its members' batches, so each member's batch must have the same size."
                )
            # index lists through numpy: ~5x faster than torch.as_tensor on nested lists (a step of a small model on a GPU is short)
            gather = torch.from_numpy(np.array([indices[s] for s in self._stream_of], dtype=np.int64))
            # rows copied whole by `index_select`: 4-7x faster on a CPU than indexing with the [k, B] index tensor (`tensor[gather]`)
            flat = {device: gather.view(-1).to(device, non_blocking=True) for device in devices}
            yield [t.index_select(0, flat[t.device]).reshape(*gather.shape, *t.shape[1:]) for t in tensors]
            step += 1


def _gatherable(loader: Iterable[Any]) -> bool:
    """Whether a member loader reads an in-memory ``TensorDataset`` in the main process with the default collation.

    Then :class:`GatheredGroupLoader` can gather the members' batches itself: a ``DataLoader``
    over exactly a ``TensorDataset``, batches from a batch sampler whose order comes from a
    generator of its own (or a sequential one), no worker processes, the default ``collate_fn``
    and no pinned memory.
    """
    if not isinstance(loader, DataLoader):
        return False
    orders, _ = _ordering_sampler(loader)
    return (
        type(loader.dataset) is TensorDataset
        and loader.batch_sampler is not None
        # its order drawn from a generator of its own: a sampler drawing from the global streams draws in the member's (`GroupLoader`)
        and (isinstance(orders, SequentialSampler) or isinstance(getattr(orders, "generator", None), torch.Generator))
        and loader.num_workers == 0
        and loader.collate_fn is default_collate
        and not loader.pin_memory
    )


def stack_batches(batches: Sequence[Any], step: int = 0) -> Any:
    """The members' ``batches`` as one batch: tensors stacked on a new dimension 0, other leaves as :class:`MemberValues`.

    Tensors whose shapes differ between members (a ``collate_fn`` that pads sequences to each
    batch's longest) are kept as :class:`MemberValues` too: such a step runs member by member
    (:func:`ragged`). ``step`` only names the step in error messages.

    Raises:
        ValueError: the batches differ in structure, or a leaf is a tensor for some members only.
    """
    flat = [tree_flatten_with_path(batch) for batch in batches]
    leaves0, spec = flat[0]
    for member, (_, other) in enumerate(flat[1:], start=1):
        if other != spec:
            raise ValueError(f"at step {step} member 0's and member {member}'s batches have different structures: {spec} and {other}.")
    stacked = []
    for position, (path, _) in enumerate(leaves0):
        values = [leaves[position][1] for leaves, _ in flat]
        tensors = [v for v in values if isinstance(v, Tensor)]
        if not tensors:
            stacked.append(MemberValues(values))
            continue
        if len(tensors) < len(values):
            kinds = [tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in values]
            raise ValueError(f"at step {step} the members' batches differ at batch{keystr(path)}: {kinds} (one per member): a tensor for some members only.")
        if len({v.shape for v in tensors}) > 1:  # (sequences padded to each batch's longest) each member's own, not stacked
            stacked.append(MemberValues(tensors))
            continue
        stacked.append(torch.stack(tensors))
    return tree_unflatten(stacked, spec)


def ragged(stacked: Any) -> bool:
    """Whether a stacked batch holds tensors whose shapes differ between members (see :func:`stack_batches`)."""
    leaves = tree_leaves(stacked, is_leaf=lambda node: isinstance(node, MemberValues))
    return any(isinstance(leaf, MemberValues) and isinstance(leaf[0], Tensor) for leaf in leaves)


def member_batch(stacked: Any, i: int) -> Any:
    """Member ``i``'s own batch from a stacked batch: ``tensor[i]`` of every tensor, ``values[i]`` of every :class:`MemberValues`."""
    return tree_map(lambda leaf: leaf[i], stacked, is_leaf=lambda node: isinstance(node, MemberValues))


def group_batch_size(stacked: Any) -> int:
    """The per-member batch size ``B`` of a stacked batch, as Lightning infers it from member 0's batch."""
    return extract_batch_size(member_batch(stacked, 0))


def _copy_loader(loader: DataLoader) -> DataLoader:
    """A shallow copy of ``loader`` (same dataset, sampler, collate_fn, workers...) that iterates on its own."""
    copied = copy.copy(loader)
    copied._iterator = None  # a persistent-workers loader keeps its iterator here; the copy starts its own
    return copied


def _ordering_sampler(loader: DataLoader) -> tuple[Any, bool]:
    """The sampler that orders ``loader``'s batches, and whether it is a batch sampler of its own (not Lightning's or
    torch's plain ``BatchSampler`` around the sampler)."""
    batch_sampler = loader.batch_sampler
    custom_batches = batch_sampler is not None and type(batch_sampler) is not BatchSampler
    return (batch_sampler if custom_batches else loader.sampler), custom_batches


def _reseed_sampler(copied: DataLoader, generator: torch.Generator, warn: Warn, fill: bool) -> None:
    """Puts ``generator`` into a copy of the sampler that orders ``copied``'s batches, when it has one."""
    sampler, custom_batches = _ordering_sampler(copied)
    if isinstance(sampler, SequentialSampler):
        return
    if not hasattr(sampler, "generator"):
        warn(
            f"the training loader's {'batch sampler' if custom_batches else 'sampler'} {type(sampler).__name__} has no"
            " `generator` attribute, so HQDEStrategy cannot give each member its own order: members share it unless the"
            " sampler draws from torch's, numpy's or Python's global RNG (seeded per member). Give it a `generator`"
            " attribute (a torch.Generator) to have it re-seeded per member."
        )
        # each member its own copy (a random state the sampler keeps starts the same in each), the dataset shared
        _install(copied, copy.deepcopy(sampler, {id(copied.dataset): copied.dataset}), custom_batches)
        return
    if not (isinstance(sampler.generator, torch.Generator) or (fill and sampler.generator is None)):
        return
    reseeded = copy.copy(sampler)
    reseeded.generator = generator
    _install(copied, reseeded, custom_batches)


def _install(copied: DataLoader, sampler: Any, custom_batches: bool) -> None:
    """Makes ``sampler`` order the copy ``copied`` of a loader: as its batch sampler (``custom_batches``), or as its sampler."""
    # DataLoader refuses to set its samplers once built; the copy is ours, so its attributes are set directly
    if custom_batches:
        vars(copied)["batch_sampler"] = sampler
        return
    vars(copied)["sampler"] = sampler
    if copied.batch_sampler is not None:
        batches = copy.copy(copied.batch_sampler)
        batches.sampler = sampler
        vars(copied)["batch_sampler"] = batches


def _bootstrap_loader(loader: DataLoader, seed: int, index: int, generator: torch.Generator) -> DataLoader:
    """``loader`` re-built around a ``SubsetRandomSampler`` over member ``index``'s bootstrap sample, shuffled by ``generator``."""
    dataset = loader.dataset
    if not hasattr(dataset, "__len__") or isinstance(dataset, IterableDataset):
        raise MisconfigurationException(
            "`HQDEStrategy(bagging=True)` needs a map-style training dataset with a length;"
            f" got {type(dataset).__name__}. Use `bagging=False` for iterable datasets."
        )
    rng = np.random.default_rng([seed, index])
    indices = rng.integers(0, len(dataset), size=len(dataset)).tolist()
    return _update_dataloader(loader, SubsetRandomSampler(indices, generator=generator))


def _length(stream: Iterable[Any]) -> int | None:
    """``len(stream)``, or ``None`` when it has none."""
    try:
        return len(stream)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):
        return None


def _once(warn: Warn) -> Warn:
    """``warn``, passing each distinct message on once."""
    seen: set[str] = set()

    def warn_once(message: str) -> None:
        if message not in seen:
            seen.add(message)
            warn(message)

    return warn_once


def _ignore(message: str) -> None:
    """A ``warn`` that drops the message."""


_END = object()
