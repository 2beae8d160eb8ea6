"""The embedded runtime: on one device, every member trains in one member group in the driver, without Ray.

:func:`group_blocker` says whether the members of a fit can share a process at all (nothing the
group cannot run per member), :func:`embedded_blocker` whether that process can be the driver
(``members_per_worker="auto"``, one device, no ``ray_address``); :func:`run_group` runs it. The
user's ``Trainer`` is copied (as the Ray path pickles it for its actors) and the copy fits a
:class:`~hqde_lightning.group.MemberGroup` (:func:`fit_group`, which group actors run too) with:

* :class:`~hqde_lightning.group_strategy.GroupStrategy`: Lightning's single-device strategy that
  gives each member its own data order and reads and writes whole-ensemble checkpoints in the
  same format as the Ray path;
* :class:`GroupSync`: the epoch-end sync, in this process: the members' weights go through the
  same codec, topology and aggregator as in the coordinator, and each member applies ``sync``
  (:class:`~hqde_lightning.group_actor.RemoteGroupSync` sends them to the coordinator instead).

The copy logs to your loggers directly (``member_{i}/...`` and Lightning's plain ``epoch``), profiles
with your profiler and shows Lightning's own progress bar. What comes back is one
:class:`~hqde_lightning.actors.MemberResult` per member, as from member actors.
"""

from __future__ import annotations

import copy
import inspect
import pickle
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.loggers import Logger
from lightning.pytorch.profilers import Profiler
from lightning.pytorch.trainer.call import _interrupt
from lightning.pytorch.trainer.connectors.callback_connector import _CallbackConnector
from lightning.pytorch.utilities.exceptions import _TunerExitException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from hqde_lightning.actors import FitOutcome, FitRemains, MemberResult, scalar_metrics
from hqde_lightning.attributes import callback_attributes, changed_attributes, fingerprints, plain_attributes, yours
from hqde_lightning.checkpoint import state_digest
from hqde_lightning.codec import apply_sync_, distance_to_consensus, keeps_members_apart, payload_layout, payload_nbytes, state_to_numpy
from hqde_lightning.events import ClonesEvent, DistanceEvent, Notice, sync_record
from hqde_lightning.group import GroupUnsupported, MemberGroup, unsupported_hooks
from hqde_lightning.group_strategy import GroupStrategy
from hqde_lightning.member import SyncCodec, confidence, go_on_from, reinitialise, seed_drawn_attributes, sync_state
from hqde_lightning.member_callbacks import GroupSWA, MemberCallback, MemberCopy, callback_blocker, member_callbacks, needs_member_attributes
from hqde_lightning.member_data import start_epoch
from hqde_lightning.pickling import CopiedFit
from hqde_lightning.stacking import host_rng
from hqde_lightning.topology import LocalExecutor

__all__ = ["GroupSync", "embedded_blocker", "fit_group", "group_blocker", "run_group", "with_module_callbacks"]


def group_blocker(strategy: Any, trainer: Trainer, model: LightningModule) -> str | None:
    """Why the members of this fit cannot share a process as a member group, or ``None`` when they can."""
    if strategy.members_per_worker == 1:
        return "`members_per_worker=1` asks for one Ray actor per member"
    if strategy.on_member_failure == "continue":
        return "`on_member_failure='continue'` keeps each member in its own process, so that one can fail alone"
    if not model.automatic_optimization:
        acting = sorted({type(cb).__name__ for cb in with_module_callbacks(trainer.callbacks, model) if isinstance(cb, _ACT_ON_THE_STACKED_OPTIMIZER)})
        if acting:
            return f"the module uses manual optimization, and {acting} act on a group's one stacked optimizer, which its members do not share"
    if model.automatic_optimization and getattr(trainer.precision_plugin, "scaler", None) is not None:
        return (
            "float16 mixed precision's gradient scaler would skip the update of every member of a group whenever one member's"
            " gradients overflow (each member's own fit skips only its own); `precision='bf16-mixed'` needs no scaler"
        )
    sparse = [path for path, sub in model.named_modules() if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)) and sub.sparse]
    if sparse:
        return f"the embeddings {sparse} have `sparse=True`: their sparse gradients cannot be stacked"
    hooks = unsupported_hooks(model)
    if hooks:
        return f"{type(model).__name__} overrides {hooks}, which act on the whole module (a member group runs a fit's other hooks per member or once for the group)"
    member_side = [why for why in map(callback_blocker, with_module_callbacks(trainer.callbacks, model)) if why is not None]
    if member_side:
        return "; ".join(member_side)
    return None


