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
    from blitzgen.sampling import SamplingParams
    from torch._dynamo.utils import counters
    torch._dynamo.config.enable_aot_compile = False  # torch 2.11's default: aot_decode turns it on itself

    opts = RuntimeOptions(device="cpu", compile=True, dtype="float32", aot_decode=True, cache_dir={cache!r})
    m = tiny_model(seed=3)
    m.setup_caches(1, 64)
    m.compile_regions = {regions}
    gen = Generator(m, options=opts)
    ids = list(gen.generate_ids([1, 2, 3, 4, 5], 6, stop_token_ids=()))
    eager_gen = Generator(tiny_model(seed=3))
    eager = list(eager_gen.generate_ids([1, 2, 3, 4, 5], 6, stop_token_ids=()))
    hot = SamplingParams(temperature=0.9, top_k=20, seed=7)  # a second sampler mode, saved on its own
    sampled = list(gen.generate_ids([1, 2, 3, 4, 5], 6, hot, stop_token_ids=()))
    sampled_eager = list(eager_gen.generate_ids([1, 2, 3, 4, 5], 6, hot, stop_token_ids=()))
    print(json.dumps({{"ids": ids, "eager": eager, "sampled": sampled, "sampled_eager": sampled_eager, "status": gen._step.status, "sampler": gen._sample.status,
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
    assert first["sampler"] == "compiled" and second["sampler"] == "loaded"
    assert first["sampled"] == first["sampled_eager"] and second["sampled"] == first["sampled_eager"]
    # a fresh process with both saved: Dynamo traced nothing (the step and the sampler were loaded)
    assert second["frames"] == 0, (first, second)


def test_aot_decode_on_for_the_verbs_by_default(monkeypatch):
    """On in the options the verbs build (from_env); a bare RuntimeOptions (library use) stays off."""
    from blitzgen.runtime import RuntimeOptions

    monkeypatch.delenv("BLITZGEN_AOT_DECODE", raising=False)
    assert RuntimeOptions().aot_decode is False and RuntimeOptions.from_env().aot_decode is True
    monkeypatch.setenv("BLITZGEN_AOT_DECODE", "0")
    assert RuntimeOptions.from_env().aot_decode is False


class _FakeStep:
    """Stands in for an AOTCompiledFunction: guards pass; calling it runs ``body``."""

    def __init__(self, body):
        self.body = body

    def guard_check(self, *args):
        return True

    def disable_guard_check(self):
        pass

    def __call__(self, *args):
        return self.body(*args)

    @classmethod
    def serialize(cls, fn):
        class _S:
            serialized_data = b"saved step"
        return _S()


def _step(tmp_path, monkeypatch, fallback):
    from blitzgen import aot_decode
    from blitzgen.runtime import RuntimeOptions

    from tests.conftest import tiny_model

    model = tiny_model(seed=1)
    model.setup_caches(1, 32)
    opts = RuntimeOptions(device="cpu", compile=True, aot_decode=True, cache_dir=str(tmp_path))
    step = aot_decode.AOTDecodeStep(lambda m, t, p: "traced", "cpu", opts, str(tmp_path), fallback=fallback)
    return aot_decode, model, step


def test_aot_decode_corrupt_file_is_recompiled_and_rewritten(tmp_path, monkeypatch):
    aot_decode, model, step = _step(tmp_path, monkeypatch, fallback=lambda *a: "fallback")
    path = step.path_for(model)
    os.makedirs(os.path.dirname(path))
    Path(path).write_bytes(b"\x00not a saved step")

    class _Compiled:
        def aot_compile(self, example):
            return _FakeStep(lambda *a: "aot")
    monkeypatch.setattr(aot_decode.torch, "compile", lambda *a, **k: _Compiled())
    assert step(model, None, None) == "aot" and step.status == "compiled"
    assert Path(path).read_bytes() == b"saved step"


def test_aot_decode_loaded_step_failing_on_first_call_falls_back(tmp_path, monkeypatch):
    aot_decode, model, step = _step(tmp_path, monkeypatch, fallback=lambda *a: "fallback")
    path = step.path_for(model)
    os.makedirs(os.path.dirname(path))
    Path(path).write_bytes(b"a step that loads")

    def boom(*a):
        raise RuntimeError("CUDA graph capture failed")
    monkeypatch.setattr(aot_decode.torch.compiler, "load_compiled_function", lambda f: _FakeStep(boom))
    assert step(model, None, None) == "fallback" and step.status.startswith("fallback")
    assert not os.path.exists(path)  # removed, so the next start compiles afresh
    assert step(model, None, None) == "fallback"


def test_aot_decode_key_follows_the_source(monkeypatch):
    from blitzgen import aot_decode

    digest = aot_decode.source_digest()
    assert len(digest) == 16 and digest == aot_decode.source_digest()
    monkeypatch.setattr(aot_decode, "_SOURCE_DIGEST", "edited")
    from tests.conftest import tiny_model

    model = tiny_model(seed=1)
    model.setup_caches(1, 32)
    assert aot_decode._signature(model)["source"] == "edited"


LAZY = textwrap.dedent("""
    import json, sys, types, torch
    sys.path.insert(0, {root!r})
    from tests.conftest import tiny_model
    from blitzgen import compile_cache as cc
    from blitzgen.generate import Generator
    from blitzgen.runtime import RuntimeOptions
    from blitzgen.sampling import SamplingParams

    opened = []
    real_open = cc.CompileCache.open
    cc.CompileCache.open = lambda self: (opened.append(self.key), real_open(self))[1]
    opts = RuntimeOptions(device="cpu", compile=True, dtype="float32", aot_decode=True, cache_dir={cache!r})
    m = tiny_model(seed=3)
    m.setup_caches(1, 64)
    gen = Generator(m, options=opts)
    cc.warm_up(types.SimpleNamespace(args=m.args), gen, [SamplingParams(temperature=0.0)], prompt_len=5)
    ids = list(gen.generate_ids([1, 2, 3, 4, 5], 6, stop_token_ids=()))
    print(json.dumps({{"opened": len(opened), "step": gen._step.status, "sampler": gen._sample.status, "ids": ids}}))
""")


@pytest.mark.skipif(not hasattr(torch.compiler, "load_compiled_function"), reason="torch without AOT precompile")
def test_warm_aot_start_skips_the_compile_cache_artifacts(tmp_path):
    """compile_cache.warm_up with every compiled function AOT-saved: the first start compiles, so
    it opens (and saves) the compile-cache entry; the second loads the AOT files and never opens it."""
    import json

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    runs = []
    for _ in range(2):
        code = LAZY.format(root=str(ROOT), cache=str(tmp_path / "cache"))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert (first["opened"], first["step"], first["sampler"]) == (1, "compiled", "compiled")
    assert (second["opened"], second["step"], second["sampler"]) == (0, "loaded", "loaded")
    assert second["ids"] == first["ids"]


@pytest.mark.skipif(not hasattr(torch.compiler, "load_compiled_function"), reason="no AOT precompile in this torch")
def test_the_fallback_is_compiled_only_when_used(tmp_path, monkeypatch):
    """A start whose saved functions load never builds the plain torch.compile fallback (building it
    imports Dynamo's backend modules, ~0.3 s)."""
    from blitzgen import compile as bc
    from blitzgen.runtime import RuntimeOptions

    made = []
    monkeypatch.setattr(bc.torch, "compile", lambda fn, **kw: made.append(kw) or (lambda *a: "compiled"))
    opts = RuntimeOptions(device="cpu", compile=True, aot_decode=True, cache_dir=str(tmp_path))
    step = bc.compile_decode(lambda *a: "eager", "cpu", str(tmp_path), options=opts)
    sampler = bc.compile_sampler(lambda *a: "eager", "cpu", str(tmp_path), options=opts)
    assert made == []
    assert step.fallback("x") == "compiled" and step.fallback("y") == "compiled"
    assert made == [dict(fullgraph=True, dynamic=False)]
    assert sampler.fallback() == "compiled" and len(made) == 2


def test_a_loaded_step_starts_no_compile_pool(tmp_path, monkeypatch):
    """Its load and first call run with one compile thread (Inductor starts no worker pool for code
    it only loads); the setting is restored after."""
    import torch._inductor.config as inductor_config

    aot_decode, model, step = _step(tmp_path, monkeypatch, fallback=None)
    path = step.path_for(model)
    os.makedirs(os.path.dirname(path))
    Path(path).write_bytes(b"a step that loads")
    seen = []

    def record(*a):
        seen.append(inductor_config.compile_threads)
        return "loaded"

    def load(f):
        seen.append(inductor_config.compile_threads)
        return _FakeStep(record)

    before = inductor_config.compile_threads
    monkeypatch.setattr(aot_decode.torch.compiler, "load_compiled_function", load)
    assert step(model, None, None) == "loaded" and step.status == "loaded"
    assert seen == [1, 1] and inductor_config.compile_threads == before
    assert step(model, None, None) == "loaded" and seen[-1] == before  # proven: later calls as configured
