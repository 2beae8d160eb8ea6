"""Per-member copies of the callbacks that act on one member, for a member group.

With actors, each member's process runs its own copy of every callback. Inside a member group
(:mod:`hqde_lightning.embedded`), the callbacks that act on one member's metrics or weights are
replaced by one copy per member (:func:`member_callbacks`), each acting on its member only:

* :class:`MemberEarlyStopping`: your ``EarlyStopping``, watching ``member_{i}/<monitor>``. When
  it decides to stop, the member is frozen (:meth:`~hqde_lightning.group.MemberGroup.freeze`:
  its weights no longer move, it logs nothing more and leaves later sync rounds); the fit stops
  once every member of the group has stopped.
* :class:`MemberQuantumNoise`: ``QuantumNoise`` drawing from member ``i``'s own generator and
  perturbing member ``i``'s slices of the stacked parameters (or gradients), logged as
  ``member_{i}/noise_scale``.
* :class:`MemberAdaptiveQuantization`: ``AdaptiveQuantization`` encoding member ``i``'s weights
  for the group's sync (bit widths ranked by member ``i``'s own gradients, its own error
  feedback), logged as ``member_{i}/quant/...``.
* :class:`MemberByzantine`: ``ByzantineMembers`` corrupting what member ``i`` sends when ``i`` is
  one of its Byzantine members;
* :class:`MemberFinetuning`: ``BackboneFinetuning`` and your ``BaseFinetuning`` subclasses, run as
  member ``i`` with the group's optimizers as member ``i`` sees them: the parameter group it adds
  is added once to the stacked optimizer, and each member steps it with its own learning rate;
* :class:`MemberCallback`: any callback of yours (a ``Callback`` subclass that is none of
  Lightning's), each of its hooks run with ``pl_module`` as member ``i``
  (:meth:`~hqde_lightning.group.MemberGroup.each_member`: the member's weights, gradients,
  metrics and attributes, its batch and step outputs, its ``trainer.callback_metrics``; what it
  logs becomes ``member_{i}/<name>``). Setting ``trainer.should_stop`` stops that member, as
  ``EarlyStopping`` does.

The callbacks that read the trainer's state, write checkpoints or act in the driver
(:data:`GROUP_CALLBACKS`) run once for the group, as do progress bars, model summaries and
``LightningCLI``'s ``SaveConfigCallback``, your subclasses of them included: they show the group's
fit or save its config. ``StochasticWeightAveraging`` runs once for the
group too, as :class:`GroupSWA`: its running average and its SWALR schedule act element-wise, so
over the stacked parameters they are exactly each member's own. So do ``WeightAveraging`` and
``EMAWeightAveraging`` (and your subclasses that only choose when to update, as Lightning's docs
show), as :class:`GroupWeightAveraging`. ``LearningRateMonitor`` runs once
for the group as :class:`GroupLearningRateMonitor`, logging each member's own rates. Lightning's other callbacks
(``ModelPruning``...) change the module's structure or weights as a whole:
with those, each member trains on its own, in a thread of this process or a Ray actor
(:func:`callback_blocker` says why). Your
callbacks' ``on_save_checkpoint``/``on_load_checkpoint`` run as each member on the member's own
entry of whole-ensemble checkpoints, as they do in member actors.

Each copy keeps the original's state key in :attr:`MemberCopy.original_state_key`, so that
whole-ensemble checkpoints hold each member's callback state under the key it has with actors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

import lightning.pytorch as pl
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import (
    BaseFinetuning, BasePredictionWriter, EarlyStopping, LambdaCallback, LearningRateMonitor, ModelSummary, ProgressBar, RichModelSummary, StochasticWeightAveraging,
    ThroughputMonitor, WeightAveraging,
)
from lightning.pytorch.utilities.model_summary import ModelSummary as Summary
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from hqde_lightning.callbacks.byzantine import ByzantineMembers
from hqde_lightning.callbacks.noise import QuantumNoise
from hqde_lightning.callbacks.quantization import AdaptiveQuantization
from hqde_lightning.group import CHECKPOINT_HOOKS, MEMBER_HOOKS, MemberGroup
from hqde_lightning.member_data import member_batch

__all__ = [
    "GROUP_CALLBACKS", "GroupCallback", "GroupLearningRateMonitor", "GroupSWA", "GroupThroughputMonitor", "GroupWeightAveraging", "MemberAdaptiveQuantization", "MemberByzantine", "MemberCallback", "MemberCopy", "MemberEarlyStopping", "MemberFinetuning", "MemberQuantumNoise",
    "callback_blocker", "is_group_callback", "member_callbacks", "needs_member_attributes", "runs_hook", "runs_per_member",
]

#: callbacks a member group runs: they read the trainer's state, write checkpoints or act in the
#: driver, or get one copy per member (EarlyStopping, QuantumNoise, AdaptiveQuantization,
#: ByzantineMembers); your own callbacks run as each member (:class:`MemberCallback`). Lightning's
#: finders never reach a member's fit: :mod:`hqde_lightning.tuning` runs them first, in the driver
GROUP_CALLBACKS = (
    "EarlyStopping", "QuantumNoise", "AdaptiveQuantization", "ByzantineMembers",  # one copy per member
    "ModelCheckpoint", "OnExceptionCheckpoint", "LearningRateMonitor", "TQDMProgressBar", "RichProgressBar", "ModelSummary",
    "RichModelSummary", "Timer", "DeviceStatsMonitor", "GradientAccumulationScheduler",
    "ThroughputMonitor", "EnsembleSelection", "EnsembleCalibration", "OODEvaluation", "ReliabilityDiagram", "PerformanceMonitor",
    "StochasticWeightAveraging",  # once for the group, as `GroupSWA`
)
#: callbacks that only show the fit (its progress, its module's summary): subclasses of these, yours too, show the group's once
_SHOWS_THE_GROUP = (ProgressBar, ModelSummary)
#: what a subclass of ``WeightAveraging`` may define and still average a group's members (:class:`GroupWeightAveraging`)
_CHOOSES_WHEN = frozenset({"__init__", "should_update"})
#: hooks of your callbacks that a fit calls (besides :data:`~hqde_lightning.group.MEMBER_HOOKS`), run as each member
_CALLBACK_HOOKS = ("setup", "teardown", "on_sanity_check_start", "on_sanity_check_end", "on_exception")
#: every hook of a callback that a fit calls
_FIT_HOOKS = frozenset((*MEMBER_HOOKS, *_CALLBACK_HOOKS, *CHECKPOINT_HOOKS))
#: Lightning's callbacks whose fit hooks do nothing in a fit (a prediction writer's ``setup`` checks your ``predict_step``)
_INERT_IN_A_FIT = (BasePredictionWriter,)


def is_group_callback(callback: Callback) -> bool:
    """Whether ``callback`` runs once for a group: one of :data:`GROUP_CALLBACKS` (Lightning's or this package's own
    class, not a subclass), or any progress bar or model summary (:data:`_SHOWS_THE_GROUP`), ``LightningCLI``'s
    ``SaveConfigCallback`` (:func:`_saves_the_config`) or ``WeightAveraging`` that only chooses when to update
    (:func:`_weight_averaging_overrides` is empty), yours included; and any callback that does nothing in a fit
    (a ``BasePredictionWriter``, a callback of yours with test hooks only): it acts in ``test``/``predict``."""
    name, module = type(callback).__name__, type(callback).__module__
    return (
        not _acts_in_a_fit(callback)
        or isinstance(callback, _SHOWS_THE_GROUP)
        or _saves_the_config(callback)
        or (isinstance(callback, WeightAveraging) and not _weight_averaging_overrides(callback))
        or (name in GROUP_CALLBACKS and module.startswith(("lightning.pytorch.callbacks", "hqde_lightning.callbacks")))
    )


def _acts_in_a_fit(callback: Callback) -> bool:
    """Whether ``callback`` has a hook of its own that a fit calls (:data:`_FIT_HOOKS`), other than those of
    :data:`_INERT_IN_A_FIT`'s classes."""
    for hook in _FIT_HOOKS:
        if hook in vars(callback):  # set on the callback itself, as `LambdaCallback` does
            return True
        owner = next(cls for cls in type(callback).__mro__ if hook in vars(cls))
        if owner is not Callback and owner not in _INERT_IN_A_FIT:
            return True
    return False


