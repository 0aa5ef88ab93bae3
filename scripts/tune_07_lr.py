"""How notebook 07's cpu-profile learning rates were picked: seed 0, every rate of each family's grid.

Run from the repository root: `.venv/bin/python scripts/tune_07_lr.py` (about 8 minutes on 2 cores). It trains
16-bit LoRA at each LoRA rate and 16-bit full fine-tuning at each full rate, with every other setting of the
cpu profile, and prints the held-out response loss of each run (the numbers quoted in 07's section 1).
"""

from dataclasses import replace

import qlora_lab

qlora_lab.quiet()

from qlora_lab import models, profiles, study  # noqa: E402

GRIDS = {"lora": ("lora_lr", (5e-4, 1e-3, 2e-3)), "full": ("full_lr", (2e-5, 5e-5, 1e-4, 2e-4))}


def main() -> None:
    """Train each family at each rate of its grid on seed 0 and print the held-out loss."""
    values = vars(profiles.settings("07_qlora_vs_lora_vs_full", "cpu"))
    base = study.StudyConfig(**{k: v for k, v in values.items() if k != "profile"})  # 07's settings, as 07 builds them
    tokenizer = models.load_tokenizer(base.model_name)
    train, held_out = study.load_texts(base)  # the rates change nothing here: load once
    for method, (name, rates) in GRIDS.items():
        for rate in rates:
            cfg = replace(base, methods=(method,), seeds=(0,), **{name: rate})
            result = study.run_one(method, 0, cfg, tokenizer, train, held_out)
            print(f"{method:4} {name}={rate:g}: held-out loss {result.eval_loss:.3f}", flush=True)


if __name__ == "__main__":
    main()
