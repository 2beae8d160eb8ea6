"""``MemberPool``: the actors of one fit, their start-up and their restarts.

:class:`~hqde_lightning.actor_fit.ActorFit` hands the pool the pickled ``Trainer``, the coordinator and the members each actor
trains (one: a :class:`~hqde_lightning.actors.MemberActor`; several: a member group in a
:class:`~hqde_lightning.group_actor.GroupActor`). :meth:`MemberPool.run` starts every actor on the
node :class:`~hqde_lightning.placement.PlacementScorer` chooses, forwards the members' events to
the driver while they train, records where each member runs, restarts an actor that dies (its
members from their last end-of-epoch snapshots, up to ``max_member_restarts`` times) and returns
every member's :class:`~hqde_lightning.actors.MemberResult`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from hqde_lightning.actors import MemberActor, MemberInterrupted, MemberResult, member_failed
from hqde_lightning.group import GroupUnsupported
from hqde_lightning.group_actor import GroupActor, GroupContext
from hqde_lightning.member import MemberContext
from hqde_lightning.placement import PlacementScorer, describe_resources, fits_node, ray_resources
from hqde_lightning.ray_runtime import alive_nodes

__all__ = ["MemberPool"]

_POLL_SECONDS = 0.25


class MemberPool:
    """Runs the actors of one ``HQDEStrategy`` fit until every member finished or was given up on.

    Args:
        strategy: the driver's ``HQDEStrategy`` (ensemble size, seeds, sync settings, restart policy).
        coordinator: handle of the fit's coordinator actor.
        payload: the pickled ``(trainer, function name, args, kwargs)`` every actor runs.
        workers: the members each actor trains, by member index.
        options: each actor's Ray options (resources, runtime environment).
        threads: each actor's torch threads.
        mirrors: per user logger, what the actors' stand-in loggers show.
        forwarder: hands the members' events to the driver's loggers and progress bars.
    """

    def __init__(
        self,
        strategy: Any,
        coordinator: Any,
        payload: bytes,
        workers: list[list[int]],
        options: list[dict[str, Any]],
        threads: list[int],
        mirrors: list[dict[str, Any]],
        forwarder: Any,
    ) -> None:
        self.strategy = strategy
        self.coordinator = coordinator
        self.workers = workers
        self.options = options
        self.threads = threads
        self.mirrors = mirrors
        self.forwarder = forwarder
        #: the Ray node id each member runs on, once its actor started
        self.member_nodes: dict[int, str] = {}
        #: members given up on after their restarts ran out (``on_member_failure="continue"``)
        self.dropped: list[int] = []
        self._payload_ref = ray.put(payload)
        self._member_cls = ray.remote(MemberActor)
        self._group_cls = ray.remote(GroupActor)
        self._cwd = os.getcwd()
        self._placement = PlacementScorer.from_ray()
        self._actors: list[Any] = []
        #: running ``run`` calls and the worker (its position in ``workers``) each belongs to
        self._futures: dict[Any, int] = {}
        #: the node placement chose for each worker
        self._nodes: dict[int, str] = {}
        #: start probes (``node_id()`` calls) not answered yet: worker and deadline
        self._starting: dict[Any, tuple[int, float]] = {}
        self._restarts = dict.fromkeys(range(len(workers)), 0)

    def start(self, worker: int, restart_from: list[Any] | None = None) -> None:
        """Starts ``worker``'s actor on the best-scoring node (``restart_from``: ``[ref]`` of each member's snapshot)."""
        strategy, members, options = self.strategy, self.workers[worker], self.options[worker]
        for member in members:
            self.forwarder.forget(member)
            self.member_nodes.pop(member, None)
        self._nodes[worker] = self._placement.place(options)
        affinity = NodeAffinitySchedulingStrategy(node_id=self._nodes[worker], soft=True)
        cls = self._member_cls if len(members) == 1 else self._group_cls
        actor = cls.options(**options, scheduling_strategy=affinity).remote(self._cwd, self.threads[worker])
        self._actors.append(actor)
        self._starting[actor.node_id.remote()] = (worker, time.monotonic() + strategy.member_start_timeout_s)
        if len(members) > 1:
            context: Any = GroupContext(member_ids=members, coordinator=self.coordinator, mirrors=self.mirrors, restart_from=restart_from)
        else:
            context = MemberContext.of(strategy, members[0], self.coordinator, self.mirrors, restart_from)
        self._futures[actor.run.remote(self._payload_ref, context)] = worker

    def run(self) -> list[MemberResult]:
        """Starts every actor and waits for all of them; returns the results of the members that finished, by index.

        Raises:
            GroupUnsupported: a group actor refused the module before its first step (the
                fit then trains one member per actor).
        """
        for worker in range(len(self.workers)):
            self.start(worker)
        rank_zero_info(f"HQDEStrategy: training {self.strategy.num_members} members {_describe(self.workers, self.options)} (seed {self.strategy.seed})")
        results: dict[int, MemberResult] = {}
        while self._futures:
            done, _ = ray.wait(list(self._futures), num_returns=len(self._futures), timeout=_POLL_SECONDS)
            self.forwarder.handle(_drain(self.coordinator))
            self._watch_starts()
            for ref in done:
                worker = self._futures.pop(ref)
                try:
                    returned = ray.get(ref)
                except RayTaskError as err:
                    if isinstance(err.cause, GroupUnsupported):
                        raise err.cause from None
                    if not isinstance(err.cause, RayActorError):
                        error = _member_error(self.workers[worker], err)
                        raise error from error.__cause__  # (Ray's error, with the member's traceback, where it is yours)
                    self._on_worker_death(worker, err)
                except RayActorError as err:
                    self._on_worker_death(worker, err)
                else:
                    for result in returned if isinstance(returned, list) else [returned]:
                        results[result.index] = result
                    speeds = [self.forwarder.batches_per_second.get(m, 0.0) for m in self.workers[worker]]
                    self._placement.record_speed(self._nodes[worker], sum(speeds) / len(speeds))
                    self._placement.release(self._nodes[worker], self.options[worker], succeeded=True)
        self.forwarder.handle(_drain(self.coordinator))
        return [results[i] for i in sorted(results)]

    def kill(self) -> None:
        """Stops every member actor this pool started and lets go of the pool's objects in Ray's object store.

        With no reference left, Ray does not try to recover them when their node is gone (as
        on a single machine whose raylet died) while it shuts down.
        """
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self._actors = []
        self._payload_ref = None
        self._futures.clear()
        self._starting.clear()

    def _watch_starts(self) -> None:
        """Records where started members run; fails the fit when an actor waited longer than ``member_start_timeout_s``.

        An actor that does not start although its request fits the nodes waits for resources
        that other actors or jobs hold; Ray would keep it waiting forever.
        """
        starting = self._starting
        if not starting:
            return
        ready, _ = ray.wait(list(starting), num_returns=len(starting), timeout=0)
        for ref in ready:
            worker, _ = starting.pop(ref)
            try:
                node = ray.get(ref)
            except (RayActorError, RayTaskError):  # the actor died before starting; its fit call reports it
                continue
            self.member_nodes.update(dict.fromkeys(self.workers[worker], node))
        now = time.monotonic()
        late = sorted(worker for worker, deadline in starting.values() if now > deadline)
        if late:
            timeout = self.strategy.member_start_timeout_s
            members = sorted(m for worker in late for m in self.workers[worker])
            offer = "; ".join(f"node {n.node_id[:8]} ({n.address}): {describe_resources(n.resources)}" for n in alive_nodes())
            asked = " or ".join(sorted({describe_resources(ray_resources(self.options[worker])) for worker in late}))
            raise RuntimeError(
                f"HQDEStrategy: member(s) {members} asked for {asked} per actor but did not start within"
                f" `member_start_timeout_s={timeout:g}`: other actors or jobs hold the resources. The nodes offer {offer};"
                f" free now: {describe_resources(ray.available_resources())}. Free resources, lower `resources_per_member`"
                " or `num_members`, or raise `member_start_timeout_s`."
            )

    def _on_worker_death(self, worker: int, err: Exception) -> None:
        """Restarts a dead actor, its members from their last end-of-epoch snapshots, or gives up on them as configured.

        When the actor's node left the cluster, it restarts on another node; when no alive node
        can host it (on a single machine: Ray itself stopped), the fit fails saying so.
        """
        strategy, members = self.strategy, self.workers[worker]
        name = f"member {members[0]}'s actor" if len(members) == 1 else f"the actor of members {members}"
        node_id = self.member_nodes.get(members[0], self._nodes[worker])
        self._placement.release(node_id, self.options[worker], succeeded=False)
        self._check_node_alive(worker, node_id, name)
        if self._restarts[worker] >= strategy.max_member_restarts:
            message = f"{name} died {self._restarts[worker] + 1} time(s), more than `max_member_restarts={strategy.max_member_restarts}`"
            if strategy.on_member_failure == "fail":
                raise RuntimeError(f"{message}; stopping the fit (checkpoints written so far are intact): {err}")
            rank_zero_warn(f"{message}; continuing with the other members (`on_member_failure='continue'`).")
            for member in members:
                self.dropped.append(member)
                self.coordinator.finish.remote(member)
            return
        self._restarts[worker] += 1
        snapshot_refs = [self.coordinator.latest_snapshot.remote(member) for member in members]
        rank_zero_warn(
            f"HQDEStrategy: {name} died ({type(err).__name__}); restarting it from the last end-of-epoch"
            f" snapshot (restart {self._restarts[worker]} of {strategy.max_member_restarts})."
        )
        self.start(worker, restart_from=snapshot_refs)

    def _check_node_alive(self, worker: int, node_id: str, name: str) -> None:
        """Raises when ``worker``'s node is gone and no alive node can host its actor again."""
        try:
            nodes = ray.nodes()
        except Exception as err:  # the cluster itself is unreachable
            raise RuntimeError(f"HQDEStrategy: {name} died and Ray no longer answers ({err}): Ray itself stopped.") from err
        if any(n["NodeID"] == node_id and n.get("Alive") for n in nodes):
            return
        lost = next((n for n in nodes if n["NodeID"] == node_id), {})
        where = f"Ray node {node_id[:8]} ({lost.get('NodeManagerAddress', 'unknown address')})"
        alive = alive_nodes()
        request = ray_resources(self.options[worker])
        members = self.workers[worker]
        who = f"member {members[0]}" if len(members) == 1 else f"members {members}"
        if not any(fits_node(request, n) for n in alive):
            raise RuntimeError(
                f"HQDEStrategy: {who} {'was lost with its' if len(members) == 1 else 'were lost with their'} {where}, and no alive node can host"
                f" {'it' if len(members) == 1 else 'their actor'} ({describe_resources(request)}; alive nodes:"
                f" {'; '.join(describe_resources(n.resources) for n in alive) or 'none'})."
                " On a single machine this means Ray itself stopped (its raylet died). Checkpoints written so far are intact."
            )
        self._placement.remove(node_id)
        rank_zero_warn(f"HQDEStrategy: {where} left the cluster; {who} restart{'s' if len(members) == 1 else ''} on another node.")