def _saves_the_config(callback: Callback) -> bool:
    """Whether ``callback`` is ``LightningCLI``'s ``SaveConfigCallback`` or derives from it: it writes (or logs) the run's config once.

    Checked by name, so that this package does not import ``lightning.pytorch.cli`` (and jsonargparse) for it.
    """
    return any(c.__name__ == "SaveConfigCallback" and c.__module__ == "lightning.pytorch.cli" for c in type(callback).__mro__)


def _weight_averaging_overrides(callback: WeightAveraging) -> list[str]:
    """What the classes between ``callback``'s and ``WeightAveraging`` define besides choosing when to update (:data:`_CHOOSES_WHEN`)."""
    below = type(callback).__mro__[: type(callback).__mro__.index(WeightAveraging)]
    return sorted({name for cls in below for name, value in vars(cls).items() if callable(value) and name not in _CHOOSES_WHEN})


def callback_blocker(callback: Callback) -> str | None:
    """Why ``callback`` cannot run in a member group, or ``None`` when it can (once, or as each member)."""
    if is_group_callback(callback):
        return None
    if isinstance(callback, WeightAveraging):
        return f"{type(callback).__name__} overrides WeightAveraging's {_weight_averaging_overrides(callback)}; a group averages its members with WeightAveraging's own"
    if isinstance(callback, BaseFinetuning):  # as each member (`MemberFinetuning`)
        return None
    builtin = next((c for c in type(callback).__mro__ if c not in (Callback, LambdaCallback) and c.__module__.startswith(("lightning.", "hqde_lightning."))), None)
    if builtin is type(callback):
        return f"{builtin.__name__} acts on one module's optimizers, structure or weights"
    if builtin is not None:
        return f"{type(callback).__name__} derives from {builtin.__name__}, which acts on one module as a whole"
    return None


