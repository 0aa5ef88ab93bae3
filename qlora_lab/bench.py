"""Time our pure-torch `quantize_4bit` against bitsandbytes' on the same weight, side by side (`qlora-lab bench`).

Four things run interleaved on one weight: a plain copy of it (the memory-bandwidth floor: no quantizer can
read the weight and write its bytes faster), our fast `nf4.quantize_4bit`, our textbook
`nf4.quantize_4bit_reference` (bucketize, as bitsandbytes' CPU code does) and bitsandbytes itself.
"""

from __future__ import annotations

import statistics
import time

import torch

from . import nf4

DTYPE_FLAGS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def compare_quantize(size: int = 4096, dtype: str = "bf16", quant_type: str = "nf4", blocksize: int = 64,
                     repeats: int = 7, seed: int = 0) -> dict:
    """Median seconds of each contender, interleaved (rotating who goes first) so machine load hits all alike."""
    import bitsandbytes.functional as bnbf

    if dtype not in DTYPE_FLAGS:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPE_FLAGS)}.")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type={quant_type!r}: bitsandbytes quantizes only 'nf4' and 'fp4'.")
    if repeats < 1 or size < 1:
        raise ValueError(f"repeats={repeats} and size={size} must both be at least 1.")
    torch.manual_seed(seed)
    w = (torch.randn(size, size) * 0.02).to(DTYPE_FLAGS[dtype])

    contenders = {
        "copy": lambda: w.clone(),
        "ours": lambda: nf4.quantize_4bit(w, quant_type, blocksize),
        "reference": lambda: nf4.quantize_4bit_reference(w, quant_type, blocksize),
        "bnb": lambda: bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type),
    }
    mine, ref, (packed, state) = contenders["ours"](), contenders["reference"](), contenders["bnb"]()  # warm-up
    same = (torch.equal(mine.packed, packed) and torch.equal(mine.absmax, state.absmax)
            and torch.equal(ref.packed, packed) and torch.equal(ref.absmax, state.absmax))
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            times[name].append(_seconds(contenders[name]))
    median = {name: statistics.median(t) for name, t in times.items()}
    n = w.numel()
    return {"shape": [size, size], "dtype": dtype, "quant_type": quant_type, "blocksize": blocksize,
            "repeats": repeats, "threads": torch.get_num_threads(), "bytes_equal": same,
            **{f"{name}_s": s for name, s in median.items()},
            **{f"{name}_ns_per_param": s * 1e9 / n for name, s in median.items()},
            "speedup_vs_bnb": median["bnb"] / median["ours"], "ratio": median["ours"] / median["bnb"],
            "times_copy_floor": median["ours"] / median["copy"]}


def report(result: dict) -> str:
    """One readable paragraph for the command line."""
    rows = [("plain copy (floor)", "copy"), ("qlora_lab.nf4", "ours"), ("  textbook (bucketize)", "reference"),
            ("bitsandbytes", "bnb")]
    lines = [f"quantize_4bit {result['quant_type']} blocksize {result['blocksize']} on a "
             f"{result['shape'][0]}x{result['shape'][1]} {result['dtype']} weight, {result['repeats']} interleaved "
             f"repeats, {result['threads']} threads (medians)"]
    for label, key in rows:
        lines.append(f"  {label:22s}: {result[f'{key}_s'] * 1e3:8.1f} ms  {result[f'{key}_ns_per_param']:6.2f} ns/param")
    lines.append(f"  qlora_lab.nf4 is {result['speedup_vs_bnb']:.1f}x faster than bitsandbytes and takes "
                 f"{result['times_copy_floor']:.1f}x the time of a copy; bytes equal: {result['bytes_equal']}")
    return "\n".join(lines)


def main(size: int = 4096, dtype: str = "bf16", quant_type: str = "nf4", blocksize: int = 64,
         repeats: int = 7) -> int:
    """Entry point for `qlora-lab bench`: print the comparison; exit 1 if the bytes differ."""
    result = compare_quantize(size, dtype, quant_type, blocksize, repeats)
    print(report(result))
    return 0 if result["bytes_equal"] else 1
