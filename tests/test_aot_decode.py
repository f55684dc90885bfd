"""BLITZGEN_AOT_DECODE (aot_decode.py): the compiled decode step saved with torch's AOT precompile in
one process and loaded, without Dynamo, in a second one; the same tokens as the eager model."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {root!r})
    from tests.conftest import tiny_model
    from blitzgen.generate import Generator
    from blitzgen.runtime import RuntimeOptions
    from torch._dynamo.utils import counters

    opts = RuntimeOptions(device="cpu", compile=True, dtype="float32", aot_decode=True, cache_dir={cache!r})
    m = tiny_model(seed=3)
    m.setup_caches(1, 64)
    m.compile_regions = {regions}
    gen = Generator(m, options=opts)
    ids = list(gen.generate_ids([1, 2, 3, 4, 5], 6, stop_token_ids=()))
    eager = list(Generator(tiny_model(seed=3)).generate_ids([1, 2, 3, 4, 5], 6, stop_token_ids=()))
    print(json.dumps({{"ids": ids, "eager": eager, "status": gen._step.status,
                      "frames": counters["stats"]["unique_graphs"]}}))
""")


def _run(tmp_path, regions: bool) -> dict:
    import json

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    code = SCRIPT.format(root=str(ROOT), cache=str(tmp_path / "cache"), regions=regions)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(torch.compiler, "load_compiled_function"), reason="torch without AOT precompile")
@pytest.mark.parametrize("regions", [False, True])
def test_aot_decode_saved_then_loaded_without_dynamo(tmp_path, regions):
    first = _run(tmp_path, regions)
    assert first["status"] == "compiled" and first["ids"] == first["eager"]
    assert list((tmp_path / "cache" / "aot").glob("*.pt2"))
    second = _run(tmp_path, regions)  # a fresh process: the step is loaded, not traced
    assert second["status"] == "loaded" and second["ids"] == first["ids"]
    # Dynamo traced only the samplers this time (the step's frame is not among unique graphs)
    assert second["frames"] < first["frames"], (first, second)


def test_aot_decode_off_by_default(monkeypatch):
    from blitzgen.runtime import RuntimeOptions

    monkeypatch.delenv("BLITZGEN_AOT_DECODE", raising=False)
    assert RuntimeOptions().aot_decode is False and RuntimeOptions.from_env().aot_decode is False
    monkeypatch.setenv("BLITZGEN_AOT_DECODE", "1")
    assert RuntimeOptions.from_env().aot_decode is True
