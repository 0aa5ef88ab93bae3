"""bf16 products on a CPU without bf16 units: multiplied in float32, rounded once, dtypes and autograd intact."""

import torch

from qlora_lab import bf16_cpu


def _products(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"mm": a @ b, "addmm": torch.addmm(bias, a, b), "linear": torch.nn.functional.linear(a, b.t(), bias),
            "bmm": torch.bmm(a.unsqueeze(0).repeat(2, 1, 1), b.unsqueeze(0).repeat(2, 1, 1))}


def test_a_bf16_product_is_the_float32_product_rounded_once():
    torch.manual_seed(0)
    a, b, bias = torch.randn(64, 96).bfloat16(), torch.randn(96, 48).bfloat16(), torch.randn(48).bfloat16()
    with bf16_cpu.Float32Products():
        got = _products(a, b, bias)
    exact = (a.double() @ b.double())
    for name, value in got.items():
        assert value.dtype == torch.bfloat16, name
        expected = exact + (bias.double() if name in ("addmm", "linear") else 0)
        # float32 accumulation, then one rounding to bf16: within one bf16 step (2^-8 relative) of the exact value
        step = expected.abs().clamp(min=1e-2) * 2 ** -8
        assert ((value.double() - expected).abs() <= step).all(), name


def test_other_dtypes_and_mixed_inputs_are_left_alone():
    a32, b32 = torch.randn(8, 8), torch.randn(8, 8)
    with bf16_cpu.Float32Products():
        assert torch.equal(a32 @ b32, torch.mm(a32, b32))  # float32 runs as it is
        try:
            a32 @ b32.bfloat16()  # a mixed product stays the error torch gives, never silently widened
        except RuntimeError as err:
            assert "dtype" in str(err)
        else:
            raise AssertionError("a float32 x bf16 product must still fail")


def test_gradients_keep_their_dtypes():
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    with bf16_cpu.Float32Products():
        torch.nn.functional.linear(x, w).float().square().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.bfloat16
    x2, w2 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    torch.nn.functional.linear(x2, w2).square().sum().backward()
    assert torch.allclose(w.grad.float(), w2.grad, rtol=2 ** -6, atol=1e-2)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(bf16_cpu.ENV, "native")
    assert not bf16_cpu.needed()
    monkeypatch.delenv(bf16_cpu.ENV)
    assert bf16_cpu.needed() == (not torch.cuda.is_available() and not bf16_cpu.cpu_has_fast_bf16())
