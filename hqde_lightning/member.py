"""What runs inside a member actor, around the user's own Lightning fit loop.

* :class:`MemberContext`: everything a member needs besides the pickled ``Trainer``.
* :class:`MemberSync`: a private callback. At the end of each epoch (``on_train_epoch_end``,
  after that epoch's validation, so a validation ``score_metric`` describes the weights being
  sent and is never one epoch stale), it encodes the member's floating-point and complex
  weights (:func:`sync_state`) as a :mod:`hqde_lightning.codec` payload, sends it to the
  coordinator, waits for the consensus and applies the sync mode
  (:func:`~hqde_lightning.codec.apply_sync_`); then it posts a snapshot (its full Lightning
  checkpoint and RNG states) that the member writing checkpoints puts into whole-ensemble
  checkpoints. It also posts one when training starts and one when the fit ends, and reports
  progress.
* :class:`MirrorLogger`: stands in for each of the user's loggers inside the actor; it has
  the same ``save_dir``/``name``/``version`` (so checkpoints land where they would without
  HQDE) and forwards metrics to the driver, which logs them under ``member_{i}/``.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from argparse import Namespace
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor

from hqde_lightning.attributes import changed_attributes, drawn_attributes, plain_attributes
from hqde_lightning.checkpoint import EXTRAS_CANDIDATES, capture_rng_states, module_extras_candidates
from hqde_lightning.codec import SYNC_MODES, apply_sync_, distance_to_consensus, load_buffers, non_persistent_buffers, payload_layout, payload_nbytes, state_to_numpy
from hqde_lightning.events import DistanceEvent, HparamsEvent, MetricsEvent, ProgressEvent
from hqde_lightning.member_data import start_epoch
from hqde_lightning.turns import MemberCancelled, resolve

__all__ = ["SYNC_MODES", "MemberContext", "MemberSync", "MemberTrainer", "MirrorLogger", "SyncCodec", "confidence", "sync_state", "tree_to_cpu", "use_mirror_loggers"]
#: the entry of a member snapshot that holds its index, sync round and RNG states
MEMBER_KEY = "hqde_member"
_PROGRESS_INTERVAL_S = 0.5


def sync_state(module: torch.nn.Module) -> dict[str, Tensor]:
    """The entries of ``module.state_dict()`` a sync sends and updates (tensors sharing ``module``'s storage).

    * floating-point and complex tensors only (integer counters and masks stay as they are);
    * each storage once: tied parameters (a decoder weight tied to an embedding: one storage
      under two keys) are sent, counted and pulled under their first key only;
    * no frozen parameters (``requires_grad=False``): the optimizer leaves them alone and so
      does the sync, so they stay bit-exact (quantization would otherwise move them).
    """
    frozen = {name for name, param in module.named_parameters(remove_duplicate=False) if not param.requires_grad}
    seen: set[tuple[Any, ...]] = set()
    out: dict[str, Tensor] = {}
    for key, value in module.state_dict().items():
        if key in frozen or not (torch.is_floating_point(value) or torch.is_complex(value)):
            continue
        if value.numel():
            view = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
            if view in seen:
                continue
            seen.add(view)
        out[key] = value
    return out


def tree_to_cpu(obj: Any) -> Any:
    """Clones every tensor inside nested dicts/lists/tuples to the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, Mapping):
        return {k: tree_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_to_cpu(v) for v in obj)
    return obj


@runtime_checkable
class SyncCodec(Protocol):
    """A callback that encodes the weights a member sends at a sync point (e.g. quantization).

    ``encode_for_sync`` gets the member's :func:`sync_state` (floating-point and complex
    tensors, each storage once, no frozen parameters) and returns the payload that
    crosses the wire, a :data:`hqde_lightning.codec.Payload`: a ``dict`` of numpy arrays or a
    :class:`~hqde_lightning.compression.EncodedState` (anything else fails with ``TypeError``
    before it is sent). At most one such callback is used (the first in ``trainer.callbacks``).
    """

    def encode_for_sync(self, trainer: Trainer, pl_module: LightningModule, state: dict[str, Tensor]) -> Any: ...


