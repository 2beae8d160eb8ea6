"""``MemberPool``: the member actors of one fit, their start-up and their restarts.

The launcher hands the pool the pickled ``Trainer`` and the coordinator; :meth:`MemberPool.run`
starts one :class:`~hqde_lightning.actors.MemberActor` per member on the node
:class:`~hqde_lightning.placement.PlacementScorer` chooses, forwards the members' events to the
driver while they train, records where each member runs, restarts a member whose actor dies
(from its last end-of-epoch snapshot, up to ``max_member_restarts`` times) and returns every
member's :class:`~hqde_lightning.actors.MemberResult`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import ray
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from hqde_lightning.actors import MemberActor, MemberInterrupted, MemberResult
from hqde_lightning.member import MemberContext
from hqde_lightning.placement import PlacementScorer, describe_resources, fits_node, ray_resources
from hqde_lightning.ray_runtime import alive_nodes

__all__ = ["MemberPool"]

_POLL_SECONDS = 0.25


class MemberPool:
    """Runs the member actors of one ``HQDEStrategy`` fit until every member finished or was given up on.

    Args:
        strategy: the driver's ``HQDEStrategy`` (ensemble size, seeds, sync settings, restart policy).
        coordinator: handle of the fit's coordinator actor.
        payload: the pickled ``(trainer, function name, args, kwargs)`` every member runs.
        options: each member actor's Ray options (resources, runtime environment).
        threads: torch threads per member.
        mirrors: per user logger, what the member's stand-in logger shows.
        forwarder: hands the members' events to the driver's loggers and progress bars.
    """

    def __init__(
        self, strategy: Any, coordinator: Any, payload: bytes, options: Mapping[str, Any], threads: int, mirrors: list[dict[str, Any]], forwarder: Any
    ) -> None:
        self.strategy = strategy
        self.coordinator = coordinator
        self.options = dict(options)
        self.threads = threads
        self.mirrors = mirrors
        self.forwarder = forwarder
        #: the Ray node id each member runs on, once it started
        self.member_nodes: dict[int, str] = {}
        #: members given up on after their restarts ran out (``on_member_failure="continue"``)
        self.dropped: list[int] = []
        self._payload_ref = ray.put(payload)
        self._member_cls = ray.remote(MemberActor)
        self._cwd = os.getcwd()
        self._placement = PlacementScorer.from_ray()
        self._actors: list[Any] = []
        #: running ``run`` calls and the member each belongs to
        self._futures: dict[Any, int] = {}
        #: the node placement chose for each member
        self._nodes: dict[int, str] = {}
        #: member start probes (``node_id()`` calls) not answered yet: index and deadline
        self._starting: dict[Any, tuple[int, float]] = {}
        self._restarts = dict.fromkeys(range(strategy.num_members), 0)

    def start(self, index: int, restart_from: Any = None) -> None:
        """Starts member ``index``'s actor on the best-scoring node (``restart_from``: ``[ref]`` of its snapshot)."""
        strategy = self.strategy
        self.forwarder.forget(index)
        self._nodes[index] = self._placement.place(self.options)
        affinity = NodeAffinitySchedulingStrategy(node_id=self._nodes[index], soft=True)
        actor = self._member_cls.options(**self.options, scheduling_strategy=affinity).remote(self._cwd, self.threads)
        self._actors.append(actor)
        self.member_nodes.pop(index, None)
        self._starting[actor.node_id.remote()] = (index, time.monotonic() + strategy.member_start_timeout_s)
        context = MemberContext(
            index=index,
            seed=strategy.seed + index,
            coordinator=self.coordinator,
            sync=strategy.sync,
            sync_strength=strategy.sync_strength,
            sync_every_n_epochs=strategy.sync_every_n_epochs,
            bagging=strategy.bagging,
            score_metric=strategy.score_metric,
            score_mode=strategy.score_mode,
            mirrors=self.mirrors,
            restart_from=restart_from,
        )
        self._futures[actor.run.remote(self._payload_ref, context)] = index

    def run(self) -> list[MemberResult]:
        """Starts every member and waits for all of them; returns the results of the members that finished, by index."""
        for index in range(self.strategy.num_members):
            self.start(index)
        rank_zero_info(f"HQDEStrategy: training {self.strategy.num_members} members with {_describe(self.options)} each (seed {self.strategy.seed})")
        results: dict[int, MemberResult] = {}
        while self._futures:
            done, _ = ray.wait(list(self._futures), num_returns=len(self._futures), timeout=_POLL_SECONDS)
            self.forwarder.handle(_drain(self.coordinator))
            self._watch_starts()
            for ref in done:
                index = self._futures.pop(ref)
                try:
                    results[index] = ray.get(ref)
                except RayTaskError as err:
                    if not isinstance(err.cause, RayActorError):
                        raise _member_error(index, err) from None
                    self._on_member_death(index, err)
                except RayActorError as err:
                    self._on_member_death(index, err)
                else:
                    self._placement.record_speed(self._nodes[index], self.forwarder.batches_per_second.get(index, 0.0))
                    self._placement.release(self._nodes[index], self.options, succeeded=True)
        self.forwarder.handle(_drain(self.coordinator))
        return [results[i] for i in sorted(results)]

    def kill(self) -> None:
        """Stops every member actor this pool started."""
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self._actors = []

    def _watch_starts(self) -> None:
        """Records where started members run; fails the fit when one waited longer than ``member_start_timeout_s``.

        A member that does not start although its request fits the nodes waits for resources
        that other actors or jobs hold; Ray would keep it waiting forever.
        """
        starting = self._starting
        if not starting:
            return
        ready, _ = ray.wait(list(starting), num_returns=len(starting), timeout=0)
        for ref in ready:
            index, _ = starting.pop(ref)
            try:
                self.member_nodes[index] = ray.get(ref)
            except (RayActorError, RayTaskError):  # the member died before starting; its fit call reports it
                pass
        now = time.monotonic()
        late = sorted(index for index, deadline in starting.values() if now > deadline)
        if late:
            timeout = self.strategy.member_start_timeout_s
            offer = "; ".join(f"node {n.node_id[:8]} ({n.address}): {describe_resources(n.resources)}" for n in alive_nodes())
            raise RuntimeError(
                f"HQDEStrategy: member(s) {late} asked for {describe_resources(ray_resources(self.options))} each but did not start within"
                f" `member_start_timeout_s={timeout:g}`: other actors or jobs hold the resources. The nodes offer {offer};"
                f" free now: {describe_resources(ray.available_resources())}. Free resources, lower `resources_per_member`"
                " or `num_members`, or raise `member_start_timeout_s`."
            )

    def _on_member_death(self, index: int, err: Exception) -> None:
        """Restarts a dead member from its last end-of-epoch snapshot, or gives up on it as configured.

        When the member's node left the cluster, the member restarts on another node; when no
        alive node can host it (on a single machine: Ray itself stopped), the fit fails saying so.
        """
        strategy = self.strategy
        node_id = self.member_nodes.get(index, self._nodes[index])
        self._placement.release(node_id, self.options, succeeded=False)
        self._check_node_alive(index, node_id)
        if self._restarts[index] >= strategy.max_member_restarts:
            message = f"member {index}'s actor died {self._restarts[index] + 1} time(s), more than `max_member_restarts={strategy.max_member_restarts}`"
            if strategy.on_member_failure == "fail":
                raise RuntimeError(f"{message}; stopping the fit (checkpoints written so far are intact): {err}")
            rank_zero_warn(f"{message}; continuing with the other members (`on_member_failure='continue'`).")
            self.dropped.append(index)
            self.coordinator.finish.remote(index)
            return
        self._restarts[index] += 1
        snapshot_ref = self.coordinator.latest_snapshot.remote(index)
        rank_zero_warn(
            f"HQDEStrategy: member {index}'s actor died ({type(err).__name__}); restarting it from its last end-of-epoch"
            f" snapshot (restart {self._restarts[index]} of {strategy.max_member_restarts})."
        )
        self.start(index, restart_from=[snapshot_ref])

    def _check_node_alive(self, index: int, node_id: str) -> None:
        """Raises when member ``index``'s node is gone and no alive node can host the member again."""
        try:
            nodes = ray.nodes()
        except Exception as err:  # the cluster itself is unreachable
            raise RuntimeError(f"HQDEStrategy: member {index}'s actor died and Ray no longer answers ({err}): Ray itself stopped.") from err
        if any(n["NodeID"] == node_id and n.get("Alive") for n in nodes):
            return
        lost = next((n for n in nodes if n["NodeID"] == node_id), {})
        where = f"Ray node {node_id[:8]} ({lost.get('NodeManagerAddress', 'unknown address')})"
        alive = alive_nodes()
        request = ray_resources(self.options)
        if not any(fits_node(request, n) for n in alive):
            raise RuntimeError(
                f"HQDEStrategy: member {index} was lost with its {where}, and no alive node can host it"
                f" ({describe_resources(request)}; alive nodes: {'; '.join(describe_resources(n.resources) for n in alive) or 'none'})."
                " On a single machine this means Ray itself stopped (its raylet died). Checkpoints written so far are intact."
            )
        self._placement.remove(node_id)
        rank_zero_warn(f"HQDEStrategy: {where} left the cluster; member {index} restarts on another node.")


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


def _describe(options: Mapping[str, Any]) -> str:
    parts = [f"{options.get('num_cpus', 0):g} CPU"]
    if options.get("num_gpus"):
        parts.append(f"{options['num_gpus']:g} GPU")
    return " + ".join(parts)


def _member_error(index: int, err: Exception) -> BaseException:
    if isinstance(err, RayTaskError) and isinstance(err.cause, MemberInterrupted):
        return KeyboardInterrupt(str(err.cause))  # the driver's fit ends as an interrupted plain fit does
    if isinstance(err, RayTaskError):
        cause = err.as_instanceof_cause()
        cause.args = (f"member {index} failed: {cause.args[0] if cause.args else err}",) + tuple(cause.args[1:])
        return cause
    return RuntimeError(f"member {index}'s actor died: {err}")
