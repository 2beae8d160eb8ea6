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

import copy
import inspect
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import ray
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies.launchers.launcher import _Launcher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from ray import cloudpickle
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from hqde_lightning.actors import Coordinator, MemberActor, MemberResult
from hqde_lightning.aggregation import RobustAggregator, Superposition, superposition_weights
from hqde_lightning.checkpoint import HQDE_KEY, load_checkpoint_file
from hqde_lightning.ensemble import Ensemble
from hqde_lightning.evaluation import EnsembleEvaluation
from hqde_lightning.member import MemberContext
from hqde_lightning.placement import PlacementScorer
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

    @property
    def is_interactive_compatible(self) -> bool:
        return True

    def launch(self, function: Callable, *args: Any, trainer: Trainer | None = None, **kwargs: Any) -> Any:
        assert trainer is not None
        if trainer.state.fn != TrainerFn.FITTING:
            return self._evaluate(function, args, kwargs, trainer)
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
        if ckpt_path is not None and os.path.isfile(str(ckpt_path)):
            bound.arguments["ckpt_path"] = os.path.abspath(str(ckpt_path))
            self._check_resume(bound.arguments["ckpt_path"])
        payload = self._pickle(trainer, function, bound, model)
        self._start_ray()
        try:
            coordinator = ray.remote(Coordinator).options(num_cpus=0).remote(strategy.num_members, copy.deepcopy(strategy.aggregator), strategy.topology)
            self._actors = [coordinator]
            results = self._run_members(trainer, payload, coordinator)
            strategy.coordinator_state = ray.get(coordinator.state_dict.remote())
            self._recover(trainer, model, results)
            self._call_ensemble_hooks(trainer, bound)
        finally:
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
            datamodule = bound.arguments.get("datamodule")
            if isinstance(bound.arguments.get("train_dataloaders"), LightningDataModule):
                datamodule = bound.arguments["train_dataloaders"]
            if loaders is None and datamodule is not None:
                datamodule.setup("validate")
                loaders = datamodule.val_dataloader()
            return loaders

        for callback in hooked:
            callback.on_ensemble_fit_end(trainer, self._strategy, val_dataloaders)

    def _check_resume(self, path: str) -> None:
        section = load_checkpoint_file(path).get(HQDE_KEY)
        if section is not None and int(section["num_members"]) != self._strategy.num_members:
            raise MisconfigurationException(
                f"{path} holds {section['num_members']} members but `HQDEStrategy(num_members={self._strategy.num_members})`;"
                f" resume with `num_members={section['num_members']}`."
            )

    def _start_ray(self) -> None:
        strategy = self._strategy
        if ray.is_initialized():
            return
        if strategy.ray_address is not None:
            connect_ray(strategy.ray_address, strategy.ray_init_kwargs)
            return
        init_kwargs = {"include_dashboard": False, "configure_logging": False, **strategy.ray_init_kwargs}
        rank_zero_info("HQDEStrategy: starting a local Ray instance")
        ray.init(address="local", **init_kwargs)
        self._started_ray = True

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

    def _member_options(self, trainer: Trainer) -> tuple[dict[str, Any], int]:
        strategy = self._strategy
        n = strategy.num_members
        cluster_cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        options: dict[str, Any] = {"num_cpus": cluster_cpus / n}
        if isinstance(trainer.accelerator, CUDAAccelerator):
            options["num_gpus"] = strategy.default_gpus_per_member(len(strategy.parallel_devices or []))
        options.update({k: v for k, v in strategy.resources_per_member.items() if v is not None})
        if strategy.ray_address is None:
            options["runtime_env"] = {"env_vars": {"PYTHONPATH": _driver_pythonpath()}}
        threads = max(1, math.floor(options["num_cpus"])) if options.get("num_cpus") else 1
        return options, threads

    def _run_members(self, trainer: Trainer, payload: bytes, coordinator: Any) -> list[MemberResult]:
        strategy = self._strategy
        options, threads = self._member_options(trainer)
        member_cls = ray.remote(MemberActor)
        cwd = os.getcwd()
        mirrors = [_mirror(logger) for logger in trainer.loggers]
        progress = EnsembleProgress(strategy.num_members, enabled=trainer.progress_bar_callback is not None)
        forwarder = _EventForwarder(trainer, strategy, progress)
        placement = PlacementScorer.from_ray()
        payload_ref = ray.put(payload)
        futures: dict[Any, int] = {}
        nodes: dict[int, str] = {}
        restarts = dict.fromkeys(range(strategy.num_members), 0)

        def start(index: int, restart_from: Any = None) -> None:
            forwarder.forget(index)
            nodes[index] = placement.place(options)
            affinity = NodeAffinitySchedulingStrategy(node_id=nodes[index], soft=True)
            actor = member_cls.options(**options, scheduling_strategy=affinity).remote(cwd, threads)
            self._actors.append(actor)
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
                forwarder.handle(ray.get(coordinator.drain.remote()))
                for ref in done:
                    index = futures.pop(ref)
                    try:
                        results[index] = ray.get(ref)
                    except RayTaskError as err:
                        if not isinstance(err.cause, RayActorError):
                            raise _member_error(index, err) from None
                        self._on_member_death(index, err, restarts, coordinator, start, placement, nodes[index], options)
                    except RayActorError as err:
                        self._on_member_death(index, err, restarts, coordinator, start, placement, nodes[index], options)
                    else:
                        placement.record_speed(nodes[index], forwarder.batches_per_second.get(index, 0.0))
                        placement.release(nodes[index], options, succeeded=True)
            forwarder.handle(ray.get(coordinator.drain.remote()))
        finally:
            progress.close()
        return [results[i] for i in sorted(results)]

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
        """Restarts a dead member from its last end-of-epoch snapshot, or gives up on it as configured."""
        strategy = self._strategy
        placement.release(node_id, options, succeeded=False)
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

    def _prediction_weights(self, scores: list[float | None]) -> torch.Tensor | None:
        """With the superposition rule, predictions are combined with the same amplitudes² as weights."""
        aggregator = self._strategy.aggregator
        rule = aggregator.inner if isinstance(aggregator, RobustAggregator) else aggregator
        if not isinstance(rule, Superposition) or any(s is None for s in scores):
            return None
        return superposition_weights(torch.tensor(scores, dtype=torch.float64), rule.temperature)

    def _recover(self, trainer: Trainer, model: LightningModule, results: list[MemberResult]) -> None:
        """Leaves the driver's trainer and module as a normal ``fit`` would."""
        strategy = self._strategy
        strategy.aggregator.load_state_dict(strategy.coordinator_state.get("aggregator", {}))
        if strategy.dropped_members:
            rank_zero_warn(f"HQDEStrategy: the ensemble holds {len(results)} of {strategy.num_members} members; members {strategy.dropped_members} were dropped after failing.")
        states = [{k: torch.tensor(v) for k, v in r.state_dict.items()} for r in results]
        scores = [r.score for r in results]
        final = strategy.aggregator(states, scores=None if any(s is None for s in scores) else scores, members=[r.index for r in results])
        model.load_state_dict(final.state)
        strategy.ensemble = Ensemble.from_states(model, states, weights=self._prediction_weights(scores), combine=strategy.combiner).eval()

        first = next((r for r in results if r.index == 0), results[0])
        trainer.fit_loop.load_state_dict(first.fit_loop_state)
        trainer.fit_loop.restarting = False
        trainer.state = first.trainer_state
        metrics = trainer.callback_metrics
        metrics.update({k: torch.tensor(v) for k, v in first.callback_metrics.items()})
        for result in results:
            metrics.update({f"member_{result.index}/{k}": torch.tensor(v) for k, v in result.callback_metrics.items()})
        for callback in trainer.callbacks:
            state = first.callbacks_state.get(callback.state_key)
            if state:
                if getattr(callback, "dirpath", "") is None and "dirpath" in state:
                    callback.dirpath = state["dirpath"]  # resolved inside member 0; lets best/last paths load in full
                callback.load_state_dict(copy.deepcopy(state))
        strategy.connect(model)
        model.trainer = trainer
        for logger in trainer.loggers:
            logger.save()
            logger.finalize("success")


class _EventForwarder:
    """Hands the members' metrics to the driver's loggers and their progress to the progress bars."""

    def __init__(self, trainer: Trainer, strategy: Any, progress: EnsembleProgress) -> None:
        self.trainer = trainer
        self.strategy = strategy
        self.progress = progress
        self.last_step = 0
        #: each member's measured training speed, fed to placement when the member finishes
        self.batches_per_second: dict[int, float] = {}
        self._first_report: dict[int, tuple[float, int]] = {}

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
                loggers[logger_index].log_metrics({f"member_{member}/{k}": v for k, v in values.items()}, step)
            elif kind == "hparams":
                logger_index, params = data
                loggers[logger_index].log_hyperparams(params)
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
                    "ensemble/excluded_members": float(len(data["excluded"])),
                }
                summary.update({f"ensemble/sync_{k}": float(v) for k, v in data["info"].items() if isinstance(v, (int, float))})
                reputation = data["info"].get("reputation")
                if isinstance(reputation, list):
                    summary.update({f"ensemble/reputation_{m}": float(r) for m, r in zip(data["members"], reputation)})
                for logger in loggers:
                    logger.log_metrics(summary, self.last_step)


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
