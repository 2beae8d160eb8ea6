"""The embedded runtime: on one device, every member trains in one member group in the driver, without Ray.

:func:`group_blocker` says whether a fit can run that way (``members_per_worker="auto"``, one
device, no ``ray_address``, and nothing the group cannot run per member); :func:`run_group`
runs it. The user's ``Trainer`` is copied (as the Ray path pickles it for its actors) and the
copy fits a :class:`~hqde_lightning.group.MemberGroup` with:

* :class:`GroupStrategy`: Lightning's single-device strategy that gives the training loader one
  own data order per member (:func:`~hqde_lightning.member_data.group_loader`) and reads and
  writes whole-ensemble checkpoints in the same format as the Ray path (one full Lightning
  checkpoint per member; the consensus at the top level);
* :class:`GroupSync`: the epoch-end sync, in this process: the members' weights go through the
  same codec, topology and aggregator as in the coordinator, and each member applies ``sync``.

The copy logs to your loggers directly (``member_{i}/...`` and Lightning's plain ``epoch``) and
shows Lightning's own progress bar. What comes back is one
:class:`~hqde_lightning.actors.MemberResult` per member, as from member actors.
"""

from __future__ import annotations

import copy
import inspect
import time
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from ray import cloudpickle
from torch.utils.data import DataLoader

from hqde_lightning.actors import MemberResult, _is_scalar
from hqde_lightning.checkpoint import HQDE_KEY, ensemble_section, read_checkpoint, seal_checkpoint, state_digest
from hqde_lightning.codec import apply_sync, distance_to_consensus, payload_layout, payload_nbytes, state_to_numpy
from hqde_lightning.events import ClonesEvent, DistanceEvent, Notice, sync_record
from hqde_lightning.group import MemberGroup, member_optimizer_state, stacked_optimizer_state, unsupported_hooks
from hqde_lightning.member import MEMBER_KEY, reinitialise, sync_state
from hqde_lightning.member_data import group_loader
from hqde_lightning.member_strategy import _member_resume_checkpoint
from hqde_lightning.topology import LocalExecutor, aggregate

__all__ = ["GroupStrategy", "GroupSync", "group_blocker", "run_group"]

#: callbacks that act inside each member (per-member state or hooks a group does not run per member)
_MEMBER_CALLBACKS = ("QuantumNoise", "ByzantineMembers", "AdaptiveQuantization", "PerformanceMonitor")


def group_blocker(strategy: Any, trainer: Trainer, model: LightningModule) -> str | None:
    """Why this fit cannot train its members as one group in this process, or ``None`` when it can."""
    if strategy.members_per_worker != "auto":
        return f"`members_per_worker={strategy.members_per_worker}` asks for one Ray actor per member"
    if strategy.ray_address is not None:
        return "`ray_address` is set"
    if strategy.resources_per_member:
        return "`resources_per_member` is set"
    if strategy.on_member_failure == "continue":
        return "`on_member_failure='continue'` keeps each member in its own process, so that one can fail alone"
    if isinstance(trainer.accelerator, CUDAAccelerator) and torch.cuda.device_count() > 1:
        return f"{torch.cuda.device_count()} GPUs are visible (one actor per member spreads the members over them)"
    if not model.automatic_optimization:
        return "the module uses manual optimization"
    hooks = unsupported_hooks(model)
    if hooks:
        return f"{type(model).__name__} overrides {hooks}, which a member group does not run per member"
    member_side = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, EarlyStopping) or type(cb).__name__ in _MEMBER_CALLBACKS]
    if member_side:
        return f"the callbacks {member_side} act per member"
    return None


