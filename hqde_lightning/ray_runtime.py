"""Connecting the driver to Ray: starting a private local instance or joining a cluster, and reading the cluster.

Used by :class:`~hqde_lightning.actor_fit.ActorFit` and by
:class:`~hqde_lightning.compat.HQDESystem`, so both start Ray the same way. Only fits that train
in Ray actors import this module (and Ray).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import ray
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from hqde_lightning.placement import NodeCapacity

__all__ = ["alive_nodes", "check_init_kwargs", "connect_ray", "driver_pythonpath", "head_node_id", "sigint_deferred", "start_ray"]

_AUTH_HINT = (
    " Ray >= 2.60 enables token authentication by default: set `RAY_AUTH_MODE=token` (and the cluster's token)"
    " in this process's environment, or start the cluster with authentication off."
)


def start_ray(address: str | None, init_kwargs: Mapping[str, Any]) -> None:
    """Connects this process to Ray, unless it already is.

    ``address=None`` starts a private local instance listening on 127.0.0.1 only (unless
    ``init_kwargs`` names ``_node_ip_address``); any other address joins that cluster
    (:func:`connect_ray`). ``init_kwargs`` are further ``ray.init`` arguments. Ctrl-C while the
    local instance starts is held back until ``ray.init`` returned (and then raised), so that the
    caller's clean-up shuts down every process ``ray.init`` started: an interrupt inside
    ``ray.init`` would leave some of them running. Callers that shut Ray down afterwards decide
    so before calling (``address is None and not ray.is_initialized()``).
    """
    if ray.is_initialized():
        return
    check_init_kwargs(init_kwargs)
    if address is not None:
        connect_ray(address, init_kwargs)
        return
    kwargs = {"include_dashboard": False, "configure_logging": False, **init_kwargs}
    rank_zero_info("HQDEStrategy: starting a local Ray instance (listening on 127.0.0.1 only)")
    with sigint_deferred(), _loopback_only(enabled="_node_ip_address" not in kwargs):
        ray.init(address="local", **kwargs)


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Holds back SIGINT (Ctrl-C) inside the block and delivers it, to the handler there was before, when the block ends.

    Only the main thread receives signals in Python; elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
        if received:
            signal.raise_signal(signal.SIGINT)


def check_init_kwargs(init_kwargs: Mapping[str, Any]) -> None:
    """Refuses ``ray_init_kwargs`` keys ``ray.init`` does not take (a typo would otherwise read as an unreachable cluster).

    Checked when Ray is about to start, not when ``HQDEStrategy`` is built: building it must not import Ray.
    """
    accepted = inspect.signature(ray.init).parameters
    unknown = sorted(str(key) for key in init_kwargs if key not in accepted and not str(key).startswith("_"))
    if unknown:
        known = sorted(name for name, parameter in accepted.items() if parameter.kind is inspect.Parameter.KEYWORD_ONLY)
        raise MisconfigurationException(
            f"`HQDEStrategy(ray_init_kwargs=...)` has keys `ray.init` does not take: {unknown}. Its arguments are {known}"
            " (and private ones starting with '_')."
        )


def connect_ray(address: str, init_kwargs: Mapping[str, Any]) -> None:
    """Joins the Ray cluster at ``address`` (no-op when Ray is already initialised)."""
    if ray.is_initialized():
        return
    check_init_kwargs(init_kwargs)
    try:
        _check_reachable(address)
        ray.init(address=address, **dict(init_kwargs))
    except Exception as err:
        raise MisconfigurationException(
            f"HQDEStrategy could not reach Ray at `ray_address={address!r}`: {err}. Check that the cluster is running"
            " (`ray status`) and the address is right, or pass `ray_address=None` to start Ray on this machine." + _AUTH_HINT
        ) from err


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fails fast when ``host:port`` refuses connections (``ray.init`` would retry for a minute)."""
    hostport = address.split("://", 1)[-1]
    if address == "auto" or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        return
    with socket.create_connection((host, int(port)), timeout=timeout):
        pass


@contextlib.contextmanager
def _loopback_only(enabled: bool) -> Iterator[None]:
    """Makes the Ray instance started inside the block listen on 127.0.0.1 only.

    Ray binds its servers (GCS, raylet, object manager, workers) to the node's IP address, and
    to loopback only when that address is 127.0.0.1; ``ray.init(_node_ip_address="127.0.0.1")``
    is rewritten to the machine's network address on Linux. Ray's own switch for single-machine
    clusters, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read once, when Ray is imported), makes
    it take 127.0.0.1; this applies the same switch for the duration of ``ray.init``.
    """
    from ray._private import ray_constants

    if not enabled:
        yield
        return
    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        rank_zero_warn(f"HQDEStrategy: this Ray version ({ray.__version__}) has no single-machine switch; the local Ray instance listens on the network.")
        yield
        return
    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


def driver_pythonpath() -> str:
    """The driver's import path, so actors on this machine import what the driver imports."""
    entries = [p for p in sys.path if p and os.path.isdir(p)]
    existing = os.environ.get("PYTHONPATH")
    if existing:
        entries.append(existing)
    return os.pathsep.join(dict.fromkeys(entries))


def head_node_id() -> str:
    """The Ray head node's id (the driver's node when no head is marked)."""
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return ray.get_runtime_context().get_node_id()


def alive_nodes() -> list[NodeCapacity]:
    """The connected cluster's alive nodes and their total resources."""
    return [NodeCapacity(n["NodeID"], n["Resources"], n.get("NodeManagerAddress", "")) for n in ray.nodes() if n.get("Alive")]
