"""qlora_lab.study: the shared 4-bit layer, the fair comparison with bitsandbytes + peft, and the runner."""

from __future__ import annotations

import math

import pytest
import torch

from qlora_lab import memory, methods, profiles, study

TINY = dict(seeds=(0,), max_steps=3, batch_size=2, max_length=32, eval_rows=2, eval_batch_size=2, lora_r=8,
            num_layers=2)


# --- the fair comparison -------------------------------------------------------------------------------------

def test_nf4_dq_layer_gives_the_bitsandbytes_peft_loss():
    cfg = study.StudyConfig(num_layers=2, max_length=64, lora_r=16)
    check = methods.fair_check(cfg, rows=2)
    assert check.layers == 14 and check.layers_same_bytes == 14      # 7 linears x 2 blocks, byte-identical
    assert check.loss_diff <= check.tolerance and check.passed
    assert check.max_logit_diff == 0.0 and check.max_grad_rel_diff == 0.0  # CPU: the same ops on the same weights
    # The check can tell formats apart: NF4 without DQ and FP4 miss the bitsandbytes NF4+DQ loss by far more.
    for method in ("qlora_nf4", "qlora_fp4"):
        assert abs(check.other[method] - check.loss_bnb) > 100 * max(check.tolerance, 1e-6), method


# --- the runner ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given", [("lora", "qlora_nf3"), ("QLoRA",), "lora", ()])
def test_unknown_methods_are_rejected_with_the_allowed_list(given):
    with pytest.raises(methods.StudyError) as err:
        study.StudyConfig(methods=given)
    assert "qlora_nf4_dq" in str(err.value) and "full" in str(err.value)
    if given and not isinstance(given, str):
        assert repr(given[-1]) in str(err.value)


def test_build_model_rejects_unknown_method():
    with pytest.raises(methods.StudyError, match=r"Unknown method\(s\) \['qlora_int3'\]; allowed: \['full'"):
        methods.build_model("qlora_int3", study.StudyConfig(**TINY), seed=0)


@pytest.mark.parametrize("field, value", [("seeds", ()), ("seeds", (0, 0)), ("max_steps", 2), ("optim", "sgd"),
                                          ("lora_lr", float("nan")), ("num_layers", 0), ("compute_dtype", "fp8"),
                                          ("seeds", 3)])
def test_bad_settings_name_the_value(field, value):
    with pytest.raises(methods.StudyError, match=f"{field}="):
        study.StudyConfig(**{**TINY, field: value})


def test_batches_are_seeded_and_shared_by_methods():
    texts = [f"t{i}" for i in range(5)]
    a = study._batches(texts, 2, 4, seed=3)
    assert a == study._batches(texts, 2, 4, seed=3) and a != study._batches(texts, 2, 4, seed=4)
    assert sorted(sum(a[:2], []) + a[2][:1]) == sorted(texts)  # one pass over the data before repeating


def test_tiny_study_two_methods_completes(tmp_path):
    cfg = study.StudyConfig(methods=("lora", "qlora_int4"), **TINY)
    results = study.run_study(cfg, progress=False)
    assert [(r.method, r.seed) for r in results] == [("lora", 0), ("qlora_int4", 0)]
    lora, int4 = results
    for r in results:
        assert len(r.train_losses) == 3 and all(math.isfinite(x) for x in r.train_losses)
        assert math.isfinite(r.eval_loss) and r.eval_perplexity == pytest.approx(math.exp(r.eval_loss))
        assert r.initial_eval_loss is not None and len(r.step_seconds) == len(r.step_cpu_seconds) == 1
        assert r.median_step_s > 0 and r.median_step_cpu_s > 0
        assert r.peak_bytes == r.resident_bytes + r.transient_peak_bytes > r.weight_bytes
        assert r.checkpoint_bytes > 2 * r.trainable_params  # the bf16 adapter file plus its header
    arch = memory.architecture(methods.load_base(None, torch.bfloat16, 2).config)
    shapes = arch.linear_shapes().values()
    assert lora.trainable_params == int4.trainable_params == 2 * sum(8 * (i + o) for i, o in shapes)
    assert lora.base_params == int4.base_params == arch.params
    # The 4-bit base holds exactly 4 bits per weight + a float32 absmax per 64 instead of 16 bits per weight.
    saved = arch.layers * sum(2 * i * o - (i * o // 2 + 4 * (i * o // 64)) for i, o in shapes)
    assert lora.weight_bytes - int4.weight_bytes == saved
    assert lora.optimizer_state_bytes == int4.optimizer_state_bytes == 8 * lora.trainable_params
    table = study.summary_table(results)
    assert list(table.index) == ["16-bit LoRA", "QLoRA Int4"]
    assert table.loc["16-bit LoRA", ["memory / LoRA", "step / LoRA", "CPU step / LoRA"]].tolist() == [1, 1, 1]
    assert table.loc["QLoRA Int4", "memory / LoRA"] < 1
    with pytest.raises(methods.StudyError, match="reference='full' has no runs"):
        study.summary_table(results, reference="full")


def test_the_lr_grid_script_holds_the_cpu_profile_rates():
    """07 quotes scripts/tune_07_lr.py's grid as where its rates came from: each rate must be in its grid."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "tune_07_lr.py"
    spec = importlib.util.spec_from_file_location("tune_07_lr", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # defines GRIDS and main; main() runs only as a script
    values = profiles.PROFILES["cpu"]["07_qlora_vs_lora_vs_full"]
    for name, rates in script.GRIDS.values():
        assert values[name] in rates, (name, rates)
