"""The QLoRA layer (paper, Eq. 5-6): a frozen 4-bit weight, dequantized on every use; LoRA adds the 16-bit path.

`Frozen4bitLinear` stores packed 4-bit codes (NF4, FP4 or Int4 from `qlora_lab.nf4`) and their absmax
constants, optionally double-quantized (`qlora_lab.double_quant`), and rebuilds the weight in the compute dtype
for every product, forward and backward, exactly as bitsandbytes' `Linear4bit` does; no gradient reaches it.
peft wraps it like any nn.Linear, which adds the trainable LoRA path. bitsandbytes has no Int4 kernel, so the
course's study (`qlora_lab.study`) runs every 4-bit format through this one layer.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import double_quant as dq
from . import nf4


class _Dequant4bitLinear(torch.autograd.Function):
    """y = x W^T with W rebuilt from 4 bits; backward rebuilds W again instead of saving it (bnb's MatMul4Bit)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Frozen4bitLinear") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight(x.dtype), layer.bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return torch.matmul(grad_out, ctx.layer.dequantized_weight(grad_out.dtype)), None


class Frozen4bitLinear(torch.nn.Linear):
    """A frozen nn.Linear stored as packed 4-bit codes (nf4/fp4/int4) + absmax, optionally double-quantized.

    It subclasses nn.Linear for the same reason bitsandbytes' Linear4bit does: peft then wraps it with its
    ordinary LoRA layer. `weight` holds the packed bytes (uint8, frozen); no 16-bit copy is ever kept.
    `rounding` of the double quantization defaults to what bitsandbytes does on the weight's device.
    """

    def __init__(self, q: nf4.Quantized4bit, double_quant: bool = False, compute_dtype: torch.dtype = torch.bfloat16,
                 rounding: str | None = None, bias: torch.Tensor | None = None):
        torch.nn.Module.__init__(self)
        if len(q.shape) != 2:
            raise ValueError(f"Frozen4bitLinear needs a 2-D weight (out, in); got shape {tuple(q.shape)}")
        self.out_features, self.in_features = q.shape
        self.quant_type, self.blocksize, self.double_quant = q.quant_type, q.blocksize, double_quant
        self.compute_dtype = compute_dtype
        self.weight = torch.nn.Parameter(q.packed, requires_grad=False)
        if double_quant:
            d = dq.double_quantize(q.absmax, rounding=rounding or default_rounding(q.packed.device))
            self.dq_blocksize = d.blocksize
            self.register_buffer("absmax_codes", d.codes)
            self.register_buffer("absmax2", d.absmax2)
            self.register_buffer("absmax_offset", d.offset.reshape(()))
        else:
            self.register_buffer("absmax", q.absmax)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    def quantized(self) -> nf4.Quantized4bit:
        """The 4-bit tensor, with the absmax rebuilt from its 8-bit codes when double-quantized."""
        if self.double_quant:
            absmax = dq.dequantize_absmax(dq.DoubleQuantized(self.absmax_codes, self.absmax2, self.absmax_offset,
                                                             self.dq_blocksize))
        else:
            absmax = self.absmax
        return nf4.Quantized4bit(self.weight.data, absmax, self.quant_type, self.blocksize,
                                 torch.Size((self.out_features, self.in_features)), self.compute_dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight the layer computes with, rebuilt on every call (nothing is cached)."""
        return nf4.dequantize_4bit(self.quantized(), dtype or self.compute_dtype)

    def nbytes(self) -> int:
        """Bytes stored: packed codes plus constants (float32 absmax, or uint8 codes + absmax2 + offset)."""
        return sum(t.numel() * t.element_size() for t in (self.weight, *self.buffers()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Dequant4bitLinear.apply(x.to(self.compute_dtype), self)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}"
                f"{'+DQ' if self.double_quant else ''}, blocksize={self.blocksize}, compute={self.compute_dtype}")


def default_rounding(device: torch.device | str) -> str:
    """Double-quantization rounding of bitsandbytes on this device: a lookup table on CPU, exact on CUDA."""
    return "cpu_lut" if torch.device(device).type == "cpu" else "nearest"


def linear_names(model, skip: Sequence[str] = ("lm_head",)) -> list[str]:
    """Names of the nn.Linear layers QLoRA stores in 4 bits (all but the output head)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] not in skip]


def quantize_linears(model, quant_type: str, blocksize: int = 64) -> dict[str, nf4.Quantized4bit]:
    """Quantize every linear weight (but the head) with qlora_lab.nf4, from the weights as loaded (like bnb)."""
    with torch.no_grad():
        return {n: nf4.quantize_4bit(model.get_submodule(n).weight.data, quant_type, blocksize)
                for n in linear_names(model)}


def install_4bit(model, quantized: dict[str, nf4.Quantized4bit], double_quant: bool,
                 compute_dtype: torch.dtype = torch.bfloat16, rounding: str | None = None) -> int:
    """Swap each linear layer for a Frozen4bitLinear holding its 4-bit weight; the 16-bit weight is dropped."""
    rounding = rounding or default_rounding(next(model.parameters()).device)
    for name, q in quantized.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        setattr(parent, child, Frozen4bitLinear(q, double_quant, compute_dtype, rounding, old.bias))
    return len(quantized)
