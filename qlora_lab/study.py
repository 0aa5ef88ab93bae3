"""QLoRA vs LoRA vs full fine-tuning, measured side by side under one budget (QLoRA paper, Tables 2-4).

Six methods (`qlora_lab.methods`: 16-bit full fine-tuning, 16-bit LoRA and QLoRA with four 4-bit base formats)
train the same model on the same batches for the same number of steps; each run records its losses, step times,
memory and checkpoint size, and the tables put them side by side with ratios to 16-bit LoRA.
"""

from __future__ import annotations

import math
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import data, evaluate, measure, models, nf4
from .checks import is_positive_number, is_whole
from .linear4bit import Frozen4bitLinear
from .measure import OPTIMIZER_CHOICES, make_optimizer
from .methods import LABELS, METHODS, QUANT, QuantCache, StudyError, autocast_for, build_model, check_methods
#: The reference method that ratios are taken against.
REFERENCE = "lora"



# ---------------------------------------------------------------------------------------------- settings
@dataclass
class StudyConfig:
    """One budget for every method: same model, data, batches, steps, LoRA shape and evaluation."""

    methods: Sequence[str] = METHODS
    seeds: Sequence[int] = (0, 1)
    model_name: str | None = None  # None = the embedded SmolLM2-135M-Instruct
    data_source: str = "embedded"
    max_steps: int = 10
    batch_size: int = 4
    max_length: int = 128
    eval_rows: int | None = None  # None = the whole validation split
    eval_batch_size: int = 8
    train_on: str = "assistant"
    lora_r: int = 64
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    lora_lr: float = 2e-3  # every LoRA method (16-bit and 4-bit) uses this one
    full_lr: float = 2e-4  # full fine-tuning moves every weight: a 10x smaller step
    max_grad_norm: float = 0.3
    optim: str = "paged_adamw_32bit"  # qlora.py's; on CPU bitsandbytes keeps its state in ordinary memory
    blocksize: int = 64
    compute_dtype: str = "bfloat16"  # the only one allowed: QLoRA's compute dtype
    num_layers: int | None = None  # None = every block; a number cuts the model short (tests, quick looks)

    def __post_init__(self) -> None:
        check_methods(self.methods)  # before tuple(): a bare string would fall apart into letters
        if not isinstance(self.seeds, (list, tuple)):
            raise StudyError(f"seeds={self.seeds!r}: give a list of distinct integers, e.g. (0, 1)")
        self.methods, self.seeds = tuple(self.methods), tuple(self.seeds)
        self.validate()

    def validate(self) -> None:
        """Reject settings that cannot work, before any model is loaded."""
        check_methods(self.methods)
        if not self.seeds or any(not is_whole(s, 0) for s in self.seeds) \
                or len(set(self.seeds)) != len(self.seeds):
            raise StudyError(f"seeds={self.seeds!r}: give one or more distinct whole numbers >= 0, e.g. (0, 1)")
        for name, low in (("max_steps", 3), ("batch_size", 1), ("max_length", 8), ("eval_batch_size", 1),
                          ("lora_r", 1)):
            value = getattr(self, name)
            if not is_whole(value, low):
                why = " (1 warm-up step, 1 memory step, then timed steps)" if name == "max_steps" else ""
                raise StudyError(f"{name}={value!r}: need a whole number >= {low}{why}")
        for name in ("eval_rows", "num_layers"):
            value = getattr(self, name)
            if value is not None and not is_whole(value, 1):
                raise StudyError(f"{name}={value!r}: need None (all) or a whole number >= 1")
        for name in ("lora_lr", "full_lr", "max_grad_norm", "lora_alpha"):
            value = getattr(self, name)
            if not is_positive_number(value):
                raise StudyError(f"{name}={value!r}: need a finite number > 0")
        if not 0 <= self.lora_dropout < 1:
            raise StudyError(f"lora_dropout={self.lora_dropout!r}: need 0 <= dropout < 1")
        if self.optim not in OPTIMIZER_CHOICES:
            raise StudyError(f"optim={self.optim!r} is not one of {list(OPTIMIZER_CHOICES)}")
        if self.compute_dtype != "bfloat16":  # the paper's; full fine-tuning's autocast uses it too
            raise StudyError(f"compute_dtype={self.compute_dtype!r} is not allowed; the study computes in 'bfloat16'")
        if self.blocksize not in nf4.ALLOWED_BLOCKSIZES:
            raise StudyError(f"blocksize={self.blocksize!r} is not one of {list(nf4.ALLOWED_BLOCKSIZES)}")
        if self.train_on not in ("assistant", "all"):
            raise StudyError(f"train_on={self.train_on!r} is not one of ['assistant', 'all']")

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.compute_dtype)

    def lr(self, method: str) -> float:
        """The learning rate of a method: full_lr for full fine-tuning, lora_lr for every adapter method."""
        return self.full_lr if method == "full" else self.lora_lr


