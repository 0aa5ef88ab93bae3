"""LoRA from scratch: a frozen nn.Linear plus a trainable low-rank update (alpha/r)·B·A, equal to peft's layer.

h = W0 x + (alpha / r) · B A x, with A (r × in) random and B (out × r) zero, so training starts at the base model.
Everything here mirrors peft 0.21 (`peft.tuners.lora.layer.Linear`): initialisation and the order its random draws
happen in, dropout on the input of A, the scaling, the CPU float32 detour for 16-bit merges, target-name matching
and the upcast of 16-bit adapters to float32. The tests prove equality with peft bit for bit.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .checks import is_positive_number, is_whole

#: `target_modules` shorthand (as in peft): every nn.Linear except the output head.
ALL_LINEAR = "all-linear"


class LoRALinear(nn.Module):
    """A frozen nn.Linear with a trainable rank-r update; forward = base(x) + B(A(dropout(x))) · scaling."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps an nn.Linear; got {type(base).__name__}.")
        _check_hyperparameters(r, alpha, dropout)
        if r > min(base.in_features, base.out_features):
            warnings.warn(f"r={r} exceeds min(in_features, out_features)={min(base.in_features, base.out_features)} "
                          f"for a {base.out_features}x{base.in_features} layer: BA cannot have rank above that, "
                          "so the extra rank only costs parameters.", UserWarning, stacklevel=2)
        self.base = base
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.A, self.B = _init_factors(base, r)
        self.merged = False

    @property
    def in_features(self) -> int:
        """Input width of the wrapped layer."""
        return self.base.in_features

    @property
    def out_features(self) -> int:
        """Output width of the wrapped layer."""
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the scaled low-rank path; a merged layer is just the base (no extra cost)."""
        result = self.base(x)
        if self.merged:
            return result
        x = x.to(self.A.dtype)  # peft casts the input to the adapter's dtype (float32 adapters on a bf16 model)
        update = F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scaling
        return (result + update).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · B @ A, the (out × in) matrix that merging adds to W0."""
        A, B = self.A, self.B
        # peft computes 16-bit deltas in float32 on CPU (slow 16-bit matmuls there) and casts back
        upcast = A.device.type == "cpu" and B.dtype in (torch.float16, torch.bfloat16)
        delta = (B.float() @ A.float() if upcast else B @ A) * self.scaling
        return delta.to(B.dtype)

    def merge(self) -> None:
        """Fold ΔW into the base weight so inference runs one plain matmul."""
        if self.merged:
            warnings.warn("merge(): this layer is already merged; nothing to do.", UserWarning, stacklevel=2)
            return
        weight = self.base.weight
        if not weight.dtype.is_floating_point:
            raise ValueError(f"Cannot merge into a base weight of dtype {weight.dtype} (a quantized layer); "
                             "dequantize the model first or merge into a 16-bit copy.")
        weight.data += self.delta_weight()
        self.merged = True

    def unmerge(self) -> None:
        """Subtract ΔW again (to keep training, or to switch adapters)."""
        if not self.merged:
            warnings.warn("unmerge(): this layer is not merged; nothing to do.", UserWarning, stacklevel=2)
            return
        weight = self.base.weight
        weight.data -= self.delta_weight().to(weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        """Show the adapter's shape and scaling next to the wrapped layer."""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def _check_hyperparameters(r: int, alpha: float, dropout: float) -> None:
    """Reject ranks, alphas and dropout rates that make no LoRA, before any weight is touched."""
    if not is_whole(r, 1):
        raise ValueError(f"r={r!r} is not a valid LoRA rank; use an integer >= 1 (typical: 4 to 64).")
    if not is_positive_number(alpha):
        raise ValueError(f"alpha={alpha!r} is not valid; use a finite number > 0 (the update is scaled by alpha/r).")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} is not valid; use a probability in [0, 1).")


