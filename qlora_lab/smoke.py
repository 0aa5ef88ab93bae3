"""Smoke runs of the gpu profile offline: tiny local stand-ins for its hub model and data, the code path unchanged.

`qlora-lab course --profile gpu --smoke` runs every notebook's gpu path on a CPU without internet: a hub model
name resolves to a randomly initialised Llama with LLaMA-7B's module names (4 layers, tiny width), the hub
data sets to the course's own OASST1-format data, and step counts and batch shapes shrink. Everything else (the
recipe values, the data pipeline, save/merge/resume) runs as the gpu profile would run it. Nothing it prints is
a result: it only proves that the gpu path executes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ENV = "QLORA_LAB_SMOKE"  # the stand-ins' folder; set by the course runner for a smoke run
#: Upper limits a smoke run puts on notebook parameters (a value already below its limit is kept). Notebook 04's
#: trace keeps the cpu profile's 64 / 1024 tokens: shorter, the long step no longer stands out and nothing OOMs.
#: 256 tokens is the shortest `max_length` that still keeps a dozen of the course's conversations (09 needs them).
LIMITS: dict[str, Any] = {
    "max_steps": 2, "max_new_tokens": 8, "n_eval_prompts": 2, "eval_rows": 2, "eval_size": 2, "max_length": 256, "seq_len": 32,
    "train_blocks": 4, "eval_blocks": 2, "batch_size": 2, "error_params": 200_000, "short_len": 64,
    "long_len": 1024, "cuda_short_len": 16, "cuda_long_len": 64, "steps": 4, "train_steps": 2, "n_prompts": 2,
    "ft_layer": 3, "elo_orders": 100, "oa_orders": 100, "n_boot": 100, "stability_repeats": 3, "global_batch": 4,
}
LIST_LIMITS: dict[str, Any] = {"measure_shapes": [[1, 32]], "ckpt_shape": [1, 32], "seeds": [0]}
#: Where a notebook needs more than a limit: 07 times its steps after 1 warm-up and 1 memory step.
NOTEBOOK_LIMITS: dict[str, dict[str, Any]] = {"07_qlora_vs_lora_vs_full": {"max_steps": 3}}
#: The stand-in's shape: LLaMA-7B's module names, 4 of its layers, a width small enough for a CPU.
STANDIN = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False)


def active() -> Path | None:
    """The stand-ins' folder when this process is part of a smoke run, else None."""
    folder = os.environ.get(ENV)
    return Path(folder) if folder else None


def banner(notebook: str) -> str:
    """The line a smoke-run notebook prints first, so no one mistakes its numbers for results."""
    return (f"SMOKE RUN of {notebook}'s gpu path: hub models are replaced by a tiny random Llama and hub data by "
            "the course's own data, with step counts cut to a few. It proves the code runs; its numbers mean nothing.")


def shrink(values: dict[str, Any], notebook: str | None = None) -> dict[str, Any]:
    """A notebook's parameters with sizes cut to the smoke limits (names that carry no size are kept)."""
    out = dict(values)
    for name, limit in {**LIMITS, **NOTEBOOK_LIMITS.get(notebook or "", {})}.items():
        if isinstance(out.get(name), int) and not isinstance(out[name], bool):
            out[name] = min(out[name], limit)
    for name, small in LIST_LIMITS.items():
        if name in out:
            out[name] = small
    return out


def make_standins(folder: Path) -> Path:
    """Write the stand-in model (random Llama + the embedded tokenizer) into `folder` once; return the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from . import models

    target = Path(folder) / "standin-llama"
    if (target / "config.json").is_file():
        return target
    tokenizer = models.load_tokenizer(None)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **STANDIN)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def model_for(name: str) -> str:
    """The stand-in folder that replaces hub model `name` in a smoke run."""
    folder = active()
    assert folder is not None, "model_for() is only for smoke runs"
    return str(make_standins(folder))


#: How a smoke run scales the Guanaco recipe: its batch shapes, and an evaluation at step 2 (with the recipe's own
#: eval_steps, a 2-step run would not evaluate at all: train.eval_strategy). Every other recipe value is kept.
FINETUNE = dict(per_device_train_batch_size=1, gradient_accumulation_steps=2, per_device_eval_batch_size=1,
                max_length=64, max_eval_samples=2, eval_steps=2)


def standin_config(model: Any):
    """A tiny LlamaConfig with a preset's layer count, for models.random_llama in a smoke run."""
    from transformers import LlamaConfig

    from .memory import architecture

    return LlamaConfig(vocab_size=49152, **{**STANDIN, "num_hidden_layers": architecture(model).layers})
