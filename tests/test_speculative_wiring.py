"""Speculation in the verbs: the option group's rules (checked before torch work), the streaming
adapter against Generator.stream, `blitzgen bench --speculate`, and `blitzgen generate --speculate`."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from blitzgen.cli import build_parser, main
from blitzgen.commands.speculate import check_speculation_args
from blitzgen.speculative import stream_speculative
from blitzgen.generate import Generator
from blitzgen.sampling import SamplingParams
from blitzgen.speculative import NgramDraft, SelfInt4Draft, SpeculationStats, SpeculativeDecoder

from .conftest import tiny_model

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def parse(argv):
    args = build_parser().parse_args(argv)
    check_speculation_args(args)
    return args


# ---- option rules -----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["generate", "-p", "hi", "--speculate-k", "4"], "needs a speculation source"),
    (["generate", "-p", "hi", "--speculate", "draft-model"], "needs --draft-model"),
    (["generate", "-p", "hi", "--speculate", "ngram", "--draft-model", "m"], "implies --speculate draft-model"),
    (["generate", "-p", "hi", "--speculate", "ngram", "--speculate-k", "0"], "between 1 and 32"),
    (["generate", "-p", "hi", "--speculate", "ngram", "--speculate-k", "33"], "between 1 and 32"),
    (["generate", "-p", "hi", "--speculate", "self-int4", "--quantize", "int4"], "int4"),
    (["generate", "-p", "hi", "--speculate", "ngram", "--url", "http://127.0.0.1:9"], "--url"),
    (["serve", "--speculate", "off", "--speculate-k", "3"], "needs a speculation source"),
    (["serve", "--draft-model", "/nonexistent/draft", "--port", "0"], "model not found"),  # before loading
    (["bench", "--shape", "tiny", "--device", "cpu", "--speculate-k", "2"], "needs a speculation source"),
    (["bench", "--shape", "tiny", "--device", "cpu", "--speculate", "self-int4", "--quantize", "int4"], "int4"),
])
def test_bad_combinations_are_one_line_errors(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("blitzgen: error:") and "Traceback" not in err and len(err.splitlines()) == 1
    assert needle in err


@pytest.mark.parametrize("argv", [
    ["generate", "-p", "hi", "--speculate", "eagle"],
    ["bench", "--speculate", "draft-model"],  # bench has no draft model
    ["serve", "--speculate", "ngram,off"],  # 'off' only first
    ["serve", "--speculate", "ngram,ngram"],
    ["generate", "-p", "hi", "--speculate", "ngram,self-int4"],  # a list is for serve
])
def test_bad_values_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "--speculate" in capsys.readouterr().err


def test_good_combinations():
    a = parse(["generate", "-p", "hi"])
    assert a.speculate is None and a.speculate_k is None
    a = parse(["generate", "-p", "hi", "--speculate", "ngram"])
    assert a.speculate == ["ngram"] and a.speculate_k == 4
    a = parse(["generate", "-p", "hi", "--draft-model", "m", "--speculate-k", "7"])
    assert a.speculate == ["draft-model"] and a.speculate_k == 7
    a = parse(["serve", "--speculate", "off,ngram,self-int4"])
    assert a.speculate == ["off", "ngram", "self-int4"]
    a = parse(["serve", "--speculate", "ngram,draft-model", "--draft-model", "m"])
    assert a.speculate == ["ngram", "draft-model"]
    with pytest.raises(Exception, match="implies"):
        parse(["serve", "--speculate", "ngram", "--draft-model", "m"])
    a = parse(["bench", "--shape", "tiny", "--speculate", "self-int4", "--speculate-k", "2"])
    assert a.speculate == ["self-int4"] and a.speculate_k == 2


def test_checks_without_torch():
    """The checks run on a Namespace alone (no model, no torch work)."""
    a = argparse.Namespace(speculate="ngram", draft_model=None, speculate_k=None, quantize=None)
    check_speculation_args(a)
    assert a.speculate == ["ngram"] and a.speculate_k == 4
    check_speculation_args(argparse.Namespace(prompt="x"))  # a verb without the group


# ---- the streaming adapter --------------------------------------------------------------------------
class CharTokenizer:
    eos_token_ids = [0]

    def detokenizer(self, skip_special_tokens: bool = True):
        return SimpleNamespace(add=lambda t: chr(0x100 + t), flush=lambda: "")


@pytest.mark.parametrize("kind", ["ngram", "self-int4"])
def test_stream_matches_generator_stream(kind):
    model = tiny_model()
    gen = Generator(model, CharTokenizer())
    draft = NgramDraft(min_match=1) if kind == "ngram" else SelfInt4Draft(model)  # verifies on this text
    dec = SpeculativeDecoder(model, draft, k=4)
    prompt = [5, 17, 42, 99, 3, 250, 5, 17, 42, 99, 7, 8]
    plain = list(gen.stream(prompt, 30, GREEDY))
    text = "".join(d.text for d in plain)
    assert len(text) == 30
    stats = SpeculationStats()
    forgot = []
    gen.forget_prefix = lambda: forgot.append(1)  # the Generator's prompt-cache claim is dropped first
    deltas = list(stream_speculative(dec, gen, prompt, 30, GREEDY, spec_stats=stats))
    assert forgot == [1]
    assert "".join(d.text for d in deltas) == text
    assert [t for d in deltas for t in d.token_ids] == [t for d in plain for t in d.token_ids]
    last = deltas[-1]
    assert last.finish_reason == "length" and last.stats.generated_tokens == 30
    assert last.stats.prompt_tokens == len(prompt) and last.stats.total_seconds > 0
    assert stats.generated_tokens == 30 and stats.verify_steps > 0
    # a stop string: the same cut as plain decoding's
    stop = text[8:11]
    want = list(gen.stream(prompt, 30, GREEDY, stop=[stop]))
    got = list(stream_speculative(dec, gen, prompt, 30, GREEDY, stop=[stop]))
    assert "".join(d.text for d in got) == "".join(d.text for d in want) == text[:text.index(stop)]
    assert got[-1].finish_reason == want[-1].finish_reason == "stop"
    # a stop token: not emitted, finish "stop"
    tok = plain[0].token_ids[0] if plain[0].token_ids else None
    if tok is not None:
        got = list(stream_speculative(dec, gen, prompt, 30, GREEDY, stop_token_ids=[tok]))
        assert got[-1].finish_reason == "stop" and "".join(d.text for d in got) == ""


def test_a_tensor_parallel_rank_decoder_runs_on_fixed_costs():
    """Each rank times its own clock: a rank's decoder must not, or the ranks' draft lengths (hence
    their collectives) would differ."""
    from blitzgen.speculative import build_decoder

    gen = Generator(tiny_model(), CharTokenizer())
    assert build_decoder(gen, "ngram", 4).follows_clock
    assert not build_decoder(gen, "ngram", 4, group=SimpleNamespace(rank=0, world=2)).follows_clock


# ---- bench ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ngram", "self-int4"])
def test_bench_speculate_json_and_table(kind, capsys):
    argv = ["bench", "--shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--prompt-len", "6", "--new-tokens",
            "24", "--runs", "2", "--temperature", "0", "--no-roofline", "--json", "-", "--speculate", kind,
            "--speculate-k", "3"]
    assert main(argv) == 0
    out = capsys.readouterr()
    r = json.loads(out.out)
    assert r["speculate"] == kind and r["speculate_k"] == 3
    s = r["speculation"]
    assert s["source"] == kind and s["k_max"] == 3 and s["generated_tokens"] == 48  # the two timed runs
    assert s["verify_steps"] + s["plain_steps"] > 0 and len(s["accepted_hist"]) == 4
    assert 0 <= s["acceptance_rate"] <= 1 and "mean_tokens_per_verify" in s
    assert "--speculate" in r["command"]
    assert "speculation acceptance" in out.err and "tokens per verify step" in out.err
    assert f"speculate {kind}" in out.err


def test_bench_without_speculate_has_no_speculation_keys(capsys):
    argv = ["bench", "--shape", "tiny", "--device", "cpu", "--prompt-len", "4", "--new-tokens", "8", "--runs", "1",
            "--no-roofline", "--json", "-"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert "speculation" not in r and "speculate" not in r


# ---- generate (the default model) -------------------------------------------------------------------
@pytest.mark.slow
def test_generate_speculate_same_text_as_plain(capsys):
    base = ["generate", "-p", "Repeat exactly: red, green, blue, red, green, blue, red, green, blue", "--device",
            "cpu", "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "24"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    for extra in (["--speculate", "ngram"], ["--speculate", "self-int4", "--speculate-k", "3"]):
        assert main(base + extra) == 0
        out = capsys.readouterr()
        assert out.out == plain
        assert "Speculation: " in out.err and "tokens/verify" in out.err and "accepted lengths" in out.err


# ---- benchmarks/speculative_bench.py ----------------------------------------------------------------
def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speculative_bench.py"
    spec = importlib.util.spec_from_file_location("speculative_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_script_joins_a_split_model(tmp_path):
    sb = _bench_module()
    data = bytes(range(256)) * 1000
    d = tmp_path / "parts"
    d.mkdir()
    for i, start in enumerate(range(0, len(data), 100_000)):
        (d / f"m.gguf.part-a{'abc'[i]}").write_bytes(data[start:start + 100_000])
    whole = sb.resolve_model(str(d))  # the directory of parts
    assert whole == str(d / "m.gguf") and (d / "m.gguf").read_bytes() == data
    assert sb.resolve_model(str(d)) == str(d)  # joined once: now a directory with one GGUF
    (d / "m.gguf").unlink()
    assert sb.resolve_model(str(d / "m.gguf")) == str(d / "m.gguf")  # the path the parts came from
    assert (d / "m.gguf").read_bytes() == data
    assert sb.resolve_model(None) is None
    (d / "m.gguf").unlink()
    (d / "m.gguf.part-aa").unlink()  # the first call's part never arrived
    with pytest.raises(SystemExit, match="not one split's complete set"):
        sb.resolve_model(str(d))
    assert sb.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_bench_script_shapes_runs_small(tmp_path, capsys):
    sb = _bench_module()
    out = tmp_path / "s.json"
    assert sb.main(["shapes", "--shape", "tiny", "--modes", "bf16,int4", "--k", "1,3", "--pos", "16", "--reps", "2",
                    "--how", "cudagraph,compile", "--device", "cpu", "--dtype", "float32", "--acceptance", "0.5,0.9",
                    "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["kind"] == "shapes" and len(r["rows"]) == 4 and r["skipped"] == ["cudagraph: needs CUDA"]
    bf16 = [row for row in r["rows"] if row["mode"] == "bf16"]
    assert all(row["verify_cost"] > 0 and set(row["predicted_speedup"]["ngram"]) == {"0.5", "0.9"} for row in bf16)
    assert all("self-int4" in row["predicted_speedup"] for row in bf16)
    # combined with (a)'s acceptance, and the budget skips what does not fit
    real = tmp_path / "real.json"
    real.write_text(json.dumps({"rows": [{"prompt": "add", "ngram": {"acceptance_rate": 0.6}}]}))
    assert sb.main(["combine", "--shapes", str(out), "--real", str(real), "--json", str(tmp_path / "c.json")]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert all("ngram/add" in row["predicted_speedup_at_measured_acceptance"] for row in c["rows"])
    assert "predicted" in capsys.readouterr().out.lower()
    assert sb.main(["shapes", "--shape", "tiny", "--modes", "bf16", "--k", "1", "--pos", "16", "--device", "cpu",
                    "--budget", "0", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["skipped"]


# ---- generate and chat on a tiny model with the real tokenizer ----------------------------------------
from .test_cli import tiny_load  # noqa: E402,F401 - the fixture: load() returns a tiny random model


def test_generate_and_chat_speculate_on_tiny(tiny_load, capsys):  # noqa: F811
    from blitzgen.commands.chat import LocalChat

    base = ["generate", "--prompt", "one two one two one two", "--raw", "--max-new-tokens", "12", "--temperature",
            "0", "--device", "cpu", "--dtype", "fp32"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--speculate", "ngram", "--speculate-k", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == plain
    assert "Speculation: ngram k<=3: acceptance" in out.err and "accepted lengths" in out.err
    assert [line for line in out.err.splitlines() if line.startswith("startup: first token in")]

    msgs = [{"role": "user", "content": "hello there"}]
    replies = {}
    for extra in ([], ["--speculate", "self-int4"]):
        args = build_parser().parse_args(["chat", "--device", "cpu", "--dtype", "fp32", *extra])
        check_speculation_args(args)
        chat = LocalChat(args)
        assert (chat.speculative is None) == (not extra)
        replies[bool(extra)] = "".join(chat.reply(msgs, GREEDY, 10, []))
        assert chat.stats()[0] == 10
    assert replies[True] == replies[False]
