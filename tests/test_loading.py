"""The one build path: config validation, GGUF damage, options, random weights, file modes."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from blitzgen.config import ModelArgs
from blitzgen.errors import ModelLoadError, UnsupportedModelError
from blitzgen.loading import gguf as gguf_src
from blitzgen.loading import load, load_random, resolve_options
from blitzgen.runtime import RuntimeOptions

GOOD = dict(model_type="llama", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=160, max_position_embeddings=512)


@pytest.mark.parametrize("cfg,message", [
    ([1, 2], "must hold a JSON object, got an array"),
    (None, "must hold a JSON object, got null"),
    ("llama", "must hold a JSON object, got a string"),
    ({**GOOD, "hidden_size": "abc"}, "hidden_size must be a positive integer, got 'abc'"),
    ({**GOOD, "hidden_size": 64.0}, "hidden_size must be a positive integer"),
    ({**GOOD, "num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({**GOOD, "num_hidden_layers": -2}, "num_hidden_layers must be a positive integer, got -2"),
    ({**GOOD, "vocab_size": True}, "vocab_size must be a positive integer, got True"),
    ({**GOOD, "intermediate_size": None}, "lacks intermediate_size"),
    ({**GOOD, "num_key_value_heads": 0}, "num_key_value_heads must be a positive integer"),
    ({**GOOD, "num_attention_heads": 5, "num_key_value_heads": 5}, r"num_attention_heads \(5\) does not divide"),
    ({**GOOD, "num_key_value_heads": 3}, "must be a multiple of n_kv_heads"),
    ({**GOOD, "head_dim": 7}, "head_dim must be even"),
    ({**GOOD, "max_position_embeddings": "long"}, "max_position_embeddings must be a positive integer"),
    ({**GOOD, "rms_norm_eps": "tiny"}, "rms_norm_eps must be a positive number"),
    ({**GOOD, "rope_theta": -1}, "rope_theta must be a positive number"),
    ({**GOOD, "tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({**GOOD, "rope_scaling": "x"}, "rope_scaling must be an object or null, got 'x'"),
    ({**GOOD, "rope_scaling": [1]}, "rope_scaling must be an object or null"),
    ({**GOOD, "rope_scaling": {"rope_type": "linear", "factor": "2"}}, "rope_scaling.factor must be a positive"),
    ({**GOOD, "rope_scaling": {"rope_type": "linear"}}, "lacks factor"),
    ({**GOOD, "rope_parameters": 3}, "rope_parameters must be an object or null"),
])
def test_bad_config_is_one_line_error(cfg, message):
    with pytest.raises(ModelLoadError, match=message) as e:
        ModelArgs.from_hf_config(cfg)
    assert "\n" not in str(e.value)


def test_good_config_and_nulls_take_defaults():
    args = ModelArgs.from_hf_config({**GOOD, "rope_theta": None, "rope_scaling": None, "head_dim": None})
    assert args.head_dim == 16 and args.rope_theta == 10000.0 and args.n_kv_heads == 2
    with pytest.raises(UnsupportedModelError, match="rope_scaling type 'yarn'"):
        ModelArgs.from_hf_config({**GOOD, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_bad_config_json_through_load(tmp_path, capsys):
    from blitzgen.cli import main

    (tmp_path / "config.json").write_text(json.dumps({**GOOD, "num_attention_heads": 0}))
    with pytest.raises(ModelLoadError, match="num_attention_heads must be a positive integer"):
        load(tmp_path, device="cpu", progress=False)
    (tmp_path / "config.json").write_text("null")
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "must hold a JSON object" in err and "Traceback" not in err


class _Field:
    def __init__(self, value):
        self.value, self.data = value, value if isinstance(value, list) else [value]

    def contents(self):
        return self.value


class _Tensor:
    def __init__(self, name):
        self.name = name


class _Reader:
    def __init__(self, **meta):
        base = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
                "llama.block_count": 2, "llama.feed_forward_length": 160, "llama.vocab_size": 512}
        base.update(meta)
        self.fields = {k: _Field(v) for k, v in base.items() if v is not None}
        self.tensors = [_Tensor("output.weight")]


@pytest.mark.parametrize("meta,message", [
    ({}, None),
    ({"llama.embedding_length": "abc"}, "llama.embedding_length must be a positive integer, got 'abc'"),
    ({"llama.attention.head_count": 0}, "llama.attention.head_count must be a positive integer, got 0"),
    ({"llama.attention.head_count": 5}, r"head_count \(5\) does not divide llama.embedding_length"),
    ({"llama.block_count": -1}, "llama.block_count must be a positive integer"),
    ({"llama.attention.head_count_kv": 3}, "must be a multiple of n_kv_heads"),
    ({"llama.rope.freq_base": "fast"}, "llama.rope.freq_base must be a positive number"),
    ({"llama.context_length": 0}, "llama.context_length must be a positive integer"),
    ({"llama.feed_forward_length": None}, "lacks the model's shape"),
])
def test_gguf_metadata_checks(meta, message):
    if message is None:
        args = gguf_src.load_args(_Reader(**meta))
        assert args.dim == 64 and args.head_dim == 16 and not args.tie_word_embeddings
        return
    with pytest.raises(ModelLoadError, match=message):
        gguf_src.load_args(_Reader(**meta))


@pytest.mark.parametrize("keep", [10, 4096, 3_000_000, -100])
def test_truncated_gguf_says_truncated(smol_path, tmp_path, keep):
    size = smol_path.stat().st_size
    keep = size + keep if keep < 0 else keep
    cut = tmp_path / "cut.gguf"
    with open(smol_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(keep))
    with pytest.raises(ModelLoadError, match="is truncated") as e:
        load(cut, device="cpu", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "reshape" not in msg and "dtype" not in msg


def test_gguf_expected_size_matches_the_real_file(smol_path):
    assert gguf_src.expected_size(smol_path) == smol_path.stat().st_size


def test_options_and_keywords():
    device, dtype, quant = resolve_options(None, device="cpu")
    assert device == "cpu" and dtype == torch.bfloat16 and quant is None  # bfloat16 everywhere by default
    opts = RuntimeOptions(device="cpu", dtype="float32", quantize="int4", group_size=64)
    device, dtype, quant = resolve_options(opts)
    assert dtype == torch.float32 and quant.scheme == "int4" and quant.group_size == 64
    _, dtype, quant = resolve_options(opts, dtype=torch.float16, quantize="int8")  # keywords win
    assert dtype == torch.float16 and quant.scheme == "int8"
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_options(None, device="cpu", dtype="float8")


def test_load_random_does_not_change_callers_args():
    args = ModelArgs.from_name("tiny")
    before = args.replace()
    lm = load_random(args, device="cpu", dtype=torch.float32, quantize="int8", seed=3)
    assert args == before and lm.kind == "random" and lm.tokenizer is None and lm.quant["scheme"] == "int8"
    again = load_random(args, device="cpu", dtype=torch.float32, quantize="int8", seed=3)
    assert torch.equal(lm.model.layers[1].attention.wqkv.weight, again.model.layers[1].attention.wqkv.weight)


def test_quantize_writes_files_readable_by_all(tmp_path):
    from blitzgen.loading.checkpoint import save_quantized
    from blitzgen.quant import quantize_model

    from .test_quant_checkpoint import _word_tokenizer
    from .conftest import tiny_model
    from blitzgen.loading import LoadedModel

    model = tiny_model()
    meta = quantize_model(model, "int8")
    lm = LoadedModel(model=model, tokenizer=_word_tokenizer(), args=model.args, source="t", kind="hf", name="t")
    old = os.umask(0o022)
    try:
        save_quantized(lm, tmp_path / "ckpt", meta)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ckpt").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_peer_harness_ships_with_the_package(monkeypatch, tmp_path):
    from blitzgen import bench_peers
    from blitzgen.errors import BlitzgenError

    assert bench_peers.peer_script().parent.name == "peers"
    monkeypatch.setenv("BLITZGEN_GPTFAST_SCRIPT", str(tmp_path / "nope.py"))
    with pytest.raises(BlitzgenError, match="BLITZGEN_GPTFAST_SCRIPT names no file"):
        bench_peers.peer_script()


def test_quantize_verb_takes_quantize_and_the_old_mode(tmp_path, capsys):
    from blitzgen.cli import main

    out = str(tmp_path / "out")
    assert main(["quantize", "--out", out]) == 2
    assert "needs --quantize int8 or --quantize int4" in capsys.readouterr().err
    assert main(["quantize", "--quantize", "int8", "--mode", "int4", "--out", out]) == 2
    assert "disagree" in capsys.readouterr().err
    assert main(["quantize", "--quantize", "int8", "--group-size", "32", "--out", out]) == 2
    assert "int4 only" in capsys.readouterr().err
    assert main(["quantize", "--quantize", "int8", "--gptq", "--calibration", out, "--out", out]) == 2
    assert "--gptq applies to --quantize int4 only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_save_random_checkpoint_loads_back_sharded(tmp_path):
    from blitzgen.loading.synthetic import save_random_checkpoint

    args = ModelArgs.from_name("tiny").replace(qkv_bias=True, model_type="qwen2")
    summary = save_random_checkpoint(args, tmp_path / "ckpt", dtype=torch.float32, seed=5, shard_bytes=100_000)
    out = tmp_path / "ckpt"
    assert len(summary["files"]) > 1 and (out / "model.safetensors.index.json").is_file()
    assert "word-level stand-in" in summary["tokenizer"]  # 512 tokens: the default tokenizer does not fit
    lm = load(out, device="cpu", dtype=torch.float32, progress=False)
    ref = load_random(args, device="cpu", dtype=torch.float32, seed=5)
    assert lm.kind == "hf" and lm.args == ref.args
    for (k, a), (k2, b) in zip(lm.model.state_dict().items(), ref.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert lm.tokenizer.encode("t5 t6") == [1, 5, 6]


def test_bench_save_cli(tmp_path, capsys):
    from blitzgen.cli import main

    assert main(["bench", "--shape", "tiny", "--device", "cpu", "--save", str(tmp_path / "t")]) == 0
    assert "time its loading with: blitzgen bench --model" in capsys.readouterr().err
    assert (tmp_path / "t" / "model.safetensors").is_file() and (tmp_path / "t" / "tokenizer.json").is_file()
    assert main(["bench", "--shape", "tiny", "--device", "cpu", "--save", str(tmp_path / "t")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu", "--save", str(tmp_path / "u")]) == 2
    assert main(["bench", "--shape", "tiny", "--mode", "int8", "--device", "cpu", "--save", str(tmp_path / "u")]) == 2


@pytest.mark.parametrize("chunk,threads", [(1000, 3), (64 << 20, 4), (4096, 1)])
def test_staged_reader_reads_what_safetensors_reads(tmp_path, chunk, threads):
    """The CUDA loader's chunked, double-buffered, multi-threaded reader (run unpinned on the
    CPU) returns exactly safetensors' tensors, for every dtype and for tensors larger and smaller
    than a chunk, and for a tensor large enough to be split between threads."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from blitzgen.loading.hf import StagedReader

    g = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(1200, 1100, generator=g).to(torch.bfloat16),  # 2.6 MB
               "huge": torch.randn(2, 1100, 1000, generator=g),  # 8.8 MB: split between threads
               "f16": torch.randn(333, generator=g).half(), "i64": torch.arange(17), "u8": torch.arange(5, dtype=torch.uint8),
               "scalarish": torch.tensor([3.5]), "empty": torch.zeros(0, 4), "flag": torch.tensor([True, False])}
    f = tmp_path / "t.safetensors"
    save_file(tensors, str(f))
    reader = StagedReader("cpu", chunk=chunk, threads=threads)
    with safe_open(str(f), framework="pt") as h:
        for name in tensors:
            got, want = reader.get(str(f), name), h.get_tensor(name)
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name
    reader.close()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(f.read_bytes()[:-4096])
    with pytest.raises(OSError, match="end of file"):
        r = StagedReader("cpu", chunk=chunk, threads=threads)
        for name in tensors:
            r.get(str(cut), name)
