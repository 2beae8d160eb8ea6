"""``RayEnsembleLauncher``: runs ``Trainer.fit`` for every member, in this process or in Ray actors.

``launch(fit)`` in the driver:

1. when the members can share one process and that can be this one (one device, no
   ``ray_address``: :mod:`hqde_lightning.embedded`), trains them all as one member group here,
   without Ray; when a group cannot run the module but the fit is on one device, trains each
   member in a thread of this process, one at a time (:mod:`hqde_lightning.member_threads`),
   without Ray; otherwise:
2. trains the members in Ray actors (:class:`~hqde_lightning.actor_fit.ActorFit`, which starts
   Ray or joins ``ray_address``; that module, and Ray, are imported only then),
3. while they train, forwards their metrics to your loggers (``member_{i}/...``,
   ``ensemble/...``) and shows their progress (:mod:`hqde_lightning.forwarder`),
4. when they finish, puts the consensus weights into your module, builds
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
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.strategies.launchers.launcher import _Launcher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.nn.parameter import is_lazy

from hqde_lightning.actors import FitOutcome, FitRemains, MemberResult
from hqde_lightning.aggregation import RobustAggregator, Superposition, superposition_weights
from hqde_lightning.checkpoint import EXTRAS_CANDIDATES, HQDE_KEY, load_checkpoint_file
from hqde_lightning.events import SyncRecord
from hqde_lightning.ensemble import Ensemble
from hqde_lightning.evaluation import EnsembleEvaluation
from hqde_lightning.embedded import embedded_blocker, group_blocker, run_group, with_module_callbacks
from hqde_lightning.forwarder import EventForwarder
from hqde_lightning.group import GroupUnsupported
from hqde_lightning.member import MirrorLogger, SyncCodec, member_starts
from hqde_lightning.member_threads import MemberThreads
from hqde_lightning.pickling import pickle_fit
from hqde_lightning.progress import EnsembleProgress
from hqde_lightning.tuning import is_tuning, tune_first

if TYPE_CHECKING:
    from hqde_lightning.actor_fit import ActorFit

__all__ = ["RayEnsembleLauncher"]

#: the arguments of ``Trainer.fit`` that carry data (a member group uses them without copying)
_DATA_ARGUMENTS = ("train_dataloaders", "val_dataloaders", "datamodule")

class RayEnsembleLauncher(_Launcher):
    """Launches an ``HQDEStrategy`` fit: its members in this process or in Ray actors (see the module docstring)."""

    def __init__(self, strategy: Any) -> None:
        self._strategy = strategy
        #: the Ray actors of the current (or last) fit, when it needed them
        self._actors: ActorFit | None = None
        #: what the current fit's members leave when it fails
        self._remains = FitRemains()

    @property
    def is_interactive_compatible(self) -> bool:
        return True

    def launch(self, function: Callable, *args: Any, trainer: Trainer | None = None, **kwargs: Any) -> Any:
        assert trainer is not None
        if trainer.state.fn != TrainerFn.FITTING:
            return self._evaluate(function, args, kwargs, trainer)
        if is_tuning(trainer):
            # a finder's tuning run (`Tuner`, or `tune_first`): tune one member, your module, here in the driver
            return function(*args, **kwargs)
        return self._fit(function, args, kwargs, trainer)

    @property
    def member_nodes(self) -> dict[int, str]:
        """The Ray node id each member of the current (or last) fit runs on, once it started."""
        return {} if self._actors is None else self._actors.member_nodes

    def uses_ray(self, trainer: Trainer) -> bool:
        """Whether a fit with ``trainer`` trains its members in Ray actors.

        Not on one device (:func:`~hqde_lightning.embedded.embedded_blocker`), where they train as
        one member group or in threads of this process, unless ``on_member_failure="continue"``
        keeps each member in a process of its own.
        """
        return embedded_blocker(self._strategy, trainer) is not None or self._strategy.on_member_failure == "continue"

    def kill(self, signum: Any = None) -> None:
        """Stops every actor of the current fit."""
        if self._actors is not None:
            self._actors.kill()

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
        _check_initialised(model)
        _check_one_codec(with_module_callbacks(trainer.callbacks, model))
        if ckpt_path is not None and os.path.isfile(str(ckpt_path)):
            bound.arguments["ckpt_path"] = os.path.abspath(str(ckpt_path))
            self._check_resume(bound.arguments["ckpt_path"], bound.arguments.get("weights_only"))
        # the module the last fit trained, fitted again by this trainer: its members go on from where they ended, as a plain
        # fit goes on from the module's weights (not drawn afresh)
        goes_on = strategy.ensemble is not None and model is strategy.trained_module and bound.arguments.get("ckpt_path") is None
        strategy.continued_members = member_starts(strategy.ensemble) if goes_on else {}
        if goes_on:
            rank_zero_info("HQDEStrategy: the members go on from where the last fit of this module left them (`strategy.ensemble`).")
        with tune_first(trainer, function, bound):
            _prepare_data(trainer, model, bound)
            self._actors = None
            self._remains, outcome = FitRemains(), None
            try:
                blocker = group_blocker(strategy, trainer, model)
                if blocker is None:
                    try:
                        outcome = self._fit_embedded(trainer, function, bound)
                    except GroupUnsupported as err:
                        blocker = str(err)
                if outcome is None:
                    outcome = self._fit_workers(trainer, bound, function, blocker)
                results, final_snapshots, strategy.coordinator_state = outcome
                _with_earlier_rounds(strategy)
                _check_score_metric(strategy.score_metric, results)
                self._recover(trainer, model, results)
                strategy.trained_module = model
                _attach_fit_data(trainer, model, bound)
                # every member's final full state: what ``trainer.save_checkpoint`` in the driver writes, so that it resumes
                strategy.keep_final_checkpoints(final_snapshots)
                self._call_ensemble_hooks(trainer, bound)
            except BaseException:
                if outcome is None:  # the members' fit failed: keep what it trained, as a plain fit's module keeps its weights
                    self._keep_remains(trainer, model)
                raise
            finally:
                strategy.continued_members = {}
                if self._actors is not None:
                    self._actors.close()
        return None

    def _keep_remains(self, trainer: Trainer, model: LightningModule) -> None:
        """After a failed fit: the driver keeps the members as the fit left them (:class:`~hqde_lightning.actors.FitRemains`),
        as a plain fit's module keeps the weights it reached.

        ``strategy.ensemble`` holds them, your module their consensus (or member 0's weights), the trainer's loops and your
        callbacks' states are the furthest member's, and ``trainer.save_checkpoint`` writes every member's snapshot: an
        ``OnExceptionCheckpoint`` of the driver writes a file each member resumes from. When no member trained a step (the
        fit failed before, e.g. loading its checkpoint) nothing changes: the last fit's ensemble, if any, stays.
        """
        strategy = self._strategy
        snapshots = {i: s for i, s in sorted(self._remains.snapshots.items()) if s and s.get("state_dict") is not None}
        if not any(s.get("global_step") for s in snapshots.values()):  # no member trained a step (nor resumed one)
            return
        try:
            states = [{k: torch.as_tensor(v) for k, v in s["state_dict"].items()} for s in snapshots.values()]
            extras = [s.get(EXTRAS_CANDIDATES) or {} for s in snapshots.values()]
            model, ensemble = _members_of(trainer, model, strategy.combiner, states, list(snapshots), [e.get("buffers", {}) for e in extras], [e.get("attributes", {}) for e in extras])
            model.load_state_dict(strategy.module_state(states, members=list(snapshots)))
            strategy.ensemble, strategy.excluded_members, strategy.trained_module = ensemble.eval(), list(ensemble.excluded_members), model
            strategy.keep_final_checkpoints(snapshots)
            lead = max(snapshots.values(), key=lambda s: (s.get("epoch", 0), s.get("global_step", 0)))
            _follow_lead(trainer, lead["loops"]["fit_loop"], lead.get("callbacks", {}), self._remains.callback_attributes)
        except Exception as err:  # the fit's own error goes on
            rank_zero_warn(f"HQDEStrategy: the members' states could not be kept after the fit failed ({type(err).__name__}: {err}).")
            return
        rank_zero_warn(
            f"HQDEStrategy: the fit failed; `strategy.ensemble` holds members {list(snapshots)} as it left them (at epoch {lead.get('epoch')},"
            f" step {lead.get('global_step')} for the furthest), your module their {'first' if strategy.members_are_independent else 'consensus'}'s weights."
        )

    def _fit_embedded(self, trainer: Trainer, function: Callable, bound: inspect.BoundArguments) -> FitOutcome | None:
        """Trains every member as one group in this process, without Ray, when :func:`embedded_blocker` allows it.

        The group fits a copy of the trainer and the module; your data objects are used as they
        are (a plain fit calls their ``setup`` too), so the data is never copied. Returns ``None``
        (the members then run in Ray actors) when it cannot; raises ``GroupUnsupported`` when the
        group refuses the module before its first step.
        """
        strategy = self._strategy
        if embedded_blocker(strategy, trainer) is not None:
            return None
        _warn_ray_unused(strategy)
        strategy.sync_history, strategy.dropped_members = [], []
        forwarder = EventForwarder(trainer, strategy, EnsembleProgress(strategy.num_members, enabled=False))
        payload, data = _pickle_without_data(trainer, function, bound, copy_if_refused=True)
        return run_group(trainer, payload, data, forwarder, self._remains)

    def _fit_threads(self, trainer: Trainer, function: Callable, bound: inspect.BoundArguments) -> FitOutcome:
        """Trains every member in a thread of this process, one at a time (:class:`~hqde_lightning.member_threads.MemberThreads`)."""
        strategy = self._strategy
        _warn_ray_unused(strategy)
        strategy.sync_history, strategy.dropped_members = [], []
        payload, data = _pickle_without_data(trainer, function, bound)
        progress = EnsembleProgress(strategy.num_members, enabled=trainer.progress_bar_callback is not None)
        threads = MemberThreads(strategy, payload, data, [MirrorLogger.describe(logger) for logger in trainer.loggers], EventForwarder(trainer, strategy, progress), self._remains)
        try:
            return threads.run()
        finally:
            progress.close()

    def _fit_workers(self, trainer: Trainer, bound: inspect.BoundArguments, function: Callable, blocker: str | None) -> FitOutcome:
        """Trains the members that cannot train as one group in this process (``blocker`` says why, when it is known).

        On one device every member trains in a thread of this process, taking turns, without Ray
        (not with ``on_member_failure="continue"``); elsewhere in Ray actors
        (:meth:`~hqde_lightning.actor_fit.ActorFit.run`: member groups unless ``blocker`` is set).
        """
        strategy = self._strategy
        if blocker is not None and not self.uses_ray(trainer):
            rank_zero_info(f"HQDEStrategy: the members train in turns, each in a thread of this process (no Ray): {blocker}.")
            return self._fit_threads(trainer, function, bound)
        from hqde_lightning.actor_fit import ActorFit  # imports Ray: only fits with Ray actors pay for it

        self._actors = ActorFit(strategy, self._remains)
        return self._actors.run(trainer, function, bound, _data_hooks(bound.arguments["model"], bound), blocker)

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
        if section is None and self._strategy.num_members > 1:
            rank_zero_warn(
                f"HQDEStrategy: {path} is a plain Lightning checkpoint (no ensemble in it): every member resumes from its one set of"
                " weights and optimizer state, so the members start as copies and differ only by their data orders (and noise)."
            )
        if section is not None and int(section["num_members"]) != self._strategy.num_members:
            raise MisconfigurationException(
                f"{path} holds {section['num_members']} members but `HQDEStrategy(num_members={self._strategy.num_members})`;"
                f" resume with `num_members={section['num_members']}`."
            )

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
            model, ensemble = _members_of(trainer, model, strategy.combiner, states, [r.index for r in results], [r.buffers for r in results], [r.attributes for r in results])
        except ValueError as err:
            raise RuntimeError(f"HQDEStrategy: the fit ended without a usable member: {err}") from err
        vars(model).update(copy.deepcopy(results[0].attributes))
        score_of = {r.index: r.score for r in results}
        weights = self._prediction_weights([score_of[i] for i in ensemble.member_ids])
        if weights is not None:
            ensemble.set_weights(weights)
        strategy.ensemble = ensemble.eval()
        strategy.excluded_members = list(ensemble.excluded_members)
        model.load_state_dict(strategy.module_state(states, strategy.aggregator, scores, [r.index for r in results]))
        if strategy.members_are_independent:
            rank_zero_info(
                f"HQDEStrategy: your module holds member {ensemble.member_ids[0]}'s weights (an average of independently initialised members"
                " is no trained model); `trainer.strategy.ensemble` holds every member."
            )

        # the member that trained longest (lowest index on ties) wrote the last checkpoints: its
        # loops and callback states (e.g. the checkpoint callback's best/last paths) are the run's
        lead = max(results, key=lambda r: (_progress(r), math.inf if r.stopped_in_epoch is None else r.stopped_in_epoch, -r.index))
        _follow_lead(trainer, lead.fit_loop_state, lead.callbacks_state, lead.callback_attributes)
        trainer.state = lead.trainer_state
        metrics, logged = trainer.callback_metrics, trainer.logged_metrics
        metrics.update(lead.callback_metrics)
        logged.update(lead.logged_metrics)
        trainer.progress_bar_metrics.update(lead.progress_bar_metrics)
        for result in results:
            metrics.update({f"member_{result.index}/{k}": v for k, v in result.callback_metrics.items()})
            logged.update({f"member_{result.index}/{k}": v for k, v in result.logged_metrics.items()})
        excluded = {"ensemble/excluded_members": float(len(strategy.excluded_members))}
        metrics.update({k: torch.tensor(v) for k, v in excluded.items()})
        strategy.connect(model)
        model.trainer = trainer
        for logger in trainer.loggers:
            logger.log_metrics(excluded, trainer.global_step)
            logger.save()
            logger.finalize("success")


def _with_earlier_rounds(strategy: Any) -> None:
    """``strategy.sync_history`` of a resumed fit starts with the rounds of the fit it resumed (the checkpoint's coordinator
    history), as an uninterrupted fit's would."""
    first = min((record.round for record in strategy.sync_history), default=math.inf)
    earlier = [SyncRecord(**record) for record in strategy.coordinator_state.get("history", []) if record["round"] < first]
    strategy.sync_history = earlier + strategy.sync_history


def _members_of(
    trainer: Trainer, model: LightningModule, combine: Any, states: list[dict[str, torch.Tensor]], member_ids: list[int], buffers: list[dict[str, torch.Tensor]],
    attributes: list[dict[str, Any]],
) -> tuple[LightningModule, Ensemble]:
    """Your module in the fit's precision, as a plain fit leaves it (``"64-true"``: float64), and the ensemble of the
    members' ``states`` built from it (their outputs combined by ``combine``), with what each member's fit stored on its
    module (its non-persistent ``buffers`` and ``attributes``). Members whose weights hold NaN/Inf leave the ensemble with
    a warning; ``ValueError`` when none is left."""
    model = trainer.strategy.precision_plugin.convert_module(model)
    _built_like_members(model, states[0])
    ensemble = Ensemble.from_states(model, states, combine=combine, member_ids=member_ids, buffers=buffers, attributes=attributes)
    return model, ensemble


def _follow_lead(trainer: Trainer, fit_loop: Mapping[str, Any], callback_states: Mapping[str, Any], callback_attributes: Mapping[str, Mapping[str, Any]]) -> None:
    """The driver's trainer takes the loops of the member that trained furthest (it wrote the last checkpoints), and your
    callbacks its callbacks' states (by ``state_key``: e.g. the checkpoint callback's best and last paths are the run's)
    and what its fit stored on them (``callback_attributes``)."""
    trainer.fit_loop.load_state_dict(fit_loop)
    trainer.fit_loop.restarting = False
    for callback in trainer.callbacks:
        state = callback_states.get(callback.state_key)
        if state:
            if getattr(callback, "dirpath", "") is None and "dirpath" in state:
                callback.dirpath = state["dirpath"]  # resolved inside the member; lets best/last paths load in full
            callback.load_state_dict(copy.deepcopy(state))
        vars(callback).update(copy.deepcopy(callback_attributes.get(callback.state_key, {})))


def _check_initialised(model: LightningModule) -> None:
    """Refuses a module with lazy layers (``nn.LazyLinear``...) that have not taken their shapes yet, before any member starts:
    members are copied, compared, snapshotted and stacked before their first batch."""
    lazy = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if is_lazy(tensor)]
    if lazy:
        raise MisconfigurationException(
            f"HQDEStrategy: {type(model).__name__}'s parameters/buffers {lazy} are not initialised yet: lazy modules (`nn.LazyLinear`...)"
            " take their shapes at the first batch, and the members are copied and stacked before it. Run one batch through"
            " your module before `trainer.fit` (`model(example_input)`), or give those layers their input sizes."
        )


