"""``RayEnsembleLauncher``: runs ``Trainer.fit`` as one Lightning fit loop per member in Ray actors.

``launch(fit)`` in the driver:

1. starts Ray locally if it is not running (or joins ``ray_address``),
2. pickles the ``Trainer`` with your module and data once, and checks that it can be pickled,
3. starts a coordinator actor and ``num_members`` member actors with their resources,
4. while they train, forwards their metrics to your loggers (``member_{i}/...``,
   ``ensemble/...``) and shows their progress,
5. when they finish, puts the consensus weights into your module, builds
   ``strategy.ensemble`` and restores the trainer's epoch, step, metrics, callback states and
   status as a normal ``fit`` leaves them.

``validate``/``test``/``predict`` do not start actors: they run in the driver with the
ensemble (see :mod:`hqde_lightning.evaluation`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ray
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder
from lightning.pytorch.strategies.launchers.launcher import _Launcher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from ray import cloudpickle
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from hqde_lightning.actors import Coordinator, MemberActor, MemberInterrupted, MemberResult
from hqde_lightning.aggregation import RobustAggregator, Superposition, superposition_weights
from hqde_lightning.checkpoint import HQDE_KEY, load_checkpoint_file
from hqde_lightning.ensemble import Ensemble
from hqde_lightning.evaluation import EnsembleEvaluation
from hqde_lightning.member import MemberContext
from hqde_lightning.placement import NodeCapacity, PlacementScorer, check_members_fit, default_share, describe_resources, fits_node, ray_resources
from hqde_lightning.progress import EnsembleProgress

__all__ = ["RayEnsembleLauncher", "connect_ray"]

_POLL_SECONDS = 0.25
_AUTH_HINT = (
    " Ray >= 2.60 enables token authentication by default: set `RAY_AUTH_MODE=token` (and the cluster's token)"
    " in this process's environment, or start the cluster with authentication off."
)


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fails fast when ``host:port`` refuses connections (``ray.init`` would retry for a minute)."""
    hostport = address.split("://", 1)[-1]
    if address == "auto" or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        return
    with socket.create_connection((host, int(port)), timeout=timeout):
        pass


def connect_ray(address: str, init_kwargs: Mapping[str, Any]) -> None:
    """Joins the Ray cluster at ``address`` (no-op when Ray is already initialised)."""
    if ray.is_initialized():
        return
    try:
        _check_reachable(address)
        ray.init(address=address, **dict(init_kwargs))
    except Exception as err:
        raise MisconfigurationException(
            f"HQDEStrategy could not reach Ray at `ray_address={address!r}`: {err}. Check that the cluster is running"
            " (`ray status`) and the address is right, or pass `ray_address=None` to start Ray on this machine." + _AUTH_HINT
        ) from err


def _driver_pythonpath() -> str:
    """The driver's import path, so actors on this machine import what the driver imports."""
    entries = [p for p in sys.path if p and os.path.isdir(p)]
    existing = os.environ.get("PYTHONPATH")
    if existing:
        entries.append(existing)
    return os.pathsep.join(dict.fromkeys(entries))


