"""bf16 matrix products on CPUs without bf16 units: multiplied in float32 and rounded once to bf16.

torch computes a bf16 matrix product on such a CPU (AVX2 only) with a generic loop, 10-15x slower than float32.
bf16 hardware (GPU tensor cores, AVX512-BF16, AMX) multiplies bf16 inputs exactly, accumulates in float32 and
rounds the result once; so does this, with float32's fast kernels. Only the summation order can differ, which
moves a result by at most about one bf16 rounding step. Everything else (weights, activations, gradients,
optimizer state) keeps its dtype. The float32 copies live only during one product; where the course measures
memory (measure.record_allocations) torch computes bf16 itself, so measurements show what bf16 allocates.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

_aten = torch.ops.aten
#: The matrix products of a transformer's forward and backward (linear layers, LoRA, attention scores).
PRODUCTS = frozenset({_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default})
#: Set to "native" to let torch compute bf16 products itself (to time the difference, or on a bf16 CPU).
ENV = "QLORA_LAB_BF16"

_mode: "Float32Products | None" = None


def _all_cpu_bf16(args) -> bool:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return bool(tensors) and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)


def _python_kernel(func):
    """The Python body of a custom op whose products we must see (bitsandbytes' 4-bit matmul on such CPUs)."""
    if func.namespace != "bitsandbytes" or func.__name__ != "gemm_4bit.default":
        return None
    try:  # bitsandbytes computes it as dequantize + F.linear; as a custom op, its inner ops would bypass the mode
        from bitsandbytes.backends.default.ops import _gemm_4bit_default_impl
    except ImportError:  # pragma: no cover - another bitsandbytes layout
        return None
    return _gemm_4bit_default_impl


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear as torch's own decomposition computes it: flatten the leading dimensions, then one product."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.addmm(bias, flat, weight.t()) if bias is not None else torch.mm(flat, weight.t())
    return out.view(*x.shape[:-1], weight.shape[0])


class Float32Products(TorchDispatchMode):
    """Route bf16 CPU matrix products through float32 kernels; every other op runs as it is."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kernel = _python_kernel(func) if getattr(func, "namespace", "") == "bitsandbytes" else None
        if kernel is not None and _all_cpu_bf16(args[:1]):
            with self:  # run its body with the products in float32, exactly like our own 4-bit layer's
                return kernel(*args, **kwargs)
        if func is _aten.linear.default and _all_cpu_bf16(args):  # seen undecomposed inside custom ops
            with self:  # as torch decomposes it (flatten, then mm / addmm), so both routes give the same bits
                return _linear(*args, **kwargs)
        if func in PRODUCTS and _all_cpu_bf16(args):
            wide = [_widen(a) if isinstance(a, torch.Tensor) else a for a in args]
            out = _wide_empty(_product_shape(func, wide))
            func.overloadpacket.out(*wide, **kwargs, out=out)
            return out.to(torch.bfloat16)
        return func(*args, **kwargs)


def _product_shape(func, args) -> tuple[int, ...]:
    """The result shape of mm / addmm (bias first) / bmm / baddbmm (input first)."""
    a, b = (args[1], args[2]) if func in (_aten.addmm.default, _aten.baddbmm.default) else (args[0], args[1])
    return (*a.shape[:-1], b.shape[-1])


#: While memory is being recorded: the (address, bytes) of every float32 temporary, in the order they are made.
_temporaries: list[tuple[int, int]] | None = None


def _note(t: torch.Tensor) -> None:
    if _temporaries is not None:
        _temporaries.append((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))


#: Extra float32 elements in every temporary: a byte count no tensor of the model has, so that the recorded
#: allocations of the temporaries cannot be mistaken for the model's own (say, a float32 copy of the same shape).
PAD = 3


def _wide_empty(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 buffer of this shape (noted while memory is recorded)."""
    n = math.prod(shape)
    buffer = torch.empty(n + PAD, dtype=torch.float32)
    _note(buffer)
    return buffer[:n].view(shape)


def _widen(t: torch.Tensor) -> torch.Tensor:
    """A contiguous float32 copy of a bf16 operand (made once per weight inside `reused_weights`)."""
    copies = _reused.get(t.untyped_storage().data_ptr()) if _reused else None
    if copies is None:
        return _wide_empty(tuple(t.shape)).copy_(t)
    key = (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t._version)  # _version: changed by any write
    if key not in copies:
        copies[key] = _wide_empty(tuple(t.shape)).copy_(t)
    return copies[key]


#: Inside `reused_weights`: the storage address of every bf16 weight of its models -> their float32 copies so far.
_reused: dict[int, dict[tuple, torch.Tensor]] | None = None


@contextlib.contextmanager
def reused_weights(*modules: torch.nn.Module):
    """Widen each bf16 weight of these models once for the block, not at every product (inference only).

    Generating a reply multiplies by the same weights at every new token, and widening them each time took about
    a third of the time. The copies hold the same float32 values, so every product and every result is unchanged
    bit for bit; they cost 4 bytes per bf16 weight while the block runs. A weight written to inside the block
    (its version changes) is widened again.
    """
    global _reused
    if _mode is None or _reused is not None:
        yield
        return
    _reused = {t.untyped_storage().data_ptr(): {} for m in modules for t in (*m.parameters(), *m.buffers())
               if t.dtype == torch.bfloat16 and t.device.type == "cpu"}
    try:
        yield
    finally:
        _reused = None


@contextlib.contextmanager
def temporaries_noted():
    """Note the float32 temporaries made inside (measure.record_allocations leaves them out: bf16 has none)."""
    global _temporaries
    outer, _temporaries = _temporaries, []
    try:
        yield _temporaries
    finally:
        _temporaries = outer if outer is None else outer + _temporaries


def without_temporaries(events: list[tuple[int, int, int]], temporaries: list[tuple[int, int]]
                        ) -> list[tuple[int, int, int]]:
    """Allocation events (time, address, +-bytes) minus the noted temporaries' allocations and frees.

    The temporaries were made in program order, so they are matched in that order: the next allocation at a
    noted address and size is the noted one, and the next free of that address is its free.
    """
    pending = list(reversed(temporaries))
    live: dict[int, int] = {}
    kept = []
    for event in events:
        _, address, size = event
        if size > 0 and pending and pending[-1] == (address, size):
            pending.pop()
            live[address] = size
        elif size < 0 and live.get(address) == -size:
            del live[address]
        else:
            kept.append(event)
    if pending:
        raise RuntimeError(f"{len(pending)} float32 temporaries of bf16 products were not found among the recorded "
                           "allocations; set QLORA_LAB_BF16=native to measure with torch's own bf16 products")
    return kept


def cpu_has_fast_bf16() -> bool:
    """True where torch multiplies bf16 quickly itself (its oneDNN bf16 path: AVX-512 or newer)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch built without oneDNN
        return False


def needed() -> bool:
    """Use float32 products only where they help: no CUDA, no fast bf16 on this CPU, not switched off."""
    return os.environ.get(ENV, "") != "native" and not torch.cuda.is_available() and not cpu_has_fast_bf16()


def enable() -> bool:
    """Turn the float32 products on for this thread (once); returns whether they are on."""
    global _mode
    if _mode is None and needed():
        _mode = Float32Products()
        _mode.__enter__()
    return _mode is not None


def active() -> bool:
    """Whether bf16 products are being computed in float32 here."""
    return _mode is not None


def has_bf16(module: torch.nn.Module) -> bool:
    """Whether any parameter or buffer of a model is bf16 (only then can its products be bf16)."""
    return any(t.dtype == torch.bfloat16 for t in (*module.parameters(), *module.buffers()))


def bf16_autocast_on() -> bool:
    """Whether CPU autocast is on with bf16: a float32 model then computes its products in bf16."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


@contextlib.contextmanager
def off_for(*modules: torch.nn.Module, bf16_autocast: bool = False):
    """Step aside while models with no bf16 tensors run: the mode's per-op Python call costs 20-30 % there.

    Only when it is the sole mode active (a memory recorder or another mode on the stack keeps it on), and not
    while bf16 autocast is on or will be turned on inside (`bf16_autocast=True`, e.g. a Trainer with bf16=True):
    there a float32 model's products are bf16, and torch's own are 3-4x slower on such a CPU.
    """
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    if _mode is None or _get_current_dispatch_mode_stack() != [_mode] or bf16_autocast or bf16_autocast_on() \
            or any(has_bf16(m) for m in modules):
        yield
        return
    with _disable_current_modes():
        yield


@contextlib.contextmanager
def native():
    """Let torch compute bf16 products itself inside the block (to time or compare the difference)."""
    with _disable_current_modes():
        yield
