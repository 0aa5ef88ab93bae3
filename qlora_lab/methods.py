"""The six methods of the study as trainable models, and the fair check that our QLoRA equals bitsandbytes + peft.

16-bit full fine-tuning, 16-bit LoRA, and QLoRA with four 4-bit base formats (NF4 + double quantization, NF4,
FP4, Int4). bitsandbytes has no Int4 kernel, so every 4-bit variant uses the same frozen layer,
`qlora_lab.linear4bit.Frozen4bitLinear`, and only its 16-value code changes. `fair_check` proves the NF4+DQ
variant gives the loss, logits and LoRA gradients of transformers + bitsandbytes + peft on one batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Sequence

import torch

from . import data, models, nf4
from .linear4bit import Frozen4bitLinear, install_4bit, quantize_linears

if TYPE_CHECKING:
    from .study import StudyConfig

#: The methods a study can run, in table order.
METHODS = ("full", "lora", "qlora_nf4_dq", "qlora_nf4", "qlora_fp4", "qlora_int4")
LABELS = {"full": "16-bit full", "lora": "16-bit LoRA", "qlora_nf4_dq": "QLoRA NF4+DQ",
          "qlora_nf4": "QLoRA NF4", "qlora_fp4": "QLoRA FP4", "qlora_int4": "QLoRA Int4"}
#: 4-bit methods -> (code, double quantization of the absmax constants).
QUANT = {"qlora_nf4_dq": ("nf4", True), "qlora_nf4": ("nf4", False), "qlora_fp4": ("fp4", False),
         "qlora_int4": ("int4", False)}
class StudyError(ValueError):
    """A study setting that cannot work; the message names the value and what is allowed."""


def check_methods(methods: Sequence[str]) -> None:
    """Every method must be one the runner knows; the error lists them."""
    if isinstance(methods, str) or not methods:
        raise StudyError(f"methods={methods!r}: give a list of one or more of {list(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise StudyError(f"Unknown method(s) {unknown}; allowed: {list(METHODS)}")
    if len(set(methods)) != len(methods):
        raise StudyError(f"methods={list(methods)!r} lists a method twice")


# ------------------------------------------------------------------------------------------------ models
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base(model_name: str | None, dtype: torch.dtype, layers: int | None = None, quantization: str | None = None):
    """The base model in `dtype` (or through bitsandbytes), optionally cut to its first `layers` blocks."""
    model = models.load_model(model_name, quantization=quantization, compute_dtype=dtype, num_hidden_layers=layers)
    if quantization is None:
        model.to(default_device())
    return model


def with_lora(model, cfg: StudyConfig, seed: int):
    """peft LoRA on every linear layer but the head (r, alpha, dropout from cfg), adapters in the compute dtype."""
    torch.manual_seed(seed)  # the seed picks the A matrices
    return models.add_lora_adapters(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, "all-linear",
                                    adapter_dtype=cfg.dtype)


class QuantCache(dict):
    """Quantized base weights per 4-bit code, made once and shared by every seed (and by NF4 and NF4+DQ)."""

    def get_for(self, model, quant_type: str, blocksize: int) -> dict[str, nf4.Quantized4bit]:
        """The cached 4-bit weights of this code and block size (one cache serves one base model)."""
        key = (quant_type, blocksize)
        if key not in self:
            self[key] = quantize_linears(model, quant_type, blocksize)
        return self[key]


def build_model(method: str, cfg: StudyConfig, seed: int, cache: QuantCache | None = None):
    """The trainable model of a method: fp32 master weights for full, frozen 16/4-bit base + LoRA otherwise."""
    check_methods([method])
    if method == "full":
        # Mixed precision: float32 master weights, bf16 compute under autocast. Pure-bf16 weights would lose
        # most Adam updates (an update of ~lr is below half a bf16 step of a typical weight).
        model = load_base(cfg.model_name, torch.float32, cfg.num_layers)
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        return model
    model = load_base(cfg.model_name, cfg.dtype, cfg.num_layers)
    if method in QUANT:
        model = build_with_base(model, method, cfg, seed, cache if cache is not None else QuantCache())
    else:
        model = with_lora(model, cfg, seed)
    model.train()
    return model


def autocast_for(model) -> contextlib.AbstractContextManager:
    """bf16 autocast for a float32 (full fine-tuning) model; nothing for models already in 16 bits."""
    param = next(model.parameters())
    if param.dtype == torch.float32:
        return torch.autocast(param.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()



# -------------------------------------------------------------------------------------------- fair check
@dataclass
class FairCheck:
    """Our NF4+DQ layer + peft against bitsandbytes' Linear4bit + peft, same LoRA weights, one batch."""

    loss_ours: float
    loss_bnb: float
    max_logit_diff: float
    max_grad_rel_diff: float
    layers: int
    layers_same_bytes: int
    tolerance: float
    device: str
    other: dict[str, float] = field(default_factory=dict)

    @property
    def loss_diff(self) -> float:
        return abs(self.loss_ours - self.loss_bnb)

    @property
    def passed(self) -> bool:
        return self.loss_diff <= self.tolerance and self.layers_same_bytes == self.layers


