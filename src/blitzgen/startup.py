"""Where a start's time went: one line on stderr, and gauges for ``/metrics``.

Phases are contiguous: each ``mark(name)`` closes a phase that began where the previous one ended,
the first one at the process's own start (read from /proc, so interpreter start-up and imports are
counted), so the phases always add up to the wall time from process start to the last mark.

    report = StartupReport()          # or startup.REPORT, created when this module is imported
    report.mark("imports")            # process start -> now
    ...load...;          report.mark("load")
    ...compile/warm...;  report.mark("compile")        # or "cache load", "graphs", "warm-up"
    ...first token...;   report.mark("first token")
    print(report.render(), file=sys.stderr)
    report.register(metrics.registry)  # blitzgen_startup_seconds{phase=...}
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

PHASES = ("imports", "load", "cache load", "compile", "graphs", "warm-up", "first token")


def process_start_time() -> float:
    """The wall-clock time (time.time()) at which this process started; from /proc/self/stat on
    Linux, else the time this module was first imported."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= age < 365 * 86400:
            return time.time() - age
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORTED_AT


_IMPORTED_AT = time.time()


class StartupReport:
    """Contiguous phases from ``start`` (default: the process start) to the last mark."""

    def __init__(self, start: float | None = None):
        self.start = process_start_time() if start is None else start
        self.phases: dict[str, float] = {}  # name -> seconds, in first-mark order
        self.details: dict[str, float] = {}  # sub-phase breakdowns, not part of the sum
        self._last = self.start
        self._lock = threading.Lock()
        self._gauges: list = []

    def mark(self, name: str, now: float | None = None) -> float:
        """Close phase ``name`` at ``now``: it gets the time since the previous mark (added to it
        when the name repeats). Returns the phase's seconds."""
        with self._lock:
            now = time.time() if now is None else now
            dt = max(0.0, now - self._last)
            self._last = max(self._last, now)
            self.phases[name] = self.phases.get(name, 0.0) + dt
        self._publish()
        return dt

    @contextmanager
    def phase(self, name: str, *, before: str = "other") -> Iterator[None]:
        """Time a block as ``name``; time since the last mark that the block did not cover goes
        to ``before``."""
        if time.time() - self._last > 0.001:
            self.mark(before)
        try:
            yield
        finally:
            self.mark(name)

    def detail(self, name: str, seconds: float) -> None:
        """A breakdown figure shown in brackets (e.g. Dynamo vs Inductor time inside compile)."""
        self.details[name] = seconds
        self._publish()

    def add_compile_breakdown(self) -> None:
        """Record Dynamo / AOTAutograd / Inductor seconds from torch's own compile timers."""
        try:
            from torch._dynamo.utils import compilation_time_metrics as m
        except ImportError:
            return
        picks = {"dynamo": "_compile.compile_inner", "aot": "create_aot_dispatcher_function",
                 "inductor": "compile_fx_inner"}
        for label, key in picks.items():
            if m.get(key):
                self.detail(label, sum(m[key]))

    @property
    def total(self) -> float:
        return self._last - self.start

    def as_dict(self) -> dict[str, float]:
        return {**self.phases, "total": self.total}

    def render(self, label: str = "ready") -> str:
        """``startup: ready in 9.8 s (imports 2.1 s, load 0.6 s, ...)``."""
        parts = [f"{name} {sec:.2f} s" for name, sec in self.phases.items()]
        line = f"startup: {label} in {self.total:.2f} s ({', '.join(parts)})"
        if self.details:
            line += " [" + ", ".join(f"{k} {v:.2f} s" for k, v in self.details.items()) + "]"
        return line

    # ---- Prometheus -----------------------------------------------------------------------------
    def register(self, registry) -> None:
        """Add ``blitzgen_startup_seconds{phase}`` (and the total as phase="total") to a
        prometheus_client registry; later marks update it."""
        from prometheus_client import Gauge

        gauge = Gauge("blitzgen_startup_seconds", "Seconds each start-up phase took, from process start",
                      ["phase"], registry=registry)
        self._gauges.append(gauge)
        self._publish()

    def _publish(self) -> None:
        for gauge in self._gauges:
            for name, sec in {**self.phases, **{f"compile:{k}": v for k, v in self.details.items()},
                              "total": self.total}.items():
                gauge.labels(name).set(sec)


REPORT = StartupReport()  # the process's report; import this module early so "imports" is right
