"""``MemberGroup``: k members of your ``LightningModule`` trained by one Lightning fit loop.

The group is itself a ``LightningModule`` around :class:`~hqde_lightning.stacking.StackedMembers`:

* ``training_step`` gets one batch per member stacked on dimension 0 (see
  :mod:`hqde_lightning.member_data`), runs your ``training_step`` for every member (vectorized
  with ``torch.func.vmap`` or looped, see ``vectorize``) and returns the sum of the members'
  losses: the members share no parameter, so each member's parameters get exactly the
  gradient of its own loss. Looped, ``vectorize="auto"`` also times back-propagating each
  member's loss as soon as its step returns (:meth:`MemberGroup._backward_as_members_run`: the
  same gradients, about a fifth less time for small CNNs on a CPU, more for a small MLP);
* ``validation_step`` runs your ``validation_step`` for every member on the same batch;
* what your steps log with ``self.log`` is logged once per member as ``member_{i}/<name>``;
  the group's first member is also logged under the plain name with ``logger=False``, for
  callbacks that monitor it (``ModelCheckpoint(monitor="val_loss")``);
* ``configure_optimizers`` runs yours with the stacked parameters in place of your module's, so
  one optimizer steps all k members. For element-wise optimizers (:data:`ELEMENTWISE_OPTIMIZERS`)
  that is exactly k independent optimizers; any other raises :class:`GroupUnsupported`. Each
  learning-rate scheduler has one copy per member, and each member keeps its own learning rates
  (a ``ReduceLROnPlateau`` follows each member's own metric; see :mod:`hqde_lightning.member_lr`);
* gradient clipping is per member: by norm, each member's gradient norm is clipped on its own;
* under manual optimization each member runs your ``training_step`` in turn, as itself, stepping
  optimizers of its own (:mod:`~hqde_lightning.manual_members`);
* your ``optimizer_step``, ``optimizer_zero_grad`` and ``backward`` (:data:`GROUP_HOOKS`) run once
  per step for the whole group, with the stacked optimizer and the sum of the members' losses:
  the update they make (a warm-up's learning rates, a skipped or accumulated step, a scaled loss)
  is every member's, as the same code makes it in each member's own fit. A module with its own
  ``optimizer_step`` and members whose learning rates differ (a ``ReduceLROnPlateau``) raises
  :class:`GroupUnsupported`: that code would see one member's rates for all;
* the hooks of your module that a fit calls (:data:`MEMBER_HOOKS`: ``on_train_epoch_end``,
  ``on_validation_epoch_end``, batch hooks...) run once per member, as that member
  (:meth:`MemberGroup.each_member`): its weights, metrics, RNG stream and its own copies of your
  module's attributes, so that the Lightning 2 pattern of collecting step outputs in
  ``self.outputs`` and reducing them at the epoch end works per member. What they log is logged
  as ``member_{i}/<name>``, and ``trainer.callback_metrics`` shows them the member's own values
  under the plain names; setting ``trainer.should_stop`` stops that member only. Steps of such a
  module (or with callbacks of yours, see :mod:`hqde_lightning.member_callbacks`) run member by
  member: vmap cannot keep per-member attributes. So do steps of members whose attributes differ
  from the start (your ``__init__`` draws them at random, see :mod:`hqde_lightning.attributes`, or an earlier fit of
  the same module left them so);
* the batch-transfer hooks (:data:`BATCH_HOOKS`, your datamodule's or your module's, as Lightning
  chooses) change each member's own training batch, as that member (its own random
  augmentation), and the members' shared validation batch once.

``vectorize="auto"`` times the ways to run a step, one after another, for the first training
steps (:data:`PROBE_STEPS_PER_WAY` each), keeps the fastest and logs every timing. The ways are vmap and
the loop, and for members with convolution weights also the loop with those weights laid out
channels-last (:meth:`~hqde_lightning.stacking.StackedMembers.set_channels_last`), which is what
makes a group of small CNNs faster than the same members one after another on a CPU. Each looped
way is timed with Lightning's one backward pass over the sum of the members' losses and with a
backward pass per member as it runs (where no hook runs between a step and its backward pass).
On a GPU vmap is timed first, on a CPU last (there vmap's grouped convolutions are often the slowest way);
a way clearly slower than the best one timed before it is cut short (:data:`CUT_RATIO`), so that
the probe costs little more than the steps it would have taken anyway. A step vmap
cannot run (``.item()``, data-dependent control flow, a torchmetrics object updated inside the
step) runs looped, with the reason logged. ``vectorize`` may also name one of the :data:`WAYS`, as the
log line of the timing names the way it kept: the group is laid out for it at fit start and nothing is timed.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.core.optimizer import _configure_optimizers, _configure_schedulers_automatic_opt
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import Strategy
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from hqde_lightning.attributes import differing, plain_attributes
from hqde_lightning.manual_members import configure_members
from hqde_lightning.member_data import group_batch_size, member_batch, ragged, stack_batches
from hqde_lightning.member_lr import MemberLearningRates, MemberSchedulers, member_copies
from hqde_lightning.member_optimizer import AddedParamGroups, MemberOptimizer
from hqde_lightning.quick_log import QuickLog
from hqde_lightning.stacking import CapturedLogs, HostRNG, StackedMembers, UnloggableValue, capture_logs, loss_of, vmap_miscomputes

__all__ = [
    "BATCH_HOOKS", "CHECKPOINT_HOOKS", "ELEMENTWISE_OPTIMIZERS", "GROUP_HOOKS", "MEMBER_HOOKS", "GroupUnsupported", "MemberGroup", "member_optimizer_state", "stacked_optimizer_state", "unsupported_hooks",
]

#: a way to run a group's training step (:data:`WAYS`), which ``vectorize`` may name: trained that way, nothing timed
Way = Literal["vmap", "loop", "loop, backward per member", "loop, channels-last", "loop, channels-last, backward per member"]
Vectorize = Literal["auto"] | bool | Way
#: optimizers whose update of an element depends on that element's gradient and state only
ELEMENTWISE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop,
    torch.optim.Adagrad, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
)
#: ``vectorize="auto"`` times this many training steps each way before it decides (the first of each is not counted)
PROBE_STEPS_PER_WAY = 3
#: ``vectorize="auto"`` stops timing a way whose first counted step takes this many times the mean step of the best
#: way timed so far (or whose first step, one-off costs included, takes :data:`FIRST_STEP_CUT` times it)
CUT_RATIO = 1.3
FIRST_STEP_CUT = 2.0
#: the ways ``vectorize="auto"`` times: how the step runs, whether 4-D weights are laid out channels-last, and whether a
#: looped step back-propagates each member's loss as the member runs (:meth:`MemberGroup._backward_as_members_run`)
WAYS: dict[Way, tuple[str, bool, bool]] = {
    "vmap": ("vmap", False, False), "loop": ("loop", False, False), "loop, backward per member": ("loop", False, True),
    "loop, channels-last": ("loop", True, False), "loop, channels-last, backward per member": ("loop", True, True),
}
#: hooks of your module that the group runs (data hooks are handed to your module; `configure_callbacks` runs before
#: the fit, see :func:`~hqde_lightning.embedded.with_module_callbacks`)
_RUN_HOOKS = ("training_step", "validation_step", "configure_optimizers", "lr_scheduler_step", "forward", "test_step", "predict_step", "configure_callbacks")
_DATA_HOOKS = ("train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader", "prepare_data", "setup", "teardown")
#: hooks of your module (and of callbacks) that a fit calls and a group runs once per member, as that member
MEMBER_HOOKS = (
    "on_fit_start", "on_fit_end", "on_train_start", "on_train_end", "on_validation_start", "on_validation_end",
    "on_train_epoch_start", "on_train_epoch_end", "on_validation_epoch_start", "on_validation_epoch_end",
    "on_train_batch_start", "on_train_batch_end", "on_validation_batch_start", "on_validation_batch_end",
    "on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad",
)
#: hooks of your module or datamodule that change a batch as the fit moves it to the device: a group runs them on each
#: member's own training batch, as that member (its RNG stream: its own random augmentations), on the shared validation batch once
BATCH_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")
#: hooks of your module (and of callbacks) that write into and read from a checkpoint: a group runs them
#: once per member, as that member, on the member's own entry of whole-ensemble checkpoints
CHECKPOINT_HOOKS = ("on_save_checkpoint", "on_load_checkpoint")
#: hooks of your module that a group runs once per step for all its members: they make the one update of the stacked optimizer
GROUP_HOOKS = ("optimizer_step", "optimizer_zero_grad", "backward")
#: hooks of your module that a group runs once per member, as that member (its own gradients, its own attributes)
_PER_MEMBER = MEMBER_HOOKS + BATCH_HOOKS + CHECKPOINT_HOOKS + ("configure_gradient_clipping",)
#: hooks that still run for a member that stopped early (its own fit would end with them, and it is still checkpointed)
_END_HOOKS = ("on_train_end", "on_fit_end", "teardown", "on_exception", *CHECKPOINT_HOOKS)
#: hooks that run inside a training batch: a member that asks to stop in one still makes the batch's update
_WITHIN_BATCH = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad", "training_step")


class GroupUnsupported(Exception):
    """The module or its configuration cannot be trained as a member group (the reason is the message)."""


def unsupported_hooks(module: LightningModule) -> list[str]:
    """Hooks ``module`` overrides that a member group would not run per member (training, optimizer and batch hooks)."""
    from lightning.pytorch.core.hooks import CheckpointHooks, DataHooks, ModelHooks

    names = [n for base in (ModelHooks, DataHooks, CheckpointHooks) for n in vars(base) if not n.startswith("_")]
    names += ["configure_gradient_clipping", "optimizer_step", "optimizer_zero_grad", "backward", "configure_callbacks"]  # not in Lightning's hook classes
    never_in_fit = [n for n in names if "test" in n or "predict" in n]
    run = _RUN_HOOKS + _DATA_HOOKS + _PER_MEMBER + GROUP_HOOKS + tuple(never_in_fit)
    return sorted({n for n in names if n not in run and is_overridden(n, module, LightningModule)})


class MemberGroup(LightningModule):
    """Members ``member_ids`` of ``module``'s ensemble, stacked (see the module docstring).

    Args:
        module: your module: the template whose methods run (its own weights are not trained).
        members: one module per member, holding the member's initial weights.
        member_ids: the members' indices in the ensemble (logged as ``member_{i}/``).
        vectorize: ``True`` (vmap), ``False`` (loop), ``"auto"`` (time the ways, keep the fastest) or a way of
            :data:`WAYS` (``"vmap"`` is ``True``, ``"loop"`` ``False``; a looped way is laid out at fit start).
        rng_states: per member, the torch RNG state its looped steps draw from.
        host_rng_states: per member, numpy's and Python's random states (:func:`~hqde_lightning.stacking.host_rng`) its
            looped steps, hooks and dataset draw from (default: the current ones).
        member_callbacks: the names of the callbacks that run as each member (:meth:`each_member`):
            with any, the members keep their own attributes and steps run member by member, as for
            a module that overrides :data:`MEMBER_HOOKS`.
    """

    def __init__(
        self,
        module: LightningModule,
        members: Sequence[torch.nn.Module],
        member_ids: Sequence[int],
        vectorize: Vectorize = "auto",
        rng_states: Sequence[Tensor] | None = None,
        member_callbacks: Sequence[str] = (),
        host_rng_states: Sequence[HostRNG] | None = None,
    ) -> None:
        super().__init__()
        self.stack = StackedMembers(module, members, rng_states, host_rng_states)
        #: your module's hooks that run once per member
        self.hooks = {name for name in _PER_MEMBER if is_overridden(name, module, LightningModule)}
        #: your module's hooks that run once for the whole group (:data:`GROUP_HOOKS`)
        self.group_hooks = {name for name in GROUP_HOOKS if is_overridden(name, module, LightningModule)}
        self.automatic_optimization = module.automatic_optimization
        #: whether hooks run per member, each member keeping its own attributes (always under manual optimization)
        self.per_member = bool(self.hooks or member_callbacks or not self.automatic_optimization)
        #: each member's own plain attributes: looped code runs with them (hooks too, when they run per member)
        self.stack.member_attributes = [plain_attributes(m) for m in members]
        #: where the members' attributes are now: their own (looped code), or your module's, shared (vmapped code runs once
        #: for all members); see :meth:`_attributes_for`
        self._attributes_shared = False
        object.__setattr__(self, "module", module)
        self.member_ids = list(member_ids)
        #: the looped way you named in ``vectorize`` (``"loop, channels-last"``...): laid out at fit start, nothing timed
        self._named_way: str | None = None
        if isinstance(vectorize, str) and vectorize in WAYS:
            self._named_way = None if vectorize in ("vmap", "loop") else vectorize
            vectorize = WAYS[vectorize][0] == "vmap"  # otherwise as `True` or `False`
        self.vectorize = vectorize
        self._hparams_name = getattr(module, "_hparams_name", None)
        if hasattr(module, "_hparams"):
            self._set_hparams(module.hparams)
            self._hparams_initial = module.hparams_initial
        self._log_hyperparams = module._log_hyperparams
        for name in _DATA_HOOKS:
            if is_overridden(name, module, LightningModule):
                setattr(self, name, self._on_template(getattr(module, name)))
        #: per step kind, "vmap" or "loop" once decided
        self.modes: dict[str, str] = {} if vectorize == "auto" else {"training_step": "vmap" if vectorize else "loop"}
        #: the layout of your module's own 4-D weights, which every way but the channels-last one keeps
        self._channels_last = self.stack.channels_last
        #: the ways ``vectorize="auto"`` still times (see :data:`WAYS`), and each one's step times
        # (under manual optimization each member back-propagates in its own step already)
        self._ways = [
            w for w, (_, channels_last, each) in WAYS.items()
            if (not channels_last or (self.stack.has_convolutions and not self._channels_last)) and (not each or self.automatic_optimization)
        ]
        self._timings: dict[str, list[float]] = {w: [] for w in self._ways}
        #: the ways cut short: clearly slower than one timed before
        self._cut: set[str] = set()
        self._way: str | None = None
        if not self.automatic_optimization:  # each member steps its own optimizers (see `hqde_lightning.manual_members`)
            self.stack.keep_member_parameters()
            self._manual_only(vectorize)
        elif self.per_member:
            self._loop_only(vectorize, sorted(self.hooks), list(member_callbacks))
        elif drawn := differing(self.stack.member_attributes):
            self._without_vmap(vectorize, f"the members' attributes {drawn} differ (drawn at random in your `__init__`, or kept from an earlier fit), and vmapped code runs once, with one member's")
        elif (why := vmap_miscomputes(module)) is not None:  # the forward pass is right: validation keeps vmap
            self._without_vmap(vectorize, why, validation=False)
        #: the step methods vmap has run once (a later failure is an error, not a reason to loop)
        self._vmapped: set[str] = set()
        self._step_started = 0.0
        #: the members' losses and the per-member batch size of the latest training step
        self.last_losses = torch.zeros(self.num_members)
        self.last_batch_size = 0
        #: per member, whether its latest training step returned a loss (under manual optimization it may return none)
        self.last_returned = torch.ones(self.num_members, dtype=torch.bool)
        #: the index of the member a hook, callback or looped step runs as now (``trainer.strategy.member_index``), else ``None``
        self.current_member: int | None = None
        #: that member's place in the group, else ``None``
        self.current_position: int | None = None
        #: each member's learning rates (set up with the optimizers)
        self.learning_rates: MemberLearningRates | None = None
        #: the parameter groups members added to the stacked optimizers since the last step (see :class:`MemberOptimizer`)
        self.added_param_groups = AddedParamGroups(self.num_members)
        #: the metrics a ``ReduceLROnPlateau`` follows (each member's own value, see :meth:`lr_scheduler_step`)
        self._monitored: set[str] = set()
        #: ``self.log``, at a fraction of its cost for the names a step logs again (the relay logs each value once per member)
        self._quick_log = QuickLog(self)
        #: per member, its entry of the checkpoint being resumed (for the checkpoint hooks; kept until the fit starts)
        self.loaded_entries: list[dict[str, Any]] | None = None
        #: the members that stop once the training batch that runs now has made its update, and once Lightning lets a fit stop
        self._stopping: set[int] = set()
        self._held: set[int] = set()
        #: per member, what your latest looped step returned (the ``outputs`` of batch-end hooks; kept when hooks run per member)
        self.last_outputs: list[Any] = [None] * self.num_members
        #: per member (its place in the group), whether it stopped early (see :meth:`freeze`)
        self.frozen = [False] * self.num_members
        #: the place of the member whose values your plain metric names show this epoch: the lowest one training at the
        #: epoch's start, as the member that writes checkpoints with member actors
        self.lead = 0
        #: per stopped member (its place in the group), the epoch it stopped in (its last trained epoch)
        self.frozen_at: dict[int, int] = {}
        self._frozen_values: dict[int, list[Tensor]] = {}
        self._frozen_states: dict[int, list[tuple[int, int, str, Tensor]]] = {}
        #: per stopped member, its optimizers' step counts when it stopped (shared by the stack), by (optimizer, parameter id, key)
        self.frozen_steps: dict[int, dict[tuple[int, int, str], Any]] = {}
        #: the slices, before this step's update, of parameters a member does not train while others do (see :meth:`_hold_slices`)
        self._held_slices: list[tuple[Tensor, int, Tensor, list[tuple[dict[str, Any], str, Tensor | None]]]] = []
        self._warned_held_steps = False
        self._warned_ragged = False
        self._warned_skip = False
        #: your module's submodules' training modes while the group evaluates (see :meth:`_follow_mode`)
        self._training_modes: dict[str, bool] | None = None
        #: under manual optimization, the place of the member whose ``training_step`` runs now (the hooks Lightning calls in it are its own)
        self.stepping: int | None = None
        #: whether looped steps back-propagate each member's loss as the member runs (``vectorize="auto"`` times it; see
        #: :meth:`_backward_as_members_run`), and whether this step did
        self._backward_each = False
        self._backpropagated = False

    @property
    def num_members(self) -> int:
        return self.stack.num_members

    def member_attributes(self, i: int) -> dict[str, Any]:
        """Member ``i``'s plain attributes (what its code stored on your module): its own, or your module's while vmapped code
        keeps them (:meth:`_attributes_for`)."""
        return plain_attributes(self.module) if self._attributes_shared else dict(self.stack.member_attributes[i])

    def _attributes_for(self, mode: str) -> None:
        """Puts the members' attributes where code run in ``mode`` reads and writes them: vmapped code runs once for every
        member, on your module's attributes (the first member's, when it switches from looped code); looped code runs as
        each member, on its own (shallow copies of your module's, when it switches from vmapped code). So an attribute your step
        counts or sets ends as each member's own fit leaves it, whichever ways ``vectorize="auto"`` timed."""
        own = self.stack.member_attributes
        if self.per_member or self._attributes_shared == (mode == "vmap"):  # (hooks per member: no vmap)
            return
        if mode == "vmap":
            vars(self.module).update(own[0])
        else:
            shared = plain_attributes(self.module)
            self.stack.member_attributes = [{name: copy.copy(value) for name, value in shared.items()} for _ in own]
        self._attributes_shared = mode == "vmap"

    def _attach(self) -> None:
        """Your module sees the group's trainer (``self.current_epoch``, ``self.trainer`` work inside your steps)."""
        self.module._trainer = self._trainer
        if self.module.training != self.training:
            self._follow_mode()
        if self.module.device != self.device:  # `self.device` inside your steps (the template moved with the stack)
            self.module.to(self.device)
        if self.module.dtype != self.dtype:  # `self.dtype` inside your steps: the precision's ("64-true": float64), as in a plain fit
            self.module.to(dtype=self.dtype)

    def _on_template(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """``method`` of your module, run once for the whole group on your module (your data hooks, ``configure_optimizers``,
        :data:`GROUP_HOOKS`, batch hooks on validation batches), attached to the trainer as in a plain fit; the attributes it
        sets become every member's, as each member's own fit would have set them (a list, dict or set as a copy per member).

        A value your ``setup`` computes (``self.class_weights = ...``), a count your ``optimizer_step`` keeps: before, the
        members kept the values they were built with.
        """

        def call(*args: Any, **kwargs: Any) -> Any:
            self._attach()
            before = plain_attributes(self.module)
            try:
                return method(*args, **kwargs)
            finally:
                changed = {n: v for n, v in plain_attributes(self.module).items() if n not in before or before[n] is not v}
                if changed and not self._attributes_shared:  # (shared: your module's attributes are the members')
                    for own in self.stack.member_attributes:
                        own.update({n: copy.copy(v) if isinstance(v, (list, dict, set)) else v for n, v in changed.items()})

        return call

    def _follow_mode(self) -> None:
        """Your module follows the group into eval mode (Lightning's evaluation loops switch the group) and back.

        As a plain fit leaves them, the modes your hooks gave submodules in training (a BatchNorm
        put in eval mode to keep its statistics) are kept: they are taken before evaluating and put
        back after it, as Lightning does for the module it fits.
        """
        if not self.training:
            self._training_modes = {name: module.training for name, module in self.module.named_modules()}
            self.module.eval()
            return
        modes = self._training_modes or {}
        for name, module in self.module.named_modules():
            module.training = modes.get(name, True)
        self._training_modes = None

    # ---------------------------------------------------------------- steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if not self.automatic_optimization:
            return self._manual_step(batch, batch_idx)
        self._backpropagated = False
        losses, logs = self._run("training_step", (batch, batch_idx), (0, None), self._training_mode())
        self.last_losses, self.last_batch_size = losses.detach().float(), group_batch_size(batch)
        self._relay(logs, self.last_batch_size)
        return losses.sum()

    def _manual_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        """Your ``training_step`` under manual optimization: each member that still trains runs it in turn, as itself
        (:mod:`~hqde_lightning.manual_members`), stepping its own optimizers. Every member starts from the batch's
        optimizer step count and counts its own steps (``self.global_step``); the count goes on from the last member's."""
        self._training_mode()  # `vectorize="auto"`: the looped way being timed, laid out for it
        self._attach()
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        start = progress.state_dict()  # a fresh dict of counts, which loading copies
        losses = torch.zeros(self.num_members)
        per_member: dict[int, CapturedLogs] = {}
        returned: list[int] = []  # the members whose step returned a loss (under manual optimization it may return none)
        for i in self._active():
            progress.load_state_dict(start)
            with self.running_as(i, True), self.stack.as_member(i) as member, self._member_metrics(i), capture_logs(member) as logs:
                self.stepping = i
                try:
                    out = member.training_step(member_batch(batch, i), batch_idx)
                finally:
                    self.stepping = None
            self.last_outputs[i] = _detached(out)
            loss = out.get("loss") if isinstance(out, Mapping) else out
            if isinstance(loss, Tensor):
                losses[i] = loss.detach().float()
                returned.append(i)
            per_member[i] = logs
        self.last_losses, self.last_batch_size = losses, group_batch_size(batch)
        self.last_returned = torch.zeros(self.num_members, dtype=torch.bool)
        self.last_returned[returned] = True
        self._relay(_by_name(per_member, self.num_members), self.last_batch_size)
        return losses[returned].sum() if returned else None

    def validation_step(self, batch: Any, batch_idx: int, *args: Any) -> None:
        mode = self.modes.get("validation_step", self.modes.get("training_step", "vmap"))
        _, logs = self._run("validation_step", (batch, batch_idx, *args), (None,) * (2 + len(args)), mode)
        self._relay(logs, extract_batch_size(batch))

    def _training_mode(self) -> str:
        """How this training step runs: as decided, or (``vectorize="auto"``) the way being timed, laid out for it.

        The ways are timed one after another, each for :data:`PROBE_STEPS_PER_WAY` steps, so that a
        way's counted steps run warm (kernels chosen and weights reordered for its layout).
        """
        if "training_step" in self.modes:
            return self.modes["training_step"]
        self._way = next(w for w in self._ways if not self._timed(w))
        return self._lay_out(self._way)

    def _lay_out(self, way: str) -> str:
        """Lays the group out for ``way`` (:data:`WAYS`: its weights' layout, its backward pass); returns how its step runs."""
        mode, channels_last, self._backward_each = WAYS[way]
        self.stack.set_channels_last(channels_last or self._channels_last, self.trainer.optimizers)
        return mode

    def _run(self, method: str, args: tuple[Any, ...], in_dims: tuple[Any, ...], mode: str) -> tuple[Tensor, list[tuple[str, dict[str, Any], Any]]]:
        """Runs ``method`` for every member; returns the stacked losses and per log name (name, kwargs, per-member values).

        A batch whose tensors differ in shape between the members (:func:`~hqde_lightning.member_data.ragged`) cannot be
        vmapped: that step runs member by member, and the way chosen for the others stays.
        """
        self._attach()
        if mode == "vmap" and any(ragged(a) for a, d in zip(args, in_dims) if d == 0):
            if not self._warned_ragged:
                rank_zero_info(
                    f"HQDEStrategy: at step {self.trainer.global_step} the members' batches differ in shape (sequences padded to each"
                    " batch's longest?): such steps run member by member, the others with torch.func.vmap."
                )
                self._warned_ragged = True
            mode = "loop"
        self._attributes_for(mode)
        if mode == "vmap":
            # until vmap has run a method once, a failure falls back to the loop: the buffers are kept to undo it
            saved = None if method in self._vmapped else [b.clone() for b in self.stack.buffers()]
            try:
                out, logs = self.stack.vmap_call(method, args, in_dims)
                self._vmapped.add(method)
                if method != "training_step":  # the training step's mode is set by `vectorize` or the timing
                    self.modes.setdefault(method, "vmap")
                return out, [(n, k, list(v)) for n, k, v in zip(logs.names, logs.kwargs, logs.values)]
            except UnloggableValue:
                raise
            except Exception as err:  # code vmap cannot batch: the loop runs it
                if saved is None:
                    raise
                with torch.no_grad():  # undo what the failed attempt changed (BatchNorm statistics)
                    for buffer, value in zip(self.stack.buffers(), saved):
                        buffer.copy_(value)
                warn = rank_zero_warn if self.vectorize is True else rank_zero_info
                warn(f"HQDEStrategy: `{type(self.module).__name__}.{method}` runs member by member: torch.func.vmap cannot run it ({type(err).__name__}: {err}).")
                if method == "training_step":
                    self._no_vmap()
                else:
                    self.modes[method] = "loop"
                self._attributes_for("loop")
        return self._loop(method, args, in_dims)

    def _loop_only(self, vectorize: Vectorize, hooks: list[str], callbacks: list[str]) -> None:
        """Steps run member by member, as ``hooks`` of your module and ``callbacks`` that run per member need."""
        what = " and ".join(f"the {kind} {names}" for kind, names in (("hooks", hooks), ("callbacks", callbacks)) if names)
        self._without_vmap(vectorize, f"{what} run once per member, each member with its own attributes, which torch.func.vmap cannot keep apart")

    def _without_vmap(self, vectorize: Vectorize, why: str, validation: bool = True) -> None:
        """The training steps (and the validation steps, with ``validation``) run member by member, for the reason ``why``."""
        if validation:
            self.modes["validation_step"] = "loop"
        self._drop_vmap()
        steps = "steps" if validation else "training steps"
        if vectorize is True:
            rank_zero_warn(f"HQDEStrategy: `vectorize=True` is ignored: {why}; the {steps} run member by member.")
            self.modes["training_step"] = "loop"
        elif vectorize == "auto":
            rank_zero_info(f"HQDEStrategy: `{type(self.module).__name__}`'s {steps} run member by member: {why}.")
            if len(self._ways) < 2:
                self.modes["training_step"] = "loop"

    def _manual_only(self, vectorize: Vectorize) -> None:
        """Under manual optimization the members run your steps in turn, each stepping its own optimizers: ``vectorize="auto"``
        times only the looped ways (for convolutions, also with the weights laid out channels-last)."""
        self.modes["validation_step"] = "loop"
        self._drop_vmap()
        if vectorize == "auto" and len(self._ways) > 1:
            self.modes.pop("training_step", None)
        else:
            self.modes["training_step"] = "loop"
        why = "the module uses manual optimization: each member runs your `training_step` in turn, stepping optimizers of its own"
        if vectorize is True:
            rank_zero_warn(f"HQDEStrategy: `vectorize=True` is ignored: {why}.")
        else:
            rank_zero_info(f"HQDEStrategy: {why}.")

    def _no_vmap(self) -> None:
        """The training step failed under vmap: it runs looped (``vectorize="auto"`` times the other ways, if several)."""
        self.modes["validation_step"] = "loop"
        self._way = None  # this step's time includes the failed attempt
        self._drop_vmap()
        if self.vectorize is not True and len(self._ways) > 1:
            return
        self.modes["training_step"] = "loop"
        if self._ways:
            self._lay_out(self._ways[0])

    def _drop_vmap(self) -> None:
        """``vectorize="auto"`` no longer times the vmap way."""
        if "vmap" in self._ways:
            self._ways.remove("vmap")
            del self._timings["vmap"]
            self._cut.discard("vmap")

    def _timed(self, way: str) -> bool:
        return way in self._cut or len(self._timings[way]) >= PROBE_STEPS_PER_WAY

    def _seconds(self, way: str) -> float:
        """A timed way's mean step; the first step pays one-off costs (allocations, kernel choice) and counts only if alone."""
        timings = self._timings[way]
        return sum(timings[1:]) / (len(timings) - 1) if len(timings) > 1 else timings[0]

    def _cut_if_slower(self, way: str) -> None:
        """Stops timing ``way`` once it is clearly slower than the best way timed before it."""
        if self._timed(way):
            return
        before = [self._seconds(w) for w in self._ways if w != way and self._timed(w)]
        if not before:
            return
        timings, best = self._timings[way], min(before)
        if timings[-1] > (FIRST_STEP_CUT if len(timings) == 1 else CUT_RATIO) * best:
            self._cut.add(way)

    def _loop(self, method: str, args: tuple[Any, ...], in_dims: tuple[Any, ...]) -> tuple[Tensor, list[tuple[str, dict[str, Any], Any]]]:
        outs: list[Any] = []
        per_member: list[CapturedLogs] = []
        backward = self._backward_as_members_run(args[1]) if method == "training_step" and self._backward_each else None
        for i in range(self.num_members):
            member_args = tuple(member_batch(a, i) if d == 0 else a for a, d in zip(args, in_dims))
            with self.running_as(i, method in _WITHIN_BATCH):
                out, logs = self.stack.call(i, method, member_args)
            if self.per_member:  # the `outputs` of the members' batch-end hooks
                self.last_outputs[i] = _detached(out)
            loss = loss_of(out, required=method == "training_step" and self.automatic_optimization)
            if backward is not None and isinstance(loss, Tensor) and loss.requires_grad:
                backward(loss)
                loss = loss.detach()
            outs.append(loss if isinstance(loss, Tensor) else torch.zeros((), device=self.device))
            per_member.append(logs)
        first = per_member[0]
        relayed = [(name, kwargs, [m.values[j] for m in per_member]) for j, (name, kwargs) in enumerate(zip(first.names, first.kwargs))]
        return torch.stack(outs), relayed

    def _backward_as_members_run(self, batch_idx: int) -> Callable[[Tensor], None] | None:
        """For a looped training step of a way that does it (:data:`WAYS`): the backward pass of each member's loss, run as
        soon as the member's step returns, or ``None`` when Lightning's one backward over the sum of the losses runs.

        The gradients are the same (no member's loss reaches another's parameters), but each member's graph is
        back-propagated while its activations are still in the processor's caches and freed before the next member's
        forward pass: a group of small CNNs steps about a fifth faster on a CPU, and holds one member's activations at
        a time; for a small MLP the k backward calls cost more than they save, hence the timing. It is done where
        nothing can tell (``vectorize="auto"`` times it only then): no hook of yours or of a callback runs between the
        step and the backward pass (``on_before_zero_grad``, ``on_before_backward``, ``on_after_backward``, your
        ``backward`` or ``optimizer_zero_grad``), the precision plugin does nothing to the loss (no gradient scaler: a
        group never has one), the strategy adds nothing around it, and Lightning back-propagates this step (there is an
        optimizer, and it is not ``StochasticWeightAveraging``'s batch-norm epoch). As Lightning, it zeroes the
        gradients first on the first batch of an accumulation and divides each loss by ``accumulate_grad_batches``; the
        backward pass Lightning then calls is skipped (:meth:`backward`).
        """
        trainer = self.trainer
        if not (trainer.optimizers and torch.is_grad_enabled()) or trainer.fit_loop._skip_backward:
            return None
        if batch_idx % trainer.accumulate_grad_batches == 0:  # what Lightning's `optimizer_zero_grad` does before its backward
            trainer.optimizers[0].zero_grad()
        normalize = trainer.accumulate_grad_batches

        def backward(loss: Tensor) -> None:
            with torch.autocast(loss.device.type, enabled=False):
                (loss / normalize).backward()

        self._backpropagated = True
        return backward

    def _relay(self, logs: list[tuple[str, dict[str, Any], Any]], batch_size: int) -> None:
        """Logs each training member's value as ``member_{i}/<name>``, and the lead member's (:attr:`lead`) also as ``<name>`` (not sent to loggers).

        Values go through :class:`~hqde_lightning.quick_log.QuickLog`: after a name's first ``self.log``
        in a loop, each member's value updates its Lightning result directly (a few tensor operations,
        not the ~0.5 ms of checks of a ``self.log`` call). Per-step-only training
        values are still logged only at the steps Lightning writes to the loggers and at each epoch's
        last batch (their ``member_{i}/...`` entries in ``trainer.callback_metrics`` are then as of
        the latest such step; after a fit, of its last step, as a plain fit's are), and the plain
        name only for values reduced over the epoch (what checkpoint and learning-rate callbacks
        monitor) or shown in the progress bar. Stopped members log nothing
        more under their own names; the plain name is the value of the lowest member training at the epoch's start
        (:attr:`lead`: the member that writes checkpoints with member actors), so that a checkpoint callback that
        monitors it follows that member once member 0 stopped.
        """
        # a value logged per step only (Lightning's default in `training_step`) reaches the loggers
        # every `log_every_n_steps` steps: the members' values are logged at those steps, and at
        # each epoch's last batch so that they are in `trainer.callback_metrics` when the epoch ends
        writing = not self.training or self.trainer._logger_connector.should_update_logs or self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        for name, kwargs, values in logs:
            options = {"batch_size": batch_size, **kwargs}
            epoch_level = options.get("on_epoch", not self.training)
            # a value a `ReduceLROnPlateau` follows is every member's own at every step
            if writing or epoch_level or not options.get("on_step", self.training) or name in self._monitored or f"{name}_step" in self._monitored:
                for i, member in enumerate(self.member_ids):
                    if not self.frozen[i] and values[i] is not None:  # (a member under manual optimization may not log a name)
                        self._quick_log(f"member_{member}/{name}", values[i], {**options, "prog_bar": False})
            if epoch_level or options.get("prog_bar", False):
                value = values[self.lead] if values[self.lead] is not None else next(v for v in values if v is not None)
                self._quick_log(name, value, {**options, "logger": False})

    # -------------------------------------------------------- per-member hooks
    def each_member(self, hook: str, call: Callable[[LightningModule, tuple[Any, ...]], Any], args: tuple[Any, ...] = (), positions: Sequence[int] | None = None) -> list[Any]:
        """Runs ``call(member, member_args)`` as each member in ``positions`` (default: all) for ``hook``; returns the results.

        ``member`` is your module as that member (:meth:`~hqde_lightning.stacking.StackedMembers.as_member`),
        ``member_args`` the hook's ``args`` as the member's own fit would pass them (its batch, its step's
        outputs, its loss), ``trainer.callback_metrics`` show the member's ``member_{i}/<name>`` values under the
        plain names, and what it logs is logged as ``member_{i}/<name>`` (the lead member's also as
        ``<name>``, not sent to loggers, for callbacks that monitor it). Members that stopped early are
        skipped, except for the hooks that end a fit. Setting ``trainer.should_stop`` stops the member
        only (:meth:`stop_member`).
        """
        self._attach()
        positions = range(self.num_members) if positions is None else positions
        if self.stepping is not None:  # Lightning calls it inside a member's own manual step: only that member's, as it runs
            return [call(self.module, args)] if self.stepping in positions else []
        positions = [i for i in positions if not self.frozen[i] or hook in _END_HOOKS]
        results, per_member, stopped = [], [], [self.frozen[i] for i in positions]
        for i in positions:
            with self.running_as(i, hook in _WITHIN_BATCH), self.stack.as_member(i, hook in BATCH_HOOKS) as member, self._member_metrics(i), capture_logs(member) as logs:
                results.append(call(member, self._member_args(hook, i, args, member)))
            per_member.append(logs)
        if self.stack.requires_grad_changed:  # a member froze or unfroze parameters (`requires_grad`)
            self.stack.settle_requires_grad(self._active())
        batch_size = _hook_batch_size(hook, args)
        for i, logs, was_stopped in zip(positions, per_member, stopped):  # a member that stops in this hook still logs what it logged
            for name, kwargs, value in zip(logs.names, logs.kwargs, logs.values):
                options = kwargs if batch_size is None else {"batch_size": batch_size, **kwargs}
                if not was_stopped:
                    self._quick_log(f"member_{self.member_ids[i]}/{name}", value, {**options, "prog_bar": False})
                if i == self.lead:
                    self._quick_log(name, value, {**options, "logger": False})
        return results

    def _member_args(self, hook: str, i: int, args: tuple[Any, ...], member: LightningModule) -> tuple[Any, ...]:
        """A hook's arguments as member ``i``'s own fit passes them (``member``: your module as member ``i``)."""
        if hook == "on_train_batch_start" or hook in BATCH_HOOKS:
            return (member_batch(args[0], i), *args[1:])
        if hook == "on_train_batch_end":
            outputs = self.last_outputs[i]
            return ({"loss": outputs} if isinstance(outputs, Tensor) else outputs, member_batch(args[1], i), *args[2:])
        if hook == "on_validation_batch_end":
            return (self.last_outputs[i], *args[1:])
        if hook == "on_before_backward":
            return (self.last_losses[i],)
        if hook in ("on_before_optimizer_step", "on_before_zero_grad"):
            return (self.member_optimizer(args[0], member),)
        return args

    def member_optimizer(self, optimizer: torch.optim.Optimizer, member: LightningModule) -> MemberOptimizer:
        """``optimizer`` (over the stacked parameters) as ``member`` (your module as the member running now) sees it."""
        assert self.learning_rates is not None and self.current_position is not None
        optimizer = getattr(optimizer, "optimizer", optimizer)
        index = next(n for n, opt in enumerate(self.learning_rates.optimizers) if opt is optimizer)
        views = dict(member.named_parameters())
        pairs = [(p, views[name]) for name, p in zip(self.stack.param_names, self.stack.params)]
        return MemberOptimizer(optimizer, index, self.current_position, pairs, self.added_param_groups)

    @contextmanager
    def member_optimizers(self, member: LightningModule) -> Iterator[None]:
        """``trainer.optimizers`` are the stacked optimizers as ``member`` (your module as the member running now) sees them
        (:class:`MemberOptimizer`) during the block, for a callback that changes them (``BaseFinetuning``). Under manual
        optimization they are already the member's own (:class:`~hqde_lightning.manual_members.MemberOptimizers`)."""
        if not self.automatic_optimization:
            yield
            return
        strategy = self.trainer.strategy
        stacked = strategy._optimizers
        strategy._optimizers = [self.member_optimizer(opt, member) for opt in stacked]
        try:
            yield
        finally:
            strategy._optimizers = stacked

    @contextmanager
    def running_as(self, i: int, within_batch: bool = False) -> Iterator[None]:
        """Code runs as member ``i`` (its place in the group) during the block.

        Its index is :attr:`current_member` (``trainer.strategy.member_index``), the optimizers show
        and take its learning rates (:class:`~hqde_lightning.member_lr.MemberLearningRates`), and
        setting ``trainer.should_stop`` stops this member only (:meth:`stop_member`; ``within_batch``:
        the code runs inside a training batch, whose update the member still makes).
        """
        self.current_member, self.current_position = self.member_ids[i], i
        trainer = self._trainer
        stopping = trainer is not None and trainer.should_stop
        rates = self.learning_rates.as_member(i) if self.learning_rates is not None else nullcontext()
        try:
            with rates:
                yield
        finally:
            self.current_member = self.current_position = None
            if trainer is not None:
                self.stop_member(i, stopping, within_batch)

    def stop_member(self, position: int, stopping: bool, within_batch: bool = False) -> None:
        """Code running as member ``position`` set ``trainer.should_stop`` (it was ``stopping`` before): that member stops.

        The fit stops once every member has. A member that asks inside a training batch (in its
        step, or a batch-start, backward or optimizer hook) stops after the batch's update, as its
        own fit would. It is frozen only when the group would train again (:meth:`release_stops`):
        until then it runs what its own fit runs before it ends (the hooks and callbacks left at
        that point, the epoch's end and its sync when the stop comes there, and, when every member
        stops, the validation Lightning runs before stopping).
        """
        trainer = self.trainer
        if not trainer.should_stop or stopping:
            return
        (self._stopping if within_batch else self._held).add(position)
        trainer.should_stop = all(self.frozen[j] or j in self._stopping or j in self._held for j in range(self.num_members))

    def release_stops(self, last_epoch: int) -> None:
        """The members that asked to stop stop now, before the group trains again (at a training batch's or epoch's start),
        if Lightning lets a fit stop (``min_epochs``, ``min_steps`` met); until then they train on, as in their own fits.
        ``last_epoch`` is the last epoch they trained (:attr:`frozen_at`)."""
        if self._held and self.trainer.fit_loop._can_stop_early:
            for position in sorted(self._held):
                self.freeze(position, last_epoch)
            self._held.clear()

    @contextmanager
    def _member_metrics(self, i: int) -> Iterator[None]:
        """``trainer.callback_metrics`` (and the logged and progress-bar metrics) as member ``i`` sees them during the block."""
        trainer = self._trainer
        if trainer is None:
            yield
            return
        connector = trainer._logger_connector
        trainer._logger_connector = _MemberMetrics(connector, f"member_{self.member_ids[i]}/")
        try:
            yield
        finally:
            trainer._logger_connector = connector

    def _call_batch_hook(self, hook_name: str, *args: Any) -> Any:
        """Lightning's call of a batch hook: :data:`BATCH_HOOKS` are your datamodule's if it overrides them, else your
        module's (Lightning's choice), and run on each training member's own batch, as that member, stacked again; on a
        validation batch, which the members share, once."""
        trainer = self._trainer
        owner = self._batch_hook_owner(hook_name) if hook_name in BATCH_HOOKS else None
        if owner is None or trainer is None:
            return super()._call_batch_hook(hook_name, *args)  # Lightning's own: the batch as it is, or all of it moved at once
        hook, batch = getattr(owner, hook_name), args[0]
        self._attach()
        if not trainer.training:
            return self._on_template(hook)(*args) if owner is self.module else hook(*args)
        active = self._active()
        changed = dict(zip(active, self.each_member(hook_name, lambda _, member_args: hook(*member_args), args, active)))

        def unchanged(i: int) -> Any:  # a stopped member's batch, still moved to where the stack is
            own = member_batch(batch, i)
            return move_data_to_device(own, args[1]) if hook_name == "transfer_batch_to_device" else own

        return stack_batches([changed[i] if i in changed else unchanged(i) for i in range(self.num_members)])

    def _batch_hook_owner(self, hook_name: str) -> LightningModule | LightningDataModule | None:
        """Your module or datamodule, whichever Lightning calls ``hook_name`` (one of :data:`BATCH_HOOKS`) of, if it overrides it."""
        if self._trainer is None:
            return None
        owner = self._trainer._data_connector._datahook_selector.get_instance(hook_name)
        owner = self.module if owner is self else owner
        return owner if is_overridden(hook_name, owner, LightningModule if owner is self.module else LightningDataModule) else None

    @property
    def changes_batches(self) -> bool:
        """Whether your module or datamodule overrides one of :data:`BATCH_HOOKS` (they see each batch before it is on the device)."""
        return any(self._batch_hook_owner(hook) is not None for hook in BATCH_HOOKS)

    def _hook(self, hook: str, *args: Any) -> list[Any]:
        """Your module's ``hook`` once per member, when you override it (the group's :data:`MEMBER_HOOKS` call this)."""
        if hook not in self.hooks:
            return []
        return self.each_member(hook, lambda member, member_args: getattr(member, hook)(*member_args), args)

    # ---------------------------------------------------------- early stops
    def freeze(self, position: int, last_epoch: int | None = None) -> None:
        """Member ``position`` (its place in the group) stops training: its weights, buffers and optimizer state stay as they are now.

        ``last_epoch`` is the last epoch it trained (default: the current one).
        """
        if self.frozen[position]:
            return
        self.frozen[position] = True
        current = self.trainer.current_epoch if self._trainer is not None else 0
        self.frozen_at[position] = max(current if last_epoch is None else last_epoch, 0)
        self.keep_frozen_as_now(position)
        # its optimizer state as of its last update: its slices are put back after each step, its step counts go into checkpoints
        self._frozen_states[position], self.frozen_steps[position] = [], {}
        stacked = self._trainer is not None and self.automatic_optimization  # under manual optimization a stopped member's optimizers are left alone
        for n, optimizer in enumerate(self.trainer.optimizers if stacked else []):
            for pid, p in enumerate(_params(optimizer)):
                for key, value in optimizer.state.get(p, {}).items():
                    if key in _SHARED_STATE:
                        self.frozen_steps[position][(n, pid, key)] = value.clone() if isinstance(value, Tensor) else value
                    elif _sliced(key, value, p.shape):
                        self._frozen_states[position].append((n, pid, key, value[position].detach().clone()))
        if self._active():  # a parameter only this member trained no longer needs a gradient
            self.stack.settle_requires_grad(self._active())

    def _forget_plain_names(self) -> None:
        """The lead member changed: the results your plain names were logged into are dropped, so that the new lead's
        values (another member's metric objects) register afresh. Lightning refuses a name logged with other options
        (another metric object) into the same result; it starts each epoch's values anew anyway."""
        loop = self.trainer.fit_loop.epoch_loop
        for results in (loop._results, loop.val_loop._results):
            for key in [k for k, result in results.items() if not getattr(getattr(result, "meta", None), "name", "member_").startswith("member_")]:
                del results[key]

    def keep_frozen_as_now(self, position: int) -> None:
        """Stopped member ``position``'s weights and buffers as they are now are what it keeps (its last sync round, in the
        epoch it stopped in, changed them: its own fit syncs at that epoch's end too)."""
        self._frozen_values[position] = [t[position].detach().clone() for t in (*self.stack.params, *self.stack.buffers())]

    def _active(self) -> list[int]:
        """The places of the members that still train (have not stopped early)."""
        return [i for i in range(self.num_members) if not self.frozen[i]]

    def _hold_slices(self) -> None:
        """Just before a step: the slices of parameters a member froze (``requires_grad=False`` in its hooks) while
        others still train them lose their gradient, and what the step does to them and their optimizer state is
        undone at the batch end (:meth:`_restore_frozen`), as the member's own fit leaves a frozen parameter.

        A step count the stack shares (Adam's ``step``) still counts for such a member; warned once.
        """
        self._held_slices = []
        held = self.stack.held_slices(self._active())
        if not held:
            return
        optimizers = self.trainer.optimizers
        with torch.no_grad():
            for j, members in held:
                param = self.stack.params[j]
                states = [optimizer.state.setdefault(param, {}) for optimizer in optimizers if any(param is p for p in _params(optimizer))]
                shared = any(key in _SHARED_STATE for state in states for key in state)
                for i in members:
                    if param.grad is not None:
                        param.grad[i].zero_()
                    saved = [(state, key, value[i].clone()) for state in states for key, value in state.items() if _sliced(key, value, param.shape)]
                    self._held_slices.append((param, i, param[i].clone(), saved + [(state, "", None) for state in states]))
                if shared and not self._warned_held_steps:
                    self._warned_held_steps = True
                    rank_zero_warn(
                        f"HQDEStrategy: members {[self.member_ids[i] for i in members]} froze `{self.stack.param_names[j]}` while others"
                        " still train it: their weights and optimizer state stay as their own fits leave them, but the optimizer's"
                        " step count (Adam's bias correction) is shared by the stack and keeps counting for them."
                    )

    def _restore_frozen(self) -> None:
        """Puts the stopped members' weights, buffers and optimizer state back after a step moved them (they run in the stack all the same),
        and the slices held for this step (:meth:`_hold_slices`)."""
        with torch.no_grad():
            for param, i, value, saved in self._held_slices:
                param[i].copy_(value)
                kept = {(id(state), key) for state, key, _ in saved}
                for state, key, before in saved:
                    if before is not None:
                        state[key][i].copy_(before)
                for state in {id(state): state for state, _, _ in saved}.values():  # state the step created: as if it never ran
                    for key, now in state.items():
                        if (id(state), key) not in kept and _sliced(key, now, param.shape):
                            now[i].zero_()
            self._held_slices = []
            for position, values in self._frozen_values.items():
                for tensor, value in zip((*self.stack.params, *self.stack.buffers()), values):
                    tensor[position].copy_(value)
            if self._frozen_states:
                optimizers = self.trainer.optimizers
                params = [_params(optimizer) for optimizer in optimizers]
                for position, entries in self._frozen_states.items():
                    for n, pid, key, value in entries:
                        optimizers[n].state[params[n][pid]][key][position].copy_(value)

    # ---------------------------------------------------------- checkpoints
    def save_member_checkpoint(self, entry: dict[str, Any], position: int) -> None:
        """Your module's ``on_save_checkpoint``, as the member at ``position``, on its own ``entry`` of a whole-ensemble checkpoint."""
        if "on_save_checkpoint" in self.hooks:
            self.each_member("on_save_checkpoint", lambda member, _: member.on_save_checkpoint(entry), positions=[position])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Your module's ``on_load_checkpoint`` as each member, on the member's own entry, before its weights are loaded."""
        if "on_load_checkpoint" in self.hooks:
            entries = self.loaded_entries or [checkpoint] * self.num_members
            for i, entry in enumerate(entries):
                self.each_member("on_load_checkpoint", lambda member, _, entry=entry: member.on_load_checkpoint(entry), positions=[i])

    # ------------------------------------------- fit hooks, and vectorize="auto"
    def on_fit_start(self) -> None:
        self.loaded_entries = None  # every checkpoint hook has seen its entry
        if self.device.type != "cuda":  # on a CPU vmap last: often the slowest there, it is then cut short
            self._ways.sort(key=lambda way: way == "vmap")
        if "training_step" not in self.modes and not _nothing_between_step_and_backward(self, self.trainer):
            self._ways = [w for w in self._ways if not WAYS[w][2]]  # Lightning's one backward pass runs
            self._timings = {w: self._timings[w] for w in self._ways}
            if len(self._ways) == 1:  # nothing left to choose from
                self.modes["training_step"] = self._lay_out(self._ways[0])
        if self._named_way is not None:
            self._lay_out_named_way(self._named_way)
        self._hook("on_fit_start")

    def _lay_out_named_way(self, way: str) -> None:
        """Lays the group out for the looped ``way`` you named in ``vectorize``; its backward pass per member only where a
        looped way may have one (automatic optimization, nothing between a step and its backward pass)."""
        self._lay_out(way)
        if not self._backward_each or not self.automatic_optimization:  # under manual optimization each member's own step back-propagates
            self._backward_each = False
            return
        if not _nothing_between_step_and_backward(self, self.trainer):
            self._backward_each = False
            rank_zero_warn(
                f"HQDEStrategy: `vectorize={way!r}`: Lightning's one backward pass over the group's losses runs instead of one per"
                " member, because something runs between a step and its backward pass (a hook of your module or of a callback:"
                " `on_before_zero_grad`, `on_before_backward`, `on_after_backward`, your `backward` or `optimizer_zero_grad`; a"
                " gradient scaler; a precision plugin or strategy of its own), and it must see every member's gradients."
            )

    def on_train_epoch_start(self) -> None:
        lead = next((i for i in range(self.num_members) if not self.frozen[i]), self.lead)
        if lead != self.lead:
            self.lead = lead
            self._forget_plain_names()
        self._hook("on_train_epoch_start")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        skips = self._hook("on_train_batch_start", batch, batch_idx)
        self._step_started = self._probe_clock()
        # a hook that returns -1 skips the rest of the epoch: in a group, once every member's does
        if any(skip == -1 for skip in skips) and not all(skip == -1 for skip in skips) and not self._warned_skip:
            self._warned_skip = True
            rank_zero_warn(
                f"HQDEStrategy: `{type(self.module).__name__}.on_train_batch_start` returned -1 (skip the rest of the epoch) for some"
                " members only: a group skips the rest of an epoch when every member's hook does, so those members go on training"
                " this epoch, unlike in their own fits. To stop a member for good, set `self.trainer.should_stop = True` in its hook."
            )
        return -1 if skips and all(skip == -1 for skip in skips) else None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._restore_frozen()
        self._held |= self._stopping
        self._stopping.clear()
        self._hook("on_train_batch_end", outputs, batch, batch_idx)
        if "training_step" in self.modes:
            return
        if self._way is not None:  # `None`: the step fell back from vmap (its time includes the failed attempt)
            self._timings[self._way].append(self._probe_clock() - self._step_started)
            self._cut_if_slower(self._way)
        if not all(self._timed(w) for w in self._ways):
            return
        seconds = {w: self._seconds(w) for w in self._ways}
        best = min(self._ways, key=seconds.__getitem__)
        mode = self.modes["training_step"] = self._lay_out(best)
        self.modes["validation_step"] = "loop" if mode == "loop" else self.modes.get("validation_step", mode)
        timed = ", ".join(
            f"{seconds[w] * 1e3:.1f} ms/step {'with torch.func.vmap' if w == 'vmap' else w}" + (f" (cut after {len(self._timings[w])} steps)" if w in self._cut else "")
            for w in self._ways
        )
        rank_zero_info(
            f"HQDEStrategy: vectorize='auto' timed {self.num_members} members: {timed}; training the {best} way"
            f" (`vectorize={best!r}` trains it without timing the others)."
        )

    def _probe_clock(self) -> float:
        """The time, for ``vectorize="auto"``'s step timings: on a GPU once the kernels queued so far have run."""
        if "training_step" not in self.modes and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ------------------------------------------------------------ optimizers
    def configure_optimizers(self) -> Any:
        """Your ``configure_optimizers`` over the stacked parameters; only element-wise optimizers are accepted.

        Every learning-rate scheduler becomes one copy per member (:class:`~hqde_lightning.member_lr.MemberSchedulers`),
        as do the schedulers it keeps in attributes of your module when hooks run per member: each
        member's learning rates follow its own metric and its own hooks' calls.
        """
        self._attach()
        unstacked = self.stack.unstacked()
        if unstacked:
            raise GroupUnsupported(
                f"your module gained {unstacked[:5]} after its members were stacked (layers your `setup` or another hook creates),"
                " which every member of a group would share; a group stacks the layers your `__init__` creates"
            )
        if not self.automatic_optimization:
            return self._configure_manual()
        before = dict(vars(self.module))
        with self.stack.swapped_parameters():
            config = self._on_template(self.module.configure_optimizers)()
        optimizers, schedulers, monitor = _configure_optimizers(config)
        for optimizer in optimizers:
            if type(optimizer) not in ELEMENTWISE_OPTIMIZERS:
                raise GroupUnsupported(
                    f"the optimizer {type(optimizer).__name__} is not element-wise (one step over the stacked members would mix"
                    f" them); members are stacked only with {[o.__name__ for o in ELEMENTWISE_OPTIMIZERS]}"
                )
        configs = _configure_schedulers_automatic_opt(schedulers, monitor)
        self._monitored = {c.monitor for c in configs if c.reduce_on_plateau}
        if self._monitored and any(isinstance(cb, StochasticWeightAveraging) for cb in self.trainer.callbacks):
            raise GroupUnsupported("StochasticWeightAveraging anneals each member from its own learning rate, which a `ReduceLROnPlateau` sets per member")
        self.learning_rates = MemberLearningRates(optimizers, self.num_members)
        kept = {n: v for n, v in vars(self.module).items() if before.get(n) is not v and _schedules(v, optimizers)} if self.per_member else {}
        plateaus = self._monitored or any(isinstance(v, torch.optim.lr_scheduler.ReduceLROnPlateau) for v in kept.values())
        if "optimizer_step" in self.group_hooks and plateaus:
            raise GroupUnsupported(
                "your `optimizer_step` runs once for a group, and a `ReduceLROnPlateau` gives each member its own learning rates,"
                " which that code would not see"
            )
        copies = {id(s): member_copies(s, optimizers, self.num_members) for s in [c.scheduler for c in configs] + list(kept.values())}
        for name, value in kept.items():
            for own, member_copy in zip(self.stack.member_attributes, copies[id(value)]):
                own[name] = member_copy
        current = lambda: self.current_position  # noqa: E731
        member_configs = [{**vars(c), "scheduler": MemberSchedulers(copies[id(c.scheduler)], current, c.monitor if c.reduce_on_plateau else None)} for c in configs]
        return (optimizers, member_configs) if member_configs else optimizers

    def _configure_manual(self) -> Any:
        """Under manual optimization: your ``configure_optimizers`` as each member, one set of optimizers and schedulers per
        member (:func:`~hqde_lightning.manual_members.configure_members`)."""

        def configure(i: int) -> Any:
            with self.running_as(i), self.stack.as_member(i) as member:
                return member.configure_optimizers()

        try:
            optimizers, schedulers = configure_members(configure, self.num_members, lambda: self.current_position)
        except ValueError as err:
            raise GroupUnsupported(str(err)) from None
        return (optimizers, schedulers) if schedulers else optimizers

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.stepping is not None:  # inside a member's own manual step: its hooks, its own optimizer
            self._hook("on_before_optimizer_step", optimizer)
            return
        self.added_param_groups.check(self._active(), self.member_ids)
        self._hook("on_before_optimizer_step", optimizer)
        self._hold_slices()
        if self.learning_rates is not None:  # the last code before the update: the members' rates as they are now
            self.learning_rates.prepare_step(optimizer)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Callable[[], Any] | None = None) -> None:
        """One step of the stacked optimizer, each member moving with its own learning rates (see :mod:`~hqde_lightning.member_lr`).

        Your own ``optimizer_step`` makes it, once for the group: the learning rates it sets, before
        or after ``optimizer.step(closure=optimizer_closure)``, are every member's.
        """
        self._group_hook("optimizer_step", epoch, batch_idx, optimizer, optimizer_closure)
        # stopped members back as they stopped at once: a checkpoint your callbacks write at this batch's end holds them so
        self._restore_frozen()
        if self.learning_rates is not None:
            self.learning_rates.finish_step()

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """Your ``optimizer_zero_grad``, once for the group (the stacked gradients are every member's), or Lightning's
        (done already when the step back-propagated each member's loss, see :meth:`_backward_as_members_run`)."""
        if not self._backpropagated:
            self._group_hook("optimizer_zero_grad", epoch, batch_idx, optimizer)

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Your ``backward`` on the sum of the members' losses, once for the group (each member's parameters get its own
        loss's gradient), or Lightning's; nothing when the step back-propagated each member's loss already."""
        if self._backpropagated:
            self._backpropagated = False
            return
        self._group_hook("backward", loss, *args, **kwargs)

    def _group_hook(self, hook: str, *args: Any, **kwargs: Any) -> None:
        """Your ``hook`` (one of :data:`GROUP_HOOKS`) once for the whole group when you override it, else Lightning's.

        Your module's parameters are the stacked ones while it runs, as in ``configure_optimizers``: what it does to them
        element-wise (``p.clamp_(-c, c)`` after the step) is done to every member's.
        """
        if hook not in self.group_hooks:
            getattr(super(), hook)(*args, **kwargs)
            return
        with self.stack.swapped_parameters():
            self._on_template(getattr(self.module, hook))(*args, **kwargs)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Steps each member's copy of ``scheduler`` as that member (with its own value of a monitored metric).

        A scheduler over the whole group (``StochasticWeightAveraging``'s) is stepped once.
        """
        yours = is_overridden("lr_scheduler_step", self.module, LightningModule)
        if not isinstance(scheduler, MemberSchedulers):
            (self.module if yours else super()).lr_scheduler_step(scheduler, metric)
            return
        for i in (i for i in range(self.num_members) if not self.frozen[i]):
            value = metric
            if scheduler.monitor is not None:
                value = self.trainer.callback_metrics.get(f"member_{self.member_ids[i]}/{scheduler.monitor}")
                if value is None:
                    rank_zero_warn(f"HQDEStrategy: member {self.member_ids[i]} logged no `{scheduler.monitor}`: its learning rate is not updated.")
                    continue
            if yours:
                self.each_member("lr_scheduler_step", lambda member, _, value=value: member.lr_scheduler_step(scheduler, value), positions=[i])
            else:
                with self.running_as(i):
                    super().lr_scheduler_step(scheduler, value)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None) -> None:
        """Clips each member's gradients on its own: by value element-wise, by norm over that member's slices.

        Your own ``configure_gradient_clipping`` runs as each member instead, with ``optimizer`` as that
        member sees it (:class:`MemberOptimizer`): its ``self.clip_gradients(optimizer, ...)`` clips
        that member's gradients, as in its own fit.
        """
        if "configure_gradient_clipping" in self.hooks:
            def clip(member: LightningModule, _: tuple[Any, ...]) -> None:
                member.configure_gradient_clipping(self.member_optimizer(optimizer, member), gradient_clip_val, gradient_clip_algorithm)

            self.each_member("configure_gradient_clipping", clip)
            return
        if not gradient_clip_val:
            return
        grads = [p.grad for p in _params(optimizer) if p.grad is not None]
        if not grads:
            return
        if gradient_clip_algorithm == "value":
            for grad in grads:
                grad.clamp_(-gradient_clip_val, gradient_clip_val)
            return
        norms = torch.stack([g.reshape(g.shape[0], -1).norm(2, dim=1) for g in grads]).norm(2, dim=0)
        scale = (gradient_clip_val / (norms + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(scale.reshape(-1, *([1] * (grad.dim() - 1))).to(grad.dtype))


#: the hooks Lightning calls between a training step and its backward pass (besides :data:`GROUP_HOOKS`)
_BETWEEN_STEP_AND_BACKWARD = ("on_before_zero_grad", "on_before_backward", "on_after_backward")


def _nothing_between_step_and_backward(group: MemberGroup, trainer: Any) -> bool:
    """Whether a looped step may back-propagate each member's loss itself (see :meth:`MemberGroup._backward_as_members_run`):
    nothing of yours, of a callback, of the precision plugin or of the strategy runs between the step and its backward pass."""
    from hqde_lightning.member_callbacks import runs_hook  # (it builds on this module)

    strategy, precision = trainer.strategy, trainer.precision_plugin
    hooked = {*group.hooks, *group.group_hooks} & {*_BETWEEN_STEP_AND_BACKWARD, "backward", "optimizer_zero_grad"}
    hooked |= {hook for callback in trainer.callbacks for hook in _BETWEEN_STEP_AND_BACKWARD if runs_hook(callback, hook)}
    plain_strategy = all(getattr(type(strategy), name) is getattr(Strategy, name) for name in ("pre_backward", "backward", "post_backward"))
    plain_precision = type(precision).pre_backward in (Precision.pre_backward, MixedPrecision.pre_backward) and all(
        getattr(type(precision), name) is getattr(Precision, name) for name in ("backward", "post_backward")
    )
    unscaled = getattr(precision, "scaler", None) is None
    return not hooked and plain_strategy and plain_precision and unscaled and not strategy.handles_gradient_accumulation


def _run_member_hook(hook: str) -> Callable[..., Any]:
    def run(self: MemberGroup, *args: Any) -> None:
        self._hook(hook, *args)

    run.__name__ = hook
    return run


# the hooks the group defines itself (batch hooks, stops, learning rates) call yours; the others are only yours
for _name in MEMBER_HOOKS:
    if _name not in vars(MemberGroup):
        setattr(MemberGroup, _name, _run_member_hook(_name))


class _MemberMetrics:
    """A trainer's logger connector as one member sees it: its ``<prefix><name>`` metrics under the plain names."""

    def __init__(self, connector: Any, prefix: str) -> None:
        self._connector = connector
        self._prefix = prefix

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connector, name)

    def _as_member(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        shared = {k: v for k, v in metrics.items() if not k.startswith("member_")}
        return {**shared, **{k[len(self._prefix):]: v for k, v in metrics.items() if k.startswith(self._prefix)}}

    @property
    def callback_metrics(self) -> dict[str, Any]:
        return self._as_member(self._connector.callback_metrics)

    @property
    def logged_metrics(self) -> dict[str, Any]:
        return self._as_member(self._connector.logged_metrics)

    @property
    def progress_bar_metrics(self) -> dict[str, Any]:
        return self._as_member(self._connector.progress_bar_metrics)


def _hook_batch_size(hook: str, args: tuple[Any, ...]) -> int | None:
    """The per-member batch size of a batch hook (what its ``self.log`` calls weigh epoch means by), else ``None``."""
    if hook == "on_train_batch_start":
        return group_batch_size(args[0])
    if hook == "on_train_batch_end":
        return group_batch_size(args[1])
    if hook == "on_validation_batch_start":
        return extract_batch_size(args[0])
    if hook == "on_validation_batch_end":
        return extract_batch_size(args[1])
    return None


def _by_name(per_member: Mapping[int, CapturedLogs], num_members: int) -> list[tuple[str, dict[str, Any], list[Any]]]:
    """What members (by place in the group) logged, per name: (name, its keyword arguments, each member's value or ``None``)."""
    names = dict.fromkeys(name for logs in per_member.values() for name in logs.names)
    relayed = []
    for name in names:
        values = [per_member[i].values[per_member[i].names.index(name)] if i in per_member and name in per_member[i].names else None for i in range(num_members)]
        kwargs = next(logs.kwargs[logs.names.index(name)] for logs in per_member.values() if name in logs.names)
        relayed.append((name, kwargs, values))
    return relayed


def _detached(out: Any) -> Any:
    """A step's output as hooks get it, its tensors detached."""
    if isinstance(out, Tensor):
        return out.detach()
    if isinstance(out, Mapping):
        return {k: v.detach() if isinstance(v, Tensor) else v for k, v in out.items()}
    return out


#: optimizer state entries shared by all members (step counts), never split or stacked
_SHARED_STATE = ("step", "mu_product")


def _sliced(key: str, value: Any, shape: torch.Size) -> bool:
    """Whether an optimizer state entry holds one slice per member: a tensor of ``shape`` (its parameter's), not a shared count."""
    return isinstance(value, Tensor) and key not in _SHARED_STATE and value.shape == shape


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The optimizer's parameters in the order of its ``state_dict`` ids."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def member_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], index: int) -> dict[str, Any]:
    """Member ``index``'s part of ``state`` (``optimizer.state_dict()`` over stacked parameters): a single member's optimizer state."""
    shapes = [p.shape for p in _params(optimizer)]
    per_param = {
        pid: {k: v[index].clone() if _sliced(k, v, shapes[pid]) else v for k, v in entry.items()}
        for pid, entry in state["state"].items()
    }
    return {"state": per_param, "param_groups": copy.deepcopy(state["param_groups"])}


def stacked_optimizer_state(optimizer: torch.optim.Optimizer, states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The state of ``optimizer`` (over stacked parameters) made of one single-member state per member."""
    shapes = [p.shape[1:] for p in _params(optimizer)]
    first = states[0]
    stacked = {}
    for pid, entry in first["state"].items():
        stacked[pid] = {
            k: torch.stack([s["state"][pid][k] for s in states]) if _sliced(k, v, shapes[pid]) else v
            for k, v in entry.items()
        }
    return {"state": stacked, "param_groups": copy.deepcopy(first["param_groups"])}


def _schedules(value: Any, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
    """Whether ``value`` is a learning-rate scheduler of one of ``optimizers`` (it has a ``step`` and steps one of them)."""
    return callable(getattr(value, "step", None)) and any(getattr(value, "optimizer", None) is opt for opt in optimizers)
