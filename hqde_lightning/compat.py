"""A facade for code written against the original HQDE package: ``create_hqde_system``.

The original package's quick start runs unchanged apart from its import line::

    from hqde_lightning import create_hqde_system

    hqde_system = create_hqde_system(
        model_class=MyModel,                      # a plain ``nn.Module`` class
        model_kwargs={"num_classes": 10},
        num_workers=4,                            # ensemble members
        quantization_config={"base_bits": 8, "min_bits": 4, "max_bits": 16},
        aggregation_config={"noise_scale": 0.005, "exploration_factor": 0.1, "entanglement_strength": 0.1},
    )
    metrics = hqde_system.train(train_loader, num_epochs=10)
    predictions = hqde_system.predict(test_loader)   # ensemble class probabilities
    hqde_system.cleanup()

Underneath, the ``nn.Module`` class is wrapped into a LightningModule (cross-entropy loss and
Adam with ``lr=1e-3`` unless you choose otherwise) and trained by
:class:`~hqde_lightning.HQDEStrategy` with a Lightning ``Trainer``: every member is a Ray actor
running an ordinary Lightning fit loop, and the members' weights are combined at every epoch end.

How the configuration dictionaries map onto this package (unknown keys raise a ``ValueError``
that lists the allowed ones):

``quantization_config``
    ``base_bits``, ``min_bits``, ``max_bits`` →
    :class:`~hqde_lightning.callbacks.AdaptiveQuantization` with those bit widths (missing keys
    take its defaults 8/4/16). Each member's weights are really packed into 4/8/16-bit blocks
    at every sync (the original package computed such widths but averaged float32 weights).
    ``None`` (default): members send float32 weights.

``aggregation_config``
    ``noise_scale`` → :class:`~hqde_lightning.callbacks.QuantumNoise` ``(scale=noise_scale)``:
    Gaussian noise, with a standard deviation of ``noise_scale`` times each weight tensor's RMS,
    added to the weights after every optimizer step and annealed to 0 over the training run
    (cosine schedule). The original package defined such noise but never applied it.

    ``exploration_factor`` (in [0, 1]) → elastic sync with
    ``HQDEStrategy(sync="elastic", sync_strength=1 - exploration_factor)``: at every sync each
    member moves to ``w + (1 - exploration_factor) * (consensus - w)``, i.e. it keeps the
    fraction ``exploration_factor`` of its own deviation from the consensus. 0 is federated
    averaging (every member replaced by the consensus), 1 leaves the members independent.
    The original package accepted this key but never used it; here it controls how far the
    members may explore away from each other.

    ``entanglement_strength`` → the aggregator
    :class:`~hqde_lightning.aggregation.Entanglement` ``(strength=entanglement_strength)``:
    a weighted mean in which members whose updates agree (cosine similarity) with the
    others' weigh more. Without it the aggregator is the plain mean.

``num_workers``
    the number of ensemble members (``HQDEStrategy(num_members=...)``).

``**trainer_kwargs``
    passed to ``lightning.pytorch.Trainer`` (e.g. ``accelerator``, ``callbacks``,
    ``enable_progress_bar``, ``logger``); ``strategy`` and ``max_epochs`` are set by the facade.
    The facade's defaults are ``logger=False``, ``enable_checkpointing=False`` and
    ``enable_model_summary=False``.

Ray: when the fit's members train in this process (on one device; see
:meth:`~hqde_lightning.launcher.RayEnsembleLauncher.uses_ray`) Ray is never started or imported.
Otherwise the first
:meth:`HQDESystem.train` starts a private local Ray instance when none is running (or joins
``strategy_kwargs["ray_address"]``) and keeps it for later calls; :meth:`HQDESystem.cleanup`
shuts it down again. A Ray instance that was already running is used and left running.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Any

import cloudpickle
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from torch import Tensor, nn
from torch.optim import Optimizer

from hqde_lightning.aggregation import Entanglement
from hqde_lightning.callbacks import AdaptiveQuantization, QuantumNoise
from hqde_lightning.checkpoint import AtomicCheckpointIO, load_checkpoint_file
from hqde_lightning.devices import ray_connected
from hqde_lightning.ensemble import Ensemble
from hqde_lightning.evaluation import EnsembleMetrics, classification_batch
from hqde_lightning.member import SyncCodec
from hqde_lightning.strategy import HQDEStrategy
from hqde_lightning.validation import check_int, check_mapping, check_number

__all__ = ["AGGREGATION_KEYS", "HQDESystem", "QUANTIZATION_KEYS", "SystemConfig", "create_hqde_system"]

#: keys accepted in ``quantization_config``
QUANTIZATION_KEYS = ("base_bits", "min_bits", "max_bits")
#: keys accepted in ``aggregation_config``
AGGREGATION_KEYS = ("noise_scale", "exploration_factor", "entanglement_strength")
#: ``Trainer`` arguments the facade sets itself
_RESERVED_TRAINER_KWARGS = {"strategy": "pass strategy options as `strategy_kwargs`", "max_epochs": "pass `num_epochs` to `train()`"}
_TRAINER_DEFAULTS = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False}
_FILE_FORMAT = "hqde_lightning.compat.HQDESystem"
_FILE_VERSION = 1

LossFn = Callable[[Tensor, Tensor], Tensor]


class _WrappedModule(pl.LightningModule):
    """A plain ``nn.Module`` as a LightningModule: supervised ``(inputs, targets)`` batches.

    Logs ``train_loss`` (epoch mean), ``val_loss`` and, for ``(batch, classes)`` outputs with
    integer targets, ``val_acc``.

    Args:
        model: the network.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        optimizer: the optimizer class.
        optimizer_kwargs: its keyword arguments (besides the parameters).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, optimizer: type[Optimizer], optimizer_kwargs: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer_class = optimizer
        self.optimizer_kwargs = dict(optimizer_kwargs)

    def forward(self, x: Any) -> Any:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = _inputs_targets(batch)
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = _inputs_targets(batch)
        outputs = self(x)
        self.log("val_loss", self.loss_fn(outputs, y), prog_bar=True)
        if classification_batch((x, y)) is not None and isinstance(outputs, Tensor) and outputs.dim() == 2:
            self.log("val_acc", (outputs.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> Optimizer:
        return self.optimizer_class(self.parameters(), **self.optimizer_kwargs)


def _inputs_targets(batch: Any) -> tuple[Any, Any]:
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError(f"HQDESystem trains on `(inputs, targets)` batches; got a batch of type {type(batch).__name__}.")
    return batch[0], batch[1]


def _inputs(batch: Any) -> Tensor:
    """The inputs of a batch that is either ``x`` or ``(x, y, ...)``."""
    inputs = batch[0] if isinstance(batch, (list, tuple)) and len(batch) > 0 else batch
    if not isinstance(inputs, Tensor):
        raise ValueError(f"HQDESystem.predict expects batches `x` or `(x, y)` of tensors; got {type(inputs).__name__}.")
    return inputs


@dataclass(frozen=True)
class SystemConfig:
    """Everything an :class:`HQDESystem` was created with (see there for each field), checked.

    Built with the arguments as given (``None`` for the optional mappings); the mappings are
    stored as fresh dicts (``optimizer_kwargs=None`` becomes ``{"lr": 1e-3}``). It is what
    :meth:`HQDESystem.save` stores and :meth:`HQDESystem.load` rebuilds the system from; each
    fit's strategy, callbacks and ``Trainer`` arguments are derived from it.

    Raises:
        ValueError: for an unknown configuration key or a value outside its range.
        TypeError: for a ``model_class`` that is not an ``nn.Module`` class.
    """

    model_class: type[nn.Module]
    model_kwargs: dict[str, Any]
    num_workers: int
    quantization_config: dict[str, Any]
    aggregation_config: dict[str, Any]
    loss_fn: LossFn | None
    optimizer: type[Optimizer]
    optimizer_kwargs: dict[str, Any]
    strategy_kwargs: dict[str, Any]
    trainer_kwargs: dict[str, Any]

    def __post_init__(self) -> None:
        model_class, optimizer, loss_fn, num_workers = self.model_class, self.optimizer, self.loss_fn, self.num_workers
        if not (inspect.isclass(model_class) and issubclass(model_class, nn.Module)):
            raise TypeError(f"`model_class` must be an `nn.Module` subclass, got {model_class!r}.")
        for name in ("model_kwargs", "optimizer_kwargs", "strategy_kwargs"):
            check_mapping(getattr(self, name), name)
        check_int(num_workers, "num_workers", 1)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"`loss_fn` must be callable as `loss_fn(outputs, targets)`, got {loss_fn!r}.")
        if not (inspect.isclass(optimizer) and issubclass(optimizer, Optimizer)):
            raise ValueError(f"`optimizer` must be a `torch.optim.Optimizer` subclass, got {optimizer!r}.")
        normalised = {
            "model_kwargs": dict(self.model_kwargs or {}),
            "quantization_config": check_mapping(self.quantization_config, "quantization_config", QUANTIZATION_KEYS),
            "aggregation_config": check_mapping(self.aggregation_config, "aggregation_config", AGGREGATION_KEYS),
            "optimizer_kwargs": {"lr": 1e-3} if self.optimizer_kwargs is None else dict(self.optimizer_kwargs),
            "strategy_kwargs": dict(self.strategy_kwargs or {}),
            "trainer_kwargs": dict(self.trainer_kwargs or {}),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)  # a frozen dataclass sets its own fields this way
        self.trainer_options()

    def as_dict(self) -> dict[str, Any]:
        """The configuration by field name (not copied): ``SystemConfig(**config.as_dict())`` rebuilds it."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def trainer_options(self) -> dict[str, Any]:
        """``Trainer`` keyword arguments for one fit: the facade's defaults, your ``trainer_kwargs`` and a fresh callbacks list.

        Raises:
            ValueError: for arguments the facade sets itself or that ``Trainer`` does not take, and for
                a sync codec among ``callbacks`` when ``quantization_config`` adds one.
        """
        trainer_kwargs = self.trainer_kwargs
        accepted = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
        for name in trainer_kwargs:
            if name in _RESERVED_TRAINER_KWARGS:
                raise ValueError(f"`{name}` is set by HQDESystem: {_RESERVED_TRAINER_KWARGS[name]}.")
            if name not in accepted:
                raise ValueError(f"`{name}` is neither an HQDESystem nor a `lightning.pytorch.Trainer` argument.")
        user_callbacks = trainer_kwargs.get("callbacks") or []
        if isinstance(user_callbacks, Callback):
            user_callbacks = [user_callbacks]
        if self.quantization_config and any(isinstance(cb, SyncCodec) for cb in user_callbacks):
            raise ValueError(
                "`quantization_config` adds an AdaptiveQuantization sync codec, but `callbacks` already holds one"
                " (a member uses only one): drop one of them."
            )
        return {**_TRAINER_DEFAULTS, **trainer_kwargs, "callbacks": list(user_callbacks)}

    def fit_parts(self) -> tuple[HQDEStrategy, list[Callback]]:
        """A fresh strategy (with a fresh aggregator) and fresh callbacks for one fit.

        Raises:
            ValueError: for configuration values the callbacks or ``HQDEStrategy`` refuse as such.
            MisconfigurationException: for ``strategy_kwargs`` values that ``HQDEStrategy`` refuses.
        """
        callbacks = self.callbacks()
        try:
            strategy = HQDEStrategy(**self.strategy_options())
        except TypeError as err:
            raise ValueError(f"`strategy_kwargs`: {err}") from err
        return strategy, callbacks

    def callbacks(self) -> list[Callback]:
        """Fresh callbacks for one fit, from ``quantization_config`` and ``noise_scale``."""
        callbacks: list[Callback] = []
        quantization = self.quantization_config
        if quantization:
            try:
                callbacks.append(AdaptiveQuantization(**quantization))
            except ValueError as err:
                raise ValueError(f"`quantization_config={quantization}`: {err}") from err
        noise_scale = self.aggregation_config.get("noise_scale")
        if noise_scale is not None:
            try:
                callbacks.append(QuantumNoise(scale=noise_scale))
            except ValueError as err:
                raise ValueError(f"`aggregation_config['noise_scale']={noise_scale!r}`: must be a finite number >= 0.") from err
        return callbacks

    def strategy_options(self) -> dict[str, Any]:
        """``HQDEStrategy`` keyword arguments for one fit (a fresh aggregator each time)."""
        options = dict(self.strategy_kwargs)
        aggregation = self.aggregation_config
        if "num_members" in options:
            raise ValueError("`strategy_kwargs['num_members']`: the ensemble size is `num_workers`.")
        strength = aggregation.get("entanglement_strength")
        if strength is not None:
            if "aggregator" in options:
                raise ValueError("`aggregation_config['entanglement_strength']` chooses the Entanglement aggregator; drop `strategy_kwargs['aggregator']`.")
            try:
                options["aggregator"] = Entanglement(strength=strength)
            except (TypeError, ValueError) as err:
                raise ValueError(f"`aggregation_config['entanglement_strength']={strength!r}`: {err}.") from err
        factor = aggregation.get("exploration_factor")
        if factor is not None:
            if "sync" in options or "sync_strength" in options:
                raise ValueError("`aggregation_config['exploration_factor']` sets elastic sync; drop `strategy_kwargs['sync']`/`['sync_strength']`.")
            check_number(factor, "aggregation_config['exploration_factor']", 0, 1)
            options.update(sync="elastic", sync_strength=1.0 - float(factor))
        return {"num_members": self.num_workers, **options}


class HQDESystem:
    """An HQDE ensemble of a plain ``nn.Module`` class, trained with :class:`~hqde_lightning.HQDEStrategy`.

    See the module docstring for how ``quantization_config`` and ``aggregation_config`` map onto
    this package. Use :func:`create_hqde_system` (same arguments) for code written against the
    original package. Works as a context manager that calls :meth:`cleanup` on exit.

    Args:
        model_class: an ``nn.Module`` class; each member is ``model_class(**model_kwargs)``.
            It must be importable by the Ray workers, or defined in your script (``__main__``,
            sent by value).
        model_kwargs: constructor arguments of ``model_class``.
        num_workers: number of ensemble members (>= 1).
        quantization_config: ``base_bits``, ``min_bits``, ``max_bits`` (each 4, 8 or 16), or ``None``
            for float32 sync.
        aggregation_config: ``noise_scale`` (>= 0), ``exploration_factor`` (in [0, 1]),
            ``entanglement_strength`` (>= 0), or ``None``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar loss``; default ``F.cross_entropy``.
        optimizer: optimizer class; default ``torch.optim.Adam``.
        optimizer_kwargs: its arguments; default ``{"lr": 1e-3}``.
        strategy_kwargs: further ``HQDEStrategy`` arguments (e.g. ``seed``, ``sync``, ``bagging``,
            ``ray_address``, ``resources_per_member``); not ``num_members`` (that is
            ``num_workers``), not ``aggregator`` together with ``entanglement_strength``, and
            not ``sync``/``sync_strength`` together with ``exploration_factor``.
        **trainer_kwargs: ``lightning.pytorch.Trainer`` arguments except ``strategy`` and
            ``max_epochs``.

    Attributes:
        config: the checked :class:`SystemConfig` (what :meth:`save` stores).
        module: the LightningModule wrapping the network; after :meth:`train` it holds the
            consensus weights.
        ensemble: every member as an :class:`~hqde_lightning.Ensemble` (``None`` before training).
        strategy: the ``HQDEStrategy`` of the latest :meth:`train` call (its ``sync_history``
            holds the bytes and timings of every sync).
        trainer: the ``Trainer`` of the latest :meth:`train` call.

    Raises:
        ValueError: for an unknown configuration key or a value outside its range (the message
            names it).
        TypeError: for a ``model_class`` that is not an ``nn.Module`` class, or model kwargs that
            its constructor refuses.
        MisconfigurationException: for ``strategy_kwargs`` values that ``HQDEStrategy`` refuses.
    """

    def __init__(
        self,
        model_class: type[nn.Module],
        model_kwargs: Mapping[str, Any] | None = None,
        num_workers: int = 4,
        quantization_config: Mapping[str, Any] | None = None,
        aggregation_config: Mapping[str, Any] | None = None,
        *,
        loss_fn: LossFn | None = None,
        optimizer: type[Optimizer] = torch.optim.Adam,
        optimizer_kwargs: Mapping[str, Any] | None = None,
        strategy_kwargs: Mapping[str, Any] | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        config = SystemConfig(
            model_class=model_class, model_kwargs=model_kwargs, num_workers=num_workers, quantization_config=quantization_config,
            aggregation_config=aggregation_config, loss_fn=loss_fn, optimizer=optimizer, optimizer_kwargs=optimizer_kwargs,
            strategy_kwargs=strategy_kwargs, trainer_kwargs=trainer_kwargs,
        )
        self._setup(config)

    @classmethod
    def from_config(cls, config: SystemConfig) -> HQDESystem:
        """A system, untrained, for a checked configuration (what :meth:`load` rebuilds from)."""
        system = cls.__new__(cls)
        system._setup(config)
        return system

    def _setup(self, config: SystemConfig) -> None:
        #: the system's checked configuration (what :meth:`save` stores)
        self.config = config
        # the first fit's strategy and callbacks: built now, so that their arguments fail here, not at train()
        self._next_fit: tuple[HQDEStrategy, list[Callback]] | None = config.fit_parts()
        try:
            network = config.model_class(**config.model_kwargs)
        except TypeError as err:
            raise TypeError(f"`{config.model_class.__name__}(**model_kwargs)` failed: {err}") from err
        self.module = _WrappedModule(network, config.loss_fn or F.cross_entropy, config.optimizer, config.optimizer_kwargs)
        self.ensemble: Ensemble | None = None
        self.strategy: HQDEStrategy | None = None
        self.trainer: Trainer | None = None
        self._owns_ray = False

    # ---------------------------------------------------------- configuration
    @property
    def num_workers(self) -> int:
        """Number of ensemble members."""
        return self.config.num_workers

    # ------------------------------------------------------------- training
    def train(self, train_loader: Iterable[Any], num_epochs: int = 10, val_loader: Iterable[Any] | None = None) -> dict[str, float]:
        """Trains the ensemble for ``num_epochs`` epochs on ``(inputs, targets)`` batches.

        Each call is a new fit whose members all start from :attr:`module`'s weights (the
        consensus of the previous call, if any) with fresh optimizers.

        Args:
            train_loader: the training batches (every member sees all of them, in its own order
                when the loader shuffles).
            num_epochs: epochs to train (>= 1).
            val_loader: optional validation batches: each member validates on them every epoch
                (``member_{i}/val_loss``, ``member_{i}/val_acc``), and after training the ensemble
                is evaluated on them (``val_loss``, ``val_acc`` and ``ensemble/val_acc``, ``_nll``,
                ``_ece``, ``_brier``, ``_disagreement``).

        Returns:
            Floats: ``training_time`` (seconds), ``sync_bytes`` and ``sync_fp32_bytes`` (bytes the
            members sent over all syncs, and the float32 size of the same tensors),
            ``compression_ratio`` (their quotient, >= 1 when quantized), every metric the members
            logged (un-prefixed: member 0's; ``member_{i}/...``: member ``i``'s) and, with
            ``val_loader``, the ensemble's validation metrics.
        """
        check_int(num_epochs, "num_epochs", 1)
        strategy, callbacks = self._next_fit or self.config.fit_parts()
        self._next_fit = None
        trainer_kwargs = self.config.trainer_options()
        trainer_kwargs["callbacks"] = trainer_kwargs["callbacks"] + callbacks
        running = ray_connected()  # before the Trainer, which joins `ray_address`
        trainer = Trainer(strategy=strategy, max_epochs=num_epochs, **trainer_kwargs)
        if strategy.launcher.uses_ray(trainer):
            self._keep_ray(running)
        started = time.perf_counter()
        trainer.fit(self.module, train_dataloaders=train_loader, val_dataloaders=val_loader)
        elapsed = time.perf_counter() - started
        self.strategy, self.trainer, self.ensemble = strategy, trainer, strategy.ensemble
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        sent = sum(int(record.bytes_received) for record in strategy.sync_history)
        fp32 = sum(int(record.fp32_bytes) for record in strategy.sync_history)
        metrics.update(training_time=elapsed, sync_bytes=float(sent), sync_fp32_bytes=float(fp32), compression_ratio=fp32 / sent if sent else 1.0)
        if val_loader is not None:
            for results in trainer.validate(self.module, dataloaders=val_loader, verbose=False):
                metrics.update({name: float(value) for name, value in results.items()})
        return metrics

    def _keep_ray(self, running: bool) -> None:
        """Starts a private local Ray instance (or joins ``strategy_kwargs['ray_address']``) for this and later
        fits, unless Ray was ``running`` before this :meth:`train` (the fit's Trainer may have joined the address)."""
        if running:
            return
        from hqde_lightning.ray_runtime import start_ray  # imports Ray: only fits with Ray actors pay for it

        options = self.config.strategy_kwargs
        self._owns_ray = True  # set first: whatever `ray.init` starts is shut down by cleanup(), even after Ctrl-C
        start_ray(options.get("ray_address"), dict(options.get("ray_init_kwargs") or {}))

    # ----------------------------------------------------------- inference
    def _trained(self) -> Ensemble:
        if self.ensemble is None:
            raise RuntimeError("HQDESystem has no trained ensemble yet: call `train()` first, or `HQDESystem.load(path)`.")
        return self.ensemble.eval()

    @torch.no_grad()
    def predict(self, loader: Iterable[Any]) -> Tensor:
        """The ensemble's class probabilities for every sample of ``loader``, concatenated.

        Runs in this process (no Ray needed, also after :meth:`cleanup`), with the members'
        softmax probabilities averaged (weighted by the ensemble's member weights).

        Args:
            loader: batches ``x`` or ``(x, y, ...)``; the members' outputs must be class logits.

        Returns:
            A ``(num_samples, num_classes)`` float tensor on the CPU; each row sums to 1.
        """
        ensemble = self._trained()
        device = ensemble.active.device
        outputs = [ensemble.predict_proba(_inputs(batch).to(device)).cpu() for batch in loader]
        if not outputs:
            raise ValueError("HQDESystem.predict got an empty loader.")
        return torch.cat(outputs)

    @torch.no_grad()
    def evaluate(self, loader: Iterable[Any]) -> dict[str, float]:
        """Scores the ensemble on ``(inputs, int targets)`` batches, in this process.

        The metrics are those ``trainer.test`` logs under ``ensemble/test_*`` (torchmetrics).

        Returns:
            ``accuracy``, ``nll`` (mean negative log-likelihood of the ensemble's probabilities),
            ``ece`` (expected calibration error, 15 bins), ``brier``, ``disagreement`` (mean
            pairwise fraction of samples on which two members predict different classes),
            ``aurc`` (area under the risk–coverage curve), and
            ``member_{i}/accuracy`` and ``member_{i}/nll`` for every active member ``i``.
        """
        return _classification_scores(self._trained(), loader)

    # ----------------------------------------------------------- save/load
    def save(self, path: str) -> None:
        """Writes the whole ensemble and this system's configuration to ``path``, atomically.

        A temporary file in the same folder is moved over ``path`` once complete, so a crash
        leaves any previous file intact. The configuration (model class, loss, optimizer,
        Trainer arguments) is pickled with cloudpickle: classes and functions defined in your
        script are stored by value, importable ones by name.

        Raises:
            RuntimeError: before the system was trained.
            ValueError: when a configuration value cannot be pickled (the message names it).
        """
        AtomicCheckpointIO().save_checkpoint(_system_file(self.config, self.module, self._trained()), path)

    @classmethod
    def load(cls, path: str) -> HQDESystem:
        """Rebuilds a system written by :meth:`save` (a classmethod: ``HQDESystem.load(path)``).

        The loaded system predicts and evaluates without Ray, and :meth:`train` continues from
        its consensus weights. Only load files you trust: the configuration is unpickled.

        Raises:
            ValueError: when ``path`` was not written by :meth:`save`.
        """
        payload = _read_system_file(path)
        system = cls.from_config(SystemConfig(**cloudpickle.loads(payload["config"])))
        system.module.load_state_dict(payload["module_state"])
        system.ensemble = Ensemble.from_states(
            system.module, payload["members"], weights=payload["weights"], active=payload["active"], combine=payload["combine"],
            temperature=payload.get("temperature", 1.0),
        ).eval()
        return system

    # ------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        """Shuts down the Ray instance this system started or joined (others are left running).

        Safe to call more than once; the trained ensemble stays usable for :meth:`predict`,
        :meth:`evaluate` and :meth:`save`, and a later :meth:`train` starts Ray again.
        """
        if self._owns_ray and ray_connected():
            import ray

            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> HQDESystem:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        config = self.config
        return (
            f"HQDESystem(model_class={config.model_class.__name__}, num_workers={self.num_workers},"
            f" quantization_config={config.quantization_config}, aggregation_config={config.aggregation_config},"
            f" trained={self.ensemble is not None})"
        )


def _system_file(config: SystemConfig, module: nn.Module, ensemble: Ensemble) -> dict[str, Any]:
    """The contents of an :meth:`HQDESystem.save` file: the cloudpickled configuration, the consensus and every member."""
    entries = config.as_dict()
    for name, value in entries.items():
        try:
            cloudpickle.dumps(value)
        except Exception as err:
            raise ValueError(f"HQDESystem.save cannot pickle the configuration entry `{name}` ({type(err).__name__}: {err}).") from err
    return {
        "format": _FILE_FORMAT,
        "version": _FILE_VERSION,
        "config": cloudpickle.dumps(entries),
        "module_state": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "members": [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in ensemble.members],
        "weights": ensemble.weights.cpu(),
        "active": ensemble.active.cpu(),
        "combine": ensemble.combiner,
        "temperature": float(ensemble.temperature),
    }


def _read_system_file(path: str) -> Mapping[str, Any]:
    """The contents of an :meth:`HQDESystem.save` file, after checking its format and version."""
    payload = load_checkpoint_file(path, weights_only=False)  # the configuration is cloudpickled: trusted files only
    if not isinstance(payload, Mapping) or payload.get("format") != _FILE_FORMAT:
        raise ValueError(f"{path!r} was not written by `HQDESystem.save`.")
    if payload["version"] != _FILE_VERSION:
        raise ValueError(f"{path!r} has format version {payload['version']}; this package reads version {_FILE_VERSION}.")
    return payload


def _classification_scores(ensemble: Ensemble, loader: Iterable[Any]) -> dict[str, float]:
    """:meth:`HQDESystem.evaluate`'s metrics of ``ensemble`` on ``loader``, accumulated by :class:`EnsembleMetrics`."""
    device = ensemble.active.device
    metrics: EnsembleMetrics | None = None
    for batch in loader:
        pair = classification_batch(batch)
        if pair is None:
            raise ValueError("HQDESystem.evaluate needs `(inputs, targets)` batches with integer class targets of shape (batch,).")
        logits = ensemble.member_outputs(pair[0].to(device))
        if metrics is None:
            metrics = EnsembleMetrics(logits.shape[0], logits.shape[-1], device)
        metrics.update(logits, ensemble.active_weights(), pair[1].to(device), ensemble.temperature)
    if metrics is None:
        raise ValueError("HQDESystem.evaluate got an empty loader.")
    names = {"acc": "accuracy", "nll": "nll", "ece": "ece", "brier": "brier", "disagreement": "disagreement", "aurc": "aurc"}
    out: dict[str, float] = {}
    for key, value in metrics.compute("eval", ensemble.active_member_ids(), "").items():
        scope, _, metric = key.partition("/")
        name = names[metric.removeprefix("eval_")]
        out[name if scope == "ensemble" else f"{scope}/{name}"] = float(value)
    return out


def create_hqde_system(
    model_class: type[nn.Module],
    model_kwargs: Mapping[str, Any] | None = None,
    num_workers: int = 4,
    quantization_config: Mapping[str, Any] | None = None,
    aggregation_config: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> HQDESystem:
    """Creates an :class:`HQDESystem`, as the original HQDE package's function of the same name did.

    Args:
        model_class: a plain ``nn.Module`` class.
        model_kwargs: its constructor arguments.
        num_workers: number of ensemble members.
        quantization_config: ``base_bits``, ``min_bits``, ``max_bits``.
        aggregation_config: ``noise_scale``, ``exploration_factor``, ``entanglement_strength``.
        **kwargs: ``loss_fn``, ``optimizer``, ``optimizer_kwargs``, ``strategy_kwargs`` and
            ``lightning.pytorch.Trainer`` arguments (see :class:`HQDESystem`).
    """
    return HQDESystem(model_class, model_kwargs, num_workers, quantization_config, aggregation_config, **kwargs)
