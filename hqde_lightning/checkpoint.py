"""Checkpoint files: safe atomic writes, safe loading and the ensemble's section inside a Lightning checkpoint.

A checkpoint written under ``HQDEStrategy`` is an ordinary Lightning checkpoint whose
``state_dict`` holds the consensus weights (so ``YourModule.load_from_checkpoint`` gives the
consensus model) plus one extra entry, ``checkpoint["hqde"]``:

``members``
    one entry per member index: that member's own full Lightning checkpoint (``state_dict``,
    ``optimizer_states``, loops, callback states) plus ``hqde_member`` (its index, the sync
    ``round`` it was taken at and its torch / numpy / python / CUDA generator states). Resuming
    gives every member its own entry; ``Ensemble.load_from_checkpoint`` reads the weights.
``coordinator``
    the aggregator's state (e.g. reputations, references) and the sync history.
``weights`` / ``active`` / ``combine``
    how the ensemble combines predictions.
``num_members``, ``seed``
    the run's shape, checked on resume.
``checksums``
    SHA-256 digests of the consensus and of every member's ``state_dict`` tensors, checked on
    every load (they detect damage, not tampering: whoever can edit the file can recompute them).

Loading is safe by default: files are read with ``torch.load(weights_only=True)``, which
refuses any pickled object other than tensors, containers and plain values. Everything the
package writes stays inside those types. A file refused for holding other objects (e.g.
hyper-parameters of custom classes) loads with an explicit ``weights_only=False`` -- only for
files from a source you trust, since unpickling them can run code.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import random
import re
import secrets
import socket
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from hqde_lightning.attributes import differing, pickled_digest, plain_attributes
from hqde_lightning.codec import non_persistent_buffers
from hqde_lightning.ensemble import combine_name

__all__ = [
    "member_resume_checkpoint",
    "HQDE_KEY",
    "AtomicCheckpointIO",
    "capture_rng_states",
    "ensemble_entries",
    "ensemble_members",
    "ensemble_section",
    "EXTRAS_CANDIDATES",
    "extras_candidates",
    "member_extras",
    "module_extras_candidates",
    "load_checkpoint_file",
    "loaded_host_rng",
    "member_checksums",
    "read_checkpoint",
    "restore_rng_states",
    "saved_host_rng",
    "seal_checkpoint",
    "state_digest",
    "to_safe_types",
    "verify_checksums",
]

HQDE_KEY = "hqde"
#: a member entry's key for what its ``extras`` are picked from when the section is written (see :func:`extras_candidates`)
EXTRAS_CANDIDATES = "extras_candidates"
_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
#: ``.{target}.{host tag}-{pid}-{random}.tmp``: the temporary file of one write in progress
_TMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")
# file-access errors keep their own type: they do not mean the file is damaged
_ACCESS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, MemoryError)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a half-written file behind.

    Local files are written to a temporary file in the target's folder, flushed to disk and
    moved over the target with ``os.replace`` (atomic on POSIX and Windows): a crash during a
    save leaves the previous checkpoint intact. The temporary file is created as ``torch.save``
    creates files (mode ``0o666`` minus the process's umask), so the checkpoint gets the same
    permissions as a plain ``torch.save`` would give it. A failed write removes its temporary
    file; one left by a process killed mid-write (its name holds the host and process id) is
    removed by the next save into the same folder from the same host, once that process is
    gone. Remote file systems keep Lightning's own transactional write.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        _remove_stale_temporary_files(folder)
        tmp_path = os.path.join(folder, f".{os.path.basename(path)}.{_HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
        except BaseException:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
            raise


def _remove_stale_temporary_files(folder: str) -> None:
    """Removes the temporary files in ``folder`` left by writes of this host's processes that are gone."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = _TMP_NAME.match(name)
        if match is None or match["host"] != _HOST_TAG or not _process_gone(int(match["pid"])):
            continue
        try:
            os.remove(os.path.join(folder, name))
        except FileNotFoundError:  # another writer removed it first
            pass


