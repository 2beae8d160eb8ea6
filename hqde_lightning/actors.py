"""The two kinds of Ray actor a fit uses: the coordinator and the members.

:class:`Coordinator` (one per fit, an asyncio actor taking no CPU) collects each sync round's
member weights, reduces them with its topology (``Topology.reduce``, flat included; tree and
map-reduce tasks run through :class:`RayExecutor`) once every active member has sent its weights, and hands
the consensus back through the object store. It owns everything it keeps (a member's weights
are copied into an object the coordinator owns, so they outlive a member that dies while the
round waits) and keeps only the latest round's consensus. It also keeps the members' latest
snapshots (for whole-ensemble checkpoints and restarts) and queues metrics and progress for
the driver.

:class:`MemberActor` (one per member) unpickles the user's ``Trainer``, swaps in the member's
strategy (:class:`~hqde_lightning.member_strategy.MemberStrategy`) and runs the user's own
Lightning fit loop.

Both are plain classes here; the launcher wraps them with ``ray.remote`` and their resources, or
(on one device, for modules a member group cannot run) runs them in threads of the driver
(:mod:`hqde_lightning.member_threads`). So Ray is imported inside the methods only Ray runs, not at
the top: a process whose members train in threads never imports it (that costs about a second).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.trainer.call import _call_and_handle_interrupt
from lightning.pytorch.trainer.states import TrainerState
from torch import Tensor

from hqde_lightning.aggregation import Aggregator
from hqde_lightning.attributes import callback_attributes, changed_attributes, fingerprints, plain_attributes, yours
from hqde_lightning.checkpoint import EXTRAS_CANDIDATES, AtomicCheckpointIO, state_digest
from hqde_lightning.codec import non_persistent_buffers, state_to_numpy
from hqde_lightning.events import ClonesEvent, Event, FinishedEvent, Notice, sync_record
from hqde_lightning.topology import Executor, LocalExecutor, Topology, combine_group
from hqde_lightning.member import MemberContext, MemberSync, MirrorLogger, go_on_from, reinitialise, seed_drawn_attributes, tree_to_cpu, use_mirror_loggers
from hqde_lightning.member_strategy import MemberStrategy
from hqde_lightning.turns import resolve

__all__ = ["Coordinator", "FitOutcome", "FitRemains", "MemberActor", "MemberInterrupted", "MemberResult", "RayExecutor", "member_failed", "worker_fit"]


class MemberInterrupted(Exception):
    """A member's fit stopped on ``KeyboardInterrupt`` (Lightning's graceful shutdown ran in the member).

    The driver raises ``KeyboardInterrupt`` in its turn, so that its own ``fit`` ends as an
    interrupted plain ``fit`` does.
    """


def _fetch(payloads: Sequence[Any]) -> list[Any]:
    """The values of ``payloads``: object-store references are read, values are kept."""
    return [resolve(p) for p in payloads]


def _combine_task(rule: Aggregator, payloads: Sequence[Any], *args: Any) -> Any:
    """:func:`~hqde_lightning.topology.combine_group` in a Ray task (references nested in a list are not resolved by Ray)."""
    return combine_group(rule, _fetch(payloads), *args)


class RayExecutor(Executor):
    """Runs each reduction task as a Ray task that reads payload ``ObjectRef`` arguments from the object store.

    Args:
        num_cpus: CPUs each task reserves. 0 by default: reductions run while every member is
            blocked waiting for the consensus, so they use the members' idle cores, and a task
            that waited for a free CPU would wait forever.
    """

    def __init__(self, num_cpus: float = 0.0) -> None:
        import ray

        self._remote = ray.remote(_combine_task).options(num_cpus=num_cpus)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert fn is combine_group, "RayExecutor runs reduction tasks only"
        return self._remote.remote(*args)

    def gather(self, handles: Sequence[Any]) -> list[Any]:
        import ray

        return list(ray.get(list(handles)))

    def fetch(self, payloads: Sequence[Any]) -> list[Any]:
        return _fetch(payloads)


@dataclass
class _Round:
    event: asyncio.Event
    payloads: dict[int, tuple[Any, float | None, int, int, dict[str, int]]] = field(default_factory=dict)
    result: Any = None
    error: str | None = None
    #: the members' logging step at this sync (the step of their end-of-epoch rows)
    step: int | None = None


class Coordinator:
    """Collects member weights per round, aggregates them and shares the consensus.

    Args:
        num_members: ensemble size.
        aggregator: the rule that combines member weights.
        topology: the path the weights take (flat, tree, map-reduce).
        state: a previous run's :meth:`state_dict` when resuming.
        check_clones: compare the members' first end-of-epoch snapshots and report members with
            identical weights to the driver (off where a sync makes members equal on purpose).
        in_process: served in the driver's process (:class:`~hqde_lightning.turns.InProcessActor`,
            for member threads): payloads, snapshots and the consensus are kept as they are instead
            of as Ray objects or copies (members send copies of their weights and snapshots and only
            read the consensus), and reductions run in this process.
    """

    def __init__(
        self,
        num_members: int,
        aggregator: Aggregator,
        topology: Topology,
        state: Mapping[str, Any] | None = None,
        check_clones: bool = True,
        in_process: bool = False,
    ) -> None:
        self.num_members = num_members
        self.aggregator = aggregator
        self.topology = topology
        self.active = set(range(num_members))
        #: rounds still collecting payloads (a round is dropped as soon as it completes)
        self.rounds: dict[int, _Round] = {}
        #: the latest completed round and its consensus, for a restarted member that redoes it
        self.last_result: tuple[int, Any] | None = None
        self.snapshots: dict[int, tuple[int, Any]] = {}
        #: members whose final snapshot (the end of their fit) has arrived
        self.done: set[int] = set()
        #: those final snapshots
        self.finals: dict[int, dict[str, Any]] = {}
        #: per member whose fit has said it stops, the last epoch it trains (it may still be saving that epoch's checkpoint)
        self.last_epochs: dict[int, int] = {}
        #: per member, the first and the latest epoch it started training in this fit (:meth:`starts_epoch`)
        self.first_epochs: dict[int, int] = {}
        self.started_epochs: dict[int, int] = {}
        self.events: list[Event] = []
        self.history: list[dict[str, Any]] = []
        self._snapshot_waiters: list[asyncio.Event] = []
        self._executor: Executor | None = LocalExecutor() if in_process else None
        #: keeps a value the members share: a Ray object, or in process the value itself
        self._put: Callable[[Any], Any] = _same if in_process else _ray_put
        #: keeps a posted snapshot: a copy owned here (it outlives the member), or in process the member's own copy
        self._own: Callable[[Any], Any] = _same if in_process else tree_to_cpu
        self.check_clones = check_clones
        #: per member, the round and weight digest of the first snapshot it posted
        self.first_fingerprints: dict[int, tuple[int, str]] = {}
        if state is not None:
            self.load_state_dict(state)

    # ---------------------------------------------------------------- syncing
    async def sync(
        self, member: int, round_id: int, payload: Any, nbytes: int, layout: dict[str, int], score: float | None, num_samples: int, step: int | None = None
    ) -> list[Any]:
        """Adds ``member``'s payload to round ``round_id``; returns ``[consensus_ref]`` once the round completes.

        ``payload`` arrives by value and is put into an object the coordinator owns (an object
        the member put would die with the member). A member arriving at a round that already
        completed (a restarted member redoing the round it died in) gets the latest consensus.
        ``step`` is the member's logging step at the sync; the round's statistics carry the largest
        as ``"step"``, where the driver logs them.
        """
        if self.last_result is not None and round_id <= self.last_result[0]:
            return [self.last_result[1]]
        rnd = self.rounds.get(round_id)
        if rnd is None:
            rnd = self.rounds[round_id] = _Round(asyncio.Event())
        rnd.payloads[member] = (self._put(payload), score, num_samples, nbytes, layout)
        if step is not None:
            rnd.step = step if rnd.step is None else max(rnd.step, step)
        self._maybe_complete(round_id)
        await rnd.event.wait()
        if rnd.error is not None:
            raise RuntimeError(f"aggregation of sync round {round_id} failed: {rnd.error}")
        return [rnd.result]

    def _maybe_complete(self, round_id: int) -> None:
        rnd = self.rounds[round_id]
        if rnd.event.is_set() or not rnd.payloads or not self.active <= set(rnd.payloads):
            return
        members = sorted(rnd.payloads)
        entries = [rnd.payloads[i] for i in members]
        started = time.perf_counter()
        try:
            raw_scores = [e[1] for e in entries]
            scores = None if any(s is None for s in raw_scores) else raw_scores
            counts = [max(e[2], 1) for e in entries]
            sizes = [e[3] for e in entries]
            if self._executor is None:
                self._executor = RayExecutor()
            result, comm = self.topology.reduce([e[0] for e in entries], sizes, self.aggregator, scores, counts, self._executor, entries[0][4], members)
            consensus = state_to_numpy(result.state)
            rnd.result = self._put(consensus)
            self.last_result = (round_id, rnd.result)  # the previous round's consensus is freed once members drop it
            record = sync_record(round_id, members, result, time.perf_counter() - started, entries, comm, rnd.step, self.topology.name)
            self.history.append(record.as_dict())
            self.events.append(record)
        except Exception as exc:  # every waiting member must hear of it, none may hang
            rnd.error = f"{type(exc).__name__}: {exc}"
        rnd.payloads.clear()
        rnd.event.set()
        del self.rounds[round_id]  # the waiting members hold the round itself

    def finish(self, member: int) -> None:
        """``member``'s fit ended (or it was dropped): open rounds no longer wait for it or count it."""
        self.active.discard(member)
        for round_id in list(self.rounds):
            self.rounds[round_id].payloads.pop(member, None)  # only a dropped member can have a payload waiting
            self._maybe_complete(round_id)
        self._notify_snapshot()
        self._report_clones()

    def stops_after(self, member: int, epoch: int) -> None:
        """``member``'s fit stops after ``epoch`` (early stopping): it will not train a later epoch, so it writes no later checkpoint."""
        self.last_epochs[member] = epoch
        self._notify_snapshot()

    def starts_epoch(self, member: int, epoch: int) -> None:
        """``member`` trains ``epoch`` now (its fit did not stop after the epoch before): it writes ``epoch``'s checkpoints
        rather than a higher member (:meth:`is_writer`)."""
        self.first_epochs.setdefault(member, epoch)
        self.started_epochs[member] = epoch
        self._notify_snapshot()

    # -------------------------------------------------------------- snapshots
    def post_snapshot(self, member: int, round_id: int, snapshot: dict[str, Any], final: bool = False) -> None:
        """Keeps ``member``'s latest snapshot (copied out of the object store, so it outlives the member).

        ``round_id`` is the last epoch the snapshot's member finished (-1 before its first);
        ``final`` marks the snapshot taken when the member's fit ended. A final snapshot that
        trained no step past the member's last epoch-end snapshot is kept apart (for
        :meth:`latest_snapshots`): writers pairing round ``round_id`` and restarts keep reading the
        epoch end's, whichever of the two a writer's timing would otherwise have found.
        """
        previous = self.snapshots.get(member)
        unchanged = final and previous is not None and previous[0] == round_id and previous[1].get("global_step") == snapshot.get("global_step")
        latest = (previous is None or previous[0] <= round_id) and not unchanged
        copied = self._own(snapshot) if latest or final else None  # a late, older snapshot is not copied at all
        if latest:
            self.snapshots[member] = (round_id, copied)
        if final:
            self.finals[member] = copied
            self.done.add(member)
        self._notify_snapshot()
        if self.check_clones and round_id >= 0 and member not in self.first_fingerprints:  # after its first epoch, not its start
            self.first_fingerprints[member] = (round_id, state_digest(snapshot.get("state_dict", {})))
            self._report_clones()

    def _report_clones(self) -> None:
        """Once every active member posted its first snapshot: emits a :class:`ClonesEvent` for each group of identical members."""
        if not self.check_clones or len(self.first_fingerprints) < 2 or not self.active <= set(self.first_fingerprints):
            return
        self.check_clones = False
        groups: dict[tuple[int, str], list[int]] = {}
        for member, key in sorted(self.first_fingerprints.items()):
            groups.setdefault(key, []).append(member)
        for (round_id, _), members in groups.items():
            if len(members) > 1:
                self.events.append(ClonesEvent(members, round_id))

    def _notify_snapshot(self) -> None:
        waiters, self._snapshot_waiters = self._snapshot_waiters, []
        for event in waiters:
            event.set()

    async def _until(self, ready: Callable[[], bool | None]) -> Any:
        """Waits until ``ready()`` returns something other than ``None``/``False`` (re-checked after every snapshot or finish)."""
        while not (answer := ready()):
            event = asyncio.Event()
            self._snapshot_waiters.append(event)
            await event.wait()
        return answer

    async def snapshots_at(self, round_id: int, exclude: Collection[int] = ()) -> dict[int, dict[str, Any]]:
        """Waits until every active member not in ``exclude`` (the asking actor's own) posted a snapshot of round ``round_id`` or later."""
        await self._until(lambda: all(m in self.snapshots and self.snapshots[m][0] >= round_id for m in self.active if m not in exclude))
        return {m: snapshot for m, (_, snapshot) in sorted(self.snapshots.items()) if m not in exclude}

    async def is_writer(self, member: int, epoch: int) -> bool:
        """Whether ``member`` writes the ensemble's checkpoints during ``epoch``.

        The writer of an epoch is the lowest-index member that trains in it: member 0 while it
        runs, then the next one when member 0 stops early (``trainer.should_stop``, early
        stopping) or is given up on. A lower member that still runs but has not started
        ``epoch`` yet (:meth:`starts_epoch`) is waited for: it may yet train in ``epoch``, or stop
        before it (even after posting the snapshot of the epoch before). One that has started it,
        or finished after training it in this fit, is the writer instead. A lower member that said
        it stops after an earlier epoch (:meth:`stops_after`), or that resumed past ``epoch`` (its
        first epoch in this fit is a later one), is passed over.
        """

        def decide() -> str | None:
            for lower in range(member):
                posted = self.snapshots[lower][0] if lower in self.snapshots else None
                if self.first_epochs.get(lower, epoch) > epoch:
                    continue  # resumed past ``epoch``: it does not train it in this fit
                if self.last_epochs.get(lower, epoch) < epoch and lower not in self.done:
                    continue  # it stops after an earlier epoch
                if lower in self.active and lower not in self.done:
                    return "lower" if self.started_epochs.get(lower, -1) >= epoch else None
                if self.started_epochs.get(lower, -1) >= epoch and posted is not None and posted >= epoch:
                    return "lower"  # trained ``epoch`` to its end in this fit before it finished
            return "self"

        return await self._until(decide) == "self"

    def latest_snapshot(self, member: int) -> dict[str, Any] | None:
        """``member``'s latest snapshot (a Lightning checkpoint dict), if any."""
        entry = self.snapshots.get(member)
        return None if entry is None else entry[1]

    def latest_snapshots(self) -> dict[int, dict[str, Any]]:
        """Every member's latest snapshot (the final one for members whose fit ended)."""
        return {m: self.finals.get(m, snapshot) for m, (_, snapshot) in sorted(self.snapshots.items())}

    # --------------------------------------------------------- driver channel
    def emit(self, event: Event) -> None:
        self.events.append(event)

    def drain(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    def state_dict(self) -> dict[str, Any]:
        return {"aggregator": self.aggregator.state_dict(), "history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.aggregator.load_state_dict(state.get("aggregator", {}))
        self.history = list(state.get("history", []))


@dataclass
class MemberResult:
    """What a member sends back to the driver when its fit ends."""

    index: int
    state_dict: dict[str, np.ndarray]
    #: what its fit left in ``trainer.callback_metrics`` (scalars, as CPU tensors of their own dtype: :func:`scalar_metrics`)
    callback_metrics: dict[str, Tensor]
    fit_loop_state: dict[str, Any]
    callbacks_state: dict[str, Any]
    trainer_state: TrainerState
    score: float | None
    #: the module's buffers its state dict leaves out (:func:`~hqde_lightning.codec.non_persistent_buffers`)
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    #: the module's plain attributes its fit added or changed (:func:`~hqde_lightning.attributes.changed_attributes`)
    attributes: dict[str, Any] = field(default_factory=dict)
    #: per ``state_key``, what the fit added to or changed in your callbacks' attributes (:func:`~hqde_lightning.attributes.callback_attributes`)
    callback_attributes: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: in a member group, the epoch the member stopped early in (its fit loop's state is the group's), else ``None``
    stopped_in_epoch: int | None = None
    #: what its fit left in ``trainer.logged_metrics`` (as ``callback_metrics``) and ``trainer.progress_bar_metrics`` (floats)
    logged_metrics: dict[str, Tensor] = field(default_factory=dict)
    progress_bar_metrics: dict[str, float] = field(default_factory=dict)


#: what a fit's members bring back to the launcher: their results, their final snapshots, the sync state
FitOutcome = tuple[list[MemberResult], dict[int, dict[str, Any]], dict[str, Any]]


@dataclass
class FitRemains:
    """What a failed fit leaves of its members for the driver, which keeps it as a plain fit's module keeps its weights.

    Attributes:
        snapshots: each member's latest full checkpoint: where the fit failed (a member group here, the member that
            failed, a group actor), else as of the member's last epoch end.
        callback_attributes: per ``state_key``, what a member group here stored on your callbacks.
    """

    snapshots: dict[int, dict[str, Any]] = field(default_factory=dict)
    callback_attributes: dict[str, dict[str, Any]] = field(default_factory=dict)


class MemberActor:
    """Runs one member's Lightning fit loop.

    Args:
        cwd: the driver's working directory (entered when it exists on this node, so relative
            paths in user code mean the same thing).
        num_threads: torch intra-op threads for this member (its share of the cores).
    """

    def __init__(self, cwd: str | None, num_threads: int) -> None:
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)
        torch.set_num_threads(max(1, num_threads))

    def node_id(self) -> str:
        """The Ray node this member runs on (answering it also tells the driver the member started)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    @staticmethod
    def _write_snapshot(snapshot: dict[str, Any], index: int, directory: str) -> str:
        path = os.path.join(directory, f"member_{index}.ckpt")
        AtomicCheckpointIO().save_checkpoint({k: v for k, v in snapshot.items() if k != EXTRAS_CANDIDATES}, path)
        return path

    @staticmethod
    def _independent_init(arguments: Mapping[str, Any], context: MemberContext) -> None:
        """Re-initialises the member's module (the fit's ``arguments``) under its seed; also when the fit resumes from a checkpoint
        or snapshot, which then replaces the weights: the non-persistent buffers and attributes your ``__init__`` draws stay
        the member's own."""
        notice, fallback = reinitialise(arguments["model"], seed_drawn_attributes(arguments["model"]))
        context.coordinator.emit.remote(Notice(context.index, f"HQDEStrategy: {notice}", warning=fallback))

    def run(self, payload: bytes, context: MemberContext, data: Mapping[str, Any] | None = None) -> MemberResult:
        """Unpickles ``(trainer, function name, args, kwargs)`` and runs it as member ``context.index``.

        ``data`` holds data arguments of the fit that the payload leaves out (member threads pass
        their own copies, see :mod:`~hqde_lightning.member_threads`).

        A restarted member (``context.restart_from`` holds its last snapshot) resumes from it,
        through a temporary ``hqde-restart-*`` directory removed when its fit ends.

        The fit runs through Lightning's own entry point for ``fit`` (``_call_and_handle_interrupt``),
        so callbacks' ``on_exception`` run here and Lightning handles its control-flow exceptions
        (the Tuner's exit, ``KeyboardInterrupt``) as in a plain fit; a ``KeyboardInterrupt``
        reaches the driver as :class:`MemberInterrupted`.
        """
        from lightning.pytorch import seed_everything

        trainer, function_name, args, kwargs = pickle.loads(payload)  # cloudpickle's loads is pickle's
        if data:
            bound = inspect.signature(getattr(trainer, function_name)).bind(*args, **kwargs, **data)
            args, kwargs = bound.args, bound.kwargs
        restart_dir: str | None = None
        if context.restart_from is not None:
            snapshot = resolve(context.restart_from[0])
            if snapshot is not None:
                restart_dir = tempfile.mkdtemp(prefix="hqde-restart-")
                bound = inspect.signature(getattr(trainer, function_name)).bind(*args, **kwargs)
                bound.arguments["ckpt_path"] = self._write_snapshot(snapshot, context.index, restart_dir)
                args, kwargs = bound.args, bound.kwargs
        hqde = trainer.strategy
        sync = MemberSync(context)
        MemberStrategy(hqde, context, sync).install(trainer)
        # the driver ran `prepare_data` once before the members started (see the launcher)
        trainer._data_connector.prepare_data = _prepared_in_driver
        use_mirror_loggers(trainer, [MirrorLogger(m, j, context.index, context.coordinator) for j, m in enumerate(context.mirrors)])
        unwanted: tuple[type, ...] = (ProgressBar,) if context.index == 0 else (ProgressBar, ModelSummary)
        trainer.callbacks = [sync] + [cb for cb in trainer.callbacks if not isinstance(cb, unwanted)]
        seed_everything(context.seed, workers=True, verbose=False)
        arguments = inspect.signature(getattr(trainer, function_name)).bind(*args, **kwargs).arguments
        module = arguments["model"]
        # taken before the member's independent init: the attributes it draws in `__init__` come back too
        before, callbacks = fingerprints(plain_attributes(module)), yours(trainer.callbacks)
        if context.index in hqde.continued_members:  # the same module fitted again: where the last fit left the member
            go_on_from(module, hqde.continued_members[context.index])
        elif hqde.member_init == "independent":
            self._independent_init(arguments, context)
        callbacks_before = {key: fingerprints(vars(cb)) for key, cb in callbacks.items()}
        with worker_fit(trainer, f"member {context.index}'s", restart_dir):
            _call_and_handle_interrupt(trainer, getattr(trainer, function_name), *args, **kwargs)
        context.coordinator.emit.remote(FinishedEvent(context.index))
        context.coordinator.finish.remote(context.index)
        callbacks_state = {cb.state_key: cb.state_dict() for cb in trainer.callbacks if cb is not sync and cb.state_dict()}
        return MemberResult(
            index=context.index,
            state_dict=state_to_numpy(trainer.lightning_module.state_dict()),
            callback_metrics=scalar_metrics(trainer.callback_metrics),
            fit_loop_state=trainer.fit_loop.state_dict(),
            callbacks_state=callbacks_state,
            trainer_state=trainer.state,
            score=sync.score(trainer),
            buffers=state_to_numpy(non_persistent_buffers(trainer.lightning_module)),
            attributes=changed_attributes(plain_attributes(module), before),
            callback_attributes=callback_attributes(callbacks, callbacks_before),
            logged_metrics=scalar_metrics(trainer.logged_metrics),
            progress_bar_metrics={k: float(v) for k, v in trainer.progress_bar_metrics.items() if _is_scalar(v)},
        )


