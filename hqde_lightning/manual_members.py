"""Manual optimization in a member group: each member runs your ``training_step`` in turn and steps optimizers of its own.

Under manual optimization (``self.automatic_optimization = False``) your ``training_step`` makes
the updates itself (``self.optimizers()``, ``self.manual_backward(loss)``, ``opt.step()``; a GAN
steps two optimizers one after the other), so a group can neither vectorize it nor step its
members with one stacked optimizer. It runs it this way instead, in one Lightning fit loop
(:class:`~hqde_lightning.group.MemberGroup`):

* each member keeps its parameters for the whole fit: views of its slices of the stacked
  parameters with gradients of their own
  (:meth:`~hqde_lightning.stacking.StackedMembers.keep_member_parameters`), so what its
  optimizers do reaches the stack (syncs, checkpoints, the ensemble see it);
* your ``configure_optimizers`` runs once per member, as that member (:func:`configure_members`):
  each member has its own optimizers and schedulers, of any kind;
* at each training batch the members run your ``training_step`` one after another, each as
  itself: ``self.optimizers()`` and ``self.lr_schedulers()`` are its own
  (:class:`MemberOptimizers`, :class:`~hqde_lightning.member_lr.MemberSchedulers`), and so are
  ``self.global_step`` (every member starts the batch from the same count and counts its own
  steps, as in its own fit) and the hooks Lightning calls inside the step (``on_before_backward``,
  ``on_after_backward``, ``on_before_optimizer_step``).

What it buys over one fit per member (in a thread of your process, or a Ray actor): one Lightning
loop, one data pipeline and one process for all members. The step itself costs what it costs in
a for-loop of plain ``Trainer``s.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from lightning.pytorch.core.optimizer import _configure_optimizers, _configure_schedulers_manual_opt
from torch.optim import Optimizer

from hqde_lightning.member_lr import MemberSchedulers, load_member_states, member_states

__all__ = ["MemberOptimizers", "configure_members"]


class MemberOptimizers:
    """The same optimizer of every member of a group (one of your ``configure_optimizers``), in Lightning's place.

    What is done to it is done to the optimizer of the member code runs as now (the first member's
    outside member code): stepping, zeroing gradients, reading or changing ``param_groups``. Its
    state is every member's optimizer's, one state per member; a single
    optimizer's state (from a plain checkpoint) loads into every member's (:func:`~hqde_lightning.member_lr.member_states`).

    Args:
        optimizers: member ``i``'s optimizer at position ``i``.
        current: the position in the group of the member code runs as now, or ``None``.
    """

    def __init__(self, optimizers: Sequence[Optimizer], current: Callable[[], int | None]) -> None:
        self.optimizers = list(optimizers)
        self._current = current

    def own(self) -> Optimizer:
        """The optimizer of the member code runs as now (the first member's outside member code)."""
        position = self._current()
        return self.optimizers[0 if position is None else position]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.own().param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.own().param_groups = groups

    @property
    def defaults(self) -> dict[str, Any]:
        return self.own().defaults

    @property
    def state(self) -> Any:
        return self.own().state

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        return self.own().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.own().zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.own().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return member_states(self.optimizers)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_member_states(self.optimizers, state_dict)

    def __getattr__(self, name: str) -> Any:  # the optimizer's own attributes, the member's
        if name in ("optimizers", "_current"):
            raise AttributeError(name)
        return getattr(self.own(), name)


@functools.cache
def _member_class(optimizer_class: type[Optimizer]) -> type[MemberOptimizers]:
    return type(optimizer_class.__name__, (MemberOptimizers, optimizer_class), {"__module__": __name__, "__doc__": MemberOptimizers.__doc__})


def _named_like(optimizer: Optimizer) -> type[MemberOptimizers]:
    """``MemberOptimizers`` as a subclass of ``optimizer``'s class, under its name, as Lightning's ``LightningOptimizer``
    does: code that checks an optimizer's type (``isinstance(opt, torch.optim.Adam)``) sees the member's own, and Lightning
    names an optimizer's logged rates after its class (``LearningRateMonitor``'s ``lr-Adam``), as in each member's own fit.
    What :class:`MemberOptimizers` defines comes first; the rest is the member's own optimizer's (``__getattr__``)."""
    return _member_class(type(optimizer))


def configure_members(configure: Callable[[int], Any], num_members: int, current: Callable[[], int | None]) -> tuple[list[MemberOptimizers], list[MemberSchedulers]]:
    """Your optimizers and schedulers, one set per member: ``configure(i)`` runs your ``configure_optimizers`` as member ``i``.

    Returns one :class:`MemberOptimizers` per optimizer you return (named as its class: ``Adam``) and one
    ``MemberSchedulers`` per scheduler, each attached to the ``MemberOptimizers`` of its optimizer (Lightning checks that).

    Raises:
        ValueError: members returned different numbers of optimizers or schedulers, or a scheduler of an optimizer not returned.
    """
    optimizers, schedulers = [], []
    for i in range(num_members):
        opts, scheds, _ = _configure_optimizers(configure(i))
        optimizers.append(opts)
        schedulers.append([config.scheduler for config in _configure_schedulers_manual_opt(scheds)])
    if len({len(o) for o in optimizers}) > 1 or len({len(s) for s in schedulers}) > 1:
        raise ValueError(f"the members' `configure_optimizers` returned {[len(o) for o in optimizers]} optimizers and {[len(s) for s in schedulers]} schedulers; a group needs the same of each")
    member_optimizers = [_named_like(optimizers[0][n])([opts[n] for opts in optimizers], current) for n in range(len(optimizers[0]))]
    member_schedulers = []
    for n in range(len(schedulers[0])):
        scheduler = MemberSchedulers([scheds[n] for scheds in schedulers], current)
        index = next((m for m, opt in enumerate(optimizers[0]) if opt is schedulers[0][n].optimizer), None)
        if index is None:
            raise ValueError(f"scheduler {n} of `configure_optimizers` is attached to an optimizer it does not return")
        scheduler.optimizer = member_optimizers[index]
        member_schedulers.append(scheduler)
    return member_optimizers, member_schedulers