def _warn_ray_unused(strategy: Any) -> None:
    """Says that ``ray_init_kwargs`` are not used by a fit that trains its members in this process, without Ray."""
    if strategy.ray_init_kwargs:
        rank_zero_warn(
            f"HQDEStrategy: `ray_init_kwargs` ({sorted(strategy.ray_init_kwargs)}) are not used: this fit trains its members in"
            " this process and starts no Ray. Pass `members_per_worker=1` (or a `ray_address`) to train them in Ray actors."
        )


def _check_one_codec(callbacks: Sequence[Callback]) -> None:
    """Refuses two callbacks that both encode what a member sends at a sync (``SyncCodec``s): a sync sends one encoding,
    so all but the first would be ignored (``ByzantineMembers`` with ``AdaptiveQuantization``: no quantization, or no attack)."""
    codecs = [type(cb).__name__ for cb in callbacks if isinstance(cb, SyncCodec)]
    if len(codecs) > 1:
        raise MisconfigurationException(
            f"HQDEStrategy: the callbacks {codecs} each encode the weights a member sends at a sync, and a sync sends one"
            " encoding, so only the first would act. Keep one of them (`ByzantineMembers` sends its members' weights"
            " uncompressed)."
        )


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


def _attach_fit_data(trainer: Trainer, model: LightningModule, bound: inspect.BoundArguments) -> None:
    """Attaches the fit's data to your trainer as a plain fit does (``trainer.datamodule``, the sources of the loaders
    ``trainer.estimated_stepping_batches`` reads): the members' fits attached it to their own trainers."""
    loaders = bound.arguments.get("train_dataloaders")
    train = None if isinstance(loaders, LightningDataModule) else loaders
    trainer._data_connector.attach_data(model, train_dataloaders=train, val_dataloaders=bound.arguments.get("val_dataloaders"), datamodule=_fit_datamodule(bound))