def _process_gone(pid: int) -> bool:
    """True when no process ``pid`` runs on this host (checked on POSIX only; elsewhere nothing counts as gone)."""
    if os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False


def load_checkpoint_file(path: _PATH, map_location: Any = "cpu", weights_only: bool = True) -> dict[str, Any]:
    """Loads a checkpoint file safely and checks it (see :func:`read_checkpoint` for the errors).

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load``.
        weights_only: ``True`` (default) refuses any pickled object other than tensors,
            containers and plain values; ``False`` loads anything -- only for files from a
            source you trust, since unpickling them can run code.
    """
    return read_checkpoint(path, lambda: pl_load(path, map_location=map_location, weights_only=bool(weights_only)))


def read_checkpoint(path: _PATH, load: Callable[[], Any]) -> dict[str, Any]:
    """Runs ``load`` (a ``torch.load`` of ``path``), checks what it returned and names ``path`` in every failure.

    Raises:
        pickle.UnpicklingError: ``weights_only=True`` refused an object in the file (the message
            names it and says how to opt in).
        RuntimeError: the file is damaged or is not a checkpoint, or a tensor checksum stored in
            an HQDE checkpoint does not match (the message names the member).
        FileNotFoundError, PermissionError, ...: the file cannot be opened (unchanged).
    """
    try:
        checkpoint = load()
    except _ACCESS_ERRORS:
        raise
    except pickle.UnpicklingError as err:
        refused = re.search(r"GLOBAL ([\w.]+)", str(err))
        if refused is None:
            raise _damaged(path, err) from err
        raise pickle.UnpicklingError(
            f"{path} was not loaded: it holds `{refused.group(1)}`, which `weights_only=True` refuses because unpickling"
            " it can run code. Checkpoints written by HQDEStrategy hold only tensors and plain values; objects like this"
            " one come from elsewhere (e.g. hyper-parameters of a custom type, or a crafted file). If the file comes from"
            " a source you trust, load it with `weights_only=False`: `trainer.fit/validate/test/predict(...,"
            " weights_only=False)` or `Ensemble.load_from_checkpoint(..., weights_only=False)`."
        ) from None
    except Exception as err:
        if isinstance(err, RuntimeError) and "CUDA" in str(err):  # a device mapping problem, not a damaged file
            raise
        raise _damaged(path, err) from err
    if not isinstance(checkpoint, dict):
        raise RuntimeError(f"{path} is damaged or is not a checkpoint: it holds a {type(checkpoint).__name__}, not a checkpoint dict.")
    verify_checksums(checkpoint, path)
    return checkpoint


def _damaged(path: _PATH, err: BaseException) -> RuntimeError:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else "no detail"
    return RuntimeError(f"{path} is damaged or is not a checkpoint ({type(err).__name__}: {detail}).")


