"""Pickling a fit for the member actors, with an error that names what cannot be pickled."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from ray import cloudpickle

__all__ = ["pickle_fit"]


def pickle_fit(trainer: Trainer, function: Callable, bound: inspect.BoundArguments, model: LightningModule) -> bytes:
    """Pickles ``(trainer, function name, args, kwargs)`` without the trainer's loggers (members get stand-ins).

    Raises:
        MisconfigurationException: when something cannot be pickled, naming the first attribute
            of the module or the datamodule that fails.
    """
    loggers = trainer.loggers
    trainer.loggers = []
    try:
        return cloudpickle.dumps((trainer, function.__name__, bound.args, bound.kwargs))
    except Exception as err:
        datamodule = bound.arguments.get("datamodule") or bound.arguments.get("train_dataloaders")
        culprit = _find_unpicklable(model, "model") or _find_unpicklable(datamodule, "datamodule") or "an object passed to `fit`"
        raise MisconfigurationException(
            f"HQDEStrategy sends your module and data to Ray actors by pickling them, but {culprit} cannot be"
            f" pickled ({type(err).__name__}: {err}). Create it in `setup()`/`configure_model()` instead of"
            " `__init__`, or make it picklable."
        ) from err
    finally:
        trainer.loggers = loggers


def _find_unpicklable(obj: Any, path: str, depth: int = 0) -> str | None:
    """The dotted path of the first attribute of ``obj`` that cannot be pickled, if any."""
    if obj is None or depth > 4:
        return None
    try:
        cloudpickle.dumps(obj)
        return None
    except Exception:
        pass
    children: dict[str, Any] = dict(obj._modules) if isinstance(obj, torch.nn.Module) else {}
    if hasattr(obj, "__dict__"):
        children.update({k: v for k, v in vars(obj).items() if k not in ("_modules", "_trainer")})
    for name, value in children.items():
        found = _find_unpicklable(value, f"{path}.{name}", depth + 1)
        if found is not None:
            return found
    return f"`{path}` ({type(obj).__name__})"
