"""4-bit NormalFloat (NF4), FP4 and Int4 blockwise quantization in pure torch, byte-equal to bitsandbytes.

The QLoRA paper (Dettmers et al., 2023, arXiv:2305.14314, Sec. 3) stores each weight as a 4-bit index into a
16-value code plus one float32 absmax per block. This module rebuilds the codes and the quantizer so the
notebooks can show every step; `tests/test_nf4.py` proves the bytes equal `bitsandbytes.functional.quantize_4bit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

#: Block sizes bitsandbytes' `quantize_4bit` accepts (bitsandbytes 0.50 `functional.quantize_4bit`).
BLOCKSIZE = 64  # bitsandbytes' default for 4-bit weights (and QLoRA's): weights per absmax constant
ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: 4-bit codes this module builds; bitsandbytes quantizes only "nf4" and "fp4".
QUANT_TYPES = ("nf4", "fp4", "int4")
#: Input dtypes bitsandbytes quantizes (it computes in float32 for all three).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The outermost quantile bitsandbytes uses for NF4 (`create_normal_map`); "empirically optimized".
NF4_OFFSET = 0.9677083


class QuantizationError(ValueError):
    """Bad input to a quantizer; the message names the value and what is allowed."""


def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values as bitsandbytes builds them: 8 positive and 7 negative normal quantiles, exact 0, /max."""
    from scipy.stats import norm

    # float32 linspace, as the library does; float64 points give values off by ~1e-7.
    positive = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())).tolist()
    values = torch.tensor([*negative, 0.0, *positive], dtype=torch.float32).sort().values
    return values / values.max()


def nf4_code_paper(offset: float = NF4_OFFSET, bits: int = 4) -> torch.Tensor:
    """The paper's Eq. 4: averages of adjacent quantiles of 2^k+1 points; symmetric, so it has no exact zero."""
    from scipy.stats import norm

    # Q(0) and Q(1) are -inf/+inf, so the end points are pinned at 1-offset and offset (the library's choice).
    probs = torch.linspace(1 - offset, offset, 2**bits + 1, dtype=torch.float64).numpy()
    quantiles = torch.tensor(norm.ppf(probs), dtype=torch.float64)
    values = ((quantiles[:-1] + quantiles[1:]) / 2).to(torch.float32)
    return values / values.abs().max()


def fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 (E2M1) table in index order: bit 3 is the sign, bits 2-1 the exponent, bit 0 the mantissa."""
    values = []
    for index in range(16):
        sign = -1.0 if index & 8 else 1.0
        exponent, mantissa = (index >> 1) & 3, index & 1
        # exponent 0 is subnormal (0 or 1/16); the library orders exponents 1, 2, 3 as 8, 4, 2.
        magnitude = mantissa / 16 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (4 - exponent)
        values.append(sign * magnitude + 0.0)  # + 0.0 turns -0.0 into 0.0, as in the library's table
    code = torch.tensor(values, dtype=torch.float32)
    return code / code.abs().max()


def int4_code() -> torch.Tensor:
    """The paper's Int4: uniform symmetric levels k/7, in the index order of bitsandbytes' (broken) "int4" table."""
    levels = [7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7]
    return torch.tensor(levels, dtype=torch.float32) / 7


_CODES = {"nf4": nf4_code, "fp4": fp4_code, "int4": int4_code}


def code_for(quant_type: str) -> torch.Tensor:
    """The 16-value table of a quant type (a fresh copy, safe to modify)."""
    _check_quant_type(quant_type)
    return _cached_code(quant_type).clone()


@lru_cache(maxsize=None)
def _cached_code(quant_type: str) -> torch.Tensor:
    return _CODES[quant_type]()


@lru_cache(maxsize=None)
def _bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Midpoints between adjacent sorted code values, and the map from sorted position to index (None if sorted)."""
    code = _cached_code(quant_type)
    order = torch.argsort(code, stable=True)
    values = code[order]
    midpoints = (values[:-1] + values[1:]) / 2
    identity = bool(torch.equal(order, torch.arange(16)))
    return midpoints, None if identity else order.to(torch.uint8)


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(f"quant_type={quant_type!r} is not supported; choose one of {list(QUANT_TYPES)}.")


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in ALLOWED_BLOCKSIZES:
        raise QuantizationError(f"blocksize={blocksize!r} is not allowed; bitsandbytes accepts "
                                f"{list(ALLOWED_BLOCKSIZES)}.")


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise QuantizationError(f"Expected a torch.Tensor, got {type(w).__name__}.")
    if w.dtype not in FLOAT_DTYPES:
        raise QuantizationError(f"Cannot quantize a {w.dtype} tensor; allowed dtypes are "
                                f"{[str(d) for d in FLOAT_DTYPES]}.")
    if w.numel() == 0:
        raise QuantizationError(f"Cannot quantize an empty tensor (shape {tuple(w.shape)}).")