#: callbacks whose group versions act on the stacked optimizer: under manual optimization each member steps optimizers of its
#: own (:mod:`~hqde_lightning.manual_members`), so they send the fit to threads
_ACT_ON_THE_STACKED_OPTIMIZER = (StochasticWeightAveraging,)


def with_module_callbacks(callbacks: Sequence[Callback], model: LightningModule) -> list[Callback]:
    """``callbacks`` with those your module's ``configure_callbacks`` returns, attached as Lightning attaches them.

    A returned callback replaces the trainer's callbacks of its class or of a base class of it,
    and checkpoint callbacks go last. A group does this itself, before the fit, so that the
    returned callbacks run once per member or once for the group as the trainer's do.
    """
    if not is_overridden("configure_callbacks", model, LightningModule):
        return list(callbacks)
    returned = model.configure_callbacks()
    returned = list(returned) if isinstance(returned, Sequence) else [returned]
    replaced = {type(c) for c in callbacks if type(c) is not Callback and any(isinstance(r, type(c)) for r in returned)}
    return _CallbackConnector._reorder_callbacks([c for c in callbacks if type(c) not in replaced] + returned)


def embedded_blocker(strategy: Any, trainer: Trainer) -> str | None:
    """Why a member group cannot train every member in this process, without Ray, or ``None`` when it can.

    The members then train in Ray actors (see :func:`~hqde_lightning.resources.worker_members`).
    """
    if strategy.members_per_worker != "auto":
        return f"`members_per_worker={strategy.members_per_worker}` asks for Ray actors"
    if strategy.ray_address is not None:
        return "`ray_address` is set"
    if strategy.resources_per_member:
        return "`resources_per_member` is set"
    if isinstance(trainer.accelerator, CUDAAccelerator) and torch.cuda.device_count() > 1:
        return f"{torch.cuda.device_count()} GPUs are visible (one Ray actor per GPU)"
    return None


class ValidationDraws(Callback):
    """The random numbers your validation loaders draw, drawn from each member's stream, as in its own fit.

    A ``DataLoader`` without a ``generator`` of its own draws its iterator's base seed (and a
    ``RandomSampler`` without one its order's seed) from torch's global RNG each time Lightning
    starts a validation pass. In its own fit that is the member's stream; a group runs one
    validation pass for its members, so the draws came from this process's stream, and each
    member's later draws (dropout, noise in its steps) differed from its own fit's. This callback
    counts the draws the validation pass made (up to :data:`MAX_LOADER_DRAWS`, replaying them from
    the state after the training batch before it) and makes as many from each training member's
    stream: those made when the loaders' iterators start as the pass starts, those of a sampler at
    its first batch as it ends. (Lightning undoes the sanity check's draws, ``isolate_rng``.)
    """

    def __init__(self, group: MemberGroup) -> None:
        self.group = group
        self._before: torch.Tensor | None = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._before = torch.get_rng_state()  # a validation pass starts after a training batch

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._draw_as_members()  # the loaders' base seeds, drawn when their iterators start
        self._before = None if trainer.sanity_checking else torch.get_rng_state()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._draw_as_members()  # a sampler's seed, drawn at its first batch (and the iterators of further loaders)
        self._before = None

    def _draw_as_members(self) -> None:
        """Makes the draws since :attr:`_before` from each training member's stream, when they were loader draws."""
        now = torch.get_rng_state()
        draws = None if self._before is None else _draws_between(self._before, now)
        if not draws:
            return
        stack = self.group.stack
        for i in range(self.group.num_members):
            if not self.group.frozen[i]:
                stack.rng_states[i] = _after_draws(stack.rng_states[i], draws)


#: the most random numbers :class:`ValidationDraws` looks for (a loader's base seed and its sampler's seed, for a few loaders)
MAX_LOADER_DRAWS = 8


def _draws_between(before: torch.Tensor, after: torch.Tensor) -> int | None:
    """How many 64-bit integers drawn from torch's CPU RNG in state ``before`` lead to state ``after`` (``None``: not that)."""
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(before)
        for draws in range(MAX_LOADER_DRAWS + 1):
            if torch.equal(torch.get_rng_state(), after):
                return draws
            _draw()
    return None


def _after_draws(state: torch.Tensor, draws: int) -> torch.Tensor:
    """Torch's CPU RNG state ``state`` after ``draws`` 64-bit integers are drawn from it."""
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(state)
        for _ in range(draws):
            _draw()
        return torch.get_rng_state()


