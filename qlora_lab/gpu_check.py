"""One prepared GPU check: peak memory of a QLoRA step vs the estimator, real paging, QLoRA vs LoRA speed.

Run it on a lent CUDA machine with `scripts/gpu_check.sh` (it needs no internet: the LLaMA-7B/-13B models are
randomly initialised from their architectures). `--dry-run` runs the same code on a CPU with tiny stand-ins
(CUDA-only parts are skipped and say so), which is what the test suite does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import measure, memory, models, paging_trace, quiet, smoke

CHECKED_PRESETS = ("llama-7b", "llama-13b")


def _batch(vocab: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(seed))


def qlora_step_memory(preset: str, seq_len: int, folder: Path) -> dict[str, Any]:
    """Peak memory of one QLoRA step (NF4+DQ, r=64 all-linear, checkpointing, paged AdamW) vs the estimate."""
    model = models.random_llama(preset, folder / preset, quantization="nf4")
    est = memory.estimate_training_memory(model, "qlora", batch_size=1, seq_len=seq_len, optimizer="paged_adamw")
    trainable = measure.prepare_for_training(model, "qlora", gradient_checkpointing=True)
    measured = measure.measure_training_memory(trainable, _batch(model.config.vocab_size, seq_len),
                                              optimizer="paged_adamw")
    out = {"preset": preset, "seq_len": seq_len, "measured_gb": round(measured.total / 1e9, 3),
           "estimated_gb": round(est.total / 1e9, 3), "ratio_est_over_measured": round(est.total / measured.total, 3),
           "measured": measured.as_dict(1e9, 3), "estimated": est.as_dict(1e9, 3)}
    del model, trainable
    _free()
    return out


def steps_per_second(preset: str, method: str, seq_len: int, steps: int, folder: Path) -> dict[str, Any]:
    """Training steps per second of QLoRA or 16-bit LoRA on the same shape (after one warm-up step)."""
    model = models.random_llama(preset, folder / f"{preset}-{method}",
                                quantization="nf4" if method == "qlora" else None)
    trainable = measure.prepare_for_training(model, method, gradient_checkpointing=True)
    device = next(trainable.parameters()).device
    ids = _batch(model.config.vocab_size, seq_len).to(device)
    opt = measure.make_optimizer([p for p in trainable.parameters() if p.requires_grad], "paged_adamw")
    times = []
    with measure.quiet_cpu_paging():
        for i in range(steps + 1):
            _sync(device)
            start = time.perf_counter()
            trainable(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i:  # the first step warms kernels and allocates optimizer state
                times.append(time.perf_counter() - start)
    del model, trainable, opt
    _free()
    return {"preset": preset, "method": method, "seq_len": seq_len, "steps": steps,
            "steps_per_second": round(len(times) / sum(times), 3)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(dry_run: bool, presets: tuple[str, ...] = CHECKED_PRESETS) -> dict[str, Any]:
    """Every measurement, in one dict; CUDA-only parts say why they were skipped."""
    cuda = torch.cuda.is_available()
    if not cuda and not dry_run:
        raise SystemExit("gpu_check needs a CUDA GPU; on a CPU run it with --dry-run (tiny shapes).")
    seq_len, steps = (32, 2) if dry_run else (512, 5)
    result: dict[str, Any] = {"dry_run": dry_run, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                              "torch": torch.__version__, "memory": [], "speed": []}
    with tempfile.TemporaryDirectory() as tmp:
        if dry_run:  # the smoke stand-ins: each preset's layer count at a tiny width
            os.environ.setdefault(smoke.ENV, str(Path(tmp) / "standins"))
        for preset in presets:
            result["memory"].append(qlora_step_memory(preset, seq_len, Path(tmp)))
            print(json.dumps(result["memory"][-1])[:300], flush=True)
        for method in ("qlora", "lora"):
            result["speed"].append(steps_per_second(presets[0], method, seq_len, steps, Path(tmp)))
            print(json.dumps(result["speed"][-1]), flush=True)
    speeds = {s["method"]: s["steps_per_second"] for s in result["speed"]}
    result["qlora_over_lora_speed"] = round(speeds["qlora"] / speeds["lora"], 3)
    if cuda:
        result["paging"] = paging_trace.cuda_paging_demo()
    else:
        result["paging"] = "skipped: needs a CUDA GPU (bitsandbytes' paged optimizer pages unified memory)"
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m qlora_lab.gpu_check --out results.json [--dry-run]`."""
    quiet()
    parser = argparse.ArgumentParser(prog="python -m qlora_lab.gpu_check", description=__doc__)
    parser.add_argument("--out", required=True, help="where to write the JSON of results")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (what the tests run)")
    args = parser.parse_args(argv)
    start = time.time()
    result = run(args.dry_run)
    result["seconds"] = round(time.time() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} in {result['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
