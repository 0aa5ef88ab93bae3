"""Paged optimizers: a page-level simulation of unified memory, replaying the allocations of real training steps."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from .checks import require_whole

PAGE_SIZE = 2 * 2**20          # 2 MiB: the CUDA driver migrates unified memory in chunks of this order
PCIE3_GBPS = 8.0               # bitsandbytes' docs: ~125 ms per GB evicted over PCIe 3.0 x16 = 8 GB/s
OPS = ("alloc", "free", "access")


@dataclass(frozen=True)
class Event:
    """One step of a memory trace: allocate, free, or (optimizer) touch the allocation `id`."""

    op: str
    id: int
    nbytes: int = 0
    pageable: bool = False
    step: int = 0
    phase: str = ""
    label: str = ""
    t: float = 0.0  # seconds since the trace started (real traces), for plotting


@dataclass
class MemoryTrace:
    """Allocation events of real training steps, and what each step was (tokens, seconds)."""

    events: list[Event]
    steps: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def _live_bytes(self, pinned_only: bool) -> list[int]:
        """Bytes of live allocations (all, or only pinned ones) after each event."""
        live: dict[int, int] = {}
        cur, out = 0, []
        for e in self.events:
            if e.op == "alloc" and not (pinned_only and e.pageable):
                live[e.id] = e.nbytes
                cur += e.nbytes
            elif e.op == "free":
                cur -= live.pop(e.id, 0)
            out.append(cur)
        return out

    def demand(self) -> list[int]:
        """Bytes the trace needs on the device after each event if nothing were paged out."""
        return self._live_bytes(pinned_only=False)

    def pinned(self) -> list[int]:
        """Bytes of pinned (never pageable) allocations alive after each event."""
        return self._live_bytes(pinned_only=True)


class SimulatedOOM(RuntimeError):
    """An allocation did not fit on the simulated device; says which step, phase and how many bytes."""

    def __init__(self, message: str, event: Event, index: int, result: "SimulationResult"):
        super().__init__(message)
        self.event, self.index, self.result = event, index, result


class PagingCannotHelp(SimulatedOOM):
    """Even with every pageable page evicted, the pinned working set does not fit the capacity."""


def page_sizes(nbytes: int, page_size: int = PAGE_SIZE) -> list[int]:
    """An allocation cut into pages, the unit of migration; the last page holds the remainder."""
    full, rest = divmod(nbytes, page_size)
    return [page_size] * full + ([rest] if rest else [])


@dataclass
class SimulationResult:
    """What the simulated device saw: usage after each event, bytes moved each way, and the transfer time."""

    capacity: int
    paging: bool
    used: list[int] = field(default_factory=list)            # device bytes after each event
    host: list[int] = field(default_factory=list)            # pageable bytes on the host after each event
    bytes_to_host: int = 0
    bytes_to_device: int = 0
    evicted_order: list[tuple[int, int]] = field(default_factory=list)  # (allocation id, page index)
    bandwidth_gbps: float = PCIE3_GBPS
    step_transfer: dict[int, int] = field(default_factory=dict)         # bytes moved per training step

    @property
    def bytes_moved(self) -> int:
        """Bytes evicted to the host plus bytes prefetched back."""
        return self.bytes_to_host + self.bytes_to_device

    @property
    def transfer_seconds(self) -> float:
        """Time the page transfers take at `bandwidth_gbps` (decimal GB per second)."""
        return self.bytes_moved / (self.bandwidth_gbps * 1e9)


class UnifiedMemory:
    """A device of fixed capacity: pinned bytes plus pageable allocations held as pages on device or host."""

    def __init__(self, capacity: int, paging: bool, bandwidth_gbps: float = PCIE3_GBPS,
                 page_size: int = PAGE_SIZE):
        if capacity <= 0:
            raise ValueError(f"capacity={capacity} bytes must be positive")
        if bandwidth_gbps <= 0 or page_size <= 0:
            raise ValueError(f"bandwidth_gbps={bandwidth_gbps} and page_size={page_size} must be positive")
        self.capacity, self.paging, self.page_size = capacity, paging, page_size
        self.pinned: dict[int, int] = {}
        self.pageable: dict[int, list[int]] = {}                   # id -> page sizes
        self.resident: OrderedDict[tuple[int, int], int] = OrderedDict()  # LRU order, oldest first
        self.on_host: dict[tuple[int, int], int] = {}
        self.pinned_bytes = self.resident_bytes = self.host_bytes = 0
        self.result = SimulationResult(capacity, paging, bandwidth_gbps=bandwidth_gbps)
        self.step = 0

    @property
    def used(self) -> int:
        """Device bytes in use: pinned plus resident pages."""
        return self.pinned_bytes + self.resident_bytes

    def _moved(self, nbytes: int) -> None:
        self.result.step_transfer[self.step] = self.result.step_transfer.get(self.step, 0) + nbytes

    def _make_room(self, nbytes: int, keep: int | None, event: Event, index: int) -> None:
        """Evict least-recently-used pages (not of allocation `keep`) until nbytes fit, or raise an OOM."""
        while self.used + nbytes > self.capacity:
            victim = next((k for k in self.resident if k[0] != keep), None) if self.paging else None
            if victim is None:
                self._oom(nbytes, event, index)
            size = self.resident.pop(victim)
            self.on_host[victim] = size
            self.resident_bytes -= size
            self.host_bytes += size
            self.result.bytes_to_host += size
            self._moved(size)
            self.result.evicted_order.append(victim)

    def _oom(self, nbytes: int, event: Event, index: int) -> None:
        """Raise the simulated OOM; with paging it means the pinned working set itself is too big."""
        where = f"step {event.step} ({event.phase or 'unknown phase'}), event {index} ({event.op} {event.label})"
        if self.paging:
            raise PagingCannotHelp(
                f"even paging cannot help: at {where} the pinned working set reaches "
                f"{self.used + nbytes:,} bytes but the device holds {self.capacity:,} and no pageable page is "
                "left to evict; only a larger device or a smaller pinned set (shorter sequences, smaller "
                "batches) can fix this", event, index, self.result)
        raise SimulatedOOM(
            f"simulated CUDA out of memory at {where}: tried to allocate {nbytes:,} bytes with "
            f"{self.used:,} of {self.capacity:,} bytes in use ({self.capacity - self.used:,} free)",
            event, index, self.result)

    def apply(self, event: Event, index: int) -> None:
        """Replay one event."""
        self.step = event.step
        if event.op == "alloc":
            if event.nbytes < 0:
                raise ValueError(f"event {index}: allocation of {event.nbytes} bytes; sizes must be >= 0")
            if event.pageable:  # first touch by the optimizer on the device: every page starts resident
                pages = page_sizes(event.nbytes, self.page_size)
                self._make_room(event.nbytes, None, event, index)
                self.pageable[event.id] = pages
                for p, size in enumerate(pages):
                    self.resident[(event.id, p)] = size
                self.resident_bytes += event.nbytes
            else:
                self._make_room(event.nbytes, None, event, index)
                self.pinned[event.id] = event.nbytes
                self.pinned_bytes += event.nbytes
        elif event.op == "free":
            if event.id in self.pinned:
                self.pinned_bytes -= self.pinned.pop(event.id)
            elif event.id in self.pageable:
                for p, _ in enumerate(self.pageable.pop(event.id)):
                    self.resident_bytes -= self.resident.pop((event.id, p), 0)
                    self.host_bytes -= self.on_host.pop((event.id, p), 0)
        elif event.op == "access":
            self._access(event, index)
        else:
            raise ValueError(f"event {index}: op {event.op!r} is not one of {list(OPS)}")
        self.result.used.append(self.used)
        self.result.host.append(self.host_bytes)

    def _access(self, event: Event, index: int) -> None:
        """The optimizer is about to use an allocation: prefetch its host pages (bitsandbytes' prefetch_state)."""
        pages = self.pageable.get(event.id, [])
        for p in range(len(pages)):
            if (event.id, p) in self.resident:
                self.resident.move_to_end((event.id, p))
        for p in range(len(pages)):
            key = (event.id, p)
            if key in self.on_host:
                self._make_room(pages[p], event.id, event, index)
                size = self.on_host.pop(key)
                self.host_bytes -= size
                self.resident[key] = size
                self.resident_bytes += size
                self.result.bytes_to_device += size
                self._moved(size)


def simulate(trace: MemoryTrace | list[Event], capacity: int, paging: bool = True,
             bandwidth_gbps: float = PCIE3_GBPS, page_size: int = PAGE_SIZE) -> SimulationResult:
    """Replay a trace on a device of `capacity` bytes; raises SimulatedOOM where an allocation cannot fit."""
    events = trace.events if isinstance(trace, MemoryTrace) else trace
    bad = next((e for e in events if e.nbytes < 0), None)
    if bad is not None:
        raise ValueError(f"negative size {bad.nbytes} bytes for allocation {bad.id} ({bad.label}); sizes must be >= 0")
    device = UnifiedMemory(int(capacity), paging, bandwidth_gbps, page_size)
    for i, e in enumerate(events):
        device.apply(e, i)
    return device.result


def smallest_capacity(trace: MemoryTrace, paging: bool, resolution: int = 2**20) -> int:
    """The smallest capacity (to `resolution` bytes) at which the trace runs without an OOM (bisection)."""
    require_whole("resolution", resolution)  # 0 would bisect forever
    hi = max(trace.demand(), default=0) + resolution
    lo = max(max(trace.pinned(), default=0), 1)
    if not paging:
        return math.ceil(max(trace.demand(), default=0) / resolution) * resolution
    while hi - lo > resolution:
        mid = (lo + hi) // 2
        try:
            simulate(trace, mid, paging=True)
            hi = mid
        except SimulatedOOM:
            lo = mid
    return math.ceil(hi / resolution) * resolution


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