def _draw() -> None:
    """One draw as a ``DataLoader`` or ``RandomSampler`` makes it for a seed: a 64-bit integer from torch's CPU RNG."""
    torch.empty((), dtype=torch.int64).random_()


class GroupSync(Callback):
    """The group's epoch-end sync in this process, its per-member scores, and the final member snapshots.

    Args:
        hqde: the run's strategy (sync mode, aggregator, topology).
        group: the member group being trained.
        forwarder: hands sync records, distances and notices to the driver's loggers.
    """

    def __init__(self, hqde: Any, group: MemberGroup, forwarder: Any) -> None:
        self.hqde = hqde
        self.group = group
        self.forwarder = forwarder
        self.aggregator = copy.deepcopy(hqde.aggregator)
        self.history: list[dict[str, Any]] = []
        self.synced_epoch = -1
        self.check_clones = keeps_members_apart(hqde.sync, hqde.sync_strength)
        #: each member's last full Lightning checkpoint (taken when the fit ends)
        self.final: dict[int, dict[str, Any]] = {}
        self._loss_sum: torch.Tensor | None = None
        #: per member, whether any of its steps this epoch returned a loss (a member's mean loss counts only those)
        self._returned: torch.Tensor | None = None
        #: per member, the batches it trained this epoch
        self._num_batches: list[int] | None = None
        #: per member (its place in the group), the samples it trained on since the last sync round (the round's prior)
        self._num_samples = [0] * group.num_members
        #: per member, whether it trains in the batch that runs now
        self._training_flags: list[bool] = []
        #: per member (its place in the group), the score of the last epoch it trained
        self._last_scores: dict[int, float | None] = {}

    def sync_state(self) -> dict[str, Any]:
        """The coordinator's part of checkpoints: the aggregator's state (reputations) and the sync history."""
        return {"aggregator": self.aggregator.state_dict(), "history": list(self.history)}

    def load_sync_state(self, state: dict[str, Any]) -> None:
        self.aggregator.load_state_dict(state.get("aggregator", {}))
        self.history = list(state.get("history", []))

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # (the first callback) members that asked to stop, and may, stop before anything runs for the new epoch
        self.group.release_stops(trainer.current_epoch - 1)
        self._loss_sum, self._returned, self._num_batches = None, None, None
        start_epoch(trainer.train_dataloader, trainer.current_epoch)  # the members' orders of this epoch, resumed or not

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.group.release_stops(trainer.current_epoch)  # before this batch: a member that stopped trains no more of the epoch
        self._training_flags = [not stopped for stopped in self.group.frozen]  # a member that stops in this batch still trained it

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        losses, returned, training = self.group.last_losses, self.group.last_returned, self._training_flags
        if not all(training):  # a stopped member's slices still run in the stack: its mean loss counts the batches it trained only
            trains = torch.tensor(training, device=losses.device)
            losses, returned = torch.where(trains, losses, torch.zeros_like(losses)), returned & trains
        self._loss_sum = losses if self._loss_sum is None else self._loss_sum + losses
        self._returned = returned if self._returned is None else self._returned | returned
        self._num_batches = [n + t for n, t in zip(self._num_batches or [0] * len(training), training)]
        self._num_samples = [n + (self.group.last_batch_size if t else 0) for n, t in zip(self._num_samples, training)]

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        for i in range(self.group.num_members):  # the score of each member's last trained epoch, which a stopped member keeps
            if self._num_batches is not None and self._num_batches[i] > 0:
                self._last_scores[i] = self._epoch_score(trainer, i)
        if self.synced_epoch == epoch:
            return
        self.synced_epoch = epoch
        if self.hqde.sync != "none" and (epoch + 1) % self.hqde.sync_every_n_epochs == 0:
            self._exchange(trainer, epoch)
        if self.check_clones:
            self._report_clones(epoch)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        snapshot = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        strategy = trainer.strategy
        assert isinstance(strategy, GroupStrategy)
        self.final = {self.group.member_ids[i]: strategy.member_checkpoint(snapshot, i) for i in range(self.group.num_members)}

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # the members where the fit failed: what the driver keeps of them (`strategy.ensemble`, an exception checkpoint)
        try:
            self.on_fit_end(trainer, pl_module)
        except Exception as err:  # your exception goes on as it is
            warnings.warn(f"HQDEStrategy: the members' states where the fit failed could not be kept ({type(err).__name__}: {err}).")

    def score(self, trainer: Trainer, i: int) -> float | None:
        """Member ``i``'s confidence: its ``score_metric`` (``member_{id}/<name>``), or −its mean training loss this epoch;
        a member that did not train this epoch (it stopped earlier) keeps the score of the last epoch it trained."""
        if (self._num_batches is None or self._num_batches[i] == 0) and i in self._last_scores:
            return self._last_scores[i]
        return self._epoch_score(trainer, i)

    def _epoch_score(self, trainer: Trainer, i: int) -> float | None:
        name = self.hqde.score_metric
        metric = None if name is None else trainer.callback_metrics.get(f"member_{self.group.member_ids[i]}/{name}")
        trained = self._loss_sum is not None and bool(self._returned[i])  # (set together)
        return confidence(name, metric, self.hqde.score_mode, self._loss_sum[i] if trained else None, self._num_batches[i] if trained else 0)

    def _exchange(self, trainer: Trainer, epoch: int) -> None:
        """One sync round: every training member's weights to the consensus (:meth:`_consensus`), then ``sync`` applied to each."""
        group, stack = self.group, self.group.stack
        # stopped members leave the rounds after the epoch they stopped in: its own fit still syncs at that epoch's end
        training = [i for i in range(group.num_members) if not group.frozen[i] or group.frozen_at.get(i) == epoch]
        if not training:
            return
        members = [group.member_ids[i] for i in training]
        keys = list(sync_state(group.module))
        states = [{k: stack.stacked(k)[i].detach() for k in keys} for i in training]
        # a member's codec (its AdaptiveQuantization copy) encodes what it sends; without one, raw numpy arrays
        codecs = {cb.position: cb for cb in reversed(trainer.callbacks) if isinstance(cb, MemberCopy) and isinstance(cb, SyncCodec)}
        payloads = [codecs[i].encode_for_sync(trainer, group, dict(s)) if i in codecs else state_to_numpy(s) for i, s in zip(training, states)]
        scores = [self.score(trainer, i) for i in training]
        step = trainer.fit_loop.epoch_loop._batches_that_stepped - 1
        consensus, events = self._consensus(epoch, members, payloads, scores, [max(self._num_samples[i], 1) for i in training], step)
        self._num_samples = [0] * group.num_members
        for i, member, state in zip(training, members, states):
            events.append(DistanceEvent(member, step, distance_to_consensus(state, consensus)))
            apply_sync_(state, consensus, self.hqde.sync, self.hqde.sync_strength)
            if group.frozen[i]:
                group.keep_frozen_as_now(i)
        self.forwarder.handle(events)

    def _consensus(self, epoch: int, members: list[int], payloads: list[Any], scores: list[float | None], num_samples: list[int], step: int) -> tuple[dict[str, Any], list[Any]]:
        """Reduces the round's ``payloads`` (one per member of ``members``, with the samples it trained on) here, through the
        run's topology and aggregator.

        Returns the consensus (numpy arrays) and the events for the driver (the round's record).
        """
        entries = [(p, s, n, payload_nbytes(p), payload_layout(p)) for p, s, n in zip(payloads, scores, num_samples)]
        started = time.perf_counter()
        result, comm = self.hqde.topology.reduce(
            payloads, [e[3] for e in entries], self.aggregator, None if None in scores else scores, num_samples, LocalExecutor(), entries[0][4], members
        )
        record = sync_record(epoch, members, result, time.perf_counter() - started, entries, comm, step, self.hqde.topology.name)
        self.history.append(record.as_dict())
        return state_to_numpy(result.state), [record]

    def _report_clones(self, epoch: int) -> None:
        """After the first epoch: warns about members holding identical weights (they train as copies)."""
        self.check_clones = False
        groups: dict[str, list[int]] = {}
        for i, member in enumerate(self.group.member_ids):
            groups.setdefault(state_digest(self.group.stack.member_state_dict(i)), []).append(member)
        self.forwarder.handle([ClonesEvent(members, epoch) for members in groups.values() if len(members) > 1])


