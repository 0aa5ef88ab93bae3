"""The course's parameters, written once: every notebook's cpu and gpu values, checked before a run starts.

A notebook's papermill `parameters` cell holds `profile` and `None` for each parameter it takes;
`settings(notebook, profile, **given)` fills in the profile's values and refuses a wrong name, type or range
with a message that says what is allowed. `COURSE_MAP` is the course's table of contents with measured minutes.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from . import smoke
from .checks import is_positive_number, is_whole

PROFILE_NAMES = ("cpu", "gpu")

#: What each notebook teaches and its measured CPU minutes on 2 cores (cpu profile). Keyed by notebook stem.
COURSE_MAP: dict[str, tuple[str, str, float]] = {
    "00_welcome": ("Welcome", "course map, environment check, the embedded model in 16-bit and NF4, the two prompt formats", 2),
    "01_lora_low_rank_math": ("LoRA low-rank math", "W0 + (alpha/r)BA, init, scaling, merge, parameter counts, rank of real updates; equal to peft", 1),
    "02_nf4_quantiles": ("NF4 quantiles", "normal quantiles to a 16-value code, blockwise absmax, nibble packing, FP4/Int4; byte-equal to bitsandbytes", 2),
    "03_double_quantization": ("Double quantization", "8-bit quantization of the absmax constants: 4.5 to 4.127 bits/param", 1),
    "04_paged_optimizers": ("Paged optimizers", "memory spikes, unified-memory paging, OOM without paging and survival with it", 1),
    "05_memory_budget": ("Memory budget", "an estimator for full / LoRA / QLoRA by model size, checked against measurement", 3),
    "06_guanaco_oasst1_finetune": ("Guanaco OASST1 fine-tune", "OASST1 trees to Guanaco text, QLoRA with the paper's recipe, evaluate, chat, save, merge", 13),
    "07_qlora_vs_lora_vs_full": ("QLoRA vs LoRA vs full", "the same run in 16-bit full, 16-bit LoRA and QLoRA NF4+DQ / NF4 / FP4 / Int4", 13),
    "08_judging_chatbots": ("Judging chatbots", "the paper's GPT-4 judgments: % of ChatGPT, Elo over 10,000 orders, order bias, Bradley-Terry, rank stability; our models judged", 1),
    "09_your_own_qlora": ("Your own QLoRA", "the recipe in plain transformers + peft + bitsandbytes + TRL on your chat data, equal to qlora_lab.train; merge, chat, serve", 3),
    "10_beyond_one_gpu": ("Beyond one GPU", "DDP QLoRA on 2 processes (gloo), FSDP + QLoRA config and invariants, the sharded memory budget", 2),
}

#: Parameters per notebook and profile. Every parameter a notebook takes is listed under both profiles.
#: A notebook's papermill `parameters` cell holds `profile = "cpu"` and `NAME = None` for each of these;
#: `settings()` fills the Nones from the profile, so the numbers live in one place.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        "00_welcome": {"model_name": None, "max_new_tokens": 48},
        "01_lora_low_rank_math": {"model_name": None, "data_source": "embedded", "ft_layer": 27, "ft_module": "self_attn.q_proj", "max_steps": 16, "batch_size": 4, "seq_len": 64, "train_blocks": 16, "eval_blocks": 8, "learning_rate": 1e-3},  # cpu: 01_lora_low_rank_math
        "02_nf4_quantiles": {"model_name": None, "data_source": "embedded", "eval_rows": 8, "max_length": 96, "error_params": 16_000_000},  # cpu: 02_nf4_quantiles
        "03_double_quantization": {"model_name": None, "data_source": "embedded", "eval_rows": 8, "max_length": 96},  # cpu: 03_double_quantization
        "04_paged_optimizers": {"data_source": "embedded", "short_len": 64, "long_len": 1024, "steps": 4, "long_step": 2, "cuda_short_len": 256, "cuda_long_len": 2048},  # cpu: 04_paged_optimizers
        "05_memory_budget": {"measure_model": "embedded", "measure_methods": ["full", "lora", "qlora"], "measure_shapes": [[1, 64], [4, 128]], "ckpt_shape": [4, 128]},  # cpu: 05_memory_budget
        "06_guanaco_oasst1_finetune": {"recipe": "cpu", "max_steps": 40, "n_eval_prompts": 22, "max_new_tokens": 384, "repetition_penalty": 1.2},
        "07_qlora_vs_lora_vs_full": {"model_name": None, "data_source": "embedded", "seeds": [0, 1], "max_steps": 6, "batch_size": 4, "max_length": 96, "eval_rows": 22, "lora_lr": 2e-3, "full_lr": 2e-4, "optim": "paged_adamw_32bit"},  # cpu: 07_qlora_vs_lora_vs_full
        "08_judging_chatbots": {"elo_orders": 10_000, "oa_orders": 1000, "n_boot": 1000, "stability_repeats": 30, "model_name": None, "judge_model": None, "train_steps": 2, "n_prompts": 8, "max_new_tokens": 32},  # cpu: 08_judging_chatbots
        "09_your_own_qlora": {"data_path": "embedded", "model_name": None, "max_steps": 4, "batch_size": 4, "grad_accum": 1, "max_length": 192, "learning_rate": 1e-3, "lora_r": 64, "compute_dtype": "float32", "optim": "adamw_torch", "gradient_checkpointing": False, "eval_size": 4, "max_new_tokens": 48},  # cpu: 09_your_own_qlora
        "10_beyond_one_gpu": {"model_name": None, "num_layers": 4, "steps": 4, "global_batch": 4, "seq_len": 64, "lora_r": 64, "launch_timeout": 300},  # cpu: 10_beyond_one_gpu
    },
    "gpu": {
        "00_welcome": {"model_name": "huggyllama/llama-7b", "max_new_tokens": 128},
        "01_lora_low_rank_math": {"model_name": "huggyllama/llama-7b", "data_source": "hub", "ft_layer": 28, "ft_module": "self_attn.q_proj", "max_steps": 100, "batch_size": 8, "seq_len": 256, "train_blocks": 128, "eval_blocks": 32, "learning_rate": 1e-4},  # gpu: 01_lora_low_rank_math
        "02_nf4_quantiles": {"model_name": "huggyllama/llama-7b", "data_source": "guanaco-hub", "eval_rows": 64, "max_length": 512, "error_params": 400_000_000},  # gpu: 02_nf4_quantiles
        "03_double_quantization": {"model_name": "huggyllama/llama-7b", "data_source": "guanaco-hub", "eval_rows": 64, "max_length": 512},  # gpu: 03_double_quantization
        "04_paged_optimizers": {"data_source": "hub", "short_len": 128, "long_len": 2048, "steps": 4, "long_step": 2, "cuda_short_len": 256, "cuda_long_len": 2048},  # gpu: 04_paged_optimizers
        "05_memory_budget": {"measure_model": "llama-7b", "measure_methods": ["lora", "qlora"], "measure_shapes": [[1, 512], [4, 512]], "ckpt_shape": [4, 512]},  # gpu: 05_memory_budget
        "06_guanaco_oasst1_finetune": {"recipe": "guanaco-7b", "max_steps": 1875, "n_eval_prompts": 64, "max_new_tokens": 512, "repetition_penalty": 1.2},
        "07_qlora_vs_lora_vs_full": {"model_name": "HuggingFaceTB/SmolLM2-1.7B", "data_source": "guanaco-hub", "seeds": [0, 1], "max_steps": 300, "batch_size": 16, "max_length": 512, "eval_rows": 518, "lora_lr": 2e-4, "full_lr": 2e-5, "optim": "paged_adamw_32bit"},  # gpu: 07_qlora_vs_lora_vs_full
        "08_judging_chatbots": {"elo_orders": 10_000, "oa_orders": 10_000, "n_boot": 10_000, "stability_repeats": 200, "model_name": "huggyllama/llama-7b", "judge_model": "Qwen/Qwen2.5-7B-Instruct", "train_steps": 100, "n_prompts": 22, "max_new_tokens": 256},  # gpu: 08_judging_chatbots
        "09_your_own_qlora": {"data_path": "hub", "model_name": "huggyllama/llama-7b", "max_steps": 100, "batch_size": 4, "grad_accum": 4, "max_length": 512, "learning_rate": 2e-4, "lora_r": 64, "compute_dtype": "bfloat16", "optim": "paged_adamw_32bit", "gradient_checkpointing": True, "eval_size": 64, "max_new_tokens": 256},  # gpu: 09_your_own_qlora
        "10_beyond_one_gpu": {"model_name": "huggyllama/llama-7b", "num_layers": None, "steps": 10, "global_batch": 8, "seq_len": 512, "lora_r": 64, "launch_timeout": 1800},  # gpu: 10_beyond_one_gpu
    },
}


class CourseError(ValueError):
    """Bad course input (unknown profile, notebook or parameter); the message lists what is allowed."""


_POSITIVE = ("max_new_tokens", "max_steps", "batch_size", "seq_len", "train_blocks", "eval_blocks", "eval_rows",
             "max_length", "error_params", "short_len", "long_len", "steps", "cuda_short_len", "cuda_long_len",
             "n_eval_prompts", "grad_accum", "eval_size", "lora_r")
_RATES = ("learning_rate", "lora_lr", "full_lr", "repetition_penalty")


def _is_shape(value: Any) -> bool:
    """A [batch, seq_len] pair of whole numbers >= 1 (what the memory measurements take)."""
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(is_whole(x, 1) for x in value)


def _problem(name: str, value: Any, default: Any) -> str | None:
    """What is wrong with one parameter value (None if nothing): known rules first, then the default's type."""
    if value is None:  # None means "the profile's value"
        return None
    if name in _POSITIVE:
        return None if is_whole(value, 1) else "a whole number >= 1"
    if name in ("ft_layer", "long_step"):
        return None if is_whole(value, 0) else "a whole number >= 0"
    if name in _RATES:
        return None if is_positive_number(value) else "a finite number > 0"
    if name == "data_source":
        from .oasst import SOURCES

        return None if value in SOURCES or Path(str(value)).expanduser().exists() else \
            f"one of {list(SOURCES)} or an existing data file or folder"
    if name == "data_path":
        return None if value in ("embedded", "hub") or Path(str(value)).expanduser().is_file() else \
            "'embedded', 'hub' or an existing chat .jsonl file"
    if name == "compute_dtype":
        return None if value in ("bfloat16", "float16", "float32") else "one of ['bfloat16', 'float16', 'float32']"
    if name == "recipe":
        from .train import GUANACO_MODELS

        allowed = ["cpu", *(f"guanaco-{s}" for s in GUANACO_MODELS)]
        return None if value in allowed else f"one of {allowed}"
    if name == "optim":
        from .train import OPTIMIZERS

        return None if value in OPTIMIZERS else f"one of {list(OPTIMIZERS)}"
    if name == "seeds":
        ok = isinstance(value, list) and value and all(is_whole(s, 0) for s in value)
        return None if ok else "a non-empty list of whole numbers >= 0, e.g. [0, 1]"
    if name == "measure_methods":
        from .memory import ESTIMATOR_METHODS

        ok = isinstance(value, list) and value and all(m in ESTIMATOR_METHODS for m in value)
        return None if ok else f"a non-empty list drawn from {list(ESTIMATOR_METHODS)}"
    if name == "measure_shapes":
        ok = isinstance(value, list) and value and all(_is_shape(s) for s in value)
        return None if ok else "a non-empty list of [batch, seq_len] pairs of whole numbers >= 1"
    if name == "ckpt_shape":
        return None if _is_shape(value) else "a [batch, seq_len] pair of whole numbers >= 1, e.g. [4, 128]"
    if default is None:
        return None
    kind = (int, float) if isinstance(default, float) else type(default)
    if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, kind):
        return f"a {type(default).__name__} like the profile's {default!r}"
    return None


