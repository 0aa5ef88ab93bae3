"""qlora_lab: the small package behind the QLoRA course notebooks (one module per idea)."""

from __future__ import annotations

import logging
import os
import warnings

__version__ = "0.1.0"


def quiet() -> None:
    """Keep outputs readable: no weight-loading progress bars or optional-kernel notices (call it before the rest).

    Each notebook's setup cell and each command-line entry point calls it; importing the package changes nothing.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # tqdm.auto warns about missing ipywidgets inside Jupyter; the text progress bar it falls back to is fine.
    warnings.filterwarnings("ignore", message="IProgress not found")
    # transformers 5 renames gradient_checkpointing -> activation_checkpointing; peft still calls the old name.
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6", category=FutureWarning)
    # bitsandbytes logs an optional-kernel notice at import on CPUs with AVX512-BF16; it is harmless.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


# On a CPU without fast bf16 (AVX2 only), bf16 matrix products are multiplied in float32 and rounded once, as bf16
# hardware does: about 3x faster for the course's bf16 code, same dtypes and memory (see qlora_lab.bf16_cpu).
from . import bf16_cpu  # noqa: E402

bf16_cpu.enable()
