"""QLoRA fine-tuning with transformers' Trainer and peft: the Guanaco recipe as a config, resumable runs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import bf16_cpu, data, measure, models, smoke
from .checkpoints import (callbacks as checkpoint_callbacks, check_resumable, exclusive,
                          last_complete_checkpoint, set_aside_unmarked)
from .checks import ConfigError, is_whole
from .models import COMPUTE_DTYPES

OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_8bit", "adamw_bnb_8bit")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
GUANACO_MODELS = {  # LLaMA-1 base checkpoints as the paper used them (a public hub copy)
    "7b": "huggyllama/llama-7b", "13b": "huggyllama/llama-13b",
    "33b": "huggyllama/llama-30b", "65b": "huggyllama/llama-65b",
}


@dataclass
class FinetuneConfig:
    """Every knob of a QLoRA run; names follow qlora.py and transformers.TrainingArguments."""

    model_name_or_path: str | None = None  # None = the embedded SmolLM2-135M-Instruct
    dataset: str = "embedded"  # data.load_guanaco source: embedded, hub, guanaco-hub or a path
    bits: int = 4  # 4 (NF4/FP4), 8 (LLM.int8) or 16 (no quantization: plain LoRA)
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    lora_r: int = 64
    lora_alpha: float = 16
    lora_dropout: float = 0.1
    lora_modules: str | list[str] = "all-linear"  # every linear layer except the output head
    optim: str = "paged_adamw_32bit"
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "constant"
    warmup_ratio: float = 0.03  # qlora.py passes it; with a constant schedule transformers ignores it
    max_grad_norm: float = 0.3
    weight_decay: float = 0.0
    adam_beta2: float = 0.999
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    per_device_eval_batch_size: int = 4
    max_steps: int = 1875
    eval_steps: int = 187  # evaluate every eval_steps steps; none when eval_steps > max_steps (eval_strategy)
    save_steps: int = 500
    logging_steps: int = 10
    max_length: int = 512  # qlora.py: source_max_len 16 + target_max_len 512 (oasst1 has no source)
    max_eval_samples: int | None = 1000
    truncation: str = "tokens"  # "turns": cut long rows at a turn boundary, so EOS follows a whole answer
    group_by_length: bool = True
    train_on: str = "all"  # qlora.py trains on the whole conversation for oasst1
    gradient_checkpointing: bool = True
    seed: int = 0
    data_seed: int = 42
    output_dir: str = "outputs/guanaco"

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def guanaco(cls, size: str = "7b", **overrides: Any) -> "FinetuneConfig":
        """The paper's Guanaco recipe (artidoro/qlora scripts/finetune_guanaco_<size>.sh) for LLaMA <size>."""
        if size not in GUANACO_MODELS:
            raise ConfigError(f"size={size!r} is not one of {sorted(GUANACO_MODELS)}")
        big = size in ("33b", "65b")
        values = dict(
            model_name_or_path=GUANACO_MODELS[size], dataset="hub", bits=4, quant_type="nf4",
            double_quant=True, compute_dtype="bfloat16", lora_r=64, lora_alpha=16,
            # The paper's appendix gives dropout 0.1 up to 13B; the released 13B script uses 0.05. We follow
            # the scripts (what produced the released adapters).
            lora_dropout=0.1 if size == "7b" else 0.05,
            learning_rate=1e-4 if big else 2e-4, optim="paged_adamw_32bit", lr_scheduler_type="constant",
            max_grad_norm=0.3, weight_decay=0.0, adam_beta2=0.999, per_device_train_batch_size=4,
            gradient_accumulation_steps=4, max_steps=1875, eval_steps=187, save_steps=200 if big else 500,
            logging_steps=10, max_length=512, group_by_length=True, train_on="all",
            gradient_checkpointing=True, seed=0, data_seed=42, output_dir=f"outputs/guanaco-{size}",
        )
        if smoke.active():  # a smoke run: the recipe as it is, at a batch shape a CPU can take
            values.update(smoke.FINETUNE)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def cpu(cls, **overrides: Any) -> "FinetuneConfig":
        """The recipe's shape (NF4+DQ, all linear layers, r=64, paged AdamW, constant lr) sized for 2 CPU cores.

        It computes in float32, as notebook 09 does on a CPU: CPUs without bf16 matrix units compute bf16 several
        times slower. The base is stored in NF4 either way; only the dtype each weight is dequantized to differs.
        """
        values = dict(
            model_name_or_path=None, dataset="embedded", compute_dtype="float32", lora_dropout=0.05,
            learning_rate=1e-3,
            per_device_train_batch_size=2, gradient_accumulation_steps=1, per_device_eval_batch_size=8,
            max_steps=40, eval_steps=20, save_steps=20, logging_steps=1, max_length=384, truncation="turns",
            max_eval_samples=None, train_on="assistant", gradient_checkpointing=False,
            output_dir="outputs/guanaco-cpu",
        )
        values.update(overrides)
        return cls(**values)

    def validate(self) -> None:
        """Reject values that cannot work before any model is loaded."""
        def bad(name: str, allowed: str) -> ConfigError:
            return ConfigError(f"{name}={getattr(self, name)!r} is not allowed: {allowed}")

        for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "per_device_eval_batch_size", "eval_steps", "save_steps", "logging_steps", "lora_r"):
            if not is_whole(getattr(self, name)):
                raise bad(name, "a whole number >= 1")
        if self.bits not in (4, 8, 16):
            raise bad("bits", "4, 8 or 16")
        if self.quant_type not in ("nf4", "fp4"):
            raise bad("quant_type", "'nf4' or 'fp4'")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise bad("compute_dtype", f"one of {list(COMPUTE_DTYPES)}")
        if self.optim not in OPTIMIZERS:
            raise bad("optim", f"one of {list(OPTIMIZERS)}")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise bad("lr_scheduler_type", f"one of {list(SCHEDULERS)}")
        if self.train_on not in ("assistant", "all"):
            raise bad("train_on", "'assistant' or 'all'")
        if self.truncation not in ("tokens", "turns"):
            raise bad("truncation", "'tokens' or 'turns'")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise bad("learning_rate", "a finite number > 0")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise bad("lora_alpha", "a finite number > 0")
        if not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", "0 <= p < 1")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise bad("max_grad_norm", "a finite number > 0")
        if not (0 <= self.weight_decay and math.isfinite(self.weight_decay)):
            raise bad("weight_decay", "a finite number >= 0")
        if not 0 <= self.adam_beta2 < 1:
            raise bad("adam_beta2", "0 <= beta2 < 1")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "a fraction of max_steps, 0 <= ratio < 1")
        if not isinstance(self.max_length, int) or self.max_length < 8:
            raise bad("max_length", "a whole number >= 8")

    @property
    def quantization(self) -> str | None:
        """The qlora_lab.models quantization name for these bits."""
        return {4: self.quant_type, 8: "int8", 16: None}[self.bits]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FinetuneResult:
    """What a run leaves: per-step train losses, eval losses, and where the adapter is."""

    loss_history: list[dict[str, float]]
    eval_losses: list[dict[str, float]]
    adapter_path: Path
    trainable_parameters: int
    total_parameters: int
    resumed_from: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