def run_group(trainer: Trainer, payload: bytes | CopiedFit, data: Mapping[str, Any], forwarder: Any, remains: FitRemains) -> FitOutcome:
    """Fits every member of ``trainer.strategy``'s ensemble as one group in this process.

    ``payload`` is the pickled (or deep-copied) fit without its data (:func:`~hqde_lightning.pickling.pickle_fit`),
    ``data`` the fit's data arguments (``datamodule``, ``train_dataloaders``...), used as they are.
    Returns the members' results, their final snapshots and the sync state (aggregator state,
    history); a failed fit leaves what it trained in ``remains``.

    Raises:
        GroupUnsupported: before any training step, when the group cannot run this module (e.g.
            its optimizer is not element-wise).
    """
    hqde = trainer.strategy
    # cloudpickle's loads is pickle's
    copy_trainer, function_name, args, kwargs = payload.fit if isinstance(payload, CopiedFit) else pickle.loads(payload)
    bound = inspect.signature(getattr(copy_trainer, function_name)).bind(*args, **kwargs, **data)
    copy_trainer.loggers = trainer.loggers
    # your profiler records the group's fit, as a plain fit's: `trainer.profiler.summary()` after it, or its totals
    # carried on into a later `test`
    copy_trainer.profiler = trainer.profiler
    with _finalized_by_the_driver(trainer.loggers), _lent(trainer.profiler):
        results, sync = fit_group(hqde, copy_trainer, function_name, bound, range(hqde.num_members), forwarder, lambda group: GroupSync(hqde, group, forwarder), remains=remains)
    return results, sync.final, sync.sync_state()


