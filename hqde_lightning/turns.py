"""Turns: member fits in threads of the driver that run one at a time, and the in-process coordinator they talk to.

The pieces :class:`~hqde_lightning.member_threads.MemberThreads` runs members with, without Ray:

* :class:`Turns` lets one member thread run at a time, first come first served. A member gives
  its turn away only where a member actor would wait for the others (:func:`resolve`: a sync
  point, a checkpoint waiting for the other members' snapshots), so members alternate epoch by
  epoch as in a for-loop. Each turn restores the member's own random generators (torch, CUDA,
  numpy, Python) and Lightning's seed variables, so each member draws the numbers it draws alone;
* :class:`InProcessActor` serves an object (the fit's
  :class:`~hqde_lightning.actors.Coordinator`) on an asyncio loop in a thread of its own and is
  called as a Ray actor handle is: ``handle.sync.remote(...)`` returns a future;
* :func:`resolve` is what member code calls instead of ``ray.get``: it waits for such a future
  (giving the turn away meanwhile), reads a Ray reference with ``ray.get`` and returns any other
  value as it is, so the same member code runs in a Ray actor and in a thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import os
import sys
import threading
from collections import deque
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

from hqde_lightning.checkpoint import capture_rng_states, restore_rng_states

__all__ = ["InProcessActor", "MemberCancelled", "Turns", "resolve"]

#: Lightning's seed variables (``seed_everything``): worker seeds are derived from them
_SEED_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")
#: the turn a thread holds or waits for, where it waits in :func:`resolve`
_local = threading.local()


class MemberCancelled(Exception):
    """Ends a member thread's fit at its next wait because another member failed or the fit was interrupted."""


class Turns:
    """One member thread runs at a time, first come first served, each with its own random generators."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._waiting: deque[int] = deque()
        self._holder: int | None = None
        self._states: dict[int, tuple[dict[str, Any], dict[str, str | None]]] = {}
        #: set when the fit is being ended: waiting threads raise :class:`MemberCancelled`
        self.cancelled = threading.Event()

    def take(self) -> None:
        """Waits for this thread's turn, then restores its random generators (from its previous turn)."""
        me = threading.get_ident()
        with self._condition:
            self._waiting.append(me)
            try:
                while self._holder is not None or self._waiting[0] != me:
                    if self.cancelled.is_set():
                        raise MemberCancelled("the fit was ended while this member waited for its turn")
                    self._condition.wait()
            except BaseException:
                self._waiting.remove(me)
                self._condition.notify_all()
                raise
            self._waiting.popleft()
            self._holder = me
        saved = self._states.pop(me, None)
        if saved is not None:
            rng, variables = saved
            restore_rng_states(rng)
            for name, value in variables.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def give(self) -> None:
        """Ends this thread's turn, keeping its random generators for its next one."""
        me = threading.get_ident()
        self._states[me] = (capture_rng_states(), {name: os.environ.get(name) for name in _SEED_VARIABLES})
        with self._condition:
            self._holder = None
            self._condition.notify_all()

    @contextmanager
    def turn(self) -> Any:
        """Runs the block as this thread's turns: taken now, given away in :func:`resolve`'s waits, given at the end."""
        self.take()
        _local.turns = self
        try:
            yield
        finally:
            _local.turns = None
            if self._holder == threading.get_ident():
                self.give()

    def wait(self, future: concurrent.futures.Future) -> None:
        """Waits (without the turn) until ``future`` is done.

        Raises:
            MemberCancelled: when the fit is ended first.
        """
        future.add_done_callback(self._wake)
        with self._condition:
            while not future.done():
                if self.cancelled.is_set():
                    raise MemberCancelled("the fit was ended while this member waited for the others")
                self._condition.wait()

    def _wake(self, _: Any = None) -> None:
        with self._condition:
            self._condition.notify_all()

    def cancel(self) -> None:
        """Ends every member's fit: a waiting member at once, the running one at its next call to the coordinator.

        The running member calls it at least every half second of training (its progress reports),
        and at each metrics row and sync. :class:`MemberCancelled` is raised there, in the member's
        own code path, so its fit ends as a failed plain fit ends (its callbacks' ``on_exception`` run).
        """
        self.cancelled.set()
        self._wake()


def resolve(ref: Any) -> Any:
    """The value behind ``ref``: a future of an :class:`InProcessActor` (waited for), a Ray reference (``ray.get``) or a value.

    A member thread gives its turn away while it waits and takes a turn again afterwards.
    """
    ray = sys.modules.get("ray")  # a process that never imported Ray holds no Ray reference (importing it costs ~1 s)
    if ray is not None and isinstance(ref, ray.ObjectRef):
        return ray.get(ref)
    if not isinstance(ref, concurrent.futures.Future):
        return ref
    turns: Turns | None = getattr(_local, "turns", None)
    if ref.done() or turns is None:
        return ref.result()
    turns.give()
    try:
        turns.wait(ref)
    finally:
        if not turns.cancelled.is_set():
            turns.take()
    return ref.result()


class _Method:
    def __init__(self, actor: InProcessActor, name: str) -> None:
        self._actor, self._name = actor, name

    def remote(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        return self._actor.call(self._name, args, kwargs)


class InProcessActor:
    """Serves ``instance`` on an asyncio loop in a thread of its own; ``handle.method.remote(...)`` returns a future.

    Calls run in the order they were made, one at a time, as calls of an asyncio Ray actor do: a
    coroutine method waiting (a sync round waiting for the other members) lets the next call run.
    """

    def __init__(self, instance: Any) -> None:
        self._instance = instance
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"hqde-{type(instance).__name__.lower()}", daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self, name)

    def call(self, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> concurrent.futures.Future:
        """Schedules ``instance.name(*args, **kwargs)``; a member thread whose fit was cancelled gets :class:`MemberCancelled` instead."""
        turns: Turns | None = getattr(_local, "turns", None)
        if turns is not None and turns.cancelled.is_set():
            raise MemberCancelled("the fit was ended while this member trained")
        method = getattr(self._instance, name)

        async def run() -> Any:
            result = method(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    def stop(self) -> None:
        """Stops the loop; calls still waiting never complete."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
