"""Paged optimizers: a page-level simulation of unified memory, replaying a trace of allocations, frees and accesses.

The traces of real training steps come from `qlora_lab.paging_trace`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


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
