"""Each member's own learning rates in a member group, and its own learning-rate schedulers.

A group steps its members with one optimizer over the stacked parameters, whose parameter
groups hold one learning rate. Members that train alone can end up with different ones: a
``ReduceLROnPlateau`` follows each member's own metric, a scheduler your hooks step follows
each member's own calls. :class:`MemberLearningRates` keeps every member's learning rate per
parameter group, and :class:`MemberSchedulers` gives every member its own copy of each
scheduler, stepped with that member's learning rates and metric.

A step with different learning rates is still one step of the stacked optimizer: every
element-wise optimizer of a group (SGD with momentum, Adam, AdamW, RMSprop...) moves a weight by
its learning rate times an amount that does not depend on it (weight decay included), and
updates its state (moments, momentum buffers) without it. So the group steps with the largest of
the members' rates and scales each member's move by its own rate over that one: the members end
where each one's own optimizer takes it, to rounding. The rates are read as the update starts
(:meth:`MemberLearningRates.prepare_step`, after your step, backward and optimizer hooks, which
may set them), as a member's own optimizer reads them.

While code runs as one member (:meth:`MemberLearningRates.as_member`), the stacked optimizer's
parameter groups show and take that member's learning rates; at rest they show the group's
first member's (``LearningRateMonitor`` logs each member's, as
:class:`~hqde_lightning.member_callbacks.GroupLearningRateMonitor`). A learning rate written outside any member
(by a scheduler over the whole group, such as ``StochasticWeightAveraging``'s) is every member's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["MEMBER_STATES", "MemberLearningRates", "MemberSchedulers", "load_member_states", "member_copies", "member_states"]

#: the key of a :class:`MemberSchedulers` state that holds one scheduler state per member
MEMBER_STATES = "hqde_member_states"


def member_states(copies: Sequence[Any]) -> dict[str, Any]:
    """The state of one object per member (schedulers, optimizers): each one's ``state_dict()`` under :data:`MEMBER_STATES`."""
    return {MEMBER_STATES: [c.state_dict() for c in copies]}


def load_member_states(copies: Sequence[Any], state_dict: dict[str, Any]) -> None:
    """Each member's object from its own state in ``state_dict`` (see :func:`member_states`), or all of them from
    ``state_dict`` itself when it is a single object's state (from a plain checkpoint)."""
    states = state_dict.get(MEMBER_STATES, [state_dict] * len(copies))
    for c, state in zip(copies, states):
        c.load_state_dict(state)


def member_copies(value: Any, optimizers: Sequence[Optimizer], num_members: int) -> list[Any]:
    """``num_members`` deep copies of ``value`` (a scheduler) that still refer to the group's own ``optimizers``."""
    return [copy.deepcopy(value, {id(opt): opt for opt in optimizers}) for _ in range(num_members)]


