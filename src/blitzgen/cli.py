"""The ``blitzgen`` command: generate | chat | serve | quantize | bench | cache."""

from __future__ import annotations

import importlib
import os
import sys
import time

COMMANDS = ["generate", "chat", "serve", "quantize", "bench", "cache"]


def build_parser():
    from . import __version__
    from .commands.common import Parser

    p = Parser(prog="blitzgen", description="Fast batch-1 LLM inference in pure PyTorch.")
    p.add_argument("--version", action="version", version=f"blitzgen {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"blitzgen.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"blitzgen.commands.{name}":
                raise
            continue
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from . import startup  # noqa: F401  (the start-up report's clock; no torch)

    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1" if not _has_cuda_hint() else "0")
    from .commands.common import check_args
    from .errors import BlitzgenError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)  # what needs neither torch nor the model, for every verb
        return int(args.func(args) or 0)
    except BlitzgenError as e:
        print(f"blitzgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _instrumented() -> bool:
    """A profiler or tracer is on: sys.setprofile/settrace, or (Python >= 3.12, where cProfile and
    coverage use it) a sys.monitoring tool."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return True
    mon = getattr(sys, "monitoring", None)
    return mon is not None and any(mon.get_tool(i) is not None for i in range(6))


def run() -> None:
    """The process entry (the ``blitzgen`` script, ``python -m blitzgen``): ``main()``, the atexit
    handlers (Inductor's workers, logging, temporary directories), the Python and C stdio flushes,
    then ``os._exit``. What that skips is the interpreter's teardown of every module and tensor:
    ~1.1 s after a compiled CPU run (BENCHMARKS.md). Under a profiler or tracer (cProfile,
    coverage), or with ``BLITZGEN_FAST_EXIT=0``, the process exits normally. ``main()`` itself
    returns, for callers in-process."""
    rc = main()
    trace = os.environ.get("BLITZGEN_EXIT_TRACE") == "1"  # benchmarks/startup_gpu.py: where the exit goes
    if trace:
        print(f"blitzgen: exit: main returned at {time.time():.3f}", file=sys.stderr, flush=True)
    if _instrumented() or os.environ.get("BLITZGEN_FAST_EXIT") == "0":
        sys.exit(rc)
    import atexit

    t = time.perf_counter()
    atexit._run_exitfuncs()
    if trace:
        print(f"blitzgen: exit: atexit handlers {time.perf_counter() - t:.3f} s", file=sys.stderr, flush=True)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (| head)
            pass
    try:  # what C and C++ code wrote through stdio (NCCL_DEBUG, std::cout)
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
    os._exit(rc)


def _has_cuda_hint() -> bool:
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES")) or os.path.exists("/dev/nvidia0")


if __name__ == "__main__":
    run()
