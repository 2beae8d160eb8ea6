"""Exploration noise for ensemble members: schedules, seeded generators, in-place Gaussian noise.

This is classical maths in plain torch (no Ray, no Lightning). The package calls it
"quantum noise" as a quantum-inspired name only: it is Gaussian perturbation of the weights,
shrinking over training, drawn from a per-member seeded generator so runs are reproducible.

Device choice: :func:`add_noise_` draws each noise tensor on the generator's device and moves
it to the tensor's device. With a CPU generator (what :func:`member_generator` returns by
default) the noise is therefore the same numbers whether the weights live on CPU or GPU;
a CUDA generator draws on its GPU instead (faster, still deterministic for a given seed,
but not equal to the CPU stream).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from hqde_lightning.validation import ArgumentTypeError, check_choice, check_int, check_number

__all__ = ["SCHEDULES", "Schedule", "add_noise_", "member_generator", "noise_scale"]

#: how the noise level decays with training progress in [0, 1] (see :func:`noise_scale`)
Schedule = Literal["cosine", "linear", "constant"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def noise_scale(schedule: Schedule, base_scale: float, progress: float) -> float:
    """The noise scale at a point of training.

    ``cosine``: ``base · 0.5 · (1 + cos(π p))``; ``linear``: ``base · (1 − p)``; ``constant``: ``base``.
    Cosine and linear reach exactly 0 at ``p = 1``.

    Args:
        schedule: one of ``"cosine"``, ``"linear"``, ``"constant"``.
        base_scale: the scale at ``p = 0``; finite and non-negative.
        progress: fraction of training done; clipped to [0, 1].

    Returns:
        The scale, a float in ``[0, base_scale]``.

    Raises:
        ValueError: for an unknown schedule, a negative or non-finite ``base_scale``, or a NaN ``progress``.
        TypeError: for a ``base_scale`` or ``progress`` that is not a number (also a ``ValueError``,
            see :mod:`hqde_lightning.validation`).
    """
    check_choice(schedule, "schedule", SCHEDULES)
    base_scale = check_number(base_scale, "base_scale", 0)
    p = min(max(check_number(progress, "progress", finite=False), 0.0), 1.0)
    if schedule == "constant":
        return base_scale
    if p == 1.0:
        return 0.0
    factor = 0.5 * (1.0 + math.cos(math.pi * p)) if schedule == "cosine" else 1.0 - p
    return base_scale * factor


def add_noise_(tensors: Iterable[Tensor], scale: float, generator: torch.Generator, relative: bool = True) -> None:
    """Adds Gaussian noise to each floating-point tensor, in place.

    The standard deviation is ``scale · RMS(tensor)`` when ``relative`` (a tensor whose RMS is 0
    or non-finite is left alone), otherwise ``scale``. Noise is drawn as float32 from
    ``generator`` on the generator's device, then moved and cast to each tensor's device and
    dtype (see the module docstring). Non-float tensors and tensors that get a zero standard
    deviation are skipped without consuming random numbers, so ``scale = 0`` leaves every tensor
    bit-identical.

    Args:
        tensors: tensors to perturb (parameters included; runs under ``torch.no_grad``).
        scale: relative or absolute noise level; finite and non-negative.
        generator: source of randomness, e.g. from :func:`member_generator`.
        relative: whether ``scale`` is relative to each tensor's RMS.

    Raises:
        ValueError: for a negative or non-finite ``scale``.
        TypeError: for a ``scale`` that is not a number or a ``generator`` that is not a
            ``torch.Generator`` (also a ``ValueError``, see :mod:`hqde_lightning.validation`).
    """
    check_number(scale, "scale", 0)
    if not isinstance(generator, torch.Generator):
        raise ArgumentTypeError("generator", generator, "a torch.Generator")
    if scale == 0:
        return
    with torch.no_grad():
        for tensor in tensors:
            if not torch.is_floating_point(tensor) or tensor.numel() == 0:
                continue
            std = float(scale)
            if relative:
                rms = float(tensor.detach().to(torch.float32).pow(2).mean().sqrt())
                if not math.isfinite(rms) or rms == 0.0:
                    continue
                std *= rms
            noise = torch.randn(tensor.shape, generator=generator, device=generator.device, dtype=torch.float32)
            tensor.add_(noise.mul_(std).to(device=tensor.device, dtype=tensor.dtype))


def member_generator(seed: int, member_index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, member_index)``: the same pair always gives the same stream.

    The 64-bit seed comes from numpy's ``SeedSequence(seed, spawn_key=(member_index,))``, so
    members of one run get well-mixed, distinct streams (and nearby seeds do not overlap).

    Args:
        seed: the run's seed, a non-negative integer.
        member_index: the member's index, a non-negative integer.
        device: where the generator lives (``"cpu"`` gives device-independent noise).

    Returns:
        A seeded ``torch.Generator`` on ``device``.

    Raises:
        ValueError: for a negative ``seed`` or ``member_index``.
        TypeError: for a non-integer one (also a ``ValueError``, see :mod:`hqde_lightning.validation`).
    """
    seed = check_int(seed, "seed", 0)
    member_index = check_int(member_index, "member_index", 0)
    state = np.random.SeedSequence(seed, spawn_key=(member_index,)).generate_state(1, dtype=np.uint64)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state[0]))
    return generator
