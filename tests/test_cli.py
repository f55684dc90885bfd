"""The CLI end to end, and every user mistake as a one-line error with a non-zero exit."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch

from blitzgen.cli import main


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
    (["--prompt", "hi", "--top-p", "0"], "top_p"),
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
    for cmd in ("generate", "chat", "serve", "quantize", "bench"):
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
