"""Quantized checkpoints: save/load round trips, corruption errors, and the ``blitzgen quantize`` CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from blitzgen.errors import BlitzgenError, ModelLoadError
from blitzgen.loading import LoadedModel, detect_kind, load
from blitzgen.quant import Int4Linear, Int8Linear, make_config, quantize_model
from blitzgen.loading.checkpoint import METADATA_KEY, is_quantized_checkpoint, save_quantized

from .conftest import tiny_model


def _word_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers

    from blitzgen.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(tok, bos_token_id=1, eos_token_ids=[2], add_bos=True, chat_template=None,
                     special_ids={0, 1, 2}, vocab_size=vocab_size)


def _quantized_tiny(scheme: str, seed: int = 0, **overrides) -> tuple[LoadedModel, dict]:
    model = tiny_model(seed=seed, **overrides)
    meta = quantize_model(model, make_config(scheme))
    lm = LoadedModel(model=model, tokenizer=_word_tokenizer(), args=model.args, source="tiny-random",
                     kind="hf", name="tiny", quant=meta)
    return lm, meta


def _logits(model, ids=(1, 7, 42, 300, 5, 9, 77, 2)) -> torch.Tensor:
    ids = torch.tensor([list(ids)])
    with torch.inference_mode():
        if model.max_seq_len < ids.shape[1]:
            model.setup_caches(1, 64)
        return model(ids, torch.arange(ids.shape[1]))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """An int4 tiny checkpoint (tied head, qkv bias) written once; tests copy it before damaging it."""
    lm, meta = _quantized_tiny("int4", seed=7, tie_word_embeddings=True, qkv_bias=True)
    out = tmp_path_factory.mktemp("ckpt") / "tiny-int4"
    save_quantized(lm, out, meta)
    return out, _logits(lm.model)


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("scheme,overrides", [
    ("int8", {}),
    ("int4", {}),
    ("int8", {"tie_word_embeddings": True, "qkv_bias": True}),
    ("int4", {"tie_word_embeddings": True, "qkv_bias": True}),
])
def test_round_trip_gives_identical_logits(tmp_path, scheme, overrides):
    lm, meta = _quantized_tiny(scheme, seed=3, **overrides)
    before = _logits(lm.model)
    out = tmp_path / "ckpt"
    save_quantized(lm, out, meta)
    assert sorted(p.name for p in out.iterdir()) == [
        "blitzgen.json", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert is_quantized_checkpoint(out) and detect_kind(out) == "blitzgen"

    loaded = load(out, device="cpu", dtype=torch.float32, progress=False)
    assert loaded.kind == "blitzgen" and loaded.quant["scheme"] == scheme
    kind = Int8Linear if scheme == "int8" else Int4Linear
    assert isinstance(loaded.model.output, kind) and isinstance(loaded.model.layers[1].feed_forward.w2, kind)
    assert loaded.args == lm.args
    assert torch.equal(_logits(loaded.model), before)
    assert loaded.tokenizer.encode("t5 t6") == [1, 5, 6] and loaded.tokenizer.eos_token_ids == [2]
    if overrides.get("tie_word_embeddings"):
        assert torch.equal(loaded.model.tok_embeddings.weight, lm.model.tok_embeddings.weight)


def test_round_trip_with_bfloat16_scales(tmp_path):
    """The CLI's way: fp32 weights, scales rounded to bf16 at quantization, float tensors saved as bf16."""
    model = tiny_model(seed=11)
    meta = quantize_model(model, make_config("int4"), dtype=torch.bfloat16)
    assert meta["dtype"] == "bfloat16" and model.output.scales.dtype == torch.bfloat16
    model.to(torch.bfloat16)  # a dtype change rebuilds the packed caches
    lm = LoadedModel(model=model, tokenizer=_word_tokenizer(), args=model.args, source="t", kind="hf", name="t")
    save_quantized(lm, tmp_path / "ckpt", meta, dtype=torch.bfloat16)
    loaded = load(tmp_path / "ckpt", device="cpu", dtype=torch.bfloat16, progress=False)
    assert loaded.quant["dtype"] == "bfloat16"
    assert torch.equal(_logits(loaded.model), _logits(model))