def _init_factors(base: nn.Linear, r: int) -> tuple[nn.Parameter, nn.Parameter]:
    """A Kaiming-uniform(a=√5), B zero, drawn exactly as peft draws them so one seed gives peft's A."""
    A = torch.empty(r, base.in_features)
    B = torch.empty(base.out_features, r)
    # peft builds lora_A and lora_B as nn.Linear, whose constructors draw a default init (A then B), and then
    # redraws A; making the same three draws keeps us on the same random stream as peft.
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)
    dtype = base.weight.dtype if base.weight.dtype.is_floating_point else None  # quantized bases keep fp32 adapters
    device = base.weight.device
    return nn.Parameter(A.to(device, dtype)), nn.Parameter(B.to(device, dtype))


def lora_parameter_count(in_features: int, out_features: int, r: int) -> int:
    """Trainable parameters LoRA adds to one (out × in) layer: r·in for A plus out·r for B."""
    for name, value in (("in_features", in_features), ("out_features", out_features), ("r", r)):
        if not is_whole(value, 1):
            raise ValueError(f"{name}={value!r} must be an integer >= 1.")
    return r * (in_features + out_features)


def count_lora_parameters(model: nn.Module, target_modules: str | Iterable[str], r: int) -> int:
    """What add_lora(model, target_modules, r) would make trainable, without building anything (works on 'meta')."""
    modules = dict(model.named_modules())
    return sum(lora_parameter_count(modules[n].in_features, modules[n].out_features, r)
               for n in find_targets(model, target_modules))


def _output_head_name(model: nn.Module) -> str | None:
    """Name of the model's output embedding (lm_head), which 'all-linear' leaves alone like peft does."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return next((name for name, module in model.named_modules() if module is head), None) if head is not None else None


def matches_target(name: str, target_modules: str | Iterable[str]) -> bool:
    """peft's rule: a string is a regex that must match the whole name; a list matches a name or a '.'-suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in target_modules)


def find_targets(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """The module names add_lora would wrap, in model order; errors list what exists."""
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        head = _output_head_name(model)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head]
    else:
        if not isinstance(target_modules, str):
            target_modules = list(target_modules)
        names = [n for n, _ in model.named_modules() if n and matches_target(n, target_modules)]
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matches no module. Linear modules in this model "
                         f"(match a suffix, e.g. 'q_proj'): {_linear_leaf_names(model)}.")
    modules = dict(model.named_modules())
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not isinstance(modules[n], nn.Linear)]
    if wrong:
        raise ValueError(f"target_modules={target_modules!r} matches modules that are not nn.Linear: {wrong[:5]}"
                         f"{' ...' if len(wrong) > 5 else ''}. LoRA here wraps nn.Linear only; linear modules: "
                         f"{_linear_leaf_names(model)}.")
    return names


def _linear_leaf_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the model's nn.Linear modules (what target_modules usually lists)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})


def add_lora(model: nn.Module, target_modules: str | Iterable[str], r: int, alpha: float, dropout: float = 0.0,
             use_rslora: bool = False, autocast_adapter_dtype: bool = True) -> list[str]:
    """Freeze the model and wrap each matching nn.Linear in a LoRALinear; return the wrapped names.

    Like peft's get_peft_model: names match by suffix (or a full regex, or 'all-linear'), modules are wrapped in
    model order (so one seed gives the same A's), and 16-bit adapters are upcast to float32 unless
    `autocast_adapter_dtype=False`.
    """
    _check_hyperparameters(r, alpha, dropout)
    if lora_layers(model):
        raise ValueError(f"The model already has LoRA layers ({list(lora_layers(model))[:3]} ...); merge or "
                         "remove them before adding new ones.")
    names = find_targets(model, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lora = LoRALinear(getattr(parent, child), r, alpha, dropout, use_rslora)
        if autocast_adapter_dtype and lora.A.dtype in (torch.float16, torch.bfloat16):
            lora.A, lora.B = nn.Parameter(lora.A.data.float()), nn.Parameter(lora.B.data.float())
        setattr(parent, child, lora)
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in a model, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA layer of a model into its base weight; returns how many were merged."""
    layers = [m for m in lora_layers(model).values() if not m.merged]
    for layer in layers:
        layer.merge()
    return len(layers)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, the numbers peft's print_trainable_parameters reports."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
