"""Double quantization: store the 4-bit absmax constants themselves in 8 bits (QLoRA paper, Sec. 3).

One float32 absmax per 64 weights costs 32/64 = 0.5 bits per parameter. QLoRA subtracts their mean and
quantizes them blockwise (256 per block) with bitsandbytes' signed 8-bit "dynamic" map, leaving
8/64 + 32/(64*256) = 0.127 bits per parameter. Codes here are the exact nearest map entry by default;
bitsandbytes' CPU kernel reads a 65,536-entry lookup table instead, which picks a neighbour now and then
(`rounding="cpu_lut"` reproduces it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from .nf4 import ALLOWED_BLOCKSIZES, QuantizationError

#: Block size of the second quantization in QLoRA and bitsandbytes (`compress_statistics=True`).
DQ_BLOCKSIZE = 256


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map: 0, 1, and per decade 10^-6..10^0 a run of linear fractions, +/-."""
    values = [0.0, 1.0]
    for decade in range(7):  # 10^-6 ... 10^0; decade d holds 2^d evenly spaced fractions in (0.1, 1)
        edges = torch.linspace(0.1, 1, 2**decade + 1, dtype=torch.float32)
        fractions = (edges[:-1] + edges[1:]) / 2.0
        scaled = fractions * 10.0 ** (decade - 6)
        values += scaled.tolist() + (-scaled).tolist()
    assert len(values) == 256, len(values)
    return torch.tensor(sorted(values), dtype=torch.float32)


@lru_cache(maxsize=1)
def _map_and_midpoints() -> tuple[torch.Tensor, torch.Tensor]:
    code = dynamic_map()
    return code, (code[:-1] + code[1:]) / 2


@dataclass
class DoubleQuantized:
    """8-bit codes for (absmax - offset), one float32 absmax per block of them, and the float32 offset."""

    codes: torch.Tensor
    absmax2: torch.Tensor
    offset: torch.Tensor
    blocksize: int

    def nbytes(self) -> int:
        """Bytes stored for the constants: 1 per code, 4 per second-level absmax, 4 for the offset."""
        return self.codes.numel() + self.absmax2.numel() * 4 + 4


def _check_absmax(absmax: torch.Tensor, blocksize: int) -> None:
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32:
        got = absmax.dtype if isinstance(absmax, torch.Tensor) else type(absmax).__name__
        raise QuantizationError(f"absmax must be a float32 tensor (as quantize_4bit returns), got {got}.")
    if absmax.numel() == 0:
        raise QuantizationError("Cannot double-quantize an empty absmax tensor.")
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise QuantizationError(f"blocksize={blocksize!r} must be a positive integer (QLoRA uses {DQ_BLOCKSIZE}).")
    bad = int((~torch.isfinite(absmax)).sum())
    if bad:
        raise QuantizationError(f"absmax has {bad} non-finite values of {absmax.numel()}; it must be finite.")


ROUNDINGS = ("nearest", "cpu_lut")
#: Entries of bitsandbytes' CPU lookup table over [-1, 1].
LUT_SIZE = 65536


@lru_cache(maxsize=1)
def cpu_lut() -> torch.Tensor:
    """bitsandbytes' CPU shortcut: 65,536 evenly spaced points in [-1, 1], each mapped to its nearest map entry."""
    _, midpoints = _map_and_midpoints()
    grid = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1)
    return torch.searchsorted(midpoints, grid).to(torch.uint8)  # = how many midpoints lie below the point


def _lut_codes(scaled: torch.Tensor) -> torch.Tensor:
    """Round a value to the nearest LUT point (float32, as the C++ does), then read that point's entry."""
    position = ((scaled.clamp(-1, 1) + 1.0) * 0.5 * (LUT_SIZE - 1) + 0.5).to(torch.int64)
    return cpu_lut()[position]


def double_quantize(absmax: torch.Tensor, blocksize: int = DQ_BLOCKSIZE, rounding: str = "nearest") -> DoubleQuantized:
    """Center the absmax on its mean, then blockwise 8-bit quantize it with the dynamic map.

    rounding="nearest" picks the exact nearest map entry (ties go to the lower one);
    "cpu_lut" reproduces bitsandbytes' CPU kernel, byte for byte.
    """
    _check_absmax(absmax, blocksize)
    if rounding not in ROUNDINGS:
        raise QuantizationError(f"rounding={rounding!r} is not one of {list(ROUNDINGS)}.")
    flat = absmax.reshape(-1)
    offset = flat.mean()
    centered = flat - offset
    n = centered.numel()
    padded = torch.nn.functional.pad(centered, (0, -n % blocksize)).view(-1, blocksize)
    absmax2 = padded.abs().amax(dim=1)
    scaled = (padded * (1.0 / absmax2.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1)
    if rounding == "cpu_lut":
        codes = _lut_codes(scaled.cpu()).to(scaled.device)
        codes[absmax2 == 0] = 0  # the C++ writes index 0 for an all-zero block
    else:
        _, midpoints = _map_and_midpoints()
        codes = torch.bucketize(scaled, midpoints.to(scaled.device), out_int32=True).to(torch.uint8)  # ties: lower
    return DoubleQuantized(codes.view(-1)[:n].clone(), absmax2, offset, blocksize)


def dequantize_absmax(dq: DoubleQuantized) -> torch.Tensor:
    """Rebuild the float32 absmax: map entry times its block's absmax, plus the offset."""
    code, _ = _map_and_midpoints()
    values = code.to(dq.codes.device)[dq.codes.long()]
    n = values.numel()
    padded = torch.nn.functional.pad(values, (0, -n % dq.blocksize)).view(-1, dq.blocksize)
    return (padded * dq.absmax2.unsqueeze(1)).view(-1)[:n] + dq.offset


def bits_per_parameter(blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = DQ_BLOCKSIZE) -> float:
    """4 bits per weight plus the constants: 32/blocksize, or 8/blocksize + 32/(blocksize*dq_blocksize) with DQ."""
    if blocksize not in ALLOWED_BLOCKSIZES:
        raise QuantizationError(f"blocksize={blocksize!r} is not allowed; choose one of {list(ALLOWED_BLOCKSIZES)}.")
    if not isinstance(dq_blocksize, int) or dq_blocksize <= 0:
        raise QuantizationError(f"dq_blocksize={dq_blocksize!r} must be a positive integer.")
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * dq_blocksize)


def storage_bytes(numel: int, blocksize: int = 64, double_quant: bool = True,
                  dq_blocksize: int = DQ_BLOCKSIZE) -> dict[str, int]:
    """Exact bytes of one 4-bit tensor: packed nibbles, absmax (float32, or uint8 codes + absmax2 + offset)."""
    bits_per_parameter(blocksize, double_quant, dq_blocksize)  # validates the block sizes
    if not isinstance(numel, int) or numel <= 0:
        raise QuantizationError(f"numel={numel!r} must be a positive integer.")
    blocks = math.ceil(numel / blocksize)
    parts = {"packed": math.ceil(numel / 2)}
    if double_quant:
        parts.update(absmax=blocks, absmax2=4 * math.ceil(blocks / dq_blocksize), offset=4)
    else:
        parts.update(absmax=4 * blocks, absmax2=0, offset=0)
    parts["total"] = sum(parts.values())
    return parts