class GroupSync(Callback):
    """The group's epoch-end sync in this process, its per-member scores, and the final member snapshots.

    Args:
        hqde: the run's strategy (sync mode, aggregator, topology).
        group: the member group being trained.
        forwarder: hands sync records, distances and notices to the driver's loggers.
    """

    def __init__(self, hqde: Any, group: MemberGroup, forwarder: Any) -> None:
        self.hqde = hqde
        self.group = group
        self.forwarder = forwarder
        self.aggregator = copy.deepcopy(hqde.aggregator)
        self.history: list[dict[str, Any]] = []
        self.synced_epoch = -1
        self.check_clones = hqde.sync == "none" or (hqde.sync == "elastic" and hqde.sync_strength < 1.0)
        #: each member's last full Lightning checkpoint (taken when the fit ends)
        self.final: dict[int, dict[str, Any]] = {}
        self._loss_sum: torch.Tensor | None = None
        self._num_batches = 0
        self._num_samples = 0

    def sync_state(self) -> dict[str, Any]:
        """The coordinator's part of checkpoints: the aggregator's state (reputations) and the sync history."""
        return {"aggregator": self.aggregator.state_dict(), "history": list(self.history)}

    def load_sync_state(self, state: dict[str, Any]) -> None:
        self.aggregator.load_state_dict(state.get("aggregator", {}))
        self.history = list(state.get("history", []))

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._loss_sum, self._num_batches = None, 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        losses = self.group.last_losses
        self._loss_sum = losses if self._loss_sum is None else self._loss_sum + losses
        self._num_batches += 1
        self._num_samples += self.group.last_batch_size

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.synced_epoch == epoch:
            return
        self.synced_epoch = epoch
        if self.hqde.sync != "none" and (epoch + 1) % self.hqde.sync_every_n_epochs == 0:
            self._exchange(trainer, epoch)
        if self.check_clones:
            self._report_clones(epoch)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        snapshot = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        strategy = trainer.strategy
        assert isinstance(strategy, GroupStrategy)
        self.final = {self.group.member_ids[i]: strategy.member_checkpoint(snapshot, i) for i in range(self.group.num_members)}

    def score(self, trainer: Trainer, i: int) -> float | None:
        """Member ``i``'s confidence: its ``score_metric`` (``member_{id}/<name>``), or −its mean training loss this epoch."""
        if self.hqde.score_metric is not None:
            value = trainer.callback_metrics.get(f"member_{self.group.member_ids[i]}/{self.hqde.score_metric}")
            if value is None:
                return None
            return float(value) if self.hqde.score_mode == "max" else -float(value)
        if self._loss_sum is None or self._num_batches == 0:
            return None
        return -float(self._loss_sum[i]) / self._num_batches

    def _exchange(self, trainer: Trainer, epoch: int) -> None:
        """One sync round: every member's weights through the topology and aggregator, then ``sync`` applied to each."""
        group, stack = self.group, self.group.stack
        keys = list(sync_state(group.module))
        states = [{k: stack.stacked(k)[i].detach() for k in keys} for i in range(group.num_members)]
        payloads = [state_to_numpy(s) for s in states]
        scores = [self.score(trainer, i) for i in range(group.num_members)]
        counts = max(self._num_samples, 1)
        entries = [(p, s, counts, payload_nbytes(p), payload_layout(p)) for p, s in zip(payloads, scores)]
        step = trainer.fit_loop.epoch_loop._batches_that_stepped - 1
        started = time.perf_counter()
        result, comm = self.hqde.topology.reduce(
            payloads, [e[3] for e in entries], self.aggregator, None if None in scores else scores, [counts] * len(entries), LocalExecutor(), entries[0][4], group.member_ids
        )
        consensus = state_to_numpy(result.state)
        record = sync_record(epoch, group.member_ids, result, time.perf_counter() - started, entries, comm, step, self.hqde.topology.name)
        self.history.append(record.as_dict())
        self._num_samples = 0
        events: list[Any] = [record]
        with torch.no_grad():
            for i, state in enumerate(states):
                events.append(DistanceEvent(group.member_ids[i], step, distance_to_consensus(state, consensus)))
                for key, value in consensus.items():
                    (updated,) = apply_sync({key: state[key]}, {key: value}, self.hqde.sync, self.hqde.sync_strength).values()
                    state[key].copy_(updated)
        self.forwarder.handle(events)

    def _report_clones(self, epoch: int) -> None:
        """After the first epoch: warns about members holding identical weights (they train as copies)."""
        self.check_clones = False
        groups: dict[str, list[int]] = {}
        for i, member in enumerate(self.group.member_ids):
            groups.setdefault(state_digest(self.group.stack.member_state_dict(i)), []).append(member)
        self.forwarder.handle([ClonesEvent(members, epoch) for members in groups.values() if len(members) > 1])