def load_model_and_tokenizer(config: FinetuneConfig):
    """Tokenizer and (quantized) base model as the config says."""
    tokenizer = models.load_tokenizer(config.model_name_or_path)
    model = models.load_model(config.model_name_or_path, quantization=config.quantization,
                              double_quant=config.double_quant,
                              compute_dtype=COMPUTE_DTYPES[config.compute_dtype])
    return tokenizer, model


def add_adapters(model, config: FinetuneConfig):
    """prepare_model_for_kbit_training (quantized only) and peft LoRA on the configured modules."""
    from peft import prepare_model_for_kbit_training

    if config.bits < 16:
        # Casts norms/embeddings to fp32 and enables input grads, which gradient checkpointing needs when
        # the frozen base has no trainable input ("element 0 of tensors does not require grad").
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return models.add_lora_adapters(model, config.lora_r, config.lora_alpha, config.lora_dropout,
                                    config.lora_modules)


def eval_strategy(config: FinetuneConfig) -> str:
    """"steps", or "no" when eval_steps > max_steps: such a run asks for no evaluation, and transformers would
    otherwise still evaluate once when training ends (a short run spends as long on it as on its steps)."""
    return "steps" if config.eval_steps <= config.max_steps else "no"


def training_arguments(config: FinetuneConfig):
    """transformers.TrainingArguments for the config (CPU-safe: bf16 autocast only on CUDA)."""
    from transformers import TrainingArguments

    on_cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=config.output_dir, max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio, max_grad_norm=config.max_grad_norm,  # a float < 1 is a ratio
        weight_decay=config.weight_decay, adam_beta2=config.adam_beta2, optim=config.optim,
        logging_steps=config.logging_steps, eval_strategy=eval_strategy(config), eval_steps=config.eval_steps,
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=2,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        bf16=on_cuda and config.compute_dtype == "bfloat16", seed=config.seed, data_seed=config.data_seed,
        remove_unused_columns=False, report_to=[], disable_tqdm=False, dataloader_num_workers=0,
        use_cpu=not on_cuda, save_only_model=False,
    )


