"""Self-check cells: a few asserts on the learner's own variables at the end of a section, with where to look back.

A notebook section ends with one call such as

    self_check("NF4 code", {
        "16 values": len(code) == 16,
        "an exact zero": bool((code == 0).any()),
    }, revisit="section 2: the two halves of the quantiles and the shared zero")

It prints one line when everything holds. When a check fails (because the learner changed a cell, or an
exercise broke an idea the next section builds on) it raises SelfCheckError naming every failed check and the
part of the notebook to read again, instead of letting a wrong value travel on into later sections.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


class SelfCheckError(AssertionError):
    """A section's self-check failed; the message lists the failed checks and what to revisit."""


def self_check(section: str, checks: Mapping[str, object], revisit: str) -> None:
    """Print one line if every check is true; else raise naming each failed check and where to look back."""
    if not checks:
        raise ValueError(f"self_check({section!r}) got no checks: pass a dict of description -> condition")
    failed = []
    for description, condition in checks.items():
        if not isinstance(condition, (bool, np.bool_)):
            raise TypeError(f"self_check({section!r}): check {description!r} is a {type(condition).__name__}, "
                            "not a True/False condition (compare it with something)")
        if not bool(condition):
            failed.append(description)
    if failed:
        lines = "\n".join(f"  - {d}" for d in failed)
        raise SelfCheckError(f"self-check '{section}': {len(failed)} of {len(checks)} checks failed:\n{lines}\n"
                             f"Revisit {revisit}, re-run that part, then this cell.")
    print(f"self-check '{section}': all {len(checks)} checks passed")
