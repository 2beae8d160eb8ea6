"""``HQDEStrategy``: train an ensemble of copies of a LightningModule, in your process on one device or as Ray actors.

This is the driver's (your script's) strategy: it validates its arguments, hands ``fit`` to
:class:`~hqde_lightning.launcher.RayEnsembleLauncher`, evaluates the trained ensemble in
``validate``/``test``/``predict`` and writes/reads whole-ensemble checkpoints in the driver.
Inside each member actor the trainer runs with
:class:`~hqde_lightning.member_strategy.MemberStrategy` instead, configured by this one.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule
from lightning.pytorch.accelerators import Accelerator, CUDAAccelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from hqde_lightning.aggregation import Aggregator, Krum, MultiKrum, RobustAggregator, TrimmedMean, resolve_aggregator
from hqde_lightning.checkpoint import HQDE_KEY, AtomicCheckpointIO, ensemble_entries, ensemble_members, ensemble_section, load_checkpoint_file, read_checkpoint, seal_checkpoint
from hqde_lightning.ensemble import Combiner, Ensemble, non_finite_members, resolve_combiner, saved_combiner
from hqde_lightning.events import SyncRecord
from hqde_lightning.group import WAYS, Vectorize
from hqde_lightning.member import SYNC_MODES
from hqde_lightning.misconfiguration import InvalidArgument, lightning_arguments
from hqde_lightning.topology import Flat, Topology, aggregate, resolve_topology
from hqde_lightning.validation import ArgumentError, ArgumentTypeError, check_bool, check_choice, check_int, check_mapping, check_number, check_optional

__all__ = ["HQDEStrategy"]

_RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "resources")
#: the largest seed numpy and Lightning's ``seed_everything`` take
_MAX_SEED = 2**32 - 1
#: Ray's own resources, which ``ray.remote`` takes as keywords, not under ``resources``
_RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
MemberInit = Literal["independent", "shared"]
MEMBER_INITS: tuple[str, ...] = get_args(MemberInit)
ScoreMode = Literal["max", "min"]
FailurePolicy = Literal["fail", "continue"]


def _holds_members(filepath: _PATH) -> bool:
    """Whether ``filepath`` is a local whole-ensemble checkpoint that holds members' states."""
    if not os.path.isfile(filepath):
        return False
    try:
        return bool((load_checkpoint_file(filepath).get(HQDE_KEY) or {}).get("members"))
    except Exception:  # not one of ours, or damaged: Lightning's own saving goes on as in a plain fit
        return False


