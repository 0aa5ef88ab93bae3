"""The course runner: the notebooks in order, headless runs with a report, refreshes of the committed outputs.

The parameters each notebook takes, per profile, are in `qlora_lab.profiles`.
"""

from __future__ import annotations

import ast
import contextlib
import html
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import smoke
from .paths import build_dir, repo_root
from .profiles import COURSE_MAP, PROFILES, CourseError, check_parameter, check_profile


def notebooks() -> list[Path]:
    """The course notebooks in order (NN_name.ipynb under notebooks/)."""
    found = (repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb")
    return sorted(p for p in found if p.stem.count(".") == 0)


def solutions() -> list[Path]:
    """Worked solutions of the notebooks' exercises (solutions/NN_name.ipynb, one per notebook)."""
    return sorted((repo_root() / "solutions").glob("[0-9][0-9]_*.ipynb"))


def results_path(notebook: str) -> Path:
    """Where a notebook leaves its headline numbers: the course run's own folder, else build/results/."""
    run_dir = os.environ.get("QLORA_LAB_RESULTS")  # set by run_course, so two runs never share a file
    return (Path(run_dir) if run_dir else build_dir() / "results") / f"{notebook}.json"


def write_atomic(path: Path, text: str) -> None:
    """Write a file all at once under a unique temporary name, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_results(notebook: str, results: dict[str, Any]) -> None:
    """Write a notebook's headline numbers (atomically) so the course runner can tabulate them."""
    write_atomic(results_path(notebook), json.dumps(results, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return value.name
    return str(value)


def parse_value(text: str) -> Any:
    """Read a -p value the way a user means it: numbers, True/False/None, lists, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _select(only: str | list[str] | None) -> list[Path]:
    all_nbs = notebooks()
    if only is None:
        return all_nbs
    wanted = [w.strip() for w in (only.split(",") if isinstance(only, str) else list(only)) if w.strip()]
    if not wanted:
        raise CourseError(f"--only {only!r} names no notebook; give numbers such as 00,02 "
                          f"(from {[p.stem.split('_')[0] for p in all_nbs]}), or leave --only out to run them all.")
    chosen = []
    for w in wanted:
        match = [p for p in all_nbs if p.stem == w or p.stem.split("_")[0] == w.zfill(2)]
        if not match:
            raise CourseError(f"No notebook {w!r}; choose from {[p.stem.split('_')[0] for p in all_nbs]} "
                              f"or full names {[p.stem for p in all_nbs]}.")
        chosen.extend(m for m in match if m not in chosen)
    return sorted(chosen)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ARROW = re.compile(r"^\s*---->\s*\d+ ?(.*)$")  # IPython marks the failing line "----> 12 code"


def failing_line(source: str | None, traceback: list[str] | None) -> str:
    """The line of the cell that raised (from IPython's traceback), not just the cell's last line."""
    lines = (source or "").strip("\n").splitlines()
    for frame in traceback or []:
        text = _ANSI.sub("", frame)
        if "Cell In[" in text.splitlines()[0] if text else False:
            arrow = [m.group(1) for m in map(_ARROW.match, text.splitlines()) if m]
            if arrow:
                return arrow[-1].strip()
    return lines[-1].strip() if lines else ""


@dataclass
class NotebookRun:
    """What happened to one notebook in a course run."""

    notebook: str
    status: str
    seconds: float
    results: dict[str, Any]
    error: str | None = None
    failed_cell: int | None = None  # execution count of the failing cell, as shown in the executed copy


def clean_notebook(nb) -> None:
    """Strip run metadata so committed notebooks stay diff-friendly (nbdev style)."""
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    count = 0
    for cell in nb.cells:
        cell.metadata = {k: v for k, v in cell.metadata.items() if k in ("tags",)}
        if cell.cell_type == "code":
            if cell.get("outputs") or cell.get("execution_count") is not None:
                count += 1
                cell.execution_count = count
                for out in cell.outputs:
                    if "execution_count" in out:
                        out["execution_count"] = count
                    if "metadata" in out and out.get("output_type") in ("display_data", "execute_result"):
                        out["metadata"] = {}
            else:
                cell.execution_count = None


def execute_notebook(path: Path, output: Path, parameters: dict[str, Any] | None = None,
                     progress: bool = True, timeout: int | None = None) -> None:
    """Run one notebook headless with papermill in the notebooks folder (raises PapermillExecutionError)."""
    import papermill as pm

    pm.execute_notebook(
        str(path), str(output), parameters=parameters or {}, cwd=str(path.parent),
        kernel_name="python3", progress_bar=progress, log_output=False, execution_timeout=timeout,
        report_mode=False,
        extra_arguments=["--IPKernelApp.log_level=ERROR"],  # not the kernel's "TCP without encryption" notice
    )


def refresh_notebooks(only: str | list[str] | None = None, solution_notebooks: bool = False) -> list[Path]:
    """Re-execute committed notebooks (or their solutions) in place on the cpu profile and clean them."""
    import nbformat

    done = []
    paths = _select(only)
    if solution_notebooks:
        numbers = {p.name[:2] for p in paths}
        paths = [p for p in solutions() if p.name[:2] in numbers]
        if not paths:
            raise CourseError(f"no solution notebook under solutions/ for --only {only!r}")
    for path in paths:
        tmp = build_dir() / "refresh" / path.name  # outside notebooks/, so nothing half-run is picked up
        tmp.parent.mkdir(parents=True, exist_ok=True)
        print(f"refreshing {path.name} ...", flush=True)
        start = time.time()
        try:
            execute_notebook(path, tmp)
            nb = nbformat.read(tmp, as_version=4)
            nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
            clean_notebook(nb)
            nbformat.write(nb, path)
        finally:
            tmp.unlink(missing_ok=True)
        print(f"  {path.name}: {time.time() - start:.0f} s", flush=True)
        done.append(path)
    return done


#: Parameters that may name a local file or folder (a data file, a saved model).
PATH_PARAMETERS = ("data_path", "model_name")


def _absolute_paths(overrides: dict[str, Any]) -> dict[str, Any]:
    """Make relative local paths absolute: papermill runs each notebook inside notebooks/, not where you typed."""
    fixed = dict(overrides)
    for name in PATH_PARAMETERS:
        value = fixed.get(name)
        if isinstance(value, str) and not Path(value).is_absolute() and Path(value).exists():
            fixed[name] = str(Path(value).resolve())
    return fixed


def _split_overrides(selected: list[Path], profile: str, overrides: dict[str, Any]) -> dict[str, dict]:
    """Give each notebook the overrides it takes; an override no selected notebook takes is an error."""
    per_nb: dict[str, dict] = {}
    used: set[str] = set()
    for path in selected:
        takes = PROFILES[profile].get(path.stem, {})
        per_nb[path.stem] = {k: v for k, v in overrides.items() if k in takes}
        for name, value in per_nb[path.stem].items():
            check_parameter(path.stem, name, value, profile)
        used |= set(per_nb[path.stem])
    unknown = sorted(set(overrides) - used)
    if unknown:
        allowed = sorted({k for p in selected for k in PROFILES[profile].get(p.stem, {})})
        raise CourseError(f"Unknown parameter(s) {unknown} for notebooks {[p.stem for p in selected]}; "
                          f"they take {allowed}.")
    return per_nb


def course_dir(profile: str, build: Path | None = None) -> Path:
    """build/course for the cpu profile, build/course-<profile> for others, so one never overwrites the other."""
    return (Path(build) if build else build_dir()) / ("course" if profile == "cpu" else f"course-{profile}")


def check_profile_values(selected: list[Path], profile: str) -> None:
    """Every parameter value the profile gives the selected notebooks passes its checks (names, types, ranges)."""
    for path in selected:
        for name, value in PROFILES[profile].get(path.stem, {}).items():
            check_parameter(path.stem, name, value, profile)
            if name in ("model_name", "measure_model") and isinstance(value, str) and value != "embedded":
                is_hub = value.count("/") == 1 and not value.startswith((".", "/", "~"))
                if not (is_hub or value.startswith("llama-") or Path(value).expanduser().exists()):
                    raise CourseError(f"Parameter {name}={value!r} for {path.stem} is neither a hub id "
                                      "('org/name'), a preset, nor an existing folder.")


def preflight(profile: str, smoke_run: bool = False) -> None:
    """Say before the first notebook starts when the machine cannot run a profile (no GPU, no hub)."""
    if profile != "gpu" or smoke_run:
        return
    import socket

    import torch

    if not torch.cuda.is_available():
        raise CourseError("The gpu profile needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() "
                          "is False). Use --profile cpu, which runs everything offline on the CPU.")
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        return  # the user says the hub models and data are already in the local cache
    try:
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError as err:
        raise CourseError(f"The gpu profile downloads its model and data from the Hugging Face hub, which "
                          f"cannot be reached from here ({type(err).__name__}: {err}). Connect to the internet, "
                          "or set HF_HUB_OFFLINE=1 if they are already in your cache.") from err


def run_course(profile: str = "cpu", only: str | list[str] | None = None,
               overrides: dict[str, Any] | None = None, out_dir: Path | None = None,
               progress: bool = True, smoke_run: bool = False) -> list[NotebookRun]:
    """Execute the notebooks in order; write executed copies, HTML, an index and summary.json.

    `smoke_run` (gpu profile only) runs the gpu path offline on tiny stand-ins: see `qlora_lab.smoke`.
    """
    import nbformat
    from papermill.exceptions import PapermillExecutionError

    check_profile(profile)
    if smoke_run and profile != "gpu":
        raise CourseError(f"--smoke runs the gpu profile's code path on stand-ins; it needs --profile gpu, "
                          f"not {profile!r} (the cpu profile already runs offline for real).")
    selected = _select(only)
    per_nb = _split_overrides(selected, profile, _absolute_paths(overrides or {}))
    check_profile_values(selected, profile)
    preflight(profile, smoke_run)
    build = Path(out_dir) if out_dir else build_dir()
    report = course_dir(profile + ("-smoke" if smoke_run else ""), build)
    try:
        report.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix=".run-", dir=report))  # this run's own files
    except OSError as err:
        raise CourseError(f"Cannot write the course report to {report}: {err.strerror or err}. "
                          "Choose a writable folder with --out.") from err
    saved_env = {k: os.environ.get(k) for k in ("QLORA_LAB_BUILD", "QLORA_LAB_RESULTS", smoke.ENV)}
    os.environ["QLORA_LAB_BUILD"] = str(build.resolve())
    os.environ["QLORA_LAB_RESULTS"] = str(run_dir.resolve())
    if smoke_run:
        os.environ[smoke.ENV] = str((build / "smoke-standins").resolve())
        smoke.make_standins(build / "smoke-standins")  # once, before any kernel needs it
    runs: list[NotebookRun] = []
    try:
        for i, path in enumerate(selected, 1):
            name = path.stem
            print(f"[{i}/{len(selected)}] {name} (profile {profile}"
                  + (f", {per_nb[name]}" if per_nb[name] else "") + ")", flush=True)
            executed = run_dir / path.name
            start = time.time()
            run = NotebookRun(name, "ok", 0.0, {})
            try:
                execute_notebook(path, executed, {"profile": profile, **per_nb[name]}, progress=progress)
            except PapermillExecutionError as err:
                run.status, run.failed_cell = "failed", err.exec_count
                run.error = f"{err.ename}: {err.evalue} (in `{failing_line(err.source, err.traceback)}`)"
            run.seconds = round(time.time() - start, 1)
            if results_path(name).is_file():
                run.results = json.loads(results_path(name).read_text())
            runs.append(run)
            if executed.is_file():
                os.replace(executed, report / path.name)
                _render_html(nbformat.read(report / path.name, as_version=4), report / f"{name}.html")
            if run.status != "ok":
                print(f"FAILED: {name} stopped in cell In [{run.failed_cell}]: {run.error}. "
                      f"See {report / path.name}.", file=sys.stderr, flush=True)
                break
            print(f"    done in {run.seconds:.0f} s", flush=True)
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(run_dir, ignore_errors=True)  # only this run's temporary folder
    merged = _write_summary(report, profile, runs, [p.stem for p in selected], partial=only is not None)
    if merged:
        print(f"A partial run: merged into the existing summary, which keeps the results of "
              f"{', '.join(merged)} from earlier runs (see each notebook's 'finished' time).", flush=True)
    print(f"Report: {report / 'index.html'}  (summary: {report / 'summary.json'})", flush=True)
    return runs


def _render_html(nb, target: Path) -> None:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    write_atomic(target, body)


@contextlib.contextmanager
def _locked(folder: Path):
    """Serialise read-modify-write of the summary between course runs that share a build folder."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(folder / ".summary.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _write_summary(report: Path, profile: str, runs: list[NotebookRun], planned: list[str],
                   partial: bool = False) -> list[str]:
    """Write summary.json and index.html; a partial run merges into the summary it finds (returns the kept names)."""
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    entries = {r.notebook: {"status": r.status, "seconds": r.seconds, "results": r.results, "finished": now,
                            **({"error": r.error, "failed_cell": r.failed_cell} if r.error else {})}
               for r in runs}
    with _locked(report):
        kept: dict[str, Any] = {}
        old_path = report / "summary.json"
        if partial and old_path.is_file():
            try:
                old = json.loads(old_path.read_text())
            except ValueError:
                old = {}
            if old.get("profile") == profile:
                kept = {k: v for k, v in old.get("notebooks", {}).items() if k not in entries}
        notebooks_run = {**kept, **entries}
        order = [p.stem for p in notebooks()]
        notebooks_run = dict(sorted(notebooks_run.items(), key=lambda kv: order.index(kv[0])
                                    if kv[0] in order else len(order)))
        not_run = [p for p in planned if p not in entries]
        summary = {
            "profile": profile,
            "status": "ok" if not not_run and all(e["status"] == "ok" for e in notebooks_run.values()) else "failed",
            "notebooks": notebooks_run,
            "not_run": not_run,
            "complete_course": all(stem in notebooks_run for stem in order),
        }
        write_atomic(old_path, json.dumps(summary, indent=2, default=_jsonable) + "\n")
        write_atomic(report / "index.html", _index_page(profile, summary))
    return sorted(kept)


def _index_page(profile: str, summary: dict[str, Any]) -> str:
    rows = []
    for name, entry in summary["notebooks"].items():
        title = COURSE_MAP.get(name, (name,))[0]
        numbers = "<br>".join(f"{html.escape(str(k))}: {html.escape(_fmt(v))}" for k, v in entry["results"].items())
        err = (f"<br><small>In [{entry.get('failed_cell')}]: {html.escape(entry.get('error') or '')}</small>"
               if entry.get("error") else "")
        rows.append(f"<tr><td><a href='{name}.html'>{name}</a><br>{html.escape(title)}</td>"
                    f"<td class='{entry['status']}'>{entry['status']}{err}</td><td>{entry['seconds']:.0f}</td>"
                    f"<td>{html.escape(entry.get('finished', ''))}</td><td>{numbers}</td></tr>")
    for name in summary["not_run"]:
        rows.append(f"<tr><td>{name}</td><td>not run</td><td></td><td></td><td></td></tr>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>qlora-lab course ({profile})</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:6px;vertical-align:top}}
table{{border-collapse:collapse}}.ok{{color:green}}.failed{{color:#b00}}</style></head><body>
<h1>qlora-lab course run: profile <code>{profile}</code> ({summary['status']})</h1>
<table><tr><th>notebook</th><th>status</th><th>seconds</th><th>finished</th><th>headline numbers</th></tr>
{''.join(rows)}</table></body></html>"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value) if not isinstance(value, (dict, list)) else json.dumps(value)[:200]
