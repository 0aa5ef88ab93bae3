"""Checkpoints that are complete or not at all: a marker written last, resuming only a matching run, never deleting.

transformers' Trainer writes a checkpoint folder file by file; a job killed mid-save leaves a folder that looks
resumable but is not. Every checkpoint of a qlora_lab run gets a `CHECKPOINT_COMPLETE` marker (holding the run's
config) after Trainer has written everything; a run resumes only from a marked checkpoint of the same config,
moves unmarked folders aside (never deletes them) and holds a lock on its output folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checks import ConfigError

if TYPE_CHECKING:
    from .train import FinetuneConfig

COMPLETE_MARKER = "CHECKPOINT_COMPLETE"  # written last: a checkpoint without it is a half-written one
#: Fields that may change between a run and its resumption: they do not change what the steps compute.
RESUMABLE_CHANGES = ("max_steps", "eval_steps", "save_steps", "logging_steps", "per_device_eval_batch_size",
                     "max_eval_samples", "output_dir")
SET_ASIDE_PREFIX = "set-aside-"  # Trainer's rotation globs checkpoint-*, so set-aside folders are left alone


def step_of(path: Path) -> int | None:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if path.name.startswith("checkpoint-") and tail.isdigit() else None


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints whose save finished (they hold our marker), oldest first; nothing is deleted or moved."""
    root = Path(output_dir)
    found = root.glob("checkpoint-*") if root.is_dir() else []
    return sorted((p for p in found if step_of(p) is not None and (p / COMPLETE_MARKER).is_file()), key=step_of)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint whose save finished (it holds our marker); nothing is deleted or moved."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def set_aside_unmarked(output_dir: str | os.PathLike) -> list[Path]:
    """Rename checkpoint folders without our marker (half-written, or not ours) so Trainer never deletes them."""
    root = Path(output_dir)
    moved = []
    for path in sorted(root.glob("checkpoint-*")) if root.is_dir() else []:
        if step_of(path) is None or (path / COMPLETE_MARKER).is_file():
            continue
        target = root / f"{SET_ASIDE_PREFIX}{path.name}"
        n = 1
        while target.exists():
            n += 1
            target = root / f"{SET_ASIDE_PREFIX}{path.name}.{n}"
        os.rename(path, target)
        moved.append(target)
        warnings.warn(f"{path} has no {COMPLETE_MARKER} marker (a save that never finished, or a checkpoint "
                      f"qlora-lab did not write): it was moved aside to {target.name}, untouched, so that "
                      "training neither resumes from it nor lets Trainer's checkpoint rotation delete it.",
                      stacklevel=2)
    return moved


def checkpoint_config(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The FinetuneConfig a complete checkpoint was written with (None for markers without one)."""
    marker = json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text() or "{}")
    return marker.get("config")


def finished_adapter(output_dir: str | os.PathLike, model_name: str | None,
                     bits: int) -> tuple[Path, dict[str, Any]] | None:
    """The adapter (and config) of a run that finished every step on this base and bit width, else None.

    Lets one notebook judge what another trained (08 uses 06's adapter) without guessing how it was made: the
    run's last complete checkpoint must be at its max_steps, and its adapter saved after that checkpoint.
    """
    root = Path(output_dir)
    last = last_complete_checkpoint(root)
    weights = root / "adapter" / "adapter_model.safetensors"
    saved = checkpoint_config(last) if last is not None else None
    if saved is None or not weights.is_file() or weights.stat().st_mtime < (last / COMPLETE_MARKER).stat().st_mtime:
        return None
    if saved.get("model_name_or_path") != model_name or saved.get("bits") != bits or step_of(last) != saved.get("max_steps"):
        return None
    return root / "adapter", saved


def config_differences(saved: dict[str, Any], config: FinetuneConfig) -> dict[str, tuple[Any, Any]]:
    """Fields whose value differs between a checkpoint's config and this one (RESUMABLE_CHANGES excepted)."""
    now = config.to_dict()
    return {k: (saved.get(k), now[k]) for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]}


def check_resumable(checkpoint: Path, config: FinetuneConfig) -> None:
    """Refuse to resume a checkpoint written by a different configuration, or one already past max_steps."""
    fresh = f"To start fresh, choose a new output_dir or move {checkpoint.parent} away."
    saved = checkpoint_config(checkpoint)
    if saved is None:
        raise ConfigError(f"{checkpoint} was written without its configuration (an older qlora-lab), so a "
                          f"mismatch cannot be ruled out; resuming is refused. {fresh}")
    differ = config_differences(saved, config)
    if differ:
        listed = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise ConfigError(f"{checkpoint} was trained with a different configuration ({listed}); resuming "
                          f"would mix two runs. Use the checkpoint's values to resume it. {fresh}")
    if step_of(checkpoint) > config.max_steps:
        raise ConfigError(f"{checkpoint} is already past max_steps={config.max_steps}; ask for at least "
                          f"{step_of(checkpoint)} steps to resume it. {fresh}")


@contextlib.contextmanager
def exclusive(output_dir: Path):
    """Hold a lock on output_dir for the whole run, so two runs never write (or set aside) each other's files."""
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, the run goes on unguarded
        yield
        return
    with open(output_dir / ".qlora-lab.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"output_dir {str(output_dir)!r} is in use by another training run; wait for it "
                              "or choose another output_dir") from None
        yield


def callbacks(config: FinetuneConfig):
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        """Write the completion marker (with the run's config) after Trainer has written every file."""

        def on_save(self, args, state, control, **kwargs):
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir() and state.is_world_process_zero:
                tmp = path / (COMPLETE_MARKER + ".tmp")
                tmp.write_text(json.dumps({"step": state.global_step, "config": config.to_dict()}))
                os.replace(tmp, path / COMPLETE_MARKER)
            return control

    return [MarkComplete()]
