"""Start a distributed run and get its result back: a free port, a timeout, a dead rank turned into an error.

`launch(script_args, nproc=2)` runs `qlora_lab.distributed` under torchrun or accelerate, streams its progress,
and stops every process of the run on a timeout or when one rank dies, so a notebook never hangs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

LAUNCHERS = ("torchrun", "accelerate")


class LaunchError(RuntimeError):
    """A distributed run did not finish: a rank died, it timed out, or it could not start."""


class PortInUseError(LaunchError, ValueError):
    """The rendezvous port asked for is already taken by another program."""


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int) -> None:
    """Fail fast if the rendezvous port is taken: otherwise the ranks wait for a store that is not ours."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as err:
            raise PortInUseError(f"port {port} is already in use ({err.strerror}); pass port=None to pick a "
                                 "free one, or stop the program using it") from None


def command(script_args: list[str], nproc: int, port: int, launcher: str, config: str | None = None,
            cpu: bool = False) -> list[str]:
    """The launcher command line: torchrun (torch.distributed.run) or accelerate launch, as a module run.

    accelerate's `--cpu` starts one plain process whatever `--num_processes` says, so several processes without a
    config use `--multi_gpu` (accelerate's torchrun path); with no GPU visible the ranks then run on gloo.
    """
    if launcher == "torchrun":
        head = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(port)]
    else:
        if config:
            mode = []  # the config file says how to launch
        elif nproc > 1:
            mode = ["--multi_gpu"]
        else:
            mode = ["--cpu"] if cpu or not torch.cuda.is_available() else []
        head = ["-m", "accelerate.commands.launch", *(["--config_file", config] if config else []),
                "--num_processes", str(nproc), "--num_machines", "1", "--main_process_port", str(port), *mode]
    return [sys.executable, *head, "-m", "qlora_lab.distributed", *script_args]


def launch(script_args: list[str], nproc: int = 2, *, launcher: str = "torchrun", port: int | None = None,
           timeout: float = 300, threads: int | None = None, config: str | None = None, cpu: bool = False,
           progress: bool = False) -> dict[str, Any]:
    """Run the script on nproc processes; return rank 0's JSON result, or raise LaunchError with the output tail.

    `threads`: torch threads per process (default: the cores shared out); `cpu`: hide GPUs (gloo on CPU);
    `progress`: a progress bar over rank 0's steps.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher={launcher!r} is not one of {list(LAUNCHERS)}")
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc={nproc!r} must be a positive integer")
    if "--out" not in script_args:
        raise ValueError("script_args must contain --out PATH (where rank 0 writes its result)")
    if port is None:
        port = free_port()
    check_port(port)
    out = Path(script_args[script_args.index("--out") + 1])
    out.unlink(missing_ok=True)
    root = str(Path(__file__).resolve().parent.parent)  # the ranks import this checkout's qlora_lab
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(threads or max(1, (os.cpu_count() or 1) // nproc)),
           # waiting OpenMP threads sleep instead of spinning: spinning wastes the core another job needs
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})}
    proc = subprocess.Popen(command(script_args, nproc, port, launcher, config, cpu), env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: [lines.append(ln) for ln in proc.stdout], daemon=True)
    reader.start()
    _wait(proc, lines, time.monotonic() + timeout, progress)
    if proc.poll() is None:
        _stop_tree(proc.pid)
        proc.wait()
        reader.join(timeout=5)
        raise LaunchError(f"no result after {timeout:.0f} s: stopped all ranks. Last output:\n"
                          + "".join(lines[-12:]))
    reader.join(timeout=5)
    if proc.returncode != 0 or not out.is_file():
        errors = [ln.strip() for ln in lines if re.match(r"(\[rank\d+\]: )?(\w+(Error|Exception)|rank \d+:)", ln)]
        raise LaunchError(f"the run failed (launcher exit code {proc.returncode}): "
                          + ("; ".join(dict.fromkeys(errors)) or "no error line found") + "\nLast output:\n"
                          + "".join(lines[-12:]))
    return json.loads(out.read_text())


def _stop_tree(pid: int) -> None:
    """Kill the launcher and every rank: torchrun starts each rank in a session of its own, so killpg misses them."""
    try:
        import psutil  # installed with accelerate, which transformers' Trainer needs

        ranks = psutil.Process(pid).children(recursive=True)
    except Exception:  # no psutil, or the launcher is already gone: its session is all we can reach
        ranks = []
    for rank in ranks:
        with contextlib.suppress(Exception):
            rank.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, 9)


def _wait(proc: subprocess.Popen, lines: list[str], deadline: float, progress: bool) -> None:
    """Wait for the launcher until the deadline, moving a progress bar with rank 0's "step i/k" lines."""
    from tqdm.auto import tqdm

    with tqdm(unit="step", disable=not progress) as bar:
        while proc.poll() is None and time.monotonic() < deadline:
            steps = [ln.split()[1] for ln in list(lines) if ln.startswith("step ")]
            if steps:
                bar.total = int(steps[-1].split("/")[1])
                bar.update(len(steps) - bar.n)
            time.sleep(0.2)


def adapter_tensors(result_json: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The trained tensors a run saved beside its JSON result."""
    from safetensors.torch import load_file

    return load_file(str(Path(result_json).with_suffix(".safetensors")))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two runs' tensors (same names required)."""
    if set(a) != set(b):
        raise ValueError(f"different tensors: {sorted(set(a) ^ set(b))[:4]}")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
