"""A GGUF's 4-bit blocks stay 4-bit on the CPU (loading.auto_quantization): which files and options
it applies to, the head as stored (8-bit blocks as int8, wider ones float), and the quality against
the file's own float32 weights."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn as nn

from blitzgen.loading import auto_quantization, gguf as gguf_src, load
from blitzgen.quant import Int4Linear, Int8Linear, is_quantized, make_config, quantize_model
from blitzgen.runtime import RuntimeOptions

from .conftest import tiny_model


def _cpu(**kw) -> RuntimeOptions:
    return RuntimeOptions(device="cpu", compile=False, **kw)


def test_header_scan_names_the_default_models_types(smol_path):
    types = gguf_src.tensor_types(smol_path)
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["token_embd.weight"] == "Q8_0"
    assert gguf_src.four_bit_grid(smol_path) == "minmax"
    assert gguf_src.expected_size(smol_path) == smol_path.stat().st_size


def test_auto_quantization_applies_to_4bit_gguf_on_cpu_bf16_only(smol_path, tmp_path):
    got = auto_quantization(smol_path, _cpu())
    assert (got.quantize, got.group_size, got.quantize_head) == ("int4", 32, "int8")  # its head is Q8_0
    assert auto_quantization(None, _cpu()).quantize == "int4"  # the embedded default
    for opts in (_cpu(dtype="float32"), _cpu(auto_quantize=False), _cpu(quantize="int8"),
                 RuntimeOptions(device="cuda", compile=True)):
        assert auto_quantization(smol_path, opts) == opts
    assert auto_quantization(str(tmp_path), _cpu()) == _cpu()  # not a GGUF
    assert auto_quantization("org/not-here", _cpu()) == _cpu()  # a hub id: never fetched here


def test_quantize_none_turns_auto_off():
    from blitzgen.commands.common import RUNTIME, runtime_options

    args = argparse.Namespace(**{dest: None for dest in RUNTIME})
    assert runtime_options(args).auto_quantize
    args.quantize = "none"
    opts = runtime_options(args)
    assert opts.quantize is None and not opts.auto_quantize


def test_head_false_leaves_the_tied_head_float():
    model = tiny_model(seed=2, tie_word_embeddings=True)
    meta = quantize_model(model, make_config("int4", 32, head=False))
    assert meta["head"] is False and isinstance(model.output, nn.Linear) and not isinstance(model.output, Int4Linear)
    assert model.output.weight is model.tok_embeddings.weight
    assert isinstance(model.layers[0].attention.wqkv, Int4Linear)


def test_head_int8_with_int4_blocks():
    """head="int8": the (tied) head gets its own int8 copy, the blocks int4; the metadata says so
    and a checkpoint's metadata gives the same config back."""
    from blitzgen.loading.checkpoint import config_from_metadata

    model = tiny_model(seed=2, tie_word_embeddings=True)
    meta = quantize_model(model, make_config("int4", 32, head="int8"))
    assert meta["head"] == "int8" and isinstance(model.output, Int8Linear)
    assert isinstance(model.layers[0].attention.wqkv, Int4Linear)
    assert isinstance(model.tok_embeddings, nn.Embedding)
    assert config_from_metadata(meta) == make_config("int4", 32, head="int8")
    with pytest.raises(Exception, match="head"):
        make_config("int4", 32, head="int4x")


def test_default_cpu_load_keeps_4bit_blocks_and_its_quality(smol, smol_path):
    """Teacher-forced over a fixed passage against the file's float32 weights: the int4 blocks with
    the int8 head agree with the float argmax about as often as plain bf16 does (measured 96.2%, KL
    0.0025, against 97.7% / 0.0011 for bf16 and 96.2% / 0.0016 with a bf16 head; an int4 head: 87-90%)."""
    from blitzgen.quant.quality import QUALITY_TEXT, logit_metrics, teacher_forced_logits

    opts = auto_quantization(smol_path, _cpu())
    lm = load(smol_path, opts, progress=False)
    assert lm.quant["scheme"] == "int4" and lm.quant.get("head") == "int8" and is_quantized(lm.model)
    assert isinstance(lm.model.output, Int8Linear)
    ids = smol.tokenizer.encode(QUALITY_TEXT)[:128]
    ref = teacher_forced_logits(smol.model, ids)
    got = logit_metrics(ref, teacher_forced_logits(lm.model, ids))
    plain = load(smol_path, _cpu(auto_quantize=False), dtype=torch.bfloat16, progress=False)
    base = logit_metrics(ref, teacher_forced_logits(plain.model, ids))
    assert got["agreement"] >= base["agreement"] - 0.04 and got["kl"] < 0.005, (got, base)