def state_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 over a state dict's tensors (key, dtype, shape and bytes, in key order); other values are not covered."""
    digest = hashlib.sha256()
    for key in sorted(k for k, v in state.items() if isinstance(v, Tensor)):
        tensor = state[key].detach()
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        if tensor.is_quantized:
            tensor = tensor.int_repr()
        tensor = tensor.cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def member_checksums(consensus: Mapping[str, Any] | None, members: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``checksums`` entry of an HQDE section: digests of the consensus and of each member's ``state_dict``."""
    return {
        "algorithm": "sha256",
        "consensus": None if consensus is None else state_digest(consensus),
        "members": [state_digest(m["state_dict"]) if m.get("state_dict") is not None else None for m in members],
    }


def ensemble_section(run: Any, members: list[dict[str, Any]], weights: Any, active: Any, coordinator_state: Mapping[str, Any]) -> dict[str, Any]:
    """The ``checkpoint['hqde']`` section of the run ``run`` (an ``HQDEStrategy``) holding ``members``, one entry per member index.

    ``weights``/``active`` are the ensemble's member weights and mask (``None`` while the
    members train), ``coordinator_state`` the coordinator's state (kept as plain types only, so
    that the file loads with ``weights_only=True``). :func:`seal_checkpoint` adds the checksums.
    """
    return {
        "num_members": run.num_members,
        "seed": run.seed,
        "sync": run.sync,
        "aggregator": getattr(run.aggregator, "name", type(run.aggregator).__name__),
        "combine": combine_name(run.combiner),
        # which output the ensemble's "auto" rule learnt holds class logits (see `ensemble.saved_combiner`)
        "class_logits": _class_logits(getattr(run, "ensemble", None)),
        "members": _with_extras(members),
        "weights": weights,
        "active": active,
        "coordinator": to_safe_types(coordinator_state),
    }


def _class_logits(ensemble: Any) -> dict[str, Any] | None:
    """What ``ensemble``'s combiner learnt about its class-logits output (``None`` when it has none to keep)."""
    logits = getattr(getattr(ensemble, "combiner", None), "logits", None)
    return None if logits is None or logits.path is None else logits.state_dict()


def ensemble_members(ensemble: Any, final_checkpoints: Mapping[int, dict[str, Any]], num_members: int) -> tuple[list[dict[str, Any]], Tensor | None, Tensor | None]:
    """The driver's entries for :func:`ensemble_section`: every member's full Lightning state from the end of the fit, with its current weights.

    ``ensemble`` is the run's :class:`~hqde_lightning.Ensemble` (``None`` before a fit: no
    entries), ``final_checkpoints`` each member's last snapshot without the weights of the
    ensemble's members. Returns the entries, the member weights and the active flags. Members
    that are not in ``ensemble`` (given up on during the fit) keep their last snapshot and are
    marked inactive, so the file both resumes and loads as the ensemble.
    """
    if ensemble is None:
        return [], None, None
    members = [dict(final_checkpoints.get(i, {})) for i in range(num_members)]
    weights = torch.zeros(num_members, dtype=torch.float64)
    active = torch.zeros(num_members, dtype=torch.bool)
    for position, index in enumerate(ensemble.member_ids):
        member = ensemble.members[position]
        members[index]["state_dict"] = {k: v.detach().cpu() for k, v in member.state_dict().items()}
        members[index][EXTRAS_CANDIDATES] = module_extras_candidates(member)
        weights[index] = ensemble.weights[position].cpu()
        active[index] = ensemble.active[position].cpu()
    return members, weights, active


def extras_candidates(buffers: Mapping[str, Tensor], attributes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """What one member's entry keeps for :func:`ensemble_section` to pick its ``extras`` from: copies of its
    non-persistent ``buffers`` and of its plain ``attributes`` that ``torch.load(weights_only=True)`` reads back
    (tensors, numbers, strings, lists/dicts of them), and a digest of each other attribute (compared only, to name
    it when the members differ). Your data objects, submodules and trainer are left out.

    Kept under :data:`EXTRAS_CANDIDATES` in every entry and snapshot (of a group, a member actor or
    thread), so that the writer compares the members wherever they trained."""
    safe, digests = {}, {}
    for name, value in attributes.items():
        if isinstance(value, (Trainer, torch.nn.Module, Dataset, DataLoader)):
            continue
        if _loads_safely(value):
            safe[name] = copy.deepcopy(value)
        else:
            digests[name] = pickled_digest(value)
    return {"buffers": {n: b.detach().cpu().clone() for n, b in buffers.items()}, "attributes": safe, "digests": digests}


def module_extras_candidates(module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """:func:`extras_candidates` of a member that is a module of its own (in a member actor or thread, in an ensemble)."""
    return extras_candidates(non_persistent_buffers(module), plain_attributes(module))


def member_extras(candidates: Sequence[Mapping[str, Mapping[str, Any]]]) -> list[dict[str, dict[str, Any]]]:
    """Per member, what sets it apart outside its ``state_dict``, for its checkpoint entry: of its non-persistent
    buffers and plain attributes (:func:`extras_candidates`), those in which the members differ (drawn at random in
    ``__init__``, a history each fit collected). A module loaded from a checkpoint would otherwise hold one fresh draw
    for every member. Attributes that ``torch.load(weights_only=True)`` cannot read back (custom classes, numpy arrays)
    are left out, with a warning naming them."""
    buffers = [c["buffers"] for c in candidates]
    attributes = [c["attributes"] for c in candidates]
    digests = [c.get("digests", {}) for c in candidates]
    names = [n for n in buffers[0] if any(n not in b or not torch.equal(b[n], buffers[0][n]) for b in buffers[1:])]
    differ = differing(attributes)
    unsafe = sorted(n for n in set().union(*digests) if len({d.get(n, "missing") for d in digests}) > 1)
    if unsafe:
        rank_zero_warn(
            f"HQDE checkpoint: the members' attributes {unsafe} differ but are left out of the file (`torch.load(weights_only=True)`"
            " reads tensors, numbers, strings and lists/dicts of them only); a loaded ensemble's members hold your module's own."
        )
    return [
        {
            "buffers": {n: b[n] for n in names if n in b},
            "attributes": {n: copy.deepcopy(a[n]) for n in differ if n in a},
        }
        for b, a in zip(buffers, attributes)
    ]


def _with_extras(members: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``members`` (entries by index) with their :data:`EXTRAS_CANDIDATES` replaced by ``extras``: what sets each apart
    from the others that have candidates (:func:`member_extras`). The entries themselves are left as they are (a
    coordinator in this process holds the snapshots among them)."""
    holding = [i for i, m in enumerate(members) if m and EXTRAS_CANDIDATES in m]
    extras = dict(zip(holding, member_extras([members[i][EXTRAS_CANDIDATES] for i in holding]))) if holding else {}
    out = []
    for i, m in enumerate(members):
        entry = {k: v for k, v in m.items() if k != EXTRAS_CANDIDATES}
        if i in extras:
            entry["extras"] = extras[i]
        out.append(entry)
    return out


def _loads_safely(value: Any) -> bool:
    """Whether ``torch.load(weights_only=True)`` reads ``value`` back as it is."""
    if value is None or isinstance(value, (bool, int, float, complex, str, Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_loads_safely(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _loads_safely(v) for k, v in value.items())
    return False


def seal_checkpoint(checkpoint: Mapping[str, Any], section: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` with the ensemble ``section`` as ``checkpoint['hqde']``, its checksums added to the section."""
    section["checksums"] = member_checksums(checkpoint.get("state_dict"), section["members"])
    return {**{k: v for k, v in checkpoint.items() if k != EXTRAS_CANDIDATES}, HQDE_KEY: section}


def verify_checksums(checkpoint: Mapping[str, Any], path: _PATH) -> None:
    """Recomputes the digests stored in ``checkpoint['hqde']['checksums']`` (if any); raises naming the damaged part.

    Raises:
        RuntimeError: ``"<path> is damaged: member 2's weights do not match ..."`` (or the consensus's).
    """
    section = checkpoint.get(HQDE_KEY)
    expected = section.get("checksums") if isinstance(section, Mapping) else None
    if not expected:
        return
    consensus = expected.get("consensus")
    if consensus is not None and state_digest(checkpoint.get("state_dict") or {}) != consensus:
        raise RuntimeError(f"{path} is damaged: the consensus weights (`state_dict`) do not match the checksum written with them.")
    members = list(section.get("members") or [])
    digests = list(expected.get("members") or [])
    if len(digests) != len(members):
        raise RuntimeError(f"{path} is damaged: it lists {len(members)} members but {len(digests)} member checksums.")
    for index, (entry, digest) in enumerate(zip(members, digests)):
        if digest is not None and state_digest((entry or {}).get("state_dict") or {}) != digest:
            raise RuntimeError(f"{path} is damaged: member {index}'s weights do not match the checksum written with them.")


def ensemble_entries(checkpoint: Mapping[str, Any]) -> tuple[list[dict[str, Any]], Tensor | None, list[dict[str, dict[str, Any]]]]:
    """Every member's weights in an HQDE checkpoint, which members take part in predictions, and what else sets each apart.

    Returns ``(states, active, extras)``: ``active`` is the section's mask (``None``: all
    members), with members that hold no weights (they never reported a state) given the
    consensus weights, switched off and named in a warning; ``extras`` per member its
    ``"buffers"`` and ``"attributes"`` (empty in files written before they were kept).
    """
    section = checkpoint[HQDE_KEY]
    members = list(section["members"])
    missing = [i for i, m in enumerate(members) if not m or m.get("state_dict") is None]
    active = section.get("active")
    if missing:
        warnings.warn(f"HQDE checkpoint: members {missing} hold no weights (they never reported a state); they are left out of predictions.", UserWarning)
        active = torch.ones(len(members), dtype=torch.bool) if active is None else torch.as_tensor(active, dtype=torch.bool).clone()
        active[missing] = False
    states = [checkpoint["state_dict"] if i in missing else m["state_dict"] for i, m in enumerate(members)]
    extras = [{"buffers": {}, "attributes": {}, **((m or {}).get("extras") or {})} for m in members]
    return states, active, extras


def to_safe_types(obj: Any) -> Any:
    """``obj`` with numpy scalars and arrays turned into Python numbers and tensors (nested dicts/lists/tuples).

    What the package writes must load with ``torch.load(weights_only=True)``, which refuses numpy objects.
    """
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, Mapping):
        return {k: to_safe_types(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_safe_types(v) for v in obj)
    return obj


def saved_host_rng(state: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """numpy's and Python's random states as :func:`capture_rng_states` saves them: ``state`` (``(np.random.get_state(),
    random.getstate())``, as a member group keeps each member's), or the current ones."""
    numpy_state, python_state = state if state is not None else (np.random.get_state(), random.getstate())
    kind, keys, pos, has_gauss, cached = numpy_state
    # tensors and plain numbers only, so that ``torch.load(weights_only=True)`` accepts it
    return {"numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)), "python": python_state}


def loaded_host_rng(saved: Mapping[str, Any]) -> tuple[Any, Any]:
    """What :func:`saved_host_rng` saved, as ``(np.random.get_state(), random.getstate())`` give it."""
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    return (kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached), saved["python"]


def capture_rng_states() -> dict[str, Any]:
    """The global random generators' states of this process (torch, CUDA, numpy, python)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), **saved_host_rng()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Restores what :func:`capture_rng_states` returned (missing entries are left alone)."""
    if "torch" in states:
        torch.set_rng_state(torch.as_tensor(states["torch"], dtype=torch.uint8).cpu())
    if "numpy" in states and "python" in states:
        numpy_state, python_state = loaded_host_rng(states)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def member_resume_checkpoint(checkpoint: dict[str, Any], entry: dict[str, Any], index: int, own: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
    """What member ``index`` resumes from: its own entry of an HQDE checkpoint.

    An empty entry (a member that never reported a state: it had not started when the fit
    failed, or it was given up on) resumes from the checkpoint's top level (the consensus),
    or, given ``own`` (the member's weights as a new fit starts it), starts as a new fit
    would: from ``own``, at epoch 0, with fresh optimizers. Independent members take ``own``,
    since the top level would make the member a copy of member 0. An entry holding weights
    only (written by older versions) is completed from the top level (loops, callbacks,
    versions) with a fresh optimizer state, since the top level's optimizer state is not this
    member's.
    """
    if not entry and own is not None:
        warnings.warn(f"HQDEStrategy: member {index} has no state of its own in the checkpoint (it never trained); it starts as in a new fit.", UserWarning, stacklevel=2)
        fresh = {k: v for k, v in checkpoint.items() if k not in (HQDE_KEY, "loops", "callbacks", "epoch", "global_step")}
        return {**fresh, "state_dict": dict(own), "optimizer_states": [], "lr_schedulers": []}
    if not entry:
        return checkpoint
    if "pytorch-lightning_version" in entry:
        return entry
    warnings.warn(f"HQDEStrategy: member {index}'s checkpoint entry holds its weights only; it resumes with them, the run's progress and a fresh optimizer state.", UserWarning, stacklevel=2)
    top = {k: v for k, v in checkpoint.items() if k != HQDE_KEY}
    return {**top, **entry, "optimizer_states": [], "lr_schedulers": []}
