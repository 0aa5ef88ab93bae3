"""qlora_lab.course and the CLI: profiles, parameters, and a real papermill run of the course runner."""

import json

import pytest

from qlora_lab import cli, course, profiles


def test_every_notebook_is_on_the_map_and_in_both_profiles():
    stems = [p.stem for p in course.notebooks()]
    assert stems and stems == sorted(stems)
    for stem in stems:
        assert stem in profiles.COURSE_MAP
        for profile in profiles.PROFILE_NAMES:
            assert stem in profiles.PROFILES[profile]
        assert set(profiles.PROFILES["cpu"][stem]) == set(profiles.PROFILES["gpu"][stem]), stem


def test_the_minutes_agree_in_readme_course_map_and_each_notebook():
    """One measured figure per notebook: README's time column, 00's course map and the notebook's Cost line."""
    import re
    from pathlib import Path

    import nbformat

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    for path in course.notebooks():
        minutes = profiles.COURSE_MAP[path.stem][2]
        row = re.search(rf"^\| {path.stem[:2]} \|.*\| (\d+) \|$", readme, re.M)
        assert row and int(row.group(1)) == minutes, (path.stem, minutes)
        cost = re.search(r"\*\*Cost:\*\* about (\d+)", nbformat.read(path, as_version=4).cells[0].source)
        assert cost and int(cost.group(1)) == minutes, (path.stem, minutes)


def test_parameters_cell_lists_the_profile_parameters():
    import nbformat

    for path in course.notebooks():
        nb = nbformat.read(path, as_version=4)
        cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(cells) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
        names = {line.split("=")[0].strip() for line in cells[0].source.splitlines()
                 if "=" in line and not line.lstrip().startswith("#")}
        assert names == {"profile", *profiles.PROFILES["cpu"][path.stem]}, path.name


def test_papermill_reads_every_parameter(caplog):
    """papermill skips (and warns about) a parameter line with a second '=' in its comment."""
    import papermill

    for path in course.notebooks():
        caplog.clear()
        found = set(papermill.inspect_notebook(str(path)))
        assert found == {"profile", *profiles.PROFILES["cpu"][path.stem]}, path.name
        assert "Unable to parse" not in caplog.text, path.name


def test_settings_fill_from_profile_and_override():
    cfg = profiles.settings("00_welcome", "cpu", max_new_tokens=None)
    assert cfg.max_new_tokens == profiles.PROFILES["cpu"]["00_welcome"]["max_new_tokens"]
    assert profiles.settings("00_welcome", "cpu", max_new_tokens=7).max_new_tokens == 7


def test_unknown_profile_lists_profiles():
    with pytest.raises(profiles.CourseError, match=r"Unknown profile 'tpu'.*\['cpu', 'gpu'\]"):
        profiles.settings("00_welcome", "tpu")
    with pytest.raises(profiles.CourseError, match="Unknown profile"):
        course.run_course("tpu", only="00")


def test_unknown_parameter_lists_parameters(tmp_build):
    with pytest.raises(profiles.CourseError, match=r"\['max_stpes'\].*max_new_tokens"):
        course.run_course("cpu", only="00", overrides={"max_stpes": 3})
    with pytest.raises(profiles.CourseError, match=r"Unknown parameter.*'bogus'"):
        profiles.settings("00_welcome", "cpu", bogus=1)


def test_unknown_notebook_lists_numbers(tmp_build):
    with pytest.raises(profiles.CourseError, match=r"No notebook '99'.*'00'"):
        course.run_course("cpu", only="99")


def test_cli_reports_errors_with_exit_code_2(capsys, tmp_build):
    assert cli.main(["course", "--profile", "tpu", "--only", "00"]) == 2
    assert "Unknown profile 'tpu'" in capsys.readouterr().err
    assert cli.main(["course", "--only", "00", "-p", "nope", "1"]) == 2


def test_parse_value():
    assert course.parse_value("50") == 50
    assert course.parse_value("2e-4") == 2e-4
    assert course.parse_value("None") is None
    assert course.parse_value("q_proj") == "q_proj"


def test_run_course_with_papermill_writes_summary(tmp_build):
    stale = tmp_build / "results" / "00_welcome.json"  # another run's (or an old) result must not leak in
    stale.parent.mkdir(parents=True)
    stale.write_text('{"parameters": 1}')
    runs = course.run_course("cpu", only="00", overrides={"max_new_tokens": 4}, progress=False)
    assert [r.status for r in runs] == ["ok"]
    out = tmp_build / "course"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["profile"] == "cpu"
    entry = summary["notebooks"]["00_welcome"]
    assert entry["status"] == "ok" and entry["seconds"] > 0
    assert entry["results"]["parameters"] == 134_515_008
    assert (out / "00_welcome.ipynb").is_file() and (out / "00_welcome.html").is_file()
    assert "00_welcome" in (out / "index.html").read_text()
    executed = (out / "00_welcome.ipynb").read_text()
    assert "max_new_tokens = 4" in executed  # the override reached the notebook


