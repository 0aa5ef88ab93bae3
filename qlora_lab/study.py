"""QLoRA vs LoRA vs full fine-tuning, measured side by side under one budget (QLoRA paper, Tables 2-4).

Six methods train the same model on the same batches for the same number of steps:
16-bit full fine-tuning, 16-bit LoRA and QLoRA with four 4-bit base formats (NF4 + double quantization,
NF4, FP4, Int4). bitsandbytes has no Int4 kernel, so every 4-bit variant uses the same frozen layer,
`qlora_lab.linear4bit.Frozen4bitLinear`, and only its 16-value code changes. `fair_check` proves the NF4+DQ
variant gives the bitsandbytes + peft loss on one batch.
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import data, evaluate, measure, memory, models, nf4
from .linear4bit import Frozen4bitLinear, install_4bit, quantize_linears

#: The methods a study can run, in table order.
METHODS = ("full", "lora", "qlora_nf4_dq", "qlora_nf4", "qlora_fp4", "qlora_int4")
LABELS = {"full": "16-bit full", "lora": "16-bit LoRA", "qlora_nf4_dq": "QLoRA NF4+DQ",
          "qlora_nf4": "QLoRA NF4", "qlora_fp4": "QLoRA FP4", "qlora_int4": "QLoRA Int4"}
#: 4-bit methods -> (code, double quantization of the absmax constants).
QUANT = {"qlora_nf4_dq": ("nf4", True), "qlora_nf4": ("nf4", False), "qlora_fp4": ("fp4", False),
         "qlora_int4": ("int4", False)}
#: Optimizers: a bitsandbytes AdamW by its transformers name (qlora.py: paged_adamw_32bit), or torch's AdamW
#: (which keeps its moments in the parameter dtype: bf16 moments for bf16 adapters).
OPTIMIZERS = ("adamw_torch", *memory.OPTIMIZERS)
#: The reference method that ratios are taken against.
REFERENCE = "lora"


class StudyError(ValueError):
    """A study setting that cannot work; the message names the value and what is allowed."""


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
        if not self.seeds or any(not isinstance(s, int) or isinstance(s, bool) for s in self.seeds) \
                or len(set(self.seeds)) != len(self.seeds):
            raise StudyError(f"seeds={self.seeds!r}: give one or more distinct integers, e.g. (0, 1)")
        for name, low in (("max_steps", 3), ("batch_size", 1), ("max_length", 8), ("eval_batch_size", 1),
                          ("lora_r", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                why = " (1 warm-up step, 1 memory step, then timed steps)" if name == "max_steps" else ""
                raise StudyError(f"{name}={value!r}: need a whole number >= {low}{why}")
        for name in ("eval_rows", "num_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise StudyError(f"{name}={value!r}: need None (all) or a whole number >= 1")
        for name in ("lora_lr", "full_lr", "max_grad_norm", "lora_alpha"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise StudyError(f"{name}={value!r}: need a finite number > 0")
        if not 0 <= self.lora_dropout < 1:
            raise StudyError(f"lora_dropout={self.lora_dropout!r}: need 0 <= dropout < 1")
        if self.optim not in OPTIMIZERS:
            raise StudyError(f"optim={self.optim!r} is not one of {list(OPTIMIZERS)}")
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


def check_methods(methods: Sequence[str]) -> None:
    """Every method must be one the runner knows; the error lists them."""
    if isinstance(methods, str) or not methods:
        raise StudyError(f"methods={methods!r}: give a list of one or more of {list(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise StudyError(f"Unknown method(s) {unknown}; allowed: {list(METHODS)}")
    if len(set(methods)) != len(methods):
        raise StudyError(f"methods={list(methods)!r} lists a method twice")


# ------------------------------------------------------------------------------------------------ models
def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base(model_name: str | None, dtype: torch.dtype, layers: int | None = None, quantization: str | None = None):
    """The base model in `dtype` (or through bitsandbytes), optionally cut to its first `layers` blocks."""
    model = models.load_model(model_name, quantization=quantization, compute_dtype=dtype, num_hidden_layers=layers)
    if quantization is None:
        model.to(_device())
    return model


def with_lora(model, cfg: StudyConfig, seed: int):
    """peft LoRA on every linear layer but the head (r, alpha, dropout from cfg), adapters in the compute dtype."""
    torch.manual_seed(seed)  # the seed picks the A matrices
    return models.add_lora_adapters(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, "all-linear",
                                    adapter_dtype=cfg.dtype)


class QuantCache(dict):
    """Quantized base weights per 4-bit code, made once and shared by every seed (and by NF4 and NF4+DQ)."""

    def get_for(self, model, quant_type: str, blocksize: int) -> dict[str, nf4.Quantized4bit]:
        """The cached 4-bit weights of this code and block size (one cache serves one base model)."""
        key = (quant_type, blocksize)
        if key not in self:
            self[key] = quantize_linears(model, quant_type, blocksize)
        return self[key]


def build_model(method: str, cfg: StudyConfig, seed: int, cache: QuantCache | None = None):
    """The trainable model of a method: fp32 master weights for full, frozen 16/4-bit base + LoRA otherwise."""
    check_methods([method])
    if method == "full":
        # Mixed precision: float32 master weights, bf16 compute under autocast. Pure-bf16 weights would lose
        # most Adam updates (an update of ~lr is below half a bf16 step of a typical weight).
        model = load_base(cfg.model_name, torch.float32, cfg.num_layers)
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        return model
    model = load_base(cfg.model_name, cfg.dtype, cfg.num_layers)
    if method in QUANT:
        model = build_with_base(model, method, cfg, seed, cache if cache is not None else QuantCache())
    else:
        model = with_lora(model, cfg, seed)
    model.train()
    return model


def autocast_for(model) -> contextlib.AbstractContextManager:
    """bf16 autocast for a float32 (full fine-tuning) model; nothing for models already in 16 bits."""
    param = next(model.parameters())
    if param.dtype == torch.float32:
        return torch.autocast(param.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(params: list[torch.nn.Parameter], name: str, lr: float):
    """AdamW (beta2 0.999, no weight decay, as qlora.py): torch's, or bitsandbytes' by its transformers name."""
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    return measure.make_optimizer(params, name, lr)


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

    return AutoConfig.from_pretrained(models._resolve(model_name))


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


# -------------------------------------------------------------------------------------------- fair check
@dataclass
class FairCheck:
    """Our NF4+DQ layer + peft against bitsandbytes' Linear4bit + peft, same LoRA weights, one batch."""

    loss_ours: float
    loss_bnb: float
    max_logit_diff: float
    max_grad_rel_diff: float
    layers: int
    layers_same_bytes: int
    tolerance: float
    device: str
    other: dict[str, float] = field(default_factory=dict)

    @property
    def loss_diff(self) -> float:
        return abs(self.loss_ours - self.loss_bnb)

    @property
    def passed(self) -> bool:
        return self.loss_diff <= self.tolerance and self.layers_same_bytes == self.layers