def _drain(coordinator: Any) -> list[Any]:
    """The coordinator's queued events; a coordinator that is gone fails the fit saying why."""
    try:
        return ray.get(coordinator.drain.remote())
    except RayActorError as err:
        try:
            lost = [f"{n['NodeID'][:8]} ({n.get('NodeManagerAddress', '?')})" for n in ray.nodes() if not n.get("Alive")]
        except Exception:  # GCS is gone as well
            lost = []
        where = f"Ray lost node(s) {', '.join(lost)}" if lost else "its Ray node is gone"
        raise RuntimeError(
            f"HQDEStrategy: the coordinator actor can no longer be reached ({type(err).__name__}): {where}. On a single"
            " machine this means Ray itself stopped (its raylet died). Checkpoints written so far are intact."
        ) from err


def _describe(workers: list[list[int]], options: list[dict[str, Any]]) -> str:
    """How the members are spread, e.g. "as 2 actors of [4, 4] members, each with 1 CPU + 1 GPU"."""
    first = options[0]
    parts = [f"{first.get('num_cpus', 0):g} CPU"]
    if first.get("num_gpus"):
        parts.append(f"{first['num_gpus']:g} GPU")
    if all(len(w) == 1 for w in workers):
        return f"with {' + '.join(parts)} each"
    actors = f"{len(workers)} actor{'s' if len(workers) > 1 else ''}"
    return f"as {actors} of {[len(w) for w in workers]} members, each with {' + '.join(parts)}"


def _member_error(members: list[int], err: Exception) -> BaseException:
    """The error a member's actor raised, as the driver raises it: your exception itself (its type, your message after
    ``"member i failed: "``), with Ray's error, which shows the member's traceback, as its cause."""
    who = f"member {members[0]}" if len(members) == 1 else f"members {members}"
    if isinstance(err, RayTaskError):
        cause = err.cause
        if isinstance(cause, BaseException) and not isinstance(cause, MemberInterrupted):
            cause.__cause__ = err
            return member_failed(who, cause, type(cause).__name__)
        return member_failed(who, cause if isinstance(cause, MemberInterrupted) else err.as_instanceof_cause(), str(err))
    return RuntimeError(f"{who}'s actor died: {err}")
