"""Where members can run: Trainer-time device checks and each member actor's Ray resources.

Called by ``HQDEStrategy`` when the ``Trainer`` is built (:func:`check_devices`, and
:func:`check_resources` when Ray is already connected) and by the launcher when the members
start (:func:`member_options`). The packing maths is in :mod:`hqde_lightning.placement`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import ray
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from hqde_lightning.placement import check_members_fit, default_share, ray_resources
from hqde_lightning.ray_runtime import alive_nodes, connect_ray, driver_pythonpath

if TYPE_CHECKING:
    from hqde_lightning.strategy import HQDEStrategy

__all__ = ["check_devices", "check_resources", "member_options", "member_request"]


def check_devices(strategy: HQDEStrategy) -> None:
    """Refuses accelerators, device counts and GPU requests the members cannot run with; joins ``ray_address``.

    Raises:
        MisconfigurationException: naming the Trainer or strategy argument at fault.
    """
    accelerator = strategy.accelerator
    if not isinstance(accelerator, (CPUAccelerator, CUDAAccelerator)):
        raise MisconfigurationException(
            f"HQDEStrategy runs members on CPU or CUDA devices, not on `{type(accelerator).__name__}`:"
            " use `Trainer(accelerator='cpu')` or `Trainer(accelerator='gpu')`."
        )
    if strategy.num_nodes != 1:
        raise MisconfigurationException(
            f"`Trainer(num_nodes={strategy.num_nodes})` does not apply to HQDEStrategy: Ray places members on the"
            " nodes of its cluster. Leave `num_nodes=1` and pass `HQDEStrategy(ray_address=...)`."
        )
    devices = strategy.parallel_devices or []
    if isinstance(accelerator, CPUAccelerator) and len(devices) > 1:
        raise MisconfigurationException(
            f"`Trainer(accelerator='cpu', devices={len(devices)})` asks for {len(devices)} CPU processes; HQDEStrategy"
            " runs one process per member instead. Leave `devices` at 1 or 'auto' and set `num_members`"
            " (and `resources_per_member={'num_cpus': ...}`)."
        )
    requested_gpus = float(strategy.resources_per_member.get("num_gpus", 0))
    if isinstance(accelerator, CPUAccelerator) and requested_gpus > 0:
        raise MisconfigurationException(
            f"`resources_per_member={{'num_gpus': {requested_gpus}}}` asks for GPUs but the Trainer's accelerator is the CPU:"
            " use `Trainer(accelerator='gpu')` or drop `num_gpus`."
        )
    if strategy.ray_address is not None:
        connect_ray(strategy.ray_address, strategy.ray_init_kwargs)
    if isinstance(accelerator, CUDAAccelerator):
        available = _available_gpus(strategy, len(devices))
        per_member = requested_gpus if requested_gpus > 0 else strategy.default_gpus_per_member(len(devices))
        per_gpu = math.floor(1.0 / per_member + 1e-9) if per_member > 0 else strategy.num_members
        if per_gpu * available < strategy.num_members:
            raise MisconfigurationException(
                f"HQDEStrategy(num_members={strategy.num_members}) with {per_member:g} GPU per member needs"
                f" {math.ceil(strategy.num_members / max(per_gpu, 1))} GPUs, but only {available} exist ({per_gpu} member(s)"
                " fit on one GPU: a member's share must fit within one GPU). Lower `num_members` or"
                " `resources_per_member['num_gpus']`."
            )


def _available_gpus(strategy: HQDEStrategy, trainer_devices: int) -> int:
    """How many GPUs members may use: the cluster's (``ray_address``) or the Trainer's devices."""
    if strategy.ray_address is not None:
        return int(ray.cluster_resources().get("GPU", 0))
    return trainer_devices


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

def member_options(strategy: HQDEStrategy) -> tuple[dict[str, Any], int]:
    """Each member actor's Ray options (:func:`check_resources`'s request and, on this machine, the driver's
    import path) and its number of torch threads (its whole CPUs, at least 1)."""
    options = check_resources(strategy)
    if strategy.ray_address is None:
        options["runtime_env"] = {"env_vars": {"PYTHONPATH": driver_pythonpath()}}
    threads = max(1, math.floor(options["num_cpus"])) if options.get("num_cpus") else 1
    return options, threads
