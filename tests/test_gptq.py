"""GPTQ int4 against round-to-nearest (its plain twin) and against the float model."""

from __future__ import annotations

import json

import pytest
import torch

from blitzgen.errors import BlitzgenError
from blitzgen.quant import Int4Config, dequantize_int4, is_quantized, quantize_int4, quantize_model
from blitzgen.quant.gptq import calibration_samples, gptq_quantize_model, gptq_quantize_weight
from blitzgen.quant.quality import QUALITY_TEXT, logit_metrics, teacher_forced_logits

from .conftest import tiny_model


def _correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    """Inputs near a rank-32 subspace, as LLM activations are: the errors GPTQ can hide there."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 32, generator=g) @ torch.randn(32, k, generator=g) + 0.1 * torch.randn(n, k, generator=g)


def test_uncorrelated_inputs_reduce_to_round_to_nearest():
    """With H diagonal no error is carried to other columns: the codes are exactly RTN's."""
    w = torch.randn(48, 128)
    H = torch.diag(torch.rand(128) + 0.5)
    for got, want in zip(gptq_quantize_weight(w, H, 32, torch.float32), quantize_int4(w, 32, torch.float32)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_gptq_lowers_the_layer_output_error(group_size):
    torch.manual_seed(group_size)
    w = torch.randn(96, 256) * 0.05
    x = _correlated_inputs(2048, 256, seed=group_size)
    H = x.t() @ x
    err = {}
    for name, packed in (("gptq", gptq_quantize_weight(w, H, group_size, torch.float32)),
                         ("rtn", quantize_int4(w, group_size, torch.float32))):
        wq = dequantize_int4(*packed, group_size, torch.float32)
        err[name] = ((x @ (w - wq).t()).norm() / (x @ w.t()).norm()).item()
    assert err["gptq"] < 0.5 * err["rtn"], err  # measured: 0.26-0.33 of RTN's error


def test_gptq_model_is_an_ordinary_int4_model():
    model = tiny_model(seed=3, tie_word_embeddings=True, qkv_bias=True)
    samples = [[int(t) for t in torch.randint(3, 500, (40,))] for _ in range(4)]
    meta = gptq_quantize_model(model, Int4Config(32), samples)
    assert is_quantized(model) and meta["method"] == "gptq" and meta["calibration_tokens"] == 160
    assert meta["quantized_modules"] == 4 * model.args.n_layers + 1
    assert model.tok_embeddings.weight.dtype == torch.float32  # the tied embedding stays float
    logits = model(torch.tensor([[1, 2, 3]]), torch.arange(3))
    assert bool(torch.isfinite(logits).all())
    with pytest.raises(BlitzgenError, match="already quantized"):
        gptq_quantize_model(model, Int4Config(32), samples)


def test_scales_in_another_dtype_keep_the_activation_dtype():
    """GPTQ with float16 scales on a bfloat16 model with qkv bias (what `quantize --dtype float16`
    does on CUDA): the calibration forwards keep running in bfloat16 and write the bf16 KV cache."""
    model = tiny_model(seed=5, dtype=torch.bfloat16, qkv_bias=True)
    samples = [[int(t) for t in torch.randint(3, 500, (24,))] for _ in range(2)]
    meta = gptq_quantize_model(model, Int4Config(32), samples, dtype=torch.float16)
    assert meta["dtype"] == "float16" and model.layers[0].attention.wqkv.bias.dtype == torch.float16
    out = model(torch.tensor([[1, 2, 3]]), torch.arange(3))
    assert bool(torch.isfinite(out).all())
    for cfg in ("int8", "int4"):  # and round to nearest, both module types
        m = tiny_model(seed=6, dtype=torch.bfloat16, qkv_bias=True)
        quantize_model(m, cfg, dtype=torch.float32)
        x = torch.randn(1, 2, m.args.dim, dtype=torch.bfloat16)
        assert m.layers[0].attention.wqkv(x).dtype == torch.bfloat16


def test_gptq_model_fits_its_calibration_better_than_rtn():
    """End to end through the calibration hooks and the layer order: on the text it was calibrated
    on, the GPTQ model's logits stay closer to the float model's than round-to-nearest's (tiny
    random model, fixed seed; measured KL 0.0093 vs 0.0148 on the first sample)."""
    import copy

    base = tiny_model(seed=1)
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(3, base.args.vocab_size, (48,), generator=g).tolist() for _ in range(6)]
    rtn, gptq = copy.deepcopy(base), copy.deepcopy(base)
    quantize_model(rtn, Int4Config(32))
    gptq_quantize_model(gptq, Int4Config(32), samples)
    kl = {"rtn": 0.0, "gptq": 0.0}
    for ids in samples:
        ref = teacher_forced_logits(base, ids)
        kl["rtn"] += logit_metrics(ref, teacher_forced_logits(rtn, ids))["kl"]
        kl["gptq"] += logit_metrics(ref, teacher_forced_logits(gptq, ids))["kl"]
    assert kl["gptq"] < kl["rtn"], kl


def test_gptq_refuses_bad_input():
    with pytest.raises(BlitzgenError, match="int4 only"):
        gptq_quantize_model(tiny_model(), "int8", [[1, 2]])
    with pytest.raises(BlitzgenError, match="calibration"):
        gptq_quantize_model(tiny_model(), Int4Config(32), [[]])
    model = tiny_model()
    with pytest.raises(BlitzgenError, match="exceed the model's context length"):
        gptq_quantize_model(model, Int4Config(32), [[1] * (model.args.max_seq_len + 1)])
    assert not is_quantized(model)