class RayEnsembleLauncher(_Launcher):
    """Launches an ``HQDEStrategy`` fit as parallel member actors (see the module docstring)."""

    def __init__(self, strategy: Any) -> None:
        self._strategy = strategy
        self._actors: list[Any] = []
        self._started_ray = False
        #: the Ray node id each member of the current (or last) fit runs on, once it started
        self.member_nodes: dict[int, str] = {}

    @property
    def is_interactive_compatible(self) -> bool:
        return True

    def launch(self, function: Callable, *args: Any, trainer: Trainer | None = None, **kwargs: Any) -> Any:
        assert trainer is not None
        if trainer.state.fn != TrainerFn.FITTING:
            return self._evaluate(function, args, kwargs, trainer)
        if _tuning(trainer):
            # `Tuner.lr_find` / `Tuner.scale_batch_size`: tune one member, your module, here in the driver
            return function(*args, **kwargs)
        return self._fit(function, args, kwargs, trainer)

    def kill(self, signum: Any = None) -> None:
        """Stops every actor of the current fit."""
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self._actors = []

    # ------------------------------------------------------------- evaluation
    def _evaluate(self, function: Callable, args: tuple[Any, ...], kwargs: dict[str, Any], trainer: Trainer) -> Any:
        evaluation = EnsembleEvaluation(self._strategy)
        trainer.callbacks.append(evaluation)
        try:
            return function(*args, **kwargs)
        finally:
            trainer.callbacks.remove(evaluation)
            evaluation.restore_forward()

    # -------------------------------------------------------------------- fit
    def _fit(self, function: Callable, args: tuple[Any, ...], kwargs: dict[str, Any], trainer: Trainer) -> Any:
        strategy = self._strategy
        bound = inspect.signature(function).bind(*args, **kwargs)
        model: LightningModule = bound.arguments["model"]
        ckpt_path = bound.arguments.get("ckpt_path")
        _check_ckpt_path_exists(ckpt_path)
        if ckpt_path is not None and os.path.isfile(str(ckpt_path)):
            bound.arguments["ckpt_path"] = os.path.abspath(str(ckpt_path))
            self._check_resume(bound.arguments["ckpt_path"], bound.arguments.get("weights_only"))
        _prepare_data(model, bound)
        payload = self._pickle(trainer, function, bound, model)
        try:
            self._start_ray()
            self._prepare_data_on_other_nodes(model, bound)
            # where a sync sets every member to the consensus, equal weights are intended
            check_clones = strategy.sync == "none" or (strategy.sync == "elastic" and strategy.sync_strength < 1.0)
            # on the head node, whose loss ends the cluster anyway: never lost with a member's node
            on_head = NodeAffinitySchedulingStrategy(node_id=_head_node_id(), soft=False)
            coordinator = (
                ray.remote(Coordinator)
                .options(num_cpus=0, scheduling_strategy=on_head)
                .remote(strategy.num_members, copy.deepcopy(strategy.aggregator), strategy.topology, check_clones=check_clones)
            )
            self._actors = [coordinator]
            results = self._run_members(trainer, payload, coordinator)
            _check_score_metric(strategy.score_metric, results)
            strategy.coordinator_state = ray.get(coordinator.state_dict.remote())
            self._recover(trainer, model, results)
            # every member's final full state: what ``trainer.save_checkpoint`` in the driver writes, so that it resumes
            strategy._keep_final_checkpoints(ray.get(coordinator.latest_snapshots.remote()))
            self._call_ensemble_hooks(trainer, bound)
        finally:
            with _sigint_deferred():  # a second Ctrl-C must not stop the clean-up halfway
                self.kill()
                if self._started_ray:
                    ray.shutdown()
                    self._started_ray = False
        return None

    def _call_ensemble_hooks(self, trainer: Trainer, bound: inspect.BoundArguments) -> None:
        """Calls ``on_ensemble_fit_end(trainer, strategy, val_dataloaders)`` of callbacks that have it, in the driver.

        The hook runs once, after the members came back (member-side hooks such as ``on_fit_end``
        ran inside every member). ``val_dataloaders`` is a zero-argument function returning the
        fit's validation loader(s), or ``None`` when the fit had none.
        """
        hooked = [cb for cb in trainer.callbacks if callable(getattr(cb, "on_ensemble_fit_end", None))]
        if not hooked:
            return

        def val_dataloaders() -> Any:
            loaders = bound.arguments.get("val_dataloaders")
            datamodule = _fit_datamodule(bound)
            if loaders is None and datamodule is not None:
                datamodule.setup("validate")
                loaders = datamodule.val_dataloader()
            return loaders

        for callback in hooked:
            callback.on_ensemble_fit_end(trainer, self._strategy, val_dataloaders)

    def _check_resume(self, path: str, weights_only: bool | None) -> None:
        """Loads ``ckpt_path`` once in the driver, before any actor starts: a file that is refused
        (``weights_only``, default True), damaged or of another ensemble size fails here."""
        section = load_checkpoint_file(path, weights_only=weights_only is not False).get(HQDE_KEY)
        if section is not None and int(section["num_members"]) != self._strategy.num_members:
            raise MisconfigurationException(
                f"{path} holds {section['num_members']} members but `HQDEStrategy(num_members={self._strategy.num_members})`;"
                f" resume with `num_members={section['num_members']}`."
            )

    def _prepare_data_on_other_nodes(self, model: LightningModule, bound: inspect.BoundArguments) -> None:
        """On a cluster: runs the ``prepare_data`` hooks with ``prepare_data_per_node=True`` once on every other alive node.

        As Lightning runs them once per node; hooks with ``prepare_data_per_node=False`` ran in the driver only.
        """
        hooks = [obj for obj in _data_hooks(model, bound) if obj.prepare_data_per_node and is_overridden("prepare_data", obj)]
        here = ray.get_runtime_context().get_node_id()
        nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"] and node["NodeID"] != here]
        if not hooks or not nodes:
            return
        options: dict[str, Any] = {"num_cpus": 0}
        if self._strategy.ray_address is None:
            options["runtime_env"] = {"env_vars": {"PYTHONPATH": _driver_pythonpath()}}
        task = ray.remote(_run_prepare_data)
        hooks_ref = ray.put(cloudpickle.dumps(hooks))
        affinity = [NodeAffinitySchedulingStrategy(node_id=node, soft=False) for node in nodes]
        ray.get([task.options(**options, scheduling_strategy=where).remote(hooks_ref, os.getcwd()) for where in affinity])

    def _start_ray(self) -> None:
        """Starts a local Ray instance, or joins ``ray_address``, unless Ray is already initialised.

        Ctrl-C while the local instance starts is held back until ``ray.init`` returned (and then
        raised), so that the ``finally`` of the fit shuts down every process ``ray.init`` started:
        an interrupt inside ``ray.init`` would leave some of them running.
        """
        strategy = self._strategy
        if ray.is_initialized():
            return
        if strategy.ray_address is not None:
            connect_ray(strategy.ray_address, strategy.ray_init_kwargs)
            return
        init_kwargs = {"include_dashboard": False, "configure_logging": False, **strategy.ray_init_kwargs}
        rank_zero_info("HQDEStrategy: starting a local Ray instance (listening on 127.0.0.1 only)")
        with _sigint_deferred(), _loopback_only(enabled="_node_ip_address" not in init_kwargs):
            self._started_ray = True  # from here on, whatever ray.init started is shut down at the end
            ray.init(address="local", **init_kwargs)

    def _pickle(self, trainer: Trainer, function: Callable, bound: inspect.BoundArguments, model: LightningModule) -> bytes:
        """Pickles ``(trainer, function name, args, kwargs)``; unpicklable attributes get a clear error."""
        loggers = trainer.loggers
        trainer.loggers = []
        try:
            return cloudpickle.dumps((trainer, function.__name__, bound.args, bound.kwargs))
        except Exception as err:
            datamodule = bound.arguments.get("datamodule") or bound.arguments.get("train_dataloaders")
            culprit = _find_unpicklable(model, "model") or _find_unpicklable(datamodule, "datamodule") or "an object passed to `fit`"
            raise MisconfigurationException(
                f"HQDEStrategy sends your module and data to Ray actors by pickling them, but {culprit} cannot be"
                f" pickled ({type(err).__name__}: {err}). Create it in `setup()`/`configure_model()` instead of"
                " `__init__`, or make it picklable."
            ) from err
        finally:
            trainer.loggers = loggers

    def member_request(self) -> dict[str, Any]:
        """Each member's Ray resources: ``resources_per_member`` over the default share.

        The default CPU share is the largest equal share that packs every member onto the
        alive nodes (:func:`~hqde_lightning.placement.default_share`; only GPU nodes count when
        members use GPUs); the GPU share is :meth:`HQDEStrategy.default_gpus_per_member`.
        """
        strategy = self._strategy
        nodes = alive_nodes()
        request: dict[str, Any] = {}
        if isinstance(strategy.accelerator, CUDAAccelerator):
            request["num_gpus"] = strategy.default_gpus_per_member(len(strategy.parallel_devices or []))
        uses_gpus = float(strategy.resources_per_member.get("num_gpus", request.get("num_gpus", 0.0)) or 0.0) > 0
        gpu_nodes = [n for n in nodes if n.resources.get("GPU", 0.0) >= 1.0]
        hosts = gpu_nodes if uses_gpus and gpu_nodes else nodes
        request["num_cpus"] = default_share([float(n.resources.get("CPU", 0.0)) for n in hosts], strategy.num_members)
        request.update({k: v for k, v in strategy.resources_per_member.items() if v is not None})
        return request

    def check_resources(self) -> dict[str, Any]:
        """Packs every member's request onto the alive nodes and returns the request.

        Raises ``MisconfigurationException`` naming the first member that fits on no node, its
        request and what the nodes offer (Ray would otherwise wait forever for it).
        """
        request = self.member_request()
        n = self._strategy.num_members
        try:
            check_members_fit([ray_resources(request)] * n, alive_nodes())
        except ValueError as err:
            raise MisconfigurationException(
                f"HQDEStrategy(num_members={n}) cannot place its members: {err}. Lower `resources_per_member`"
                " or `num_members`, or add nodes to the cluster."
            ) from None
        return request

    def _member_options(self) -> tuple[dict[str, Any], int]:
        strategy = self._strategy
        options = self.check_resources()
        if strategy.ray_address is None:
            options["runtime_env"] = {"env_vars": {"PYTHONPATH": _driver_pythonpath()}}
        threads = max(1, math.floor(options["num_cpus"])) if options.get("num_cpus") else 1
        return options, threads

    def _run_members(self, trainer: Trainer, payload: bytes, coordinator: Any) -> list[MemberResult]:
        strategy = self._strategy
        options, threads = self._member_options()
        member_cls = ray.remote(MemberActor)
        cwd = os.getcwd()
        mirrors = [_mirror(logger) for logger in trainer.loggers]
        progress = EnsembleProgress(strategy.num_members, enabled=trainer.progress_bar_callback is not None)
        forwarder = _EventForwarder(trainer, strategy, progress)
        placement = PlacementScorer.from_ray()
        payload_ref = ray.put(payload)
        futures: dict[Any, int] = {}
        nodes: dict[int, str] = {}
        #: member start probes (``node_id()`` calls) not answered yet: index and deadline
        starting: dict[Any, tuple[int, float]] = {}
        self.member_nodes = {}
        restarts = dict.fromkeys(range(strategy.num_members), 0)

        def start(index: int, restart_from: Any = None) -> None:
            forwarder.forget(index)
            nodes[index] = placement.place(options)
            affinity = NodeAffinitySchedulingStrategy(node_id=nodes[index], soft=True)
            actor = member_cls.options(**options, scheduling_strategy=affinity).remote(cwd, threads)
            self._actors.append(actor)
            self.member_nodes.pop(index, None)
            starting[actor.node_id.remote()] = (index, time.monotonic() + strategy.member_start_timeout_s)
            context = MemberContext(
                index=index,
                seed=strategy.seed + index,
                coordinator=coordinator,
                sync=strategy.sync,
                sync_strength=strategy.sync_strength,
                sync_every_n_epochs=strategy.sync_every_n_epochs,
                bagging=strategy.bagging,
                score_metric=strategy.score_metric,
                score_mode=strategy.score_mode,
                mirrors=mirrors,
                restart_from=restart_from,
            )
            futures[actor.run.remote(payload_ref, context)] = index

        for index in range(strategy.num_members):
            start(index)
        rank_zero_info(f"HQDEStrategy: training {strategy.num_members} members with {_describe(options)} each (seed {strategy.seed})")
        results: dict[int, MemberResult] = {}
        strategy.sync_history = []
        strategy.dropped_members = []
        try:
            while futures:
                done, _ = ray.wait(list(futures), num_returns=len(futures), timeout=_POLL_SECONDS)
                forwarder.handle(_drain(coordinator))
                self._watch_starts(starting, options)
                for ref in done:
                    index = futures.pop(ref)
                    try:
                        results[index] = ray.get(ref)
                    except RayTaskError as err:
                        if not isinstance(err.cause, RayActorError):
                            raise _member_error(index, err) from None
                        self._on_member_death(index, err, restarts, coordinator, start, placement, self.member_nodes.get(index, nodes[index]), options)
                    except RayActorError as err:
                        self._on_member_death(index, err, restarts, coordinator, start, placement, self.member_nodes.get(index, nodes[index]), options)
                    else:
                        placement.record_speed(nodes[index], forwarder.batches_per_second.get(index, 0.0))
                        placement.release(nodes[index], options, succeeded=True)
            forwarder.handle(_drain(coordinator))
        finally:
            progress.close()
        return [results[i] for i in sorted(results)]

    def _watch_starts(self, starting: dict[Any, tuple[int, float]], options: Mapping[str, Any]) -> None:
        """Records where started members run; fails the fit when one waited longer than ``member_start_timeout_s``.

        A member that does not start although its request fits the nodes waits for resources
        that other actors or jobs hold; Ray would keep it waiting forever.
        """
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
            timeout = self._strategy.member_start_timeout_s
            offer = "; ".join(f"node {n.node_id[:8]} ({n.address}): {describe_resources(n.resources)}" for n in alive_nodes())
            raise RuntimeError(
                f"HQDEStrategy: member(s) {late} asked for {describe_resources(ray_resources(options))} each but did not start within"
                f" `member_start_timeout_s={timeout:g}`: other actors or jobs hold the resources. The nodes offer {offer};"
                f" free now: {describe_resources(ray.available_resources())}. Free resources, lower `resources_per_member`"
                " or `num_members`, or raise `member_start_timeout_s`."
            )

    def _on_member_death(
        self,
        index: int,
        err: Exception,
        restarts: dict[int, int],
        coordinator: Any,
        start: Callable[..., None],
        placement: PlacementScorer,
        node_id: str,
        options: Mapping[str, Any],
    ) -> None:
        """Restarts a dead member from its last end-of-epoch snapshot, or gives up on it as configured.

        When the member's node left the cluster, the member restarts on another node; when no
        alive node can host it (on a single machine: Ray itself stopped), the fit fails saying so.
        """
        strategy = self._strategy
        placement.release(node_id, options, succeeded=False)
        self._check_node_alive(index, node_id, placement, options)
        if restarts[index] >= strategy.max_member_restarts:
            message = f"member {index}'s actor died {restarts[index] + 1} time(s), more than `max_member_restarts={strategy.max_member_restarts}`"
            if strategy.on_member_failure == "fail":
                raise RuntimeError(f"{message}; stopping the fit (checkpoints written so far are intact): {err}")
            rank_zero_warn(f"{message}; continuing with the other members (`on_member_failure='continue'`).")
            strategy.dropped_members.append(index)
            coordinator.finish.remote(index)
            return
        restarts[index] += 1
        snapshot_ref = coordinator.latest_snapshot.remote(index)
        rank_zero_warn(
            f"HQDEStrategy: member {index}'s actor died ({type(err).__name__}); restarting it from its last end-of-epoch"
            f" snapshot (restart {restarts[index]} of {strategy.max_member_restarts})."
        )
        start(index, restart_from=[snapshot_ref])

    def _check_node_alive(self, index: int, node_id: str, placement: PlacementScorer, options: Mapping[str, Any]) -> None:
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
        request = ray_resources(options)
        if not any(fits_node(request, n) for n in alive):
            raise RuntimeError(
                f"HQDEStrategy: member {index} was lost with its {where}, and no alive node can host it"
                f" ({describe_resources(request)}; alive nodes: {'; '.join(describe_resources(n.resources) for n in alive) or 'none'})."
                " On a single machine this means Ray itself stopped (its raylet died). Checkpoints written so far are intact."
            )
        placement.remove(node_id)
        rank_zero_warn(f"HQDEStrategy: {where} left the cluster; member {index} restarts on another node.")

    def _prediction_weights(self, scores: list[float | None]) -> torch.Tensor | None:
        """With the superposition rule, predictions are combined with the same amplitudes² as weights."""
        aggregator = self._strategy.aggregator
        rule = aggregator.inner if isinstance(aggregator, RobustAggregator) else aggregator
        if not isinstance(rule, Superposition) or any(s is None for s in scores):
            return None
        return superposition_weights(torch.tensor(scores, dtype=torch.float64), rule.temperature)

    def _recover(self, trainer: Trainer, model: LightningModule, results: list[MemberResult]) -> None:
        """Leaves the driver's trainer and module as a normal ``fit`` would.

        Members whose final weights hold NaN or Inf leave ``strategy.ensemble`` (a warning names
        them); ``strategy.excluded_members`` lists them and every logger gets their number as
        ``ensemble/excluded_members``. When no member is finite the fit fails.
        """
        strategy = self._strategy
        strategy.aggregator.load_state_dict(strategy.coordinator_state.get("aggregator", {}))
        if strategy.dropped_members:
            rank_zero_warn(f"HQDEStrategy: the ensemble holds {len(results)} of {strategy.num_members} members; members {strategy.dropped_members} were dropped after failing.")
        states = [{k: torch.tensor(v) for k, v in r.state_dict.items()} for r in results]
        scores = [r.score for r in results]
        try:  # members whose weights hold NaN/Inf leave the ensemble (with a warning naming them)
            ensemble = Ensemble.from_states(model, states, combine=strategy.combiner, member_ids=[r.index for r in results])
        except ValueError as err:
            raise RuntimeError(f"HQDEStrategy: the fit ended without a usable member: {err}") from err
        score_of = {r.index: r.score for r in results}
        weights = self._prediction_weights([score_of[i] for i in ensemble.member_ids])
        if weights is not None:
            ensemble.set_weights(weights)
        strategy.ensemble = ensemble.eval()
        strategy.excluded_members = list(ensemble.excluded_members)
        final = strategy.aggregator(states, scores=None if any(s is None for s in scores) else scores, members=[r.index for r in results])
        model.load_state_dict(final.state)

        # the member that trained longest (lowest index on ties) wrote the last checkpoints: its
        # loops and callback states (e.g. the checkpoint callback's best/last paths) are the run's
        lead = max(results, key=lambda r: (_progress(r), -r.index))
        trainer.fit_loop.load_state_dict(lead.fit_loop_state)
        trainer.fit_loop.restarting = False
        trainer.state = lead.trainer_state
        metrics = trainer.callback_metrics
        metrics.update({k: torch.tensor(v) for k, v in lead.callback_metrics.items()})
        for result in results:
            metrics.update({f"member_{result.index}/{k}": torch.tensor(v) for k, v in result.callback_metrics.items()})
        excluded = {"ensemble/excluded_members": float(len(strategy.excluded_members))}
        metrics.update({k: torch.tensor(v) for k, v in excluded.items()})
        for callback in trainer.callbacks:
            state = lead.callbacks_state.get(callback.state_key)
            if state:
                if getattr(callback, "dirpath", "") is None and "dirpath" in state:
                    callback.dirpath = state["dirpath"]  # resolved inside the member; lets best/last paths load in full
                callback.load_state_dict(copy.deepcopy(state))
        strategy.connect(model)
        model.trainer = trainer
        for logger in trainer.loggers:
            logger.log_metrics(excluded, trainer.global_step)
            logger.save()
            logger.finalize("success")


