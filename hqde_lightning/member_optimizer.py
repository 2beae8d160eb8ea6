"""A member group's stacked optimizer as one member sees it, and the parameter groups its members add to it.

A member group steps its members with one optimizer over the stacked parameters. Code that runs as
one member (your hooks, your callbacks, a fine-tuning callback) and is handed an optimizer gets a
:class:`MemberOptimizer`: the stacked optimizer with the member's own parameters in its parameter
groups, whose other entries (the learning rate: the member's own) read and write the stacked ones.

What a fine-tuning callback does to it (``BaseFinetuning`` unfreezing a backbone calls
``add_param_group``; resuming, it assigns ``param_groups``) reaches the stacked optimizer once for all
members: the first member to add a group adds it, over the stacked parameters; each other member that
adds the same parameters joins it, with its own learning rate. :class:`AddedParamGroups` keeps who has
joined. A group that not every member of the group has added by the next optimizer step cannot be
stepped as each member's own fit steps it, and is refused with the members named.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

__all__ = ["AddedParamGroups", "MemberOptimizer"]


class AddedParamGroups:
    """The parameter groups of a group's stacked optimizers that members added since the last optimizer step, and
    which members (places in the group) have added each. Groups not listed are every member's."""

    def __init__(self, num_members: int) -> None:
        self.num_members = num_members
        #: per (optimizer index, parameter group index), the members that have it
        self._members: dict[tuple[int, int], set[int]] = {}

    def has(self, optimizer: int, group: int, position: int) -> bool:
        members = self._members.get((optimizer, group))
        return members is None or position in members

    def add(self, optimizer: int, group: int, position: int) -> None:
        """Member ``position`` added a new group: for now it is the only one that has it."""
        self._members[(optimizer, group)] = {position}

    def join(self, optimizer: int, group: int, position: int) -> None:
        self._members.setdefault((optimizer, group), set(range(self.num_members))).add(position)

    def leave(self, optimizer: int, group: int, position: int) -> None:
        self._members.setdefault((optimizer, group), set(range(self.num_members))).discard(position)

    def check(self, active: Sequence[int], member_ids: Sequence[int]) -> None:
        """Before an optimizer step: every ``active`` member has every group, or ``MisconfigurationException`` names them."""
        for (optimizer, group), members in self._members.items():
            missing = [member_ids[i] for i in active if i not in members]
            if missing:
                have = [member_ids[i] for i in active if i in members]
                raise MisconfigurationException(
                    f"HQDEStrategy: in a member group, members {have} have parameter group {group} of optimizer {optimizer} and members"
                    f" {missing} do not (a fine-tuning callback that unfreezes by each member's own metrics?). One optimizer steps"
                    " the members of a group, so they must add the same parameter groups before the same step; or train each member"
                    " in its own fit: `HQDEStrategy(members_per_worker=1)`."
                )
        self._members.clear()


