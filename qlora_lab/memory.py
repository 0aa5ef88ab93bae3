"""Training-memory budget of full fine-tuning, LoRA and QLoRA, estimated from the architecture alone.

The measurement that checks it, a real training step accounted tensor by tensor, is `qlora_lab.measure`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .checks import is_whole, require_bool, require_choice, require_whole
from .double_quant import DQ_BLOCKSIZE
from .nf4 import BLOCKSIZE as NF4_BLOCKSIZE

ESTIMATOR_METHODS = ("full", "lora", "qlora")
#: How the training state is split over `world_size` GPUs: "none" (one GPU, or DDP: every GPU holds a full
#: copy) or "fsdp_full_shard" (weights, gradients and optimizer state cut into world_size shards; DeepSpeed
#: ZeRO-3 shards the same three).
SHARDINGS = ("none", "fsdp_full_shard")
#: Optimizer names (transformers' `optim` spelling where one exists) -> (state bits, paged).
OPTIMIZER_STATE: dict[str, tuple[int, bool]] = {
    "adamw": (32, False),
    "adamw_32bit": (32, False),
    "adamw_8bit": (8, False),
    "paged_adamw": (32, True),
    "paged_adamw_32bit": (32, True),
    "paged_adamw_8bit": (8, True),
}
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Which tensor each linear layer reads: LoRA adapters on the same input share one saved copy.
LINEAR_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}
#: bitsandbytes constants the estimator assumes (read in bitsandbytes 0.50 and checked by the tests); the 4-bit
#: block sizes live in nf4 and double_quant.
OPT8_BLOCKSIZE = 256          # 8-bit optimizer: values per float32 absmax
OPT8_MIN_SIZE = 4096          # bnb keeps tensors with fewer elements in 32-bit state
PAGED_MIN_SIZE = 100_000      # bnb pages only optimizer state of tensors with at least this many elements
GB = 1e9                      # the paper writes decimal GB


@dataclass(frozen=True)
class Architecture:
    """The shape numbers of a Llama-family decoder that memory depends on."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of the seven linear layers of one decoder block."""
        h, m, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder blocks' linear layers (the ones QLoRA stores in 4 bits)."""
        return self.layers * sum(i * o for i, o in self.linear_shapes().values())

    @property
    def other_params(self) -> int:
        """Embeddings, LM head (unless tied) and RMSNorm weights: kept in 16 bits by QLoRA."""
        heads = 1 if self.tied_embeddings else 2
        return heads * self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        """All parameters."""
        return self.linear_params + self.other_params


