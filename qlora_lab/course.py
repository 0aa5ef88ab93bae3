"""The course itself: notebook order, profiles (cpu/gpu parameters per notebook), and the headless runner."""

from __future__ import annotations

import ast
import html
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

PROFILE_NAMES = ("cpu", "gpu")

#: What each notebook teaches and its measured CPU minutes on 2 cores (cpu profile). Keyed by notebook stem.
COURSE_MAP: dict[str, tuple[str, str, float]] = {
    "00_welcome": ("Welcome", "course map, environment check, the embedded model in 16-bit and NF4, the two prompt formats", 1),
    "01_lora_low_rank_math": ("LoRA low-rank math", "W0 + (alpha/r)BA, init, scaling, merge, parameter counts, rank of real updates; equal to peft", 1),
    "02_nf4_quantiles": ("NF4 quantiles", "normal quantiles to a 16-value code, blockwise absmax, nibble packing, FP4/Int4; byte-equal to bitsandbytes", 1),
    "03_double_quantization": ("Double quantization", "8-bit quantization of the absmax constants: 4.5 to 4.127 bits/param", 1),
    "04_paged_optimizers": ("Paged optimizers", "memory spikes, unified-memory paging, OOM without paging and survival with it", 1),
    "05_memory_budget": ("Memory budget", "an estimator for full / LoRA / QLoRA by model size, checked against measurement", 1),
    "06_guanaco_oasst1_finetune": ("Guanaco OASST1 fine-tune", "OASST1 trees to Guanaco text, QLoRA with the paper's recipe, evaluate, chat, save, merge", 5),
    "07_qlora_vs_lora_vs_full": ("QLoRA vs LoRA vs full", "the same run in 16-bit full, 16-bit LoRA and QLoRA NF4+DQ / NF4 / FP4 / Int4", 5),
    "09_your_own_qlora": ("Your own QLoRA", "the recipe in plain transformers + peft + bitsandbytes + TRL on your chat data, equal to qlora_lab.train; merge, chat, serve", 3),
}

#: Parameters per notebook and profile. Every parameter a notebook takes is listed under both profiles.
#: A notebook's papermill `parameters` cell holds `profile = "cpu"` and `NAME = None` for each of these;
#: `settings()` fills the Nones from the profile, so the numbers live in one place.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        "00_welcome": {"model_name": None, "max_new_tokens": 48},
        "01_lora_low_rank_math": {"model_name": None, "data_source": "embedded", "ft_layer": 27, "ft_module": "self_attn.q_proj", "max_steps": 16, "batch_size": 4, "seq_len": 64, "train_blocks": 16, "eval_blocks": 8, "learning_rate": 1e-3},  # cpu: 01_lora_low_rank_math
        "02_nf4_quantiles": {"model_name": None, "data_source": "embedded", "eval_rows": 8, "max_length": 96, "error_params": 16_000_000},  # cpu: 02_nf4_quantiles
        "03_double_quantization": {"model_name": None, "data_source": "embedded", "eval_rows": 8, "max_length": 96},  # cpu: 03_double_quantization
        "04_paged_optimizers": {"data_source": "embedded", "short_len": 64, "long_len": 1024, "steps": 4, "long_step": 2, "cuda_short_len": 256, "cuda_long_len": 2048},  # cpu: 04_paged_optimizers
        "05_memory_budget": {"measure_model": "embedded", "measure_methods": ["full", "lora", "qlora"], "measure_shapes": [[1, 64], [4, 128]]},  # cpu: 05_memory_budget
        "06_guanaco_oasst1_finetune": {"recipe": "cpu", "max_steps": 40, "n_eval_prompts": 22, "max_new_tokens": 384, "repetition_penalty": 1.2},
        "07_qlora_vs_lora_vs_full": {"model_name": None, "data_source": "embedded", "seeds": [0, 1], "max_steps": 10, "batch_size": 4, "max_length": 128, "eval_rows": 22, "lora_lr": 2e-3, "full_lr": 2e-4, "optim": "paged_adamw_32bit"},  # cpu: 07_qlora_vs_lora_vs_full
        "09_your_own_qlora": {"data_path": "embedded", "model_name": None, "max_steps": 10, "batch_size": 4, "grad_accum": 1, "max_length": 192, "learning_rate": 1e-3, "lora_r": 64, "compute_dtype": "float32", "optim": "adamw_torch", "gradient_checkpointing": False, "eval_size": 4, "max_new_tokens": 48},  # cpu: 09_your_own_qlora
    },
    "gpu": {
        "00_welcome": {"model_name": "huggyllama/llama-7b", "max_new_tokens": 128},
        "01_lora_low_rank_math": {"model_name": "huggyllama/llama-7b", "data_source": "hub", "ft_layer": 28, "ft_module": "self_attn.q_proj", "max_steps": 100, "batch_size": 8, "seq_len": 256, "train_blocks": 128, "eval_blocks": 32, "learning_rate": 1e-4},  # gpu: 01_lora_low_rank_math
        "02_nf4_quantiles": {"model_name": "huggyllama/llama-7b", "data_source": "guanaco-hub", "eval_rows": 64, "max_length": 512, "error_params": 400_000_000},  # gpu: 02_nf4_quantiles
        "03_double_quantization": {"model_name": "huggyllama/llama-7b", "data_source": "guanaco-hub", "eval_rows": 64, "max_length": 512},  # gpu: 03_double_quantization
        "04_paged_optimizers": {"data_source": "hub", "short_len": 128, "long_len": 2048, "steps": 4, "long_step": 2, "cuda_short_len": 256, "cuda_long_len": 2048},  # gpu: 04_paged_optimizers
        "05_memory_budget": {"measure_model": "llama-7b", "measure_methods": ["lora", "qlora"], "measure_shapes": [[1, 512], [4, 512]]},  # gpu: 05_memory_budget
        "06_guanaco_oasst1_finetune": {"recipe": "guanaco-7b", "max_steps": 1875, "n_eval_prompts": 64, "max_new_tokens": 512, "repetition_penalty": 1.2},
        "07_qlora_vs_lora_vs_full": {"model_name": "HuggingFaceTB/SmolLM2-1.7B", "data_source": "guanaco-hub", "seeds": [0, 1], "max_steps": 300, "batch_size": 16, "max_length": 512, "eval_rows": 518, "lora_lr": 2e-4, "full_lr": 2e-5, "optim": "paged_adamw_32bit"},  # gpu: 07_qlora_vs_lora_vs_full
        "09_your_own_qlora": {"data_path": "hub", "model_name": "huggyllama/llama-7b", "max_steps": 100, "batch_size": 4, "grad_accum": 4, "max_length": 512, "learning_rate": 2e-4, "lora_r": 64, "compute_dtype": "bfloat16", "optim": "paged_adamw_32bit", "gradient_checkpointing": True, "eval_size": 64, "max_new_tokens": 256},  # gpu: 09_your_own_qlora
    },
}