# ---------------------------------------------------------------------------------------------- one run
@dataclass
class RunResult:
    """What one method x seed run measured."""

    method: str
    seed: int
    train_losses: list[float]
    eval_loss: float
    eval_perplexity: float
    initial_eval_loss: float | None
    step_seconds: list[float]
    median_step_s: float
    step_cpu_seconds: list[float]
    median_step_cpu_s: float
    peak_bytes: int
    resident_bytes: int
    transient_peak_bytes: int
    weight_bytes: int
    optimizer_state_bytes: int
    trainable_params: int
    base_params: int
    checkpoint_bytes: int
    lr: float
    memory_method: str = ""
    wall_s: float = 0.0

    @property
    def label(self) -> str:
        return LABELS[self.method]

    @property
    def trainable_share(self) -> float:
        """Trainable parameters as a share of the base model's parameters."""
        return self.trainable_params / self.base_params

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def base_parameter_count(model) -> int:
    """Parameters of the base model (a 4-bit weight counts as the values it holds; LoRA excluded)."""
    quantized = [m for m in model.modules() if isinstance(m, Frozen4bitLinear)]
    packed = {id(m.weight) for m in quantized}
    total = sum(m.in_features * m.out_features for m in quantized)
    return total + sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and id(p) not in packed)


def _step(model, params, batch, opt, max_grad_norm: float) -> float:
    """One optimizer step on one batch: forward (autocast for fp32 models), backward, clip, update."""
    with autocast_for(model):
        loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    measure.optimizer_step(opt)  # quiet about paging falling back to ordinary memory on CPU
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measured_step(model, params, batch, opt, cfg: StudyConfig) -> tuple[float, int, str]:
    """A training step whose transient memory peak is measured (above what was resident when it began)."""
    device = batch["input_ids"].device
    if device.type == "cuda":
        _sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss = _step(model, params, batch, opt, cfg.max_grad_norm)
        _sync(device)
        return loss, torch.cuda.max_memory_allocated(device) - start, "CUDA allocator peak"
    with measure.record_allocations("cpu") as events:
        loss = _step(model, params, batch, opt, cfg.max_grad_norm)
    return loss, max(measure.live_bytes(events), default=0), "torch.profiler allocation events"


def _resident_bytes(model, opt) -> tuple[int, int, int]:
    """(all resident tensor bytes, weights and buffers, optimizer state) between steps."""
    weights = measure.tensor_bytes([*model.parameters(), *model.buffers()])  # tied weights count once
    state = measure.tensor_bytes(measure.optimizer_state_tensors(opt))
    return weights + state, weights, state


def checkpoint_bytes(model, method: str) -> int:
    """Bytes on disk of what a run must ship: the peft adapter file, or the whole model in 16 bits."""
    with tempfile.TemporaryDirectory() as tmp:
        if method == "full":
            from safetensors.torch import save_model

            model.to(torch.bfloat16)  # the run is over: ship a 16-bit checkpoint
            path = Path(tmp) / "model.safetensors"
            save_model(model, str(path))
        else:
            model.save_pretrained(tmp)
            path = Path(tmp) / "adapter_model.safetensors"
        return path.stat().st_size