def _tuning(trainer: Trainer) -> bool:
    """True while ``Tuner.lr_find``/``Tuner.scale_batch_size`` runs ``fit``: they mark their finder callback ``_early_exit``."""
    return any(isinstance(cb, (LearningRateFinder, BatchSizeFinder)) and getattr(cb, "_early_exit", False) for cb in trainer.callbacks)


def _check_ckpt_path_exists(ckpt_path: Any) -> None:
    """Refuses a local ``fit(ckpt_path=...)`` that does not exist, before Ray or any actor starts.

    Lightning's own names (``"last"``, ``"hpc"``, ``"registry..."``) and remote URLs (``s3://...``)
    are left to Lightning.
    """
    if ckpt_path is None:
        return
    path = str(ckpt_path)
    if path in ("last", "hpc", "best") or path.startswith("registry") or "://" in path:
        return
    if not os.path.exists(path):
        raise MisconfigurationException(
            f"`trainer.fit(ckpt_path={path!r})`: no such file ({os.path.abspath(path)}). Pass the path of a checkpoint"
            " to resume from, or leave `ckpt_path` out to start a new fit."
        )


def _fit_datamodule(bound: inspect.BoundArguments) -> LightningDataModule | None:
    """The fit's datamodule: ``datamodule=...``, or one passed positionally as ``train_dataloaders``."""
    if isinstance(bound.arguments.get("train_dataloaders"), LightningDataModule):
        return bound.arguments["train_dataloaders"]
    return bound.arguments.get("datamodule")