class CourseError(ValueError):
    """Bad course input (unknown profile, notebook or parameter); the message lists what is allowed."""


def repo_root() -> Path:
    """The checkout this package lives in (notebooks/ and data/ sit beside qlora_lab/)."""
    here = Path(__file__).resolve().parent.parent
    if (here / "notebooks").is_dir():
        return here
    cwd = Path.cwd()
    for candidate in (cwd, *cwd.parents):
        if (candidate / "notebooks").is_dir() and (candidate / "qlora_lab").is_dir():
            return candidate
    raise CourseError("Cannot find the course checkout (a folder with notebooks/ and qlora_lab/).")


def build_dir() -> Path:
    """Where runs write: $QLORA_LAB_BUILD, else build/ in the checkout."""
    env = os.environ.get("QLORA_LAB_BUILD")
    return Path(env) if env else repo_root() / "build"


def notebooks() -> list[Path]:
    """The course notebooks in order (NN_name.ipynb under notebooks/)."""
    found = (repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb")
    return sorted(p for p in found if p.stem.count(".") == 0)


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise CourseError(f"Unknown profile {profile!r}; choose one of {sorted(PROFILES)}.")


def settings(notebook: str, profile: str = "cpu", **given: Any) -> SimpleNamespace:
    """A notebook's parameters: the profile's values, replaced by every `given` value that is not None."""
    _check_profile(profile)
    defaults = PROFILES[profile].get(notebook)
    if defaults is None:
        raise CourseError(f"Notebook {notebook!r} has no parameters in profile {profile!r}; "
                          f"known: {sorted(PROFILES[profile])}.")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise CourseError(f"Unknown parameter(s) {unknown} for {notebook}; it takes {sorted(defaults)}.")
    values = dict(defaults)
    values.update({k: v for k, v in given.items() if v is not None})
    return SimpleNamespace(profile=profile, **values)


def results_path(notebook: str) -> Path:
    """build/results/<notebook>.json, where a notebook leaves its headline numbers for the runner."""
    return build_dir() / "results" / f"{notebook}.json"


def save_results(notebook: str, results: dict[str, Any]) -> None:
    """Write a notebook's headline numbers (atomically) so the course runner can tabulate them."""
    path = results_path(notebook)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True, default=_jsonable) + "\n")
    os.replace(tmp, path)


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
    if not only:
        return all_nbs
    wanted = only.split(",") if isinstance(only, str) else list(only)
    chosen = []
    for w in (w.strip() for w in wanted if w.strip()):
        match = [p for p in all_nbs if p.stem == w or p.stem.split("_")[0] == w.zfill(2)]
        if not match:
            raise CourseError(f"No notebook {w!r}; choose from {[p.stem.split('_')[0] for p in all_nbs]} "
                              f"or full names {[p.stem for p in all_nbs]}.")
        chosen.extend(m for m in match if m not in chosen)
    return sorted(chosen)


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


