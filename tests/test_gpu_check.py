"""The GPU check's CPU dry run: the same code on tiny stand-ins, CUDA-only parts skipped with a reason."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_gpu_check_dry_run_writes_its_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("QLORA_LAB_SMOKE", None)
    proc = subprocess.run([sys.executable, "-m", "qlora_lab.gpu_check", "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and [m["preset"] for m in result["memory"]] == ["llama-7b", "llama-13b"]
    for m in result["memory"]:
        assert m["measured_gb"] > 0 and m["estimated_gb"] > 0
    assert {s["method"] for s in result["speed"]} == {"qlora", "lora"}
    assert all(s["steps_per_second"] > 0 for s in result["speed"])
    assert result["paging"].startswith("skipped: needs a CUDA GPU")


def test_gpu_check_refuses_a_real_run_without_cuda(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qlora_lab.gpu_check", "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "needs a CUDA GPU" in proc.stderr
