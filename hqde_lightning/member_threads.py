"""``MemberThreads``: on one device, members a member group cannot run train in threads of the driver, taking turns, without Ray.

A module a member group cannot run (hooks or callbacks that act on the whole
module, an optimizer that is not element-wise) used to cost one Ray actor, a whole process, per
member. On one device (``members_per_worker="auto"``, no ``ray_address``) each member now runs
exactly what a member actor runs (:class:`~hqde_lightning.actors.MemberActor`: its own copy of
your ``Trainer`` and module, its own Lightning fit loop) in a thread of this process, and the
threads take turns (:class:`~hqde_lightning.turns.Turns`), so the fit costs what training the
members in a for-loop costs. The coordinator runs in this process too
(:class:`~hqde_lightning.turns.InProcessActor`); syncs, checkpoints, loggers and progress bars
work as with actors.

A member that fails ends the fit with its error, and Ctrl-C ends it as it ends a plain fit; the
other members stop (:meth:`~hqde_lightning.turns.Turns.cancel`): those waiting for their turn at
once, the running one within about half a second of training. Restarts (``max_member_restarts``)
do not apply here: a Python error ends a member actor's fit as well, and an error that kills
the process ends every member. ``on_member_failure="continue"`` keeps Ray actors, so that a
member can fail alone.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections.abc import Mapping
from typing import Any

import torch

from hqde_lightning.actors import Coordinator, FitRemains, MemberActor, MemberResult, member_failed
from hqde_lightning.codec import keeps_members_apart
from hqde_lightning.member import MemberContext
from hqde_lightning.turns import InProcessActor, MemberCancelled, Turns, resolve

__all__ = ["MemberThreads"]

_POLL_SECONDS = 0.25
#: the logger of Lightning's info lines (``rank_zero_info``), which every member's fit writes alike
_LIGHTNING_INFO = logging.getLogger("lightning.pytorch.utilities.rank_zero")


class MemberThreads:
    """Runs every member of ``strategy``'s ensemble as a :class:`~hqde_lightning.actors.MemberActor` in a thread of this process.

    Args:
        strategy: the driver's ``HQDEStrategy``.
        payload: the pickled fit without its data (:func:`~hqde_lightning.pickling.pickle_fit`).
        data: the fit's data arguments. Member 0 gets them as they are, as a plain fit does (your
            datamodule is set up after the fit); every other member a shallow copy of each, made
            before any member starts: the datasets are shared, as in a for-loop, and what a
            datamodule's ``setup`` builds is the member's own.
        mirrors: per user logger, what the members' stand-in loggers show.
        forwarder: hands the members' events to the driver's loggers and progress bars.
        remains: gets the members' latest snapshots when the fit fails.
    """

    def __init__(self, strategy: Any, payload: bytes, data: Mapping[str, Any], mirrors: list[dict[str, Any]], forwarder: Any, remains: FitRemains) -> None:
        self.strategy = strategy
        self.payload = payload
        self.data = data
        self.mirrors = mirrors
        self.forwarder = forwarder
        self.remains = remains
        self.turns = Turns()
        #: each member's index once its thread's work is done
        self._finished: queue.Queue[int] = queue.Queue()

    def run(self) -> tuple[list[MemberResult], dict[int, dict[str, Any]], dict[str, Any]]:
        """Trains the members; returns their results, final snapshots and the coordinator's state.

        Raises:
            KeyboardInterrupt: on Ctrl-C, once every member's fit stopped.
            BaseException: the first member's error, its message prefixed with the member.
        """
        strategy = self.strategy
        check_clones = keeps_members_apart(strategy.sync, strategy.sync_strength)
        coordinator = Coordinator(strategy.num_members, copy.deepcopy(strategy.aggregator), strategy.topology, check_clones=check_clones, in_process=True)
        handle = InProcessActor(coordinator)
        outcomes: dict[int, MemberResult | BaseException] = {}
        data = [self.data] + [{name: copy.copy(value) for name, value in self.data.items()} for _ in range(1, strategy.num_members)]
        threads = [
            threading.Thread(target=self._member, args=(MemberContext.of(strategy, i, handle, self.mirrors), data[i], outcomes), name=f"hqde-member-{i}", daemon=True)
            for i in range(strategy.num_members)
        ]
        _LIGHTNING_INFO.addFilter(_member_0_only)
        try:
            for thread in threads:
                thread.start()
            failed = self._wait(len(threads), handle, outcomes)
            if failed is not None:
                self.turns.cancel()
            _join(threads)
            if failed is not None:
                self.remains.snapshots.update(coordinator.latest_snapshots())
                raise _member_error(failed, outcomes[failed])
            return [outcomes[i] for i in sorted(outcomes)], coordinator.latest_snapshots(), coordinator.state_dict()  # type: ignore[misc]
        except KeyboardInterrupt:  # Ctrl-C reaches the main thread only
            self.turns.cancel()
            _join(threads)
            self.remains.snapshots.update(coordinator.latest_snapshots())
            raise
        finally:
            handle.stop()
            _LIGHTNING_INFO.removeFilter(_member_0_only)

    def _wait(self, members: int, handle: InProcessActor, outcomes: Mapping[int, Any]) -> int | None:
        """Forwards the members' events until every member finished; returns the first member that failed, if one did.

        It waits on :attr:`_finished`, not with ``Thread.join(timeout)``: a ``KeyboardInterrupt`` (Ctrl-C) landing inside
        such a join marks the joined thread stopped while it still runs (Python 3.11's ``threading``).
        """
        running = members
        while True:
            try:
                self._finished.get(timeout=_POLL_SECONDS)
                running -= 1
            except queue.Empty:
                pass
            self.forwarder.handle(resolve(handle.drain.remote()))
            failed = [i for i, outcome in outcomes.items() if isinstance(outcome, BaseException) and not isinstance(outcome, MemberCancelled)]
            if failed:
                return min(failed)
            if not running:
                return None

    def _member(self, context: MemberContext, data: Mapping[str, Any], outcomes: dict[int, MemberResult | BaseException]) -> None:
        try:
            with self.turns.turn():
                outcomes[context.index] = MemberActor(None, torch.get_num_threads()).run(self.payload, context, data)
        except BaseException as err:  # the driver's thread reports it
            outcomes[context.index] = err
        finally:
            self._finished.put(context.index)


def _join(threads: list[threading.Thread]) -> None:
    """Waits for the member threads (stopped by :meth:`~hqde_lightning.turns.Turns.cancel` where the fit ends early)."""
    for thread in threads:
        thread.join()


def _member_0_only(record: logging.LogRecord) -> bool:
    """Lightning's info lines from the driver and member 0 only: the other members' fits write the same ones."""
    name = threading.current_thread().name
    return not name.startswith("hqde-member-") or name == "hqde-member-0"


def _member_error(member: int, err: BaseException) -> BaseException:
    """``err`` as the driver raises it (:func:`~hqde_lightning.actors.member_failed`)."""
    # a member's own KeyboardInterrupt: Lightning's answer fails in a thread (it sets a signal handler) with it as context
    if isinstance(err.__context__, KeyboardInterrupt):
        return KeyboardInterrupt(str(err))  # the driver's fit ends as an interrupted plain fit does
    return member_failed(f"member {member}", err, type(err).__name__)
