"""The converted-weights cache (loading/converted.py): a GGUF's second load maps the tensors the
first one converted; damaged entries are rebuilt; keys follow the file and the dtype; concurrent
writers; the streaming safetensors writer; meta models built without torch._dynamo."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from blitzgen import compile_cache as cc
from blitzgen.loading import converted, load
from blitzgen.runtime import RuntimeOptions

ROOT = Path(__file__).resolve().parents[1]
PIECES = ["▁", "h", "e", "l", "o", "he", "ll", "llo", "hello", "▁hello"]


def write_tiny_gguf(path: Path, seed: int = 0, matrix_type: str = "Q8_0") -> Path:
    """A complete 2-layer llama GGUF (GQA, untied head, Q8_0 matrices unless ``matrix_type`` says
    another type the gguf package can quantize, F32 norms) with a SentencePiece tokenizer."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, matrix_type)

    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    vocab, dim, ffn, layers = len(tokens), 64, 96, 2
    w = gguf.GGUFWriter(str(path), "llama")
    for name, value in [("context_length", 128), ("embedding_length", dim), ("block_count", layers),
                        ("feed_forward_length", ffn), ("head_count", 4), ("head_count_kv", 2),
                        ("rope_dimension_count", 16), ("layer_norm_rms_eps", 1e-5)]:
        getattr(w, f"add_{name}")(value)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(PIECES))
    w.add_token_scores([0.0] * 259 + [-1.0 - i / 10 for i in range(len(PIECES))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def matrix(name, out, inp):
        a = rng.standard_normal((out, inp), dtype=np.float32) * 0.1
        q = gguf.quants.quantize(a, qtype)
        w.add_tensor(name, q, raw_dtype=qtype)

    def vector(name, n):
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    matrix("token_embd.weight", vocab, dim)
    matrix("output.weight", vocab, dim)
    vector("output_norm.weight", dim)
    for i in range(layers):
        vector(f"blk.{i}.attn_norm.weight", dim)
        vector(f"blk.{i}.ffn_norm.weight", dim)
        matrix(f"blk.{i}.attn_q.weight", dim, dim)
        matrix(f"blk.{i}.attn_k.weight", 32, dim)
        matrix(f"blk.{i}.attn_v.weight", 32, dim)
        matrix(f"blk.{i}.attn_output.weight", dim, dim)
        matrix(f"blk.{i}.ffn_gate.weight", ffn, dim)
        matrix(f"blk.{i}.ffn_up.weight", ffn, dim)
        matrix(f"blk.{i}.ffn_down.weight", dim, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("BLITZGEN_CACHE", str(tmp_path / "cache"))
    return str(tmp_path / "cache")


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def _load(path, dtype=torch.bfloat16, **kw):
    return load(path, RuntimeOptions.from_env(device="cpu"), device="cpu", dtype=dtype, progress=False, **kw)


def _same(a, b) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert a.args == b.args
    text = "hello hello"
    assert a.tokenizer.encode(text) == b.tokenizer.encode(text)
    assert a.tokenizer.eos_token_ids == b.tokenizer.eos_token_ids


def _entry_dir(root: str) -> Path:
    (entry,) = [p for p in Path(cc.weights_root(root)).iterdir() if p.is_dir()]
    return entry


def test_second_load_maps_the_converted_weights(root, tiny_gguf):
    first = _load(tiny_gguf)
    assert first.weight_cache == "saved"
    second = _load(tiny_gguf)
    assert second.weight_cache == "hit"
    _same(first, second)
    assert second.kind == "gguf" and second.source == str(tiny_gguf)
    ids = torch.tensor([[1, 5, 6]])
    for lm in (first, second):
        lm.model.setup_caches(1, 16)
    with torch.no_grad():
        assert torch.equal(first.model(ids, torch.arange(3)), second.model(ids, torch.arange(3)))
    # a quantized run re-quantizes the cached float weights exactly as it quantizes the GGUF's,
    # records the quantized buffers in an entry of their own, and reads them back as they are
    q_miss = load(tiny_gguf, RuntimeOptions(device="cpu", weight_cache=False), device="cpu",
                  dtype=torch.bfloat16, quantize="int8", progress=False)
    q_first = _load(tiny_gguf, quantize="int8")
    q_hit = _load(tiny_gguf, quantize="int8")
    assert (q_miss.weight_cache, q_first.weight_cache, q_hit.weight_cache) == (None, "saved", "hit")
    assert q_hit.quant == q_first.quant == q_miss.quant
    _same(q_miss, q_first)
    _same(q_miss, q_hit)


@pytest.mark.parametrize("head", [True, False])
def test_int4_entry_holds_the_quantized_buffers(root, tiny_gguf, head):
    from blitzgen.quant import Int4Linear, make_config

    config = make_config("int4", 32, head=head)
    fresh = load(tiny_gguf, RuntimeOptions(device="cpu", weight_cache=False), device="cpu",
                 dtype=torch.bfloat16, quantize=config, progress=False)
    first, hit = _load(tiny_gguf, quantize=config), _load(tiny_gguf, quantize=config)
    assert (first.weight_cache, hit.weight_cache) == ("saved", "hit")
    assert isinstance(hit.model.output, Int4Linear) == head
    _same(fresh, hit)
    assert hit.model.layers[0].attention.wqkv._packed_for == fresh.model.layers[0].attention.wqkv._packed_for
    ids = torch.tensor([[1, 5, 6]])
    for lm in (fresh, hit):
        lm.model.setup_caches(1, 16)
    with torch.no_grad():
        assert torch.equal(fresh.model(ids, torch.arange(3)), hit.model(ids, torch.arange(3)))
    entries = [p for p in Path(cc.weights_root(root)).iterdir() if p.is_dir()]
    assert len(entries) == 2  # the float entry and the quantized one


def test_keys_follow_the_file_and_the_dtype(tmp_path, tiny_gguf):
    base = cc.key_hash(converted.key_for(tiny_gguf, torch.bfloat16))
    assert base == cc.key_hash(converted.key_for(tiny_gguf, torch.bfloat16))
    assert base != cc.key_hash(converted.key_for(tiny_gguf, torch.float32))
    st = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert base != cc.key_hash(converted.key_for(tiny_gguf, torch.bfloat16))
    # another file of the same size and mtime (cp -p of different weights) differs in its samples
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    assert other.stat().st_size == tiny_gguf.stat().st_size
    os.replace(other, tiny_gguf)
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert base != cc.key_hash(converted.key_for(tiny_gguf, torch.bfloat16))


@pytest.mark.parametrize("damage", ["truncated", "bitflip", "bad manifest", "no tokenizer", "bad args",
                                    "manifest only"])
def test_a_damaged_entry_is_logged_and_rebuilt(root, tiny_gguf, damage, caplog):
    good = _load(tiny_gguf)
    entry = _entry_dir(root)
    weights = entry / converted.WEIGHTS
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "bitflip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x40
        weights.write_bytes(bytes(data))
    elif damage == "bad manifest":
        (entry / converted.MANIFEST).write_text('{"key": ')
    elif damage == "no tokenizer":
        (entry / "tokenizer.json").unlink()
    elif damage == "bad args":
        (entry / converted.ARGS).write_text(json.dumps({"dim": "wide"}))
        manifest = json.loads((entry / converted.MANIFEST).read_text())
        manifest["files"][converted.ARGS] = list(converted._crc_file(str(entry / converted.ARGS)))
        (entry / converted.MANIFEST).write_text(json.dumps(manifest))
    elif damage == "manifest only":
        weights.unlink()
    with caplog.at_level(logging.WARNING, logger="blitzgen"):
        again = _load(tiny_gguf)
    assert again.weight_cache == "saved"  # rebuilt from the GGUF and written anew
    assert "unusable" in caplog.text and "rebuilding" in caplog.text
    _same(good, again)
    assert _load(tiny_gguf).weight_cache == "hit"


def test_concurrent_first_loads_leave_one_sound_entry(root, tiny_gguf):
    results, errors = [], []

    def run():
        try:
            results.append(_load(tiny_gguf))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
    hit = _load(tiny_gguf)
    assert hit.weight_cache == "hit"
    _same(results[0], hit)
    assert not [p for p in _entry_dir(root).iterdir() if p.name.startswith(".tmp-")]


def test_switched_off_writes_nothing(root, tiny_gguf, monkeypatch):
    monkeypatch.setenv("BLITZGEN_WEIGHT_CACHE", "0")
    lm = _load(tiny_gguf)
    assert lm.weight_cache is None and not os.path.exists(cc.weights_root(root))


def test_unwritable_cache_still_loads(tmp_path, tiny_gguf, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("BLITZGEN_CACHE", str(blocker / "cache"))  # a path under a file: cannot be made
    lm = _load(tiny_gguf)
    assert lm.weight_cache == "miss"


def test_cache_ls_and_clear_show_the_weights(root, tiny_gguf, capsys):
    from blitzgen.cli import main

    _load(tiny_gguf)
    assert main(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert "weights bfloat16 of tiny.gguf" in out and " ok " in out
    assert main(["cache", "clear", "--keep-weights"]) == 0
    assert os.path.isdir(cc.weights_root(root))
    assert main(["cache", "clear"]) == 0
    assert not os.path.exists(cc.weights_root(root))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int64])
def test_recorder_writes_what_safetensors_reads(tmp_path, dtype):
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(5, 3, generator=g), "b": torch.randn(7, generator=g),
               "c.bias": torch.randn(2, 4, 6, generator=g)[:, 1]}  # a non-contiguous one
    tensors = {k: (v * 50).to(dtype) for k, v in tensors.items()}
    rec = converted.Recorder(str(tmp_path / "x.safetensors"))
    rec.begin([(k, v.shape, v.dtype) for k, v in tensors.items()])
    for k, v in tensors.items():
        rec.add(k, v)
    assert rec.close()
    back = load_file(str(tmp_path / "x.safetensors"))
    assert {k for k in back if not k.startswith(converted.PAD)} == set(tensors)
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert (8 + n) % converted.ALIGN == 0
    for k in tensors:  # every tensor starts aligned in the file (so in the mmap)
        assert header[k]["data_offsets"][0] % converted.ALIGN == 0, k
    for k, v in tensors.items():
        assert back[k].dtype == dtype and torch.equal(back[k], v)
    assert rec.crc == converted._crc_file(str(tmp_path / "x.safetensors"))[1]
    with pytest.raises(RuntimeError, match="recorder expected"):
        bad = converted.Recorder(str(tmp_path / "y.safetensors"))
        bad.begin([("a", (2,), torch.float32)])
        bad.add("b", torch.zeros(2))


def test_meta_model_skips_init_and_torch_dynamo():
    code = ("import sys, torch; from blitzgen.config import ModelArgs; from blitzgen.loading.assemble import meta_model;"
            "m = meta_model(ModelArgs.from_name('tiny')); assert m.tok_embeddings.weight.is_meta;"
            "assert 'torch._dynamo' not in sys.modules, 'dynamo imported';"
            "import torch.nn as nn; t = torch.zeros(3); nn.init.ones_(t); assert t.sum() == 3, 'init not restored'")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_regions_follow_the_options(root, tiny_gguf):
    assert _load(tiny_gguf).model.compile_regions  # CPU default
    assert _load(tiny_gguf, quantize="int8").model.compile_regions
    assert _load(tiny_gguf, quantize="int4").model.compile_regions  # CPU int4: an opaque op (CUDA: off)
    off = load(tiny_gguf, RuntimeOptions(device="cpu", compile_regions=False), device="cpu", progress=False)
    assert not off.model.compile_regions