#: Allowed |loss difference| in the fair check. On CPU both paths run F.linear on bit-identical bf16 weights,
#: so the losses agree exactly (0 allowed beyond float32 printing noise); on CUDA bitsandbytes may use a fused
#: 4-bit GEMM that sums in another order, which moves a bf16 loss by about one bf16 step of the logits.
FAIR_TOLERANCE = {"cpu": 1e-6, "cuda": 2e-2}


def _bnb_state(layer) -> tuple[torch.Tensor, Any]:
    return layer.weight.data, layer.weight.quant_state


def _same_bytes(ours: Frozen4bitLinear, bnb_layer) -> bool:
    """Packed codes and every double-quantization constant identical to bitsandbytes'."""
    packed, state = _bnb_state(bnb_layer)
    return (torch.equal(ours.weight.data.view(-1), packed.view(-1)) and torch.equal(ours.absmax_codes, state.absmax)
            and torch.equal(ours.absmax2, state.state2.absmax) and torch.equal(ours.absmax_offset.reshape(()),
                                                                                 state.offset.reshape(())))


def _loss_and_grads(model, batch) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(out.loss.detach()), out.logits.detach().float(), grads


def _randomize_lora_b(model, seed: int, std: float = 0.01) -> None:
    """Seeded non-zero B matrices, so the adapters change the output and both A and B get gradients."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def fair_check(cfg: StudyConfig, seed: int = 0, rows: int = 4,
               compare: Sequence[str] = ("qlora_nf4", "qlora_fp4"), cache: QuantCache | None = None) -> FairCheck:
    """Loss and LoRA gradients of our NF4+DQ model vs the transformers + bitsandbytes + peft model on one batch.

    The adapters get seeded random A and B (B is zero at the start of training, which would leave the adapters
    out of the loss), copied from our model into theirs. LoRA dropout is 0 in both (its masks are random),
    everything else is the study's setting. `compare`
    lists other 4-bit variants whose loss against the same bitsandbytes model is also reported: they must
    differ by far more than the tolerance, or the check could not tell formats apart. Pass the study's
    `cache` to reuse the quantized weights.
    """
    cfg = replace(cfg, lora_dropout=0.0)
    tokenizer = models.load_tokenizer(cfg.model_name)
    texts = list(data.load_guanaco(cfg.data_source, "train")["text"])
    device = default_device()
    collator = data.GuanacoCollator(tokenizer, max_length=cfg.max_length, train_on=cfg.train_on)
    batch = {k: v.to(device) for k, v in collator(texts[:rows]).items()}

    layers = cfg.num_layers
    cache = cache if cache is not None else QuantCache()
    ours = build_with_base(load_base(cfg.model_name, cfg.dtype, layers), "qlora_nf4_dq", cfg, seed, cache)
    _randomize_lora_b(ours, seed)  # B = 0 would leave the adapters out of the loss (and A without gradient)
    theirs = with_lora(load_base(cfg.model_name, cfg.dtype, layers, quantization="nf4"), cfg, seed)
    lora_state = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    missing = theirs.load_state_dict(lora_state, strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"LoRA weights do not line up with the bitsandbytes model: {missing.unexpected_keys[:3]}")
    ours.train()
    theirs.train()
    loss_a, logits_a, grads_a = _loss_and_grads(ours, batch)
    loss_b, logits_b, grads_b = _loss_and_grads(theirs, batch)
    rel = max(float((grads_a[n] - grads_b[n]).abs().max() / grads_b[n].abs().max().clamp(min=1e-30))
              for n in grads_b)
    bnb_modules = dict(theirs.named_modules())
    pairs = [(n, m) for n, m in ours.named_modules() if isinstance(m, Frozen4bitLinear)]
    same = sum(_same_bytes(m, bnb_modules[n]) for n, m in pairs)
    other = {}
    del theirs, bnb_modules
    for method in compare:
        variant = build_with_base(load_base(cfg.model_name, cfg.dtype, layers), method, cfg, seed, cache)
        variant.load_state_dict(lora_state, strict=False)
        variant.train()
        other[method] = _loss_and_grads(variant, batch)[0]
        del variant
    return FairCheck(loss_a, loss_b, float((logits_a - logits_b).abs().max()), rel, len(pairs), same,
                     FAIR_TOLERANCE[device.type], device.type, other)


def build_with_base(base, method: str, cfg: StudyConfig, seed: int, cache: QuantCache):
    """A 4-bit method built on an already loaded 16-bit base (the fair check cuts the model short)."""
    quant_type, double_quant = QUANT[method]
    install_4bit(base, cache.get_for(base, quant_type, cfg.blocksize), double_quant, cfg.dtype)
    return with_lora(base, cfg, seed)
