"""The `qlora-lab` command: run the course headless, show the environment, refresh committed notebooks."""

from __future__ import annotations

import argparse
import sys

from . import course, profiles, quiet
from .nf4 import ALLOWED_BLOCKSIZES


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (what is wrong and what is allowed), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"qlora-lab: error: {message}\n")


def _whole_number(flag: str):
    """An argparse type for a whole number >= 1 whose error names the flag and the value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not a whole number >= 1")
        return value

    return parse


def _info() -> int:
    """Print versions, device, cache location and whether the embedded model is ready."""
    import platform

    import torch

    from . import models

    print(f"qlora-lab {__import__('qlora_lab').__version__}  python {platform.python_version()}")
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "accelerate", "papermill"):
        try:
            module = __import__(name)
            print(f"  {name:13s} {module.__version__}")
        except ImportError:
            print(f"  {name:13s} not installed")
    if torch.cuda.is_available():
        print(f"device: cuda ({torch.cuda.get_device_name(0)})")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads); no CUDA GPU, so the cpu profile applies")
        from . import bf16_cpu

        fast = bf16_cpu.cpu_has_fast_bf16()
        how = ("computed in float32 and rounded to bf16 (this CPU has no fast bf16; "
               f"{bf16_cpu.ENV}=native turns that off)" if bf16_cpu.active() else "computed by torch in bf16")
        print(f"bf16 matrix products: {how}; fast bf16 on this CPU: {'yes' if fast else 'no'}")
    print(f"cache: {models.cache_dir()}  (set QLORA_LAB_CACHE to move it)")
    try:
        gguf = models.embedded_gguf_path()
        ready = "converted and ready" if models.embedded_model_ready() else "installed, converts on first load (~20 s)"
        print(f"embedded model: {models.EMBEDDED_NAME} from {gguf.name}: {ready}")
    except models.ModelNotAvailableError as err:
        print(f"embedded model: NOT AVAILABLE\n{err}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    quiet()
    parser = _Parser(prog="qlora-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("course", help="run the notebooks headless with papermill")
    run.add_argument("--profile", default="cpu", help="cpu (default, offline) or gpu")
    run.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 00,02")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="override one notebook parameter (repeatable)")
    run.add_argument("--out", default=None, help="build folder (default: build/ in the checkout)")
    run.add_argument("--smoke", action="store_true",
                     help="with --profile gpu: run the gpu path offline on tiny stand-ins (proves it runs)")
    sub.add_parser("info", help="versions, device, cache and embedded-model status")
    refresh = sub.add_parser("refresh", help="re-execute committed notebooks in place (maintainers)")
    refresh.add_argument("--only", default=None)
    refresh.add_argument("--solutions", action="store_true", help="the worked solutions under solutions/ instead")
    bench = sub.add_parser("bench", help="time our quantize_4bit against bitsandbytes' (ratio, side by side)")
    bench.add_argument("--size", type=_whole_number("--size"), default=4096, help="square weight size (default 4096)")
    bench.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    bench.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    bench.add_argument("--blocksize", type=int, default=64, choices=ALLOWED_BLOCKSIZES,
                       help=f"one of {list(ALLOWED_BLOCKSIZES)} (default 64)")
    bench.add_argument("--repeats", type=_whole_number("--repeats"), default=7)
    args = parser.parse_args(argv)  # argparse itself prints one usage line and exits 2 on a bad value
    try:
        if args.command == "info":
            return _info()
        if args.command == "bench":
            from . import bench as _bench

            return _bench.main(args.size, args.dtype, args.quant_type, args.blocksize, args.repeats)
        if args.command == "refresh":
            course.refresh_notebooks(args.only, solution_notebooks=args.solutions)
            return 0
        overrides = {name: course.parse_value(value) for name, value in args.parameter}
        runs = course.run_course(args.profile, args.only, overrides, out_dir=args.out, smoke_run=args.smoke)
        return 0 if runs and all(r.status == "ok" for r in runs) else 1
    except (profiles.CourseError, ValueError, OSError) as err:  # expected input errors: one line, no traceback
        print(f"qlora-lab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
