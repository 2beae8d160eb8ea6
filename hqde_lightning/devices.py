"""Where an ``HQDEStrategy`` fit's members can run, checked when the ``Trainer`` is built, without Ray where none is needed.

:func:`check_devices` refuses accelerators and device requests the members cannot run with, so
that they fail when the ``Trainer`` is built, not when the fit starts. Ray is imported only to
join ``ray_address`` and count its GPUs (importing it costs about a second), and
:func:`ray_connected` tells whether this process uses Ray without importing it. The members' Ray
resources are in :mod:`hqde_lightning.resources`.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.utilities.exceptions import MisconfigurationException

if TYPE_CHECKING:
    from hqde_lightning.strategy import HQDEStrategy

__all__ = ["available_gpus", "check_devices", "ray_connected"]


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
        from hqde_lightning.ray_runtime import connect_ray  # imports Ray: only a fit on a Ray cluster pays for it

        connect_ray(strategy.ray_address, strategy.ray_init_kwargs)
    if isinstance(accelerator, CUDAAccelerator):
        available = available_gpus(strategy, len(devices))
        per_member = requested_gpus if requested_gpus > 0 else strategy.default_gpus_per_member(len(devices))
        per_gpu = math.floor(1.0 / per_member + 1e-9) if per_member > 0 else strategy.num_members
        if per_gpu * available < strategy.num_members:
            raise MisconfigurationException(
                f"HQDEStrategy(num_members={strategy.num_members}) with {per_member:g} GPU per member needs"
                f" {math.ceil(strategy.num_members / max(per_gpu, 1))} GPUs, but only {available} exist ({per_gpu} member(s)"
                " fit on one GPU: a member's share must fit within one GPU). Lower `num_members` or"
                " `resources_per_member['num_gpus']`."
            )


def available_gpus(strategy: HQDEStrategy, trainer_devices: int) -> int:
    """How many GPUs members may use: the cluster's (``ray_address``) or the Trainer's devices."""
    if strategy.ray_address is not None:  # joined by check_devices
        import ray

        return int(ray.cluster_resources().get("GPU", 0))
    return trainer_devices


def ray_connected() -> bool:
    """Whether this process is connected to a Ray instance, without importing Ray (a process that never imported it is not)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()
