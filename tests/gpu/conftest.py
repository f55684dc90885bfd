"""GPU suite (``pytest -m gpu tests/gpu``): every test here needs CUDA and is skipped without it.

Each test adds one short summary line (``summary`` fixture); they are printed together at the end
of the run, so ``-q`` output still shows what was measured. Each test's outcome is also written to
the real stderr as soon as it is known (``[gpu] PASSED name 12.3s``), so a run cut by a time limit
keeps what finished.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent
_LINES: list[str] = []


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (the GPU suite)")
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture
def summary(request):
    """summary(text): one line for the end-of-run report, prefixed with the test's name."""
    parts: list[str] = []
    t0 = time.perf_counter()
    yield parts.append
    dt = time.perf_counter() - t0
    line = f"{request.node.name} [{dt:.1f}s]: " + "; ".join(parts)
    _LINES.append(line)
    print(f"[gpu] summary {line}", file=sys.__stderr__, flush=True)  # kept under xdist and cut runs


def pytest_terminal_summary(terminalreporter):
    if _LINES:
        terminalreporter.section("blitzgen GPU suite")
        for line in _LINES:
            terminalreporter.write_line(line)


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.failed):
        print(f"[gpu] {report.outcome.upper()} {report.nodeid} {report.duration:.1f}s", file=sys.__stderr__,
              flush=True)
