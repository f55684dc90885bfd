"""The CLI end to end, and every user mistake as a one-line error with a non-zero exit."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time

import pytest
import torch

from blitzgen.cli import build_parser, main
from blitzgen.commands.common import RUNTIME, SAMPLING, Parser, add_runtime_args, runtime_options


def run_cli(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "blitzgen.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_user_error(rc_or_proc, capsys=None, match: str = ""):
    if isinstance(rc_or_proc, subprocess.CompletedProcess):
        rc, err = rc_or_proc.returncode, rc_or_proc.stderr
    else:
        rc, err = rc_or_proc, capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("blitzgen: error:")]
    assert len(lines) == 1, err
    assert match.lower() in lines[0].lower(), lines[0]


@pytest.mark.slow  # a fresh process loads SmolLM2 (it timed out at 300 s on a busy 2-core machine)
def test_generate_default_model_streams_and_reports():
    p = run_cli("generate", "--prompt", "Implement fibonacci in python", "--max-new-tokens", "48",
                "--temperature", "0")
    assert p.returncode == 0, p.stderr
    assert "def fibonacci" in p.stdout
    assert "Loaded SmolLM2-135M-Instruct" in p.stderr
    assert "tokens/sec" in p.stderr and "Bandwidth achieved" in p.stderr


def test_generate_raw_completion_with_stop(capsys):
    rc = main(["generate", "--prompt", "The capital of France is", "--raw", "--max-new-tokens", "12",
               "--temperature", "0", "--stop", "\n", "--dtype", "float32"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Paris" in out


@pytest.mark.parametrize("argv, match", [
    (["--prompt", "   "], "prompt is empty"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["--prompt", "hi", "--top-p", "0"], "--top-p"),
    (["--prompt", "hi", "--num-samples", "0"], "num-samples"),
    (["--prompt", "hi", "--max-new-tokens", "0", "--model", "/nonexistent/model.gguf"], "max-new-tokens"),
    (["--prompt", "hi", "--model", "/nonexistent/model.gguf"], "model not found"),
    (["--prompt", "x " * 3000, "--max-model-len", "1024"], "maximum context length is 1024"),
])
def test_generate_bad_input(argv, match, capsys):
    assert_user_error(main(["generate", *argv]), capsys, match)


def test_corrupt_gguf(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<I", 3) + os.urandom(64))
    assert_user_error(main(["generate", "--prompt", "hi", "--model", str(bad)]), capsys, "corrupt")


def test_not_a_model(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    assert_user_error(main(["generate", "--prompt", "hi", "--model", str(f)]), capsys, "not a GGUF")
    assert_user_error(main(["generate", "--prompt", "hi", "--model", str(tmp_path)]), capsys, "neither")


def test_truncated_gguf(tmp_path, smol_path, capsys):
    data = smol_path.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) // 2])
    assert_user_error(main(["generate", "--prompt", "hi", "--model", str(bad)]), capsys, "truncated")


def _write_gguf(path, arch: str, tensor_type=None):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_gguf_architecture(tmp_path, capsys):
    f = tmp_path / "phi.gguf"
    _write_gguf(f, "phi2")
    assert_user_error(main(["generate", "--prompt", "hi", "--model", str(f)]), capsys, "architecture 'phi2'")


def test_unsupported_hf_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    assert_user_error(main(["generate", "--prompt", "hi", "--model", str(tmp_path)]), capsys, "gpt_neox")


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("generate", "chat", "serve", "quantize", "bench", "cache"):
        assert cmd in out


@pytest.mark.parametrize("change, match", [
    ({"intermediate_size": None}, "lacks intermediate_size"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks low_freq_factor"),
])
def test_broken_hf_config(tmp_path, capsys, change, match):
    from blitzgen.config import ModelArgs

    cfg = ModelArgs.from_name("tiny").replace(model_type="llama").to_hf_config()
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert_user_error(main(["generate", "--prompt", "hi", "--model", str(tmp_path)]), capsys, match)


def test_corrupt_tokenizer_config(tmp_path, smol_tokenizer, capsys):
    from blitzgen.tokenizer import Tokenizer

    smol_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(Exception) as e:
        Tokenizer.from_hf_dir(tmp_path)
    assert type(e.value).__name__ == "ModelLoadError" and "tokenizer_config.json" in str(e.value)


def test_truncated_safetensors_shard(tmp_path, capsys):
    from safetensors.torch import save_file

    from blitzgen.config import ModelArgs

    args = ModelArgs.from_name("tiny").replace(model_type="llama")
    (tmp_path / "config.json").write_text(json.dumps(args.to_hf_config()))
    save_file({"model.embed_tokens.weight": torch.zeros(512, 64)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 1000])
    assert_user_error(main(["generate", "--prompt", "hi", "--model", str(tmp_path)]), capsys, "truncated")


def test_missing_tensor(tmp_path, capsys):
    from safetensors.torch import save_file

    from blitzgen.config import ModelArgs

    args = ModelArgs.from_name("tiny")
    (tmp_path / "config.json").write_text(json.dumps(args.to_hf_config()))
    save_file({"model.embed_tokens.weight": torch.zeros(512, 64)}, str(tmp_path / "model.safetensors"))
    assert_user_error(main(["generate", "--prompt", "hi", "--model", str(tmp_path)]), capsys, "missing tensors")


def test_repo_id_offline(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_user_error(main(["generate", "--prompt", "hi", "--model", "nobody-xyz/not-cached-model"]), capsys,
                      "not in the local Hugging Face cache")


# ---- option groups, checks before torch, defaults in --help ------------------------------------------
FAST_ERRORS = [
    (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "--prompt", "hi", "--top-p", "1.5"], "--top-p"),
    (["generate", "--prompt", "hi", "--top-k", "-1"], "--top-k"),
    (["generate", "--prompt", "hi", "--min-p", "-0.1"], "--min-p"),
    (["generate", "--prompt", "hi", "--seed", "-3"], "--seed"),
    (["chat", "--temperature", "nan"], "--temperature"),
    (["chat", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--prompt", "hi", "--max-model-len", "1"], "at least 2"),
    (["generate", "--prompt", "hi", "--max-model-len", "64", "--max-new-tokens", "64"], "no room for a prompt"),
    (["generate", "--prompt", "x" * 100_000, "--max-model-len", "256"], "prompt is too long"),
    (["generate", "--prompt", "hi", "--group-size", "64"], "--group-size applies to --quantize int4 only"),
    (["serve", "--quantize", "int8", "--group-size", "64"], "int4 only, not --quantize int8"),
    (["bench", "--quantize", "int8", "--group-size", "32"], "int4 only"),
    (["generate", "--prompt", "hi", "--url", "http://127.0.0.1:9", "--dtype", "fp32"], "--dtype applies to a model"),
    (["chat", "--url", "http://127.0.0.1:9", "--max-model-len", "512"], "--max-model-len applies to a model"),
    (["chat", "--url", "http://127.0.0.1:9", "--no-compile"], "--compile applies to a model"),
    (["generate", "--prompt", "hi", "--url", "http://127.0.0.1:9"], "cannot reach the server"),  # a client only
]

CHECK_IN_A_FRESH_PROCESS = """
import contextlib, io, json, sys, time
from blitzgen.cli import main
t0, results = time.perf_counter(), []
for argv in json.loads(sys.stdin.read()):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        results.append([main(argv), err.getvalue()])
print(json.dumps({"results": results, "torch": "torch" in sys.modules, "seconds": time.perf_counter() - t0}))
"""


def test_bad_flags_fail_fast_without_torch():
    """Flag ranges, contradictions and a prompt that cannot fit are refused before torch is imported."""
    p = subprocess.run([sys.executable, "-c", CHECK_IN_A_FRESH_PROCESS], input=json.dumps([a for a, _ in FAST_ERRORS]),
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    for (argv, match), (rc, err) in zip(FAST_ERRORS, report["results"]):
        assert rc == 2 and err.startswith("blitzgen: error:") and len(err.strip().splitlines()) == 1, (argv[:6], err)
        assert match in err, (argv[:6], err)
    assert not report["torch"], "a bad flag was checked only after importing torch"
    assert report["seconds"] < 30


def _help(verb: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


@pytest.mark.parametrize("verb, shown", [
    ("generate", ["sampling temperature; 0 is greedy (the same text every run) (default: 0.8)",
                  "0 disables (default: 200)", "(default: random)", "(default: bfloat16)", "(default: 200)"]),
    ("chat", ["(default: 0.7)", "most tokens per reply (default: 512)", "(default: random)"]),
    ("bench", ["(default: 0.8)", "median reported (default: 5)", "seed (default: 0)"]),
    ("serve", ["(default: 16)", "(default: bfloat16)"]),
])
def test_help_shows_the_defaults(verb, shown, capsys):
    text = _help(verb, capsys)
    for part in shown:
        assert part in text, part
    assert "default: None" not in text and not re.search(r"--mode\b", text)


def test_every_verb_shares_the_option_groups():
    """The same concern has the same flag names (and destinations) in every verb that takes it."""
    verbs = build_parser()._subparsers._group_actions[0].choices
    flags = {name: {s: a.dest for a in p._actions for s in a.option_strings} for name, p in verbs.items()}
    table = {s: dest for dest, (strings, _) in {**RUNTIME, **SAMPLING}.items() for s in strings}
    table.update({"--model": "model", "--url": "url", "--api-key": "api_key"})
    for name, have in flags.items():
        for s, dest in have.items():
            if s in table:
                assert dest == table[s], (name, s)
    for name in ("generate", "chat", "serve"):
        assert {s for s, _ in table.items() if s.startswith("--") and table[s] in RUNTIME} <= set(flags[name]), name
    for name in ("generate", "chat"):
        assert set(table) <= set(flags[name]), name
    assert {"--quantize", "--group-size", "--device", "--dtype", "--compile", "--temperature", "--top-k",
            "--seed", "--model"} <= set(flags["bench"])


def test_mode_is_a_hidden_deprecated_alias_of_quantize(capsys):
    p = build_parser()
    assert p.parse_args(["bench", "--mode", "int8"]).quantize == "int8"
    assert "warning: --mode is deprecated; use --quantize" in capsys.readouterr().err
    assert p.parse_args(["bench", "--mode", "bf16"]).quantize is None
    assert p.parse_args(["bench", "--quantize", "int4"]).quantize == "int4"
    assert p.parse_args(["bench"]).quantize is None
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "--mode", "int8", "--quantize", "int4"])
    q = Parser(prog="q")  # a verb that requires a scheme (blitzgen quantize)
    add_runtime_args(q, only=("quantize", "group_size"), mode_alias=True, quantize={"required": True})
    assert q.parse_args(["--mode", "int4", "--group-size", "64"]).quantize == "int4"
    assert q.parse_args(["--quantize", "int8"]).quantize == "int8"
    with pytest.raises(SystemExit):
        q.parse_args([])
    assert "--quantize" in q.format_help() and not re.search(r"--mode\b", q.format_help())


def test_runtime_options_from_flags(monkeypatch):
    from blitzgen.runtime import RuntimeOptions

    monkeypatch.setenv("BLITZGEN_DECODE_ATTENTION", "split")
    parse = build_parser().parse_args
    opts = runtime_options(parse(["generate", "--prompt", "hi"]))
    assert opts == RuntimeOptions.from_env() and opts.decode_attention == "split"
    assert opts.dtype == "bfloat16" and opts.quantize is None and opts.compile is None and opts.device is None
    opts = runtime_options(parse(["chat", "--device", "cpu", "--dtype", "fp32", "--no-compile", "--quantize", "int4",
                                  "--group-size", "64", "--max-model-len", "512", "--decode-attention", "matmul"]))
    assert (opts.device, opts.dtype, opts.compile, opts.quantize, opts.group_size, opts.max_model_len,
            opts.decode_attention) == ("cpu", "float32", False, "int4", 64, 512, "matmul")
    assert runtime_options(parse(["bench", "--mode", "int8"])).quantize == "int8"
    opts = runtime_options(parse(["serve", "--compile-prefill", "--autotune"]))
    assert opts.compile_prefill and opts.autotune
    opts = runtime_options(parse(["generate", "--prompt", "hi"]))
    assert not opts.compile_prefill and not opts.autotune


def test_url_and_modal_are_exclusive(capsys):
    rc = main(["generate", "--prompt", "hi", "--url", "http://127.0.0.1:1", "--modal", "app"])
    assert rc == 2 and "--url and --modal" in capsys.readouterr().err


@pytest.fixture
def tiny_load(monkeypatch, smol_path):
    """`load()` returns a tiny random model (64-token context) with SmolLM2's tokenizer."""
    from blitzgen import loading
    from blitzgen.config import ModelArgs
    from blitzgen.loading import gguf as gguf_src
    from blitzgen.model import Transformer
    from blitzgen.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(gguf_src.open_reader(smol_path))
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny").replace(vocab_size=tok.vocab_size, max_seq_len=64)).eval()
    with torch.no_grad():
        for w in model.parameters():
            w.normal_(0.0, 0.02)
    model.setup_caches(1, 64)
    lm = loading.LoadedModel(model=model, tokenizer=tok, args=model.args, source="tiny", kind="hf", name="tiny")
    monkeypatch.setattr(loading, "load", lambda *a, **kw: lm)
    return lm