def _data_hooks(model: LightningModule, bound: inspect.BoundArguments) -> list[Any]:
    """The fit's datamodule (if any) and module: the objects whose ``prepare_data`` a fit runs."""
    return [obj for obj in (_fit_datamodule(bound), model) if obj is not None]


def _prepare_data(trainer: Trainer, model: LightningModule, bound: inspect.BoundArguments) -> None:
    """Runs ``prepare_data`` of the datamodule and the module once, in the driver, as Lightning runs it on rank 0: with
    ``trainer`` attached to them (``self.trainer`` works, as in a plain fit).

    Members skip it (see :class:`~hqde_lightning.actors.MemberActor`): N members would otherwise
    download into the same folder at the same time. Other nodes of a cluster get their own run
    (:meth:`RayEnsembleLauncher._prepare_data_on_other_nodes`).
    """
    for obj in _data_hooks(model, bound):
        attached = obj._trainer if isinstance(obj, LightningModule) else obj.trainer
        obj.trainer = trainer
        try:
            obj.prepare_data()
        finally:
            if isinstance(obj, LightningModule):
                obj._trainer = attached
            else:
                obj.trainer = attached


def _built_like_members(model: LightningModule, state: dict[str, Any]) -> None:
    """Your module with the layers the members' fits gave theirs: a fit calls your ``setup`` and ``configure_model``
    before training, and the members' fits called them on their copies, not on your module. When a member's state has
    keys your module lacks, they are called here, as your module's own fit would have called them."""
    if set(state) <= set(model.state_dict()):
        return
    if is_overridden("setup", model, LightningModule):
        model.setup(stage=TrainerFn.FITTING.value)
    if is_overridden("configure_model", model, LightningModule):
        model.configure_model()