def test_metadata_in_json_and_safetensors_header(tiny_ckpt):
    out, _ = tiny_ckpt
    meta = json.loads((out / "blitzgen.json").read_text())
    assert meta["format"] == "blitzgen-quantized" and meta["format_version"] == 1
    assert meta["scheme"] == "int4" and meta["group_size"] == 32
    assert meta["source_model"] == "tiny-random" and meta["source_kind"] == "hf"
    assert {"blitzgen_version", "created", "dtype"} <= set(meta)
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        header = fh.metadata()
        names = set(fh.keys())
    assert json.loads(header[METADATA_KEY]) == meta
    assert header["blitzgen.scheme"] == "int4"
    assert "tok_embeddings.weight" in names and "output.qweight" in names
    assert "layers.0.attention.wqkv.bias" in names and not any("packed" in n for n in names)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["hidden_size"] == 64


def test_loads_in_bfloat16(tiny_ckpt):
    out, ref = tiny_ckpt
    lm = load(out, device="cpu", dtype=torch.bfloat16, progress=False)
    assert lm.model.output.scales.dtype == torch.bfloat16 and lm.model.output.qweight.dtype == torch.uint8
    assert lm.model.norm.weight.dtype == torch.bfloat16
    got = _logits(lm.model)
    assert (got - ref).abs().max() < 0.15 * ref.abs().max()


def test_header_alone_identifies_checkpoint(tiny_ckpt, tmp_path):
    out, ref = tiny_ckpt
    ckpt = _copy(out, tmp_path)
    (ckpt / "blitzgen.json").unlink()
    assert is_quantized_checkpoint(ckpt) and detect_kind(ckpt) == "blitzgen"
    assert torch.equal(_logits(load(ckpt, device="cpu", dtype=torch.float32, progress=False).model), ref)


def _expect_load_error(path, match):
    with pytest.raises(ModelLoadError, match=match):
        load(path, device="cpu", dtype=torch.float32, progress=False)


def test_truncated_weights(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt[0], tmp_path)
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _expect_load_error(ckpt, "corrupt or truncated|truncated")
    f.write_bytes(b"")
    _expect_load_error(ckpt, "corrupt or truncated")


def test_unknown_scheme_and_bad_metadata(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt[0], tmp_path)
    meta_file = ckpt / "blitzgen.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "scheme": "int3"}))
    _expect_load_error(ckpt, "unsupported quantization.*int3")
    meta_file.write_text(json.dumps({**meta, "format_version": 2}))
    _expect_load_error(ckpt, "format_version 2 is not supported")
    meta_file.write_text(json.dumps({**meta, "group_size": 64}))
    _expect_load_error(ckpt, "blitzgen.json says int4/64 but model.safetensors was written as int4/32")
    meta_file.write_text("{not json")
    _expect_load_error(ckpt, "cannot read .*blitzgen.json")
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "scheme"}))
    _expect_load_error(ckpt, "missing scheme")


def test_missing_and_mismatched_tensors(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt[0], tmp_path)
    f = ckpt / "model.safetensors"
    with safe_open(str(f), framework="pt") as fh:
        header = fh.metadata()
    state = load_file(str(f))
    save_file({k: v for k, v in state.items() if k != "layers.1.feed_forward.w2.zeros"}, str(f), metadata=header)
    _expect_load_error(ckpt, r"missing tensors: layers\.1\.feed_forward\.w2\.zeros")
    bad = dict(state)
    bad["layers.0.attention.wo.scales"] = torch.zeros(64, 3)
    save_file(bad, str(f), metadata=header)
    _expect_load_error(ckpt, r"layers\.0\.attention\.wo\.scales .* shape \(64, 3\), expected \(64, 2\)")
    bad = dict(state)
    bad["layers.0.attention.wo.qweight"] = state["layers.0.attention.wo.qweight"].float()
    save_file(bad, str(f), metadata=header)
    _expect_load_error(ckpt, r"layers\.0\.attention\.wo\.qweight .* is torch\.float32, expected torch\.uint8")
    # config.json that does not match the weights
    save_file(state, str(f), metadata=header)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    _expect_load_error(ckpt, "does not use: layers.1")
    (ckpt / "config.json").unlink()
    _expect_load_error(ckpt, "config.json")