def _batches(texts: Sequence[str], batch_size: int, steps: int, seed: int) -> list[list[str]]:
    """`steps` batches drawn from a seeded shuffle of the training texts (reshuffled when they run out)."""
    rng = random.Random(seed)
    order: list[str] = []
    batches = []
    for _ in range(steps):
        while len(order) < batch_size:
            more = list(texts)
            rng.shuffle(more)
            order += more
        batches.append(order[:batch_size])
        order = order[batch_size:]
    return batches


def eval_loss(model, tokenizer, texts: Sequence[str], cfg: StudyConfig) -> float:
    """Mean held-out response loss (nats per answer token), computed as the model trains (autocast for fp32)."""
    with autocast_for(model):
        ppl = evaluate.response_perplexity(model, tokenizer, list(texts), max_length=cfg.max_length,
                                           batch_size=cfg.eval_batch_size)
    return math.log(ppl)


def run_one(method: str, seed: int, cfg: StudyConfig, tokenizer, train_texts: Sequence[str],
            eval_texts: Sequence[str], cache: QuantCache | None = None, initial_eval: bool = False) -> RunResult:
    """Train one method with one seed under the study's budget and measure it."""
    start = time.perf_counter()
    model = build_model(method, cfg, seed, cache)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    base_params = base_parameter_count(model)
    initial = eval_loss(model, tokenizer, eval_texts, cfg) if initial_eval else None
    model.train()
    opt = make_optimizer(params, cfg.optim, cfg.lr(method))
    collator = data.GuanacoCollator(tokenizer, max_length=cfg.max_length, train_on=cfg.train_on)
    torch.manual_seed(seed)  # LoRA dropout masks
    losses, times, cpu_times = [], [], []
    peak = resident = weights = state = transient = 0
    how = ""
    for step, texts in enumerate(_batches(train_texts, cfg.batch_size, cfg.max_steps, seed)):
        batch = {k: v.to(device) for k, v in collator(texts).items()}
        if step == 1:  # the optimizer state exists from step 1 on: this step shows the steady-state peak
            resident, weights, state = _resident_bytes(model, opt)
            loss, transient, how = _measured_step(model, params, batch, opt, cfg)
            peak = resident + transient
        else:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            loss = _step(model, params, batch, opt, cfg.max_grad_norm)
            _sync(device)
            if step >= 2:  # step 0 warms up (allocations, lazy init)
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)  # all threads; not inflated by waiting for a core
        if not math.isfinite(loss):
            raise FloatingPointError(f"{method} seed {seed}: training loss became {loss} at step {step}; "
                                     f"lower the learning rate (now {cfg.lr(method)})")
        losses.append(loss)
    final = eval_loss(model, tokenizer, eval_texts, cfg)
    trainable = sum(p.numel() for p in params)
    size = checkpoint_bytes(model, method)
    del model, opt, params
    return RunResult(method=method, seed=seed, train_losses=losses, eval_loss=final,
                     eval_perplexity=math.exp(final), initial_eval_loss=initial, step_seconds=times,
                     median_step_s=statistics.median(times), step_cpu_seconds=cpu_times,
                     median_step_cpu_s=statistics.median(cpu_times), peak_bytes=peak, resident_bytes=resident,
                     transient_peak_bytes=transient, weight_bytes=weights, optimizer_state_bytes=state,
                     trainable_params=trainable, base_params=base_params, checkpoint_bytes=size,
                     lr=cfg.lr(method), memory_method=how, wall_s=time.perf_counter() - start)