def _data_hooks(model: LightningModule, bound: inspect.BoundArguments) -> list[Any]:
    """The fit's datamodule (if any) and module: the objects whose ``prepare_data`` a fit runs."""
    return [obj for obj in (_fit_datamodule(bound), model) if obj is not None]


def _prepare_data(model: LightningModule, bound: inspect.BoundArguments) -> None:
    """Runs ``prepare_data`` of the datamodule and the module once, in the driver, as Lightning runs it on rank 0.

    Members skip it (see :class:`~hqde_lightning.actors.MemberActor`): N members would otherwise
    download into the same folder at the same time. Other nodes of a cluster get their own run
    (:meth:`RayEnsembleLauncher._prepare_data_on_other_nodes`).
    """
    for obj in _data_hooks(model, bound):
        obj.prepare_data()


def _run_prepare_data(hooks: bytes, cwd: str) -> None:
    """A Ray task on one node: runs ``prepare_data`` of the pickled objects there, in the driver's directory if it exists."""
    if os.path.isdir(cwd):
        os.chdir(cwd)
    for obj in cloudpickle.loads(hooks):
        obj.prepare_data()


def _check_score_metric(score_metric: str | None, results: list[MemberResult]) -> None:
    """Warns when ``score_metric`` was never logged: every aggregation then fell back to equal weights."""
    if score_metric is None or not results or any(r.score is not None for r in results):
        return
    logged = sorted({k for r in results for k in r.callback_metrics})
    rank_zero_warn(
        f"HQDEStrategy: `score_metric={score_metric!r}` was never logged by the members, so members were weighted"
        f" equally in every aggregation and in the ensemble. The members logged: {logged}."
    )