def _preset(name: str, h: int, m: int, layers: int, heads: int, kv: int | None = None) -> Architecture:
    return Architecture(name, h, m, layers, heads, kv or heads, h // heads, 32000)


#: Published configurations (LLaMA paper Table 2 / the released config.json files; Llama 2 70B uses 8 KV heads).
PRESETS: dict[str, Architecture] = {
    "llama-7b": _preset("llama-7b", 4096, 11008, 32, 32),
    "llama-13b": _preset("llama-13b", 5120, 13824, 40, 40),
    "llama-33b": _preset("llama-33b", 6656, 17920, 60, 52),
    "llama-65b": _preset("llama-65b", 8192, 22016, 80, 64),
    "llama-2-70b": _preset("llama-2-70b", 8192, 28672, 80, 64, kv=8),
}


def architecture(model: Any) -> Architecture:
    """Read the architecture from a preset name, a transformers config, or a model (its .config)."""
    if isinstance(model, Architecture):
        return model
    if isinstance(model, str):
        if model not in PRESETS:
            raise ValueError(f"Unknown model preset {model!r}; choose one of {sorted(PRESETS)}, "
                             "or pass a transformers config or model.")
        return PRESETS[model]
    config = getattr(model, "config", model)
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in needed if not hasattr(config, k)]
    if missing:
        raise ValueError(f"Cannot read a Llama-style architecture from {type(model).__name__}: it lacks "
                         f"{missing}. Pass a preset name ({sorted(PRESETS)}), a LlamaConfig-like config or model.")
    heads = config.num_attention_heads
    return Architecture(
        name=os.path.basename(str(getattr(config, "name_or_path", "")).rstrip("/")) or config.model_type,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=config.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


@dataclass
class MemoryBreakdown:
    """Bytes of one training step by component, and the assumptions that produced them."""

    weights: float = 0.0
    quant_constants: float = 0.0
    lora_weights: float = 0.0
    gradients: float = 0.0
    optimizer_state: float = 0.0
    activations: float = 0.0
    total: float = 0.0
    pageable: float = 0.0
    optimizer_temporaries: float = 0.0
    cpu_offloaded: float = 0.0  # bytes per process that CPU offload keeps in CPU RAM instead (not in total)
    assumptions: list[str] = field(default_factory=list)

    COMPONENTS = ("weights", "quant_constants", "lora_weights", "gradients", "optimizer_state", "activations")

    def as_dict(self, unit: float = 1.0, digits: int | None = None) -> dict[str, float]:
        """The byte counts (components, total, pageable) divided by `unit`, optionally rounded."""
        out = {}
        for f in fields(self):
            if f.name != "assumptions" and (f.name != "cpu_offloaded" or self.cpu_offloaded):
                v = getattr(self, f.name) / unit
                out[f.name] = round(v, digits) if digits is not None else v
        return out


def _dtype_bytes(dtype: torch.dtype) -> int:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"compute_dtype={dtype!r} must be a floating torch dtype such as torch.bfloat16")
    return torch.empty((), dtype=dtype).element_size()


def resolve_lora_targets(arch: Architecture, targets: str | list[str] | tuple[str, ...]) -> list[str]:
    """Resolve "all-linear" (peft: every linear but the LM head) or a list of layer names; reject unknown ones."""
    if targets == "all-linear":
        return list(LINEAR_NAMES)
    names = [targets] if isinstance(targets, str) else list(targets)
    unknown = [n for n in names if n not in LINEAR_NAMES]
    if unknown or not names:
        raise ValueError(f"lora_targets {unknown or names!r} not understood; use 'all-linear' or names from "
                         f"{list(LINEAR_NAMES)}.")
    return [n for n in LINEAR_NAMES if n in names]


def lora_tensor_sizes(arch: Architecture, r: int, targets: list[str]) -> list[int]:
    """Element counts of every LoRA A (r x in) and B (out x r) matrix in the model."""
    shapes = arch.linear_shapes()
    sizes = []
    for name in targets:
        i, o = shapes[name]
        if r < 1 or r > min(i, o):
            raise ValueError(f"lora_r={r} must be between 1 and min(in, out)={min(i, o)} of {name}")
        sizes += [r * i, o * r]
    return sizes * arch.layers


def _full_tensor_sizes(arch: Architecture) -> list[int]:
    """Element counts of every parameter tensor (full fine-tuning trains them all)."""
    per_layer = [i * o for i, o in arch.linear_shapes().values()] + [arch.hidden, arch.hidden]
    heads = [arch.vocab * arch.hidden] * (1 if arch.tied_embeddings else 2)
    return per_layer * arch.layers + heads + [arch.hidden]


def optimizer_state_bytes(sizes: list[int], optimizer: str = "adamw") -> tuple[float, float]:
    """AdamW state bytes for tensors of these element counts, and the part a paged optimizer may evict."""
    require_choice("optimizer", optimizer, OPTIMIZER_STATE)
    bits, paged = OPTIMIZER_STATE[optimizer]
    total = pageable = 0.0
    for n in sizes:
        if bits == 8 and n >= OPT8_MIN_SIZE:  # two uint8 moments + a float32 absmax per 256 values each
            b = 2 * n + 2 * 4 * math.ceil(n / OPT8_BLOCKSIZE)
        else:  # two float32 moments
            b = 8 * n
        total += b
        if paged and n >= PAGED_MIN_SIZE:  # bnb puts the two moments (not the absmax) in unified memory
            pageable += 2 * n if bits == 8 else b
    if bits == 8:
        total += 2 * 256 * 4  # the two 256-entry quantization maps, shared by all tensors
    return total, pageable


