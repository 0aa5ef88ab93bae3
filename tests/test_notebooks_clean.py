"""Committed notebooks are clean: outputs present, no errors, no machine paths, tidy metadata, ordered counts."""

import json
import re

import pytest

from qlora_lab import course

NOTEBOOKS = course.notebooks()
MACHINE_PATH = re.compile(r"(/root/|/tmp/|/work/|/home/\w+/|/Users/\w+/|[A-Z]:\\\\Users)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert set(nb["metadata"]) <= {"kernelspec", "language_info"}, nb["metadata"].keys()
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert any(c["outputs"] for c in code), "committed without outputs"
    counts = [c["execution_count"] for c in code if c["execution_count"] is not None]
    assert counts == list(range(1, len(counts) + 1)), "execution counts out of order"
    assert len(counts) == len(code), "some code cells were not executed"
    for i, cell in enumerate(nb["cells"]):
        assert set(cell["metadata"]) <= {"tags"}, f"cell {i} metadata {cell['metadata']}"
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", f"cell {i} has an error output"
            if out["output_type"] == "stream":
                assert out["name"] != "stderr" or not re.search(r"Warning|Traceback", out["text"] if
                       isinstance(out["text"], str) else "".join(out["text"])), f"cell {i} warns: {out}"
            assert not MACHINE_PATH.search(json.dumps(out)), f"cell {i} output shows a machine path"
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown" and "minute" in "".join(first["source"]).lower()
    last = "".join(nb["cells"][-1]["source"]).lower()
    assert "exercise" in last, "notebooks end with a summary and exercises"


SOLUTIONS = course.solutions()


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_solution_notebook_is_clean_and_checks_its_answers(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert set(nb["metadata"]) <= {"kernelspec", "language_info"}, nb["metadata"].keys()
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code if c["execution_count"] is not None]
    assert counts == list(range(1, len(code) + 1)), "every cell executed, counts in order"
    for i, cell in enumerate(nb["cells"]):
        assert set(cell["metadata"]) <= {"tags"}, f"cell {i} metadata {cell['metadata']}"
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", f"cell {i} has an error output"
            assert not MACHINE_PATH.search(json.dumps(out)), f"cell {i} output shows a machine path"
    first = "".join(nb["cells"][0]["source"])
    notebook = next(p for p in NOTEBOOKS if p.name[:2] == path.name[:2])
    assert f"../notebooks/{notebook.name}" in first, "a solution links the notebook it solves"
    assert "cost" in first.lower(), "a solution says what it costs to run"
    assert "assert " in "".join("".join(c["source"]) for c in code), "answers are checked by code, not only told"


def test_every_notebook_with_exercises_has_worked_solutions():
    with_exercises = [p for p in NOTEBOOKS
                      if "exercise" in "".join(json.loads(p.read_text(encoding="utf-8"))["cells"][-1]["source"]).lower()]
    solved = {p.name[:2] for p in SOLUTIONS}
    missing = {p.name[:2] for p in with_exercises if p.name[:2] not in solved}
    assert not missing, f"without solutions/NN_*.ipynb: {sorted(missing)}"
    for p in (p for p in with_exercises if p.name[:2] in solved):
        text = "".join(json.loads(p.read_text(encoding="utf-8"))["cells"][-1]["source"])
        assert "Predict first" in text, f"{p.name}: one exercise is a prediction ('*Predict first:*')"


#: Material a learner cannot open, or internal targets: never named in what a learner reads.
INTERNAL = re.compile(r"seed document|our seed\b|\bthe seed\b|\(seed\)|\bFACTS\b|FACTS\.md|the issue\b|"
                      r"promised by|target >=|the 1\.5x target", re.IGNORECASE)


def _learner_texts():
    from qlora_lab.paths import repo_root

    root = repo_root()
    for path in [*NOTEBOOKS, *SOLUTIONS]:
        nb = json.loads(path.read_text(encoding="utf-8"))
        for i, cell in enumerate(nb["cells"]):
            text = "".join(cell["source"]) if cell["cell_type"] == "markdown" else json.dumps(cell.get("outputs", []))
            yield f"{path.name} cell {i}", text
    for path in [*root.glob("README*.md"), *(root / "docs").glob("*.md")]:
        yield path.name, path.read_text(encoding="utf-8")


def test_nothing_a_learner_reads_points_at_internal_material():
    found = [(where, m.group(0)) for where, text in _learner_texts() for m in INTERNAL.finditer(text)]
    assert not found, f"internal references a learner cannot follow: {found[:10]}"
    paths = [(where, m.group(0)) for where, text in _learner_texts() for m in MACHINE_PATH.finditer(text)]
    assert not paths, f"paths of one machine in what a learner reads: {paths[:10]}"


def test_the_internal_reference_check_catches_one():
    assert INTERNAL.search("as the seed document says") and INTERNAL.search("see FACTS §6")
    assert INTERNAL.search("the seed's memory table") and INTERNAL.search("as the seed puts it")
    assert not INTERNAL.search("two random seeds, seed 0 and 1") and not INTERNAL.search("the random seed is 0")


def _self_check_cells(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [c for c in nb["cells"] if c["cell_type"] == "code" and "self_check(" in "".join(c["source"])]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_sections_end_in_self_checks_that_ran_and_passed(path):
    """Each section's self-check is compared by nbval (so it runs in `make test`) and printed that it passed."""
    cells = _self_check_cells(path)
    assert len(cells) >= 2, f"{path.name}: {len(cells)} self-check cells; every computing section ends in one"
    for cell in cells:
        source = "".join(cell["source"])
        assert source.startswith("# NBVAL_CHECK_OUTPUT"), f"{path.name}: a self-check must be checked by nbval"
        assert "revisit=" in source, f"{path.name}: a self-check says what to revisit when it fails"
        printed = "".join("".join(o.get("text", "")) for o in cell["outputs"])
        assert "checks passed" in printed, f"{path.name}: committed self-check output {printed!r}"


@pytest.mark.parametrize("path", [*NOTEBOOKS, *SOLUTIONS], ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_setup_cell_quiets_the_libraries_first(path):
    """Importing qlora_lab changes no logging: each notebook asks for quiet outputs itself, before any library loads."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code" and "qlora_lab" in "".join(c["source"])]
    setup = [line.split("#")[0].strip() for line in code[0].splitlines()]
    assert [line for line in setup if line][:2] == ["import qlora_lab", "qlora_lab.quiet()"], setup[:3]


def test_importing_the_package_changes_no_logging_setting():
    import subprocess
    import sys

    probe = ("import logging, warnings, torch; before = (len(warnings.filters), logging.getLogger('bitsandbytes').level); "
             "import qlora_lab; after = (len(warnings.filters), logging.getLogger('bitsandbytes').level); "
             "assert before == after, (before, after); qlora_lab.quiet(); "
             "assert logging.getLogger('bitsandbytes').level == logging.ERROR")
    subprocess.run([sys.executable, "-c", probe], check=True)