class GroupStrategy(SingleDeviceStrategy):
    """The strategy of the trainer copy that fits a member group in this process (see the module docstring)."""

    strategy_name = "hqde_group"

    def __init__(self, hqde: Any, group: MemberGroup, sync: GroupSync) -> None:
        device = torch.device("cuda", torch.cuda.current_device()) if isinstance(hqde.accelerator, CUDAAccelerator) else torch.device("cpu")
        super().__init__(device=device, accelerator=hqde.accelerator, checkpoint_io=hqde.checkpoint_io, precision_plugin=hqde.precision_plugin)
        self.hqde = hqde
        self.group = group
        self.sync = sync

    def install(self, trainer: Trainer) -> None:
        """Makes this the strategy of ``trainer`` before its fit starts (values logged before are dropped)."""
        trainer._accelerator_connector.strategy = self
        for loop in (trainer.fit_loop.epoch_loop, trainer.fit_loop.epoch_loop.val_loop):
            loop._results.clear()

    def process_dataloader(self, dataloader: object) -> object:
        """The training loader becomes one loader yielding every member's own batch, stacked."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or not trainer.training or not isinstance(dataloader, DataLoader):
            return dataloader
        warn = lambda message: self.sync.forwarder.handle([Notice(0, f"HQDEStrategy: {message}", warning=True)])  # noqa: E731
        return group_loader(dataloader, self.hqde.seed, self.group.member_ids, trainer.current_epoch, self.hqde.bagging, warn)

    # ----------------------------------------------------------- checkpoints
    def member_checkpoint(self, checkpoint: dict[str, Any], i: int) -> dict[str, Any]:
        """Member ``i``'s full Lightning checkpoint cut out of the group's ``checkpoint``."""
        trainer = self.lightning_module.trainer
        epoch = trainer.current_epoch
        entry = {k: v for k, v in checkpoint.items() if k not in (HQDE_KEY, "state_dict", "optimizer_states")}
        entry["state_dict"] = {k: v.detach().cpu().clone() for k, v in self.group.stack.member_state_dict(i).items()}
        entry["optimizer_states"] = [member_optimizer_state(opt, state, i) for opt, state in zip(trainer.optimizers, checkpoint.get("optimizer_states", []))]
        round_id = epoch if self.sync.synced_epoch == epoch else epoch - 1
        entry[MEMBER_KEY] = {"index": self.group.member_ids[i], "round": round_id, "rng": {"torch": self.group.stack.rng_states[i].clone()}}
        return entry

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Writes the whole ensemble: each member's entry, the consensus as the top-level ``state_dict``."""
        members = [self.member_checkpoint(checkpoint, i) for i in range(self.group.num_members)]
        consensus = aggregate(copy.deepcopy(self.hqde.aggregator), [m["state_dict"] for m in members]).state
        top = {**{k: v for k, v in members[0].items() if k != MEMBER_KEY}, "state_dict": consensus}
        section = ensemble_section(self.hqde, members, None, None, self.sync.sync_state())
        self.checkpoint_io.save_checkpoint(seal_checkpoint(top, section), filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Resumes every member from its entry of an HQDE checkpoint (or all from a plain checkpoint's weights)."""
        load = super().load_checkpoint
        checkpoint = read_checkpoint(checkpoint_path, lambda: load(checkpoint_path, weights_only=weights_only is not False))
        section = checkpoint.get(HQDE_KEY)
        k = self.group.num_members
        if section is None:
            entries = [checkpoint] * k
        else:
            if int(section["num_members"]) != self.hqde.num_members:
                raise MisconfigurationException(
                    f"{checkpoint_path} holds {section['num_members']} members but `HQDEStrategy(num_members={self.hqde.num_members})`;"
                    f" resume with `num_members={section['num_members']}`."
                )
            entries = [_member_resume_checkpoint(checkpoint, section["members"][m], m) for m in self.group.member_ids]
            self.sync.load_sync_state(section.get("coordinator") or {})
        for i, entry in enumerate(entries):
            self.group.stack.load_member_state_dict(i, entry["state_dict"])
            rng = entry.get(MEMBER_KEY, {}).get("rng", {}).get("torch")
            if rng is not None:
                self.group.stack.rng_states[i] = torch.as_tensor(rng, dtype=torch.uint8).cpu()
        lead = {k: v for k, v in entries[0].items() if k not in (HQDE_KEY, MEMBER_KEY)}
        lead["state_dict"] = self.group.state_dict()
        lead["member_optimizer_states"] = [e.get("optimizer_states", []) for e in entries]
        return lead

    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        per_member = checkpoint.get("member_optimizer_states")
        if per_member is None:
            return super().load_optimizer_state_dict(checkpoint)
        for n, optimizer in enumerate(self.optimizers):
            if all(len(states) > n for states in per_member):
                optimizer.load_state_dict(stacked_optimizer_state(optimizer, [states[n] for states in per_member]))


def run_group(trainer: Trainer, payload: bytes, forwarder: Any) -> tuple[list[MemberResult], dict[int, dict[str, Any]], dict[str, Any]]:
    """Fits every member of ``trainer.strategy``'s ensemble as one group in this process.

    ``payload`` is the pickled fit (:func:`~hqde_lightning.pickling.pickle_fit`). Returns the
    members' results, their final snapshots and the sync state (aggregator state, history).

    Raises:
        GroupUnsupported: before any training step, when the group cannot run this module (e.g.
            its optimizer is not element-wise).
    """
    hqde = trainer.strategy
    copy_trainer, function_name, args, kwargs = cloudpickle.loads(payload)
    function = getattr(copy_trainer, function_name)
    bound = inspect.signature(function).bind(*args, **kwargs)
    model: LightningModule = bound.arguments["model"]
    resuming = bound.arguments.get("ckpt_path") is not None
    members, rng_states = [], []
    for i in range(hqde.num_members):
        seed_everything(hqde.seed + i, workers=True, verbose=False)
        member = copy.deepcopy(model)
        if hqde.member_init == "independent" and not resuming:
            notice, fallback = reinitialise(member)
            forwarder.handle([Notice(i, f"HQDEStrategy: {notice}", warning=fallback)])
        members.append(member)
        rng_states.append(torch.get_rng_state())
    group = MemberGroup(model, members, range(hqde.num_members), hqde.vectorize, rng_states)
    del members
    bound.arguments["model"] = group
    sync = GroupSync(hqde, group, forwarder)
    GroupStrategy(hqde, group, sync).install(copy_trainer)
    copy_trainer._data_connector.prepare_data = lambda: None  # ran once in the driver
    copy_trainer.loggers = trainer.loggers
    copy_trainer.callbacks = [sync] + copy_trainer.callbacks
    seed_everything(hqde.seed, workers=True, verbose=False)
    function(*bound.args, **bound.kwargs)
    metrics = copy_trainer.callback_metrics
    callbacks_state = {cb.state_key: cb.state_dict() for cb in copy_trainer.callbacks if cb is not sync and cb.state_dict()}
    results = []
    for i, member in enumerate(group.member_ids):
        prefix = f"member_{member}/"
        results.append(
            MemberResult(
                index=member,
                state_dict=state_to_numpy(group.stack.member_state_dict(i)),
                callback_metrics={k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix) and _is_scalar(v)},
                fit_loop_state=copy_trainer.fit_loop.state_dict(),
                callbacks_state=callbacks_state,
                trainer_state=copy_trainer.state,
                score=sync.score(copy_trainer, i),
            )
        )
    return results, sync.final, sync.sync_state()