class HQDEStrategy(SingleDeviceStrategy):
    """Trains ``num_members`` copies of your LightningModule: on one device together in your process
    (a member group, or member threads; Ray is neither started nor imported), otherwise in Ray actors.

    Every member runs your unmodified Lightning fit loop with its own seed and data order
    (or bootstrap sample); at the end of every ``sync_every_n_epochs``-th epoch the members'
    weights are combined by ``aggregator`` and each member applies ``sync``. After ``fit``
    your module holds the consensus weights and :attr:`ensemble` holds every member;
    ``validate``/``test``/``predict`` evaluate the ensemble.

    Args:
        num_members: ensemble size (>= 1).
        aggregator: how member weights are combined: a name (``"mean"``, and the rules
            registered in :mod:`hqde_lightning.aggregation`) or an ``Aggregator`` instance.
        topology: how weights reach the consensus: ``"flat"`` (one coordinator), ``"tree"``
            (pairwise, ceil(log2 n) parallel rounds) or ``"mapreduce"`` (sharded by parameter
            across parallel reducers), or a ``Topology`` (see :mod:`hqde_lightning.topology`).
        outlier_threshold: turns on the Byzantine defence: members whose distance to the
            coordinate-wise median has a MAD z-score above this are left out of the round, and
            a reputation score (kept in checkpoints) down-weights repeat offenders. ``None``
            (default) turns it off. Needs ``topology="flat"``. Members sending NaN/Inf are
            always left out.
        sync: ``"none"`` (independent deep ensemble), ``"elastic"`` (w ← w + α(w̄ − w), pulled
            toward the consensus) or ``"replace"`` (w ← w̄, federated averaging).
        sync_strength: α for ``"elastic"``, in [0, 1].
        sync_every_n_epochs: sync at the end of every n-th training epoch (>= 1).
        bagging: each member trains on its own bootstrap sample of the training set
            (map-style datasets only) instead of the whole set in its own order.
        member_init: ``"independent"``: before its fit starts, each member draws fresh initial
            weights under its own seed (rebuilt from the module's class and saved
            hyperparameters, else ``reset_parameters()`` of every submodule); ``"shared"``: every
            member starts from the weights your module holds. ``None`` (default):
            ``"independent"`` for ``sync="none"``, ``"shared"`` for ``"elastic"``/``"replace"``
            (averaging needs a common start). Resuming from a checkpoint keeps its weights.
        combine: how member outputs are combined in ``validate``/``test``/``predict``:
            ``"auto"`` (class logits as probabilities once evaluation batches with integer class
            targets showed which output holds them, everything else averaged), ``"probability"``,
            ``"mean"`` or a ``Combiner`` (see :mod:`hqde_lightning.ensemble`).
        score_metric: a metric your module logs (e.g. ``"val_acc"``) used as each member's
            confidence by confidence-weighted aggregators; ``None`` uses −mean training loss.
            It is read at the sync point, after that epoch's validation, so each round uses the
            value of the weights being sent; a non-finite value is the lowest confidence.
        score_mode: ``"max"`` if a larger ``score_metric`` is better, ``"min"`` otherwise.
        ray_address: ``None`` starts a private local Ray instance when needed (listening on
            127.0.0.1 only, shut down after ``fit``); ``"auto"`` or ``"host:6379"`` joins an existing cluster (``"ray://host:10001"`` needs ``pip install "ray[client]"``).
        ray_init_kwargs: extra keyword arguments for ``ray.init`` (e.g. ``runtime_env``).
        resources_per_member: Ray resources of each member actor, keys among ``num_cpus``,
            ``num_gpus``, ``memory``, ``resources``. Default: the largest equal share of the
            CPU cores that packs every member onto the nodes, and when the Trainer's accelerator
            is CUDA a GPU share that packs onto whole GPUs (3 or 4 members on 2 GPUs: 0.5 each).
            Before any member starts, the requests are packed onto the nodes' resources; a
            member that fits nowhere fails the fit (at ``Trainer(...)`` when Ray is already
            connected) naming the member, its request and what the nodes offer.
        member_start_timeout_s: seconds a member may wait for its resources to become free
            (held by other actors or jobs) before the fit fails, naming what it waits for.
        seed: base seed; member ``i`` uses ``seed + i``. ``None`` draws one (logged).
        max_member_restarts: how often a member whose actor dies (process killed, node lost) is
            restarted from its last end-of-epoch snapshot, on the best-scoring node (see
            :mod:`hqde_lightning.placement`). Exceptions raised by your code are not retried.
            Members training in this process (a member group or member threads) have no actor to
            restart.
        on_member_failure: when a member has used up its restarts: ``"fail"`` stops the fit with
            an error (checkpoints written so far stay intact), ``"continue"`` finishes with the
            other members and says so.
        members_per_worker: how members share processes. ``"auto"`` (default): on one device
            (CPU only, or one GPU) without ``ray_address``, every member trains in one member
            group inside this process, stacked (see :mod:`hqde_lightning.group`), and Ray is not
            started; a fit the group cannot run (see :func:`~hqde_lightning.embedded.group_blocker`)
            trains each member's own fit in a thread of this process, one at a time, still without
            Ray (see :mod:`hqde_lightning.member_threads`; not with ``on_member_failure="continue"``,
            which keeps one actor per member). Elsewhere the members train in Ray actors: with
            several GPUs one actor per GPU (a whole GPU each), on a Ray cluster (``ray_address``)
            one per GPU or, on CPUs, per node, each training its share of the members as a group
            (see :mod:`hqde_lightning.group_actor`); one actor per member when
            ``resources_per_member`` is set or the members cannot share a process (saying why). An int ``k``: Ray actors of ``k`` members each (``1``: one per member;
            with ``k`` > 1 the CPUs, memory and custom resources of ``resources_per_member`` are multiplied by ``k``).
        vectorize: how a member group runs your steps: ``True`` with ``torch.func.vmap`` over the
            members, ``False`` member by member, ``"auto"`` (default) times the ways to run them on the first
            training steps (vmap; the loop, with Lightning's backward pass over the group or one per member
            as it runs; for a module with convolutions also with the members' convolution weights laid out
            channels-last) and keeps the fastest (all are logged). The name of a way (``"loop, channels-last,
            backward per member"``, as that log line gives it) trains that way without timing the others.
        accelerator, checkpoint_io, precision_plugin: as for any Lightning strategy
            (checkpoints are written atomically by default).
    """

    strategy_name = "hqde"

    def __init__(
        self,
        num_members: int = 4,
        aggregator: str | Aggregator = "mean",
        topology: str | Topology = "flat",
        outlier_threshold: float | None = None,
        sync: Literal["none", "elastic", "replace"] = "elastic",
        sync_strength: float = 0.5,
        sync_every_n_epochs: int = 1,
        bagging: bool = False,
        member_init: MemberInit | None = None,
        combine: str | Combiner = "auto",
        score_metric: str | None = None,
        score_mode: ScoreMode = "max",
        ray_address: str | None = None,
        ray_init_kwargs: Mapping[str, Any] | None = None,
        resources_per_member: Mapping[str, Any] | None = None,
        member_start_timeout_s: float = 300.0,
        seed: int | None = None,
        max_member_restarts: int = 1,
        on_member_failure: FailurePolicy = "fail",
        members_per_worker: Literal["auto"] | int = "auto",
        vectorize: Vectorize = "auto",
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(accelerator=accelerator, checkpoint_io=checkpoint_io or AtomicCheckpointIO(), precision_plugin=precision_plugin)
        with lightning_arguments("HQDEStrategy"):
            check_int(num_members, "num_members", 1)
            self.aggregator = resolve_aggregator(aggregator)
            self.combiner = resolve_combiner(combine)
            self.topology = resolve_topology(topology)
            self.topology.check(self.aggregator)
            if outlier_threshold is not None:
                check_number(outlier_threshold, "outlier_threshold", 0, open_low=True)
                if not isinstance(self.topology, Flat):
                    raise ValueError(
                        f"`outlier_threshold` compares whole weight vectors in the coordinator and needs `topology='flat'`,"
                        f" not {self.topology.name!r}"
                    )
                self.aggregator = RobustAggregator(self.aggregator, threshold=outlier_threshold)
            _check_rule_fits(self.aggregator, num_members)
            check_choice(sync, "sync", SYNC_MODES)
            check_number(sync_strength, "sync_strength", 0, 1)
            check_int(sync_every_n_epochs, "sync_every_n_epochs", 1)
            check_int(max_member_restarts, "max_member_restarts", 0)
            check_choice(on_member_failure, "on_member_failure", get_args(FailurePolicy))
            check_choice(score_mode, "score_mode", get_args(ScoreMode))
            check_optional(check_int, seed, "seed", 0)
            if seed is not None and seed + num_members - 1 > _MAX_SEED:  # member i draws from seed + i
                raise ArgumentError(
                    "seed", seed, f"<= {_MAX_SEED - num_members + 1} with num_members={num_members}",
                    "`{name}` must be {requirement} (member i draws from seed + i, and seeds go up to 2**32 - 1), got {value!r}",
                )
            check_number(member_start_timeout_s, "member_start_timeout_s", 0, open_low=True)
            check_bool(bagging, "bagging")
            if not (isinstance(vectorize, bool) or vectorize == "auto" or (isinstance(vectorize, str) and vectorize in WAYS)):
                raise ArgumentError("vectorize", vectorize, f"one of {['auto', True, False, *WAYS]}", "`{name}`: {value!r} is not known; choose {requirement}")
            if members_per_worker != "auto":
                check_int(members_per_worker, "members_per_worker", 1)
            check_optional(check_choice, member_init, "member_init", MEMBER_INITS)
            _check_ray_init_kwargs(ray_init_kwargs)
            resources_per_member = _check_resources(resources_per_member)
            if members_per_worker not in ("auto", 1) and resources_per_member.get("num_gpus"):
                raise ArgumentError(
                    "resources_per_member", resources_per_member, "no 'num_gpus' with `members_per_worker` > 1",
                    "`{name}={value!r}`: an actor of several members (`members_per_worker` > 1) trains them on one whole GPU"
                    " of its own; drop 'num_gpus', or use `members_per_worker=1` for a GPU share per member",
                )
        if ray_address is not None and not isinstance(ray_address, str):
            raise InvalidArgument(f"`HQDEStrategy(ray_address={ray_address!r})`: pass an address string such as 'auto' or 'head:6379', or None.")
        if score_metric is not None and not isinstance(score_metric, str):
            raise InvalidArgument(
                f"`HQDEStrategy(score_metric={score_metric!r})`: pass the name of a metric your module logs (e.g. 'val_acc'), or None."
            )
        self.num_members = num_members
        self.max_member_restarts = max_member_restarts
        self.on_member_failure = on_member_failure
        self.sync = sync
        self.sync_strength = float(sync_strength)
        self.sync_every_n_epochs = sync_every_n_epochs
        self.bagging = bagging
        self.members_per_worker = members_per_worker
        self.vectorize = vectorize
        #: ``"independent"`` or ``"shared"`` (the ``None`` default resolved from ``sync``)
        self.member_init = member_init if member_init is not None else ("independent" if sync == "none" else "shared")
        self.score_metric = score_metric
        self.score_mode = score_mode
        self.ray_address = ray_address
        self.ray_init_kwargs = dict(ray_init_kwargs or {})
        self.resources_per_member = resources_per_member
        self.member_start_timeout_s = float(member_start_timeout_s)
        self.seed = int(np.random.SeedSequence().entropy % (2**31)) if seed is None else seed
        #: every member after ``fit`` (or after loading an HQDE checkpoint), as one ``nn.Module``
        self.ensemble: Ensemble | None = None
        #: one :class:`~hqde_lightning.events.SyncRecord` per sync of the last fit (members, weights, bytes, seconds)
        self.sync_history: list[SyncRecord] = []
        self.coordinator_state: dict[str, Any] = {}
        #: members given up on during the last fit (``on_member_failure="continue"``)
        self.dropped_members: list[int] = []
        #: members left out of :attr:`ensemble` because their weights held NaN or Inf (after the
        #: last fit or checkpoint load); logged as ``ensemble/excluded_members`` (their number)
        self.excluded_members: list[int] = []
        #: the module the last fit trained (driver): fitting it again with this trainer goes on from :attr:`ensemble`
        self.trained_module: LightningModule | None = None
        #: while a fit goes on from the last one's ensemble (the same module fitted again, no ``ckpt_path``), each member's
        #: start there by index (:func:`~hqde_lightning.member.member_starts`), sent to the members with the fit
        self.continued_members: dict[int, dict[str, Any]] = {}
        #: the last checkpoint loaded that holds no ensemble (a plain Lightning one): ``validate``/``test``/``predict``
        #: from it evaluate the weights it holds, not :attr:`ensemble`
        self.plain_checkpoint: str | None = None
        self.parallel_devices: list[torch.device] | None = None
        self._num_nodes = 1
        # driver: each member's full Lightning checkpoint from the end of the last fit (weights of
        # ensemble members left out: they are read from ``ensemble`` when saving)
        self._final_checkpoints: dict[int, dict[str, Any]] = {}

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    # --------------------------------------------------- Trainer-time checks
    def _configure_launcher(self) -> None:
        """Called by ``Trainer(...)``: checks the accelerator, devices and (when Ray is connected) the members' resources."""
        from hqde_lightning.devices import check_devices, ray_connected
        from hqde_lightning.launcher import RayEnsembleLauncher

        check_devices(self)
        self._launcher = RayEnsembleLauncher(self)
        if ray_connected():  # the cluster the fit will use is known: check that the members fit it now
            from hqde_lightning.resources import check_resources

            check_resources(self)

    def default_gpus_per_member(self, num_gpus: int) -> float:
        """Each member's share of ``num_gpus`` GPUs: one each when there are enough, else 1/k with
        k = ceil(num_members / num_gpus) members per GPU, so the shares pack onto whole GPUs
        (3 members on 2 GPUs: 0.5 each, never 0.667, which would leave the third with no GPU)."""
        if num_gpus <= 0:
            return 0.0
        # rounded down to Ray's resource step (1e-4), so that k shares never exceed one GPU
        return math.floor(1e4 / math.ceil(self.num_members / num_gpus)) / 1e4

    @property
    def root_device(self) -> torch.device:
        """The driver's device (where ``validate``/``test``/``predict`` run the ensemble): the Trainer's first GPU, or the CPU."""
        if isinstance(self.accelerator, CUDAAccelerator):
            return (self.parallel_devices or [torch.device("cuda", 0)])[0]
        return torch.device("cpu")

    @property
    def members_are_independent(self) -> bool:
        """Whether the members neither share a start nor ever sync (``sync="none"``, ``member_init="independent"``: a deep ensemble)."""
        return self.sync == "none" and self.member_init == "independent"

    def module_state(
        self, states: Sequence[Mapping[str, Any]], aggregator: Aggregator | None = None, scores: Sequence[float | None] | None = None, members: Sequence[int] | None = None
    ) -> dict[str, Any]:
        """The weights your module holds after the fit, and a whole-ensemble checkpoint's top-level ``state_dict``.

        The members' consensus (``aggregator``'s, default a copy of this strategy's), unless the members are independent
        (:attr:`members_are_independent`): then the first finite member's own weights (member 0, as its metrics show
        under the plain names), since an average of independently initialised networks is no model anyone trained.
        """
        if self.members_are_independent:
            non_finite = set(non_finite_members(states))
            return dict(next((state for i, state in enumerate(states) if i not in non_finite), states[0]))
        rule = aggregator if aggregator is not None else copy.deepcopy(self.aggregator)
        return aggregate(rule, states, scores, members=members).state

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Writes ``checkpoint`` with the driver's ensemble (every member) in ``checkpoint['hqde']``.

        The section also gets the SHA-256 checksums of the consensus and of every member's
        weights, verified whenever the file is loaded. Holding no ensemble (a fit that failed),
        it leaves a file that holds members alone: the members' copies of an
        ``OnExceptionCheckpoint`` wrote their states there as they failed.
        """
        if self.ensemble is None and _holds_members(filepath):
            rank_zero_info(f"HQDEStrategy: kept {filepath}: it holds the members' states, which this driver, without an ensemble, would replace with none.")
            return
        section = ensemble_section(self, *ensemble_members(self.ensemble, self._final_checkpoints, self.num_members), self.coordinator_state)
        section["temperature"] = 1.0 if self.ensemble is None else float(self.ensemble.temperature)
        self.checkpoint_io.save_checkpoint(seal_checkpoint(checkpoint, section), filepath, storage_options=storage_options)

    def keep_final_checkpoints(self, snapshots: Mapping[int, dict[str, Any]]) -> None:
        """Driver: keeps each member's final snapshot for :meth:`save_checkpoint` (see ``_final_checkpoints``).

        Called once :attr:`ensemble` is built: the weights of its members are read from it when saving.
        """
        in_ensemble = set(self.ensemble.member_ids) if self.ensemble is not None else set()
        self._final_checkpoints = {
            i: {k: v for k, v in snapshot.items() if not (k == "state_dict" and i in in_ensemble)} for i, snapshot in snapshots.items() if snapshot
        }

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Loads a checkpoint in the driver; from an HQDE checkpoint the ensemble is rebuilt.

        The file is read with ``torch.load(weights_only=True)`` unless you pass
        ``weights_only=False`` (``trainer.fit(..., weights_only=False)``; only for files you
        trust). A damaged file, or weights that do not match the checksums written with them,
        raise an error naming the file (and the member). For ``validate``/``test``/``predict``
        with ``ckpt_path`` the ensemble is rebuilt from the members' entries, without members
        whose weights hold NaN or Inf (listed in :attr:`excluded_members`). (Inside the members,
        :class:`~hqde_lightning.member_strategy.MemberStrategy` resumes each from its own entry.)
        """
        load = super().load_checkpoint
        checkpoint = read_checkpoint(checkpoint_path, lambda: load(checkpoint_path, weights_only=weights_only is not False))
        section = checkpoint.get(HQDE_KEY)
        holds_members = section is not None and bool(section.get("members"))
        self.plain_checkpoint = None if holds_members else str(checkpoint_path)
        if holds_members and self.lightning_module is not None:
            self.coordinator_state = dict(section.get("coordinator") or {})
            # the combiner of an ensemble already evaluated keeps what it learnt (which output holds class logits)
            combiner = saved_combiner(self.combiner, section) if self.ensemble is None else self.ensemble.combiner
            states, active, extras = ensemble_entries(checkpoint)
            self.ensemble = Ensemble.from_states(
                self.lightning_module, states, weights=section.get("weights"), active=active, combine=combiner,
                buffers=[e["buffers"] for e in extras], attributes=[e["attributes"] for e in extras],
                temperature=float(section.get("temperature", 1.0)),
            ).eval()
            self.excluded_members = list(self.ensemble.excluded_members)
            self.keep_final_checkpoints(dict(enumerate(section["members"])))
        return checkpoint

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # driver-only state: the launcher holds Ray handles, the ensemble is what members produce
        state["_launcher"] = None
        state["ensemble"] = None
        state["sync_history"] = []
        state["_final_checkpoints"] = {}
        state["trained_module"] = None
        state["plain_checkpoint"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"HQDEStrategy(num_members={self.num_members}, aggregator={self.aggregator!r}, topology={self.topology!r}, sync={self.sync!r},"
            f" sync_strength={self.sync_strength}, sync_every_n_epochs={self.sync_every_n_epochs}, bagging={self.bagging},"
            f" member_init={self.member_init!r}, seed={self.seed})"
        )


def _check_rule_fits(aggregator: Aggregator, num_members: int) -> None:
    """Refuses rules that cannot run on ``num_members`` members; warns about ones that would do nothing."""
    rule = aggregator.inner if isinstance(aggregator, RobustAggregator) else aggregator
    if isinstance(rule, (Krum, MultiKrum)) and num_members <= 2 * rule.num_byzantine + 2:
        raise ValueError(
            f"{type(rule).__name__}(num_byzantine={rule.num_byzantine}) needs n > 2f + 2 members, got num_members={num_members};"
            f" use at least {2 * rule.num_byzantine + 3} members or a smaller `num_byzantine`"
        )
    if isinstance(rule, TrimmedMean) and int(rule.beta * num_members) == 0:
        rank_zero_warn(f"TrimmedMean(beta={rule.beta}) trims no member out of {num_members}: it is the plain mean. Raise `beta` to at least {1 / num_members:.3f}.")


def _check_ray_init_kwargs(kwargs: Any) -> None:
    """Refuses ``ray_init_kwargs`` that are not a mapping of ``ray.init`` keywords, or that carry the address."""
    if "address" in check_mapping(kwargs, "ray_init_kwargs"):
        raise InvalidArgument(
            f"`HQDEStrategy(ray_init_kwargs={{'address': {kwargs['address']!r}, ...}})`: pass the cluster address as"
            f" `HQDEStrategy(ray_address={kwargs['address']!r})` instead; `ray_init_kwargs` holds the other `ray.init` arguments."
        )


def _check_resources(resources: Mapping[str, Any] | None) -> dict[str, Any]:
    """``resources_per_member`` as a dict, once its keys and numbers (>= 0, a GPU share <= 1) are checked."""
    resources = check_mapping(resources, "resources_per_member", _RESOURCE_KEYS)
    for key in ("num_cpus", "num_gpus", "memory"):
        check_optional(check_number, resources.get(key), f"resources_per_member['{key}']", 0)
    custom = check_mapping(resources.get("resources"), "resources_per_member['resources']")
    builtin = [key for key in custom if key in _RAY_BUILTIN_RESOURCES]
    if builtin:
        raise InvalidArgument(
            f"`resources_per_member['resources']` names Ray's own resources {builtin}: give CPUs, GPUs and memory as"
            " `resources_per_member={'num_cpus': ..., 'num_gpus': ..., 'memory': ...}`; `resources` holds custom resources only."
        )
    for key, amount in custom.items():
        if not isinstance(key, str):
            raise ArgumentTypeError("resources_per_member['resources']", custom, "a dict of custom resource names (strings) to amounts >= 0")
        check_number(amount, f"resources_per_member['resources'][{key!r}]", 0)
    if resources.get("num_gpus", 0) > 1:
        raise ValueError(f"`resources_per_member['num_gpus']={resources['num_gpus']!r}`: a member trains on one device, so use a value in [0, 1].")
    return resources
