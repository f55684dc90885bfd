"""The compile cache: keys, corrupt entries, concurrent writers, a second process that hits, and
`blitzgen cache ls|clear`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from blitzgen import compile_cache as cc
from blitzgen.config import ModelArgs
from blitzgen.runtime import RuntimeOptions

ROOT = Path(__file__).resolve().parents[1]


def _opts(**kw) -> RuntimeOptions:
    return RuntimeOptions(device="cpu", compile=True, **kw)


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("BLITZGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    return str(tmp_path / "cache")


# ---- keys ------------------------------------------------------------------------------------------
def test_key_changes_with_model_quantization_and_compile_settings():
    tiny = ModelArgs.from_name("tiny")
    base = cc.key_hash(cc.key_for(tiny, _opts(), {"modes": ["greedy"]}))
    assert base == cc.key_hash(cc.key_for(tiny, _opts(), {"modes": ["greedy"]}))  # stable
    changed = {
        "model": cc.key_for(tiny.replace(n_layers=3), _opts(), {"modes": ["greedy"]}),
        "rope": cc.key_for(tiny.replace(rope_theta=5e5), _opts(), {"modes": ["greedy"]}),
        "int8": cc.key_for(tiny, _opts(quantize="int8"), {"modes": ["greedy"]}),
        "int4 g32": cc.key_for(tiny, _opts(quantize="int4", group_size=32), {"modes": ["greedy"]}),
        "int4 g64": cc.key_for(tiny, _opts(quantize="int4", group_size=64), {"modes": ["greedy"]}),
        "dtype": cc.key_for(tiny, _opts(dtype="float32"), {"modes": ["greedy"]}),
        "cache size": cc.key_for(tiny, _opts(warm_cache_tokens=4096), {"modes": ["greedy"]}),
        "attention": cc.key_for(tiny, _opts(decode_attention="sdpa"), {"modes": ["greedy"]}),
        "sampler modes": cc.key_for(tiny, _opts(), {"modes": ["greedy", "top_k"]}),
        "compiled prefill": cc.key_for(tiny, _opts(compile_prefill=True), {"modes": ["greedy"]}),
        "autotune": cc.key_for(tiny, _opts(autotune=True), {"modes": ["greedy"]}),
        "no extra": cc.key_for(tiny, _opts()),
    }
    hashes = {name: cc.key_hash(parts) for name, parts in changed.items()}
    assert base not in hashes.values(), hashes
    assert len(set(hashes.values())) == len(hashes)
    import torch._dynamo.config as dynamo_config

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dynamo_config, "caching_precompile", True)
        assert base != cc.key_hash(cc.key_for(tiny, _opts(), {"modes": ["greedy"]}))
    # where the cache lives is not part of the key
    assert base == cc.key_hash(cc.key_for(tiny, _opts(cache_dir="/elsewhere"), {"modes": ["greedy"]}))


def test_key_names_versions_and_device():
    parts = cc.key_for(ModelArgs.from_name("tiny"), _opts())
    import torch

    assert parts["torch"] == torch.__version__
    assert parts["device"]["type"] == "cpu" and parts["device"]["name"]
    assert "triton" in parts and parts["blitzgen"]
    json.dumps(parts)  # a manifest can hold it


# ---- corrupt, truncated, mismatched entries ------------------------------------------------------
def _write_entry(entry: cc.CompileCache, blob: bytes, **manifest_overrides) -> None:
    import hashlib

    os.makedirs(entry.dir, exist_ok=True)
    Path(entry.dir, cc.BLOB).write_bytes(blob)
    manifest = {"key": entry.key, "parts": entry.parts, "size": len(blob),
                "sha256": hashlib.sha256(blob).hexdigest(), **manifest_overrides}
    Path(entry.dir, cc.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", ["truncated", "bitflip", "bad json", "other key", "not artifacts", "no blob"])
def test_a_damaged_entry_is_logged_removed_and_never_raises(root, damage, caplog):
    entry = cc.CompileCache({"k": damage})
    blob = b"\x00" * 64 + os.urandom(64)
    if damage == "truncated":
        _write_entry(entry, blob, size=len(blob) + 10)
    elif damage == "bitflip":
        _write_entry(entry, blob)
        Path(entry.dir, cc.BLOB).write_bytes(b"\x01" + blob[1:])
    elif damage == "bad json":
        _write_entry(entry, blob)
        Path(entry.dir, cc.MANIFEST).write_text('{"key": ')
    elif damage == "other key":
        _write_entry(entry, blob, parts={"k": "something else"})
    elif damage == "not artifacts":  # checksum fine, torch cannot read it
        _write_entry(entry, blob)
    else:
        _write_entry(entry, blob)
        os.unlink(Path(entry.dir, cc.BLOB))
    with caplog.at_level("WARNING", logger="blitzgen"):
        opened = entry.open()
    assert opened.status.startswith("rebuilt"), opened.status
    assert "unusable" in caplog.text
    assert not Path(entry.dir, cc.MANIFEST).exists() and not Path(entry.dir, cc.BLOB).exists()
    assert cc.CompileCache({"k": damage}).open().status == "miss"  # the next start compiles afresh


def test_concurrent_writers_never_leave_a_torn_entry(root, monkeypatch):
    import torch

    blobs = [bytes([i]) * (200_000 + i) for i in range(8)]
    counter = iter(range(10_000))

    class Info:
        artifacts = {"inductor": ["x"]}

    def fake_save():
        return blobs[next(counter) % len(blobs)], Info()

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", fake_save)
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda b: type("I", (), {"artifacts": {}})())
    parts = {"k": "shared"}
    errors: list[str] = []

    def writer():
        for _ in range(10):
            cc.CompileCache(parts).save()

    def reader():
        for _ in range(40):
            e = cc.CompileCache(parts).open()
            if e.status.startswith("rebuilt"):
                errors.append(e.status)

    threads = [threading.Thread(target=writer) for _ in range(4)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = cc.CompileCache(parts)
    blob, manifest = final._read()
    assert blob in blobs and manifest["size"] == len(blob)
    assert not [n for n in os.listdir(final.dir) if n.startswith(".tmp-")]


# ---- with torch's real artifacts -----------------------------------------------------------------
@pytest.mark.slow
def test_save_then_load_into_an_empty_inductor_cache(root, tmp_path, monkeypatch):
    """The entry alone restores Inductor's FX graph: a fresh Dynamo and an empty Inductor dir hit."""
    import torch
    from torch._dynamo.utils import counters

    def f(x):
        return torch.sin(x) * 2 + 1

    x = torch.randn(16)
    torch._dynamo.reset()
    parts = {"k": "roundtrip"}
    first = cc.CompileCache(parts).open()
    assert first.status == "miss"
    torch.compile(f, fullgraph=True)(x)
    assert first.save()
    # a "new process": forget Dynamo, in-memory caches and artifacts; an empty Inductor dir
    torch._dynamo.reset()
    torch.compiler._cache.CacheArtifactManager.clear()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor2"))
    counters.clear()
    second = cc.CompileCache(parts).open()
    assert second.status == "hit" and second.loaded.get("inductor", 0) >= 1
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1
    assert counters["inductor"]["fxgraph_cache_miss"] == 0