class _EventForwarder:
    """Hands the members' metrics to the driver's loggers and their progress to the progress bars.

    Member metrics are logged under ``member_{i}/`` at the member's own step; the rows of the
    writer (the lowest-index member still training, member 0 unless it finished early) also
    carry Lightning's plain ``epoch``, as a run without the strategy logs it. Each sync round's
    ``ensemble/...`` row and the members' ``member_{i}/hqde/distance_to_consensus`` are logged at
    the step of that epoch's end-of-epoch rows (the members report it with the sync).
    """

    def __init__(self, trainer: Trainer, strategy: Any, progress: EnsembleProgress) -> None:
        self.trainer = trainer
        self.strategy = strategy
        self.progress = progress
        self.last_step = 0
        #: each member's measured training speed, fed to placement when the member finishes
        self.batches_per_second: dict[int, float] = {}
        self._first_report: dict[int, tuple[float, int]] = {}
        self._notices: set[str] = set()
        #: members whose fit ended (they sent ``finished``)
        self._finished: set[int] = set()

    def _writer(self) -> int | None:
        """The lowest-index member still training: the one whose rows carry the plain ``epoch``."""
        gone = self._finished | set(self.strategy.dropped_members)
        return next((m for m in range(self.strategy.num_members) if m not in gone), None)

    def forget(self, member: int) -> None:
        """A restarted member counts its speed afresh."""
        self._first_report.pop(member, None)

    def _measure(self, member: int, epoch: int, batch: int, total: int | None) -> None:
        if total is None:
            return
        done, now = epoch * total + batch, time.monotonic()
        started, done_then = self._first_report.setdefault(member, (now, done))
        if now > started and done > done_then:
            self.batches_per_second[member] = (done - done_then) / (now - started)

    def handle(self, events: list[tuple[Any, ...]]) -> None:
        loggers = self.trainer.loggers
        for kind, member, data in events:
            if kind == "metrics":
                logger_index, values, step = data
                self.last_step = max(self.last_step, step or 0)
                row = {f"member_{member}/{k}": v for k, v in values.items()}
                if "epoch" in values and member == self._writer():
                    row["epoch"] = values["epoch"]
                loggers[logger_index].log_metrics(row, step)
            elif kind == "finished":
                self._finished.add(member)
            elif kind == "distance":
                step, distance = data
                name = f"member_{member}/hqde/distance_to_consensus"
                self.trainer.callback_metrics[name] = torch.tensor(distance)
                for logger in loggers:
                    logger.log_metrics({name: distance}, step)
            elif kind == "hparams":
                logger_index, params = data
                loggers[logger_index].log_hyperparams(params)
            elif kind in ("warning", "info"):
                if data not in self._notices:  # every member sends the same notice; show it once
                    self._notices.add(data)
                    (rank_zero_warn if kind == "warning" else rank_zero_info)(data)
            elif kind == "clones":
                self._warn_clones(*data)
            elif kind == "progress":
                self.progress.update(member, *data)
                self._measure(member, *data[:3])
            elif kind == "sync":
                self.strategy.sync_history.append(data)
                summary = {
                    "ensemble/sync_round": float(data["round"]),
                    "ensemble/sync_comm_rounds": float(data["comm_rounds"]),
                    "ensemble/sync_bytes_moved": float(data["bytes_moved"]),
                    "ensemble/sync_seconds": float(data["aggregation_seconds"]),
                    "ensemble/sync_bytes": float(data["bytes_received"]),
                    "ensemble/sync_fp32_bytes": float(data["fp32_bytes"]),
                    "ensemble/sync_excluded_members": float(len(data["excluded"])),
                }
                summary.update({f"ensemble/sync_{k}": float(v) for k, v in data["info"].items() if isinstance(v, (int, float))})
                reputation = data["info"].get("reputation")
                if isinstance(reputation, list):
                    summary.update({f"ensemble/reputation_{m}": float(r) for m, r in zip(data["members"], reputation)})
                step = data.get("step")
                for logger in loggers:
                    logger.log_metrics(summary, self.last_step if step is None else step)

    def _warn_clones(self, members: list[int], round_id: int) -> None:
        if self.strategy.member_init == "shared":
            cause = (
                "they started from the same weights (`member_init='shared'`) and read the same data order"
                " (`shuffle=False`, an iterable dataset or a sampler HQDEStrategy cannot re-seed: see the warnings above)."
                " Use `member_init='independent'`, `bagging=True` or a shuffling sampler"
            )
        else:
            cause = (
                "re-initialisation gave them the same weights (e.g. `__init__` loads fixed weights) and they read the same"
                " data order (`shuffle=False`, an iterable dataset or a sampler HQDEStrategy cannot re-seed: see the warnings"
                " above). Use `bagging=True` or a shuffling sampler"
            )
        rank_zero_warn(
            f"HQDEStrategy: members {members} hold identical weights after epoch {round_id}: they train as copies of one"
            f" model and the ensemble is no better than one member. Probable cause: {cause}."
        )


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Holds back SIGINT (Ctrl-C) inside the block and delivers it, to the handler there was before, when the block ends.

    Only the main thread receives signals in Python; elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
        if received:
            signal.raise_signal(signal.SIGINT)