class MemberParamGroup(MutableMapping):
    """A parameter group of the stacked optimizer as one member sees it: ``params`` holds the member's parameters, every
    other entry is the stacked group's (read and written there)."""

    def __init__(self, group: dict[str, Any], params: list[Tensor]) -> None:
        self._group = group
        self._params = params

    def __getitem__(self, key: str) -> Any:
        return self._params if key == "params" else self._group[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "params":
            raise TypeError("a member group's member cannot replace the parameters of a parameter group; add a group with `add_param_group`")
        self._group[key] = value

    def __delitem__(self, key: str) -> None:
        if key == "params":
            raise TypeError("a member group's member cannot remove the parameters of a parameter group")
        del self._group[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._group)

    def __len__(self) -> int:
        return len(self._group)


class MemberOptimizer:
    """``optimizer`` (the stacked optimizer at ``index`` among the group's) as the member at ``position`` sees it.

    Args:
        optimizer: one of the group's optimizers over the stacked parameters.
        index: its index among the group's optimizers.
        position: the member's place in the group.
        params: each stacked parameter with the member's own view of it (its gradient is the member's).
        added: the parameter groups members added since the last step (shared by the group's members).

    Its ``param_groups`` are the stacked optimizer's that the member has (:class:`MemberParamGroup`);
    ``add_param_group`` and assigning ``param_groups`` add to the stacked optimizer or join a group
    another member added (see the module docstring). Anything else is the stacked optimizer's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, index: int, position: int, params: Iterable[tuple[Tensor, Tensor]], added: AddedParamGroups) -> None:
        self.optimizer = optimizer
        self._index, self._position, self._added = index, position, added
        pairs = list(params)
        self._views = {id(stacked): view for stacked, view in pairs}
        self._stacked = {id(view): stacked for stacked, view in pairs}

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        """The stacked optimizer's class, for ``isinstance(optimizer, torch.optim.SGD)`` in your hooks (as a plain fit passes
        your optimizer itself); ``type(optimizer)`` is still this class."""
        return type(self.optimizer)

    @property
    def param_groups(self) -> list[MemberParamGroup]:
        return [
            MemberParamGroup(group, [self._views[id(p)] for p in group["params"]])
            for k, group in enumerate(self.optimizer.param_groups)
            if self._added.has(self._index, k, self._position)
        ]

    @param_groups.setter
    def param_groups(self, groups: Sequence[dict[str, Any]]) -> None:
        """The member's parameter groups become ``groups`` (as ``BaseFinetuning`` restores the groups it added, resuming)."""
        wanted = [[id(p) for p in self._stacked_params(g["params"])] for g in groups]
        for k, group in enumerate(self.optimizer.param_groups):
            if [id(p) for p in group["params"]] not in wanted:
                self._added.leave(self._index, k, self._position)
        for group in groups:
            self._join_or_add(group, adding=False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._join_or_add(param_group, adding=True)

    def __getattr__(self, name: str) -> Any:
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def _stacked_params(self, params: Tensor | Iterable[Tensor]) -> list[Tensor]:
        params = [params] if isinstance(params, Tensor) else list(params)
        try:
            return [self._stacked[id(p)] for p in params]
        except KeyError:
            raise ValueError("in a member group, a member's optimizer takes only that member's parameters (your module's, as the member)") from None

    def _join_or_add(self, param_group: dict[str, Any], adding: bool) -> None:
        """Member ``position`` gets ``param_group``: the stacked group over the same parameters, joined with the member's own
        learning rate, or a new group of the stacked optimizer. ``adding``: as ``add_param_group`` (which refuses parameters
        the member's optimizer holds already, and fills in the optimizer's defaults); else as assigning ``param_groups``."""
        stacked = self._stacked_params(param_group["params"])
        ids = [id(p) for p in stacked]
        opt, n = self.optimizer, self._index
        for k, group in enumerate(opt.param_groups):
            if [id(p) for p in group["params"]] != ids:
                continue
            if adding and self._added.has(n, k, self._position):
                raise ValueError("some parameters appear in more than one parameter group")
            for key in set(param_group) | set(opt.defaults):
                if key in ("params", "lr") or not adding:
                    continue
                if param_group.get(key, opt.defaults.get(key)) != group.get(key):
                    raise MisconfigurationException(
                        f"HQDEStrategy: members of a member group add the same parameters to their optimizer with different `{key}`"
                        f" ({group.get(key)!r} and {param_group.get(key, opt.defaults.get(key))!r}); one optimizer steps them, with one"
                        " value. Train each member in its own fit: `HQDEStrategy(members_per_worker=1)`."
                    )
            self._added.join(n, k, self._position)
            for key, value in param_group.items():  # the learning rate is the member's own (the group's rates are per member)
                if key != "params" and (key == "lr" or not adding):
                    group[key] = value
            if adding and "lr" not in param_group:
                group["lr"] = opt.defaults["lr"]
            return
        opt.add_param_group({**param_group, "params": stacked})  # refuses parameters another group holds, as for one member
        self._added.add(n, len(opt.param_groups) - 1, self._position)
