"""``AdaptiveQuantization``: quantizes the weights each member sends at a sync point.

A thin Lightning wrapper over :mod:`hqde_lightning.compression` that implements the
:class:`~hqde_lightning.member.SyncCodec` protocol: ``HQDEStrategy`` calls
:meth:`AdaptiveQuantization.encode_for_sync` and ships the returned
:class:`~hqde_lightning.compression.EncodedState` to the aggregator instead of float tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from hqde_lightning.compression import PASSTHROUGH_BITS, SUPPORTED_BITS, BitPlan, EncodedState, ErrorFeedback, PlanWidth, encode
from hqde_lightning.misconfiguration import lightning_arguments
from hqde_lightning.validation import check_bool, check_int

__all__ = ["AdaptiveQuantization"]


class AdaptiveQuantization(Callback):
    r"""Sends each member's weights at sync points with 4/8/16 bits per value instead of 32.

    Every sync, the floating-point tensors are cut into blocks of ``block_size`` values and the
    blocks of all tensors are ranked together by importance ``0.7·|w| + 0.3·|g|`` (each term
    normalised per tensor; ``g`` is the gradient of the optimizer step just before the sync).
    The top ``high_fraction`` of the blocks are sent with ``max_bits``, the bottom
    ``low_fraction`` with ``min_bits`` and the rest with ``base_bits``. 4- and 8-bit blocks use
    an affine code with one float32 scale and minimum per block (4-bit codes packed two per
    byte); 16-bit blocks are float16. Float tensors with fewer than 256 values (biases, small
    norm layers) and every non-float tensor (complex ones included) are sent unchanged. Decoded
    tensors have their original dtype (a float64 weight is quantized like any other and comes
    back as float64). Frozen parameters (``requires_grad=False``) are not part of a sync at
    all, so they are never quantized and stay bit-exact. Setting
    ``min_bits = base_bits = max_bits = 8`` gives plain 8-bit sync.

    With ``error_feedback`` each member keeps what quantization lost and adds it to the weights
    it sends at the next sync, so nothing is lost for good. :meth:`state_dict` holds the
    residuals and the sync count; a checkpoint written by ``HQDEStrategy`` holds every member's,
    so on resume each member gets its own residuals back.

    Logged at every sync (per member, once per epoch): ``quant/bytes`` and ``quant/fp32_bytes``
    (payload size and the float32 size of the same tensors), ``quant/ratio`` (their quotient),
    ``quant/bits_4``, ``quant/bits_8``, ``quant/bits_16``, ``quant/bits_32`` (fraction of
    float values sent at each width) and ``quant/reconstruction_error``
    (``‖x − decode(encode(x))‖ / ‖x‖`` over the encoded weights ``x``). The latest values are
    also kept in :attr:`last_stats`.

    Args:
        base_bits: bit width of the middle share of blocks; one of 4, 8, 16.
        min_bits: bit width of the least important ``low_fraction`` of blocks; one of 4, 8, 16,
            at most ``base_bits``.
        max_bits: bit width of the most important ``high_fraction`` of blocks; one of 4, 8, 16,
            at least ``base_bits``.
        high_fraction: share of blocks sent with ``max_bits``, in [0, 1].
        low_fraction: share of blocks sent with ``min_bits``, in [0, 1]; ``high_fraction +
            low_fraction`` must be at most 1.
        block_size: values per block (each block has its own bit width, scale and minimum),
            a positive integer.
        error_feedback: add the previous sync's quantization residual to the weights before
            encoding them.
        warmup_syncs: number of first syncs sent at full precision (32 bits), an integer >= 0.

    Attributes:
        bit_plan: the :class:`~hqde_lightning.compression.BitPlan` built from the bit widths,
            fractions and ``block_size``.

    Raises:
        InvalidArgument: (a ``MisconfigurationException`` and a ``ValueError``) for an argument
            outside its allowed values (the message names it).
    """

    def __init__(
        self,
        base_bits: PlanWidth = 8,
        min_bits: PlanWidth = 4,
        max_bits: PlanWidth = 16,
        high_fraction: float = 0.1,
        low_fraction: float = 0.3,
        block_size: int = 256,
        error_feedback: bool = True,
        warmup_syncs: int = 0,
    ) -> None:
        with lightning_arguments("AdaptiveQuantization"):
            self.bit_plan = BitPlan(base_bits, min_bits, max_bits, high_fraction, low_fraction, block_size)
            self.error_feedback = check_bool(error_feedback, "error_feedback")
            self.warmup_syncs = check_int(warmup_syncs, "warmup_syncs", 0)
        #: number of syncs encoded so far
        self.num_syncs = 0
        #: the metrics logged at the latest sync (without the ``quant/`` prefix)
        self.last_stats: dict[str, float] = {}
        self._feedback = ErrorFeedback()
        self._grad_magnitudes: dict[str, Tensor] = {}
        self._member_index = 0

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._member_index = self._member_index_in(trainer)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        """Keeps ``|grad|`` of the epoch's last optimizer step (the step before the epoch-end sync)."""
        total = trainer.num_training_batches
        if not math.isinf(total) and trainer.fit_loop.epoch_loop.batch_idx + 1 < total:
            return
        for name, grad in self._named_gradients(pl_module):
            self._grad_magnitudes[name] = grad.detach().abs()

    # ------------------------------------------------------------- SyncCodec
    def encode_for_sync(self, trainer: Trainer, pl_module: LightningModule, state: dict[str, Tensor]) -> EncodedState:
        """Encodes a member's floating-point weights for one sync and logs what it cost.

        Args:
            trainer: the member's trainer.
            pl_module: the member's module (used for logging).
            state: the floating-point tensors to send, by state-dict key.

        Returns:
            The payload that crosses the wire (numpy buffers only).
        """
        warming_up = self.num_syncs < self.warmup_syncs
        if warming_up:
            sent = {name: tensor.detach() for name, tensor in state.items()}
            payload = encode(sent, PASSTHROUGH_BITS, block_size=self.bit_plan.block_size)
        else:
            sent = self._feedback.compensate(state) if self.error_feedback else {k: v.detach() for k, v in state.items()}
            grads = {name: g for name, g in self._grad_magnitudes.items() if name in state and g.numel() == state[name].numel()}
            payload = encode(sent, self.bit_plan.assign(sent, grads), block_size=self.bit_plan.block_size)
        decoded = payload.decode()
        if self.error_feedback and not warming_up:
            self._feedback.update(sent, decoded)
        self.num_syncs += 1
        self.last_stats = _stats(payload, sent, decoded)
        for name, value in self.last_stats.items():
            pl_module.log(self._log_name(name), value, on_step=False, on_epoch=True, batch_size=1)
        return payload

    def _member_index_in(self, trainer: Trainer) -> int:
        """The member whose weights this callback encodes: the strategy's ``member_index`` (0 without one)."""
        return getattr(trainer.strategy, "member_index", None) or 0

    def _log_name(self, name: str) -> str:
        return f"quant/{name}"

    def _named_gradients(self, pl_module: LightningModule) -> Iterator[tuple[str, Tensor]]:
        """``(state-dict name, gradient)`` of every parameter that has a gradient."""
        return ((name, param.grad) for name, param in pl_module.named_parameters() if param.grad is not None)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"member_index": self._member_index, "num_syncs": self.num_syncs, "residuals": self._feedback.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self.num_syncs = int(state_dict.get("num_syncs", 0))
        if state_dict.get("member_index", 0) == self._member_index:  # residuals belong to one member
            self._feedback.load_state_dict(state_dict.get("residuals", {}))


def _stats(payload: EncodedState, sent: dict[str, Tensor], decoded: dict[str, Tensor]) -> dict[str, float]:
    """Payload size, bit-width fractions and relative L2 reconstruction error of one sync."""
    histogram = payload.bits_histogram()
    total_values = sum(histogram.values())
    error_sq = 0.0
    norm_sq = 0.0
    for name, tensor in sent.items():
        wide = torch.promote_types(tensor.dtype, torch.float64)  # complex stays complex
        reference = tensor.detach().to(device="cpu", dtype=wide)
        error_sq += float((reference - decoded[name].to(wide)).abs().pow(2).sum())
        norm_sq += float(reference.abs().pow(2).sum())
    stats = {
        "bytes": float(payload.nbytes),
        "fp32_bytes": float(payload.fp32_nbytes),
        "ratio": float(payload.compression_ratio),
    }
    for bits in SUPPORTED_BITS:
        stats[f"bits_{bits}"] = histogram.get(bits, 0) / total_values if total_values else 0.0
    stats["reconstruction_error"] = math.sqrt(error_sq / norm_sq) if norm_sq > 0 else 0.0
    return stats