def _check_finite(w: torch.Tensor, absmax: torch.Tensor) -> None:
    """A NaN/Inf anywhere makes its block's absmax non-finite, so only the small absmax is scanned first."""
    if bool(torch.isfinite(absmax).all()):
        return
    nan = int(torch.isnan(w).sum())
    inf = int(torch.isinf(w).sum())
    raise QuantizationError(f"Cannot quantize a tensor with non-finite values: {nan} NaN and {inf} Inf "
                            f"among {w.numel():,} elements; clean or clip the weights first.")


@dataclass
class Quantized4bit:
    """A 4-bit tensor: packed indices (2 per byte, first in the high nibble) and one float32 absmax per block."""

    packed: torch.Tensor
    absmax: torch.Tensor
    quant_type: str
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Number of quantized values."""
        return math.prod(self.shape)

    def indices(self) -> torch.Tensor:
        """The 4-bit code index of every value (uint8, flat), for bin-occupancy plots."""
        return unpack_nibbles(self.packed, self.numel)

    def nbytes(self) -> int:
        """Bytes stored: packed nibbles plus the float32 absmax (the 16-value code is shared, not counted)."""
        return self.packed.numel() * self.packed.element_size() + self.absmax.numel() * 4


def pack_nibbles(indices: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Two 4-bit indices per byte, the first in the high nibble, shaped (n/2, 1) like bitsandbytes."""
    flat = indices.reshape(-1).to(torch.uint8)
    if flat.numel() and int(flat.max()) > 15:
        raise QuantizationError(f"Indices must be in 0..15; got a maximum of {int(flat.max())}.")
    if flat.numel() % 2:  # an odd count is padded with index `pad`
        flat = torch.nn.functional.pad(flat, (0, 1), value=pad)
    return ((flat[0::2] << 4) | flat[1::2]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Undo `pack_nibbles`: the first `numel` 4-bit indices, high nibble first."""
    flat = packed.reshape(-1).view(torch.uint8)
    if not 0 <= numel <= 2 * flat.numel():
        raise QuantizationError(f"numel={numel} does not fit in {flat.numel()} packed bytes "
                                f"(at most {2 * flat.numel()}).")
    out = torch.stack((flat >> 4, flat & 15), dim=1).reshape(-1)
    return out[:numel]


def _scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the values scaled into [-1, 1], reproducing bitsandbytes' float32 arithmetic."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # Multiply by the reciprocal, as the library does: x / absmax differs in the last bit for about 1 value
    # in 4, which changes the code of a value lying right at a midpoint.
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
    scaled = scaled.clamp_(-1, 1).view(-1)
    if full < n:
        tail = flat[full:]
        tail_absmax = tail.abs().max().clamp(min=1e-38)  # the library stores the clamped value here
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled = torch.cat([scaled, (tail / tail_absmax).clamp_(-1, 1)])  # and divides (no reciprocal)
    return absmax, scaled


def _nearest_index(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """The code index of each scaled value by binary search over the 15 midpoints (ties to the lower code)."""
    midpoints, order = _bounds(quant_type)
    index = torch.bucketize(scaled, midpoints.to(scaled.device), out_int32=True).to(torch.uint8)
    if order is not None:  # FP4/Int4 tables are not sorted by index
        index = order.to(index.device)[index.long()]
    return index


def quantize_4bit_reference(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = BLOCKSIZE) -> Quantized4bit:
    """The textbook quantizer (bitsandbytes' own CPU code): scale, clamp, `bucketize`, pack; slow but plain."""
    _check_weight(w)
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    flat = w.reshape(-1).float()
    absmax, scaled = _scale_blocks(flat, blocksize)
    _check_finite(w, absmax)
    if scaled.numel() % 2:  # an odd count gets a padding value of 0.0 (its code is stored in the last low nibble)
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    return Quantized4bit(pack_nibbles(_nearest_index(scaled, quant_type)), absmax, quant_type, blocksize,
                         w.shape, w.dtype)


# ------------------------------------------------------------------------------------------- the fast path
#: Elements per chunk of the fast quantizer: its temporaries (about 14 bytes per element) stay in the CPU's
#: caches, and each op is long enough that torch's fixed cost per call (microseconds) stays small.
CHUNK = 1 << 17


@lru_cache(maxsize=None)
def lookup_tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 16-bit key (the top half of a float32: sign, exponent, 7 mantissa bits), a sorted position and a threshold.

    Every float32 whose top 16 bits are `key` lies in one small interval. `lo[key]` is the number of midpoints
    below that interval's smallest value and `threshold[key]` the next midpoint up, so a value's position among
    the sorted codes is `lo[key] + (value > threshold[key])`: the comparison can only be true when a midpoint
    falls inside the interval (15 of the 65,536 keys), and there it is exactly bucketize's test (ties go to the
    lower code). Both tables are indexed by `key + 32768`.
    """
    midpoints, _ = _bounds(quant_type)
    top = (torch.arange(65536, dtype=torch.int32) - 32768) << 16
    ends = torch.stack([top.view(torch.float32), (top | 0xFFFF).view(torch.float32)])  # both ends of each interval
    low, high = ends.min(0).values, ends.max(0).values
    lo = torch.bucketize(low, midpoints)
    if int((torch.bucketize(high, midpoints) - lo)[~low.isnan()].max()) > 1:  # never for the 4-bit codes
        raise AssertionError(f"two {quant_type} midpoints share one 16-bit key; the lookup would be wrong")
    threshold = torch.cat([midpoints, torch.tensor([float("inf")])])[lo]
    return lo.to(torch.uint8), threshold


@lru_cache(maxsize=None)
def _code_tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`lookup_tables` in code indices: the code below each key's threshold, the code above it (None when that
    is simply the next index, as for the sorted NF4 table), and the threshold."""
    lo, threshold = lookup_tables(quant_type)
    _, order = _bounds(quant_type)
    if order is None:
        return lo, None, threshold
    return order[lo.long()], order[(lo.long() + 1).clamp(max=15)], threshold


def _block_absmax(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """max |x| per block into `out` (float32). For 16-bit floats on the bit patterns: clearing the sign bit is |x|,
    and non-negative floats order like their bits as integers (NaN stays above Inf), so it is exact, and fast."""
    if blocks.dtype in (torch.bfloat16, torch.float16):
        out.copy_((blocks.view(torch.int16) & 0x7FFF).amax(dim=1).view(blocks.dtype))
    else:
        torch.amax(blocks.abs(), dim=1, out=out)


def _quantize_rows(blocks: torch.Tensor, quant_type: str, absmax: torch.Tensor, out: torch.Tensor) -> None:
    """Absmax and packed bytes of whole blocks, chunk by chunk, without bucketize.

    Per element: scaled = x * (1/absmax) in float32 as bitsandbytes computes it (no clamp: values just beyond
    +-1 fall in the end codes anyway), key = its top 16 bits, position = lo[key] + (scaled > threshold[key]).
    """
    base, above_code, threshold = (t if t is None else t.to(blocks.device) for t in _code_tables(quant_type))
    blocksize = blocks.shape[1]
    rows = max(1, CHUNK // blocksize) if blocks.device.type == "cpu" else blocks.shape[0]
    m = min(rows, blocks.shape[0]) * blocksize
    scaled = torch.empty(m, dtype=torch.float32, device=blocks.device)  # buffers reused chunk after chunk
    key = torch.empty(m, dtype=torch.int32, device=blocks.device)
    index = torch.empty(m, dtype=torch.uint8, device=blocks.device)
    above = torch.empty(m, dtype=torch.float32, device=blocks.device)
    over = torch.empty(m, dtype=torch.bool, device=blocks.device)
    other = None if above_code is None else torch.empty(m, dtype=torch.uint8, device=blocks.device)
    _block_absmax(blocks, absmax)
    recip = (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
    for b in range(0, blocks.shape[0], rows):
        part = blocks[b:b + rows]
        k = part.numel()
        s, kk, ix, th, gt = scaled[:k], key[:k], index[:k], above[:k], over[:k]
        torch.mul(part, recip[b:b + rows], out=s.view(-1, blocksize))
        torch.bitwise_right_shift(s.view(torch.int32), 16, out=kk)
        kk.add_(32768)
        torch.index_select(base, 0, kk, out=ix)
        torch.index_select(threshold, 0, kk, out=th)
        torch.gt(s, th, out=gt)
        if above_code is None:  # NF4: the code above is the next index
            ix.add_(gt)
        else:  # FP4/Int4 tables are not sorted by index: take the code above from its own table
            torch.index_select(above_code, 0, kk, out=other[:k])
            torch.where(gt, other[:k], ix, out=ix)
        start = b * blocksize // 2
        torch.add(ix[1::2], ix[0::2], alpha=16, out=out[start:start + k // 2])  # high nibble first


def _quantize_full_blocks(blocks: torch.Tensor, quant_type: str, absmax: torch.Tensor, out: torch.Tensor) -> None:
    """Split the blocks into one contiguous part per torch thread, each run by its own Python thread.

    Each part's ops run single-threaded, in parallel: that beats splitting every small op across the cores,
    which makes each op wait for all of them, worst of all when other programs share the machine.
    """
    threads = torch.get_num_threads()
    if blocks.device.type != "cpu" or threads < 2 or blocks.numel() < 2 * CHUNK:
        _quantize_rows(blocks, quant_type, absmax, out)
        return
    from concurrent.futures import ThreadPoolExecutor

    per = -(-blocks.shape[0] // threads)
    half = per * blocks.shape[1] // 2  # packed bytes per part
    jobs = [(blocks[b:b + per], quant_type, absmax[b:b + per], out[i * half:(i + 1) * half])
            for i, b in enumerate(range(0, blocks.shape[0], per))]
    torch.set_num_threads(1)  # for the duration: every part's ops stay on its own core
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            for future in [pool.submit(_quantize_rows, *job) for job in jobs]:
                future.result()
    finally:
        torch.set_num_threads(threads)


def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = BLOCKSIZE) -> Quantized4bit:
    """Blockwise 4-bit quantization: absmax per block, scale to [-1, 1], nearest code value, pack two per byte.

    The same bytes as `quantize_4bit_reference` (and bitsandbytes), computed with a table lookup instead of
    `bucketize`, in cache-sized chunks: several times faster (`qlora-lab bench`).
    """
    _check_weight(w)
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    flat = w.detach().reshape(-1)  # a parameter that requires grad: quantizing is not differentiable anyway
    n = flat.numel()
    full = n - n % blocksize
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=w.device)
    if full:
        _quantize_full_blocks(flat[:full].view(-1, blocksize), quant_type, absmax[: full // blocksize],
                              packed.view(-1))
    if full < n:  # a short last block: the library divides here (no reciprocal) and stores the clamped absmax
        tail = flat[full:].float()
        absmax[-1] = tail.abs().max().clamp(min=1e-38)
        scaled_tail = (tail / absmax[-1]).clamp_(-1, 1)
        if scaled_tail.numel() % 2:  # an odd count gets a padding value of 0.0 (its code is the last low nibble)
            scaled_tail = torch.nn.functional.pad(scaled_tail, (0, 1))
        packed[full // 2:] = pack_nibbles(_nearest_index(scaled_tail, quant_type))
    _check_finite(w, absmax)  # NaN/Inf only give meaningless bytes above, never an error mid-way
    return Quantized4bit(packed, absmax, quant_type, blocksize, w.shape, w.dtype)


def _check_state(q: Quantized4bit) -> None:
    """A Quantized4bit whose parts disagree would dequantize to garbage (or crash deep inside): refuse it."""
    _check_quant_type(q.quant_type)
    if q.blocksize not in ALLOWED_BLOCKSIZES:
        raise QuantizationError(f"blocksize={q.blocksize!r} is not allowed; bitsandbytes accepts "
                                f"{list(ALLOWED_BLOCKSIZES)}.")
    n = q.numel
    if n < 1 or any(d < 0 for d in q.shape):
        raise QuantizationError(f"shape={tuple(q.shape)} holds no values; a quantized tensor needs at least one.")
    if q.packed.numel() != (n + 1) // 2:
        raise QuantizationError(f"{q.packed.numel():,} packed bytes do not match shape={tuple(q.shape)} "
                                f"({n:,} values need {(n + 1) // 2:,} bytes).")
    blocks = -(-n // q.blocksize)
    if q.absmax.numel() != blocks:
        raise QuantizationError(f"absmax has {q.absmax.numel():,} values but shape={tuple(q.shape)} with "
                                f"blocksize={q.blocksize} has {blocks:,} blocks (one absmax per block).")


@lru_cache(maxsize=None)
def _pair_table(quant_type: str) -> torch.Tensor:
    """Byte -> its two code values (high nibble first): one lookup per byte instead of unpacking nibbles."""
    code = _cached_code(quant_type)
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).contiguous()


def dequantize_4bit(q: Quantized4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Look each index up in the code and multiply by its block's absmax (in float32), then cast.

    Two values per byte come from one lookup in a 256-row table, and the float32 product is rounded once, on
    the way into the output dtype: the same numbers as unpacking nibbles first, several times faster.
    """
    _check_state(q)
    n, bs = q.numel, q.blocksize
    table = _pair_table(q.quant_type).to(q.packed.device)
    values = torch.nn.functional.embedding(q.packed.reshape(-1).view(torch.uint8).int(), table).view(-1)
    out = torch.empty(n, dtype=dtype or q.dtype, device=q.packed.device)
    full = n - n % bs
    torch.mul(values[:full].view(-1, bs), q.absmax[: full // bs].unsqueeze(1), out=out[:full].view(-1, bs))
    if full < n:
        out[full:] = values[full:n] * q.absmax[-1]
    return out.view(q.shape)


def fake_quantize(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """Quantize and dequantize at once: the weights a 4-bit layer would compute with, in w's dtype."""
    return dequantize_4bit(quantize_4bit(w, quant_type, blocksize), w.dtype)


def fake_quantize_linears(model: torch.nn.Module, quant_type: str = "nf4", blocksize: int = BLOCKSIZE,
                          skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every nn.Linear weight (except `skip`) by its 4-bit round trip, as bitsandbytes would; returns count."""
    count = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in skip:
                module.weight.copy_(fake_quantize(module.weight, quant_type, blocksize))
                count += 1
    return count
