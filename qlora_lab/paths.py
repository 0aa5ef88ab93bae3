"""Where things are: the course checkout (notebooks/, data/) and the build folder runs write to."""

from __future__ import annotations

import os
from pathlib import Path


class CheckoutNotFound(RuntimeError):
    """The package runs outside a course checkout, so notebooks/ and data/ cannot be found."""


def repo_root() -> Path:
    """The checkout this package lives in (notebooks/ and data/ sit beside qlora_lab/)."""
    here = Path(__file__).resolve().parent.parent
    if (here / "notebooks").is_dir():
        return here
    cwd = Path.cwd()
    for candidate in (cwd, *cwd.parents):
        if (candidate / "notebooks").is_dir() and (candidate / "qlora_lab").is_dir():
            return candidate
    raise CheckoutNotFound("Cannot find the course checkout (a folder with notebooks/ and qlora_lab/).")


def build_dir() -> Path:
    """Where runs write: $QLORA_LAB_BUILD, else build/ in the checkout."""
    env = os.environ.get("QLORA_LAB_BUILD")
    return Path(env) if env else repo_root() / "build"
