"""The sync codec: what a member's weights look like on the wire, and how the consensus comes back.

A sync payload is one of two types, told apart by its type (never by guessing from attributes):

* a **raw** payload: ``dict[str, np.ndarray]``, the member's tensors as numpy arrays
  (:func:`state_to_numpy`; what a member sends without a codec callback);
* a **quantized** payload: :class:`~hqde_lightning.compression.EncodedState`, from
  :func:`~hqde_lightning.compression.encode` (the ``AdaptiveQuantization`` callback).

:func:`decode_payload`, :func:`payload_nbytes` and :func:`payload_layout` accept either and
raise ``TypeError`` for anything else. On the way back, a member applies the consensus to its
own weights with :func:`apply_sync` (``none``, ``elastic`` or ``replace``).

Plain numpy/torch only: no Ray, no Lightning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from functools import singledispatch
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from hqde_lightning.compression import EncodedState, decode

__all__ = [
    "SYNC_MODES",
    "Payload",
    "apply_sync",
    "apply_sync_",
    "decode_payload",
    "distance_to_consensus",
    "load_buffers",
    "non_persistent_buffers",
    "payload_layout",
    "payload_nbytes",
    "state_to_numpy",
]

#: a sync payload: raw numpy arrays by key, or a quantized :class:`EncodedState`
Payload = Union[Mapping[str, np.ndarray], EncodedState]
#: how a member applies the consensus: keep its weights, pull them toward it, or take it
SYNC_MODES = ("none", "elastic", "replace")


def state_to_numpy(state: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """CPU numpy copies of a state dict's tensors, dtypes kept (bfloat16 widened to float32, which numpy lacks).

    This is the raw payload encoder: its output is a valid :data:`Payload`.
    """
    out = {}
    for key, value in state.items():
        tensor = value.detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        out[key] = tensor.cpu().numpy().copy()
    return out


def _unknown_payload(payload: object) -> TypeError:
    return TypeError(
        f"a sync payload must be a dict of numpy arrays or a compression.EncodedState, got {type(payload).__name__}"
    )


@singledispatch
def decode_payload(payload: Payload, keys: Sequence[str] | None = None) -> dict[str, Tensor]:
    """CPU torch tensors from ``payload``, all entries or only ``keys`` (in that order).

    Raises:
        TypeError: if ``payload`` is neither a raw nor a quantized payload.
    """
    raise _unknown_payload(payload)


@decode_payload.register(Mapping)
def _decode_raw(payload: Mapping[str, np.ndarray], keys: Sequence[str] | None = None) -> dict[str, Tensor]:
    selected = payload if keys is None else {k: payload[k] for k in keys}
    return {k: torch.tensor(np.asarray(v)) for k, v in selected.items()}


@decode_payload.register(EncodedState)
def _decode_quantized(payload: EncodedState, keys: Sequence[str] | None = None) -> dict[str, Tensor]:
    if keys is not None:
        payload = EncodedState({k: payload.tensors[k] for k in keys})
    return decode(payload)


@singledispatch
def payload_nbytes(payload: Payload) -> int:
    """Bytes ``payload`` occupies on the wire (array buffers only, not keys or metadata).

    Raises:
        TypeError: if ``payload`` is neither a raw nor a quantized payload.
    """
    raise _unknown_payload(payload)


@payload_nbytes.register(Mapping)
def _nbytes_raw(payload: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(v).nbytes for v in payload.values()))


@payload_nbytes.register(EncodedState)
def _nbytes_quantized(payload: EncodedState) -> int:
    return int(payload.nbytes)


@singledispatch
def payload_layout(payload: Payload) -> dict[str, int]:
    """Name -> number of values of every entry of ``payload`` (what map-reduce shards by).

    Raises:
        TypeError: if ``payload`` is neither a raw nor a quantized payload.
    """
    raise _unknown_payload(payload)


@payload_layout.register(Mapping)
def _layout_raw(payload: Mapping[str, np.ndarray]) -> dict[str, int]:
    return {k: int(np.asarray(v).size) for k, v in payload.items()}


@payload_layout.register(EncodedState)
def _layout_quantized(payload: EncodedState) -> dict[str, int]:
    return {k: math.prod(t.shape) for k, t in payload.tensors.items()}


def _like(value: Tensor | np.ndarray, current: Tensor) -> Tensor:
    """``value`` as a tensor of ``current``'s dtype and device (may share memory with ``value``)."""
    with warnings.catch_warnings():  # a consensus fetched from the object store is read-only; it is only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.as_tensor(value).to(device=current.device, dtype=current.dtype)


