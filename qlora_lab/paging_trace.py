"""Paging's inputs from real runs: the allocation trace of training steps on the embedded model, and the CUDA demo.

`record_memory_trace` replays real optimizer steps of the embedded model and writes down every allocation, free
and access as a `paging.MemoryTrace`, which `paging.simulate` then runs through a simulated unified memory.
`cuda_paging_demo` is the real thing on a CUDA GPU: bitsandbytes' paged AdamW surviving a step that a plain
AdamW cannot fit.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .paging import Event, MemoryTrace

# ---------------------------------------------------------------------------------------------------------
# Recording a real trace on the embedded model
# ---------------------------------------------------------------------------------------------------------

def _token_chunks(lengths: list[int], batch_size: int, texts: list[str] | None, vocab: int, seed: int,
                  tokenizer=None) -> list[torch.Tensor]:
    """Batches of exactly these lengths: consecutive slices of the texts' token stream, or random ids."""
    need = sum(lengths) * batch_size
    if texts:
        eos = tokenizer.eos_token_id
        stream: list[int] = []
        for t in texts:
            stream += tokenizer(t)["input_ids"] + [eos]
        if len(stream) < need:  # recycle the texts rather than pad: memory depends only on the shape
            stream = stream * math.ceil(need / len(stream))
        ids = torch.tensor(stream[:need])
    else:
        ids = torch.randint(0, vocab, (need,), generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for n in lengths:
        out.append(ids[start:start + n * batch_size].view(batch_size, n))
        start += n * batch_size
    return out


def record_memory_trace(model=None, *, method: str = "full", optimizer: str = "paged_adamw",
                        short_len: int = 64, long_len: int = 1024, steps: int = 4, long_step: int = 2,
                        batch_size: int = 1, texts: list[str] | None = None, tokenizer=None,
                        min_pageable: int | None = None, seed: int = 0) -> MemoryTrace:
    """Run real training steps (short batches, one long one; checkpointing on) and record every allocation."""
    from . import measure, memory
    from .models import load_model, load_tokenizer

    if not 0 <= long_step < steps:
        raise ValueError(f"long_step={long_step} must index one of the {steps} steps (0..{steps - 1})")
    if min(short_len, long_len) < 2 or batch_size < 1:
        raise ValueError(f"short_len={short_len}, long_len={long_len} must be >= 2 and batch_size={batch_size} >= 1")
    min_pageable = memory.PAGED_MIN_SIZE if min_pageable is None else min_pageable
    torch.manual_seed(seed)
    if model is None:
        model = measure.prepare_for_training(load_model(quantization="nf4" if method == "qlora" else None), method)
    if texts and tokenizer is None:
        tokenizer = load_tokenizer()
    lengths = [long_len if i == long_step else short_len for i in range(steps)]
    batches = _token_chunks(lengths, batch_size, texts, model.config.vocab_size, seed, tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = measure.make_optimizer(params, optimizer)
    trace = MemoryTrace([], notes=[
        f"{method} fine-tuning, {optimizer}, gradient checkpointing, batches of {batch_size} x {lengths} tokens"
        + (" from the given texts" if texts else " of random token ids"),
        "optimizer phase: only allocations that outlive it (its state) and the gradients it frees; the CPU "
        "fallback's float32 scratch copies are left out (the CUDA kernel updates in place)",
        f"pageable: the two AdamW moments of parameters with >= {min_pageable:,} elements (bitsandbytes' rule)"])
    rec = _Recorder(trace)
    rec.preexisting(model)
    for step, ids in enumerate(batches):
        start = time.perf_counter()
        with measure.record_allocations("cpu") as fb:
            model(input_ids=ids, labels=ids).loss.backward()
        rec.add(fb, step, "forward+backward")
        rec.prefetch(step)
        with measure.record_allocations("cpu") as st:
            measure.optimizer_step(opt)
            model.zero_grad(set_to_none=True)
        rec.add(st, step, "optimizer", paged=_paged_state(opt, min_pageable), transients=False)
        trace.steps.append({"step": step, "tokens": int(ids.numel()), "seq_len": int(ids.shape[1]),
                            "seconds": round(time.perf_counter() - start, 2)})
    return trace


def _paged_state(opt, min_pageable: int) -> set[int]:
    """Addresses of the AdamW moments bitsandbytes would allocate as paged (parameters >= min_pageable elements)."""
    return {t.untyped_storage().data_ptr() for p, s in opt.state.items() if p.numel() >= min_pageable
            for t in s.values() if torch.is_tensor(t) and t.numel() == p.numel()}


class _Recorder:
    """Turns allocator events (address, +/-bytes) into trace events with stable ids."""

    def __init__(self, trace: MemoryTrace):
        self.trace, self.next_id = trace, 0
        self.t0: int | None = None                   # profiler clock (ns) of the first recorded event
        self.now = 0.0
        self.live: dict[int, tuple[int, int]] = {}   # address -> (id, bytes)
        self.paged_ids: list[int] = []               # pageable allocations in creation (= parameter) order

    def _new(self) -> int:
        self.next_id += 1
        return self.next_id

    def preexisting(self, model) -> None:
        """The model's weights and buffers sit on the device before training starts: pinned allocations."""
        seen = set()
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            ptr, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if ptr not in seen:
                seen.add(ptr)
                i = self._new()
                self.live[ptr] = (i, nbytes)
                self.trace.events.append(Event("alloc", i, nbytes, False, 0, "weights", name))

    def prefetch(self, step: int) -> None:
        """bitsandbytes prefetches paged optimizer state to the device before updating with it."""
        alive = {i for i, _ in self.live.values()}
        for i in self.paged_ids:
            if i in alive:
                self.trace.events.append(Event("access", i, 0, True, step, "optimizer", "prefetch state",
                                               self.now))

    def add(self, events, step: int, phase: str, paged: set[int] = frozenset(), transients: bool = True) -> None:
        """Append allocator events; allocations at `paged` addresses that outlive the batch become pageable."""
        freed_within: set[int] = set()
        open_at: dict[int, int] = {}
        for k, (_, ptr, size) in enumerate(events):
            if size > 0:
                open_at[ptr] = k
            elif ptr in open_at:
                freed_within.add(open_at.pop(ptr))
        skipped: set[int] = set()
        for k, (ns, ptr, size) in enumerate(events):
            self.t0 = ns if self.t0 is None else self.t0
            self.now = (ns - self.t0) / 1e9
            if size > 0:
                if not transients and k in freed_within:
                    skipped.add(ptr)
                    continue
                pageable = ptr in paged and k not in freed_within
                i = self._new()
                self.live[ptr] = (i, size)
                self.trace.events.append(Event("alloc", i, size, pageable, step, phase,
                                               "optimizer state" if pageable else "", self.now))
                if pageable:
                    self.paged_ids.append(i)
            elif ptr in skipped:
                skipped.discard(ptr)
            elif ptr in self.live:
                i, n = self.live.pop(ptr)
                self.trace.events.append(Event("free", i, n, False, step, phase, t=self.now))


# ---------------------------------------------------------------------------------------------------------
# The real thing on a CUDA GPU
# ---------------------------------------------------------------------------------------------------------

def _cuda_steps(model, opt, batches, long_step: int) -> list[dict[str, Any]]:
    """Train on the batches until one raises torch.OutOfMemoryError; log free memory and step time."""
    from . import measure

    rows = []
    for i, ids in enumerate(batches):
        torch.cuda.synchronize()
        start = time.perf_counter()
        error = ""
        try:
            model(input_ids=ids, labels=ids).loss.backward()
            measure.optimizer_step(opt)
            torch.cuda.synchronize()
        except torch.OutOfMemoryError as err:
            error = str(err).splitlines()[0][:160]
        model.zero_grad(set_to_none=True)
        free, _ = torch.cuda.mem_get_info()
        rows.append({"step": i, "seq_len": int(ids.shape[1]), "long": i == long_step, "ok": not error,
                     "seconds": round(time.perf_counter() - start, 3), "free_gb": round(free / 1e9, 3),
                     "torch_allocated_gb": round(torch.cuda.memory_allocated() / 1e9, 3), "error": error})
        if error:
            break
    return rows


def _cuda_model(seed: int):
    """The embedded model in float32 on the GPU (so torch AdamW and bnb's 32-bit state are the same size)."""
    from . import measure
    from .models import load_model

    torch.manual_seed(seed)
    model = load_model(compute_dtype=torch.float32).to("cuda")
    return measure.prepare_for_training(model, "full")


def _release() -> None:
    import gc

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def cuda_paging_demo(*, short_len: int = 256, long_len: int = 2048, steps: int = 4, long_step: int = 2,
                     seed: int = 0, lr: float = 1e-5) -> dict[str, Any]:
    """Shrink free GPU memory with a filler tensor; torch AdamW then OOMs on the long batch, PagedAdamW does not."""
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_paging_demo needs a CUDA GPU (torch.cuda.is_available() is False); "
                           "on CPU use record_memory_trace + simulate instead")
    import bitsandbytes as bnb

    gen = torch.Generator().manual_seed(seed)
    lengths = [long_len if i == long_step else short_len for i in range(steps)]
    batches = [torch.randint(0, 49152, (1, n), generator=gen).cuda() for n in lengths]
    # 1. a dry run without the filler: how much the allocator reserves in the short steps and in the long one
    model = _cuda_model(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    reserved = []
    for ids in batches:
        torch.cuda.reset_peak_memory_stats()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        reserved.append(torch.cuda.max_memory_reserved())
    del model, opt
    _release()
    short_peak = max(r for i, r in enumerate(reserved) if i != long_step)
    budget = (short_peak + reserved[long_step]) // 2  # enough for the short steps, not for the long one
    runs = {}
    for name, make in (("torch.optim.AdamW", lambda ps: torch.optim.AdamW(ps, lr=lr)),
                       ("bnb.optim.PagedAdamW", lambda ps: bnb.optim.PagedAdamW(ps, lr=lr))):
        model = _cuda_model(seed)
        opt = make([p for p in model.parameters() if p.requires_grad])
        _release()
        free, _ = torch.cuda.mem_get_info()
        filler = torch.empty(max(free - (budget - torch.cuda.memory_reserved()), 0), dtype=torch.uint8,
                             device="cuda")
        runs[name] = _cuda_steps(model, opt, batches, long_step)
        del filler, model, opt
        _release()
    return {"device": torch.cuda.get_device_name(0), "lengths": lengths, "dry_run_reserved_gb":
            [round(r / 1e9, 3) for r in reserved], "budget_gb": round(budget / 1e9, 3), "runs": runs}