@pytest.mark.slow
def test_corrupt_entry_is_rebuilt_and_the_start_succeeds(root):
    import torch

    parts = {"k": "rebuild"}
    entry = cc.CompileCache(parts)
    _write_entry(entry, b"garbage" * 100)
    Path(entry.dir, cc.BLOB).write_bytes(b"garbage" * 99)  # truncated
    torch._dynamo.reset()
    opened = cc.CompileCache(parts).open()
    assert opened.status.startswith("rebuilt")
    y = torch.compile(lambda x: torch.cos(x) + 3, fullgraph=True)(torch.ones(8))
    torch.testing.assert_close(y, torch.cos(torch.ones(8)) + 3)
    assert opened.save()
    assert cc.CompileCache(parts).open().status == "hit"


_SECOND_START = textwrap.dedent("""
    import json, os, sys, time
    t0 = time.perf_counter()
    sys.path.insert(0, {root!r})
    import torch
    from torch._dynamo.utils import counters
    from tests.conftest import tiny_model
    from blitzgen.compile_cache import CompileCache, key_for
    from blitzgen.generate import Generator
    model = tiny_model()
    entry = CompileCache(key_for(model.args, None, {{"test": "second start"}})).open()
    gen = Generator(model, compile=True, max_seq_len=64)
    gen.warmup()
    toks = list(gen.generate_ids([1, 2, 3], 5, stop_token_ids=()))
    entry.save()
    print(json.dumps({{"status": entry.status, "loaded": entry.loaded, "tokens": toks,
                       "hit": counters["inductor"]["fxgraph_cache_hit"],
                       "miss": counters["inductor"]["fxgraph_cache_miss"],
                       "aot_miss": counters["aot_autograd"]["autograd_cache_miss"],
                       "seconds": time.perf_counter() - t0}}))
""")


@pytest.mark.slow
def test_a_second_process_hits_the_cache(tmp_path):
    """Two processes compile the same tiny model: the second loads the entry and recompiles nothing
    in Inductor (Dynamo still traces)."""
    script = tmp_path / "start.py"
    script.write_text(_SECOND_START.format(root=str(ROOT)))
    env = dict(os.environ, BLITZGEN_CACHE=str(tmp_path / "cache"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "ind"),
               PYTHONPATH=str(ROOT / "src"))

    def start():
        out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    cold = start()
    assert cold["status"] == "miss" and cold["miss"] >= 3
    warm = start()
    assert warm["status"] == "hit" and warm["loaded"].get("inductor", 0) >= 3, warm
    assert warm["miss"] == 0 and warm["aot_miss"] == 0 and warm["hit"] >= 3, warm
    assert warm["tokens"] == cold["tokens"]
    assert len(cc.list_entries(str(tmp_path / "cache"))) == 1