def _check_keys(state: Mapping[str, Tensor], consensus: Mapping[str, Any]) -> None:
    missing = sorted(set(consensus) - set(state))
    if missing:
        raise ValueError(f"the consensus holds keys the member's state lacks: {missing[:5]}")


def distance_to_consensus(state: Mapping[str, Tensor], consensus: Mapping[str, Tensor | np.ndarray]) -> float:
    """Euclidean distance between a member's weights and the consensus, over the consensus's keys.

    Each entry's difference is taken in the member's dtype and measured in at least float32.

    Raises:
        ValueError: for a consensus key that ``state`` lacks.
    """
    _check_keys(state, consensus)
    squared = 0.0
    for key, value in consensus.items():
        current = state[key].detach()
        difference = _like(value, current) - current
        squared += float(torch.linalg.vector_norm(difference.to(torch.promote_types(current.dtype, torch.float32)))) ** 2
    return squared**0.5


def keeps_members_apart(mode: str, alpha: float) -> bool:
    """Whether a sync in ``mode`` with strength ``alpha`` leaves the members distinct: ``"none"``, or ``"elastic"`` with
    ``alpha < 1``. Only then are members with identical weights a mistake worth reporting (``"replace"`` and a full
    elastic pull set every member to the consensus on purpose)."""
    return mode == "none" or (mode == "elastic" and alpha < 1.0)


def apply_sync(state: Mapping[str, Tensor], consensus: Mapping[str, Tensor | np.ndarray], mode: str, alpha: float) -> dict[str, Tensor]:
    """A member's new weights after a sync, for every key of ``consensus`` (``state`` is not changed).

    With ``c`` the consensus entry converted to the dtype and device of the member's ``w``:

    * ``"none"``: ``w`` (the members stay independent);
    * ``"elastic"``: ``w + alpha * (c - w)``, computed in ``w``'s dtype; ``alpha >= 1`` gives ``c``;
    * ``"replace"``: ``c`` (federated averaging), whatever ``alpha``.

    Args:
        state: the member's current tensors by key (a superset of ``consensus``'s keys).
        consensus: the aggregated tensors (torch tensors or numpy arrays).
        mode: one of :data:`SYNC_MODES`.
        alpha: the elastic pull strength, in [0, 1] (used by ``"elastic"`` only).

    Returns:
        New tensors (never sharing memory with ``state`` or ``consensus``), keyed like ``consensus``.

    Raises:
        ValueError: for an unknown ``mode``, or a consensus key that ``state`` lacks.
    """
    if mode not in SYNC_MODES:
        raise ValueError(f"`mode={mode!r}` is not known; choose one of {list(SYNC_MODES)}")
    _check_keys(state, consensus)
    out: dict[str, Tensor] = {}
    for key, value in consensus.items():
        current = state[key].detach()
        if mode == "none":
            out[key] = current.clone()
        elif mode == "replace" or alpha >= 1.0:
            out[key] = _like(value, current).clone()
        else:
            out[key] = torch.add(current, _like(value, current) - current, alpha=alpha)
    return out


def apply_sync_(state: Mapping[str, Tensor], consensus: Mapping[str, Tensor | np.ndarray], mode: str, alpha: float) -> None:
    """:func:`apply_sync` written into ``state``'s tensors, one entry at a time.

    The sync's peak memory stays one tensor above the model's (what a member applies at each
    sync point, in its actor or in a member group).
    """
    with torch.no_grad():
        for key, value in consensus.items():
            (updated,) = apply_sync({key: state[key]}, {key: value}, mode, alpha).values()
            state[key].copy_(updated)


def non_persistent_buffers(module: torch.nn.Module) -> dict[str, Tensor]:
    """``module``'s buffers that its ``state_dict`` leaves out (``register_buffer(..., persistent=False)``): a fixed random
    projection drawn in ``__init__``, a running value your step updates. A plain fit leaves them on your module; a
    member's travel with its weights, so that the ensemble's members hold them too."""
    saved = module.state_dict().keys()
    return {name: buffer for name, buffer in module.named_buffers() if name not in saved}


def load_buffers(module: torch.nn.Module, buffers: Mapping[str, Any]) -> None:
    """Copies ``buffers`` (by name, e.g. :func:`non_persistent_buffers`) into ``module``'s buffers of those names."""
    own = dict(module.named_buffers())
    with torch.no_grad():
        for name, value in buffers.items():
            own[name].copy_(torch.as_tensor(value))