def test_run_course_stops_at_failing_cell(tmp_build, tmp_path, monkeypatch):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"},
                   "language_info": {"name": "python"}}
    nb.cells = [nbformat.v4.new_code_cell('profile = "cpu"', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("x = 1"),
                nbformat.v4.new_code_cell("raise RuntimeError('boom')\nz = 3"),
                nbformat.v4.new_code_cell("y = 2")]
    (tmp_path / "notebooks").mkdir()
    for name in ("98_broken", "99_never"):
        nbformat.write(nb, tmp_path / "notebooks" / f"{name}.ipynb")
    monkeypatch.setattr(course, "repo_root", lambda: tmp_path)
    monkeypatch.setitem(profiles.PROFILES["cpu"], "98_broken", {})
    monkeypatch.setitem(profiles.PROFILES["cpu"], "99_never", {})
    runs = course.run_course("cpu", progress=False)
    assert len(runs) == 1 and runs[0].status == "failed"
    assert runs[0].failed_cell == 4  # parameters, injected parameters, x = 1, then the raise
    assert "RuntimeError: boom" in runs[0].error and "raise RuntimeError" in runs[0].error
    assert "z = 3" not in runs[0].error  # the line that raised, not the cell's last line
    summary = json.loads((tmp_build / "course" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["not_run"] == ["99_never"]


def _tiny_course(tmp_path, monkeypatch, names=("97_one", "98_two")):
    """A course of trivial notebooks that save one number each, so runner behaviour is tested in seconds."""
    import nbformat

    (tmp_path / "notebooks").mkdir()
    for name in names:
        nb = nbformat.v4.new_notebook()
        nb.metadata = {"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"},
                       "language_info": {"name": "python"}}
        nb.cells = [nbformat.v4.new_code_cell('profile = "cpu"', metadata={"tags": ["parameters"]}),
                    nbformat.v4.new_code_cell(f"from qlora_lab import course\ncourse.save_results({name!r}, {{'n': 1}})")]
        nbformat.write(nb, tmp_path / "notebooks" / f"{name}.ipynb")
        monkeypatch.setitem(profiles.PROFILES["cpu"], name, {})
    monkeypatch.setattr(course, "repo_root", lambda: tmp_path)


def test_a_partial_run_merges_into_the_full_summary_and_says_so(tmp_build, tmp_path, monkeypatch, capsys):
    _tiny_course(tmp_path, monkeypatch)
    course.run_course("cpu", progress=False)
    capsys.readouterr()
    course.run_course("cpu", only="98", progress=False)
    assert "merged into the existing summary" in capsys.readouterr().out
    summary = json.loads((tmp_build / "course" / "summary.json").read_text())
    assert list(summary["notebooks"]) == ["97_one", "98_two"] and summary["complete_course"]
    assert summary["notebooks"]["97_one"]["results"] == {"n": 1}
    assert not list((tmp_build / "course").glob(".run-*")), "a run leaves no temporary folder behind"
    assert not list((tmp_build / "course").glob("*.tmp"))


@pytest.mark.parametrize("args, message", [
    (["course", "--only", ""], "names no notebook"),
    (["course", "--only", " , "], "names no notebook"),
    (["course", "--only", "00", "-p", "max_new_tokens", "-3"], "max_new_tokens=-3 for 00_welcome is not allowed: "
                                                               "it must be a whole number >= 1"),
    (["course", "--only", "00", "-p", "max_new_tokens", "many"], "max_new_tokens='many'"),
    (["course", "--only", "07", "-p", "seeds", "[0, -1]"], "non-empty list of whole numbers"),
    (["course", "--only", "07", "-p", "optim", "sgd"], "optim='sgd'"),
    (["course", "--only", "05", "-p", "ckpt_shape", "[4, 0]"], "a [batch, seq_len] pair of whole numbers >= 1"),
    (["course", "--only", "06", "-p", "recipe", "guanaco-3b"], "guanaco-7b"),
    (["course", "--only", "01", "-p", "learning_rate", "inf"], "a finite number > 0"),
    (["course", "--only", "09", "-p", "compute_dtype", "fp8"], "compute_dtype='fp8' for 09_your_own_qlora"),
    (["course", "--only", "09", "-p", "data_path", "no-such-file.jsonl"], "an existing chat .jsonl file"),
    (["course", "--only", "09", "-p", "grad_accum", "0"], "grad_accum=0"),
    (["bench", "--size", "0"], "--size '0' is not a whole number >= 1"),
    (["bench", "--blocksize", "100"], "argument --blocksize: invalid choice: 100"),
    (["bench", "--repeats", "x"], "--repeats 'x'"),
])
def test_every_expected_cli_error_is_one_line_and_exit_2(args, message, capsys, tmp_build):
    try:
        code = cli.main(args)
    except SystemExit as stop:  # argparse's own checks
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_an_unwritable_out_folder_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert cli.main(["course", "--only", "00", "--out", str(blocker / "build")]) == 2
    err = capsys.readouterr().err
    assert "Cannot write the course report" in err and "--out" in err and err.count("\n") == 1


def test_gpu_profile_without_cuda_fails_before_any_notebook(tmp_build, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["course", "--profile", "gpu", "--only", "00"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_build / "course-gpu").exists()  # nothing started


def test_failing_line_is_the_line_that_raised():
    tb = ["\x1b[31m---------\x1b[0m", "Cell \x1b[0;32mIn[3], line 2\x1b[0m\n      1 x = 1\n"
          "\x1b[0;32m----> 2\x1b[0m \x1b[43mfail\x1b[49m()\n      3 y = 2\n", "File lib.py:9, in fail()"]
    assert course.failing_line("x = 1\nfail()\ny = 2", tb) == "fail()"
    assert course.failing_line("x = 1\ny = 2", None) == "y = 2"


def test_relative_local_paths_become_absolute(tmp_path, monkeypatch):
    """papermill runs a notebook inside notebooks/, so `-p data_path my.jsonl` must not stay relative."""
    (tmp_path / "my.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    fixed = course._absolute_paths({"data_path": "my.jsonl", "model_name": "org/hub-model", "max_steps": 3})
    assert fixed == {"data_path": str(tmp_path / "my.jsonl"), "model_name": "org/hub-model", "max_steps": 3}
    assert course._absolute_paths({"data_path": "embedded"}) == {"data_path": "embedded"}
