"""``QuantumNoise``: annealed Gaussian exploration noise on weights or gradients.

The name is quantum-inspired only; the noise is ordinary Gaussian noise from
:mod:`hqde_lightning.exploration`, drawn from a generator seeded per ensemble member.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from hqde_lightning.exploration import SCHEDULES, Schedule, add_noise_, member_generator, noise_scale
from hqde_lightning.misconfiguration import InvalidArgument, lightning_arguments
from hqde_lightning.validation import check_bool, check_choice, check_int, check_number, check_optional

__all__ = ["QuantumNoise"]

#: where the noise goes
NoiseTarget = Literal["weights", "gradients"]
_TARGETS: tuple[str, ...] = get_args(NoiseTarget)


class QuantumNoise(Callback):
    r"""Adds annealed Gaussian exploration noise to every trainable parameter (or its gradient).

    This is classical Gaussian noise; "quantum" is only a name. Inside an
    :class:`~hqde_lightning.HQDEStrategy` member the noise comes from a generator seeded with
    ``(seed, member index)``, so members that start from the same weights and data still
    explore different directions, and a run with the same seed draws the same noise again.
    With a plain ``Trainer`` it behaves as member 0.

    At every optimizer step the standard deviation is ``scale_t`` (times each tensor's RMS when
    ``relative``), where ``scale_t`` follows ``schedule`` from ``scale`` down to exactly 0 at the
    end of the annealing horizon. Progress counts fractions of epochs over ``anneal_epochs``
    (default ``trainer.max_epochs``); when the Trainer has no epoch limit it counts optimizer
    steps over ``trainer.max_steps``. The current value is logged as ``noise_scale``.

    Only floating-point parameters with ``requires_grad=True`` are perturbed: frozen parameters
    and buffers (BatchNorm statistics, integer counters) never are. ``scale=0`` changes nothing
    (not even a random number is drawn), so such a run is bit-identical to one without the
    callback. The generator's state is part of :meth:`state_dict`, so a resumed fit continues
    its noise stream exactly; with ``HQDEStrategy`` the checkpoint holds every member's callback
    state, so every member continues its own stream.

    Args:
        scale: initial noise level, a finite number >= 0 (relative to each tensor's RMS when
            ``relative``, otherwise an absolute standard deviation).
        target: where the noise goes:

            - ``"weights"``: added to the parameters right after each optimizer step
              (in ``on_train_batch_end``).
            - ``"gradients"``: added to the gradients just before each optimizer step
              (in ``on_before_optimizer_step``).

        schedule: how the level decays with training progress ``p`` in [0, 1]:

            - ``"cosine"``: ``scale · (1 + cos(π p)) / 2``.
            - ``"linear"``: ``scale · (1 − p)``.
            - ``"constant"``: ``scale`` throughout (never annealed).

        anneal_epochs: number of epochs (a positive number, fractions allowed) after which the
            noise is 0; ``None`` anneals over the whole fit (``max_epochs``, or ``max_steps``
            when epochs are unlimited).
        relative: scale the noise of each tensor by that tensor's RMS (a tensor whose RMS is 0
            gets no noise).
        seed: seed of the noise generators; ``None`` uses the strategy's ``seed``
            (``HQDEStrategy(seed=...)``) or 0 when the strategy has none.

    Raises:
        InvalidArgument: (a ``MisconfigurationException`` and a ``ValueError``) for an argument
            outside its allowed values (the message names it), and at fit time when an annealing
            schedule has no horizon (no ``anneal_epochs`` and neither ``max_epochs`` nor ``max_steps`` set).
    """

    def __init__(
        self,
        scale: float = 5e-3,
        target: NoiseTarget = "weights",
        schedule: Schedule = "cosine",
        anneal_epochs: float | None = None,
        relative: bool = True,
        seed: int | None = None,
    ) -> None:
        with lightning_arguments("QuantumNoise"):
            self.scale = check_number(scale, "scale", 0)
            self.target = check_choice(target, "target", _TARGETS)
            self.schedule = check_choice(schedule, "schedule", SCHEDULES)
            self.anneal_epochs = check_optional(check_number, anneal_epochs, "anneal_epochs", 0, open_low=True)
            self.relative = check_bool(relative, "relative")
            self.seed = check_optional(check_int, seed, "seed", 0)
        #: the noise level used at the latest step (0 once annealed)
        self.current_scale = self.scale
        self._member_index = 0
        self._generator: torch.Generator | None = None
        self._pending_state: dict[str, Any] | None = None
        self._stepped = False

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.schedule != "constant" and self.anneal_epochs is None and _epoch_limit(trainer) is None and _step_limit(trainer) is None:
            raise InvalidArgument(
                f"`QuantumNoise(schedule={self.schedule!r})` anneals the noise to 0 by the end of training, but this fit"
                " has no end: set `Trainer(max_epochs=...)` or `Trainer(max_steps=...)`, pass"
                " `QuantumNoise(anneal_epochs=...)`, or use `schedule='constant'`."
            )
        strategy = trainer.strategy
        self._member_index = self._member_index_in(trainer)
        seed = self.seed if self.seed is not None else (getattr(strategy, "seed", None) or 0)
        self._generator = member_generator(seed, self._member_index)
        self._stepped = False
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        self._stepped = True
        if self.target != "gradients":
            return
        batches_done = trainer.fit_loop.epoch_loop.batch_idx + 1
        self._perturb(trainer, pl_module, self._gradients(optimizer), batches_done, trainer.global_step + 1)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.target != "weights" or not self._stepped:
            return
        self._stepped = False
        self._perturb(trainer, pl_module, self._weights(pl_module), batch_idx + 1, trainer.global_step)

    # ---------------------------------------------------------------- helpers
    def _progress(self, trainer: Trainer, batches_done: int, steps_done: int) -> float:
        """Fraction of the annealing horizon done, in [0, 1].

        Args:
            trainer: the running trainer.
            batches_done: training batches finished in the current epoch, this one included.
            steps_done: optimizer steps finished, this one included.

        Returns:
            ``(current_epoch + batches_done / num_training_batches) / anneal_epochs`` with an epoch
            horizon (the epoch fraction is 0 while the epoch length is unknown), otherwise
            ``steps_done / max_steps``; 0 for the ``"constant"`` schedule.
        """
        if self.schedule == "constant":
            return 0.0
        horizon = self.anneal_epochs if self.anneal_epochs is not None else _epoch_limit(trainer)
        if horizon is None:
            max_steps = _step_limit(trainer)
            assert max_steps is not None, "setup() checked that the fit has a horizon"
            return min(steps_done / max_steps, 1.0)
        total = trainer.num_training_batches
        fraction = 0.0 if math.isinf(total) or total == 0 else min(batches_done / total, 1.0)
        return min((trainer.current_epoch + fraction) / horizon, 1.0)

    def _perturb(self, trainer: Trainer, pl_module: LightningModule, tensors: Iterable[Tensor], batches_done: int, steps_done: int) -> None:
        assert self._generator is not None, "setup() creates the generator"
        self.current_scale = noise_scale(self.schedule, self.scale, self._progress(trainer, batches_done, steps_done))
        add_noise_(tensors, self.current_scale, self._generator, relative=self.relative)
        pl_module.log(self._log_name(), self.current_scale, on_step=True, on_epoch=False)

    def _member_index_in(self, trainer: Trainer) -> int:
        """The member this callback perturbs: the strategy's ``member_index`` (0 without one)."""
        return getattr(trainer.strategy, "member_index", None) or 0

    def _log_name(self) -> str:
        return "noise_scale"

    def _weights(self, pl_module: LightningModule) -> Iterator[Tensor]:
        """The tensors ``target="weights"`` perturbs: every trainable parameter."""
        return (p for p in pl_module.parameters() if p.requires_grad)

    def _gradients(self, optimizer: Optimizer) -> Iterator[Tensor]:
        """The tensors ``target="gradients"`` perturbs: the gradient of every trainable parameter the optimizer steps."""
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.requires_grad and param.grad is not None:
                    yield param.grad

    def _apply_state(self, state: dict[str, Any]) -> None:
        if state.get("member_index", 0) != self._member_index:
            return  # another member's stream: keep this member's own generator
        assert self._generator is not None
        self._generator.set_state(state["generator_state"])
        self.current_scale = float(state.get("current_scale", self.current_scale))

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._generator is None:
            return {}
        return {
            "member_index": self._member_index,
            "generator_state": self._generator.get_state(),
            "current_scale": self.current_scale,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._generator is None:
            self._pending_state = dict(state_dict)
        else:
            self._apply_state(state_dict)


def _epoch_limit(trainer: Trainer) -> int | None:
    max_epochs = trainer.max_epochs
    return None if max_epochs is None or max_epochs < 0 else max_epochs


def _step_limit(trainer: Trainer) -> int | None:
    max_steps = trainer.max_steps
    return None if max_steps is None or max_steps < 0 else max_steps
