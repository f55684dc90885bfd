"""`blitzgen bench` on CPU: JSON output, errors, the gpt-fast shape mapping and the peer harness."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from blitzgen import bench, bench_peers
from blitzgen.cli import main
from blitzgen.config import NAMED_SHAPES, ModelArgs
from blitzgen.errors import BlitzgenError

REPO = Path(__file__).resolve().parents[1]
GPT_FAST = REPO / ".peers" / "gpt-fast"
TINY = ["bench", "--shape", "tiny", "--device", "cpu", "--prompt-len", "4", "--new-tokens", "8", "--runs", "2"]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0 and math.isfinite(x)


def test_bench_tiny_json_file(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(TINY + ["--json", str(out)]) == 0
    r = json.loads(out.read_text())
    for key in ("tok_s", "decode_tok_s", "ttft_ms", "bandwidth_gbs", "copy_bandwidth_gbs", "roofline_tok_s",
                "pct_roofline", "model_bytes", "total_s", "build_s"):
        assert _positive(r[key]), (key, r[key])
    assert r["shape"] == "tiny" and r["mode"] == "bf16" and r["dtype"] == "bfloat16"
    assert r["prompt_len"] == 4 and r["new_tokens"] == 8 and r["runs"] == 2 and len(r["tok_s_runs"]) == 2
    assert r["compile"] is False and r["device"] == "cpu" and r["gpu"] and r["torch"] == torch.__version__
    assert r["command"].startswith("blitzgen bench") and "--shape tiny" in r["command"]
    assert r["cache_len"] == 12 and r["kv_cache_bytes"] > 0
    assert r["date"] and "peers" not in r
    # the bandwidth figure is weight bytes x tokens/s, the roofline the copy rate over those bytes
    assert r["bandwidth_gbs"] == pytest.approx(r["model_bytes"] * r["tok_s"] / 1e9)
    assert r["pct_roofline"] == pytest.approx(100 * r["bandwidth_gbs"] / r["copy_bandwidth_gbs"])
    # the first token against the matmul roofline: the prefill's FLOPs over the measured matmul rate
    assert r["prefill_flops"] == ModelArgs.from_name("tiny").prefill_flops(4) and _positive(r["matmul_tflops"])
    assert r["pct_matmul_roofline_ttft"] == pytest.approx(
        100 * r["prefill_flops"] / (r["matmul_tflops"] * 1e12) / (r["ttft_ms"] / 1e3))
    table = capsys.readouterr().out
    assert "tokens/s (median)" in table and "% of copy roofline" in table and "% of matmul roofline" in table


def test_bench_json_stdout_fp32_greedy(capsys):
    argv = TINY + ["--dtype", "fp32", "--temperature", "0", "--no-roofline", "--json", "-", "--runs", "1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    r = json.loads(captured.out)  # stdout holds the one JSON object; the table went to stderr
    assert r["dtype"] == "float32" and r["sampling"]["temperature"] == 0.0
    assert "copy_bandwidth_gbs" not in r and _positive(r["tok_s"])
    assert "tokens/s (median)" in captured.err


def test_bench_int8_int4_tiny(tmp_path):
    quant = pytest.importorskip("blitzgen.quant")
    if not hasattr(quant, "make_config") or not hasattr(quant, "quantize_model"):
        pytest.skip("blitzgen.quant.make_config is not there yet")
    out = tmp_path / "r.json"
    assert main(TINY + ["--mode", "int8", "--no-roofline", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["mode"] == "int8" and _positive(r["tok_s"])
    bf16 = ModelArgs.from_name("tiny").num_params() * 2
    assert r["model_bytes"] < bf16  # int8 weights read fewer bytes than bf16 ones
    out4 = tmp_path / "r4.json"
    assert main(TINY + ["--mode", "int4", "--runs", "1", "--no-roofline", "--json", str(out4)]) == 0
    r4 = json.loads(out4.read_text())
    assert r4["mode"] == "int4" and r4["group_size"] == 32 and _positive(r4["tok_s"])
    assert r4["model_bytes"] < r["model_bytes"]  # one copy of the int4 weights (not the packed one too)


@pytest.mark.parametrize("argv, needle", [
    (["bench", "--shape", "no-such-shape", "--device", "cpu"], "known shapes"),
    (["bench", "--shape", "tiny", "--device", "cpu", "--peer", "gpt-fast=/nonexistent"], "gpt-fast"),
    (["bench", "--shape", "tiny", "--device", "cpu", "--prompt-len", "500", "--new-tokens", "100",
      "--no-roofline"], "context length"),
    (["bench", "--shape", "tiny", "--device", "cpu", "--runs", "0"], "--runs"),
    (["bench", "--shape", "tiny", "--model", "x", "--device", "cpu"], "not both"),
    (["bench", "--shape", "tiny", "--device", "cpu", "--group-size", "64"], "int4 only"),
])
def test_bench_errors_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("blitzgen: error:")]
    assert len(errors) == 1 and "Traceback" not in err and err.rstrip().endswith(errors[0])
    assert needle in errors[0]


def test_peer_nonexistent_dir_message(capsys):
    assert main(["bench", "--shape", "llama-2-7b", "--device", "cpu", "--peer", "gpt-fast=/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "/nonexistent" in err and "does not exist" in err and "model.py" in err


def test_cuda_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "--shape", "tiny", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_gptfast_shape_mapping():
    assert bench_peers.gptfast_preset("llama-2-7b") == "Llama-2-7b-chat-hf"
    assert bench_peers.gptfast_preset("Llama-2-13B") == "13B"
    assert bench_peers.gptfast_preset("llama-2-70b") == "70B"
    assert bench_peers.gptfast_preset("llama-3-8b") == "llama-3-8b"
    assert bench_peers.gptfast_preset("mistral-7b") == "Mistral-7B"
    assert bench_peers.gptfast_preset("codellama-7b") == "CodeLlama-7b-Python-hf"
    assert bench_peers.gptfast_preset("llama-3.1-8b") == "llama-3.1-8b"
    assert set(bench_peers.PEER_SHAPES) <= set(NAMED_SHAPES)  # every mapped shape is one of ours
    with pytest.raises(BlitzgenError, match="no preset for shape 'tiny'.*llama-2-7b"):
        bench_peers.gptfast_preset("tiny")
    with pytest.raises(BlitzgenError, match="needs --shape"):
        bench_peers.gptfast_preset(None)


def test_gptfast_presets_match_our_shapes():
    """Where gpt-fast's exported model.py is at hand, its presets have our shapes' sizes."""
    if not (GPT_FAST / "model.py").is_file():
        pytest.skip("gpt-fast sources are not exported into .peers/gpt-fast")
    ns: dict = {}
    exec(compile((GPT_FAST / "model.py").read_text(), "gpt-fast-model.py", "exec"), ns)
    for ours, preset in bench_peers.PEER_SHAPES.items():
        a, g = ModelArgs.from_name(ours), ns["ModelArgs"].from_name(preset)
        assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.intermediate_size) == \
               (g.dim, g.n_layer, g.n_head, g.n_local_heads, g.intermediate_size), ours
        assert g.block_size == bench_peers.PEER_BLOCK_SIZE[preset]
        if ours != "codellama-7b":  # gpt-fast's CodeLlama preset says 32000 (the HF model has 32016)
            assert a.vocab_size == g.vocab_size, ours


def test_check_peers(tmp_path):
    for f in bench_peers.PEER_FILES:
        (tmp_path / f).write_text("")
    ok = bench.BenchOptions(shape="llama-2-7b", prompt_len=1800, new_tokens=200, peers={"gpt-fast": str(tmp_path)})
    bench_peers.check_peers(ok)
    with pytest.raises(BlitzgenError, match="block_size"):
        bench_peers.check_peers(bench.BenchOptions(shape="llama-2-7b", prompt_len=2000, new_tokens=100,
                                             peers={"gpt-fast": str(tmp_path)}))
    with pytest.raises(BlitzgenError, match="unknown peer"):
        bench_peers.check_peers(bench.BenchOptions(shape="llama-2-7b", peers={"vllm": str(tmp_path)}))
    (tmp_path / "quantize.py").unlink()
    with pytest.raises(BlitzgenError, match="lacks quantize.py"):
        bench_peers.check_peers(ok)


def test_gptfast_command_carries_the_config():
    cmd = bench_peers.gptfast_command("/g", "13B", "int4", None, 7, 9, 3, device="cuda", compile=False)
    s = " ".join(cmd)
    assert cmd[1].endswith("blitzgen/peers/gptfast_generate.py")
    for part in ("--shape 13B", "--mode int4", "--group-size 32", "--prompt-len 7", "--new-tokens 9",
                 "--runs 3", "--gpt-fast-dir /g", "--no-compile"):
        assert part in s


def test_build_random_model_on_device():
    args = ModelArgs.from_name("tiny").replace(tie_word_embeddings=True)
    m, meta = bench.build_random_model(args, torch.device("cpu"), torch.bfloat16, seed=1)
    assert meta is None and m.output.weight is m.tok_embeddings.weight
    assert m.norm.weight.dtype == torch.bfloat16 and bool((m.layers[0].ffn_norm.weight == 1).all())
    w = m.layers[0].feed_forward.w13.weight.float()
    assert abs(w.std().item() - 0.02) < 0.003 and w.device.type == "cpu"
    m2, _ = bench.build_random_model(args, torch.device("cpu"), torch.bfloat16, seed=1)
    assert torch.equal(m2.layers[1].attention.wqkv.weight, m.layers[1].attention.wqkv.weight)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_build_random_model_quantizes_layer_by_layer(scheme):
    """Each Linear is quantized as it is made; no float weight of a target Linear is kept."""
    from blitzgen.quant import is_quantized, make_config

    args = ModelArgs.from_name("tiny").replace(tie_word_embeddings=True)
    m, meta = bench.build_random_model(args, torch.device("cpu"), torch.bfloat16, seed=1,
                                       quantize=make_config(scheme))
    assert is_quantized(m) and meta["scheme"] == scheme and meta["quantized_modules"] == 4 * args.n_layers + 1
    assert not any(isinstance(mod, torch.nn.Linear) for mod in m.modules())
    assert not any(t.device.type == "meta" for t in list(m.parameters()) + list(m.buffers()))
    assert m.tok_embeddings.weight.dtype == torch.bfloat16  # the embedding stays float
    m.setup_caches(1, 16)
    logits = m(torch.tensor([[1, 2, 3]]), torch.arange(3))
    assert logits.shape == (1, 3, args.vocab_size) and bool(torch.isfinite(logits).all())


def test_format_table_with_peer():
    r = dict(shape="llama-2-7b", mode="int4", group_size=32, dtype="bfloat16", prompt_len=5, new_tokens=200,
             runs=5, compile=True, gpu="NVIDIA H100", torch="2.11.0", date="today", tok_s=250.0,
             decode_tok_s=255.0, ttft_ms=9.0, bandwidth_gbs=900.0, decode_bandwidth_gbs=910.0,
             copy_bandwidth_gbs=3000.0, pct_roofline=30.0, pct_roofline_decode=30.3, roofline_tok_s=833.0,
             compile_s=40.0, peak_memory_bytes=5e9, model_bytes=3.6e9,
             peers={"gpt-fast": dict(tok_s=200.0, bw_gbs=720.0, compile_s=70.0, peak_memory_bytes=6e9,
                                     model_bytes=3.6e9)},
             ratio={"gpt-fast": 1.25})
    t = bench.format_table(r)
    assert "gpt-fast" in t and "1.250x" in t and "llama-2-7b, int4 g32" in t and "24.0%" in t
    r.update(prefill_flops=2e12, matmul_tflops=800.0, prefill_roofline_ms=2.5, pct_matmul_roofline_ttft=27.8)
    r["peers"]["gpt-fast"]["ttft_ms"] = 10.0
    t = bench.format_table(r)
    assert "% of matmul roofline, first token" in t and "27.8%" in t and "25.0%" in t and "2.50 ms" in t
    r["peers"]["gpt-fast"] = dict(error="timed out after 900 s")
    r["ratio"] = {}
    assert "gpt-fast: failed: timed out" in bench.format_table(r)


def test_prefill_flops_count():
    """Llama-2-7B, 1800 tokens: 2 x 6.48e9 linear weights x 1800, the causal attention, one head row."""
    a = ModelArgs.from_name("llama-2-7b")
    linear = a.n_layers * (4 * a.dim * a.dim + 3 * a.dim * a.intermediate_size)
    assert a.prefill_flops(1800) == 2 * linear * 1800 + a.n_layers * 2 * a.dim * 1800 * 1801 + 2 * a.dim * a.vocab_size
    assert 24e12 < a.prefill_flops(1800) < 25e12


def test_matmul_rate_cpu():
    assert bench.measure_matmul_flops(torch.device("cpu"), torch.float32, n=128) > 1e8  # 0.1 GFLOP/s


def test_copy_bandwidth_cpu():
    assert bench.measure_copy_bandwidth(torch.device("cpu"), nbytes=8 * 1024**2, reps=3) > 1e8


@pytest.mark.slow
def test_peer_subprocess_end_to_end(tmp_path):
    """bench -> gptfast_generate.py subprocess on CPU, gpt-fast's smallest preset, eager."""
    if not (GPT_FAST / "generate.py").is_file():
        pytest.skip("gpt-fast sources are not exported into .peers/gpt-fast")
    out = tmp_path / "r.json"
    rc = main(["bench", "--shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--prompt-len", "3",
               "--new-tokens", "2", "--runs", "1", "--warmup", "0", "--no-roofline",
               "--peer", f"gpt-fast={GPT_FAST}", "--peer-shape", "stories15M", "--json", str(out)])
    r = json.loads(out.read_text())
    p = r["peers"]["gpt-fast"]
    assert rc == 0, p
    assert p["preset"] == "stories15M" and _positive(p["tok_s"]) and p["new_tokens"] == 2
    assert r["ratio"]["gpt-fast"] == pytest.approx(r["tok_s"] / p["tok_s"])