@dataclass
class MemberContext:
    """The member-specific part of a fit, sent to each actor with the pickled trainer.

    Attributes:
        index: the member's position in the ensemble (the lowest one still training writes checkpoints).
        seed: this member's seed (the run's seed + index).
        coordinator: handle of the coordinator actor.
        sync: ``"none"``, ``"elastic"`` or ``"replace"``.
        sync_strength: α in w ← w + α(w̄ − w) for ``"elastic"``.
        sync_every_n_epochs: sync at the end of every n-th epoch.
        bagging: train on a bootstrap sample of the training set.
        score_metric: name of the logged metric used as confidence (``None``: −train loss).
        score_mode: ``"max"`` if a larger ``score_metric`` is better, ``"min"`` otherwise.
        mirrors: per user logger, the attributes the stand-in logger must show.
        resume: this member's entry of a checkpoint's ``hqde`` section when resuming.
        restart_from: ``[ObjectRef]`` of the snapshot a restarted member resumes from.
    """

    index: int
    seed: int
    coordinator: Any
    sync: str
    sync_strength: float
    sync_every_n_epochs: int
    bagging: bool
    score_metric: str | None
    score_mode: str
    mirrors: list[dict[str, Any]] = field(default_factory=list)
    resume: dict[str, Any] | None = None
    restart_from: list[Any] | None = None

    @classmethod
    def of(cls, strategy: Any, index: int, coordinator: Any, mirrors: list[dict[str, Any]], restart_from: list[Any] | None = None) -> MemberContext:
        """Member ``index``'s context in a fit of ``strategy`` (the driver's ``HQDEStrategy``)."""
        return cls(
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


class MirrorLogger(Logger):
    """Inside a member: looks like one of the user's loggers, forwards everything to the driver."""

    def __init__(self, mirror: Mapping[str, Any], logger_index: int, member_index: int, coordinator: Any, group: Sequence[int] | None = None) -> None:
        super().__init__()
        self._mirror = dict(mirror)
        self._logger_index = logger_index
        self._member_index = member_index
        self._coordinator = coordinator
        #: the members of a group actor (whose rows carry ``member_{i}/`` keys already), or ``None`` for one member
        self._group = None if group is None else tuple(group)

    @staticmethod
    def describe(logger: Logger) -> dict[str, Any]:
        """What a stand-in for ``logger`` shows: its type, name, version and directories (absolute when local).

        ``trainer_log_dir`` is what a plain ``Trainer.log_dir`` gives with ``logger`` first: its
        ``log_dir`` for Lightning's TensorBoard and CSV loggers, its ``save_dir`` for others.
        """
        out: dict[str, Any] = {"type": type(logger).__name__}
        for attr in ("name", "version", "save_dir", "root_dir", "log_dir"):
            try:
                value = getattr(logger, attr)
            except Exception:  # loggers may raise for attributes they do not support
                continue
            out[attr] = os.path.abspath(value) if attr.endswith("dir") and isinstance(value, str) and "://" not in value else value
        out["trainer_log_dir"] = out.get("log_dir" if isinstance(logger, (TensorBoardLogger, CSVLogger)) else "save_dir")
        return out

    @property
    def experiment(self) -> Any:
        raise AttributeError(
            f"`logger.experiment` is not available in an HQDEStrategy member that trains in a thread or a Ray actor:"
            f" its logger stands in for your {self._mirror.get('type', 'logger')} and sends what `self.log` and"
            " `log_metrics`/`log_hyperparams` write to the driver, where the experiment object lives. Log values with"
            " `self.log(...)`, or write files under `self.trainer.log_dir`."
        )

    @property
    def name(self) -> str | None:
        return self._mirror.get("name")

    @property
    def version(self) -> int | str | None:
        return self._mirror.get("version")

    @property
    def save_dir(self) -> str | None:
        return self._mirror.get("save_dir")

    @property
    def root_dir(self) -> str | None:
        return self._mirror.get("root_dir")

    @property
    def log_dir(self) -> str | None:
        return self._mirror.get("log_dir")

    @property
    def trainer_log_dir(self) -> str | None:
        """What ``Trainer.log_dir`` gives in a plain fit with your logger first (see :meth:`describe`)."""
        return self._mirror.get("trainer_log_dir")

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        # numbers as Lightning hands them to a logger: integers (``epoch``) stay integers
        values = {k: v.item() if isinstance(v, Tensor) else v for k, v in metrics.items()}
        values = {k: v if isinstance(v, int) else float(v) for k, v in values.items()}
        self._coordinator.emit.remote(MetricsEvent(self._member_index, self._logger_index, values, step, self._group))

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        if self._member_index == 0 or (self._group is not None and 0 in self._group):
            params = vars(params) if isinstance(params, Namespace) else dict(params)
            self._coordinator.emit.remote(HparamsEvent(self._logger_index, params))


class MemberTrainer(Trainer):
    """A member's copy of your ``Trainer`` with :class:`MirrorLogger` stand-ins for your loggers (see :func:`use_mirror_loggers`).

    Its one difference is ``log_dir``: your trainer's, as a plain fit has it. Lightning's
    ``Trainer.log_dir`` reads ``log_dir`` only from its own TensorBoard and CSV loggers and
    ``save_dir`` from any other, and a stand-in is neither; so ``log_dir`` is what
    :meth:`MirrorLogger.describe` recorded for your first logger.
    """

    @property
    def log_dir(self) -> str | None:
        if self.loggers and isinstance(self.loggers[0], MirrorLogger):
            return self.loggers[0].trainer_log_dir
        return super().log_dir


def use_mirror_loggers(trainer: Trainer, loggers: Sequence[MirrorLogger]) -> None:
    """Gives a member's ``trainer`` the stand-in ``loggers`` (in place of your loggers) and makes it a :class:`MemberTrainer`."""
    trainer.loggers = list(loggers)
    trainer.__class__ = MemberTrainer


def confidence(score_metric: str | None, metric: Any, score_mode: str, loss_sum: Any, num_batches: int) -> float | None:
    """A member's confidence for the aggregator (higher is better).

    With a ``score_metric``: its logged value ``metric`` (negated for ``score_mode="min"``;
    ``None`` when it was not logged). Without one: −(``loss_sum`` / ``num_batches``), the mean
    training loss since the epoch started (``None`` before the first batch).
    """
    if score_metric is not None:
        if metric is None:
            return None
        value = float(metric)
        return value if score_mode == "max" else -value
    if loss_sum is None or num_batches == 0:
        return None
    return -float(loss_sum) / num_batches


class MemberSync(Callback):
    """Epoch-end weight synchronisation and snapshots for one member (private to the strategy)."""

    def __init__(self, context: MemberContext) -> None:
        self.ctx = context
        self._loss_sum: Tensor | None = None
        self._num_batches = 0
        #: samples trained on since the last sync (the aggregator's sample count)
        self._num_samples = 0
        self.synced_epoch = -1
        self._last_report = 0.0

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        resume = self.ctx.resume
        if resume is not None:
            from hqde_lightning.checkpoint import restore_rng_states

            restore_rng_states(resume.get("rng", {}))
        ctx, every = self.ctx, trainer.check_val_every_n_epoch
        if ctx.index == 0 and ctx.score_metric is not None and ctx.sync != "none" and every and ctx.sync_every_n_epochs % every:
            warnings.warn(
                f"HQDEStrategy: validation runs every {every} epochs (`check_val_every_n_epoch`) but syncs every"
                f" {ctx.sync_every_n_epochs}; if `score_metric={ctx.score_metric!r}` is a validation metric, a sync at an"
                " epoch without validation uses its latest value, from an earlier epoch. Make `sync_every_n_epochs` a"
                " multiple of `check_val_every_n_epoch` for fresh scores.",
                UserWarning,
                stacklevel=2,
            )
        # the state this member starts (or resumes) from, for checkpoints written before its next epoch end
        self._post_snapshot(trainer, trainer.current_epoch - 1)
        self._starts_epoch(trainer)  # (a fit resumed mid-epoch calls no `on_train_epoch_start` for that epoch)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the member's final state: what a checkpoint written after ``fit`` (even by the driver) resumes from
        self._post_snapshot(trainer, trainer.current_epoch - 1, final=True)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # the member's state where its fit failed: what the driver keeps of it (`strategy.ensemble`, an exception checkpoint)
        if isinstance(exception, MemberCancelled):  # (a member thread stopped because another failed can no longer post)
            return
        try:
            self._post_snapshot(trainer, trainer.current_epoch - 1, final=True)
        except Exception as err:  # your exception goes on as it is
            warnings.warn(f"HQDEStrategy: member {self.ctx.index}'s state where its fit failed could not be kept ({type(err).__name__}: {err}).")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._loss_sum, self._num_batches = None, 0
        start_epoch(trainer.train_dataloader, trainer.current_epoch)  # this epoch's order, resumed or not
        self._starts_epoch(trainer)

    def _starts_epoch(self, trainer: Trainer) -> None:
        """The member trains ``trainer.current_epoch``: it writes that epoch's checkpoints, not a higher member."""
        self.ctx.coordinator.starts_epoch.remote(self.ctx.index, trainer.current_epoch)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            loss = loss.detach().float()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._num_batches += 1
        try:
            self._num_samples += int(extract_batch_size(batch))
        except Exception:  # batches Lightning cannot size count as one sample
            self._num_samples += 1
        total = trainer.num_training_batches
        now = time.monotonic()
        if now - self._last_report > _PROGRESS_INTERVAL_S:
            self._last_report = now
            self._report_progress(trainer, batch_idx + 1, total, loss)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning runs the epoch-end validation before this hook, so `score_metric` holds this
        # epoch's value; this callback comes first, so checkpoints and early stopping taken at
        # train-epoch end (Lightning's default when validation runs every epoch) see synced weights
        self._sync_point(trainer, pl_module)
        self._post_snapshot(trainer, trainer.current_epoch)

    # ---------------------------------------------------------------- helpers
    def _report_progress(self, trainer: Trainer, batch: int, total: Any, loss: Any) -> None:
        loss_value = float(loss.item()) if isinstance(loss, Tensor) else None
        total_value = total if isinstance(total, int) else None
        self.ctx.coordinator.emit.remote(ProgressEvent(self.ctx.index, trainer.current_epoch, batch, total_value, loss_value))

    def score(self, trainer: Trainer) -> float | None:
        """This member's confidence for the aggregator: the monitored metric, or −mean train loss."""
        metric = None if self.ctx.score_metric is None else trainer.callback_metrics.get(self.ctx.score_metric)
        return confidence(self.ctx.score_metric, metric, self.ctx.score_mode, self._loss_sum, self._num_batches)

    def _sync_point(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.synced_epoch == epoch:
            return
        self.synced_epoch = epoch
        ctx = self.ctx
        if ctx.sync != "none" and (epoch + 1) % ctx.sync_every_n_epochs == 0:
            self._exchange(trainer, pl_module, epoch)
        self._report_progress(trainer, self._num_batches, trainer.num_training_batches, self._loss_sum / max(self._num_batches, 1) if self._loss_sum is not None else None)

    def _exchange(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        state = sync_state(pl_module)
        codec = next((cb for cb in trainer.callbacks if isinstance(cb, SyncCodec)), None)
        if codec is None:
            payload: Any = state_to_numpy(state)
        else:
            payload = codec.encode_for_sync(trainer, pl_module, dict(state))
        score = self.score(trainer)
        # the step Lightning logs this epoch's end-of-epoch metrics at: the round's rows go there too
        step = trainer.fit_loop.epoch_loop._batches_that_stepped - 1
        # passed by value: the coordinator keeps its own copy, which outlives this member if it dies during the round
        sync_call = self.ctx.coordinator.sync.remote(
            self.ctx.index, epoch, payload, payload_nbytes(payload), payload_layout(payload), score, self._num_samples, step
        )
        (consensus_ref,) = resolve(sync_call)
        consensus: dict[str, np.ndarray] = resolve(consensus_ref)
        self._num_samples = 0
        distance = distance_to_consensus(state, consensus)
        apply_sync_(state, consensus, self.ctx.sync, self.ctx.sync_strength)
        # sent to the driver's loggers (as ``member_{i}/hqde/distance_to_consensus``), not logged in the
        # member: the user's callbacks and ``trainer.callback_metrics`` see the user's metrics only
        self.ctx.coordinator.emit.remote(DistanceEvent(self.ctx.index, step, distance))

    def _post_snapshot(self, trainer: Trainer, epoch: int, final: bool = False) -> None:
        """Sends the coordinator this member's full Lightning checkpoint as of now, after epoch ``epoch``.

        Taken at each epoch's end (``on_train_epoch_end``, where Lightning's own end-of-epoch
        checkpoints are taken), when training starts and when the fit ends (``final``, waited
        for so that the driver finds it). It is what the writing member puts into
        whole-ensemble checkpoints for this member and what a restarted member resumes from.
        """
        snapshot = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        snapshot[MEMBER_KEY] = {"index": self.ctx.index, "round": epoch, "rng": capture_rng_states()}
        snapshot[EXTRAS_CANDIDATES] = module_extras_candidates(trainer.lightning_module)
        posted = self.ctx.coordinator.post_snapshot.remote(self.ctx.index, epoch, tree_to_cpu(snapshot), final)
        if final:
            resolve(posted)


def member_starts(ensemble: Any) -> dict[int, dict[str, Any]]:
    """Each member of ``ensemble`` by index: its weights, non-persistent buffers and plain attributes, where a fit that goes
    on from this ensemble starts it (:func:`go_on_from`)."""
    return {
        index: {
            "state_dict": {k: v.detach().cpu().clone() for k, v in member.state_dict().items()},
            "buffers": {k: v.detach().cpu().clone() for k, v in non_persistent_buffers(member).items()},
            "attributes": changed_attributes(plain_attributes(member), {}),
        }
        for index, member in zip(ensemble.member_ids, ensemble.members)
    }


def go_on_from(module: LightningModule, start: Mapping[str, Any]) -> None:
    """Puts a member's ``start`` (:func:`member_starts`) into ``module``: its weights, buffers and attributes."""
    module.load_state_dict(start["state_dict"])
    load_buffers(module, start["buffers"])
    vars(module).update(copy.deepcopy(start["attributes"]))


def rebuild(module: LightningModule) -> LightningModule:
    """A new instance of ``module``'s class from its saved hyperparameters (``save_hyperparameters()``): runs your ``__init__``."""
    hparams = dict(module.hparams)
    hparams_name = getattr(module, "_hparams_name", None)
    kwargs = {hparams_name: module.hparams} if hparams_name not in (None, "kwargs") else hparams
    return type(module)(**kwargs)


def seed_drawn_attributes(module: LightningModule) -> list[str]:
    """The plain attributes ``module``'s ``__init__`` draws at random (:func:`~hqde_lightning.attributes.drawn_attributes`),
    found by rebuilding it twice; none when it cannot be rebuilt (no saved hyperparameters, or the constructor fails)."""
    if not hasattr(module, "_hparams_initial") or not plain_attributes(module):
        return []
    try:
        return drawn_attributes(lambda: rebuild(module))
    except Exception:  # the user's constructor failing here fails `reinitialise` too, which says so
        return []


def reinitialise(module: LightningModule, drawn: Sequence[str] = ()) -> tuple[str, bool]:
    """Gives ``module`` fresh initial weights drawn from torch's global RNG (seeded per member).

    Preferred: build a new instance from ``module``'s class and its saved hyperparameters
    (:func:`rebuild`), which runs your own init code, and load its state dict into ``module``,
    its non-persistent buffers and the plain attributes named in ``drawn`` (those your ``__init__``
    draws at random, :func:`seed_drawn_attributes`). When that is not possible (no saved
    hyperparameters, the constructor fails, or the new state dict does not fit), calls
    ``reset_parameters()`` of every submodule that has it; parameters owned by modules without it
    keep their values.

    Returns:
        a notice for the driver saying which way was used, and whether it was the fallback.
    """
    name = type(module).__name__
    reason = f"{name} did not call `save_hyperparameters()`"
    if hasattr(module, "_hparams_initial"):
        try:
            fresh = rebuild(module)
            module.load_state_dict(fresh.state_dict())
            load_buffers(module, non_persistent_buffers(fresh))
            vars(module).update({attribute: vars(fresh)[attribute] for attribute in drawn if attribute in vars(fresh)})
            notice = f"member_init='independent': each member rebuilt {name} from its saved hyperparameters under its own seed"
            if drawn:
                notice += f"; the attributes {list(drawn)}, which `__init__` draws at random, are each member's own draw"
            return notice + ".", False
        except Exception as err:  # any failure of the user's constructor or a mismatched state leads to the fallback
            reason = f"rebuilding {name}(**hparams) failed ({type(err).__name__}: {err})"
    kept = []
    for path, sub in module.named_modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
        elif any(True for _ in sub.parameters(recurse=False)):
            kept.append(path or name)
    notice = (
        f"member_init='independent': {reason}, so each member called `reset_parameters()` of every submodule that has it"
        " under its own seed; custom initialisation done in `__init__` is lost."
    )
    if kept:
        notice += f" Parameters of {kept} (modules without `reset_parameters()`) keep the driver's initial values."
    return notice, True