def test_save_refuses_unquantized_model(tmp_path):
    model = tiny_model()
    lm = LoadedModel(model=model, tokenizer=_word_tokenizer(), args=model.args, source="x", kind="hf", name="x")
    with pytest.raises(BlitzgenError, match="not quantized"):
        save_quantized(lm, tmp_path / "out", {"scheme": "int8"})


# ----------------------------------------------------------------------------- CLI (real model)


@pytest.fixture(scope="module")
def smol_int4_dir(smol, smol_path, tmp_path_factory):
    """``blitzgen quantize`` of the real SmolLM2 GGUF. To save a second 15-20 s GGUF load, the
    command's ``load`` returns a copy of the session's float32 ``smol``, quantized as asked (what
    it would load; tests/test_quant_load.py checks that quantizing at load gives the same model)."""
    import copy
    import dataclasses

    import blitzgen.loading
    from blitzgen.cli import main

    calls = []

    def fake_load(spec, *, device=None, dtype=None, quantize=None, quant_dtype=None, progress=True):
        calls.append((str(spec), device, dtype, quantize, quant_dtype))
        model = copy.deepcopy(smol.model)
        meta = quantize_model(model, quantize, dtype=quant_dtype) if quantize is not None else None
        return dataclasses.replace(smol, model=model, quant=meta)

    out = tmp_path_factory.mktemp("smol") / "smol-int4"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(blitzgen.loading, "load", fake_load)
        assert main(["quantize", "--model", str(smol_path), "--mode", "int4", "--out", str(out),
                     "--device", "cpu"]) == 0
    assert calls == [(str(smol_path), "cpu", torch.float32, make_config("int4"), torch.bfloat16)]
    return out


@pytest.mark.slow
def test_cli_quantize_then_generate(smol_int4_dir, capsys):
    from blitzgen.cli import main

    err = capsys.readouterr().err
    meta = json.loads((smol_int4_dir / "blitzgen.json").read_text())
    assert meta["scheme"] == "int4" and meta["group_size"] == 32 and meta["source_kind"] == "gguf"
    assert meta["dtype"] == "bfloat16"
    size = (smol_int4_dir / "model.safetensors").stat().st_size
    assert 100e6 < size < 160e6  # 135M params: int4 + bf16 scales/zeros, bf16 embedding (fp32: 540 MB)
    rc = main(["generate", "--model", str(smol_int4_dir), "--prompt", "hi", "--max-new-tokens", "4",
               "--temperature", "0", "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "int4" in out.err and "tokens/sec" in out.err
    del err


@pytest.mark.slow
def test_cli_refuses_non_empty_out_and_bad_options(smol_int4_dir, tmp_path, capsys):
    from blitzgen.cli import main

    assert main(["quantize", "--mode", "int4", "--out", str(smol_int4_dir)]) == 2
    assert "not empty (pass --force" in capsys.readouterr().err
    assert main(["quantize", "--mode", "int4", "--group-size", "48", "--out", str(tmp_path / "x")]) == 2
    assert "group size must be one of" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    already = main(["quantize", "--model", str(smol_int4_dir), "--mode", "int8", "--out", str(tmp_path / "y"),
                    "--device", "cpu"])
    assert already == 2 and "already quantized" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_corrupted_checkpoint_exits_2_without_traceback(smol_int4_dir, tmp_path):
    ckpt = _copy(smol_int4_dir, tmp_path)
    f = ckpt / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 3)
    p = subprocess.run([sys.executable, "-m", "blitzgen.cli", "generate", "--model", str(ckpt), "--prompt", "hi",
                        "--max-new-tokens", "2", "--device", "cpu"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("blitzgen: error:") and "truncated" in lines[0], p.stderr
    assert "Traceback" not in p.stderr
