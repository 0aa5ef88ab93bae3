"""qlora_lab.double_quant against bitsandbytes 0.50's `compress_statistics=True` QuantState."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch

from qlora_lab import double_quant as dq
from qlora_lab import nf4


def bnb_nested(w: torch.Tensor, blocksize: int = 64):
    """bitsandbytes' packed weight and nested QuantState (NF4 + double quantization)."""
    return bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)


def quant_state_bytes(packed: torch.Tensor, state) -> int:
    """Every byte a bnb 4-bit weight stores per tensor: packed data, absmax, and the nested constants."""
    total = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        total += state.offset.numel() * state.offset.element_size()
        total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


@pytest.fixture(scope="module")
def big():
    """A 4096x4096 weight quantized by bnb (with DQ) and by us: the shape the paper's arithmetic assumes."""
    torch.manual_seed(0)
    w = torch.randn(4096, 4096) * 0.02
    packed, state = bnb_nested(w)
    return w, packed, state, nf4.quantize_4bit(w)


def test_dynamic_map_equals_bitsandbytes():
    ours = dq.dynamic_map()
    assert ours.dtype == torch.float32 and ours.numel() == 256
    assert torch.equal(ours, bnbf.create_dynamic_map())
    assert ours[-1] == 1 and (ours == 0).sum() == 1 and bool((ours.diff() > 0).all())


def test_first_level_absmax_and_second_level_constants_equal_bnb(big):
    _, _, state, q = big
    d = dq.double_quantize(q.absmax)
    assert state.nested and torch.equal(d.offset, state.offset)
    assert torch.equal(d.absmax2, state.state2.absmax)
    assert torch.equal(state.state2.code, dq.dynamic_map())


def test_cpu_lut_rounding_reproduces_bnb_cpu_codes_byte_for_byte(big):
    _, _, state, q = big
    assert torch.equal(dq.double_quantize(q.absmax, rounding="cpu_lut").codes, state.absmax)


def test_exact_nearest_is_never_worse_than_bnb_cpu_and_rarely_differs(big):
    _, _, state, q = big
    d = dq.double_quantize(q.absmax)
    code = dq.dynamic_map()
    target = ((q.absmax - d.offset).view(-1, 256) / d.absmax2.unsqueeze(1)).view(-1)
    ours = (code[d.codes.long()] - target).abs()
    theirs = (code[state.absmax.long()] - target).abs()
    assert bool((ours <= theirs + 1e-7).all())
    differ = int((d.codes != state.absmax).sum())
    assert 0 < differ < d.codes.numel() // 100  # the LUT picks a neighbour for a few codes (notebook 03, section 8)


def test_dequantize_absmax_equals_bnb_and_so_does_the_4bit_weight(big):
    _, packed, state, q = big
    from_bnb_codes = dq.DoubleQuantized(state.absmax, state.state2.absmax, state.offset, 256)
    absmax = dq.dequantize_absmax(from_bnb_codes)
    assert torch.equal(absmax, bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset)
    ours = nf4.dequantize_4bit(nf4.Quantized4bit(q.packed, absmax, "nf4", 64, q.shape, q.dtype))
    assert torch.equal(ours, bnbf.dequantize_4bit(packed, state))


def test_double_quant_error_is_at_most_half_a_map_gap(big):
    _, _, _, q = big
    d = dq.double_quantize(q.absmax)
    err = (dq.dequantize_absmax(d) - q.absmax).abs().view(-1, 256)
    half_gap = dq.dynamic_map().diff().max() / 2
    assert bool((err <= half_gap * d.absmax2.unsqueeze(1) * 1.001 + 1e-9).all())
    assert float((err.view(-1) / q.absmax).max()) < 0.02


@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 77), (300,), (64 * 256 + 1,)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_storage_bytes_equal_bnb_quant_state(big, shape, double_quant):
    if shape == (4096, 4096):
        packed, state = big[1], big[2]
        if not double_quant:
            packed, state = bnbf.quantize_4bit(big[0], blocksize=64, quant_type="nf4")
    else:
        w = torch.randn(shape)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    numel = torch.Size(shape).numel()
    assert dq.storage_bytes(numel, 64, double_quant)["total"] == quant_state_bytes(packed, state)
    if double_quant:
        q = nf4.quantize_4bit(torch.randn(shape))
        assert q.packed.numel() + dq.double_quantize(q.absmax).nbytes() == quant_state_bytes(packed, state)


def test_bits_per_parameter_exact_figures():
    assert dq.bits_per_parameter() == 4.126953125
    assert dq.bits_per_parameter(double_quant=False) == 4.5
    assert dq.bits_per_parameter(256, double_quant=False) == 4.125
    parts = dq.storage_bytes(4096 * 4096)
    assert parts == {"packed": 8388608, "absmax": 262144, "absmax2": 4096, "offset": 4, "total": 8654852}
    # per-tensor offset aside, bytes * 8 / n is the per-parameter figure
    assert (parts["total"] - parts["offset"]) * 8 / 4096**2 == dq.bits_per_parameter()


def test_an_all_constant_absmax_block_matches_bnb():
    w = torch.zeros(64 * 512)
    w[::64] = 0.5  # every 64-block has absmax 0.5, so absmax - mean is 0 in every 256-block
    packed, state = bnb_nested(w)
    q = nf4.quantize_4bit(w)
    lut = dq.double_quantize(q.absmax, rounding="cpu_lut")
    assert torch.equal(lut.absmax2, state.state2.absmax) and bool((lut.absmax2 == 0).all())
    assert torch.equal(lut.codes, state.absmax)
    assert torch.equal(dq.dequantize_absmax(dq.double_quantize(q.absmax)), q.absmax)


@pytest.mark.parametrize("call, match", [
    (lambda: dq.double_quantize(torch.ones(8, dtype=torch.float16)), "float32"),
    (lambda: dq.double_quantize(torch.ones(0)), "empty"),
    (lambda: dq.double_quantize(torch.tensor([1.0, float("nan"), float("inf")])), "2 non-finite"),
    (lambda: dq.double_quantize(torch.ones(8), blocksize=0), "positive integer"),
    (lambda: dq.double_quantize(torch.ones(8), rounding="floor"), "'nearest', 'cpu_lut'"),
    (lambda: dq.bits_per_parameter(blocksize=48), "32, 64"),
    (lambda: dq.bits_per_parameter(dq_blocksize=-1), "dq_blocksize"),
    (lambda: dq.storage_bytes(0), "numel"),
])
def test_errors_name_the_value(call, match):
    with pytest.raises(nf4.QuantizationError, match=match):
        call()