def model_config(model_name: str | None = None):
    """The transformers config of the study's model (for the memory estimator), without loading weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(models.resolve(model_name))


def load_texts(cfg: StudyConfig) -> tuple[list[str], list[str]]:
    """Training texts and held-out (validation) texts in Guanaco format."""
    train = list(data.load_guanaco(cfg.data_source, "train")["text"])
    held_out = list(data.load_guanaco(cfg.data_source, "validation")["text"])
    if cfg.eval_rows is not None:
        held_out = held_out[: cfg.eval_rows]
    return train, held_out


def run_study(cfg: StudyConfig, progress: bool = True, cache: QuantCache | None = None,
              on_result: Callable[[RunResult], None] | None = None) -> list[RunResult]:
    """Every method with every seed; the first seed of each method also scores the untrained model."""
    cfg.validate()
    tokenizer = models.load_tokenizer(cfg.model_name)
    train_texts, eval_texts = load_texts(cfg)
    cache = cache if cache is not None else QuantCache()
    results = []
    for method in cfg.methods:
        for i, seed in enumerate(cfg.seeds):
            result = run_one(method, seed, cfg, tokenizer, train_texts, eval_texts, cache, initial_eval=i == 0)
            results.append(result)
            if progress:
                print(f"{LABELS[method]:>13} seed {seed}: held-out loss {result.eval_loss:.4f}, "
                      f"median step {result.median_step_s:.2f} s ({result.median_step_cpu_s:.2f} CPU s), "
                      f"peak {result.peak_bytes / 2**20:,.0f} MiB, run {result.wall_s:.0f} s", flush=True)
            if on_result:
                on_result(result)
        later = cfg.methods[cfg.methods.index(method) + 1:]
        if method in QUANT and not any(QUANT[method][0] == QUANT.get(m, ("",))[0] for m in later):
            cache.pop((QUANT[method][0], cfg.blocksize), None)  # no later method needs this code: free it
    return results


# ------------------------------------------------------------------------------------------------ tables
def runs_table(results: Sequence[RunResult]):
    """One row per run (pandas DataFrame)."""
    import pandas as pd

    rows = [{"method": r.label, "seed": r.seed, "held-out loss": r.eval_loss, "perplexity": r.eval_perplexity,
             "median step s": r.median_step_s, "median step CPU s": r.median_step_cpu_s,
             "peak MiB": r.peak_bytes / 2**20, "trainable params": r.trainable_params,
             "checkpoint bytes": r.checkpoint_bytes}
            for r in results]
    return pd.DataFrame(rows)


def summary_table(results: Sequence[RunResult], reference: str = REFERENCE):
    """Per method: mean and spread over seeds, and ratios of memory and step time to the reference method."""
    import pandas as pd

    methods = [m for m in METHODS if any(r.method == m for r in results)]
    by = {m: [r for r in results if r.method == m] for m in methods}
    if reference not in by:
        raise StudyError(f"reference={reference!r} has no runs; the results hold {methods}")
    ref_mem = statistics.mean(r.peak_bytes for r in by[reference])
    ref_time = statistics.mean(r.median_step_s for r in by[reference])
    ref_cpu = statistics.mean(r.median_step_cpu_s for r in by[reference])
    ref_loss = statistics.mean(r.eval_loss for r in by[reference])
    rows = []
    for m in methods:
        runs = by[m]
        losses = [r.eval_loss for r in runs]
        mem = statistics.mean(r.peak_bytes for r in runs)
        step = statistics.mean(r.median_step_s for r in runs)
        cpu = statistics.mean(r.median_step_cpu_s for r in runs)
        rows.append({
            "method": LABELS[m], "seeds": len(runs),
            "loss mean": statistics.mean(losses), "loss min": min(losses), "loss max": max(losses),
            "loss - LoRA": statistics.mean(losses) - ref_loss,
            "loss before": runs[0].initial_eval_loss,
            "trainable params": runs[0].trainable_params, "trainable %": 100 * runs[0].trainable_share,
            "peak MiB": mem / 2**20, "memory / LoRA": mem / ref_mem,
            "step s": step, "step / LoRA": step / ref_time, "step CPU s": cpu, "CPU step / LoRA": cpu / ref_cpu,
            "checkpoint MB": runs[0].checkpoint_bytes / 1e6,
        })
    return pd.DataFrame(rows).set_index("method")