def check_parameter(notebook: str, name: str, value: Any, profile: str = "cpu") -> None:
    """Refuse a parameter value of the wrong type or range before a notebook starts; name what is allowed."""
    default = PROFILES[profile].get(notebook, {}).get(name)
    problem = _problem(name, value, default)
    if problem:
        raise CourseError(f"Parameter {name}={value!r} for {notebook} is not allowed: it must be {problem}.")


def check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise CourseError(f"Unknown profile {profile!r}; choose one of {sorted(PROFILES)}.")


def settings(notebook: str, profile: str = "cpu", **given: Any) -> SimpleNamespace:
    """A notebook's parameters: the profile's values, replaced by every `given` value that is not None."""
    check_profile(profile)
    defaults = PROFILES[profile].get(notebook)
    if defaults is None:
        raise CourseError(f"Notebook {notebook!r} has no parameters in profile {profile!r}; "
                          f"known: {sorted(PROFILES[profile])}.")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise CourseError(f"Unknown parameter(s) {unknown} for {notebook}; it takes {sorted(defaults)}.")
    values = dict(defaults)
    values.update({k: v for k, v in given.items() if v is not None})
    for name, value in given.items():
        if value is not None:
            check_parameter(notebook, name, value, profile)
    if smoke.active():
        print(smoke.banner(notebook))
        values = smoke.shrink(values, notebook)
    return SimpleNamespace(profile=profile, **values)