@contextlib.contextmanager
def _loopback_only(enabled: bool) -> Iterator[None]:
    """Makes the Ray instance started inside the block listen on 127.0.0.1 only.

    Ray binds its servers (GCS, raylet, object manager, workers) to the node's IP address, and
    to loopback only when that address is 127.0.0.1; ``ray.init(_node_ip_address="127.0.0.1")``
    is rewritten to the machine's network address on Linux. Ray's own switch for single-machine
    clusters, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read once, when Ray is imported), makes
    it take 127.0.0.1; this applies the same switch for the duration of ``ray.init``.
    """
    from ray._private import ray_constants

    if not enabled:
        yield
        return
    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        rank_zero_warn(f"HQDEStrategy: this Ray version ({ray.__version__}) has no single-machine switch; the local Ray instance listens on the network.")
        yield
        return
    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


def _drain(coordinator: Any) -> list[tuple[Any, ...]]:
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


def _head_node_id() -> str:
    """The Ray head node's id (the driver's node when no head is marked)."""
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return ray.get_runtime_context().get_node_id()


def alive_nodes() -> list[NodeCapacity]:
    """The connected cluster's alive nodes and their total resources."""
    return [NodeCapacity(n["NodeID"], n["Resources"], n.get("NodeManagerAddress", "")) for n in ray.nodes() if n.get("Alive")]


