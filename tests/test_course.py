"""qlora_lab.course and the CLI: profiles, parameters, and a real papermill run of the course runner."""

import json

import pytest

from qlora_lab import cli, course


def test_every_notebook_is_on_the_map_and_in_both_profiles():
    stems = [p.stem for p in course.notebooks()]
    assert stems and stems == sorted(stems)
    for stem in stems:
        assert stem in course.COURSE_MAP
        for profile in course.PROFILE_NAMES:
            assert stem in course.PROFILES[profile]
        assert set(course.PROFILES["cpu"][stem]) == set(course.PROFILES["gpu"][stem]), stem


def test_parameters_cell_lists_the_profile_parameters():
    import nbformat

    for path in course.notebooks():
        nb = nbformat.read(path, as_version=4)
        cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(cells) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
        names = {line.split("=")[0].strip() for line in cells[0].source.splitlines()
                 if "=" in line and not line.lstrip().startswith("#")}
        assert names == {"profile", *course.PROFILES["cpu"][path.stem]}, path.name


def test_papermill_reads_every_parameter(caplog):
    """papermill skips (and warns about) a parameter line with a second '=' in its comment."""
    import papermill

    for path in course.notebooks():
        caplog.clear()
        found = set(papermill.inspect_notebook(str(path)))
        assert found == {"profile", *course.PROFILES["cpu"][path.stem]}, path.name
        assert "Unable to parse" not in caplog.text, path.name


def test_settings_fill_from_profile_and_override():
    cfg = course.settings("00_welcome", "cpu", max_new_tokens=None)
    assert cfg.max_new_tokens == course.PROFILES["cpu"]["00_welcome"]["max_new_tokens"]
    assert course.settings("00_welcome", "cpu", max_new_tokens=7).max_new_tokens == 7


def test_unknown_profile_lists_profiles():
    with pytest.raises(course.CourseError, match=r"Unknown profile 'tpu'.*\['cpu', 'gpu'\]"):
        course.settings("00_welcome", "tpu")
    with pytest.raises(course.CourseError, match="Unknown profile"):
        course.run_course("tpu", only="00")


def test_unknown_parameter_lists_parameters(tmp_build):
    with pytest.raises(course.CourseError, match=r"\['max_stpes'\].*max_new_tokens"):
        course.run_course("cpu", only="00", overrides={"max_stpes": 3})
    with pytest.raises(course.CourseError, match=r"Unknown parameter.*'bogus'"):
        course.settings("00_welcome", "cpu", bogus=1)


def test_unknown_notebook_lists_numbers(tmp_build):
    with pytest.raises(course.CourseError, match=r"No notebook '99'.*'00'"):
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
                nbformat.v4.new_code_cell("raise RuntimeError('boom')"),
                nbformat.v4.new_code_cell("y = 2")]
    (tmp_path / "notebooks").mkdir()
    for name in ("98_broken", "99_never"):
        nbformat.write(nb, tmp_path / "notebooks" / f"{name}.ipynb")
    monkeypatch.setattr(course, "repo_root", lambda: tmp_path)
    monkeypatch.setitem(course.PROFILES["cpu"], "98_broken", {})
    monkeypatch.setitem(course.PROFILES["cpu"], "99_never", {})
    runs = course.run_course("cpu", progress=False)
    assert len(runs) == 1 and runs[0].status == "failed"
    assert runs[0].failed_cell == 4  # parameters, injected parameters, x = 1, then the raise
    assert "RuntimeError: boom" in runs[0].error and "raise RuntimeError" in runs[0].error
    summary = json.loads((tmp_build / "course" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["not_run"] == ["99_never"]


def test_relative_local_paths_become_absolute(tmp_path, monkeypatch):
    """papermill runs a notebook inside notebooks/, so `-p data_path my.jsonl` must not stay relative."""
    (tmp_path / "my.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    fixed = course._absolute_paths({"data_path": "my.jsonl", "model_name": "org/hub-model", "max_steps": 3})
    assert fixed == {"data_path": str(tmp_path / "my.jsonl"), "model_name": "org/hub-model", "max_steps": 3}
    assert course._absolute_paths({"data_path": "embedded"}) == {"data_path": "embedded"}