# ---- blitzgen cache ls|clear ----------------------------------------------------------------------
def _cli(argv):
    from blitzgen.commands import cache

    p = argparse.ArgumentParser(prog="blitzgen")
    cache.register(p.add_subparsers(dest="command"))
    args = p.parse_args(argv)
    return args.func(args)


def test_cache_ls_and_clear(root, capsys):
    assert _cli(["cache", "ls"]) == 0
    assert "no compile cache entries" in capsys.readouterr().out
    good = cc.CompileCache(cc.key_for(ModelArgs.from_name("tiny"), _opts(quantize="int8")))
    _write_entry(good, b"x" * 1000, created="2026-12-01T04:00:00Z")
    broken = cc.CompileCache({"k": "broken"})
    os.makedirs(broken.dir)
    Path(broken.dir, cc.BLOB).write_bytes(b"y")
    os.makedirs(os.path.join(root, "inductor", "ab"))
    Path(root, "inductor", "ab", "k.so").write_bytes(b"z" * 5000)
    os.makedirs(cc.aot_root(root))
    Path(cc.aot_root(root), "abc123.pt2").write_bytes(b"a" * 300)  # an AOT-saved decode step
    assert _cli(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert good.key in out and broken.key in out and "int8" in out and "broken" in out and "3 entries" in out
    assert "abc123" in out and "aot decode step" in out
    assert _cli(["cache", "clear"]) == 0
    assert "freed" in capsys.readouterr().out
    assert not os.path.exists(cc.compile_root(root)) and not os.path.exists(os.path.join(root, "inductor"))
    assert not os.path.exists(cc.aot_root(root))
    assert _cli(["cache", "ls", "--dir", root]) == 0
    assert "no compile cache entries" in capsys.readouterr().out


def test_cache_command_runs_through_the_cli(tmp_path):
    env = dict(os.environ, BLITZGEN_CACHE=str(tmp_path), PYTHONPATH=str(ROOT / "src"))
    code = ("import sys, blitzgen.cli as c; c.COMMANDS.append('cache') if 'cache' not in c.COMMANDS else None; "
            "sys.exit(c.main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "cache", "ls"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "no compile cache entries" in out.stdout


def test_cached_opens_before_and_saves_after_the_block(root, monkeypatch):
    import torch

    class Info:
        artifacts = {"inductor": ["a", "b"]}

    saved = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: saved.append(1) or (b"blob" * 10, Info()))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda b: Info())
    args = ModelArgs.from_name("tiny")
    with cc.cached(args, _opts(), {"w": 1}) as entry:
        assert entry.status == "miss" and not saved
    assert saved and entry.key in {e.key for e in cc.list_entries(root)}
    with cc.cached(args, _opts(), {"w": 1}) as again:
        assert again.hit and again.loaded == {"inductor": 2}
    with pytest.raises(RuntimeError):
        with cc.cached(args, _opts(), {"w": 2}):
            raise RuntimeError("compile failed")
    assert len(cc.list_entries(root)) == 1  # nothing saved for the failed block
    with cc.cached(args, _opts(), enabled=False) as none:
        assert none is None


def test_cache_warm_loads_compiled_and_runs_the_full_warm_up(root, monkeypatch, capsys):
    from blitzgen.commands import common

    calls = []

    class Gen:
        device = "cpu"

    class LM:
        name = "m"

    def fake_load(args, log=None):
        calls.append(("load", args.model, args.compile))
        return LM(), Gen()

    monkeypatch.setattr(common, "load_engine", fake_load)
    monkeypatch.setattr(cc, "warm_up", lambda lm, gen, *a, **k: calls.append(("warm", a, k)) or 1.5)
    assert _cli(["cache", "warm", "--model", "some.gguf", "--dtype", "float32"]) == 0
    assert calls == [("load", "some.gguf", True), ("warm", (), {})]  # the full warm-up: serve's entry
    assert "compile + warm-up 1.5 s" in capsys.readouterr().err
    from blitzgen.cli import main

    assert main(["cache", "warm", "--no-compile"]) == 2
    assert "drop --no-compile" in capsys.readouterr().err


def test_key_follows_the_resolved_compile_regions():
    tiny = ModelArgs.from_name("tiny")
    on, off = cc.key_for(tiny, _opts(compile_regions=True)), cc.key_for(tiny, _opts(compile_regions=False))
    assert cc.key_hash(on) != cc.key_hash(off)
    assert cc.key_hash(cc.key_for(tiny, _opts())) == cc.key_hash(on)  # CPU's default is on
    # how weights were read is not part of the key
    assert cc.key_hash(cc.key_for(tiny, _opts(weight_cache=False, staged_load=False))) == cc.key_hash(on)


def test_inductor_cache_goes_under_blitzgen_cache_even_after_torch_set_its_default(tmp_path, monkeypatch):
    """Importing torch._dynamo.config sets TORCHINDUCTOR_CACHE_DIR to torch's default; that is not a
    user's choice, so blitzgen's cache root still gets Inductor's cache. A user's own value stays."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    assert cc.use_inductor_dir(str(tmp_path)) == str(tmp_path / "inductor")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert cc.use_inductor_dir(str(tmp_path)) == str(tmp_path / "mine")