@contextmanager
def _finalized_by_the_driver(loggers: Sequence[Logger]) -> Iterator[None]:
    """Your ``loggers`` while the group's fit uses them: its ``finalize`` calls are left to the driver's fit, which
    finalizes them once, after logging the ensemble's own values ("success", see the launcher) or when the fit fails
    ("failed", Lightning's handler around your ``fit``), as a plain fit finalizes them after its last value. A writer
    closed before that would open a second TensorBoard event file; a group that refuses the module before its first
    step leaves them open for the members' other runtime.
    """
    for logger in loggers:
        logger.finalize = lambda status: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        for logger in loggers:
            del logger.finalize


#: "no such attribute" for :func:`_lent`
_UNSET = object()


@contextmanager
def _lent(profiler: Profiler) -> Iterator[None]:
    """Your ``profiler`` while the group's trainer uses it. That trainer points it at the group's module through a weak
    proxy (as Lightning's ``_run`` does), which dies with the group: your trainer, profiler included, is pickled for its
    next fit, and pickle refuses a dead proxy. Afterwards the profiler points where it pointed before."""
    before = vars(profiler).get("_lightning_module", _UNSET)
    try:
        yield
    finally:
        if before is _UNSET:
            vars(profiler).pop("_lightning_module", None)
        else:
            profiler._lightning_module = before