def test_max_model_len_above_the_context_warns_and_clamps(tiny_load, capsys):
    rc = main(["generate", "--prompt", "hi", "--raw", "--max-model-len", "1000", "--max-new-tokens", "3",
               "--temperature", "0", "--decode-attention", "matmul"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "blitzgen: warning: --max-model-len 1000 is above tiny's context of 64 tokens; using 64" in err
    assert tiny_load.model.attention_op.decode_impl == "matmul"  # the flag reached the model
    report = [line for line in err.splitlines() if line.startswith("startup: first token in")]
    assert len(report) == 1 and "imports" in report[0] and "load" in report[0], err


def test_over_long_prompt_is_refused_before_compiling(tiny_load, capsys, monkeypatch):
    from blitzgen.generate import Generator

    def no_warmup(*a, **kw):
        raise AssertionError("compiled before checking the prompt's length")

    monkeypatch.setattr(Generator, "warmup", no_warmup)
    rc = main(["generate", "--prompt", "word " * 80, "--raw", "--compile", "--max-new-tokens", "4"])
    assert_user_error(rc, capsys, "maximum context length is 64")


def test_the_process_entry_runs_atexit_flushes_and_keeps_the_exit_code(tmp_path):
    """cli.run ends with os._exit (no interpreter teardown): atexit handlers still run, buffered
    stdout into a file is complete, and main's return code is the process's."""
    code = (
        "import atexit, sys\n"
        "from blitzgen import cli\n"
        "atexit.register(lambda: open(sys.argv[2], 'w').write('ran'))\n"
        "def fake(argv=None):\n"
        "    sys.stdout.write('x' * 100000)\n"
        "    return int(sys.argv[1])\n"
        "cli.main = fake\n"
        "cli.run()\n"
        "raise SystemExit('not reached')\n"
    )
    for rc in (0, 2):
        out, mark = tmp_path / f"out{rc}", tmp_path / f"atexit{rc}"
        with open(out, "w") as f:
            p = subprocess.run([sys.executable, "-c", code, str(rc), str(mark)], stdout=f, stderr=subprocess.PIPE,
                               text=True, timeout=120)
        assert p.returncode == rc, p.stderr
        assert out.read_text() == "x" * 100000
        assert mark.read_text() == "ran"
    env = dict(os.environ, BLITZGEN_CACHE=str(tmp_path / "cache"), BLITZGEN_EXIT_TRACE="1")
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "blitzgen", "cache", "ls"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    # BLITZGEN_EXIT_TRACE: when main returned and what the atexit handlers took (startup_gpu.py)
    returned = float(re.search(r"^blitzgen: exit: main returned at ([\d.]+)$", p.stderr, re.M).group(1))
    assert t0 < returned <= time.time() and re.search(r"^blitzgen: exit: atexit handlers [\d.]+ s$", p.stderr, re.M)
