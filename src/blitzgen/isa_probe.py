"""Inductor's CPU vector-ISA probe, remembered across processes.

Before it loads or compiles CPU code, Inductor checks each vector ISA the CPU reports (AVX2,
AVX-512, AVX-512 BF16/VNNI, AMX) by building a test library and loading it in a child Python:
~1.4 s of every compiled CPU start on a 2-core machine, even when every kernel comes from the
cache (BENCHMARKS.md, "CPU start-up"). ``install`` keeps each answer in ``cpu_isa.json`` under
blitzgen's cache, keyed by everything the answer depends on: torch, the Python executable, the
CPU's flags, the C++ compiler and the test's code and flags. A miss runs Inductor's own check.
Inductor's settings are untouched, so its cache keys do not change.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import sys

log = logging.getLogger("blitzgen")
FILE = "cpu_isa.json"


@functools.lru_cache(maxsize=1)
def _machine() -> str:
    import torch

    from .compile_cache import device_kind

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++") or ""
    try:
        cxx += f"@{os.stat(cxx).st_mtime_ns}" if cxx else ""
    except OSError:
        pass
    return json.dumps([torch.__version__, sys.executable, device_kind("cpu"), cxx], sort_keys=True)


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # absent, or torn by a crash: probe again
        return {}


def install(root: str) -> bool:
    """Remember Inductor's ISA checks in ``root/cpu_isa.json``. False when this torch has no such
    check (then nothing is patched)."""
    try:
        from torch._inductor.cpu_vec_isa import VecISA
    except ImportError:
        return False
    original = getattr(VecISA, "check_build", None)
    if original is None:
        return False
    if getattr(original, "blitzgen_memo", False):
        return True
    path = os.path.join(root, FILE)

    @functools.wraps(original)
    def check_build(self, code: str) -> bool:
        text = "|".join([_machine(), str(self), self.build_arch_flags(), code])
        key = hashlib.sha256(text.encode()).hexdigest()[:32]
        known = _read(path).get(key)
        if isinstance(known, bool):
            return known
        ok = bool(original(self, code))
        try:
            from .compile_cache import locked, write_atomic

            os.makedirs(root, exist_ok=True)
            with locked(root):
                memo = _read(path)
                memo[key] = ok
                write_atomic(path, json.dumps(memo, indent=0).encode())
        except OSError as e:  # a read-only cache: probe again next time
            log.warning("blitzgen: could not remember the CPU ISA check in %s: %s", path, e)
        return ok

    check_build.blitzgen_memo = True
    VecISA.check_build = check_build
    return True
