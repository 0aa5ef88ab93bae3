"""qlora_lab.linear4bit: the frozen 4-bit layer computes with its dequantized weight and keeps no 16-bit copy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlora_lab import linear4bit, nf4

@pytest.mark.parametrize("quant_type", nf4.QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_frozen_layer_computes_with_the_dequantized_weight(quant_type, double_quant):
    w = torch.randn(96, 128) * 0.05
    q = nf4.quantize_4bit(w.to(torch.bfloat16), quant_type, 64)
    layer = linear4bit.Frozen4bitLinear(q, double_quant, rounding="nearest")
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(layer.dequantized_weight(dtype), nf4.dequantize_4bit(layer.quantized(), dtype))
    if not double_quant:
        assert torch.equal(layer.dequantized_weight(), nf4.dequantize_4bit(q, torch.bfloat16))


def test_frozen_layer_matches_dense_math_but_saves_no_16bit_weight():
    w = (torch.randn(128, 192) * 0.05).to(torch.bfloat16)
    layer = linear4bit.Frozen4bitLinear(nf4.quantize_4bit(w, "nf4", 64), double_quant=True, rounding="nearest")
    dense_w = layer.dequantized_weight()
    x = torch.randn(5, 192, dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(("dense", *t.shape)) or t, lambda t: t):
        y_ref = F.linear(x_ref, dense_w)
    assert torch.equal(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    assert [s for s in saved if s[0] != "dense"] == []  # ours saves nothing: backward re-reads the packed codes
    assert ("dense", 192, 128) in saved  # a plain frozen linear keeps its 16-bit weight (transposed) for backward
    assert not layer.weight.requires_grad and layer.weight.dtype == torch.uint8
    assert layer.nbytes() == 128 * 192 // 2 + 384 + 4 * 2 + 4  # codes, 8-bit absmax, 2 absmax2, offset


def test_frozen_layer_rejects_non_matrix():
    q = nf4.quantize_4bit(torch.randn(64), "nf4", 64)
    with pytest.raises(ValueError, match=r"2-D weight.*\(64,\)"):
        linear4bit.Frozen4bitLinear(q)