def _progress(result: MemberResult) -> tuple[int, int]:
    """How far a member's fit went: (completed epochs, optimizer steps), from its fit loop's saved progress."""
    state = result.fit_loop_state
    epochs = state.get("epoch_progress", {}).get("current", {}).get("completed", 0)
    steps = state.get("epoch_loop.state_dict", {}).get("_batches_that_stepped", 0)
    return int(epochs), int(steps)


def _mirror(logger: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in ("name", "version", "save_dir", "root_dir", "log_dir"):
        try:
            value = getattr(logger, attr)
        except Exception:  # loggers may raise for attributes they do not support
            continue
        out[attr] = os.path.abspath(value) if attr.endswith("dir") and isinstance(value, str) and "://" not in value else value
    return out


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


def _find_unpicklable(obj: Any, path: str, depth: int = 0) -> str | None:
    """The dotted path of the first attribute of ``obj`` that cannot be pickled, if any."""
    if obj is None or depth > 4:
        return None
    try:
        cloudpickle.dumps(obj)
        return None
    except Exception:
        pass
    children: dict[str, Any] = dict(obj._modules) if isinstance(obj, torch.nn.Module) else {}
    if hasattr(obj, "__dict__"):
        children.update({k: v for k, v in vars(obj).items() if k not in ("_modules", "_trainer")})
    for name, value in children.items():
        found = _find_unpicklable(value, f"{path}.{name}", depth + 1)
        if found is not None:
            return found
    return f"`{path}` ({type(obj).__name__})"