class MemberLearningRates:
    """Every member's learning rate per parameter group of the group's ``optimizers`` (see the module docstring).

    Args:
        optimizers: the group's optimizers over the stacked parameters.
        num_members: the members in the group.
    """

    def __init__(self, optimizers: Sequence[Optimizer], num_members: int) -> None:
        self.optimizers = list(optimizers)
        self.num_members = num_members
        #: per optimizer, per parameter group, each member's learning rate
        self.rates: list[list[list[Any]]] = [[[g["lr"]] * num_members for g in opt.param_groups] for opt in self.optimizers]
        #: per optimizer, per parameter group, the learning rate the group last put there
        self._resting: list[list[Any]] = [[g["lr"] for g in opt.param_groups] for opt in self.optimizers]
        #: the parameters an update in progress moves with differing rates: each with its value before it and its members' scales
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []

    def _take_new_groups(self) -> None:
        """A parameter group added since (``add_param_group``, a fine-tuning callback's): its learning rate is every member's."""
        for j, opt in enumerate(self.optimizers):
            for group in opt.param_groups[len(self.rates[j]):]:
                self.rates[j].append([group["lr"]] * self.num_members)
                self._resting[j].append(group["lr"])

    def _take_group_writes(self) -> None:
        """A learning rate changed outside any member since the group last set it: it is every member's."""
        self._take_new_groups()
        for j, opt in enumerate(self.optimizers):
            for g, group in enumerate(opt.param_groups):
                if group["lr"] is not self._resting[j][g] and group["lr"] != self._resting[j][g]:
                    self.rates[j][g] = [group["lr"]] * self.num_members
                    self._resting[j][g] = group["lr"]

    def _rest(self) -> None:
        """The stacked optimizers show the first member's learning rates."""
        for j, opt in enumerate(self.optimizers):
            for g, group in enumerate(opt.param_groups):
                group["lr"] = self._resting[j][g] = self.rates[j][g][0]

    @contextmanager
    def as_member(self, index: int) -> Iterator[None]:
        """The stacked optimizers' parameter groups show and take member ``index``'s learning rates during the block."""
        self._take_group_writes()
        for j, opt in enumerate(self.optimizers):
            for g, group in enumerate(opt.param_groups):
                group["lr"] = self.rates[j][g][index]
        try:
            yield
        finally:
            self._take_new_groups()  # one the member added: what it asked for is its own rate, and for now the others'
            for j, opt in enumerate(self.optimizers):
                for g, group in enumerate(opt.param_groups):
                    self.rates[j][g][index] = group["lr"]
            self._rest()

    def prepare_step(self, optimizer: Optimizer) -> None:
        """Sets ``optimizer`` up for its update, as the last code before it runs (your backward and optimizer hooks have run).

        With the members' learning rates equal, its parameter groups get that rate. Otherwise they get
        the largest, and the parameters are kept as they are now, for :meth:`finish_step` to scale
        each member's move.
        """
        self._take_group_writes()
        j = next(n for n, opt in enumerate(self.optimizers) if opt is optimizer)
        for g, group in enumerate(optimizer.param_groups):
            rates = self.rates[j][g]
            group["lr"] = self._resting[j][g] = max(rates)
            if any(rate != rates[0] for rate in rates):
                for p in group["params"]:
                    scale = torch.tensor([rate / group["lr"] for rate in rates], dtype=p.dtype, device=p.device)
                    self._pending.append((p, p.detach().clone(), scale.reshape(-1, *([1] * (p.dim() - 1)))))

    def finish_step(self) -> None:
        """After the update :meth:`prepare_step` set up: each member's move scaled by its own rate over the one used.

        Learning rates written since, outside any member (by your ``optimizer_step`` after its update), are every member's.
        """
        with torch.no_grad():
            for p, start, scale in self._pending:
                p.sub_(start).mul_(scale).add_(start)
        self._pending.clear()
        self._take_group_writes()
        self._rest()

    def member_param_groups(self, optimizer_index: int, index: int, param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``param_groups`` (of the stacked optimizer's ``state_dict``) with member ``index``'s learning rates."""
        self._take_group_writes()
        return [{**group, "lr": self.rates[optimizer_index][g][index]} for g, group in enumerate(param_groups)]

    def load(self, optimizer_index: int, member_param_groups: Sequence[list[dict[str, Any]]]) -> None:
        """Each member's learning rates from its own optimizer state's ``param_groups`` (one list per member)."""
        self._take_new_groups()
        for g in range(len(self.rates[optimizer_index])):
            self.rates[optimizer_index][g] = [groups[g]["lr"] for groups in member_param_groups]
        self._rest()


class MemberSchedulers:
    """One copy of your learning-rate scheduler per member of a group, in Lightning's place for the group's.

    The group's ``lr_scheduler_step`` steps each member's copy with that member's learning rates
    (and, for a scheduler that follows a metric, such as ``ReduceLROnPlateau``, with that member's
    own value of it). Anything else (``step``, ``get_last_lr()``, ``last_epoch``) is the copy of the
    member code runs as now (``self.lr_schedulers()`` in a hook steps and shows its own), or the
    first member's. Its state is every member's copy's.

    Args:
        copies: one copy of your scheduler (over the group's stacked optimizer) per member (:func:`member_copies`).
        current: the position in the group of the member code runs as now, or ``None``.
        monitor: the metric a ``ReduceLROnPlateau`` follows (each member's own value of it), else ``None``.
    """

    def __init__(self, copies: Sequence[Any], current: Callable[[], int | None], monitor: str | None = None) -> None:
        self.copies = list(copies)
        self.optimizer = self.copies[0].optimizer
        self.monitor = monitor
        self._current = current

    def _own(self) -> Any:
        position = self._current()
        return self.copies[0 if position is None else position]

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Steps the copy of the member code runs as (each member's is stepped by the group's ``lr_scheduler_step``)."""
        self._own().step(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return member_states(self.copies)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Each member's copy from its own state, or (a single scheduler's state, from a plain checkpoint) all from that one."""
        load_member_states(self.copies, state_dict)

    def __getattr__(self, name: str) -> Any:  # the scheduler's own attributes (``last_epoch``, ``best``), the member's
        if name in ("copies", "optimizer", "monitor", "_current"):
            raise AttributeError(name)
        return getattr(self._own(), name)