def test_peer_script_reports_missing_files(tmp_path):
    import subprocess
    import sys

    if shutil.which(sys.executable) is None:
        pytest.skip("no interpreter path")
    proc = subprocess.run([sys.executable, str(bench_peers.peer_script()), "--gpt-fast-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    obj = json.loads(proc.stdout.strip().splitlines()[-1])
    assert obj["peer"] == "gpt-fast" and "lacks" in obj["error"]


def test_out_of_memory_is_a_clear_error(monkeypatch, capsys):
    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench, "build_random_model", boom)
    assert main(["bench", "--shape", "tiny", "--device", "cpu", "--no-roofline"]) == 2
    err = capsys.readouterr().err
    assert "blitzgen: error: out of memory building tiny: the weights alone are" in err and "Traceback" not in err


def _side_by_side():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_side_by_side", REPO / "benchmarks" / "gpu_side_by_side.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_side_by_side_configs(capsys):
    sbs = _side_by_side()
    names = [sbs.config_name(*c) for c in sbs.DEFAULT_CONFIGS]
    assert names == ["llama-2-7b/bf16/p5/n200", "llama-2-7b/int8/p5/n200", "llama-2-7b/int4-g32/p5/n200",
                     "llama-2-7b/bf16/p1800/n200", "llama-3-8b/bf16/p4000/n256", "llama-3-8b/int8/p5/n200"]
    assert sbs.parse_config("llama-2-13b:int4-g64:7:9") == ("llama-2-13b", "int4", 64, 7, 9)
    assert sbs.parse_config("tiny:int8:4:8") == ("tiny", "int8", None, 4, 8)
    assert sbs.main(["--list", "--only", "int4,p4000"]) == 0
    assert capsys.readouterr().out.split() == ["llama-2-7b/int4-g32/p5/n200", "llama-3-8b/bf16/p4000/n256"]
    md = sbs.markdown([dict(config="a/b", blitzgen=dict(tok_s=200.0, gpu="H100", torch="2.11", pct_roofline=90.0,
                                                         compile_s=50.0),
                            **{"gpt-fast": dict(tok_s=100.0, compile_s=70.0)}),
                       dict(config="c/d", error="out of memory: boom")])
    assert "| H100 | 2.11 | a/b | 200.0 | 100.0 | 2.000 | 90.0 |" in md and "blitzgen: out of memory: boom" in md


def test_side_by_side_runs_on_cpu(tmp_path):
    sbs = _side_by_side()
    rc = sbs.main(["--out", str(tmp_path), "--device", "cpu", "--config", "tiny:bf16:4:4",
                   "--config", "no-such-shape:bf16:4:4", "--runs", "1", "--skip-peer"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res[0]["config"] == "tiny/bf16/p4/n4" and _positive(res[0]["blitzgen"]["tok_s"])
    assert "unknown shape" in res[1]["error"]  # a failing config is recorded; the others still run
    assert "tiny/bf16/p4/n4" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow  # ~9 s on 2 busy cores: the GGUF's tokenizer and xgrammar's vocabulary set-up
def test_structured_gpu_bench_runs_on_cpu(tmp_path, capsys):
    """benchmarks/structured_gpu.py: saves the default tokenizer, loads it back, times the four variants."""
    import importlib.util

    pytest.importorskip("xgrammar")
    spec = importlib.util.spec_from_file_location("structured_gpu", REPO / "benchmarks" / "structured_gpu.py")
    sg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sg)
    tok, out = tmp_path / "tok", tmp_path / "s.json"
    assert sg.main(["--save-tokenizer", str(tok)]) == 0
    assert sg.main(["--tokenizer", str(tok), "--shape", "tiny", "--device", "cpu", "--dtype", "float32",
                    "--new-tokens", "6", "--reps", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert list(r["results"]) == ["plain", "loop", "loop+schema", "loop+schema+lp"] and r["vocab_size"] == 49152
    assert all(_positive(v["decode_tok_s"]) and _positive(v["ratio"]) for v in r["results"].values())
    assert r["loop_equals_plain"] and r["schema_equals_lp"] and r["schema_text_head"].startswith('{"xs": [')
    assert "token_loop + json_schema" in capsys.readouterr().out