class MemberCopy:
    """A callback's copy for the member at ``position`` in ``group`` (build it with :meth:`of`)."""

    group: MemberGroup
    position: int
    #: the state key of the callback this copy was made from
    original_state_key: str

    @classmethod
    def of(cls, original: Callback, group: MemberGroup, position: int) -> Any:
        """A copy of ``original`` (settings and state) for the member at ``position``."""
        member = cls.__new__(cls)
        member.__dict__.update(copy.deepcopy(original.__dict__))
        member.group = group
        member.position = position
        member.original_state_key = original.state_key
        member._for_member()
        return member

    @property
    def member_id(self) -> int:
        return self.group.member_ids[self.position]

    def _for_member(self) -> None:
        """Adapts the copied settings to the member (e.g. the monitored metric's name)."""

    def _its_turn(self) -> bool:
        """Whether a hook Lightning calls now is this member's: under manual optimization the members step in turn, and the
        hooks Lightning calls inside a step (``on_before_optimizer_step``) are the stepping member's only."""
        return self.group.stepping in (None, self.position)

    def __deepcopy__(self, memo: dict) -> Any:  # the group is shared, not copied
        clone = type(self).__new__(type(self))
        clone.__dict__.update({k: v if k == "group" else copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return clone


class MemberEarlyStopping(MemberCopy, EarlyStopping):
    """Your ``EarlyStopping`` for one member: it freezes the member instead of stopping the fit."""

    def _for_member(self) -> None:
        self.monitor = f"member_{self.member_id}/{self.monitor}"

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        if self.group.frozen[self.position]:
            return
        stopping = trainer.should_stop
        super()._run_early_stopping_check(trainer)
        self.group.stop_member(self.position, stopping)


class _IndexedCopy(MemberCopy):
    """A copy of a callback that keys its state by member index (``QuantumNoise``, ``AdaptiveQuantization``)."""

    @property
    def state_key(self) -> str:
        return f"{self.original_state_key}[member_{self.member_id}]"

    def _member_index_in(self, trainer: pl.Trainer) -> int:
        return self.member_id


class MemberQuantumNoise(_IndexedCopy, QuantumNoise):
    """``QuantumNoise`` for one member: its own noise stream on its own slices of the stack."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        if self._its_turn():
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def _perturb(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tensors: Iterable[Tensor], batches_done: int, steps_done: int) -> None:
        if not self.group.frozen[self.position]:  # a stopped member's fit has ended: no noise drawn, nothing logged
            super()._perturb(trainer, pl_module, tensors, batches_done, steps_done)

    def _log_name(self) -> str:
        return f"member_{self.member_id}/noise_scale"

    def _weights(self, pl_module: pl.LightningModule) -> Iterator[Tensor]:
        return (p[self.position] for p, trains in self._members_parameters() if trains)

    def _gradients(self, optimizer: Optimizer) -> Iterator[Tensor]:
        if self.group.stack.member_parameters is not None:  # manual optimization: the member's own optimizer, over its own parameters
            return super()._gradients(optimizer)
        trained = {id(p) for p, trains in self._members_parameters() if trains}
        return (p.grad[self.position] for group in optimizer.param_groups for p in group["params"] if id(p) in trained and p.grad is not None)

    def _members_parameters(self) -> Iterator[tuple[Tensor, bool]]:
        """Each stacked parameter, and whether this member trains it (its own ``requires_grad``)."""
        stack = self.group.stack
        return ((p, p.requires_grad and flags[self.position]) for p, flags in zip(stack.params, stack.member_requires_grad))


class MemberAdaptiveQuantization(_IndexedCopy, AdaptiveQuantization):
    """``AdaptiveQuantization`` for one member: it encodes that member's weights (ranked by its own gradients) with its own error feedback."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        if self._its_turn():
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def _log_name(self, name: str) -> str:
        return f"member_{self.member_id}/quant/{name}"

    def _named_gradients(self, pl_module: pl.LightningModule) -> Iterator[tuple[str, Tensor]]:
        stack = self.group.stack
        if stack.member_parameters is not None:  # manual optimization: the member's own parameters, with their own gradients
            return ((name, p.grad) for name, p in zip(stack.param_names, stack.member_parameters[self.position]) if p.grad is not None)
        return ((name, p.grad[self.position]) for name, p in zip(stack.param_names, stack.params) if p.grad is not None)


class MemberByzantine(_IndexedCopy, ByzantineMembers):
    """``ByzantineMembers`` for one member: it corrupts what that member sends when the member is one of the Byzantine ones."""


class MemberCallback(_IndexedCopy, Callback):
    """Your callback for one member: each hook it overrides runs as that member (see the module docstring)."""

    callback: Callback
    #: the hooks the callback overrides (the others cost nothing)
    overridden: frozenset[str]

    @classmethod
    def of(cls, original: Callback, group: MemberGroup, position: int) -> MemberCallback:
        member = cls.__new__(cls)
        member.callback = copy.deepcopy(original)
        member.group, member.position, member.original_state_key = group, position, original.state_key
        member.overridden = frozenset(n for n in _FIT_HOOKS if _overrides(original, n))
        return member

    def save_into(self, trainer: pl.Trainer, entry: dict[str, Any]) -> None:
        """The callback's ``on_save_checkpoint``, as its member, on the member's own ``entry`` of a whole-ensemble checkpoint."""
        if "on_save_checkpoint" in self.overridden:
            self.group.each_member("on_save_checkpoint", lambda member, _: self.callback.on_save_checkpoint(trainer, member, entry), positions=[self.position])

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """The callback's ``on_load_checkpoint``, as its member, on the member's own entry of the checkpoint being resumed."""
        if "on_load_checkpoint" not in self.overridden:
            return
        entry = checkpoint if self.group.loaded_entries is None else self.group.loaded_entries[self.position]
        self.group.each_member("on_load_checkpoint", lambda member, _: self.callback.on_load_checkpoint(trainer, member, entry), positions=[self.position])

    def state_dict(self) -> dict[str, Any]:
        return self.callback.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.callback.load_state_dict(state_dict)

    def _run(self, hook: str, trainer: pl.Trainer, args: tuple[Any, ...]) -> None:
        if hook not in self.overridden:
            return
        method = getattr(self.callback, hook)
        self.group.each_member(hook, lambda member, member_args: method(trainer, member, *member_args), args, [self.position])


def _member_hook(hook: str) -> Callable[..., None]:
    def run(self: MemberCallback, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        self._run(hook, trainer, (*args, *kwargs.values()))  # Lightning passes `stage` by name, the rest in order

    run.__name__ = hook
    return run


for _hook in (*MEMBER_HOOKS, *_CALLBACK_HOOKS):  # every hook a fit calls, run as the member
    setattr(MemberCallback, _hook, _member_hook(_hook))


class MemberFinetuning(MemberCallback):
    """Your ``BaseFinetuning`` (``BackboneFinetuning``, or a subclass of yours) for one member: each hook runs as that member,
    with ``trainer.optimizers`` as the member sees them (:class:`~hqde_lightning.member_optimizer.MemberOptimizer`).

    It freezes and unfreezes the member's own parameters (their ``requires_grad`` is the member's), the
    parameter group it adds is added once to the stacked optimizer and joined by the other members,
    each with its own learning rate, and its state (the groups it added, a backbone's learning rate)
    is the member's: resuming, it restores the member's groups.
    """

    def _run(self, hook: str, trainer: pl.Trainer, args: tuple[Any, ...]) -> None:
        if hook not in self.overridden:
            return
        method = getattr(self.callback, hook)

        def run(member: pl.LightningModule, member_args: tuple[Any, ...]) -> None:
            with self.group.member_optimizers(member):
                method(trainer, member, *member_args)

        self.group.each_member(hook, run, args, [self.position])


class GroupCallback(Callback):
    """One of Lightning's callbacks run once for a whole member group, as a version that knows the
    group's members (build it with :meth:`of`); its state is kept under the original's key."""

    group: MemberGroup
    original_state_key: str

    @classmethod
    def of(cls, original: Callback, group: MemberGroup) -> Any:
        """A copy of ``original`` (settings and state) for ``group``."""
        version = cls.__new__(cls)
        version.__dict__.update(copy.deepcopy(original.__dict__))
        version.group = group
        version.original_state_key = original.state_key
        return version

    @property
    def state_key(self) -> str:
        return self.original_state_key

    def save_member(self, entry: dict[str, Any], position: int) -> None:
        """Makes the member at ``position``'s ``entry`` of a whole-ensemble checkpoint hold what this callback writes into
        the checkpoints of the member's own fit (nothing more, unless a subclass says otherwise)."""


class GroupSWA(GroupCallback, StochasticWeightAveraging):
    """Your ``StochasticWeightAveraging`` for a whole member group (build it with :meth:`of`).

    Lightning's callback runs over the group module as it is: its parameters are the stacked
    ones, and the running average (element-wise), the weight transfer and the SWALR schedule of
    the group's element-wise optimizer are each member's own. What this class adds:

    * BatchNorm: the modules are your module's (the template's), their statistics the stacked
      buffers: the statistics are reset per member, the template's modules get ``momentum=None``,
      and the update epoch runs member by member (vmap cannot read ``num_batches_tracked``);
    * members that stopped early keep their own weights, as their actors' fits do;
    * checkpoints: each member's entry holds the state its actor's callback would write
      (:meth:`member_state`: the member's averaged weights under your module's keys), and a
      group resumes from those entries (:meth:`stacked_state`).
    """

    def pl_module_contains_batch_norm(self, pl_module: pl.LightningModule) -> bool:  # type: ignore[override]
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.group.module.modules())

    def reset_batch_norm_and_save_state(self, pl_module: pl.LightningModule) -> None:
        stack, self.momenta = self.group.stack, {}
        with torch.no_grad():
            for path, module in self.group.module.named_modules():
                if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                    continue
                prefix = f"{path}." if path else ""
                stack.stacked(f"{prefix}running_mean").zero_()
                stack.stacked(f"{prefix}running_var").fill_(1.0)
                stack.stacked(f"{prefix}num_batches_tracked").zero_()
                self.momenta[module] = module.momentum
                module.momentum = None
        self.group.modes["training_step"] = "loop"
        self.group._restore_frozen()

    def transfer_weights(self, src_pl_module: pl.LightningModule, dst_pl_module: pl.LightningModule) -> None:  # type: ignore[override]
        super().transfer_weights(src_pl_module, dst_pl_module)
        self.group._restore_frozen()

    def member_state(self, state: dict[str, Any], position: int) -> dict[str, Any]:
        """The state the member at ``position`` would have in its own actor: its averaged weights under your module's keys."""
        average = self._average_model
        if not isinstance(average, MemberGroup) or state.get("average_model_state") is None:
            return state
        weights = {k: v.detach().cpu().clone() for k, v in average.stack.member_state_dict(position).items()}
        return {**state, "average_model_state": weights}

    def save_member(self, entry: dict[str, Any], position: int) -> None:
        if self.state_key in entry.get("callbacks", {}):
            entry["callbacks"][self.state_key] = self.member_state(entry["callbacks"][self.state_key], position)

    def stacked_state(self, states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The group's state from each member's own (:meth:`member_state`), one per member in group order."""
        return {**states[0], "average_model_state": [s.get("average_model_state") for s in states]}

    def _load_average_model_state(self, model_state: Any) -> None:
        if self._average_model is None or not isinstance(model_state, list):
            return super()._load_average_model_state(model_state)
        for position, state in enumerate(model_state):
            if state is not None:
                self._average_model.stack.load_member_state_dict(position, state)


class GroupWeightAveraging(GroupCallback, WeightAveraging):
    """Your ``WeightAveraging`` or ``EMAWeightAveraging`` for a whole member group (build it with :meth:`of`).

    Lightning's callback keeps an ``AveragedModel`` of the module it trains and swaps it in for
    validation and at the end of the fit. Over the group module, whose parameters and buffers are
    the stacked ones, both averages it offers (the exponential moving average, the equal-weighted
    mean) are element-wise: each member's slice of the average is the one its own fit keeps, and
    your ``should_update`` (the class's, a subclass of yours included) chooses the updates for all.
    What this class adds:

    * members that stopped early: a member's average takes the updates its own fit makes (those of
      its last training batch and of the end of the epoch it stopped in, none after) and counts its
      own updates (``n_averaged``, which the equal-weighted mean divides by), so it ends the fit with
      its own average;
    * checkpoints: each member's entry holds what a checkpoint of its own fit holds (:meth:`save_member`:
      its average as ``state_dict``, its trained weights as ``current_model_state``, its
      ``averaging_state``), and a group resumes every member from its entry (:meth:`on_load_checkpoint`).
    """

    #: per member (its place in the group), how many updates its average has taken
    updates: list[int]
    #: the members that trained in a batch of this epoch: those that take its epoch-end update
    _trained: set[int]

    @classmethod
    def of(cls, original: Callback, group: MemberGroup) -> GroupWeightAveraging:
        version = super().of(original, group)
        version._should_update = type(original).should_update
        return version

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Your callback's ``should_update`` (its class's: ``EMAWeightAveraging``'s, or your subclass's)."""
        return self._should_update(self, step_idx=step_idx, epoch_idx=epoch_idx)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.updates, self._trained = [0] * self.group.num_members, set()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained = set()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        training = {p for p in range(self.group.num_members) if not self.group.frozen[p]}
        self._trained |= training
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1):
            self._update(pl_module, training)
            self._latest_update_step = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch > self._latest_update_epoch and self.should_update(epoch_idx=trainer.current_epoch):
            self._update(pl_module, self._trained | {p for p in range(self.group.num_members) if not self.group.frozen[p]})
            self._latest_update_epoch = trainer.current_epoch

    def _update(self, pl_module: pl.LightningModule, positions: set[int]) -> None:
        """Updates the averages of the members at ``positions``, each counting its own updates; the others keep theirs."""
        average = self._average_model
        assert average is not None
        for count in sorted({self.updates[p] for p in positions}):
            taking = [p for p in positions if self.updates[p] == count]
            others = [p for p in range(self.group.num_members) if p not in taking]
            tensors = [*average.module.parameters(), *average.module.buffers()]
            kept = [t[others].clone() for t in tensors] if others else []
            average.n_averaged.fill_(count)
            average.update_parameters(pl_module)
            with torch.no_grad():
                for tensor, values in zip(tensors, kept):
                    tensor[others] = values
            for p in taking:
                self.updates[p] += 1
        average.n_averaged.fill_(max(self.updates))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Nothing to the group's checkpoint: each member's entry is made its own fit's (:meth:`save_member`)."""

    def save_member(self, entry: dict[str, Any], position: int) -> None:
        """What ``WeightAveraging`` does to a checkpoint of the member's own fit: its average becomes the ``state_dict``."""
        if self._average_model is None:
            return
        average = self._average_model.module.stack.member_state_dict(position)
        entry["current_model_state"] = entry["state_dict"]
        entry["state_dict"] = {k: v.detach().cpu().clone() for k, v in average.items()}
        entry["averaging_state"] = {"n_averaged": torch.tensor(self.updates[position], dtype=torch.long)}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Each member's average and trained weights from its own entry of the checkpoint being resumed.

        The group has loaded each entry's ``state_dict`` as the member's weights; as Lightning's callback
        does, that becomes the member's average, and ``current_model_state`` its weights.
        """
        if self._average_model is None:
            return super().on_load_checkpoint(trainer, pl_module, checkpoint)
        averages, stack = self._average_model.module.stack, self.group.stack
        for position, entry in enumerate(self.group.loaded_entries or [checkpoint] * self.group.num_members):
            averages.load_member_state_dict(position, entry["state_dict"])
            if "current_model_state" in entry and "averaging_state" in entry:
                stack.load_member_state_dict(position, entry["current_model_state"])
                self.updates[position] = int(entry["averaging_state"]["n_averaged"])
            elif position == 0:
                rank_zero_warn("The checkpoint was not created with WeightAveraging. Both the current and the average model will be initialized with state_dict.")
        self._average_model.n_averaged.fill_(max(self.updates))


class GroupModelSummary(GroupCallback, ModelSummary):
    """Lightning's ``ModelSummary`` for a whole member group (build it with :meth:`of`): your module's layers, as a
    plain fit shows them, with one member's parameters (and FLOPs) per layer, and the totals of all the members.

    Summarized as it is, the group module is one row holding every member's parameters (``stack``).
    """

    def _summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Summary:
        self.group._attach()  # your module sees the trainer (its precision, the example input's transfer)
        return MembersSummary(self.group.module, self._max_depth, self.group.num_members)


class GroupRichModelSummary(GroupModelSummary, RichModelSummary):
    """Lightning's ``RichModelSummary`` for a whole member group (see :class:`GroupModelSummary`)."""


class GroupThroughputMonitor(GroupCallback, ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` for a whole member group (build it with :meth:`of`): the samples (and lengths) every
    member processes. Your ``batch_size_fn`` and ``length_fn`` get each training member's own batch, as in its own fit,
    and the counts add up; a validation batch, which every member evaluates, counts once per member. (Over the group's
    stacked batch they would count members, not samples.)"""

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, iter_num: int) -> None:
        sizes, lengths = self.batch_size_fn, self.length_fn
        self.batch_size_fn = self._members(sizes, trainer.training)
        self.length_fn = None if lengths is None else self._members(lengths, trainer.training)
        try:
            super()._update(trainer, pl_module, batch, iter_num)
        finally:
            self.batch_size_fn, self.length_fn = sizes, lengths

    def _members(self, count: Callable[[Any], int], training: bool) -> Callable[[Any], int]:
        """``count`` over the members a batch holds: each training member's own batch, or the shared one per member."""
        training_members = [i for i, stopped in enumerate(self.group.frozen) if not stopped]
        if training:
            return lambda stacked: sum(count(member_batch(stacked, i)) for i in training_members)
        return lambda batch: count(batch) * self.group.num_members


class MembersSummary(Summary):
    """Lightning's summary of ``module`` (one member), its totals those of ``members`` members."""

    def __init__(self, module: pl.LightningModule, max_depth: int, members: int) -> None:
        self.members = members
        super().__init__(module, max_depth)

    @property
    def total_parameters(self) -> int:
        return super().total_parameters * self.members

    @property
    def trainable_parameters(self) -> int:
        return super().trainable_parameters * self.members

    @property
    def total_flops(self) -> int:
        return super().total_flops * self.members

    def _forward_example_input(self) -> None:
        """Runs your ``example_input_array`` through your module's (or datamodule's) batch hooks, as a plain fit's summary
        does. (Lightning looks the hooks up on the trainer's module, which is the group here, and would call the
        datamodule's, none or not.)"""
        module = self._model
        selector = module._trainer._data_connector._datahook_selector if module._trainer is not None else None

        def own_hook(hook_name: str, *args: Any) -> Any:
            owner = selector.get_instance(hook_name) if selector is not None else module
            return getattr(owner if isinstance(owner, pl.LightningDataModule) else module, hook_name)(*args)

        module._call_batch_hook = own_hook  # an instance attribute shadows the class's method
        try:
            super()._forward_example_input()
        finally:
            del module._call_batch_hook

    def _get_summary_data(self) -> list[tuple[str, list[str]]]:
        members, self.members = self.members, 1  # the rows are one member's (Lightning's "other params" row included)
        try:
            data = super()._get_summary_data()
        finally:
            self.members = members
        return [(f"{name} per member" if name in ("Params", "FLOPs") else name, values) for name, values in data]


class GroupLearningRateMonitor(GroupCallback, LearningRateMonitor):
    """Your ``LearningRateMonitor`` for a whole member group (build it with :meth:`of`): every member's own rates.

    Members in a group can have learning rates of their own (a ``ReduceLROnPlateau`` on each
    member's metric, schedulers stepped per member: :mod:`hqde_lightning.member_lr`). Lightning's
    callback over the group would log the rates the optimizer shows at rest, the first member's.
    This logs each member's as member actors do, ``member_{i}/lr-<Optimizer>`` (and its momentum
    and weight decay when asked), at the steps and epochs Lightning's callback logs, with each
    member's own history (Lightning's ``lrs``) in :attr:`member_history`. Members that stopped
    early log nothing more, as their actors would. ``trainer.callback_metrics`` get the
    ``member_{i}/...`` values, and the plain names the first member's, as for a group's other metrics.
    """

    #: per member (its place in the group), Lightning's per-name history: ``lrs``, ``last_momentum_values``, ``last_weight_decay_values``
    member_history: list[dict[str, dict[str, Any]]]

    def on_train_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        super().on_train_start(trainer, *args, **kwargs)
        history = {name: getattr(self, name) for name in ("lrs", "last_momentum_values", "last_weight_decay_values")}
        self.member_history = [copy.deepcopy(history) for _ in range(self.group.num_members)]

    def _extract_stats(self, trainer: pl.Trainer, interval: str) -> dict[str, float]:
        stats: dict[str, float] = {}
        first: dict[str, float] | None = None
        for i, member in enumerate(self.group.member_ids):
            if self.group.frozen[i]:
                continue
            self.__dict__.update(self.member_history[i])  # Lightning's code appends to the member's own history
            with self.group.running_as(i):  # its rates (a stacked optimizer's), or its own optimizers (manual optimization)
                own = super()._extract_stats(trainer, interval)
            first = own if first is None else first
            stats.update({f"member_{member}/{name}": value for name, value in own.items()})
        device = trainer.strategy.root_device
        trainer.callback_metrics.update({name: torch.tensor(value, device=device) for name, value in {**stats, **(first or {})}.items()})
        return stats


#: Lightning's callbacks a member group runs once, as a version that knows the group's members
_ONCE_FOR_THE_GROUP: dict[type[Callback], type[GroupCallback]] = {
    StochasticWeightAveraging: GroupSWA, LearningRateMonitor: GroupLearningRateMonitor, ModelSummary: GroupModelSummary, RichModelSummary: GroupRichModelSummary,
    ThroughputMonitor: GroupThroughputMonitor,
}
#: the callbacks a member group replaces by one copy per member
_COPIES: dict[type[Callback], type[MemberCopy]] = {
    EarlyStopping: MemberEarlyStopping, QuantumNoise: MemberQuantumNoise, AdaptiveQuantization: MemberAdaptiveQuantization,
    ByzantineMembers: MemberByzantine,
}


def _overrides(callback: Callback, hook: str) -> bool:
    """Whether ``callback`` has its own ``hook`` (by its class, or set on it as ``LambdaCallback`` does)."""
    method = getattr(callback, hook)
    return getattr(method, "__func__", method) is not getattr(Callback, hook)


def runs_hook(callback: Callback, hook: str) -> bool:
    """Whether ``callback`` does anything in ``hook`` (a member's copy of your callback: whether yours does)."""
    if isinstance(callback, MemberCallback):
        return hook in callback.overridden
    return _overrides(callback, hook)


def runs_per_member(callback: Callback) -> bool:
    """Whether a member group runs ``callback`` as each member (a :class:`MemberCallback` per member)."""
    return not is_group_callback(callback) and callback_blocker(callback) is None


def needs_member_attributes(callback: Callback) -> bool:
    """Whether ``callback`` runs as each member with code that may keep attributes on your module, which the members'
    steps then read: they run member by member (vmap cannot keep them apart). Not ``BaseFinetuning`` (Lightning's, or
    a subclass of yours that only chooses what to freeze and when to unfreeze: it overrides none of the fit's hooks):
    it sets ``requires_grad`` and parameter groups, which a vectorized step keeps per member."""
    if not runs_per_member(callback):
        return False
    if not isinstance(callback, BaseFinetuning):
        return True
    yours = [cls for cls in type(callback).__mro__[: type(callback).__mro__.index(BaseFinetuning)] if not cls.__module__.startswith("lightning.")]
    return any(name in _FIT_HOOKS for cls in yours for name in vars(cls))


def _per_member_copy(callback: Callback) -> type[MemberCallback]:
    return MemberFinetuning if isinstance(callback, BaseFinetuning) else MemberCallback


def member_callbacks(callbacks: Sequence[Callback], group: MemberGroup) -> list[Callback]:
    """``callbacks`` with each ``EarlyStopping``, ``QuantumNoise``, ``AdaptiveQuantization`` and ``ByzantineMembers``
    (exactly those classes) and each of yours (:func:`runs_per_member`) replaced by one copy per member,
    ``StochasticWeightAveraging`` by :class:`GroupSWA`, ``LearningRateMonitor`` by :class:`GroupLearningRateMonitor`
    and ``WeightAveraging`` (its subclasses that run once for the group, see :func:`is_group_callback`) by
    :class:`GroupWeightAveraging`."""
    out: list[Callback] = []
    for callback in callbacks:
        version = _ONCE_FOR_THE_GROUP.get(type(callback)) or (GroupWeightAveraging if isinstance(callback, WeightAveraging) else None)
        if version is not None:
            out.append(version.of(callback, group))
            continue
        member_copy = _COPIES.get(type(callback)) or (_per_member_copy(callback) if runs_per_member(callback) else None)
        if member_copy is None:
            out.append(callback)
        else:
            out += [member_copy.of(callback, group, i) for i in range(group.num_members)]
    return out
