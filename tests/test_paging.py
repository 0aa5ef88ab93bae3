"""The unified-memory simulation: capacity, conservation, exact OOMs, LRU eviction, determinism, a real trace."""

import random

import pytest
import torch

from qlora_lab import paging, paging_trace
from qlora_lab.paging import PAGE_SIZE, Event, MemoryTrace

MiB = 2**20


def random_trace(seed: int, n: int = 400) -> MemoryTrace:
    """Pinned and pageable allocations and frees, with optimizer accesses, drawn from a seeded RNG."""
    rng = random.Random(seed)
    events, live, next_id = [], [], 0
    for i in range(n):
        step = i // 100
        r = rng.random()
        if r < 0.45 or not live:
            next_id += 1
            pageable = rng.random() < 0.3
            size = rng.randint(1, 9 * MiB) if pageable else rng.randint(1, 3 * MiB)
            events.append(Event("alloc", next_id, size, pageable, step, "fwd"))
            live.append((next_id, pageable))
        elif r < 0.8:
            i_, _ = live.pop(rng.randrange(len(live)))
            events.append(Event("free", i_, 0, False, step, "fwd"))
        else:
            pageables = [i_ for i_, p in live if p]
            if pageables:
                events.append(Event("access", rng.choice(pageables), 0, True, step, "optimizer"))
    return MemoryTrace(events)


@pytest.mark.parametrize("seed", range(5))
def test_never_exceeds_capacity_and_conserves_bytes(seed):
    trace = random_trace(seed)
    demand = trace.demand()
    for capacity in (max(trace.pinned()) + 9 * MiB, (max(trace.pinned()) + max(demand)) // 2, max(demand)):
        result = paging.simulate(trace, capacity, paging=True)
        assert max(result.used) <= capacity
        # every live byte is either on the device or on the host, after every event
        assert [u + h for u, h in zip(result.used, result.host)] == demand
        assert result.bytes_to_device <= result.bytes_to_host


@pytest.mark.parametrize("seed", range(5))
def test_without_paging_oom_exactly_when_demand_exceeds_capacity(seed):
    trace = random_trace(seed)
    demand = trace.demand()
    peak = max(demand)
    paging.simulate(trace, peak, paging=False)  # exactly enough: no OOM
    for capacity in (peak - 1, peak // 2):
        with pytest.raises(paging.SimulatedOOM) as err:
            paging.simulate(trace, capacity, paging=False)
        first = next(i for i, d in enumerate(demand) if d > capacity)
        assert err.value.index == first
        assert f"step {trace.events[first].step}" in str(err.value)
        assert f"{trace.events[first].nbytes:,} bytes" in str(err.value)
        assert not isinstance(err.value, paging.PagingCannotHelp)


def test_evicts_least_recently_used_first_and_prefetches_back():
    events = [
        Event("alloc", 1, 2 * PAGE_SIZE, True, label="A"),
        Event("alloc", 2, 2 * PAGE_SIZE, True, label="B"),
        Event("access", 1, 0, True),                       # A used again: B is now least recently used
        Event("alloc", 3, PAGE_SIZE + 2, False, step=1),    # needs two pages of room
        Event("free", 3, 0, False, step=1),
        Event("access", 2, 0, True, step=2),               # the optimizer needs B back
    ]
    result = paging.simulate(events, 4 * PAGE_SIZE + 1, paging=True)
    assert result.evicted_order == [(2, 0), (2, 1)]
    assert result.bytes_to_host == 2 * PAGE_SIZE and result.bytes_to_device == 2 * PAGE_SIZE
    assert result.step_transfer == {1: 2 * PAGE_SIZE, 2: 2 * PAGE_SIZE}
    assert result.transfer_seconds == pytest.approx(4 * PAGE_SIZE / (paging.PCIE3_GBPS * 1e9))
    with pytest.raises(paging.SimulatedOOM, match="tried to allocate 2,097,154 bytes"):
        paging.simulate(events, 4 * PAGE_SIZE + 1, paging=False)


def test_is_deterministic():
    trace = random_trace(7)
    capacity = (max(trace.pinned()) + max(trace.demand())) // 2
    a = paging.simulate(trace, capacity)
    b = paging.simulate(random_trace(7), capacity)
    assert (a.used, a.host, a.evicted_order, a.bytes_moved) == (b.used, b.host, b.evicted_order, b.bytes_moved)


def test_errors():
    trace = random_trace(1)
    with pytest.raises(paging.PagingCannotHelp, match="even paging cannot help"):
        paging.simulate(trace, max(trace.pinned()) - 1, paging=True)
    with pytest.raises(ValueError, match="negative size -5"):
        paging.simulate([Event("alloc", 1, -5)], 10)
    with pytest.raises(ValueError, match="capacity=0"):
        paging.simulate(trace, 0)
    with pytest.raises(ValueError, match="'move' is not one of"):
        paging.simulate([Event("move", 1, 5)], 10)
    with pytest.raises(ValueError, match="long_step=5"):
        paging_trace.record_memory_trace(torch.nn.Linear(1, 1), steps=3, long_step=5)


def test_smallest_capacity_brackets_the_oom():
    trace = random_trace(3)
    for use_paging in (False, True):
        cap = paging.smallest_capacity(trace, use_paging, resolution=MiB)
        paging.simulate(trace, cap, paging=use_paging)
        with pytest.raises(paging.SimulatedOOM):
            paging.simulate(trace, cap - MiB, paging=use_paging)
    assert paging.smallest_capacity(trace, True) < paging.smallest_capacity(trace, False)


def test_real_trace_long_batch_spikes_and_paging_survives():
    """Short steps and one long step of the embedded model (LoRA, every adapter state pageable)."""
    trace = paging_trace.record_memory_trace(method="lora", short_len=16, long_len=256, steps=3, long_step=1,
                                       min_pageable=0)
    demand, pinned = trace.demand(), trace.pinned()
    steps = [e.step for e in trace.events]
    short_peak = max(d for d, s, e in zip(demand, steps, trace.events) if s != 1 and e.phase != "weights")
    long_peak = max(d for d, s in zip(demand, steps) if s == 1)
    assert long_peak > short_peak + 50e6  # 256 tokens x 12 bytes x 49,152 vocab ~ 151 MB of loss head
    assert any(e.pageable for e in trace.events) and any(e.op == "access" for e in trace.events)
    assert all(a.t <= b.t for a, b in zip(trace.events, trace.events[1:]))  # events in time order
    assert [s["seq_len"] for s in trace.steps] == [16, 256, 16]
    capacity = (max(short_peak, max(pinned)) + long_peak) // 2
    with pytest.raises(paging.SimulatedOOM) as err:
        paging.simulate(trace, capacity, paging=False)
    assert trace.events[err.value.index].step == 1
    result = paging.simulate(trace, capacity, paging=True)
    assert result.bytes_to_host > 0 and result.bytes_to_device == result.bytes_to_host
    assert max(result.used) <= capacity


def test_cuda_demo_refuses_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the notebook runs the demo")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        paging_trace.cuda_paging_demo()


@pytest.mark.parametrize("resolution", [0, -1, 0.5])
def test_smallest_capacity_refuses_a_resolution_that_never_ends(resolution):
    trace = paging.MemoryTrace([paging.Event("alloc", 1, 2**20), paging.Event("free", 1)])
    with pytest.raises(ValueError, match=rf"resolution={resolution!r} is not allowed"):
        paging.smallest_capacity(trace, paging=True, resolution=resolution)
