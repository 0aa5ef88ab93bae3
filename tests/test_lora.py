"""qlora_lab.lora against peft 0.21: same init from the same seed, identical outputs, gradients and merges."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_lab.lora import (
    LoRALinear,
    add_lora,
    count_lora_parameters,
    count_parameters,
    find_targets,
    lora_layers,
    lora_parameter_count,
    merge_lora,
)

SHAPES = [(64, 48), (33, 17), (96, 160)]  # (in_features, out_features)


def _pair(in_f: int, out_f: int, r: int, alpha: float, dropout: float, dtype: torch.dtype, rslora: bool = False):
    """Our layer and peft's, built from copies of one base layer under the same seed."""
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f).to(dtype)
    torch.manual_seed(1)
    ours = LoRALinear(copy.deepcopy(base), r, alpha, dropout, use_rslora=rslora)
    torch.manual_seed(1)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora)
    theirs = PeftLoraLinear(copy.deepcopy(base), "default", config=cfg, r=r, lora_alpha=alpha)
    return ours, theirs


def _randomize_B(ours: LoRALinear, theirs: PeftLoraLinear, seed: int = 2) -> None:
    """B starts at zero; give both layers the same non-zero B so the update path is exercised."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(ours.B.shape, generator=g).to(ours.B.dtype) * 0.1
    ours.B.data.copy_(B)
    theirs.lora_B["default"].weight.data.copy_(B)


@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r,alpha,dropout", [(1, 1, 0.0), (4, 12, 0.1), (16, 40, 0.05)])
def test_layer_equals_peft(in_f, out_f, dtype, r, alpha, dropout):
    ours, theirs = _pair(in_f, out_f, r, alpha, dropout, dtype)
    # same seed -> the same A as peft (same draws in the same order), B zero, same scaling
    assert torch.equal(ours.A, theirs.lora_A["default"].weight)
    assert ours.A.dtype == dtype and not ours.B.any()
    assert ours.scaling == theirs.scaling["default"] == alpha / r
    _randomize_B(ours, theirs)
    x = torch.randn(5, 3, in_f).to(dtype)
    ours.train(), theirs.train()
    torch.manual_seed(3)
    y_ours = ours(x)
    torch.manual_seed(3)  # same dropout mask
    y_theirs = theirs(x)
    assert y_ours.dtype == y_theirs.dtype == dtype
    assert torch.equal(y_ours, y_theirs)
    # the same gradients reach A and B
    y_ours.float().square().sum().backward()
    y_theirs.float().square().sum().backward()
    assert torch.equal(ours.A.grad, theirs.lora_A["default"].weight.grad)
    assert torch.equal(ours.B.grad, theirs.lora_B["default"].weight.grad)
    # merged weights are identical too
    assert torch.equal(ours.delta_weight(), theirs.get_delta_weight("default"))
    ours.merge(), theirs.merge()
    assert torch.equal(ours.base.weight, theirs.base_layer.weight)


def test_dropout_changes_output_only_in_training():
    ours, theirs = _pair(32, 24, 4, 8, 0.5, torch.float32)
    _randomize_B(ours, theirs)
    x = torch.randn(8, 32)
    ours.train()
    torch.manual_seed(4)
    y1 = ours(x)
    torch.manual_seed(5)
    y2 = ours(x)
    assert not torch.equal(y1, y2)  # a different mask
    ours.eval(), theirs.eval()
    assert torch.equal(ours(x), ours(x)) and torch.equal(ours(x), theirs(x))


def test_rslora_scaling_equals_peft():
    ours, theirs = _pair(64, 64, 16, 16, 0.0, torch.float32, rslora=True)
    assert ours.scaling == theirs.scaling["default"] == 16 / math.sqrt(16)
    _randomize_B(ours, theirs)
    x = torch.randn(4, 64)
    assert torch.equal(ours(x), theirs(x))


def test_zero_B_starts_at_the_base_model():
    torch.manual_seed(0)
    base = nn.Linear(40, 30)
    lora = LoRALinear(copy.deepcopy(base), 8, 16)
    x = torch.randn(6, 40)
    assert torch.equal(lora(x), base(x))
    assert lora.A.abs().max() <= 1 / math.sqrt(40)  # Kaiming-uniform(a=√5) bound for fan_in 40


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(dtype):
    ours, theirs = _pair(48, 40, 8, 16, 0.0, dtype)
    _randomize_B(ours, theirs)
    w0 = ours.base.weight.detach().clone()
    x = torch.randn(7, 48).to(dtype)
    y_unmerged = ours(x)
    ours.merge()
    assert ours.merged and not torch.equal(ours.base.weight, w0)
    y_merged = ours(x)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert torch.allclose(y_merged.float(), y_unmerged.float(), atol=tol)
    ours.unmerge()
    assert not ours.merged
    assert torch.allclose(ours.base.weight.float(), w0.float(), atol=1e-6 if dtype == torch.float32 else 1e-2)
    assert torch.allclose(ours(x).float(), y_unmerged.float(), atol=tol)
    # and the round trip leaves exactly what peft's leaves
    theirs.merge(), theirs.unmerge()
    assert torch.equal(ours.base.weight, theirs.base_layer.weight)


def test_merge_twice_warns_and_keeps_weights():
    ours, theirs = _pair(16, 16, 2, 4, 0.0, torch.float32)
    _randomize_B(ours, theirs)
    ours.merge()
    w = ours.base.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        ours.merge()
    assert torch.equal(ours.base.weight, w)
    ours.unmerge()
    with pytest.warns(UserWarning, match="not merged"):
        ours.unmerge()


def test_merge_into_non_float_weight_is_refused():
    base = nn.Linear(16, 8)
    base.weight = nn.Parameter(torch.zeros(8, 16, dtype=torch.int8), requires_grad=False)
    lora = LoRALinear(base, 2, 4)
    assert lora.A.dtype == torch.float32  # adapters stay float on an integer (quantized) base
    with pytest.raises(ValueError, match="torch.int8"):
        lora.merge()


@pytest.mark.parametrize("in_f,out_f,r,expected", [
    (4096, 4096, 8, 65_536),        # 8·4096 + 4096·8
    (576, 192, 8, 6_144),           # SmolLM2 v_proj: 8·576 + 192·8
    (4096, 11008, 64, 966_656),     # Llama-7B up_proj at the QLoRA rank: 64·(4096 + 11008)
    (12288, 12288, 4, 98_304),      # GPT-3 175B Wq at the LoRA paper's r = 4
    (1, 1, 1, 2),
])
def test_lora_parameter_count_by_hand(in_f, out_f, r, expected):
    assert lora_parameter_count(in_f, out_f, r) == expected


@pytest.mark.parametrize("in_f,out_f,r", [(64, 48, 4), (10, 300, 7)])
def test_lora_parameter_count_equals_the_layer(in_f, out_f, r):
    lora = LoRALinear(nn.Linear(in_f, out_f), r, 2 * r)
    assert lora_parameter_count(in_f, out_f, r) == lora.A.numel() + lora.B.numel()


@pytest.mark.parametrize("args", [(0, 4, 4), (4, 0, 4), (4, 4, 0), (4, 4, 2.0), (-3, 4, 4), (True, 4, 4)])
def test_lora_parameter_count_rejects_bad_sizes(args):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        lora_parameter_count(*args)


@pytest.mark.parametrize("r", [0, -1, 2.5, "8", True])
def test_bad_rank_is_refused(r):
    with pytest.raises(ValueError, match=r"r=.* is not a valid LoRA rank"):
        LoRALinear(nn.Linear(8, 8), r, 16)


@pytest.mark.parametrize("alpha", [0, -16, float("nan"), float("inf")])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match=r"alpha=.* is not valid"):
        LoRALinear(nn.Linear(8, 8), 4, alpha)


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_bad_dropout_is_refused(dropout):
    with pytest.raises(ValueError, match="dropout="):
        LoRALinear(nn.Linear(8, 8), 4, 8, dropout)


def test_rank_above_layer_size_warns():
    with pytest.warns(UserWarning, match=r"r=12 exceeds min\(in_features, out_features\)=10"):
        LoRALinear(nn.Linear(10, 20), 12, 12)


def test_non_linear_base_is_refused():
    with pytest.raises(ValueError, match="got Embedding"):
        LoRALinear(nn.Embedding(10, 4), 2, 4)


# ---- whole models: add_lora against get_peft_model ------------------------------------------------------------

def _tiny_llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A 2-layer random Llama with every module kind the course targets (q/k/v/o, gate/up/down, lm_head)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear",
                                     r".*\.1\.mlp\.(up|down)_proj"])
def test_add_lora_equals_get_peft_model(dtype, targets):
    model = _tiny_llama(dtype)
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(7)
    names = add_lora(ours, targets, r=8, alpha=12, dropout=0.1)
    torch.manual_seed(7)
    cfg = LoraConfig(r=8, lora_alpha=12, lora_dropout=0.1,
                     target_modules=targets if isinstance(targets, str) else list(targets))
    peft_model = get_peft_model(theirs, cfg)
    assert sorted(names) == sorted(peft_model.targeted_module_names)
    assert count_parameters(ours) == peft_model.get_nb_trainable_parameters()
    assert count_lora_parameters(model, targets, 8) == count_parameters(ours)[0]
    peft_layers = dict(peft_model.base_model.model.named_modules())
    g = torch.Generator().manual_seed(11)
    for name, layer in lora_layers(ours).items():
        twin = peft_layers[name]
        assert layer.A.dtype == twin.lora_A["default"].weight.dtype == torch.float32  # 16-bit adapters upcast
        assert torch.equal(layer.A, twin.lora_A["default"].weight)  # same seed, same A in every layer
        B = torch.randn(layer.B.shape, generator=g) * 0.05
        layer.B.data.copy_(B)
        twin.lora_B["default"].weight.data.copy_(B)
    ids = torch.randint(0, 101, (2, 12), generator=g)
    ours.train(), peft_model.train()
    torch.manual_seed(12)
    logits_ours = ours(ids).logits
    torch.manual_seed(12)
    logits_theirs = peft_model(ids).logits
    assert torch.equal(logits_ours, logits_theirs)
    # merge and unmerge (16-bit base, float32 adapters: the casts must happen where peft does them)
    pairs = [(layer, peft_layers[name]) for name, layer in lora_layers(ours).items()]
    merge_lora(ours)
    peft_model.merge_adapter()
    assert all(torch.equal(layer.base.weight, twin.base_layer.weight) for layer, twin in pairs)
    for layer, _ in pairs:
        layer.unmerge()
    peft_model.unmerge_adapter()
    assert all(torch.equal(layer.base.weight, twin.base_layer.weight) for layer, twin in pairs)
    merge_lora(ours)
    merged = peft_model.merge_and_unload()
    ours_state = {k.replace(".base.", "."): v for k, v in ours.state_dict().items()
                  if not k.endswith((".A", ".B"))}
    for key, value in merged.state_dict().items():
        assert torch.equal(ours_state[key], value), key


def test_add_lora_freezes_all_but_adapters():
    model = _tiny_llama()
    names = add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    assert len(names) == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in names for p in ("A", "B")}


def test_matching_is_by_suffix_like_peft():
    model = _tiny_llama()
    assert find_targets(model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert find_targets(model, ["1.self_attn.q_proj"]) == ["model.layers.1.self_attn.q_proj"]
    assert find_targets(model, ["model.layers.0.mlp.up_proj"]) == ["model.layers.0.mlp.up_proj"]
    assert "lm_head" not in find_targets(model, "all-linear")
    with pytest.raises(ValueError, match="matches no module"):
        find_targets(model, ["proj"])  # part of a name is not a suffix match
    with pytest.raises(ValueError, match="matches no module"):
        find_targets(model, "q_proj")  # a string is a regex on the whole name


def test_unknown_target_lists_the_linear_modules():
    model = _tiny_llama()
    with pytest.raises(ValueError) as err:
        add_lora(model, ["query", "value"], r=4, alpha=8)
    message = str(err.value)
    assert "['query', 'value']" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert f"'{name}'" in message
    assert all(p.requires_grad for p in model.parameters())  # nothing was changed


@pytest.mark.parametrize("targets,first", [(["embed_tokens"], "model.embed_tokens (Embedding)"),
                                           (["mlp"], "model.layers.0.mlp (LlamaMLP)")])
def test_target_that_is_not_linear_is_refused(targets, first):
    model = _tiny_llama()
    with pytest.raises(ValueError, match=re.escape(f"not nn.Linear: ['{first}'")):
        add_lora(model, targets, r=4, alpha=8)
    assert not lora_layers(model)


def test_bad_rank_leaves_the_model_alone():
    model = _tiny_llama()
    with pytest.raises(ValueError, match="r=0"):
        add_lora(model, ["q_proj"], r=0, alpha=8)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_second_add_lora_is_refused():
    model = _tiny_llama()
    add_lora(model, ["q_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        add_lora(model, ["v_proj"], r=4, alpha=8)
