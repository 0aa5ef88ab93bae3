"""Data-parallel QLoRA with torch.distributed: each rank holds its own 4-bit base, only LoRA gradients travel.

Run it under a launcher (`torchrun --nproc_per_node 2 -m qlora_lab.distributed ...` or
`accelerate launch --num_processes 2 --cpu -m qlora_lab.distributed ...`), or from Python with
`qlora_lab.launch.launch()`, which picks a free port, enforces a timeout and turns a dead rank into an error.
`--strategy fsdp` (or an accelerate FSDP config) shards the 4-bit base with FullyShardedDataParallel instead.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from .launch import free_port
from .models import COMPUTE_DTYPES

STRATEGIES = ("ddp", "fsdp")


# ------------------------------------------------------------------------------------------- one rank
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The script's options; batch sizes are global, so runs with 1 and 2 processes see the same rows."""
    p = argparse.ArgumentParser(prog="python -m qlora_lab.distributed", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON result (rank 0 writes it; adapter in .safetensors beside)")
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded model)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder blocks")
    p.add_argument("--method", choices=("qlora", "full"), default="qlora")
    p.add_argument("--strategy", choices=STRATEGIES, default=None, help="default: fsdp under an accelerate "
                   "FSDP config (ACCELERATE_USE_FSDP), else ddp")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--global-batch", type=int, default=4, help="rows per optimizer step over all ranks")
    p.add_argument("--micro-batch", type=int, default=None, help="rows per forward (default: all of a rank's)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--dtype", choices=tuple(COMPUTE_DTYPES), default=None, help="compute dtype (default: bfloat16 on "
                   "CUDA; float32 on CPU, where bf16 matrix products are emulated and slow)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120, help="seconds a collective may wait for a peer")
    p.add_argument("--fail-rank", type=int, default=-1, help="for tests: this rank dies after start-up")
    args = p.parse_args(argv)
    for name in ("steps", "global_batch", "seq_len", "lora_r"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    return args


def token_blocks(n: int, seq_len: int, model_name: str | None = None) -> torch.Tensor:
    """The first n blocks of seq_len tokens of the course's Guanaco text (EOS between rows), in a fixed order."""
    from . import data, models

    tok = models.load_tokenizer(model_name)
    ids: list[int] = []
    for text in data.load_guanaco("embedded", "train")["text"]:
        ids += tok(text)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= n * seq_len:
            return torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    raise ValueError(f"{n} blocks of {seq_len} tokens need {n * seq_len} tokens; the data has {len(ids)}")


def rank_rows(step: int, rank: int, world: int, global_batch: int) -> slice:
    """Rank r's rows of a step: the r-th contiguous slice, so concatenating the ranks gives the global batch."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} does not split evenly over {world} processes")
    per = global_batch // world
    return slice(step * global_batch + rank * per, step * global_batch + (rank + 1) * per)


def fsdp_settings(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The FSDP options `accelerate launch --config_file` passes as FSDP_* variables (defaults: the QLoRA ones)."""
    env = os.environ if env is None else env
    flag = lambda key, default: env.get(key, str(default)).lower() == "true"  # noqa: E731
    return {"sharding_strategy": env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD"),
            "use_orig_params": flag("FSDP_USE_ORIG_PARAMS", False),
            "offload_params": flag("FSDP_OFFLOAD_PARAMS", False),
            "cpu_ram_efficient_loading": flag("FSDP_CPU_RAM_EFFICIENT_LOADING", False),
            "sync_module_states": flag("FSDP_SYNC_MODULE_STATES", True)}


def model_for_rank(args: argparse.Namespace, strategy: str, device: torch.device):
    """This rank's own copy: a 4-bit base (quant storage = compute dtype under FSDP) plus the seeded LoRA init."""
    from . import measure, models

    dtype = COMPUTE_DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    storage = dtype if strategy == "fsdp" else torch.uint8  # FSDP flattens only float tensors of one dtype
    device_map = {"": device.index or 0} if device.type == "cuda" else "cpu"
    model = models.load_model(args.model, quantization="nf4" if args.method == "qlora" else None,
                              compute_dtype=dtype, device_map=device_map, num_hidden_layers=args.layers,
                              quant_storage=storage)
    # Same seed on every rank: the same LoRA A matrices everywhere (B starts at zero), as a 1-process run has.
    return measure.prepare_for_training(model, args.method, lora_r=args.lora_r, gradient_checkpointing=False,
                                       seed=args.seed)


def counting_allreduce_hook(state: dict[str, int], bucket):
    """DDP comm hook: count the values and bytes of each gradient bucket, then all-reduce it as DDP does."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buf = bucket.buffer()
    state["values"] += buf.numel()
    state["bytes"] += buf.numel() * buf.element_size()
    return default_hooks.allreduce_hook(None, bucket)


#: torch.distributed functions FSDP moves weights and gradients with, by the kind of collective.
COLLECTIVES = {"all_gather": "all_gather", "all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather",
               "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter"}


@contextlib.contextmanager
def counting_collectives():
    """Count the bytes FSDP gathers and reduce-scatters, by wrapping torch.distributed's functions meanwhile."""
    import torch.distributed as dist

    counts = {"all_gather": 0, "reduce_scatter": 0}
    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    nbytes = lambda t: sum(x.numel() * x.element_size() for x in (t if isinstance(t, list) else [t]))  # noqa: E731

    def counting(name: str, fn):
        def counted(out, inp, *args, **kwargs):  # the full (unsharded) side: what one rank gathers or reduces
            counts[COLLECTIVES[name]] += max(nbytes(out), nbytes(inp))
            return fn(out, inp, *args, **kwargs)
        return counted
    for name, fn in saved.items():
        setattr(dist, name, counting(name, fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def wrap(model, strategy: str, device: torch.device, comm: dict[str, int]) -> tuple[Any, dict[str, Any]]:
    """DDP with a byte-counting hook (frozen base not broadcast), or FSDP with peft's auto-wrap policy."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if strategy == "ddp":
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)  # each rank loaded its own base
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        ddp.register_comm_hook(comm, counting_allreduce_hook)
        return ddp, {}
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import CPUOffload, FullyShardedDataParallel as FSDP, ShardingStrategy

    s: dict[str, Any] = dict(fsdp_settings(), dropped_on_cpu=[])
    if device.type == "cpu":  # both need a GPU: offload pins host memory, sync broadcasts from GPU memory
        s["dropped_on_cpu"] = [k for k in ("offload_params", "sync_module_states") if s[k]]
        s.update({k: False for k in s["dropped_on_cpu"]})
    net = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=s["use_orig_params"],
               sharding_strategy=ShardingStrategy[s["sharding_strategy"]], device_id=device,
               cpu_offload=CPUOffload(offload_params=s["offload_params"]), sync_module_states=s["sync_module_states"])
    return net, s


def trained_tensors(model, strategy: str) -> dict[str, torch.Tensor]:
    """The trained parameters, full size on every rank (FSDP shards them: gather first, as merging needs)."""
    def grab(m) -> dict[str, torch.Tensor]:
        return {n.replace("_fsdp_wrapped_module.", "").removeprefix("module."): p.detach().cpu().clone()
                for n, p in m.named_parameters() if p.requires_grad}

    if strategy == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False):
            return grab(model)
    return grab(model)


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names and raw bytes: equal hashes mean bit-identical tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _start(args: argparse.Namespace) -> tuple[torch.device, str, int, int]:
    """Join the process group (nccl on GPUs, gloo on CPU): this rank's device, strategy, rank and world size."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.timeout))
    if dist.get_rank() == args.fail_rank:
        raise SystemExit(f"rank {dist.get_rank()}: stopping on purpose (--fail-rank {args.fail_rank})")
    strategy = args.strategy or ("fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else "ddp")
    return device, strategy, dist.get_rank(), dist.get_world_size()


def _steps(net, opt, blocks: torch.Tensor, args: argparse.Namespace, micro: int, strategy: str,
           comm: dict[str, int], device: torch.device) -> tuple[list[float], list[float], list[dict[str, int]]]:
    """The training loop: per step the global mean loss, this rank's seconds and the bytes communicated."""
    import torch.distributed as dist

    from . import measure

    rank, world = dist.get_rank(), dist.get_world_size()
    losses, times, moved = [], [], []
    with counting_collectives() as fsdp_comm:
        for step in range(args.steps):
            start, before = time.perf_counter(), {**comm, **fsdp_comm}
            chunks = blocks[rank_rows(step, rank, world, args.global_batch)].to(device).split(micro)
            total = torch.zeros((), device=device)
            for i, chunk in enumerate(chunks):  # gradient accumulation: DDP syncs only on the last micro-batch
                with net.no_sync() if strategy == "ddp" and i < len(chunks) - 1 else contextlib.nullcontext():
                    loss = net(input_ids=chunk, labels=chunk).loss / len(chunks)  # equal tokens per chunk
                    loss.backward()
                total += loss.detach().float()
            measure.optimizer_step(opt)
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            moved.append({k: v - before[k] for k, v in {**comm, **fsdp_comm}.items()})
            dist.all_reduce(total)
            losses.append(total.item() / world)
            if rank == 0:
                print(f"step {step + 1}/{args.steps} loss {losses[-1]:.4f} {times[-1]:.2f} s", flush=True)
    return losses, times, moved


def train(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train on this rank; rank 0 returns (and writes) the result: losses, step times, bytes, adapter hash."""
    import torch.distributed as dist

    from . import measure

    device, strategy, rank, world = _start(args)
    micro = args.micro_batch or args.global_batch // world
    if args.global_batch % world or (args.global_batch // world) % micro:
        raise ValueError(f"--global-batch {args.global_batch} must split into {world} ranks of whole "
                         f"micro-batches of {micro} rows")
    blocks = token_blocks(args.steps * args.global_batch, args.seq_len, args.model)
    model = model_for_rank(args, strategy, device)
    base_hashes = [None] * world  # nothing broadcasts the base on CPU: prove every rank loaded the same one
    dist.all_gather_object(base_hashes, tensors_hash(dict(model.state_dict())) if device.type == "cpu" else "")
    if len(set(base_hashes)) != 1:
        raise RuntimeError(f"ranks loaded different base weights (hashes {[h[:8] for h in base_hashes]})")
    comm = {"values": 0, "bytes": 0}
    net, fsdp_used = wrap(model, strategy, device, comm)
    opt = measure.make_optimizer([p for p in net.parameters() if p.requires_grad], "adamw", args.lr)
    losses, times, moved = _steps(net, opt, blocks, args, micro, strategy, comm, device)
    tensors = trained_tensors(net, strategy)
    hashes, slowest = [None] * world, torch.tensor(times, device=device)
    dist.all_gather_object(hashes, tensors_hash(tensors))
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    result = {"world_size": world, "strategy": strategy, "method": args.method, "backend": dist.get_backend(),
              "threads": torch.get_num_threads(), "steps": args.steps, "global_batch": args.global_batch,
              "micro_batch": micro, "seq_len": args.seq_len, "dtype": str(model.dtype).replace("torch.", ""),
              "layers": model.config.num_hidden_layers, "losses": losses, "step_seconds": slowest.tolist(),
              "comm_per_step": moved, "trainable": sum(t.numel() for t in tensors.values()),
              "adapter_sha256": hashes[0], "ranks_agree": len(set(hashes)) == 1, "fsdp": fsdp_used,
              "param_bytes_per_rank": sum(p.numel() * p.element_size() for p in net.parameters())}
    if rank == 0:
        from safetensors.torch import save_file

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out.with_suffix(".safetensors")))
        out.write_text(json.dumps(result, indent=1) + "\n")
    dist.destroy_process_group()
    return result if rank == 0 else None


# ------------------------------------------------------------------------------- FSDP + QLoRA invariants
def flat_param_groups(model) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """The parameters each FSDP unit flattens into one tensor under peft's auto-wrap policy (innermost unit owns)."""
    from peft.utils.other import fsdp_auto_wrap_policy

    policy = fsdp_auto_wrap_policy(model)
    units = [""] + [n for n, m in model.named_modules() if n and policy(module=m, recurse=False, nonwrapped_numel=0)]
    groups: dict[str, list] = {u: [] for u in units}
    for name, p in model.named_parameters():
        groups[max((u for u in units if not u or name.startswith(u + ".")), key=len)].append((name, p))
    return {u: ps for u, ps in groups.items() if ps}


def fsdp_invariants(model, compute_dtype: torch.dtype) -> list[str]:
    """What FSDP + QLoRA relies on, checked before wrapping: [] when it holds, else one line per broken rule."""
    import bitsandbytes as bnb

    bad = []
    for name, p in model.named_parameters():
        if isinstance(p, bnb.nn.Params4bit) and p.dtype != compute_dtype:
            bad.append(f"{name}: 4-bit codes stored as {p.dtype}, not the compute dtype {compute_dtype} "
                       "(set bnb_4bit_quant_storage)")
        elif p.requires_grad and p.dtype != compute_dtype:
            bad.append(f"{name}: trainable parameter in {p.dtype}, not the compute dtype {compute_dtype}")
    for unit, params in flat_param_groups(model).items():
        dtypes = {p.dtype for _, p in params}
        if len(dtypes) > 1 or not all(d.is_floating_point for d in dtypes):
            bad.append(f"FSDP unit '{unit or '<root>'}': one flat tensor cannot hold {sorted(map(str, dtypes))}")
        if len({p.requires_grad for _, p in params}) > 1:
            bad.append(f"FSDP unit '{unit or '<root>'}' mixes trainable and frozen parameters "
                       "(use_orig_params=False needs one kind per unit)")
    return bad


@contextlib.contextmanager
def single_process_group():
    """A 1-process gloo group, so FSDP can wrap (and check) a model inside this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    from . import quiet

    quiet()
    train(parse_args())
