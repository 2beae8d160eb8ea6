"""Adaptive quantization codec for the weights members send at a sync point.

This is ordinary, classical maths in numpy/torch (no Ray, no Lightning): block-wise affine
quantization, bit packing, and error feedback. Nothing quantum happens here; the package
only borrows "quantum-inspired" names elsewhere.

How a state dict travels:

1. :func:`plan_bits` ranks fixed-size blocks of every floating-point tensor by importance
   ``0.7·|w| + 0.3·|g|`` (each normalised per tensor by its max abs) and gives the top share
   ``max_bits``, the bottom share ``min_bits`` and the rest ``base_bits``.
2. :func:`encode` turns the state dict into an :class:`EncodedState`: numpy buffers only
   (picklable, no torch tensors), 4-bit codes packed two per byte, 8-bit codes one per byte,
   one float32 scale and one float32 minimum per 4/8-bit block, 16-bit blocks as float16 with
   one int8 power-of-two exponent per block. Pickled, an :class:`EncodedState` is one byte
   buffer holding every tensor's buffers plus a small header (see :attr:`EncodedState.nbytes`).
3. :func:`decode` rebuilds tensors with the original keys, shapes and dtypes (on the CPU).
4. :class:`ErrorFeedback` keeps what quantization lost and adds it back before the next
   encode, so the time average of what was sent converges to the true weights.

Block layout: a tensor is flattened and cut into blocks of ``block_size`` values (the last
block may be shorter); each block has one bit width. A 4/8-bit block with minimum ``lo`` and
maximum ``hi`` uses ``scale = (hi - lo) / (2**b - 1)`` and codes ``round((x - lo) / scale)``
in ``[0, 2**b - 1]``, so every value decodes to within ``scale / 2`` (plus float32 rounding).
A block holding NaN or ±Inf decodes as non-finite, so downstream finite checks still see it.

Why float16 for 16-bit blocks: float16's 10-bit mantissa (relative error ≤ 2**-11) is eight
times finer than bfloat16's 7-bit one, but its range is narrow: normal only for
``2**-14 ≤ |x| ≤ 65504``, so tiny weights would fall into its subnormals (17 % error at 1e-7,
flushed to 0 below 3e-8) and large ones overflow. Each 16-bit block is therefore scaled
losslessly by a power of two before the cast: with ``k = floor(log2(m))`` for the block's
largest finite magnitude ``m`` (``k`` clamped to [-128, 127], stored as one int8 per block; 0
for a block without a finite non-zero value), the block is sent as ``float16(x · 2**(14 - k))``
and decoded as that times ``2**(k - 14)``, which puts ``m`` in [2**14, 2**15). So every value
``|x| ≥ m · 2**-28`` of a block decodes with relative error ≤ 2**-11 whatever its magnitude
(every normal float32 value, 1.2e-38 to 3.4e38; a float32 subnormal, which holds fewer bits
itself, may round once more to its own spacing); the rare smaller values in the same block are
within ``m · 2**-39`` of theirs (absolute). NaN and ±Inf stay NaN and ±Inf; zeros stay zero.
``half_dtype="bfloat16"`` stores the scaled values as bfloat16 instead (relative error ≤ 2**-8).

Pass-through (32 bits): non-float tensors (``num_batches_tracked``, masks) and float tensors
the plan marks 32 are sent as their raw bytes, exactly.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from hqde_lightning.validation import check_choice, check_int, check_number

__all__ = [
    "PASSTHROUGH_BITS",
    "SUPPORTED_BITS",
    "BitPlan",
    "EncodedState",
    "EncodedTensor",
    "ErrorFeedback",
    "analytical_nbytes",
    "block_importance",
    "decode",
    "encode",
    "plan_bits",
]

#: bit widths a block may use; 32 means the whole tensor passes through unchanged
SUPPORTED_BITS: tuple[int, ...] = (4, 8, 16, 32)
#: the bit width that marks a tensor as sent at full precision (raw bytes)
PASSTHROUGH_BITS = 32

#: a width :func:`plan_bits` may give a block
PlanWidth = Literal[4, 8, 16]
#: how 16-bit blocks are stored
HalfDtype = Literal["float16", "bfloat16"]
_PLAN_BITS: tuple[int, ...] = get_args(PlanWidth)
_HALF_DTYPES: tuple[str, ...] = get_args(HalfDtype)
_PARAM_BYTES = 8  # one float32 scale + one float32 minimum per 4/8-bit block
_EXP_BYTES = 1  # one int8 power-of-two exponent per 16-bit block
#: a 16-bit block is scaled so that its largest finite magnitude lies in [2**_HALF_TOP, 2**(_HALF_TOP + 1))
_HALF_TOP = 14
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_WEIGHT_SHARE = 0.7
_GRAD_SHARE = 0.3


def _empty(dtype: type[np.generic]) -> np.ndarray:
    return np.zeros(0, dtype=dtype)


@dataclass(eq=False)
class EncodedTensor:
    """One tensor of an :class:`EncodedState`: metadata plus numpy buffers.

    Attributes:
        dtype: the original torch dtype's name (``"float32"``, ``"int64"``, ``"bfloat16"``...).
        shape: the original shape.
        block_size: values per block (the last block may be shorter).
        bits: uint8 bit width per block (4, 8 or 16); empty for a pass-through tensor.
        half_dtype: how 16-bit blocks are stored: ``"float16"`` or ``"bfloat16"``.
        packed4: 4-bit codes of the 4-bit blocks (in block order), two per byte, low nibble first.
        scale4: float32 scale per 4-bit block.
        min4: float32 minimum per 4-bit block.
        codes8: uint8 codes of the 8-bit blocks, in block order.
        scale8: float32 scale per 8-bit block.
        min8: float32 minimum per 8-bit block.
        half: values of the 16-bit blocks, each scaled by ``2**(14 - exp16)`` of its block:
            float16, or bfloat16 bit patterns as uint16.
        exp16: int8 per 16-bit block: ``floor(log2)`` of the block's largest finite magnitude,
            clamped to [-128, 127] (0 when the block has no finite non-zero value).
        raw: the tensor's raw bytes when it passes through; empty otherwise.
    """

    dtype: str
    shape: tuple[int, ...]
    block_size: int
    bits: np.ndarray = field(default_factory=lambda: _empty(np.uint8))
    half_dtype: str = "float16"
    packed4: np.ndarray = field(default_factory=lambda: _empty(np.uint8))
    scale4: np.ndarray = field(default_factory=lambda: _empty(np.float32))
    min4: np.ndarray = field(default_factory=lambda: _empty(np.float32))
    codes8: np.ndarray = field(default_factory=lambda: _empty(np.uint8))
    scale8: np.ndarray = field(default_factory=lambda: _empty(np.float32))
    min8: np.ndarray = field(default_factory=lambda: _empty(np.float32))
    half: np.ndarray = field(default_factory=lambda: _empty(np.float16))
    exp16: np.ndarray = field(default_factory=lambda: _empty(np.int8))
    raw: np.ndarray = field(default_factory=lambda: _empty(np.uint8))

    @property
    def numel(self) -> int:
        """Number of values in the original tensor."""
        return math.prod(self.shape)

    @property
    def passthrough(self) -> bool:
        """Whether the tensor travels as raw bytes (no quantization)."""
        return self.bits.size == 0

    @property
    def is_float(self) -> bool:
        """Whether the original tensor is floating point."""
        return getattr(torch, self.dtype).is_floating_point

    def buffers(self) -> tuple[np.ndarray, ...]:
        """All numpy buffers of this tensor (what crosses the wire)."""
        return (
            self.bits, self.packed4, self.scale4, self.min4, self.codes8, self.scale8, self.min8, self.half, self.exp16,
            self.raw,
        )

    @property
    def nbytes(self) -> int:
        """Payload size in bytes: the sum of the buffers' ``nbytes``."""
        return sum(int(buffer.nbytes) for buffer in self.buffers())

    @property
    def fp32_nbytes(self) -> int:
        """Bytes this tensor would take as float32 (float tensors) or as raw bytes (others)."""
        if self.is_float:
            return 4 * self.numel
        return self.numel * getattr(torch, self.dtype).itemsize


