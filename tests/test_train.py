"""qlora_lab.train: the Guanaco preset, config errors, atomic checkpoints, kill-and-resume, adapter save/load."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_lab import train

TINY = dict(max_steps=6, save_steps=2, eval_steps=1000, logging_steps=1, max_length=48,
            per_device_train_batch_size=2, per_device_eval_batch_size=2, lora_r=4, lora_alpha=8,
            lora_dropout=0.1, max_eval_samples=2, learning_rate=1e-3)


def test_guanaco_7b_is_the_papers_recipe():
    c = train.FinetuneConfig.guanaco("7b")
    assert (c.bits, c.quant_type, c.double_quant, c.compute_dtype) == (4, "nf4", True, "bfloat16")
    assert (c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_modules) == (64, 16, 0.1, "all-linear")
    assert (c.learning_rate, c.lr_scheduler_type, c.max_grad_norm, c.weight_decay, c.adam_beta2) == \
        (2e-4, "constant", 0.3, 0.0, 0.999)
    assert c.optim == "paged_adamw_32bit"
    assert c.per_device_train_batch_size * c.gradient_accumulation_steps == 16
    assert (c.max_steps, c.eval_steps, c.max_length, c.seed) == (1875, 187, 512, 0)
    assert c.group_by_length and c.gradient_checkpointing and c.train_on == "all"
    assert c.dataset == "hub" and c.model_name_or_path == "huggyllama/llama-7b"
    assert train.FinetuneConfig.guanaco("65b").learning_rate == 1e-4
    assert train.FinetuneConfig.guanaco("33b").lora_dropout == 0.05


@pytest.mark.parametrize("field, value, allowed", [
    ("max_steps", -5, "whole number >= 1"),
    ("lora_r", 0, "whole number >= 1"),
    ("optim", "sgd_fast", "paged_adamw_32bit"),
    ("quant_type", "nf3", "'nf4' or 'fp4'"),
    ("bits", 3, "4, 8 or 16"),
    ("learning_rate", float("nan"), "finite"),
    ("train_on", "human", "'assistant' or 'all'"),
])
def test_bad_config_values_are_named(field, value, allowed):
    with pytest.raises(train.ConfigError) as err:
        train.FinetuneConfig.cpu(**{field: value})
    assert f"{field}={value!r}" in str(err.value) and allowed in str(err.value)


def test_unknown_guanaco_size():
    with pytest.raises(train.ConfigError, match=r"size='3b'.*'7b'"):
        train.FinetuneConfig.guanaco("3b")


def test_half_written_checkpoints_are_ignored(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / train.COMPLETE_MARKER).write_text("{}")
    assert train.last_complete_checkpoint(tmp_path).name == "checkpoint-4"
    assert not (tmp_path / "checkpoint-6").exists()  # the half-written one is cleared
    assert train.last_complete_checkpoint(tmp_path / "none") is None


RUN = textwrap.dedent("""
    import json, os, signal, sys
    from transformers import TrainerCallback
    from qlora_lab import train
    out, kill_at = sys.argv[1], int(sys.argv[2])
    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    cfg = train.FinetuneConfig.cpu(output_dir=out, **json.loads(sys.argv[3]))
    res = train.finetune(cfg, progress=False, callbacks=[Kill()] if kill_at else [])
    print("RESUMED_FROM", res.resumed_from)
""")


def _run(out: Path, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN, str(out), str(kill_at), json.dumps(TINY)],
                          capture_output=True, text=True, timeout=900)


def test_sigkill_mid_training_then_resume_gives_the_same_adapter(tmp_path):
    straight = _run(tmp_path / "straight", 0)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _run(tmp_path / "killed", 3)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "adapter").exists()
    resumed = _run(tmp_path / "killed", 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "RESUMED_FROM checkpoint-2" in resumed.stdout
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff < 1e-6, diff
    moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)
    assert moved > 0  # training really changed B away from its zero init


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = train.FinetuneConfig.cpu(output_dir=str(out), **{**TINY, "max_steps": 2})
    return cfg, train.finetune(cfg, progress=False)


def test_saved_adapter_reloads_to_identical_outputs(trained):
    cfg, res = trained
    tok, base = train.load_base(cfg)
    model = train.load_adapter(base, res.adapter_path)
    tok2, base2 = train.load_base(cfg)
    again = train.load_adapter(base2, res.adapter_path)
    ids = tok("### Human: Hello there### Assistant:", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, again(**ids).logits)
    assert res.loss_history and res.trainable_parameters < res.total_parameters


def test_missing_and_corrupt_adapters_are_explained(trained, tmp_path):
    cfg, res = trained
    _, base = train.load_base(cfg)
    with pytest.raises(FileNotFoundError, match="No LoRA adapter"):
        train.load_adapter(base, tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in res.adapter_path.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        train.load_adapter(base, broken)