@pytest.mark.slow
def test_gptq_lowers_held_out_error_on_smollm2_head(smol, tmp_path):
    """The real SmolLM2 output head on its real final features: GPTQ calibrated on one text has a
    lower output error than RTN on another text (held out). Measured: 0.064 vs 0.085 at g64.
    (End to end, GPTQ lowers the whole model's KL too: BENCHMARKS.md, quant_quality.py --gptq.)"""
    model = smol.model
    calib = tmp_path / "calib.txt"
    calib.write_text(_CALIBRATION, encoding="utf-8")

    @torch.no_grad()
    def features(ids):
        if model.cache_len < len(ids):
            model.setup_caches(1, len(ids))
        pos = torch.arange(len(ids))
        x = model.tok_embeddings(torch.tensor([ids]))
        rope, mask = model.rope_and_mask(pos)
        for layer in model.layers:
            x = layer(x, rope, mask, pos)
        return model.norm(x)[0]

    train = torch.cat([features(ids) for ids in calibration_samples(smol.tokenizer, calib, seq_len=256)])
    test = features(smol.tokenizer.encode(QUALITY_TEXT))
    w = model.output.weight.detach()
    err = {}
    for name, packed in (("gptq", gptq_quantize_weight(w, train.t() @ train, 64, torch.float32)),
                         ("rtn", quantize_int4(w, 64, torch.float32))):
        wq = dequantize_int4(*packed, 64, torch.float32)
        err[name] = ((test @ (w - wq).t()).norm() / (test @ w.t()).norm()).item()
    assert err["gptq"] < 0.9 * err["rtn"], err


def test_calibration_file_formats(tmp_path, smol_tokenizer):
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "one two three " * 50}) + "\n\n" + json.dumps({"text": "four five"}) + "\n")
    samples = calibration_samples(smol_tokenizer, jl, max_tokens=60, seq_len=25)
    assert [len(s) for s in samples] == [25, 25, 10]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(BlitzgenError, match=r"bad.jsonl:1: expected a JSON object"):
        calibration_samples(smol_tokenizer, bad)
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(BlitzgenError, match="has no text"):
        calibration_samples(smol_tokenizer, empty)
    with pytest.raises(BlitzgenError, match="cannot read"):
        calibration_samples(smol_tokenizer, tmp_path / "missing.txt")


def test_cli_gptq_checkpoint(tmp_path_factory, smol_tokenizer, capsys):
    pytest.importorskip("transformers")
    from blitzgen.cli import main
    from blitzgen.loading import load

    from .test_hf_parity import _hf_checkpoint

    src, _ = _hf_checkpoint(tmp_path_factory, smol_tokenizer, "qwen2-qkv-bias")
    calib = tmp_path_factory.mktemp("calib") / "c.txt"
    calib.write_text(_CALIBRATION, encoding="utf-8")
    out = tmp_path_factory.mktemp("gptq") / "ckpt"
    rc = main(["quantize", "--model", str(src), "--mode", "int4", "--gptq", "--calibration", str(calib),
               "--calibration-tokens", "512", "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "with GPTQ" in err and "calibration: 512 tokens" in err and "warning: only 512" in err
    meta = json.loads((out / "blitzgen.json").read_text())
    assert meta["method"] == "gptq" and meta["calibration_tokens"] == 512 and meta["group_size"] == 32
    lm = load(out, device="cpu", progress=False)
    assert is_quantized(lm.model)


@pytest.mark.parametrize("argv,message", [
    (["--mode", "int8", "--gptq", "--calibration", "CAL"], "--gptq applies to --mode int4 only"),
    (["--mode", "int4", "--gptq"], "--gptq needs calibration text"),
    (["--mode", "int4", "--calibration", "CAL"], "--calibration is only used with --gptq"),
    (["--mode", "int4", "--gptq", "--calibration", "nope.txt"], "no such file"),
    (["--mode", "int4", "--gptq", "--calibration", "CAL", "--calibration-tokens", "0"], "must be >= 1"),
])
def test_cli_gptq_bad_options(argv, message, tmp_path, capsys):
    from blitzgen.cli import main

    cal = tmp_path / "cal.txt"
    cal.write_text("some text")
    argv = [str(cal) if a == "CAL" else a for a in argv]
    assert main(["quantize", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# Calibration text for the tests (written for this repository): varied registers, not the quality text.
_CALIBRATION = """\
The harbour was quiet before dawn. Fishing boats knocked gently against the pier while gulls waited
on the posts, and an old man in a yellow coat checked the knots on every rope twice before he let
his grandson climb aboard. They would be back by noon if the wind held.

To install the package, create a virtual environment, activate it, and run the installer with the
--upgrade flag. If the build fails on a missing compiler, install the platform's build tools first
and try again; the error message names the header it could not find.

def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    total, out = 0.0, []
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out

Q: Why does ice float on water?
A: Water expands when it freezes, because its molecules settle into an open hexagonal lattice held
together by hydrogen bonds. The solid is therefore about nine percent less dense than the liquid.

Quarterly revenue rose eleven percent to 4.2 million, driven by subscriptions in the northern
region, while hardware sales fell for the third consecutive quarter. The board approved a dividend
of twelve cents per share and a new budget for research into battery storage.

Dear Ms. Alvarez, thank you for your letter of the fourteenth. I have forwarded your request to the
planning office, which will contact you within ten working days about the proposed footpath.

Photosynthesis converts light energy into chemical energy: in the chloroplasts, water is split,
oxygen is released, and carbon dioxide is fixed into sugars through the Calvin cycle.
""" * 3