@dataclass(eq=False)
class EncodedState:
    """An encoded state dict: :class:`EncodedTensor` per key, numpy buffers only (picklable).

    Attributes:
        tensors: the encoded entries, in the state dict's key order.
    """

    tensors: dict[str, EncodedTensor]

    @property
    def nbytes(self) -> int:
        """Payload size in bytes: the sum of every numpy buffer's ``nbytes``.

        Keys, dtype names and shapes are not counted. They stay small on the wire: a pickled
        :class:`EncodedState` is one byte buffer with every tensor's buffers back to back, the
        keys, and a header of a few integers per tensor (storage kind, block size, shape, in the
        narrowest unsigned integer type that holds them), so it exceeds ``nbytes`` by the keys'
        lengths plus about 15 bytes per tensor and about 300 bytes once (e.g. 50 tensors of 300
        values at 8 bits keyed ``p0`` to ``p49``: ``nbytes`` 15,900, pickled 16,945 bytes).
        """
        return sum(entry.nbytes for entry in self.tensors.values())

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickles as one byte buffer plus a compact header, not as ten small numpy arrays per tensor."""
        return _unpack_state, _pack_state(self)

    @property
    def fp32_nbytes(self) -> int:
        """What the same state would cost with every float tensor as float32, plus raw non-float bytes."""
        return sum(entry.fp32_nbytes for entry in self.tensors.values())

    @property
    def compression_ratio(self) -> float:
        """``nbytes / fp32_nbytes`` (1.0 for an empty state)."""
        reference = self.fp32_nbytes
        return self.nbytes / reference if reference else 1.0

    def decode(self) -> dict[str, Tensor]:
        """Same as :func:`decode`."""
        return decode(self)

    def bits_histogram(self) -> dict[int, int]:
        """Number of floating-point values sent at each bit width.

        Returns:
            ``{bits: count}`` over widths that occur; pass-through float values count under 32.
            Non-float entries are not counted.
        """
        counts: dict[int, int] = {}
        for entry in self.tensors.values():
            if not entry.is_float:
                continue
            if entry.passthrough:
                per_width = {PASSTHROUGH_BITS: entry.numel}
            else:
                lengths = _block_lengths(entry.numel, entry.block_size)
                per_width = {int(b): int(lengths[entry.bits == b].sum()) for b in np.unique(entry.bits)}
            for width, count in per_width.items():
                if count:
                    counts[width] = counts.get(width, 0) + count
        return dict(sorted(counts.items()))


def _num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def _block_lengths(numel: int, block_size: int) -> np.ndarray:
    lengths = np.full(_num_blocks(numel, block_size), block_size, dtype=np.int64)
    if lengths.size:
        lengths[-1] = numel - (lengths.size - 1) * block_size
    return lengths


#: header code of a tensor's storage: pass-through (raw bytes), or quantized with 16-bit blocks as float16 / bfloat16
_KIND_PASSTHROUGH = 0
_KIND_OF_HALF = {"float16": 1, "bfloat16": 2}
_HALF_OF_KIND = {code: name for name, code in _KIND_OF_HALF.items()}


def _pack_state(state: EncodedState) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray, np.ndarray]:
    """``(keys, dtype names, header, blob)``: what a pickled :class:`EncodedState` holds.

    ``header`` holds ``kind, block_size, ndim, *shape`` per tensor in the narrowest unsigned integer
    dtype; ``blob`` every tensor's :meth:`EncodedTensor.buffers` as bytes, back to back. The sizes of
    the buffers follow from the header and each tensor's bit map (the first buffer), as in
    :func:`analytical_nbytes`.
    """
    header: list[int] = []
    chunks: list[np.ndarray] = []
    for entry in state.tensors.values():
        kind = _KIND_PASSTHROUGH if entry.passthrough else _KIND_OF_HALF[entry.half_dtype]
        header += [kind, int(entry.block_size), len(entry.shape), *(int(d) for d in entry.shape)]
        chunks += [np.ascontiguousarray(buffer).reshape(-1).view(np.uint8) for buffer in entry.buffers()]
    dtypes = tuple(sys.intern(entry.dtype) for entry in state.tensors.values())  # repeated names pickle as references
    packed = np.array(header, dtype=np.min_scalar_type(max(header, default=0)))
    blob = np.concatenate(chunks) if chunks else _empty(np.uint8)
    return tuple(state.tensors), dtypes, packed, blob


def _unpack_state(keys: tuple[str, ...], dtypes: tuple[str, ...], header: np.ndarray, blob: np.ndarray) -> EncodedState:
    """The :class:`EncodedState` that :func:`_pack_state` packed (buffers are fresh, writable copies)."""
    if len(keys) != len(dtypes):
        raise ValueError(f"corrupt EncodedState: {len(keys)} keys but {len(dtypes)} dtype names")
    blob = np.asarray(blob).reshape(-1).view(np.uint8)
    numbers = [int(v) for v in np.asarray(header).reshape(-1)]
    position = offset = 0

    def take(count: int, dtype: type[np.generic]) -> np.ndarray:
        nonlocal offset
        size = count * np.dtype(dtype).itemsize
        if offset + size > blob.size:
            raise ValueError("corrupt EncodedState: its byte buffer is shorter than its header describes")
        chunk = blob[offset : offset + size].copy().view(dtype)
        offset += size
        return chunk

    tensors: dict[str, EncodedTensor] = {}
    for key, dtype in zip(keys, dtypes):
        kind, block_size, ndim = numbers[position : position + 3]
        shape = tuple(numbers[position + 3 : position + 3 + ndim])
        position += 3 + ndim
        numel = math.prod(shape)
        if kind == _KIND_PASSTHROUGH:
            raw = take(numel * getattr(torch, dtype).itemsize, np.uint8)
            tensors[key] = EncodedTensor(dtype=dtype, shape=shape, block_size=block_size, raw=raw)
            continue
        half_dtype = _HALF_OF_KIND[kind]
        bits = take(_num_blocks(numel, block_size), np.uint8)
        lengths = _block_lengths(numel, block_size)
        values = {b: int(lengths[bits == b].sum()) for b in _PLAN_BITS}
        blocks = {b: int((bits == b).sum()) for b in _PLAN_BITS}
        counts = {
            "packed4": -(-values[4] // 2), "scale4": blocks[4], "min4": blocks[4],
            "codes8": values[8], "scale8": blocks[8], "min8": blocks[8],
            "half": values[16], "exp16": blocks[16],
        }
        fields = {}
        for name, buffer_dtype in _QUANTIZED_BUFFERS:
            if name == "half" and half_dtype == "bfloat16":
                buffer_dtype = np.uint16  # bfloat16 bit patterns
            fields[name] = take(counts[name], buffer_dtype)
        tensors[key] = EncodedTensor(
            dtype=dtype, shape=shape, block_size=block_size, bits=bits, half_dtype=half_dtype, **fields
        )
    if offset != blob.size or position != len(numbers):
        raise ValueError("corrupt EncodedState: its byte buffer or header is longer than its tensors need")
    return EncodedState(tensors=tensors)


#: the buffers of a quantized tensor after its bit map, in :meth:`EncodedTensor.buffers` order, with their dtypes
_QUANTIZED_BUFFERS: tuple[tuple[str, type[np.generic]], ...] = (
    ("packed4", np.uint8), ("scale4", np.float32), ("min4", np.float32),
    ("codes8", np.uint8), ("scale8", np.float32), ("min8", np.float32),
    ("half", np.float16), ("exp16", np.int8),
)


def _resolve_plan(
    name: str, numel: int, is_float: bool, bits: Mapping[str, np.ndarray] | int, block_size: int
) -> np.ndarray | None:
    """The per-block bit widths of one tensor, or ``None`` when it passes through."""
    num_blocks = _num_blocks(numel, block_size)
    if not is_float or num_blocks == 0:
        return None
    if isinstance(bits, Mapping):
        if name not in bits:
            return None
        plan = np.asarray(bits[name])
        if plan.ndim != 1 or plan.size != num_blocks or not np.issubdtype(plan.dtype, np.integer):
            raise ValueError(
                f"`bits[{name!r}]` must be a 1-D integer array with one entry per block"
                f" ({num_blocks} blocks of {block_size}), got shape {plan.shape} and dtype {plan.dtype}"
            )
        unknown = sorted(set(np.unique(plan).tolist()) - set(SUPPORTED_BITS))
        if unknown:
            raise ValueError(f"`bits[{name!r}]` holds unsupported widths {unknown}; allowed: {list(SUPPORTED_BITS)}")
        passthrough = plan == PASSTHROUGH_BITS
        if passthrough.all():
            return None
        if passthrough.any():
            raise ValueError(
                f"`bits[{name!r}]` mixes 32 with other widths; 32 (pass-through) applies to a whole tensor"
            )
        return plan.astype(np.uint8)
    if bits == PASSTHROUGH_BITS:
        return None
    return np.full(num_blocks, bits, dtype=np.uint8)


def _validate_bits_argument(bits: Mapping[str, np.ndarray] | int, keys: Sequence[str]) -> None:
    if isinstance(bits, Mapping):
        unknown = sorted(set(bits) - set(keys))
        if unknown:
            raise ValueError(f"`bits` names keys that are not in the state: {unknown[:5]}")
        return
    check_choice(bits, "bits", SUPPORTED_BITS)


def _encode_passthrough(tensor: Tensor, dtype_name: str) -> EncodedTensor:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().copy()
    return EncodedTensor(dtype=dtype_name, shape=tuple(tensor.shape), block_size=1, raw=raw)


def _affine_encode(rows: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes (same shape as ``rows``), float32 scales and float32 minima for blocks in ``rows``."""
    levels = 2**bits - 1
    low = rows.min(axis=1)
    high = rows.max(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        scale = ((high.astype(np.float64) - low) / levels).astype(np.float32)
    low64 = low.astype(np.float64)[:, None]
    scale64 = scale.astype(np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        steps = np.where(scale64 > 0, (rows - low64) / scale64, 0.0)
    codes = np.clip(np.rint(np.nan_to_num(steps, nan=0.0)), 0, levels).astype(np.uint8)
    return codes, scale, low


def _affine_decode(codes: np.ndarray, scale: np.ndarray, low: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        values = low.astype(np.float64)[:, None] + codes * scale.astype(np.float64)[:, None]
    return values.astype(np.float32)


def _pack4(codes: np.ndarray) -> np.ndarray:
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)


def _unpack4(packed: np.ndarray, count: int) -> np.ndarray:
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)
    return nibbles[:count]


def _to_half(values: np.ndarray, half_dtype: str) -> np.ndarray:
    if half_dtype == "float16":
        return values.astype(np.float16)
    bf16 = torch.from_numpy(values).to(torch.bfloat16)
    return bf16.view(torch.int16).numpy().view(np.uint16).copy()


def _from_half(half: np.ndarray, half_dtype: str) -> np.ndarray:
    if half_dtype == "float16":
        return half.astype(np.float32)
    bf16 = torch.from_numpy(half.view(np.int16).copy()).view(torch.bfloat16)
    return bf16.to(torch.float32).numpy()


def _half_exponents(rows: np.ndarray) -> np.ndarray:
    """int8 ``floor(log2(max |finite value|))`` per row (block), clamped to [-128, 127]; 0 without a finite non-zero value."""
    with np.errstate(invalid="ignore"):
        peak = np.where(np.isfinite(rows), np.abs(rows), 0.0).max(axis=1)
    exponent = np.frexp(peak)[1].astype(np.int64) - 1  # peak in [2**k, 2**(k + 1)); frexp(0) gives exponent 0
    exponent[peak == 0] = 0
    return np.clip(exponent, -128, 127).astype(np.int8)


def _powers_of_two(exponents: np.ndarray) -> np.ndarray:
    """float64 ``2**exponents`` (exact; a float32 could not hold 2**142)."""
    return np.ldexp(np.ones(exponents.shape, dtype=np.float64), exponents.astype(np.int32))


def _encode_half(rows: np.ndarray, mask: np.ndarray, half_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """16-bit storage of the real values of ``rows`` (blocks) and the int8 exponent per block.

    Each block is multiplied by ``2**(14 - k)`` (exact: a power of two, in float64) so its largest
    finite magnitude lies in [2**14, 2**15), within float16's normal range and far from its overflow.
    """
    exponents = _half_exponents(rows)
    with np.errstate(invalid="ignore"):
        scaled = rows.astype(np.float64) * _powers_of_two(_HALF_TOP - exponents.astype(np.int64))[:, None]
    # float64 -> float32 is exact down to 2**-126, far below float16's smallest subnormal 2**-24
    return _to_half(scaled[mask].astype(np.float32), half_dtype), exponents


def _decode_half(half: np.ndarray, exponents: np.ndarray, mask: np.ndarray, half_dtype: str) -> np.ndarray:
    """``(blocks, block_size)`` float32 values of the 16-bit blocks: the stored halves times ``2**(k - 14)`` per block."""
    grid = np.zeros(mask.shape, dtype=np.float64)
    grid[mask] = _from_half(half, half_dtype)
    with np.errstate(invalid="ignore"):
        grid *= _powers_of_two(exponents.astype(np.int64) - _HALF_TOP)[:, None]
    # a finite value rounded up past float32's maximum (within 2**-11 of 2**128) stays finite
    return np.where(np.isfinite(grid), np.clip(grid, -_FLOAT32_MAX, _FLOAT32_MAX), grid).astype(np.float32)


def _block_view(numel: int, num_blocks: int, block_size: int) -> np.ndarray:
    """Boolean ``(num_blocks, block_size)`` mask of the positions that hold real values."""
    return (np.arange(num_blocks * block_size) < numel).reshape(num_blocks, block_size)


def _encode_quantized(
    tensor: Tensor, dtype_name: str, plan: np.ndarray, block_size: int, half_dtype: str
) -> EncodedTensor:
    flat = tensor.detach().reshape(-1).to(device="cpu", dtype=torch.float32).numpy()
    numel, num_blocks = flat.size, plan.size
    blocks = np.pad(flat, (0, num_blocks * block_size - numel), mode="edge").reshape(num_blocks, block_size)
    valid = _block_view(numel, num_blocks, block_size)
    fields: dict[str, np.ndarray] = {}
    for bits, codes_name, scale_name, min_name in ((4, "packed4", "scale4", "min4"), (8, "codes8", "scale8", "min8")):
        selected = plan == bits
        if not selected.any():
            continue
        codes, scale, low = _affine_encode(blocks[selected], bits)
        codes = codes[valid[selected]]
        fields[codes_name] = _pack4(codes) if bits == 4 else codes
        fields[scale_name], fields[min_name] = scale, low
    selected = plan == 16
    if selected.any():
        fields["half"], fields["exp16"] = _encode_half(blocks[selected], valid[selected], half_dtype)
    return EncodedTensor(
        dtype=dtype_name, shape=tuple(tensor.shape), block_size=block_size, bits=plan, half_dtype=half_dtype, **fields
    )


def encode(
    state: Mapping[str, Tensor],
    bits: Mapping[str, np.ndarray] | int,
    block_size: int = 256,
    half_dtype: HalfDtype = "float16",
) -> EncodedState:
    """Quantizes a state dict into a compact, picklable :class:`EncodedState`.

    Args:
        state: tensors to send (any device, any dtype).
        bits: a per-tensor plan from :func:`plan_bits` (one width in {4, 8, 16} per block, or all
            32 for pass-through; keys left out pass through), or one width from
            {4, 8, 16, 32} applied to every floating-point tensor.
        block_size: values per block; must match the plan's.
        half_dtype: storage of 16-bit blocks, ``"float16"`` (default; relative error ≤ 2**-11 at
            any magnitude, thanks to the per-block power-of-two scale) or ``"bfloat16"`` (≤ 2**-8).

    Returns:
        The encoded state. Non-float and empty tensors always pass through as raw bytes.

    Raises:
        ValueError: for a non-tensor entry, an unsupported width, a plan with the wrong number of
            blocks or unknown keys, a non-positive ``block_size`` or an unknown ``half_dtype``.
    """
    check_int(block_size, "block_size", 1)
    check_choice(half_dtype, "half_dtype", _HALF_DTYPES)
    _validate_bits_argument(bits, list(state))
    encoded: dict[str, EncodedTensor] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, Tensor):
            raise ValueError(f"`state[{name!r}]` must be a torch.Tensor, got {type(tensor).__name__}")
        dtype_name = str(tensor.dtype).removeprefix("torch.")
        plan = _resolve_plan(name, tensor.numel(), torch.is_floating_point(tensor), bits, block_size)
        if plan is None:
            encoded[name] = _encode_passthrough(tensor, dtype_name)
        else:
            encoded[name] = _encode_quantized(tensor, dtype_name, plan, block_size, half_dtype)
    return EncodedState(tensors=encoded)


def _decode_tensor(entry: EncodedTensor) -> Tensor:
    dtype = getattr(torch, entry.dtype)
    if entry.numel == 0:
        return torch.empty(entry.shape, dtype=dtype)
    if entry.passthrough:
        return torch.from_numpy(entry.raw.copy()).view(dtype).reshape(entry.shape)
    numel, num_blocks, block_size = entry.numel, entry.bits.size, entry.block_size
    valid = _block_view(numel, num_blocks, block_size)
    blocks = np.zeros((num_blocks, block_size), dtype=np.float32)
    affine = ((4, entry.packed4, entry.scale4, entry.min4), (8, entry.codes8, entry.scale8, entry.min8))
    for bits, codes, scale, low in affine:
        selected = entry.bits == bits
        if not selected.any():
            continue
        mask = valid[selected]
        grid = np.zeros(mask.shape, dtype=np.uint8)
        grid[mask] = _unpack4(codes, int(mask.sum())) if bits == 4 else codes
        blocks[selected] = _affine_decode(grid, scale, low)
    selected = entry.bits == 16
    if selected.any():
        blocks[selected] = _decode_half(entry.half, entry.exp16, valid[selected], entry.half_dtype)
    flat = blocks.reshape(-1)[:numel]
    return torch.from_numpy(flat.copy()).to(dtype).reshape(entry.shape)


def decode(encoded: EncodedState) -> dict[str, Tensor]:
    """Rebuilds the state dict from an :class:`EncodedState`.

    Args:
        encoded: the output of :func:`encode` (possibly unpickled on another process).

    Returns:
        CPU tensors with the original keys, shapes and dtypes; pass-through entries are exact.

    Raises:
        ValueError: if ``encoded`` is not an :class:`EncodedState`.
    """
    if not isinstance(encoded, EncodedState):
        raise ValueError(f"`encoded` must be an EncodedState, got {type(encoded).__name__}")
    return {name: _decode_tensor(entry) for name, entry in encoded.tensors.items()}


def analytical_nbytes(
    specs: Mapping[str, Tensor | tuple[Sequence[int], torch.dtype]],
    bits: Mapping[str, np.ndarray] | int,
    block_size: int = 256,
) -> int:
    """The payload size :func:`encode` will produce, computed from shapes, dtypes and the plan alone.

    Per quantized tensor: one byte per block (the bit map), ``ceil(n4 / 2) + 8·blocks4`` for the
    4-bit blocks, ``n8 + 8·blocks8`` for the 8-bit blocks and ``2·n16 + blocks16`` for the 16-bit
    ones, where ``n4``, ``n8``, ``n16`` count the values in blocks of that width and ``blocks4``,
    ``blocks8``, ``blocks16`` the blocks (8 bytes each for a 4/8-bit block: a float32 scale and
    minimum; 1 byte for a 16-bit block: its int8 exponent). A pass-through tensor costs its raw bytes.

    Args:
        specs: per key, either the tensor itself or a ``(shape, dtype)`` pair.
        bits: the plan or single width, as for :func:`encode`.
        block_size: values per block, as for :func:`encode`.

    Returns:
        The size in bytes that ``encode(state, bits, block_size).nbytes`` reports.

    Raises:
        ValueError: for the same invalid plans :func:`encode` rejects.
    """
    check_int(block_size, "block_size", 1)
    _validate_bits_argument(bits, list(specs))
    total = 0
    for name, spec in specs.items():
        shape, dtype = (spec.shape, spec.dtype) if isinstance(spec, Tensor) else spec
        numel = math.prod(shape)
        plan = _resolve_plan(name, numel, dtype.is_floating_point, bits, block_size)
        if plan is None:
            total += numel * dtype.itemsize
            continue
        lengths = _block_lengths(numel, block_size)
        values = {b: int(lengths[plan == b].sum()) for b in _PLAN_BITS}
        blocks = {b: int((plan == b).sum()) for b in _PLAN_BITS}
        total += plan.size
        total += -(-values[4] // 2) + _PARAM_BYTES * blocks[4]
        total += values[8] + _PARAM_BYTES * blocks[8]
        total += 2 * values[16] + _EXP_BYTES * blocks[16]
    return total


def _normalised_abs(tensor: Tensor) -> Tensor:
    magnitude = tensor.detach().to(device="cpu", dtype=torch.float32).abs().reshape(-1)
    peak = magnitude.max() if magnitude.numel() else torch.tensor(0.0)
    return magnitude / peak if peak > 0 else torch.zeros_like(magnitude)


def block_importance(weight: Tensor, grad: Tensor | None = None, block_size: int = 256) -> np.ndarray:
    """Mean importance per block of one tensor: ``0.7·|w| + 0.3·|g|``, or ``|w|`` without a gradient.

    ``|w|`` and ``|g|`` are each divided by their tensor's max abs (all-zero stays zero).

    Args:
        weight: the tensor (any shape, floating point).
        grad: its gradient, same number of elements, or ``None``.
        block_size: values per block.

    Returns:
        float64 array with one entry per block (the last block averages its actual values).

    Raises:
        ValueError: if ``grad`` has a different number of elements or ``block_size`` < 1.
    """
    check_int(block_size, "block_size", 1)
    importance = _normalised_abs(weight)
    if grad is not None:
        if grad.numel() != weight.numel():
            raise ValueError(f"`grad` has {grad.numel()} elements, the weight has {weight.numel()}")
        importance = _WEIGHT_SHARE * importance + _GRAD_SHARE * _normalised_abs(grad)
    values = importance.numpy().astype(np.float64)
    num_blocks = _num_blocks(values.size, block_size)
    padded = np.pad(values, (0, num_blocks * block_size - values.size))
    return padded.reshape(num_blocks, block_size).sum(axis=1) / _block_lengths(values.size, block_size)


@dataclass(frozen=True)
class BitPlan:
    """How :func:`plan_bits` shares the bit widths out over the blocks (checked when built).

    Blocks of all eligible tensors are ranked together by :func:`block_importance` (ties keep
    key and block order). The top ``floor(high_fraction · B)`` of the ``B`` blocks get
    ``max_bits``, the bottom ``floor(low_fraction · B)`` get ``min_bits``, the rest ``base_bits``.

    Attributes:
        base_bits: width of the middle share; one of 4, 8, 16.
        min_bits: width of the least important share; one of 4, 8, 16, at most ``base_bits``.
        max_bits: width of the most important share; one of 4, 8, 16, at least ``base_bits``.
        high_fraction: share of blocks given ``max_bits``, in [0, 1].
        low_fraction: share of blocks given ``min_bits``, in [0, 1]; with ``high_fraction`` at most 1.
        block_size: values per block, >= 1.
        min_numel: float tensors with fewer values (and every non-float tensor) get 32 (pass-through).

    Raises:
        ValueError: for widths outside {4, 8, 16}, ``min_bits <= base_bits <= max_bits`` violated,
            fractions outside [0, 1] or summing above 1, ``block_size`` < 1 or a negative ``min_numel``.
    """

    base_bits: PlanWidth = 8
    min_bits: PlanWidth = 4
    max_bits: PlanWidth = 16
    high_fraction: float = 0.1
    low_fraction: float = 0.3
    block_size: int = 256
    min_numel: int = 256

    def __post_init__(self) -> None:
        for name in ("base_bits", "min_bits", "max_bits"):
            check_choice(getattr(self, name), name, _PLAN_BITS)
        if not self.min_bits <= self.base_bits <= self.max_bits:
            raise ValueError(f"need `min_bits` <= `base_bits` <= `max_bits`, got {self.min_bits}, {self.base_bits}, {self.max_bits}")
        check_number(self.high_fraction, "high_fraction", 0, 1)
        check_number(self.low_fraction, "low_fraction", 0, 1)
        if self.high_fraction + self.low_fraction > 1.0:
            raise ValueError(f"`high_fraction` + `low_fraction` must be at most 1, got {self.high_fraction} + {self.low_fraction}")
        check_int(self.block_size, "block_size", 1)
        check_int(self.min_numel, "min_numel", 0)

    def assign(self, state: Mapping[str, Tensor], grads: Mapping[str, Tensor | None] | None = None) -> dict[str, np.ndarray]:
        """Assigns a bit width to every block of ``state`` by global importance ranking.

        Args:
            state: the tensors to plan for.
            grads: gradients by key (``None`` values and missing keys mean "use ``|w|`` alone").

        Returns:
            ``{key: uint8 array of widths per block}`` for every key of ``state``.

        Raises:
            ValueError: for gradient keys not in ``state`` or gradient sizes that differ.
        """
        grads = dict(grads or {})
        unknown = sorted(set(grads) - set(state))
        if unknown:
            raise ValueError(f"`grads` names keys that are not in the state: {unknown[:5]}")
        for name, grad in grads.items():
            if grad is not None and grad.numel() != state[name].numel():
                raise ValueError(
                    f"`grads[{name!r}]` has {grad.numel()} elements, the state entry has {state[name].numel()}"
                )

        plan: dict[str, np.ndarray] = {}
        eligible: list[str] = []
        scores: list[np.ndarray] = []
        for name, tensor in state.items():
            numel = tensor.numel()
            if torch.is_floating_point(tensor) and numel >= max(self.min_numel, 1):
                eligible.append(name)
                scores.append(block_importance(tensor, grads.get(name), self.block_size))
            else:
                plan[name] = np.full(_num_blocks(numel, self.block_size), PASSTHROUGH_BITS, dtype=np.uint8)
        if eligible:
            importance = np.concatenate(scores)
            total = importance.size
            num_high = math.floor(self.high_fraction * total + 1e-9)
            num_low = min(math.floor(self.low_fraction * total + 1e-9), total - num_high)
            order = np.argsort(-importance, kind="stable")
            widths = np.full(total, self.base_bits, dtype=np.uint8)
            widths[order[:num_high]] = self.max_bits
            widths[order[total - num_low :]] = self.min_bits
            for name, chunk in zip(eligible, np.split(widths, np.cumsum([s.size for s in scores])[:-1])):
                plan[name] = chunk
        return {name: plan[name] for name in state}


def plan_bits(state: Mapping[str, Tensor], grads: Mapping[str, Tensor | None] | None = None, **settings: Any) -> dict[str, np.ndarray]:
    """``BitPlan(**settings).assign(state, grads)``: a bit width for every block (see :class:`BitPlan`).

    Args:
        state: the tensors to plan for.
        grads: gradients by key (``None`` values and missing keys mean "use ``|w|`` alone").
        **settings: :class:`BitPlan`'s fields (``base_bits``, ``min_bits``, ``max_bits``,
            ``high_fraction``, ``low_fraction``, ``block_size``, ``min_numel``).

    Returns:
        ``{key: uint8 array of widths per block}`` for every key of ``state``.

    Raises:
        ValueError: for settings :class:`BitPlan` refuses, gradient keys not in ``state`` or
            gradient sizes that differ.
    """
    return BitPlan(**settings).assign(state, grads)


class ErrorFeedback:
    """Keeps the quantization residual per tensor and adds it back before the next encode.

    Use at every sync::

        compensated = feedback.compensate(state)
        payload = encode(compensated, plan)
        feedback.update(compensated, decode(payload))

    Over repeated syncs the sum of what was sent differs from the sum of the true values by
    at most one residual, so their time average converges to the true value.

    Residuals live in the dtype and device of the tensor they compensate. Only floating-point
    tensors get residuals; non-finite residual entries are stored as 0 so a transient NaN or
    Inf does not keep re-entering later payloads.
    """

    def __init__(self) -> None:
        """Starts with no residuals (the first compensation is the identity)."""
        self._residuals: dict[str, Tensor] = {}

    def compensate(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Returns ``state + residual`` for float tensors that have a residual.

        Args:
            state: the tensors about to be encoded.

        Returns:
            A new dict; compensated entries are new tensors, the others are the inputs (detached).

        Raises:
            ValueError: if a stored residual's shape differs from the tensor's.
        """
        out: dict[str, Tensor] = {}
        for name, tensor in state.items():
            residual = self._residuals.get(name)
            if residual is None or not torch.is_floating_point(tensor):
                out[name] = tensor.detach()
                continue
            if residual.shape != tensor.shape:
                raise ValueError(
                    f"the residual for {name!r} has shape {tuple(residual.shape)}, the tensor has {tuple(tensor.shape)}"
                )
            out[name] = tensor.detach() + residual.to(device=tensor.device, dtype=tensor.dtype)
        return out

    def update(self, compensated: Mapping[str, Tensor], decoded: Mapping[str, Tensor]) -> None:
        """Stores ``residual = compensated - decoded`` for every float tensor.

        Args:
            compensated: what :meth:`compensate` returned (and was encoded).
            decoded: ``decode(encode(compensated, ...))``.

        Raises:
            ValueError: if ``decoded`` lacks a float key of ``compensated`` or a shape differs.
        """
        for name, tensor in compensated.items():
            if not torch.is_floating_point(tensor):
                continue
            if name not in decoded:
                raise ValueError(f"`decoded` has no entry {name!r}")
            received = decoded[name]
            if received.shape != tensor.shape:
                raise ValueError(
                    f"`decoded[{name!r}]` has shape {tuple(received.shape)}, `compensated` has {tuple(tensor.shape)}"
                )
            residual = tensor.detach() - received.detach().to(device=tensor.device, dtype=tensor.dtype)
            self._residuals[name] = torch.nan_to_num(residual, nan=0.0, posinf=0.0, neginf=0.0)

    def reset(self) -> None:
        """Forgets every residual."""
        self._residuals.clear()

    def state_dict(self) -> dict[str, Tensor]:
        """The residuals as CPU tensors (copies), for checkpoints."""
        return {name: residual.detach().to("cpu").clone() for name, residual in self._residuals.items()}

    def load_state_dict(self, state: Mapping[str, Tensor | np.ndarray]) -> None:
        """Replaces the residuals with ``state`` (tensors or numpy arrays; copied).

        Args:
            state: residuals by key, as returned by :meth:`state_dict`.

        Raises:
            ValueError: for an entry that is neither a tensor nor a numpy array, or not floating point.
        """
        residuals: dict[str, Tensor] = {}
        for name, value in state.items():
            if isinstance(value, np.ndarray):
                tensor = torch.from_numpy(np.array(value, copy=True))
            elif isinstance(value, Tensor):
                tensor = value.detach().clone()
            else:
                raise ValueError(f"`state[{name!r}]` must be a torch.Tensor or numpy array, got {type(value).__name__}")
            if not torch.is_floating_point(tensor):
                raise ValueError(f"`state[{name!r}]` must be floating point, got {tensor.dtype}")
            residuals[name] = tensor
        self._residuals = residuals