def nf4_bytes(n: int, double_quant: bool = True, blocksize: int = NF4_BLOCKSIZE) -> tuple[int, int]:
    """(packed 4-bit bytes, quantization-constant bytes) of one weight tensor with n elements."""
    blocks = math.ceil(n / blocksize)
    if double_quant:  # uint8 absmax + float32 per 256 absmax + one float32 offset
        return (n + 1) // 2, blocks + 4 * math.ceil(blocks / DQ_BLOCKSIZE) + 4
    return (n + 1) // 2, 4 * blocks


def _layer_activation_bytes(arch: Architecture, method: str, cb: int, r: int, targets: list[str],
                            dropout: float) -> float:
    """Bytes per token that one decoder block saves for backward (HF Llama, sdpa attention, no padding mask)."""
    h, m, nh = arch.hidden, arch.intermediate, arch.heads
    q, kv = nh * arch.head_dim, arch.kv_heads * arch.head_dim
    dims = {"attn_in": h, "attn_out": q, "mlp_in": h, "mlp_mid": m}
    full = method == "full"
    # RMSNorm (x2): float32 copy of the input + float32 rsqrt per token; full FT also keeps the
    # normalised 16-bit input for the norm weight's gradient.
    saved = 2 * (4 * h + 4 + (cb * h if full else 0))
    # sdpa (flash kernel on CPU/GPU): q, k, v, output in 16 bits and a float32 log-sum-exp per head.
    saved += cb * (q + kv + kv + q) + 4 * nh
    # SwiGLU: silu keeps the gate output, the product keeps silu(gate) and up.
    saved += 3 * cb * m
    if full:  # every linear keeps its input for its weight gradient
        saved += cb * sum(dims.values())
        return saved
    if dropout > 0:  # each adapter keeps its own dropped input and the dropout mask (16-bit as on CPU)
        saved += sum(2 * cb * dims[LINEAR_INPUT[t]] for t in targets)
    else:  # adapters reading the same tensor share its saved copy
        saved += cb * sum(dims[d] for d in {LINEAR_INPUT[t] for t in targets})
    saved += cb * r * len(targets)  # lora_B keeps lora_A's r-wide output
    return saved


def _activation_bytes(arch: Architecture, method: str, tokens: int, cb: int, r: int, targets: list[str],
                      dropout: float, checkpointing: bool, notes: list[str]) -> float:
    """Peak bytes of saved activations and loss-head transients over forward and backward."""
    layer = _layer_activation_bytes(arch, method, cb, r, targets, dropout) * tokens
    # transformers upcasts logits to float32 for the loss; in the cross-entropy backward the log-softmax
    # output, the incoming gradient and the outgoing gradient (each float32, tokens x vocab) coexist.
    head = 12 * arch.vocab * tokens
    notes.append("loss head: 12 bytes x vocab per token (float32 log-softmax output + 2 float32 gradients)")
    notes.append("blocks: transformers' Llama with sdpa attention and no padding mask (k/v not repeated)")
    if dropout > 0 and method != "full":
        notes.append(f"LoRA dropout {dropout}: each adapter keeps its dropped input and a 16-bit mask "
                     "(PyTorch's CPU dropout; CUDA's fused kernel keeps a 1-byte mask, slightly less)")
    if checkpointing:
        ckpt = cb * arch.hidden * arch.layers * tokens
        # backward recomputes one block at a time: its saved tensors plus two m-wide gradients of the MLP
        recompute = layer + 2 * cb * arch.intermediate * tokens
        peak = ckpt + max(head, recompute)
        notes.append("gradient checkpointing: every block's 16-bit input kept; one block recomputed at a time")
    else:
        peak = arch.layers * layer + head
        notes.append("no checkpointing: every block's saved tensors kept until its backward")
    if method == "full" and arch.tied_embeddings:
        # the embedding's dense gradient and the sum with the LM head's gradient exist together at the end
        peak = max(peak, 2 * cb * arch.vocab * arch.hidden)
        notes.append("tied embeddings: two vocab x hidden gradient buffers when the two gradients are summed")
    return peak


