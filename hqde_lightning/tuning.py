"""Lightning's finders in an ensemble fit: ``Tuner`` runs and ``LearningRateFinder``/``BatchSizeFinder`` callbacks.

A finder tunes one module: it trains a few steps, restores the weights and sets the learning
rate or batch size it found on the module (or datamodule). An ensemble tunes once, on your
module, here in the driver, and every member then trains with the value found:

- ``Tuner(trainer).lr_find(...)``/``.scale_batch_size(...)`` run ``fit`` with their finder
  marked ``_early_exit``: that fit is the tuning run itself (:func:`is_tuning`);
- a finder passed in ``Trainer(callbacks=[...])`` tunes at the start of ``fit``
  (:func:`tune_first`): it runs here first, as ``Tuner`` would run it, and is left out of
  the members' copies of the fit, so they do not tune again, each to its own value.

On a GPU a member group holds its k members' batches at once: a batch size tuned on one member
needs about k times the activation memory there.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder
from lightning.pytorch.trainer.call import _call_teardown_hook
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import _TunerExitException

__all__ = ["is_tuning", "tune_first"]

_FINDERS = (LearningRateFinder, BatchSizeFinder)


def is_tuning(trainer: Trainer) -> bool:
    """True while a finder's tuning run is the ``fit``: ``Tuner`` (or :func:`tune_first`) marked it ``_early_exit``."""
    return any(isinstance(cb, _FINDERS) and getattr(cb, "_early_exit", False) for cb in trainer.callbacks)


@contextmanager
def tune_first(trainer: Trainer, function: Callable, bound: inspect.BoundArguments) -> Iterator[None]:
    """Runs the finder callbacks of ``trainer`` one after another on your module in this process, then hides them from the members.

    Each finder runs as ``Tuner`` runs it: first among the callbacks, marked ``_early_exit``,
    in a ``fit`` (``function``, with ``bound``'s arguments but no ``ckpt_path``) that ends
    once it has tuned, as Lightning ends a ``Tuner`` run. Inside the context the finders are
    out of ``trainer.callbacks``, so the members' copies of the fit do not carry them; they are
    put back afterwards (a ``BatchSizeFinder`` also tunes ``validate``/``test``/``predict``).
    """
    finders: list[Callback] = [cb for cb in trainer.callbacks if isinstance(cb, _FINDERS)]
    if not finders:
        yield
        return
    callbacks = trainer.callbacks
    others = [cb for cb in callbacks if not isinstance(cb, _FINDERS)]
    try:
        for finder in finders:
            trainer.callbacks = [finder] + others
            _tune(trainer, finder, function, bound)
        trainer.callbacks = others
        yield
    finally:
        trainer.callbacks = callbacks


def _tune(trainer: Trainer, finder: Callback, function: Callable, bound: inspect.BoundArguments) -> None:
    """One finder's tuning run: ``function`` until the finder has tuned, the trainer torn down as after a ``Tuner`` run, its state put back."""
    arguments = dict(bound.arguments, ckpt_path=None)
    state, should_stop = dataclasses.replace(trainer.state), trainer.should_stop  # as `Trainer.fit` set them for the ensemble fit
    finder._early_exit = True  # type: ignore[attr-defined]
    try:
        function(**arguments)
    except _TunerExitException:
        # what Lightning's `_call_and_handle_interrupt` does when a `Tuner` run ends
        _call_teardown_hook(trainer)
        trainer._teardown()
        trainer.state.status = TrainerStatus.FINISHED
        trainer.state.stage = None
    finally:
        finder._early_exit = False  # type: ignore[attr-defined]
        trainer.state, trainer.should_stop = state, should_stop
