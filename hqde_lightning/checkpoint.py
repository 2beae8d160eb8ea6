"""Checkpoint files: atomic writes and the ensemble's section inside a Lightning checkpoint.

A checkpoint written under ``HQDEStrategy`` is an ordinary Lightning checkpoint whose
``state_dict`` holds the consensus weights (so ``YourModule.load_from_checkpoint`` gives the
consensus model) plus one extra entry, ``checkpoint["hqde"]``:

``members``
    one dict per member: ``state_dict``, ``optimizer_states``, ``rng`` (torch / numpy /
    python / CUDA generator states) and the sync ``round`` they were taken at.
``coordinator``
    the aggregator's state (e.g. reputations, references) and the sync history.
``weights`` / ``active`` / ``combine``
    how the ensemble combines predictions.
``num_members``, ``seed``
    the run's shape, checked on resume.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from fsspec.implementations.local import LocalFileSystem

__all__ = ["HQDE_KEY", "AtomicCheckpointIO", "capture_rng_states", "load_checkpoint_file", "restore_rng_states"]

HQDE_KEY = "hqde"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a half-written file behind.

    Local files are written to a temporary file in the target's folder, flushed to disk and
    moved over the target with ``os.replace`` (atomic on POSIX and Windows): a crash during a
    save leaves the previous checkpoint intact. Remote file systems keep Lightning's own
    transactional write.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
        except BaseException:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
            raise


def load_checkpoint_file(path: _PATH, map_location: Any = "cpu") -> dict[str, Any]:
    """Loads a checkpoint file (a trusted one: hyper-parameters may hold arbitrary objects)."""
    return pl_load(path, map_location=map_location, weights_only=False)


def capture_rng_states() -> dict[str, Any]:
    """The global random generators' states of this process (torch, CUDA, numpy, python)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # tensors and plain numbers only, so that ``torch.load(weights_only=True)`` accepts it
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Restores what :func:`capture_rng_states` returned (missing entries are left alone)."""
    if "torch" in states:
        torch.set_rng_state(torch.as_tensor(states["torch"], dtype=torch.uint8).cpu())
    if "numpy" in states:
        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    if "python" in states:
        random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