#: Allowed |loss difference| in the fair check. On CPU both paths run F.linear on bit-identical bf16 weights,
#: so the losses agree exactly (0 allowed beyond float32 printing noise); on CUDA bitsandbytes may use a fused
#: 4-bit GEMM that sums in another order, which moves a bf16 loss by about one bf16 step of the logits.
FAIR_TOLERANCE = {"cpu": 1e-6, "cuda": 2e-2}


def _bnb_state(layer) -> tuple[torch.Tensor, Any]:
    return layer.weight.data, layer.weight.quant_state


def _same_bytes(ours: Frozen4bitLinear, bnb_layer) -> bool:
    """Packed codes and every double-quantization constant identical to bitsandbytes'."""
    packed, state = _bnb_state(bnb_layer)
    return (torch.equal(ours.weight.data.view(-1), packed.view(-1)) and torch.equal(ours.absmax_codes, state.absmax)
            and torch.equal(ours.absmax2, state.state2.absmax) and torch.equal(ours.absmax_offset.reshape(()),
                                                                                 state.offset.reshape(())))


def _loss_and_grads(model, batch) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(out.loss.detach()), out.logits.detach().float(), grads


def _randomize_lora_b(model, seed: int, std: float = 0.01) -> None:
    """Seeded non-zero B matrices, so the adapters change the output and both A and B get gradients."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def fair_check(cfg: StudyConfig | None = None, seed: int = 0, rows: int = 4,
               compare: Sequence[str] = ("qlora_nf4", "qlora_fp4"), cache: QuantCache | None = None) -> FairCheck:
    """Loss and LoRA gradients of our NF4+DQ model vs the transformers + bitsandbytes + peft model on one batch.

    The adapters get seeded random A and B (B is zero at the start of training, which would leave the adapters
    out of the loss), copied from our model into theirs. LoRA dropout is 0 in both (its masks are random),
    everything else is the study's setting. `compare`
    lists other 4-bit variants whose loss against the same bitsandbytes model is also reported: they must
    differ by far more than the tolerance, or the check could not tell formats apart. Pass the study's
    `cache` to reuse the quantized weights.
    """
    cfg = replace(cfg or StudyConfig(), lora_dropout=0.0)
    tokenizer = models.load_tokenizer(cfg.model_name)
    texts, _ = load_texts(cfg)
    device = _device()
    collator = data.GuanacoCollator(tokenizer, max_length=cfg.max_length, train_on=cfg.train_on)
    batch = {k: v.to(device) for k, v in collator(texts[:rows]).items()}

    layers = cfg.num_layers
    cache = cache if cache is not None else QuantCache()
    ours = build_with_base(load_base(cfg.model_name, cfg.dtype, layers), "qlora_nf4_dq", cfg, seed, cache)
    _randomize_lora_b(ours, seed)  # B = 0 would leave the adapters out of the loss (and A without gradient)
    theirs = with_lora(load_base(cfg.model_name, cfg.dtype, layers, quantization="nf4"), cfg, seed)
    lora_state = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    missing = theirs.load_state_dict(lora_state, strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"LoRA weights do not line up with the bitsandbytes model: {missing.unexpected_keys[:3]}")
    ours.train()
    theirs.train()
    loss_a, logits_a, grads_a = _loss_and_grads(ours, batch)
    loss_b, logits_b, grads_b = _loss_and_grads(theirs, batch)
    rel = max(float((grads_a[n] - grads_b[n]).abs().max() / grads_b[n].abs().max().clamp(min=1e-30))
              for n in grads_b)
    bnb_modules = dict(theirs.named_modules())
    pairs = [(n, m) for n, m in ours.named_modules() if isinstance(m, Frozen4bitLinear)]
    same = sum(_same_bytes(m, bnb_modules[n]) for n, m in pairs)
    other = {}
    del theirs, bnb_modules
    for method in compare:
        variant = build_with_base(load_base(cfg.model_name, cfg.dtype, layers), method, cfg, seed, cache)
        variant.load_state_dict(lora_state, strict=False)
        variant.train()
        other[method] = _loss_and_grads(variant, batch)[0]
        del variant
    return FairCheck(loss_a, loss_b, float((logits_a - logits_b).abs().max()), rel, len(pairs), same,
                     FAIR_TOLERANCE[device.type], device.type, other)


def build_with_base(base, method: str, cfg: StudyConfig, seed: int, cache: QuantCache):
    """A 4-bit method built on an already loaded 16-bit base (the fair check cuts the model short)."""
    quant_type, double_quant = QUANT[method]
    install_4bit(base, cache.get_for(base, quant_type, cfg.blocksize), double_quant, cfg.dtype)
    return with_lora(base, cfg, seed)
