"""Time our pure-torch `quantize_4bit` against bitsandbytes' on the same weight, side by side (`qlora-lab bench`)."""

from __future__ import annotations

import statistics
import time

import torch

from . import nf4

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def compare_quantize(size: int = 4096, dtype: str = "bf16", quant_type: str = "nf4", blocksize: int = 64,
                     repeats: int = 7, seed: int = 0) -> dict:
    """Median seconds of ours and bnb's, interleaved (alternating who goes first) so load hits both alike."""
    import bitsandbytes.functional as bnbf

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}.")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type={quant_type!r}: bitsandbytes quantizes only 'nf4' and 'fp4'.")
    if repeats < 1 or size < 1:
        raise ValueError(f"repeats={repeats} and size={size} must both be at least 1.")
    torch.manual_seed(seed)
    w = (torch.randn(size, size) * 0.02).to(DTYPES[dtype])

    def ours() -> nf4.Quantized4bit:
        return nf4.quantize_4bit(w, quant_type, blocksize)

    def theirs():
        return bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)

    mine, (packed, state) = ours(), theirs()  # warm-up, and proof that both give the same bytes
    same = torch.equal(mine.packed, packed) and torch.equal(mine.absmax, state.absmax)
    t_ours, t_bnb = [], []
    for i in range(repeats):
        order = (ours, theirs) if i % 2 == 0 else (theirs, ours)
        for fn in order:
            (t_ours if fn is ours else t_bnb).append(_seconds(fn))
    return {"shape": [size, size], "dtype": dtype, "quant_type": quant_type, "blocksize": blocksize,
            "repeats": repeats, "threads": torch.get_num_threads(), "bytes_equal": same,
            "ours_s": statistics.median(t_ours), "bnb_s": statistics.median(t_bnb),
            "ratio": statistics.median(t_ours) / statistics.median(t_bnb)}


def report(result: dict) -> str:
    """One readable paragraph for the command line."""
    verdict = "within" if result["ratio"] <= 1.5 else "OUTSIDE"
    return (f"quantize_4bit {result['quant_type']} blocksize {result['blocksize']} on a "
            f"{result['shape'][0]}x{result['shape'][1]} {result['dtype']} weight, {result['repeats']} interleaved "
            f"repeats, {result['threads']} threads\n"
            f"  qlora_lab.nf4 : {result['ours_s'] * 1e3:8.1f} ms (median)\n"
            f"  bitsandbytes  : {result['bnb_s'] * 1e3:8.1f} ms (median)\n"
            f"  ratio ours/bnb: {result['ratio']:.2f}x ({verdict} the 1.5x target); "
            f"bytes equal: {result['bytes_equal']}")


def main(size: int = 4096, dtype: str = "bf16", quant_type: str = "nf4", blocksize: int = 64,
         repeats: int = 7) -> int:
    """Entry point for `qlora-lab bench`: print the comparison; exit 1 if the bytes differ."""
    result = compare_quantize(size, dtype, quant_type, blocksize, repeats)
    print(report(result))
    return 0 if result["bytes_equal"] else 1