def estimate_training_memory(
    model: Any,
    method: str,
    *,
    batch_size: int = 1,
    seq_len: int = 512,
    lora_r: int = 64,
    lora_targets: str | list[str] = "all-linear",
    gradient_checkpointing: bool = True,
    optimizer: str = "adamw",
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    lora_dropout: float = 0.0,
    master_weights: bool = False,
    world_size: int = 1,
    sharding: str = "none",
    cpu_offload: bool = False,
) -> MemoryBreakdown:
    """Bytes of one training step by component, with every assumption written into `.assumptions`.

    With world_size > 1 the figures are per GPU (batch_size is per GPU); `sharding` and `cpu_offload` model
    DDP, FSDP full sharding and FSDP's CPU offload (see `_distribute`).
    """
    require_choice("method", method, ESTIMATOR_METHODS)
    require_choice("optimizer", optimizer, OPTIMIZER_STATE)
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("lora_r", lora_r)):
        require_whole(name, v)
    for name, v in (("gradient_checkpointing", gradient_checkpointing), ("double_quant", double_quant),
                    ("master_weights", master_weights)):
        require_bool(name, v)
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout={lora_dropout!r} must be in [0, 1)")
    _check_distribution(world_size, sharding, cpu_offload)
    arch = architecture(model)
    cb = _dtype_bytes(compute_dtype)
    dt = str(compute_dtype).replace("torch.", "")
    out = MemoryBreakdown()
    notes = out.assumptions
    notes.append(f"{arch.name}: {arch.params / 1e9:.2f}B parameters ({arch.linear_params / 1e9:.2f}B in "
                 f"decoder linear layers), batch {batch_size} x {seq_len} tokens, optimizer {optimizer}")
    if method == "qlora":
        packed = consts = 0
        for i, o in arch.linear_shapes().values():
            p, c = nf4_bytes(i * o, double_quant)
            packed, consts = packed + p * arch.layers, consts + c * arch.layers
        out.weights = packed + cb * arch.other_params
        out.quant_constants = consts
        notes.append(f"NF4 decoder linears (4 bits, blocks of {NF4_BLOCKSIZE}), "
                     + ("double-quantized constants (8-bit absmax + float32 per 256)" if double_quant
                        else "float32 absmax per block")
                     + f"; embeddings, LM head and norms in {dt}")
    else:
        out.weights = cb * arch.params
        notes.append(f"all weights in {dt}")
    if method == "full":
        sizes = _full_tensor_sizes(arch)
        targets: list[str] = []
        notes.append(f"every parameter trained; gradients in {dt}")
    else:
        targets = resolve_lora_targets(arch, lora_targets)
        sizes = lora_tensor_sizes(arch, lora_r, targets)
        out.lora_weights = cb * sum(sizes)
        notes.append(f"LoRA r={lora_r} on {len(targets)} linear layer kinds x {arch.layers} blocks "
                     f"({sum(sizes) / 1e6:.1f}M parameters), LoRA weights and gradients in {dt}")
    out.gradients = cb * sum(sizes)
    out.optimizer_state, out.pageable = optimizer_state_bytes(sizes, optimizer)
    bits, paged = OPTIMIZER_STATE[optimizer]
    notes.append(f"{'paged ' if paged else ''}AdamW state: "
                 + ("2 uint8 moments + a float32 absmax per 256 values" if bits == 8 else "2 float32 moments")
                 + " per trained parameter" + (f"; moments of tensors >= {PAGED_MIN_SIZE:,} elements pageable"
                                              if paged else ""))
    if master_weights:
        out.optimizer_state += 4 * sum(sizes)
        notes.append("mixed precision: a float32 master copy of every trained parameter (4 bytes each)")
    out.activations = _activation_bytes(arch, method, batch_size * seq_len, cb, lora_r, targets, lora_dropout,
                                        gradient_checkpointing, notes)
    if world_size > 1 or sharding != "none":
        _distribute(out, arch, method, cb, double_quant, world_size, sharding, cpu_offload)
    out.total = sum(getattr(out, c) for c in MemoryBreakdown.COMPONENTS)
    notes.append("total = sum of the components (gradients counted as if all alive at the activation "
                 "peak); no CUDA context, allocator fragmentation or optimizer scratch (fused CUDA kernels)")
    return out