def test_cli_load_line_says_the_blocks_stayed_4bit(capsys):
    from blitzgen.commands.common import RUNTIME, load_engine

    args = argparse.Namespace(**{dest: None for dest in RUNTIME}, model=None)
    args.device = "cpu"
    lm, gen = load_engine(args)
    err = capsys.readouterr().err
    assert "int4 g32, int8 head (the file's 4-bit blocks; --quantize none widens them)" in err
    args.speculate = ["self-int4"]  # its draft is the int4 copy: the target stays wider
    lm2, _ = load_engine(args)
    assert lm2.quant is None


def test_hf_directory_holding_a_gguf_is_not_auto_quantized(smol_path, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / smol_path.name).symlink_to(smol_path)
    assert auto_quantization(tmp_path, _cpu()) == _cpu()  # load() reads it as an HF model
    only = tmp_path / "only"
    only.mkdir()
    (only / smol_path.name).symlink_to(smol_path)
    assert auto_quantization(only, _cpu()).quantize == "int4"  # a directory holding one GGUF


def test_int8_head_checkpoint_round_trip(smol_path, tmp_path):
    from blitzgen.loading.checkpoint import save_quantized
    from blitzgen.quant.quality import teacher_forced_logits

    lm = load(smol_path, auto_quantization(smol_path, _cpu()), progress=False)
    save_quantized(lm, tmp_path / "ck", lm.quant)
    back = load(tmp_path / "ck", _cpu(), progress=False)
    assert back.quant["head"] == "int8" and isinstance(back.model.output, Int8Linear)
    ids = lm.tokenizer.encode("The quick brown fox")
    assert torch.equal(teacher_forced_logits(lm.model, ids), teacher_forced_logits(back.model, ids))


def test_unusable_quantized_cache_entry_is_rebuilt(smol_path, tmp_path, monkeypatch):
    import blitzgen.loading as loading

    opts = auto_quantization(smol_path, _cpu(cache_dir=str(tmp_path)))
    assert load(smol_path, opts, progress=False).weight_cache == "saved"
    real = loading.assemble

    def broken(*a, **kw):
        if kw.get("prequantized") is not None:
            raise RuntimeError("a layout this code does not read")
        return real(*a, **kw)

    monkeypatch.setattr(loading, "assemble", broken)
    again = load(smol_path, opts, progress=False)
    assert again.weight_cache == "saved" and again.quant["scheme"] == "int4"  # rebuilt from the float entry


@pytest.mark.parametrize("qtype,grid", [("Q4_0", "symmetric"), ("Q4_1", "minmax"), ("Q8_0", None)])
def test_q4_gguf_blocks_keep_their_codes(qtype, grid, tmp_path, monkeypatch):
    """A GGUF whose blocks are Q4_0 or Q4_1 loads on the CPU as int4 g32 on the grid that recovers
    each block: the dequantized weights differ from the file's only by the scales' rounding to bf16
    (2^-9 relative). For Q4_0 the min/max grid would not (checked, so the test can fail)."""
    from blitzgen.quant.int4 import dequantize_int4, quantize_int4

    from .test_weight_cache import write_tiny_gguf

    monkeypatch.setenv("BLITZGEN_CACHE", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", seed=3, matrix_type=qtype)
    assert gguf_src.four_bit_grid(path) == grid
    opts = auto_quantization(path, _cpu())
    if grid is None:
        assert opts == _cpu()
        return
    assert (opts.quantize, opts.quantize_head, opts.quantize_symmetric) == ("int4", False, grid == "symmetric")
    exact = load(path, _cpu(dtype="float32", auto_quantize=False), device="cpu", dtype=torch.float32, progress=False)
    lm = load(path, opts, device="cpu", dtype=torch.bfloat16, progress=False)
    assert lm.quant["scheme"] == "int4" and lm.quant.get("symmetric", False) == (grid == "symmetric")
    for name in ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2"):
        ours = lm.model.layers[1].get_submodule(name)
        assert isinstance(ours, Int4Linear), name
        w = exact.model.layers[1].get_submodule(name).weight.float()
        got = ours.dequantize(torch.float32)
        assert _within_scale_rounding(got, w), name
    if grid == "symmetric":  # min/max re-quantization rounds Q4_0 blocks a second time
        w = exact.model.layers[1].attention.wqkv.weight.float()
        again = dequantize_int4(*quantize_int4(w, 32, torch.bfloat16), 32, torch.float32)
        assert not _within_scale_rounding(again, w)


def _within_scale_rounding(got: torch.Tensor, w: torch.Tensor) -> bool:
    """Every weight within 2^-6 of its group's largest magnitude: bf16 scales and zeros (2^-9
    relative each, the zero built from the rounded scale) reach ~2^-6.9; a re-rounded code is off
    by up to half a step, ~2^-4 of it."""
    n, k = w.shape
    bound = w.abs().reshape(n, k // 32, 32).amax(-1, keepdim=True) * 2.0 ** -6
    return bool(((got - w).abs().reshape(n, k // 32, 32) <= bound).all())