def refresh_notebooks(only: str | list[str] | None = None) -> list[Path]:
    """Re-execute committed notebooks in place on the cpu profile and clean them (for maintainers)."""
    import nbformat

    done = []
    for path in _select(only):
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
        used |= set(per_nb[path.stem])
    unknown = sorted(set(overrides) - used)
    if unknown:
        allowed = sorted({k for p in selected for k in PROFILES[profile].get(p.stem, {})})
        raise CourseError(f"Unknown parameter(s) {unknown} for notebooks {[p.stem for p in selected]}; "
                          f"they take {allowed}.")
    return per_nb


def run_course(profile: str = "cpu", only: str | list[str] | None = None,
               overrides: dict[str, Any] | None = None, out_dir: Path | None = None,
               progress: bool = True) -> list[NotebookRun]:
    """Execute the notebooks in order; write executed copies, HTML, an index and summary.json."""
    import nbformat
    from papermill.exceptions import PapermillExecutionError

    _check_profile(profile)
    selected = _select(only)
    per_nb = _split_overrides(selected, profile, _absolute_paths(overrides or {}))
    build = Path(out_dir) if out_dir else build_dir()
    course_dir = build / "course"
    course_dir.mkdir(parents=True, exist_ok=True)
    os.environ["QLORA_LAB_BUILD"] = str(build.resolve())
    runs: list[NotebookRun] = []
    for i, path in enumerate(selected, 1):
        name = path.stem
        print(f"[{i}/{len(selected)}] {name} (profile {profile}"
              + (f", {per_nb[name]}" if per_nb[name] else "") + ")", flush=True)
        results_path(name).unlink(missing_ok=True)
        executed = course_dir / path.name
        start = time.time()
        run = NotebookRun(name, "ok", 0.0, {})
        try:
            execute_notebook(path, executed, {"profile": profile, **per_nb[name]}, progress=progress)
        except PapermillExecutionError as err:
            run.status, run.failed_cell = "failed", err.exec_count
            source = (err.source or "").strip().splitlines()
            run.error = f"{err.ename}: {err.evalue} (in `{source[-1] if source else ''}`)"
        run.seconds = round(time.time() - start, 1)
        if results_path(name).is_file():
            run.results = json.loads(results_path(name).read_text())
        runs.append(run)
        if executed.is_file():
            _render_html(nbformat.read(executed, as_version=4), course_dir / f"{name}.html")
        if run.status != "ok":
            print(f"FAILED: {name} stopped in cell In [{run.failed_cell}]: {run.error}. "
                  f"See {executed}.", file=sys.stderr, flush=True)
            break
        print(f"    done in {run.seconds:.0f} s", flush=True)
    _write_summary(course_dir, profile, runs, [p.stem for p in selected])
    print(f"Report: {course_dir / 'index.html'}  (summary: {course_dir / 'summary.json'})", flush=True)
    return runs


def _render_html(nb, target: Path) -> None:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    target.write_text(body, encoding="utf-8")


def _write_summary(course_dir: Path, profile: str, runs: list[NotebookRun], planned: list[str]) -> None:
    summary = {
        "profile": profile,
        "status": "ok" if len(runs) == len(planned) and all(r.status == "ok" for r in runs) else "failed",
        "notebooks": {r.notebook: {"status": r.status, "seconds": r.seconds, "results": r.results,
                                   **({"error": r.error, "failed_cell": r.failed_cell} if r.error else {})}
                      for r in runs},
        "not_run": [p for p in planned if p not in {r.notebook for r in runs}],
    }
    (course_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable) + "\n")
    rows = []
    for r in runs:
        title = COURSE_MAP.get(r.notebook, (r.notebook,))[0]
        numbers = "<br>".join(f"{html.escape(str(k))}: {html.escape(_fmt(v))}" for k, v in r.results.items())
        err = f"<br><small>In [{r.failed_cell}]: {html.escape(r.error or '')}</small>" if r.error else ""
        rows.append(f"<tr><td><a href='{r.notebook}.html'>{r.notebook}</a><br>{html.escape(title)}</td>"
                    f"<td class='{r.status}'>{r.status}{err}</td><td>{r.seconds:.0f}</td><td>{numbers}</td></tr>")
    for name in summary["not_run"]:
        rows.append(f"<tr><td>{name}</td><td>not run</td><td></td><td></td></tr>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>qlora-lab course ({profile})</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:6px;vertical-align:top}}
table{{border-collapse:collapse}}.ok{{color:green}}.failed{{color:#b00}}</style></head><body>
<h1>qlora-lab course run: profile <code>{profile}</code> ({summary['status']})</h1>
<table><tr><th>notebook</th><th>status</th><th>seconds</th><th>headline numbers</th></tr>
{''.join(rows)}</table></body></html>"""
    (course_dir / "index.html").write_text(page, encoding="utf-8")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value) if not isinstance(value, (dict, list)) else json.dumps(value)[:200]
