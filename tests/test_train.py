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

from qlora_lab import checkpoints, train

TINY = dict(max_steps=6, save_steps=2, eval_steps=1000, logging_steps=1, max_length=48,
            per_device_train_batch_size=2, per_device_eval_batch_size=2, lora_r=4, lora_alpha=8,
            lora_dropout=0.1, max_eval_samples=2, learning_rate=1e-3)


#: artidoro/qlora scripts/finetune_guanaco_{7b,13b,33b,65b}.sh (commit 0b46ca8), the flags a FinetuneConfig field
#: carries, as released; values equal in all four scripts are listed once. qlora.py's own defaults supply the
#: optimizer (paged_adamw_32bit) and, for oasst1 (no source text), the loss on the whole conversation.
SCRIPTS_ALL = dict(logging_steps=10, data_seed=42, max_eval_samples=1000, per_device_eval_batch_size=4,
                   group_by_length=True, lora_r=64, lora_alpha=16, lora_modules="all-linear", double_quant=True,
                   quant_type="nf4", compute_dtype="bfloat16", bits=4, warmup_ratio=0.03,
                   lr_scheduler_type="constant", gradient_checkpointing=True, max_length=512,
                   per_device_train_batch_size=4, gradient_accumulation_steps=4, max_steps=1875, eval_steps=187,
                   adam_beta2=0.999, max_grad_norm=0.3, weight_decay=0.0, seed=0, optim="paged_adamw_32bit",
                   train_on="all")
SCRIPTS_BY_SIZE = {"7b": dict(save_steps=500, learning_rate=2e-4, lora_dropout=0.1),
                   "13b": dict(save_steps=500, learning_rate=2e-4, lora_dropout=0.05),
                   "33b": dict(save_steps=200, learning_rate=1e-4, lora_dropout=0.05),
                   "65b": dict(save_steps=200, learning_rate=1e-4, lora_dropout=0.05)}


@pytest.mark.parametrize("size", SCRIPTS_BY_SIZE)
def test_guanaco_presets_equal_the_released_scripts_field_by_field(size):
    config = train.FinetuneConfig.guanaco(size).to_dict()
    expected = {**SCRIPTS_ALL, **SCRIPTS_BY_SIZE[size]}
    differ = {k: (config[k], v) for k, v in expected.items() if config[k] != v}
    assert not differ, f"guanaco({size!r}) vs finetune_guanaco_{size}.sh: {differ}"
    assert config["dataset"] == "hub" and config["model_name_or_path"] == train.GUANACO_MODELS[size]


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


@pytest.mark.parametrize("field, value, allowed", [
    ("lora_alpha", float("inf"), "a finite number > 0"),
    ("max_grad_norm", float("inf"), "a finite number > 0"),
    ("adam_beta2", 1.0, "0 <= beta2 < 1"),
    ("weight_decay", -0.1, "a finite number >= 0"),
    ("warmup_ratio", 1.5, "0 <= ratio < 1"),
    ("warmup_ratio", -0.1, "0 <= ratio < 1"),
])
def test_numbers_that_cannot_work_are_refused(field, value, allowed):
    with pytest.raises(train.ConfigError) as err:
        train.FinetuneConfig.cpu(**{field: value})
    assert f"{field}={value!r}" in str(err.value) and allowed in str(err.value)


def _checkpoint(root: Path, step: int, config=None) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text("{}")
    if config is not None:
        (d / checkpoints.COMPLETE_MARKER).write_text(json.dumps({"step": step, "config": config.to_dict()}))
    return d


def test_unmarked_checkpoints_are_never_deleted_only_set_aside(tmp_path):
    cfg = train.FinetuneConfig.cpu(output_dir=str(tmp_path))
    _checkpoint(tmp_path, 2, cfg), _checkpoint(tmp_path, 4, cfg), _checkpoint(tmp_path, 6)
    assert checkpoints.last_complete_checkpoint(tmp_path).name == "checkpoint-4"
    assert (tmp_path / "checkpoint-6" / "trainer_state.json").is_file()  # looking deletes nothing
    with pytest.warns(UserWarning, match="moved aside to set-aside-checkpoint-6"):
        moved = checkpoints.set_aside_unmarked(tmp_path)
    assert [p.name for p in moved] == ["set-aside-checkpoint-6"]
    assert (tmp_path / "set-aside-checkpoint-6" / "trainer_state.json").is_file()
    assert checkpoints.last_complete_checkpoint(tmp_path / "none") is None


def test_a_changed_config_refuses_to_resume_and_says_what_differs(tmp_path):
    old = train.FinetuneConfig.cpu(output_dir=str(tmp_path), max_steps=5)
    _checkpoint(tmp_path, 5, old)
    new = train.FinetuneConfig.cpu(output_dir=str(tmp_path), max_steps=8, learning_rate=5e-4, lora_r=8)
    with pytest.raises(train.ConfigError, match=r"lora_r: checkpoint 64, now 8; learning_rate: checkpoint "
                                                r"0.001, now 0.0005\).*choose a new output_dir"):
        train.finetune(new, progress=False)  # refused before any model is loaded
    with pytest.raises(train.ConfigError, match=r"already past max_steps=2"):
        train.finetune(train.FinetuneConfig.cpu(output_dir=str(tmp_path), max_steps=2), progress=False)
    checkpoints.check_resumable(tmp_path / "checkpoint-5", train.FinetuneConfig.cpu(output_dir="elsewhere", max_steps=9))


def test_a_checkpoint_without_its_config_is_not_resumed(tmp_path):
    d = _checkpoint(tmp_path, 2)
    (d / checkpoints.COMPLETE_MARKER).write_text(json.dumps({"step": 2}))  # an older marker
    with pytest.raises(train.ConfigError, match="without its configuration"):
        train.finetune(train.FinetuneConfig.cpu(output_dir=str(tmp_path)), progress=False)