def load_datasets(config: FinetuneConfig, collator):
    """Train and validation Guanaco sets, with lengths for group_by_length."""
    train = data.load_guanaco(config.dataset, "train")
    evaluation = data.load_guanaco(config.dataset, "validation")
    if config.max_eval_samples is not None and len(evaluation) > config.max_eval_samples:
        evaluation = evaluation.shuffle(seed=config.seed).select(range(config.max_eval_samples))
    return collator.with_lengths(train), collator.with_lengths(evaluation)


def finetune(config: FinetuneConfig, progress: bool = True, model=None, tokenizer=None,
             callbacks: Sequence[Any] = ()) -> FinetuneResult:
    """Train LoRA adapters on a (quantized) base; resume from the last complete checkpoint in output_dir."""
    from transformers import Trainer, set_seed

    config.validate()
    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    with exclusive(output_dir):
        set_aside_unmarked(output_dir)
        resume = last_complete_checkpoint(output_dir)
        if resume is not None:
            check_resumable(resume, config)  # before any model work
        if model is None or tokenizer is None:
            tokenizer, model = load_model_and_tokenizer(config)
        model = add_adapters(model, config)
        collator = data.GuanacoCollator(tokenizer, max_length=config.max_length, train_on=config.train_on,
                                        truncation=config.truncation)
        train_set, eval_set = load_datasets(config, collator)
        args = training_arguments(config)
        args.disable_tqdm = not progress
        trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                          data_collator=collator, callbacks=[*checkpoint_callbacks(config), *callbacks])
        if not progress:  # without a progress bar Trainer prints every log dict; keep quiet instead
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        with measure.quiet_cpu_paging(), bf16_cpu.off_for(model, bf16_autocast=bool(args.bf16)):
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        adapter = save_adapter(trainer.model, output_dir / "adapter")
    history = trainer.state.log_history
    trainable, total = model.get_nb_trainable_parameters()  # counts 4-bit weights as unpacked parameters
    return FinetuneResult(
        loss_history=[{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        eval_losses=[{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        adapter_path=adapter, trainable_parameters=trainable, total_parameters=total,
        resumed_from=resume.name if resume else None, config=config.to_dict(),
    )


def save_adapter(model, path: str | os.PathLike) -> Path:
    """Save only the LoRA weights atomically: the old adapter stays until the new one is checked and in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        weights = tmp / "adapter_model.safetensors"
        if not weights.is_file() or weights.stat().st_size < 1024:
            raise RuntimeError(f"saving the adapter wrote no LoRA weights ({weights.name} missing or empty); "
                               f"the previous adapter at {path} is unchanged")
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:  # the new adapter is in place; only now does the one it replaces go
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_adapter(base_model, path: str | os.PathLike, is_trainable: bool = False):
    """Attach a saved adapter to a base model; a missing or corrupt adapter gives a clear error."""
    from peft import PeftModel
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    weights = path / "adapter_model.safetensors"
    if not (path / "adapter_config.json").is_file() or not weights.is_file():
        raise FileNotFoundError(f"No LoRA adapter at {path}: expected adapter_config.json and "
                                "adapter_model.safetensors (written by save_adapter / finetune)")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            keys = list(handle.keys())
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"The adapter weights in {path} are corrupt or truncated ({err}); re-run the "
                         "fine-tune or restore the file") from err
    if not any("lora_" in k for k in keys):
        raise ValueError(f"The adapter in {path} holds no LoRA weights (keys: {keys[:3]}...): an empty save")
    problem = adapter_misfit(base_model, json.loads((path / "adapter_config.json").read_text()), shapes)
    if problem:
        raise ValueError(f"The adapter in {path} does not fit this base model: {problem}")
    return PeftModel.from_pretrained(base_model, str(path), is_trainable=is_trainable)


def adapter_misfit(base_model, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why saved LoRA weights cannot sit on this base (rank, missing module, shape), or None if they fit."""
    modules = dict(base_model.named_modules())
    custom_ranks = meta.get("rank_pattern") or {}
    def layer_order(item: tuple[str, Any]) -> list[tuple[int, int, str]]:
        return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in item[0].split(".")]

    for key, shape in sorted(shapes.items(), key=layer_order):  # layer 2 before layer 10, as a reader counts
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        if not custom_ranks and meta.get("r") is not None and shape[0] != meta["r"]:
            return f"r={meta['r']} in adapter_config.json but the weights have rank {shape[0]} ({key})"
        module = modules.get(name)
        if module is None:
            return f"module {name!r} is not in the base model (the adapter targets {meta.get('target_modules')})"
        fan_in = getattr(module, "in_features", None)
        b_shape = shapes.get(key.replace(".lora_A.", ".lora_B."))
        fan_out = getattr(module, "out_features", None)
        if fan_in is not None and shape[1] != fan_in or b_shape and fan_out is not None and b_shape[0] != fan_out:
            return (f"{name} is {fan_out} x {fan_in} in the base model, but the adapter was trained for "
                    f"{b_shape[0] if b_shape else '?'} x {shape[1]}")
    return None


def merge_into_16bit(model_name: str | None, adapter_path: str | os.PathLike,
                     dtype: torch.dtype = torch.bfloat16):
    """Merge the adapter into a fresh 16-bit copy of the base (never into 4-bit weights): a plain model."""
    base = models.load_model(model_name, quantization=None, compute_dtype=dtype)
    return load_adapter(base, adapter_path).merge_and_unload()


def dequantized_copy(model_name: str | None, quant_type: str = "nf4", double_quant: bool = True,
                     dtype: torch.dtype = torch.bfloat16):
    """A 16-bit base whose linear weights are exactly the dequantized 4-bit ones the adapter was trained on."""
    import bitsandbytes.functional as bnbf

    quantized = models.load_model(model_name, quantization=quant_type, double_quant=double_quant,
                                  compute_dtype=dtype)
    plain = models.load_model(model_name, quantization=None, compute_dtype=dtype)
    modules = dict(quantized.named_modules())
    for name, module in plain.named_modules():
        twin = modules.get(name)
        if isinstance(module, torch.nn.Linear) and twin is not None and hasattr(twin.weight, "quant_state"):
            weight = bnbf.dequantize_4bit(twin.weight.data, twin.weight.quant_state)
            module.weight.data = weight.to(dtype).reshape(module.weight.shape)
    return plain