def _check_distribution(world_size: int, sharding: str, cpu_offload: bool) -> None:
    """Reject impossible multi-GPU settings before any arithmetic."""
    if not is_whole(world_size, 1):
        raise ValueError(f"world_size={world_size!r} must be a positive integer (the number of GPUs)")
    require_choice("sharding", sharding, SHARDINGS)
    if cpu_offload and sharding == "none":
        raise ValueError("cpu_offload=True needs sharding='fsdp_full_shard': FSDP offloads the shards it owns; "
                         "plain DDP has nothing to offload")


def _layer_weight_bytes(arch: Architecture, method: str, cb: int, double_quant: bool) -> float:
    """Bytes of one decoder block's weights as stored (NF4 + constants for QLoRA): one FSDP unit."""
    if method != "qlora":
        return cb * (sum(i * o for i, o in arch.linear_shapes().values()) + 2 * arch.hidden)
    return sum(sum(nf4_bytes(i * o, double_quant)) for i, o in arch.linear_shapes().values()) + cb * 2 * arch.hidden


def _distribute(out: MemoryBreakdown, arch: Architecture, method: str, cb: int, double_quant: bool,
                world: int, sharding: str, cpu_offload: bool) -> None:
    """Per-GPU bytes under DDP (full copy + gradient buckets) or FSDP full shard (1/world + gathered units)."""
    notes = out.assumptions
    if sharding == "none":
        out.gradients *= 2
        notes.append(f"DDP over {world} GPUs: every GPU holds a full copy; its gradient buckets hold a second "
                     "copy of the gradients (gradient_as_bucket_view=False, the default)")
        return
    sharded = ("weights", "lora_weights", "gradients", "optimizer_state")
    for name in sharded:
        setattr(out, name, getattr(out, name) / world)
    out.pageable /= world
    notes.append(f"FSDP full shard over {world} GPUs: weights, LoRA weights, gradients and optimizer state / "
                 f"{world}; 4-bit quantization constants stay whole on every GPU (bitsandbytes keeps them on the "
                 "module, outside the flattened parameters)")
    # One unit per decoder block (plus the root: embeddings, LM head, final norm) is all-gathered to full size
    # while it computes; the root stays gathered through forward and backward, BACKWARD_PRE prefetch adds one
    # more block.
    root = cb * arch.other_params - cb * 2 * arch.hidden * arch.layers
    gathered = root + 2 * _layer_weight_bytes(arch, method, cb, double_quant)
    notes.append(f"all-gathered at once: the root unit ({root / GB:.2f} GB) + 2 decoder blocks (current and "
                 f"prefetched): {gathered / GB:.2f} GB")
    if cpu_offload:
        out.cpu_offloaded = sum(getattr(out, n) for n in sharded)
        for name in sharded:
            setattr(out, name, 0.0)
        out.pageable = 0.0
        notes.append("CPU offload: the shards of weights, gradients and optimizer state live in CPU RAM "
                     f"({out.cpu_offloaded / GB:.2f} GB per process, in cpu_offloaded); the optimizer steps "
                     "on the CPU; the GPU keeps gathered units, quantization constants and activations")
    out.weights += gathered