def test_finished_adapter_only_for_a_run_that_reached_max_steps_on_that_base(tmp_path):
    cfg = train.FinetuneConfig.cpu(output_dir=str(tmp_path), max_steps=4)
    _checkpoint(tmp_path, 2, cfg)
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"0" * 2048)
    assert checkpoints.finished_adapter(tmp_path, None, 4) is None  # stopped at step 2 of 4
    final = _checkpoint(tmp_path, 4, cfg) / checkpoints.COMPLETE_MARKER
    stamp = final.stat().st_mtime
    os.utime(weights, (stamp - 10, stamp - 10))
    assert checkpoints.finished_adapter(tmp_path, None, 4) is None  # an adapter older than the run's end
    os.utime(weights, (stamp + 10, stamp + 10))
    adapter, saved = checkpoints.finished_adapter(tmp_path, None, 4)
    assert adapter == tmp_path / "adapter" and saved["max_steps"] == 4 and saved["bits"] == 4
    assert checkpoints.finished_adapter(tmp_path, "org/another-model", 4) is None  # another base
    assert checkpoints.finished_adapter(tmp_path, None, 16) is None  # a 4-bit run is not a 16-bit LoRA
    assert checkpoints.finished_adapter(tmp_path / "missing", None, 4) is None


def test_two_runs_cannot_share_an_output_dir(tmp_path):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".qlora-lab.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(train.ConfigError, match="in use by another training run"):
            train.finetune(train.FinetuneConfig.cpu(output_dir=str(tmp_path)), progress=False)


class _Saves:
    """A stand-in model whose save_pretrained writes what it is told to."""

    def __init__(self, payload: bytes):
        self.payload = payload

    def save_pretrained(self, folder):
        Path(folder, "adapter_config.json").write_text("{}")
        Path(folder, "adapter_model.safetensors").write_bytes(self.payload)


def test_save_adapter_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path):
    target = tmp_path / "adapter"
    train.save_adapter(_Saves(b"1" * 4096), target)
    with pytest.raises(RuntimeError, match="previous adapter .* is unchanged"):
        train.save_adapter(_Saves(b""), target)  # an empty save
    assert (target / "adapter_model.safetensors").read_bytes() == b"1" * 4096
    train.save_adapter(_Saves(b"2" * 4096), target)
    assert (target / "adapter_model.safetensors").read_bytes() == b"2" * 4096
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folders left behind


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
    tok, base = train.load_model_and_tokenizer(cfg)
    model = train.load_adapter(base, res.adapter_path)
    tok2, base2 = train.load_model_and_tokenizer(cfg)
    again = train.load_adapter(base2, res.adapter_path)
    ids = tok("### Human: Hello there### Assistant:", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, again(**ids).logits)
    assert res.loss_history and res.trainable_parameters < res.total_parameters


def test_evaluates_every_eval_steps_and_never_in_a_run_shorter_than_that(trained, tmp_path):
    _, res = trained  # eval_steps=1000 > max_steps=2: transformers alone would still evaluate once, at the end
    assert res.eval_losses == []
    cfg = train.FinetuneConfig.cpu(output_dir=str(tmp_path / "run"), **{**TINY, "max_steps": 2, "eval_steps": 1})
    assert [h["step"] for h in train.finetune(cfg, progress=False).eval_losses] == [1, 2]


def test_missing_and_corrupt_adapters_are_explained(trained, tmp_path):
    cfg, res = trained
    _, base = train.load_model_and_tokenizer(cfg)
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


def test_a_plain_transformers_checkpoint_survives_a_run(tmp_path):
    user = _checkpoint(tmp_path, 3)  # no marker: a checkpoint the user put there
    (user / "model.safetensors").write_bytes(b"user weights")
    cfg = train.FinetuneConfig.cpu(output_dir=str(tmp_path), **{**TINY, "max_steps": 2, "save_steps": 1})
    with pytest.warns(UserWarning, match="moved aside"):
        res = train.finetune(cfg, progress=False)
    assert res.resumed_from is None  # not resumed from a checkpoint we cannot vouch for
    assert (tmp_path / "set-aside-checkpoint-3" / "model.safetensors").read_bytes() == b"user weights"
    assert checkpoints.checkpoint_config(tmp_path / "checkpoint-2")["lora_r"] == cfg.lora_r


def test_load_adapter_onto_a_base_it_does_not_fit_says_why(trained, tmp_path):
    cfg, res = trained
    other = train.FinetuneConfig.cpu(**{**TINY, "lora_r": 8})
    _, base = train.load_model_and_tokenizer(other)
    from qlora_lab import models

    cut = models.load_model(None, quantization="nf4", num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"layers\.2\..* not in the base model"):
        train.load_adapter(cut, res.adapter_path)
    meta = json.loads((res.adapter_path / "adapter_config.json").read_text())
    lying = tmp_path / "lying"
    lying.mkdir()
    for f in res.adapter_path.iterdir():
        (lying / f.name).write_bytes(f.read_bytes())
    (lying / "adapter_config.json").write_text(json.dumps({**meta, "r": 16}))
    with pytest.raises(ValueError, match=r"r=16 in adapter_config.json but the weights have rank 4"):
        train.load_adapter(base, lying)
    from transformers import LlamaConfig, LlamaForCausalLM

    narrow = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=30,
                                          num_attention_heads=4, num_key_value_heads=4, vocab_size=64))
    with pytest.raises(ValueError, match=r"layers\.0\.\w+\.\w+_proj is 64 x \d+ in the base model, but the "
                                         r"adapter was trained for 576 x \d+"):
        train.load_adapter(narrow, res.adapter_path)
