"""``ActorFit``: a fit whose members train in Ray actors, and the Ray instance they need.

The launcher (:mod:`hqde_lightning.launcher`) imports this module only for a fit that needs Ray
actors (importing Ray costs about a second). :meth:`ActorFit.run`:

1. pickles the ``Trainer`` with your module and data once with ``ray.cloudpickle`` and checks that
   it can be pickled (:mod:`hqde_lightning.pickling`),
2. starts Ray locally if it is not running (or joins ``ray_address``; see
   :mod:`hqde_lightning.ray_runtime`); :meth:`ActorFit.close` shuts down the instance it started,
3. on a cluster, runs ``prepare_data`` once on every other node that needs it,
4. starts a coordinator actor on the head node and hands the members to a
   :class:`~hqde_lightning.member_pool.MemberPool`, which starts one actor per member or per
   member group (:func:`~hqde_lightning.resources.worker_members`) with its resources and
   restarts dead ones,
5. while they train, forwards their metrics to your loggers and shows their progress
   (:mod:`hqde_lightning.forwarder`).
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import ray
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from ray import cloudpickle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from hqde_lightning.actors import Coordinator, FitOutcome, FitRemains, MemberResult
from hqde_lightning.codec import keeps_members_apart
from hqde_lightning.embedded import embedded_blocker
from hqde_lightning.forwarder import EventForwarder
from hqde_lightning.group import GroupUnsupported
from hqde_lightning.member import MirrorLogger
from hqde_lightning.member_pool import MemberPool
from hqde_lightning.pickling import pickle_fit
from hqde_lightning.progress import EnsembleProgress
from hqde_lightning.ray_runtime import driver_pythonpath, head_node_id, sigint_deferred, start_ray
from hqde_lightning.resources import worker_members, worker_options

__all__ = ["ActorFit"]

#: how long a failed fit waits for the coordinator to hand over the members' latest snapshots
_REMAINS_TIMEOUT_S = 60.0


class ActorFit:
    """Trains an ``HQDEStrategy`` fit's members in Ray actors (see the module docstring)."""

    def __init__(self, strategy: Any, remains: FitRemains) -> None:
        self._strategy = strategy
        #: gets the members' latest snapshots when the fit fails
        self._remains = remains
        self._coordinator: Any = None
        self._pool: MemberPool | None = None
        self._started_ray = False

    @property
    def member_nodes(self) -> dict[int, str]:
        """The Ray node id each member runs on (or ran on), once it started."""
        return {} if self._pool is None else self._pool.member_nodes

    def run(self, trainer: Trainer, function: Callable, bound: inspect.BoundArguments, data_hooks: Sequence[Any], blocker: str | None) -> FitOutcome:
        """Trains the members as member groups in Ray actors, unless ``blocker`` says why they cannot share a process
        or a group refuses the module (``GroupUnsupported``); then one member per actor, with a line saying why
        (unless ``members_per_worker=1`` asked for it). ``data_hooks`` are the fit's datamodule and module.

        Returns the members' results, their final snapshots and the coordinator's state.
        """
        strategy = self._strategy
        model: LightningModule = bound.arguments["model"]
        payload = pickle_fit(trainer, function, bound, model, dumps=cloudpickle.dumps)
        self._start_ray()
        self._prepare_data_on_other_nodes(data_hooks)
        if blocker is None:
            workers = worker_members(strategy)
            if any(len(members) > 1 for members in workers):
                try:
                    return self._run_actors(trainer, payload, workers)
                except GroupUnsupported as err:
                    self.kill()
                    blocker = str(err)
            else:
                blocker = embedded_blocker(strategy, trainer)
        if blocker is not None and strategy.members_per_worker != 1:
            rank_zero_info(f"HQDEStrategy: the members train as one Ray actor each: {blocker}.")
        return self._run_actors(trainer, payload, [[i] for i in range(strategy.num_members)])

    def kill(self) -> None:
        """Stops every actor of the fit."""
        if self._pool is not None:
            self._pool.kill()
        if self._coordinator is not None:
            try:
                ray.kill(self._coordinator, no_restart=True)
            except Exception:  # already gone
                pass
            self._coordinator = None

    def close(self) -> None:
        """Stops every actor and shuts down the Ray instance this fit started (a second Ctrl-C waits until it is done)."""
        with sigint_deferred():
            self.kill()
            if self._started_ray:
                ray.shutdown()
                self._started_ray = False

    def _start_ray(self) -> None:
        """Starts a local Ray instance, or joins ``ray_address``, unless Ray is already initialised.

        Whether this fit started Ray is decided before ``ray.init`` runs, so that :meth:`close`
        shuts down every process ``ray.init`` started, also when Ctrl-C (held back until
        ``ray.init`` returned) ends the fit right after it.
        """
        if not ray.is_initialized() and self._strategy.ray_address is None:
            self._started_ray = True
        start_ray(self._strategy.ray_address, self._strategy.ray_init_kwargs)

    def _prepare_data_on_other_nodes(self, data_hooks: Sequence[Any]) -> None:
        """On a cluster: runs the ``prepare_data`` hooks with ``prepare_data_per_node=True`` once on every other alive node.

        As Lightning runs them once per node; the driver ran every hook before the fit, and hooks
        with ``prepare_data_per_node=False`` run there only.
        """
        hooks = [obj for obj in data_hooks if obj.prepare_data_per_node and is_overridden("prepare_data", obj)]
        here = ray.get_runtime_context().get_node_id()
        nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"] and node["NodeID"] != here]
        if not hooks or not nodes:
            return
        options: dict[str, Any] = {"num_cpus": 0}
        if self._strategy.ray_address is None:
            options["runtime_env"] = {"env_vars": {"PYTHONPATH": driver_pythonpath()}}
        task = ray.remote(_run_prepare_data)
        hooks_ref = ray.put(cloudpickle.dumps(hooks))
        affinity = [NodeAffinitySchedulingStrategy(node_id=node, soft=False) for node in nodes]
        ray.get([task.options(**options, scheduling_strategy=where).remote(hooks_ref, os.getcwd()) for where in affinity])

    def _run_actors(self, trainer: Trainer, payload: bytes, workers: list[list[int]]) -> FitOutcome:
        """Trains the members as Ray actors (``workers``: the members of each) with a coordinator actor."""
        strategy = self._strategy
        check_clones = keeps_members_apart(strategy.sync, strategy.sync_strength)
        # on the head node, whose loss ends the cluster anyway: never lost with a member's node
        on_head = NodeAffinitySchedulingStrategy(node_id=head_node_id(), soft=False)
        coordinator = (
            ray.remote(Coordinator)
            .options(num_cpus=0, scheduling_strategy=on_head)
            .remote(strategy.num_members, copy.deepcopy(strategy.aggregator), strategy.topology, check_clones=check_clones)
        )
        self._coordinator = coordinator
        try:
            results = self._run_members(trainer, payload, coordinator, workers)
        except BaseException as err:
            if not isinstance(err, GroupUnsupported):  # (before any step: the members then train one per actor)
                self._keep_remains(coordinator)
            raise
        return results, ray.get(coordinator.latest_snapshots.remote()), ray.get(coordinator.state_dict.remote())

    def _keep_remains(self, coordinator: Any) -> None:
        """The failed fit's members as the coordinator last heard of them (the member that failed, where it failed)."""
        try:
            self._remains.snapshots.update(ray.get(coordinator.latest_snapshots.remote(), timeout=_REMAINS_TIMEOUT_S))
        except Exception as err:  # the coordinator is gone too: the fit's own error goes on
            rank_zero_warn(f"HQDEStrategy: the members' states could not be fetched after the fit failed ({type(err).__name__}: {err}).")

    def _run_members(self, trainer: Trainer, payload: bytes, coordinator: Any, workers: list[list[int]]) -> list[MemberResult]:
        """Runs the actors in a :class:`~hqde_lightning.member_pool.MemberPool` until every member finished or was given up on."""
        strategy = self._strategy
        options, threads = worker_options(strategy, workers)
        mirrors = [MirrorLogger.describe(logger) for logger in trainer.loggers]
        progress = EnsembleProgress(strategy.num_members, enabled=trainer.progress_bar_callback is not None)
        self._pool = MemberPool(strategy, coordinator, payload, workers, options, threads, mirrors, EventForwarder(trainer, strategy, progress))
        strategy.sync_history = []
        strategy.dropped_members = self._pool.dropped
        try:
            return self._pool.run()
        finally:
            progress.close()


def _run_prepare_data(hooks: bytes, cwd: str) -> None:
    """A Ray task on one node: runs ``prepare_data`` of the pickled objects there, in the driver's directory if it exists."""
    if os.path.isdir(cwd):
        os.chdir(cwd)
    for obj in cloudpickle.loads(hooks):
        obj.prepare_data()
