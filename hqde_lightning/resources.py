"""Each member actor's Ray resources, and which members each actor trains.

Called by ``HQDEStrategy`` when the ``Trainer`` is built while Ray is connected
(:func:`check_resources`) and by :class:`~hqde_lightning.actor_fit.ActorFit` when the members start
(:func:`worker_members`, :func:`worker_options`). The packing maths is in
:mod:`hqde_lightning.placement`; the Trainer-time device checks, which need no Ray, in
:mod:`hqde_lightning.devices`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from hqde_lightning.devices import available_gpus
from hqde_lightning.placement import check_members_fit, default_share, ray_resources
from hqde_lightning.ray_runtime import alive_nodes, driver_pythonpath

if TYPE_CHECKING:
    from hqde_lightning.strategy import HQDEStrategy

__all__ = ["check_resources", "member_request", "worker_members", "worker_options"]


def member_request(strategy: HQDEStrategy) -> dict[str, Any]:
    """Each member's Ray resources: ``resources_per_member`` over the default share.

    The default CPU share is the largest equal share that packs every member onto the
    alive nodes (:func:`~hqde_lightning.placement.default_share`; only GPU nodes count when
    members use GPUs); the GPU share is :meth:`HQDEStrategy.default_gpus_per_member`.
    """
    nodes = alive_nodes()
    request: dict[str, Any] = {}
    if isinstance(strategy.accelerator, CUDAAccelerator):
        request["num_gpus"] = strategy.default_gpus_per_member(len(strategy.parallel_devices or []))
    uses_gpus = float(strategy.resources_per_member.get("num_gpus", request.get("num_gpus", 0.0)) or 0.0) > 0
    gpu_nodes = [n for n in nodes if n.resources.get("GPU", 0.0) >= 1.0]
    hosts = gpu_nodes if uses_gpus and gpu_nodes else nodes
    request["num_cpus"] = default_share([float(n.resources.get("CPU", 0.0)) for n in hosts], strategy.num_members)
    request.update({k: v for k, v in strategy.resources_per_member.items() if v is not None})
    return request

def check_resources(strategy: HQDEStrategy) -> dict[str, Any]:
    """Packs every member's request onto the alive nodes and returns the request.

    Raises ``MisconfigurationException`` naming the first member that fits on no node, its
    request and what the nodes offer (Ray would otherwise wait forever for it).
    """
    request = member_request(strategy)
    n = strategy.num_members
    try:
        check_members_fit([ray_resources(request)] * n, alive_nodes())
    except ValueError as err:
        raise MisconfigurationException(
            f"HQDEStrategy(num_members={n}) cannot place its members: {err}. Lower `resources_per_member`"
            " or `num_members`, or add nodes to the cluster."
        ) from None
    return request

def worker_members(strategy: HQDEStrategy) -> list[list[int]]:
    """The members each Ray actor of a fit trains, by member index (Ray must be started).

    ``members_per_worker=k``: k members per actor in index order (the last actor may hold fewer).
    ``"auto"``: one member per actor when ``resources_per_member`` is set; otherwise one actor per
    GPU (the Trainer's devices, or the cluster's GPUs with ``ray_address``) or, on CPUs, per
    alive Ray node that has CPUs, with the members split evenly. A fit whose members cannot share a process
    (:func:`~hqde_lightning.embedded.group_blocker`) does not ask: it runs one member per actor.
    """
    n, k = strategy.num_members, strategy.members_per_worker
    if k != "auto":
        return [list(range(start, min(start + k, n))) for start in range(0, n, k)]
    if strategy.resources_per_member:
        workers = n
    elif isinstance(strategy.accelerator, CUDAAccelerator):
        workers = available_gpus(strategy, len(strategy.parallel_devices or []))
    else:
        workers = sum(1 for node in alive_nodes() if node.resources.get("CPU", 0.0) > 0)
    workers = max(1, min(n, workers))
    return [[int(m) for m in part] for part in np.array_split(np.arange(n), workers)]


def worker_options(strategy: HQDEStrategy, workers: list[list[int]]) -> tuple[list[dict[str, Any]], list[int]]:
    """Each actor's Ray options and torch threads, for actors training ``workers`` (member indices per actor).

    One member per actor: :func:`check_resources`'s request for each. Several: a whole GPU each
    on CUDA (never a fraction), the largest equal CPU share that packs the actors onto the nodes,
    and ``resources_per_member`` (CPUs, memory and custom resources) times the actor's members. On this
    machine the options carry the driver's import path; the threads are the actor's whole CPUs
    (at least 1).

    Raises:
        MisconfigurationException: when the actors cannot be packed onto the alive nodes.
    """
    if all(len(members) == 1 for members in workers):
        request = check_resources(strategy)
        requests = [dict(request) for _ in workers]
    else:
        nodes = alive_nodes()
        cuda = isinstance(strategy.accelerator, CUDAAccelerator)
        hosts = [n for n in nodes if n.resources.get("GPU", 0.0) >= 1.0] if cuda else nodes
        share = default_share([float(n.resources.get("CPU", 0.0)) for n in hosts or nodes], len(workers))
        requests = []
        for members in workers:
            request = {"num_cpus": share}
            request.update(_scaled(strategy.resources_per_member, len(members)))
            if cuda:
                request["num_gpus"] = 1
            requests.append(request)
        try:
            check_members_fit([ray_resources(r) for r in requests], nodes)
        except ValueError as err:
            raise MisconfigurationException(
                f"HQDEStrategy cannot place its {len(workers)} actors of {[len(w) for w in workers]} members: {err}."
                " Lower `resources_per_member`, change `members_per_worker`, or add nodes to the cluster."
            ) from None
    threads = [max(1, math.floor(r["num_cpus"])) if r.get("num_cpus") else 1 for r in requests]
    if strategy.ray_address is None:
        for request in requests:
            request["runtime_env"] = {"env_vars": {"PYTHONPATH": driver_pythonpath()}}
    return requests, threads


def _scaled(per_member: dict[str, Any], k: int) -> dict[str, Any]:
    """``resources_per_member`` for an actor of ``k`` members: every number, and every custom resource, times ``k``."""
    out: dict[str, Any] = {}
    for key, value in per_member.items():
        if isinstance(value, dict):
            out[key] = {name: amount * k for name, amount in value.items()}
        elif value is not None:
            out[key] = value * k
    return out