def _check_score_metric(score_metric: str | None, results: list[MemberResult]) -> None:
    """Warns when ``score_metric`` was never logged: every aggregation then fell back to equal weights."""
    if score_metric is None or not results or any(r.score is not None for r in results):
        return
    logged = sorted({k for r in results for k in r.callback_metrics})
    rank_zero_warn(
        f"HQDEStrategy: `score_metric={score_metric!r}` was never logged by the members, so members were weighted"
        f" equally in every aggregation and in the ensemble. The members logged: {logged}."
    )


def _progress(result: MemberResult) -> tuple[int, int]:
    """How far a member's fit went: (completed epochs, optimizer steps), from its fit loop's saved progress."""
    state = result.fit_loop_state
    epochs = state.get("epoch_progress", {}).get("current", {}).get("completed", 0)
    steps = state.get("epoch_loop.state_dict", {}).get("_batches_that_stepped", 0)
    return int(epochs), int(steps)


def _pickle_without_data(trainer: Trainer, function: Callable, bound: inspect.BoundArguments, copy_if_refused: bool = False) -> tuple[Any, dict[str, Any]]:
    """The fit without its data arguments pickled (:func:`pickle_fit`; with ``copy_if_refused``, for a member group here,
    deep-copied when pickle refuses it), and those arguments (used as they are, never pickled)."""
    data = {name: bound.arguments[name] for name in _DATA_ARGUMENTS if bound.arguments.get(name) is not None}
    without_data = inspect.signature(function).bind_partial(**{k: v for k, v in bound.arguments.items() if k not in data})
    return pickle_fit(trainer, function, without_data, bound.arguments["model"], copy_if_refused=copy_if_refused), data

