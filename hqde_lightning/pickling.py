"""Pickling a fit for the members, without data the trainer holds, with an error that names what cannot be pickled.

Members in this process (a member group, member threads) train a copy of the fit made by pickling
it with `cloudpickle <https://github.com/cloudpipe/cloudpickle>`_; Ray actors get it pickled with
Ray's own copy, ``ray.cloudpickle`` (the Ray path passes its ``dumps``), so that modules you
registered with ``ray.cloudpickle.register_pickle_by_value`` travel by value. Either way a
process that trains without Ray never imports it.

A member group in this process whose module pickle refuses (``torch.nn.utils.parametrize``, which
``parametrizations.weight_norm``/``spectral_norm`` use, only allows ``copy.deepcopy``) trains a deep
copy of the fit instead (:func:`pickle_fit` with ``copy_if_refused``).

A module compiled with ``torch.compile`` is pickled as it was before compiling: the functions
``torch.compile`` made cannot be pickled, so the members train your module uncompiled (a member
group vectorises its members with ``torch.func.vmap`` instead), and a warning says so.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import cloudpickle
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

__all__ = ["CopiedFit", "pickle_fit", "uncompiled"]

#: pickles an object to bytes (``cloudpickle.dumps`` or ``ray.cloudpickle.dumps``)
Dumps = Callable[[Any], bytes]

#: the methods Lightning replaces with compiled ones when ``fit`` gets a ``torch.compile``d module
_COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


@dataclass
class CopiedFit:
    """A fit copied with ``copy.deepcopy`` (``(trainer, function name, args, kwargs)``), for members in this process."""

    fit: tuple[Any, ...]


def pickle_fit(
    trainer: Trainer, function: Callable, bound: inspect.BoundArguments, model: LightningModule, dumps: Dumps = cloudpickle.dumps, copy_if_refused: bool = False
) -> bytes | CopiedFit:
    """Pickles ``(trainer, function name, args, kwargs)`` with ``dumps``, without the trainer's loggers (members get stand-ins).

    With ``copy_if_refused`` (members that train in this process), a fit that pickle refuses but ``copy.deepcopy`` copies
    (a parametrized module) comes back as a :class:`CopiedFit`.

    Raises:
        MisconfigurationException: when something cannot be pickled, naming the first attribute
            of the module or the datamodule that fails.
    """
    if model._compiler_ctx is not None:
        rank_zero_warn(
            f"HQDEStrategy: the members train `{type(model).__name__}` uncompiled. `torch.compile` made functions that"
            " cannot be copied into the members (a member group vectorises its members with `torch.func.vmap` instead)."
            " Your module keeps them."
        )
    loggers = trainer.loggers
    trainer.loggers = []
    try:
        with uncompiled(model), _without_data(trainer):
            fit = (trainer, function.__name__, bound.args, bound.kwargs)
            try:
                return dumps(fit)
            except Exception:
                copied = _deep_copy(fit) if copy_if_refused else None
                if copied is None:
                    raise  # pickle's refusal, named below
                return copied
    except Exception as err:
        datamodule = bound.arguments.get("datamodule") or bound.arguments.get("train_dataloaders")
        culprit = _find_unpicklable(model, "model", dumps) or _find_unpicklable(datamodule, "datamodule", dumps) or "an object passed to `fit`"
        raise MisconfigurationException(
            f"HQDEStrategy gives each member its own copy of your module (and, for Ray actors, of your data) by"
            f" pickling them, but {culprit} cannot be pickled ({type(err).__name__}: {err}). Create it in"
            " `setup()`/`configure_model()` instead of `__init__`, or make it picklable."
        ) from err
    finally:
        trainer.loggers = loggers


def _deep_copy(fit: tuple[Any, ...]) -> CopiedFit | None:
    """``fit`` copied with ``copy.deepcopy``, or ``None`` when that is refused too."""
    try:
        return CopiedFit(copy.deepcopy(fit))
    except Exception:  # the caller reports pickle's refusal
        return None


@contextmanager
def uncompiled(model: LightningModule) -> Iterator[None]:
    """``model`` without what ``torch.compile`` added (Lightning's ``from_compiled``) for as long as the context lasts."""
    context = model._compiler_ctx
    if context is None:
        yield
        return
    compiled = {name: model.__dict__.pop(name) for name in _COMPILED_METHODS if name in model.__dict__}
    model._compiler_ctx = None
    try:
        yield
    finally:
        model.__dict__.update(compiled)
        model._compiler_ctx = context


@contextmanager
def _without_data(trainer: Trainer) -> Iterator[None]:
    """``trainer`` without the data an earlier ``fit``, ``validate``, ``test`` or ``predict`` attached to it (its
    ``datamodule``, its loops' loaders) for as long as the context lasts.

    Each member's fit attaches the data it is given, so a copy of the trainer needs none; one that
    kept it would copy your datasets into every member (or fail on a datamodule that cannot be pickled).
    """
    loops = (trainer.fit_loop, trainer.fit_loop.epoch_loop.val_loop, trainer.validate_loop, trainer.test_loop, trainer.predict_loop)
    sources = [(loop._data_source, loop._data_source.instance) for loop in loops]
    loaders = [(loop, loop._combined_loader) for loop in loops]
    datamodule, selector = trainer.datamodule, trainer._data_connector._datahook_selector
    for source, _ in sources:
        source.instance = None
    for loop, _ in loaders:
        loop._combined_loader = None
    trainer.datamodule, trainer._data_connector._datahook_selector = None, None
    try:
        yield
    finally:
        for source, instance in sources:
            source.instance = instance
        for loop, loader in loaders:
            loop._combined_loader = loader
        trainer.datamodule, trainer._data_connector._datahook_selector = datamodule, selector


def _find_unpicklable(obj: Any, path: str, dumps: Dumps, depth: int = 0) -> str | None:
    """The dotted path of the first attribute of ``obj`` that ``dumps`` cannot pickle, if any."""
    if obj is None or depth > 4:
        return None
    try:
        dumps(obj)
        return None
    except Exception:
        pass
    children: dict[str, Any] = dict(obj._modules) if isinstance(obj, torch.nn.Module) else {}
    if hasattr(obj, "__dict__"):
        children.update({k: v for k, v in vars(obj).items() if k not in ("_modules", "_trainer")})
    for name, value in children.items():
        found = _find_unpicklable(value, f"{path}.{name}", dumps, depth + 1)
        if found is not None:
            return found
    return f"`{path}` ({type(obj).__name__})"
