"""The two kinds of Ray actor a fit uses: the coordinator and the members.

:class:`Coordinator` (one per fit, an asyncio actor taking no CPU) collects each sync round's
member weights, runs the aggregator once every active member has sent its weights, and hands
the consensus back through the object store. It also keeps the members' latest snapshots
(for whole-ensemble checkpoints and restarts) and queues metrics and progress for the driver.

:class:`MemberActor` (one per member) unpickles the user's ``Trainer``, switches its strategy
into member mode and runs the user's own Lightning fit loop.

Both are plain classes here; the launcher wraps them with ``ray.remote`` and their resources.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.trainer.states import TrainerState
from ray import cloudpickle

from hqde_lightning.aggregation import Aggregator
from hqde_lightning.checkpoint import AtomicCheckpointIO
from hqde_lightning.topology import CommStats, Executor, Flat, RayExecutor, Topology, decode_payload
from hqde_lightning.member import MemberContext, MemberSync, MirrorLogger, state_to_numpy, tree_to_cpu

__all__ = ["Coordinator", "MemberActor", "MemberResult"]


@dataclass
class _Round:
    event: asyncio.Event
    payloads: dict[int, tuple[Any, float | None, int, int, dict[str, int]]] = field(default_factory=dict)
    result: Any = None
    error: str | None = None


class Coordinator:
    """Collects member weights per round, aggregates them and shares the consensus.

    Args:
        num_members: ensemble size.
        aggregator: the rule that combines member weights.
        topology: the path the weights take (flat, tree, map-reduce).
        state: a previous run's :meth:`state_dict` when resuming.
    """

    def __init__(self, num_members: int, aggregator: Aggregator, topology: Topology, state: Mapping[str, Any] | None = None) -> None:
        self.num_members = num_members
        self.aggregator = aggregator
        self.topology = topology
        self.active = set(range(num_members))
        self.rounds: dict[int, _Round] = {}
        self.snapshots: dict[int, tuple[int, Any]] = {}
        self.events: list[tuple[Any, ...]] = []
        self.history: list[dict[str, Any]] = []
        self._snapshot_posted: asyncio.Event | None = None
        self._executor: Executor | None = None
        if state is not None:
            self.load_state_dict(state)

    # ---------------------------------------------------------------- syncing
    async def sync(self, member: int, round_id: int, payload: list[Any], nbytes: int, layout: dict[str, int], score: float | None, num_samples: int) -> list[Any]:
        """Adds ``member``'s payload (``[ObjectRef]``) to round ``round_id``; returns ``[consensus_ref]`` once done."""
        rnd = self.rounds.get(round_id)
        if rnd is None:
            rnd = self.rounds[round_id] = _Round(asyncio.Event())
        rnd.payloads[member] = (payload[0], score, num_samples, nbytes, layout)
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
            if isinstance(self.topology, Flat):
                states = [decode_payload(ray.get(e[0])) for e in entries]
                result = self.aggregator(states, scores=scores, sample_counts=counts, members=members)
                consensus = state_to_numpy(result.state)
                comm = CommStats(1, sum(sizes) + sum(v.nbytes for v in consensus.values()), 0)
            else:
                if self._executor is None:
                    self._executor = RayExecutor()
                result, comm = self.topology.reduce([e[0] for e in entries], sizes, self.aggregator, scores, counts, self._executor, entries[0][4])
                consensus = state_to_numpy(result.state)
            rnd.result = ray.put(consensus)
            stats = self._round_stats(round_id, members, result, time.perf_counter() - started, raw_scores)
            stats.update(bytes_received=sum(sizes), fp32_bytes=4 * sum(entries[0][4].values()) * len(entries), comm_rounds=comm.rounds, bytes_moved=comm.bytes_moved)
            stats["sample_counts"] = [e[2] for e in entries]
            self.history.append(stats)
            self.events.append(("sync", -1, stats))
        except Exception as exc:  # every waiting member must hear of it, none may hang
            rnd.error = f"{type(exc).__name__}: {exc}"
        rnd.payloads.clear()
        rnd.event.set()

    def _round_stats(self, round_id: int, members: list[int], result: Any, seconds: float, scores: list[float | None]) -> dict[str, Any]:
        return {
            "round": round_id,
            "members": members,
            "excluded": [members[i] for i in result.excluded],
            "member_weights": [float(w) for w in result.member_weights],
            "scores": scores,
            "aggregation_seconds": seconds,
            "topology": self.topology.name,
            "info": {k: v for k, v in result.info.items() if isinstance(v, (int, float, str, bool, list))},
        }

    def finish(self, member: int) -> None:
        """``member``'s fit ended: later rounds no longer wait for it."""
        self.active.discard(member)
        for round_id in list(self.rounds):
            self._maybe_complete(round_id)
        self._notify_snapshot()

    # -------------------------------------------------------------- snapshots
    def post_snapshot(self, member: int, round_id: int, snapshot: dict[str, Any]) -> None:
        """Keeps ``member``'s latest snapshot (copied out of the object store, so it outlives the member)."""
        previous = self.snapshots.get(member)
        if previous is None or previous[0] <= round_id:
            self.snapshots[member] = (round_id, tree_to_cpu(snapshot))
        self._notify_snapshot()

    def _notify_snapshot(self) -> None:
        if self._snapshot_posted is not None:
            self._snapshot_posted.set()

    async def snapshots_at(self, round_id: int, exclude: int | None = None) -> dict[int, dict[str, Any]]:
        """Waits until every active member but ``exclude`` posted a snapshot of round ``round_id`` or later."""
        while not all(m in self.snapshots and self.snapshots[m][0] >= round_id for m in self.active if m != exclude):
            self._snapshot_posted = asyncio.Event()
            await self._snapshot_posted.wait()
        return {m: snapshot for m, (_, snapshot) in sorted(self.snapshots.items()) if m != exclude}

    def latest_snapshot(self, member: int) -> dict[str, Any] | None:
        """``member``'s latest end-of-epoch snapshot (a Lightning checkpoint dict), if any."""
        entry = self.snapshots.get(member)
        return None if entry is None else entry[1]

    # --------------------------------------------------------- driver channel
    def emit(self, event: tuple[Any, ...]) -> None:
        self.events.append(event)

    def drain(self) -> list[tuple[Any, ...]]:
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
    callback_metrics: dict[str, float]
    fit_loop_state: dict[str, Any]
    callbacks_state: dict[str, Any]
    trainer_state: TrainerState
    score: float | None


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

    @staticmethod
    def _write_snapshot(snapshot: dict[str, Any], index: int) -> str:
        path = os.path.join(_snapshot_dir(), f"member_{index}.ckpt")
        AtomicCheckpointIO().save_checkpoint(snapshot, path)
        return path

    def run(self, payload: bytes, context: MemberContext) -> MemberResult:
        """Unpickles ``(trainer, function name, args, kwargs)`` and runs it as member ``context.index``.

        A restarted member (``context.restart_from`` holds its last snapshot) resumes from it.
        """
        from lightning.pytorch import seed_everything

        trainer, function_name, args, kwargs = cloudpickle.loads(payload)
        if context.restart_from is not None:
            snapshot = ray.get(context.restart_from[0])
            if snapshot is not None:
                bound = inspect.signature(getattr(trainer, function_name)).bind(*args, **kwargs)
                bound.arguments["ckpt_path"] = self._write_snapshot(snapshot, context.index)
                args, kwargs = bound.args, bound.kwargs
        strategy = trainer.strategy
        strategy._enter_member_mode(context)
        trainer._loggers = [MirrorLogger(m, j, context.index, context.coordinator) for j, m in enumerate(context.mirrors)]
        unwanted: tuple[type, ...] = (ProgressBar,) if context.index == 0 else (ProgressBar, ModelSummary)
        sync = MemberSync(context)
        trainer.callbacks = [sync] + [cb for cb in trainer.callbacks if not isinstance(cb, unwanted)]
        strategy._member_sync = sync
        seed_everything(context.seed, workers=True, verbose=False)
        getattr(trainer, function_name)(*args, **kwargs)
        context.coordinator.finish.remote(context.index)
        callbacks_state = {}
        if context.index == 0:
            callbacks_state = {cb.state_key: cb.state_dict() for cb in trainer.callbacks if cb is not sync and cb.state_dict()}
        return MemberResult(
            index=context.index,
            state_dict=state_to_numpy(trainer.lightning_module.state_dict()),
            callback_metrics={k: float(v) for k, v in trainer.callback_metrics.items() if _is_scalar(v)},
            fit_loop_state=trainer.fit_loop.state_dict(),
            callbacks_state=callbacks_state,
            trainer_state=trainer.state,
            score=sync.score(trainer),
        )


def _snapshot_dir() -> str:
    return tempfile.mkdtemp(prefix="hqde-restart-")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)
