"""The gpu profile's code path, run offline on tiny stand-ins (a smoke run), and checked for names never defined."""

import json
import re

import nbformat
import pytest

from qlora_lab import course, profiles, smoke


def notebook_code(path) -> str:
    """All code cells of a notebook as one module (IPython magics and shell lines dropped)."""
    nb = nbformat.read(path, as_version=4)
    lines = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            lines += [ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    # A notebook frees memory with `del` after a name's last use; read as one module, pyflakes would take that
    # for an undefined name in functions defined earlier. Keep the line, drop the del.
    lines = [re.sub(r"^(\s*)del\s.*$", r"\1pass", ln) for ln in lines]
    return "\n".join(lines) + "\n"


def undefined_names(code: str, filename: str) -> list[str]:
    """What pyflakes says is used but never defined: a typo in a cell that only runs on a GPU shows up here."""
    from pyflakes.api import check
    from pyflakes.reporter import Reporter

    class Collect(Reporter):
        def __init__(self):
            self.found = []

        def flake(self, message):
            if type(message).__name__ in ("UndefinedName", "UndefinedLocal", "UndefinedExport"):
                self.found.append(str(message))

        def syntaxError(self, filename, msg, lineno, offset, text):
            self.found.append(f"{filename}:{lineno}: syntax error: {msg}")

        def unexpectedError(self, filename, msg):
            self.found.append(f"{filename}: {msg}")

    reporter = Collect()
    check(code, filename, reporter)
    return reporter.found


@pytest.mark.parametrize("path", course.notebooks(), ids=lambda p: p.stem)
def test_every_cell_compiles_and_uses_only_defined_names(path):
    assert undefined_names(notebook_code(path), path.name) == []


def test_the_name_check_catches_a_typo_in_a_cuda_only_branch():
    code = "import torch\nif torch.cuda.is_available():\n    torch.cuda.empty_cahce()\n    reslt = modle(1)\n"
    found = undefined_names(code, "nb")
    assert len(found) == 1 and "modle" in found[0]


def test_shrink_caps_sizes_and_keeps_the_rest():
    values = {"max_steps": 1875, "eval_rows": 1, "model_name": "org/model", "seeds": [0, 1], "recipe": "guanaco-7b"}
    small = smoke.shrink(values)
    assert small == {"max_steps": 2, "eval_rows": 1, "model_name": "org/model", "seeds": [0], "recipe": "guanaco-7b"}
    # 07 times its steps after a warm-up and a memory step, so it keeps three
    assert smoke.shrink({"max_steps": 300}, "07_qlora_vs_lora_vs_full") == {"max_steps": 3}
    assert smoke.shrink({"max_steps": 300}, "06_guanaco_oasst1_finetune") == {"max_steps": 2}


def test_smoke_needs_the_gpu_profile(tmp_build):
    with pytest.raises(profiles.CourseError, match="needs --profile gpu"):
        course.run_course("cpu", only="00", smoke_run=True)


#: Every notebook's gpu path runs in the smoke run (`qlora-lab course --profile gpu --smoke`).
SMOKE_ALL = [p.name[:2] for p in course.notebooks()]


def test_smoke_run_of_every_notebooks_gpu_path(tmp_build):
    """Every notebook's gpu path runs offline: hub names resolve to stand-ins, and each says it is a smoke run."""
    runs = course.run_course("gpu", only=",".join(SMOKE_ALL), smoke_run=True, progress=False)
    failed = [(r.notebook, r.error) for r in runs if r.status != "ok"]
    assert not failed and len(runs) == len(SMOKE_ALL), failed
    report = tmp_build / "course-gpu-smoke"
    for run in runs:
        text = (report / f"{run.notebook}.ipynb").read_text()
        assert "SMOKE RUN of" in text, run.notebook
    assert not (tmp_build / "course").exists()  # the cpu report is untouched
    summary = json.loads((report / "summary.json").read_text())
    assert summary["profile"] == "gpu" and summary["status"] == "ok"
    print({r.notebook: r.seconds for r in runs})