@contextmanager
def worker_fit(trainer: Any, whose: str, restart_dir: str | None) -> Iterator[None]:
    """Around the fit in a member or group actor: Lightning's ``SystemExit`` after its graceful shutdown on
    ``KeyboardInterrupt`` becomes :class:`MemberInterrupted` (``whose`` names the members), and a restarted
    actor's temporary ``restart_dir`` is removed when the fit ends."""
    try:
        yield
    except SystemExit:
        if not trainer.interrupted:
            raise
        raise MemberInterrupted(f"{whose} fit was interrupted (KeyboardInterrupt)") from None
    finally:
        if restart_dir is not None:
            shutil.rmtree(restart_dir, ignore_errors=True)


def member_failed(who: str, err: BaseException, fallback: str) -> BaseException:
    """A member's error as the driver raises it: its interrupt (:class:`MemberInterrupted`) as ``KeyboardInterrupt``, so
    that the driver's fit ends as an interrupted plain fit does; anything else as it is, its message starting with
    ``"<who> failed: "`` (``fallback`` where it has no message)."""
    if isinstance(err, MemberInterrupted):
        return KeyboardInterrupt(str(err))
    err.args = (f"{who} failed: {err.args[0] if err.args else fallback}",) + tuple(err.args[1:])
    return err


def _same(value: Any) -> Any:
    return value


def _ray_put(value: Any) -> Any:
    """``ray.put``: a value in the object store, which members read without copying it."""
    import ray

    return ray.put(value)


def _prepared_in_driver() -> None:
    """Stands in for Lightning's ``prepare_data`` step inside a member: it ran once in the driver."""


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)


def scalar_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Tensor]:
    """The scalar ``metrics`` whose names start with ``prefix`` (taken off), as 0-dim CPU tensors that keep their dtype
    (a ``"64-true"`` fit's values stay float64 in the driver, as a plain fit's)."""
    return {k[len(prefix):]: torch.as_tensor(v).detach().cpu().reshape(()) for k, v in metrics.items() if k.startswith(prefix) and _is_scalar(v)}
