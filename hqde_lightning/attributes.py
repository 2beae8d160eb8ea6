"""Your module's plain attributes that a fit changes (a list of epoch losses, a step counter), brought back.

A plain fit trains your module object itself, so what your hooks store on it
(``self.val_history.append(...)``) is there afterwards. HQDE trains copies of it (a member
group's, a member thread's or a Ray actor's), so each member reports the plain attributes its
fit added or changed (:func:`changed_attributes`), and the driver puts each member's on its
module in ``strategy.ensemble``, and member 0's on your module, as it shows member 0's metrics
under the plain names. Your own callbacks' attributes (a history a callback collects) come back
the same way, from the member whose callback states the driver takes (:func:`callback_attributes`).

Only attributes that pickle come back (a member may run in another process), each as a copy of
its own; Lightning's own attributes are left alone.

An attribute your ``__init__`` draws at random (``self.mask = torch.rand(64) > 0.5`` kept as a plain
attribute, not a buffer) is each member's own draw, as in its own fit: :func:`drawn_attributes`
finds such attributes by building your module under two seeds, and the members take them from
their re-initialised instance. Members whose attributes differ (:func:`differing`) cannot share
one module's attributes in vmapped code, so their steps run member by member.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn

__all__ = [
    "LIGHTNING_ATTRIBUTES",
    "callback_attributes",
    "changed_attributes",
    "differing",
    "drawn_attributes",
    "fingerprints",
    "pickled_digest",
    "plain_attributes",
    "yours",
]

#: the attributes every ``LightningModule`` has (its trainer, its submodules, its hyperparameters): not yours
LIGHTNING_ATTRIBUTES = frozenset(vars(LightningModule())) | {"_hparams", "_hparams_initial", "_hparams_name"}


def plain_attributes(module: nn.Module) -> dict[str, Any]:
    """``module``'s own attributes, without those every ``LightningModule`` has (:data:`LIGHTNING_ATTRIBUTES`)."""
    return {name: value for name, value in vars(module).items() if name not in LIGHTNING_ATTRIBUTES}


def yours(callbacks: Iterable[Callback]) -> dict[str, Callback]:
    """Your own callbacks (not Lightning's, not this package's) by ``state_key``: their plain attributes come back too."""
    return {cb.state_key: cb for cb in callbacks if not type(cb).__module__.startswith(("lightning.", "hqde_lightning."))}


def callback_attributes(callbacks: Mapping[str, Callback], before: Mapping[str, Mapping[str, bytes | None]]) -> dict[str, dict[str, Any]]:
    """Per ``state_key``, copies of the attributes your ``callbacks`` added or changed since ``before``."""
    changed = {key: changed_attributes(vars(cb), before.get(key, {})) for key, cb in callbacks.items()}
    return {key: attributes for key, attributes in changed.items() if attributes}


def fingerprints(attributes: Mapping[str, Any]) -> dict[str, bytes | None]:
    """Each attribute pickled (``None`` when it does not pickle): what :func:`changed_attributes` compares against."""
    return {name: _pickled(value) for name, value in attributes.items()}


def changed_attributes(attributes: Mapping[str, Any], before: Mapping[str, bytes | None]) -> dict[str, Any]:
    """Copies of the ``attributes`` that are new or changed since ``before`` (:func:`fingerprints`), those that pickle."""
    changed = {}
    for name, value in attributes.items():
        if isinstance(value, (Trainer, nn.Module)):  # a reference to the member's own trainer or module, not state to bring back
            continue
        now = _pickled(value)
        if now is not None and now != before.get(name):
            changed[name] = pickle.loads(now)
    return changed


def differing(attributes: Sequence[Mapping[str, Any]], containers: bool = True) -> list[str]:
    """The names whose values are not the same in every one of ``attributes`` (compared pickled; a name some lack counts).

    With ``containers=False``, lists, tuples, sets and dicts are left out (a history each member's
    training collected differs without being a value the module computes with).
    """
    prints = [fingerprints({n: v for n, v in a.items() if containers or not isinstance(v, (list, tuple, set, dict))}) for a in attributes]
    names = sorted(set().union(*prints)) if prints else []
    return [n for n in names if len({p.get(n, b"missing") for p in prints}) > 1]


def drawn_attributes(build: Callable[[], nn.Module]) -> list[str]:
    """The plain attributes ``build`` (your module's constructor) draws at random: those that differ between two builds
    under different seeds of torch, numpy and Python's ``random``. The global random state is left as it was."""
    built = []
    with isolate_rng():
        for seed in (0, 1):
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            built.append(plain_attributes(build()))
    return differing(built)


def pickled_digest(value: Any) -> str | None:
    """SHA-256 of ``value`` pickled (``None`` when it does not pickle): to compare values without keeping them."""
    pickled = _pickled(value)
    return None if pickled is None else hashlib.sha256(pickled).hexdigest()


def _pickled(value: Any) -> bytes | None:
    try:
        return pickle.dumps(value)
    except Exception:  # anything pickle refuses (a lambda, a lock, an open file) stays where it is
        return None
