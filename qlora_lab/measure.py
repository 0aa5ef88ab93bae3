"""Training memory measured: a real training step, accounted tensor by tensor, to check `qlora_lab.memory`.

On CPU, torch's profiler records every allocation and free (`record_allocations`); on CUDA, the allocator's own
counters. Parameters, gradients, optimizer state and activations are told apart by which tensors they are.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch

from .checks import require_choice
from .memory import ESTIMATOR_METHODS, OPTIMIZER_STATE, PAGED_MIN_SIZE, MemoryBreakdown

@contextlib.contextmanager
def _quiet_native_stderr():
    """Kineto writes start/stop lines and an allocator notice straight to fd 2; keep them out of notebooks."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def record_allocations(device: str = "cpu"):
    """Record every allocation and free of `device`'s allocator: yields a list filled with (ns, address, ±bytes).

    The float32 copies that bf16_cpu makes for a bf16 product are left out: bf16 hardware never allocates them.
    """
    from torch.profiler import ProfilerActivity, profile

    from . import bf16_cpu

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    events: list[tuple[int, int, int]] = []
    with bf16_cpu.temporaries_noted() as temporaries, _quiet_native_stderr(), \
            profile(activities=activities, profile_memory=True) as prof:
        yield events
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        f = e.extra_fields
        if type(f).__name__ == "_ExtraFields_Allocation" and f.device.type == torch.device(device).type:
            events.append((e.start_time_ns, f.ptr, f.alloc_size))
        stack.extend(e.children)
    events.sort()
    events[:] = bf16_cpu.without_temporaries(events, temporaries)


