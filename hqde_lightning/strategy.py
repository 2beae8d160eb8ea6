"""``HQDEStrategy``: train an ensemble of copies of a LightningModule as parallel Ray actors.

The strategy has two faces. In the driver (your script) it validates its arguments, hands
``fit`` to :class:`~hqde_lightning.launcher.RayEnsembleLauncher` and evaluates the trained
ensemble in ``validate``/``test``/``predict``. Inside each member actor it behaves like a
single-device strategy on that member's device, and makes one member at a time (the
lowest-index one still training) write checkpoints that hold the whole ensemble.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.accelerators import Accelerator, CPUAccelerator, CUDAAccelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.strategies.launchers.launcher import _Launcher
from lightning.pytorch.utilities.data import _update_dataloader
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler, SubsetRandomSampler

from hqde_lightning.aggregation import Aggregator, Krum, MultiKrum, RobustAggregator, TrimmedMean, resolve_aggregator
from hqde_lightning.checkpoint import HQDE_KEY, AtomicCheckpointIO, capture_rng_states, ensemble_entries, member_checksums, read_checkpoint, to_safe_types
from hqde_lightning.ensemble import Combiner, Ensemble, resolve_combiner
from hqde_lightning.member import MEMBER_KEY, SYNC_MODES, MemberContext, MemberSync
from hqde_lightning.topology import Flat, Topology, resolve_topology

__all__ = ["HQDEStrategy"]

_RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "resources")
MEMBER_INITS = ("independent", "shared")


class HQDEStrategy(Strategy):
    """Trains ``num_members`` copies of your LightningModule in parallel Ray actors.

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
        on_member_failure: when a member has used up its restarts: ``"fail"`` stops the fit with
            an error (checkpoints written so far stay intact), ``"continue"`` finishes with the
            other members and says so.
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
        sync: str = "elastic",
        sync_strength: float = 0.5,
        sync_every_n_epochs: int = 1,
        bagging: bool = False,
        member_init: str | None = None,
        combine: str | Combiner = "auto",
        score_metric: str | None = None,
        score_mode: str = "max",
        ray_address: str | None = None,
        ray_init_kwargs: Mapping[str, Any] | None = None,
        resources_per_member: Mapping[str, Any] | None = None,
        member_start_timeout_s: float = 300.0,
        seed: int | None = None,
        max_member_restarts: int = 1,
        on_member_failure: str = "fail",
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(accelerator=accelerator, checkpoint_io=checkpoint_io or AtomicCheckpointIO(), precision_plugin=precision_plugin)
        if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
            raise MisconfigurationException(f"`HQDEStrategy(num_members={num_members!r})`: `num_members` must be an integer >= 1.")
        try:
            self.aggregator = resolve_aggregator(aggregator)
            self.combiner = resolve_combiner(combine)
            self.topology = resolve_topology(topology)
            self.topology.check(self.aggregator)
            if outlier_threshold is not None:
                if not isinstance(self.topology, Flat):
                    raise ValueError(
                        f"`outlier_threshold` compares whole weight vectors in the coordinator and needs `topology='flat'`,"
                        f" not {self.topology.name!r}"
                    )
                self.aggregator = RobustAggregator(self.aggregator, threshold=outlier_threshold)
            _check_rule_fits(self.aggregator, num_members)
        except (ValueError, TypeError) as err:
            raise MisconfigurationException(f"HQDEStrategy: {err}") from err
        if sync not in SYNC_MODES:
            raise MisconfigurationException(f"`HQDEStrategy(sync={sync!r})` is not known; choose one of {list(SYNC_MODES)}.")
        if isinstance(sync_strength, bool) or not isinstance(sync_strength, (int, float)) or not 0.0 <= float(sync_strength) <= 1.0:
            raise MisconfigurationException(f"`HQDEStrategy(sync_strength={sync_strength!r})`: `sync_strength` must be a number in [0, 1].")
        if isinstance(sync_every_n_epochs, bool) or not isinstance(sync_every_n_epochs, int) or sync_every_n_epochs < 1:
            raise MisconfigurationException(f"`HQDEStrategy(sync_every_n_epochs={sync_every_n_epochs!r})`: must be an integer >= 1.")
        if isinstance(max_member_restarts, bool) or not isinstance(max_member_restarts, int) or max_member_restarts < 0:
            raise MisconfigurationException(f"`HQDEStrategy(max_member_restarts={max_member_restarts!r})`: must be an integer >= 0.")
        if on_member_failure not in ("fail", "continue"):
            raise MisconfigurationException(f"`HQDEStrategy(on_member_failure={on_member_failure!r})`: choose 'fail' or 'continue'.")
        if score_mode not in ("max", "min"):
            raise MisconfigurationException(f"`HQDEStrategy(score_mode={score_mode!r})`: choose 'max' or 'min'.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise MisconfigurationException(f"`HQDEStrategy(seed={seed!r})`: `seed` must be a non-negative integer or None.")
        if ray_address is not None and not isinstance(ray_address, str):
            raise MisconfigurationException(f"`HQDEStrategy(ray_address={ray_address!r})`: pass an address string such as 'auto' or 'head:6379', or None.")
        if (
            isinstance(member_start_timeout_s, bool)
            or not isinstance(member_start_timeout_s, (int, float))
            or not math.isfinite(member_start_timeout_s)
            or member_start_timeout_s <= 0
        ):
            raise MisconfigurationException(f"`HQDEStrategy(member_start_timeout_s={member_start_timeout_s!r})`: must be a finite number of seconds > 0.")
        if not isinstance(bagging, bool):
            raise MisconfigurationException(f"`HQDEStrategy(bagging={bagging!r})`: `bagging` must be True or False.")
        if member_init is not None and member_init not in MEMBER_INITS:
            raise MisconfigurationException(f"`HQDEStrategy(member_init={member_init!r})` is not known; choose one of {list(MEMBER_INITS)} or None.")
        if score_metric is not None and not isinstance(score_metric, str):
            raise MisconfigurationException(
                f"`HQDEStrategy(score_metric={score_metric!r})`: pass the name of a metric your module logs (e.g. 'val_acc'), or None."
            )
        _check_ray_init_kwargs(ray_init_kwargs)
        self.num_members = num_members
        self.max_member_restarts = max_member_restarts
        self.on_member_failure = on_member_failure
        self.sync = sync
        self.sync_strength = float(sync_strength)
        self.sync_every_n_epochs = sync_every_n_epochs
        self.bagging = bagging
        #: ``"independent"`` or ``"shared"`` (the ``None`` default resolved from ``sync``)
        self.member_init = member_init if member_init is not None else ("independent" if sync == "none" else "shared")
        self.score_metric = score_metric
        self.score_mode = score_mode
        self.ray_address = ray_address
        self.ray_init_kwargs = dict(ray_init_kwargs or {})
        self.resources_per_member = _check_resources(resources_per_member)
        self.member_start_timeout_s = float(member_start_timeout_s)
        self.seed = int(np.random.SeedSequence().entropy % (2**31)) if seed is None else seed
        #: every member after ``fit`` (or after loading an HQDE checkpoint), as one ``nn.Module``
        self.ensemble: Ensemble | None = None
        #: per-sync statistics of the last fit (members, weights, distances, bytes, seconds)
        self.sync_history: list[dict[str, Any]] = []
        self.coordinator_state: dict[str, Any] = {}
        #: members given up on during the last fit (``on_member_failure="continue"``)
        self.dropped_members: list[int] = []
        #: members left out of :attr:`ensemble` because their weights held NaN or Inf (after the
        #: last fit or checkpoint load); logged as ``ensemble/excluded_members`` (their number)
        self.excluded_members: list[int] = []
        self.parallel_devices: list[torch.device] | None = None
        self._num_nodes = 1
        self._member: MemberContext | None = None
        self._member_sync: MemberSync | None = None
        # the epoch this member was last confirmed as the checkpoint writer for
        self._writer_epoch: int | None = None
        # driver: each member's full Lightning checkpoint from the end of the last fit (weights of
        # ensemble members left out: they are read from ``ensemble`` when saving)
        self._final_checkpoints: dict[int, dict[str, Any]] = {}

    # --------------------------------------------------------------- identity
    @property
    def is_member(self) -> bool:
        """True inside a member actor, False in the driver."""
        return self._member is not None

    @property
    def member_index(self) -> int | None:
        return None if self._member is None else self._member.index

    def _enter_member_mode(self, context: MemberContext) -> None:
        self._member = context

    # every member is a world of its own: Lightning's rank-0 code paths run in each of them
    global_rank = 0
    local_rank = 0
    node_rank = 0
    world_size = 1

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    # --------------------------------------------------- Trainer-time checks
    def _configure_launcher(self) -> None:
        """Called by ``Trainer(...)``: validates the accelerator/devices and, for a cluster, Ray's address."""
        accelerator = self.accelerator
        if not isinstance(accelerator, (CPUAccelerator, CUDAAccelerator)):
            raise MisconfigurationException(
                f"HQDEStrategy runs members on CPU or CUDA devices, not on `{type(accelerator).__name__}`:"
                " use `Trainer(accelerator='cpu')` or `Trainer(accelerator='gpu')`."
            )
        if self._num_nodes != 1:
            raise MisconfigurationException(
                f"`Trainer(num_nodes={self._num_nodes})` does not apply to HQDEStrategy: Ray places members on the"
                " nodes of its cluster. Leave `num_nodes=1` and pass `HQDEStrategy(ray_address=...)`."
            )
        devices = self.parallel_devices or []
        if isinstance(accelerator, CPUAccelerator) and len(devices) > 1:
            raise MisconfigurationException(
                f"`Trainer(accelerator='cpu', devices={len(devices)})` asks for {len(devices)} CPU processes; HQDEStrategy"
                " runs one process per member instead. Leave `devices` at 1 or 'auto' and set `num_members`"
                " (and `resources_per_member={'num_cpus': ...}`)."
            )
        requested_gpus = float(self.resources_per_member.get("num_gpus", 0))
        if isinstance(accelerator, CPUAccelerator) and requested_gpus > 0:
            raise MisconfigurationException(
                f"`resources_per_member={{'num_gpus': {requested_gpus}}}` asks for GPUs but the Trainer's accelerator is the CPU:"
                " use `Trainer(accelerator='gpu')` or drop `num_gpus`."
            )
        if self.ray_address is not None:
            from hqde_lightning.launcher import connect_ray

            connect_ray(self.ray_address, self.ray_init_kwargs)
        if isinstance(accelerator, CUDAAccelerator):
            available = self._available_gpus(len(devices))
            per_member = requested_gpus if requested_gpus > 0 else self.default_gpus_per_member(len(devices))
            per_gpu = math.floor(1.0 / per_member + 1e-9) if per_member > 0 else self.num_members
            if per_gpu * available < self.num_members:
                raise MisconfigurationException(
                    f"HQDEStrategy(num_members={self.num_members}) with {per_member:g} GPU per member needs"
                    f" {math.ceil(self.num_members / max(per_gpu, 1))} GPUs, but only {available} exist ({per_gpu} member(s)"
                    " fit on one GPU: a member's share must fit within one GPU). Lower `num_members` or"
                    " `resources_per_member['num_gpus']`."
                )
        from hqde_lightning.launcher import RayEnsembleLauncher

        self._launcher = RayEnsembleLauncher(self)
        import ray

        if ray.is_initialized():  # the cluster the fit will use is known: check that the members fit it now
            self._launcher.check_resources()

    def _available_gpus(self, trainer_devices: int) -> int:
        if self.ray_address is not None:
            import ray

            return int(ray.cluster_resources().get("GPU", 0))
        return trainer_devices

    def default_gpus_per_member(self, num_gpus: int) -> float:
        """Each member's share of ``num_gpus`` GPUs: one each when there are enough, else 1/k with
        k = ceil(num_members / num_gpus) members per GPU, so the shares pack onto whole GPUs
        (3 members on 2 GPUs: 0.5 each, never 0.667, which would leave the third with no GPU)."""
        if num_gpus <= 0:
            return 0.0
        # rounded down to Ray's resource step (1e-4), so that k shares never exceed one GPU
        return math.floor(1e4 / math.ceil(self.num_members / num_gpus)) / 1e4

    @property
    def launcher(self) -> _Launcher | None:
        return None if self.is_member else self._launcher

    # ------------------------------------------------------ single-device face
    @property
    def root_device(self) -> torch.device:
        if isinstance(self.accelerator, CUDAAccelerator):
            # inside a member, Ray's CUDA_VISIBLE_DEVICES shows the member's own GPU as device 0
            return torch.device("cuda", 0) if self.is_member else (self.parallel_devices or [torch.device("cuda", 0)])[0]
        return torch.device("cpu")

    def model_to_device(self) -> None:
        assert self.model is not None, "self.model must be set before self.model.to()"
        self.model.to(self.root_device)

    @property
    def is_global_zero(self) -> bool:
        """True in the driver, and in the member that writes checkpoints now (see :meth:`_writes_checkpoints`)."""
        return self._writes_checkpoints()

    def _writes_checkpoints(self) -> bool:
        """Whether this process writes checkpoints: the driver, or the member the coordinator names for this epoch.

        The writer of an epoch is the lowest-index member that trains in it, so the role moves to
        the next member when member 0 stops early or is given up on (``Coordinator.is_writer``).
        """
        if self._member is None or self._member.index == 0:
            return True
        module = self.lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        epoch = trainer.current_epoch if trainer is not None else 0
        if self._writer_epoch == epoch:
            return True
        import ray

        if ray.get(self._member.coordinator.is_writer.remote(self._member.index, epoch)):
            self._writer_epoch = epoch  # a member that became the writer stays it: lower ones have finished
            return True
        return False

    def reduce(self, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        # members are different models: their metrics are never averaged together
        return tensor

    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        return tensor

    def barrier(self, name: str | None = None) -> None:
        pass

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    # ------------------------------------------------------------------ data
    def process_dataloader(self, dataloader: object) -> object:
        """Inside a member: gives the training loader the member's own data order.

        With ``bagging=True`` the loader draws the member's bootstrap sample. Otherwise every
        ``torch.Generator`` the loader carries (its sampler's or batch sampler's ``generator``
        attribute, and the loader's own ``generator``, from which worker seeds are drawn) is
        replaced by one seeded from ``(seed, member index, epoch)``, so a loader built with
        ``shuffle=True, generator=torch.Generator().manual_seed(0)`` no longer gives every member
        the same order. Samplers without a generator draw from torch's global RNG, which each
        member seeds with its own seed. Left as they are, with one warning in the driver: a
        ``SequentialSampler`` (``shuffle=False``: the order you asked for; no warning), custom
        samplers without a ``generator`` attribute and iterable datasets.
        """
        if not (self.is_member and self.lightning_module is not None):
            return dataloader
        trainer = self.lightning_module.trainer
        if not trainer.training or not isinstance(dataloader, DataLoader):
            return dataloader
        assert self._member is not None
        seeds = np.random.SeedSequence([self.seed, self._member.index, trainer.current_epoch]).generate_state(1)
        generator = torch.Generator().manual_seed(int(seeds[0]))
        if self.bagging:
            dataloader = self._bootstrap_loader(dataloader)
        else:
            self._reseed_sampler(dataloader, generator)
        if isinstance(dataloader.generator, torch.Generator):
            dataloader.generator = generator
        return dataloader

    def _bootstrap_loader(self, dataloader: DataLoader) -> DataLoader:
        """The loader re-built around a ``SubsetRandomSampler`` over the member's bootstrap sample."""
        dataset = dataloader.dataset
        if not hasattr(dataset, "__len__") or isinstance(dataset, IterableDataset):
            raise MisconfigurationException(
                "`HQDEStrategy(bagging=True)` needs a map-style training dataset with a length;"
                f" got {type(dataset).__name__}. Use `bagging=False` for iterable datasets."
            )
        assert self._member is not None
        rng = np.random.default_rng([self.seed, self._member.index])
        indices = rng.integers(0, len(dataset), size=len(dataset)).tolist()
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        return _update_dataloader(dataloader, SubsetRandomSampler(indices, generator=generator))

    def _reseed_sampler(self, dataloader: DataLoader, generator: torch.Generator) -> None:
        """Puts ``generator`` into the sampler that orders ``dataloader``'s batches, when it has one."""
        if isinstance(dataloader.dataset, IterableDataset):
            self._warn_driver(
                f"the training dataset is iterable ({type(dataloader.dataset).__name__}): HQDEStrategy cannot give each member"
                " its own order, so members read the same stream unless the dataset draws from torch's, numpy's or"
                " Python's global RNG (seeded per member). Shuffle inside the dataset with such a draw, or use a map-style dataset."
            )
            return
        batch_sampler = dataloader.batch_sampler
        custom_batches = batch_sampler is not None and type(batch_sampler) is not BatchSampler
        sampler = batch_sampler if custom_batches else dataloader.sampler
        if isinstance(sampler, SequentialSampler):
            return
        if isinstance(getattr(sampler, "generator", None), torch.Generator):
            sampler.generator = generator
        elif not hasattr(sampler, "generator"):
            self._warn_driver(
                f"the training loader's {'batch sampler' if custom_batches else 'sampler'} {type(sampler).__name__} has no"
                " `generator` attribute, so HQDEStrategy cannot give each member its own order: members share it unless the"
                " sampler draws from torch's, numpy's or Python's global RNG (seeded per member). Give it a `generator`"
                " attribute (a torch.Generator) to have it re-seeded per member."
            )

    def _warn_driver(self, message: str) -> None:
        """Inside a member: has the driver show ``message`` as a warning (once, however many members send it)."""
        assert self._member is not None
        self._member.coordinator.emit.remote(("warning", self._member.index, f"HQDEStrategy: {message}"))

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """The driver, or the member writing checkpoints now, writes the checkpoint with every member in ``checkpoint['hqde']``.

        The section also gets the SHA-256 checksums of the consensus and of every member's
        weights, verified whenever the file is loaded.
        """
        if not self._writes_checkpoints():
            return
        checkpoint = dict(checkpoint)
        section, consensus = self._member_checkpoint_section(checkpoint) if self.is_member else self._driver_checkpoint_section()
        if consensus is not None:
            checkpoint["state_dict"] = consensus
        section["checksums"] = member_checksums(checkpoint.get("state_dict"), section["members"])
        checkpoint[HQDE_KEY] = section
        self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def _section(self, members: list[dict[str, Any]], weights: Any, active: Any) -> dict[str, Any]:
        return {
            "num_members": self.num_members,
            "seed": self.seed,
            "sync": self.sync,
            "aggregator": getattr(self.aggregator, "name", type(self.aggregator).__name__),
            "combine": self.combiner.name or "auto",
            "members": members,
            "weights": weights,
            "active": active,
            # plain types only, so that the file loads with ``weights_only=True``
            "coordinator": to_safe_types(self.coordinator_state),
        }

    def _member_checkpoint_section(self, checkpoint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
        """The writing member's own state plus every other member's latest snapshot."""
        import ray

        assert self._member is not None and self._member_sync is not None and self.lightning_module is not None
        trainer = self.lightning_module.trainer
        index = self._member.index
        epoch = trainer.current_epoch
        # the members' snapshots of round r are taken at the end of epoch r; a save before this
        # epoch's sync point (a mid-epoch, step-based checkpoint) can only pair with round r - 1
        # (round -1: the snapshots every member posts when its training starts)
        round_id = epoch if self._member_sync.synced_epoch == epoch else epoch - 1
        own = {k: v for k, v in checkpoint.items() if k != HQDE_KEY}
        own[MEMBER_KEY] = {"index": index, "round": round_id, "rng": capture_rng_states()}
        members: list[dict[str, Any]] = [{} for _ in range(self.num_members)]
        members[index] = own
        coordinator = self._member.coordinator
        if self.num_members > 1:
            if round_id != epoch:
                rank_zero_warn("HQDEStrategy: a checkpoint written mid-epoch holds the other members as of their last epoch end (or their start).")
            for other, snapshot in ray.get(coordinator.snapshots_at.remote(round_id, index)).items():
                members[other] = snapshot
        self.coordinator_state = ray.get(coordinator.state_dict.remote())
        states = [m["state_dict"] for m in members if m]
        consensus = copy.deepcopy(self.aggregator)(states).state
        return self._section(members, None, None), consensus

    def _driver_checkpoint_section(self) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
        """The driver's ensemble: every member's full Lightning state from the end of the fit, with its current weights.

        Members that are not in :attr:`ensemble` (given up on during the fit) keep their last
        snapshot and are marked inactive, so the file both resumes and loads as the ensemble.
        """
        if self.ensemble is None:
            return self._section([], None, None), None
        n = self.num_members
        members = [dict(self._final_checkpoints.get(i, {})) for i in range(n)]
        weights = torch.zeros(n, dtype=torch.float64)
        active = torch.zeros(n, dtype=torch.bool)
        for position, index in enumerate(self.ensemble.member_ids):
            members[index]["state_dict"] = {k: v.detach().cpu() for k, v in self.ensemble.members[position].state_dict().items()}
            weights[index] = self.ensemble.weights[position].cpu()
            active[index] = self.ensemble.active[position].cpu()
        section = self._section(members, weights, active)
        section["temperature"] = float(self.ensemble.temperature)
        return section, None

    def _keep_final_checkpoints(self, snapshots: Mapping[int, dict[str, Any]]) -> None:
        """Driver: keeps each member's final snapshot for :meth:`_driver_checkpoint_section` (see ``_final_checkpoints``).

        Called once :attr:`ensemble` is built: the weights of its members are read from it when saving.
        """
        in_ensemble = set(self.ensemble.member_ids) if self.ensemble is not None else set()
        self._final_checkpoints = {
            i: {k: v for k, v in snapshot.items() if not (k == "state_dict" and i in in_ensemble)} for i, snapshot in snapshots.items() if snapshot
        }

    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self._writes_checkpoints():
            self.checkpoint_io.remove_checkpoint(filepath)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Loads a checkpoint; from an HQDE checkpoint each member resumes its own full state.

        The file is read with ``torch.load(weights_only=True)`` unless you pass
        ``weights_only=False`` (``trainer.fit(..., weights_only=False)``; only for files you
        trust). A damaged file, or weights that do not match the checksums written with them,
        raise an error naming the file (and the member).

        Inside member ``i`` the whole checkpoint is replaced by member ``i``'s entry (weights,
        optimizer, loops, callback states, RNG); a member without an entry starts from the
        consensus, and an entry holding weights only (files of older versions) is completed
        from the checkpoint's top level with a fresh optimizer state. In the driver
        (``validate``/``test``/``predict`` with ``ckpt_path``) the ensemble is rebuilt from the
        entries, without members whose weights hold NaN or Inf (listed in :attr:`excluded_members`).
        """
        load = super().load_checkpoint
        checkpoint = read_checkpoint(checkpoint_path, lambda: load(checkpoint_path, weights_only=weights_only is not False))
        section = checkpoint.get(HQDE_KEY)
        if self.is_member:
            assert self._member is not None and self._member_sync is not None
            if section is not None:
                saved = int(section["num_members"])
                if saved != self.num_members:
                    raise MisconfigurationException(
                        f"{checkpoint_path} holds {saved} members but `HQDEStrategy(num_members={self.num_members})`;"
                        f" resume with `num_members={saved}`."
                    )
                checkpoint = _member_resume_checkpoint(checkpoint, section["members"][self._member.index], self._member.index)
                if self._member.index == 0 and section.get("coordinator"):
                    self._member.coordinator.load_state_dict.remote(section["coordinator"])
            if MEMBER_KEY in checkpoint:
                self._member_sync.ctx.resume = checkpoint[MEMBER_KEY]
        elif section is not None and section.get("members") and self.lightning_module is not None:
            self.coordinator_state = dict(section.get("coordinator") or {})
            # the combiner of an ensemble already evaluated keeps what it learnt (which output holds class logits)
            combiner = self.combiner if self.ensemble is None else self.ensemble.combiner
            states, active = ensemble_entries(checkpoint)
            self.ensemble = Ensemble.from_states(
                self.lightning_module, states, weights=section.get("weights"), active=active, combine=combiner,
                temperature=float(section.get("temperature", 1.0)),
            ).eval()
            self.excluded_members = list(self.ensemble.excluded_members)
            self._keep_final_checkpoints(dict(enumerate(section["members"])))
        return checkpoint

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # driver-only state: the launcher holds Ray handles, the ensemble is what members produce
        state["_launcher"] = None
        state["ensemble"] = None
        state["sync_history"] = []
        state["_final_checkpoints"] = {}
        return state

    def __repr__(self) -> str:
        return (
            f"HQDEStrategy(num_members={self.num_members}, aggregator={self.aggregator!r}, topology={self.topology!r}, sync={self.sync!r},"
            f" sync_strength={self.sync_strength}, sync_every_n_epochs={self.sync_every_n_epochs}, bagging={self.bagging},"
            f" member_init={self.member_init!r}, seed={self.seed})"
        )


def _member_resume_checkpoint(checkpoint: dict[str, Any], entry: dict[str, Any], index: int) -> dict[str, Any]:
    """What member ``index`` resumes from: its own entry of an HQDE checkpoint.

    An empty entry (a member that never reported a state) resumes from the checkpoint's top
    level (the consensus). An entry holding weights only (written by older versions) is
    completed from the top level (loops, callbacks, versions) with a fresh optimizer state,
    since the top level's optimizer state is not this member's.
    """
    if not entry:
        return checkpoint
    if "pytorch-lightning_version" in entry:
        return entry
    rank_zero_warn(f"HQDEStrategy: member {index}'s checkpoint entry holds its weights only; it resumes with them, the run's progress and a fresh optimizer state.")
    top = {k: v for k, v in checkpoint.items() if k != HQDE_KEY}
    return {**top, **entry, "optimizer_states": [], "lr_schedulers": []}


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
    if kwargs is None:
        return
    if not isinstance(kwargs, Mapping):
        raise MisconfigurationException(
            f"`HQDEStrategy(ray_init_kwargs={kwargs!r})` must be a dict of keyword arguments for `ray.init`"
            " (e.g. {'runtime_env': {...}}), or None."
        )
    if "address" in kwargs:
        raise MisconfigurationException(
            f"`HQDEStrategy(ray_init_kwargs={{'address': {kwargs['address']!r}, ...}})`: pass the cluster address as"
            f" `HQDEStrategy(ray_address={kwargs['address']!r})` instead; `ray_init_kwargs` holds the other `ray.init` arguments."
        )


def _check_resources(resources: Mapping[str, Any] | None) -> dict[str, Any]:
    if resources is None:
        return {}
    if not isinstance(resources, Mapping):
        raise MisconfigurationException(f"`HQDEStrategy(resources_per_member={resources!r})` must be a dict with keys among {list(_RESOURCE_KEYS)}.")
    unknown = sorted(set(resources) - set(_RESOURCE_KEYS))
    if unknown:
        raise MisconfigurationException(f"`resources_per_member` has unknown keys {unknown}; allowed keys are {list(_RESOURCE_KEYS)}.")
    for key in ("num_cpus", "num_gpus", "memory"):
        value = resources.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value)):
            raise MisconfigurationException(f"`resources_per_member['{key}']={value!r}` must be a non-negative number.")
    if resources.get("num_gpus", 0) > 1:
        raise MisconfigurationException(
            f"`resources_per_member['num_gpus']={resources['num_gpus']!r}`: a member trains on one device, so use a value in [0, 1]."
        )
    return dict(resources)