def _fit_as_lightning_does(trainer: Trainer, fit: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Runs the group's ``fit`` as Lightning's entry point runs a fit: when it fails (Ctrl-C too), the group's trainer calls
    ``on_exception`` of its callbacks (your callbacks' member copies: an ``OnExceptionCheckpoint`` writes the members'
    checkpoint, as each member's own fit would), your datamodule and its strategy, and tears down; the exception goes on
    to the driver, whose own trainer does the same. A group refusing your module (:class:`GroupUnsupported`, before its
    first step) is no failure of the fit: the members then train in their other runtime."""
    try:
        fit(*args, **kwargs)
    except (GroupUnsupported, _TunerExitException):
        raise
    except BaseException as exception:
        _interrupt(trainer, exception)
        trainer._teardown()
        trainer.state.stage = None  # (as Lightning leaves it)
        raise


def fit_group(
    hqde: Any,
    trainer: Trainer,
    function_name: str,
    bound: inspect.BoundArguments,
    member_ids: Sequence[int],
    forwarder: Any,
    make_sync: Callable[[MemberGroup], GroupSync],
    strategy_cls: type[GroupStrategy] = GroupStrategy,
    remains: FitRemains | None = None,
) -> tuple[list[MemberResult], GroupSync]:
    """Fits members ``member_ids`` of ``hqde``'s ensemble as one group with ``trainer``, a copy of the user's (loggers set).

    Each member is a copy of the fit's module under its own seed (re-initialised for
    ``member_init="independent"``, also when the fit resumes: what your ``__init__`` draws outside the state dict is
    then the member's own); ``make_sync`` builds the group's sync
    callback, ``strategy_cls`` its strategy. Returns the members' results and the sync callback; when the fit fails,
    ``remains`` gets the members' states where it failed and what it stored on your callbacks.
    """
    model: LightningModule = bound.arguments["model"]
    # also when the fit resumes: the checkpoint replaces the weights, and each member keeps the non-persistent buffers and
    # attributes its `__init__` draws (as member i resumed alone, built under its seed, would)
    independent = hqde.member_init == "independent"
    drawn = seed_drawn_attributes(model) if independent and len(hqde.continued_members) < len(member_ids) else []
    members, rng_states, host_rng_states = [], [], []
    for i in member_ids:
        seed_everything(hqde.seed + i, workers=True, verbose=False)
        member = copy.deepcopy(model)
        if i in hqde.continued_members:  # the same module fitted again: where the last fit left the member
            go_on_from(member, hqde.continued_members[i])
        elif independent:
            notice, fallback = reinitialise(member, drawn)
            forwarder.handle([Notice(i, f"HQDEStrategy: {notice}", warning=fallback)])
        members.append(member)
        rng_states.append(torch.get_rng_state())
        host_rng_states.append(host_rng())
    callbacks = with_module_callbacks(trainer.callbacks, model)
    # against your module's: the attributes each member drew in `__init__` come back too
    before = fingerprints(plain_attributes(model))
    callbacks_before = {key: fingerprints(vars(cb)) for key, cb in yours(callbacks).items()}
    group = MemberGroup(
        model, members, member_ids, hqde.vectorize, rng_states, [type(cb).__name__ for cb in callbacks if needs_member_attributes(cb)], host_rng_states
    )
    del members
    bound.arguments["model"] = group
    sync = make_sync(group)
    strategy_cls(hqde, group, sync).install(trainer)
    trainer._data_connector.prepare_data = lambda: None  # ran once in the driver
    trainer.callbacks = [sync, ValidationDraws(group)] + member_callbacks(callbacks, group)
    seed_everything(hqde.seed + min(member_ids), workers=True, verbose=False)
    try:
        _fit_as_lightning_does(trainer, getattr(trainer, function_name), *bound.args, **bound.kwargs)
    except GroupUnsupported:  # before any step: the members train in their other runtime
        raise
    except BaseException:
        if remains is not None:  # what the failed fit trained, for the driver
            remains.snapshots.update(sync.final)
            remains.callback_attributes = _your_callbacks_changed(trainer, callbacks_before)
        raise
    metrics, logged, progress_bar = trainer.callback_metrics, trainer.logged_metrics, set(trainer.progress_bar_metrics)
    callbacks_state = {cb.state_key: cb.state_dict() for cb in trainer.callbacks if cb is not sync and cb.state_dict()}
    # your callbacks in the driver take the state of the group's first member's copy (as from member 0 with actors)
    callbacks_state.update({cb.original_state_key: cb.state_dict() for cb in trainer.callbacks if isinstance(cb, MemberCopy) and cb.position == 0})
    callbacks_state.update({cb.state_key: cb.member_state(cb.state_dict(), 0) for cb in trainer.callbacks if isinstance(cb, GroupSWA)})
    changed_callbacks = _your_callbacks_changed(trainer, callbacks_before)
    results = []
    for i, member in enumerate(group.member_ids):
        prefix = f"member_{member}/"
        own = scalar_metrics(metrics, prefix)
        results.append(
            MemberResult(
                index=member,
                state_dict=state_to_numpy(group.stack.member_state_dict(i)),
                callback_metrics=own,
                fit_loop_state=trainer.fit_loop.state_dict(),
                callbacks_state=callbacks_state,
                trainer_state=trainer.state,
                score=sync.score(trainer, i),
                buffers=state_to_numpy(group.stack.member_buffers(i, saved=False)),
                attributes=changed_attributes(group.member_attributes(i), before),
                callback_attributes=changed_callbacks,
                stopped_in_epoch=group.frozen_at.get(i),
                logged_metrics=scalar_metrics(logged, prefix),
                progress_bar_metrics={k: v for k, v in own.items() if k in progress_bar},  # (the group's bar shows its first member's)
            )
        )
    return results, sync


def _your_callbacks_changed(trainer: Trainer, before: Mapping[str, Mapping[str, bytes | None]]) -> dict[str, dict[str, Any]]:
    """What the group's fit stored on your callbacks (those fingerprinted ``before`` it): as the first member's copies left
    them (callbacks that run per member), or as they ran for the group."""
    first = {cb.original_state_key: cb.callback for cb in trainer.callbacks if isinstance(cb, MemberCallback) and cb.position == 0}
    return callback_attributes({k: cb for k, cb in {**yours(trainer.callbacks), **first}.items() if k in before}, before)
