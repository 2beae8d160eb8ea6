"""``GroupStrategy``: the strategy of the trainer that fits a member group in this process.

The driver's :class:`~hqde_lightning.HQDEStrategy` hands a fit that one member group can run
(:func:`~hqde_lightning.embedded.group_blocker`) to a copy of your ``Trainer`` whose strategy is
this one: Lightning's single-device strategy on the run's device, overriding what makes the
process hold the whole ensemble:

* :meth:`GroupStrategy.process_dataloader`: the training loader yields every member's own batch,
  stacked (:func:`~hqde_lightning.member_data.group_loader`), gathered on the GPU from an
  in-memory ``TensorDataset`` that fits there;
* :meth:`GroupStrategy.save_checkpoint` / :meth:`GroupStrategy.load_checkpoint`: whole-ensemble
  checkpoints in the same format as with member actors (one full Lightning checkpoint per member,
  each member's callback state under the key it has with actors, the consensus at the top level),
  so a fit resumes in either runtime from either's checkpoints.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from hqde_lightning.checkpoint import EXTRAS_CANDIDATES, HQDE_KEY, ensemble_section, extras_candidates, loaded_host_rng, member_resume_checkpoint, read_checkpoint, saved_host_rng, seal_checkpoint
from hqde_lightning.events import Notice
from hqde_lightning.group import MemberGroup, member_optimizer_state, stacked_optimizer_state
from hqde_lightning.manual_members import MemberOptimizers
from hqde_lightning.member import MEMBER_KEY
from hqde_lightning.member_callbacks import GroupCallback, GroupSWA, MemberCallback, MemberCopy
from hqde_lightning.member_data import group_loader
from hqde_lightning.member_lr import MEMBER_STATES
from hqde_lightning.worker_strategy import WorkerStrategy, checkpoint_round

__all__ = ["GATHER_ON_GPU_BYTES", "GroupStrategy"]

#: the largest in-memory training ``TensorDataset`` a group copies to the GPU to gather its batches there
GATHER_ON_GPU_BYTES = 2**30


class GroupStrategy(WorkerStrategy):
    """The strategy of the trainer copy that fits ``group`` (see the module docstring).

    Args:
        hqde: the run's strategy (its settings: seed, bagging, aggregator, device).
        group: the member group being trained.
        sync: the group's :class:`~hqde_lightning.embedded.GroupSync` (sync state for checkpoints,
            the forwarder for warnings).
    """

    strategy_name = "hqde_group"

    def __init__(self, hqde: Any, group: MemberGroup, sync: Any) -> None:
        device = torch.device("cuda", torch.cuda.current_device()) if isinstance(hqde.accelerator, CUDAAccelerator) else torch.device("cpu")
        super().__init__(hqde, device)
        self.group = group
        self.sync = sync

    @property
    def member_index(self) -> int:
        """The index of the member whose hook, callback or looped step runs now (see :meth:`~hqde_lightning.group.MemberGroup.each_member`).

        Raises:
            AttributeError: outside those: the group's own code (and a vmapped step) runs for all its members.
        """
        member = self.group.current_member
        if member is None:
            raise AttributeError(f"`member_index` is only set while a hook, callback or looped step runs as one member; this group trains members {self.group.member_ids}")
        return member

    def process_dataloader(self, dataloader: object) -> object:
        """The training loader becomes one loader yielding every member's own batch, stacked."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or not trainer.training or not isinstance(dataloader, DataLoader):
            return dataloader
        warn = lambda message: self.sync.forwarder.handle([Notice(0, f"HQDEStrategy: {message}", warning=True)])  # noqa: E731
        return group_loader(dataloader, self.hqde.seed, self.group.member_ids, trainer.current_epoch, self.hqde.bagging, warn, self._gather_on, self._fetching_as)

    def _fetching_as(self, position: int) -> AbstractContextManager[None]:
        """The random streams a member's loader makes its batches in: the member's own torch, numpy and Python ones."""
        return self.group.stack.member_rng(position, host=True)

    def _gather_on(self, dataset: TensorDataset) -> torch.device | None:
        """Where the group gathers its batches from an in-memory ``TensorDataset``: on the GPU, when it fits there.

        On a GPU a small model's step is short and the host's part of it bounds the pace: gathering
        there copies only the indices each step, instead of the k members' batches. The dataset is
        copied to the GPU at each epoch's start when it takes at most :data:`GATHER_ON_GPU_BYTES`
        and a quarter of the GPU's free memory, and your module and datamodule leave the batches
        alone until they are on the device (no :data:`~hqde_lightning.group.BATCH_HOOKS`).
        """
        device = self.root_device
        if device.type != "cuda" or self.group.changes_batches:
            return None
        size = sum(t.element_size() * t.nelement() for t in dataset.tensors if t.device != device)
        if size == 0 or size > min(GATHER_ON_GPU_BYTES, torch.cuda.mem_get_info(device)[0] // 4):
            return None
        message = f"HQDEStrategy: the training TensorDataset ({size / 2**20:.1f} MB) is copied to {device} at each epoch's start; the members' batches are gathered there."
        self.sync.forwarder.handle([Notice(0, message, warning=False)])  # shown once
        return device

    # ----------------------------------------------------------- checkpoints
    def member_checkpoint(self, checkpoint: dict[str, Any], i: int) -> dict[str, Any]:
        """Member ``i``'s full Lightning checkpoint cut out of the group's ``checkpoint``."""
        trainer = self.lightning_module.trainer
        epoch = trainer.current_epoch
        entry = {k: v for k, v in checkpoint.items() if k not in (HQDE_KEY, "state_dict", "optimizer_states")}
        entry["state_dict"] = {k: v.detach().cpu().clone() for k, v in self.group.stack.member_state_dict(i).items()}
        entry["optimizer_states"] = [
            state[MEMBER_STATES][i] if isinstance(opt, MemberOptimizers) else member_optimizer_state(opt, state, i)  # a member's own optimizer (manual optimization), or its part of the stacked one
            for opt, state in zip(trainer.optimizers, checkpoint.get("optimizer_states", []))
        ]
        rates = self.group.learning_rates
        for n, state in enumerate(entry["optimizer_states"] if rates is not None else []):  # the member's own learning rates
            state["param_groups"] = rates.member_param_groups(n, i, state["param_groups"])
        for (n, pid, key), value in self.group.frozen_steps.get(i, {}).items():  # a stopped member's step counts stopped with it
            entry["optimizer_states"][n]["state"][pid][key] = value
        if "lr_schedulers" in checkpoint:  # the member's own copy of each scheduler
            entry["lr_schedulers"] = [s[MEMBER_STATES][i] if isinstance(s, dict) and MEMBER_STATES in s else s for s in checkpoint["lr_schedulers"]]
        if "callbacks" in checkpoint:  # a member copy's state goes under the key its callback has with actors
            copies = [cb for cb in trainer.callbacks if isinstance(cb, MemberCopy)]
            entry["callbacks"] = {k: v for k, v in checkpoint["callbacks"].items() if k not in {cb.state_key for cb in copies}}
            entry["callbacks"].update({cb.original_state_key: checkpoint["callbacks"][cb.state_key] for cb in copies if cb.position == i and cb.state_key in checkpoint["callbacks"]})
        # a member that stopped early pairs with the round of the epoch it stopped in, as its actor's final snapshot does
        sync_round = self.group.frozen_at.get(i, checkpoint_round(epoch, self.sync.synced_epoch))
        entry[MEMBER_KEY] = {"index": self.group.member_ids[i], "round": sync_round, "rng": {"torch": self.group.stack.rng_states[i].clone(), **saved_host_rng(self.group.stack.host_rng_states[i])}}
        # the callbacks' and your module's own additions, as member i, in the order a plain fit calls them
        for cb in trainer.callbacks:
            if isinstance(cb, GroupCallback):
                cb.save_member(entry, i)
            elif isinstance(cb, MemberCallback) and cb.position == i:
                cb.save_into(trainer, entry)
        self.group.save_member_checkpoint(entry, i)
        entry[EXTRAS_CANDIDATES] = extras_candidates(self.group.stack.member_buffers(i, saved=False), self.group.member_attributes(i))
        return entry

    def ensemble_entries(self, checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
        """One entry per member of the ensemble, by index: the group's members cut out of ``checkpoint``, ``{}`` for others."""
        entries: list[dict[str, Any]] = [{} for _ in range(self.hqde.num_members)]
        for i, member in enumerate(self.group.member_ids):
            entries[member] = self.member_checkpoint(checkpoint, i)
        return entries

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Writes the whole ensemble: each member's entry, what your module holds after the fit as the top-level ``state_dict``
        (the consensus, or independent members' first one's: ``HQDEStrategy.module_state``)."""
        members = self.ensemble_entries(checkpoint)
        own = members[self.group.member_ids[0]]
        top = {**{k: v for k, v in own.items() if k != MEMBER_KEY}, "state_dict": self.hqde.module_state([m["state_dict"] for m in members if m])}
        section = ensemble_section(self.hqde, members, None, None, self.sync.sync_state())
        self.checkpoint_io.save_checkpoint(seal_checkpoint(top, section), filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Resumes every member from its entry of an HQDE checkpoint (or all from a plain checkpoint's weights)."""
        load = super().load_checkpoint
        checkpoint = read_checkpoint(checkpoint_path, lambda: load(checkpoint_path, weights_only=weights_only is not False))
        section = checkpoint.get(HQDE_KEY)
        k = self.group.num_members
        if not (section and section.get("members")):  # a plain checkpoint (or one saved before any fit): each member gets its own copy
            entries = [{**checkpoint, "state_dict": dict(checkpoint["state_dict"])} for _ in range(k)]
        else:
            if int(section["num_members"]) != self.hqde.num_members:
                raise MisconfigurationException(
                    f"{checkpoint_path} holds {section['num_members']} members but `HQDEStrategy(num_members={self.hqde.num_members})`;"
                    f" resume with `num_members={section['num_members']}`."
                )
            entries = [member_resume_checkpoint(checkpoint, section["members"][m], m) for m in self.group.member_ids]
            self.sync.load_sync_state(section.get("coordinator") or {})
        self.group.loaded_entries = entries  # the weights load after your `on_load_checkpoint` (load_model_state_dict)
        for i, entry in enumerate(entries):
            rng = entry.get(MEMBER_KEY, {}).get("rng", {})
            if rng.get("torch") is not None:
                self.group.stack.rng_states[i] = torch.as_tensor(rng["torch"], dtype=torch.uint8).cpu()
            if "numpy" in rng and "python" in rng:
                self.group.stack.host_rng_states[i] = loaded_host_rng(rng)
        lead = {k: v for k, v in entries[0].items() if k not in (HQDE_KEY, MEMBER_KEY)}
        if "callbacks" in lead:  # each member copy resumes from its member's entry
            copies = [cb for cb in self.lightning_module.trainer.callbacks if isinstance(cb, MemberCopy)]
            lead["callbacks"] = {k: v for k, v in lead["callbacks"].items() if k not in {cb.original_state_key for cb in copies}}
            for cb in copies:
                state = entries[cb.position].get("callbacks", {}).get(cb.original_state_key)
                if state is not None:
                    lead["callbacks"][cb.state_key] = state
            for swa in (cb for cb in self.lightning_module.trainer.callbacks if isinstance(cb, GroupSWA)):
                states = [e.get("callbacks", {}).get(swa.state_key) for e in entries]
                if all(state is not None for state in states):
                    lead["callbacks"][swa.state_key] = swa.stacked_state(states)
        schedulers = [e.get("lr_schedulers", []) for e in entries]
        if "lr_schedulers" in lead:  # each member's copy of a scheduler resumes from its member's entry
            lead["lr_schedulers"] = [{MEMBER_STATES: [states[n] for states in schedulers]} for n in range(min(map(len, schedulers)))]
        lead["member_optimizer_states"] = [e.get("optimizer_states", []) for e in entries]
        return lead

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """Each member's weights from its own entry of the checkpoint being resumed (after your ``on_load_checkpoint`` saw it)."""
        entries = self.group.loaded_entries
        if entries is None:
            super().load_model_state_dict(checkpoint, strict=strict)
            return
        for i, entry in enumerate(entries):
            self.group.stack.load_member_state_dict(i, entry["state_dict"])

    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        per_member = checkpoint.get("member_optimizer_states")
        if per_member is None:
            return super().load_optimizer_state_dict(checkpoint)
        for n, optimizer in enumerate(self.optimizers):
            if all(len(states) > n for states in per_member):
                if isinstance(optimizer, MemberOptimizers):  # each member's own optimizer (manual optimization)
                    optimizer.load_state_dict({MEMBER_STATES: [states[n] for states in per_member]})
                    continue
                optimizer.load_state_dict(stacked_optimizer_state(optimizer, [states[n] for states in per_member]))
                if self.group.learning_rates is not None:
                    self.group.learning_rates.load(n, [states[n]["param_groups"] for states in per_member])
