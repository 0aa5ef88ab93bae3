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


def test_gradients_keep_their_dtypes_and_bf16_accuracy():
    torch.manual_seed(0)
    x0, w0 = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16)

    def grads(mode: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = x0.clone().to(dtype).requires_grad_(), w0.clone().to(dtype).requires_grad_()
        with bf16_cpu.Float32Products() if mode else bf16_cpu.native():
            torch.nn.functional.linear(x, w).float().square().sum().backward()
        return x.grad, w.grad

    xg, wg = grads(True, torch.bfloat16)
    assert xg.dtype == wg.dtype == torch.bfloat16  # autograd above the products is untouched
    ref = grads(False, torch.float32)[1]
    native = grads(False, torch.bfloat16)[1]
    # as close to the float32 gradient as torch's own bf16 arithmetic is (both round the forward output to bf16)
    assert (wg.float() - ref).abs().max() <= 2 * (native.float() - ref).abs().max() + 1e-6


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(bf16_cpu.ENV, "native")
    assert not bf16_cpu.needed()
    monkeypatch.delenv(bf16_cpu.ENV)
    assert bf16_cpu.needed() == (not torch.cuda.is_available() and not bf16_cpu.cpu_has_fast_bf16())


def test_measured_memory_is_what_bf16_itself_allocates():
    from qlora_lab import measure

    a, b = torch.randn(256, 512).bfloat16(), torch.randn(512, 128).bfloat16()
    with bf16_cpu.Float32Products(), measure.record_allocations("cpu") as events:
        out = a @ b
    allocated = [n for _, _, n in events if n > 0]
    assert allocated == [out.numel() * 2], allocated  # only the bf16 result: no float32 copies inside


def test_it_steps_aside_only_for_models_without_bf16(monkeypatch):
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    mode = bf16_cpu.Float32Products()
    monkeypatch.setattr(bf16_cpu, "_mode", mode)
    fp32, bf16 = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).bfloat16()
    with bf16_cpu.native(), mode:  # the stack holds this mode alone, as after enable()
        with bf16_cpu.off_for(fp32):
            assert _get_current_dispatch_mode_stack() == []  # no per-op Python call for a float32 model
        assert _get_current_dispatch_mode_stack() == [mode]
        with bf16_cpu.off_for(fp32, bf16):
            assert _get_current_dispatch_mode_stack() == [mode]  # a bf16 weight keeps the products routed
        with bf16_cpu.Float32Products() as other, bf16_cpu.off_for(fp32):
            assert _get_current_dispatch_mode_stack() == [mode, other]  # another mode on top: left as it is
        with torch.autocast("cpu", dtype=torch.bfloat16), bf16_cpu.off_for(fp32):
            assert _get_current_dispatch_mode_stack() == [mode]  # autocast makes a float32 model's products bf16
        with bf16_cpu.off_for(fp32, bf16_autocast=True):
            assert _get_current_dispatch_mode_stack() == [mode]  # autocast that will be turned on inside


def test_reused_weights_widen_each_weight_once_and_change_no_bit(monkeypatch):
    mode = bf16_cpu.Float32Products()
    monkeypatch.setattr(bf16_cpu, "_mode", mode)
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32, bias=False).bfloat16().requires_grad_(False)
    xs = [torch.randn(5, 64).bfloat16() for _ in range(3)]
    with mode:
        plain = [layer(x) for x in xs]
        widened = []
        monkeypatch.setattr(bf16_cpu, "_wide_empty", lambda shape, f=bf16_cpu._wide_empty: widened.append(shape) or f(shape))
        with bf16_cpu.reused_weights(layer):
            reused = [layer(x) for x in xs]
            assert widened.count((64, 32)) == 1  # the weight (as W.t()) once; each input every time
            assert widened.count((5, 64)) == 3
            layer.weight.mul_(2)  # a write inside the block: the next product widens the new values
            doubled = layer(xs[0])
        assert bf16_cpu._reused is None
    assert all(torch.equal(a, b) for a, b in zip(plain, reused))
    with mode:
        assert torch.equal(doubled, layer(xs[0]))