def live_bytes(events: list[tuple[int, int, int]], exclude: set[int] | None = None) -> list[int]:
    """Bytes alive after each event; allocations still alive at the end at an `exclude` address are skipped."""
    exclude = exclude or set()
    live: dict[int, int] = {}
    for i, (_, ptr, size) in enumerate(events):
        if size > 0:
            live[ptr] = i
        else:
            live.pop(ptr, None)
    skip = {i for ptr, i in live.items() if ptr in exclude}
    owner: dict[int, int] = {}
    cur, out = 0, []
    for i, (_, ptr, size) in enumerate(events):
        if size > 0:
            owner[ptr] = i
            cur += 0 if i in skip else size
        elif ptr in owner:  # frees of blocks allocated before recording started are not ours to count
            cur += 0 if owner.pop(ptr) in skip else size
        out.append(cur)
    return out


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors` (shared quantization maps count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if torch.is_tensor(t) and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def parameter_bytes(model) -> dict[str, int]:
    """Weights, quantization constants and trainable LoRA weights a model holds, in bytes."""
    from .models import quant_state_bytes

    out = {"weights": 0, "quant_constants": 0, "lora_weights": 0}
    for name, p in model.named_parameters():
        key = "lora_weights" if ("lora_" in name and p.requires_grad) else "weights"
        out[key] += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            out["quant_constants"] += quant_state_bytes(state)
    out["weights"] += sum(b.numel() * b.element_size() for b in model.buffers())
    return out


#: Every optimizer name make_optimizer takes: torch's AdamW, or a bitsandbytes AdamW by its transformers name.
OPTIMIZER_CHOICES = ("adamw_torch", *OPTIMIZER_STATE)


def make_optimizer(params, optimizer: str = "adamw", lr: float = 2e-4):
    """AdamW as qlora.py sets it (beta2 0.999, no weight decay): torch's, or bitsandbytes' 32/8-bit, plain or paged."""
    require_choice("optimizer", optimizer, OPTIMIZER_CHOICES)
    if optimizer == "adamw_torch":  # its moments take the parameter dtype: bf16 moments for bf16 adapters
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    import bitsandbytes as bnb

    bits, paged = OPTIMIZER_STATE[optimizer]
    cls = {(32, False): bnb.optim.AdamW32bit, (8, False): bnb.optim.AdamW8bit,
           (32, True): bnb.optim.PagedAdamW32bit, (8, True): bnb.optim.PagedAdamW8bit}[(bits, paged)]
    return cls(params, lr=lr, weight_decay=0.0)


@contextlib.contextmanager
def quiet_cpu_paging():
    """Silence bitsandbytes' per-tensor notice that paged state falls back to ordinary memory on CPU."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        yield


def optimizer_step(opt) -> None:
    """One optimizer step, without the CPU paging notice."""
    with quiet_cpu_paging():
        opt.step()


def allocate_optimizer_state(opt) -> None:
    """Have a bitsandbytes optimizer allocate every parameter's state as its first step() does, minus the update."""
    with quiet_cpu_paging():
        for gindex, group in enumerate(opt.param_groups):
            for pindex, p in enumerate(group["params"]):
                if not opt.state[p]:
                    opt.init_state(group, p, gindex, pindex)


def optimizer_state_tensors(opt) -> list[torch.Tensor]:
    """Every tensor an optimizer keeps between steps."""
    return [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]


def prepare_for_training(model, method: str, *, lora_r: int = 64, lora_targets: str | list[str] = "all-linear",
                         lora_dropout: float = 0.0, lora_alpha: float = 16, gradient_checkpointing: bool = True,
                         seed: int = 0):
    """Make a loaded model trainable as `method` does; LoRA adapters in the compute dtype, as qlora.py casts them."""
    require_choice("method", method, ESTIMATOR_METHODS)
    is_4bit = bool(getattr(model, "is_loaded_in_4bit", False))
    if (method == "qlora") != is_4bit:
        raise ValueError(f"method={method!r} with a model {'loaded in 4 bits' if is_4bit else 'in 16 bits'}: "
                         "qlora needs load_model(quantization='nf4'); full and lora need a 16-bit model")
    torch.manual_seed(seed)
    dtype = model.get_input_embeddings().weight.dtype
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        trainable = model
    else:
        from .models import add_lora_adapters

        trainable = add_lora_adapters(model, lora_r, lora_alpha, lora_dropout, lora_targets, adapter_dtype=dtype)
    if gradient_checkpointing:
        model.activation_checkpointing_enable()  # also makes the embeddings' output require grad
    trainable.train()
    return trainable


def _as_batch(batch) -> dict[str, torch.Tensor]:
    """Accept a LongTensor of token ids or a dict with input_ids; labels default to the inputs."""
    if torch.is_tensor(batch):
        batch = {"input_ids": batch}
    if not isinstance(batch, dict) or "input_ids" not in batch or batch["input_ids"].dim() != 2:
        raise ValueError("batch must be a (batch, seq) LongTensor of token ids or a dict with 'input_ids' of "
                         f"that shape; got {type(batch).__name__}")
    if batch["input_ids"].numel() == 0:
        raise ValueError("batch is empty (0 tokens); give at least one sequence of at least 2 tokens")
    return {**batch, "labels": batch.get("labels", batch["input_ids"])}


def measure_training_memory(model, batch, *, optimizer: str = "adamw", lr: float = 2e-4) -> MemoryBreakdown:
    """Run one real training step and account its memory: parameters, gradients, optimizer state, peak activations."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; call prepare_for_training(model, method) first")
    batch = _as_batch(batch)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    opt = make_optimizer(params, optimizer, lr)
    out = MemoryBreakdown(**parameter_bytes(model))
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        _measure_cuda(model, batch, opt, params, out)
    else:
        _measure_cpu(model, batch, opt, params, out)
    out.total += out.weights + out.quant_constants + out.lora_weights + out.optimizer_state
    return out


def _measure_cpu(model, batch, opt, params, out: MemoryBreakdown) -> None:
    """Profiler allocation events: activations = peak of what forward+backward allocates, gradients excluded."""
    with record_allocations("cpu") as fb:
        model(**batch).loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    grad_ptrs = {g.untyped_storage().data_ptr() for g in grads}
    out.gradients = tensor_bytes(grads)
    out.activations = max(live_bytes(fb, exclude=grad_ptrs), default=0)
    with record_allocations("cpu") as st:
        optimizer_step(opt)
    state = optimizer_state_tensors(opt)
    out.optimizer_state = tensor_bytes(state)
    _paged_share(opt, out)
    out.optimizer_temporaries = max(live_bytes(st, exclude={t.untyped_storage().data_ptr() for t in state}),
                                    default=0)
    out.total = max(max(live_bytes(fb), default=0), out.gradients)
    model.zero_grad(set_to_none=True)
    out.assumptions.append("CPU: torch.profiler allocation events of one forward+backward and one optimizer step; "
                           "activations = peak bytes allocated in forward+backward that are not gradients")
    out.assumptions.append("total = resident weights and optimizer state + the forward+backward peak; the CPU "
                           "optimizer's float32 scratch copies are reported apart as optimizer_temporaries "
                           "(bitsandbytes' CUDA kernels update in place)")


def _measure_cuda(model, batch, opt, params, out: MemoryBreakdown) -> None:
    """Allocator peaks of the second of two steps (the first creates the optimizer state)."""
    for _ in range(2):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model(**batch).loss.backward()
        torch.cuda.synchronize()
        fb_peak = torch.cuda.max_memory_allocated() - base
        out.gradients = tensor_bytes(p.grad for p in params if p.grad is not None)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        optimizer_step(opt)
        torch.cuda.synchronize()
        step_extra = torch.cuda.max_memory_allocated() - before
        model.zero_grad(set_to_none=True)
    out.optimizer_state = tensor_bytes(optimizer_state_tensors(opt))
    _paged_share(opt, out)
    out.activations = max(fb_peak - out.gradients, 0)
    out.optimizer_temporaries = max(step_extra, 0)
    out.total = fb_peak
    out.assumptions.append("CUDA: torch.cuda.max_memory_allocated over the second step; activations = "
                           "forward+backward peak minus all gradients (a lower bound if not all were alive then); "
                           "paged optimizer state lives in unified memory, outside the allocator's counts")


def _paged_share(opt, out: MemoryBreakdown) -> None:
    """Optimizer state a paged bitsandbytes optimizer would place in unified memory (tensors >= 1e5 elements)."""
    if getattr(opt, "is_paged", False):
        out.pageable = tensor_bytes(t for p, s in opt.state.items() if p.numel() >= PAGED_MIN_SIZE
                                     for t in s.values() if torch.is_tensor(t) and t.numel() == p.numel())


